//! The RoPO adapted linear layer: `y = (m / rho) ⊙ (W (R^T x)) + b`, `R = H G`.
//!
//! Spec: `../shared/docs/ropo-method.md`, "The adapted layer", "Initialization" and "Merge".
//! `W (n, d)` and `b (n,)` are the frozen base; `rho_i = ||w_i||_2` is computed once from `W`.
//! Trainable: `u (r, d)` (Householder vectors, row k = `u_{k+1}`), `theta (A,)` (all Givens
//! stages' angles concatenated in stage order, `A = givens::num_angles(d, S)`), `m (n,)`
//! (magnitude, optional). In training `R^T x` is applied on activations (reflections first,
//! `H_1` first, then Givens stages from 1); the dense `R` is built only by [`RopoAdapter::dense_r`]
//! and [`Adapter::merged`].

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor, Var, WithDType};
use rayon::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};

use super::{add_acc, cpu_slice, givens, householder, product};
use crate::model::grad::param;
use crate::model::ops::{from_rows, to_rows};
use crate::model::linear::{Adapter, Linear};

/// Name suffix of the Householder vectors: `<module path>.ropo_u`, `(r, d)`.
pub const U_SUFFIX: &str = "ropo_u";
/// Name suffix of the Givens angles: `<module path>.ropo_theta`, `(A,)`, stages concatenated.
pub const THETA_SUFFIX: &str = "ropo_theta";
/// Name suffix of the magnitudes: `<module path>.ropo_magnitude`, `(n,)`.
pub const MAGNITUDE_SUFFIX: &str = "ropo_magnitude";

/// A RoPO adapter attached to one frozen linear layer.
#[derive(Debug, Clone)]
pub struct RopoAdapter {
    /// Full module path of the wrapped linear, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    /// `d`, in_features.
    pub d_in: usize,
    /// `n`, out_features.
    pub d_out: usize,
    /// `r`, number of Householder reflections (even for the identity init; 0 allowed).
    pub householder_reflections: usize,
    /// `S`, number of brick-wall Givens stages (0 allowed).
    pub givens_stages: usize,
    /// Householder vectors `(r, d)`; `None` when `r = 0`.
    pub u: Option<Var>,
    /// Givens angles `(A,)`, stages concatenated; `None` when `S = 0` or `A = 0`.
    pub theta: Option<Var>,
    /// Magnitudes `(n,)`; `None` when magnitude is off (scale 1).
    pub magnitude: Option<Var>,
    /// Row norms of the frozen weight `(n,)`, computed once.
    pub rho: Tensor,
}

