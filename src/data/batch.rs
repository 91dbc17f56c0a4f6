//! Batching preference pairs: a seeded length-grouped sampler and the collator.
//!
//! Layout (TRL's concatenated forward, `DataCollatorForPreference`): a batch of `B` pairs is
//! `2B` rows, `[chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}]`, right-padded to the
//! longest of the `2B` sequences `T`:
//! - `input_ids (2B, T) u32` (padding = the pad id),
//! - `attention_mask (2B, T) u32` (1 = real token),
//! - `completion_mask (2B, T) f32`: 1 where the token `input_ids[t]` is a completion token.
//!
//! The sampler (as transformers' `LengthGroupedSampler`, seeded explicitly): shuffle the pair
//! indices with ChaCha8 seeded by `seed` on stream `epoch`, split them into mega-batches of
//! `batch_size * mega_batch_factor`, sort each mega-batch by length (longest first) and cut it
//! into batches, then shuffle the batch order. Pairs of similar length share a batch (less
//! padding), and the order is a pure function of `(lengths, config, epoch)`: resuming at
//! `(epoch, batch index)` replays it exactly.

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::tokenize::TokenizedPair;
use crate::error::{Error, Result};
use crate::model::tokenizer::Tokenizer;

/// Sampler settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplerConfig {
    /// Pairs per batch (`B`; a batch has `2B` rows).
    pub batch_size: usize,
    /// Seed of the ChaCha8 stream (the epoch selects the stream).
    pub seed: u64,
    /// Mega-batch size in batches (transformers uses 50); 1 disables length grouping beyond
    /// sorting within a batch.
    pub mega_batch_factor: usize,
    /// Drop the last batch when it has fewer than `batch_size` pairs.
    pub drop_last: bool,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self { batch_size: 8, seed: 42, mega_batch_factor: 50, drop_last: false }
    }
}

