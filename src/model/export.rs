//! Write an HF model folder that transformers (and [`crate::model::hf_folder`]) load back:
//! `config.json` (architectures/model_type of the [`Arch`](crate::model::config::Arch)),
//! `model.safetensors` (f32, bf16 or f16), `tokenizer.json`, `tokenizer_config.json` (chat
//! template, BOS/EOS), `generation_config.json`.
//!
//! No partial output: the files are staged in a temporary sibling folder and moved into place
//! only once all of them are written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::hf_config;
use crate::model::tokenizer::Tokenizer;

/// The torch dtype name transformers writes in `config.json` for `dtype`.
fn torch_dtype(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("float32"),
        DType::BF16 => Ok("bfloat16"),
        DType::F16 => Ok("float16"),
        other => Err(Error::Config(format!("export dtype must be f32, bf16 or f16 (got {other:?})"))),
    }
}

/// Write `config`, `tensors` (by HF name, any float dtype; converted to `dtype`) and `tokenizer`
/// as an HF model folder into `dir` (created if needed; files of the same names are replaced).
///
/// With `config.tie_word_embeddings`, `lm_head.weight` is not written (HF re-ties it).
///
/// Errors: `dtype` not f32/bf16/f16, I/O errors (naming the path); `dir` is untouched on error.
pub fn write_hf_folder(dir: &Path, config: &ModelConfig, tensors: &BTreeMap<String, Tensor>, tokenizer: &Tokenizer, dtype: DType) -> Result<()> {
    let torch = torch_dtype(dtype)?;
    let stage = staging_dir(dir);
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(&stage).map_err(|e| Error::input(&stage, None, format!("cannot create: {e}")))?;
    let res = (|| -> Result<()> {
        let mut cfg = hf_config::to_json(config);
        cfg["torch_dtype"] = torch.into();
        write_json(&stage.join("config.json"), &cfg)?;

        let mut converted = Vec::with_capacity(tensors.len());
        for (name, t) in tensors {
            if config.tie_word_embeddings && name == "lm_head.weight" {
                continue;
            }
            converted.push((name.clone(), t.to_dtype(dtype)?.contiguous()?));
        }
        let bytes = safetensors::serialize(converted.iter().map(|(n, t)| (n.as_str(), t)), Some([("format".to_string(), "pt".to_string())].into()))
            .map_err(|e| Error::Msg(format!("serializing model.safetensors: {e:?}")))?;
        write_file(&stage.join("model.safetensors"), &bytes)?;

        let tok_json = tokenizer.inner.to_string(true).map_err(|e| Error::Msg(format!("serializing tokenizer.json: {e}")))?;
        write_file(&stage.join("tokenizer.json"), tok_json.as_bytes())?;
        write_json(&stage.join("tokenizer_config.json"), &tokenizer_config_json(config, tokenizer))?;
        write_json(&stage.join("generation_config.json"), &generation_config_json(config, tokenizer))?;
        publish(&stage, dir)
    })();
    let _ = std::fs::remove_dir_all(&stage);
    res
}

/// `tokenizer_config.json`: the fast tokenizer class, BOS/EOS texts and the chat template.
pub fn tokenizer_config_json(config: &ModelConfig, tokenizer: &Tokenizer) -> serde_json::Value {
    let mut v = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": false,
        "model_max_length": config.max_position_embeddings,
    });
    let m = v.as_object_mut().expect("object literal");
    if let Some(b) = &tokenizer.bos_token {
        m.insert("bos_token".into(), b.clone().into());
    }
    if let Some(e) = &tokenizer.eos_token {
        m.insert("eos_token".into(), e.clone().into());
    }
    if let Some(t) = &tokenizer.chat_template {
        m.insert("chat_template".into(), t.clone().into());
    }
    v
}

/// `generation_config.json`: `bos_token_id` and the generation-ending `eos_token_id`(s).
pub fn generation_config_json(config: &ModelConfig, tokenizer: &Tokenizer) -> serde_json::Value {
    let mut v = serde_json::json!({});
    let m = v.as_object_mut().expect("object literal");
    if let Some(b) = config.bos_token_id {
        m.insert("bos_token_id".into(), b.into());
    }
    let eos = if tokenizer.eos_token_ids.is_empty() { &config.eos_token_ids } else { &tokenizer.eos_token_ids };
    match eos.as_slice() {
        [] => {}
        [one] => {
            m.insert("eos_token_id".into(), (*one).into());
        }
        many => {
            m.insert("eos_token_id".into(), many.to_vec().into());
        }
    }
    v
}

/// `.NAME.export-PID` next to `dir`.
fn staging_dir(dir: &Path) -> PathBuf {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "export".into());
    dir.with_file_name(format!(".{name}.export-{}", std::process::id()))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| Error::input(path, None, format!("cannot write: {e}")))
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let s = serde_json::to_string_pretty(v).map_err(|e| Error::Msg(e.to_string()))?;
    write_file(path, s.as_bytes())
}

/// Move the staged folder to `dir`: a rename when `dir` does not exist, else file by file.
fn publish(stage: &Path, dir: &Path) -> Result<()> {
    if !dir.exists() {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::input(parent, None, format!("cannot create: {e}")))?;
        }
        return std::fs::rename(stage, dir).map_err(|e| Error::input(dir, None, format!("cannot create: {e}")));
    }
    let entries = std::fs::read_dir(stage).map_err(|e| Error::input(stage, None, format!("cannot list: {e}")))?;
    for entry in entries {
        let entry = entry?;
        let to = dir.join(entry.file_name());
        std::fs::rename(entry.path(), &to).map_err(|e| Error::input(&to, None, format!("cannot write: {e}")))?;
    }
    Ok(())
}
