//! The RoPO layer's training product `y = s ⊙ (W (G^T H^T x))` as one op.
//!
//! Composed (`RopoAdapter::rotate_t`, `Linear::frozen_product`, `scale_cols`), the graph keeps
//! three `(rows, d or n)` tensors per adapter until the backward pass: the reflected rows, the
//! rotated rows and the unscaled product (0.75 GB of the anchor run's heap peak at RoPO on
//! q, k, v, o). [`RopoProduct`] keeps only its output. Its backward recomputes the reflected
//! and rotated rows (thin gemms and the Givens sweep: `O(rows d (4r + 3S))`, small beside the
//! product), reads the unscaled product as `y / s` (recomputed by the product when some
//! `s_j` is 0, subnormal or not finite), and chains the pieces' own backward kernels:
//!
//! `gz = g ⊙ s`, `ds = Σ_rows g ⊙ z`, `dx_rot = gz W` (the bf16 kernel's other product, or
//! gemm), then [`givens_bwd`] (`dx_h`, `dθ`) and [`reflect_wy_bwd`] (`dx`, `du`, `dB`).
//!
//! Spec: `../shared/docs/ropo-method.md`, "The adapted layer" and "On activations". Values and
//! gradients agree with the composed path to rounding (tests below; tests/fused_layer_ops.rs
//! on a whole model, f64).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};

use rayon::prelude::*;

use super::cpu_slice;
use super::layer::{scale_bwd, scale_rows_in_place};
use super::givens::{givens_bwd, givens_fwd};
use super::householder::{reflect_wy_bwd, reflect_wy_fwd};
use crate::model::bf16_gemm::{self, PackedWeight, Product};
use crate::model::ops::{data, Real};
use crate::model::slice_gemm::{gemm_into, View};

/// The frozen weight of a [`RopoProduct`]: bf16 (with its forward panels when packed) or the
/// activations' dtype.
#[derive(Debug, Clone)]
pub struct FrozenWeight {
    /// `(n, d)`, contiguous, untracked.
    pub weight: Tensor,
    /// The bf16 weight's forward panels ([`crate::model::linear::Linear::packed`]).
    pub packed: Option<Arc<PackedWeight>>,
}

/// `y = s ⊙ (W R^T x)` for rows `x (rows, d)`: args `(x, params, s)`.
///
/// `params` is `[u (r, d) ; B = T^{-1} (r, r) ; θ (A,)]` flattened and concatenated (each part
/// absent when `r = 0` / `A = 0`), `s (n,)` the magnitude scale `m / ρ` (ones, and no
/// gradient, when `scaled` is false). The output is `(rows, n)` f32/f64.
#[derive(Debug, Clone)]
pub struct RopoProduct {
    pub w: FrozenWeight,
    /// `r`, Householder vectors.
    pub r: usize,
    /// `S`, Givens stages.
    pub stages: usize,
    /// `A`, Givens angles.
    pub angles: usize,
    /// `u` is exactly paired (`H = I` exactly: the reflected rows are `x` bit for bit).
    pub paired: bool,
    /// Magnitude on (`s` trainable).
    pub scaled: bool,
}

