//! Grouped-query attention `softmax(Q K^T + bias) V` as one op whose backward recomputes the
//! probabilities instead of keeping them.
//!
//! The composed path ([`attention_composed`]: candle `matmul`, [`masked_softmax`], `matmul`)
//! keeps the scores and the probabilities, two `(N, H, T, Tk)` tensors per layer, alive in the
//! autograd graph until the backward pass: at the anchor run's 4 x 256 tokens, 0.8 GB of the
//! step's 4.8 GB heap peak. [`attention`] keeps nothing but its output: the backward recomputes
//! `P` one `(sequence, kv head)` slice at a time in a scratch buffer (FlashAttention's
//! recomputation, Dao et al. 2022, arXiv 2205.14135, Algorithm 4, without its tiling: a slice's
//! `(R*T, Tk)` scores fit in L2 at these lengths), then
//!
//! `dV = P^T dY`, `dP = dY V^T`, `dS = P ⊙ (dP - rowsum(P ⊙ dP))`, `dQ = dS K`, `dK = dS^T Q`.
//!
//! The softmax is the same code as [`masked_softmax`]'s rows (`ops::softmax_in_place`),
//! so a fully masked row gets the same uniform, finite result.
//!
//! Layout (grouped query heads stacked along the rows, as [`crate::model::llama::Attention`]
//! builds them): `q (N, Hkv, R*T, hd)` (query head `h` is row block `h % R` of kv head `h / R`;
//! already scaled by `1/sqrt(hd)`), `k`, `v` `(N, Hkv, Tk, hd)`, `bias (N or 1, 1, T, Tk)`
//! additive ([`crate::model::ops::attention_bias`]), query row `i` of a slice at position
//! `i % T`. CPU, F32/F64 (the activations' dtypes; the bf16 path keeps f32 activations);
//! slices in parallel with rayon, each gemm single-threaded (deterministic).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, StorageRef, Tensor, WithDType};
use rayon::prelude::*;

use crate::model::ops::{data, dispatch, fused_layer_ops, masked_softmax, softmax_in_place, Real};
use crate::model::slice_gemm::{matmul, View};

/// `softmax(q k^T + bias) v` with grouped-query heads, `(N, Hkv, R*T, hd)`.
///
/// Shapes in the module doc; `t` is T (the query positions per head; `R*T` rows of `q` per kv
/// head). `bias` is a constant (no gradient). The fused op ([`AttentionOp`]) on the CPU for
/// F32/F64 with the fused layer ops on ([`crate::model::ops::set_fused_layer_ops`]), otherwise
/// [`attention_composed`]; both agree to rounding (tests below and tests/fused_layer_ops.rs).
/// Errors: inconsistent shapes.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>, t: usize) -> Result<Tensor> {
    let geo = Geometry::of(q.dims(), k.dims(), v.dims(), bias.map(|b| b.dims()), t)?;
    let dtype_ok = [k, v].iter().all(|x| x.dtype() == q.dtype()) && bias.is_none_or(|b| b.dtype() == q.dtype());
    let fused = fused_layer_ops() && q.device().is_cpu() && matches!(q.dtype(), candle_core::DType::F32 | candle_core::DType::F64) && dtype_ok;
    if !fused || geo.n * geo.hkv * geo.rows * geo.tk == 0 {
        return attention_composed(q, k, v, bias, t);
    }
    let bias = bias.map(|b| b.contiguous()).transpose()?;
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, AttentionOp { bias, t })
}

/// [`attention`] composed from candle `matmul`s and [`masked_softmax`]: the scores and the
/// probabilities stay in the graph. Kept for the equivalence tests and as the path of other
/// devices and dtypes.
pub fn attention_composed(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>, t: usize) -> Result<Tensor> {
    let (n, hkv, rows, hd) = q.dims4()?;
    let r = rows / t.max(1);
    let tk = k.dim(2)?;
    // (N, Hkv, R*T, Tk) -> (N, H, T, Tk): the bias rows are per query position
    let scores = q.matmul(&k.t()?)?.reshape((n, hkv * r, t, tk))?;
    let probs = masked_softmax(&scores, bias)?.reshape((n, hkv, rows, tk))?;
    probs.matmul(v)?.reshape((n, hkv, rows, hd))
}

/// The dimensions of one [`attention`] call.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    n: usize,
    hkv: usize,
    /// `R*T`, query rows per kv head.
    rows: usize,
    t: usize,
    tk: usize,
    hd: usize,
    /// Batch dim of the bias (1 or N); 0 without one.
    nb: usize,
}

