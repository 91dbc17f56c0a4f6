//! Completion log-probs from hidden states, computing the LM head only where it is needed.
//!
//! The plain path ([`super::dense::completion_logps`] over `Model::forward`) builds logits for
//! every position `(N, T, V)` and a full-vocabulary log-softmax, then keeps the few entries at
//! completion targets. Here (TRL 1.16 does the same with its fused LM head):
//! 1. the hidden rows whose NEXT token is a completion token are gathered (`N*T -> K` rows),
//! 2. the LM head runs on those `K` rows only, `(K, D) -> (K, V)`,
//! 3. a fused log-softmax + gather op ([`LogSoftmaxGather`]) returns `z[target] - logsumexp(z)`
//!    per row with its backward `g (onehot(target) - softmax(z))` written out (no dense
//!    zero-filled gradient of a `gather`, no `(K, V)` log-softmax tensor kept for backward),
//! 4. a segment sum (a `(N, K)` 0/mask matrix times `(K,)`) puts the per-token values back
//!    into per-sequence sums `(N,)`.
//!
//! Definitions as in [`super::dense::completion_logps`] (`logps[n] = Σ_{t>=1} m[n,t]
//! log_softmax(z[n,t-1])[ids[n,t]]`, masked positions contribute exactly nothing).
//! Legend: N sequences, T positions, D hidden width, V vocabulary, K gathered rows.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::weighting::{sums_at_picks, LogpOptions, SeqLogps};
use crate::error::{Error, Result};
use crate::model::llama::Model;

/// One log-prob term: hidden row `row` (of a flattened hidden matrix) scores token `target`;
/// its log-prob is added, times `weight` (the completion-mask value), to sequence `seq`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pick {
    /// Row of the flattened `(R, D)` hidden matrix whose logits predict `target`.
    pub row: usize,
    /// The token id whose log-prob is taken.
    pub target: u32,
    /// The completion-mask value of the target position (non-zero).
    pub weight: f64,
    /// Output sequence index (`0..n_seqs`).
    pub seq: usize,
}

/// The picks of the concatenated layout: for every `(n, t >= 1)` with `completion_mask[n,t] != 0`,
/// row `n*T + t-1` scores `input_ids[n,t]` into sequence `n`. Ordered by `(n, t)`.
///
/// Shapes: `input_ids (N, T)` u32, `completion_mask (N, T)` any dtype.
/// Errors: shape mismatch.
pub fn picks_concatenated(input_ids: &Tensor, completion_mask: &Tensor) -> Result<Vec<Pick>> {
    let (n, t) = input_ids.dims2()?;
    if completion_mask.dims() != [n, t] {
        return Err(Error::Shape { name: "completion_mask".into(), expected: vec![n, t], got: completion_mask.dims().to_vec() });
    }
    let ids = input_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    let mask = completion_mask.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let mut picks = Vec::new();
    for (s, (ids, mask)) in ids.iter().zip(&mask).enumerate() {
        for p in 1..t {
            if mask[p] != 0.0 {
                picks.push(Pick { row: s * t + p - 1, target: ids[p], weight: mask[p], seq: s });
            }
        }
    }
    Ok(picks)
}

/// Summed log-probs of `picks` over the rows of `hidden (R, D)` (final-norm hidden states),
/// returned as `(n_seqs,)` in the hidden dtype (f32, or f64 for gradient checks).
///
/// `out[s] = Σ_{p: p.seq = s} p.weight · log_softmax(lm_head(hidden[p.row]))[p.target]`.
/// Differentiable with respect to `hidden` and the LM head's adapter (if any, `use_adapters`).
/// Errors: a row outside `hidden`, a target outside the vocabulary, a seq outside `n_seqs`.
pub fn logps_at_picks(model: &Model, hidden: &Tensor, picks: &[Pick], n_seqs: usize, use_adapters: bool) -> Result<Tensor> {
    Ok(logps_at_picks_with(model, hidden, picks, n_seqs, use_adapters, &LogpOptions::default())?.logps)
}