/// The frozen weight's data: bf16 (with f32 activations) or the activations' own dtype.
enum WeightData<'a, T> {
    Bf16(&'a [half::bf16]),
    Same(&'a [T]),
}

/// The slices of the concatenated parameter vector.
fn split<T>(p: &[T], r: usize, d: usize) -> (&[T], &[T], &[T]) {
    let (u, rest) = p.split_at(r * d);
    let (b, theta) = rest.split_at(r * r);
    (u, b, theta)
}

impl RopoProduct {
    /// `G^T H^T x` per row, `(rows, d)`.
    fn rotated<T: Real + candle_core::WithDType + 'static>(&self, x: &[T], p: &[T], d: usize) -> Vec<T> {
        let (u, b, theta) = split(p, self.r, d);
        let xh = if self.r > 0 { reflect_wy_fwd(x, u, b, self.r, d, self.paired) } else { x.to_vec() };
        if self.angles > 0 { givens_fwd(&xh, theta, d, self.stages) } else { xh }
    }

    /// Runs `f` on the frozen weight's data and its out_features `n`.
    fn with_weight<T: candle_core::WithDType, R>(&self, f: impl FnOnce(WeightData<'_, T>, usize) -> Result<R>) -> Result<R> {
        let (n, _) = self.w.weight.dims2()?;
        let (guard, lw) = self.w.weight.storage_and_layout();
        let Storage::Cpu(sw) = &*guard else { candle_core::bail!("ropo product: the weight must be on the CPU") };
        match sw {
            CpuStorage::BF16(w) => f(WeightData::Bf16(data(w, lw, "ropo product (W)")?), n),
            other => f(WeightData::Same(data(other.as_slice::<T>()?, lw, "ropo product (W)")?), n),
        }
    }

    /// `z = x_rot W^T`, `(rows, n)`.
    fn product<T: Real + candle_core::WithDType + 'static>(&self, xr: &[T], rows: usize, d: usize) -> Result<Vec<T>> {
        self.with_weight(|w, n| match w {
            WeightData::Bf16(w) => {
                let x = as_f32(xr)?;
                let z = match &self.w.packed {
                    Some(p) if p.dims() != (n, d) => {
                        candle_core::bail!("ropo product: packed panels {:?} do not describe W ({n}, {d})", p.dims())
                    }
                    Some(p) => bf16_gemm::matmul_packed(x, rows, w, p),
                    None => bf16_gemm::matmul(x, rows, w, n, d, Product::XWt),
                };
                from_f32(z)
            }
            WeightData::Same(w) => {
                let mut z = vec![<T as Real>::zero(); rows * n];
                gemm_into(rows, n, d, &mut z, 0.0, 1.0, View::rows(xr, d), View::transposed(w, d), true);
                Ok(z)
            }
        })
    }

    /// `gz W`, `(rows, d)`, for `gz (rows, n)`.
    fn product_t<T: Real + candle_core::WithDType + 'static>(&self, gz: &[T], rows: usize, d: usize) -> Result<Vec<T>> {
        self.with_weight(|w, n| match w {
            WeightData::Bf16(w) => from_f32(bf16_gemm::matmul(as_f32(gz)?, rows, w, n, d, Product::XW)),
            WeightData::Same(w) => {
                let mut dx = vec![<T as Real>::zero(); rows * d];
                gemm_into(rows, d, n, &mut dx, 0.0, 1.0, View::rows(gz, n), View::rows(w, d), true);
                Ok(dx)
            }
        })
    }

    fn fwd<T: Real + candle_core::WithDType + 'static>(&self, x: &[T], p: &[T], s: &[T], d: usize) -> Result<Vec<T>> {
        let rows = x.len() / d;
        let xr = self.rotated(x, p, d);
        let mut z = self.product(&xr, rows, d)?;
        if self.scaled {
            scale_rows_in_place(&mut z, s);
        }
        Ok(z)
    }

    /// `(dx (rows, d), dparams, ds (n,))` for the output gradient `g (rows, n)` and output `y`.
    fn bwd_slices<T: Real + candle_core::WithDType + 'static>(&self, x: &[T], p: &[T], s: &[T], y: &[T], g: &[T], d: usize) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
        let rows = x.len() / d;
        let n = s.len();
        let (u, b, theta) = split(p, self.r, d);
        let xh = if self.r > 0 { reflect_wy_fwd(x, u, b, self.r, d, self.paired) } else { x.to_vec() };
        let (gz, ds) = if self.scaled {
            // z = y / s, or the product itself when a scale is 0, subnormal or not finite
            // (y = z s would have lost z's digits)
            let normal = |v: T| Real::to_f64(v).abs() >= f32::MIN_POSITIVE as f64 && Real::to_f64(v).is_finite();
            let z = if s.iter().all(|&v| normal(v)) {
                let mut z = y.to_vec();
                z.par_chunks_mut((64 * n).max(1)).for_each(|rows| rows.chunks_mut(n).for_each(|row| row.iter_mut().zip(s).for_each(|(v, &sj)| *v = *v / sj)));
                z
            } else {
                let xr = if self.angles > 0 { givens_fwd(&xh, theta, d, self.stages) } else { xh.clone() };
                self.product(&xr, rows, d)?
            };
            // the magnitude op's own backward: gz = g ⊙ s, ds = Σ_rows g ⊙ z (fixed chunks,
            // f64 sums in chunk order)
            scale_bwd(&z, s, g)
        } else {
            (g.to_vec(), vec![<T as Real>::zero(); n])
        };
        let dxr = self.product_t(&gz, rows, d)?;
        drop(gz);
        let (dxh, dtheta) = if self.angles > 0 { givens_bwd(&xh, theta, &dxr, d, self.stages) } else { (dxr, Vec::new()) };
        let (dx, dub) = if self.r > 0 {
            let mut all = reflect_wy_bwd(x, u, b, &dxh, self.r, d);
            let dub = all.split_off(rows * d);
            (all, dub)
        } else {
            (dxh, Vec::new())
        };
        let mut dp = dub;
        dp.extend_from_slice(&dtheta);
        Ok((dx, dp, ds))
    }
}

