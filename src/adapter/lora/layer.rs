//! LoRA (Hu et al. 2021, arXiv 2106.09685) exactly as PEFT defines it (`peft/tuners/lora/layer.py`):
//! `y = W x + b + (alpha / r) · B (A x)`, `A (r, d_in)` kaiming-uniform(a = √5), i.e.
//! `U(-1/√d_in, 1/√d_in)`, `B (d_out, r)` zeros, so the adapted layer equals the base at init.
//!
//! The trainable tensors are named `<module path>.lora_A.weight` and `<module path>.lora_B.weight`
//! (PEFT's names without the `base_model.model.` prefix, which [`super::files`] adds in the file).
//! LoRA dropout is not implemented (the config refuses `lora_dropout > 0`).

use candle_core::{DType, Result as CResult, Tensor, Var};
use rand::Rng;

use crate::adapter::ropo::layer::layer_rng;
use crate::adapter::targets::TargetModules;
use crate::error::Result;
use crate::model::grad::param;
use crate::model::linear::{Adapter, Linear};

/// Name suffix of A in the trainable tensors and in PEFT's files.
pub const A_SUFFIX: &str = "lora_A.weight";
/// Name suffix of B.
pub const B_SUFFIX: &str = "lora_B.weight";

/// LoRA hyperparameters (PEFT `LoraConfig` names).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Which linears to wrap.
    pub target_modules: TargetModules,
    /// The rank r (> 0).
    pub r: usize,
    /// alpha (> 0); the update is scaled by `alpha / r`.
    pub lora_alpha: f64,
    /// Dropout on the LoRA branch's input; only 0 is supported.
    pub lora_dropout: f64,
    /// Seed of A's initialization ([`layer_rng`]`(seed, path)`, ChaCha20 per layer). Not part
    /// of PEFT's file: a loaded adapter reports 0.
    pub init_seed: u64,
}

impl LoraConfig {
    /// `alpha / r`, PEFT's `scaling` (no rsLoRA).
    pub fn scaling(&self) -> f64 {
        self.lora_alpha / self.r as f64
    }

    /// Check the values; errors name the key (`adapter.lora_r must be > 0 (got 0)`).
    pub fn validate(&self) -> Result<()> {
        use crate::error::Error;
        if self.r == 0 {
            return Err(Error::Config("adapter.lora_r must be > 0 (got 0)".into()));
        }
        if !(self.lora_alpha > 0.0 && self.lora_alpha.is_finite()) {
            return Err(Error::Config(format!("adapter.lora_alpha must be > 0 (got {})", self.lora_alpha)));
        }
        if self.lora_dropout != 0.0 {
            return Err(Error::Config(format!("adapter.lora_dropout > 0 is not supported yet (got {}); use 0", self.lora_dropout)));
        }
        self.target_modules.matcher()?;
        Ok(())
    }
}

/// One LoRA-wrapped linear: `y = x W^T + b + s · (x A^T) B^T`, `s = alpha / r`.
#[derive(Debug)]
pub struct LoraAdapter {
    /// The wrapped module's path (`model.layers.0.self_attn.q_proj`).
    pub path: String,
    /// A, `(r, d_in)`, the base weight's dtype and device.
    pub a: Var,
    /// B, `(d_out, r)`.
    pub b: Var,
    /// `alpha / r`.
    pub scaling: f64,
}

/// `x M^T` for `x (..., k)` and `m (n, k)`: `(..., n)`; gradients flow to both.
fn matmul_t(x: &Tensor, m: &Tensor) -> CResult<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().ok_or_else(|| candle_core::Error::Msg("lora: scalar input".into()))?;
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, k))?.matmul(&m.t()?)?;
    let mut out = dims;
    *out.last_mut().expect("non-empty dims") = m.dim(0)?;
    y.reshape(out)
}

impl LoraAdapter {
    /// A fresh adapter for `base` (PEFT `init_lora_weights=True`): `A ~ U(-1/√d_in, 1/√d_in)`
    /// drawn row by row from [`layer_rng`]`(seed, base.path)` in f64, `B = 0`; both in the base
    /// weight's dtype and device. Errors: `r == 0`.
    pub fn init(base: &Linear, r: usize, lora_alpha: f64, seed: u64) -> CResult<Self> {
        if r == 0 {
            candle_core::bail!("lora: r must be > 0 ({})", base.path);
        }
        let (n, d) = base.dims();
        let bound = 1.0 / (d as f64).sqrt();
        let mut rng = layer_rng(seed, &base.path);
        let vals: Vec<f64> = (0..r * d).map(|_| rng.random_range(-bound..bound)).collect();
        let (dt, dev) = (base.dtype(), base.weight.device());
        let a = Tensor::from_vec(vals, (r, d), dev)?.to_dtype(dt)?;
        let b = Tensor::zeros((n, r), dt, dev)?;
        Self::from_tensors(base, a, b, lora_alpha)
    }

    /// An adapter with the given `a (r, d_in)` and `b (d_out, r)` (copied into new `Var`s).
    /// Errors: shapes that do not fit `base` or each other.
    pub fn from_tensors(base: &Linear, a: Tensor, b: Tensor, lora_alpha: f64) -> CResult<Self> {
        let (n, d) = base.dims();
        let r = a.dim(0)?;
        if a.dims() != [r, d] || b.dims() != [n, r] || r == 0 {
            candle_core::bail!("lora {}: A {:?} and B {:?} do not fit a ({n}, {d}) weight", base.path, a.dims(), b.dims());
        }
        Ok(Self {
            path: base.path.clone(),
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scaling: lora_alpha / r as f64,
        })
    }