/// [`logps_at_picks`] with the extras of `opts` (LD-DPO sums, the unweighted sums, WPO's
/// weights: [`super::weighting::sums_at_picks`]), from the same LM-head rows.
/// Errors: as [`logps_at_picks`].
pub fn logps_at_picks_with(model: &Model, hidden: &Tensor, picks: &[Pick], n_seqs: usize, use_adapters: bool, opts: &LogpOptions) -> Result<SeqLogps> {
    let chunk = (LM_HEAD_CHUNK_BYTES / (model.config().vocab_size * hidden.dtype().size_in_bytes()).max(1)).max(1);
    logps_at_picks_chunked(model, hidden, picks, n_seqs, use_adapters, opts, chunk)
}

/// [`logps_at_picks_with`] with the LM head run on at most `chunk_rows` picked rows at a time
/// (without WPO; WPO's weights read every row's full softmax, so its logits come in one piece).
///
/// Each chunk's logits `(chunk_rows, V)` come from the heap instead of a fresh mmap of one
/// `(K, V)` block (a page fault and a kernel zeroing per page, every step: measured on the anchor
/// run, page faults 1.13M -> 0.59M, peak RSS 3.02 -> 2.26 GiB with one heap, tokens/s +9%), and
/// the backward holds one chunk's logit gradient at a time. Every row's logits, log-softmax and
/// gradient are computed as before (the bf16 kernel: bit for bit; an f32 gemm: up to its
/// summation order). Errors: as [`logps_at_picks`]; `chunk_rows = 0`.
pub fn logps_at_picks_chunked(
    model: &Model,
    hidden: &Tensor,
    picks: &[Pick],
    n_seqs: usize,
    use_adapters: bool,
    opts: &LogpOptions,
    chunk_rows: usize,
) -> Result<SeqLogps> {
    if chunk_rows == 0 {
        return Err(Error::Msg("LM head chunk of 0 rows".into()));
    }
    let (r, _) = hidden.dims2()?;
    let dtype = hidden.dtype();
    let dev = hidden.device();
    if picks.is_empty() {
        let zeros = Tensor::zeros(n_seqs, dtype, dev)?;
        let ones = || Tensor::ones(n_seqs, dtype, dev);
        return Ok(SeqLogps {
            logps: zeros.clone(),
            unweighted: opts.ld_alpha.map(|_| zeros),
            wpo_weights: if opts.use_weighting { Some(ones()?) } else { None },
        });
    }
    let v = model.config().vocab_size;
    for p in picks {
        if p.row >= r || p.seq >= n_seqs {
            return Err(Error::Msg(format!("log-prob pick {p:?} outside {r} hidden rows / {n_seqs} sequences")));
        }
        if p.target as usize >= v {
            return Err(Error::Msg(format!("input_ids holds token id {}, outside the vocabulary of {v} logits", p.target)));
        }
    }
    let lm_rows = |picks: &[Pick]| -> Result<(Tensor, Tensor)> {
        let k = picks.len();
        let rows = Tensor::from_vec(picks.iter().map(|p| p.row as u32).collect::<Vec<_>>(), k, dev)?;
        let targets = Tensor::from_vec(picks.iter().map(|p| p.target).collect::<Vec<_>>(), k, dev)?;
        let h = hidden.index_select(&rows, 0)?; // (k, D)
        let logits = model.lm_head(&h, use_adapters)?; // (k, V)
        let per = log_softmax_gather(&logits, &targets)?; // (k,)
        Ok((per, logits))
    };
    if opts.use_weighting {
        // WPO's weights read every row's full softmax: the logits in one piece
        let (per, logits) = lm_rows(picks)?;
        return sums_at_picks(&per, Some(&logits), picks, n_seqs, opts);
    }
    let per = picks.chunks(chunk_rows).map(|c| Ok(lm_rows(c)?.0)).collect::<Result<Vec<_>>>()?;
    let per = Tensor::cat(&per, 0)?; // (K,); one chunk: that tensor itself (candle's cat)
    sums_at_picks(&per, None, picks, n_seqs, opts)
}

/// The most bytes of logits [`logps_at_picks_with`] forms at once ([`logps_at_picks_chunked`]),
/// below glibc's largest `M_MMAP_THRESHOLD` (32 MiB, see `process::keep_freed_memory`): 128
/// rows of a 49,152-token vocabulary in f32.
pub const LM_HEAD_CHUNK_BYTES: usize = 24 << 20;

