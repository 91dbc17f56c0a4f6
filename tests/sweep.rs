//! `scripts/sweep.py` end to end on a tiny grid: two variants, one step each, every run
//! evaluated with drift and MMLU cloze, the table and the picture written; run again, every
//! finished run is skipped and the results are the same; with `--only`, the table still holds
//! every finished run.

mod common;

use std::path::PathBuf;
use std::process::Command;

fn repo(rel: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel).to_str().unwrap().to_string()
}

#[test]
fn a_tiny_sweep_trains_evaluates_tabulates_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sweep");
    let model = common::smollm2_gguf();
    let base = dir.path().join("base.toml");
    let cfg = std::fs::read_to_string(repo("configs/compare/ropo.toml"))
        .unwrap()
        .replace("/root/.cache/ropo/models/SmolLM2-135M-Instruct.Q4_1.gguf", model.to_str().unwrap())
        .replace("../shared/data/orca_dpo_pairs/validation.jsonl", &repo("../shared/data/orca_dpo_pairs/validation.jsonl"));
    std::fs::write(&base, cfg).unwrap();
    let sweep = dir.path().join("tiny.toml");
    std::fs::write(
        &sweep,
        format!(
            r#"base = "{base}"
output_dir = "{out}"
learning_rates = [1e-3]
set = ["data.train_rows=\":6\"", "data.eval_rows=\"-3:\"", "training.max_steps=1", "training.warmup_ratio=0.0", "training.threads=1", "training.save_steps=1000"]

[eval]
prompts = "{prompts}"
prompt_rows = "-2:"
samples = 2
max_new_tokens = 4
mmlu = "{mmlu}"
subjects = ["astronomy"]
mmlu_limit = 1

[[variant]]
name = "ropo"

[[variant]]
name = "householder"
set = ["adapter.givens_stages=0", "adapter.magnitude=false"]
"#,
            base = base.display(),
            out = out.display(),
            prompts = repo("../shared/data/orca_dpo_pairs/validation.jsonl"),
            mmlu = repo("../shared/data/mmlu"),
        ),
    )
    .unwrap();
    let run = || {
        let o = Command::new("python3")
            .args([&repo("scripts/sweep.py"), sweep.to_str().unwrap(), "--ropo", env!("CARGO_BIN_EXE_ropo")])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let first = run();
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let runs = results["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{first}");
    for r in runs {
        for k in ["drift_kl", "eval_accuracy", "eval_margins", "length_ratio", "distinct_2", "mmlu_cloze_accuracy"] {
            assert!(r[k].as_f64().is_some_and(f64::is_finite), "{k} in {r}");
        }
        // a step away from the identity: the policy moved, a little
        assert!(r["drift_kl"].as_f64().unwrap() > 0.0, "{r}");
    }
    let table = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert_eq!(table.lines().count(), 2 + 1 + 2, "{table}"); // header, rule, base, 2 runs
    assert!(std::fs::read(out.join("sweep.png")).unwrap().starts_with(b"\x89PNG"));
    // the picture reads back through ropo's own reader
    assert_eq!(ropo::sweep_plot::read_runs(&out.join("results.json")).unwrap().len(), 2);
    // again: nothing is retrained or re-evaluated, the same results
    let second = run();
    assert_eq!(second.matches(": done").count(), 2, "{second}");
    assert!(!second.contains("ropo train"), "{second}");
    let again: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(again["runs"], results["runs"]);
    // --only limits training, not the table: the other variant's finished run is still in it
    let o = Command::new("python3")
        .args([&repo("scripts/sweep.py"), sweep.to_str().unwrap(), "--only", "householder", "--ropo", env!("CARGO_BIN_EXE_ropo")])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let only: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(only["runs"], results["runs"]);
}
