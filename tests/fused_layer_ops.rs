//! The decoder with its fused layer ops (SwiGLU, the attention heads' layout + RoPE ops, no-op
//! reshapes out of the graph, no gradient for constant norm weights) equals the composed candle
//! path: completion log-probs and every adapter gradient, through the plain concatenated forward
//! and the shared-prompt forward (f64 tiny model, RoPO on every projection; 1e-12 relative);
//! for Llama and for Qwen3, whose per-head q/k RMSNorm takes the custom op (`ops::rms_norm`)
//! fused and its composed twin (`ops::rms_norm_composed`) otherwise, and for Phi-3 (fused
//! `qkv_proj` and `gate_up_proj`, split on both paths).
//!
//! Its own test binary: it flips the process-wide `set_fused_layer_ops` switch, which would race
//! with other tests running in parallel threads of the same binary.
//! Tolerance: the fused ops compute the same products in the same order (RoPE then the query
//! scale; `g σ(g) u`), so only f64 rounding in different places remains, ~1e-15 relative.

mod common;

use candle_core::{Device, Tensor};
use common::tiny::{model_with_perturbed_ropo, tiny_config};
use ropo::logps::{completion_logps, completion_logps_shared_prompt};
use ropo::model::config::Arch;
use ropo::model::ops::{fused_layer_ops, set_fused_layer_ops};
use ropo::model::prefix::SharedPromptBatch;

/// One test function for every architecture: the switch is process-wide (see the module doc).
#[test]
fn fused_layer_ops_equal_the_composed_path_values_and_gradients() {
    let mut qwen3 = tiny_config(Arch::Qwen3, 31, 16, true);
    qwen3.head_dim = 6; // the per-head q/k RMSNorm (fused op vs rms_norm_composed), hd != D / H
    // Phi-3: the fused qkv_proj / gate_up_proj split by narrow on both paths
    for cfg in [tiny_config(Arch::Llama, 31, 16, true), qwen3, tiny_config(Arch::Phi3, 31, 16, true)] {
        check_arch(&cfg);
    }
}

fn check_arch(cfg: &ropo::model::config::ModelConfig) {
    let cfg = cfg.clone();
    let dev = Device::Cpu;
    let (model, set) = model_with_perturbed_ropo(&cfg, 21, 4);
    // two pairs: [chosen_0, chosen_1, rejected_0, rejected_1], prompts of 2 and 3 tokens
    let ids = Tensor::new(&[[3u32, 7, 1, 20, 4, 0], [9, 9, 2, 28, 5, 6], [3, 7, 11, 12, 0, 0], [9, 9, 2, 17, 0, 0]], &dev).unwrap();
    let am = Tensor::new(&[[1u32, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]], &dev).unwrap();
    let cm = Tensor::new(&[[0f64, 0., 1., 1., 1., 0.], [0., 0., 0., 1., 1., 1.], [0., 0., 1., 1., 0., 0.], [0., 0., 0., 1., 0., 0.]], &dev).unwrap();
    let shared = SharedPromptBatch::from_concatenated(&ids, &am, &cm).unwrap();
    let c = Tensor::new(&[0.8f64, -1.7, 0.3, 1.1], &dev).unwrap();
    let run = |fused: bool, share: bool| {
        set_fused_layer_ops(fused);
        let lp = if share {
            completion_logps_shared_prompt(&model, &shared, true).unwrap()
        } else {
            completion_logps(&model.forward(&ids, Some(&am), true).unwrap(), &ids, &cm).unwrap()
        };
        let g = (&lp * &c).unwrap().sum_all().unwrap().backward().unwrap();
        (lp, g)
    };
    assert!(fused_layer_ops(), "the fused ops are the default");
    let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
    for share in [false, true] {
        let (lf, gf) = run(true, share);
        let (lp, gp) = run(false, share);
        set_fused_layer_ops(true);
        assert!(diff(&lf, &lp) < 1e-12, "share {share}: {lf} vs {lp}");
        let vars = set.vars();
        let per_layer = if cfg.arch == Arch::Phi3 { 4 } else { 7 };
        assert_eq!(vars.len(), 2 * per_layer * 3);
        for (name, v) in &vars {
            let a = gf.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient with the fused ops"));
            let b = gp.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient on the composed path"));
            let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
            assert!(scale > 1e-8, "{name}: zero gradient");
            assert!(diff(a, b) < 1e-12 * scale.max(1.0), "share {share}, {name}: {} (scale {scale})", diff(a, b));
        }
    }
}
