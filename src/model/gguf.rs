//! GGUF (llama.cpp) files -> the HF layout: every tensor dequantized to f32, renamed to HF
//! names, llama.cpp's Q/K row permutation undone; the config from `{arch}.*` metadata and the
//! tokenizer from `tokenizer.ggml.*` metadata.
//!
//! Sources: GGUF spec (ggml-org/ggml `docs/gguf.md`); llama.cpp `convert_hf_to_gguf.py`
//! (`LlamaModel.permute`, tensor name map in `gguf-py/gguf/tensor_mapping.py`) and
//! `src/llama-vocab.cpp` (pre-tokenizer kinds). Reading goes through candle's
//! `candle_core::quantized::gguf_file`.

use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::path::Path;
use std::str::FromStr;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::config::{Arch, ModelConfig};
use crate::model::tokenizer::Tokenizer;
use crate::model::ModelParts;

/// Load a GGUF file: config, every tensor dequantized to f32 (on `device`), by HF name, and the
/// tokenizer. No `lm_head.weight` when the file has no `output.weight` (tied embeddings).
///
/// Errors (each naming `path`): missing/unreadable file, truncated or corrupt GGUF, an
/// unsupported architecture or tokenizer kind, an unknown tensor name.
pub fn load(path: &Path, device: &Device) -> Result<ModelParts> {
    let data = std::fs::read(path).map_err(|e| Error::input(path, None, format!("cannot read GGUF file: {e}")))?;
    load_bytes(&data, path, device)
}

/// [`load`] from the bytes of a GGUF file (`path` names it in errors).
///
/// Errors: as [`load`], never a panic or an allocation larger than the data for any bytes.
pub fn load_bytes(data: &[u8], path: &Path, device: &Device) -> Result<ModelParts> {
    let err = |msg: String| Error::input(path, None, msg);
    check_alignment(data).map_err(|m| err(format!("not a valid GGUF file: {m}")))?;
    let content = Content::read(&mut Cursor::new(&data[..]))
        .map_err(|e| err(format!("not a valid GGUF file (truncated or corrupt): {e}")))?;
    check_tensor_sizes(&content, data.len()).map_err(|m| err(format!("not a valid GGUF file (truncated or corrupt): {m}")))?;
    let md = Metadata { md: &content.metadata, path };
    let config = config_from_metadata(&md, &content)?;
    let tokenizer = tokenizer_from_metadata(&md)?;

    // Dequantize in parallel (each tensor reads its own byte range); sorted for a fixed order.
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let dequantized: Vec<(String, Tensor)> = names
        .par_iter()
        .map(|name| {
            let info = &content.tensor_infos[*name];
            let q = info
                .read(&mut Cursor::new(&data[..]), content.tensor_data_offset, &Device::Cpu)
                .map_err(|e| err(format!("tensor {name}: truncated or corrupt GGUF: {e}")))?;
            let t = q.dequantize(&Device::Cpu).map_err(|e| err(format!("tensor {name}: cannot dequantize: {e}")))?;
            Ok(((*name).clone(), t))
        })
        .collect::<Result<_>>()?;

    let mut tensors = BTreeMap::new();
    for (name, t) in dequantized {
        let hf = hf_name(&name).ok_or_else(|| err(format!("unsupported tensor {name}")))?;
        let t = match (config.arch, hf.rsplit('.').nth(1)) {
            // convert_hf_to_gguf.py permutes q/k rows for the llama architecture only.
            // (a head count that does not divide the rows is an error naming the file and tensor)
            (Arch::Llama, Some("q_proj")) if hf.ends_with(".weight") => {
                unpermute(&t, config.num_attention_heads).map_err(|e| err(format!("tensor {name}: {e} (llama.attention.head_count)")))?
            }
            (Arch::Llama, Some("k_proj")) if hf.ends_with(".weight") => {
                unpermute(&t, config.num_key_value_heads).map_err(|e| err(format!("tensor {name}: {e} (llama.attention.head_count_kv)")))?
            }
            _ => t,
        };
        let t = t.to_dtype(DType::F32).and_then(|t| t.to_device(device)).map_err(|e| err(format!("tensor {name}: {e}")))?;
        tensors.insert(hf, t);
    }
    Ok(ModelParts { config, tensors, tokenizer })
}

