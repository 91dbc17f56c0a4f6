//! Forward+backward time of a RoPO-adapted linear vs the plain frozen linear, the reference
//! paths (rank-1 Householder, composed Givens, broadcast magnitude), and a dense-R implementation (PEFT HRA style: build R every step), at
//! 512 tokens, r = 4, S = 2, f32. Run: `cargo bench --bench adapter`.

mod common;

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ropo::adapter::RopoAdapter;
use ropo::model::linear::{frozen_matmul, Adapter, Linear};

const TOKENS: usize = 512;

fn setup(d_in: usize, d_out: usize) -> (Linear, RopoAdapter, Var) {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 0.05, (d_out, d_in), &dev).unwrap();
    let base = Linear::new("model.layers.0.self_attn.q_proj", w, None);
    let ad = RopoAdapter::init(&base, 4, 2, true, 0).unwrap();
    // non-identity angles (the cost does not depend on the values, but keep it honest)
    if let Some(t) = &ad.theta {
        t.set(&Tensor::randn(0f32, 0.1, t.dims(), &dev).unwrap()).unwrap();
    }
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (TOKENS, d_in), &dev).unwrap()).unwrap();
    (base, ad, x)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("adapter_fwd_bwd_512tok");
    g.sample_size(10);
    g.warm_up_time(std::time::Duration::from_millis(500));
    g.measurement_time(std::time::Duration::from_secs(3));
    for (d_in, d_out) in [(576, 576), (576, 1536), (1536, 576)] {
        let (base, ad, x) = setup(d_in, d_out);
        let id = format!("{d_in}x{d_out}");
        g.bench_function(BenchmarkId::new("plain_frozen", &id), |b| {
            b.iter(|| base.forward_base(x.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap())
        });
        g.bench_function(BenchmarkId::new("ropo_wy", &id), |b| {
            b.iter(|| ad.forward(&base, x.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap())
        });
        g.bench_function(BenchmarkId::new("ropo_wy_composed", &id), |b| {
            // the chain the fused RopoProduct replaces: rotate_t, frozen product, magnitude
            b.iter(|| {
                let y = base.frozen_product(&ad.rotate_t(x.as_tensor()).unwrap()).unwrap();
                let y = ropo::adapter::ropo::layer::scale_cols(&y, &ad.scale().unwrap().unwrap()).unwrap();
                y.sum_all().unwrap().backward().unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("ropo_reference_paths", &id), |b| {
            b.iter(|| {
                let xr = ad.rotate_t_reference(x.as_tensor()).unwrap();
                let y = frozen_matmul(&xr, &base.weight).unwrap();
                let y = y.broadcast_mul(&ad.scale().unwrap().unwrap()).unwrap();
                y.sum_all().unwrap().backward().unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("dense_r", &id), |b| {
            b.iter(|| {
                // R built densely from (u, theta) every step, differentiably; x R = (R^T x)^T
                let r = ad.dense_r().unwrap();
                let xr = x.as_tensor().matmul(&r).unwrap();
                let y = frozen_matmul(&xr, &base.weight).unwrap();
                let y = y.broadcast_mul(&ad.scale().unwrap().unwrap()).unwrap();
                y.sum_all().unwrap().backward().unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("householder_only", &id), |b| {
            let u = ad.u.as_ref().unwrap().as_tensor();
            b.iter(|| ropo::adapter::ropo::householder::reflect(x.as_tensor(), u).unwrap().sum_all().unwrap().backward().unwrap())
        });
        g.bench_function(BenchmarkId::new("householder_only_composed", &id), |b| {
            let u = ad.u.as_ref().unwrap().as_tensor();
            b.iter(|| ropo::adapter::ropo::householder::reflect_composed(x.as_tensor(), u).unwrap().sum_all().unwrap().backward().unwrap())
        });
        g.bench_function(BenchmarkId::new("givens_only", &id), |b| {
            let t = ad.theta.as_ref().unwrap().as_tensor();
            b.iter(|| ropo::adapter::ropo::givens::rotate_t(x.as_tensor(), t, 2).unwrap().sum_all().unwrap().backward().unwrap())
        });
        g.bench_function(BenchmarkId::new("magnitude_only", &id), |b| {
            let s = ad.scale().unwrap().unwrap();
            b.iter(|| {
                let y = ropo::adapter::ropo::layer::scale_cols(&base.forward_base(x.as_tensor()).unwrap(), &s).unwrap();
                y.sum_all().unwrap().backward().unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("ropo_wy_forward_only", &id), |b| {
            b.iter(|| ad.forward(&base, x.as_tensor()).unwrap())
        });
    }
    g.finish();
}

/// One SmolLM2-135M decoder layer (D = 576, I = 1536, 9 heads, 3 KV heads) at 512 tokens,
/// forward+backward of `forward_hidden(..).sum()` with the gradient flowing to the embeddings
/// (as for a layer inside a network), base vs RoPO on q, k, v, o (r = 4, S = 2, magnitude).
fn bench_layer(c: &mut Criterion) {
    use ropo::adapter::ropo::{self as ropo_adapter, RopoConfig};
    let dev = Device::Cpu;
    let mut model = common::decoder_layer_model();
    let _set = ropo_adapter::inject(&mut model, &RopoConfig::default(), "bench").unwrap();
    let ids: Vec<u32> = (0..TOKENS as u32).map(|i| (i * 7919) % 256).collect();
    let ids = Tensor::from_vec(ids, (1, TOKENS), &dev).unwrap();
    let mut g = c.benchmark_group("decoder_layer_fwd_bwd_512tok");
    g.sample_size(10);
    g.warm_up_time(std::time::Duration::from_millis(500));
    g.measurement_time(std::time::Duration::from_secs(5));
    for (name, use_adapters) in [("base", false), ("ropo_qkvo", true)] {
        g.bench_function(name, |b| {
            b.iter(|| model.forward_hidden(&ids, None, use_adapters).unwrap().sum_all().unwrap().backward().unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench, bench_layer);
criterion_main!(benches);
