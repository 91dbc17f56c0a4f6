//! Brick-wall Givens rotations on activations: the fine-grained part `G = G_1 ··· G_S` of `R = H G`.
//!
//! Spec: `../shared/docs/ropo-method.md`, "The adapted layer". Stage `s` (1-based) rotates
//! disjoint coordinate pairs `(p, p+1)`: `p = 0, 2, 4, …` when `s` is odd (`floor(d/2)` angles),
//! `p = 1, 3, 5, …` when `s` is even (`floor((d-1)/2)` angles); angle k of a stage belongs to the
//! stage's k-th pair. `G_s` maps `x_p' = cos θ x_p - sin θ x_q`, `x_q' = sin θ x_p + cos θ x_q`;
//! coordinates in no pair are left alone.
//!
//! Angle layout (this project's choice, recorded in the adapter config): ONE vector `theta` of
//! length [`num_angles`] holding all stages' angles concatenated in stage order
//! (stage 1's, then stage 2's, …), see [`stage_ranges`].
//!
//! On activations the layer needs `G^T x = G_S^T ··· G_1^T x` (stage 1 first, angles negated),
//! never a d x d matrix in training. Two implementations:
//! - [`rotate_t_reference`]: composed of candle ops (narrow / reshape / stack / cat). Correct but
//!   slow in backward (single-threaded strided elementwise ops; ~10x a 576x576 linear).
//! - [`rotate_t`]: a fused op ([`GivensT`]) with its forward and backward written out, rows in
//!   parallel; used on the CPU in f32/f64, falls back to the reference elsewhere.
//!
//! The dense `G` is for merging only ([`dense`]).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor, WithDType, D};
use rayon::prelude::*;

use super::{add_acc, cpu_slice, givens_simd, rows_per_task};
use crate::model::ops::reshaped;

/// Offset of stage `s`'s first pair: 0 for odd stages, 1 for even ones (`s` is 1-based).
pub fn stage_offset(s: usize) -> usize {
    if s % 2 == 1 {
        0
    } else {
        1
    }
}

/// Number of angles of stage `s` (1-based) for dimension `d`: `floor((d - offset) / 2)`.
pub fn stage_len(d: usize, s: usize) -> usize {
    d.saturating_sub(stage_offset(s)) / 2
}

/// `(start, len)` of each stage's angles inside the concatenated `theta`, stages 1..=S.
pub fn stage_ranges(d: usize, stages: usize) -> Vec<(usize, usize)> {
    let mut start = 0;
    (1..=stages)
        .map(|s| {
            let len = stage_len(d, s);
            let r = (start, len);
            start += len;
            r
        })
        .collect()
}

/// Total number of Givens angles for `stages` brick-wall stages at dimension `d`.
pub fn num_angles(d: usize, stages: usize) -> usize {
    (1..=stages).map(|s| stage_len(d, s)).sum()
}

/// `G_s^T x` for rows `x (N, d)`, stage angles `angles (k,)`, first pair at `offset`.
///
/// Pair `(p, q)` with angle θ: `x_p' = cos θ x_p + sin θ x_q`, `x_q' = -sin θ x_p + cos θ x_q`.
fn stage_t(x: &Tensor, angles: &Tensor, offset: usize) -> Result<Tensor> {
    let (rows, d) = x.dims2()?;
    let k = angles.dim(0)?;
    if k == 0 {
        return Ok(x.clone());
    }
    let mid = x.narrow(1, offset, 2 * k)?.reshape((rows, k, 2))?; // (N, k, 2)
    let a = mid.narrow(2, 0, 1)?.squeeze(2)?; // x_p, (N, k)
    let b = mid.narrow(2, 1, 1)?.squeeze(2)?; // x_q, (N, k)
    let c = angles.cos()?.unsqueeze(0)?; // (1, k)
    let s = angles.sin()?.unsqueeze(0)?;
    let a2 = (a.broadcast_mul(&c)? + b.broadcast_mul(&s)?)?;
    let b2 = (b.broadcast_mul(&c)? - a.broadcast_mul(&s)?)?;
    let mid2 = Tensor::stack(&[a2, b2], 2)?.reshape((rows, 2 * k))?; // (N, k, 2) -> (N, 2k)
    let tail = d - offset - 2 * k;
    let mut parts = Vec::with_capacity(3);
    if offset > 0 {
        parts.push(x.narrow(1, 0, offset)?);
    }
    parts.push(mid2);
    if tail > 0 {
        parts.push(x.narrow(1, offset + 2 * k, tail)?);
    }
    Tensor::cat(&parts, 1)
}

