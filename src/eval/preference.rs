//! Preference metrics on held-out pairs: does the policy prefer the chosen answers more than
//! the reference does?
//!
//! Inputs are four summed completion log-probs per pair (policy = adapters on, reference =
//! the base model, adapters bypassed), `π_c, π_r, ref_c, ref_r`. With
//! `c = π_c - ref_c` and `r = π_r - ref_r` (TRL `DPOTrainer`, `../shared/docs/ropo-method.md`
//! "The loss"), per pair:
//!
//! - `rewards/chosen = β c`, `rewards/rejected = β r`, `rewards/margins = β (c - r)`;
//! - `rewards/accuracies = [β c - β r > tolerance]` (TRL's `chosen > rejected` with the gap
//!   thresholded; [`crate::loss::reward_outcome`], the training metrics' rule too), so float
//!   noise around a tie (an identity adapter gives rewards ~1e-7 instead of 0) is not a win;
//! - `rewards/ties = [|β c - β r| <= tolerance]`, the pairs neither side wins (all of them for an
//!   identity adapter), also as a count ([`PreferenceMetrics::ties`]);
//! - `loss = -log σ(β (c - r))` (DPO, sigmoid; computed by [`crate::loss::per_pair_loss`] in
//!   f64, the training loss's own code);
//! - `logps/chosen = π_c`, `logps/rejected = π_r` (summed over completion tokens, nats).
//!
//! Every metric is the mean over pairs, in f64, computed by [`RewardMetrics::compute_with_tolerance`]
//! (the training metrics' own code); the inputs are the training loss's [`PairLogps`].
//!
//! The four log-probs come from [`crate::logps::score_pairs`], the scoring loop `ropo train`'s
//! evaluations use too: each batch of pairs in TRL's `[chosen..; rejected..]` layout (right
//! padding) goes through the model twice, adapters on (policy) and bypassed (reference), each
//! pair's prompt once and the LM head at completion positions only. A model without adapters is
//! its own reference (one pass).

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::loss::{per_pair_loss, LossParams, LossType, PairLogps, RewardMetrics};

/// Default tolerance of the reward gap for `rewards/accuracies` and `rewards/ties`: the training
/// metrics' own, [`crate::loss::REWARD_TOLERANCE`] (1e-4), so `ropo eval` and `ropo train`'s
/// eval records count the same pairs as accurate and as ties.
pub use crate::loss::REWARD_TOLERANCE as DEFAULT_TOLERANCE;

/// The preference metrics of a set of pairs: TRL's reward metrics ([`RewardMetrics`], with
/// TRL's names in JSON) and the context they were computed in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreferenceMetrics {
    /// Number of pairs.
    pub pairs: usize,
    /// β of the implicit reward.
    pub beta: f64,
    /// Tolerance of the reward gap used for `rewards/accuracies` and `rewards/ties`.
    pub tolerance: f64,
    /// Mean DPO (sigmoid) loss.
    pub loss: f64,
    /// `rewards/*` and `logps/*` (means over the pairs).
    #[serde(flatten)]
    pub rewards: RewardMetrics,
    /// Number of pairs with `|β c - β r| <= tolerance` (`rewards/ties` times `pairs`).
    #[serde(default)]
    pub ties: usize,
}

