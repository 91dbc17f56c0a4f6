//! One RoPO training step on SmolLM2-135M shapes (hidden 576, intermediate 1536, 30 layers,
//! 9 heads, 3 kv heads, vocab 49152, tied head), random f32 weights, default adapter (r = 4,
//! S = 2, magnitude, q,k,v,o), a batch of 2 pairs x 256 tokens (prompt 100, completions 156):
//!
//! reference forward (adapters bypassed) + policy forward + sigmoid loss + backward + global-norm
//! clip + AdamW update, each prompt run once per pair (`training.share_prompt`, the default):
//! exactly what `ropo::train::run` does per micro-batch without precomputed reference log-probs,
//! with the threads and allocator tuning `ropo train` uses (`process::configure_threads`), on a
//! thread of the compute pool as `ropo train` (`process::on_compute_pool`).
//!
//! Throughput is in real tokens (elements = 4 sequences x 256). Peak RSS of a whole `ropo train`
//! run is printed by `ropo train` itself at the end (`peak RSS`, from `VmHWM`); this bench reports
//! the bench process's `VmHWM` after the runs on stderr.
//! Run: `cargo bench --bench train_step`.

mod common;

use std::hint::black_box;
use std::time::Duration;

use candle_core::Device;
use criterion::{Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ropo::config::RunConfig;
use ropo::data::batch::collate;
use ropo::data::tokenize::TokenizedPair;
use ropo::optim::{AdamW, Grads};

const PAIRS: usize = 2;
const T: usize = 256;
const PROMPT: usize = 100;

fn bench_train_step(c: &mut Criterion) {
    let cfg = common::smollm2_135m();
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut model = common::random_model(&cfg, &mut rng);
    let run_cfg = RunConfig::default();
    let set = ropo::adapter::AnyAdapterSet::inject(&mut model, &run_cfg.adapter, "random").expect("adapter");
    let params = set.vars();
    let mut opt = AdamW::new(params.clone(), run_cfg.training.adamw()).expect("adamw");
    let mut ids = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(3..cfg.vocab_size as u32)).collect() };
    let pairs: Vec<TokenizedPair> = (0..PAIRS)
        .map(|_| TokenizedPair { line: 1, prompt_ids: ids(PROMPT), chosen_ids: ids(T - PROMPT), rejected_ids: ids(T - PROMPT) })
        .collect();
    let refs: Vec<&TokenizedPair> = pairs.iter().collect();
    let batch = collate(&refs, 2, &dev).expect("batch");
    let t = &run_cfg.training;

    let mut g = c.benchmark_group("train_step");
    g.throughput(Throughput::Elements((2 * PAIRS * T) as u64));
    g.bench_function("ropo/reference+policy_fwd_bwd+adamw_2x256", |b| {
        b.iter(|| {
            let reference = ropo::logps::batch_logps_detached(&model, &batch, false, t.share_prompt).expect("reference");
            let (out, grads) = ropo::train::micro_batch(&model, &batch, &reference, t).expect("step");
            let mut grads = Grads::from_store(&params, &grads).expect("grads");
            let norm = grads.clip_global_norm(t.max_grad_norm).expect("clip");
            opt.step(&grads, 1e-4).expect("adamw");
            black_box((out.loss, norm))
        })
    });
    g.finish();
    if let Some(kib) = ropo::process::peak_rss_kib() {
        eprintln!("train_step bench: peak RSS (VmHWM) {:.2} GiB", kib as f64 / 1048576.0);
    }
}

fn main() {
    // threads and allocator as `ropo train` sets them, before any tensor work and the pool
    eprintln!("threads: {}", ropo::process::configure_threads(0));
    // criterion's own main (criterion_main!), on a thread of the compute pool as `ropo train`
    ropo::process::on_compute_pool(ropo::process::COMPUTE_STACK_BYTES, || {
        let mut c = Criterion::default().sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(20)).configure_from_args();
        bench_train_step(&mut c);
        c.final_summary();
    })
    .expect("compute threads");
}
