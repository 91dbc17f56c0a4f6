//! The machine's matmul limit as candle sees it: 2048 x 2048 f32 sgemm (candle's gemm, the same
//! kernel the model's matmuls use), and ropo's bf16 kernel (`model::bf16_gemm`, f32
//! accumulation) at the same size and at the step's shapes; 2 threads by default (`RAYON_NUM_THREADS`). Throughput is
//! in FLOP (`elem/s` = FLOP/s, `2 N^3` per product). Run it next to `benches/step.rs` to put a
//! step's GFLOP/s against the sgemm rate measured under the same machine load.

use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ropo::model::bf16_gemm::{self, Product};

const N: usize = 2048;

fn bench_sgemm(c: &mut Criterion) {
    let dev = Device::Cpu;
    let a = Tensor::randn(0f32, 1.0, (N, N), &dev).unwrap();
    let b = Tensor::randn(0f32, 1.0, (N, N), &dev).unwrap();
    let mut g = c.benchmark_group("sgemm");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(2 * (N as u64).pow(3)));
    g.bench_function("2048_f32", |bch| bch.iter(|| a.matmul(&b).unwrap().dtype() == DType::F32));
    g.finish();
    // The shapes of a training step (SmolLM2-135M, ~940 token rows): projections forward
    // (rows x in) (in x out), and the input-gradient backward (rows x out) (out x in).
    let mut g = c.benchmark_group("sgemm_step_shapes");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    for (m, k, n) in [(940, 576, 576), (940, 576, 192), (940, 576, 1536), (940, 1536, 576)] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap().t().unwrap();
        g.throughput(Throughput::Elements(2 * (m * k * n) as u64));
        g.bench_function(format!("{m}x{k}x{n}"), |bch| bch.iter(|| a.matmul(&b).unwrap().dtype() == DType::F32));
    }
    g.finish();
    // The same shapes on the bf16 kernel (`model.dtype = "bf16"`: f32 activations rounded to
    // bf16, bf16 weights, f32 accumulation), forward x W^T and input-gradient dy W; and the LM
    // head at ~500 completion positions.
    // ropo's bf16 kernel at the same 2048^3 (the bf16 peak beside candle's f32 sgemm)
    let mut g = c.benchmark_group("bf16_gemm");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(2 * (N as u64).pow(3)));
    let x: Vec<f32> = (0..N * N).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let w: Vec<half::bf16> = (0..N * N).map(|i| half::bf16::from_f32(((i * 104729) % 1000) as f32 / 1000.0 - 0.5)).collect();
    let packed = bf16_gemm::PackedWeight::new(&w, N, N);
    g.bench_function("2048_bf16_packed", |bch| bch.iter(|| bf16_gemm::matmul_packed(&x, N, &w, &packed).len()));
    g.finish();
    let mut g = c.benchmark_group("bf16_step_shapes");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    let mut shapes: Vec<(usize, usize, usize, Product)> = vec![];
    for (m, k, n) in [(940, 576, 576), (940, 576, 192), (940, 576, 1536), (940, 1536, 576)] {
        shapes.push((m, n, k, Product::XWt)); // W (out = n, in = k)
        shapes.push((m, k, n, Product::XW)); // dy (m, k = out) W (out, in = n)
    }
    shapes.push((500, 49152, 576, Product::XWt));
    for (m, out, inp, product) in shapes {
        let (k, n) = product.kn(out, inp);
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let w: Vec<half::bf16> = (0..out * inp).map(|i| half::bf16::from_f32(((i * 104729) % 1000) as f32 / 1000.0 - 0.5)).collect();
        g.throughput(Throughput::Elements(2 * (m * k * n) as u64));
        g.bench_function(format!("{m}x{k}x{n}_{product:?}"), |bch| bch.iter(|| bf16_gemm::matmul(&x, m, &w, out, inp, product).len()));
    }
    g.finish();
}

criterion_group!(benches, bench_sgemm);
criterion_main!(benches);
