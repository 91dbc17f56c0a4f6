//! The trainable Llama-family decoder (Llama 2/3, SmolLM/SmolLM2, TinyLlama, Mistral, Qwen2,
//! Qwen3, Phi-3).
//!
//! See ["LLaMA: Open and Efficient Foundation Language Models"](https://arxiv.org/abs/2302.13971)
//! and the reference code, HF transformers `models/llama/modeling_llama.py` (Qwen2:
//! `models/qwen2/modeling_qwen2.py`, the same network with biases on q, k, v; Qwen3:
//! `models/qwen3/modeling_qwen3.py`, with a per-head RMSNorm on q and k before RoPE; Phi-3:
//! `models/phi3/modeling_phi3.py`, q/k/v and gate/up each one fused matrix, [`crate::model::proj`]).
//!
//! Built bottom-up: [`Attention`], [`Mlp`], [`Block`], [`Model`]. Every projection is a
//! [`Linear`] named by its full HF path (`model.layers.{i}.self_attn.q_proj`, ...,
//! `lm_head`), so adapters attach to it and `use_adapters = false` gives the reference model.
//! Unlike candle-transformers' inference models, every op here has a backward pass (see
//! [`crate::model::ops`]) and the logits of every position are returned.
//!
//! Dimension legend:
//! - N batch rows, T positions (queries), Tk key positions (`past + T` with a KV cache),
//! - D hidden width (`hidden_size`), I MLP width (`intermediate_size`),
//! - H attention heads, Hkv key/value heads (grouped-query attention, `H % Hkv == 0`),
//!   R = H / Hkv query heads per kv head, hd head dim, V vocabulary size.
//!
//! One block (pre-norm residual):
//! `h = x + Attn(RMSNorm(x))`, `out = h + Mlp(RMSNorm(h))`,
//! `Attn(x) = softmax(q k^T / sqrt(hd) + bias) v W_o^T` with RoPE on q and k (Qwen3:
//! `q = RoPE(RMSNorm_hd(x W_q^T))` per head, the same for k),
//! `Mlp(x) = (silu(x W_gate^T) * (x W_up^T)) W_down^T` (SwiGLU, Shazeer 2020).
//!
//! Works in the dtype of the loaded weights (F32 or F64); positions are 0-based per row, so
//! with right padding a row's real tokens get the same positions as when run alone.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::attention::{attention, attention_softcapped};
use crate::model::swiglu_down::{packed_down, swiglu_down};
use crate::model::config::{Activation, Arch, ModelConfig};
use crate::model::linear::Linear;
use crate::model::proj::{load_linear, GateUpProj, QkvProj};
use crate::model::heads::{from_heads, from_heads_composed, to_heads, to_heads_composed};
use crate::model::ops::{attention_bias_windowed, from_rows, fused_layer_ops, glu, rms_norm, rms_norm_composed, rope_inv_freq, rope_tables, softcap, to_rows};

/// Multi-head causal self-attention with grouped-query heads and RoPE
/// (HF `LlamaAttention` / `Qwen2Attention` / `Qwen3Attention` / `Phi3Attention`).
#[derive(Debug, Clone)]
pub struct Attention {
    /// q `(H*hd, D)`, k and v `(Hkv*hd, D)`, biases when `attention_bias`; Phi-3: one fused
    /// `qkv_proj`.
    pub qkv: QkvProj,
    /// `(D, H*hd)`; bias only for a Llama/Mistral/Qwen3 with `attention_bias` (HF Llama and
    /// Qwen3 put `bias=config.attention_bias` on all four, Qwen2 only on q, k, v).
    pub o_proj: Linear,
    /// Qwen3's `{prefix}.q_norm.weight` `(hd,)`: RMSNorm of each query head (over its `hd`
    /// features) after `q_proj`, before RoPE; `None` for the other families.
    pub q_norm: Option<Tensor>,
    /// Qwen3's `{prefix}.k_norm.weight` `(hd,)`, the same for each key head.
    pub k_norm: Option<Tensor>,
    /// The multipliers the q/k norms apply: the weights, or `1 + w` for Gemma 3 ([`norm_scale`]).
    q_scale: Option<Tensor>,
    k_scale: Option<Tensor>,
    /// The q/k norms' epsilon (`rms_norm_eps`).
    eps: f64,
    /// The queries' scale: `head_dim^-1/2`, or Gemma's `query_pre_attn_scalar^-1/2`.
    query_scale: f64,
    /// Gemma 2's `attn_logit_softcapping` ([`attention_softcapped`]).
    softcap: Option<f64>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// Loads `{prefix}.{q,k,v,o}_proj` from HF names (`prefix` = `model.layers.{i}.self_attn`;
    /// Phi-3: `{prefix}.{qkv,o}_proj`), and `{prefix}.{q,k}_norm.weight` `(hd,)` for Qwen3.
    pub fn load(vb: &VarBuilder, prefix: &str, cfg: &ModelConfig) -> Result<Self> {
        let (d, h, hkv, hd) = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let qkv_bias = cfg.attention_bias;
        let o_bias = cfg.attention_bias && cfg.arch != Arch::Qwen2;
        let norm = |which: &str| -> Result<Option<Tensor>> {
            if cfg.arch.has_qk_norm() {
                Ok(Some(vb.get(hd, &format!("{prefix}.{which}.weight"))?))
            } else {
                Ok(None)
            }
        };
        let (q_norm, k_norm) = (norm("q_norm")?, norm("k_norm")?);
        let gemma = cfg.arch.is_gemma();
        let scale = |w: &Option<Tensor>| w.as_ref().map(|w| norm_scale(w, gemma)).transpose();
        Ok(Self {
            q_scale: scale(&q_norm)?,
            k_scale: scale(&k_norm)?,
            q_norm,
            k_norm,
            eps: cfg.rms_norm_eps,
            query_scale: 1.0 / cfg.extras.query_pre_attn_scalar.unwrap_or(hd as f64).sqrt(),
            softcap: cfg.extras.attn_logit_softcapping,
            qkv: QkvProj::load(vb, prefix, (h * hd, hkv * hd, d), qkv_bias, cfg.arch.has_fused_projections())?,
            o_proj: load_linear(vb, &format!("{prefix}.o_proj"), d, h * hd, o_bias)?,
            n_heads: h,
            n_kv_heads: hkv,
            head_dim: hd,
        })
    }