/// Refuse a `general.alignment` of 0 (or negative) before candle's reader divides by it: every
/// place the key is stored (its length prefix, v1's u32 or v2/v3's u64, then the key, then an
/// integer value type) must hold a positive value. A string that merely looks like such an
/// entry can only make a file be refused, never let a zero through.
fn check_alignment(data: &[u8]) -> std::result::Result<(), String> {
    const KEY: &[u8] = b"general.alignment";
    let mut from = 0;
    while let Some(k) = data[from..].windows(KEY.len()).position(|w| w == KEY).map(|k| k + from) {
        from = k + 1;
        let len_u64 = k >= 8 && data[k - 8..k] == (KEY.len() as u64).to_le_bytes();
        let len_u32 = k >= 4 && data[k - 4..k] == (KEY.len() as u32).to_le_bytes();
        if !len_u64 && !len_u32 {
            continue;
        }
        let at = k + KEY.len();
        let Some(ty) = data.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])) else { continue };
        let v = &data[(at + 4).min(data.len())..];
        // GGUF value types: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32 (what candle reads as an alignment)
        let value: Option<i64> = match ty {
            0 => v.first().map(|&b| b as i64),
            1 => v.first().map(|&b| b as i8 as i64),
            2 => v.get(..2).map(|b| u16::from_le_bytes([b[0], b[1]]) as i64),
            3 => v.get(..2).map(|b| i16::from_le_bytes([b[0], b[1]]) as i64),
            4 => v.get(..4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64),
            5 => v.get(..4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64),
            _ => None,
        };
        if value == Some(0) {
            return Err("general.alignment is 0".into());
        }
    }
    Ok(())
}

/// Every tensor's element count (the product of its dimensions, without overflow) positive and a
/// multiple of its type's block size, and its bytes inside the file, before anything is
/// allocated for it.
fn check_tensor_sizes(content: &Content, file_len: usize) -> std::result::Result<(), String> {
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let info = &content.tensor_infos[name];
        let dims = info.shape.dims();
        let elems = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| format!("tensor {name}: dimensions {dims:?} overflow"))?;
        // (no tensor of a model is empty; candle would read one through a dangling pointer)
        if elems == 0 {
            return Err(format!("tensor {name}: dimensions {dims:?} hold no elements"));
        }
        let block = info.ggml_dtype.block_size();
        if block == 0 || elems % block != 0 {
            return Err(format!("tensor {name}: {elems} elements are not a multiple of the block size {block}"));
        }
        let bytes = (elems / block).checked_mul(info.ggml_dtype.type_size());
        let start = content.tensor_data_offset.checked_add(info.offset);
        let end = bytes.zip(start).and_then(|(b, s)| s.checked_add(b as u64));
        if end.is_none_or(|e| e > file_len as u64) {
            return Err(format!("tensor {name}: {dims:?} {:?} at offset {} lies past the end of the file ({file_len} bytes)", info.ggml_dtype, info.offset));
        }
    }
    Ok(())
}

