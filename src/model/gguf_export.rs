//! Write a model as a GGUF file that llama.cpp (and [`crate::model::gguf`]) loads: llama.cpp's
//! architecture (`llama` for Llama and Mistral, `qwen2`), tensor names (`blk.N.attn_q.weight`, ...; the inverse of
//! [`super::gguf::hf_name`]), Q/K rows permuted for `llama` as `convert_hf_to_gguf.py` does
//! ([`super::gguf::permute`]), `{arch}.*` hyperparameter keys, the tokenizer
//! ([`super::gguf_vocab`]) and chat template. Through candle's writer
//! (`candle_core::quantized::gguf_file::write`, GGUF v2, 32-byte alignment) and quantizers
//! (`QTensor::quantize`).
//!
//! Weight types ([`GgufDtype`]): every 2-D weight in the chosen type (q8_0: blocks of 32 along
//! the input dimension; a weight whose row length is not a multiple of 32 stays f16), every 1-D
//! tensor (norms, biases) in f32, as llama.cpp's converter does. Atomic: the file is written
//! to a temporary sibling and renamed ([`crate::fsutil::write_atomic`]).

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};

use super::config::{Arch, ModelConfig};
use super::gguf::permute;
use super::gguf_vocab::tokenizer_metadata;
use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};

/// Weight types of a written GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufDtype {
    /// 32-bit float (`general.file_type` 0).
    F32,
    /// IEEE half (`general.file_type` 1).
    F16,
    /// llama.cpp's 8-bit blocks (34 bytes per 32 weights; `general.file_type` 7).
    Q8_0,
}

impl GgufDtype {
    fn ggml(self) -> GgmlDType {
        match self {
            GgufDtype::F32 => GgmlDType::F32,
            GgufDtype::F16 => GgmlDType::F16,
            GgufDtype::Q8_0 => GgmlDType::Q8_0,
        }
    }

    /// llama.cpp's `llama_ftype` of a file whose weights are mostly of this type.
    fn file_type(self) -> u32 {
        match self {
            GgufDtype::F32 => 0,
            GgufDtype::F16 => 1,
            GgufDtype::Q8_0 => 7,
        }
    }
}

/// llama.cpp's name of an HF tensor name (`model.layers.3.self_attn.q_proj.weight` ->
/// `blk.3.attn_q.weight`); `None` for names llama.cpp has no tensor for.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let g = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// The `general.*` and `{arch}.*` metadata of `config` (llama.cpp's keys).
fn model_metadata(config: &ModelConfig, name: &str, dtype: GgufDtype) -> Vec<(String, Value)> {
    // llama.cpp converts Mistral (v0.1-style) as `llama`
    let arch = super::gguf::gguf_arch_name(config.arch);
    let k = |s: &str| format!("{arch}.{s}");
    let u = |x: usize| Value::U32(x as u32);
    let mut md = vec![
        ("general.architecture".to_string(), Value::String(arch.into())),
        ("general.name".to_string(), Value::String(name.into())),
        ("general.file_type".to_string(), Value::U32(dtype.file_type())),
        ("general.quantization_version".to_string(), Value::U32(2)),
        (k("context_length"), u(config.max_position_embeddings)),
        (k("embedding_length"), u(config.hidden_size)),
        (k("block_count"), u(config.num_hidden_layers)),
        (k("feed_forward_length"), u(config.intermediate_size)),
        (k("attention.head_count"), u(config.num_attention_heads)),
        (k("attention.head_count_kv"), u(config.num_key_value_heads)),
        (k("attention.key_length"), u(config.head_dim)),
        (k("attention.value_length"), u(config.head_dim)),
        (k("rope.dimension_count"), u(config.head_dim)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(config.rms_norm_eps as f32)),
        (k("rope.freq_base"), Value::F32(config.rope_theta as f32)),
        (k("vocab_size"), u(config.vocab_size)),
    ];
    md.retain(|(key, _)| dtype != GgufDtype::F32 || key != "general.quantization_version");
    md
}

