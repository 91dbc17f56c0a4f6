//! Bake adapters into the weights: `W' = diag(m / rho) · W · R^T` (spec "Merge"), per row
//! `w'_i = (m_i / rho_i) R w_i`, computed in f64 and stored in the weight's dtype.
//!
//! After merging, a linear is an ordinary frozen layer that computes the adapted function
//! (to float tolerance); [`merge_to_folder`] (`ropo merge`) exports the model as a plain HF folder.

use std::path::{Path, PathBuf};

use candle_core::DType;

use super::any::AnyAdapterSet;
use crate::error::{Error, Result};
use crate::model::linear::Linear;
use crate::model::llama::Model;
use crate::model::gguf_export::GgufDtype;
use crate::model::LoadOptions;

/// Replace the weight (and bias) of every linear that has an adapter by the merged ones and
/// remove the adapter. Returns the number of merged layers.
///
/// Errors: a merged weight with a NaN or infinity (naming the module, as PEFT's `safe_merge`).
/// That module and the ones after it are left unchanged, earlier ones stay merged: callers
/// merge into a model they throw away on error.
pub fn merge_linears(linears: Vec<&mut Linear>) -> Result<usize> {
    let mut merged = 0;
    for lin in linears {
        let Some(adapter) = lin.adapter.clone() else { continue };
        let (w, b) = adapter.merged(lin)?;
        // the sum is finite iff every entry is (a NaN or an infinity propagates)
        if !w.to_dtype(candle_core::DType::F64)?.sum_all()?.to_scalar::<f64>()?.is_finite() {
            return Err(Error::Msg(format!(
                "NaN or infinity in the merged weight of {}: the adapter seems to be broken",
                lin.path
            )));
        }
        lin.weight = w;
        lin.bias = b;
        lin.adapter = None;
        // the forward panels described the old weight (they are only read for a bf16 weight)
        lin.packed = None;
        merged += 1;
    }
    Ok(merged)
}

/// Bake every adapter of `model` into its weights (see [`merge_linears`]); afterwards
/// `model.forward(.., true)` and `(.., false)` agree and `Model::tensors` lists the merged weights.
pub fn merge_into(model: &mut Model) -> Result<usize> {
    merge_linears(model.linears_mut())
}

/// Files whose presence marks a folder as an adapter or a training run, never replaced by
/// `--force` (that would delete the adapter being merged, or a run).
const NOT_A_MODEL_FOLDER: [&str; 4] = ["adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "checkpoints"];

/// Refuse to write into `out` when it exists and is not an empty folder, unless `force`; even
/// with `force`, replace only a model folder (one holding `config.json` and none of
/// [`NOT_A_MODEL_FOLDER`]), so a mistyped `--out` cannot delete an adapter, a training run or an
/// unrelated folder (as `ropo train --overwrite` refuses folders that hold no ropo run).
///
/// Errors ([`Error::Input`] naming `out`): a file; a non-empty folder without `force`; with
/// `force`, a non-empty folder that is not a model folder.
pub fn check_out(out: &Path, force: bool) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        return Err(Error::input(out, None, "exists and is not a folder"));
    }
    let non_empty = std::fs::read_dir(out).map_err(|e| Error::input(out, None, e.to_string()))?.next().is_some();
    if non_empty && !force {
        return Err(Error::input(out, None, "is not empty (use --force to replace it)"));
    }
    if non_empty {
        if let Some(f) = NOT_A_MODEL_FOLDER.iter().find(|f| out.join(f).exists()) {
            return Err(Error::input(out, None, format!("holds {f}: an adapter or a training run, which --force does not replace; choose another --out")));
        }
        if !out.join("config.json").is_file() {
            return Err(Error::input(out, None, "is not a model folder (no config.json), which --force does not replace; choose another --out"));
        }
    }
    Ok(())
}

/// A hidden sibling of `path`: `.NAME.TAG-PID`.
fn sibling(path: &Path, tag: &str) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    path.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