/// The batches of one epoch: each a list of pair indices into `lengths`, longest first.
/// `lengths[i]` is pair `i`'s padded cost (use [`TokenizedPair::max_len`]).
///
/// Every index appears exactly once (except the dropped tail with `drop_last`). Errors:
/// `batch_size == 0` or `mega_batch_factor == 0`.
pub fn epoch_batches(lengths: &[usize], cfg: &SamplerConfig, epoch: u64) -> Result<Vec<Vec<usize>>> {
    if cfg.batch_size == 0 || cfg.mega_batch_factor == 0 {
        return Err(Error::Config(format!(
            "batch_size and mega_batch_factor must be > 0 (got {} and {})",
            cfg.batch_size, cfg.mega_batch_factor
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    rng.set_stream(epoch);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng);
    let mut batches = Vec::with_capacity(lengths.len().div_ceil(cfg.batch_size));
    for mega in order.chunks(cfg.batch_size * cfg.mega_batch_factor) {
        let mut mega = mega.to_vec();
        // stable sort: ties keep the shuffled order
        mega.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(mega.chunks(cfg.batch_size).map(<[usize]>::to_vec));
    }
    if cfg.drop_last && batches.last().is_some_and(|b| b.len() < cfg.batch_size) {
        batches.pop();
    }
    batches.shuffle(&mut rng);
    Ok(batches)
}

/// A collated batch, on the host (see the module doc for the layout). Row-major `(rows, seq_len)`.
#[derive(Debug, Clone, PartialEq)]
pub struct HostBatch {
    /// `2B`.
    pub rows: usize,
    /// `T`, the longest sequence.
    pub seq_len: usize,
    /// `(2B, T)` token ids, padded with the pad id.
    pub input_ids: Vec<u32>,
    /// `(2B, T)`, 1 = real token, 0 = padding.
    pub attention_mask: Vec<u32>,
    /// `(2B, T)`, 1.0 where `input_ids[t]` is a completion token.
    pub completion_mask: Vec<f32>,
    /// The file line of each pair (`B` entries).
    pub lines: Vec<usize>,
}

/// A collated batch as tensors on a device.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `(2B, T) u32`.
    pub input_ids: Tensor,
    /// `(2B, T) u32`, 1 = real token.
    pub attention_mask: Tensor,
    /// `(2B, T) f32`, 1 = completion token.
    pub completion_mask: Tensor,
    /// The file line of each pair (`B` entries).
    pub lines: Vec<usize>,
}

/// Collate `pairs` into the `[chosen..., rejected...]` layout, right-padded with `pad_id`.
///
/// Errors: no pairs.
pub fn collate_host(pairs: &[&TokenizedPair], pad_id: u32) -> Result<HostBatch> {
    if pairs.is_empty() {
        return Err(Error::Msg("cannot collate an empty batch".into()));
    }
    let rows = 2 * pairs.len();
    let seq_len = pairs.iter().map(|p| p.max_len()).max().unwrap_or(0);
    let mut input_ids = vec![pad_id; rows * seq_len];
    let mut attention_mask = vec![0u32; rows * seq_len];
    let mut completion_mask = vec![0f32; rows * seq_len];
    let seqs = pairs.iter().map(|p| &p.chosen_ids).chain(pairs.iter().map(|p| &p.rejected_ids));
    for (r, (completion, p)) in seqs.zip(pairs.iter().chain(pairs.iter())).enumerate() {
        let row = r * seq_len;
        let n_prompt = p.prompt_ids.len();
        input_ids[row..row + n_prompt].copy_from_slice(&p.prompt_ids);
        input_ids[row + n_prompt..row + n_prompt + completion.len()].copy_from_slice(completion);
        attention_mask[row..row + n_prompt + completion.len()].fill(1);
        completion_mask[row + n_prompt..row + n_prompt + completion.len()].fill(1.0);
    }
    Ok(HostBatch { rows, seq_len, input_ids, attention_mask, completion_mask, lines: pairs.iter().map(|p| p.line).collect() })
}

/// [`collate_host`], then tensors on `device`.
pub fn collate(pairs: &[&TokenizedPair], pad_id: u32, device: &Device) -> Result<Batch> {
    let h = collate_host(pairs, pad_id)?;
    let shape = (h.rows, h.seq_len);
    Ok(Batch {
        input_ids: Tensor::from_vec(h.input_ids, shape, device)?,
        attention_mask: Tensor::from_vec(h.attention_mask, shape, device)?,
        completion_mask: Tensor::from_vec(h.completion_mask, shape, device)?,
        lines: h.lines,
    })
}

/// The padding id: the tokenizer's pad token when it has padding configured, else the first
/// EOS id, else the id of the EOS token text. (Padding is masked out; its value only has to be a
/// valid id.)
///
/// Errors: none of these exists.
pub fn pad_id(tokenizer: &Tokenizer) -> Result<u32> {
    if let Some(p) = tokenizer.inner.get_padding() {
        return Ok(p.pad_id);
    }
    if let Some(&id) = tokenizer.eos_token_ids.first() {
        return Ok(id);
    }
    tokenizer
        .eos_token
        .as_deref()
        .and_then(|t| tokenizer.inner.token_to_id(t))
        .ok_or_else(|| Error::Config("the tokenizer has neither a pad token nor an EOS token to pad with".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(line: usize, prompt: &[u32], chosen: &[u32], rejected: &[u32]) -> TokenizedPair {
        TokenizedPair { line, prompt_ids: prompt.to_vec(), chosen_ids: chosen.to_vec(), rejected_ids: rejected.to_vec() }
    }

    #[test]
    fn collate_layout_worked_example() {
        // pair 0: prompt [1 2], chosen [3], rejected [4 5 6]; pair 1: prompt [7], chosen [8 9], rejected [10]
        let a = pair(1, &[1, 2], &[3], &[4, 5, 6]);
        let b = pair(2, &[7], &[8, 9], &[10]);
        let h = collate_host(&[&a, &b], 0).unwrap();
        assert_eq!((h.rows, h.seq_len), (4, 5));
        #[rustfmt::skip]
        assert_eq!(h.input_ids, vec![
            1, 2, 3, 0, 0,   // chosen_0
            7, 8, 9, 0, 0,   // chosen_1
            1, 2, 4, 5, 6,   // rejected_0
            7, 10, 0, 0, 0,  // rejected_1
        ]);
        #[rustfmt::skip]
        assert_eq!(h.attention_mask, vec![
            1, 1, 1, 0, 0,
            1, 1, 1, 0, 0,
            1, 1, 1, 1, 1,
            1, 1, 0, 0, 0,
        ]);
        #[rustfmt::skip]
        assert_eq!(h.completion_mask, vec![
            0., 0., 1., 0., 0.,
            0., 1., 1., 0., 0.,
            0., 0., 1., 1., 1.,
            0., 1., 0., 0., 0.,
        ]);
        assert_eq!(h.lines, vec![1, 2]);
    }

    #[test]
    fn collate_tensors_have_the_documented_shapes_and_dtypes() {
        let a = pair(1, &[1, 2], &[3], &[4, 5, 6]);
        let b = collate(&[&a], 9, &Device::Cpu).unwrap();
        assert_eq!(b.input_ids.dims(), &[2, 5]);
        assert_eq!(b.input_ids.dtype(), candle_core::DType::U32);
        assert_eq!(b.attention_mask.dtype(), candle_core::DType::U32);
        assert_eq!(b.completion_mask.dtype(), candle_core::DType::F32);
        assert_eq!(b.input_ids.to_vec2::<u32>().unwrap(), vec![vec![1, 2, 3, 9, 9], vec![1, 2, 4, 5, 6]]);
    }

    #[test]
    fn sampler_is_a_permutation_and_a_pure_function_of_seed_and_epoch() {
        let lengths: Vec<usize> = (0..103).map(|i| (i * 37) % 91 + 5).collect();
        let cfg = SamplerConfig { batch_size: 4, seed: 7, mega_batch_factor: 5, drop_last: false };
        let e0 = epoch_batches(&lengths, &cfg, 0).unwrap();
        assert_eq!(e0, epoch_batches(&lengths, &cfg, 0).unwrap());
        let e1 = epoch_batches(&lengths, &cfg, 1).unwrap();
        assert_ne!(e0, e1, "epochs must differ");
        let other_seed = epoch_batches(&lengths, &SamplerConfig { seed: 8, ..cfg }, 0).unwrap();
        assert_ne!(e0, other_seed);
        let mut all: Vec<usize> = e0.concat();
        all.sort();
        assert_eq!(all, (0..103).collect::<Vec<_>>());
        assert_eq!(e0.iter().filter(|b| b.len() < 4).count(), 1);
        let dropped = epoch_batches(&lengths, &SamplerConfig { drop_last: true, ..cfg }, 0).unwrap();
        assert!(dropped.iter().all(|b| b.len() == 4));
        assert_eq!(dropped.len(), 25);
    }

    #[test]
    fn length_grouping_cuts_padding() {
        // padding = sum over batches of (B * max_len - sum of lengths)
        let lengths: Vec<usize> = (0..512).map(|i| ((i * 7919) % 500) + 10).collect();
        let padding = |batches: &[Vec<usize>]| -> usize {
            batches.iter().map(|b| b.len() * b.iter().map(|&i| lengths[i]).max().unwrap() - b.iter().map(|&i| lengths[i]).sum::<usize>()).sum()
        };
        let grouped = epoch_batches(&lengths, &SamplerConfig { batch_size: 8, seed: 1, mega_batch_factor: 16, drop_last: false }, 0).unwrap();
        let random = epoch_batches(&lengths, &SamplerConfig { batch_size: 8, seed: 1, mega_batch_factor: 1, drop_last: false }, 0).unwrap();
        assert!(padding(&grouped) * 4 < padding(&random), "grouped {} vs random {}", padding(&grouped), padding(&random));
    }

    #[test]
    fn zero_batch_size_is_an_error() {
        let e = epoch_batches(&[1, 2], &SamplerConfig { batch_size: 0, ..Default::default() }, 0).unwrap_err();
        assert!(e.to_string().contains("batch_size"), "{e}");
    }
}
