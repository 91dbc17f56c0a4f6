//! The shared-prompt path: each pair's prompt runs through the model once
//! ([`Model::forward_hidden_shared_prompt`], [`crate::model::prefix`]) and both completions
//! attend to its keys and values; the LM head runs at completion positions only, as in
//! [`super::fused`].
//!
//! Legend: B pairs, N = 2B completion rows, Tp padded prompt length, Tc padded completion
//! length, D hidden width.

use candle_core::Tensor;

use super::fused::{logps_at_picks_with, Pick};
use super::weighting::{LogpOptions, SeqLogps};
use crate::error::Result;
use crate::model::llama::Model;
use crate::model::prefix::SharedPromptBatch;

/// Summed completion log-probs `(2B,)` of a [`SharedPromptBatch`], rows in the concatenated
/// order: the prefix-shared fast path of
/// `completion_logps(model.forward(input_ids, attention_mask), input_ids, completion_mask)`.
///
/// The first completion token is scored by the last prompt position's hidden state (shared by
/// the pair); completion token `j >= 1` by completion position `j - 1`. The LM head runs only at
/// those rows ([`super::fused::logps_at_picks`]). In the hidden dtype (f32/f64).
pub fn completion_logps_shared_prompt(model: &Model, batch: &SharedPromptBatch, use_adapters: bool) -> Result<Tensor> {
    Ok(completion_logps_shared_prompt_with(model, batch, use_adapters, &LogpOptions::default())?.logps)
}

/// [`completion_logps_shared_prompt`] with the extras of `opts` (LD-DPO sums, unweighted
/// sums, WPO weights: [`super::weighting::sums_at_picks`]).
pub fn completion_logps_shared_prompt_with(model: &Model, batch: &SharedPromptBatch, use_adapters: bool, opts: &LogpOptions) -> Result<SeqLogps> {
    let (hp, hc) = model.forward_hidden_shared_prompt(batch, use_adapters)?;
    let (b, tp, d) = hp.dims3()?;
    let (n, tc, _) = hc.dims3()?;
    let ids = batch.completion_ids.to_vec2::<u32>()?;
    let mut picks = Vec::new();
    for r in 0..n {
        for j in 0..tc {
            let w = batch.completion_weights[r][j];
            if w == 0.0 {
                continue;
            }
            let row = if j == 0 { (r % b) * tp + batch.prompt_lens[r % b] - 1 } else { b * tp + r * tc + j - 1 };
            picks.push(Pick { row, target: ids[r][j], weight: w, seq: r });
        }
    }
    let flat = Tensor::cat(&[hp.reshape((b * tp, d))?, hc.reshape((n * tc, d))?], 0)?;
    logps_at_picks_with(model, &flat, &picks, n, use_adapters, opts)
}