    /// `x` `(N, T, D)` -> `(N, T, D)`.
    ///
    /// `cos`/`sin` `(T, hd)` for the positions of the T queries; `bias` the additive mask
    /// `(N or 1, 1, T, Tk)` ([`crate::model::ops::attention_bias`]), `None` when nothing is masked (one query with
    /// a cache). `kv`: this layer's cache slot; the new keys/values `(N, Hkv, T, hd)` are appended
    /// to it along the position axis and attention runs over all `Tk` cached positions.
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: Option<&Tensor>,
        kv: Option<&mut Option<(Tensor, Tensor)>>,
        use_adapters: bool,
    ) -> Result<Tensor> {
        let (n, t, _) = x.dims3()?;
        let (h, hkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let r = h / hkv;
        // One flattening for the three projections: (N, T, D) -> (N*T, D)
        let x2 = x.reshape((n * t, x.dim(2)?))?;
        // (N*T, H*hd) -> (N, H, T, hd) with RoPE, one fused op each ([`to_heads`]). Scaling q
        // by 1/sqrt(hd) (Gemma: 1/sqrt(query_pre_attn_scalar)) there is cheaper than scaling
        // the scores.
        // The composed path when the fused ops are off (`ops::set_fused_layer_ops`).
        let heads = if fused_layer_ops() { to_heads } else { to_heads_composed };
        let (q, k, v) = self.qkv.forward(&x2, h * hd, hkv * hd, use_adapters)?;
        let q = heads(&self.head_norm(q, self.q_scale.as_ref(), h)?, n, h, Some((cos, sin)), self.query_scale)?;
        // (N, Hkv, T, hd)
        let k = heads(&self.head_norm(k, self.k_scale.as_ref(), hkv)?, n, hkv, Some((cos, sin)), 1.0)?;
        let v = heads(&v, n, hkv, None, 1.0)?;
        let (k, v) = match kv {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    // (N, Hkv, past + T, hd)
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        // Grouped-query attention without materialising repeat_kv: query head h uses kv head
        // h / R (HF `repeat_kv` = repeat_interleave), so the R query heads of a group are
        // stacked along the row axis.
        // (N, H, T, hd) -> (N, Hkv, R*T, hd)
        let q = q.reshape((n, hkv, r * t, hd))?;
        // softmax(q k^T + bias) v, the probabilities recomputed in the backward (Gemma 2's
        // soft-capped scores: composed): (N, Hkv, R*T, hd) -> (N, H, T, hd) -> (N*T, H*hd)
        let y = match self.softcap {
            None => attention(&q, &k, &v, bias, t)?,
            Some(cap) => attention_softcapped(&q, &k, &v, bias, t, cap)?,
        };
        let y = y.reshape((n, h, t, hd))?;
        let y = if fused_layer_ops() { from_heads(&y)? } else { from_heads_composed(&y)? };
        let o = self.o_proj.forward(&y, use_adapters)?; // (N*T, D)
        o.reshape((n, t, o.dim(1)?))
    }

    /// Qwen3's (Gemma 3's) per-head RMSNorm of projected rows `x (N*T, heads*hd)` with `weight (hd,)`
    /// (HF `Qwen3Attention.forward`: `q_norm(q_proj(x).view(..., -1, hd))`): each head's `hd`
    /// features normalised on their own, `(N*T, heads*hd)` out; `x` unchanged without a weight.
    /// The custom op with its backward ([`rms_norm`]), or its composed twin
    /// ([`rms_norm_composed`]) when the fused layer ops are off.
    fn head_norm(&self, x: Tensor, weight: Option<&Tensor>, heads: usize) -> Result<Tensor> {
        let Some(w) = weight else { return Ok(x) };
        let (rows, width) = x.dims2()?;
        // (N*T, heads*hd) -> (N*T, heads, hd): the projection's rows, no copy
        let xh = x.reshape((rows, heads, self.head_dim))?;
        let y = if fused_layer_ops() { rms_norm(&xh, w, self.eps)? } else { rms_norm_composed(&xh, w, self.eps)? };
        y.reshape((rows, width))
    }
}

/// The gated feed-forward network, `down(act(gate(x)) * up(x))`: SwiGLU (HF `LlamaMLP`,
/// `Phi3MLP`) or GeGLU with the tanh GELU (HF `Gemma2MLP`, `Gemma3MLP`).
#[derive(Debug, Clone)]
pub struct Mlp {
    /// gate and up, each `(I, D)`; Phi-3: one fused `gate_up_proj` `(2I, D)`.
    pub gate_up: GateUpProj,
    /// `(D, I)`.
    pub down_proj: Linear,
    /// The gate's activation (`hidden_act` / `hidden_activation`).
    act: Activation,
}

impl Mlp {
    /// Loads `{prefix}.{gate,up,down}_proj` (`prefix` = `model.layers.{i}.mlp`; Phi-3:
    /// `{prefix}.{gate_up,down}_proj`).
    pub fn load(vb: &VarBuilder, prefix: &str, cfg: &ModelConfig) -> Result<Self> {
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_up: GateUpProj::load(vb, prefix, i, d, cfg.arch.has_fused_projections())?,
            down_proj: load_linear(vb, &format!("{prefix}.down_proj"), d, i, false)?,
            act: cfg.extras.hidden_act,
        })
    }

    /// `x` `(N, T, D)` -> `(N, T, D)`; `silu(z) = z * sigmoid(z)` (or the tanh GELU), fused
    /// with the product ([`glu`]).
    pub fn forward(&self, x: &Tensor, use_adapters: bool) -> Result<Tensor> {
        if !fused_layer_ops() {
            // the composed path (ops::set_fused_layer_ops): (N, T, I) activations
            let (g, u) = self.gate_up.forward(x, use_adapters)?;
            return self.down_proj.forward(&glu(&g, &u, self.act, true)?, use_adapters);
        }
        // One flattening for the three projections: (..., D) -> (rows, D), and one back.
        let (x2, dims) = to_rows(x)?;
        let (g, u) = self.gate_up.forward(&x2, use_adapters)?; // (rows, I) each
        let y = match packed_down(&self.down_proj, use_adapters) {
            // bf16: SwiGLU and the frozen down projection in one op, its output not kept
            Some(p) if self.act == Activation::Silu && g.dtype() == DType::F32 && crate::device::cpu_kernels(&g) => swiglu_down(&g, &u, &self.down_proj.weight, p)?,
            _ => self.down_proj.forward(&glu(&g, &u, self.act, false)?, use_adapters)?,
        };
        from_rows(&y, &dims) // (rows, D) -> (..., D)
    }
}

