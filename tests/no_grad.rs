//! The inference forwards run without gradient tracking: a probing adapter records
//! `model::grad::is_enabled()` at every forward. `logps::batch_logps_detached` (evaluation, the
//! reference pass and the precomputed cache) must see it off, the training forward
//! (`logps::batch_logps`) on. Without this an evaluation batch holds a whole training
//! step's activations (measured on configs/orca.toml before the fix: 0.8 -> 8.2 GiB at the
//! step-0 evaluation).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::tiny::{small_model, tiny_config};
use ropo::data::batch::collate;
use ropo::data::tokenize::TokenizedPair;
use ropo::logps::{batch_logps, batch_logps_detached};
use ropo::model::config::Arch;
use ropo::model::grad::is_enabled;
use ropo::model::linear::{Adapter, Linear};

/// The base projection, counting forwards with tracking on and off.
#[derive(Debug, Default)]
struct Probe {
    tracked: AtomicUsize,
    untracked: AtomicUsize,
}

impl Adapter for Probe {
    fn forward(&self, base: &Linear, x: &Tensor) -> Result<Tensor> {
        let c = if is_enabled() { &self.tracked } else { &self.untracked };
        c.fetch_add(1, Ordering::Relaxed);
        base.forward_base(x)
    }
    fn merged(&self, base: &Linear) -> Result<(Tensor, Option<Tensor>)> {
        Ok((base.weight.clone(), base.bias.clone()))
    }
    fn trainable(&self) -> Vec<(String, Var)> {
        vec![]
    }
}

#[test]
fn inference_forwards_run_without_gradient_tracking() {
    let cfg = tiny_config(Arch::Llama, 40, 16, true);
    let mut model = small_model(&cfg, 3, DType::F32);
    let probe = Arc::new(Probe::default());
    for l in model.linears_mut() {
        l.adapter = Some(probe.clone());
    }
    let pairs = [
        TokenizedPair { line: 1, prompt_ids: vec![3, 4, 5], chosen_ids: vec![6, 7], rejected_ids: vec![8] },
        TokenizedPair { line: 2, prompt_ids: vec![9, 10], chosen_ids: vec![11], rejected_ids: vec![12, 13, 14] },
    ];
    let refs: Vec<&TokenizedPair> = pairs.iter().collect();
    let batch = collate(&refs, 0, &Device::Cpu).unwrap();
    let counts = || (probe.tracked.load(Ordering::Relaxed), probe.untracked.load(Ordering::Relaxed));
    for share in [false, true] {
        let before = counts();
        batch_logps_detached(&model, &batch, true, share).unwrap();
        let after = counts();
        assert_eq!(after.0, before.0, "share {share}: batch_logps_detached tracked a forward");
        assert!(after.1 > before.1, "share {share}: the probe saw no forward");
    }
    let before = counts();
    batch_logps_detached(&model, &batch, true, false).unwrap();
    assert_eq!(counts().0, before.0, "batch_logps_detached (the plain path) tracked a forward");
    // the training forward keeps tracking on
    let before = counts();
    batch_logps(&model, &batch, true, true).unwrap();
    assert!(counts().0 > before.0, "the training forward must track");
    assert!(is_enabled());
}
