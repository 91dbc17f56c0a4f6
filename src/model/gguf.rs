//! GGUF (llama.cpp) files -> the HF layout: every tensor dequantized to f32, renamed to HF
//! names, llama.cpp's Q/K row permutation undone (`llama`) and Gemma's `1 + w` norm weights
//! shifted back; the config from `{arch}.*` metadata and the tokenizer from `tokenizer.ggml.*`
//! metadata. Architectures: `llama`, `qwen2`, `qwen3`, `gemma2`, `gemma3` (text), `phi3`
//! (4k context; the 128k `longrope` files are refused).
//!
//! Sources: GGUF spec (ggml-org/ggml `docs/gguf.md`); llama.cpp `convert_hf_to_gguf.py` and its
//! `conversion/` classes (`LlamaModel.permute`; `Gemma2Model` / `Gemma3Model`: `norm.weight + 1`;
//! `Phi3MiniModel`), the tensor name map in `gguf-py/gguf/tensor_mapping.py` /
//! `constants.py`, `src/models/{gemma2,gemma3,phi3}.cpp` (`load_arch_hparams`: the hyper-parameter
//! defaults and hard-coded layer patterns) and `src/llama-vocab.cpp` (pre-tokenizer kinds);
//! transformers 5.24 `integrations/gguf/gguf_tokenizer_mapping.py` for the SentencePiece
//! tokenizers. Reading goes through candle's `candle_core::quantized::gguf_file`.

use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::path::Path;
use std::str::FromStr;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::config::{Activation, Arch, ArchExtras, ModelConfig};
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
        let hf = hf_name_for(config.arch, &name).ok_or_else(|| err(format!("unsupported tensor {name} for GGUF architecture {}", gguf_arch_name(config.arch))))?;
        // convert_hf_to_gguf.py's Gemma2Model / Gemma3Model store every `*norm.weight` (the
        // layer norms, q/k norms and the final norm) as `w + 1`; HF stores `w`. (In f32,
        // `(1 + w) - 1` is exact to the rounding of `1 + w`, and ropo's `1 + w` gives back the
        // stored value bit for bit.)
        let t = if config.arch.is_gemma() && name.ends_with("norm.weight") {
            t.affine(1.0, -1.0).map_err(|e| err(format!("tensor {name}: {e}")))?
        } else {
            t
        };
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

/// The HF name of a llama.cpp tensor name of the Llama layout (`llama`, `qwen2`, `qwen3`):
/// `blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; `None` for names we do not
/// know. [`hf_name_for`] with [`Arch::Llama`].
pub fn hf_name(gguf: &str) -> Option<String> {
    hf_name_for(Arch::Llama, gguf)
}