/// The multiplier an RMSNorm weight `w` stands for: `w` itself, or `1 + w` for Gemma (HF
/// `Gemma3RMSNorm`: `x_hat * (1.0 + weight.float())`, the same sum in f32).
fn norm_scale(w: &Tensor, gemma: bool) -> Result<Tensor> {
    if gemma {
        w.affine(1.0, 1.0)
    } else {
        Ok(w.clone())
    }
}

/// One decoder layer: pre-norm (HF `LlamaDecoderLayer`) or Gemma's sandwich of four norms
/// (HF `Gemma2DecoderLayer`, `Gemma3DecoderLayer`).
#[derive(Debug, Clone)]
pub struct Block {
    /// `model.layers.{i}.input_layernorm.weight`, `(D,)`.
    pub input_layernorm: Tensor,
    pub self_attn: Attention,
    /// `model.layers.{i}.post_attention_layernorm.weight`, `(D,)`: before the MLP (Llama), or on
    /// the attention's output (Gemma).
    pub post_attention_layernorm: Tensor,
    /// Gemma's `model.layers.{i}.pre_feedforward_layernorm.weight` and
    /// `post_feedforward_layernorm.weight`, `(D,)` each, around the MLP; `None` otherwise.
    pub feedforward_layernorms: Option<(Tensor, Tensor)>,
    pub mlp: Mlp,
    /// This layer's index `i`.
    pub index: usize,
    /// The multipliers of the norms, in the order input, post-attention, then Gemma's pre- and
    /// post-feedforward ([`norm_scale`]).
    scales: Vec<Tensor>,
    eps: f64,
}

impl Block {
    /// Loads `model.layers.{index}.*`.
    pub fn load(vb: &VarBuilder, index: usize, cfg: &ModelConfig) -> Result<Self> {
        let p = format!("model.layers.{index}");
        let d = cfg.hidden_size;
        let gemma = cfg.arch.is_gemma();
        let input_layernorm = vb.get(d, &format!("{p}.input_layernorm.weight"))?;
        let post_attention_layernorm = vb.get(d, &format!("{p}.post_attention_layernorm.weight"))?;
        let feedforward_layernorms = if gemma {
            Some((vb.get(d, &format!("{p}.pre_feedforward_layernorm.weight"))?, vb.get(d, &format!("{p}.post_feedforward_layernorm.weight"))?))
        } else {
            None
        };
        let mut scales = vec![norm_scale(&input_layernorm, gemma)?, norm_scale(&post_attention_layernorm, gemma)?];
        if let Some((pre, post)) = &feedforward_layernorms {
            scales.extend([norm_scale(pre, gemma)?, norm_scale(post, gemma)?]);
        }
        Ok(Self {
            input_layernorm,
            self_attn: Attention::load(vb, &format!("{p}.self_attn"), cfg)?,
            post_attention_layernorm,
            feedforward_layernorms,
            mlp: Mlp::load(vb, &format!("{p}.mlp"), cfg)?,
            index,
            scales,
            eps: cfg.rms_norm_eps,
        })
    }

