//! The resolved model configuration: no `Option`s left (candle's two-stage config habit).
//!
//! Built from an HF `config.json` (`model::hf_config`) or from GGUF metadata (`model::gguf`).

use serde::{Deserialize, Serialize};

/// Which member of the Llama family; decides the HF `architectures`/`model_type` written back on
/// merge, whether q/k/v carry biases (Qwen2), whether queries and keys are RMS-normalised per
/// head (Qwen3, Gemma 3), whether the projections are fused (Phi-3) and whether the layers are
/// Gemma's (sandwich norms, `1 + w` RMSNorm weights, embeddings scaled by `sqrt(D)`).
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
    /// Gemma 2: Gemma layers ([`Arch::is_gemma`]), GeGLU (tanh GELU), `query_pre_attn_scalar`,
    /// soft-capped attention scores and logits, sliding-window layers interleaved with global
    /// ones ([`ArchExtras`]). HF `modeling_gemma2.py`.
    Gemma2,
    /// Gemma 3 (text, `gemma3_text`): Gemma 2's layers without soft-capping by default, plus
    /// per-head q/k RMSNorm (`1 + w`) and a second RoPE base for the sliding layers
    /// (`rope_local_base_freq`). HF `modeling_gemma3.py`, `Gemma3ForCausalLM`.
    Gemma3,
}

impl Arch {
    /// Queries and keys go through a per-head RMSNorm before RoPE (Qwen3's `q_norm`/`k_norm`).
    pub fn has_qk_norm(self) -> bool {
        matches!(self, Arch::Qwen3 | Arch::Gemma3)
    }

    /// Gemma's layers (HF `Gemma2DecoderLayer` / `Gemma3DecoderLayer`): RMSNorm scales by
    /// `1 + w` (the stored weight is the offset from one, computed in f32), four norms a layer
    /// (`input_layernorm` before attention, `post_attention_layernorm` on its output,
    /// `pre_feedforward_layernorm` / `post_feedforward_layernorm` around the MLP), and the
    /// embeddings multiplied by `sqrt(hidden_size)` rounded to f32 (HF: to the embeddings' dtype, f32 here;
    /// in f64 HF Gemma 2 keeps it unrounded, a difference of under 1e-7 relative).
    pub fn is_gemma(self) -> bool {
        matches!(self, Arch::Gemma2 | Arch::Gemma3)
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

/// The activation of the MLP's gate: `down(act(gate(x)) * up(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `silu(z) = z sigmoid(z)`: SwiGLU (HF `hidden_act = "silu"`).
    #[default]
    Silu,
    /// The tanh approximation of GELU, `0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))`:
    /// GeGLU (HF `hidden_activation = "gelu_pytorch_tanh"`, Gemma).
    GeluTanh,
}

/// The settings only some families have; `Default` is none of them (Llama behaviour).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ArchExtras {
    /// The MLP gate's activation.
    pub hidden_act: Activation,
    /// Gemma: queries are scaled by `query_pre_attn_scalar^-1/2` instead of `head_dim^-1/2`.
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 2: attention scores `s` (after scaling, before the mask) become
    /// `c tanh(s / c)`.
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma 2: logits `z` become `c tanh(z / c)`.
    pub final_logit_softcapping: Option<f64>,
    /// Sliding-window attention: in a sliding layer a query at position `i` attends the keys at
    /// positions `j` with `i - W < j <= i` (transformers' `sliding_window_overlay`:
    /// `kv_idx > q_idx - W`).
    pub sliding_window: Option<usize>,
    /// Per layer, whether it is a sliding-window layer (HF `layer_types`, `sliding_attention`);
    /// empty: every layer attends globally.
    pub sliding_layers: Vec<bool>,
    /// Gemma 3: the RoPE base of the sliding layers (`rope_local_base_freq`, transformers 5:
    /// `rope_parameters.sliding_attention.rope_theta`); `rope_theta` is the global layers'.
    pub rope_local_theta: Option<f64>,
    /// Gemma 3 (4B and up): linear RoPE scaling of the global layers, positions divided by
    /// `factor` (`rope_scaling = {"rope_type": "linear", "factor": 8.0}`).
    pub rope_linear_factor: Option<f64>,
}

impl ArchExtras {
    /// True when nothing differs from Llama (so a Llama config serialises as before).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The window of layer `i`: `Some(W)` for a sliding layer, `None` for a global one.
    pub fn window_of(&self, layer: usize) -> Option<usize> {
        self.sliding_window.filter(|_| self.sliding_layers.get(layer).copied().unwrap_or(false))
    }
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
    /// Gemma's and sliding-window settings ([`ArchExtras`]); default for the Llama family.
    #[serde(default, skip_serializing_if = "ArchExtras::is_default")]
    pub extras: ArchExtras,
}
