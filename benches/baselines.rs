//! One SmolLM2-135M decoder layer (D = 576, I = 1536, 9 heads, 3 KV heads) at 512 tokens,
//! forward+backward of `forward_hidden(..).sum()` with the gradient flowing to the embeddings,
//! for the frozen base and each adapter kind on q, k, v, o: RoPO (r = 4, S = 2, magnitude),
//! LoRA (r = 8, PEFT's default) and full-parameter training. f32.
//! Run: `cargo bench --bench baselines`.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use criterion::{criterion_group, criterion_main, Criterion};
use rand::SeedableRng;
use ropo::adapter::AnyAdapterSet;
use ropo::config::{AdapterKind, AdapterSection};
use ropo::model::config::{Arch, ModelConfig};
use ropo::model::llama::{random_weights, Model};

const TOKENS: usize = 512;

fn layer_model(kind: Option<AdapterKind>) -> (Model, Option<AnyAdapterSet>) {
    let cfg = ModelConfig {
        arch: Arch::Llama,
        vocab_size: 256,
        hidden_size: 576,
        intermediate_size: 1536,
        num_hidden_layers: 1,
        num_attention_heads: 9,
        num_key_value_heads: 3,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 100_000.0,
        rope_scaling: None,
        max_position_embeddings: 2048,
        tie_word_embeddings: true,
        attention_bias: false,
        bos_token_id: None,
        eos_token_ids: vec![],
    };
    let dev = Device::Cpu;
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(0);
    let mut w = random_weights(&cfg, 0.05, &mut rng, DType::F32, &dev).unwrap();
    let embed = Var::from_tensor(&w["model.embed_tokens.weight"]).unwrap();
    w.insert("model.embed_tokens.weight".into(), embed.as_tensor().clone());
    let mut model = Model::load(VarBuilder::from_tensors(w.into_iter().collect(), DType::F32, &dev), &cfg).unwrap();
    let set = kind.map(|kind| AnyAdapterSet::inject(&mut model, &AdapterSection { kind, ..Default::default() }, "bench").unwrap());
    (model, set)
}

fn bench_layer(c: &mut Criterion) {
    let ids: Vec<u32> = (0..TOKENS as u32).map(|i| (i * 7919) % 256).collect();
    let ids = Tensor::from_vec(ids, (1, TOKENS), &Device::Cpu).unwrap();
    let mut g = c.benchmark_group("decoder_layer_fwd_bwd_512tok_kinds");
    g.sample_size(10);
    g.warm_up_time(std::time::Duration::from_millis(500));
    g.measurement_time(std::time::Duration::from_secs(5));
    for (name, kind) in [("base", None), ("ropo_qkvo", Some(AdapterKind::Ropo)), ("lora_r8_qkvo", Some(AdapterKind::Lora)), ("full_qkvo", Some(AdapterKind::Full))] {
        let (model, set) = layer_model(kind);
        if let Some(s) = &set {
            eprintln!("{name}: {}", s.report());
        }
        let use_adapters = set.is_some();
        g.bench_function(name, |b| b.iter(|| model.forward_hidden(&ids, None, use_adapters).unwrap().sum_all().unwrap().backward().unwrap()));
    }
    g.finish();
}

criterion_group!(benches, bench_layer);
criterion_main!(benches);
