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
//! Masked keys are skipped a block of query rows at a time ([`BLOCK_ROWS`]): a block's products
//! and softmax run over keys `0..kmax` only, `kmax` the last open key of any of its rows + 1
//! (the bias says which keys are open, [`open_ends`]). Keys past it have probability exactly 0 in
//! the full computation ([`MASK_VALUE`] scores: `exp` underflows to 0), so skipping them drops
//! nothing but the work: under a causal mask about half of the scores and of the four products
//! of the backward. The forward's probabilities are the same bits either way (the softmax sum is
//! exact, [`crate::model::reduce::sum_unit`]); the backward's row dot `rowsum(P ⊙ dP)` runs in
//! lanes whose order depends on the row length, so there skipping changes rounding only. A row
//! with no open key keeps all keys (uniform weights, as before).
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

use crate::model::ops::{data, dispatch, fused_layer_ops, masked_softmax, softmax_in_place, Real, MASK_VALUE};
use crate::model::slice_gemm::{gemm_into, matmul, View};

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
    let fused = fused_layer_ops() && crate::device::cpu_kernels(&q) && matches!(q.dtype(), candle_core::DType::F32 | candle_core::DType::F64) && dtype_ok;
    if !fused || geo.n * geo.hkv * geo.rows * geo.tk == 0 {
        return attention_composed(q, k, v, bias, t);
    }
    let bias = bias.map(|b| b.contiguous()).transpose()?;
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, AttentionOp { bias, t, block_rows: BLOCK_ROWS })
}

/// Query rows a block of the fused attention handles at once (see the module doc): fewer rows
/// skip more masked keys, more rows make longer products. 64 of a slice's `R*T` rows.
pub const BLOCK_ROWS: usize = 64;

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

/// [`attention_composed`] with Gemma 2's soft-capped scores: `softmax(c tanh(q k^T / c) + bias) v`
/// (HF `eager_attention_forward`: the cap after the scaling, before the mask). Composed from
/// candle ops and [`masked_softmax`], so the scores and probabilities stay in the graph (the
/// fused op has no cap). Shapes as [`attention`]. Errors: inconsistent shapes.
pub fn attention_softcapped(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>, t: usize, cap: f64) -> Result<Tensor> {
    Geometry::of(q.dims(), k.dims(), v.dims(), bias.map(|b| b.dims()), t)?;
    let (n, hkv, rows, hd) = q.dims4()?;
    let r = rows / t;
    let tk = k.dim(2)?;
    let scores = crate::model::ops::softcap(&q.matmul(&k.t()?)?, cap)?.reshape((n, hkv * r, t, tk))?;
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

/// Per bias row (`nb * T` rows, or one row without a bias): one past its last open key (bias
/// above `MASK_VALUE / 2`), or `Tk` when no key is open (such a row keeps uniform weights over
/// every key, as [`masked_softmax`] gives it).
fn open_ends<T: Real>(bias: Option<&[T]>, tk: usize) -> Vec<usize> {
    let Some(b) = bias else { return vec![tk] };
    let half = T::from_f64(MASK_VALUE / 2.0);
    b.chunks(tk).map(|row| row.iter().rposition(|&x| x > half).map_or(tk, |j| j + 1)).collect()
}

/// The rows of one block of slice `s`: `i0..i1` of its `R*T` query rows, and `kmax`, the keys
/// they attend (module doc).
#[derive(Debug, Clone, Copy)]
struct Block {
    i0: usize,
    i1: usize,
    kmax: usize,
}

/// The bias row of query row `i` of slice `s`: position `i % T` of the slice's sequence
/// (`s / Hkv`), or of the one shared bias (`nb = 1`).
fn bias_row(geo: &Geometry, s: usize, i: usize) -> usize {
    (if geo.nb == 1 { 0 } else { s / geo.hkv }) * geo.t + i % geo.t
}

/// The blocks of `block_rows` query rows of slice `s`, `ends` from [`open_ends`].
fn blocks<'a>(geo: &Geometry, ends: &'a [usize], s: usize, block_rows: usize) -> impl Iterator<Item = Block> + 'a {
    let geo = *geo;
    let end = move |i: usize| if geo.nb == 0 { ends[0] } else { ends[bias_row(&geo, s, i)] };
    (0..geo.rows).step_by(block_rows.max(1)).map(move |i0| {
        let i1 = (i0 + block_rows.max(1)).min(geo.rows);
        Block { i0, i1, kmax: (i0..i1).map(end).max().unwrap_or(geo.tk) }
    })
}

