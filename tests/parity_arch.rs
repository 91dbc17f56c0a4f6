//! Architecture parity: our trainable decoder against candle-transformers' inference models
//! (`models::llama`, `models::qwen2`) loaded from the same random weights, plus the padded-batch
//! and KV-cache invariants of our own model.
//!
//! Oracles: candle-transformers 0.11.1 (a port of HF `modeling_llama.py` / `modeling_qwen2.py`)
//! for the logits; the model itself run on the unpadded sequence / without a cache for the
//! invariants.

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama as ct_llama, qwen2 as ct_qwen2};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use ropo::model::config::{Arch, Llama3RopeScaling, ModelConfig};
use ropo::model::llama::{random_weights, KvCache, Model};

/// A small config: D = 32, H = 4, hd = 8 (candle-transformers requires hd = D / H).
fn config(arch: Arch, kv_heads: usize, tied: bool, scaling: Option<Llama3RopeScaling>) -> ModelConfig {
    ModelConfig {
        arch,
        vocab_size: 50,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: kv_heads,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        rope_theta: if arch == Arch::Qwen2 { 1_000_000.0 } else { 10_000.0 },
        rope_scaling: scaling,
        max_position_embeddings: 128,
        tie_word_embeddings: tied,
        attention_bias: arch == Arch::Qwen2,
        bos_token_id: None,
        eos_token_ids: vec![],
        extras: Default::default(),
    }
}

/// Llama-3 scaling on hd = 8, theta = 1e4 (wavelengths 6.3, 63, 628, 6283): with orig = 256,
/// low = 1, high = 8 the bands are keep, interpolate, divide, divide.
fn llama3_scaling() -> Llama3RopeScaling {
    Llama3RopeScaling { factor: 4.0, low_freq_factor: 1.0, high_freq_factor: 8.0, original_max_position_embeddings: 256 }
}

fn weights(cfg: &ModelConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Ok(random_weights(cfg, 0.2, &mut rng, DType::F32, &Device::Cpu)?.into_iter().collect())
}

fn ids(rows: &[&[u32]]) -> Result<Tensor> {
    let t = rows[0].len();
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

const TOKENS: [&[u32]; 2] = [&[3, 17, 42, 8, 8, 29, 1, 49, 0, 21, 5, 33], &[11, 2, 7, 30, 45, 19, 4, 4, 26, 38, 13, 6]];

fn ct_llama_config(cfg: &ModelConfig) -> ct_llama::Config {
    ct_llama::Config {
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        vocab_size: cfg.vocab_size,
        num_hidden_layers: cfg.num_hidden_layers,
        num_attention_heads: cfg.num_attention_heads,
        num_key_value_heads: cfg.num_key_value_heads,
        use_flash_attn: false,
        rms_norm_eps: cfg.rms_norm_eps,
        rope_theta: cfg.rope_theta as f32,
        bos_token_id: None,
        eos_token_id: None,
        rope_scaling: cfg.rope_scaling.as_ref().map(|s| ct_llama::Llama3RopeConfig {
            factor: s.factor as f32,
            low_freq_factor: s.low_freq_factor as f32,
            high_freq_factor: s.high_freq_factor as f32,
            original_max_position_embeddings: s.original_max_position_embeddings,
            rope_type: ct_llama::Llama3RopeType::Llama3,
        }),
        max_position_embeddings: cfg.max_position_embeddings,
        tie_word_embeddings: cfg.tie_word_embeddings,
    }
}

fn check_llama(cfg: &ModelConfig, what: &str) -> Result<()> {
    let w = weights(cfg, 1)?;
    let ours = Model::load(VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu), cfg)?;
    let ct_cfg = ct_llama_config(cfg);
    let theirs = ct_llama::Llama::load(VarBuilder::from_tensors(w, DType::F32, &Device::Cpu), &ct_cfg)?;
    let x = ids(&TOKENS)?;
    let mut cache = ct_llama::Cache::new(false, DType::F32, &ct_cfg, &Device::Cpu)?;
    // candle-transformers returns only the last position: (N, V)
    let want = theirs.forward(&x, 0, &mut cache)?;
    let logits = ours.forward(&x, None, false)?;
    let t = x.dim(1)?;
    let got = logits.i((.., t - 1, ..))?;
    let d = max_abs_diff(&got, &want)?;
    let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    assert!(scale > 0.1, "{what}: logits too small to compare ({scale})");
    assert!(d < 1e-4, "{what}: last-position logits differ by {d} (max |logit| {scale})");
    // every prefix's last position too (candle-transformers on the truncated input)
    for len in [1, 5] {
        let xp = x.narrow(1, 0, len)?;
        let mut cache = ct_llama::Cache::new(false, DType::F32, &ct_cfg, &Device::Cpu)?;
        let want = theirs.forward(&xp, 0, &mut cache)?;
        let got = logits.i((.., len - 1, ..))?;
        let d = max_abs_diff(&got, &want)?;
        assert!(d < 1e-4, "{what}: position {} logits differ by {d}", len - 1);
    }
    Ok(())
}

#[test]
fn llama_gqa_untied_matches_candle_transformers() -> Result<()> {
    check_llama(&config(Arch::Llama, 2, false, None), "llama gqa untied")
}

#[test]
fn llama_gqa_tied_matches_candle_transformers() -> Result<()> {
    check_llama(&config(Arch::Llama, 1, true, None), "llama mqa tied")
}

#[test]
fn llama_mha_llama3_rope_scaling_matches_candle_transformers() -> Result<()> {
    check_llama(&config(Arch::Llama, 4, false, Some(llama3_scaling())), "llama mha llama3-scaling")
}

