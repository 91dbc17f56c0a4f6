//! TRL 1.x's loss lists: `loss_type = ["sigmoid", "bco_pair", "sft"]` with `loss_weights =
//! [0.8, 0.2, 1.0]` (MPO), summed as `DPOTrainer._compute_loss` does (TRL 1.16,
//! `trl/trainer/dpo_trainer.py`): `loss = Σ_k w_k · mean_b(L_k,b · ω_b)`, `ω_b = 1` or, with
//! `use_weighting`, WPO's `w_chosen,b · w_rejected,b` ([`crate::logps::weighting`]).
//!
//! `sft` is the NLL of the chosen completions, token-averaged over the batch ([`sft_loss`], TRL's
//! `-chosen_per_token_logps[chosen_mask].mean()`, read from the unweighted sums when `ld_alpha`
//! is set), broadcast to every pair as TRL does. ropo's `rpo_alpha = a` is the term `("sft", a)`
//! appended to the list ([`LossSpec::from_training`]): the same code, so the same bits.

use std::fmt;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{per_pair_loss, sft_loss, LossOutput, LossParams, LossType, PairLogps, RewardMetrics};
use crate::error::{Error, Result};

/// One entry of `training.loss_type`: a pairwise loss, or `sft` (TRL 1.16's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LossTerm {
    /// A pairwise preference loss ([`LossType`]).
    Pair(LossType),
    /// The NLL of the chosen completions ([`sft_loss`]).
    Sft,
}

impl LossTerm {
    /// The config name (`"sigmoid"`, ..., `"sft"`).
    pub fn name(self) -> &'static str {
        match self {
            LossTerm::Pair(l) => l.name(),
            LossTerm::Sft => "sft",
        }
    }

    /// Parse a config name; the error lists the valid names.
    pub fn from_name(s: &str) -> Result<Self> {
        if s == "sft" {
            return Ok(LossTerm::Sft);
        }
        LossType::from_name(s).map(LossTerm::Pair).map_err(|_| {
            let mut names: Vec<_> = LossType::ALL.iter().map(|l| l.name()).collect();
            names.push("sft");
            Error::Config(format!("unknown loss type {s:?}; should be one of {names:?}"))
        })
    }

    /// The metric name of this term's value (its batch mean before the loss weight):
    /// `nll_loss` for `sft` (TRL's name of the RPO/SFT term), `loss/<type>` for the others
    /// (TRL 1.16 logs only their weighted sum, as `loss`).
    pub fn metric_name(self) -> &'static str {
        match self {
            LossTerm::Sft => "nll_loss",
            LossTerm::Pair(l) => match l {
                LossType::Sigmoid => "loss/sigmoid",
                LossType::Hinge => "loss/hinge",
                LossType::Ipo => "loss/ipo",
                LossType::ExoPair => "loss/exo_pair",
                LossType::NcaPair => "loss/nca_pair",
                LossType::Robust => "loss/robust",
                LossType::BcoPair => "loss/bco_pair",
                LossType::SppoHard => "loss/sppo_hard",
                LossType::ApoZero => "loss/apo_zero",
                LossType::ApoDown => "loss/apo_down",
                LossType::Discopop => "loss/discopop",
                LossType::SigmoidNorm => "loss/sigmoid_norm",
                LossType::Aot => "loss/aot",
                LossType::AotUnpaired => "loss/aot_unpaired",
            },
        }
    }
}

impl fmt::Display for LossTerm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `training.loss_type`: one name or a list of names (TRL 1.x's `list[str]`); printed back as
/// a string when it holds one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LossTypes(pub Vec<LossTerm>);

impl LossTypes {
    /// One loss type.
    pub fn one(l: LossType) -> Self {
        Self(vec![LossTerm::Pair(l)])
    }

    /// The pairwise losses of the list (not `sft`).
    pub fn pair_losses(&self) -> impl Iterator<Item = LossType> + '_ {
        self.0.iter().filter_map(|t| match t {
            LossTerm::Pair(l) => Some(*l),
            LossTerm::Sft => None,
        })
    }

    /// Whether the list holds `l`.
    pub fn contains(&self, l: LossType) -> bool {
        self.0.contains(&LossTerm::Pair(l))
    }
}

impl fmt::Display for LossTypes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = self.0.iter().map(|t| t.name()).collect();
        f.write_str(&names.join("+"))
    }
}

