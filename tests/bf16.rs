//! `model.dtype = "bf16"` on the real model (SmolLM2-135M-Instruct): projection weights rounded
//! to bf16 and multiplied on the bf16 kernel with f32 accumulation, everything else f32.
//!
//! - the golden orca rows' summed completion log-probs (`../shared/golden/smollm2_golden.json`,
//!   transformers f32) within a measured tolerance, and next to the f32 model's;
//! - step 0 with the default RoPO adapter: the loss is ln 2 (policy = reference, both bf16),
//!   rewards 0, every adapter tensor gets a gradient, and the gradients point where f32's do
//!   (cosine similarity per tensor) with a norm within a few percent;
//! - the adapter parameters stay f32 (master weights).
//!
//! Tolerances were measured on this model (numbers in the assertions' comments): bf16 rounds
//! the 8-bit-mantissa operands, so a summed log-prob over ~100 tokens moves by O(0.1) nats.

mod common;

use candle_core::{DType, Device};
use ropo::config::RunConfig;
use ropo::data::batch::{collate, pad_id};
use ropo::data::tokenize::{PairTokenizer, TokenizeOptions};
use ropo::model::{load, LoadOptions};

fn model(dtype: DType) -> ropo::model::LoadedModel {
    let gguf = common::smollm2_gguf();
    load(gguf.to_str().unwrap(), &LoadOptions { dtype, ..Default::default() }).unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> (f64, f64) {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    (dot / (na * nb).max(1e-30), na / nb.max(1e-30))
}

#[test]
fn bf16_logps_and_step0_gradients_track_f32() {
    let cfg = RunConfig::default();
    let path = common::shared("data/orca_dpo_pairs/validation.jsonl");
    let golden = common::golden("smollm2_golden.json");
    let gold = golden["orca_pairs"].as_array().unwrap();
    let want: Vec<f64> = gold
        .iter()
        .map(|g| g["chosen"]["sum_completion_logprob"].as_f64().unwrap())
        .chain(gold.iter().map(|g| g["rejected"]["sum_completion_logprob"].as_f64().unwrap()))
        .collect();

    let mut runs = vec![];
    for dtype in [DType::F32, DType::BF16] {
        let mut m = model(dtype);
        assert_eq!(m.model.dtype(), DType::F32, "activations stay f32");
        let set = ropo::adapter::AnyAdapterSet::inject(&mut m.model, &cfg.adapter, "bf16").unwrap();
        for (name, v) in set.vars() {
            assert_eq!(v.dtype(), DType::F32, "{name}: adapter parameters are f32 master weights");
        }
        let data = ropo::data::load(&path, &Default::default()).unwrap();
        let pt = PairTokenizer::new(&m.tokenizer, None, TokenizeOptions { max_length: Some(256), max_prompt_length: None }).unwrap();
        let pairs = pt.tokenize_all(&data.examples[..4], &path, &mut Default::default()).unwrap();
        let refs: Vec<_> = pairs.iter().collect();
        let batch = collate(&refs, pad_id(&m.tokenizer).unwrap(), &Device::Cpu).unwrap();
        let reference = ropo::logps::batch_logps_detached(&m.model, &batch, false, false).unwrap();
        // the identity adapter is exact (householder::reflect at paired u): policy == reference
        let policy = ropo::logps::batch_logps_detached(&m.model, &batch, true, false).unwrap();
        assert_eq!(policy.to_vec1::<f32>().unwrap(), reference.to_vec1::<f32>().unwrap(), "{dtype:?}: identity adapter");
        let (out, grads) = ropo::train::micro_batch(&m.model, &batch, &reference, &cfg.training).unwrap();
        let loss = out.loss.to_scalar::<f32>().unwrap() as f64;
        assert!((loss - std::f64::consts::LN_2).abs() < 1e-5, "{dtype:?}: step-0 loss {loss}, want ln 2");
        assert!(out.metrics.rewards_chosen.abs() < 1e-5 && out.metrics.rewards_rejected.abs() < 1e-5, "{dtype:?}: {:?}", out.metrics);
        let g = ropo::optim::Grads::from_store(&set.vars(), &grads).expect("every trainable tensor has a gradient");
        let grads: Vec<(String, Vec<f32>)> =
            set.vars().iter().zip(&g.0).map(|((n, _), t)| (n.clone(), t.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect();
        let logps = reference.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
        runs.push((logps, grads));
    }
    let (f32_logps, f32_grads) = &runs[0];
    let (bf_logps, bf_grads) = &runs[1];
    for i in 0..want.len() {
        let (e32, ebf) = ((f32_logps[i] - want[i]).abs(), (bf_logps[i] - want[i]).abs());
        eprintln!("sequence {i}: golden {:.4}, f32 {:.4} (|d| {e32:.2e}), bf16 {:.4} (|d| {ebf:.2e})", want[i], f32_logps[i], bf_logps[i]);
        assert!(e32 < 1e-2, "f32 sequence {i}");
        // measured 2026-12-02: 0.013-0.45 nats (relative 7e-5 to 1.9e-3) on these six sequences
        assert!(ebf < 1.0 && ebf / want[i].abs() < 5e-3, "bf16 sequence {i}: {} vs golden {}", bf_logps[i], want[i]);
    }
    let (mut worst, mut worst_ratio) = ((1.0f64, String::new()), 0f64);
    for ((name, a), (_, b)) in bf_grads.iter().zip(f32_grads) {
        let (cos, ratio) = cosine(a, b);
        if cos < worst.0 {
            worst = (cos, name.clone());
        }
        worst_ratio = worst_ratio.max((ratio - 1.0).abs());
        // measured 2026-12-02: lowest cosine 0.9986 over the 360 tensors
        assert!(cos > 0.99, "{name}: bf16 vs f32 gradient cosine {cos}");
        assert!((ratio - 1.0).abs() < 0.1, "{name}: bf16/f32 gradient norm ratio {ratio}");
    }
    eprintln!("lowest gradient cosine bf16 vs f32: {:.5} ({}); largest |norm ratio - 1|: {worst_ratio:.4}", worst.0, worst.1);
}

fn ropo(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ropo")).args(args).output().expect("running ropo")
}

fn repo(rel: &str) -> String {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel).to_str().unwrap().to_string()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `ropo train` with `model.dtype = "bf16"` (exact ln 2 at step 1, the loss moves), then the
/// bf16 adapter through `ropo eval --dtype bf16`, `ropo generate --dtype bf16` and `ropo merge`.
#[test]
fn bf16_train_eval_generate_merge_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let gguf = common::smollm2_gguf();
    let config = format!(
        r#"[model]
path_or_id = "{model}"
dtype = "bf16"

[data]
train_files = ["{train}"]
train_rows = ":8"
max_length = 128

[training]
output_dir = "{out}"
learning_rate = 3e-3
per_device_train_batch_size = 2
max_steps = 3
threads = 1
save_total_limit = 0
"#,
        model = gguf.display(),
        train = repo("data/concise_prefs/train.jsonl"),
        out = out.display(),
    );
    let cfg = tmp.path().join("bf16.toml");
    std::fs::write(&cfg, config).unwrap();
    let o = ropo(&["train", "--config", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "train: {}", stderr(&o));
    let records = ropo::metrics::read_records(&out.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = records.iter().filter_map(|r| r.get("loss").and_then(|v| v.as_f64())).collect();
    assert_eq!(losses.len(), 3, "{records:?}");
    assert!((losses[0] - std::f64::consts::LN_2).abs() < 1e-6, "step-1 loss {}", losses[0]);
    assert!(losses[2] < losses[0], "the loss moves: {losses:?}");
    assert!(out.join("adapter_model.safetensors").is_file());

    let report = tmp.path().join("report.json");
    let o = ropo(&[
        "eval", "--model", gguf.to_str().unwrap(), "--adapter", out.to_str().unwrap(), "--dtype", "bf16", "--prefs",
        &repo("data/concise_prefs/eval.jsonl"), "--limit", "4", "--out", report.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "eval: {}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(r.to_string().contains("rewards/margins"), "{r}");

    let o = ropo(&["generate", "--model", gguf.to_str().unwrap(), "--dtype", "bf16", "--chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "20"]);
    assert!(o.status.success(), "generate: {}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains("Paris"), "{text:?}");

    let merged = tmp.path().join("merged");
    let o = ropo(&["merge", "--model", gguf.to_str().unwrap(), "--adapter", out.to_str().unwrap(), "--out", merged.to_str().unwrap()]);
    assert!(o.status.success(), "merge: {}", stderr(&o));
    assert!(merged.join("config.json").is_file());
}

/// `model.dtype = "f16"`, and bf16 with full fine-tuning, are refused before any work, naming
/// the key.
#[test]
fn f16_and_full_with_bf16_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for (dtype, kind, want) in [("f16", "ropo", "model.dtype = \"f16\" is not supported"), ("bf16", "full", "adapter.type = \"full\"")] {
        let cfg = tmp.path().join(format!("{dtype}-{kind}.toml"));
        let out = tmp.path().join(format!("out-{dtype}-{kind}"));
        std::fs::write(
            &cfg,
            format!(
                "[model]\npath_or_id = \"{}\"\ndtype = \"{dtype}\"\n[data]\ntrain_files = [\"{}\"]\n[adapter]\ntype = \"{kind}\"\n[training]\noutput_dir = \"{}\"\n",
                common::smollm2_gguf().display(),
                repo("data/concise_prefs/train.jsonl"),
                out.display()
            ),
        )
        .unwrap();
        let o = ropo(&["train", "--config", cfg.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains(want) && !stderr(&o).contains("panicked"), "{}", stderr(&o));
        assert!(!out.exists(), "nothing written");
    }
}
