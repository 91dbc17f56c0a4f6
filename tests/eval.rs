//! Integration tests of the evaluation parts that need real files: the MMLU data in
//! `../shared/data/mmlu`, the training-curve PNG (decoded and inspected) and `ropo plot`.

mod common;

use std::path::Path;
use std::process::Command;

use ropo::eval::mmlu::{self, Split};

fn mmlu_root() -> std::path::PathBuf {
    mmlu::data_root(&common::shared("data/mmlu")).expect("../shared/data/mmlu holds data/test")
}

#[test]
fn mmlu_parses_every_shared_file() {
    // Row counts from ../shared/data/README.md (hendrycks/test at 785eba57):
    // dev 285, val 1,542, test 14,079 over 57 subjects.
    let root = mmlu_root();
    for (split, rows) in [(Split::Dev, 285), (Split::Val, 1542), (Split::Test, 14079)] {
        let subjects = mmlu::subjects(&root, split).unwrap();
        assert_eq!(subjects.len(), 57, "{split:?}");
        let total: usize = subjects
            .iter()
            .map(|s| mmlu::load_csv(&root.join(split.name()).join(format!("{s}_{}.csv", split.name()))).unwrap().len())
            .sum();
        assert_eq!(total, rows, "{split:?}");
    }
}

#[test]
fn mmlu_subject_and_prompt_from_real_files() {
    let root = mmlu_root();
    let sd = mmlu::load_subject(&root, "abstract_algebra", Split::Test, Some(10)).unwrap();
    assert_eq!(sd.dev.len(), 5);
    assert_eq!(sd.questions.len(), 10);
    // dev row 2 of abstract_algebra_dev.csv is quoted and holds commas in its choices
    assert_eq!(sd.dev[1].choices[0], "True, True");
    assert_eq!(sd.dev[1].answer, 1);
    let p = mmlu::build_prompt(&sd.subject, &sd.dev, 5, &sd.questions[0]);
    assert!(p.starts_with(
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n\
         Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
    ));
    assert_eq!(p.matches("\nAnswer:").count(), 6);
    assert!(p.ends_with("\nAnswer:"));
}

#[test]
fn mmlu_unknown_subject_lists_close_matches() {
    let e = mmlu::load_subject(&mmlu_root(), "abstract_algebre", Split::Test, None).unwrap_err().to_string();
    assert!(e.contains("unknown MMLU subject \"abstract_algebre\"") && e.contains("did you mean: abstract_algebra"), "{e}");
    let e = mmlu::load_subject(&mmlu_root(), "highschool_physics", Split::Test, None).unwrap_err().to_string();
    assert!(e.contains("high_school_physics"), "{e}");
    let e = mmlu::data_root(Path::new("/nonexistent/mmlu")).unwrap_err().to_string();
    assert!(e.contains("not an MMLU data folder"), "{e}");
}

#[test]
fn mmlu_malformed_row_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("test")).unwrap();
    std::fs::create_dir_all(dir.path().join("dev")).unwrap();
    std::fs::write(dir.path().join("dev/toy_dev.csv"), "q,a,b,c,d,A\n").unwrap();
    std::fs::write(dir.path().join("test/toy_test.csv"), "q,a,b,c,d,A\n\"multi\nline\",a,b,c,d,B\nq,a,b,c,d\n").unwrap();
    let e = mmlu::load_subject(dir.path(), "toy", Split::Test, None).unwrap_err().to_string();
    assert!(e.ends_with("test/toy_test.csv:4: expected 6 fields (question,A,B,C,D,answer), got 5"), "{e}");
}

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/metrics.jsonl");

/// Pixels of exactly this colour.
fn count_rgb(img: &image::RgbImage, rgb: [u8; 3]) -> usize {
    img.pixels().filter(|p| p.0 == rgb).count()
}