/// The extras-aware summed log-probs of full logits `(N, T, V)` (the definition's route, as
/// [`super::dense::completion_logps`], through the same sums as the fast paths): the picks of
/// the concatenated layout, their rows' log-softmax at the targets, then
/// [`super::weighting::sums_at_picks`]. For checks against TRL, which starts from logits.
/// Errors: shape mismatches, token ids outside the vocabulary.
pub fn seq_logps_from_logits(logits: &Tensor, input_ids: &Tensor, completion_mask: &Tensor, opts: &LogpOptions) -> Result<SeqLogps> {
    let (n, t, v) = logits.dims3()?;
    let picks = picks_concatenated(input_ids, completion_mask)?;
    if let Some(p) = picks.iter().find(|p| p.target as usize >= v) {
        return Err(Error::Msg(format!("input_ids holds token id {}, outside the vocabulary of {v} logits", p.target)));
    }
    let k = picks.len();
    let dev = logits.device();
    let rows = Tensor::from_vec(picks.iter().map(|p| p.row as u32).collect::<Vec<_>>(), k, dev)?;
    let targets = Tensor::from_vec(picks.iter().map(|p| p.target).collect::<Vec<_>>(), k, dev)?;
    let z = logits.reshape((n * t, v))?.index_select(&rows, 0)?; // (K, V)
    let per = log_softmax_gather(&z, &targets)?;
    sums_at_picks(&per, Some(&z), &picks, n, opts)
}

/// Summed completion log-probs of each sequence from the final hidden states: the fast path of
/// `completion_logps(model.lm_head(hidden), input_ids, completion_mask)`.
///
/// Shapes: `hidden (N, T, D)` f32/f64 (from `Model::forward_hidden`), `input_ids (N, T)` u32,
/// `completion_mask (N, T)` → `(N,)` in nats, in the hidden dtype. The LM head runs only on the
/// `K` rows whose next token is a completion token. Gradients flow to `hidden` and to an LM-head
/// adapter. Errors: shape mismatches, token ids outside the vocabulary.
pub fn completion_logps_from_hidden(
    model: &Model,
    hidden: &Tensor,
    input_ids: &Tensor,
    completion_mask: &Tensor,
    use_adapters: bool,
) -> Result<Tensor> {
    Ok(completion_logps_from_hidden_with(model, hidden, input_ids, completion_mask, use_adapters, &LogpOptions::default())?.logps)
}

/// [`completion_logps_from_hidden`] with the extras of `opts` ([`logps_at_picks_with`]).
pub fn completion_logps_from_hidden_with(
    model: &Model,
    hidden: &Tensor,
    input_ids: &Tensor,
    completion_mask: &Tensor,
    use_adapters: bool,
    opts: &LogpOptions,
) -> Result<SeqLogps> {
    let (n, t, d) = hidden.dims3()?;
    if input_ids.dims() != [n, t] {
        return Err(Error::Shape { name: "input_ids".into(), expected: vec![n, t], got: input_ids.dims().to_vec() });
    }
    let picks = picks_concatenated(input_ids, completion_mask)?;
    logps_at_picks_with(model, &hidden.reshape((n * t, d))?, &picks, n, use_adapters, opts)
}

/// `log_softmax(logits)[k, targets[k]]` per row, fused ([`LogSoftmaxGather`]).
///
/// `logits (K, V)` f32/f64 (CPU), `targets (K,)` u32 → `(K,)`. Differentiable w.r.t. `logits`.
/// The log-sum-exp is accumulated in f64. Other devices/dtypes fall back to
/// [`super::dense::selective_log_softmax`].
pub fn log_softmax_gather(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (k, _) = logits.dims2()?;
    if targets.dims() != [k] {
        return Err(Error::Shape { name: "targets".into(), expected: vec![k], got: targets.dims().to_vec() });
    }
    if !crate::device::cpu_kernels(&logits) || !matches!(logits.dtype(), DType::F32 | DType::F64) {
        return super::dense::selective_log_softmax(logits, targets);
    }
    Ok(logits.contiguous()?.apply_op2(&targets.to_dtype(DType::U32)?.contiguous()?, LogSoftmaxGather)?)
}

/// Float types of the fused kernels.
trait Float: WithDType + Send + Sync {
    /// `exp` of every element in place (vectorised for f32, [`crate::model::vexp`]).
    fn exp_slice(v: &mut [Self]);
}
impl Float for f32 {
    fn exp_slice(v: &mut [Self]) {
        crate::model::vexp::exp_in_place(v)
    }
}
impl Float for f64 {
    fn exp_slice(v: &mut [Self]) {
        v.iter_mut().for_each(|x| *x = x.exp());
    }
}

