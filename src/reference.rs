//! Reference log-probs `log π_ref(y|x)` for the preference losses.
//!
//! The reference is the policy network with its adapters bypassed (`use_adapters = false`,
//! [`crate::model::linear::Linear::forward`]): no second copy of the weights. A separate
//! reference model (`model.reference` in the run config) is supported too; it runs without
//! adapters. Reference forwards build no autograd graph (no `Var` is on their path) and their
//! results are detached.
//!
//! With `training.precompute_ref_log_probs = true` the reference log-probs of every pair are
//! computed once before training and cached on disk as `OUTPUT_DIR/reference_logps/<key>.safetensors`,
//! `<key>` = sha256 over the model source, the reference source, the tokenization settings and
//! the token ids of every pair ([`cache_key`]): a cache is reused only for exactly the same
//! inputs. Evaluation sets always use precomputed (in-memory) reference log-probs: the reference
//! never changes during training.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use crate::data::tokenize::TokenizedPair;
use crate::error::{Error, Result};
use crate::logps::{score_pairs_with, LogpOptions, Pass};
use crate::model::llama::Model;

/// Reference log-probs of each pair, indexed like the pairs they were computed for.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PairRefLogps {
    /// `log π_ref(y_w|x)` per pair.
    pub chosen: Vec<f32>,
    /// `log π_ref(y_l|x)` per pair.
    pub rejected: Vec<f32>,
}

impl PairRefLogps {
    /// The `(2B,)` f32 tensor `[chosen of idx..., rejected of idx...]` for a batch of pair indices.
    pub fn gather(&self, idx: &[usize], device: &Device) -> Result<Tensor> {
        let mut v: Vec<f32> = idx.iter().map(|&i| self.chosen[i]).collect();
        v.extend(idx.iter().map(|&i| self.rejected[i]));
        Ok(Tensor::from_vec(v, idx.len() * 2, device)?)
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.chosen.len()
    }

    /// True when there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.chosen.is_empty()
    }
}

/// The reference log-probs of every pair of `pairs`, in order, `batch_size` pairs per forward
/// ([`score_pairs`] with [`Pass::Reference`]: file order, so the result does not depend on any
/// sampler; adapters bypassed; `share_prompt` selects the shared-prompt path).
/// `ld_alpha` weighs the tokens past each pair's shared length (TRL's LD-DPO; `None`: plain sums).
/// `on_batch(done, total)` is called after each batch (progress).
pub fn compute_all(
    model: &Model,
    pairs: &[TokenizedPair],
    batch_size: usize,
    pad_id: u32,
    share_prompt: bool,
    ld_alpha: Option<f64>,
    mut on_batch: impl FnMut(usize, usize),
) -> Result<PairRefLogps> {
    let mut done = 0;
    let opts = LogpOptions { ld_alpha, use_weighting: false };
    let scores = score_pairs_with(model, pairs, pad_id, batch_size.max(1), share_prompt, Pass::Reference, &opts, |k| {
        done += k;
        on_batch(done, pairs.len())
    })?;
    let (chosen, rejected) = scores.reference.expect("a reference pass");
    let f32s = |t: Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.to_vec1::<f32>()?) };
    Ok(PairRefLogps { chosen: f32s(chosen)?, rejected: f32s(rejected)? })
}

/// The cache key: hex sha256 over `parts` (model source, reference source, tokenization
/// settings, chat template, ...; each length-prefixed) and the token ids of every pair.
pub fn cache_key(parts: &[&str], pairs: &[TokenizedPair]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    h.update((pairs.len() as u64).to_le_bytes());
    for p in pairs {
        for ids in [&p.prompt_ids, &p.chosen_ids, &p.rejected_ids] {
            h.update((ids.len() as u64).to_le_bytes());
            for id in ids.iter() {
                h.update(id.to_le_bytes());
            }
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// `dir/<key>.safetensors`.
pub fn cache_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{key}.safetensors"))
}

/// Read a cache written by [`save_cache`]; `Ok(None)` when the file does not exist.
/// Errors: an unreadable or malformed file (named), or one holding another number of pairs.
pub fn load_cache(path: &Path, n_pairs: usize) -> Result<Option<PairRefLogps>> {
    if !path.exists() {
        return Ok(None);
    }
    let t = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::input(path, None, e.to_string()))?;
    let get = |k: &str| -> Result<Vec<f32>> {
        let v = t.get(k).ok_or_else(|| Error::input(path, None, format!("missing tensor {k}")))?;
        Ok(v.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    };
    let (chosen, rejected) = (get("reference_chosen_logps")?, get("reference_rejected_logps")?);
    if chosen.len() != n_pairs || rejected.len() != n_pairs {
        return Err(Error::input(path, None, format!("holds {} pairs, the data has {n_pairs}", chosen.len())));
    }
    Ok(Some(PairRefLogps { chosen, rejected }))
}

/// Write the cache atomically (`reference_chosen_logps`, `reference_rejected_logps`, `(P,)` f32).
pub fn save_cache(path: &Path, r: &PairRefLogps) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::input(dir, None, format!("creating folder: {e}")))?;
    }
    let tensors = vec![
        ("reference_chosen_logps".to_string(), Tensor::new(r.chosen.as_slice(), &Device::Cpu)?),
        ("reference_rejected_logps".to_string(), Tensor::new(r.rejected.as_slice(), &Device::Cpu)?),
    ];
    let bytes = crate::fsutil::safetensors_bytes(&tensors, None::<HashMap<String, String>>)?;
    crate::fsutil::write_atomic(path, &bytes).map_err(|e| Error::input(path, None, format!("writing: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(p: &[u32], c: &[u32], r: &[u32]) -> TokenizedPair {
        TokenizedPair { line: 1, prompt_ids: p.to_vec(), chosen_ids: c.to_vec(), rejected_ids: r.to_vec() }
    }

    #[test]
    fn key_changes_with_every_input() {
        let a = [pair(&[1, 2], &[3], &[4])];
        let k = cache_key(&["m", "256"], &a);
        assert_eq!(k.len(), 64);
        assert_eq!(k, cache_key(&["m", "256"], &a));
        assert_ne!(k, cache_key(&["m", "128"], &a));
        assert_ne!(k, cache_key(&["m2", "256"], &a));
        assert_ne!(k, cache_key(&["m", "256"], &[pair(&[1, 2], &[3], &[5])]));
        // length prefixes: moving a token from prompt to chosen changes the key
        assert_ne!(k, cache_key(&["m", "256"], &[pair(&[1], &[2, 3], &[4])]));
    }

    #[test]
    fn cache_round_trips_and_checks_the_count() {
        let dir = tempfile::tempdir().unwrap();
        let p = cache_path(dir.path(), "abc");
        assert_eq!(load_cache(&p, 2).unwrap(), None);
        let r = PairRefLogps { chosen: vec![-1.5, -2.25], rejected: vec![-3.0, -4.125] };
        save_cache(&p, &r).unwrap();
        assert_eq!(load_cache(&p, 2).unwrap(), Some(r.clone()));
        assert!(load_cache(&p, 3).unwrap_err().to_string().contains("holds 2 pairs"));
        let g = r.gather(&[1, 0], &Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(g, vec![-2.25, -1.5, -4.125, -3.0]);
    }
}