    /// `x` `(N, T, D)` -> `(N, T, D)`: `h = x + Attn(RMSNorm(x))`, `h + Mlp(RMSNorm(h))`; Gemma:
    /// `h = x + RMSNorm(Attn(RMSNorm(x)))`, `h + RMSNorm(Mlp(RMSNorm(h)))`.
    /// Arguments as in [`Attention::forward`].
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: Option<&Tensor>,
        kv: Option<&mut Option<(Tensor, Tensor)>>,
        use_adapters: bool,
    ) -> Result<Tensor> {
        let norm = |x: &Tensor, i: usize| rms_norm(x, &self.scales[i], self.eps);
        let a = norm(x, 0)?;
        let attn = self.self_attn.forward(&a, cos, sin, bias, kv, use_adapters)?;
        if self.feedforward_layernorms.is_none() {
            let h = (x + attn)?;
            let m = norm(&h, 1)?;
            return &h + self.mlp.forward(&m, use_adapters)?;
        }
        let h = (x + norm(&attn, 1)?)?;
        let m = self.mlp.forward(&norm(&h, 2)?, use_adapters)?;
        &h + norm(&m, 3)?
    }
}

/// The keys and values of every layer for the positions generated so far.
///
/// Layer `i` holds `(k, v)`, each `(N, Hkv, past, hd)`, keys already rotated.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// An empty cache for a model of `cfg.num_hidden_layers` layers.
    pub fn new(cfg: &ModelConfig) -> Self {
        Self { layers: vec![None; cfg.num_hidden_layers] }
    }

    /// Number of cached positions (`past`); the next token gets this position.
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dims()[2],
            _ => 0,
        }
    }

    /// True when no position is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every cached position.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
    }
}

/// The decoder-only language model (HF `LlamaForCausalLM` / `Qwen2ForCausalLM` /
/// `Qwen3ForCausalLM`).
#[derive(Debug, Clone)]
pub struct Model {
    cfg: ModelConfig,
    /// `model.embed_tokens.weight`, `(V, D)`.
    pub embed_tokens: Tensor,
    pub layers: Vec<Block>,
    /// `model.norm.weight`, `(D,)`.
    pub norm: Tensor,
    /// `(V, D)`; with `tie_word_embeddings` its weight is the embedding tensor itself.
    pub lm_head: Linear,
    /// RoPE inverse frequencies, `(hd/2,)` (of the global layers).
    inv_freq: Vec<f64>,
    /// Gemma 3's sliding layers' inverse frequencies (`rope_local_base_freq`).
    inv_freq_local: Option<Vec<f64>>,
    /// The final norm's multiplier ([`norm_scale`]).
    norm_scale: Tensor,
}

