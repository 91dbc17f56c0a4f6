//! The `tokenizer.*` metadata of a written GGUF, from the model's `tokenizer.json` (the HF
//! folder's, or the one [`crate::model::gguf`] built from a GGUF source): llama.cpp's keys as
//! `convert_hf_to_gguf.py` writes them for a byte-level BPE (`_set_vocab_gpt2`).
//!
//! `tokenizer.ggml.model = "gpt2"`, `tokens` (id order; ids without a token, up to the model's
//! vocabulary size, become `[PAD{id}]` of type unused, as the converter does), `token_type`
//! (1 normal, 3 control = special added token, 4 user-defined = other added token, 5 unused),
//! `merges` (`"a b"`), `pre` (the pre-tokenizer kind llama.cpp selects by name), `bos_token_id`,
//! `eos_token_id`, `add_bos_token`, and `tokenizer.chat_template`.

use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::tokenizer::Tokenizer;

/// llama.cpp `llama_token_type` values.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The `tokenizer.*` metadata entries for `tokenizer` and `config` (see the module doc).
///
/// Errors: a tokenizer other than byte-level BPE, a pre-tokenizer llama.cpp has no name for
/// (supported: SmolLM's digits + byte-level, plain byte-level, Qwen2's and Llama 3's regex
/// splits), a malformed `tokenizer.json`.
pub fn tokenizer_metadata(tokenizer: &Tokenizer, config: &ModelConfig) -> Result<Vec<(String, Value)>> {
    let json: Json = serde_json::from_str(&tokenizer.inner.to_string(false).map_err(|e| Error::Msg(format!("serializing the tokenizer: {e}")))?)
        .map_err(|e| Error::Msg(format!("reading the tokenizer: {e}")))?;
    let model = &json["model"];
    if model["type"] != "BPE" {
        return Err(Error::Config(format!("GGUF export needs a byte-level BPE tokenizer (got model type {})", model["type"])));
    }
    let (tokens, types) = tokens_and_types(&json, config.vocab_size)?;
    let merges = merges(&model["merges"])?;
    let mut md = vec![
        ("tokenizer.ggml.model".to_string(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), Value::String(pre_kind(&json["pre_tokenizer"])?.into())),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(tokens.into_iter().map(Value::String).collect())),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges.into_iter().map(Value::String).collect())),
    ];
    if let Some(b) = config.bos_token_id {
        md.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    let eos = if tokenizer.eos_token_ids.is_empty() { &config.eos_token_ids } else { &tokenizer.eos_token_ids };
    if let Some(&e) = eos.first() {
        md.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
    }
    let add_bos = json["post_processor"]["type"] == "TemplateProcessing" && config.bos_token_id.is_some();
    md.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    if let Some(t) = &tokenizer.chat_template {
        md.push(("tokenizer.chat_template".into(), Value::String(t.clone())));
    }
    Ok(md)
}

/// Tokens by id and their llama.cpp types, `max(vocab_size, tokens)` entries.
fn tokens_and_types(json: &Json, vocab_size: usize) -> Result<(Vec<String>, Vec<i32>)> {
    let bad = |what: &str| Error::Msg(format!("tokenizer.json: {what}"));
    let vocab = json["model"]["vocab"].as_object().ok_or_else(|| bad("model.vocab is not an object"))?;
    let mut entries: Vec<(usize, String, i32)> = Vec::with_capacity(vocab.len());
    for (tok, id) in vocab {
        entries.push((id.as_u64().ok_or_else(|| bad("a vocab id is not an integer"))? as usize, tok.clone(), NORMAL));
    }
    for a in json["added_tokens"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let id = a["id"].as_u64().ok_or_else(|| bad("an added token has no id"))? as usize;
        let content = a["content"].as_str().ok_or_else(|| bad("an added token has no content"))?.to_string();
        let ty = if a["special"].as_bool().unwrap_or(false) { CONTROL } else { USER_DEFINED };
        entries.push((id, content, ty));
    }
    let n = entries.iter().map(|e| e.0 + 1).max().unwrap_or(0).max(vocab_size);
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut types = vec![UNUSED; n];
    for (id, tok, ty) in entries {
        tokens[id] = Some(tok);
        types[id] = ty; // an added token overrides its vocab entry (same text, its type)
    }
    let tokens = tokens.into_iter().enumerate().map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]"))).collect();
    Ok((tokens, types))
}

/// `model.merges` as `"a b"` strings (tokenizers writes either strings or `[a, b]` pairs).
fn merges(m: &Json) -> Result<Vec<String>> {
    let Some(list) = m.as_array() else { return Ok(Vec::new()) };
    list.iter()
        .map(|x| match x {
            Json::String(s) => Ok(s.clone()),
            Json::Array(p) if p.len() == 2 => Ok(format!("{} {}", p[0].as_str().unwrap_or(""), p[1].as_str().unwrap_or(""))),
            _ => Err(Error::Msg("tokenizer.json: a merge is neither \"a b\" nor [a, b]".into())),
        })
        .collect()
}

/// The `tokenizer.ggml.pre` name of a pre-tokenizer (llama.cpp `src/llama-vocab.cpp`).
fn pre_kind(pre: &Json) -> Result<&'static str> {
    let parts: Vec<&Json> = match pre["type"].as_str() {
        Some("Sequence") => pre["pretokenizers"].as_array().map(|v| v.iter().collect()).unwrap_or_default(),
        Some(_) => vec![pre],
        None => Vec::new(),
    };
    let kinds: Vec<&str> = parts.iter().map(|p| p["type"].as_str().unwrap_or("")).collect();
    let regex = parts.iter().find_map(|p| p["pattern"]["Regex"].as_str()).unwrap_or("");
    match kinds.as_slice() {
        ["ByteLevel"] => Ok("gpt2"),
        ["Digits", "ByteLevel"] if parts[0]["individual_digits"] == true => Ok("smollm"),
        ["Split", "ByteLevel"] if regex.contains("\\p{N}{1,3}") => Ok("llama-bpe"),
        ["Split", "ByteLevel"] if regex.contains("\\p{N}") => Ok("qwen2"),
        _ => Err(Error::Config(format!("GGUF export: no llama.cpp pre-tokenizer name for {kinds:?} (supported: SmolLM, GPT-2, Qwen2, Llama 3)"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_kinds_and_merges() {
        let bl = serde_json::json!({"type": "ByteLevel"});
        assert_eq!(pre_kind(&bl).unwrap(), "gpt2");
        let smol = serde_json::json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, bl]});
        assert_eq!(pre_kind(&smol).unwrap(), "smollm");
        assert!(pre_kind(&serde_json::json!({"type": "Metaspace"})).is_err());
        let m = merges(&serde_json::json!(["a b", ["c", "d"]])).unwrap();
        assert_eq!(m, vec!["a b", "c d"]);
    }

    #[test]
    fn tokens_padded_to_the_vocab_and_typed() {
        let j = serde_json::json!({
            "model": {"vocab": {"a": 0, "b": 1, "<s>": 2}},
            "added_tokens": [{"id": 2, "content": "<s>", "special": true}, {"id": 3, "content": "<x>", "special": false}],
        });
        let (t, ty) = tokens_and_types(&j, 6).unwrap();
        assert_eq!(t, vec!["a", "b", "<s>", "<x>", "[PAD4]", "[PAD5]"]);
        assert_eq!(ty, vec![NORMAL, NORMAL, CONTROL, USER_DEFINED, UNUSED, UNUSED]);
    }
}
