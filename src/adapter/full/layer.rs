//! Full-parameter training of the selected linears (the "full fine-tuning" DPO baseline).
//!
//! Each selected layer gets a trainable `Var` copy of its weight `(d_out, d_in)` (and bias
//! `(d_out,)`), initialised to the frozen values: `y = x W_t^T + b_t`. The frozen weight stays
//! in the [`Linear`], so the reference model (`use_adapters = false`) is the frozen base and
//! only the trained tensors exist twice, not the whole model. The trainable tensors carry the
//! HF weight names (`model.layers.0.self_attn.q_proj.weight`, `….bias`); merging writes them
//! as the layer's weights.

use candle_core::{Result as CResult, Tensor, Var};

use crate::adapter::targets::TargetModules;
use crate::model::grad::param;
use crate::model::linear::{frozen_matmul, Adapter, Linear};

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
