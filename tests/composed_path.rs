//! The path of a device without ropo's CPU kernels (a CUDA GPU), run on the CPU: with
//! `ropo::device::set_cpu_kernels(false)` every custom op and CPU-only fast path takes its
//! composed twin of candle's differentiable ops, as `--device cuda` does. On that path:
//! - the tiny f64 model's completion log-probs and every RoPO gradient equal the CPU kernels'
//!   (1e-10 relative), through both the shared-prompt path of training and the concatenated
//!   one, and the gradients match central finite differences;
//! - SmolLM2-135M's next-token log-probs match transformers' golden values (2e-3, the
//!   tolerance of tests/forward_parity.rs), and step 0 of training (one orca pair, 128 tokens)
//!   gives the loss ln 2 with a gradient for every adapter tensor, also with bf16 frozen
//!   projections.
//!
//! Its own test binary: the switch is process-wide; a mutex keeps the tests of this binary
//! from flipping it under each other.

mod common;

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use common::tiny::{model_with_perturbed_ropo, tiny_config};
use ropo::data::batch::{collate, pad_id};
use ropo::data::tokenize::{PairTokenizer, TokenizeOptions, TokenizedPair};
use ropo::device::set_cpu_kernels;
use ropo::model::config::Arch;

static SWITCH: Mutex<()> = Mutex::new(());

/// Runs `f` with the CPU kernels `on`, then turns them back on.
fn with_kernels<T>(on: bool, f: impl FnOnce() -> T) -> T {
    set_cpu_kernels(on);
    let out = f();
    set_cpu_kernels(true);
    out
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn tiny_model_composed_path_equals_the_cpu_kernels_and_finite_differences() {
    let _g = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    for arch in [Arch::Llama, Arch::Qwen2] {
        let cfg = tiny_config(arch, 29, 16, false);
        let (model, set) = model_with_perturbed_ropo(&cfg, 11, 1);
        // two pairs sharing their prompts (the shared-prompt path of training) of unequal length
        let pairs = [
            TokenizedPair { line: 1, prompt_ids: vec![3, 7, 1], chosen_ids: vec![20, 4], rejected_ids: vec![5, 6, 9] },
            TokenizedPair { line: 2, prompt_ids: vec![9, 2], chosen_ids: vec![28, 5, 6, 1], rejected_ids: vec![8] },
        ];
        let refs: Vec<_> = pairs.iter().collect();
        let batch = collate(&refs, 0, &Device::Cpu).unwrap();
        let c = Tensor::new(&[0.8f64, -1.7, 0.3, 1.1], &Device::Cpu).unwrap();
        for share_prompt in [true, false] {
            let run = |on: bool| {
                with_kernels(on, || {
                    let lp = ropo::logps::batch_logps(&model, &batch, true, share_prompt).unwrap().to_dtype(DType::F64).unwrap();
                    let g = (&lp * &c).unwrap().sum_all().unwrap().backward().unwrap();
                    (lp, g)
                })
            };
            let (lk, gk) = run(true);
            let (lc, gc) = run(false);
            let scale = lk.abs().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
            assert!(max_abs(&lk, &lc) < 1e-10 * scale.max(1.0), "{arch:?} share_prompt {share_prompt}: {lk} vs {lc}");
            for (name, v) in set.vars() {
                let a = gk.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient with the CPU kernels"));
                let b = gc.get(v.as_tensor()).unwrap_or_else(|| panic!("{arch:?} {name}: no gradient on the composed path"));
                let s = a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
                assert!(s > 1e-8, "{name}: zero gradient");
                assert!(max_abs(a, b) < 1e-10 * s.max(1.0), "{arch:?} share_prompt {share_prompt} {name}: {} (scale {s})", max_abs(a, b));
            }
        }
        // and against finite differences, on the composed path (a few entries of each tensor)
        with_kernels(false, || {
            let loss = || {
                let lp = ropo::logps::batch_logps(&model, &batch, true, true).unwrap().to_dtype(DType::F64).unwrap();
                (lp * &c).unwrap().sum_all().unwrap()
            };
            let grads = loss().backward().unwrap();
            for (name, v) in set.vars() {
                let g = grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
                for i in [0, g.len() / 2, g.len() - 1] {
                    let fd = common::gradients::central_difference(&v, i, 1e-6, &|| loss().to_scalar::<f64>().unwrap());
                    assert!((g[i] - fd).abs() < 1e-6 * fd.abs().max(1.0), "{arch:?} {name}[{i}]: backward {} vs finite differences {fd}", g[i]);
                }
            }
        });
    }
}

#[test]
fn smollm2_composed_path_golden_logprobs_and_step0() {
    let _g = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let gguf = common::smollm2_gguf();
    let golden = common::golden("smollm2_golden.json");
    with_kernels(false, || {
        // next-token log-probs against transformers
        let lm = ropo::model::load(gguf.to_str().unwrap(), &Default::default()).unwrap();
        for (name, case) in golden["logprobs"].as_object().unwrap() {
            let ids: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            let want: Vec<f64> = case["next_token_logprob"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let logits = lm.model.forward(&input, None, false).unwrap().squeeze(0).unwrap();
            let rows: Vec<Vec<f32>> = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1).unwrap().to_vec2().unwrap();
            for t in 0..ids.len() - 1 {
                let got = rows[t][ids[t + 1] as usize] as f64;
                assert!((got - want[t]).abs() < 2e-3, "{name} position {t}: {got} vs golden {}", want[t]);
            }
        }
    });
    // step 0 on the golden orca rows, f32 and bf16 frozen projections
    for dtype in [DType::F32, DType::BF16] {
        with_kernels(false, || {
            let opts = ropo::model::LoadOptions { dtype, ..Default::default() };
            let mut m = ropo::model::load(gguf.to_str().unwrap(), &opts).unwrap();
            let mut cfg = ropo::config::RunConfig::default();
            cfg.model.path_or_id = gguf.to_str().unwrap().into();
            let set = ropo::adapter::AnyAdapterSet::inject(&mut m.model, &cfg.adapter, "smollm2").unwrap();
            let path = common::shared("data/orca_dpo_pairs/validation.jsonl");
            let data = ropo::data::load(&path, &Default::default()).unwrap();
            // one pair, 128 tokens: the composed graph keeps every intermediate (~3 GB here)
            let pt = PairTokenizer::new(&m.tokenizer, None, TokenizeOptions { max_length: Some(128), max_prompt_length: None }).unwrap();
            let pairs = pt.tokenize_all(&data.examples[..1], &path, &mut Default::default()).unwrap();
            assert_eq!(pairs.len(), 1);
            let refs: Vec<_> = pairs.iter().collect();
            let batch = collate(&refs, pad_id(&m.tokenizer).unwrap(), m.model.device()).unwrap();
            let reference = ropo::logps::batch_logps_detached(&m.model, &batch, false, true).unwrap();
            let (out, grads) = ropo::train::micro_batch(&m.model, &batch, &reference, &cfg.training).unwrap();
            let loss = out.loss.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
            assert!((loss - std::f64::consts::LN_2).abs() < 1e-5, "{dtype:?}: step-0 loss {loss}, want ln 2");
            ropo::optim::Grads::from_store(&set.vars(), &grads).expect("every trainable tensor has a gradient");
        });
    }
}