/// The HF name of a llama.cpp tensor name in a file of architecture `arch`; `None` for names we
/// do not know. The map depends on the architecture (llama.cpp `gguf-py/gguf/constants.py`,
/// `tensor_mapping.py`):
///
/// - Llama, Qwen2/3, Phi-3: `blk.N.attn_norm` = `input_layernorm`, `blk.N.ffn_norm` =
///   `post_attention_layernorm` (the norm before the MLP);
/// - Gemma 2/3: `attn_norm` = `input_layernorm`, `post_attention_norm` =
///   `post_attention_layernorm` (on the attention output), `ffn_norm` =
///   `pre_feedforward_layernorm`, `post_ffw_norm` = `post_feedforward_layernorm`;
/// - Phi-3: `attn_qkv` = `self_attn.qkv_proj` `((H + 2 Hkv) hd, D)`, `ffn_up` = the fused
///   `mlp.gate_up_proj` `(2I, D)` (gate rows first), no `ffn_gate`;
/// - Qwen3, Gemma 3: `attn_q_norm` / `attn_k_norm` = `self_attn.q_norm` / `k_norm` `(hd,)`.
pub fn hf_name_for(arch: Arch, gguf: &str) -> Option<String> {
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
    let hf = match (arch, module) {
        (Arch::Gemma2 | Arch::Gemma3, "post_attention_norm") => "post_attention_layernorm",
        (Arch::Gemma2 | Arch::Gemma3, "ffn_norm") => "pre_feedforward_layernorm",
        (Arch::Gemma2 | Arch::Gemma3, "post_ffw_norm") => "post_feedforward_layernorm",
        (Arch::Phi3, "attn_qkv") => "self_attn.qkv_proj",
        (Arch::Phi3, "ffn_up") => "mlp.gate_up_proj",
        (Arch::Phi3, "ffn_gate") => return None,
        (_, module) => match module {
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
        },
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

impl Metadata<'_> {
    /// An array of numbers (f32 `tokenizer.ggml.scores`) as f64s, each f32 widened exactly.
    fn floats(&self, key: &str) -> Result<Option<Vec<f64>>> {
        self.get(key)
            .map(|v| match v {
                Value::Array(a) => a
                    .iter()
                    .map(|x| match x {
                        Value::F32(f) => Ok(*f as f64),
                        Value::F64(f) => Ok(*f),
                        x => as_int(x).map(|i| i as f64).ok_or_else(|| self.err(format!("GGUF metadata {key} is not an array of numbers"))),
                    })
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
/// `attention.key_length`, `attention.layer_norm_rms_epsilon`, `rope.freq_base`,
/// `context_length`), plus the [`ArchExtras`] of `gemma2`, `gemma3` and `phi3`
/// ([`arch_extras`]). Tied embeddings: no `output.weight` tensor.
fn config_from_metadata(md: &Metadata, content: &Content) -> Result<ModelConfig> {
    let arch_name = md.string("general.architecture")?.ok_or_else(|| md.err("missing GGUF metadata key general.architecture".into()))?;
    let arch = match arch_name {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        // llama.cpp's `qwen3`: Qwen2's layout (no q/k permutation) plus blk.N.attn_{q,k}_norm
        "qwen3" => Arch::Qwen3,
        "gemma2" => Arch::Gemma2,
        "gemma3" => Arch::Gemma3,
        "phi3" => Arch::Phi3,
        other => {
            return Err(md.err(format!("unsupported GGUF architecture \"{other}\" (supported: llama, qwen2, qwen3, gemma2, gemma3, phi3)")))
        }
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
    let num_hidden_layers = md.req_int(&k("block_count"))? as usize;
    let rope_theta = md.float(&k("rope.freq_base"))?.unwrap_or(10000.0);
    let extras = arch_extras(md, content, arch, num_hidden_layers, hidden_size, num_attention_heads, head_dim, rope_theta)?;
    let eos = eos_ids(md)?;
    Ok(ModelConfig {
        arch,
        vocab_size,
        hidden_size,
        intermediate_size: md.req_int(&k("feed_forward_length"))? as usize,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: md.float(&k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
        rope_theta,
        rope_scaling: None,
        max_position_embeddings: md.int(&k("context_length"))?.map(|x| x as usize).unwrap_or(2048),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        bos_token_id: md.int("tokenizer.ggml.bos_token_id")?.map(|x| x as u32),
        eos_token_ids: eos,
        extras,
    })
}

/// The [`ArchExtras`] of a `gemma2` / `gemma3` / `phi3` file, as llama.cpp reads them
/// (`src/models/{gemma2,gemma3,phi3}.cpp`, `load_arch_hparams`) and as `hf_config.rs` resolves
/// the equivalent `config.json`; the default (none) for the other architectures.
///
/// - Gemma: GeGLU (tanh GELU). `query_pre_attn_scalar` is not stored in a GGUF: llama.cpp scales
///   queries by `1/sqrt(head_dim)` except for the 27B sizes (Gemma 2: 46 layers, Gemma 3: 62),
///   where it uses `1/sqrt(hidden / heads)` (`f_attention_scale`, after gemma_pytorch's
///   `config.py`); the same rule here (the published configs agree: 256 = head_dim, 27B: 144 =
///   4608 / 32 and 168 = 5376 / 32).
/// - Gemma 2: `gemma2.attn_logit_softcapping` / `final_logit_softcapping` (llama.cpp's defaults
///   50 and 30 when absent), `attention.sliding_window` (default 4096).
/// - Gemma 3: `final_logit_softcapping` when present (no attention cap);
///   `attention.sliding_window` (absent or 0: every layer global); `rope.freq_base_swa` for the
///   sliding layers (llama.cpp's default 10000); `rope.scaling.type = linear` with
///   `rope.scaling.factor` for the global layers.
/// - Which layers slide: `attention.sliding_window_pattern` when the file has it (an array of
///   booleans, or a period `n`: layer `i` slides when `i % n < n - 1`), else llama.cpp's
///   hard-coded period, 2 for Gemma 2 (layers 0, 2, 4, ... slide) and 6 for Gemma 3 (layers
///   with `(i + 1) % 6 != 0` slide).
/// - Phi-3: `attention.sliding_window` (0 = none) on every layer, as transformers' Phi-3 and
///   `hf_config.rs` apply it (llama.cpp currently ignores Phi-3's window). The 128k variants
///   (`rope_factors_long` / `rope_factors_short` tensors, `longrope`) and partial rotary
///   embeddings (`rope.dimension_count` < head_dim) are refused.
#[allow(clippy::too_many_arguments)]
fn arch_extras(
    md: &Metadata,
    content: &Content,
    arch: Arch,
    n_layers: usize,
    hidden: usize,
    heads: usize,
    head_dim: usize,
    rope_theta: f64,
) -> Result<ArchExtras> {
    if !matches!(arch, Arch::Gemma2 | Arch::Gemma3 | Arch::Phi3) {
        return Ok(ArchExtras::default());
    }
    let name = gguf_arch_name(arch);
    let k = |s: &str| format!("{name}.{s}");
    if arch == Arch::Phi3 {
        let long = ["rope_factors_long.weight", "rope_factors_short.weight"].into_iter().find(|t| content.tensor_infos.contains_key(*t));
        if let Some(t) = long {
            return Err(md.err(format!(
                "GGUF tensor {t}: Phi-3's 128k-context RoPE scaling (longrope) is not supported (only the 4k-context Phi-3 models)"
            )));
        }
    }
    if let Some(dims) = md.int(&k("rope.dimension_count"))? {
        if dims as usize != head_dim {
            return Err(md.err(format!("{} = {dims}: partial rotary embeddings are not supported (only head_dim = {head_dim})", k("rope.dimension_count"))));
        }
    }
    let rope_linear_factor = rope_linear_factor(md, arch)?;
    let gemma = arch.is_gemma();
    // a cap divides the scores: 0, negative or non-finite is refused (the HF path does the same)
    let positive = |key: &str, default: Option<f64>| -> Result<Option<f64>> {
        match md.float(&k(key))?.or(default) {
            Some(c) if !(c > 0.0 && c.is_finite()) => Err(md.err(format!("{} = {c}: expected a positive cap", k(key)))),
            c => Ok(c),
        }
    };
    let (attn_logit_softcapping, final_logit_softcapping) = match arch {
        Arch::Gemma2 => (positive("attn_logit_softcapping", Some(50.0))?, positive("final_logit_softcapping", Some(30.0))?),
        Arch::Gemma3 => (None, positive("final_logit_softcapping", None)?),
        _ => (None, None),
    };
    // llama.cpp requires Gemma 3's window (its loader has no default); Gemma 2's defaults to 4096
    if arch == Arch::Gemma3 && md.get(&k("attention.sliding_window")).is_none() {
        return Err(md.err(format!("missing GGUF metadata key {}", k("attention.sliding_window"))));
    }
    let window = md.int(&k("attention.sliding_window"))?.or((arch == Arch::Gemma2).then_some(4096)).filter(|w| *w > 0).map(|w| w as usize);
    let sliding_layers = if window.is_some() { sliding_layers(md, arch, n_layers)? } else { vec![] };
    let any_sliding = sliding_layers.iter().any(|&s| s);
    let rope_local_theta = rope_local_theta(md, arch, rope_theta)?;
    // llama.cpp's f_attention_scale: 1/sqrt(n_embd / n_head) for the 27B sizes, else 1/sqrt(head_dim)
    let is_27b = matches!((arch, n_layers), (Arch::Gemma2, 46) | (Arch::Gemma3, 62));
    let query_pre_attn_scalar = gemma.then(|| if is_27b { (hidden / heads) as f64 } else { head_dim as f64 });
    Ok(ArchExtras {
        hidden_act: if gemma { Activation::GeluTanh } else { Activation::Silu },
        query_pre_attn_scalar,
        attn_logit_softcapping,
        final_logit_softcapping,
        sliding_window: window.filter(|_| any_sliding),
        sliding_layers: if any_sliding { sliding_layers } else { vec![] },
        rope_local_theta,
        rope_linear_factor,
    })
}

/// `{arch}.rope.scaling.*`: Gemma 3's linear RoPE factor (none when absent, 0 or 1); any other
/// scaling is refused, naming the key. Errors: a non-positive factor, an unsupported kind.
fn rope_linear_factor(md: &Metadata, arch: Arch) -> Result<Option<f64>> {
    let name = gguf_arch_name(arch);
    let k = |s: &str| format!("{name}.{s}");
    let scaling = md.string(&k("rope.scaling.type"))?.unwrap_or("none");
    let factor = md.float(&k("rope.scaling.factor"))?.filter(|f| *f != 0.0 && *f != 1.0);
    match (scaling, factor) {
        ("none", _) | ("linear", None) => Ok(None),
        ("linear", Some(f)) if arch == Arch::Gemma3 && f > 0.0 && f.is_finite() => Ok(Some(f)),
        ("linear", Some(f)) if arch == Arch::Gemma3 => Err(md.err(format!("{} = {f}: expected a positive factor", k("rope.scaling.factor")))),
        (kind, _) => {
            let what = if matches!(kind, "longrope" | "su") { " (Phi-3's 128k-context RoPE scaling)" } else { "" };
            Err(md.err(format!("{} = \"{kind}\"{what} is not supported for GGUF architecture {name}", k("rope.scaling.type"))))
        }
    }
}

/// Which of the `n_layers` layers use the sliding window (the model has one): every layer for
/// Phi-3; else `{arch}.attention.sliding_window_pattern`, an array of booleans or llama.cpp's
/// period `n` (layer `i` slides when `n == 0` or `i % n < n - 1`; default 2 for Gemma 2, 6 for
/// Gemma 3). Errors: an array of other values or of another length.
fn sliding_layers(md: &Metadata, arch: Arch, n_layers: usize) -> Result<Vec<bool>> {
    let key = format!("{}.attention.sliding_window_pattern", gguf_arch_name(arch));
    match (arch, md.get(&key)) {
        (Arch::Phi3, _) => Ok(vec![true; n_layers]),
        (_, Some(Value::Array(a))) => {
            let flags: Option<Vec<bool>> = a.iter().map(|v| if let Value::Bool(b) = v { Some(*b) } else { None }).collect();
            let flags = flags.ok_or_else(|| md.err(format!("GGUF metadata {key} is not an array of booleans")))?;
            if flags.len() != n_layers {
                return Err(md.err(format!("{key} has {} entries for {n_layers} layers", flags.len())));
            }
            Ok(flags)
        }
        (_, _) => {
            // llama_hparams::set_swa_pattern(n)
            let n = md.int(&key)?.unwrap_or(if arch == Arch::Gemma2 { 2 } else { 6 }) as usize;
            Ok((0..n_layers).map(|i| n == 0 || i % n < n - 1).collect())
        }
    }
}

/// The sliding layers' RoPE base: Gemma 3's `{arch}.rope.freq_base_swa` (default 10000); Gemma 2
/// (llama.cpp: the sliding layers' base defaults to the global one) and Phi-3 have one base, so
/// a second one that differs is refused. Errors: that second base.
fn rope_local_theta(md: &Metadata, arch: Arch, rope_theta: f64) -> Result<Option<f64>> {
    let name = gguf_arch_name(arch);
    let key = format!("{name}.rope.freq_base_swa");
    match (arch, md.float(&key)?) {
        (Arch::Gemma3, b) => Ok(Some(b.unwrap_or(10000.0))),
        (_, Some(b)) if b != rope_theta => Err(md.err(format!("{key} = {b} != rope.freq_base {rope_theta}: a second RoPE base is not supported for {name}"))),
        _ => Ok(None),
    }
}

/// llama.cpp's `general.architecture` name of `arch` (Mistral is written as `llama`).
pub(crate) fn gguf_arch_name(arch: Arch) -> &'static str {
    match arch {
        Arch::Llama | Arch::Mistral => "llama",
        Arch::Qwen2 => "qwen2",
        Arch::Qwen3 => "qwen3",
        Arch::Phi3 => "phi3",
        Arch::Gemma2 => "gemma2",
        Arch::Gemma3 => "gemma3",
    }
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

/// `tokenizer.ggml.token_type`: absent (every token normal) or one entry per token.
fn token_types(md: &Metadata, n_tokens: usize) -> Result<Vec<u64>> {
    let types = md.ints("tokenizer.ggml.token_type")?.unwrap_or_default();
    if !types.is_empty() && types.len() != n_tokens {
        return Err(md.err(format!("tokenizer.ggml.token_type has {} entries for {n_tokens} tokens", types.len())));
    }
    Ok(types)
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

/// The tokenizer from `tokenizer.ggml.*` metadata, as an HF `tokenizer.json` object, for the
/// two tokenizer kinds (`tokenizer.ggml.model`):
///
/// - `gpt2`, a byte-level BPE: vocab = `tokens` (id = index), `merges`, control tokens
///   (`token_type` 3) as special added tokens, user-defined ones (4) as added tokens, the `pre`
///   kind's pre-tokenizer, a byte-level decoder;
/// - `llama`, SentencePiece (Gemma, Phi-3, Llama 2 files): see [`spm_tokenizer_json`];
///
/// and a BOS-prepending post-processor when `add_bos_token` is true (for `llama` also when the
/// key is absent: llama.cpp's and transformers' default for SentencePiece).
pub fn tokenizer_json(md_map: &HashMap<String, Value>, path: &Path) -> Result<serde_json::Value> {
    tokenizer_json_inner(&Metadata { md: md_map, path })
}

fn tokenizer_json_inner(md: &Metadata) -> Result<serde_json::Value> {
    let model = md.string("tokenizer.ggml.model")?.unwrap_or("");
    if model == "llama" {
        return spm_tokenizer_json(md);
    }
    if model != "gpt2" {
        return Err(md.err(format!(
            "unsupported tokenizer.ggml.model \"{model}\" (supported: gpt2, byte-level BPE; llama, SentencePiece)"
        )));
    }
    let tokens = md.strings("tokenizer.ggml.tokens")?.ok_or_else(|| md.err("missing GGUF metadata key tokenizer.ggml.tokens".into()))?;
    let merges = md.strings("tokenizer.ggml.merges")?.unwrap_or_default();
    let types = token_types(md, tokens.len())?;
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
        "post_processor": post_processor_json(md, &tokens, false)?,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    }))
}


/// GGUF token type 2: the unknown token; 5: unused; 6: a `<0xNN>` byte token.
const TOKEN_TYPE_UNKNOWN: u64 = 2;

/// The `tokenizer.json` of a SentencePiece GGUF vocabulary (`tokenizer.ggml.model = llama`),
/// built as transformers 5.24 builds it (`integrations/gguf/gguf_tokenizer_mapping.py`:
/// `sentencepiece_tokenizer`, `gemma_tokenizer`, `phi3_tokenizer`, `add_gguf_special_tokens`,
/// over `LlamaTokenizer` / `GemmaTokenizer` of `models/{llama,gemma}/tokenization_*.py`):
///
/// - a BPE with `byte_fallback` (the `<0xNN>` tokens, type 6) and `fuse_unk`; vocab = `tokens`;
///   merges from `tokenizer.ggml.merges`, or, as in these files, rebuilt from the vocabulary
///   ([`merges_from_vocab`]) ranked by `tokenizer.ggml.scores` (Gemma: by position in the file;
///   Gemma's whitespace-only tokens are respelled with `▁`);
/// - Gemma (`gemma`, `gemma2`, `gemma3`): normalizer `Replace(" ", "▁")`, no prefix space
///   (the converter writes `add_space_prefix = false`), a `Split(" ")` pre-tokenizer (a no-op
///   after the normalizer), unk token `<unk>`;
/// - Phi-3: normalizer `Prepend("▁")` + `Replace(" ", "▁")`, no pre-tokenizer;
/// - other architectures (`llama`): a `Metaspace` pre-tokenizer prepending `▁` to the first
///   word when `tokenizer.ggml.add_space_prefix` is true (the default), none when false;
/// - decoder `Replace("▁", " ")`, `ByteFallback`, `Fuse`, and (not Gemma) `Strip` of the
///   one prefix space;
/// - control tokens (type 3) and the unknown / BOS / EOS / padding tokens as special added
///   tokens, user-defined ones (4) as plain added tokens; BOS prepended per `add_bos_token`
///   (default true).
fn spm_tokenizer_json(md: &Metadata) -> Result<serde_json::Value> {
    let arch = md.string("general.architecture")?.unwrap_or("");
    let gemma = matches!(arch, "gemma" | "gemma2" | "gemma3");
    let phi3 = arch == "phi3";
    let tokens = md.strings("tokenizer.ggml.tokens")?.ok_or_else(|| md.err("missing GGUF metadata key tokenizer.ggml.tokens".into()))?;
    let types = token_types(md, tokens.len())?;
    // Gemma files store a token of two or more spaces as spaces; GemmaTokenizer looks it up as ▁▁
    let vocab_tokens: Vec<String> = tokens
        .iter()
        .map(|t| if gemma && t.contains(' ') && t.chars().all(py_whitespace) { "▁".repeat(t.chars().count()) } else { t.to_string() })
        .collect();
    let merges: Vec<String> = match md.strings("tokenizer.ggml.merges")? {
        Some(m) => m.into_iter().map(str::to_string).collect(),
        None => {
            let scores: Vec<f64> = if gemma {
                // Gemma's scores do not follow its merge order; the file order does
                (0..vocab_tokens.len()).map(|i| -(i as f64)).collect()
            } else {
                let s = md.floats("tokenizer.ggml.scores")?.ok_or_else(|| md.err("missing GGUF metadata keys tokenizer.ggml.merges and tokenizer.ggml.scores".into()))?;
                if s.len() != vocab_tokens.len() {
                    return Err(md.err(format!("tokenizer.ggml.scores has {} entries for {} tokens", s.len(), vocab_tokens.len())));
                }
                s
            };
            merges_from_vocab(&vocab_tokens, &scores).into_iter().map(|(l, r)| format!("{l} {r}")).collect()
        }
    };
    let mut vocab = serde_json::Map::with_capacity(vocab_tokens.len());
    for (id, tok) in vocab_tokens.iter().enumerate() {
        vocab.insert(tok.clone(), id.into());
    }
    let text_of = |key: &str| -> Result<Option<usize>> { Ok(md.int(key)?.map(|i| i as usize).filter(|&i| i < vocab_tokens.len())) };
    let unk = text_of("tokenizer.ggml.unknown_token_id")?.or_else(|| types.iter().position(|&t| t == TOKEN_TYPE_UNKNOWN));
    let named: Vec<usize> = [unk, text_of("tokenizer.ggml.bos_token_id")?, text_of("tokenizer.ggml.eos_token_id")?, text_of("tokenizer.ggml.padding_token_id")?]
        .into_iter()
        .flatten()
        .collect();
    let mut added = Vec::new();
    for (id, tok) in vocab_tokens.iter().enumerate() {
        let ty = types.get(id).copied().unwrap_or(1);
        if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED || named.contains(&id) {
            added.push(serde_json::json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": ty != TOKEN_TYPE_USER_DEFINED,
            }));
        }
    }
    // GemmaTokenizer's BPE names `<unk>` as its unknown token; LlamaTokenizer's names none
    let unk_token = if gemma { Some("<unk>".to_string()).filter(|u| vocab.contains_key(u)) } else { None };
    let replace = |from: &str, to: &str| serde_json::json!({"type": "Replace", "pattern": {"String": from}, "content": to});
    let add_prefix = !matches!(md.get("tokenizer.ggml.add_space_prefix"), Some(Value::Bool(false)));
    let (normalizer, pre_tokenizer) = if gemma {
        (replace(" ", "▁"), serde_json::json!({"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false}))
    } else if phi3 {
        (serde_json::json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, replace(" ", "▁")]}), serde_json::Value::Null)
    } else {
        let scheme = if add_prefix { "first" } else { "never" };
        (serde_json::Value::Null, serde_json::json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": false}))
    };
    let mut decoders = vec![replace("▁", " "), serde_json::json!({"type": "ByteFallback"}), serde_json::json!({"type": "Fuse"})];
    if !gemma && (phi3 || add_prefix) {
        decoders.push(serde_json::json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let token_refs: Vec<&str> = vocab_tokens.iter().map(String::as_str).collect();
    Ok(serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor_json(md, &token_refs, true)?,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk_token, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    }))
}

/// Python's `str.isspace` for one character (what transformers' `t.strip()` removes): Unicode
/// whitespace plus the separators U+001C..U+001F.
fn py_whitespace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// BPE merges recovered from a vocabulary without them, exactly as transformers'
/// `tokenization_utils_base.generate_merges(vocab, vocab_scores)` does: for every token (in
/// file order, once), every split into two halves that are both tokens, the splits of one
/// token ordered by the halves' ids; then all of them stably sorted by (score of the token,
/// length of the left half, of the right half in characters), highest first. `tokens[i]` has
/// id `i` (a repeated token keeps its last id and its first position) and score `scores[i]`
/// (a repeated token keeps its last score).
pub fn merges_from_vocab(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    let mut id: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    let mut score: HashMap<&str, f64> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        if id.insert(t, i).is_none() {
            order.push(t);
        }
        score.insert(t, scores.get(i).copied().unwrap_or(0.0));
    }
    let mut merges: Vec<(&str, &str, f64, usize, usize)> = Vec::new();
    for t in order {
        let mut local: Vec<(&str, &str, f64, usize, usize)> = Vec::new();
        let n = t.chars().count();
        for (k, (at, _)) in t.char_indices().enumerate().skip(1) {
            let (l, r) = t.split_at(at);
            if id.contains_key(l) && id.contains_key(r) {
                local.push((l, r, score[t], k, n - k));
            }
        }
        local.sort_by_key(|m| (id[m.0], id[m.1]));
        merges.extend(local);
    }
    // Python's sorted(..., reverse=True) is stable: equal keys keep their order
    merges.sort_by(|a, b| (b.2, b.3, b.4).partial_cmp(&(a.2, a.3, a.4)).unwrap_or(std::cmp::Ordering::Equal));
    merges.into_iter().map(|(l, r, ..)| (l.to_string(), r.to_string())).collect()
}

/// With `tokenizer.ggml.add_bos_token` true (or absent and `bos_default`), a
/// `TemplateProcessing` that prepends BOS when special tokens are requested (what llama.cpp
/// does, and HF's Llama `tokenizer.json`s); otherwise none.
fn post_processor_json(md: &Metadata, tokens: &[&str], bos_default: bool) -> Result<serde_json::Value> {
    let add_bos = match md.get("tokenizer.ggml.add_bos_token") {
        Some(Value::Bool(b)) => *b,
        _ => bos_default,
    };
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

    /// The arch-dependent names (llama.cpp `constants.py` / `tensor_mapping.py`): Gemma's
    /// `ffn_norm` is the pre-feed-forward norm, Llama's the post-attention one.
    #[test]
    fn gemma_and_phi3_names_map_to_hf() {
        let g = |arch, n| hf_name_for(arch, n).unwrap();
        for arch in [Arch::Gemma2, Arch::Gemma3] {
            assert_eq!(g(arch, "blk.1.attn_norm.weight"), "model.layers.1.input_layernorm.weight");
            assert_eq!(g(arch, "blk.1.post_attention_norm.weight"), "model.layers.1.post_attention_layernorm.weight");
            assert_eq!(g(arch, "blk.1.ffn_norm.weight"), "model.layers.1.pre_feedforward_layernorm.weight");
            assert_eq!(g(arch, "blk.1.post_ffw_norm.weight"), "model.layers.1.post_feedforward_layernorm.weight");
            assert_eq!(g(arch, "blk.1.attn_q_norm.weight"), "model.layers.1.self_attn.q_norm.weight");
        }
        assert_eq!(g(Arch::Phi3, "blk.0.attn_qkv.weight"), "model.layers.0.self_attn.qkv_proj.weight");
        assert_eq!(g(Arch::Phi3, "blk.0.ffn_up.weight"), "model.layers.0.mlp.gate_up_proj.weight");
        assert_eq!(g(Arch::Phi3, "blk.0.ffn_norm.weight"), "model.layers.0.post_attention_layernorm.weight");
        assert!(hf_name_for(Arch::Phi3, "blk.0.ffn_gate.weight").is_none());
        assert!(hf_name_for(Arch::Llama, "blk.0.post_ffw_norm.weight").is_none());
    }

    fn extras_of(arch: Arch, n_layers: usize, kv: &[(&str, Value)]) -> Result<ArchExtras> {
        let content = Content {
            magic: candle_core::quantized::gguf_file::VersionedMagic::GgufV3,
            metadata: kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        };
        let md = Metadata { md: &content.metadata, path: Path::new("x.gguf") };
        arch_extras(&md, &content, arch, n_layers, 4608, 32, 128, 10000.0)
    }

    /// llama.cpp's defaults when the keys are absent (`src/models/gemma2.cpp`: caps 50 / 30,
    /// window 4096, pattern 2) and its 27B rule for the query scale (46 layers: hidden / heads).
    #[test]
    fn gemma2_defaults_and_the_27b_query_scale() {
        let x = extras_of(Arch::Gemma2, 4, &[]).unwrap();
        assert_eq!((x.attn_logit_softcapping, x.final_logit_softcapping, x.sliding_window), (Some(50.0), Some(30.0), Some(4096)));
        assert_eq!((x.sliding_layers.clone(), x.query_pre_attn_scalar, x.hidden_act), (vec![true, false, true, false], Some(128.0), Activation::GeluTanh));
        assert_eq!(extras_of(Arch::Gemma2, 46, &[]).unwrap().query_pre_attn_scalar, Some(144.0));
        assert_eq!(extras_of(Arch::Gemma3, 62, &[("gemma3.attention.sliding_window", Value::U32(512))]).unwrap().query_pre_attn_scalar, Some(144.0));
        // Gemma 3: its window is required (llama.cpp has no default); a window of 0 makes every
        // layer global; its local RoPE base defaults to 10000
        let e = extras_of(Arch::Gemma3, 6, &[]).unwrap_err().to_string();
        assert!(e.contains("x.gguf") && e.contains("gemma3.attention.sliding_window"), "{e}");
        let x = extras_of(Arch::Gemma3, 6, &[("gemma3.attention.sliding_window", Value::U32(0))]).unwrap();
        assert!(x.sliding_window.is_none() && x.sliding_layers.is_empty() && x.rope_local_theta == Some(1e4));
        // caps and the linear factor must be positive, as on the HF path
        for (key, v) in [("gemma2.final_logit_softcapping", -5.0f32), ("gemma2.attn_logit_softcapping", 0.0)] {
            let e = extras_of(Arch::Gemma2, 2, &[(key, Value::F32(v))]).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("positive"), "{e}");
        }
        let bad_factor = [("gemma3.attention.sliding_window", Value::U32(512)), ("gemma3.rope.scaling.type", Value::String("linear".into())), ("gemma3.rope.scaling.factor", Value::F32(-2.0))];
        let e = extras_of(Arch::Gemma3, 6, &bad_factor).unwrap_err().to_string();
        assert!(e.contains("gemma3.rope.scaling.factor") && e.contains("positive"), "{e}");
        // Phi-3: a window of 0 is none; a set window covers every layer
        assert!(extras_of(Arch::Phi3, 2, &[("phi3.attention.sliding_window", Value::U32(0))]).unwrap().is_default());
        let x = extras_of(Arch::Phi3, 2, &[("phi3.attention.sliding_window", Value::U32(2047))]).unwrap();
        assert_eq!((x.sliding_window, x.sliding_layers), (Some(2047), vec![true, true]));
        let e = extras_of(Arch::Phi3, 2, &[("phi3.rope.dimension_count", Value::U32(64))]).unwrap_err().to_string();
        assert!(e.contains("x.gguf") && e.contains("partial rotary"), "{e}");
        let e = extras_of(Arch::Gemma2, 2, &[("gemma2.rope.scaling.type", Value::String("yarn".into()))]).unwrap_err().to_string();
        assert!(e.contains("yarn"), "{e}");
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