/// Check `theta`'s length for `x (..., d)`; returns `(rows, d)`.
fn check(x: &Tensor, theta: &Tensor, stages: usize) -> Result<(usize, usize)> {
    let dims = x.dims();
    let d = x.dim(D::Minus1)?;
    let want = num_angles(d, stages);
    let got = theta.dims1()?;
    if got != want {
        candle_core::bail!("givens: theta has {got} angles, {stages} stages at d={d} need {want}");
    }
    Ok((dims[..dims.len() - 1].iter().product(), d))
}

/// `G_S^T ··· G_1^T x` for every row of `x (..., d)`; `theta (num_angles(d, stages),)`, same dtype.
///
/// The fast path: on the CPU in f32/f64 a fused [`GivensT`] op (hand-written forward and
/// backward, rows in parallel); elsewhere [`rotate_t_reference`]. `stages = 0` returns `x`.
/// Errors: `theta` of the wrong length.
pub fn rotate_t(x: &Tensor, theta: &Tensor, stages: usize) -> Result<Tensor> {
    if stages == 0 {
        return Ok(x.clone());
    }
    let (rows, d) = check(x, theta, stages)?;
    let fused = crate::device::cpu_kernels(&x) && matches!(x.dtype(), DType::F32 | DType::F64) && x.dtype() == theta.dtype();
    if !fused || rows == 0 || theta.dim(0)? == 0 {
        return rotate_t_reference(x, theta, stages);
    }
    let xf = reshaped(x, &[rows, d])?.contiguous()?;
    reshaped(&xf.apply_op2(&theta.contiguous()?, GivensT { stages })?, x.dims())
}

/// `G_S^T ··· G_1^T x` composed of candle ops (narrow / stack / cat): the reference path,
/// differentiable through candle's autograd. Same contract as [`rotate_t`].
pub fn rotate_t_reference(x: &Tensor, theta: &Tensor, stages: usize) -> Result<Tensor> {
    if stages == 0 {
        return Ok(x.clone());
    }
    let dims = x.dims().to_vec();
    let (rows, d) = check(x, theta, stages)?;
    let mut xf = x.reshape((rows, d))?;
    for (s, (start, len)) in stage_ranges(d, stages).into_iter().enumerate() {
        xf = stage_t(&xf, &theta.narrow(0, start, len)?, stage_offset(s + 1))?;
    }
    xf.reshape(dims)
}

/// The stages' `(offset of the first pair, number of pairs, start in theta)`.
fn plan(d: usize, stages: usize) -> Vec<(usize, usize, usize)> {
    stage_ranges(d, stages).into_iter().enumerate().map(|(s, (start, len))| (stage_offset(s + 1), len, start)).collect()
}

/// The fused `G^T x` op for `x (rows, d)` contiguous and `theta (A,)`, f32 or f64 on the CPU.
///
/// Forward: per row, stage 1..S, pair `(p, q)`: `x_p' = c x_p + s x_q`, `x_q' = -s x_p + c x_q`
/// (`G_s^T`: angle `-θ`). Backward (beside it, [`givens_bwd`]): the forward is recomputed per row
/// keeping each stage's output `z'`; walking stages S..1 with the incoming gradient `g'`:
/// `dL/dθ += g'_p z'_q - g'_q z'_p` (since `dz'_p/dθ = z'_q`, `dz'_q/dθ = -z'_p`), then
/// `g <- G_s g'` (`g_p = c g'_p - s g'_q`, `g_q = s g'_p + c g'_q`). Nothing is saved by the
/// forward; the angle gradient is accumulated in f64.
#[derive(Debug, Clone, Copy)]
pub struct GivensT {
    /// S, the number of stages.
    pub stages: usize,
}

