//! One SmolLM2-135M decoder layer (D = 576, I = 1536, 9 heads, 3 KV heads) at 512 tokens,
//! forward+backward of `forward_hidden(..).sum()` with the gradient flowing to the embeddings,
//! for the frozen base and each adapter kind on q, k, v, o: RoPO (r = 4, S = 2, magnitude),
//! LoRA (r = 8, PEFT's default) and full-parameter training. f32.
//! Run: `cargo bench --bench baselines`.

mod common;

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use ropo::adapter::AnyAdapterSet;
use ropo::config::{AdapterKind, AdapterSection};
use ropo::model::llama::Model;

const TOKENS: usize = 512;

fn layer_model(kind: Option<AdapterKind>) -> (Model, Option<AnyAdapterSet>) {
    let mut model = common::decoder_layer_model();
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
