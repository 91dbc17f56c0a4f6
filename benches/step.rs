//! One preference-training step's policy work on SmolLM2-135M shapes (hidden 576, 30 layers,
//! 9 heads / 3 kv heads, vocab 49152, tied head), random f32 weights, RoPO r=4, S=2, magnitude
//! on q,k,v,o (the default adapter): forward of the completion log-probs, DPO (sigmoid) loss
//! against precomputed reference log-probs, backward. Four configurations, each adding one
//! optimisation to the previous:
//!
//! - `step/plain`: plain candle matmul for frozen weights, full `(N, T, V)` logits +
//!   `logps::completion_logps` (the path before this work);
//! - `step/frozen`: + `FrozenMatmul` (no weight gradients for frozen weights);
//! - `step/lmhead`: + `logps::completion_logps_from_hidden` (LM head and log-softmax only at
//!   completion positions, fused with the gather);
//! - `step/prefix`: + `logps::completion_logps_shared_prompt` (each prompt once for its pair);
//! - `step/fused`: + the fused layer ops (`ops::set_fused_layer_ops`: SwiGLU, the attention
//!   heads' layout + RoPE ops, no-op reshapes out of the graph, no gradient for constant norm
//!   weights); the configurations before it run the composed candle ops;
//! - `step/bf16`: + projection weights in bf16 (`model.dtype = "bf16"`,
//!   `Model::narrow_projections_to_bf16`: the AVX-512 BF16 kernel with f32 accumulation for
//!   every projection and the LM head, forward and input gradient).
//!
//! Batch: 2 pairs, orca-like lengths (prompt 150 + chosen 100 / rejected 60; prompt 140 +
//! chosen 90 / rejected 110): 940 real tokens (chosen + rejected rows, each prompt counted in
//! both, as TRL counts), 62% of them prompt, padded to T = 250. Throughput is in those real
//! tokens. The reference log-probs are constants (precomputed once per dataset in ropo).
//!
//! FLOPs of the useful work (printed at start; anchors.md's count without the reference
//! forward): `4 · P · tokens + 4 · V · D · K`, P = non-embedding params, K = completion tokens.
//! Divide by the median time for GFLOP/s.
//!
//! Peak RSS: the process prints its `VmHWM` at exit; run one configuration a process:
//! `cargo bench --bench step -- step/prefix`.
//!
//! Threads as `ropo train` sets them ([`ropo::process::single_threaded_elementwise`]: candle's
//! spinning element-wise pool off, allocator tuned by [`ropo::process::keep_freed_memory`]);
//! `STEP_CANDLE_POOL=1` keeps candle's default pool, `STEP_GLIBC_MALLOC=1` glibc's default
//! tuning (the states before), to compare in alternated processes (read once per process).
//! The steps run on a thread of the compute pool, as `ropo train`'s
//! ([`ropo::process::on_compute_pool`]); `STEP_OUTSIDE_POOL=1` runs them on the main thread.

mod common;

use std::time::Duration;