/// The metrics of the module doc from per-pair log-probs (each `(P,)`, any float dtype; the
/// token counts are not used).
///
/// Errors: tensors of different lengths, no pair, a non-finite log-prob, or `tolerance <= 0`.
pub fn preference_metrics(lp: &PairLogps, beta: f64, tolerance: f64) -> Result<PreferenceMetrics> {
    let v = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?) };
    let (pc, pr, rc, rr) = (v(&lp.policy_chosen)?, v(&lp.policy_rejected)?, v(&lp.reference_chosen)?, v(&lp.reference_rejected)?);
    let n = pc.len();
    if [pr.len(), rc.len(), rr.len()].iter().any(|&m| m != n) {
        return Err(Error::Msg("preference metrics: log-prob vectors of different lengths".into()));
    }
    if n == 0 {
        return Err(Error::Msg("preference metrics: no pairs".into()));
    }
    if !(tolerance > 0.0) {
        return Err(Error::Config(format!("preference tolerance must be > 0 (got {tolerance})")));
    }
    if let Some(i) = (0..n).find(|&i| ![pc[i], pr[i], rc[i], rr[i]].iter().all(|x| x.is_finite())) {
        return Err(Error::Msg(format!("preference metrics: pair {i} has a non-finite log-prob")));
    }
    let rewards = RewardMetrics::compute_with_tolerance(lp, beta, tolerance)?;
    // the DPO loss with the training code's definition, in f64
    let t = |v: &[f64]| Tensor::from_slice(v, n, lp.policy_chosen.device());
    let logps = PairLogps {
        policy_chosen: t(&pc)?,
        policy_rejected: t(&pr)?,
        reference_chosen: t(&rc)?,
        reference_rejected: t(&rr)?,
        chosen_tokens: Tensor::ones(n, DType::F64, lp.policy_chosen.device())?,
        rejected_tokens: Tensor::ones(n, DType::F64, lp.policy_chosen.device())?,
    };
    let params = LossParams { beta, ..Default::default() };
    let loss = per_pair_loss(LossType::Sigmoid, &logps, &params)?.sum_all()?.to_scalar::<f64>()? / n as f64;
    let ties = (rewards.rewards_ties * n as f64).round() as usize;
    Ok(PreferenceMetrics { pairs: n, beta, tolerance, loss, rewards, ties })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden() -> serde_json::Value {
        let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/golden/dpo_losses_golden.json");
        serde_json::from_str(&std::fs::read_to_string(p).expect("reading dpo_losses_golden.json")).unwrap()
    }

    fn vecf(v: &serde_json::Value) -> Vec<f64> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
    }

    /// The four log-probs as f64 tensors (token counts 1).
    fn pair_logps(pc: &[f64], pr: &[f64], rc: &[f64], rr: &[f64]) -> PairLogps {
        let t = |v: &[f64]| Tensor::new(v, &candle_core::Device::Cpu).unwrap();
        let ones = vec![1.0; pc.len()];
        PairLogps { policy_chosen: t(pc), policy_rejected: t(pr), reference_chosen: t(rc), reference_rejected: t(rr), chosen_tokens: t(&ones), rejected_tokens: t(&ones) }
    }

    #[test]
    fn matches_trl_golden() {
        // ../shared/golden/dpo_losses_golden.json: TRL 1.16 formulas in torch float64
        let g = golden();
        let lp = pair_logps(
            &vecf(&g["policy_chosen_logps"]),
            &vecf(&g["policy_rejected_logps"]),
            &vecf(&g["reference_chosen_logps"]),
            &vecf(&g["reference_rejected_logps"]),
        );
        let beta = g["beta"].as_f64().unwrap();
        let m = preference_metrics(&lp, beta, DEFAULT_TOLERANCE).unwrap();
        let gm = &g["metrics"];
        let close = |a: f64, b: &serde_json::Value| assert!((a - b.as_f64().unwrap()).abs() < 1e-12, "{a} vs {b}");
        close(m.rewards.rewards_chosen, &gm["rewards/chosen"]);
        close(m.rewards.rewards_rejected, &gm["rewards/rejected"]);
        close(m.rewards.rewards_accuracies, &gm["rewards/accuracies"]);
        assert_eq!((m.ties, m.rewards.rewards_ties), (0, 0.0), "every golden gap exceeds the tolerance");
        close(m.rewards.rewards_margins, &gm["rewards/margins"]);
        let sig = g["losses"].as_array().unwrap().iter().find(|l| l["loss_type"] == "sigmoid").unwrap();
        close(m.loss, &sig["mean_loss"]);
        // logps are the policy's, averaged: (-120.5 - 80.25 - 200 - 33) / 4 and
        // (-118 - 95.5 - 190.75 - 40) / 4
        assert!((m.rewards.logps_chosen - (-433.75 / 4.0)).abs() < 1e-12);
        assert!((m.rewards.logps_rejected - (-444.25 / 4.0)).abs() < 1e-12);
        let js = serde_json::to_value(&m).unwrap();
        assert!(js.get("rewards/accuracies").is_some() && js.get("logps/chosen").is_some());
    }

    #[test]
    fn identity_policy_is_a_tie() {
        // policy = reference up to f32 noise: reward gaps ~1e-7 are ties, not wins; loss = ln 2
        let (pc, pr, rc, rr) = ([-10.0 + 1e-6, -20.0], [-11.0, -21.0 + 2e-6], [-10.0, -20.0 - 1e-6], [-11.0 + 1e-6, -21.0]);
        let lp = pair_logps(&pc, &pr, &rc, &rr);
        let m = preference_metrics(&lp, 0.1, DEFAULT_TOLERANCE).unwrap();
        assert_eq!(m.rewards.rewards_accuracies, 0.0);
        assert_eq!((m.ties, m.rewards.rewards_ties), (2, 1.0));
        assert!((m.loss - std::f64::consts::LN_2).abs() < 1e-6);
        assert!(m.rewards.rewards_margins.abs() < 1e-6);
        // a real win of 1e-3 counts
        let mut pc2 = pc;
        pc2[0] += 1e-2;
        let m2 = preference_metrics(&pair_logps(&pc2, &pr, &rc, &rr), 0.1, DEFAULT_TOLERANCE).unwrap();
        assert_eq!((m2.rewards.rewards_accuracies, m2.ties, m2.rewards.rewards_ties), (0.5, 1, 0.5));
    }

    #[test]
    fn errors() {
        let bad = pair_logps(&[0.0], &[], &[], &[]);
        assert!(preference_metrics(&bad, 0.1, 1e-5).is_err());
        assert!(preference_metrics(&pair_logps(&[], &[], &[], &[]), 0.1, 1e-5).is_err());
    }
}