#[test]
fn plot_writes_a_png_with_curves() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("curves.png");
    let curves = ropo::plot::plot_metrics_file(Path::new(FIXTURE), &out).unwrap();
    // fixture: 60 train steps, eval every 10 steps, one summary record without a step
    for s in &curves.series {
        assert_eq!((s.train.len(), s.eval.len()), (60, 6));
    }
    assert_eq!(curves.skipped, 1);
    let img = image::open(&out).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (ropo::plot::WIDTH, ropo::plot::HEIGHT));
    // the train (blue) and eval (red) curves are drawn in every panel: count their pixels in
    // each third of the image (a 2-px line over a panel is well over 300 pixels)
    let third = ropo::plot::WIDTH / 3;
    for p in 0..3 {
        let panel = image::imageops::crop_imm(&img, p * third, 0, third, ropo::plot::HEIGHT).to_image();
        let blue = count_rgb(&panel, [31, 119, 180]);
        let red = count_rgb(&panel, [214, 39, 40]);
        assert!(blue > 300 && red > 300, "panel {p}: blue {blue} red {red}");
    }
    // text was rendered (dark anti-aliased glyph pixels in the caption band at the top)
    let caption = image::imageops::crop_imm(&img, 0, 0, ropo::plot::WIDTH, 40).to_image();
    assert!(caption.pixels().filter(|p| p.0.iter().all(|&c| c < 100)).count() > 100);
    // nothing else left in the folder (the temporary file was renamed)
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn plot_cli_default_output_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    std::fs::copy(FIXTURE, &metrics).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ropo")).arg("plot").arg(&metrics).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let png = std::fs::read(dir.path().join("curves.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    // a bad line: exit 2, file:line in the message, no PNG written
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"step\":1,\"loss\":0.7}\nnot json\n").unwrap();
    let target = dir.path().join("bad.png");
    let out = Command::new(env!("CARGO_BIN_EXE_ropo")).arg("plot").arg(&bad).arg("--out").arg(&target).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.jsonl:2: invalid JSON"), "{err}");
    assert!(!target.exists());

    // a missing file
    let out = Command::new(env!("CARGO_BIN_EXE_ropo")).arg("plot").arg(dir.path().join("none.jsonl")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("none.jsonl: cannot open"));
}

/// The real model (SmolLM2-135M-Instruct GGUF, f32 on the CPU), without adapters.
fn smollm2() -> ropo::model::LoadedModel {
    ropo::model::load(common::smollm2_gguf().to_str().unwrap(), &Default::default()).unwrap()
}

#[test]
fn preference_logps_match_golden_and_base_is_its_own_reference() {
    use ropo::data::tokenize::TokenizeOptions;
    let lm = smollm2();
    let path = common::shared("data/orca_dpo_pairs/validation.jsonl");
    let opts = TokenizeOptions { max_length: Some(256), max_prompt_length: None };
    let prepared = ropo::data::prepare(&path, &lm.tokenizer, None, &Default::default(), opts).unwrap();
    // ../shared/golden/smollm2_golden.json: rows 0, 1, 3 of the file (lines 1, 2, 4), TRL's
    // tokenization at max_length 256, summed completion log-probs in f32 (PyTorch)
    let golden = common::golden("smollm2_golden.json");
    let gp = golden["orca_pairs"].as_array().unwrap();
    let pairs: Vec<_> = prepared.pairs.iter().filter(|p| [1, 2, 4].contains(&p.line)).cloned().collect();
    assert_eq!(pairs.len(), 3);
    let pad = ropo::data::batch::pad_id(&lm.tokenizer).unwrap();
    let mut seen = 0;
    // batch of 2 then 1: right padding in the first batch must not change the sums
    let scores = ropo::logps::score_pairs(&lm.model, &pairs, pad, 2, true, ropo::logps::Pass::Reference, |k| seen += k).unwrap();
    assert_eq!(seen, 3);
    let v = |t: &candle_core::Tensor| t.to_dtype(candle_core::DType::F64).unwrap().to_vec1::<f64>().unwrap();
    let (rc, rr) = scores.reference.clone().unwrap();
    let (chosen, rejected) = (v(&rc), v(&rr));
    for (i, g) in gp.iter().enumerate() {
        let gc = g["chosen"]["sum_completion_logprob"].as_f64().unwrap();
        let gr = g["rejected"]["sum_completion_logprob"].as_f64().unwrap();
        // 1e-2: the tolerance of the train issue for the same figures (f32 forward, ~200 terms)
        assert!((chosen[i] - gc).abs() < 1e-2, "pair {i} chosen {} vs {gc}", chosen[i]);
        assert!((rejected[i] - gr).abs() < 1e-2, "pair {i} rejected {} vs {gr}", rejected[i]);
    }
    // without an adapter the policy is the reference: rewards exactly 0, loss ln 2, no win
    let (nc, nr) = scores.tokens.clone();
    let lp = ropo::loss::PairLogps { policy_chosen: rc.clone(), policy_rejected: rr.clone(), reference_chosen: rc, reference_rejected: rr, chosen_tokens: nc, rejected_tokens: nr };
    let m = ropo::eval::preference_metrics(&lp, 0.1, ropo::eval::preference::DEFAULT_TOLERANCE).unwrap();
    let r = &m.rewards;
    assert_eq!((r.rewards_chosen, r.rewards_rejected, r.rewards_margins, r.rewards_accuracies), (0.0, 0.0, 0.0, 0.0));
    assert_eq!((m.ties, r.rewards_ties), (3, 1.0), "every pair is a tie");
    assert!((m.loss - std::f64::consts::LN_2).abs() < 1e-12);
}

