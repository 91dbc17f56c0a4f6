//! The training loop on the real model (SmolLM2-135M-Instruct, Q4_1 GGUF):
//! - step 0: every loss type at its value for policy = reference, zero rewards, and the golden
//!   summed log-probs of the orca rows (`../shared/golden/smollm2_golden.json`);
//! - `ropo train` end to end: loss moves, adapter files written and loadable;
//! - kill -9 after the step-3 checkpoint + `--resume` == an uninterrupted run, bit for bit;
//! - Ctrl-C writes a checkpoint and exits cleanly;
//! - bad input: clear message, exit code 2, no files written.
//!
//! Every run is short (a few steps, a few pairs of `data/concise_prefs`, max_length 128) and
//! pinned to one thread so that results are comparable bit for bit.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use ropo::config::RunConfig;
use ropo::data::batch::{collate, pad_id};
use ropo::data::tokenize::{PairTokenizer, TokenizeOptions};
use ropo::logps::{completion_token_counts, split_pairs};
use ropo::loss::{preference_loss, LossParams, LossType, PairLogps};
use ropo::metrics::{read_records, without_timing};

fn ropo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ropo")).args(args).output().expect("running ropo")
}

fn repo(rel: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel).to_str().unwrap().to_string()
}

/// A short run config on concise_prefs (the first `rows` train rows, 4 eval rows).
fn short_config(out: &Path, extra_training: &str) -> String {
    format!(
        r#"[model]
path_or_id = "{model}"

[data]
train_files = ["{train}"]
eval_file = "{eval}"
train_rows = ":12"
eval_rows = ":4"
max_length = 128

[training]
output_dir = "{out}"
learning_rate = 3e-3
per_device_train_batch_size = 2
per_device_eval_batch_size = 4
threads = 1
save_total_limit = 0
{extra_training}
"#,
        model = common::smollm2_gguf().display(),
        train = repo("data/concise_prefs/train.jsonl"),
        eval = repo("data/concise_prefs/eval.jsonl"),
        out = out.display(),
    )
}

fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

// ---------------------------------------------------------------- step 0

