//! The one linear layer every projection of the model goes through.
//!
//! `y = x W^T + b`, `W` of shape `(out_features, in_features)` (the candle/PyTorch layout),
//! `x` of shape `(..., in_features)`. The base weight is frozen. An [`Adapter`] (RoPO, LoRA,
//! full fine-tuning) can be attached to a layer without touching the model code; the model's
//! forward takes a `use_adapters` flag so the same network serves as policy (adapters on) and
//! reference (adapters bypassed, no second copy of the weights).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, Var};

use crate::model::bf16_gemm::{self, PackedWeight, Product};
use crate::model::ops::{data, from_rows, to_rows};

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
    /// With a bf16 `weight`: its forward panels packed once ([`Self::pack_bf16`]), used by
    /// [`Self::frozen_product`]; must describe `weight` (set only through `pack_bf16`).
    pub packed: Option<Arc<PackedWeight>>,
    /// With a bf16 `weight` packed `with_backward`: the panels of the input-gradient product
    /// `dy W` ([`Product::XW`]), used by the backward of [`Self::frozen_product`].
    pub packed_xw: Option<Arc<PackedWeight>>,
}

impl Linear {
    /// A plain layer with no adapter.
    pub fn new(path: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { path: path.into(), weight, bias, adapter: None, packed: None, packed_xw: None }
    }

    /// Stores the weight in bf16 (rounded to nearest even) with its forward panels packed
    /// ([`PackedWeight`]): `model.dtype = "bf16"`. Holds bf16 `(out, in)` plus the panels, the
    /// bytes of the f32 weight it replaces. `with_backward`: the input-gradient product's panels
    /// too (as many bytes again), for a layer whose backward runs several times a step on few
    /// rows (the LM head, called once per chunk of logits: packing its 28M weights in each
    /// backward call took ~3% of a training step).
    ///
    /// Errors: a weight that is not f32 or bf16, or not 2-D.
    pub fn pack_bf16(&mut self, with_backward: bool) -> Result<()> {
        if !matches!(self.weight.dtype(), DType::F32 | DType::BF16) {
            candle_core::bail!("{}: bf16 projections need an f32 weight (got {:?})", self.path, self.weight.dtype());
        }
        let w = self.weight.to_dtype(DType::BF16)?.contiguous()?;
        if !crate::device::cpu_kernels(&w) {
            // the panels feed the CPU kernel only; a GPU multiplies the bf16 weight itself
            self.weight = w;
            return Ok(());
        }
        let (out, inp) = w.dims2()?;
        let v = w.flatten_all()?.to_vec1::<half::bf16>()?;
        self.packed = Some(Arc::new(PackedWeight::new(&v, out, inp)));
        self.packed_xw = with_backward.then(|| Arc::new(PackedWeight::for_product(&v, out, inp, Product::XW)));
        self.weight = w;
        Ok(())
    }

    /// `x W^T` (no bias) for `x (..., in)`: [`frozen_matmul`], from the packed panels when the
    /// weight is bf16 and packed.
    pub fn frozen_product(&self, x: &Tensor) -> Result<Tensor> {
        match &self.packed {
            Some(p) if self.weight.dtype() == DType::BF16 && x.dtype() == DType::F32 && crate::device::cpu_kernels(&x) => {
                bf16_product(x, &self.weight, Bf16Matmul::packed(p.clone(), self.packed_xw.clone()))
            }
            _ => frozen_matmul(x, &self.weight),
        }
    }

    /// The dtype the layer computes in: f32 for a bf16 weight (`model.dtype = "bf16"`: bf16
    /// products, f32 activations, see [`frozen_matmul`]), else the weight's own dtype. Adapter
    /// parameters, their gradients and the optimiser state take this dtype.
    pub fn dtype(&self) -> DType {
        match self.weight.dtype() {
            DType::BF16 => DType::F32,
            d => d,
        }
    }

    /// The frozen weight `(out, in)` in [`Self::dtype`] (a copy for a bf16 weight: its values
    /// widened exactly to f32).
    pub fn weight_in_compute_dtype(&self) -> Result<Tensor> {
        self.weight.to_dtype(self.dtype())
    }