/// One tensor in its GGUF form: renamed, Q/K permuted for `llama`, quantized to its type.
fn gguf_tensor(config: &ModelConfig, hf: &str, t: &Tensor, dtype: GgufDtype) -> Result<(String, QTensor)> {
    let name = gguf_name(hf).ok_or_else(|| Error::Msg(format!("GGUF export: no llama.cpp tensor for {hf}")))?;
    let mut t = t.to_dtype(DType::F32)?.contiguous()?;
    if config.arch != Arch::Qwen2 && hf.ends_with(".weight") {
        if hf.ends_with("q_proj.weight") {
            t = permute(&t, config.num_attention_heads)?;
        } else if hf.ends_with("k_proj.weight") {
            t = permute(&t, config.num_key_value_heads)?;
        }
    }
    let ty = match (t.rank(), dtype) {
        (1, _) => GgmlDType::F32,
        (_, GgufDtype::Q8_0) if t.dims()[t.rank() - 1] % GgmlDType::Q8_0.block_size() != 0 => GgmlDType::F16,
        (_, d) => d.ggml(),
    };
    let q = QTensor::quantize(&t, ty).map_err(|e| Error::Msg(format!("GGUF export: quantizing {hf} to {ty:?}: {e}")))?;
    Ok((name, q))
}

/// Write `config`, `tensors` (HF names, any float dtype) and `tokenizer` as the GGUF file
/// `path`, weights in `dtype` (see the module doc), `general.name` = `name`. With
/// `config.tie_word_embeddings`, `lm_head.weight` is not written (llama.cpp ties
/// `token_embd`).
///
/// Errors: a tensor llama.cpp has no name for, a tokenizer it cannot represent
/// ([`tokenizer_metadata`]), I/O (naming `path`; nothing is left at `path` on error), a Gemma
/// model (not written yet: write an HF folder).
pub fn write_gguf(path: &Path, config: &ModelConfig, tensors: &BTreeMap<String, Tensor>, tokenizer: &Tokenizer, dtype: GgufDtype, name: &str) -> Result<()> {
    if config.arch.is_gemma() {
        return Err(Error::input(path, None, format!("GGUF export of {} is not supported yet; merge to an HF folder instead (--out DIR)", crate::model::hf_config::model_type(config.arch))));
    }
    let mut md = model_metadata(config, name, dtype);
    md.extend(tokenizer_metadata(tokenizer, config)?);
    let mut qs = Vec::with_capacity(tensors.len());
    for (hf, t) in tensors {
        if config.tie_word_embeddings && hf == "lm_head.weight" {
            continue;
        }
        qs.push(gguf_tensor(config, hf, t, dtype)?);
    }
    // llama.cpp's order: token_embd, then the blocks by index, then output_norm and output
    qs.sort_by_key(|(n, _)| order_key(n));
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qs.iter().map(|(n, q)| (n.as_str(), q)).collect();
    let mut buf = Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &md_refs, &t_refs).map_err(|e| Error::Msg(format!("GGUF export: writing {}: {e}", path.display())))?;
    crate::fsutil::write_atomic(path, buf.get_ref()).map_err(|e| Error::input(path, None, format!("cannot write: {e}")))
}

/// `(group, layer, name)`: embeddings first, blocks in layer order, the head last.
fn order_key(name: &str) -> (u8, usize, String) {
    match name.strip_prefix("blk.").and_then(|r| r.split_once('.')) {
        Some((l, _)) => (1, l.parse().unwrap_or(usize::MAX), name.to_string()),
        None if name.starts_with("token_embd") => (0, 0, name.to_string()),
        None => (2, 0, name.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // gguf_name inverts gguf::hf_name on every name the reader knows.
    #[test]
    fn names_invert_the_reader() {
        for g in ["token_embd.weight", "output_norm.weight", "output.weight", "blk.12.attn_q.weight", "blk.0.attn_k.bias", "blk.3.ffn_down.weight", "blk.3.attn_norm.weight", "blk.3.ffn_norm.weight", "blk.7.attn_output.weight", "blk.1.ffn_gate.weight", "blk.1.ffn_up.weight", "blk.2.attn_v.bias"] {
            let hf = super::super::gguf::hf_name(g).unwrap();
            assert_eq!(gguf_name(&hf).as_deref(), Some(g), "{hf}");
        }
        assert!(gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq").is_none());
    }
}