/// `T` slices as f32 (the bf16 kernel's activations): only for `T = f32`.
fn as_f32<T: 'static>(v: &[T]) -> Result<&[f32]> {
    if std::any::TypeId::of::<T>() != std::any::TypeId::of::<f32>() {
        candle_core::bail!("ropo product: a bf16 weight needs f32 activations");
    }
    // SAFETY: T is f32 (checked above): same size, alignment and validity.
    Ok(unsafe { std::slice::from_raw_parts(v.as_ptr() as *const f32, v.len()) })
}

/// The bf16 kernel's f32 result as `Vec<T>`: only for `T = f32`.
fn from_f32<T: 'static>(v: Vec<f32>) -> Result<Vec<T>> {
    if std::any::TypeId::of::<T>() != std::any::TypeId::of::<f32>() {
        candle_core::bail!("ropo product: a bf16 weight needs f32 activations");
    }
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: T is f32 (checked above); the buffer's pointer, length and capacity are moved
    // unchanged into a Vec of the same element type.
    Ok(unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut T, v.len(), v.capacity()) })
}

impl CustomOp3 for RopoProduct {
    fn name(&self) -> &'static str {
        "ropo-product"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, d) = l1.shape().dims2()?;
        let (n, wd) = self.w.weight.dims2()?;
        let want_p = self.r * d + self.r * self.r + self.angles;
        if wd != d || l2.shape().elem_count() != want_p || l3.shape().elem_count() != n {
            candle_core::bail!("ropo product: x ({rows}, {d}), {} parameters, {} scales do not fit W ({n}, {wd})", l2.shape().elem_count(), l3.shape().elem_count());
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(p), CpuStorage::F32(s)) => {
                CpuStorage::F32(self.fwd(data(x, l1, self.name())?, data(p, l2, self.name())?, data(s, l3, self.name())?, d)?)
            }
            (CpuStorage::F64(x), CpuStorage::F64(p), CpuStorage::F64(s)) => {
                CpuStorage::F64(self.fwd(data(x, l1, self.name())?, data(p, l2, self.name())?, data(s, l3, self.name())?, d)?)
            }
            _ => candle_core::bail!("ropo product: F32 or F64 inputs of one dtype expected"),
        };
        Ok((out, Shape::from((rows, n))))
    }

    fn bwd(&self, x: &Tensor, p: &Tensor, s: &Tensor, res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(1)?;
        let g = g.contiguous()?;
        let name = "ropo-product-bwd";
        let ((gx, lx), (gp, lp), (gs, ls), (gy, ly), (gg, lg)) = (x.storage_and_layout(), p.storage_and_layout(), s.storage_and_layout(), res.storage_and_layout(), g.storage_and_layout());
        let (Storage::Cpu(sx), Storage::Cpu(sp), Storage::Cpu(ss), Storage::Cpu(sy), Storage::Cpu(sg)) = (&*gx, &*gp, &*gs, &*gy, &*gg) else {
            candle_core::bail!("{name}: CPU tensors expected")
        };
        let dev = x.device();
        macro_rules! run {
            ($t:ty) => {{
                let (dx, dp, ds) = self.bwd_slices::<$t>(cpu_slice(sx, lx)?, cpu_slice(sp, lp)?, cpu_slice(ss, ls)?, cpu_slice(sy, ly)?, cpu_slice(sg, lg)?, d)?;
                let dp_len = dp.len();
                (Tensor::from_vec(dx, x.shape(), dev)?, Tensor::from_vec(dp, dp_len, dev)?, Tensor::from_vec(ds, s.shape(), dev)?)
            }};
        }
        let (dx, dp, ds) = match x.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            dt => candle_core::bail!("{name}: unsupported dtype {dt:?}"),
        };
        Ok((Some(dx), Some(dp), self.scaled.then_some(ds)))
    }
}