#[test]
fn mmlu_model_scorer_matches_full_logits() {
    use ropo::eval::mmlu::{LetterScorer, ModelScorer};
    let lm = smollm2();
    let mut sc = ModelScorer::new(&lm.model, &lm.tokenizer, false, None).unwrap();
    // " A".." D" are single tokens of the GPT-2-style BPE ("ĠA" ...), all different
    let ids = sc.letter_ids;
    assert!(ids.iter().enumerate().all(|(i, a)| ids[i + 1..].iter().all(|b| a != b)), "{ids:?}");
    let sd = mmlu::load_subject(&mmlu_root(), "high_school_geography", Split::Test, Some(2)).unwrap();
    let prompt = mmlu::build_prompt(&sd.subject, &sd.dev, 1, &sd.questions[0]);
    assert!(sc.fits(&prompt).unwrap());
    let lp = sc.letter_logprobs(&prompt).unwrap();
    // oracle: the full (1, T, V) logits of Model::forward, log-softmax of the last row (candle)
    let enc = lm.tokenizer.inner.encode(prompt.as_str(), true).unwrap();
    let input = candle_core::Tensor::new(enc.get_ids(), &candle_core::Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = lm.model.forward(&input, None, false).unwrap();
    let t = enc.get_ids().len();
    let last = logits.get(0).unwrap().get(t - 1).unwrap();
    let ls = candle_nn::ops::log_softmax(&last, 0).unwrap().to_vec1::<f32>().unwrap();
    for (i, id) in ids.iter().enumerate() {
        // 1e-4: f32 logits, log-softmax in f32 (oracle) vs f64 (scorer)
        assert!((lp[i] - ls[*id as usize] as f64).abs() < 1e-4, "{i}: {} vs {}", lp[i], ls[*id as usize]);
        assert!(lp[i] < 0.0);
    }
    // the four letters are a real part of the distribution after "Answer:"
    assert!(lp.iter().map(|l| l.exp()).sum::<f64>() > 0.05, "{lp:?}");
    // a context of 10 tokens fits nothing: scoring fails with a clear message
    let mut tiny = ModelScorer::new(&lm.model, &lm.tokenizer, false, Some(10)).unwrap();
    let e = mmlu::score(std::slice::from_ref(&sd), 5, &mut tiny, || {}).unwrap_err().to_string();
    assert!(e.contains("longer than the model's context"), "{e}");
}

#[test]
fn greedy_generation_stats_are_deterministic() {
    use ropo::eval::generation::{counted_ids, generate_all, generation_stats};
    use ropo::generate::GenerateOptions;
    let lm = smollm2();
    let dir = tempfile::tempdir().unwrap();
    let pf = dir.path().join("prompts.jsonl");
    std::fs::write(
        &pf,
        "{\"messages\":[{\"role\":\"user\",\"content\":\"What is the capital of France?\"}]}\n\n{\"prompt\":\"Once upon a time\"}\n",
    )
    .unwrap();
    let prompts = ropo::eval::generation::load_prompts(&pf, &lm.tokenizer, None).unwrap();
    assert_eq!(prompts.iter().map(|p| p.line).collect::<Vec<_>>(), [1, 3]);
    assert!(prompts[0].text.ends_with("<|im_start|>assistant\n"), "{}", prompts[0].text);
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
    let opts = GenerateOptions { max_new_tokens: 12, ..Default::default() };
    let a = generate_all(&lm.model, &lm.tokenizer, &ids, &opts, false, || {}).unwrap();
    let b = generate_all(&lm.model, &lm.tokenizer, &ids, &opts, true, || {}).unwrap();
    // no adapter attached: use_adapters changes nothing, greedy is deterministic
    assert_eq!(a, b);
    assert!(a[0].text.contains("Paris"), "{}", a[0].text);
    let counted: Vec<Vec<u32>> = a.iter().map(|g| counted_ids(g).to_vec()).collect();
    let s = generation_stats(&counted, 12);
    assert_eq!(s.count, 2);
    assert!(s.mean_length > 0.0 && s.mean_length <= 12.0);
    // the story prompt runs to the budget (12 tokens, no stop token)
    assert_eq!(a[1].ids.len(), 12);
    assert!(s.hit_max_new_tokens >= 0.5);

    // bad prompts files: missing, a line without a prompt
    let e = ropo::eval::generation::load_prompts(&dir.path().join("none.jsonl"), &lm.tokenizer, None).unwrap_err();
    assert!(e.to_string().contains("none.jsonl: cannot open prompts file"), "{e}");
    std::fs::write(&pf, "{\"prompt\":\"ok\"}\n{\"text\":\"x\"}\n").unwrap();
    let e = ropo::eval::generation::load_prompts(&pf, &lm.tokenizer, None).unwrap_err();
    assert!(e.to_string().ends_with("prompts.jsonl:2: expected a \"prompt\" or \"messages\" field"), "{e}");
}

fn ropo_eval(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ropo")).arg("eval").args(args).output().unwrap()
}

/// Save a fresh (identity) adapter of `cfg` for the real model into `dir`; with `randomize`,
/// its Householder vectors and Givens angles are set to seeded N(0, 1) values first.
fn save_adapter(dir: &Path, cfg: &ropo::adapter::ropo::RopoConfig, randomize: bool) {
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};
    let mut lm = smollm2();
    let set = ropo::adapter::ropo::inject(&mut lm.model, cfg, "smollm2").unwrap();
    if randomize {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for (name, var) in set.vars() {
            assert!(!name.ends_with("ropo_magnitude"), "rotation-only adapter expected, got {name}");
            let n = var.elem_count();
            let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
            var.set(&candle_core::Tensor::from_vec(v, var.dims(), var.device()).unwrap()).unwrap();
        }
    }
    ropo::adapter::ropo::files::save(dir, &set).unwrap();
}

