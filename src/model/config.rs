//! The resolved model configuration: no `Option`s left (candle's two-stage config habit).
//!
//! Built from an HF `config.json` (`model::hf_config`) or from GGUF metadata (`model::gguf`).

use serde::{Deserialize, Serialize};

/// Which member of the Llama family; decides the HF `architectures`/`model_type` written back on
/// merge, whether q/k/v carry biases (Qwen2), whether queries and keys are RMS-normalised per
/// head (Qwen3) and whether the projections are fused (Phi-3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// Llama 2/3, SmolLM/SmolLM2, TinyLlama.
    Llama,
    /// Mistral (full attention only; sliding window ignored).
    Mistral,
    /// Qwen2 / Qwen2.5: biases on q, k, v.
    Qwen2,
    /// Qwen3 (dense): per-head RMSNorm on queries and keys (`self_attn.q_norm` / `k_norm`,
    /// weight `(hd,)`) after the projections and before RoPE; biases only with
    /// `attention_bias` (on q, k, v and o). HF `modeling_qwen3.py`, `Qwen3Attention`.
    Qwen3,
    /// Phi-3 (mini/medium, 4k/128k-free): q/k/v stored as one `self_attn.qkv_proj`
    /// `((H + 2 Hkv) hd, D)` and gate/up as one `mlp.gate_up_proj` `(2I, D)`, no biases, untied
    /// head. HF `modeling_phi3.py`, `Phi3Attention`, `Phi3MLP`.
    Phi3,
}

impl Arch {
    /// Queries and keys go through a per-head RMSNorm before RoPE (Qwen3's `q_norm`/`k_norm`).
    pub fn has_qk_norm(self) -> bool {
        self == Arch::Qwen3
    }

    /// q/k/v and gate/up are each one fused projection (Phi-3's `qkv_proj`, `gate_up_proj`;
    /// [`crate::model::proj`]).
    pub fn has_fused_projections(self) -> bool {
        self == Arch::Phi3
    }
}

/// Llama-3 style RoPE frequency scaling (`rope_scaling.rope_type = "llama3"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// The resolved configuration of a decoder-only Llama-family transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    /// D, the residual width.
    pub hidden_size: usize,
    /// The MLP width.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Grouped-query attention: number of key/value heads.
    pub num_key_value_heads: usize,
    /// Per-head width; `hidden_size / num_attention_heads` unless config.json says otherwise.
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2; Qwen3 and Llama with `attention_bias`, then o too).
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}
