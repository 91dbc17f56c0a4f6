//! Drift from the reference: how far an adapter moved the model's behaviour on prompts training
//! never saw, whatever the preference data says.
//!
//! For each held-out prompt the *reference* (the base model, adapters bypassed) generates a
//! greedy completion `y = y_1..y_C`; then both models score it, teacher-forced:
//!
//! - `kl` = mean over every completion token of all prompts (token-pooled) of
//!   `KL(p_ref(. | x, y_<t) || p_pol(. | x, y_<t)) = Σ_v p_ref(v) (log p_ref(v) - log p_pol(v))`,
//!   full vocabulary, in nats per token (the per-token KL TRL's `DPOTrainer` and
//!   `OnlineDPOTrainer` log as `objective/kl` estimates with samples; here exact, from the logits);
//! - `nll_policy` = `-mean_t log p_pol(y_t | x, y_<t)`, and `nll_reference` likewise: how much
//!   less likely the policy finds what the base model would have said.
//!
//! Both passes are run in float64 softmax arithmetic on the model's logits (f32 unless the model
//! is loaded in f64), batched with right padding (causal attention: padding after a sequence
//! does not touch its positions), only the completion positions going through the LM head.
//! The base model against itself gives exactly 0 (the same numbers on both sides).

use candle_core::{DType, IndexOp, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::generate::{generate, GenerateOptions};
use crate::model::llama::Model;
use crate::model::tokenizer::Tokenizer;

/// What [`drift`] measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Drift {
    /// Prompts scored.
    pub prompts: usize,
    /// Completion tokens scored (the reference's greedy completions, a final EOS included).
    pub tokens: usize,
    /// Mean per-token `KL(reference || policy)`, nats.
    pub kl: f64,
    /// Mean per-token negative log-likelihood of the completions under the policy, nats.
    pub nll_policy: f64,
    /// The same under the reference.
    pub nll_reference: f64,
}

/// Sums over the scored tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Sums {
    tokens: usize,
    kl: f64,
    nll_policy: f64,
    nll_reference: f64,
}

/// The reference's greedy completions of `prompts` (token ids), at most `max_new_tokens` each.
///
/// Errors: an empty prompt, a model error (naming the prompt's index).
pub fn reference_completions(model: &Model, tokenizer: &Tokenizer, prompts: &[Vec<u32>], max_new_tokens: usize) -> Result<Vec<Vec<u32>>> {
    let opts = GenerateOptions { max_new_tokens, temperature: 0.0, top_p: 1.0, seed: 0 };
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| generate(model, tokenizer, p, &opts, false).map(|g| g.ids).map_err(|e| Error::Msg(format!("prompt {}: {e}", i + 1))))
        .collect()
}

/// Drift of the model with its adapters on (`use_adapters`; off gives 0) from the reference,
/// scoring `completions[i]` after `prompts[i]`, `batch_size` sequences per forward pass.
///
/// Errors: different numbers of prompts and completions, an empty prompt, `batch_size` 0, a
/// non-finite value, model errors.
pub fn drift(model: &Model, prompts: &[Vec<u32>], completions: &[Vec<u32>], use_adapters: bool, batch_size: usize) -> Result<Drift> {
    drift_between(model, use_adapters.then_some((model, true)), prompts, completions, batch_size)
}

/// [`drift`] of `policy` (`(model, use_adapters)`) from `reference` (run with its adapters
/// bypassed), e.g. a fully fine-tuned policy against its frozen copy; `None`: the reference
/// against itself (0).
///
/// Errors: as [`drift`]; both models must share a vocabulary.
pub fn drift_between(reference: &Model, policy: Option<(&Model, bool)>, prompts: &[Vec<u32>], completions: &[Vec<u32>], batch_size: usize) -> Result<Drift> {
    if prompts.len() != completions.len() || batch_size == 0 {
        return Err(Error::Msg(format!("drift: {} prompts, {} completions, batch size {batch_size}", prompts.len(), completions.len())));
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(Error::Msg(format!("drift: prompt {} is empty", i + 1)));
    }
    let mut sums = Sums::default();
    let order: Vec<usize> = (0..prompts.len()).filter(|&i| !completions[i].is_empty()).collect();
    for chunk in order.chunks(batch_size) {
        let rows: Vec<(&[u32], &[u32])> = chunk.iter().map(|&i| (prompts[i].as_slice(), completions[i].as_slice())).collect();
        let s = crate::model::grad::no_grad(|| batch_sums(reference, policy, &rows))?;
        sums.tokens += s.tokens;
        sums.kl += s.kl;
        sums.nll_policy += s.nll_policy;
        sums.nll_reference += s.nll_reference;
    }
    let n = sums.tokens.max(1) as f64;
    let d = Drift { prompts: prompts.len(), tokens: sums.tokens, kl: sums.kl / n, nll_policy: sums.nll_policy / n, nll_reference: sums.nll_reference / n };
    if ![d.kl, d.nll_policy, d.nll_reference].iter().all(|x| x.is_finite()) {
        return Err(Error::Msg(format!("drift: non-finite result {d:?}")));
    }
    Ok(d)
}

/// One right-padded batch: the sums over its completion tokens.
fn batch_sums(model: &Model, policy_model: Option<(&Model, bool)>, rows: &[(&[u32], &[u32])]) -> Result<Sums> {
    let width = rows.iter().map(|(p, c)| p.len() + c.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len() * width);
    for (p, c) in rows {
        ids.extend_from_slice(p);
        ids.extend_from_slice(c);
        ids.resize(ids.len() + width - p.len() - c.len(), 0);
    }
    let input = Tensor::from_vec(ids, (rows.len(), width), model.device())?;
    let reference = model.forward_hidden(&input, None, false)?; // (B, T, D)
    let policy = match policy_model {
        Some((m, adapters)) => Some((m, adapters, m.forward_hidden(&input, None, adapters)?)),
        None => None,
    };
    let mut sums = Sums::default();
    for (b, (p, c)) in rows.iter().enumerate() {
        // positions p-1 .. p+C-2 predict the completion tokens y_1 .. y_C
        let at = |m: &Model, h: &Tensor, adapters: bool| -> Result<Vec<Vec<f64>>> {
            let h = h.i(b)?.narrow(0, p.len() - 1, c.len())?.unsqueeze(0)?; // (1, C, D)
            let logits = m.lm_head(&h, adapters)?.squeeze(0)?.to_dtype(DType::F64)?; // (C, V)
            Ok(logits.to_vec2::<f64>()?.into_iter().map(log_softmax).collect())
        };
        let lr = at(model, &reference, false)?;
        let lp = match &policy {
            Some((m, adapters, h)) => at(m, h, *adapters)?,
            None => lr.clone(),
        };
        for (t, &y) in c.iter().enumerate() {
            let (r, q) = (&lr[t], &lp[t]);
            sums.kl += r.iter().zip(q).map(|(a, b)| a.exp() * (a - b)).sum::<f64>();
            sums.nll_policy -= q[y as usize];
            sums.nll_reference -= r[y as usize];
        }
        sums.tokens += c.len();
    }
    Ok(sums)
}

/// `l - max - ln Σ exp(l - max)`, in f64.
fn log_softmax(mut l: Vec<f64>) -> Vec<f64> {
    let max = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + l.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
    for x in &mut l {
        *x -= lse;
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_normalises() {
        let l = log_softmax(vec![1.0, 2.0, 3.0]);
        assert!((l.iter().map(|x| x.exp()).sum::<f64>() - 1.0).abs() < 1e-15);
        assert!((l[2] - l[0] - 2.0).abs() < 1e-15);
    }
}
