//! SwiGLU and a frozen bf16 down projection as one op: `y = (g σ(g) u) W_down^T`, the SwiGLU
//! output never a tensor of its own.
//!
//! Chained as two ops ([`crate::model::ops::swiglu`], then the down projection's
//! [`Bf16Matmul`]), the SwiGLU output `s (rows, I)` is the second op's input, so the autograd
//! graph keeps it until the backward, although nothing reads it there: the down projection's
//! backward needs only `W` (`ds = dy W`, no weight gradient), and SwiGLU's backward reads `g`
//! and `u`. Here `s` lives in the forward only: `rows x I` f32 per layer less at the step's peak
//! (SmolLM2-135M, ~750 rows: 4.6 MB a layer, 138 MB over 30 layers).
//!
//! Values and gradients are those of the two ops bit for bit (the same row functions and the
//! same kernel on the same operands). Used by `Mlp::forward` when the down projection's weight is
//! bf16 and packed, with no bias and no active adapter ([`packed_down`]); otherwise the two ops.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::model::bf16_gemm::{self, PackedWeight, Product};
use crate::model::linear::{Bf16Matmul, Linear};
use crate::model::ops::{data, swiglu_rows, GluBwdOp, Silu};

/// The forward panels of `down` when [`swiglu_down`] may stand in for `down(swiglu(g, u))`: a
/// bf16 weight with packed panels, no bias, and no adapter in use.
pub fn packed_down(down: &Linear, use_adapters: bool) -> Option<&Arc<PackedWeight>> {
    let adapter_on = down.adapter.is_some() && use_adapters;
    if adapter_on || down.bias.is_some() || down.weight.dtype() != DType::BF16 || !crate::device::cpu_kernels(&down.weight) {
        return None;
    }
    down.packed.as_ref()
}

/// `(g σ(g) u) W^T`: `g`, `u` `(rows, I)` f32, `w (D, I)` the bf16 weight of `packed`; returns
/// `(rows, D)` f32. Gradients for `g` and `u` (none for `w`).
///
/// Errors: shapes or dtypes that do not fit, panels of another weight.
pub fn swiglu_down(g: &Tensor, u: &Tensor, w: &Tensor, packed: &Arc<PackedWeight>) -> Result<Tensor> {
    if g.dims() != u.dims() || g.rank() != 2 {
        candle_core::bail!("swiglu_down: gate {:?} and up {:?} must be one (rows, I) shape", g.dims(), u.dims());
    }
    if packed.dims() != w.dims2()? || packed.product() != Product::XWt {
        candle_core::bail!("swiglu_down: panels {packed:?} do not describe W {:?}", w.dims());
    }
    g.contiguous()?.apply_op3(&u.contiguous()?, &w.contiguous()?, SwiGluDownOp { packed: packed.clone() })
}

/// The op of [`swiglu_down`]: args `(g, u, W)`.
struct SwiGluDownOp {
    packed: Arc<PackedWeight>,
}

impl CustomOp3 for SwiGluDownOp {
    fn name(&self) -> &'static str {
        "ropo-swiglu-down"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, i) = l1.shape().dims2()?;
        let (d, iw) = l3.shape().dims2()?;
        if l2.dims() != l1.dims() || iw != i {
            candle_core::bail!("{}: g {:?}, u {:?} and W {:?} do not fit", self.name(), l1.dims(), l2.dims(), l3.dims());
        }
        let (CpuStorage::F32(g), CpuStorage::F32(u), CpuStorage::BF16(w)) = (s1, s2, s3) else {
            candle_core::bail!("{}: f32 g, u and a bf16 W expected", self.name())
        };
        let (g, u, w) = (data(g, l1, self.name())?, data(u, l2, self.name())?, data(w, l3, self.name())?);
        let s = swiglu_rows(g, u);
        Ok((CpuStorage::F32(bf16_gemm::matmul_packed(&s, rows, w, &self.packed)), Shape::from((rows, d))))
    }

    /// `ds = dy W` (the down projection's input gradient), then SwiGLU's backward from `g`, `u`.
    fn bwd(&self, g: &Tensor, u: &Tensor, w: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let ds = grad_res.contiguous()?.apply_op2_no_bwd(w, &Bf16Matmul::new(Product::XW))?;
        let both = g.apply_op3_no_bwd(u, &ds, &GluBwdOp::<Silu>::OP)?; // (2, rows, I)
        Ok((Some(both.get(0)?), Some(both.get(1)?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::swiglu;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    fn randn(shape: (usize, usize), seed: u64) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.random_range(-2.0..2.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    // One op equals swiglu then the packed bf16 projection: values, dL/dg and dL/du bit for bit
    // (rows not a multiple of the kernel's blocks, I and D not multiples of its panels).
    #[test]
    fn equals_swiglu_then_the_down_projection_bit_for_bit() -> Result<()> {
        let (rows, i, d) = (19, 45, 37);
        let mut down = Linear::new("down_proj", randn((d, i), 1), None);
        down.pack_bf16(false)?;
        let packed = packed_down(&down, true).expect("a packed bf16 layer without adapter or bias").clone();
        let proj = randn((rows, d), 2);
        let run = |fused: bool| -> Result<Vec<Vec<f32>>> {
            let (g, u) = (Var::from_tensor(&randn((rows, i), 3))?, Var::from_tensor(&randn((rows, i), 4))?);
            let y = if fused {
                swiglu_down(g.as_tensor(), u.as_tensor(), &down.weight, &packed)?
            } else {
                down.forward(&swiglu(g.as_tensor(), u.as_tensor())?, true)?
            };
            let grads = (&y * &proj)?.sum_all()?.backward()?;
            let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
            Ok(vec![flat(&y)?, flat(grads.get(g.as_tensor()).expect("dg"))?, flat(grads.get(u.as_tensor()).expect("du"))?])
        };
        let (a, b) = (run(true)?, run(false)?);
        assert!(a[1].iter().any(|&x| x != 0.0) && a[2].iter().any(|&x| x != 0.0), "non-zero gradients");
        assert_eq!(a, b);
        Ok(())
    }

    // Layers it must not serve: f32 weights, a bias, unpacked bf16.
    #[test]
    fn only_packed_bf16_layers_without_bias() -> Result<()> {
        let f32_layer = Linear::new("down_proj", randn((4, 6), 1), None);
        assert!(packed_down(&f32_layer, true).is_none());
        let mut biased = Linear::new("down_proj", randn((4, 6), 1), Some(Tensor::zeros(4, DType::F32, &Device::Cpu)?));
        biased.pack_bf16(false)?;
        assert!(packed_down(&biased, true).is_none());
        let unpacked = Linear::new("down_proj", randn((4, 6), 1).to_dtype(DType::BF16)?, None);
        assert!(packed_down(&unpacked, true).is_none());
        Ok(())
    }
}
