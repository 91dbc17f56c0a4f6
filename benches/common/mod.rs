//! Model setup shared by the benches: SmolLM2-135M's shapes with random weights (no download;
//! the cost of a forward or backward does not depend on the weights' values).
#![allow(dead_code)] // each bench uses the part it needs

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use rand::SeedableRng;
use ropo::model::config::{Arch, ModelConfig};
use ropo::model::llama::{random_weights, Model};

/// SmolLM2-135M's shapes: hidden 576, intermediate 1536, 30 layers, 9 heads / 3 KV heads of
/// 64, vocab 49152, tied head, RoPE theta 1e5 (HF `HuggingFaceTB/SmolLM2-135M-Instruct`).
pub fn smollm2_135m() -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_hidden_layers: 30,
        num_attention_heads: 9,
        num_key_value_heads: 3,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 100_000.0,
        rope_scaling: None,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        attention_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        extras: Default::default(),
    }
}

/// Random f32 CPU weights for `cfg` (normal, std 0.02), by HF tensor name.
pub fn random_f32_weights(cfg: &ModelConfig, rng: &mut impl rand::Rng) -> HashMap<String, Tensor> {
    random_weights(cfg, 0.02, rng, DType::F32, &Device::Cpu).expect("random weights").into_iter().collect()
}

/// `cfg` with [`random_f32_weights`], no adapter.
pub fn random_model(cfg: &ModelConfig, rng: &mut impl rand::Rng) -> Model {
    Model::load(VarBuilder::from_tensors(random_f32_weights(cfg, rng), DType::F32, &Device::Cpu), cfg).expect("model")
}

/// One SmolLM2-135M decoder layer (D = 576, I = 1536, 9 heads, 3 KV heads) with a 256-token
/// vocabulary, random f32 weights (std 0.05, ChaCha20 seed 0), and the embedding table a `Var`,
/// so that a backward flows through the layer to the embeddings, as for a layer inside a
/// network. No adapter yet.
pub fn decoder_layer_model() -> Model {
    let cfg = ModelConfig {
        vocab_size: 256,
        num_hidden_layers: 1,
        max_position_embeddings: 2048,
        bos_token_id: None,
        eos_token_ids: vec![],
        ..smollm2_135m()
    };
    let dev = Device::Cpu;
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(0);
    let mut w = random_weights(&cfg, 0.05, &mut rng, DType::F32, &dev).unwrap();
    let embed = Var::from_tensor(&w["model.embed_tokens.weight"]).unwrap();
    w.insert("model.embed_tokens.weight".into(), embed.as_tensor().clone());
    Model::load(VarBuilder::from_tensors(w.into_iter().collect(), DType::F32, &dev), &cfg).unwrap()
}