impl Model {
    /// Builds the model from HF tensor names (`model.embed_tokens.weight`,
    /// `model.layers.{i}.self_attn.q_proj.weight`, ..., `model.norm.weight`, `lm_head.weight`
    /// unless tied) in the VarBuilder's dtype and device.
    ///
    /// Errors: a missing tensor or a tensor of the wrong shape (named by the VarBuilder), or an
    /// inconsistent config (heads not divisible by kv heads, odd head dim, zero sizes).
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        check_config(cfg)?;
        let (v, d) = (cfg.vocab_size, cfg.hidden_size);
        let embed_tokens = vb.get((v, d), "model.embed_tokens.weight")?;
        let layers = (0..cfg.num_hidden_layers).map(|i| Block::load(&vb, i, cfg)).collect::<Result<Vec<_>>>()?;
        let norm = vb.get(d, "model.norm.weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new("lm_head", embed_tokens.clone(), None)
        } else {
            load_linear(&vb, "lm_head", v, d, false)?
        };
        let hf_f32 = embed_tokens.dtype() != DType::F64;
        let mut inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling.as_ref(), hf_f32);
        if let Some(f) = cfg.extras.rope_linear_factor {
            // HF `_compute_linear_scaling_rope_parameters`: inv_freq / factor
            inv_freq.iter_mut().for_each(|x| *x = if hf_f32 { (*x as f32 / f as f32) as f64 } else { *x / f });
        }
        let inv_freq_local = cfg.extras.rope_local_theta.map(|theta| rope_inv_freq(cfg.head_dim, theta, None, hf_f32));
        let norm_scale = norm_scale(&norm, cfg.arch.is_gemma())?;
        Ok(Self { cfg: cfg.clone(), embed_tokens, layers, norm, lm_head, inv_freq, inv_freq_local, norm_scale })
    }

    /// Whether layer `i` is a sliding-window layer (HF `layer_types[i] = "sliding_attention"`):
    /// its attention window and, for Gemma 3, its RoPE base.
    pub fn is_sliding(&self, layer: usize) -> bool {
        self.cfg.extras.sliding_layers.get(layer).copied().unwrap_or(false)
    }

    /// The attention window of the sliding (`true`) or global (`false`) layers.
    pub fn window_for(&self, sliding: bool) -> Option<usize> {
        self.cfg.extras.sliding_window.filter(|_| sliding)
    }

    /// The RoPE inverse frequencies of the sliding (`true`) or global (`false`) layers.
    fn inv_freq_for(&self, sliding: bool) -> &[f64] {
        match (&self.inv_freq_local, sliding) {
            (Some(local), true) => local,
            _ => &self.inv_freq,
        }
    }

    /// `make(sliding)` once for each kind of layer the model has (global, sliding), indexed by
    /// `sliding as usize`: the per-kind RoPE tables and attention biases of one forward.
    pub(crate) fn per_layer_kind<T>(&self, mut make: impl FnMut(bool) -> Result<T>) -> Result<[Option<T>; 2]> {
        let mut out = [None, None];
        for i in 0..self.layers.len() {
            let k = self.is_sliding(i);
            if out[k as usize].is_none() {
                out[k as usize] = Some(make(k)?);
            }
        }
        Ok(out)
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The weights' dtype (F32 or F64).
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// The weights' device.
    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// Number of stored parameters (the elements of [`Model::tensors`]; a tied head counted once).
    pub fn num_parameters(&self) -> usize {
        self.tensors().iter().map(|(_, t)| t.elem_count()).sum()
    }

    /// The RoPE `cos`/`sin` tables `(len, hd)` of positions `start..start+len` for this model's
    /// global layers (its head dim, theta and scaling), in the weights' dtype ([`rope_tables`]).
    pub fn rope_tables_at(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        self.rope_tables_for(false, start, len)
    }

    /// [`Model::rope_tables_at`] of the sliding (`true`) or global (`false`) layers (Gemma 3's
    /// sliding layers have their own base).
    pub fn rope_tables_for(&self, sliding: bool, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        rope_tables(self.inv_freq_for(sliding), start, len, self.dtype(), self.device())
    }

    /// The final RMSNorm (`model.norm`) of `x (..., D)`.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.norm_scale, self.cfg.rms_norm_eps)
    }

    /// `(N, T)` token ids -> `(N, T, D)` embeddings; Gemma's scaled by `sqrt(hidden_size)`
    /// rounded to f32 (HF `Gemma3TextScaledWordEmbedding`: `torch.tensor(hidden_size**0.5)`, a
    /// float32 scalar, times the embedding rows).
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (n, t) = input_ids.dims2()?;
        let ids = input_ids.flatten_all()?;
        let x = self.embed_tokens.index_select(&ids, 0)?.reshape((n, t, self.cfg.hidden_size))?;
        if self.cfg.arch.is_gemma() {
            x.affine((self.cfg.hidden_size as f64).sqrt() as f32 as f64, 0.0)
        } else {
            Ok(x)
        }
    }

    /// The final hidden states `(N, T, D)` (after `model.norm`) of `input_ids` `(N, T)` u32.
    ///
    /// `attention_mask` `(N, T)` u32, 1 = real token: keys at 0 positions are never attended.
    /// Positions are `0..T` in every row, so right padding leaves the real positions' outputs
    /// equal to those of the row run alone; padded positions give finite, meaningless values.
    pub fn forward_hidden(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, use_adapters: bool) -> Result<Tensor> {
        let (n, t) = input_ids.dims2()?;
        if let Some(m) = attention_mask {
            if m.dims() != [n, t] {
                candle_core::bail!("attention_mask shape {:?} differs from input_ids shape ({n}, {t})", m.dims());
            }
        }
        let (dtype, dev) = (self.dtype(), self.device());
        // per kind of layer (global, sliding): (cos, sin, bias)
        let inputs = self.per_layer_kind(|sliding| {
            let (cos, sin) = rope_tables(self.inv_freq_for(sliding), 0, t, dtype, dev)?;
            Ok((cos, sin, attention_bias_windowed(attention_mask, t, 0, self.window_for(sliding), dtype, dev)?))
        })?;
        let mut x = self.embed(input_ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let (cos, sin, bias) = inputs[self.is_sliding(i) as usize].as_ref().expect("made for every kind of layer");
            x = layer.forward(&x, cos, sin, Some(bias), None, use_adapters)?;
        }
        self.final_norm(&x)
    }

    /// Logits `(..., V)` of hidden states `(..., D)`: `hidden lm_head^T`; Gemma 2's soft-capped,
    /// `c tanh(z / c)` (`final_logit_softcapping`).
    pub fn lm_head(&self, hidden: &Tensor, use_adapters: bool) -> Result<Tensor> {
        let z = self.lm_head.forward(hidden, use_adapters)?;
        match self.cfg.extras.final_logit_softcapping {
            Some(cap) => softcap(&z, cap),
            None => Ok(z),
        }
    }

    /// Logits `(N, T, V)` of every position; arguments as in [`Model::forward_hidden`].
    /// Logit `[n, t]` scores the token at position `t + 1`.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, use_adapters: bool) -> Result<Tensor> {
        let hidden = self.forward_hidden(input_ids, attention_mask, use_adapters)?;
        self.lm_head(&hidden, use_adapters)
    }

    /// Incremental forward for generation: `input_ids` `(N, T_new)` (no padding; usually
    /// `N = 1`) at positions `past..past+T_new` with `past = cache.len()`; appends their keys and
    /// values to `cache` and returns the logits `(N, T_new, V)`.
    ///
    /// Errors: a cache made for a different number of layers, or a batch size that differs from
    /// the cached one.
    pub fn forward_with_cache(&self, input_ids: &Tensor, cache: &mut KvCache, use_adapters: bool) -> Result<Tensor> {
        let (_, t) = input_ids.dims2()?;
        if cache.layers.len() != self.layers.len() {
            candle_core::bail!("KvCache has {} layers, the model {}", cache.layers.len(), self.layers.len());
        }
        let past = cache.len();
        let (dtype, dev) = (self.dtype(), self.device());
        let inputs = self.per_layer_kind(|sliding| {
            let (cos, sin) = rope_tables(self.inv_freq_for(sliding), past, t, dtype, dev)?;
            // one new query sees every cached key (within its window): no mask needed
            let window = self.window_for(sliding);
            let masked = t > 1 || window.is_some_and(|w| past + t > w);
            let bias = if masked { Some(attention_bias_windowed(None, t, past, window, dtype, dev)?) } else { None };
            Ok((cos, sin, bias))
        })?;
        let mut x = self.embed(input_ids)?;
        for (i, (layer, slot)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            let (cos, sin, bias) = inputs[self.is_sliding(i) as usize].as_ref().expect("made for every kind of layer");
            x = layer.forward(&x, cos, sin, bias.as_ref(), Some(slot), use_adapters)?;
        }
        let hidden = self.final_norm(&x)?;
        self.lm_head(&hidden, use_adapters)
    }

    /// Stores every projection weight (q, k, v, o, gate, up, down, and the LM head, a bf16
    /// copy of the tied embedding) in bf16, rounded to nearest even: `model.dtype = "bf16"`.
    /// The embedding, the norms and every activation stay f32; the projections then run the
    /// bf16 kernel with f32 accumulation ([`crate::model::linear::frozen_matmul`]).
    ///
    /// Errors: a model not in f32.
    pub fn narrow_projections_to_bf16(&mut self) -> Result<()> {
        if self.dtype() != DType::F32 {
            candle_core::bail!("bf16 projections need an f32 model (got {:?})", self.dtype());
        }
        for l in self.linears_mut() {
            // the LM head's backward runs once per chunk of logits (logps::fused): its
            // input-gradient panels packed once too
            let with_backward = l.path == "lm_head";
            l.pack_bf16(with_backward)?;
        }
        Ok(())
    }

    /// Every [`Linear`] in a fixed order: layer by layer q, k, v, o, gate, up, down (Phi-3:
    /// qkv, o, gate_up, down); `lm_head` last.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut out = Vec::with_capacity(7 * self.layers.len() + 1);
        for l in &self.layers {
            let (a, m) = (&l.self_attn, &l.mlp);
            out.extend(a.qkv.linears());
            out.push(&a.o_proj);
            out.extend(m.gate_up.linears());
            out.push(&m.down_proj);
        }
        out.push(&self.lm_head);
        out
    }

    /// Mutable access to every [`Linear`], in the order of [`Model::linears`].
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = Vec::with_capacity(7 * self.layers.len() + 1);
        for l in &mut self.layers {
            let (a, m) = (&mut l.self_attn, &mut l.mlp);
            out.extend(a.qkv.linears_mut());
            out.push(&mut a.o_proj);
            out.extend(m.gate_up.linears_mut());
            out.push(&mut m.down_proj);
        }
        out.push(&mut self.lm_head);
        out
    }

    /// Every weight under its HF name, in a fixed order: `model.embed_tokens.weight`; per layer
    /// `input_layernorm`, q, k, v, o (weight, then bias if any), Qwen3's `q_norm` and `k_norm`,
    /// `post_attention_layernorm`,
    /// gate, up, down; `model.norm.weight`; `lm_head.weight` only when untied. These are the
    /// base (frozen) weights; adapters are not merged in.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        fn push_linear(out: &mut Vec<(String, Tensor)>, l: &Linear) {
            out.push((format!("{}.weight", l.path), l.weight.clone()));
            if let Some(b) = &l.bias {
                out.push((format!("{}.bias", l.path), b.clone()));
            }
        }
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed_tokens.clone())];
        for l in &self.layers {
            let p = format!("model.layers.{}", l.index);
            out.push((format!("{p}.input_layernorm.weight"), l.input_layernorm.clone()));
            let a = &l.self_attn;
            for lin in a.qkv.linears().into_iter().chain([&a.o_proj]) {
                push_linear(&mut out, lin);
            }
            for (which, w) in [("q_norm", &a.q_norm), ("k_norm", &a.k_norm)] {
                if let Some(w) = w {
                    out.push((format!("{p}.self_attn.{which}.weight"), w.clone()));
                }
            }
            out.push((format!("{p}.post_attention_layernorm.weight"), l.post_attention_layernorm.clone()));
            if let Some((pre, post)) = &l.feedforward_layernorms {
                out.push((format!("{p}.pre_feedforward_layernorm.weight"), pre.clone()));
                out.push((format!("{p}.post_feedforward_layernorm.weight"), post.clone()));
            }
            for lin in l.mlp.gate_up.linears().into_iter().chain([&l.mlp.down_proj]) {
                push_linear(&mut out, lin);
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if !self.cfg.tie_word_embeddings {
            push_linear(&mut out, &self.lm_head);
        }
        out
    }
}