impl Geometry {
    fn of(q: &[usize], k: &[usize], v: &[usize], bias: Option<&[usize]>, t: usize) -> Result<Self> {
        let bad = || candle_core::Error::Msg(format!("attention: q {q:?}, k {k:?}, v {v:?}, bias {bias:?} and T = {t} do not fit"));
        let [n, hkv, rows, hd] = *q else { return Err(bad()) };
        let [kn, khkv, tk, khd] = *k else { return Err(bad()) };
        if k != v || kn != n || khkv != hkv || khd != hd || t == 0 || rows % t != 0 {
            return Err(bad());
        }
        let nb = match bias {
            None => 0,
            Some(&[nb, 1, bt, btk]) if bt == t && btk == tk && (nb == 1 || nb == n) => nb,
            Some(_) => return Err(bad()),
        };
        Ok(Self { n, hkv, rows, t, tk, hd, nb })
    }

    /// Elements of one slice of `q` / of `k` (and `v`).
    fn q_len(&self) -> usize {
        self.rows * self.hd
    }
    fn k_len(&self) -> usize {
        self.tk * self.hd
    }
}

/// The probabilities `P = softmax(Q K^T + bias)` `(R*T, Tk)` of slice `s` (sequence `s / Hkv`).
fn probs<T: Real + 'static>(q: &[T], k: &[T], bias: Option<&[T]>, geo: &Geometry, s: usize) -> Vec<T> {
    let (rows, tk, hd) = (geo.rows, geo.tk, geo.hd);
    let mut p = vec![T::zero(); rows * tk];
    matmul(rows, tk, hd, &mut p, View::rows(q, hd), View::transposed(k, hd));
    let seq = s / geo.hkv;
    for (i, row) in p.chunks_mut(tk).enumerate() {
        if let Some(b) = bias {
            let br = (if geo.nb == 1 { 0 } else { seq }) * geo.t + i % geo.t;
            row.iter_mut().zip(&b[br * tk..(br + 1) * tk]).for_each(|(x, &b)| *x = *x + b);
        }
        softmax_in_place(row);
    }
    p
}

/// The forward: `Y = P V` per slice, `(N, Hkv, R*T, hd)`.
fn attention_fwd<T: Real + 'static>(q: &[T], k: &[T], v: &[T], bias: Option<&[T]>, geo: &Geometry) -> Vec<T> {
    let (ql, kl) = (geo.q_len(), geo.k_len());
    let mut y = vec![T::zero(); geo.n * geo.hkv * ql];
    y.par_chunks_mut(ql).enumerate().for_each(|(s, ys)| {
        let (qs, ks, vs) = (&q[s * ql..(s + 1) * ql], &k[s * kl..(s + 1) * kl], &v[s * kl..(s + 1) * kl]);
        let p = probs(qs, ks, bias, geo, s);
        matmul(geo.rows, geo.hd, geo.tk, ys, View::rows(&p, geo.tk), View::rows(vs, geo.hd));
    });
    y
}

/// The backward: `(dq, dk, dv)` from `dy (N, Hkv, R*T, hd)`, the probabilities recomputed.
fn attention_bwd<T: Real + 'static>(q: &[T], k: &[T], v: &[T], dy: &[T], bias: Option<&[T]>, geo: &Geometry) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (ql, kl) = (geo.q_len(), geo.k_len());
    let (rows, tk, hd) = (geo.rows, geo.tk, geo.hd);
    let slices = geo.n * geo.hkv;
    let (mut dq, mut dk, mut dv) = (vec![T::zero(); slices * ql], vec![T::zero(); slices * kl], vec![T::zero(); slices * kl]);
    dq.par_chunks_mut(ql).zip(dk.par_chunks_mut(kl)).zip(dv.par_chunks_mut(kl)).enumerate().for_each(|(s, ((dqs, dks), dvs))| {
        let (qs, ks, vs) = (&q[s * ql..(s + 1) * ql], &k[s * kl..(s + 1) * kl], &v[s * kl..(s + 1) * kl]);
        let dys = &dy[s * ql..(s + 1) * ql];
        let p = probs(qs, ks, bias, geo, s);
        // dV = P^T dY: (Tk, hd)
        matmul(tk, hd, rows, dvs, View::transposed(&p, tk), View::rows(dys, hd));
        // dP = dY V^T: (R*T, Tk), then dS = P ⊙ (dP - rowsum(P ⊙ dP)) in place
        let mut ds = vec![T::zero(); rows * tk];
        matmul(rows, tk, hd, &mut ds, View::rows(dys, hd), View::transposed(vs, hd));
        for (dr, pr) in ds.chunks_mut(tk).zip(p.chunks(tk)) {
            let mut dot = T::zero();
            for (&pv, &g) in pr.iter().zip(dr.iter()) {
                dot = dot + pv * g;
            }
            for (g, &pv) in dr.iter_mut().zip(pr) {
                *g = pv * (*g - dot);
            }
        }
        // dQ = dS K: (R*T, hd); dK = dS^T Q: (Tk, hd)
        matmul(rows, hd, tk, dqs, View::rows(&ds, tk), View::rows(ks, hd));
        matmul(tk, hd, rows, dks, View::transposed(&ds, tk), View::rows(qs, hd));
    });
    (dq, dk, dv)
}