/// `T` slices as f32 when `T` is f32 (the vector loops of [`givens_simd`] are f32 only).
fn as_f32_mut<T: 'static>(v: &mut [T]) -> Option<&mut [f32]> {
    // SAFETY: T is f32 (checked): same size, alignment and validity.
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()).then(|| unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut f32, v.len()) })
}

/// `T` slices as f32 when `T` is f32.
fn as_f32<T: 'static>(v: &[T]) -> Option<&[f32]> {
    // SAFETY: T is f32 (checked): same size, alignment and validity.
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()).then(|| unsafe { std::slice::from_raw_parts(v.as_ptr() as *const f32, v.len()) })
}

/// `G_s^T` (`sign = 1`) or `G_s` (`sign = -1`) on one row, in place; f32 through the vector
/// loop of [`givens_simd::rotate_row`] (the same bits).
#[inline]
fn rotate_row<T: WithDType>(row: &mut [T], cos: &[T], sin: &[T], off: usize, sign: T) {
    if let (Some(r), Some(c), Some(s)) = (as_f32_mut(row), as_f32(cos), as_f32(sin)) {
        return givens_simd::rotate_row(r, c, s, off, sign.to_f64() as f32);
    }
    for (k, (&c, &s)) in cos.iter().zip(sin).enumerate() {
        let p = off + 2 * k;
        let (a, b) = (row[p], row[p + 1]);
        let s = s * sign;
        row[p] = c * a + s * b;
        row[p + 1] = c * b - s * a;
    }
}

pub(crate) fn givens_fwd<T: WithDType>(x: &[T], theta: &[T], d: usize, stages: usize) -> Vec<T> {
    let plan = plan(d, stages);
    let cos: Vec<T> = theta.iter().map(|t| T::from_f64(t.to_f64().cos())).collect();
    let sin: Vec<T> = theta.iter().map(|t| T::from_f64(t.to_f64().sin())).collect();
    let mut out = x.to_vec();
    let chunk = rows_per_task(x.len() / d) * d;
    out.par_chunks_mut(chunk).for_each(|rows| {
        for row in rows.chunks_mut(d) {
            for &(off, len, start) in &plan {
                rotate_row(row, &cos[start..start + len], &sin[start..start + len], off, T::one());
            }
        }
    });
    out
}

/// Gradients of `sum(g ⊙ G^T x)`: `(dL/dx (rows*d), dL/dθ (A))`.
pub(crate) fn givens_bwd<T: WithDType>(x: &[T], theta: &[T], g: &[T], d: usize, stages: usize) -> (Vec<T>, Vec<T>) {
    let plan = plan(d, stages);
    let a = theta.len();
    let cos: Vec<T> = theta.iter().map(|t| T::from_f64(t.to_f64().cos())).collect();
    let sin: Vec<T> = theta.iter().map(|t| T::from_f64(t.to_f64().sin())).collect();
    let mut gx = g.to_vec();
    let chunk = rows_per_task(x.len() / d) * d;
    let dtheta = gx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .map(|(grows, xrows)| {
            let mut acc = vec![0f64; a];
            let mut outs = vec![T::zero(); stages * d]; // z'_s for s = 1..S
            let mut z = vec![T::zero(); d];
            for (grow, xrow) in grows.chunks_mut(d).zip(xrows.chunks(d)) {
                z.copy_from_slice(xrow);
                for (s, &(off, len, start)) in plan.iter().enumerate() {
                    rotate_row(&mut z, &cos[start..start + len], &sin[start..start + len], off, T::one());
                    outs[s * d..(s + 1) * d].copy_from_slice(&z);
                }
                for (s, &(off, len, start)) in plan.iter().enumerate().rev() {
                    let zs = &outs[s * d..(s + 1) * d];
                    match (as_f32(grow), as_f32(zs)) {
                        (Some(g), Some(z)) => givens_simd::add_dtheta(&mut acc[start..start + len], g, z, off),
                        _ => {
                            for k in 0..len {
                                let p = off + 2 * k;
                                acc[start + k] += (grow[p] * zs[p + 1] - grow[p + 1] * zs[p]).to_f64();
                            }
                        }
                    }
                    rotate_row(grow, &cos[start..start + len], &sin[start..start + len], off, T::zero() - T::one());
                }
            }
            acc
        })
        // collected in chunk order, then summed in that order: rayon's `reduce` associates the
        // partial sums by its (adaptive, run-dependent) splits, which breaks bit-identical runs
        .collect::<Vec<_>>()
        .into_iter()
        .fold(vec![0f64; a], add_acc);
    (gx, dtheta.into_iter().map(T::from_f64).collect())
}

