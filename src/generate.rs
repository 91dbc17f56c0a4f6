//! Sampling with a KV cache: greedy, temperature, top-p (nucleus, Holtzman et al. 2020,
//! arXiv 1904.09751), seeded.
//!
//! The loop feeds the prompt once, then one token per step through
//! [`Model::forward_with_cache`]; it stops at any of the tokenizer's `eos_token_ids`, after
//! `max_new_tokens`, or at the model's `max_position_embeddings`. The same options and seed
//! give the same tokens (ChaCha8 RNG, a fixed order for ties).

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::model::llama::{KvCache, Model};
use crate::model::tokenizer::Tokenizer;

/// How to pick tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// At most this many new tokens.
    pub max_new_tokens: usize,
    /// Softmax temperature; `0` (or below) = greedy (argmax, lowest id on ties).
    pub temperature: f64,
    /// Nucleus sampling: sample among the most likely tokens whose probabilities sum to at least
    /// `top_p` (in `(0, 1]`; `1` = the whole distribution). Ignored when greedy.
    pub top_p: f64,
    /// Seed of the ChaCha8 RNG used for sampling.
    pub seed: u64,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self { max_new_tokens: 128, temperature: 0.0, top_p: 1.0, seed: 0 }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-sequence token was produced (it is the last of `ids`).
    Eos,
    /// `max_new_tokens` were produced.
    MaxNewTokens,
    /// The sequence reached the model's `max_position_embeddings`.
    ContextFull,
}

/// The result of [`generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The new token ids (the prompt excluded; a final EOS included).
    pub ids: Vec<u32>,
    /// The new tokens decoded with special tokens skipped.
    pub text: String,
    /// Why it ended.
    pub stop: StopReason,
}

/// Picks the next token from `logits` (one position, `V` values) — the sampler of
/// [`generate`].
#[derive(Debug)]
pub struct Sampler {
    temperature: f64,
    top_p: f64,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler for `opts` (temperature, top_p, seed).
    ///
    /// Errors: `top_p` outside `(0, 1]` or a non-finite temperature.
    pub fn new(opts: &GenerateOptions) -> Result<Self> {
        if !(opts.top_p > 0.0 && opts.top_p <= 1.0) {
            return Err(Error::Config(format!("top_p must be in (0, 1] (got {})", opts.top_p)));
        }
        if !opts.temperature.is_finite() {
            return Err(Error::Config(format!("temperature must be finite (got {})", opts.temperature)));
        }
        Ok(Self { temperature: opts.temperature, top_p: opts.top_p, rng: ChaCha8Rng::seed_from_u64(opts.seed) })
    }

    /// The next token id for `logits` (`V` finite or `-inf` values).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 {
            return argmax(logits);
        }
        let probs = nucleus(logits, self.temperature, self.top_p);
        let u: f64 = self.rng.random();
        let mut acc = 0.0;
        for &(id, p) in &probs {
            acc += p;
            if u < acc {
                return id;
            }
        }
        probs.last().map(|&(id, _)| id).unwrap_or(0)
    }
}

/// The index of the largest value (the lowest index among equal maxima; NaN never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// The nucleus of `softmax(logits / temperature)`: `(id, p)` by decreasing `p` (ties by id),
/// the shortest prefix whose mass reaches `top_p`, renormalised to sum to 1 (computed in f64).
pub fn nucleus(logits: &[f32], temperature: f64, top_p: f64) -> Vec<(u32, f64)> {
    let max = logits.iter().copied().filter(|x| !x.is_nan()).fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, if x.is_nan() { 0.0 } else { ((x as f64 - max) / temperature).exp() }))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut mass = 0.0;
    let mut keep = 0;
    for p in &probs {
        mass += p.1;
        keep += 1;
        if mass >= top_p {
            break;
        }
    }
    probs.truncate(keep.max(1));
    let kept: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= kept);
    probs
}

