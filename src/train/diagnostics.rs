//! Live reward-hacking diagnostics at each evaluation (`training.diagnostic_prompts > 0`): how
//! far the policy has moved from the reference on held-out prompts, and how long its greedy
//! answers have grown, so that a user sees over-optimisation start in `metrics.jsonl` and
//! `curves.png` rather than after the run.
//!
//! At setup, the first `N` distinct prompts of the eval split are completed greedily by the
//! reference (adapters bypassed, or the separate reference model), at most
//! `diagnostic_max_new_tokens` tokens each. At every evaluation (step 0 included):
//! - `drift/kl`, `drift/nll`: [`crate::eval::drift`] on those completions (the mean per-token
//!   `KL(reference || policy)` over the full vocabulary, and the policy's NLL), nats per token;
//!   exactly 0 / the reference's NLL while the adapter is at its identity init;
//! - `greedy/length`, `greedy/hit_max`: the policy's own greedy answers to the same prompts, mean
//!   new tokens (a final EOS included) and the share that ran into the token limit: the
//!   length growth DPO's reward hacking shows (RoPO paper, Section 5.2).

use crate::error::{Error, Result};
use crate::eval::drift::drift_between;
use crate::generate::{generate, GenerateOptions, StopReason};
use crate::model::llama::Model;
use crate::model::tokenizer::Tokenizer;

/// The diagnostics' fixed inputs: prompts and the reference's completions of them.
#[derive(Debug)]
pub struct Diagnostics {
    tokenizer: Tokenizer,
    /// Prompt token ids (each ending with the template's generation prompt).
    prompts: Vec<Vec<u32>>,
    /// The reference's greedy completions of `prompts`.
    completions: Vec<Vec<u32>>,
    max_new_tokens: usize,
}

impl Diagnostics {
    /// Complete the first `n` distinct prompts of `eval_prompts` with `reference` (adapters
    /// bypassed), greedily, at most `max_new_tokens` tokens each. `None` when `n` is 0 or there
    /// are no prompts.
    ///
    /// Errors: a generation error (naming the prompt).
    pub fn new<'a>(reference: &Model, tokenizer: &Tokenizer, eval_prompts: impl Iterator<Item = &'a [u32]>, n: usize, max_new_tokens: usize) -> Result<Option<Self>> {
        let mut prompts: Vec<Vec<u32>> = Vec::with_capacity(n);
        for p in eval_prompts {
            if prompts.len() == n {
                break;
            }
            if !p.is_empty() && !prompts.iter().any(|q| q.as_slice() == p) {
                prompts.push(p.to_vec());
            }
        }
        if prompts.is_empty() {
            return Ok(None);
        }
        let completions = greedy(reference, tokenizer, &prompts, max_new_tokens, false)?.into_iter().map(|(ids, _)| ids).collect();
        Ok(Some(Self { tokenizer: tokenizer.clone(), prompts, completions, max_new_tokens }))
    }

    /// Prompts used.
    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    /// Never true (a [`Diagnostics`] has at least one prompt).
    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    /// The metrics of `policy` (`use_adapters`: run with its adapters) against `reference`:
    /// `drift/kl`, `drift/nll`, `greedy/length`, `greedy/hit_max` (see the module doc).
    ///
    /// Errors: model errors, a non-finite drift.
    pub fn measure(&self, reference: &Model, policy: &Model, use_adapters: bool, batch_size: usize) -> Result<Vec<(&'static str, f64)>> {
        let d = drift_between(reference, Some((policy, use_adapters)), &self.prompts, &self.completions, batch_size.max(1))?;
        let answers = greedy(policy, &self.tokenizer, &self.prompts, self.max_new_tokens, use_adapters)?;
        let n = answers.len() as f64;
        let length = answers.iter().map(|(ids, _)| ids.len() as f64).sum::<f64>() / n;
        let hit_max = answers.iter().filter(|(_, s)| *s == StopReason::MaxNewTokens).count() as f64 / n;
        Ok(vec![("drift/kl", d.kl), ("drift/nll", d.nll_policy), ("greedy/length", length), ("greedy/hit_max", hit_max)])
    }
}

/// Greedy completions of `prompts` by `model` (token ids and why each stopped).
fn greedy(model: &Model, tokenizer: &Tokenizer, prompts: &[Vec<u32>], max_new_tokens: usize, use_adapters: bool) -> Result<Vec<(Vec<u32>, StopReason)>> {
    let opts = GenerateOptions { max_new_tokens, temperature: 0.0, top_p: 1.0, seed: 0 };
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            generate(model, tokenizer, p, &opts, use_adapters)
                .map(|g| (g.ids, g.stop))
                .map_err(|e| Error::Msg(format!("diagnostics: prompt {}: {e}", i + 1)))
        })
        .collect()
}
