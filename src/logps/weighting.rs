//! What TRL 1.16's `DPOTrainer` computes beside the plain summed log-probs, from the same
//! per-token values: LD-DPO's length-desensitised sums (`ld_alpha`), the unweighted sums its
//! `sft` term reads when `ld_alpha` is set, and WPO's sequence weights (`use_weighting`).
//!
//! Definitions (`trl/trainer/dpo_trainer.py`, `_compute_loss`), for the concatenated layout
//! `[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]` of `N = 2B` rows, `ℓ_t` the log-prob of
//! completion token `t` (1-based position `j(t)` among its row's completion tokens) and `n_s`
//! row `s`'s completion length:
//! - LD-DPO (Liu et al. 2024, arXiv 2409.06411): with `ℓ = min(n_chosen, n_rejected)` of the
//!   pair, `logps_s = Σ_{j(t) <= ℓ} ℓ_t + α Σ_{j(t) > ℓ} ℓ_t`, for the policy and the reference
//!   alike; `α = 1` is plain DPO.
//! - WPO (Zhou et al. 2024, arXiv 2406.11827, Eq. 2): `w_s = exp((1/max(n_s,1)) Σ_t (ℓ_t -
//!   log Σ_v p_v(t)²))` over the policy's logits, without gradient; each loss term's per-pair
//!   value is multiplied by `w_chosen · w_rejected`.
//!
//! Legend: K completion tokens of a batch (the rows of the gathered logits), V vocabulary.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::fused::Pick;
use crate::error::{Error, Result};

/// Which extra sums a log-prob pass computes (TRL `DPOConfig` names).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LogpOptions {
    /// LD-DPO's α in `[0, 1]`: the weight of the completion tokens past the pair's shared
    /// length. `None`: plain sums.
    pub ld_alpha: Option<f64>,
    /// Compute WPO's sequence weights ([`SeqLogps::wpo_weights`]; policy passes only).
    pub use_weighting: bool,
}

impl LogpOptions {
    /// The options of a reference pass: only `ld_alpha` applies to the reference.
    pub fn reference(self) -> Self {
        Self { ld_alpha: self.ld_alpha, use_weighting: false }
    }
}

/// The sums of one log-prob pass, each `(N,)` in the rows' order and the logits' dtype.
#[derive(Debug, Clone)]
pub struct SeqLogps {
    /// `log π(y|x)`, LD-DPO-weighted when `ld_alpha` is set (differentiable).
    pub logps: Tensor,
    /// The plain (unweighted) sums when `ld_alpha` is set, for the `sft` term; `None`: equal to
    /// `logps` (differentiable).
    pub unweighted: Option<Tensor>,
    /// WPO's `w_s` when `use_weighting` is set (detached).
    pub wpo_weights: Option<Tensor>,
}

/// The LD-DPO factor of every pick (`1` within the pair's shared length, `α` past it).
///
/// `picks` in the concatenated layout of `n_seqs = 2B` rows, ordered by position within each
/// row (as both pick builders make them). Errors: an odd `n_seqs`.
pub fn ld_factors(picks: &[Pick], n_seqs: usize, alpha: f64) -> Result<Vec<f64>> {
    if n_seqs % 2 != 0 {
        return Err(Error::Msg(format!("LD-DPO needs [chosen; rejected] rows, got an odd count {n_seqs}")));
    }
    let mut len = vec![0usize; n_seqs];
    for p in picks {
        len[p.seq] += 1;
    }
    let b = n_seqs / 2;
    let mut seen = vec![0usize; n_seqs];
    Ok(picks
        .iter()
        .map(|p| {
            seen[p.seq] += 1;
            let shared = len[p.seq % b].min(len[p.seq % b + b]);
            if seen[p.seq] <= shared {
                1.0
            } else {
                alpha
            }
        })
        .collect())
}

/// `log Σ_v softmax(z)_v²` of every row of `logits (K, V)` (f32 or f64), in f64:
/// `log Σ exp(2(z - m)) - 2 log Σ exp(z - m)` (the max `m` cancels). Not differentiated.
pub fn log_sum_squared_probs(logits: &Tensor) -> Result<Vec<f64>> {
    let (_, v) = logits.dims2()?;
    fn rows<T: Copy + Into<f64> + Send + Sync>(z: &[T], v: usize) -> Vec<f64> {
        z.par_chunks(v)
            .map(|row| {
                let m = row.iter().map(|&x| x.into()).fold(f64::NEG_INFINITY, f64::max);
                let (mut s1, mut s2) = (0.0f64, 0.0f64);
                for &x in row {
                    let e = (x.into() - m).exp();
                    s1 += e;
                    s2 += e * e;
                }
                s2.ln() - 2.0 * s1.ln()
            })
            .collect()
    }
    let flat = logits.detach().flatten_all()?;
    Ok(match flat.dtype() {
        DType::F64 => rows(&flat.to_vec1::<f64>()?, v),
        _ => rows(&flat.to_dtype(DType::F32)?.to_vec1::<f32>()?, v),
    })
}

