//! The input projections of attention and MLP, as separate linears or as one fused linear.
//!
//! Most families store `q_proj`, `k_proj`, `v_proj` and `gate_proj`, `up_proj`; Phi-3 stores
//! each group as one matrix (HF `models/phi3/modeling_phi3.py`: `Phi3Attention.qkv_proj`, rows
//! `[q | k | v]`; `Phi3MLP.gate_up_proj`, rows `[gate | up]`, split by `chunk(2, dim=-1)`).
//! A fused matrix stays one [`Linear`] under its checkpoint name, so `target_modules` names it as
//! the checkpoint does (`qkv_proj`, `gate_up_proj`), adapters see one `(out, in)` weight, and a
//! merge writes it back fused. The split is `narrow` on the output rows (differentiable).
//!
//! Dimension legend as in [`crate::model::llama`]: D hidden width, I MLP width, H / Hkv heads,
//! hd head dim.

use candle_core::{Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::model::linear::Linear;

/// Loads `{path}.weight` `(out, inp)` (and `{path}.bias` `(out,)` when `bias`) into a [`Linear`].
pub(crate) fn load_linear(vb: &VarBuilder, path: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
    let weight = vb.get((out, inp), &format!("{path}.weight"))?;
    let bias = if bias { Some(vb.get(out, &format!("{path}.bias"))?) } else { None };
    Ok(Linear::new(path, weight, bias))
}

/// The query, key and value projections of one attention layer.
#[derive(Debug, Clone)]
pub enum QkvProj {
    /// `q_proj` `(H*hd, D)`, `k_proj` and `v_proj` `(Hkv*hd, D)`, each with a bias `(out,)`
    /// when `attention_bias` (Llama, Mistral, Qwen2, Qwen3).
    Separate {
        /// `{prefix}.q_proj`.
        q_proj: Linear,
        /// `{prefix}.k_proj`.
        k_proj: Linear,
        /// `{prefix}.v_proj`.
        v_proj: Linear,
    },
    /// Phi-3's `{prefix}.qkv_proj` `((H + 2 Hkv) hd, D)`, no bias: rows `0..H*hd` are q, then
    /// `Hkv*hd` rows of k, then of v.
    Fused {
        /// `{prefix}.qkv_proj`.
        qkv_proj: Linear,
    },
}

impl QkvProj {
    /// Loads `{prefix}.qkv_proj` when `fused`, else `{prefix}.{q,k,v}_proj`; `q` = H*hd and
    /// `kv` = Hkv*hd output rows, `d` inputs, biases when `bias` (separate only).
    pub fn load(vb: &VarBuilder, prefix: &str, (q, kv, d): (usize, usize, usize), bias: bool, fused: bool) -> Result<Self> {
        if fused {
            return Ok(Self::Fused { qkv_proj: load_linear(vb, &format!("{prefix}.qkv_proj"), q + 2 * kv, d, false)? });
        }
        Ok(Self::Separate {
            q_proj: load_linear(vb, &format!("{prefix}.q_proj"), q, d, bias)?,
            k_proj: load_linear(vb, &format!("{prefix}.k_proj"), kv, d, bias)?,
            v_proj: load_linear(vb, &format!("{prefix}.v_proj"), kv, d, bias)?,
        })
    }

    /// Rows `x (rows, D)` -> `(q (rows, q), k (rows, kv), v (rows, kv))`; `q`/`kv` the output
    /// widths H*hd and Hkv*hd (the fused output is split by `narrow`).
    pub fn forward(&self, x: &Tensor, q: usize, kv: usize, use_adapters: bool) -> Result<(Tensor, Tensor, Tensor)> {
        match self {
            Self::Separate { q_proj, k_proj, v_proj } => Ok((q_proj.forward(x, use_adapters)?, k_proj.forward(x, use_adapters)?, v_proj.forward(x, use_adapters)?)),
            Self::Fused { qkv_proj } => {
                let y = qkv_proj.forward(x, use_adapters)?; // (rows, q + 2 kv)
                Ok((y.narrow(D::Minus1, 0, q)?, y.narrow(D::Minus1, q, kv)?, y.narrow(D::Minus1, q + kv, kv)?))
            }
        }
    }

    /// The linears in checkpoint order: q, k, v, or the one `qkv_proj`.
    pub fn linears(&self) -> Vec<&Linear> {
        match self {
            Self::Separate { q_proj, k_proj, v_proj } => vec![q_proj, k_proj, v_proj],
            Self::Fused { qkv_proj } => vec![qkv_proj],
        }
    }

    /// Mutable access to the linears, in the order of [`QkvProj::linears`].
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            Self::Separate { q_proj, k_proj, v_proj } => vec![q_proj, k_proj, v_proj],
            Self::Fused { qkv_proj } => vec![qkv_proj],
        }
    }
}

/// The gate and up projections of one SwiGLU MLP.
#[derive(Debug, Clone)]
pub enum GateUpProj {
    /// `gate_proj` and `up_proj`, each `(I, D)`.
    Separate {
        /// `{prefix}.gate_proj`.
        gate_proj: Linear,
        /// `{prefix}.up_proj`.
        up_proj: Linear,
    },
    /// Phi-3's `{prefix}.gate_up_proj` `(2I, D)`: rows `0..I` the gate, `I..2I` the up
    /// projection (HF `Phi3MLP.forward`: `gate, up = gate_up_proj(x).chunk(2, dim=-1)`).
    Fused {
        /// `{prefix}.gate_up_proj`.
        gate_up_proj: Linear,
    },
}

impl GateUpProj {
    /// Loads `{prefix}.gate_up_proj` `(2I, D)` when `fused`, else `{prefix}.{gate,up}_proj`.
    pub fn load(vb: &VarBuilder, prefix: &str, i: usize, d: usize, fused: bool) -> Result<Self> {
        if fused {
            return Ok(Self::Fused { gate_up_proj: load_linear(vb, &format!("{prefix}.gate_up_proj"), 2 * i, d, false)? });
        }
        Ok(Self::Separate { gate_proj: load_linear(vb, &format!("{prefix}.gate_proj"), i, d, false)?, up_proj: load_linear(vb, &format!("{prefix}.up_proj"), i, d, false)? })
    }

    /// `x (..., D)` -> `(gate (..., I), up (..., I))`.
    pub fn forward(&self, x: &Tensor, use_adapters: bool) -> Result<(Tensor, Tensor)> {
        match self {
            Self::Separate { gate_proj, up_proj } => Ok((gate_proj.forward(x, use_adapters)?, up_proj.forward(x, use_adapters)?)),
            Self::Fused { gate_up_proj } => {
                let y = gate_up_proj.forward(x, use_adapters)?; // (..., 2I)
                let i = y.dim(D::Minus1)? / 2;
                Ok((y.narrow(D::Minus1, 0, i)?, y.narrow(D::Minus1, i, i)?))
            }
        }
    }

    /// The linears in checkpoint order: gate, up, or the one `gate_up_proj`.
    pub fn linears(&self) -> Vec<&Linear> {
        match self {
            Self::Separate { gate_proj, up_proj } => vec![gate_proj, up_proj],
            Self::Fused { gate_up_proj } => vec![gate_up_proj],
        }
    }

    /// Mutable access to the linears, in the order of [`GateUpProj::linears`].
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            Self::Separate { gate_proj, up_proj } => vec![gate_proj, up_proj],
            Self::Fused { gate_up_proj } => vec![gate_up_proj],
        }
    }
}