impl CustomOp2 for GivensT {
    fn name(&self) -> &'static str {
        "ropo-givens-t"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, d) = l1.shape().dims2()?;
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(givens_fwd(cpu_slice::<f32>(s1, l1)?, cpu_slice::<f32>(s2, l2)?, d, self.stages))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(givens_fwd(cpu_slice::<f64>(s1, l1)?, cpu_slice::<f64>(s2, l2)?, d, self.stages))
            }
            _ => candle_core::bail!("givens op: x and theta must both be f32 or both f64"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, theta: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        fn run<T: WithDType>(op: &GivensT, x: &Tensor, theta: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let (rows, d) = x.dims2()?;
            let (x, theta, g) = (x.contiguous()?, theta.contiguous()?, g.contiguous()?);
            // the storages read in place (no host copies of x and g)
            let ((sx, lx), (st, lt), (sg, lg)) = (x.storage_and_layout(), theta.storage_and_layout(), g.storage_and_layout());
            let (Storage::Cpu(sx), Storage::Cpu(st), Storage::Cpu(sg)) = (&*sx, &*st, &*sg) else {
                candle_core::bail!("givens op: CPU tensors expected")
            };
            let (gx, gt) = givens_bwd(cpu_slice::<T>(sx, lx)?, cpu_slice::<T>(st, lt)?, cpu_slice::<T>(sg, lg)?, d, op.stages);
            let a = gt.len();
            Ok((Some(Tensor::from_vec(gx, (rows, d), x.device())?), Some(Tensor::from_vec(gt, a, x.device())?)))
        }
        match x.dtype() {
            DType::F32 => run::<f32>(self, x, theta, g),
            DType::F64 => run::<f64>(self, x, theta, g),
            dt => candle_core::bail!("givens op: unsupported dtype {dt:?}"),
        }
    }
}