    /// `(out_features, in_features)`.
    pub fn dims(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1])
    }

    /// The layer's output: through the adapter when one is attached and `use_adapters` is true,
    /// else the frozen base `x W^T + b`.
    ///
    /// With the fused layer ops on (the default) `x (..., in)` is flattened to `(rows, in)` once
    /// here and the result reshaped back once, so the adapter's and the matmul's own flattening
    /// add no graph nodes ([`to_rows`]); off, `x` goes to them as it is (the path before).
    pub fn forward(&self, x: &Tensor, use_adapters: bool) -> Result<Tensor> {
        if !crate::model::ops::fused_layer_ops() {
            return match (&self.adapter, use_adapters) {
                (Some(a), true) => a.forward(self, x),
                _ => self.forward_base(x),
            };
        }
        let (x2, dims) = to_rows(x).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", self.path)))?;
        let y = match (&self.adapter, use_adapters) {
            (Some(a), true) => a.forward(self, &x2)?,
            _ => self.forward_base(&x2)?,
        };
        from_rows(&y, &dims)
    }

    /// The frozen base projection `x W^T + b` for `x` of shape `(..., in)`.
    pub fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.frozen_product(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Whether [`frozen_matmul`] may use the weight-gradient-free op ([`FrozenMatmul`]); on by
/// default. Turning it off makes every frozen projection a plain candle matmul again (whose
/// backward also computes a weight gradient nobody reads): the plain path, kept for the
/// equivalence tests and the before/after benchmark.
static FAST_FROZEN_MATMUL: AtomicBool = AtomicBool::new(true);

/// Enables or disables the [`FrozenMatmul`] fast path of [`frozen_matmul`] process-wide (for
/// benches and tests comparing against the plain path; results agree to rounding, see
/// [`frozen_matmul`]).
pub fn set_fast_frozen_matmul(enabled: bool) {
    FAST_FROZEN_MATMUL.store(enabled, Ordering::Relaxed);
}

/// Whether the [`FrozenMatmul`] fast path is enabled (see [`set_fast_frozen_matmul`]).
pub fn fast_frozen_matmul_enabled() -> bool {
    FAST_FROZEN_MATMUL.load(Ordering::Relaxed)
}

/// `x W^T` for `x` of shape `(..., in)` and `W` of shape `(out, in)`; returns `(..., out)`.
///
/// The weight is treated as a constant: when `W` is not tracked by autograd (not a `Var` and
/// not computed from one), on the CPU in f32/f64, this runs [`FrozenMatmul`], whose backward
/// returns only `dL/dx = dL/dy W` (candle's matmul backward would also compute the unused
/// `dL/dW = dy^T x`, a second GEMM of the same size, and keep `W^T` copies alive). A tracked
/// `W` (full fine-tuning, the all-weights gradient checks) takes the plain matmul, so its
/// gradient is still computed. Both paths run the same gemm kernel on the same operands, so the
/// forward values are bitwise equal; see [`plain_frozen_matmul`] for the plain path.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.dtype() == DType::BF16 && x.dtype() == DType::F32 && !w.track_op() && crate::device::cpu_kernels(&x) && w.rank() == 2 {
        return bf16_product(x, &w.contiguous()?, Bf16Matmul::new(Product::XWt));
    }
    if w.dtype() == DType::BF16 && x.dtype() == DType::F32 && !crate::device::cpu_kernels(&x) {
        // a GPU: the activations rounded to bf16 into the device's bf16 GEMM (cuBLAS, f32
        // accumulation), the product widened back to f32; differentiable (to_dtype, matmul)
        return plain_frozen_matmul(&x.to_dtype(DType::BF16)?, w)?.to_dtype(DType::F32);
    }
    let fast = fast_frozen_matmul_enabled()
        && !w.track_op()
        && crate::device::cpu_kernels(&x)
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && x.dtype() == w.dtype()
        && w.rank() == 2;
    if !fast {
        return plain_frozen_matmul(x, w);
    }
    let (x2, dims) = to_rows(x)?;
    from_rows(&x2.contiguous()?.apply_op2(&w.contiguous()?, FrozenMatmul)?, &dims)
}