/// The generation loop over any next-token function: `step(new_ids)` appends `new_ids` to the
/// model's state and returns the logits `(V,)` after the last of them. Stops at `eos_ids`,
/// after `opts.max_new_tokens`, or when `prompt.len() + new` reaches `max_len`.
///
/// Returns the new ids and the stop reason.
pub fn generate_with(
    mut step: impl FnMut(&[u32]) -> Result<Vec<f32>>,
    prompt: &[u32],
    eos_ids: &[u32],
    max_len: usize,
    opts: &GenerateOptions,
) -> Result<(Vec<u32>, StopReason)> {
    if prompt.is_empty() {
        return Err(Error::Config("the prompt is empty (no tokens)".into()));
    }
    let mut sampler = Sampler::new(opts)?;
    let mut out = Vec::new();
    if opts.max_new_tokens == 0 {
        return Ok((out, StopReason::MaxNewTokens));
    }
    if prompt.len() >= max_len {
        return Ok((out, StopReason::ContextFull));
    }
    let mut logits = step(prompt)?;
    loop {
        let next = sampler.sample(&logits);
        out.push(next);
        if eos_ids.contains(&next) {
            return Ok((out, StopReason::Eos));
        }
        if out.len() >= opts.max_new_tokens {
            return Ok((out, StopReason::MaxNewTokens));
        }
        if prompt.len() + out.len() >= max_len {
            return Ok((out, StopReason::ContextFull));
        }
        logits = step(&[next])?;
    }
}

/// Generate from `prompt_ids` with `model` (adapters on when `use_adapters`) and a KV cache,
/// stopping at `tokenizer.eos_token_ids`.
///
/// Runs inside [`crate::model::grad::no_grad`]: the KV cache holds no autograd graph.
///
/// Errors: an empty prompt, invalid options, a model error.
pub fn generate(model: &Model, tokenizer: &Tokenizer, prompt_ids: &[u32], opts: &GenerateOptions, use_adapters: bool) -> Result<Generation> {
    crate::model::grad::no_grad(|| generate_untracked(model, tokenizer, prompt_ids, opts, use_adapters))
}