/// `(max, logsumexp)` of one row, the sum of `exp(z - max)` accumulated in f64
/// ([`crate::model::reduce`]'s order); `scratch` holds the row's exponentials afterwards (any
/// length; resized).
fn row_lse<T: Float>(z: &[T], scratch: &mut Vec<T>) -> (T, f64) {
    let m = crate::model::reduce::max(z);
    scratch.clear();
    scratch.extend(z.iter().map(|&x| x - m));
    T::exp_slice(scratch);
    let s = crate::model::reduce::sum_f64(scratch, |e: T| e.to_f64());
    (m, m.to_f64() + s.ln())
}

fn lsg_fwd<T: Float>(z: &[T], targets: &[u32], v: usize) -> Vec<T> {
    z.par_chunks(v)
        .zip(targets.par_iter())
        .map_init(Vec::new, |scratch, (row, &t)| {
            let (_, lse) = row_lse(row, scratch);
            T::from_f64(row[t as usize].to_f64() - lse)
        })
        .collect()
}

/// The backward of [`lsg_fwd`]; `y` its output, from which each row's log-sum-exp is read
/// back as `z[t] - y` (no second pass over the row for it; exact to the rounding of `y`).
fn lsg_bwd<T: Float>(z: &[T], targets: &[u32], g: &[T], y: &[T], v: usize) -> Vec<T> {
    let mut out = vec![T::zero(); z.len()];
    out.par_chunks_mut(v).zip(z.par_chunks(v)).zip(targets.par_iter().zip(g.par_iter().zip(y.par_iter()))).for_each(|((o, row), (&t, (&g, &y)))| {
        let lse = T::from_f64(row[t as usize].to_f64() - y.to_f64());
        for (o, &x) in o.iter_mut().zip(row) {
            *o = x - lse;
        }
        T::exp_slice(o);
        for o in o.iter_mut() {
            *o = T::zero() - g * *o;
        }
        o[t as usize] += g;
    });
    out
}

fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [T]> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))?;
    Ok(&s.as_slice::<T>()?[a..b])
}

/// `(logits (K, V), targets (K,) u32) -> z[k, t_k] - logsumexp(z[k])`, rows in parallel.
///
/// Backward ([`LogSoftmaxGatherBwd`]): `dL/dz[k, j] = g_k (1[j = t_k] - softmax(z[k])_j)`,
/// reading the row's log-sum-exp back from the forward's output as `z[t] - y` (nothing
/// `(K, V)`-sized is saved by the forward; the recovered value carries `y`'s rounding,
/// ~2^-24 |y| in f32, and a target logit of -inf gives a NaN gradient row).
#[derive(Debug, Clone, Copy)]
pub struct LogSoftmaxGather;

impl CustomOp2 for LogSoftmaxGather {
    fn name(&self) -> &'static str {
        "ropo-log-softmax-gather"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (k, v) = l1.shape().dims2()?;
        let t = slice::<u32>(s2, l2, self.name())?;
        if t.len() != k || t.iter().any(|&x| x as usize >= v) {
            candle_core::bail!("log_softmax_gather: targets must be {k} ids below {v}");
        }
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(lsg_fwd(slice::<f32>(s1, l1, self.name())?, t, v)),
            CpuStorage::F64(_) => CpuStorage::F64(lsg_fwd(slice::<f64>(s1, l1, self.name())?, t, v)),
            _ => candle_core::bail!("log_softmax_gather: f32 or f64 logits expected"),
        };
        Ok((out, Shape::from(k)))
    }

    fn bwd(&self, z: &Tensor, t: &Tensor, res: &Tensor, g: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(z.apply_op3_no_bwd(t, &g.contiguous()?, &LogSoftmaxGatherBwd { y: res.contiguous()? })?), None))
    }
}

/// `(logits (K, V), targets (K,), g (K,)) -> g_k (onehot(t_k) - softmax(z_k))`, `(K, V)`;
/// `y (K,)` is the forward's output (each row's log-sum-exp is `z[t] - y`).
#[derive(Debug, Clone)]
pub struct LogSoftmaxGatherBwd {
    y: Tensor,
}