/// The plain path of [`frozen_matmul`]: `x W^T` by candle's differentiable matmul (its backward
/// computes `dL/dW` too). Same shapes and result.
pub fn plain_frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let in_f = *dims.last().ok_or_else(|| candle_core::Error::Msg("frozen_matmul: x is a scalar".into()))?;
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, in_f))?.matmul(&w.t()?)?;
    let mut out = dims;
    *out.last_mut().expect("x has at least one dimension") = w.dim(0)?;
    y.reshape(out)
}

/// `(x (rows, in), W (out, in)) -> x W^T (rows, out)` with `W` a constant.
///
/// Forward: candle's CPU gemm on the storages (`W^T` as a transposed layout, no copy).
/// Backward: `dL/dx = dL/dy W` (one GEMM); no gradient for `W`.
#[derive(Debug, Clone, Copy)]
pub struct FrozenMatmul;

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "ropo-frozen-matmul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, in_f) = l1.shape().dims2()?;
        let (out_f, in_w) = l2.shape().dims2()?;
        if in_w != in_f {
            candle_core::bail!("frozen_matmul: x ({rows}, {in_f}) does not fit W ({out_f}, {in_w})");
        }
        let wt = l2.transpose(0, 1)?; // (in, out) view of W
        let y = s1.matmul(s2, (1, rows, out_f, in_f), l1, &wt)?;
        Ok((y, Shape::from((rows, out_f))))
    }

    fn bwd(&self, _x: &Tensor, w: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad_res.contiguous()?.matmul(&w.detach())?), None))
    }
}

/// A frozen bf16 weight times f32 activations, f32 result ([`bf16_gemm`]): the op of
/// [`frozen_matmul`] for a bf16 weight (`model.dtype = "bf16"`).
///
/// Operands: `x (rows, k)` f32 contiguous, `W (out, in)` bf16 contiguous (untracked);
/// [`Product::XWt`] gives `x W^T (rows, out)`, [`Product::XW`] gives `x W (rows, in)`.
/// Backward: the input gradient only, by the other product (`dL/dx = dL/dy W` for `XWt`,
/// `dL/dy W^T` for `XW`), on the same kernel; no gradient for `W`.
#[derive(Debug, Clone)]
pub struct Bf16Matmul {
    product: Product,
    /// The weight's panels for `product`, when packed once.
    packed: Option<Arc<PackedWeight>>,
    /// The weight's panels for the other product (the backward's), when packed once.
    packed_other: Option<Arc<PackedWeight>>,
}

impl Bf16Matmul {
    /// The op for `product`, packing the weight on each call.
    pub fn new(product: Product) -> Self {
        Self { product, packed: None, packed_other: None }
    }

    /// The forward `x W^T` from panels packed once, its backward from `xw` when given, else
    /// packing per call (the second operand must be their weight).
    pub fn packed(p: Arc<PackedWeight>, xw: Option<Arc<PackedWeight>>) -> Self {
        Self { product: p.product(), packed: Some(p), packed_other: xw }
    }
}

impl CustomOp2 for Bf16Matmul {
    fn name(&self) -> &'static str {
        "ropo-bf16-matmul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, k) = l1.shape().dims2()?;
        let (out_f, in_f) = l2.shape().dims2()?;
        let (kw, n) = self.product.kn(out_f, in_f);
        if kw != k {
            candle_core::bail!("bf16 matmul ({:?}): x ({rows}, {k}) does not fit W ({out_f}, {in_f})", self.product);
        }
        if let Some(p) = &self.packed {
            if p.dims() != (out_f, in_f) || p.product() != self.product {
                candle_core::bail!("bf16 matmul ({:?}): packed panels {p:?} do not describe W ({out_f}, {in_f})", self.product);
            }
        }
        let x = match s1 {
            CpuStorage::F32(v) => data(v, l1, "bf16 matmul (x)")?,
            other => candle_core::bail!("bf16 matmul: x must be f32 (got {:?})", other.dtype()),
        };
        let w = match s2 {
            CpuStorage::BF16(v) => data(v, l2, "bf16 matmul (W)")?,
            other => candle_core::bail!("bf16 matmul: W must be bf16 (got {:?})", other.dtype()),
        };
        let y = match &self.packed {
            Some(p) => bf16_gemm::matmul_packed(x, rows, w, p),
            None => bf16_gemm::matmul(x, rows, w, out_f, in_f, self.product),
        };
        Ok((CpuStorage::F32(y), Shape::from((rows, n))))
    }

    fn bwd(&self, _x: &Tensor, w: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let other = match self.product {
            Product::XWt => Product::XW,
            Product::XW => Product::XWt,
        };
        let op = Bf16Matmul { product: other, packed: self.packed_other.clone(), packed_other: self.packed.clone() };
        Ok((Some(grad_res.contiguous()?.apply_op2(&w.detach(), op)?), None))
    }
}

