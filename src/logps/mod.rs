//! Completion log-probs `log π(y|x)`: the summed log-probs of each row's completion tokens,
//! for the policy (adapters on) and the reference (adapters bypassed) alike.
//!
//! `logps[n] = Σ_{t>=1} completion_mask[n,t] · log_softmax(lm_head(h[n,t-1]))[input_ids[n,t]]`
//! (TRL 1.16 `DPOTrainer._compute_loss`). Three paths compute it, behind one entry point,
//! [`batch_logps`] (and [`batch_logps_detached`], without gradients):
//! - [`dense`]: the definition: logits for every position `(N, T, V)`, a full log-softmax
//!   ([`completion_logps`]); the other two are checked against it;
//! - [`fused`]: the LM head at completion positions only, with a fused log-softmax + gather
//!   ([`completion_logps_from_hidden`]);
//! - [`shared_prompt`]: each pair's prompt once for both completions, then as [`fused`]
//!   ([`completion_logps_shared_prompt`]).
//!
//! [`score`] is the one loop over a set of pairs (evaluation, the precomputed reference).
//!
//! Legend: N = 2B rows in the concatenated layout `[chosen_0..chosen_{B-1},
//! rejected_0..rejected_{B-1}]`, T positions, V vocabulary.

pub mod dense;
pub mod fused;
pub mod score;
pub mod shared_prompt;
pub mod weighting;

use candle_core::Tensor;

pub use dense::{completion_logps, completion_token_counts, selective_log_softmax};
pub use fused::{completion_logps_from_hidden, seq_logps_from_logits};
pub use score::{score_pairs, score_pairs_with, Pass, PairScores};
pub use shared_prompt::completion_logps_shared_prompt;
pub use weighting::{LogpOptions, SeqLogps};

use crate::data::batch::Batch;
use crate::error::{Error, Result};
use crate::model::grad::no_grad;
use crate::model::llama::Model;
use crate::model::prefix::SharedPromptBatch;

/// Summed completion log-probs of every row of `batch` under `model`, in nats, computing the
/// LM head only where it is needed.
///
/// `logps[n] = Σ_t completion_mask[n,t] · log_softmax(lm_head(h[n,t-1]))[input_ids[n,t]]`
/// (the definition of [`dense::completion_logps`], TRL 1.16), but the `(N, T, V)` logits
/// are never built: [`fused::completion_logps_from_hidden`] gathers the hidden states of
/// the `P` positions that predict a completion token, runs the LM head on those rows only and a
/// fused log-softmax + gather whose backward builds nothing vocabulary-sized. Memory for the
/// logits drops from `N·T·V` to `P·V` floats. Differentiable with respect to everything on the
/// policy path. `batch` in the concatenated layout; returns `(N,)` in the model's dtype.
fn concatenated(model: &Model, batch: &Batch, use_adapters: bool, opts: &LogpOptions) -> Result<SeqLogps> {
    let hidden = model.forward_hidden(&batch.input_ids, Some(&batch.attention_mask), use_adapters)?; // (N, T, D)
    // (N,): the LM head and a fused log-softmax + gather at completion positions only
    fused::completion_logps_from_hidden_with(model, &hidden, &batch.input_ids, &batch.completion_mask, use_adapters, opts)
}

/// The one entry point: [`concatenated`] (the fused path), or with `share_prompt` the
/// shared-prompt path ([`shared_prompt::completion_logps_shared_prompt`]): each pair's prompt runs through
/// the model once and both completions attend to its keys and values, so a pair costs
/// `prompt + chosen + rejected` tokens instead of `2·prompt + chosen + rejected`. Same function
/// and gradients (to rounding: the attention sums run over a differently laid out key set).
///
/// Fallback to the plain path (logged at debug level, with the reason): a batch in which a pair's
/// chosen and rejected rows do not start with the same non-empty prompt, i.e. a pair with an
/// empty prompt, or rows not built by [`crate::data::batch::collate`] whose prompts differ (the first
/// completion-mask position marks the end of a row's prompt). ropo's own batches always share:
/// [`crate::data::tokenize`] gives both completions one `prompt_ids` and truncates completions
/// only, so after truncation the prompts are still equal. Errors: malformed batches (as
/// [`SharedPromptBatch::try_from_concatenated`]), model errors.
pub fn batch_logps(model: &Model, batch: &Batch, use_adapters: bool, share_prompt: bool) -> Result<Tensor> {
    Ok(batch_logps_with(model, batch, use_adapters, share_prompt, &LogpOptions::default())?.logps)
}

/// [`batch_logps`] with the extras of `opts` (TRL's `ld_alpha` sums, the unweighted sums of
/// the `sft` term, `use_weighting`'s WPO weights; [`weighting`]), from the same forward and LM-head
/// rows. The plain sums are bit for bit [`batch_logps`]'s. Errors: as [`batch_logps`].
pub fn batch_logps_with(model: &Model, batch: &Batch, use_adapters: bool, share_prompt: bool, opts: &LogpOptions) -> Result<SeqLogps> {
    if share_prompt {
        match SharedPromptBatch::try_from_concatenated(&batch.input_ids, &batch.attention_mask, &batch.completion_mask)? {
            Ok(shared) => return shared_prompt::completion_logps_shared_prompt_with(model, &shared, use_adapters, opts),
            Err(why) => tracing::debug!("{why}: this batch takes the plain (concatenated) path"),
        }
    }
    concatenated(model, batch, use_adapters, opts)
}

/// [`batch_logps`] without gradients: `(2B,)` detached, in the model's dtype. `use_adapters =
/// false` gives the reference (adapters bypassed); `true` the policy (evaluation). The forward
/// runs inside [`no_grad`], so no autograd graph holds its activations (peak memory of an
/// inference forward).
pub fn batch_logps_detached(model: &Model, batch: &Batch, use_adapters: bool, share_prompt: bool) -> Result<Tensor> {
    no_grad(|| Ok(batch_logps(model, batch, use_adapters, share_prompt)?.detach()))
}

/// [`batch_logps_with`] without gradients (every tensor detached; as [`batch_logps_detached`]).
pub fn batch_logps_detached_with(model: &Model, batch: &Batch, use_adapters: bool, share_prompt: bool, opts: &LogpOptions) -> Result<SeqLogps> {
    no_grad(|| {
        let s = batch_logps_with(model, batch, use_adapters, share_prompt, opts)?;
        Ok(SeqLogps { logps: s.logps.detach(), unweighted: s.unweighted.map(|t| t.detach()), wpo_weights: s.wpo_weights.map(|t| t.detach()) })
    })
}

/// Split a `(2B,)` tensor in the concatenated layout into its chosen and rejected halves `(B,)`.
pub fn split_pairs(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let n = x.dim(0)?;
    if n % 2 != 0 {
        return Err(Error::Msg(format!("expected [chosen; rejected] rows, got an odd count {n}")));
    }
    Ok((x.narrow(0, 0, n / 2)?, x.narrow(0, n / 2, n / 2)?))
}
