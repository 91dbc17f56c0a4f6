//! The data-parallel halves of the loop (see [`crate::collective`]): each rank's share of a
//! step's micro-batches and of every scoring pass, and the gathers that put the shares back in
//! one global order, so that N ranks compute exactly what one process computes.
//!
//! - A step of `gradient_accumulation_steps` (GA) micro-batches per rank has `GA x N`
//!   micro-batches, run in GA rounds of N: in round j rank r runs micro-batch `j·N + r` (every
//!   rank walks the same data cursor); after each round the ranks gather the round's gradients
//!   (flattened, exactly) and statistics, and each rank accumulates them in rank order, i.e. in
//!   micro-batch order, as one process with `GA x N` accumulation steps does; no rank holds more
//!   than one round's gradients.
//! - A scoring pass over a pair set (reference log-probs, evaluation) is split into contiguous
//!   shares of whole batches ([`block_shares`]), so every batch holds the same pairs (and so the
//!   same padding and the same float results) as in one process; the per-pair values are gathered
//!   in pair order.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};

use crate::collective::{block_shares, Collective, ExchangeStats};
use crate::data::tokenize::TokenizedPair;
use crate::error::{Error, Result};
use crate::logps::{score_pairs_with, LogpOptions, Pass, PairScores};
use crate::loss::RewardMetrics;
use crate::model::llama::Model;
use crate::optim::Grads;
use crate::reference::{self, PairRefLogps};

/// What one micro-batch gives the step besides its gradients.
#[derive(Debug, Clone, Default)]
pub struct MicroStats {
    /// Its loss (mean over its pairs), f64.
    pub loss: f64,
    /// Its reward metrics.
    pub metrics: RewardMetrics,
    /// Its loss terms (name, mean), in the loss spec's order (the same names on every rank).
    pub terms: Vec<(&'static str, f64)>,
    /// Its real (non-padding) tokens.
    pub tokens: usize,
}

const STATS_LEN: usize = 9;

impl MicroStats {
    /// `STATS_LEN + terms` values.
    fn to_f64s(&self) -> Vec<f64> {
        let m = &self.metrics;
        let mut v = vec![self.loss, m.rewards_chosen, m.rewards_rejected, m.rewards_accuracies, m.rewards_ties, m.rewards_margins, m.logps_chosen, m.logps_rejected, self.tokens as f64];
        v.extend(self.terms.iter().map(|&(_, x)| x));
        v
    }