/// `ropo merge`: load the base model from `model_source` (HF folder, `.gguf` or hub id) with
/// `load_opts` (the revision of a hub id; f32 for an exact merge),
/// load the adapter in `adapter_dir` onto it (any kind: RoPO, PEFT LoRA, full; see
/// [`AnyAdapterSet::load`]), bake it in (RoPO `W' = diag(m / rho) W R^T`, LoRA
/// `W' = W + (alpha / r) B A`, full: the trained weights), and write an
/// HF model folder (config.json, model.safetensors in `dtype`, tokenizer.json,
/// tokenizer_config.json with the chat template, generation_config.json) to `out`.
///
/// Atomic: the folder is written to a hidden temporary sibling and renamed to `out` at the end
/// (with `force`, an existing `out` is replaced only then). Returns the number of merged layers.
///
/// Errors: `out` not empty without `force` (checked before any work); the model or the adapter
/// cannot be loaded (e.g. the adapter belongs to a model of other dimensions: the first
/// mismatching tensor is named); a broken adapter (NaN); I/O. Nothing is left behind on error.
pub fn merge_to_folder(model_source: &str, load_opts: &LoadOptions, adapter_dir: &Path, out: &Path, dtype: DType, force: bool) -> Result<usize> {
    check_out(out, force)?;
    let (loaded, merged) = load_merged(model_source, load_opts, adapter_dir)?;
    let tmp = sibling(out, "merge-tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    let res = (|| -> Result<()> {
        loaded.export(&tmp, dtype)?;
        if out.exists() {
            let old = sibling(out, "merge-old");
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(out, &old).map_err(|e| Error::input(out, None, format!("moving aside: {e}")))?;
            if let Err(e) = std::fs::rename(&tmp, out) {
                let _ = std::fs::rename(&old, out);
                return Err(Error::input(out, None, format!("renaming {} into place: {e}", tmp.display())));
            }
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&tmp, out).map_err(|e| Error::input(out, None, format!("renaming {} into place: {e}", tmp.display())))?;
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res.map(|_| merged)
}

/// Load `model_source`, put the adapter of `adapter_dir` on it and merge every adapted layer.
/// Returns the merged model and the number of merged layers. Errors: as [`merge_to_folder`].
fn load_merged(model_source: &str, load_opts: &LoadOptions, adapter_dir: &Path) -> Result<(crate::model::LoadedModel, usize)> {
    let mut loaded = crate::model::load(model_source, load_opts)?;
    let set = AnyAdapterSet::load(adapter_dir, &mut loaded.model)
        .map_err(|e| Error::Msg(format!("loading adapter {} onto {model_source}: {e}", adapter_dir.display())))?;
    if set.base_model() != model_source {
        tracing::warn!("adapter {} was trained on {:?}; merging it into {model_source:?}", adapter_dir.display(), set.base_model());
    }
    let merged = merge_into(&mut loaded.model)?;
    Ok((loaded, merged))
}

/// Merge the adapter of `adapter_dir` into `model_source` and write one GGUF file `out`
/// (llama.cpp's layout, weights in `dtype`: [`crate::model::gguf_export`]), atomically.
/// Returns the number of merged layers.
///
/// Errors: `out` is a folder, or an existing file without `force` (checked before any work);
/// as [`merge_to_folder`] otherwise; a tokenizer or tensor llama.cpp cannot represent.
pub fn merge_to_gguf(model_source: &str, load_opts: &LoadOptions, adapter_dir: &Path, out: &Path, dtype: GgufDtype, force: bool) -> Result<usize> {
    if out.is_dir() {
        return Err(Error::input(out, None, "is a folder; a GGUF output is one file".to_string()));
    }
    if out.exists() && !force {
        return Err(Error::input(out, None, "exists (use --force to replace it)".to_string()));
    }
    let (loaded, merged) = load_merged(model_source, load_opts, adapter_dir)?;
    let name = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "ropo-merged".into());
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::input(parent, None, format!("cannot create: {e}")))?;
    }
    loaded.export_gguf(out, dtype, &name)?;
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    // What --out accepts: missing or empty folders always; a non-empty folder only with force,
    // and then only a model folder (config.json, no adapter or run files); a file never.
    #[test]
    fn check_out_replaces_only_model_folders() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = |name: &str, files: &[&str]| {
            let d = tmp.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            for f in files {
                std::fs::write(d.join(f), "x").unwrap();
            }
            d
        };
        check_out(&tmp.path().join("missing"), false).unwrap();
        check_out(&dir("empty", &[]), false).unwrap();
        let model = dir("model", &["config.json", "model.safetensors"]);
        assert!(check_out(&model, false).unwrap_err().to_string().contains("is not empty (use --force"));
        check_out(&model, true).unwrap();
        for (name, files, want) in [
            ("other", &["notes.txt"][..], "no config.json"),
            ("adapter", &["adapter_config.json", "adapter_model.safetensors"][..], "holds adapter_config.json"),
            ("run", &["config.json", "metrics.jsonl"][..], "holds metrics.jsonl"),
        ] {
            let d = dir(name, files);
            let e = check_out(&d, true).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains(d.to_str().unwrap()), "{name}: {e}");
            assert!(d.join(files[0]).is_file(), "{name}: left as it was");
        }
        let file = tmp.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(check_out(&file, true).unwrap_err().to_string().contains("not a folder"));
    }
}
