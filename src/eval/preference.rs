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
//! Every metric is the mean over pairs, in f64.
//!
//! [`score_pairs`] computes the four log-probs with the real model: each batch of pairs in
//! TRL's `[chosen..; rejected..]` layout (right padding) goes through the model twice, adapters
//! on (policy) and bypassed (reference), and the completion tokens' log-probs are summed
//! ([`crate::logps::completion_logps`]'s definition, computed by
//! [`crate::logps::batch_logps`]: each pair's prompt once, the LM head at completion
//! positions only). A model without adapters is its own reference (one pass).

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::batch::collate;
use crate::data::tokenize::TokenizedPair;
use crate::error::{Error, Result};
use crate::loss::{per_pair_loss, reward_outcome, split_pairs, LossParams, LossType, RewardOutcome};
use crate::model::llama::Model;

/// Default tolerance of the reward gap for `rewards/accuracies` and `rewards/ties`: the training
/// metrics' own, [`crate::loss::REWARD_TOLERANCE`] (1e-4), so `ropo eval` and `ropo train`'s
/// eval records count the same pairs as accurate and as ties.
pub use crate::loss::REWARD_TOLERANCE as DEFAULT_TOLERANCE;

/// Mean preference metrics, with TRL's names in JSON.
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
    /// Mean `β (π_c - ref_c)`.
    #[serde(rename = "rewards/chosen")]
    pub rewards_chosen: f64,
    /// Mean `β (π_r - ref_r)`.
    #[serde(rename = "rewards/rejected")]
    pub rewards_rejected: f64,
    /// Share of pairs with `β c - β r > tolerance`.
    #[serde(rename = "rewards/accuracies")]
    pub rewards_accuracies: f64,
    /// Share of pairs with `|β c - β r| <= tolerance`.
    #[serde(rename = "rewards/ties", default)]
    pub rewards_ties: f64,
    /// Number of pairs with `|β c - β r| <= tolerance` (`rewards/ties` times `pairs`).
    #[serde(default)]
    pub ties: usize,
    /// Mean `β ((π_c - ref_c) - (π_r - ref_r))`.
    #[serde(rename = "rewards/margins")]
    pub rewards_margins: f64,
    /// Mean policy log-prob of the chosen completions.
    #[serde(rename = "logps/chosen")]
    pub logps_chosen: f64,
    /// Mean policy log-prob of the rejected completions.
    #[serde(rename = "logps/rejected")]
    pub logps_rejected: f64,
}

/// The summed completion log-probs of a set of pairs, one entry per pair in each vector.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PairLogprobs {
    /// Policy log p(chosen | prompt).
    pub policy_chosen: Vec<f64>,
    /// Policy log p(rejected | prompt).
    pub policy_rejected: Vec<f64>,
    /// Reference log p(chosen | prompt).
    pub reference_chosen: Vec<f64>,
    /// Reference log p(rejected | prompt).
    pub reference_rejected: Vec<f64>,
}