/// The dense `G = G_1 ··· G_S`, `(d, d)`, for merging only.
///
/// Built as `rotate_t(I)`: row n of the result is `(G^T e_n)^T`, i.e. row n of `G`.
pub fn dense(theta: &Tensor, d: usize, stages: usize) -> Result<Tensor> {
    rotate_t(&Tensor::eye(d, theta.dtype(), theta.device())?, theta, stages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
    }

    #[test]
    fn stage_sizes_follow_the_brick_wall() {
        // d=8: stage 1 pairs (0,1)(2,3)(4,5)(6,7); stage 2 pairs (1,2)(3,4)(5,6)
        assert_eq!(stage_ranges(8, 3), vec![(0, 4), (4, 3), (7, 4)]);
        // d=7: stage 1 (0,1)(2,3)(4,5); stage 2 (1,2)(3,4)(5,6)
        assert_eq!(stage_ranges(7, 2), vec![(0, 3), (3, 3)]);
        assert_eq!(num_angles(1, 2), 0);
        assert_eq!(num_angles(576, 2), 288 + 287);
    }

    // One angle on pair (0,1) of stage 1: G e_0 = (cos, sin), so G^T x = (c x0 + s x1, -s x0 + c x1).
    #[test]
    fn single_rotation_by_hand() {
        let dev = Device::Cpu;
        let th = 0.3f64;
        let theta = Tensor::new(&[th, 0.0], &dev).unwrap(); // d=5, S=1: 2 angles
        let x = Tensor::new(&[[1.0f64, 2.0, 3.0, 4.0, 5.0]], &dev).unwrap();
        let y = rotate_t(&x, &theta, 1).unwrap().to_vec2::<f64>().unwrap();
        let (c, s) = (th.cos(), th.sin());
        let want = [c * 1.0 + s * 2.0, -s * 1.0 + c * 2.0, 3.0, 4.0, 5.0];
        for (a, b) in y[0].iter().zip(want) {
            assert!((a - b).abs() < 1e-15);
        }
        let g = dense(&theta, 5, 1).unwrap().to_vec2::<f64>().unwrap();
        assert!((g[0][0] - c).abs() < 1e-15 && (g[0][1] + s).abs() < 1e-15);
        assert!((g[1][0] - s).abs() < 1e-15 && (g[1][1] - c).abs() < 1e-15);
    }

    // Orthogonality and gradients flow into every angle of every stage.
    #[test]
    fn orthogonal_and_differentiable() {
        let dev = Device::Cpu;
        let d = 9;
        let n = num_angles(d, 3);
        let vals: Vec<f64> = (0..n).map(|i| 0.1 + 0.37 * i as f64).collect();
        let theta = Var::from_vec(vals, n, &dev).unwrap();
        let g = dense(theta.as_tensor(), d, 3).unwrap();
        let eye = Tensor::eye(d, DType::F64, &dev).unwrap();
        assert!(max_abs(&g.t().unwrap().matmul(&g).unwrap(), &eye) < 1e-14);
        let x = Tensor::arange(0.0f64, 27.0, &dev).unwrap().reshape((3, d)).unwrap();
        let y = rotate_t(&x, theta.as_tensor(), 3).unwrap();
        assert!(max_abs(&y, &x.matmul(&g).unwrap()) < 1e-12);
        let w = Tensor::arange(1.0f64, 28.0, &dev).unwrap().reshape((3, d)).unwrap().sin().unwrap();
        let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gt = grads.get(&theta).expect("no gradient for theta").to_vec1::<f64>().unwrap();
        assert!(gt.iter().all(|v| v.abs() > 1e-9), "some angle got no gradient: {gt:?}");
    }

    // The fused op and the composed reference agree in values and in both gradients (f64 and f32).
    #[test]
    fn fused_matches_reference() {
        let dev = Device::Cpu;
        for (d, stages, rows) in [(9, 3, 5), (8, 2, 7), (576, 2, 33), (2, 4, 3)] {
            let a = num_angles(d, stages);
            let theta = Var::from_vec((0..a).map(|i| (i as f64 * 0.731).sin() * 2.0).collect::<Vec<_>>(), a, &dev).unwrap();
            let x = Var::from_vec((0..rows * d).map(|i| (i as f64 * 0.37).cos()).collect::<Vec<_>>(), (rows, d), &dev).unwrap();
            let w = Tensor::arange(0.0f64, (rows * d) as f64, &dev).unwrap().reshape((rows, d)).unwrap().sin().unwrap();
            let yf = rotate_t(x.as_tensor(), theta.as_tensor(), stages).unwrap();
            let yr = rotate_t_reference(x.as_tensor(), theta.as_tensor(), stages).unwrap();
            assert!(max_abs(&yf, &yr) < 1e-13, "values d={d}");
            let gf = (&yf * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gr = (&yr * &w).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(max_abs(gf.get(&x).unwrap(), gr.get(&x).unwrap()) < 1e-12, "dx d={d}");
            assert!(max_abs(gf.get(&theta).unwrap(), gr.get(&theta).unwrap()) < 1e-10, "dtheta d={d}");
            // f32
            let (x32, t32) = (x.to_dtype(DType::F32).unwrap(), theta.to_dtype(DType::F32).unwrap());
            let (t32v, x32v) = (Var::from_tensor(&t32).unwrap(), Var::from_tensor(&x32).unwrap());
            let w32 = w.to_dtype(DType::F32).unwrap();
            let yf = rotate_t(x32v.as_tensor(), t32v.as_tensor(), stages).unwrap();
            let yr = rotate_t_reference(x32v.as_tensor(), t32v.as_tensor(), stages).unwrap();
            assert!(max_abs(&yf, &yr) < 1e-5);
            let gf = (&yf * &w32).unwrap().sum_all().unwrap().backward().unwrap();
            let gr = (&yr * &w32).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(max_abs(gf.get(&t32v).unwrap(), gr.get(&t32v).unwrap()) < 1e-3);
        }
    }
}
