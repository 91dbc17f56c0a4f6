//! Householder reflections on activations: the global part `H = H_1 H_2 ··· H_r` of `R = H G`.
//!
//! Spec: `../shared/docs/ropo-method.md`, "The adapted layer" and "On activations".
//! `H_k = I - 2 u_k u_k^T / (u_k^T u_k)`, `u` of shape `(r, d)` (row k = `u_{k+1}`).
//! On activations the layer needs `H^T x = H_r ··· H_1 x` (each `H_k` is symmetric), i.e.
//! `H_1` is applied first.
//!
//! Differentiable implementations (so `backward` flows into `u`), tested to agree in values
//! and gradients:
//! - [`reflect_rank1`]: the plain reference, r rank-1 updates `x <- x - (2 u·x / u·u) u`.
//! - [`reflect`]: the compact WY form (Schreiber & Parlett 1988; Joffrain et al. 2006,
//!   "Accumulating Householder transformations, revisited"):
//!   `H_1 ··· H_r = I - U^T T^{-1} U`, `T = striu(U U^T) + diag(U U^T) / 2` (upper triangular,
//!   r x r), so for activations stored as rows `X (N, d)`:
//!   `X H = X - ((X U^T) T^{-1}) U`. Two thin matmuls instead of r dependent rank-1 steps;
//!   measured 1.5-2x faster in backward (`../shared/docs/candle-notes.md`); here ~1 ms vs
//!   ~39 ms forward+backward at 512 x 576, r = 4, one thread. On the CPU it runs as one op
//!   ([`ReflectWy`], thin gemms on slices, the backward written out, nothing saved but the
//!   output): 1.15 ms vs 1.60 ms for the composed candle ops ([`reflect_composed`]) forward +
//!   backward at 512 x 576, r = 4, 2 threads (`cargo bench --bench adapter -- householder`).
//!   `T^{-1}` is formed by a finite Neumann series, exact because `D^{-1} N` is nilpotent.
//!
//! The dense `H` (d x d) is for merging only ([`dense`]).

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor, D};
use rand::Rng;
use rand_distr::{Distribution, Normal};

use crate::model::ops::{data, dispatch, from_rows, fused_layer_ops, to_rows, Real};
use crate::model::slice_gemm::{gemm_into, View};

/// Check `u` is `(r, d)` with `d` = the last dim of `x`.
fn check(x: &Tensor, u: &Tensor) -> Result<usize> {
    let (r, d) = u.dims2()?;
    let dx = x.dim(D::Minus1)?;
    if d != dx {
        candle_core::bail!("householder: u has shape ({r}, {d}) but x has last dim {dx}");
    }
    Ok(r)
}

/// `H_r ··· H_1 x` for every row `x` of `x (..., d)`, by r rank-1 updates (the reference path).
///
/// `u`: `(r, d)`, same dtype as `x`; `r = 0` returns `x`. Returns `(..., d)`.
/// Step k (H_k, k = 1..r): `x <- x - (2 (x·u_k) / (u_k·u_k)) u_k`.
pub fn reflect_rank1(x: &Tensor, u: &Tensor) -> Result<Tensor> {
    let r = check(x, u)?;
    if r == 0 {
        return Ok(x.clone());
    }
    let (mut xf, dims) = to_rows(x)?;
    for k in 0..r {
        let uk = u.narrow(0, k, 1)?; // (1, d)
        let uu = uk.sqr()?.sum_all()?; // scalar
        let coef = xf.matmul(&uk.t()?)?.broadcast_div(&(uu * 0.5)?)?; // (N, 1) = 2 x·u / u·u
        xf = (xf - coef.broadcast_mul(&uk)?)?;
    }
    xf.reshape(dims)
}

/// `T^{-1}` of the compact WY form for `u (r, d)`, `r >= 1`: `(r, r)`, upper triangular.
///
/// `T = D + N`, `D = diag(u_k·u_k)/2`, `N = striu(U U^T)`; `T^{-1} = (I + D^{-1}N)^{-1} D^{-1}`
/// `= (Σ_{j<r} (-D^{-1}N)^j) D^{-1}` (Horner; exact since `D^{-1}N` is nilpotent of order r).
pub fn wy_t_inv(u: &Tensor) -> Result<Tensor> {
    let (r, _) = u.dims2()?;
    let (dtype, dev) = (u.dtype(), u.device());
    let gram = u.matmul(&u.t()?)?; // (r, r)
    let eye = Tensor::eye(r, dtype, dev)?;
    let strict_upper = (Tensor::triu2(r, dtype, dev)? - &eye)?;
    let half_diag = ((&gram * &eye)?.sum(1)? * 0.5)?; // (r,)
    let n = (&gram * &strict_upper)?;
    let m = n.broadcast_div(&half_diag.unsqueeze(1)?)?.neg()?; // -D^{-1} N
    let mut p = eye.clone();
    for _ in 1..r {
        p = (&eye + m.matmul(&p)?)?;
    }
    p.broadcast_div(&half_diag.unsqueeze(0)?) // P D^{-1}
}

