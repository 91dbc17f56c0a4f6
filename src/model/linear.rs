//! The one linear layer every projection of the model goes through.
//!
//! `y = x W^T + b`, `W` of shape `(out_features, in_features)` (the candle/PyTorch layout),
//! `x` of shape `(..., in_features)`. The base weight is frozen. An [`Adapter`] (RoPO, LoRA,
//! full fine-tuning) can be attached to a layer without touching the model code; the model's
//! forward takes a `use_adapters` flag so the same network serves as policy (adapters on) and
//! reference (adapters bypassed, no second copy of the weights).

use std::sync::Arc;

use candle_core::{Result, Tensor, Var};

/// A trainable modification of a frozen [`Linear`].
///
/// Implementations: the RoPO rotation adapter (`adapter::layer`), and the LoRA / full baselines.
pub trait Adapter: Send + Sync + std::fmt::Debug {
    /// The adapted output for input `x` of shape `(..., in_features)`; returns `(..., out_features)`.
    fn forward(&self, base: &Linear, x: &Tensor) -> Result<Tensor>;
    /// The merged weight `(out, in)` and bias `(out,)` of an ordinary linear layer that computes
    /// the same function as [`Adapter::forward`].
    fn merged(&self, base: &Linear) -> Result<(Tensor, Option<Tensor>)>;
    /// The trainable tensors with their full names (e.g.
    /// `model.layers.0.self_attn.q_proj.ropo_u`), in a fixed order.
    fn trainable(&self) -> Vec<(String, Var)>;
}

/// A frozen linear projection with an optional adapter.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Full module path, e.g. `model.layers.0.self_attn.q_proj` (HF naming).
    pub path: String,
    /// Frozen weight, `(out_features, in_features)`.
    pub weight: Tensor,
    /// Frozen bias, `(out_features,)`.
    pub bias: Option<Tensor>,
    /// The attached adapter, if any.
    pub adapter: Option<Arc<dyn Adapter>>,
}

impl Linear {
    /// A plain layer with no adapter.
    pub fn new(path: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { path: path.into(), weight, bias, adapter: None }
    }

    /// `(out_features, in_features)`.
    pub fn dims(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1])
    }

    /// The layer's output: through the adapter when one is attached and `use_adapters` is true,
    /// else the frozen base `x W^T + b`.
    pub fn forward(&self, x: &Tensor, use_adapters: bool) -> Result<Tensor> {
        match (&self.adapter, use_adapters) {
            (Some(a), true) => a.forward(self, x),
            _ => self.forward_base(x),
        }
    }

    /// The frozen base projection `x W^T + b` for `x` of shape `(..., in)`.
    pub fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
        let y = frozen_matmul(x, &self.weight)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// `x W^T` for `x` of shape `(..., in)` and `W` of shape `(out, in)`; returns `(..., out)`.
///
/// The weight is treated as a constant (no gradient is asked for it).
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let in_f = *dims.last().expect("x has at least one dimension");
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, in_f))?.matmul(&w.t()?)?;
    let mut out = dims;
    *out.last_mut().unwrap() = w.dim(0)?;
    y.reshape(out)
}