use candle_core::{Device, Tensor};
use criterion::{Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ropo::adapter::ropo::{self as ropo_adapter, RopoConfig};
use ropo::logps::{completion_logps, completion_logps_from_hidden, completion_logps_shared_prompt};
use ropo::loss::{preference_loss, LossParams, LossType, PairLogps};
use ropo::model::config::ModelConfig;
use ropo::model::linear::set_fast_frozen_matmul;
use ropo::model::llama::Model;
use ropo::model::ops::set_fused_layer_ops;
use ropo::model::prefix::SharedPromptBatch;

/// (prompt, chosen, rejected) lengths of the two pairs.
const PAIRS: [(usize, usize, usize); 2] = [(150, 100, 60), (140, 90, 110)];

struct Batch {
    ids: Tensor,
    am: Tensor,
    cm: Tensor,
    shared: SharedPromptBatch,
    real_tokens: usize,
    completion_tokens: usize,
}

/// `[chosen_0, chosen_1, rejected_0, rejected_1]`, right padded.
fn batch(rng: &mut ChaCha8Rng, v: u32, dev: &Device) -> Batch {
    let prompts: Vec<Vec<u32>> = PAIRS.iter().map(|&(p, _, _)| (0..p).map(|_| rng.random_range(3..v)).collect()).collect();
    let rows: Vec<(usize, usize)> = (0..2).map(|b| (b, PAIRS[b].1)).chain((0..2).map(|b| (b, PAIRS[b].2))).collect();
    let t = rows.iter().map(|&(b, c)| PAIRS[b].0 + c).max().unwrap();
    let (mut ids, mut am, mut cm) = (vec![], vec![], vec![]);
    let (mut real, mut comp) = (0, 0);
    for &(b, c) in &rows {
        let p = PAIRS[b].0;
        for i in 0..t {
            let is_real = i < p + c;
            ids.push(if i < p { prompts[b][i] } else if is_real { rng.random_range(3..v) } else { 0 });
            am.push(is_real as u32);
            cm.push(if i >= p && is_real { 1f32 } else { 0.0 });
        }
        real += p + c;
        comp += c;
    }
    let ids = Tensor::from_vec(ids, (4, t), dev).unwrap();
    let am = Tensor::from_vec(am, (4, t), dev).unwrap();
    let cm = Tensor::from_vec(cm, (4, t), dev).unwrap();
    let shared = SharedPromptBatch::from_concatenated(&ids, &am, &cm).unwrap();
    Batch { ids, am, cm, shared, real_tokens: real, completion_tokens: comp }
}

#[derive(Clone, Copy)]
enum Path {
    Plain,
    Frozen,
    LmHead,
    Prefix,
    Fused,
    Bf16,
}

/// Policy log-probs (4,), DPO loss, backward; returns the loss.
fn step(model: &Model, b: &Batch, path: Path, reference: &(Tensor, Tensor)) -> f32 {
    let logps = match path {
        Path::Plain | Path::Frozen => completion_logps(&model.forward(&b.ids, Some(&b.am), true).unwrap(), &b.ids, &b.cm).unwrap(),
        Path::LmHead => {
            let h = model.forward_hidden(&b.ids, Some(&b.am), true).unwrap();
            completion_logps_from_hidden(model, &h, &b.ids, &b.cm, true).unwrap()
        }
        Path::Prefix | Path::Fused | Path::Bf16 => completion_logps_shared_prompt(model, &b.shared, true).unwrap(),
    };
    let n_tok = b.cm.sum(1).unwrap();
    let lp = PairLogps {
        policy_chosen: logps.narrow(0, 0, 2).unwrap(),
        policy_rejected: logps.narrow(0, 2, 2).unwrap(),
        reference_chosen: reference.0.clone(),
        reference_rejected: reference.1.clone(),
        chosen_tokens: n_tok.narrow(0, 0, 2).unwrap(),
        rejected_tokens: n_tok.narrow(0, 2, 2).unwrap(),
    };
    let out = preference_loss(LossType::Sigmoid, &lp, &LossParams::default(), None).unwrap();
    let grads = out.loss.backward().unwrap();
    std::hint::black_box(grads);
    out.loss.to_scalar::<f32>().unwrap()
}

fn vm_hwm() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM")).map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" ")))
        .unwrap_or_else(|| "unknown".into())
}

/// Print the useful FLOPs of a step (see the module doc).
fn print_flops(cfg: &ModelConfig, b: &Batch) {
    let (d, i, l) = (cfg.hidden_size as f64, cfg.intermediate_size as f64, cfg.num_hidden_layers as f64);
    let (q, kv) = ((cfg.num_attention_heads * cfg.head_dim) as f64, (cfg.num_key_value_heads * cfg.head_dim) as f64);
    let p = l * (2.0 * d * q + 2.0 * d * kv + 3.0 * d * i);
    let flops = 4.0 * p * b.real_tokens as f64 + 4.0 * cfg.vocab_size as f64 * d * b.completion_tokens as f64;
    eprintln!(
        "step bench: {} real tokens ({} completion), non-embedding params {:.1}M, useful FLOPs/step {:.1} GFLOP",
        b.real_tokens,
        b.completion_tokens,
        p / 1e6,
        flops / 1e9
    );
}

/// The bench's model (random SmolLM2-135M weights, default RoPO adapter), batch and constant
/// reference log-probs, as both the criterion and the interleaved runs use them.
struct Setup {
    model: Model,
    /// The same model (same adapters) with bf16 projection weights, for `step/bf16` (built
    /// only when a bf16 configuration runs; the f32 weights are then dropped if no f32
    /// configuration runs, so that a process's peak RSS is its configuration's own).
    model_bf16: Option<Model>,
    b: Batch,
    reference: (Tensor, Tensor),
}

