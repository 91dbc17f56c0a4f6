//! Live reward-hacking diagnostics at each evaluation (`training.diagnostic_prompts > 0`): how
//! far the policy has moved from the reference on held-out prompts, and how long its greedy
//! answers have grown, so that a user sees over-optimisation start in `metrics.jsonl` and
//! `curves.png` rather than after the run.
//!
//! At setup, the first `N` distinct prompts of the eval split that leave room for
//! `diagnostic_max_new_tokens` new tokens in the context are completed greedily by the
//! reference (adapters bypassed, or the separate reference model). At every evaluation (step 0
//! included):
//! - `drift/kl`, `drift/nll`: [`crate::eval::drift`] on those completions (the mean per-token
//!   `KL(reference || policy)` over the full vocabulary, and the policy's NLL), nats per token;
//!   exactly 0 / the reference's NLL while the adapter is at its identity init;
//! - `greedy/mean_length`, `greedy/hit_max_new_tokens`: the policy's own greedy answers to the
//!   same prompts, as `ropo eval` counts them ([`crate::eval::generation::generation_stats`]:
//!   new tokens without the stop token, and the share that ran into the limit): the length
//!   growth DPO's reward hacking shows (RoPO paper, Section 5.2).

use crate::error::{Error, Result};
use crate::eval::drift::drift_between;
use crate::eval::generation::{counted_ids, generation_stats};
use crate::generate::{generate, GenerateOptions, Generation};
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
    /// Complete the first `n` distinct prompts of `eval_prompts` that fit
    /// `max_new_tokens` more tokens into the model's context, with `reference` (adapters
    /// bypassed), greedily, at most `max_new_tokens` tokens each.
    ///
    /// Errors: no prompt fits (naming the context and the key), a generation error (naming the
    /// prompt).
    pub fn new<'a>(reference: &Model, tokenizer: &Tokenizer, eval_prompts: impl Iterator<Item = &'a [u32]>, n: usize, max_new_tokens: usize) -> Result<Self> {
        let context = reference.config().max_position_embeddings;
        let mut prompts: Vec<Vec<u32>> = Vec::with_capacity(n);
        for p in eval_prompts {
            if prompts.len() == n {
                break;
            }
            if !p.is_empty() && p.len() + max_new_tokens <= context && !prompts.iter().any(|q| q.as_slice() == p) {
                prompts.push(p.to_vec());
            }
        }
        if prompts.is_empty() {
            return Err(Error::Config(format!(
                "training.diagnostic_prompts: no held-out prompt leaves room for training.diagnostic_max_new_tokens = {max_new_tokens} new tokens in the model's context of {context}"
            )));
        }
        let completions = greedy(reference, tokenizer, &prompts, max_new_tokens, false)?.into_iter().map(|g| g.ids).collect();
        Ok(Self { tokenizer: tokenizer.clone(), prompts, completions, max_new_tokens })
    }

    /// Completion tokens the drift is measured on (the reference's, a final EOS included).
    pub fn tokens(&self) -> usize {
        self.completions.iter().map(Vec::len).sum()
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
    /// `drift/kl`, `drift/nll`, `greedy/mean_length`, `greedy/hit_max_new_tokens` (see the
    /// module doc).
    ///
    /// Errors: model errors, a non-finite drift.
    pub fn measure(&self, reference: &Model, policy: &Model, use_adapters: bool, batch_size: usize) -> Result<Vec<(&'static str, f64)>> {
        let d = drift_between(reference, Some((policy, use_adapters)), &self.prompts, &self.completions, batch_size.max(1))?;
        let answers: Vec<Vec<u32>> = greedy(policy, &self.tokenizer, &self.prompts, self.max_new_tokens, use_adapters)?.iter().map(|g| counted_ids(g).to_vec()).collect();
        let g = generation_stats(&answers, self.max_new_tokens);
        Ok(vec![("drift/kl", d.kl), ("drift/nll", d.nll_policy), ("greedy/mean_length", g.mean_length), ("greedy/hit_max_new_tokens", g.hit_max_new_tokens)])
    }
}

/// Greedy completions of `prompts` by `model`.
fn greedy(model: &Model, tokenizer: &Tokenizer, prompts: &[Vec<u32>], max_new_tokens: usize, use_adapters: bool) -> Result<Vec<Generation>> {
    let opts = GenerateOptions { max_new_tokens, temperature: 0.0, top_p: 1.0, seed: 0 };
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            generate(model, tokenizer, p, &opts, use_adapters).map_err(|e| Error::Msg(format!("diagnostics: prompt {}: {e}", i + 1)))
        })
        .collect()
}
