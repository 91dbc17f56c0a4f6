//! The one scoring loop: the summed completion log-probs of every pair of a set, in order,
//! `batch_size` pairs a forward, without gradients ([`super::batch_logps_detached`]). `ropo
//! train` scores its evaluation split (the policy) and precomputes the reference log-probs with
//! it; `ropo eval` scores the policy and the reference of held-out pairs.
//!
//! Legend: P pairs; each batch in the concatenated layout `[chosen..; rejected..]`.

use candle_core::{DType, Tensor};

use super::{batch_logps_detached_with, completion_token_counts, split_pairs, LogpOptions};
use crate::data::batch::collate;
use crate::data::tokenize::TokenizedPair;
use crate::error::{Error, Result};
use crate::model::llama::Model;

/// Which log-probs a [`score_pairs`] pass computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// The policy's (adapters on).
    Policy,
    /// The reference's (adapters bypassed).
    Reference,
    /// Both (two forwards a batch).
    Both,
}

impl Pass {
    fn policy(self) -> bool {
        matches!(self, Pass::Policy | Pass::Both)
    }

    fn reference(self) -> bool {
        matches!(self, Pass::Reference | Pass::Both)
    }
}

/// The log-probs of a set of pairs: each tensor `(P,)` in pair order, detached.
#[derive(Debug, Clone)]
pub struct PairScores {
    /// The policy's `(chosen, rejected)` summed completion log-probs, in the model's dtype
    /// (when the pass computed them).
    pub policy: Option<(Tensor, Tensor)>,
    /// The reference's, likewise.
    pub reference: Option<(Tensor, Tensor)>,
    /// The policy's unweighted `(chosen, rejected)` sums when `ld_alpha` is set
    /// ([`super::SeqLogps::unweighted`]).
    pub policy_unweighted: Option<(Tensor, Tensor)>,
    /// The policy's WPO weights `(chosen, rejected)` when `use_weighting` is set.
    pub policy_wpo_weights: Option<(Tensor, Tensor)>,
    /// Completion tokens of the chosen and rejected rows, f32 ([`completion_token_counts`]).
    pub tokens: (Tensor, Tensor),
    /// Real (non-padding) tokens of every batch, chosen and rejected rows.
    pub real_tokens: usize,
}

/// Per-batch halves, concatenated at the end.
#[derive(Default)]
struct Halves {
    chosen: Vec<Tensor>,
    rejected: Vec<Tensor>,
}

impl Halves {
    /// Keep the chosen and rejected halves of a `(2B,)` batch result.
    fn push(&mut self, x: &Tensor) -> Result<()> {
        let (c, r) = split_pairs(x)?;
        self.chosen.push(c);
        self.rejected.push(r);
        Ok(())
    }

    fn cat(self) -> Result<(Tensor, Tensor)> {
        Ok((Tensor::cat(&self.chosen, 0)?, Tensor::cat(&self.rejected, 0)?))
    }
}

/// Score every pair of `pairs`, in order, `batch_size` pairs a forward (file order, so the
/// result depends on no sampler), with `share_prompt` selecting the shared-prompt path.
/// `on_batch(k)` is called after each batch of `k` pairs (progress).
///
/// Errors: `batch_size == 0`, no pairs, a model error.
pub fn score_pairs(
    model: &Model,
    pairs: &[TokenizedPair],
    pad_id: u32,
    batch_size: usize,
    share_prompt: bool,
    pass: Pass,
    on_batch: impl FnMut(usize),
) -> Result<PairScores> {
    score_pairs_with(model, pairs, pad_id, batch_size, share_prompt, pass, &LogpOptions::default(), on_batch)
}

/// [`score_pairs`] with the extras of `opts` (TRL's `ld_alpha` for both passes; the unweighted
/// sums and `use_weighting`'s WPO weights for the policy pass).
#[allow(clippy::too_many_arguments)]
pub fn score_pairs_with(
    model: &Model,
    pairs: &[TokenizedPair],
    pad_id: u32,
    batch_size: usize,
    share_prompt: bool,
    pass: Pass,
    opts: &LogpOptions,
    mut on_batch: impl FnMut(usize),
) -> Result<PairScores> {
    if batch_size == 0 {
        return Err(Error::Config("batch size must be >= 1".into()));
    }
    if pairs.is_empty() {
        return Err(Error::Msg("scoring: no pairs".into()));
    }
    let (mut policy, mut reference, mut tokens) = (Halves::default(), Halves::default(), Halves::default());
    let (mut unweighted, mut wpo) = (Halves::default(), Halves::default());
    let mut real_tokens = 0usize;
    for chunk in pairs.chunks(batch_size) {
        let refs: Vec<&TokenizedPair> = chunk.iter().collect();
        let batch = collate(&refs, pad_id, model.device())?;
        real_tokens += batch.attention_mask.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()? as usize;
        if pass.reference() {
            reference.push(&batch_logps_detached_with(model, &batch, false, share_prompt, &opts.reference())?.logps)?; // (2B,)
        }
        if pass.policy() {
            let s = batch_logps_detached_with(model, &batch, true, share_prompt, opts)?; // (2B,) each
            policy.push(&s.logps)?;
            if let Some(u) = &s.unweighted {
                unweighted.push(u)?;
            }
            if let Some(w) = &s.wpo_weights {
                wpo.push(w)?;
            }
        }
        tokens.push(&completion_token_counts(&batch.completion_mask)?)?;
        on_batch(chunk.len());
    }
    let some = |h: Halves, on: bool| -> Result<Option<(Tensor, Tensor)>> { if on && !h.chosen.is_empty() { Ok(Some(h.cat()?)) } else { Ok(None) } };
    Ok(PairScores {
        policy: some(policy, pass.policy())?,
        reference: some(reference, pass.reference())?,
        policy_unweighted: some(unweighted, pass.policy())?,
        policy_wpo_weights: some(wpo, pass.policy())?,
        tokens: tokens.cat()?,
        real_tokens,
    })
}