    /// The inverse of [`MicroStats::to_f64s`], with the term names of `names`.
    fn from_f64s(v: &[f64], names: &[&'static str]) -> Self {
        let metrics = RewardMetrics {
            rewards_chosen: v[1],
            rewards_rejected: v[2],
            rewards_accuracies: v[3],
            rewards_ties: v[4],
            rewards_margins: v[5],
            logps_chosen: v[6],
            logps_rejected: v[7],
        };
        let terms = names.iter().zip(&v[STATS_LEN..]).map(|(&k, &x)| (k, x)).collect();
        Self { loss: v[0], metrics, terms, tokens: v[8] as usize }
    }
}

/// A round's micro-batches from every rank, in rank order (rank 0's first), and whether any
/// rank was asked to stop (Ctrl-C).
///
/// `local`: this rank's micro-batches, in order, each `(gradients, stats)`; every rank has the
/// same count. With one rank nothing is copied. The gradients travel as f32 (exact for f32,
/// bf16 and f16 gradients) and come back in their own dtype and shapes.
///
/// Errors: ranks with different micro-batch counts or gradient shapes, a failed exchange.
pub fn gather_micro_batches(world: &dyn Collective, stats: &ExchangeStats, local: Vec<(Grads, MicroStats)>, stop: bool) -> Result<(Vec<(Grads, MicroStats)>, bool)> {
    if world.size() == 1 {
        return Ok((local, stop));
    }
    let Some((template, first)) = local.first() else { return Err(Error::Msg("a rank ran no micro-batch this step".into())) };
    let names: Vec<&'static str> = first.terms.iter().map(|&(k, _)| k).collect();
    let stats_len = STATS_LEN + names.len();
    let layout: Vec<(Vec<usize>, DType)> = template.0.iter().map(|g| (g.dims().to_vec(), g.dtype())).collect();
    let per_micro: usize = layout.iter().map(|(d, _)| d.iter().product::<usize>()).sum();
    let mut flat: Vec<f32> = Vec::with_capacity(per_micro * local.len());
    let mut scalars: Vec<f64> = Vec::with_capacity(stats_len * local.len() + 1);
    for (g, s) in &local {
        for t in &g.0 {
            flat.extend(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        }
        scalars.extend(s.to_f64s());
    }
    scalars.push(f64::from(u8::from(stop)));
    let all_flat = stats.timed(flat.len() * 4, || world.all_gather_f32(&flat))?;
    let all_scalars = stats.timed(scalars.len() * 8, || world.all_gather_f64(&scalars))?;
    let device = template.0.first().map(|t| t.device().clone()).unwrap_or(Device::Cpu);
    let mut out = Vec::with_capacity(local.len() * world.size());
    let mut any_stop = false;
    for (rank, (f, s)) in all_flat.iter().zip(&all_scalars).enumerate() {
        let n = local.len();
        if f.len() != per_micro * n || s.len() != stats_len * n + 1 {
            return Err(Error::Msg(format!("rank {rank} sent {} gradient values and {} statistics for a step; rank {} expected {} and {}", f.len(), s.len(), world.rank(), per_micro * n, stats_len * n + 1)));
        }
        any_stop |= s[stats_len * n] != 0.0;
        for k in 0..n {
            let grads = unflatten(&f[k * per_micro..(k + 1) * per_micro], &layout, &device)?;
            out.push((grads, MicroStats::from_f64s(&s[k * stats_len..(k + 1) * stats_len], &names)));
        }
    }
    Ok((out, any_stop))
}

fn unflatten(flat: &[f32], layout: &[(Vec<usize>, DType)], device: &Device) -> Result<Grads> {
    let mut off = 0;
    let mut out = Vec::with_capacity(layout.len());
    for (dims, dtype) in layout {
        let n: usize = dims.iter().product();
        out.push(Tensor::from_slice(&flat[off..off + n], dims.as_slice(), device)?.to_dtype(*dtype)?);
        off += n;
    }
    Ok(Grads(out))
}

/// Every rank's per-pair columns, joined in pair order. `local`: this rank's `ncols` columns of
/// its share's length (`shares[rank].len()` values each, one after the other), then `tail`
/// per-rank totals. Returns the `ncols` columns over all pairs and the tails summed over ranks.
///
/// Errors: a rank that sent another count than its share says.
fn gather_pair_columns(world: &dyn Collective, stats: &ExchangeStats, shares: &[Range<usize>], ncols: usize, tail: usize, local: &[f64]) -> Result<(Vec<Vec<f64>>, Vec<f64>)> {
    let all = stats.timed(local.len() * 8, || world.all_gather_f64(local))?;
    let total: usize = shares.iter().map(|r| r.len()).sum();
    let mut cols: Vec<Vec<f64>> = vec![Vec::with_capacity(total); ncols];
    let mut tails = vec![0f64; tail];
    for (r, part) in all.iter().enumerate() {
        let n = shares[r].len();
        if part.len() != ncols * n + tail {
            return Err(Error::Msg(format!("rank {r} sent {} values for {n} pairs ({ncols} a pair and {tail} more expected)", part.len())));
        }
        for (c, col) in cols.iter_mut().enumerate() {
            col.extend_from_slice(&part[c * n..(c + 1) * n]);
        }
        for (t, v) in tails.iter_mut().zip(&part[ncols * n..]) {
            *t += v;
        }
    }
    Ok((cols, tails))
}

/// The reference log-probs of every pair of `pairs`, each rank scoring its share of whole
/// `batch_size` batches ([`reference::compute_all`]) and the shares gathered in pair order
/// (as f64: exact for the f32 values).
#[allow(clippy::too_many_arguments)]
pub fn reference_logps(world: &dyn Collective, stats: &ExchangeStats, model: &Model, pairs: &[TokenizedPair], batch_size: usize, pad: u32, share_prompt: bool, ld_alpha: Option<f64>) -> Result<PairRefLogps> {
    let shares = block_shares(pairs.len(), batch_size, world.size());
    let mine = &pairs[shares[world.rank()].clone()];
    let local = match mine.is_empty() {
        true => PairRefLogps { chosen: Vec::new(), rejected: Vec::new() },
        false => reference::compute_all(model, mine, batch_size, pad, share_prompt, ld_alpha, |_, _| {})?,
    };
    if world.size() == 1 {
        return Ok(local);
    }
    let v: Vec<f64> = local.chosen.iter().chain(&local.rejected).map(|&x| f64::from(x)).collect();
    let (cols, _) = gather_pair_columns(world, stats, &shares, 2, 0, &v)?;
    let f32s = |c: &[f64]| c.iter().map(|&x| x as f32).collect();
    Ok(PairRefLogps { chosen: f32s(&cols[0]), rejected: f32s(&cols[1]) })
}

/// Rank 0's reference cache, on every rank: `value` is read on rank 0 only (the others pass
/// `None`) and sent as f32; `None` on every rank when rank 0 has none.
pub fn from_main(world: &dyn Collective, stats: &ExchangeStats, value: Option<PairRefLogps>) -> Result<Option<PairRefLogps>> {
    if world.size() == 1 {
        return Ok(value);
    }
    let v: Vec<f32> = match (world.is_main(), &value) {
        (true, Some(r)) => r.chosen.iter().chain(&r.rejected).copied().collect(),
        _ => Vec::new(),
    };
    let all = stats.timed(v.len() * 4, || world.all_gather_f32(&v))?;
    let main = &all[0];
    if main.is_empty() {
        return Ok(None);
    }
    let (chosen, rejected) = main.split_at(main.len() / 2);
    Ok(Some(PairRefLogps { chosen: chosen.to_vec(), rejected: rejected.to_vec() }))
}

/// The policy's scores of every pair of `pairs` ([`score_pairs_with`], `Pass::Policy`, with
/// `opts`: LD-DPO's unweighted sums and WPO's weights when asked), each rank scoring its share
/// of whole batches, gathered in pair order; one process scores them all.
#[allow(clippy::too_many_arguments)]
pub fn policy_scores(world: &dyn Collective, stats: &ExchangeStats, model: &Model, pairs: &[TokenizedPair], pad: u32, batch_size: usize, share_prompt: bool, opts: &LogpOptions) -> Result<PairScores> {
    if world.size() == 1 {
        return score_pairs_with(model, pairs, pad, batch_size, share_prompt, Pass::Policy, opts, |_| {});
    }
    let shares = block_shares(pairs.len(), batch_size, world.size());
    let mine = &pairs[shares[world.rank()].clone()];
    // columns, chosen then rejected each: the policy log-probs, the token counts, then (when
    // opts asks for them, so on every rank alike) the unweighted sums and the WPO weights
    let (unweighted, wpo) = (opts.ld_alpha.is_some(), opts.use_weighting);
    let ncols = 4 + 2 * usize::from(unweighted) + 2 * usize::from(wpo);
    let mut v: Vec<f64> = Vec::with_capacity(ncols * mine.len() + 1);
    let mut real_tokens = 0;
    if !mine.is_empty() {
        let s = score_pairs_with(model, mine, pad, batch_size, share_prompt, Pass::Policy, opts, |_| {})?;
        let mut cols = Vec::with_capacity(ncols);
        for (on, pair, what) in [(true, s.policy, "policy log-probs"), (true, Some(s.tokens), "token counts"), (unweighted, s.policy_unweighted, "unweighted sums"), (wpo, s.policy_wpo_weights, "WPO weights")] {
            if on {
                let (c, r) = pair.ok_or_else(|| Error::Msg(format!("the policy pass gave no {what}")))?;
                cols.extend([c, r]);
            }
        }
        for t in &cols {
            v.extend(t.to_dtype(DType::F64)?.to_vec1::<f64>()?);
        }
        real_tokens = s.real_tokens;
    }
    v.push(real_tokens as f64);
    let (cols, tails) = gather_pair_columns(world, stats, &shares, ncols, 1, &v)?;
    // every rank rebuilds the tensors in their own dtypes (a rank with an empty share too):
    // token counts f32, the rest the model's dtype
    let (dtype, device) = (model.dtype(), model.device());
    let mut tensors = cols.iter().enumerate().map(|(k, c)| -> Result<Tensor> {
        let d = if k == 2 || k == 3 { DType::F32 } else { dtype };
        Ok(Tensor::from_slice(c, c.len(), device)?.to_dtype(d)?)
    });
    let mut pair = |on: bool| -> Result<Option<(Tensor, Tensor)>> {
        match on {
            true => Ok(Some((tensors.next().expect("a column")?, tensors.next().expect("a column")?))),
            false => Ok(None),
        }
    };
    let policy = pair(true)?;
    let tokens = pair(true)?.expect("token columns");
    Ok(PairScores { policy, reference: None, policy_unweighted: pair(unweighted)?, policy_wpo_weights: pair(wpo)?, tokens, real_tokens: tails[0] as usize })
}