/// `H_r ··· H_1 x` for every row of `x (..., d)` by the compact WY form (the fast path).
///
/// Same contract as [`reflect_rank1`]: `u (r, d)`, `r = 0` returns `x`; returns `(..., d)`.
/// Rows: `X H = X - ((X U^T) T^{-1}) U` with `H = H_1 ··· H_r`, which is `H^T x` per row.
///
/// When `u` is exactly paired (`u_{2j} = u_{2j+1}` bit for bit, as [`paired_init`] makes it),
/// `H = I` exactly, and the correction term is returned as `C - C.detach()`: exactly 0 in
/// value (so the output is `x` bit for bit, not `x` plus f32 rounding noise of ~1e-7), with
/// the same gradient as `C`. This keeps the identity at init exact: with bf16 products the
/// noise would flip bf16 roundings of the policy's activations against the reference's and
/// move the step-0 log-probs by ~0.1 nats (measured), so the step-0 loss would not be ln 2.
pub fn reflect(x: &Tensor, u: &Tensor) -> Result<Tensor> {
    let r = check(x, u)?;
    if r == 0 {
        return Ok(x.clone());
    }
    let fused = fused_layer_ops() && crate::device::cpu_kernels(&x) && matches!(x.dtype(), DType::F32 | DType::F64) && x.dtype() == u.dtype();
    if !fused {
        return reflect_composed(x, u);
    }
    let (xf, dims) = to_rows(x)?;
    let t_inv = wy_t_inv(u)?; // (r, r), differentiable in u
    let op = ReflectWy { paired: is_exactly_paired(u)? };
    from_rows(&xf.contiguous()?.apply_op3(&u.contiguous()?, &t_inv.contiguous()?, op)?, &dims)
}

/// [`reflect`] composed from candle ops (`matmul`, `sub`, and `C - C.detach()` at paired `u`):
/// the path of other devices and dtypes and of the equivalence tests. It keeps `C (N, d)`
/// (and at paired `u` its zero copy) in the graph beside the output.
pub fn reflect_composed(x: &Tensor, u: &Tensor) -> Result<Tensor> {
    let r = check(x, u)?;
    if r == 0 {
        return Ok(x.clone());
    }
    let (xf, dims) = to_rows(x)?;
    let t_inv = wy_t_inv(u)?; // (r, r)
    let a = xf.matmul(&u.t()?)?; // (N, r)
    let b = a.matmul(&t_inv)?; // (N, r)
    let mut c = b.matmul(u)?; // (N, d)
    if is_exactly_paired(u)? {
        c = (&c - c.detach())?;
    }
    from_rows(&(xf - c)?, &dims)
}

/// The WY reflection `Y = X - ((X U^T) B) U` of [`reflect`] as one op: args `x (N, d)`,
/// `u (r, d)`, `B = T^{-1} (r, r)` (whose own gradient flows on into `u` through
/// [`wy_t_inv`]'s candle graph). The forward saves nothing; the backward recomputes
/// `A = X U^T` and `AB` (thin products) and returns, with `E = G U^T`, `F = E B^T`:
/// `dX = G - F U`, `dU = -((AB)^T G + F^T X)`, `dB = -A^T E`.
/// With `paired` (exactly paired `u`, `H = I` exactly) the value is `X` bit for bit and the
/// gradients those of the formula, as `C - C.detach()` in [`reflect_composed`].
#[derive(Debug, Clone, Copy)]
struct ReflectWy {
    paired: bool,
}

/// `(A (N, r), AB (N, r))` of [`ReflectWy`].
fn wy_coefficients<T: Real + 'static>(x: &[T], u: &[T], b: &[T], r: usize, d: usize) -> (Vec<T>, Vec<T>) {
    let rows = x.len() / d;
    let mut a = vec![T::zero(); rows * r];
    gemm_into(rows, r, d, &mut a, 0.0, 1.0, View::rows(x, d), View::transposed(u, d), true);
    let mut ab = vec![T::zero(); rows * r];
    gemm_into(rows, r, r, &mut ab, 0.0, 1.0, View::rows(&a, r), View::rows(b, r), true);
    (a, ab)
}

