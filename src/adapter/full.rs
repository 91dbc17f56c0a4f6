//! Full-parameter training of the selected linears (the "full fine-tuning" DPO baseline).
//!
//! Each selected layer gets a trainable `Var` copy of its weight `(d_out, d_in)` (and bias
//! `(d_out,)`), initialised to the frozen values: `y = x W_t^T + b_t`. The frozen weight stays
//! in the [`Linear`], so the reference model (`use_adapters = false`) is the frozen base and
//! only the trained tensors exist twice, not the whole model. The trainable tensors carry the
//! HF weight names (`model.layers.0.self_attn.q_proj.weight`, `….bias`); merging writes them
//! as the layer's weights.

use std::sync::Arc;

use candle_core::{Result as CResult, Tensor, Var};

use super::config::TargetModules;
use super::inject::{model_params, ParamReport};
use super::targets;
use crate::error::Result;
use crate::model::grad::param;
use crate::model::linear::{frozen_matmul, Adapter, Linear};
use crate::model::llama::Model;

/// Which linears are trained.
#[derive(Debug, Clone, PartialEq)]
pub struct FullConfig {
    /// The layers whose weight (and bias) are trained.
    pub target_modules: TargetModules,
}

/// One fully trained linear: `y = x W_t^T + b_t` with `W_t`, `b_t` trainable.
#[derive(Debug)]
pub struct FullAdapter {
    /// The module path (`model.layers.0.self_attn.q_proj`).
    pub path: String,
    /// The trained weight `(d_out, d_in)`, base dtype and device.
    pub weight: Var,
    /// The trained bias `(d_out,)`, when the base layer has one.
    pub bias: Option<Var>,
}

impl FullAdapter {
    /// A copy of `base`'s weight and bias (new storage: training it leaves `base` untouched).
    pub fn init(base: &Linear) -> CResult<Self> {
        Self::from_tensors(base, base.weight_in_compute_dtype()?, base.bias.clone())
    }

    /// Trained tensors `weight (d_out, d_in)` and `bias (d_out,)` (copied into new `Var`s).
    /// Errors: shapes other than `base`'s; a bias present on one side only.
    pub fn from_tensors(base: &Linear, weight: Tensor, bias: Option<Tensor>) -> CResult<Self> {
        if weight.dims() != base.weight.dims() {
            candle_core::bail!("full {}: weight {:?}, base {:?}", base.path, weight.dims(), base.weight.dims());
        }
        match (&bias, &base.bias) {
            (Some(b), Some(bb)) if b.dims() != bb.dims() => candle_core::bail!("full {}: bias {:?}, base {:?}", base.path, b.dims(), bb.dims()),
            (Some(_), None) | (None, Some(_)) => candle_core::bail!("full {}: bias present on one side only", base.path),
            _ => {}
        }
        Ok(Self { path: base.path.clone(), weight: Var::from_tensor(&weight)?, bias: bias.map(|b| Var::from_tensor(&b)).transpose()? })
    }

    /// Elements of the weight and bias.
    pub fn num_trainable(&self) -> usize {
        self.weight.elem_count() + self.bias.as_ref().map_or(0, |b| b.elem_count())
    }
}

impl Adapter for FullAdapter {
    fn forward(&self, _base: &Linear, x: &Tensor) -> CResult<Tensor> {
        let y = frozen_matmul(x, &param(&self.weight))?;
        match &self.bias {
            Some(b) => y.broadcast_add(&param(b)),
            None => Ok(y),
        }
    }

    /// The trained weight and bias (fresh copies: later training does not change them).
    fn merged(&self, _base: &Linear) -> CResult<(Tensor, Option<Tensor>)> {
        Ok((self.weight.as_tensor().copy()?, self.bias.as_ref().map(|b| b.as_tensor().copy()).transpose()?))
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        let mut v = vec![(format!("{}.weight", self.path), self.weight.clone())];
        if let Some(b) = &self.bias {
            v.push((format!("{}.bias", self.path), b.clone()));
        }
        v
    }
}

/// The fully trained layers of one model.
#[derive(Debug, Clone)]
pub struct FullSet {
    /// Which layers.
    pub config: FullConfig,
    /// The base model (path or hub id).
    pub base_model: String,
    /// One per trained linear, in model order (shares its `Var`s with the model).
    pub adapters: Vec<Arc<FullAdapter>>,
    /// Counts: trainable = elements of the trained tensors, total = the base model's count
    /// (the trained tensors replace their frozen copies; nothing is added).
    pub report: ParamReport,
}

impl FullSet {
    /// Every trainable tensor by HF name (`<path>.weight`, then `<path>.bias`), in model order.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.adapters.iter().flat_map(|a| a.trainable()).collect()
    }
}

/// Attach `built` and count.
pub(crate) fn attach(linears: Vec<&mut Linear>, built: Vec<(usize, FullAdapter)>, cfg: &FullConfig, base_model: &str, base_params: usize) -> FullSet {
    let adapters = super::inject::attach_each(linears, built);
    let trainable = adapters.iter().map(|a| a.num_trainable()).sum();
    FullSet { config: cfg.clone(), base_model: base_model.into(), adapters, report: ParamReport { trainable, total: base_params } }
}

/// Make the target linears among `linears` trainable (copies of their weights: the output is
/// unchanged). Errors: see [`targets::select`]; on error nothing is attached.
pub fn inject_linears(linears: Vec<&mut Linear>, cfg: &FullConfig, base_model: &str, base_params: usize) -> Result<FullSet> {
    let idx = targets::select(&linears, &cfg.target_modules)?;
    let mut built = Vec::with_capacity(idx.len());
    for i in idx {
        built.push((i, FullAdapter::init(linears[i])?));
    }
    Ok(attach(linears, built, cfg, base_model, base_params))
}

/// Make `model`'s target linears trainable. Errors: as [`inject_linears`], a tied `lm_head`
/// among the targets; on error the model is unchanged.
pub fn inject(model: &mut Model, cfg: &FullConfig, base_model: &str) -> Result<FullSet> {
    targets::check_tied(model, &cfg.target_modules)?;
    let base_params = model_params(model);
    inject_linears(model.linears_mut(), cfg, base_model, base_params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn copy_is_independent_of_the_base() {
        let w = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let base = Linear::new("model.layers.0.self_attn.q_proj", w.clone(), Some(Tensor::new(&[0.5f32, -0.5], &Device::Cpu).unwrap()));
        let a = FullAdapter::init(&base).unwrap();
        let x = Tensor::new(&[[1.0f32, -1.0]], &Device::Cpu).unwrap();
        assert_eq!(a.forward(&base, &x).unwrap().to_vec2::<f32>().unwrap(), base.forward_base(&x).unwrap().to_vec2::<f32>().unwrap());
        let (merged_before, _) = a.merged(&base).unwrap();
        a.weight.set(&Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap()).unwrap();
        assert_eq!(base.weight.to_vec2::<f32>().unwrap(), [[1.0, 2.0], [3.0, 4.0]], "training changed the frozen weight");
        assert_eq!(merged_before.to_vec2::<f32>().unwrap(), [[1.0, 2.0], [3.0, 4.0]], "merged shares storage with the Var");
        assert_eq!(a.forward(&base, &x).unwrap().to_vec2::<f32>().unwrap(), [[0.5, -0.5]]);
        assert_eq!(a.num_trainable(), 6);
        let names: Vec<String> = a.trainable().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias"]);
        assert!(FullAdapter::from_tensors(&base, w.t().unwrap().contiguous().unwrap().narrow(0, 0, 1).unwrap(), None).is_err());
    }
}