    /// The rank r.
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// `r · (d_in + d_out)`.
    pub fn num_trainable(&self) -> usize {
        self.a.elem_count() + self.b.elem_count()
    }

    /// `s · B A`, `(d_out, d_in)`, computed in f64 and returned in f64.
    pub fn delta_w(&self) -> CResult<Tensor> {
        let a = self.a.as_tensor().to_dtype(DType::F64)?;
        let b = self.b.as_tensor().to_dtype(DType::F64)?;
        b.matmul(&a)? * self.scaling
    }
}

impl Adapter for LoraAdapter {
    fn forward(&self, base: &Linear, x: &Tensor) -> CResult<Tensor> {
        let y = base.forward_base(x)?;
        let h = matmul_t(x, &param(&self.a))?;
        let up = matmul_t(&h, &param(&self.b))?;
        y + (up * self.scaling)?
    }

    /// `W' = W + (alpha / r) B A` (in f64, stored in W's dtype), bias unchanged (PEFT `merge`).
    fn merged(&self, base: &Linear) -> CResult<(Tensor, Option<Tensor>)> {
        let w = (base.weight.to_dtype(DType::F64)? + self.delta_w()?)?.to_dtype(base.dtype())?;
        Ok((w, base.bias.clone()))
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        vec![(format!("{}.{A_SUFFIX}", self.path), self.a.clone()), (format!("{}.{B_SUFFIX}", self.path), self.b.clone())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn lin(n: usize, d: usize) -> Linear {
        let w = Tensor::arange(0f64, (n * d) as f64, &Device::Cpu).unwrap().reshape((n, d)).unwrap() * 0.01;
        Linear::new("model.layers.0.self_attn.q_proj", w.unwrap(), None)
    }

    // PEFT: kaiming_uniform_(a=sqrt(5)) on (r, d_in) has bound gain*sqrt(3/fan_in) = 1/sqrt(d_in).
    #[test]
    fn init_is_kaiming_uniform_and_b_zero_and_seeded() {
        let base = lin(6, 400);
        let a = LoraAdapter::init(&base, 8, 16.0, 3).unwrap();
        assert_eq!(a.a.dims(), [8, 400]);
        assert_eq!(a.b.dims(), [6, 8]);
        assert_eq!(a.scaling, 2.0);
        let v = a.a.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let bound = 1.0 / 20.0;
        assert!(v.iter().all(|x| x.abs() < bound));
        let max = v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        assert!(max > 0.95 * bound, "max |A| = {max}");
        let mean_sq = v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64;
        assert!((mean_sq / (bound * bound / 3.0) - 1.0).abs() < 0.1, "variance {mean_sq}");
        assert_eq!(a.b.sum_all().unwrap().to_scalar::<f64>().unwrap(), 0.0);
        let again = LoraAdapter::init(&base, 8, 16.0, 3).unwrap();
        assert_eq!(again.a.flatten_all().unwrap().to_vec1::<f64>().unwrap(), v);
        let other = LoraAdapter::init(&base, 8, 16.0, 4).unwrap();
        assert_ne!(other.a.flatten_all().unwrap().to_vec1::<f64>().unwrap(), v);
        assert!(LoraAdapter::init(&base, 0, 16.0, 3).is_err());
    }

    #[test]
    fn forward_matches_the_formula() {
        let base = lin(3, 4);
        let a = Tensor::new(&[[1.0f64, 0.0, -1.0, 2.0], [0.5, 0.5, 0.0, 1.0]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[1.0f64, 2.0], [0.0, -1.0], [3.0, 0.0]], &Device::Cpu).unwrap();
        let ad = LoraAdapter::from_tensors(&base, a.clone(), b.clone(), 4.0).unwrap();
        let x = Tensor::new(&[[1.0f64, 2.0, 3.0, 4.0]], &Device::Cpu).unwrap();
        let y = ad.forward(&base, &x).unwrap().to_vec2::<f64>().unwrap();
        // s = 4/2 = 2; A x = [1-3+8, 0.5+1+4] = [6, 5.5]; B (A x) = [17, -5.5, 18]
        let wx = base.forward_base(&x).unwrap().to_vec2::<f64>().unwrap();
        let want = [wx[0][0] + 34.0, wx[0][1] - 11.0, wx[0][2] + 36.0];
        for (g, w) in y[0].iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{g} vs {w}");
        }
        let (w2, _) = ad.merged(&base).unwrap();
        let y2 = x.matmul(&w2.t().unwrap()).unwrap().to_vec2::<f64>().unwrap();
        for (g, w) in y2[0].iter().zip(want) {
            assert!((g - w).abs() < 1e-12);
        }
        assert!(LoraAdapter::from_tensors(&base, b, a, 4.0).is_err());
    }

    #[test]
    fn validate_names_the_key() {
        let ok = LoraConfig { target_modules: TargetModules::Names(vec!["q_proj".into()]), r: 8, lora_alpha: 16.0, lora_dropout: 0.0, init_seed: 0 };
        ok.validate().unwrap();
        assert!(LoraConfig { r: 0, ..ok.clone() }.validate().unwrap_err().to_string().contains("adapter.lora_r"));
        assert!(LoraConfig { lora_alpha: -1.0, ..ok.clone() }.validate().unwrap_err().to_string().contains("adapter.lora_alpha"));
        assert!(LoraConfig { lora_dropout: 0.1, ..ok }.validate().unwrap_err().to_string().contains("not supported yet"));
    }
}