pub(crate) fn reflect_wy_fwd<T: Real + 'static>(x: &[T], u: &[T], b: &[T], r: usize, d: usize, paired: bool) -> Vec<T> {
    let mut y = x.to_vec();
    if !paired {
        let (_, ab) = wy_coefficients(x, u, b, r, d);
        gemm_into(x.len() / d, d, r, &mut y, 1.0, -1.0, View::rows(&ab, r), View::rows(u, d), true);
    }
    y
}

/// `[dx (N, d) ; du (r, d) ; dB (r, r)]`, flattened, of [`ReflectWy`] for the output gradient
/// `g (N, d)`.
pub(crate) fn reflect_wy_bwd<T: Real + 'static>(x: &[T], u: &[T], b: &[T], g: &[T], r: usize, d: usize) -> Vec<T> {
    let rows = x.len() / d;
    let mut out = vec![T::zero(); rows * d + r * d + r * r];
    let (dx, rest) = out.split_at_mut(rows * d);
    let (du, db) = rest.split_at_mut(r * d);
    let (a, ab) = wy_coefficients(x, u, b, r, d);
    let mut e = vec![T::zero(); rows * r];
    gemm_into(rows, r, d, &mut e, 0.0, 1.0, View::rows(g, d), View::transposed(u, d), true);
    let mut f = vec![T::zero(); rows * r];
    gemm_into(rows, r, r, &mut f, 0.0, 1.0, View::rows(&e, r), View::transposed(b, r), true);
    dx.copy_from_slice(g);
    gemm_into(rows, d, r, dx, 1.0, -1.0, View::rows(&f, r), View::rows(u, d), true);
    gemm_into(r, d, rows, du, 0.0, -1.0, View::transposed(&ab, r), View::rows(g, d), true);
    gemm_into(r, d, rows, du, 1.0, -1.0, View::transposed(&f, r), View::rows(x, d), true);
    gemm_into(r, r, rows, db, 0.0, -1.0, View::transposed(&a, r), View::rows(&e, r), true);
    out
}

impl CustomOp3 for ReflectWy {
    fn name(&self) -> &'static str {
        "ropo-householder-wy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (r, d) = l2.shape().dims2()?;
        let y = dispatch!(self.name(), [(s1, l1, x), (s2, l2, u), (s3, l3, b)], reflect_wy_fwd(x, u, b, r, d, self.paired));
        Ok((y, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, u: &Tensor, b: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (r, d) = u.dims2()?;
        let both = x.apply_op3_no_bwd(u, b, &ReflectWyBwd { g: g.contiguous()?, r, d })?;
        let rows = x.dim(0)?;
        let (n_x, n_u) = (rows * d, r * d);
        Ok((
            Some(both.narrow(0, 0, n_x)?.reshape((rows, d))?),
            Some(both.narrow(0, n_x, n_u)?.reshape((r, d))?),
            Some(both.narrow(0, n_x + n_u, r * r)?.reshape((r, r))?),
        ))
    }
}

/// `(x, u, B) -> [dx ; du ; dB]` flattened, for the output gradient `g` it holds ([`ReflectWy`]).
struct ReflectWyBwd {
    g: Tensor,
    r: usize,
    d: usize,
}

impl CustomOp3 for ReflectWyBwd {
    fn name(&self) -> &'static str {
        "ropo-householder-wy-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (guard, lg) = self.g.storage_and_layout();
        let Storage::Cpu(sg) = &*guard else { candle_core::bail!("{}: the gradient must be on the CPU", self.name()) };
        let (r, d) = (self.r, self.d);
        let out = dispatch!(self.name(), [(s1, l1, x), (s2, l2, u), (s3, l3, b)], {
            let g = data(sg.as_slice()?, lg, self.name())?;
            reflect_wy_bwd(x, u, b, g, r, d)
        });
        let len = l1.shape().elem_count() + r * d + r * r;
        Ok((out, Shape::from(len)))
    }
}