/// The per-layer initialization RNG: ChaCha20 seeded with `sha256("{seed}:{path}")`, so a
/// layer's draws depend only on the seed and its own path (not on which other layers are wrapped).
pub fn layer_rng(seed: u64, path: &str) -> ChaCha20Rng {
    let digest = Sha256::digest(format!("{seed}:{path}").as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(&digest);
    ChaCha20Rng::from_seed(key)
}

/// Row norms `||w_i||_2` of `w (n, d)`: `(n,)`, same dtype.
pub fn row_norms(w: &Tensor) -> Result<Tensor> {
    w.sqr()?.sum(1)?.sqrt()
}

impl RopoAdapter {
    /// A freshly initialized adapter for `base` (spec "Initialization"): `theta = 0`,
    /// paired `u` from [`householder::paired_init`] drawn from [`layer_rng`]`(seed, base.path)`,
    /// `m = rho`. Parameters take the dtype and device of `base.weight`.
    ///
    /// Errors: odd `r`.
    pub fn init(base: &Linear, householder_reflections: usize, givens_stages: usize, magnitude: bool, seed: u64) -> Result<Self> {
        let (_, d) = base.dims();
        let (dtype, dev) = (base.dtype(), base.weight.device());
        let u = if householder_reflections > 0 {
            let mut rng = layer_rng(seed, &base.path);
            Some(householder::paired_init(householder_reflections, d, &mut rng, dtype, dev)?)
        } else {
            None
        };
        let a = givens::num_angles(d, givens_stages);
        let theta = if a > 0 { Some(Tensor::zeros(a, dtype, dev)?) } else { None };
        let rho = row_norms(&base.weight_in_compute_dtype()?)?;
        let m = if magnitude { Some(rho.copy()?) } else { None };
        Self::from_tensors(base, householder_reflections, givens_stages, u, theta, m)
    }

    /// An adapter with the given parameter values (copied into new `Var`s, dtype kept; `rho`
    /// is computed in `base.weight`'s dtype, see [`Self::to`] to change both).
    ///
    /// `u (r, d)`, `theta (num_angles(d, S),)`, `m (n,)`; each `None` only where the
    /// configuration has no such tensor (`r = 0`, no angles, magnitude off).
    /// Errors: [`candle_core::Error`] naming the tensor (`<path>.ropo_u`) and both shapes.
    pub fn from_tensors(
        base: &Linear,
        householder_reflections: usize,
        givens_stages: usize,
        u: Option<Tensor>,
        theta: Option<Tensor>,
        magnitude: Option<Tensor>,
    ) -> Result<Self> {
        let (n, d) = base.dims();
        let a = givens::num_angles(d, givens_stages);
        let path = base.path.clone();
        let check = |t: Option<Tensor>, suffix: &str, want: Option<Vec<usize>>| -> Result<Option<Var>> {
            match (t, want) {
                (None, None) => Ok(None),
                (Some(t), Some(w)) if t.dims() == w.as_slice() => Ok(Some(Var::from_tensor(&t)?)),
                (Some(t), Some(w)) => {
                    candle_core::bail!("shape mismatch for {path}.{suffix}: expected {w:?}, got {:?}", t.dims())
                }
                (None, Some(w)) => candle_core::bail!("missing tensor {path}.{suffix} (expected shape {w:?})"),
                (Some(t), None) => {
                    candle_core::bail!("unexpected tensor {path}.{suffix} {:?}: the configuration has none", t.dims())
                }
            }
        };
        let u = check(u, U_SUFFIX, (householder_reflections > 0).then(|| vec![householder_reflections, d]))?;
        let theta = check(theta, THETA_SUFFIX, (a > 0).then(|| vec![a]))?;
        let want_m = magnitude.is_some().then(|| vec![n]);
        let magnitude = check(magnitude, MAGNITUDE_SUFFIX, want_m)?;
        Ok(Self {
            path,
            d_in: d,
            d_out: n,
            householder_reflections,
            givens_stages,
            u,
            theta,
            magnitude,
            rho: row_norms(&base.weight_in_compute_dtype()?)?,
        })
    }

    /// `R^T x = G_S^T ··· G_1^T H_r ··· H_1 x` for every row of `x (..., d)` (fast paths: WY
    /// Householder, fused Givens).
    pub fn rotate_t(&self, x: &Tensor) -> Result<Tensor> {
        let x = match &self.u {
            Some(u) => householder::reflect(x, &param(u))?,
            None => x.clone(),
        };
        match &self.theta {
            Some(t) => givens::rotate_t(&x, &param(t), self.givens_stages),
            None => Ok(x),
        }
    }

    /// The same map as [`Self::rotate_t`] through the reference paths (rank-1 Householder,
    /// composed Givens), for tests and benches.
    pub fn rotate_t_reference(&self, x: &Tensor) -> Result<Tensor> {
        let x = match &self.u {
            Some(u) => householder::reflect_rank1(x, &param(u))?,
            None => x.clone(),
        };
        match &self.theta {
            Some(t) => givens::rotate_t_reference(&x, &param(t), self.givens_stages),
            None => Ok(x),
        }
    }

    /// `(m / rho) ⊙ (W (R^T x))` for rows `x (rows, d)` as one op ([`product::RopoProduct`]:
    /// nothing but the output kept for the backward). Same map and gradients as the composed
    /// [`Self::rotate_t`], `Linear::frozen_product`, [`scale_cols`] (to rounding).
    pub fn fused_product(&self, base: &Linear, x: &Tensor) -> Result<Tensor> {
        let (dtype, dev) = (x.dtype(), x.device());
        let mut parts = Vec::with_capacity(3);
        let (r, paired) = match &self.u {
            Some(u) => {
                let u = param(u);
                parts.push(u.flatten_all()?);
                parts.push(householder::wy_t_inv(&u)?.flatten_all()?);
                (u.dim(0)?, householder::is_exactly_paired(&u)?)
            }
            None => (0, false),
        };
        let angles = match &self.theta {
            Some(t) => {
                parts.push(param(t));
                t.elem_count()
            }
            None => 0,
        };
        let params = if parts.is_empty() { Tensor::zeros(0, dtype, dev)? } else { Tensor::cat(&parts, 0)? };
        let (scale, scaled) = match self.scale()? {
            Some(s) => (s, true),
            None => (Tensor::ones(self.d_out, dtype, dev)?, false),
        };
        let w = product::FrozenWeight { weight: base.weight.contiguous()?, packed: base.packed.clone() };
        let op = product::RopoProduct { w, r, stages: self.givens_stages, angles, paired, scaled };
        x.contiguous()?.apply_op3(&params.contiguous()?, &scale.contiguous()?, op)
    }

    /// The dense `R = H G`, `(d, d)`, in the parameters' dtype (merge and tests only).
    ///
    /// Built as `rotate_t(I)`: row n is `(R^T e_n)^T`, i.e. row n of `R`.
    pub fn dense_r(&self) -> Result<Tensor> {
        let (dtype, dev) = (self.rho.dtype(), self.rho.device());
        self.rotate_t(&Tensor::eye(self.d_in, dtype, dev)?)
    }

    /// The per-neuron scale `m / rho`, `(n,)`; `None` when magnitude is off.
    pub fn scale(&self) -> Result<Option<Tensor>> {
        match &self.magnitude {
            Some(m) => Ok(Some(param(m).div(&self.rho)?)),
            None => Ok(None),
        }
    }

    /// Trainable parameter count: `r·d + A + n` (the last only with magnitude on).
    pub fn num_trainable(&self) -> usize {
        self.trainable().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The adapter's parameters moved to `dtype` / `device` (new `Var`s; `rho` recomputed from `base`).
    pub fn to(&self, base: &Linear, dtype: DType, dev: &Device) -> Result<Self> {
        let mv = |v: &Option<Var>| -> Result<Option<Tensor>> {
            v.as_ref().map(|v| v.as_tensor().to_device(dev)?.to_dtype(dtype)).transpose()
        };
        let mut out = Self::from_tensors(base, self.householder_reflections, self.givens_stages, mv(&self.u)?, mv(&self.theta)?, mv(&self.magnitude)?)?;
        out.rho = row_norms(&base.weight.to_device(dev)?.to_dtype(dtype)?)?;
        Ok(out)
    }
}

/// `y ⊙ s` for `y (rows, n)` and `s (n,)` (each column j scaled by `s_j`): the magnitude.
///
/// On the CPU in f32/f64 a fused op ([`ScaleCols`]) whose backward is a single pass
/// (`dy = g ⊙ s`, `ds_j = Σ_rows g_rj y_rj`, accumulated in f64); candle's `broadcast_mul`
/// backward reduces over the broadcast dimension with slow strided sums. Elsewhere `broadcast_mul`.
pub fn scale_cols(y: &Tensor, s: &Tensor) -> Result<Tensor> {
    let n = s.dims1()?;
    let fused = crate::device::cpu_kernels(&y) && matches!(y.dtype(), DType::F32 | DType::F64) && y.dtype() == s.dtype();
    if !fused || y.dims().last() != Some(&n) || y.elem_count() == 0 {
        return y.broadcast_mul(s);
    }
    let (y2, dims) = to_rows(y)?;
    from_rows(&y2.contiguous()?.apply_op2(&s.contiguous()?, ScaleCols)?, &dims)
}

/// The fused column scaling of [`scale_cols`]; forward and backward side by side. The forward
/// saves nothing (the backward reads `y` and `s`, its inputs).
#[derive(Debug, Clone, Copy)]
pub struct ScaleCols;

fn scale_fwd<T: WithDType>(y: &[T], s: &[T]) -> Vec<T> {
    let mut out = y.to_vec();
    scale_rows_in_place(&mut out, s);
    out
}

/// Every row of `y (rows, n)` times `s (n,)` in place, rows in parallel (64 a task).
pub(super) fn scale_rows_in_place<T: WithDType>(y: &mut [T], s: &[T]) {
    let n = s.len();
    y.par_chunks_mut(n * 64).for_each(|rows| {
        for row in rows.chunks_mut(n) {
            row.iter_mut().zip(s).for_each(|(v, &sj)| *v *= sj);
        }
    });
}

/// `(g ⊙ s, Σ_rows g ⊙ y)` of [`ScaleCols`] for its input `y (rows, n)` and output gradient
/// `g`: the column sums in f64 over fixed 64-row chunks, added in chunk order (bit-identical
/// for any thread count).
pub(super) fn scale_bwd<T: WithDType>(y: &[T], s: &[T], g: &[T]) -> (Vec<T>, Vec<T>) {
    let n = s.len();
    let gy = scale_fwd(g, s);
    let gs = y
        .par_chunks(n * 64)
        .zip(g.par_chunks(n * 64))
        .map(|(ys, gs)| {
            let mut acc = vec![0f64; n];
            for (yr, gr) in ys.chunks(n).zip(gs.chunks(n)) {
                for j in 0..n {
                    acc[j] += (yr[j] * gr[j]).to_f64();
                }
            }
            acc
        })
        // collected in chunk order, then summed in that order: rayon's `reduce` associates the
        // partial sums by its (adaptive, run-dependent) splits, which breaks bit-identical runs
        .collect::<Vec<_>>()
        .into_iter()
        .fold(vec![0f64; n], add_acc);
    (gy, gs.into_iter().map(T::from_f64).collect())
}

impl CustomOp2 for ScaleCols {
    fn name(&self) -> &'static str {
        "ropo-scale-cols"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(scale_fwd(cpu_slice::<f32>(s1, l1)?, cpu_slice::<f32>(s2, l2)?)),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(scale_fwd(cpu_slice::<f64>(s1, l1)?, cpu_slice::<f64>(s2, l2)?)),
            _ => candle_core::bail!("scale op: y and s must both be f32 or both f64"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, y: &Tensor, s: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        fn run<T: WithDType>(y: &Tensor, s: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let (rows, n) = y.dims2()?;
            let (gy, gs) = scale_bwd(&y.flatten_all()?.to_vec1::<T>()?, &s.to_vec1::<T>()?, &g.flatten_all()?.to_vec1::<T>()?);
            Ok((Some(Tensor::from_vec(gy, (rows, n), y.device())?), Some(Tensor::from_vec(gs, n, y.device())?)))
        }
        match y.dtype() {
            DType::F32 => run::<f32>(y, s, g),
            DType::F64 => run::<f64>(y, s, g),
            dt => candle_core::bail!("scale op: unsupported dtype {dt:?}"),
        }
    }
}

impl Adapter for RopoAdapter {
    /// `y = (m / rho) ⊙ (W (R^T x)) + b` for `x (..., d)`; returns `(..., n)`.
    fn forward(&self, base: &Linear, x: &Tensor) -> Result<Tensor> {
        if crate::model::ops::fused_layer_ops() && x.rank() == 2 && product::fits(x, &base.weight) {
            let y = self.fused_product(base, x)?;
            return match &base.bias {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            };
        }
        let xr = self.rotate_t(x)?;
        let mut y = base.frozen_product(&xr)?;
        if let Some(s) = self.scale()? {
            y = scale_cols(&y, &s)?;
        }
        match &base.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// `W' = diag(m / rho) W R^T` (row i: `(m_i / rho_i) R w_i`), bias unchanged; computed in
    /// f64 and returned in `W`'s dtype.
    fn merged(&self, base: &Linear) -> Result<(Tensor, Option<Tensor>)> {
        let dtype = base.dtype();
        let f = self.to(base, DType::F64, base.weight.device())?;
        let w = base.weight.to_dtype(DType::F64)?;
        let r = f.dense_r()?;
        let mut w2 = w.matmul(&r.t()?)?;
        if let Some(s) = f.scale()? {
            w2 = w2.broadcast_mul(&s.unsqueeze(1)?)?;
        }
        Ok((w2.to_dtype(dtype)?, base.bias.clone()))
    }

    /// `[<path>.ropo_u, <path>.ropo_theta, <path>.ropo_magnitude]`, omitting absent ones.
    fn trainable(&self) -> Vec<(String, Var)> {
        let mut out = Vec::with_capacity(3);
        for (suffix, v) in [(U_SUFFIX, &self.u), (THETA_SUFFIX, &self.theta), (MAGNITUDE_SUFFIX, &self.magnitude)] {
            if let Some(v) = v {
                out.push((format!("{}.{suffix}", self.path), v.clone()));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Inside no_grad the adapted forward gives the same values bit for bit and builds no graph:
    // backward reaches none of u, theta, m (so an evaluation forward holds no activations).
    #[test]
    fn no_grad_forward_is_identical_and_untracked() {
        let dev = Device::Cpu;
        let w = Tensor::arange(0.0f32, 48.0, &dev).unwrap().reshape((6, 8)).unwrap().sin().unwrap();
        let base = Linear::new("l", w, None);
        let mut a = RopoAdapter::init(&base, 2, 2, true, 3).unwrap();
        let angles = Tensor::arange(0.0f32, givens::num_angles(8, 2) as f32, &dev).unwrap().affine(0.1, 0.0).unwrap();
        a.theta = Some(Var::from_tensor(&angles).unwrap());
        let x = Tensor::arange(0.0f32, 24.0, &dev).unwrap().reshape((3, 8)).unwrap().cos().unwrap();
        let tracked = a.forward(&base, &x).unwrap();
        let free = crate::model::grad::no_grad(|| a.forward(&base, &x)).unwrap();
        assert_eq!(tracked.to_vec2::<f32>().unwrap(), free.to_vec2::<f32>().unwrap());
        let g = tracked.sum_all().unwrap().backward().unwrap();
        let g0 = free.sum_all().unwrap().backward().unwrap();
        for (name, v) in a.trainable() {
            assert!(g.get(v.as_tensor()).is_some(), "{name}: tracked forward reaches it");
            assert!(g0.get(v.as_tensor()).is_none(), "{name}: no_grad forward must not reach it");
        }
    }

    // The fused column scaling equals broadcast_mul, values and both gradients.
    #[test]
    fn scale_cols_matches_broadcast_mul() {
        let dev = Device::Cpu;
        let y = Var::from_tensor(&Tensor::arange(0.0f64, 300.0, &dev).unwrap().reshape((2, 30, 5)).unwrap().cos().unwrap()).unwrap();
        let s = Var::from_vec(vec![0.5f64, -1.0, 2.0, 3.0, 0.25], 5, &dev).unwrap();
        let w = Tensor::arange(0.0f64, 300.0, &dev).unwrap().reshape((2, 30, 5)).unwrap().sin().unwrap();
        let a = scale_cols(y.as_tensor(), s.as_tensor()).unwrap();
        let b = y.as_tensor().broadcast_mul(s.as_tensor()).unwrap();
        let diff = |p: &Tensor, q: &Tensor| (p - q).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
        assert!(diff(&a, &b) < 1e-15);
        let ga = (&a * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&b * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(diff(ga.get(&y).unwrap(), gb.get(&y).unwrap()) < 1e-14);
        assert!(diff(ga.get(&s).unwrap(), gb.get(&s).unwrap()) < 1e-12);
    }
}
