//! `model.device` / `--device`: names that are not devices are refused naming the file, line
//! and key; `cuda` in a build without the `cuda` feature is a clear error that says how to
//! build it, for every subcommand, before any output; `cpu` is the default and works.
//! (The CUDA path itself is checked on a GPU by `scripts/device-check.sh`.)

use std::path::Path;
use std::process::Output;

fn ropo(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ropo")).args(args).output().expect("running ropo")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write_config(path: &Path, device: &str, out: &Path) {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/concise_prefs/train.jsonl");
    std::fs::write(
        path,
        format!(
            "[model]\npath_or_id = \"nowhere.gguf\"\ndevice = \"{device}\"\n[data]\ntrain_files = [\"{}\"]\n[training]\noutput_dir = \"{}\"\n",
            data.display(),
            out.display()
        ),
    )
    .unwrap();
}

#[test]
fn a_device_that_is_not_one_names_the_file_line_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, out) = (tmp.path().join("run.toml"), tmp.path().join("out"));
    write_config(&cfg, "tpu:0", &out);
    let o = ropo(&["train", "--config", cfg.to_str().unwrap()]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("run.toml:3: model.device: unknown device \"tpu:0\"") && e.contains("expected \"cpu\", \"cuda\" or \"cuda:N\""), "{e}");
    assert!(!e.contains("panicked") && !out.exists(), "{e}");
    // the command-line flag is checked by the parser, with the same words
    let o = ropo(&["train", "--config", cfg.to_str().unwrap(), "--device", "cuda:x"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("invalid value 'cuda:x' for '--device"), "{}", stderr(&o));
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_is_refused_before_any_work_by_every_subcommand() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, out) = (tmp.path().join("run.toml"), tmp.path().join("out"));
    // in the config, and through --device over a cpu config
    write_config(&cfg, "cuda", &out);
    let o = ropo(&["train", "--config", cfg.to_str().unwrap()]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("model.device = \"cuda:0\"") && e.contains("built without CUDA support") && e.contains("scripts/build-cuda.sh"), "{e}");
    write_config(&cfg, "cpu", &out);
    let o = ropo(&["train", "--config", cfg.to_str().unwrap(), "--device", "cuda:1"]);
    assert!(o.status.code() == Some(2) && stderr(&o).contains("model.device = \"cuda:1\""), "{}", stderr(&o));
    assert!(!out.exists(), "train wrote {}", out.display());
    // eval, generate and merge: the device is opened before the model is read
    let adapter = tmp.path().join("adapter");
    let prefs = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/concise_prefs/eval.jsonl");
    let merged = tmp.path().join("merged");
    for args in [
        vec!["eval", "--model", "nowhere.gguf", "--device", "cuda", "--prefs", prefs.to_str().unwrap()],
        vec!["generate", "--model", "nowhere.gguf", "--device", "cuda", "--prompt", "hi"],
        vec!["merge", "--model", "nowhere.gguf", "--device", "cuda", "--adapter", adapter.to_str().unwrap(), "--out", merged.to_str().unwrap()],
    ] {
        let o = ropo(&args);
        let e = stderr(&o);
        assert_ne!(o.status.code(), Some(0), "{args:?}");
        assert!(e.contains("device cuda:0: this ropo was built without CUDA support") && !e.contains("panicked"), "{args:?}: {e}");
        assert!(!e.to_lowercase().contains("no such file") && !e.contains("not found"), "{args:?}: the model was read before the device was checked: {e}");
    }
    assert!(!merged.exists());
}

#[test]
fn cpu_is_the_default_device() {
    let cfg = ropo::config::RunConfig::default();
    assert_eq!(cfg.model.device, ropo::device::DeviceSpec::Cpu);
    assert!(cfg.to_toml_string().contains("device = \"cpu\""), "{}", cfg.to_toml_string());
}
