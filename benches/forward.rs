//! Forward throughput on SmolLM2-135M shapes (hidden 576, intermediate 1536, 30 layers, 9 heads,
//! 3 kv heads, vocab 49152, tied head), random f32 weights, a batch of 2 x 256 tokens.
//!
//! - `ropo/logits_all_positions`: `Model::forward`, the (2, 256, 49152) logits training needs;
//! - `ropo/hidden_plus_last_logits`: `forward_hidden` + `lm_head` on the last position only,
//!   the same work as candle-transformers' `Llama::forward`;
//! - `candle_transformers/last_logits`: candle-transformers' inference llama (fused, no
//!   backward), same weights;
//! - `ropo/forward_backward`: `forward` + `backward` of a scalar of the logits with every weight
//!   a `Var` (the upper bound of a training step's model cost).
//!
//! Throughput is in tokens (elements = 2 x 256). Run: `cargo bench --bench forward`; the
//! backward case takes ten iterations of tens of seconds on 2 cores, so for the forward only:
//! `cargo bench --bench forward -- "logits_all|hidden_plus|candle_transformers"`.

mod common;

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Duration;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::VarBuilder;
use candle_transformers::models::llama as ct_llama;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ropo::model::llama::Model;

const N: usize = 2;
const T: usize = 256;

fn bench_forward(c: &mut Criterion) {
    let cfg = common::smollm2_135m();
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let weights = common::random_f32_weights(&cfg, &mut rng);
    let ids: Vec<u32> = (0..N * T).map(|_| rng.random_range(0..cfg.vocab_size as u32)).collect();
    let ids = Tensor::from_vec(ids, (N, T), &dev).expect("ids");
    let mask = Tensor::ones((N, T), DType::U32, &dev).expect("mask");

    let ours = Model::load(VarBuilder::from_tensors(weights.clone(), DType::F32, &dev), &cfg).expect("our model");
    let ct_cfg = ct_llama::Config {
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
        rope_scaling: None,
        max_position_embeddings: cfg.max_position_embeddings,
        tie_word_embeddings: true,
    };
    let theirs = ct_llama::Llama::load(VarBuilder::from_tensors(weights.clone(), DType::F32, &dev), &ct_cfg).expect("ct llama");

    let mut g = c.benchmark_group("forward_2x256");
    g.throughput(Throughput::Elements((N * T) as u64));
    g.bench_function("ropo/logits_all_positions", |b| {
        b.iter(|| black_box(ours.forward(&ids, Some(&mask), true).expect("forward")))
    });
    g.bench_function("ropo/hidden_plus_last_logits", |b| {
        b.iter(|| {
            let h = ours.forward_hidden(&ids, Some(&mask), true).expect("forward_hidden");
            black_box(ours.lm_head(&h.i((.., T - 1, ..)).expect("last"), true).expect("lm_head"))
        })
    });
    g.bench_function("candle_transformers/last_logits", |b| {
        b.iter(|| {
            let mut cache = ct_llama::Cache::new(false, DType::F32, &ct_cfg, &dev).expect("cache");
            black_box(theirs.forward(&ids, 0, &mut cache).expect("ct forward"))
        })
    });

    // every weight a Var: the backward reaches all of them
    let vars: HashMap<String, Tensor> =
        weights.iter().map(|(k, t)| (k.clone(), Var::from_tensor(t).expect("var").as_tensor().clone())).collect();
    let trainable = Model::load(VarBuilder::from_tensors(vars, DType::F32, &dev), &cfg).expect("var model");
    g.bench_function("ropo/forward_backward", |b| {
        b.iter(|| {
            let logits = trainable.forward(&ids, Some(&mask), true).expect("forward");
            black_box(logits.mean_all().expect("mean").backward().expect("backward"))
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    targets = bench_forward
}
criterion_main!(benches);
