//! Helpers shared by the integration tests: the real model (fetched and cached by
//! `scripts/fetch-model.sh`) and the golden files in `../shared/golden`; [`gradients`]: central
//! finite differences; [`tiny`]: small random models and tensors.
#![allow(dead_code)]

pub mod gradients;
pub mod tiny;

use std::path::PathBuf;

/// Path of SmolLM2-135M-Instruct.Q4_1.gguf, fetching it into the cache when missing.
///
/// Panics (the test fails, it is never skipped) when the model cannot be had.
pub fn smollm2_gguf() -> PathBuf {
    let out = std::process::Command::new("bash")
        .arg(repo_dir().join("scripts/fetch-model.sh"))
        .output()
        .expect("running scripts/fetch-model.sh");
    assert!(out.status.success(), "scripts/fetch-model.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    assert!(path.is_file(), "fetch-model.sh printed {path:?}, which is not a file");
    path
}

/// The repository root: `ROPO_REPO_DIR` when set (a test executable run on another machine,
/// scripts/device-check.sh), else where it was built.
pub fn repo_dir() -> PathBuf {
    std::env::var_os("ROPO_REPO_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The shared folder: `ROPO_SHARED_DIR` when set, else `../shared` beside the repository.
pub fn shared_dir() -> PathBuf {
    std::env::var_os("ROPO_SHARED_DIR").map(PathBuf::from).unwrap_or_else(|| repo_dir().join("../shared"))
}

/// A golden file from `../shared/golden`, parsed.
pub fn golden(name: &str) -> serde_json::Value {
    let path = shared_dir().join("golden").join(name);
    let s = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&s).unwrap()
}

/// A path under `../shared`.
pub fn shared(rel: &str) -> PathBuf {
    shared_dir().join(rel)
}

/// A JSON array of arrays (of arrays) of numbers as an f32 tensor of its nested shape (the
/// fixtures' `expected.json` values).
pub fn json_tensor(v: &serde_json::Value) -> candle_core::Tensor {
    fn walk(v: &serde_json::Value, depth: usize, dims: &mut Vec<usize>, out: &mut Vec<f32>) {
        match v {
            serde_json::Value::Array(items) => {
                if dims.len() == depth {
                    dims.push(items.len());
                }
                items.iter().for_each(|x| walk(x, depth + 1, dims, out));
            }
            x => out.push(x.as_f64().unwrap() as f32),
        }
    }
    let (mut dims, mut out) = (vec![], vec![]);
    walk(v, 0, &mut dims, &mut out);
    candle_core::Tensor::from_vec(out, dims, &candle_core::Device::Cpu).unwrap()
}

/// The device the device-aware tests run on: `ROPO_TEST_DEVICE` (`cpu`, `cuda`, `cuda:N`;
/// default `cpu`). `scripts/device-check.sh` sets it to `cuda` on a GPU machine. Panics (the
/// test fails) when the device cannot be opened.
pub fn test_device() -> candle_core::Device {
    let name = std::env::var("ROPO_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    let spec: ropo::device::DeviceSpec = name.parse().unwrap_or_else(|e| panic!("ROPO_TEST_DEVICE: {e}"));
    spec.open().unwrap_or_else(|e| panic!("ROPO_TEST_DEVICE={name}: {e}"))
}

/// [`ropo::model::LoadOptions`] (f32) on [`test_device`].
pub fn load_options() -> ropo::model::LoadOptions {
    ropo::model::LoadOptions { device: test_device(), ..Default::default() }
}