/// The HF name of a llama.cpp tensor name (`blk.3.attn_q.weight` ->
/// `model.layers.3.self_attn.q_proj.weight`); `None` for names we do not know.
pub fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.split_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let hf = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        // Qwen3's per-head q/k RMSNorm (llama.cpp `LLM_TENSOR_ATTN_Q_NORM` / `ATTN_K_NORM`)
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Undo llama.cpp's permutation of q/k rows: `convert_hf_to_gguf.py` does
/// `w.reshape(n, 2, out/n/2, in).swapaxes(1, 2)`; the inverse is
/// `w.reshape(n, out/n/2, 2, in).swapaxes(1, 2).reshape(out, in)`, after which HF's half-rotation
/// RoPE (`rotate_half`) equals llama.cpp's interleaved RoPE. `w` is `(out, in)`, `n` the number
/// of heads (query heads for q, key/value heads for k).
pub fn unpermute(w: &Tensor, n: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    if n == 0 || out % (2 * n) != 0 {
        return Err(Error::Msg(format!("cannot un-permute a ({out}, {inp}) weight over {n} heads")));
    }
    Ok(w.reshape((n, out / n / 2, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// The GGUF permutation itself (for tests): `w.reshape(n, 2, out/n/2, in).swapaxes(1, 2)`.
pub fn permute(w: &Tensor, n: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    Ok(w.reshape((n, 2, out / n / 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// Typed access to GGUF metadata with errors that name the file and key.
struct Metadata<'a> {
    md: &'a HashMap<String, Value>,
    path: &'a Path,
}

impl Metadata<'_> {
    fn err(&self, msg: String) -> Error {
        Error::input(self.path, None, msg)
    }
    fn get(&self, key: &str) -> Option<&Value> {
        self.md.get(key)
    }
    fn require(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| self.err(format!("missing GGUF metadata key {key}")))
    }
    fn int(&self, key: &str) -> Result<Option<u64>> {
        self.get(key).map(|v| as_int(v).ok_or_else(|| self.err(format!("GGUF metadata {key} is not an integer ({v:?})")))).transpose()
    }
    fn req_int(&self, key: &str) -> Result<u64> {
        self.require(key)?;
        Ok(self.int(key)?.unwrap_or_default())
    }
    fn float(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| match v {
                // An f32 widened to f64 (9.99999974738e-06) loses the author's 1e-5: go through its
                // shortest decimal form, which is what HF's config.json holds.
                Value::F32(x) => Ok(format!("{x}").parse::<f64>().unwrap_or(*x as f64)),
                Value::F64(x) => Ok(*x),
                v => as_int(v).map(|i| i as f64).ok_or_else(|| self.err(format!("GGUF metadata {key} is not a number ({v:?})"))),
            })
            .transpose()
    }
    fn string(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(self.err(format!("GGUF metadata {key} is not a string ({:?})", v.value_type()))),
            })
            .transpose()
    }
    fn strings(&self, key: &str) -> Result<Option<Vec<&str>>> {
        self.get(key)
            .map(|v| match v {
                Value::Array(a) => a
                    .iter()
                    .map(|x| match x {
                        Value::String(s) => Ok(s.as_str()),
                        _ => Err(self.err(format!("GGUF metadata {key} is not an array of strings"))),
                    })
                    .collect(),
                _ => Err(self.err(format!("GGUF metadata {key} is not an array"))),
            })
            .transpose()
    }
    fn ints(&self, key: &str) -> Result<Option<Vec<u64>>> {
        self.get(key)
            .map(|v| match v {
                Value::Array(a) => a
                    .iter()
                    .map(|x| as_int(x).ok_or_else(|| self.err(format!("GGUF metadata {key} is not an array of integers"))))
                    .collect(),
                _ => Err(self.err(format!("GGUF metadata {key} is not an array"))),
            })
            .transpose()
    }
}

fn as_int(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x as u64),
        Value::U16(x) => Some(x as u64),
        Value::U32(x) => Some(x as u64),
        Value::U64(x) => Some(x),
        Value::I8(x) if x >= 0 => Some(x as u64),
        Value::I16(x) if x >= 0 => Some(x as u64),
        Value::I32(x) if x >= 0 => Some(x as u64),
        Value::I64(x) if x >= 0 => Some(x as u64),
        _ => None,
    }
}

/// `ModelConfig` from `general.architecture` and `{arch}.*` keys (llama.cpp's names:
/// `block_count`, `embedding_length`, `feed_forward_length`, `attention.head_count(_kv)`,
/// `attention.layer_norm_rms_epsilon`, `rope.freq_base`, `context_length`).
fn config_from_metadata(md: &Metadata, content: &Content) -> Result<ModelConfig> {
    let arch_name = md.string("general.architecture")?.ok_or_else(|| md.err("missing GGUF metadata key general.architecture".into()))?;
    let arch = match arch_name {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        // llama.cpp's `qwen3`: Qwen2's layout (no q/k permutation) plus blk.N.attn_{q,k}_norm
        "qwen3" => Arch::Qwen3,
        other => return Err(md.err(format!("unsupported GGUF architecture \"{other}\" (supported: llama, qwen2, qwen3)"))),
    };
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(md.err("GGUF rope_freqs.weight (Llama-3.1 RoPE scaling) is not supported; load the HF folder instead".into()));
    }
    let k = |s: &str| format!("{arch_name}.{s}");
    let hidden_size = md.req_int(&k("embedding_length"))? as usize;
    let num_attention_heads = md.req_int(&k("attention.head_count"))? as usize;
    if num_attention_heads == 0 {
        return Err(md.err(format!("{} is 0", k("attention.head_count"))));
    }
    let num_key_value_heads = md.int(&k("attention.head_count_kv"))?.map(|x| x as usize).unwrap_or(num_attention_heads);
    let head_dim = md.int(&k("attention.key_length"))?.map(|x| x as usize).unwrap_or(hidden_size / num_attention_heads);
    let n_tokens = md.strings("tokenizer.ggml.tokens")?.map(|t| t.len());
    let vocab_size = match md.int(&k("vocab_size"))? {
        Some(v) => v as usize,
        None => n_tokens.ok_or_else(|| md.err(format!("missing {} and tokenizer.ggml.tokens", k("vocab_size"))))?,
    };
    let eos = eos_ids(md)?;
    Ok(ModelConfig {
        arch,
        vocab_size,
        hidden_size,
        intermediate_size: md.req_int(&k("feed_forward_length"))? as usize,
        num_hidden_layers: md.req_int(&k("block_count"))? as usize,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: md.float(&k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
        rope_theta: md.float(&k("rope.freq_base"))?.unwrap_or(10000.0),
        rope_scaling: None,
        max_position_embeddings: md.int(&k("context_length"))?.map(|x| x as usize).unwrap_or(2048),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        bos_token_id: md.int("tokenizer.ggml.bos_token_id")?.map(|x| x as u32),
        eos_token_ids: eos,
        extras: Default::default(),
    })
}