/// Sum the per-token log-probs `per (K,)` of `picks` into the sequences, with the extras of
/// `opts`; `logits (K, V)` are the rows `per` was taken from, needed only for WPO
/// (`opts.use_weighting`; an error without them).
///
/// `plain[s] = Σ_{p.seq = s} p.weight · per_p`; `logps` is `plain` or, with `ld_alpha`, the
/// LD-DPO sum ([`ld_factors`]); WPO's weight of row `s` is `exp(Σ_p p.weight (per_p - log Σ
/// p²) / max(n_s, 1))`, `n_s = Σ_{p.seq = s} p.weight`. Errors: shape mismatches.
pub fn sums_at_picks(per: &Tensor, logits: Option<&Tensor>, picks: &[Pick], n_seqs: usize, opts: &LogpOptions) -> Result<SeqLogps> {
    let k = picks.len();
    let (dtype, dev) = (per.dtype(), per.device());
    let seg = |factor: &dyn Fn(usize) -> f64| -> Result<Tensor> {
        let mut m = vec![0f64; n_seqs * k];
        for (i, p) in picks.iter().enumerate() {
            m[p.seq * k + i] = p.weight * factor(i);
        }
        Ok(Tensor::from_vec(m, (n_seqs, k), dev)?.to_dtype(dtype)?)
    };
    let column = per.unsqueeze(1)?;
    let plain = seg(&|_| 1.0)?.matmul(&column)?.squeeze(1)?;
    let (logps, unweighted) = match opts.ld_alpha {
        None => (plain, None),
        Some(alpha) => {
            let f = ld_factors(picks, n_seqs, alpha)?;
            (seg(&|i| f[i])?.matmul(&column)?.squeeze(1)?, Some(plain))
        }
    };
    let wpo_weights = match (opts.use_weighting, logits) {
        (false, _) => None,
        (true, Some(logits)) => Some(wpo_weights(per, logits, picks, n_seqs)?),
        (true, None) => return Err(Error::Msg("WPO weights need the logits of the picked rows".into())),
    };
    Ok(SeqLogps { logps, unweighted, wpo_weights })
}

/// WPO's `w_s` `(n_seqs,)` in `per`'s dtype, detached (see [`sums_at_picks`]).
fn wpo_weights(per: &Tensor, logits: &Tensor, picks: &[Pick], n_seqs: usize) -> Result<Tensor> {
    let denom = log_sum_squared_probs(logits)?;
    let per_v = per.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?;
    if denom.len() != picks.len() || per_v.len() != picks.len() {
        return Err(Error::Msg(format!("WPO: {} picks, {} log-probs, {} logit rows", picks.len(), per_v.len(), denom.len())));
    }
    let (mut sum, mut n) = (vec![0f64; n_seqs], vec![0f64; n_seqs]);
    for (i, p) in picks.iter().enumerate() {
        sum[p.seq] += p.weight * (per_v[i] - denom[i]);
        n[p.seq] += p.weight;
    }
    let w: Vec<f64> = sum.iter().zip(&n).map(|(s, n)| (s / n.max(1.0)).exp()).collect();
    Ok(Tensor::from_vec(w, n_seqs, per.device())?.to_dtype(per.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(seq: usize) -> Pick {
        Pick { row: 0, target: 0, weight: 1.0, seq }
    }

    // B = 2: pair 0 has 3 chosen and 1 rejected tokens (shared 1), pair 1 has 2 and 2 (shared 2).
    #[test]
    fn ld_factors_weigh_the_tail_only() {
        let picks: Vec<Pick> = [0, 0, 0, 1, 1, 2, 3, 3].into_iter().map(pick).collect();
        let f = ld_factors(&picks, 4, 0.25).unwrap();
        assert_eq!(f, vec![1.0, 0.25, 0.25, 1.0, 1.0, 1.0, 1.0, 1.0]);
        assert!(ld_factors(&picks, 3, 0.5).is_err());
    }

    // log Σ p² of a uniform row over V is -log V; of a one-hot limit, 0.
    #[test]
    fn log_sum_squared_probs_closed_forms() {
        let z = Tensor::new(&[[0.0f64, 0.0, 0.0, 0.0], [0.0, -1000.0, -1000.0, -1000.0]], &candle_core::Device::Cpu).unwrap();
        let d = log_sum_squared_probs(&z).unwrap();
        assert!((d[0] + 4f64.ln()).abs() < 1e-15 && d[1].abs() < 1e-15, "{d:?}");
    }
}