/// The probabilities `P = softmax(Q K^T + bias)` of block `b` of slice `s` over keys
/// `0..b.kmax`, `(i1 - i0, kmax)` row-major, into `p` (resized).
fn block_probs<T: Real + 'static>(p: &mut Vec<T>, q: &[T], k: &[T], bias: Option<&[T]>, geo: &Geometry, s: usize, b: Block) {
    let (tk, hd, kmax) = (geo.tk, geo.hd, b.kmax);
    p.clear();
    p.resize((b.i1 - b.i0) * kmax, T::zero());
    matmul(b.i1 - b.i0, kmax, hd, p, View::rows(&q[b.i0 * hd..b.i1 * hd], hd), View::transposed(&k[..kmax * hd], hd));
    for (i, row) in (b.i0..b.i1).zip(p.chunks_mut(kmax)) {
        if let Some(bias) = bias {
            let br = bias_row(geo, s, i);
            row.iter_mut().zip(&bias[br * tk..br * tk + kmax]).for_each(|(x, &b)| *x = *x + b);
        }
        softmax_in_place(row);
    }
}

/// The forward: `Y = P V` per slice and block, `(N, Hkv, R*T, hd)`.
fn attention_fwd<T: Real + 'static>(q: &[T], k: &[T], v: &[T], bias: Option<&[T]>, geo: &Geometry, block_rows: usize) -> Vec<T> {
    let (ql, kl, hd) = (geo.q_len(), geo.k_len(), geo.hd);
    let ends = open_ends(bias, geo.tk);
    let mut y = vec![T::zero(); geo.n * geo.hkv * ql];
    y.par_chunks_mut(ql).enumerate().for_each(|(s, ys)| {
        let (qs, ks, vs) = (&q[s * ql..(s + 1) * ql], &k[s * kl..(s + 1) * kl], &v[s * kl..(s + 1) * kl]);
        let mut p = Vec::new();
        for b in blocks(geo, &ends, s, block_rows) {
            block_probs(&mut p, qs, ks, bias, geo, s, b);
            matmul(b.i1 - b.i0, hd, b.kmax, &mut ys[b.i0 * hd..b.i1 * hd], View::rows(&p, b.kmax), View::rows(&vs[..b.kmax * hd], hd));
        }
    });
    y
}