/// The HF name and shape of every weight a model of `cfg` stores, in the order of
/// [`Model::tensors`] (biases of q/k/v when `attention_bias`; Qwen3's `q_norm`/`k_norm` `(hd,)`;
/// Phi-3's fused `qkv_proj` / `gate_up_proj`; `lm_head.weight` only when untied).
pub fn weight_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (d, v) = (cfg.hidden_size, cfg.vocab_size);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, d])];
    for l in 0..cfg.num_hidden_layers {
        out.extend(layer_shapes(cfg, &format!("model.layers.{l}")));
    }
    out.push(("model.norm.weight".to_string(), vec![d]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, d]));
    }
    out
}

/// The weights of one layer `p` (`model.layers.{i}`) in the order of [`Model::tensors`]:
/// `input_layernorm`; q, k, v (Phi-3: `qkv_proj`), o with their biases; Qwen3's q/k norms;
/// `post_attention_layernorm`; gate, up (Phi-3: `gate_up_proj`), down.
fn layer_shapes(cfg: &ModelConfig, p: &str) -> Vec<(String, Vec<usize>)> {
    let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim);
    let (qkv_bias, o_bias) = (cfg.attention_bias, cfg.attention_bias && cfg.arch != Arch::Qwen2);
    let fused = cfg.arch.has_fused_projections();
    let mut out = vec![(format!("{p}.input_layernorm.weight"), vec![d])];
    let attn: Vec<(&str, usize, usize, bool)> = if fused {
        vec![("qkv", q + 2 * kv, d, false), ("o", d, q, false)]
    } else {
        vec![("q", q, d, qkv_bias), ("k", kv, d, qkv_bias), ("v", kv, d, qkv_bias), ("o", d, q, o_bias)]
    };
    for (n, o, inp, bias) in attn {
        out.push((format!("{p}.self_attn.{n}_proj.weight"), vec![o, inp]));
        if bias {
            out.push((format!("{p}.self_attn.{n}_proj.bias"), vec![o]));
        }
    }
    if cfg.arch.has_qk_norm() {
        out.push((format!("{p}.self_attn.q_norm.weight"), vec![cfg.head_dim]));
        out.push((format!("{p}.self_attn.k_norm.weight"), vec![cfg.head_dim]));
    }
    out.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
    if cfg.arch.is_gemma() {
        out.push((format!("{p}.pre_feedforward_layernorm.weight"), vec![d]));
        out.push((format!("{p}.post_feedforward_layernorm.weight"), vec![d]));
    }
    let mlp: Vec<(&str, usize, usize)> = if fused { vec![("gate_up", 2 * i, d), ("down", d, i)] } else { vec![("gate", i, d), ("up", i, d), ("down", d, i)] };
    for (n, o, inp) in mlp {
        out.push((format!("{p}.mlp.{n}_proj.weight"), vec![o, inp]));
    }
    out
}