/// Whether `u (r, d)` has an even number of rows and rows `2j`, `2j + 1` equal bit for bit
/// (then `H_{2j+1} H_{2j+2} = I` exactly for every pair and `H = I`).
pub fn is_exactly_paired(u: &Tensor) -> Result<bool> {
    let (r, d) = u.dims2()?;
    if r == 0 || r % 2 != 0 {
        return Ok(false);
    }
    let v = u.detach().to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok((0..r / 2).all(|j| v[2 * j * d..(2 * j + 1) * d].iter().zip(&v[(2 * j + 1) * d..(2 * j + 2) * d]).all(|(a, b)| a.to_bits() == b.to_bits())))
}

/// The dense `H = H_1 ··· H_r`, `(d, d)`, for merging only (never in training).
///
/// Built as `reflect(I)`: row n of the result is `(H^T e_n)^T`, i.e. row n of `H`.
pub fn dense(u: &Tensor, d: usize) -> Result<Tensor> {
    let eye = Tensor::eye(d, u.dtype(), u.device())?;
    if u.dim(0)? == 0 {
        return Ok(eye);
    }
    reflect(&eye, u)
}

/// Paired identity initialization (spec "Initialization"): `u (r, d)` with
/// `u_{2j} = u_{2j-1} ~ N(0, 1/d)` i.i.d. per entry (variance 1/d), so `H_{2j-1} H_{2j} = I` and
/// `H = I` while the gradients are not zero (PEFT HRA's symmetric init).
///
/// Draws `(r/2) * d` normals from `rng` in row-major order (pair j, coordinate i).
/// Errors: `r` odd.
pub fn paired_init<R: Rng + ?Sized>(r: usize, d: usize, rng: &mut R, dtype: DType, dev: &Device) -> Result<Tensor> {
    if r % 2 != 0 {
        candle_core::bail!("householder_reflections must be even for the paired identity init (got {r})");
    }
    let normal = Normal::new(0.0f64, (1.0 / d as f64).sqrt()).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let mut data = Vec::with_capacity(r * d);
    for _ in 0..r / 2 {
        let row: Vec<f64> = (0..d).map(|_| normal.sample(rng)).collect();
        data.extend_from_slice(&row);
        data.extend_from_slice(&row);
    }
    Tensor::from_vec(data, (r, d), dev)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn randn(shape: (usize, usize), seed: u64) -> Tensor {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let n = Normal::new(0.0f64, 1.0).unwrap();
        let v: Vec<f64> = (0..shape.0 * shape.1).map(|_| n.sample(&mut rng)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
    }

    // The WY form (the fused op and its composed twin) and the rank-1 reference compute the same
    // map, and the same gradients.
    #[test]
    fn fast_paths_match_rank1_values_and_gradients() {
        for (r, d) in [(1, 5), (2, 8), (4, 16), (6, 33)] {
            let x = randn((7, d), 1);
            let u = Var::from_tensor(&randn((r, d), 2)).unwrap();
            let proj = randn((7, d), 3); // random linear functional of the output
            let xv = Var::from_tensor(&x).unwrap();
            let a = reflect_rank1(xv.as_tensor(), u.as_tensor()).unwrap();
            let ga = (&a * &proj).unwrap().sum_all().unwrap().backward().unwrap();
            let (gau, gax) = (ga.get(&u).unwrap(), ga.get(&xv).unwrap());
            assert!(gau.abs().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap() > 1e-3);
            let fused = reflect(xv.as_tensor(), u.as_tensor()).unwrap();
            let composed = reflect_composed(xv.as_tensor(), u.as_tensor()).unwrap();
            for (name, b) in [("wy fused", fused), ("wy composed", composed)] {
                assert!(max_abs(&a, &b) < 1e-12, "{name} values r={r} d={d}: {}", max_abs(&a, &b));
                let gb = (&b * &proj).unwrap().sum_all().unwrap().backward().unwrap();
                let (gbu, gbx) = (gb.get(&u).unwrap(), gb.get(&xv).unwrap());
                assert!(max_abs(gau, gbu) < 1e-11, "{name} du r={r} d={d}: {}", max_abs(gau, gbu));
                assert!(max_abs(gax, gbx) < 1e-12, "{name} dx r={r} d={d}: {}", max_abs(gax, gbx));
            }
        }
    }

    // At exactly paired u (the init) the output is x bit for bit, in f32 and f64, and the
    // gradients are those of the rank-1 reference path (finite in u, identity in x); one bit
    // of difference between a pair's rows takes the ordinary path again.
    #[test]
    fn paired_u_gives_x_exactly_with_the_same_gradients() {
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        for dtype in [DType::F64, DType::F32] {
            let u0 = paired_init(4, 24, &mut rng, dtype, &Device::Cpu).unwrap();
            assert!(is_exactly_paired(&u0).unwrap());
            let u = Var::from_tensor(&u0).unwrap();
            let xv = Var::from_tensor(&randn((5, 24), 10).to_dtype(dtype).unwrap()).unwrap();
            let proj = randn((5, 24), 11).to_dtype(dtype).unwrap();
            let paths: [(&str, fn(&Tensor, &Tensor) -> Result<Tensor>); 2] = [("fused", reflect), ("composed", reflect_composed)];
            for (name, path) in paths {
                let y = path(xv.as_tensor(), u.as_tensor()).unwrap();
                assert_eq!(y.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap(), xv.as_tensor().to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap(), "{dtype:?} {name}");
                let g = (&y * &proj).unwrap().sum_all().unwrap().backward().unwrap();
                let r = reflect_rank1(xv.as_tensor(), u.as_tensor()).unwrap();
                let gr = (&r * &proj).unwrap().sum_all().unwrap().backward().unwrap();
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
                let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
                assert!(max_abs(&f(g.get(&u).unwrap()), &f(gr.get(&u).unwrap())) < tol, "{dtype:?} {name} du");
                assert!(f(g.get(&u).unwrap()).abs().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap() > 1e-3, "{name}: du is not zero");
                assert!(max_abs(&f(g.get(&xv).unwrap()), &f(gr.get(&xv).unwrap())) < tol, "{dtype:?} {name} dx");
            }
        }
        let mut v = paired_init(2, 8, &mut rng, DType::F64, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        v[3] = f64::from_bits(v[3].to_bits() ^ 1);
        assert!(!is_exactly_paired(&Tensor::from_vec(v, (2, 8), &Device::Cpu).unwrap()).unwrap());
        assert!(!is_exactly_paired(&randn((3, 8), 12)).unwrap());
    }

    // Each H_k is orthogonal, so the product is: H^T H = I.
    #[test]
    fn dense_is_orthogonal_and_matches_reflect() {
        let d = 20;
        let u = randn((4, d), 5);
        let h = dense(&u, d).unwrap();
        let eye = Tensor::eye(d, DType::F64, &Device::Cpu).unwrap();
        assert!(max_abs(&h.t().unwrap().matmul(&h).unwrap(), &eye) < 1e-12);
        // reflect(x) = H^T x per row = x H as rows.
        let x = randn((3, d), 6);
        assert!(max_abs(&reflect(&x, &u).unwrap(), &x.matmul(&h).unwrap()) < 1e-12);
        // H = H_1 H_2 H_3 H_4 built explicitly.
        let mut hh = eye.clone();
        for k in 0..4 {
            let uk = u.narrow(0, k, 1).unwrap();
            let uu = uk.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
            let hk = (&eye - (uk.t().unwrap().matmul(&uk).unwrap() * (2.0 / uu)).unwrap()).unwrap();
            hh = hh.matmul(&hk).unwrap();
        }
        assert!(max_abs(&h, &hh) < 1e-12);
    }

    // H(u) H(u) = I, so paired init gives H = I (up to rounding) while u is not zero.
    #[test]
    fn paired_init_is_identity_and_seeded() {
        let d = 64;
        let mut rng = ChaCha20Rng::seed_from_u64(42);
        let u = paired_init(4, d, &mut rng, DType::F64, &Device::Cpu).unwrap();
        let rows = u.to_vec2::<f64>().unwrap();
        assert_eq!(rows[0], rows[1]);
        assert_eq!(rows[2], rows[3]);
        assert_ne!(rows[0], rows[2]);
        // variance 1/d: mean of squares over 2*64 draws near 1/64
        let ms: f64 = rows[0].iter().chain(&rows[2]).map(|v| v * v).sum::<f64>() / 128.0;
        assert!((ms * d as f64 - 1.0).abs() < 0.5, "mean square * d = {}", ms * d as f64);
        let x = randn((5, d), 9);
        assert!(max_abs(&reflect(&x, &u).unwrap(), &x) < 1e-13);
        let mut rng2 = ChaCha20Rng::seed_from_u64(42);
        let u2 = paired_init(4, d, &mut rng2, DType::F64, &Device::Cpu).unwrap();
        assert_eq!(u2.to_vec2::<f64>().unwrap(), rows);
        assert!(paired_init(3, d, &mut rng2, DType::F64, &Device::Cpu).is_err());
    }
}