impl Serialize for LossTypes {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => s.serialize_str(one.name()),
            many => many.iter().map(|t| t.name()).collect::<Vec<_>>().serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for LossTypes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        let names = match OneOrMany::deserialize(d).map_err(|_| serde::de::Error::custom("loss_type must be a loss name or a list of loss names"))? {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        };
        if names.is_empty() {
            return Err(serde::de::Error::custom("loss_type must name at least one loss"));
        }
        names.iter().map(|n| LossTerm::from_name(n).map_err(serde::de::Error::custom)).collect::<std::result::Result<_, _>>().map(LossTypes)
    }
}

/// The weighted terms of the batch loss and WPO's switch.
#[derive(Debug, Clone, PartialEq)]
pub struct LossSpec {
    /// `(term, weight)` in the configured order (the order of the float sum).
    pub terms: Vec<(LossTerm, f64)>,
    /// WPO: scale every term's per-pair value by `w_chosen · w_rejected`.
    pub use_weighting: bool,
}

impl LossSpec {
    /// One pairwise loss of weight 1, plus `("sft", alpha)` when `rpo_alpha` is set.
    pub fn single(loss_type: LossType, rpo_alpha: Option<f64>) -> Self {
        Self::from_training(&LossTypes::one(loss_type), None, rpo_alpha, false)
    }

    /// The spec of `training.loss_type`, `loss_weights` (default all 1), `rpo_alpha` (appends
    /// `("sft", alpha)`) and `use_weighting`. Lengths are checked by the config's validation;
    /// missing weights here count as 1.
    pub fn from_training(types: &LossTypes, weights: Option<&[f64]>, rpo_alpha: Option<f64>, use_weighting: bool) -> Self {
        let mut terms: Vec<(LossTerm, f64)> =
            types.0.iter().enumerate().map(|(i, t)| (*t, weights.and_then(|w| w.get(i).copied()).unwrap_or(1.0))).collect();
        if let Some(a) = rpo_alpha {
            terms.push((LossTerm::Sft, a));
        }
        Self { terms, use_weighting }
    }

    /// Whether a term is `sft` (the loss then reads the chosen unweighted sums).
    pub fn has_sft(&self) -> bool {
        self.terms.iter().any(|(t, _)| *t == LossTerm::Sft)
    }
}

/// What some terms read beside [`PairLogps`]; every field `(B,)`.
#[derive(Debug, Clone, Default)]
pub struct PairExtras {
    /// The policy's unweighted chosen sums when `ld_alpha` is set (`sft` reads them); `None`:
    /// `policy_chosen`.
    pub chosen_unweighted: Option<Tensor>,
    /// WPO's `(w_chosen, w_rejected)` (detached); required when `use_weighting`.
    pub wpo_weights: Option<(Tensor, Tensor)>,
}

/// The batch loss of `spec` (see the module doc), with TRL's reward metrics and each term's
/// batch mean ([`LossTerm::metric_name`]).
///
/// Errors: `use_weighting` without WPO weights; tensor errors.
pub fn combined_loss(spec: &LossSpec, logps: &PairLogps, extras: &PairExtras, p: &LossParams) -> Result<LossOutput> {
    let omega = match (spec.use_weighting, &extras.wpo_weights) {
        (false, _) => None,
        (true, Some((wc, wr))) => Some((wc.detach() * wr.detach())?),
        (true, None) => return Err(Error::Msg("use_weighting: the WPO weights were not computed".into())),
    };
    let b = logps.policy_chosen.dim(0)?;
    let (mut loss, mut per_pair): (Option<Tensor>, Option<Tensor>) = (None, None);
    let mut terms = Vec::with_capacity(spec.terms.len());
    for &(term, weight) in &spec.terms {
        let mut per = match term {
            LossTerm::Pair(l) => per_pair_loss(l, logps, p)?,
            LossTerm::Sft => {
                let chosen = extras.chosen_unweighted.as_ref().unwrap_or(&logps.policy_chosen);
                sft_loss(chosen, &logps.chosen_tokens)?.broadcast_as(b)?.contiguous()?
            }
        };
        if let Some(w) = &omega {
            per = (per * w)?;
        }
        let mean = per.mean_all()?;
        terms.push((term.metric_name(), mean.to_dtype(DType::F64)?.to_scalar::<f64>()?));
        let weighted = mean.affine(weight, 0.0)?;
        let scaled = per.affine(weight, 0.0)?;
        loss = Some(match loss {
            None => weighted,
            Some(l) => (l + weighted)?,
        });
        per_pair = Some(match per_pair {
            None => scaled,
            Some(q) => (q + scaled)?,
        });
    }
    let (Some(loss), Some(per_pair)) = (loss, per_pair) else { return Err(Error::Config("loss_type must name at least one loss".into())) };
    let metrics = RewardMetrics::compute(logps, p.beta)?;
    Ok(LossOutput { loss, per_pair, metrics, terms })
}