/// The metrics of the module doc from per-pair log-probs.
///
/// Errors: vectors of different lengths, no pair, a non-finite log-prob, or `tolerance <= 0`.
pub fn preference_metrics(lp: &PairLogprobs, beta: f64, tolerance: f64) -> Result<PreferenceMetrics> {
    let n = lp.policy_chosen.len();
    if [lp.policy_rejected.len(), lp.reference_chosen.len(), lp.reference_rejected.len()].iter().any(|&m| m != n) {
        return Err(Error::Msg("preference metrics: log-prob vectors of different lengths".into()));
    }
    if n == 0 {
        return Err(Error::Msg("preference metrics: no pairs".into()));
    }
    if !(tolerance > 0.0) {
        return Err(Error::Config(format!("preference tolerance must be > 0 (got {tolerance})")));
    }
    let mut m = PreferenceMetrics {
        pairs: n,
        beta,
        tolerance,
        loss: 0.0,
        rewards_chosen: 0.0,
        rewards_rejected: 0.0,
        rewards_accuracies: 0.0,
        rewards_ties: 0.0,
        ties: 0,
        rewards_margins: 0.0,
        logps_chosen: 0.0,
        logps_rejected: 0.0,
    };
    for i in 0..n {
        let (pc, pr, rc, rr) = (lp.policy_chosen[i], lp.policy_rejected[i], lp.reference_chosen[i], lp.reference_rejected[i]);
        if ![pc, pr, rc, rr].iter().all(|x| x.is_finite()) {
            return Err(Error::Msg(format!("preference metrics: pair {i} has a non-finite log-prob")));
        }
        let chosen = beta * (pc - rc);
        let rejected = beta * (pr - rr);
        m.rewards_chosen += chosen;
        m.rewards_rejected += rejected;
        m.rewards_margins += chosen - rejected;
        match reward_outcome(chosen, rejected, tolerance) {
            RewardOutcome::Chosen => m.rewards_accuracies += 1.0,
            RewardOutcome::Tie => m.ties += 1,
            RewardOutcome::Rejected => {}
        }
        m.logps_chosen += pc;
        m.logps_rejected += pr;
    }
    // the DPO loss with the training code's definition, in f64
    let t = |v: &[f64]| Tensor::from_slice(v, n, &Device::Cpu);
    let ones = Tensor::ones(n, DType::F64, &Device::Cpu)?;
    let logps = crate::loss::PairLogps {
        policy_chosen: t(&lp.policy_chosen)?,
        policy_rejected: t(&lp.policy_rejected)?,
        reference_chosen: t(&lp.reference_chosen)?,
        reference_rejected: t(&lp.reference_rejected)?,
        chosen_tokens: ones.clone(),
        rejected_tokens: ones,
    };
    let params = LossParams { beta, ..Default::default() };
    m.loss = per_pair_loss(LossType::Sigmoid, &logps, &params)?.sum_all()?.to_scalar::<f64>()?;
    let nf = n as f64;
    m.rewards_ties = m.ties as f64;
    for v in [
        &mut m.loss,
        &mut m.rewards_chosen,
        &mut m.rewards_rejected,
        &mut m.rewards_accuracies,
        &mut m.rewards_ties,
        &mut m.rewards_margins,
        &mut m.logps_chosen,
        &mut m.logps_rejected,
    ] {
        *v /= nf;
    }
    Ok(m)
}

