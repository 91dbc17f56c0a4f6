//! The shipped configs (`configs/*.toml`): every one parses and validates with
//! `RunConfig::load` (strict keys, checked values), names data files that exist, and, for the
//! example configs the docs own, comments every key.

use std::path::{Path, PathBuf};

use ropo::config::RunConfig;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.toml` under `configs/` (subfolders included), sorted.
fn shipped() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
            let p = e.expect("a directory entry").path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "toml") {
                out.push(p);
            }
        }
    }
    let mut v = Vec::new();
    walk(&root().join("configs"), &mut v);
    v.sort();
    v
}

/// The example configs with a comment on every key (the README points users at them).
const EXAMPLES: [&str; 7] = ["quickstart.toml", "orca.toml", "smollm2-360m.toml", "qwen2.5-0.5b.toml", "qwen3-0.6b.toml", "gemma-3-1b.toml", "llama-3.2-1b.toml"];

#[test]
fn every_shipped_config_loads_and_validates() {
    let files = shipped();
    for name in EXAMPLES {
        assert!(files.iter().any(|p| p.ends_with(name)), "configs/{name} is missing (found {files:?})");
    }
    for path in &files {
        let cfg = RunConfig::load(Some(path), &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // the data files it names exist (paths are relative to the repository root)
        let data = cfg.data.train_files.iter().chain(cfg.data.eval_file.iter());
        for f in data {
            let p = root().join(f);
            assert!(p.is_file(), "{}: data file {f} does not exist ({})", path.display(), p.display());
        }
        // it round-trips through --print-config's printer
        let printed = cfg.to_toml_string();
        let back = RunConfig::from_toml_str(&printed, Path::new("printed.toml")).unwrap();
        assert_eq!(back, cfg, "{}: the printed config does not parse back to the same config", path.display());
    }
}

#[test]
fn example_configs_comment_every_key() {
    for name in EXAMPLES {
        let path = root().join("configs").join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut prev = "";
        let mut keys = 0;
        for (i, line) in text.lines().enumerate() {
            let l = line.trim();
            let is_key = !l.is_empty() && !l.starts_with('#') && !l.starts_with('[') && l.contains('=');
            if is_key {
                keys += 1;
                // a key is commented by the comment line above it, or by the key above it when
                // both share one comment (a run of keys after one comment)
                let key_above = !prev.is_empty() && !prev.starts_with('#') && !prev.starts_with('[') && prev.contains('=');
                assert!(
                    prev.starts_with('#') || key_above,
                    "configs/{name}:{}: key without a comment above it: {l}",
                    i + 1
                );
            }
            prev = l;
        }
        assert!(keys >= 10, "configs/{name}: only {keys} keys");
    }
}

#[test]
fn quickstart_config_is_the_quickstart_run() {
    let cfg = RunConfig::load(Some(&root().join("configs/quickstart.toml")), &[]).unwrap();
    assert_eq!(cfg.data.train_files, vec!["data/concise_prefs/train.jsonl".to_string()]);
    assert_eq!(cfg.data.eval_file.as_deref(), Some("data/concise_prefs/eval.jsonl"));
    assert_eq!(cfg.training.output_dir, "runs/quickstart/train");
    // scripts/quickstart.sh overrides the model with the fetched GGUF through --set
    let script = std::fs::read_to_string(root().join("scripts/quickstart.sh")).unwrap();
    assert!(script.contains("configs/quickstart.toml") && script.contains("model.path_or_id="), "quickstart.sh does not run configs/quickstart.toml with the fetched model");
}

#[test]
fn readme_documents_every_config_key_and_the_test_command() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let ci = std::fs::read_to_string(root().join(".ci/run")).unwrap();
    // the README's test command is the one CI runs
    assert!(readme.contains("\n    cargo test --release --locked\n"), "README.md lost its test command");
    assert!(ci.contains("\ncargo test --release --locked\n"), ".ci/run does not run the README's test command");
    // every key --print-config prints has a row in the README's config table
    let printed = RunConfig::default().to_toml_string();
    let mut section = String::new();
    let mut n = 0;
    for line in printed.lines() {
        if let Some(s) = line.strip_prefix('[') {
            section = s.trim_end_matches(']').to_string();
            assert!(readme.contains(&format!("**`[{section}]`**")), "README.md has no [{section}] table");
            continue;
        }
        let Some((key, _)) = line.trim_start_matches("# ").split_once(" = ") else { continue };
        n += 1;
        assert!(readme.contains(&format!("| `{key}` |")), "README.md's config table lacks {section}.{key}; run python3 docs/config_table.py");
    }
    assert!(n >= 40, "only {n} keys printed");
}

// `ropo train --print-config` runs on every shipped config and prints a config that loads back
// to the same one (through the real binary).
#[test]
fn print_config_runs_on_every_shipped_config() {
    for path in shipped() {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ropo"))
            .args(["train", "--config"])
            .arg(&path)
            .arg("--print-config")
            .current_dir(root())
            .output()
            .expect("running ropo");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "ropo train --config {} --print-config failed: {stderr}", path.display());
        let printed = String::from_utf8(out.stdout).unwrap();
        let back = RunConfig::from_toml_str(&printed, Path::new("printed.toml")).unwrap_or_else(|e| panic!("{}: {e}\n{printed}", path.display()));
        back.validate().unwrap();
        assert_eq!(back, RunConfig::load(Some(&path), &[]).unwrap(), "{}: --print-config differs from the file", path.display());
    }
}