/// Whether [`RopoProduct`] serves a layer: CPU, f32/f64 activations, and a weight either bf16
/// (with f32 activations) or of the activations' dtype.
pub fn fits(x: &Tensor, w: &Tensor) -> bool {
    crate::device::cpu_kernels(&x)
        && crate::device::cpu_kernels(&w)
        && w.rank() == 2
        && !w.track_op()
        && match (x.dtype(), w.dtype()) {
            (DType::F32, DType::BF16) => true,
            (a, b) => a == b && matches!(a, DType::F32 | DType::F64),
        }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};
    use rand::{Rng, SeedableRng};

    use crate::adapter::ropo::layer::{scale_cols, RopoAdapter};
    use crate::model::linear::{Adapter, Linear};

    fn randn(dims: &[usize], seed: u64, dtype: DType) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = dims.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let scale = b.iter().fold(1e-30f64, |m, x| m.max(x.abs()));
        a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    /// At init (paired u, θ = 0, m = ρ) the fused product is the base product bit for bit, in
    /// f32 and with bf16 weights: the policy equals the reference exactly at step 0.
    #[test]
    fn identity_at_init_is_exact() {
        let (rows, d, n) = (9, 16, 6);
        for wdtype in [DType::F32, DType::BF16] {
            let adtype = DType::F32;
            let mut base = Linear::new("l", randn(&[n, d], 21, wdtype), None);
            if wdtype == DType::BF16 {
                base.pack_bf16(false).unwrap();
            }
            let a = RopoAdapter::init(&base, 4, 2, true, 5).unwrap();
            let x = randn(&[rows, d], 22, adtype);
            let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let fused = a.fused_product(&base, &x).unwrap();
            assert_eq!(bits(&fused), bits(&base.frozen_product(&x).unwrap()), "{wdtype:?}");
        }
    }

    /// The fused op against the composed chain: output and the gradients of x and every
    /// trainable tensor, for weights in f64, f32 and bf16 (f32 activations).
    #[test]
    fn fused_product_matches_the_composed_chain() {
        let (rows, d, n) = (7, 12, 5);
        for (wdtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5), (DType::BF16, 1e-5)] {
            let adtype = if wdtype == DType::BF16 { DType::F32 } else { wdtype };
            for (r, stages, magnitude, perturb) in [(4, 2, true, true), (4, 2, true, false), (0, 2, true, true), (2, 0, false, true), (0, 0, true, true)] {
                let mut base = Linear::new("l", randn(&[n, d], 1, wdtype), None);
                if wdtype == DType::BF16 {
                    base.pack_bf16(false).unwrap();
                }
                let a = RopoAdapter::init(&base, r, stages, magnitude, 3).unwrap();
                if perturb {
                    // move every parameter off its identity init
                    for (i, (_, v)) in a.trainable().into_iter().enumerate() {
                        let t = (v.as_tensor() + randn(v.dims(), 10 + i as u64, adtype).affine(0.3, 0.0).unwrap()).unwrap();
                        v.set(&t).unwrap();
                    }
                }
                let x = Var::from_tensor(&randn(&[rows, d], 2, adtype)).unwrap();
                let w = randn(&[rows, n], 4, adtype);
                let composed = {
                    let xr = a.rotate_t(x.as_tensor()).unwrap();
                    let y = base.frozen_product(&xr).unwrap();
                    match a.scale().unwrap() {
                        Some(s) => scale_cols(&y, &s).unwrap(),
                        None => y,
                    }
                };
                let fused = a.fused_product(&base, x.as_tensor()).unwrap();
                let what = format!("{wdtype:?} r={r} S={stages} m={magnitude} perturbed={perturb}");
                assert!(max_rel(&fused, &composed) <= tol, "{what} values: {:e}", max_rel(&fused, &composed));
                let gf = (&fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
                let gc = (&composed * &w).unwrap().sum_all().unwrap().backward().unwrap();
                let mut vars: Vec<(String, Var)> = a.trainable();
                vars.push(("x".into(), x.clone()));
                for (name, v) in vars {
                    let (f, c) = (gf.get(v.as_tensor()).expect("fused gradient"), gc.get(v.as_tensor()).expect("composed gradient"));
                    assert!(max_rel(f, c) <= tol, "{what} d{name}: {:e}", max_rel(f, c));
                }
            }
        }
    }
}
