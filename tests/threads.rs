//! `process::single_threaded_elementwise` (candle's element-wise barrier pool off) and
//! `process::keep_freed_memory` (glibc allocator tuning), both set by `ropo train`, change no
//! result: a training micro-batch (prefix-shared path, f32) run in child processes with
//! `CANDLE_NUM_THREADS=1` and `2` (candle's pooled element-wise ops), with and without the
//! allocator tuning, gives bit-identical reference log-probs, loss and gradients of every
//! trainable tensor. The setting is read once per process, hence the child processes (this test
//! binary re-run on one test). The model is big enough (activations of 64K+ elements) for candle
//! to use its pool.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use ropo::config::RunConfig;
use ropo::data::batch::collate;
use ropo::data::tokenize::TokenizedPair;
use ropo::model::config::{Arch, ModelConfig};

const CHILD: &str = "ROPO_THREADS_TEST_CHILD";

/// The micro-batch's numbers as hex bit patterns, one a line.
fn micro_batch_bits() -> Vec<String> {
    let cfg = ModelConfig {
        arch: Arch::Llama, vocab_size: 512, hidden_size: 256, intermediate_size: 512, num_hidden_layers: 2,
        num_attention_heads: 4, num_key_value_heads: 2, head_dim: 64, rms_norm_eps: 1e-6, rope_theta: 10_000.0,
        rope_scaling: None, max_position_embeddings: 512, tie_word_embeddings: true, attention_bias: false,
        bos_token_id: None, eos_token_ids: vec![], extras: Default::default(),
    };
    let dev = Device::Cpu;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let w = ropo::model::llama::random_weights(&cfg, 0.05, &mut rng, DType::F32, &dev).unwrap();
    let mut model = ropo::model::llama::Model::load(candle_nn::VarBuilder::from_tensors(w.into_iter().collect(), DType::F32, &dev), &cfg).unwrap();
    let run = RunConfig::default();
    let set = ropo::adapter::AnyAdapterSet::inject(&mut model, &run.adapter, "threads").unwrap();
    let params = set.vars();
    for (_, v) in &params {
        let vals: Vec<f32> = (0..v.elem_count()).map(|_| rng.random_range(-0.3f32..0.3)).collect();
        v.set(&(v.as_tensor() + Tensor::from_vec(vals, v.dims(), &dev).unwrap()).unwrap()).unwrap();
    }
    let mut ids = |n: usize| (0..n).map(|_| rng.random_range(3u32..512)).collect::<Vec<_>>();
    let pairs = vec![
        TokenizedPair { line: 1, prompt_ids: ids(120), chosen_ids: ids(70), rejected_ids: ids(40) },
        TokenizedPair { line: 2, prompt_ids: ids(100), chosen_ids: ids(50), rejected_ids: ids(80) },
    ];
    let refs: Vec<_> = pairs.iter().collect();
    let batch = collate(&refs, 0, &dev).unwrap();
    let reference = ropo::logps::batch_logps_detached(&model, &batch, false, true).unwrap();
    let (out, grads) = ropo::train::micro_batch(&model, &batch, &reference, &run.training).unwrap();
    let grads = ropo::optim::Grads::from_store(&params, &grads).unwrap();
    let mut lines: Vec<String> = reference.to_vec1::<f32>().unwrap().iter().map(|x| format!("ref {:08x}", x.to_bits())).collect();
    lines.push(format!("loss {:08x}", out.loss.to_scalar::<f32>().unwrap().to_bits()));
    for ((name, _), g) in params.iter().zip(&grads.0) {
        let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert!(g.iter().any(|x| *x != 0.0), "{name}: all-zero gradient");
        lines.extend(g.iter().enumerate().map(|(i, x)| format!("{name}[{i}] {:08x}", x.to_bits())));
    }
    lines
}

#[test]
fn micro_batch_bits_do_not_depend_on_candles_elementwise_pool() {
    if let Some(mode) = std::env::var_os(CHILD) {
        if mode == "tuned" {
            ropo::process::keep_freed_memory();
        }
        for l in micro_batch_bits() {
            println!("BITS {l}");
        }
        return;
    }
    let run = |candle_threads: &str, mode: &str| -> Vec<String> {
        let o = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "micro_batch_bits_do_not_depend_on_candles_elementwise_pool", "--nocapture", "--test-threads", "1"])
            .env(CHILD, mode)
            .env("CANDLE_NUM_THREADS", candle_threads)
            .env("RAYON_NUM_THREADS", "2")
            .output()
            .unwrap();
        assert!(o.status.success(), "child with CANDLE_NUM_THREADS={candle_threads}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).lines().filter_map(|l| l.strip_prefix("BITS ").map(String::from)).collect()
    };
    let one = run("1", "tuned");
    assert!(one.len() > 1000, "child printed {} lines", one.len());
    for (threads, mode) in [("2", "tuned"), ("1", "default"), ("2", "default")] {
        let other = run(threads, mode);
        assert_eq!(one.len(), other.len());
        for (a, b) in one.iter().zip(&other) {
            assert_eq!(a, b, "CANDLE_NUM_THREADS=1 + tuned allocator vs CANDLE_NUM_THREADS={threads} + {mode} allocator");
        }
    }
}