#[test]
fn eval_identity_adapter_equals_base() {
    // Acceptance of the eval issue: with a fresh adapter every metric equals the base model's.
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    save_adapter(&adapter, &Default::default(), false);
    let model = common::smollm2_gguf();
    let prefs = common::shared("data/orca_dpo_pairs/validation.jsonl");
    let mmlu_dir = common::shared("data/mmlu");
    let out = dir.path().join("out/report.json");
    let o = ropo_eval(&[
        "--model", model.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--compare-base",
        "--prefs", prefs.to_str().unwrap(), "--limit", "3", "--max-length", "256", "--batch-size", "1",
        "--prompts", prefs.to_str().unwrap(), "--samples", "2", "--max-new-tokens", "12",
        "--mmlu", mmlu_dir.to_str().unwrap(), "--subjects", "astronomy", "--mmlu-limit", "2", "--shots", "1",
        "--energy", "--drift", "--out", out.to_str().unwrap(), "--dtype", "f64",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("rewards/accuracies") && table.contains("energy/total (120 layers)"), "{table}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let (base, adapted) = (&r["base"], &r["adapted"]);
    let f = |v: &serde_json::Value| v.as_f64().unwrap();
    // rewards and margins within 1e-5 of 0; accuracies count reward gaps above
    // REWARD_TOLERANCE (1e-4): no pair wins, every pair is a tie. Run in f64: in f32 the identity rotation's rounding (~1e-7 a layer, 30 layers,
    // summed over ~200 completion tokens) gave a margin of -1.3e-5 on these 3 pairs, at the
    // edge of the 1e-5 the acceptance asks for.
    let p = &adapted["preference"];
    for k in ["rewards/chosen", "rewards/rejected", "rewards/margins"] {
        assert!(f(&p[k]).abs() < 1e-5, "{k} = {}", p[k]);
    }
    assert_eq!(f(&p["rewards/accuracies"]), 0.0);
    assert_eq!((f(&p["rewards/ties"]), p["ties"].as_u64()), (1.0, Some(3)));
    assert!((f(&p["loss"]) - std::f64::consts::LN_2).abs() < 1e-5);
    // logps within 1e-6 of the base's (sums of ~200 f64 terms)
    for k in ["logps/chosen", "logps/rejected"] {
        assert!((f(&p[k]) - f(&base["preference"][k])).abs() < 1e-6, "{k}");
    }
    // greedy generations identical (same token counts and texts), statistics equal
    assert_eq!(base["greedy"], adapted["greedy"]);
    let gens = std::fs::read_to_string(dir.path().join("out/generations.jsonl")).unwrap();
    let recs: Vec<serde_json::Value> = gens.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(recs.len(), 8); // 2 prompts x greedy/sampled x base/adapted
    let greedy = |m: &str| recs.iter().filter(|x| x["model"] == m && x["mode"] == "greedy").map(|x| x["completion"].clone()).collect::<Vec<_>>();
    assert_eq!(greedy("base"), greedy("adapted"));
    // drift from the reference: 0 for the base itself, float noise for the identity adapter
    // (its magnitudes, the row norms, were saved in f32: m / rho = 1 + ~1e-8, so the NLL moves
    // by ~5e-8 per token; measured 5.3e-8, KL 4e-14)
    assert_eq!(f(&base["drift"]["kl"]), 0.0);
    assert!(f(&adapted["drift"]["kl"]).abs() < 1e-12, "{}", adapted["drift"]);
    assert!((f(&adapted["drift"]["nll_policy"]) - f(&base["drift"]["nll_policy"])).abs() < 1e-6, "{} vs {}", adapted["drift"], base["drift"]);
    assert!(table.contains("drift/kl") && table.contains("drift/nll"), "{table}");
    // MMLU within 1e-4
    let (mb, ma) = (&base["mmlu"]["overall"], &adapted["mmlu"]["overall"]);
    assert_eq!(mb["accuracy"], ma["accuracy"]);
    assert!((f(&mb["mean_logprob_correct"]) - f(&ma["mean_logprob_correct"])).abs() < 1e-4);
    // HE change 0: relative 1e-5 (merged weights are f32; HE itself is computed in f64)
    let e = &r["energy"];
    assert_eq!(e["layers"].as_array().unwrap().len(), 120); // q,k,v,o x 30 layers
    assert!(f(&e["max_abs_relative_change"]) < 1e-5, "{}", e["max_abs_relative_change"]);
}

#[test]
fn eval_energy_unchanged_by_a_trained_rotation() {
    // A rotation-only adapter (magnitude off) with random non-identity parameters keeps every
    // angle between neurons: HE change 0 to float tolerance, by construction.
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    let cfg = ropo::adapter::ropo::RopoConfig { magnitude: false, ..Default::default() };
    save_adapter(&adapter, &cfg, true);
    let model = common::smollm2_gguf();
    let out = dir.path().join("report.json");
    let o = ropo_eval(&["--model", model.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--energy", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let e = &r["energy"];
    // 1e-5 relative: f32 rounding of W R^T (d = 576), far below the changes DPO makes
    assert!(e["max_abs_relative_change"].as_f64().unwrap() < 1e-5, "{e}");
    assert!(r.get("base").is_none());
}

#[test]
fn eval_bad_inputs_fail_before_loading() {
    let model = common::smollm2_gguf();
    let m = model.to_str().unwrap();
    let mmlu_dir = common::shared("data/mmlu");
    let cases: [(&[&str], &str); 4] = [
        (&["--model", m, "--prompts", "/nonexistent/prompts.jsonl"], "--prompts /nonexistent/prompts.jsonl: no such file"),
        (&["--model", m, "--mmlu", mmlu_dir.to_str().unwrap(), "--subjects", "astronomi"], "did you mean: astronomy"),
        (&["--model", m], "nothing to evaluate"),
        (&["--model", m, "--adapter", "/nonexistent", "--energy"], "no adapter_config.json"),
    ];
    for (args, msg) in cases {
        let o = ropo_eval(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(msg), "{args:?}: {err}");
    }
}

// Bad values and a malformed MMLU row fail before the model loads, and leave nothing behind:
// the --out folder is not created (it is created only when the report is written).
#[test]
fn eval_bad_inputs_leave_no_output() {
    let model = common::smollm2_gguf();
    let m = model.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"hi\"}\n").unwrap();
    let mmlu = dir.path().join("mmlu");
    for split in ["dev", "test"] {
        std::fs::create_dir_all(mmlu.join(split)).unwrap();
    }
    std::fs::write(mmlu.join("dev/x_dev.csv"), "q,a,b,c,d,A\n").unwrap();
    std::fs::write(mmlu.join("test/x_test.csv"), "q,a,b,c,d,A\nbroken,a,b,c\n").unwrap();
    let (p, mm) = (prompts.to_str().unwrap(), mmlu.to_str().unwrap());
    let cases: [(&[&str], &str); 3] = [
        (&["--prompts", p, "--samples", "0"], "--samples must be >= 1"),
        (&["--prefs", p, "--max-length", "0"], "--max-length must be >= 1"),
        (&["--prompts", p, "--mmlu", mm, "--subjects", "x"], "x_test.csv:2: expected 6 fields"),
    ];
    for (i, (args, msg)) in cases.into_iter().enumerate() {
        let out = dir.path().join(format!("out{i}/report.json"));
        let o = ropo_eval(&[&["--model", m, "--out", out.to_str().unwrap()], args].concat());
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(msg) && !err.contains("loading model"), "{args:?}: {err}");
        assert!(!out.parent().unwrap().exists(), "{args:?}: output folder created");
    }
}

// ---------------------------------------------------------------- drift (KL from the reference)

/// Random token ids in `0..vocab`.
fn random_ids(n: usize, vocab: usize, rng: &mut impl rand::Rng) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

/// `drift` against a by-hand computation from the full logits of `Model::forward`, in f64:
/// zero for the model against itself, equal across batch sizes, positive for a moved adapter.
#[test]
fn drift_kl_matches_full_logits_and_is_zero_against_itself() {
    use candle_core::IndexOp;
    use rand::SeedableRng;
    use ropo::eval::drift::drift;
    use ropo::model::config::Arch;
    let cfg = common::tiny::tiny_config(Arch::Llama, 40, 16, false);
    let (model, _set) = common::tiny::model_with_perturbed_ropo(&cfg, 3, 4);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let prompts: Vec<Vec<u32>> = [3, 7, 1, 5].iter().map(|&n| random_ids(n, 40, &mut rng)).collect();
    let completions: Vec<Vec<u32>> = [4, 2, 6, 0].iter().map(|&n| random_ids(n, 40, &mut rng)).collect();
    // by hand: full (1, T, V) logits of each sequence, adapters off and on
    let (mut kl, mut nll_p, mut nll_r, mut tokens) = (0.0, 0.0, 0.0, 0);
    for (p, c) in prompts.iter().zip(&completions) {
        let ids: Vec<u32> = p.iter().chain(c).copied().collect();
        let input = candle_core::Tensor::new(ids.as_slice(), &candle_core::Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let lsm = |adapters: bool| -> Vec<Vec<f64>> {
            let l = model.forward(&input, None, adapters).unwrap().i(0).unwrap();
            candle_nn::ops::log_softmax(&l, 1).unwrap().to_vec2::<f64>().unwrap()
        };
        let (r, q) = (lsm(false), lsm(true));
        for (t, &y) in c.iter().enumerate() {
            let pos = p.len() - 1 + t;
            kl += r[pos].iter().zip(&q[pos]).map(|(a, b)| a.exp() * (a - b)).sum::<f64>();
            nll_p -= q[pos][y as usize];
            nll_r -= r[pos][y as usize];
            tokens += 1;
        }
    }
    let n = tokens as f64;
    let d1 = drift(&model, &prompts, &completions, true, 1).unwrap();
    assert_eq!((d1.prompts, d1.tokens), (4, 12));
    assert!((d1.kl - kl / n).abs() < 1e-12 && d1.kl > 1e-3, "{d1:?} vs {}", kl / n);
    assert!((d1.nll_policy - nll_p / n).abs() < 1e-12 && (d1.nll_reference - nll_r / n).abs() < 1e-12, "{d1:?}");
    // right-padded batches give the same numbers
    let d3 = drift(&model, &prompts, &completions, true, 3).unwrap();
    assert!((d3.kl - d1.kl).abs() < 1e-12 && (d3.nll_policy - d1.nll_policy).abs() < 1e-12, "{d3:?} vs {d1:?}");
    // the reference against itself: exactly 0, the same NLL on both sides
    let d0 = drift(&model, &prompts, &completions, false, 2).unwrap();
    assert_eq!(d0.kl, 0.0);
    assert_eq!(d0.nll_policy, d0.nll_reference);
    assert!((d0.nll_reference - d1.nll_reference).abs() < 1e-12);
    assert!(drift(&model, &prompts, &completions[..2], true, 1).is_err());
    // a separate policy model: the perturbed model against a second copy of the same base
    // (another model object, adapters off) gives the numbers of the adapters-on drift
    use ropo::eval::drift::drift_between;
    let (reference, _) = common::tiny::model_with_perturbed_ropo(&cfg, 3, 4);
    let d2 = drift_between(&reference, Some((&model, true)), &prompts, &completions, 2).unwrap();
    assert!((d2.kl - d1.kl).abs() < 1e-12 && (d2.nll_policy - d1.nll_policy).abs() < 1e-12, "{d2:?} vs {d1:?}");
    let same = drift_between(&reference, Some((&model, false)), &prompts, &completions, 2).unwrap();
    assert!(same.kl.abs() < 1e-12, "{same:?}");
}

/// A fresh (identity) adapter on the real model, in f64: drift 0 up to float noise.
#[test]
fn drift_of_an_identity_adapter_is_zero() {
    let mut lm = ropo::model::load(
        common::smollm2_gguf().to_str().unwrap(),
        &ropo::model::LoadOptions { dtype: candle_core::DType::F64, ..Default::default() },
    )
    .unwrap();
    let _set = ropo::adapter::ropo::inject(&mut lm.model, &Default::default(), "smollm2").unwrap();
    let tok = &lm.tokenizer;
    let prompts: Vec<Vec<u32>> = ["The capital of France is", "Water boils at"]
        .iter()
        .map(|p| tok.inner.encode(*p, true).unwrap().get_ids().to_vec())
        .collect();
    let completions = ropo::eval::drift::reference_completions(&lm.model, tok, &prompts, 6).unwrap();
    assert!(completions.iter().all(|c| !c.is_empty()));
    let d = ropo::eval::drift::drift(&lm.model, &prompts, &completions, true, 2).unwrap();
    assert!(d.kl.abs() < 1e-12, "{d:?}");
    assert!((d.nll_policy - d.nll_reference).abs() < 1e-9, "{d:?}");
}

// ---------------------------------------------------------------- MMLU in cloze form

/// A handmade MMLU folder: subject `easy_facts` with questions whose answers the real model
/// knows (dev: one example), in the hendrycks CSV layout.
fn handmade_mmlu(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("mmlu");
    for split in ["dev", "test"] {
        std::fs::create_dir_all(root.join(split)).unwrap();
    }
    std::fs::write(root.join("dev/easy_facts_dev.csv"), "What do bees make?,honey,steel,glass,plastic,A\n").unwrap();
    std::fs::write(
        root.join("test/easy_facts_test.csv"),
        "What is the capital of France?,Berlin,Paris,Madrid,Tokyo,B\n\
         \"What colour is the sky on a clear, sunny day?\",green,red,black,blue,D\n\
         How many legs does a dog have?,four,eleven,twenty,one hundred,A\n",
    )
    .unwrap();
    root
}

/// Cloze scores of the real model: each choice's log-likelihood equals a by-hand sum over the
/// full logits of that sequence alone (so the 4-row batch changes nothing), the known answers
/// win, and `ropo eval --mmlu-format cloze` reports them.
#[test]
fn mmlu_cloze_scores_answer_texts() {
    use ropo::eval::mmlu::{build_cloze_prompt, cloze_choices, score_cloze, ClozeScorer, ModelScorer};
    let dir = tempfile::tempdir().unwrap();
    let root = handmade_mmlu(dir.path());
    let lm = smollm2();
    let sd = mmlu::load_subject(&root, "easy_facts", Split::Test, None).unwrap();
    let mut sc = ModelScorer::new(&lm.model, &lm.tokenizer, false, None).unwrap();
    let prompt = build_cloze_prompt(&sd.subject, &sd.dev, 1, &sd.questions[0]);
    let conts = cloze_choices(&sd.questions[0]);
    let lp = sc.continuation_logprobs(&prompt, &conts).unwrap();
    // oracle: each continuation alone, full (1, T, V) logits, candle's log-softmax
    let ctx = lm.tokenizer.inner.encode(prompt.as_str(), true).unwrap().get_ids().to_vec();
    for (i, c) in conts.iter().enumerate() {
        let whole = lm.tokenizer.inner.encode(format!("{prompt}{c}").as_str(), true).unwrap().get_ids().to_vec();
        assert!(whole.starts_with(&ctx) && whole.len() > ctx.len(), "{c:?}");
        let input = candle_core::Tensor::new(whole.as_slice(), &candle_core::Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = lm.model.forward(&input, None, false).unwrap().get(0).unwrap();
        let ls = candle_nn::ops::log_softmax(&logits, 1).unwrap().to_vec2::<f32>().unwrap();
        let want: f64 = (ctx.len()..whole.len()).map(|t| ls[t - 1][whole[t] as usize] as f64).sum();
        assert!((lp[i] - want).abs() < 1e-3, "{c:?}: {} vs {want}", lp[i]);
    }
    let s = score_cloze(std::slice::from_ref(&sd), 1, &mut sc, || {}).unwrap();
    assert_eq!(s.overall.n, 3);
    assert_eq!(s.overall.accuracy, 1.0, "{s:?}");
    assert!(s.overall.mean_logprob_correct < 0.0 && s.overall.accuracy_norm.is_some());
    // the CLI
    let out = dir.path().join("r.json");
    let o = ropo_eval(&[
        "--model", common::smollm2_gguf().to_str().unwrap(), "--mmlu", root.to_str().unwrap(), "--subjects", "easy_facts",
        "--shots", "1", "--mmlu-format", "cloze", "--out", out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("mmlu/accuracy_norm") && table.contains("mmlu/easy_facts/accuracy"), "{table}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(r["base"]["mmlu"]["format"], "cloze");
    let got = r["base"]["mmlu"]["overall"]["mean_logprob_correct"].as_f64().unwrap();
    assert!((got - s.overall.mean_logprob_correct).abs() < 1e-9, "{got} vs {}", s.overall.mean_logprob_correct);
}