/// At step 0 the adapters are the identity, so policy = reference: every loss type takes its
/// closed-form value, the rewards are 0, and the logps are the base model's (golden, TRL).
#[test]
fn step0_losses_rewards_and_golden_logps() {
    let gguf = common::smollm2_gguf();
    let mut m = ropo::model::load(gguf.to_str().unwrap(), &common::load_options()).unwrap();
    let mut cfg = RunConfig::default();
    cfg.model.path_or_id = gguf.to_str().unwrap().into();
    let set = ropo::adapter::AnyAdapterSet::inject(&mut m.model, &cfg.adapter, "smollm2").unwrap();

    // the golden orca rows: validation.jsonl rows 0..3, max_length 256 (row 2's prompt is too long)
    let golden = common::golden("smollm2_golden.json");
    let path = common::shared("data/orca_dpo_pairs/validation.jsonl");
    let data = ropo::data::load(&path, &Default::default()).unwrap();
    let pt = PairTokenizer::new(&m.tokenizer, None, TokenizeOptions { max_length: Some(256), max_prompt_length: None }).unwrap();
    let pairs = pt.tokenize_all(&data.examples[..4], &path, &mut Default::default()).unwrap();
    assert_eq!(pairs.len(), 3);
    let refs: Vec<_> = pairs.iter().collect();
    let batch = collate(&refs, pad_id(&m.tokenizer).unwrap(), m.model.device()).unwrap();

    let reference = ropo::logps::batch_logps_detached(&m.model, &batch, false, false).unwrap();
    // the training path: policy forward + loss + backward; every adapter tensor gets a gradient
    let (out, policy) = {
        let (out, grads) = ropo::train::micro_batch(&m.model, &batch, &reference, &cfg.training).unwrap();
        ropo::optim::Grads::from_store(&set.vars(), &grads).expect("every trainable tensor has a gradient");
        (out.loss.to_scalar::<f32>().unwrap() as f64, out.metrics)
    };
    let (loss, metrics) = (out, policy);
    let ln2 = std::f64::consts::LN_2;
    assert!((loss - ln2).abs() < 1e-5, "step-0 sigmoid loss {loss}, want ln 2");
    assert!(metrics.rewards_chosen.abs() < 1e-5 && metrics.rewards_rejected.abs() < 1e-5, "{metrics:?}");
    // reward gaps within float noise of 0 are ties (|gap| <= REWARD_TOLERANCE), not wins decided by noise
    assert_eq!(metrics.rewards_accuracies, 0.0, "step-0 accuracy of an identity adapter: {metrics:?}");
    assert!((metrics.rewards_ties - 1.0).abs() < 1e-12, "every step-0 pair is a tie: {metrics:?}");

    // golden summed completion log-probs, per sequence (the base model's full logits, as the
    // golden procedure; and the training path's completion-position log-probs, adapters on)
    // and as TRL's batch means
    let gold = golden["orca_pairs"].as_array().unwrap();
    let want_c: Vec<f64> = gold.iter().map(|g| g["chosen"]["sum_completion_logprob"].as_f64().unwrap()).collect();
    let want_r: Vec<f64> = gold.iter().map(|g| g["rejected"]["sum_completion_logprob"].as_f64().unwrap()).collect();
    let full = {
        let logits = m.model.forward(&batch.input_ids, Some(&batch.attention_mask), false).unwrap();
        ropo::logps::completion_logps(&logits, &batch.input_ids, &batch.completion_mask).unwrap()
    };
    let policy = ropo::logps::batch_logps_detached(&m.model, &batch, true, false).unwrap();
    for (what, t) in [("full logits, adapters bypassed", &full), ("reference", &reference), ("policy", &policy)] {
        let got = t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
        for (i, (g, w)) in got.iter().zip(want_c.iter().chain(&want_r)).enumerate() {
            assert!((g - w).abs() < 1e-2, "{what}: sequence {i}: logps {g}, golden {w}");
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!((metrics.logps_chosen - mean(&want_c)).abs() < 1e-2, "logps/chosen {} vs {}", metrics.logps_chosen, mean(&want_c));
    assert!((metrics.logps_rejected - mean(&want_r)).abs() < 1e-2, "logps/rejected {} vs {}", metrics.logps_rejected, mean(&want_r));

    // every other loss type at its own value for equal policy and reference (exactly equal
    // log-probs: the reference's), and, within the rounding of the identity adapter, for the
    // adapted policy (|policy - reference| is ~1e-4 nats per sequence; hinge moves by beta times that)
    let counts = completion_token_counts(&batch.completion_mask).unwrap();
    let pair_logps = |policy: &Tensor| {
        let (pc, pr) = split_pairs(policy).unwrap();
        let (rc, rr) = split_pairs(&reference).unwrap();
        let (nc, nr) = split_pairs(&counts).unwrap();
        PairLogps { policy_chosen: pc, policy_rejected: pr, reference_chosen: rc, reference_rejected: rr, chosen_tokens: nc, rejected_tokens: nr }
    };
    let max_dev = (&policy - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(max_dev < 1e-3, "identity adapter moved a sequence log-prob by {max_dev}");
    for lt in LossType::ALL {
        let eps = if lt.check_label_smoothing(0.1).is_ok() { 0.1 } else { 0.0 };
        let p = LossParams { beta: 0.1, label_smoothing: eps, discopop_tau: 0.05 };
        let want = lt.value_at_reference(&p);
        for (what, pol, tol) in [("policy = reference", &reference, 1e-5), ("identity adapter", &policy, 1e-4)] {
            let out = preference_loss(lt, &pair_logps(pol), &p, None).unwrap();
            let got = out.loss.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
            assert!((got - want).abs() < tol * want.abs().max(1.0), "{lt} ({what}): step-0 loss {got}, want {want}");
        }
    }
}

/// A tiny f64 model (llama, tied head) with adapters on q, v, o and down moved off the identity,
/// its trainable Vars, and two pairs (prompts of different lengths, right padding).
fn tiny_training_fixture(seed: u64) -> (ropo::model::llama::Model, Vec<(String, candle_core::Var)>, RunConfig, Vec<ropo::data::tokenize::TokenizedPair>) {
    use ropo::model::config::Arch;
    use ropo::data::tokenize::TokenizedPair;
    use rand::SeedableRng;
    let cfg = common::tiny::tiny_config(Arch::Llama, 40, 16, true);
    let dev = Device::Cpu;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let w = ropo::model::llama::random_weights(&cfg, 0.3, &mut rng, DType::F64, &dev).unwrap();
    let map = w.into_iter().collect();
    let mut model = ropo::model::llama::Model::load(candle_nn::VarBuilder::from_tensors(map, DType::F64, &dev), &cfg).unwrap();
    let mut run = RunConfig::default();
    run.adapter.target_modules = vec!["q_proj".into(), "v_proj".into(), "o_proj".into(), "down_proj".into()];
    run.training.beta = 0.5;
    let set = ropo::adapter::AnyAdapterSet::inject(&mut model, &run.adapter, "tiny").unwrap();
    let params = set.vars();
    for (_, v) in &params {
        let noise = Tensor::randn(0.0f64, 0.2, v.dims(), &dev).unwrap();
        v.set(&(v.as_tensor() + noise).unwrap()).unwrap();
    }
    let pairs = vec![
        TokenizedPair { line: 1, prompt_ids: vec![5, 17, 3], chosen_ids: vec![29, 8], rejected_ids: vec![11, 2, 38] },
        TokenizedPair { line: 2, prompt_ids: vec![7, 20], chosen_ids: vec![1, 4, 9, 33], rejected_ids: vec![6] },
    ];
    (model, params, run, pairs)
}

/// The training path (`train::micro_batch`: policy forward with adapters, completion-position LM
/// head, sigmoid loss against the bypassed reference), with `training.share_prompt` true (each
/// prompt once, both completions attending to its K/V) and false (concatenated rows): every
/// adapter tensor's gradient matches central finite differences in f64 (tiny random model,
/// adapters moved off the identity). Relative error < 1e-4 at eps 1e-5 (central differences in
/// f64 are good to ~1e-8 here).
#[test]
fn training_path_gradients_match_finite_differences() {
    use rand::{Rng, SeedableRng};
    for share_prompt in [true, false] {
        let (model, params, mut run, pairs) = tiny_training_fixture(3);
        run.training.share_prompt = share_prompt;
        let dev = Device::Cpu;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let refs: Vec<_> = pairs.iter().collect();
        let batch = collate(&refs, 0, &dev).unwrap();
        let reference = ropo::logps::batch_logps_detached(&model, &batch, false, share_prompt).unwrap();
        let (out, grads) = ropo::train::micro_batch(&model, &batch, &reference, &run.training).unwrap();
        assert_eq!(out.loss.dtype(), DType::F64);
        let grads = ropo::optim::Grads::from_store(&params, &grads).unwrap();
        let loss_now = || ropo::train::micro_batch(&model, &batch, &reference, &run.training).unwrap().0.loss.to_scalar::<f64>().unwrap();
        let eps = 1e-5;
        for ((name, var), g) in params.iter().zip(&grads.0) {
            let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
            assert!(g.iter().any(|x| *x != 0.0), "{name} (share_prompt {share_prompt}): all-zero gradient");
            let argmax = (0..g.len()).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap();
            let mut entries = vec![argmax];
            entries.extend((0..2).map(|_| rng.random_range(0..g.len())));
            for &i in &entries {
                let fd = common::gradients::central_difference(var, i, eps, &loss_now);
                let err = (fd - g[i]).abs() / g[i].abs().max(fd.abs()).max(1e-3);
                assert!(err < 1e-4, "{name}[{i}] (share_prompt {share_prompt}): analytic {}, finite differences {fd} (rel err {err:e})", g[i]);
            }
        }
    }
}

/// `training.share_prompt = true` (prefix-shared policy and reference) and `false` (concatenated
/// rows) give the same micro-batch: reference log-probs, loss, every reward metric and the
/// gradient of every trainable tensor agree to 1e-10 (absolute, relative to max(1, |value|)) in
/// f64. The two paths differ only in the order of floating-point sums (~1e-14 here); 1e-10 still
/// catches any wrong position, mask or RoPE offset. Also a pair with an empty prompt (nothing to
/// share) takes the fallback and gives the plain path's values exactly.
#[test]
fn share_prompt_true_and_false_give_the_same_micro_batch() {
    let close = |a: f64, b: f64, what: &str| assert!((a - b).abs() <= 1e-10 * a.abs().max(b.abs()).max(1.0), "{what}: shared {a} vs plain {b}");
    let (model, params, mut run, mut pairs) = tiny_training_fixture(5);
    let dev = Device::Cpu;
    let step = |run: &RunConfig, pairs: &[ropo::data::tokenize::TokenizedPair]| {
        let refs: Vec<_> = pairs.iter().collect();
        let batch = collate(&refs, 0, &dev).unwrap();
        let reference = ropo::logps::batch_logps_detached(&model, &batch, false, run.training.share_prompt).unwrap();
        let (out, grads) = ropo::train::micro_batch(&model, &batch, &reference, &run.training).unwrap();
        let grads = ropo::optim::Grads::from_store(&params, &grads).unwrap();
        let g: Vec<Vec<f64>> = grads.0.iter().map(|g| g.flatten_all().unwrap().to_vec1().unwrap()).collect();
        (reference.to_vec1::<f64>().unwrap(), out.loss.to_scalar::<f64>().unwrap(), out.metrics, g)
    };
    for case in ["shared prompts", "an empty prompt (fallback)"] {
        if case.starts_with("an empty") {
            pairs[1].prompt_ids.clear();
        }
        // the shared path is taken exactly when the batch splits into shared prompts
        let refs: Vec<_> = pairs.iter().collect();
        let b = collate(&refs, 0, &dev).unwrap();
        let split = ropo::model::prefix::SharedPromptBatch::try_from_concatenated(&b.input_ids, &b.attention_mask, &b.completion_mask).unwrap();
        assert_eq!(split.is_ok(), case == "shared prompts", "{case}: {:?}", split.err());
        run.training.share_prompt = true;
        let (ra, la, ma, ga) = step(&run, &pairs);
        run.training.share_prompt = false;
        let (rb, lb, mb, gb) = step(&run, &pairs);
        for (i, (a, b)) in ra.iter().zip(&rb).enumerate() {
            close(*a, *b, &format!("{case}: reference logps[{i}]"));
        }
        close(la, lb, &format!("{case}: loss"));
        let m = |m: &ropo::loss::RewardMetrics| serde_json::to_value(m).unwrap();
        let (ma, mb) = (m(&ma), m(&mb));
        for (k, a) in ma.as_object().unwrap() {
            close(a.as_f64().unwrap(), mb[k].as_f64().unwrap(), &format!("{case}: {k}"));
        }
        for (((name, _), a), b) in params.iter().zip(&ga).zip(&gb) {
            assert!(a.iter().any(|x| *x != 0.0), "{case}: {name}: all-zero gradient");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                close(*x, *y, &format!("{case}: grad {name}[{i}]"));
            }
        }
        if case.starts_with("an empty") {
            assert_eq!((la, ga), (lb, gb), "the fallback is the plain path");
        }
    }
}

/// A trainable tensor that is not on the loss's path is an error at the first step, naming it.
#[test]
fn a_tensor_without_gradient_is_an_error() {
    let x = candle_core::Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
    let frozen = candle_core::Var::new(&[3.0f32], &Device::Cpu).unwrap();
    let params = vec![("a.ropo_u".to_string(), x.clone()), ("b.ropo_theta".to_string(), frozen)];
    let loss = x.as_tensor().sqr().unwrap().sum_all().unwrap();
    let mut acc = ropo::optim::GradAccumulator::new(1);
    let e = acc.add(&params, &loss.backward().unwrap()).unwrap_err().to_string();
    assert_eq!(e, "no gradient for b.ropo_theta");
}

// ---------------------------------------------------------------- end to end

#[test]
fn cli_short_training_moves_the_loss_and_writes_a_loadable_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let cfg = write_config(dir.path(), "run.toml", &short_config(&out, "max_steps = 4\nsave_steps = 2\neval_steps = 2\ndiagnostic_prompts = 2\ndiagnostic_max_new_tokens = 8"));
    let o = ropo(&["train", "--config", cfg.to_str().unwrap()]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    for want in ["trainable params: 391,560", "rows read", "train split: 12 pairs from 12 rows", "tokens per step:", "peak RSS", "eval at step 4"] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    for f in ["adapter_model.safetensors", "adapter_config.json", "trainer_state.json", "config.toml", "metrics.jsonl", "curves.png", "checkpoints/step-4/optimizer.safetensors", "checkpoints/step-2/checkpoint.json"] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    let recs = read_records(&out.join("metrics.jsonl")).unwrap();
    let train: Vec<_> = recs.iter().filter(|r| r.contains_key("loss")).collect();
    let evals: Vec<_> = recs.iter().filter(|r| r.contains_key("eval/loss")).collect();
    assert_eq!(train.len(), 4);
    assert_eq!(evals.iter().map(|r| r["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 2, 4]);
    let loss = |r: &ropo::metrics::Record, k: &str| r[k].as_f64().unwrap();
    assert!((loss(train[0], "loss") - std::f64::consts::LN_2).abs() < 1e-4, "first step loss {}", loss(train[0], "loss"));
    assert!((loss(evals[0], "eval/loss") - std::f64::consts::LN_2).abs() < 1e-4);
    // identity adapter: every reward is float noise around 0, a tie, so no pair is accurate
    // (the rule of `ropo eval`, `ropo::loss::reward_outcome`)
    assert_eq!(loss(evals[0], "eval/rewards/accuracies"), 0.0, "step-0 eval record: {:?}", evals[0]);
    assert!((loss(evals[0], "eval/rewards/ties") - 1.0).abs() < 1e-12, "step-0 eval record: {:?}", evals[0]);
    assert_eq!(loss(train[0], "rewards/accuracies"), 0.0, "first step (identity adapter): {:?}", train[0]);
    assert!((loss(train[0], "rewards/ties") - 1.0).abs() < 1e-12, "first step (identity adapter): {:?}", train[0]);
    assert!(loss(train[3], "loss") != loss(train[0], "loss"), "the loss did not move");
    assert!(loss(evals[2], "eval/loss") != loss(evals[0], "eval/loss"), "eval loss did not move: {evals:?}");
    assert!(loss(evals[2], "eval/rewards/margins") > 0.0, "held-out margins did not grow: {evals:?}");
    for k in ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/ties", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "epoch", "tokens_per_second", "elapsed_seconds"] {
        assert!(train[0].contains_key(k), "missing {k}");
    }
    // live diagnostics on 2 held-out prompts: no drift at the identity init (the policy's greedy
    // answers are the reference's), some after 4 steps at lr 3e-3; lengths within the limit
    assert!(err.contains("diagnostics (2 held-out prompts, ") && err.contains("reference tokens): drift/kl"), "{err}");
    let kl: Vec<f64> = evals.iter().map(|r| loss(r, "eval/drift/kl")).collect();
    assert!(kl[0].abs() < 1e-9, "step-0 drift {kl:?}");
    assert!(kl[2] > 1e-4, "no drift after training: {kl:?}");
    for r in &evals {
        let (len, hit) = (loss(r, "eval/greedy/mean_length"), loss(r, "eval/greedy/hit_max_new_tokens"));
        assert!((0.0..=8.0).contains(&len) && (0.0..=1.0).contains(&hit), "{r:?}");
        assert!(loss(r, "eval/drift/nll") > 0.0, "{r:?}");
    }
    // curves.png has the two diagnostic panels beside the three others
    let png = std::fs::read(out.join("curves.png")).unwrap();
    assert_eq!(u32::from_be_bytes([png[16], png[17], png[18], png[19]]), 5 * ropo::plot::PANEL_WIDTH);
    // the adapter loads onto a fresh model and changes its output
    let mut m = ropo::model::load(common::smollm2_gguf().to_str().unwrap(), &Default::default()).unwrap();
    let set = ropo::adapter::AnyAdapterSet::load(&out, &mut m.model).unwrap();
    assert_eq!(set.report().trainable, 391_560);
    let ids = Tensor::new(&[[1u32, 9690, 198, 2683]], &Device::Cpu).unwrap();
    let a = m.model.forward(&ids, None, true).unwrap();
    let b = m.model.forward(&ids, None, false).unwrap();
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff > 1e-4, "trained adapter leaves logits unchanged (max diff {diff})");
}

// ---------------------------------------------------------------- resume

fn wait_for(path: &Path, child: &mut std::process::Child, timeout: Duration) {
    let t0 = Instant::now();
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("ropo exited ({status}) before {} appeared", path.display());
        }
        assert!(t0.elapsed() < timeout, "timeout waiting for {}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn metrics_without_timing(dir: &Path) -> Vec<ropo::metrics::Record> {
    read_records(&dir.join("metrics.jsonl")).unwrap().iter().map(without_timing).collect()
}

/// 6 steps uninterrupted vs 3 steps + SIGKILL + `--resume`: identical adapter bytes, identical
/// metrics (timing keys aside), identical optimiser state, identical trainer state.
///
/// Bit for bit: the metrics of the steps before the kill go through the checkpoint and the
/// resume (`metrics.jsonl` cut back, `trainer_state.json` reloaded), so a float parsed and
/// re-written one ulp off shows here (it did, before `MetricsLogger::resume` kept lines verbatim
/// and serde_json's `float_roundtrip` parser was on).
#[test]
fn sigkill_and_resume_is_bit_identical_to_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "max_steps = 6\nsave_steps = 3\neval_steps = 3\nlr_scheduler_type = \"cosine\"\nwarmup_steps = 2";
    let full = dir.path().join("full");
    let cfg_full = write_config(dir.path(), "full.toml", &short_config(&full, extra));
    let o = ropo(&["train", "--config", cfg_full.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));

    let killed = dir.path().join("killed");
    let cfg_killed = write_config(dir.path(), "killed.toml", &short_config(&killed, extra));
    let mut child = Command::new(env!("CARGO_BIN_EXE_ropo"))
        .args(["train", "--config", cfg_killed.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&killed.join("checkpoints/step-3"), &mut child, Duration::from_secs(600));
    assert!(child.try_wait().unwrap().is_none(), "the run finished before it could be killed");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!killed.join("adapter_model.safetensors").exists(), "the killed run must not have finished");

    let o = ropo(&["train", "--config", cfg_killed.to_str().unwrap(), "--resume", killed.to_str().unwrap()]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("resuming from") && err.contains("(step 3)"), "{err}");

    let bytes = |d: &Path, f: &str| std::fs::read(d.join(f)).unwrap();
    assert!(bytes(&full, "adapter_model.safetensors") == bytes(&killed, "adapter_model.safetensors"), "adapter bytes differ");
    assert!(
        bytes(&full, "checkpoints/step-6/optimizer.safetensors") == bytes(&killed, "checkpoints/step-6/optimizer.safetensors"),
        "optimiser state differs"
    );
    let (a, b) = (metrics_without_timing(&full), metrics_without_timing(&killed));
    assert_eq!(a.len(), 6 + 3, "6 training records and evals at steps 0, 3, 6");
    assert_eq!(a, b, "metrics differ");
    let state = |d: &Path| {
        let mut s = ropo::checkpoint::TrainerState::load(&d.join(ropo::checkpoint::TRAINER_STATE_FILE)).unwrap();
        s.log_history = s.log_history.iter().map(without_timing).collect();
        s.to_json().unwrap()
    };
    assert_eq!(state(&full), state(&killed), "trainer_state.json differs");
    // elapsed_seconds continues across the resume instead of restarting at 0
    let elapsed: Vec<f64> = read_records(&killed.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|r| r["elapsed_seconds"].as_f64().unwrap())
        .collect();
    assert!(elapsed.windows(2).all(|w| w[1] >= w[0]), "elapsed_seconds goes back after the resume: {elapsed:?}");
}

/// SIGINT: a checkpoint at the end of the current step, a message, exit code 0.
#[test]
fn ctrl_c_writes_a_checkpoint_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let cfg = write_config(dir.path(), "run.toml", &short_config(&out, "max_steps = 500\nsave_steps = 1000"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_ropo"))
        .args(["train", "--config", cfg.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = out.join("metrics.jsonl");
    let t0 = Instant::now();
    while read_records(&metrics).map(|r| r.iter().filter(|r| r.contains_key("loss")).count()).unwrap_or(0) < 1 {
        assert!(child.try_wait().unwrap().is_none(), "ropo exited early");
        assert!(t0.elapsed() < Duration::from_secs(600), "no training record");
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(st.success());
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "exit {:?}: {err}", o.status.code());
    assert!(err.contains("interrupted: checkpoint written to"), "{err}");
    let (step, _) = ropo::checkpoint::latest_complete(&out).unwrap().expect("a checkpoint");
    assert!((1..500).contains(&step), "checkpoint at step {step}");
    assert!(!out.join("adapter_model.safetensors").exists());
}

// ---------------------------------------------------------------- bad input

fn assert_fails(o: &Output, wants: &[&str]) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    for w in wants {
        assert!(err.contains(w), "missing {w:?} in:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// Started by an MPI launcher with 2 ranks (its environment), a build without the `mpi` feature
/// refuses (2 independent runs would write one folder), before writing anything.
#[cfg(not(feature = "mpi"))]
#[test]
fn a_build_without_mpi_refuses_to_run_as_one_of_several_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let cfg = write_config(dir.path(), "run.toml", &short_config(&out, "max_steps = 1"));
    for var in ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"] {
        let o = Command::new(env!("CARGO_BIN_EXE_ropo")).args(["train", "--config", cfg.to_str().unwrap()]).env(var, "2").output().unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("an MPI launcher started 2 ranks, but this ropo was built without MPI") && err.contains("--features mpi"), "{err}");
        assert!(!out.exists(), "nothing may be written");
    }
}

#[test]
fn cli_bad_config_key_and_value_and_missing_data() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let good = short_config(&out, "max_steps = 1");

    let cfg = write_config(dir.path(), "typo.toml", &good.replace("learning_rate = 3e-3", "learning_rat = 1e-2"));
    let line = good.lines().position(|l| l.starts_with("learning_rate")).unwrap() + 1;
    assert_fails(&ropo(&["train", "--config", cfg.to_str().unwrap()]), &[&format!("typo.toml:{line}"), "did you mean training.learning_rate"]);

    let cfg = write_config(dir.path(), "beta.toml", &good.replace("[training]", "[training]\nbeta = -0.5"));
    assert_fails(&ropo(&["train", "--config", cfg.to_str().unwrap()]), &["training.beta must be > 0 (got -0.5)"]);
    assert_fails(&ropo(&["train", "--config", dir.path().join("good.toml").to_str().unwrap()]), &["good.toml", "reading config"]);
    let cfg = write_config(dir.path(), "good.toml", &good);
    assert_fails(&ropo(&["train", "--config", cfg.to_str().unwrap(), "--set", "training.bta=1"]), &["did you mean training.beta"]);

    let missing = dir.path().join("nope.jsonl");
    let cfg = write_config(dir.path(), "missing.toml", &good.replace(&repo("data/concise_prefs/train.jsonl"), missing.to_str().unwrap()));
    assert_fails(&ropo(&["train", "--config", cfg.to_str().unwrap()]), &[missing.to_str().unwrap(), "cannot open"]);
    assert!(!out.exists(), "no output folder after bad input");
    // live diagnostics without held-out prompts: refused, naming the keys
    let no_eval = good.lines().filter(|l| !l.starts_with("eval_file") && !l.starts_with("eval_rows")).collect::<Vec<_>>().join("\n");
    let cfg = write_config(dir.path(), "diag.toml", &no_eval.replace("[training]", "[training]\ndiagnostic_prompts = 2"));
    assert_fails(&ropo(&["train", "--config", cfg.to_str().unwrap()]), &["training.diagnostic_prompts", "data.eval_file"]);
    assert!(!out.exists(), "no output folder after bad input");

    // --print-config prints the resolved config with defaults
    let o = ropo(&["train", "--config", cfg.to_str().unwrap(), "--print-config", "--set", "training.beta=0.25"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("beta = 0.25") && text.contains("adam_beta2 = 0.999") && text.contains("[adapter]"), "{text}");
    assert!(!out.exists());
}

#[test]
fn cli_refuses_another_run_and_an_unwritable_output() {
    let dir = tempfile::tempdir().unwrap();
    // an output folder holding another run: refused without --overwrite, untouched
    let out = dir.path().join("run");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("metrics.jsonl"), "{\"step\":1}\n").unwrap();
    let cfg = write_config(dir.path(), "run.toml", &short_config(&out, "max_steps = 1"));
    assert_fails(&ropo(&["train", "--config", cfg.to_str().unwrap()]), &["holds another run", "--overwrite"]);
    let mut names: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, vec!["metrics.jsonl"]);
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap(), "{\"step\":1}\n");

    // an unwritable location (a path under a regular file: chmod does not stop root)
    let blocker = dir.path().join("blocker");
    std::fs::write(&blocker, "x").unwrap();
    let bad = blocker.join("run");
    let cfg = write_config(dir.path(), "bad.toml", &short_config(&bad, "max_steps = 1"));
    assert_fails(&ropo(&["train", "--config", cfg.to_str().unwrap()]), &[bad.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&blocker).unwrap(), "x");
}