/// The backward: `(dq, dk, dv)` from `dy (N, Hkv, R*T, hd)`, the probabilities recomputed a
/// block at a time; `dK`, `dV` summed over the blocks.
fn attention_bwd<T: Real + 'static>(q: &[T], k: &[T], v: &[T], dy: &[T], bias: Option<&[T]>, geo: &Geometry, block_rows: usize) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (ql, kl, hd) = (geo.q_len(), geo.k_len(), geo.hd);
    let slices = geo.n * geo.hkv;
    let ends = open_ends(bias, geo.tk);
    let (mut dq, mut dk, mut dv) = (vec![T::zero(); slices * ql], vec![T::zero(); slices * kl], vec![T::zero(); slices * kl]);
    dq.par_chunks_mut(ql).zip(dk.par_chunks_mut(kl)).zip(dv.par_chunks_mut(kl)).enumerate().for_each(|(s, ((dqs, dks), dvs))| {
        let (qs, ks, vs) = (&q[s * ql..(s + 1) * ql], &k[s * kl..(s + 1) * kl], &v[s * kl..(s + 1) * kl]);
        let dys = &dy[s * ql..(s + 1) * ql];
        let (mut p, mut ds) = (Vec::new(), Vec::new());
        for b in blocks(geo, &ends, s, block_rows) {
            let (m, kmax) = (b.i1 - b.i0, b.kmax);
            block_probs(&mut p, qs, ks, bias, geo, s, b);
            let (qb, dyb) = (&qs[b.i0 * hd..b.i1 * hd], &dys[b.i0 * hd..b.i1 * hd]);
            // dV[..kmax] += P^T dY: (kmax, hd)
            gemm_into(kmax, hd, m, &mut dvs[..kmax * hd], 1.0, 1.0, View::transposed(&p, kmax), View::rows(dyb, hd), false);
            // dP = dY V^T: (m, kmax), then dS = P ⊙ (dP - rowsum(P ⊙ dP)) in place
            ds.clear();
            ds.resize(m * kmax, T::zero());
            matmul(m, kmax, hd, &mut ds, View::rows(dyb, hd), View::transposed(&vs[..kmax * hd], hd));
            for (dr, pr) in ds.chunks_mut(kmax).zip(p.chunks(kmax)) {
                let dot = crate::model::reduce::dot(pr, dr, T::zero());
                for (g, &pv) in dr.iter_mut().zip(pr) {
                    *g = pv * (*g - dot);
                }
            }
            // dQ = dS K: (m, hd); dK[..kmax] += dS^T Q: (kmax, hd)
            matmul(m, hd, kmax, &mut dqs[b.i0 * hd..b.i1 * hd], View::rows(&ds, kmax), View::rows(&ks[..kmax * hd], hd));
            gemm_into(kmax, hd, m, &mut dks[..kmax * hd], 1.0, 1.0, View::transposed(&ds, kmax), View::rows(qb, hd), false);
        }
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
    /// Query rows a block ([`BLOCK_ROWS`]; the tests take fewer).
    block_rows: usize,
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
        let out = dispatch!(self.name(), [(s1, l1, q), (s2, l2, k), (s3, l3, v)], attention_fwd(q, k, v, bias_slice(bias.as_ref(), self.name())?, &geo, self.block_rows));
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
                let (a, b, c) = attention_bwd(q, k, v, d, bias_slice(b, name)?, &geo, self.block_rows);
                (CpuStorage::F32(a), CpuStorage::F32(b), CpuStorage::F32(c))
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v), CpuStorage::F64(d)) => {
                let (q, k, v, d) = (data(q, lq, name)?, data(k, lk, name)?, data(v, lv, name)?, data(d, ld, name)?);
                let (a, b, c) = attention_bwd(q, k, v, d, bias_slice(b, name)?, &geo, self.block_rows);
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

    /// The fused op with `block_rows` query rows a block.
    fn blocked(block_rows: usize) -> impl Fn(&Tensor, &Tensor, &Tensor, Option<&Tensor>, usize) -> Result<Tensor> {
        move |q, k, v, bias, t| q.apply_op3(k, v, AttentionOp { bias: bias.cloned(), t, block_rows })
    }

    /// Fused vs composed: values, and the gradients of q, k, v through a random linear loss.
    fn compare(dtype: DType, nb: Option<usize>, tol: f64) {
        compare_sized(dtype, nb, tol, (2, 2, 3, 5, 2, 4), &[BLOCK_ROWS]);
    }

    /// [`compare`] at `(n, hkv, r, t, past, hd)`, the fused op at each of `block_rows`.
    fn compare_sized(dtype: DType, nb: Option<usize>, tol: f64, dims: (usize, usize, usize, usize, usize, usize), block_rows: &[usize]) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let (n, hkv, r, t, past, hd) = dims;
        let tk = t + past;
        let q = Var::from_tensor(&randn(&[n, hkv, r * t, hd], dtype, &mut rng)).unwrap();
        let k = Var::from_tensor(&randn(&[n, hkv, tk, hd], dtype, &mut rng)).unwrap();
        let v = Var::from_tensor(&randn(&[n, hkv, tk, hd], dtype, &mut rng)).unwrap();
        let w = randn(&[n, hkv, r * t, hd], dtype, &mut rng);
        let bias = nb.map(|nb| causal_bias(nb, t, tk, dtype));
        let run = |f: &dyn Fn(&Tensor, &Tensor, &Tensor, Option<&Tensor>, usize) -> Result<Tensor>| {
            let y = f(&q, &k, &v, bias.as_ref(), t).unwrap();
            let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let grads: Vec<Tensor> = [&q, &k, &v].iter().map(|x| g.get(x).unwrap().clone()).collect();
            (y, grads)
        };
        let (y_c, g_c) = run(&attention_composed);
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            assert_eq!(a.len(), b.len());
            let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
            let err = a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
            assert!(err <= tol * scale, "{what}: max |fused - composed| {err:e} > {tol:e} x {scale:e}");
        };
        for &rows in block_rows {
            let (y_f, g_f) = if rows == BLOCK_ROWS { run(&attention) } else { run(&blocked(rows)) };
            close(&y_f, &y_c, "y");
            for (name, (a, b)) in ["dq", "dk", "dv"].iter().zip(g_f.iter().zip(&g_c)) {
                close(a, b, name);
            }
        }
    }

    /// Blocks of 1..7 query rows (blocks that straddle two query heads' row ranges, a last short
    /// block) at 40 positions: causal masks skip most keys of the early blocks; values and
    /// gradients still equal the composed path.
    #[test]
    fn blocked_matches_composed() {
        for nb in [None, Some(1), Some(2)] {
            compare_sized(DType::F64, nb, 1e-12, (2, 2, 3, 40, 3, 4), &[1, 2, 7, 16, BLOCK_ROWS]);
            compare_sized(DType::F32, nb, 1e-5, (2, 2, 3, 40, 3, 4), &[5, BLOCK_ROWS]);
        }
    }

    /// Where each bias row's open keys end: one past the last open key; all keys when none is.
    #[test]
    fn open_ends_of_bias_rows() {
        let m = MASK_VALUE;
        let bias = [0.0, m, m, /**/ 0.0, m, 0.0, /**/ m, m, m];
        assert_eq!(open_ends(Some(&bias[..]), 3), vec![1, 3, 3]);
        assert_eq!(open_ends::<f64>(None, 4), vec![4]);
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