/// Random weights for every tensor of [`weight_shapes`], for tests and benches: matrices and
/// biases `~ N(0, std^2)`, RMSNorm weights (Qwen3's q/k norms too) `~ 1 + N(0, std^2)` (Gemma's,
/// stored as the offset from one, `~ N(0, std^2)`), drawn in the order of
/// [`weight_shapes`] from `rng` (so a seeded RNG gives the same weights), then cast to `dtype`.
pub fn random_weights(
    cfg: &ModelConfig,
    std: f64,
    rng: &mut impl rand::Rng,
    dtype: DType,
    device: &Device,
) -> Result<std::collections::BTreeMap<String, Tensor>> {
    let normal = rand_distr::Normal::new(0.0f64, std).map_err(|e| candle_core::Error::Msg(format!("random_weights: std {std}: {e}")))?;
    let mut out = std::collections::BTreeMap::new();
    for (name, shape) in weight_shapes(cfg) {
        let is_norm = name.ends_with("layernorm.weight") || name.ends_with("_norm.weight") || name == "model.norm.weight";
        let shift = if is_norm && !cfg.arch.is_gemma() { 1.0 } else { 0.0 };
        let n: usize = shape.iter().product();
        let values: Vec<f64> = (0..n).map(|_| shift + rng.sample(normal)).collect();
        let t = Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Rejects configurations the forward pass cannot run.
fn check_config(cfg: &ModelConfig) -> Result<()> {
    let (h, hkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    if cfg.vocab_size == 0 || cfg.hidden_size == 0 || cfg.intermediate_size == 0 || h == 0 || hkv == 0 || hd == 0 {
        candle_core::bail!("model config: vocab_size, hidden_size, intermediate_size, num_attention_heads, num_key_value_heads and head_dim must be positive: {cfg:?}");
    }
    if h % hkv != 0 {
        candle_core::bail!("model config: num_attention_heads ({h}) is not a multiple of num_key_value_heads ({hkv})");
    }
    if hd % 2 != 0 {
        candle_core::bail!("model config: head_dim ({hd}) must be even for RoPE");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use std::collections::HashMap;

    fn tiny(tied: bool, arch: Arch) -> ModelConfig {
        ModelConfig {
            arch,
            vocab_size: 11,
            hidden_size: 8,
            intermediate_size: 12,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 2,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: 64,
            tie_word_embeddings: tied,
            attention_bias: arch == Arch::Qwen2,
            bos_token_id: None,
            eos_token_ids: vec![],
            extras: Default::default(),
        }
    }

    fn weights(cfg: &ModelConfig, with_head: bool) -> HashMap<String, Tensor> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut m: HashMap<String, Tensor> = random_weights(cfg, 0.3, &mut rng, DType::F32, &Device::Cpu).unwrap().into_iter().collect();
        if with_head && cfg.tie_word_embeddings {
            m.insert("lm_head.weight".into(), Tensor::zeros((cfg.vocab_size, cfg.hidden_size), DType::F32, &Device::Cpu).unwrap());
        }
        if !with_head {
            m.remove("lm_head.weight");
        }
        m
    }

    #[test]
    fn names_orders_and_shapes() -> Result<()> {
        for (tied, arch) in [(true, Arch::Llama), (false, Arch::Qwen2), (true, Arch::Qwen3)] {
            let cfg = tiny(tied, arch);
            let w = weights(&cfg, !tied);
            let shapes = weight_shapes(&cfg);
            let mut model = Model::load(VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu), &cfg)?;
            let paths: Vec<&str> = model.linears().iter().map(|l| l.path.as_str()).collect();
            assert_eq!(paths.len(), 15);
            assert_eq!(&paths[..4], ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj"]);
            assert_eq!(paths[6], "model.layers.0.mlp.down_proj");
            assert_eq!(paths[14], "lm_head");
            // tensors(): exactly the stored names, each with its stored value
            let t = model.tensors();
            assert_eq!(t.len(), w.len(), "arch {arch:?} tied {tied}");
            let names: Vec<&String> = t.iter().map(|(n, _)| n).collect();
            assert_eq!(names, shapes.iter().map(|(n, _)| n).collect::<Vec<_>>(), "tensors() follows weight_shapes()");
            for (name, value) in &t {
                let want = w.get(name).unwrap_or_else(|| panic!("unexpected tensor {name}"));
                assert_eq!(value.dims(), want.dims(), "{name}");
                assert_eq!(value.flatten_all()?.to_vec1::<f32>()?, want.flatten_all()?.to_vec1::<f32>()?, "{name}");
            }
            let ids = Tensor::new(&[[1u32, 2, 3], [4, 5, 6]], &Device::Cpu)?;
            let logits = model.forward(&ids, None, true)?;
            assert_eq!(logits.dims(), &[2, 3, 11]);
            assert_eq!(model.linears_mut().len(), 15);
            assert_eq!(model.num_parameters(), w.values().map(|t| t.elem_count()).sum::<usize>());
        }
        Ok(())
    }

    /// Phi-3 stores `self_attn.qkv_proj` `((H + 2 Hkv) hd, D)` and `mlp.gate_up_proj` `(2I, D)`:
    /// four linears a layer, the fused ones split as q | k | v and gate | up (the same logits
    /// as the separate model built from the row blocks).
    #[test]
    fn phi3_fused_projections_equal_the_separate_ones() -> Result<()> {
        let cfg = tiny(false, Arch::Phi3);
        let w = weights(&cfg, true);
        assert_eq!(w["model.layers.0.self_attn.qkv_proj.weight"].dims(), &[16, 8]);
        assert_eq!(w["model.layers.1.mlp.gate_up_proj.weight"].dims(), &[24, 8]);
        let fused = Model::load(VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu), &cfg)?;
        let paths: Vec<&str> = fused.linears().iter().map(|l| l.path.as_str()).collect();
        assert_eq!(&paths[..4], ["model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.down_proj"]);
        assert_eq!(fused.tensors().len(), w.len());
        // the same weights split into q/k/v and gate/up, as a Llama
        let mut split = w.clone();
        for l in 0..2 {
            let p = format!("model.layers.{l}");
            let qkv = split.remove(&format!("{p}.self_attn.qkv_proj.weight")).unwrap();
            for (n, start, len) in [("q", 0, 8), ("k", 8, 4), ("v", 12, 4)] {
                split.insert(format!("{p}.self_attn.{n}_proj.weight"), qkv.narrow(0, start, len)?);
            }
            let gu = split.remove(&format!("{p}.mlp.gate_up_proj.weight")).unwrap();
            split.insert(format!("{p}.mlp.gate_proj.weight"), gu.narrow(0, 0, 12)?);
            split.insert(format!("{p}.mlp.up_proj.weight"), gu.narrow(0, 12, 12)?);
        }
        let llama = Model::load(VarBuilder::from_tensors(split, DType::F32, &Device::Cpu), &tiny(false, Arch::Llama))?;
        let ids = Tensor::new(&[[1u32, 2, 3, 9]], &Device::Cpu)?;
        let d = (fused.forward(&ids, None, false)? - llama.forward(&ids, None, false)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(d < 1e-6, "fused vs split logits differ by {d}");
        Ok(())
    }

    /// Qwen3 stores `self_attn.{q,k}_norm.weight` `(hd,)` per layer; a missing one is named.
    #[test]
    fn qwen3_q_k_norm_weights_are_loaded_and_required() -> Result<()> {
        let mut cfg = tiny(false, Arch::Qwen3);
        cfg.head_dim = 4; // != hidden / heads = 2
        let w = weights(&cfg, true);
        assert_eq!(w["model.layers.1.self_attn.q_norm.weight"].dims(), &[4]);
        assert_eq!(w["model.layers.0.self_attn.q_proj.weight"].dims(), &[16, 8]);
        let model = Model::load(VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu), &cfg)?;
        assert!(model.layers.iter().all(|l| l.self_attn.q_norm.is_some() && l.self_attn.k_norm.is_some()));
        assert_eq!(model.forward(&Tensor::new(&[[1u32, 2, 3]], &Device::Cpu)?, None, false)?.dims(), &[1, 3, 11]);
        let mut missing = w;
        missing.remove("model.layers.1.self_attn.k_norm.weight");
        let err = Model::load(VarBuilder::from_tensors(missing, DType::F32, &Device::Cpu), &cfg).unwrap_err();
        assert!(err.to_string().contains("model.layers.1.self_attn.k_norm.weight"), "{err}");
        Ok(())
    }

    #[test]
    fn load_errors_name_the_tensor() {
        let cfg = tiny(false, Arch::Llama);
        let mut w = weights(&cfg, false); // lm_head.weight missing
        let err = Model::load(VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu), &cfg).unwrap_err();
        assert!(err.to_string().contains("lm_head.weight"), "{err}");
        w.insert("lm_head.weight".into(), Tensor::zeros((3, 8), DType::F32, &Device::Cpu).unwrap());
        let err = Model::load(VarBuilder::from_tensors(w, DType::F32, &Device::Cpu), &cfg).unwrap_err();
        assert!(err.to_string().contains("lm_head.weight"), "{err}");
        let mut bad = tiny(true, Arch::Llama);
        bad.num_key_value_heads = 3;
        let err = Model::load(VarBuilder::from_tensors(weights(&bad, false), DType::F32, &Device::Cpu), &bad).unwrap_err();
        assert!(err.to_string().contains("num_key_value_heads"), "{err}");
    }
}