fn generate_untracked(model: &Model, tokenizer: &Tokenizer, prompt_ids: &[u32], opts: &GenerateOptions, use_adapters: bool) -> Result<Generation> {
    let mut cache = KvCache::new(model.config());
    let device = model.device().clone();
    let step = |ids: &[u32]| -> Result<Vec<f32>> {
        let input = Tensor::new(ids, &device)?.unsqueeze(0)?; // (1, T_new)
        let logits = model.forward_with_cache(&input, &mut cache, use_adapters)?; // (1, T_new, V)
        let t = logits.dim(1)?;
        Ok(logits.get(0)?.get(t - 1)?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    };
    let (ids, stop) = generate_with(step, prompt_ids, &tokenizer.eos_token_ids, model.config().max_position_embeddings, opts)?;
    let text = tokenizer.inner.decode(&ids, true).map_err(|e| Error::Msg(format!("decoding generated tokens: {e}")))?;
    Ok(Generation { ids, text, stop })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_with_lowest_id_on_ties() {
        assert_eq!(argmax(&[0.1, 3.0, -1.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -5.0, f32::NEG_INFINITY]), 1);
        let mut s = Sampler::new(&GenerateOptions::default()).unwrap();
        assert_eq!(s.sample(&[0.0, 0.5, 0.2]), 1);
    }

    #[test]
    fn nucleus_keeps_the_smallest_prefix_reaching_top_p() {
        // softmax(ln [0.5, 0.3, 0.2]) = [0.5, 0.3, 0.2]
        let l: Vec<f32> = [0.5f32, 0.3, 0.2].iter().map(|p| p.ln()).collect();
        let n = nucleus(&l, 1.0, 0.75);
        assert_eq!(n.iter().map(|p| p.0).collect::<Vec<_>>(), [0, 1]);
        assert!((n[0].1 - 0.625).abs() < 1e-6 && (n[1].1 - 0.375).abs() < 1e-6, "{n:?}");
        assert_eq!(nucleus(&l, 1.0, 1.0).len(), 3);
        assert_eq!(nucleus(&l, 1.0, 0.01).len(), 1);
        // temperature 2 flattens: p ∝ sqrt([0.5, 0.3, 0.2])
        let n = nucleus(&l, 2.0, 1.0);
        let z: f64 = [0.5f64, 0.3, 0.2].iter().map(|p| p.sqrt()).sum();
        assert!((n[0].1 - 0.5f64.sqrt() / z).abs() < 1e-6, "{n:?}");
    }

    #[test]
    fn sampling_follows_the_distribution_and_is_seeded() {
        let l: Vec<f32> = [0.5f32, 0.3, 0.2].iter().map(|p| p.ln()).collect();
        let opts = GenerateOptions { temperature: 1.0, top_p: 1.0, seed: 42, ..Default::default() };
        let draw = |opts: &GenerateOptions| {
            let mut s = Sampler::new(opts).unwrap();
            (0..20000).map(|_| s.sample(&l)).collect::<Vec<u32>>()
        };
        let a = draw(&opts);
        assert_eq!(a, draw(&opts), "same seed, same draws");
        assert_ne!(a, draw(&GenerateOptions { seed: 43, ..opts.clone() }));
        // frequencies within 4 standard deviations (sd = sqrt(p(1-p)/n) <= 0.0036)
        for (id, p) in [(0u32, 0.5), (1, 0.3), (2, 0.2)] {
            let f = a.iter().filter(|&&x| x == id).count() as f64 / a.len() as f64;
            assert!((f - p).abs() < 0.015, "token {id}: {f} vs {p}");
        }
        // top_p = 0.75 never draws token 2
        let b = draw(&GenerateOptions { top_p: 0.75, ..opts.clone() });
        assert!(!b.contains(&2));
    }

    #[test]
    fn bad_options_are_errors() {
        assert!(Sampler::new(&GenerateOptions { top_p: 0.0, ..Default::default() }).is_err());
        assert!(Sampler::new(&GenerateOptions { top_p: 1.5, ..Default::default() }).is_err());
        assert!(Sampler::new(&GenerateOptions { temperature: f64::NAN, ..Default::default() }).is_err());
    }

    /// A fake model: the next token is (last + 1) mod 5; checks what the loop feeds and stops on.
    #[test]
    fn loop_feeds_prompt_once_then_one_token_and_stops() {
        let mut fed: Vec<Vec<u32>> = Vec::new();
        let step = |ids: &[u32]| -> Result<Vec<f32>> {
            fed.push(ids.to_vec());
            let mut l = vec![0f32; 5];
            l[((ids[ids.len() - 1] + 1) % 5) as usize] = 10.0;
            Ok(l)
        };
        let opts = GenerateOptions { max_new_tokens: 10, ..Default::default() };
        let (ids, stop) = generate_with(step, &[0, 1], &[4], 100, &opts).unwrap();
        assert_eq!((ids, stop), (vec![2, 3, 4], StopReason::Eos));
        assert_eq!(fed, vec![vec![0, 1], vec![2], vec![3]]);

        let step = |ids: &[u32]| -> Result<Vec<f32>> { Ok(vec![0.0, 1.0 + ids.len() as f32 * 0.0]) };
        let opts = GenerateOptions { max_new_tokens: 3, ..Default::default() };
        assert_eq!(generate_with(step, &[0], &[], 100, &opts).unwrap(), (vec![1, 1, 1], StopReason::MaxNewTokens));
        let step = |_: &[u32]| -> Result<Vec<f32>> { Ok(vec![0.0, 1.0]) };
        assert_eq!(generate_with(step, &[0, 0], &[], 4, &opts).unwrap(), (vec![1, 1], StopReason::ContextFull));
        let step = |_: &[u32]| -> Result<Vec<f32>> { Ok(vec![0.0, 1.0]) };
        assert!(generate_with(step, &[], &[], 4, &opts).is_err());
    }
}