/// Generation-ending ids: `eos_token_id`, then `eot_token_id` / `eom_token_id` when distinct.
fn eos_ids(md: &Metadata) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        if let Some(i) = md.int(key)? {
            if !ids.contains(&(i as u32)) {
                ids.push(i as u32);
            }
        }
    }
    Ok(ids)
}

/// GGUF token types (llama.cpp `llama_token_type`): 3 = control (special), 4 = user-defined.
const TOKEN_TYPE_CONTROL: u64 = 3;
const TOKEN_TYPE_USER_DEFINED: u64 = 4;

/// The pre-tokenizer of a `tokenizer.ggml.pre` kind, as HF `tokenizer.json` writes it.
///
/// `smollm` (SmolLM/SmolLM2, StarCoder-style): split every digit, then GPT-2 byte-level with
/// its regex, exactly the `pre_tokenizer` of HuggingFaceTB/SmolLM2-135M-Instruct's
/// tokenizer.json. `gpt2`/`default`: plain GPT-2 byte-level.
fn pre_tokenizer_json(md: &Metadata, pre: &str) -> Result<serde_json::Value> {
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    match pre {
        "smollm" | "starcoder" => Ok(serde_json::json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level],
        })),
        "gpt2" | "gpt-2" | "default" => Ok(byte_level),
        other => Err(md.err(format!(
            "unsupported tokenizer.ggml.pre \"{other}\" (supported: smollm, starcoder, gpt2, default)"
        ))),
    }
}

/// The tokenizer from `tokenizer.ggml.*` metadata: a byte-level BPE (`tokenizer.ggml.model` =
/// `gpt2`) with vocab = `tokens` (id = index), `merges`, control tokens (`token_type` 3) as
/// special added tokens, user-defined ones (4) as added tokens, the `pre` kind's pre-tokenizer,
/// a byte-level decoder, and a BOS-prepending post-processor only when `add_bos_token` is true.
pub fn tokenizer_json(md_map: &HashMap<String, Value>, path: &Path) -> Result<serde_json::Value> {
    tokenizer_json_inner(&Metadata { md: md_map, path })
}

fn tokenizer_json_inner(md: &Metadata) -> Result<serde_json::Value> {
    let model = md.string("tokenizer.ggml.model")?.unwrap_or("");
    if model != "gpt2" {
        return Err(md.err(format!("unsupported tokenizer.ggml.model \"{model}\" (supported: gpt2, byte-level BPE)")));
    }
    let tokens = md.strings("tokenizer.ggml.tokens")?.ok_or_else(|| md.err("missing GGUF metadata key tokenizer.ggml.tokens".into()))?;
    let merges = md.strings("tokenizer.ggml.merges")?.unwrap_or_default();
    let types = md.ints("tokenizer.ggml.token_type")?.unwrap_or_default();
    let pre = md.string("tokenizer.ggml.pre")?.unwrap_or("default");
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        vocab.insert((*tok).to_string(), id.into());
        let ty = types.get(id).copied().unwrap_or(1);
        if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
            added.push(serde_json::json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": ty == TOKEN_TYPE_CONTROL,
            }));
        }
    }
    Ok(serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer_json(md, pre)?,
        "post_processor": post_processor_json(md, &tokens)?,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    }))
}