/// The fused attention of [`attention`]: args `(q, k, v)`, the bias (a constant) held by the op.
/// The forward saves nothing: the backward reads `q`, `k`, `v` (its inputs) and recomputes `P`.
#[derive(Debug, Clone)]
pub struct AttentionOp {
    /// `(N or 1, 1, T, Tk)`, contiguous, the dtype of `q`.
    bias: Option<Tensor>,
    /// T, query positions per head.
    t: usize,
}

/// The bias storage of an [`AttentionOp`] as a slice of the activations' dtype `T`.
fn bias_slice<'a, T: WithDType>(bias: Option<&'a (StorageRef<'_>, &Layout)>, name: &str) -> Result<Option<&'a [T]>> {
    let Some((guard, layout)) = bias else { return Ok(None) };
    let Storage::Cpu(cs) = &**guard else { candle_core::bail!("{name}: the bias must be on the CPU") };
    Ok(Some(data(cs.as_slice::<T>()?, layout, name)?))
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "ropo-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let geo = Geometry::of(l1.dims(), l2.dims(), l3.dims(), self.bias.as_ref().map(|b| b.dims()), self.t)?;
        let bias = self.bias.as_ref().map(|b| b.storage_and_layout());
        let out = dispatch!(self.name(), [(s1, l1, q), (s2, l2, k), (s3, l3, v)], attention_fwd(q, k, v, bias_slice(bias.as_ref(), self.name())?, &geo));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let geo = Geometry::of(q.dims(), k.dims(), v.dims(), self.bias.as_ref().map(|b| b.dims()), self.t)?;
        let dy = grad_res.contiguous()?;
        let name = "ropo-attention-bwd";
        let (gq, lq) = q.storage_and_layout();
        let (gk, lk) = k.storage_and_layout();
        let (gv, lv) = v.storage_and_layout();
        let (gd, ld) = dy.storage_and_layout();
        let (Storage::Cpu(sq), Storage::Cpu(sk), Storage::Cpu(sv), Storage::Cpu(sd)) = (&*gq, &*gk, &*gv, &*gd) else {
            candle_core::bail!("{name}: CPU tensors expected")
        };
        let bias = self.bias.as_ref().map(|b| b.storage_and_layout());
        let b = bias.as_ref();
        let (dq, dk, dv) = match (sq, sk, sv, sd) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v), CpuStorage::F32(d)) => {
                let (q, k, v, d) = (data(q, lq, name)?, data(k, lk, name)?, data(v, lv, name)?, data(d, ld, name)?);
                let (a, b, c) = attention_bwd(q, k, v, d, bias_slice(b, name)?, &geo);
                (CpuStorage::F32(a), CpuStorage::F32(b), CpuStorage::F32(c))
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v), CpuStorage::F64(d)) => {
                let (q, k, v, d) = (data(q, lq, name)?, data(k, lk, name)?, data(v, lv, name)?, data(d, ld, name)?);
                let (a, b, c) = attention_bwd(q, k, v, d, bias_slice(b, name)?, &geo);
                (CpuStorage::F64(a), CpuStorage::F64(b), CpuStorage::F64(c))
            }
            _ => candle_core::bail!("{name}: F32 or F64 inputs of one dtype expected"),
        };
        let dev = q.device();
        let to_tensor = |s: CpuStorage, shape: &Shape| match s {
            CpuStorage::F32(v) => Tensor::from_vec(v, shape, dev),
            CpuStorage::F64(v) => Tensor::from_vec(v, shape, dev),
            _ => unreachable!("attention_bwd returns F32 or F64"),
        };
        Ok((Some(to_tensor(dq, q.shape())?), Some(to_tensor(dk, k.shape())?), Some(to_tensor(dv, v.shape())?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use rand::{Rng, SeedableRng};

    fn randn(dims: &[usize], dtype: DType, rng: &mut rand_chacha::ChaCha8Rng) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
    }

    /// A causal bias with some padded keys per sequence, `(nb, 1, T, Tk)`, keys `past..` new.
    fn causal_bias(nb: usize, t: usize, tk: usize, dtype: DType) -> Tensor {
        let past = tk - t;
        let mask: Vec<u32> = (0..nb * tk).map(|i| u32::from(!(i / tk == 1 && i % tk == 0))).collect();
        let mask = Tensor::from_vec(mask, (nb, tk), &Device::Cpu).unwrap();
        crate::model::ops::attention_bias(Some(&mask), t, past, dtype, &Device::Cpu).unwrap()
    }

    /// Fused vs composed: values, and the gradients of q, k, v through a random linear loss.
    fn compare(dtype: DType, nb: Option<usize>, tol: f64) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let (n, hkv, r, t, past, hd) = (2, 2, 3, 5, 2, 4);
        let tk = t + past;
        let q = Var::from_tensor(&randn(&[n, hkv, r * t, hd], dtype, &mut rng)).unwrap();
        let k = Var::from_tensor(&randn(&[n, hkv, tk, hd], dtype, &mut rng)).unwrap();
        let v = Var::from_tensor(&randn(&[n, hkv, tk, hd], dtype, &mut rng)).unwrap();
        let w = randn(&[n, hkv, r * t, hd], dtype, &mut rng);
        let bias = nb.map(|nb| causal_bias(nb, t, tk, dtype));
        let run = |f: fn(&Tensor, &Tensor, &Tensor, Option<&Tensor>, usize) -> Result<Tensor>| {
            let y = f(&q, &k, &v, bias.as_ref(), t).unwrap();
            let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let grads: Vec<Tensor> = [&q, &k, &v].iter().map(|x| g.get(x).unwrap().clone()).collect();
            (y, grads)
        };
        let (y_f, g_f) = run(attention);
        let (y_c, g_c) = run(attention_composed);
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            assert_eq!(a.len(), b.len());
            let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
            let err = a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
            assert!(err <= tol * scale, "{what}: max |fused - composed| {err:e} > {tol:e} x {scale:e}");
        };
        close(&y_f, &y_c, "y");
        for (name, (a, b)) in ["dq", "dk", "dv"].iter().zip(g_f.iter().zip(&g_c)) {
            close(a, b, name);
        }
    }

    #[test]
    fn matches_composed_f64() {
        for nb in [None, Some(1), Some(2)] {
            compare(DType::F64, nb, 1e-12);
        }
    }

    #[test]
    fn matches_composed_f32() {
        for nb in [None, Some(1), Some(2)] {
            compare(DType::F32, nb, 1e-5);
        }
    }

    /// A query row whose keys are all masked keeps finite weights (the mask is finite): with
    /// equal scores, the plain average of V, as masked_softmax.
    #[test]
    fn fully_masked_row_is_uniform() {
        let dev = Device::Cpu;
        let q = Tensor::ones((1, 1, 1, 2), DType::F64, &dev).unwrap();
        let k = Tensor::new(&[[[[1.0f64, 0.0], [0.0, 1.0]]]], &dev).unwrap();
        let v = Tensor::new(&[[[[2.0f64, 4.0], [6.0, 8.0]]]], &dev).unwrap();
        let bias = Tensor::full(crate::model::ops::MASK_VALUE, (1, 1, 1, 2), &dev).unwrap();
        let y = attention(&q, &k, &v, Some(&bias), 1).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(y, vec![4.0, 6.0]);
    }

    #[test]
    fn shapes_that_do_not_fit_are_errors() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 2, 6, 4), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 2, 5, 4), DType::F32, &dev).unwrap();
        assert!(attention(&q, &k, &k, None, 4).is_err(), "6 rows are not a multiple of T = 4");
        assert!(attention(&q, &k, &Tensor::zeros((1, 2, 5, 3), DType::F32, &dev).unwrap(), None, 3).is_err());
        let bias = Tensor::zeros((1, 1, 3, 4), DType::F32, &dev).unwrap();
        assert!(attention(&q, &k, &k, Some(&bias), 3).is_err(), "bias has 4 keys, k has 5");
    }
}