impl CustomOp3 for LogSoftmaxGatherBwd {
    fn name(&self) -> &'static str {
        "ropo-log-softmax-gather-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, v) = l1.shape().dims2()?;
        let t = slice::<u32>(s2, l2, self.name())?;
        let (gy, ly) = self.y.storage_and_layout();
        let candle_core::Storage::Cpu(sy) = &*gy else { candle_core::bail!("log_softmax_gather backward: CPU tensors expected") };
        let out = match (s1, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(lsg_bwd(slice::<f32>(s1, l1, self.name())?, t, slice::<f32>(s3, l3, self.name())?, slice::<f32>(sy, ly, self.name())?, v))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(lsg_bwd(slice::<f64>(s1, l1, self.name())?, t, slice::<f64>(s3, l3, self.name())?, slice::<f64>(sy, ly, self.name())?, v))
            }
            _ => candle_core::bail!("log_softmax_gather backward: logits and gradient of one float dtype expected"),
        };
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| 3.0 * rng.sample::<f64, _>(rand_distr::StandardNormal)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    // The fused op equals the composed selective_log_softmax (values and gradients, f64 to
    // 1e-12; f32 values to 1e-5) and its gradient matches central finite differences.
    #[test]
    fn fused_log_softmax_gather_matches_composed_and_finite_differences() -> Result<()> {
        let z = Var::from_tensor(&randn(&[5, 17], 1))?;
        let t = Tensor::new(&[3u32, 0, 16, 7, 7], &Device::Cpu)?;
        let c = randn(&[5], 2);
        let fused = log_softmax_gather(z.as_tensor(), &t)?;
        let composed = crate::logps::dense::selective_log_softmax(z.as_tensor(), &t)?;
        assert!(max_abs(&fused, &composed) < 1e-12, "{}", max_abs(&fused, &composed));
        let gf = (&fused * &c)?.sum_all()?.backward()?;
        let gc = (&composed * &c)?.sum_all()?.backward()?;
        let (a, b) = (gf.get(z.as_tensor()).expect("fused grad"), gc.get(z.as_tensor()).expect("composed grad"));
        assert!(max_abs(a, b) < 1e-12, "{}", max_abs(a, b));
        let f32v = log_softmax_gather(&z.as_tensor().to_dtype(DType::F32)?, &t)?.to_dtype(DType::F64)?;
        assert!(max_abs(&f32v, &composed) < 1e-5);
        // finite differences on a few entries, L = sum c * fused
        let zv = z.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        let av = a.flatten_all()?.to_vec1::<f64>()?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for i in [3usize, 17, 16 + 2 * 17].into_iter().chain((0..6).map(|_| rng.random_range(0..85))) {
            let l = |d: f64| -> Result<f64> {
                let mut v = zv.clone();
                v[i] += d;
                let zz = Tensor::from_vec(v, (5, 17), &Device::Cpu)?;
                Ok((log_softmax_gather(&zz, &t)? * &c)?.sum_all()?.to_scalar::<f64>()?)
            };
            let fd = (l(1e-6)? - l(-1e-6)?) / 2e-6;
            assert!((fd - av[i]).abs() < 1e-7, "dz[{i}]: analytic {} fd {fd}", av[i]);
        }
        assert!(log_softmax_gather(z.as_tensor(), &Tensor::new(&[3u32, 0, 17, 7, 7], &Device::Cpu)?).is_err());
        Ok(())
    }

    #[test]
    fn picks_follow_the_shifted_mask() -> Result<()> {
        let ids = Tensor::new(&[[1u32, 2, 3, 4], [5, 6, 7, 0]], &Device::Cpu)?;
        let mask = Tensor::new(&[[0f32, 0., 1., 1.], [0., 1., 0.5, 0.]], &Device::Cpu)?;
        let p = picks_concatenated(&ids, &mask)?;
        let want = vec![
            Pick { row: 1, target: 3, weight: 1.0, seq: 0 },
            Pick { row: 2, target: 4, weight: 1.0, seq: 0 },
            Pick { row: 4, target: 6, weight: 1.0, seq: 1 },
            Pick { row: 5, target: 7, weight: 0.5, seq: 1 },
        ];
        assert_eq!(p, want);
        Ok(())
    }
}