/// With `tokenizer.ggml.add_bos_token` true, a `TemplateProcessing` that prepends BOS when
/// special tokens are requested (what llama.cpp does, and HF's Llama `tokenizer.json`s);
/// otherwise none.
fn post_processor_json(md: &Metadata, tokens: &[&str]) -> Result<serde_json::Value> {
    let add_bos = matches!(md.get("tokenizer.ggml.add_bos_token"), Some(Value::Bool(true)));
    let bos = md.int("tokenizer.ggml.bos_token_id")?;
    let (true, Some(bos)) = (add_bos, bos) else { return Ok(serde_json::Value::Null) };
    let text = tokens.get(bos as usize).ok_or_else(|| md.err(format!("tokenizer.ggml.bos_token_id = {bos} is not a token id")))?;
    let b = serde_json::json!({"SpecialToken": {"id": text, "type_id": 0}});
    let mut special = serde_json::Map::new();
    special.insert(text.to_string(), serde_json::json!({"id": text, "ids": [bos], "tokens": [text]}));
    Ok(serde_json::json!({
        "type": "TemplateProcessing",
        "single": [b, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [b, {"Sequence": {"id": "A", "type_id": 0}}, b, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": special,
    }))
}

/// The tokenizer of the GGUF file at `path` (see [`tokenizer_json`]), reading only its header
/// and metadata, not the tensors.
///
/// Errors (naming `path`): an unreadable or invalid file, an unsupported tokenizer.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    let file = std::fs::File::open(path).map_err(|e| Error::input(path, None, format!("cannot read GGUF file: {e}")))?;
    let content = Content::read(&mut std::io::BufReader::new(file))
        .map_err(|e| Error::input(path, None, format!("not a valid GGUF file (truncated or corrupt): {e}")))?;
    tokenizer_from_metadata(&Metadata { md: &content.metadata, path })
}

/// The tokenizer bundle from GGUF metadata (see [`tokenizer_json`]) plus `tokenizer.chat_template`
/// and the BOS/EOS token texts.
fn tokenizer_from_metadata(md: &Metadata) -> Result<Tokenizer> {
    let json = tokenizer_json_inner(md)?;
    let inner = tokenizers::Tokenizer::from_str(&json.to_string()).map_err(|e| md.err(format!("cannot build the tokenizer from tokenizer.ggml.*: {e}")))?;
    let text_of = |key: &str| -> Result<Option<String>> {
        Ok(match md.int(key)? {
            Some(id) => Some(inner.id_to_token(id as u32).ok_or_else(|| md.err(format!("{key} = {id} is not a token id")))?),
            None => None,
        })
    };
    Ok(Tokenizer {
        chat_template: md.string("tokenizer.chat_template")?.map(str::to_string),
        bos_token: text_of("tokenizer.ggml.bos_token_id")?,
        eos_token: text_of("tokenizer.ggml.eos_token_id")?,
        eos_token_ids: eos_ids(md)?,
        inner,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hf() {
        assert_eq!(hf_name("blk.12.attn_q.weight").unwrap(), "model.layers.12.self_attn.q_proj.weight");
        assert_eq!(hf_name("blk.0.attn_k.bias").unwrap(), "model.layers.0.self_attn.k_proj.bias");
        assert_eq!(hf_name("blk.3.ffn_down.weight").unwrap(), "model.layers.3.mlp.down_proj.weight");
        assert_eq!(hf_name("blk.3.attn_norm.weight").unwrap(), "model.layers.3.input_layernorm.weight");
        assert_eq!(hf_name("blk.3.ffn_norm.weight").unwrap(), "model.layers.3.post_attention_layernorm.weight");
        assert_eq!(hf_name("blk.2.attn_q_norm.weight").unwrap(), "model.layers.2.self_attn.q_norm.weight");
        assert_eq!(hf_name("blk.2.attn_k_norm.weight").unwrap(), "model.layers.2.self_attn.k_norm.weight");
        assert_eq!(hf_name("token_embd.weight").unwrap(), "model.embed_tokens.weight");
        assert_eq!(hf_name("output.weight").unwrap(), "lm_head.weight");
        assert!(hf_name("blk.x.attn_q.weight").is_none());
        assert!(hf_name("blk.1.attn_qkv.weight").is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // (out=12, in=2) over n=3 heads of width 4: rows per head [0,1,2,3] in HF order become
        // [0,2,1,3] in llama.cpp order (first halves and second halves interleaved).
        let w = Tensor::arange(0f32, 24., &Device::Cpu).unwrap().reshape((12, 2)).unwrap();
        let p = permute(&w, 3).unwrap();
        let rows: Vec<f32> = p.narrow(1, 0, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(rows, [0., 4., 2., 6., 8., 12., 10., 14., 16., 20., 18., 22.]);
        let back = unpermute(&p, 3).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }
}