/// `op` on `x (..., k)` flattened to rows and the contiguous bf16 weight `w`, reshaped back.
fn bf16_product(x: &Tensor, w: &Tensor, op: Bf16Matmul) -> Result<Tensor> {
    let (x2, dims) = to_rows(x)?;
    from_rows(&x2.contiguous()?.apply_op2(w, op)?, &dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    fn randn(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.sample::<f64, _>(rand_distr::StandardNormal)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    // The frozen op equals the plain matmul: values bitwise (same gemm on the same operands),
    // input gradients to 1e-12 (f64) / 1e-5 (f32; the two backward GEMMs see dy with different
    // strides, so summation order may differ: f32 rounding at |dx| ~ 10).
    #[test]
    fn frozen_op_matches_plain_matmul_values_and_input_gradients() -> Result<()> {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let x = Var::from_tensor(&randn(&[2, 7, 13], 1, dtype))?;
            let w = randn(&[5, 13], 2, dtype);
            let proj = randn(&[2, 7, 5], 3, dtype);
            let fast = frozen_matmul(x.as_tensor(), &w)?;
            let plain = plain_frozen_matmul(x.as_tensor(), &w)?;
            assert_eq!(fast.dims(), &[2, 7, 5]);
            assert_eq!(max_abs(&fast, &plain), 0.0, "{dtype:?} values");
            let gf = (fast * &proj)?.sum_all()?.backward()?;
            let gp = (plain * &proj)?.sum_all()?.backward()?;
            let (a, b) = (gf.get(x.as_tensor()).expect("fast dx"), gp.get(x.as_tensor()).expect("plain dx"));
            assert!(max_abs(a, b) < tol, "{dtype:?} dx: {}", max_abs(a, b));
            assert!(gf.get(&w).is_none(), "no gradient is computed for the frozen weight");
        }
        Ok(())
    }

    // dL/dx against central finite differences (f64), L = sum(P * (x W^T)).
    #[test]
    fn frozen_op_input_gradient_matches_finite_differences() -> Result<()> {
        let x0 = randn(&[3, 4], 4, DType::F64);
        let w = randn(&[6, 4], 5, DType::F64);
        let p = randn(&[3, 6], 6, DType::F64);
        let x = Var::from_tensor(&x0)?;
        let g = (frozen_matmul(x.as_tensor(), &w)? * &p)?.sum_all()?.backward()?;
        let gx = g.get(x.as_tensor()).expect("dx").flatten_all()?.to_vec1::<f64>()?;
        let xv = x0.flatten_all()?.to_vec1::<f64>()?;
        let eps = 1e-6;
        for i in 0..xv.len() {
            let f = |d: f64| -> Result<f64> {
                let mut v = xv.clone();
                v[i] += d;
                let xt = Tensor::from_vec(v, (3, 4), &Device::Cpu)?;
                (frozen_matmul(&xt, &w)? * &p)?.sum_all()?.to_scalar::<f64>()
            };
            let fd = (f(eps)? - f(-eps)?) / (2.0 * eps);
            assert!((fd - gx[i]).abs() < 1e-8, "dx[{i}]: analytic {} fd {fd}", gx[i]);
        }
        Ok(())
    }

    // A bf16 weight takes the bf16 kernel: values equal the f32 product of the bf16-rounded
    // operands, and dL/dx equals dL/dy (rounded to bf16, as the kernel rounds its input) times
    // W, both to f32 summation-order rounding; no gradient for W. The tolerance is relative to
    // sum |a||b| over the contraction (k = 13 or 5 terms, 2^-20 per term covers f32 reordering).
    #[test]
    fn bf16_weight_matches_rounded_f32_product_values_and_input_gradients() -> Result<()> {
        let round = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
        let x = Var::from_tensor(&randn(&[2, 7, 13], 11, DType::F32))?;
        let w32 = randn(&[5, 13], 12, DType::F32);
        let w = w32.to_dtype(DType::BF16)?;
        let proj = randn(&[2, 7, 5], 13, DType::F32);
        let y = frozen_matmul(x.as_tensor(), &w)?;
        assert_eq!(y.dims(), &[2, 7, 5]);
        assert_eq!(y.dtype(), DType::F32);
        let want = plain_frozen_matmul(&round(x.as_tensor())?, &round(&w32)?)?;
        let bound = plain_frozen_matmul(&round(x.as_tensor())?.abs()?, &round(&w32)?.abs()?)?;
        let excess = ((&y - &want)?.abs()? - (bound * 1e-6)?)?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(excess <= 0.0, "values off by more than the bound: {excess}");
        let g = (y * &proj)?.sum_all()?.backward()?;
        let dx = g.get(x.as_tensor()).expect("dx");
        let want_dx = round(&proj)?.reshape((14, 5))?.matmul(&round(&w32)?)?.reshape((2, 7, 13))?;
        let bound_dx = round(&proj)?.abs()?.reshape((14, 5))?.matmul(&round(&w32)?.abs()?)?.reshape((2, 7, 13))?;
        let excess = ((dx - &want_dx)?.abs()? - (bound_dx * 1e-6)?)?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(excess <= 0.0, "dx off by more than the bound: {excess}");
        assert!(g.get(&w).is_none(), "no gradient for the frozen bf16 weight");
        Ok(())
    }

    // A packed bf16 layer (forward panels; with_backward: the input-gradient panels too) gives
    // the values and dL/dx of the unpacked bf16 weight bit for bit.
    #[test]
    fn packed_bf16_layer_equals_unpacked_values_and_input_gradients() -> Result<()> {
        let w32 = randn(&[37, 13], 21, DType::F32);
        let proj = randn(&[2, 7, 37], 22, DType::F32);
        let run = |layer: &Linear| -> Result<(Vec<f32>, Vec<f32>)> {
            let x = Var::from_tensor(&randn(&[2, 7, 13], 23, DType::F32))?;
            let y = layer.frozen_product(x.as_tensor())?;
            let g = (&y * &proj)?.sum_all()?.backward()?;
            Ok((y.flatten_all()?.to_vec1()?, g.get(x.as_tensor()).expect("dx").flatten_all()?.to_vec1()?))
        };
        let plain = Linear::new("w", w32.to_dtype(DType::BF16)?, None);
        let want = run(&plain)?;
        for with_backward in [false, true] {
            let mut packed = Linear::new("w", w32.clone(), None);
            packed.pack_bf16(with_backward)?;
            assert_eq!(packed.packed_xw.is_some(), with_backward);
            assert_eq!(run(&packed)?, want, "with_backward = {with_backward}");
        }
        Ok(())
    }

    // A tracked weight (full fine-tuning) keeps the plain path and gets its gradient.
    #[test]
    fn tracked_weight_still_gets_its_gradient() -> Result<()> {
        let x = randn(&[3, 4], 7, DType::F64);
        let w = Var::from_tensor(&randn(&[2, 4], 8, DType::F64))?;
        let g = frozen_matmul(&x, w.as_tensor())?.sum_all()?.backward()?;
        let gw = g.get(w.as_tensor()).expect("a Var weight gets a gradient");
        // d sum(x W^T) / dW[o, i] = sum_rows x[., i]
        let want = x.sum_keepdim(0)?.broadcast_as((2, 4))?;
        assert!(max_abs(gw, &want) < 1e-12);
        Ok(())
    }
}
