//! Small random models and tensors for the tests that need a model but not the real one.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use ropo::model::config::{Arch, ModelConfig};
use ropo::model::llama::{random_weights, Model};

/// A 2-layer model config: `hidden` wide (4 heads of `hidden / 4`, 2 KV heads), MLP 24, RMSNorm
/// eps 1e-6, RoPE theta 1e4, 64 positions, biases on q,k,v for Qwen2 only.
pub fn tiny_config(arch: Arch, vocab: usize, hidden: usize, tied: bool) -> ModelConfig {
    ModelConfig {
        arch,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: hidden / 4,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 64,
        tie_word_embeddings: tied,
        attention_bias: arch == Arch::Qwen2,
        bos_token_id: None,
        eos_token_ids: vec![],
        extras: Default::default(),
    }
}

/// `cfg` with random weights (normal, std 0.3, ChaCha20 from `seed`) in `dtype` on the CPU.
pub fn small_model(cfg: &ModelConfig, seed: u64, dtype: DType) -> Model {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    let w = random_weights(cfg, 0.3, &mut rng, dtype, &Device::Cpu).unwrap();
    Model::load(VarBuilder::from_tensors(w.into_iter().collect(), dtype, &Device::Cpu), cfg).unwrap()
}

/// `max |a - b|` over all entries, computed in f64.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// `max |a - b| / max |b|` over all entries, in f64: a difference relative to `b`'s scale (for
/// logits whose f32 rounding grows with their size and depends on the CPU's matmul blocking).
pub fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    max_abs(a, b) / max_abs(b, &b.zeros_like().unwrap())
}

/// A CPU tensor of `shape` with entries ~ N(0, std²) drawn in f64 from `rng`, cast to `dtype`.
pub fn randn(shape: &[usize], std: f64, rng: &mut impl rand::Rng, dtype: DType) -> Tensor {
    let n = Normal::new(0.0f64, std).unwrap();
    let v: Vec<f64> = (0..shape.iter().product::<usize>()).map(|_| n.sample(rng)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

/// `cfg` (f64, random weights from `seed`) with RoPO (r = 2, S = 2, magnitude) on every
/// projection of every layer (`init_seed`), its parameters moved off the identity by
/// uniform(-0.3, 0.3) offsets drawn after the weights; returns the model and the adapter set.
pub fn model_with_perturbed_ropo(cfg: &ModelConfig, seed: u64, init_seed: u64) -> (Model, ropo::adapter::ropo::RopoSet) {
    use rand::Rng;
    use ropo::adapter::ropo::RopoConfig;
    use ropo::adapter::targets::TargetModules;
    let dev = Device::Cpu;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let w = random_weights(cfg, 0.3, &mut rng, DType::F64, &dev).unwrap();
    let mut model = Model::load(VarBuilder::from_tensors(w.into_iter().collect(), DType::F64, &dev), cfg).unwrap();
    let acfg = RopoConfig {
        target_modules: TargetModules::Regex(r"model\.layers\.\d+\..*_proj".into()),
        householder_reflections: 2,
        givens_stages: 2,
        magnitude: true,
        init_seed,
    };
    let set = ropo::adapter::ropo::inject(&mut model, &acfg, "tiny").unwrap();
    for (_, v) in set.vars() {
        let offsets: Vec<f64> = (0..v.elem_count()).map(|_| rng.random_range(-0.3..0.3)).collect();
        let t = (v.as_tensor() + Tensor::from_vec(offsets, v.dims(), &dev).unwrap()).unwrap();
        v.set(&t).unwrap();
    }
    (model, set)
}