/// The four summed completion log-probs of every pair, in order, with `model`: policy =
/// adapters on, reference = adapters bypassed. `batch_size` pairs go through the model at once;
/// `on_pairs(k)` is called after each batch of k pairs (for a progress bar).
///
/// Errors: `batch_size == 0`, a model error.
pub fn score_pairs(
    model: &Model,
    pairs: &[TokenizedPair],
    pad_id: u32,
    batch_size: usize,
    mut on_pairs: impl FnMut(usize),
) -> Result<PairLogprobs> {
    if batch_size == 0 {
        return Err(Error::Config("batch size must be >= 1".into()));
    }
    let adapted = model.linears().iter().any(|l| l.adapter.is_some());
    let mut out = PairLogprobs::default();
    let v = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?) };
    for chunk in pairs.chunks(batch_size) {
        let refs: Vec<&TokenizedPair> = chunk.iter().collect();
        let b = collate(&refs, pad_id, model.device())?;
        // detached right away: with adapter `Var`s in the graph, the intermediates would
        // otherwise stay alive as long as the result does. Each pair's prompt runs once (prefix
        // sharing) and the LM head only at completion positions (`logps::batch_logps`)
        let logps = |use_adapters: bool| -> Result<Tensor> { crate::logps::batch_logps_detached(model, &b, use_adapters, true) }; // (2B,)
        let reference = logps(false)?;
        let policy = if adapted { logps(true)? } else { reference.clone() };
        let (rc, rr) = split_pairs(&reference)?;
        let (pc, pr) = split_pairs(&policy)?;
        out.reference_chosen.extend(v(&rc)?);
        out.reference_rejected.extend(v(&rr)?);
        out.policy_chosen.extend(v(&pc)?);
        out.policy_rejected.extend(v(&pr)?);
        on_pairs(chunk.len());
    }
    Ok(out)
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

    #[test]
    fn matches_trl_golden() {
        // ../shared/golden/dpo_losses_golden.json: TRL 1.16 formulas in torch float64
        let g = golden();
        let lp = PairLogprobs {
            policy_chosen: vecf(&g["policy_chosen_logps"]),
            policy_rejected: vecf(&g["policy_rejected_logps"]),
            reference_chosen: vecf(&g["reference_chosen_logps"]),
            reference_rejected: vecf(&g["reference_rejected_logps"]),
        };
        let beta = g["beta"].as_f64().unwrap();
        let m = preference_metrics(&lp, beta, DEFAULT_TOLERANCE).unwrap();
        let gm = &g["metrics"];
        let close = |a: f64, b: &serde_json::Value| assert!((a - b.as_f64().unwrap()).abs() < 1e-12, "{a} vs {b}");
        close(m.rewards_chosen, &gm["rewards/chosen"]);
        close(m.rewards_rejected, &gm["rewards/rejected"]);
        close(m.rewards_accuracies, &gm["rewards/accuracies"]);
        assert_eq!((m.ties, m.rewards_ties), (0, 0.0), "every golden gap exceeds the tolerance");
        close(m.rewards_margins, &gm["rewards/margins"]);
        let sig = g["losses"].as_array().unwrap().iter().find(|l| l["loss_type"] == "sigmoid").unwrap();
        close(m.loss, &sig["mean_loss"]);
        // logps are the policy's, averaged: (-120.5 - 80.25 - 200 - 33) / 4 and
        // (-118 - 95.5 - 190.75 - 40) / 4
        assert!((m.logps_chosen - (-433.75 / 4.0)).abs() < 1e-12);
        assert!((m.logps_rejected - (-444.25 / 4.0)).abs() < 1e-12);
        let js = serde_json::to_value(&m).unwrap();
        assert!(js.get("rewards/accuracies").is_some() && js.get("logps/chosen").is_some());
    }

    #[test]
    fn identity_policy_is_a_tie() {
        // policy = reference up to f32 noise: reward gaps ~1e-7 are ties, not wins; loss = ln 2
        let lp = PairLogprobs {
            policy_chosen: vec![-10.0 + 1e-6, -20.0],
            policy_rejected: vec![-11.0, -21.0 + 2e-6],
            reference_chosen: vec![-10.0, -20.0 - 1e-6],
            reference_rejected: vec![-11.0 + 1e-6, -21.0],
        };
        let m = preference_metrics(&lp, 0.1, DEFAULT_TOLERANCE).unwrap();
        assert_eq!(m.rewards_accuracies, 0.0);
        assert_eq!((m.ties, m.rewards_ties), (2, 1.0));
        assert!((m.loss - std::f64::consts::LN_2).abs() < 1e-6);
        assert!(m.rewards_margins.abs() < 1e-6);
        // a real win of 1e-3 counts
        let mut lp2 = lp.clone();
        lp2.policy_chosen[0] += 1e-2;
        let m2 = preference_metrics(&lp2, 0.1, DEFAULT_TOLERANCE).unwrap();
        assert_eq!((m2.rewards_accuracies, m2.ties, m2.rewards_ties), (0.5, 1, 0.5));
    }

    #[test]
    fn errors() {
        let bad = PairLogprobs { policy_chosen: vec![0.0], ..Default::default() };
        assert!(preference_metrics(&bad, 0.1, 1e-5).is_err());
        assert!(preference_metrics(&PairLogprobs::default(), 0.1, 1e-5).is_err());
    }
}
