//! The whole model with the frozen-linear op equals the plain-matmul model: completion log-probs
//! and every adapter gradient (f64 tiny model, RoPO on q,k,v,o,gate,up,down; 1e-12 relative).
//!
//! Its own test binary: it flips the process-wide `set_fast_frozen_matmul` switch, which would
//! race with other tests running in parallel threads of the same binary.
//! Tolerance: both paths run the same gemm kernel; only the backward's operand strides (and so
//! the summation order) may differ: f64 rounding, ~1e-15 relative.

mod common;

use candle_core::{Device, Tensor};
use common::tiny::{model_with_perturbed_ropo, tiny_config};
use ropo::logps::completion_logps;
use ropo::model::config::Arch;
use ropo::model::linear::{fast_frozen_matmul_enabled, set_fast_frozen_matmul};

#[test]
fn model_with_frozen_op_equals_plain_matmul_values_and_gradients() {
    let cfg = tiny_config(Arch::Qwen2, 29, 16, false);
    let dev = Device::Cpu;
    let (model, set) = model_with_perturbed_ropo(&cfg, 11, 1);
    let ids = Tensor::new(&[[3u32, 7, 1, 20, 4, 0], [9, 9, 2, 28, 5, 6]], &dev).unwrap();
    let am = Tensor::new(&[[1u32, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], &dev).unwrap();
    let cm = Tensor::new(&[[0f64, 0., 1., 1., 1., 0.], [0., 0., 0., 1., 1., 1.]], &dev).unwrap();
    let c = Tensor::new(&[0.8f64, -1.7], &dev).unwrap();
    let run = |fast: bool| {
        set_fast_frozen_matmul(fast);
        let lp = completion_logps(&model.forward(&ids, Some(&am), true).unwrap(), &ids, &cm).unwrap();
        let g = (&lp * &c).unwrap().sum_all().unwrap().backward().unwrap();
        (lp, g)
    };
    assert!(fast_frozen_matmul_enabled(), "the fast path is the default");
    let (lf, gf) = run(true);
    let (lp, gp) = run(false);
    set_fast_frozen_matmul(true);
    let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
    assert!(diff(&lf, &lp) < 1e-12, "{lf} vs {lp}");
    let vars = set.vars();
    assert_eq!(vars.len(), 2 * 7 * 3);
    for (name, v) in &vars {
        let a = gf.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient with the frozen op"));
        let b = gp.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient with the plain matmul"));
        let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
        assert!(scale > 1e-8, "{name}: zero gradient");
        assert!(diff(a, b) < 1e-12 * scale.max(1.0), "{name}: {} (scale {scale})", diff(a, b));
    }
}