fn setup(f32_paths: bool, bf16_paths: bool) -> Setup {
    let cfg = common::smollm2_135m();
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut model = common::random_model(&cfg, &mut rng);
    let set = ropo_adapter::inject(&mut model, &RopoConfig::default(), "bench").unwrap();
    let model_bf16 = bf16_paths.then(|| {
        let mut m = model.clone();
        m.narrow_projections_to_bf16().unwrap();
        m
    });
    if !f32_paths {
        // keep only the embedding (shared by both) and the bf16 projections
        for l in model.linears_mut() {
            l.weight = Tensor::zeros((1, 1), candle_core::DType::F32, &dev).unwrap();
        }
    }
    let b = batch(&mut rng, cfg.vocab_size as u32, &dev);
    let reference = (Tensor::new(&[-200f32, -180.0], &dev).unwrap(), Tensor::new(&[-150f32, -220.0], &dev).unwrap());
    eprintln!("step bench: {} trainable", set.report.trainable);
    print_flops(&cfg, &b);
    Setup { model, model_bf16, b, reference }
}

/// The configurations, by bench id.
const PATHS: [(&str, Path); 6] =
    [("plain", Path::Plain), ("frozen", Path::Frozen), ("lmhead", Path::LmHead), ("prefix", Path::Prefix), ("fused", Path::Fused), ("bf16", Path::Bf16)];

/// Sets the process-wide switches of `path`.
fn switch(path: Path) {
    set_fast_frozen_matmul(!matches!(path, Path::Plain));
    set_fused_layer_ops(matches!(path, Path::Fused | Path::Bf16));
}

fn bench_step(c: &mut Criterion) {
    let Setup { model, model_bf16, b, reference } = setup(true, true);
    let model_bf16 = model_bf16.expect("built");
    let mut g = c.benchmark_group("step");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(30));
    g.throughput(Throughput::Elements(b.real_tokens as u64));
    for (name, path) in PATHS {
        g.bench_function(name, |bch| {
            switch(path);
            let m = if matches!(path, Path::Bf16) { &model_bf16 } else { &model };
            bch.iter(|| step(m, &b, path, &reference))
        });
    }
    g.finish();
    switch(Path::Fused);
}

/// `STEP_AB=lmhead,prefix` (names as in the bench ids, `STEP_AB_ROUNDS` rounds, default 2):
/// instead of criterion, run the named configurations interleaved in one process (A B A B ...)
/// and print each step's wall time, so that a noisy shared machine's load drifts affect both
/// alike.
fn interleaved(names: &str) {
    let rounds: usize = std::env::var("STEP_AB_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let paths: Vec<(&str, Path)> = names
        .split(',')
        .map(|n| *PATHS.iter().find(|(id, _)| *id == n).unwrap_or_else(|| panic!("STEP_AB: unknown configuration {n}")))
        .collect();
    let bf16 = paths.iter().any(|(_, p)| matches!(p, Path::Bf16));
    let f32 = paths.iter().any(|(_, p)| !matches!(p, Path::Bf16));
    let Setup { model, model_bf16, b, reference } = setup(f32, bf16);
    for round in 0..rounds {
        for &(name, path) in &paths {
            switch(path);
            let t0 = std::time::Instant::now();
            let m = if matches!(path, Path::Bf16) { model_bf16.as_ref().expect("built") } else { &model };
            let loss = step(m, &b, path, &reference);
            let s = t0.elapsed().as_secs_f64();
            eprintln!("AB round {round} {name}: {s:.2} s, {:.1} tok/s (loss {loss:.5})", b.real_tokens as f64 / s);
        }
    }
}

fn main() {
    // threads as `ropo train` sets them (`process::configure_threads`: RAYON_NUM_THREADS, so that
    // candle does not re-read /proc/cpuinfo at every matmul, and candle's element-wise barrier
    // pool off); STEP_CANDLE_POOL=1 keeps candle's default pool size (the state before), for A/B
    if std::env::var_os("STEP_CANDLE_POOL").is_some() {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    }
    if std::env::var_os("STEP_GLIBC_MALLOC").is_some() {
        // glibc's default (dynamic) allocator tuning, the state before `process::keep_freed_memory`
        ropo::process::single_threaded_elementwise();
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    } else {
        eprintln!("threads: {}", ropo::process::configure_threads(0));
    }
    // on a thread of the compute pool, as `ropo train` runs (process::on_compute_pool);
    // STEP_OUTSIDE_POOL=1 runs on the main thread (the state before), for A/B
    let run = || match std::env::var("STEP_AB") {
        Ok(names) => interleaved(&names),
        Err(_) => {
            let mut c = Criterion::default().configure_from_args();
            bench_step(&mut c);
            c.final_summary();
        }
    };
    if std::env::var_os("STEP_OUTSIDE_POOL").is_some() {
        run()
    } else {
        ropo::process::on_compute_pool(ropo::process::COMPUTE_STACK_BYTES, run).expect("compute threads")
    }
    eprintln!("peak RSS (VmHWM): {}", vm_hwm());
}
