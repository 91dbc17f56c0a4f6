//! An HF model folder: `config.json`, `model.safetensors` (or the shards listed by
//! `model.safetensors.index.json`), `tokenizer.json`, `tokenizer_config.json` (chat template,
//! BOS/EOS, possibly as `AddedToken` objects), `chat_template.jinja` (newer transformers),
//! `generation_config.json`. Layout and key names as transformers' `save_pretrained` writes them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::hf_config::{HfConfig, OneOrMany};
use crate::model::tokenizer::Tokenizer;
use crate::model::ModelParts;

/// Load config, tensors (in their stored dtype, on `device`) and tokenizer from `dir`.
///
/// Errors (naming the file): a missing `config.json`/`tokenizer.json`/weights, an unsupported
/// architecture, a truncated or corrupt safetensors file, a tokenizer with ids beyond the
/// config's `vocab_size`.
pub fn load(dir: &Path, device: &Device) -> Result<ModelParts> {
    if !dir.is_dir() {
        return Err(Error::input(dir, None, "not a directory (expected an HF model folder)"));
    }
    let cfg_path = dir.join("config.json");
    let config = HfConfig::from_path(&cfg_path)?.into_config(&cfg_path)?;
    let tokenizer = load_tokenizer(dir, &config)?;
    let tensors = load_tensors(dir, device)?;
    Ok(ModelParts { config, tensors, tokenizer })
}

/// Every tensor of `model.safetensors`, or of the shards named in
/// `model.safetensors.index.json` (`weight_map`), by name.
pub fn load_tensors(dir: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<std::path::PathBuf> = if single.is_file() {
        vec![single]
    } else if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::input(&index, None, format!("cannot read: {e}")))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::input(&index, Some(e.line()), format!("invalid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::input(&index, None, "missing object \"weight_map\""))?;
        let shards: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
        shards.into_iter().map(|f| dir.join(f)).collect()
    } else {
        return Err(Error::input(&single, None, "missing (no model.safetensors or model.safetensors.index.json in the folder)"));
    };
    let mut tensors = BTreeMap::new();
    for f in files {
        tensors.extend(read_safetensors(&f, device)?);
    }
    Ok(tensors)
}

/// All tensors of one safetensors file, in their stored dtype.
///
/// Errors: missing file, truncated or corrupt header/data (naming the file).
pub fn read_safetensors(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let data = std::fs::read(path).map_err(|e| Error::input(path, None, format!("cannot read safetensors file: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&data)
        .map_err(|e| Error::input(path, None, format!("truncated or corrupt safetensors file: {e:?}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, device)
            .map_err(|e| Error::input(path, None, format!("tensor {name}: {e}")))?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Read a JSON file if it exists (`Ok(None)` when absent).
fn read_json_opt(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::input(path, None, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map(Some).map_err(|e| Error::input(path, Some(e.line()), format!("invalid JSON: {e}")))
}

/// A special-token entry of `tokenizer_config.json`: a string or an `AddedToken` object
/// (`{"content": "<|im_end|>", ...}`).
fn token_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

/// The `chat_template` of `tokenizer_config.json`: a string, or a list of `{name, template}`
/// (the one named `default`, else the first).
fn chat_template_of(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(items) => {
            let named = |n: &serde_json::Value| n.get("template").and_then(|t| t.as_str()).map(str::to_string);
            items.iter().find(|i| i.get("name").and_then(|n| n.as_str()) == Some("default")).and_then(named).or_else(|| items.first().and_then(named))
        }
        _ => None,
    }
}

/// The tokenizer bundle of an HF folder, checked against `config`.
///
/// `eos_token_ids` = generation_config's `eos_token_id`s, then config.json's, then the id of
/// `eos_token`, without repeats (transformers' `generate` stops on generation_config's).
///
/// Errors: missing/invalid `tokenizer.json`; token ids at or beyond `config.vocab_size`
/// (a smaller tokenizer is fine: HF pads embedding matrices).
pub fn load_tokenizer(dir: &Path, config: &ModelConfig) -> Result<Tokenizer> {
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(Error::input(&tok_path, None, "missing"));
    }
    let inner = tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| Error::input(&tok_path, None, format!("invalid tokenizer: {e}")))?;
    let n_ids = inner.get_vocab(true).values().max().map(|m| *m as usize + 1).unwrap_or(0);
    if n_ids > config.vocab_size {
        return Err(Error::input(
            &tok_path,
            None,
            format!("tokenizer does not match the model: it has token ids up to {} but config.json vocab_size is {}", n_ids - 1, config.vocab_size),
        ));
    }
    let tc_path = dir.join("tokenizer_config.json");
    let tc = read_json_opt(&tc_path)?.unwrap_or(serde_json::Value::Null);
    let mut chat_template = chat_template_of(tc.get("chat_template"));
    let jinja = dir.join("chat_template.jinja");
    if chat_template.is_none() && jinja.is_file() {
        chat_template = Some(std::fs::read_to_string(&jinja).map_err(|e| Error::input(&jinja, None, format!("cannot read: {e}")))?);
    }
    let bos_token = token_text(tc.get("bos_token"));
    let eos_token = token_text(tc.get("eos_token"));
    let gen = read_json_opt(&dir.join("generation_config.json"))?.unwrap_or(serde_json::Value::Null);
    let gen_eos: Vec<u32> = gen
        .get("eos_token_id")
        .and_then(|v| serde_json::from_value::<OneOrMany>(v.clone()).ok())
        .map(|e| e.to_vec())
        .unwrap_or_default();
    let mut eos_token_ids = Vec::new();
    let tok_eos = eos_token.as_deref().and_then(|t| inner.token_to_id(t));
    for id in gen_eos.into_iter().chain(config.eos_token_ids.iter().copied()).chain(tok_eos) {
        if !eos_token_ids.contains(&id) {
            eos_token_ids.push(id);
        }
    }
    Ok(Tokenizer { inner, chat_template, bos_token, eos_token, eos_token_ids })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_tokens_as_strings_or_added_token_objects() {
        let v = serde_json::json!({"a": "<s>", "b": {"content": "</s>", "lstrip": false}, "c": null});
        assert_eq!(token_text(v.get("a")).as_deref(), Some("<s>"));
        assert_eq!(token_text(v.get("b")).as_deref(), Some("</s>"));
        assert_eq!(token_text(v.get("c")), None);
    }

    #[test]
    fn chat_template_list_form_picks_default() {
        let v = serde_json::json!([{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]);
        assert_eq!(chat_template_of(Some(&v)).as_deref(), Some("D"));
        assert_eq!(chat_template_of(Some(&serde_json::json!("S"))).as_deref(), Some("S"));
    }
}