fn check_qwen2(cfg: &ModelConfig, what: &str) -> Result<()> {
    let w = weights(cfg, 2)?;
    let ours = Model::load(VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu), cfg)?;
    let ct_cfg = ct_qwen2::Config {
        vocab_size: cfg.vocab_size,
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        num_hidden_layers: cfg.num_hidden_layers,
        num_attention_heads: cfg.num_attention_heads,
        num_key_value_heads: cfg.num_key_value_heads,
        max_position_embeddings: cfg.max_position_embeddings,
        sliding_window: 4096,
        max_window_layers: cfg.num_hidden_layers,
        tie_word_embeddings: cfg.tie_word_embeddings,
        rope_theta: cfg.rope_theta,
        rms_norm_eps: cfg.rms_norm_eps,
        use_sliding_window: false,
        hidden_act: candle_nn::Activation::Silu,
    };
    let x = ids(&TOKENS)?;
    let t = x.dim(1)?;
    // hidden states of every position (after the final norm)
    let mut base = ct_qwen2::Model::new(&ct_cfg, VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu))?;
    let want_h = base.forward(&x, 0, None)?;
    let got_h = ours.forward_hidden(&x, None, false)?;
    let d = max_abs_diff(&got_h, &want_h)?;
    assert!(d < 1e-4, "{what}: hidden states differ by {d}");
    // last-position logits through their lm_head (tied or not)
    let mut lm = ct_qwen2::ModelForCausalLM::new(&ct_cfg, VarBuilder::from_tensors(w, DType::F32, &Device::Cpu))?;
    let want = lm.forward(&x, 0)?.squeeze(1)?; // (N, 1, V) -> (N, V)
    let got = ours.forward(&x, None, false)?.i((.., t - 1, ..))?;
    let d = max_abs_diff(&got, &want)?;
    assert!(d < 1e-4, "{what}: last-position logits differ by {d}");
    Ok(())
}

#[test]
fn qwen2_biases_untied_matches_candle_transformers() -> Result<()> {
    check_qwen2(&config(Arch::Qwen2, 2, false, None), "qwen2 untied")
}

#[test]
fn qwen2_biases_tied_matches_candle_transformers() -> Result<()> {
    check_qwen2(&config(Arch::Qwen2, 2, true, None), "qwen2 tied")
}

/// A right-padded row's logits at its real positions equal the row run alone; so do the
/// full row's.
#[test]
fn right_padding_leaves_real_positions_unchanged() -> Result<()> {
    for cfg in [config(Arch::Llama, 2, true, None), config(Arch::Qwen2, 2, false, None)] {
        let model = Model::load(VarBuilder::from_tensors(weights(&cfg, 3)?, DType::F32, &Device::Cpu), &cfg)?;
        let short: &[u32] = &TOKENS[0][..7];
        let mut padded = short.to_vec();
        padded.resize(12, 0);
        let x = ids(&[&padded, TOKENS[1]])?;
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0], [1; 12]], &Device::Cpu)?;
        let batch = model.forward(&x, Some(&mask), true)?;
        assert!(batch.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.is_finite()), "padded positions stay finite");
        let alone0 = model.forward(&ids(&[short])?, None, true)?;
        let d0 = max_abs_diff(&batch.i((0..1, 0..7, ..))?, &alone0)?;
        assert!(d0 < 1e-5, "{:?}: padded row differs from the row alone by {d0}", cfg.arch);
        let alone1 = model.forward(&ids(&[TOKENS[1]])?, None, true)?;
        let d1 = max_abs_diff(&batch.i((1..2, .., ..))?, &alone1)?;
        assert!(d1 < 1e-5, "{:?}: full row differs from the row alone by {d1}", cfg.arch);
        // an all-ones mask is the same as no mask
        let ones = Tensor::ones((2, 12), DType::U32, &Device::Cpu)?;
        let d = max_abs_diff(&model.forward(&x, Some(&ones), true)?, &model.forward(&x, None, true)?)?;
        assert!(d == 0.0, "all-ones mask vs none: {d}");
    }
    Ok(())
}

/// Generation with the KV cache (a prefill of 5, a chunk of 3, then one token at a time) gives
/// the logits of the full forward at the same positions.
#[test]
fn kv_cache_matches_full_forward() -> Result<()> {
    for cfg in [config(Arch::Llama, 2, false, Some(llama3_scaling())), config(Arch::Qwen2, 1, true, None)] {
        let model = Model::load(VarBuilder::from_tensors(weights(&cfg, 4)?, DType::F32, &Device::Cpu), &cfg)?;
        let seq = TOKENS[1];
        let full = model.forward(&ids(&[seq])?, None, false)?; // (1, 12, V)
        let mut cache = KvCache::new(&cfg);
        assert_eq!(cache.len(), 0);
        let mut chunks = vec![(0usize, 5usize), (5, 3)];
        chunks.extend((8..12).map(|p| (p, 1)));
        for (start, len) in chunks {
            let step = model.forward_with_cache(&ids(&[&seq[start..start + len]])?, &mut cache, false)?;
            assert_eq!(step.dims(), &[1, len, cfg.vocab_size]);
            let d = max_abs_diff(&step, &full.narrow(1, start, len)?)?;
            assert!(d < 1e-5, "{:?}: cached positions {start}..{} differ by {d}", cfg.arch, start + len);
            assert_eq!(cache.len(), start + len);
        }
        cache.clear();
        assert!(cache.is_empty());
    }
    Ok(())
}
