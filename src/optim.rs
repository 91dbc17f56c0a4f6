//! AdamW with saveable moments, the learning-rate schedule, gradient clipping by global norm,
//! and gradient accumulation.
//!
//! candle's own `AdamW` keeps its moments private (they cannot be checkpointed), and its
//! `VarMap` is a `HashMap` (the order changes per process); here the parameters are a
//! `Vec<(String, Var)>` in a fixed order, gradients are a [`Grads`] aligned with it, and the
//! optimiser state is saved to and loaded from safetensors.

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// AdamW hyperparameters (Loshchilov & Hutter 2019, arXiv 1711.05101; PyTorch's `torch.optim.AdamW`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// β₁, the decay of the first moment.
    pub beta1: f64,
    /// β₂, the decay of the second moment.
    pub beta2: f64,
    /// ε, added to `sqrt(v_hat)`.
    pub eps: f64,
    /// λ, decoupled weight decay (multiplied by the learning rate, as PyTorch does).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// HF `TrainingArguments` defaults (`adam_beta1 0.9`, `adam_beta2 0.999`, `adam_epsilon 1e-8`,
    /// `weight_decay 0.0`).
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// Gradients aligned with a parameter list: `grads[i]` belongs to `params[i]`, same shape.
#[derive(Debug, Clone)]
pub struct Grads(pub Vec<Tensor>);

impl Grads {
    /// Pick each parameter's gradient out of a `GradStore`.
    ///
    /// Errors: a parameter without a gradient is named (`no gradient for
    /// model.layers.0.self_attn.q_proj.ropo_u`): that is a silently frozen tensor (a fused op
    /// without backward on its path, or a bypassed adapter), never something to skip.
    pub fn from_store(params: &[(String, Var)], store: &GradStore) -> Result<Self> {
        let mut out = Vec::with_capacity(params.len());
        for (name, var) in params {
            let g = store.get(var.as_tensor()).ok_or_else(|| Error::Msg(format!("no gradient for {name}")))?;
            out.push(g.detach());
        }
        Ok(Grads(out))
    }

    /// `self += s · other`, elementwise.
    pub fn add_scaled(&mut self, other: &Grads, s: f64) -> Result<()> {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a = (&*a + b.affine(s, 0.0)?)?;
        }
        Ok(())
    }

    /// `s · self`.
    pub fn scaled(&self, s: f64) -> Result<Grads> {
        Ok(Grads(self.0.iter().map(|g| g.affine(s, 0.0)).collect::<candle_core::Result<_>>()?))
    }

    /// The global L2 norm `sqrt(Σ_i ||g_i||²)`, accumulated in f64 in parameter order.
    pub fn global_norm(&self) -> Result<f64> {
        let mut total = 0f64;
        for g in &self.0 {
            total += g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
        }
        Ok(total.sqrt())
    }

    /// Clip by global norm, as PyTorch's `clip_grad_norm_`: with `n` the global norm,
    /// `g ← g · min(1, max_norm / (n + 1e-6))`. Returns `n`, the norm before clipping (what
    /// TRL logs as `grad_norm`). `max_norm <= 0` disables clipping (the norm is still returned).
    /// A non-finite norm is returned and nothing is scaled: the caller stops training.
    pub fn clip_global_norm(&mut self, max_norm: f64) -> Result<f64> {
        let norm = self.global_norm()?;
        if !norm.is_finite() || max_norm <= 0.0 {
            return Ok(norm);
        }
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            *self = self.scaled(coef)?;
        }
        Ok(norm)
    }
}

/// Sums gradients over the micro-batches of one optimiser step, each scaled by `1/micro_batches`
/// (TRL divides each micro-batch loss by `gradient_accumulation_steps`; same result).
#[derive(Debug)]
pub struct GradAccumulator {
    scale: f64,
    sum: Option<Grads>,
    count: usize,
}

impl GradAccumulator {
    /// An empty accumulator for `micro_batches` (>= 1) micro-batches per step.
    pub fn new(micro_batches: usize) -> Self {
        Self { scale: 1.0 / micro_batches.max(1) as f64, sum: None, count: 0 }
    }

    /// Add one micro-batch's gradients (see [`Grads::from_store`] for the errors).
    pub fn add(&mut self, params: &[(String, Var)], store: &GradStore) -> Result<()> {
        self.add_grads(Grads::from_store(params, store)?)
    }

    /// Add one micro-batch's gradients, aligned with the parameter list: the first is scaled
    /// (`s · g`), each later one added as `sum + s · g`, in the order of the calls (the order
    /// fixes the float result; data-parallel ranks call it in the same global order).
    pub fn add_grads(&mut self, g: Grads) -> Result<()> {
        match &mut self.sum {
            None => self.sum = Some(g.scaled(self.scale)?),
            Some(sum) => sum.add_scaled(&g, self.scale)?,
        }
        self.count += 1;
        Ok(())
    }

    /// Micro-batches added so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The accumulated gradients; the accumulator is empty afterwards.
    pub fn take(&mut self) -> Result<Grads> {
        self.count = 0;
        self.sum.take().ok_or_else(|| Error::Msg("no gradients accumulated".into()))
    }
}

/// AdamW over a fixed, ordered parameter list, with its state (moments and step) saveable.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<(String, Var)>,
    /// First moments `m`, aligned with `params`.
    exp_avg: Vec<Tensor>,
    /// Second moments `v`, aligned with `params`.
    exp_avg_sq: Vec<Tensor>,
    /// Number of updates done (the `t` of the bias corrections).
    step: u64,
    /// The hyperparameters.
    pub config: AdamWConfig,
}

impl AdamW {
    /// Zero moments for every parameter; errors on duplicate names.
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let mut names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::Msg(format!("parameter {} appears twice", w[0])));
        }
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let exp_avg = params.iter().map(|(_, v)| zeros(v)).collect::<candle_core::Result<_>>()?;
        let exp_avg_sq = params.iter().map(|(_, v)| zeros(v)).collect::<candle_core::Result<_>>()?;
        Ok(Self { params, exp_avg, exp_avg_sq, step: 0, config })
    }

    /// The parameters, in order.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Updates done so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One AdamW update with learning rate `lr` (PyTorch's algorithm, `amsgrad = False`):
    ///
    /// ```text
    /// t      = t + 1
    /// θ      = θ - lr·λ·θ                      (decoupled weight decay)
    /// m      = β₁ m + (1 - β₁) g
    /// v      = β₂ v + (1 - β₂) g²
    /// m_hat  = m / (1 - β₁ᵗ)
    /// v_hat  = v / (1 - β₂ᵗ)
    /// θ      = θ - lr · m_hat / (sqrt(v_hat) + ε)
    /// ```
    /// Errors: `grads` not aligned with the parameters (count or shape).
    pub fn step(&mut self, grads: &Grads, lr: f64) -> Result<()> {
        if grads.0.len() != self.params.len() {
            return Err(Error::Msg(format!("{} gradients for {} parameters", grads.0.len(), self.params.len())));
        }
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        for (i, (name, var)) in self.params.iter().enumerate() {
            let g = &grads.0[i];
            if g.dims() != var.dims() {
                return Err(Error::Shape { name: format!("gradient of {name}"), expected: var.dims().to_vec(), got: g.dims().to_vec() });
            }
            let g = g.to_dtype(var.dtype())?;
            let m = (self.exp_avg[i].affine(c.beta1, 0.0)? + g.affine(1.0 - c.beta1, 0.0)?)?;
            let v = (self.exp_avg_sq[i].affine(c.beta2, 0.0)? + g.sqr()?.affine(1.0 - c.beta2, 0.0)?)?;
            let m_hat = m.affine(1.0 / bias1, 0.0)?;
            let v_hat = v.affine(1.0 / bias2, 0.0)?;
            let update = (m_hat / v_hat.sqrt()?.affine(1.0, c.eps)?)?;
            let theta = var.as_tensor().detach().affine(1.0 - lr * c.weight_decay, 0.0)?;
            var.set(&(theta - update.affine(lr, 0.0)?)?)?;
            self.exp_avg[i] = m;
            self.exp_avg_sq[i] = v;
        }
        Ok(())
    }

    /// The state as named tensors: `{param}.exp_avg`, `{param}.exp_avg_sq` (PyTorch's names).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.push((format!("{name}.exp_avg"), self.exp_avg[i].clone()));
            out.push((format!("{name}.exp_avg_sq"), self.exp_avg_sq[i].clone()));
        }
        out
    }

    /// The state as safetensors bytes; the step is stored in the header metadata (`"step"`).
    pub fn state_bytes(&self) -> Result<Vec<u8>> {
        let tensors = self.state_tensors();
        // One metadata entry only: safetensors takes a HashMap, whose iteration order (and so
        // the header bytes) would differ between processes with two or more entries.
        let mut meta = HashMap::new();
        meta.insert("step".to_string(), self.step.to_string());
        crate::fsutil::safetensors_bytes(&tensors, Some(meta))
    }

    /// Write the state to `path` (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::fsutil::write_atomic(path, &self.state_bytes()?)?;
        Ok(())
    }

    /// Restore the state written by [`AdamW::save`]; every parameter must have both moments with
    /// its shape, and the file must hold nothing else (errors name the file and tensor).
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| Error::input(path, None, format!("reading optimiser state: {e}")))?;
        self.load_bytes(&bytes).map_err(|e| Error::input(path, None, e.to_string()))
    }

    /// [`AdamW::load`] from bytes.
    pub fn load_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| Error::Msg(format!("not a safetensors file: {e}")))?;
        let step = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("step"))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| Error::Msg("optimiser state has no \"step\" metadata".into()))?;
        let device = self.params.first().map(|(_, v)| v.device().clone()).unwrap_or(candle_core::Device::Cpu);
        let tensors = candle_core::safetensors::load_buffer(bytes, &device)?;
        if tensors.len() != 2 * self.params.len() {
            return Err(Error::Msg(format!("optimiser state holds {} tensors, expected {}", tensors.len(), 2 * self.params.len())));
        }
        let mut exp_avg = Vec::with_capacity(self.params.len());
        let mut exp_avg_sq = Vec::with_capacity(self.params.len());
        for (name, var) in &self.params {
            for (suffix, dst) in [("exp_avg", &mut exp_avg), ("exp_avg_sq", &mut exp_avg_sq)] {
                let key = format!("{name}.{suffix}");
                let t = tensors.get(&key).ok_or_else(|| Error::MissingTensor(key.clone()))?;
                if t.dims() != var.dims() || t.dtype() != var.dtype() {
                    return Err(Error::Shape { name: key, expected: var.dims().to_vec(), got: t.dims().to_vec() });
                }
                dst.push(t.clone());
            }
        }
        self.exp_avg = exp_avg;
        self.exp_avg_sq = exp_avg_sq;
        self.step = step;
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------
// Learning-rate schedule
// ------------------------------------------------------------------------------------------

/// The decay after warmup (HF `lr_scheduler_type` names; `constant` here keeps the warmup, i.e.
/// HF's `constant_with_warmup`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduler {
    /// Warmup, then the peak rate until the end.
    Constant,
    /// Warmup, then linear decay to 0 at `total_steps` (HF's default).
    #[default]
    Linear,
    /// Warmup, then half a cosine wave down to 0 at `total_steps`.
    Cosine,
}

/// A learning-rate schedule over `total_steps` optimiser steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// Peak learning rate.
    pub peak: f64,
    /// Steps of linear warmup from 0.
    pub warmup_steps: usize,
    /// Total optimiser steps of the run.
    pub total_steps: usize,
    /// The decay after warmup.
    pub kind: LrScheduler,
}

impl LrSchedule {
    /// The learning rate of update number `step` (0-based: the first update uses `lr_at(0)`),
    /// as HF `transformers` `get_{constant,linear,cosine}_schedule_with_warmup` computes it:
    ///
    /// 1) warmup: `step < warmup_steps` → `peak · step / warmup_steps` (so the first update of a
    ///    warmup has rate 0, as in HF);
    /// 2) past the end: `step >= total_steps` → 0 for linear and cosine;
    /// 3) in between, with `progress = (step - warmup) / (total - warmup)`:
    ///    constant `peak`; linear `peak · (1 - progress)`; cosine `peak · ½(1 + cos(π·progress))`.
    pub fn lr_at(&self, step: usize) -> f64 {
        // 1) linear warmup
        if step < self.warmup_steps {
            return self.peak * step as f64 / self.warmup_steps.max(1) as f64;
        }
        // 2) after the last step (linear and cosine reach 0)
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        // 3) in between, decay
        match self.kind {
            LrScheduler::Constant => self.peak,
            LrScheduler::Linear => self.peak * (1.0 - progress).max(0.0),
            LrScheduler::Cosine => self.peak * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        }
    }
}

/// Warmup steps from a ratio, as HF: `ceil(total_steps · ratio)`.
pub fn warmup_steps_from_ratio(total_steps: usize, ratio: f64) -> usize {
    (total_steps as f64 * ratio).ceil() as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(v: &[f32]) -> Var {
        Var::new(v, &Device::Cpu).unwrap()
    }

    // AdamW on f(θ) = ½ Σ θ², so g = θ. The expected sequence is the PyTorch AdamW algorithm
    // (https://pytorch.org/docs/stable/generated/torch.optim.AdamW.html) written out in f64,
    // which is what this script prints:
    //   p = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    //   opt = torch.optim.AdamW([p], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    //   for _ in range(5): opt.zero_grad(); (0.5 * (p ** 2).sum()).backward(); opt.step()
    // Step 1 by hand: m_hat = g, v_hat = g², update = g/(|g| + ε) = sign(g) (up to 1e-8), so
    // θ₁ = θ₀(1 - 0.1·0.01) - 0.1·sign(θ₀) = [0.899, -1.898, 0.3995].
    #[test]
    fn adamw_matches_pytorch_algorithm() {
        let theta0 = [1.0f64, -2.0, 0.5];
        let (lr, b1, b2, eps, wd) = (0.1, 0.9, 0.999, 1e-8, 0.01);
        let mut want = theta0.to_vec();
        let (mut m, mut v) = (vec![0.0; 3], vec![0.0; 3]);
        let mut seq = Vec::new();
        for t in 1..=5 {
            for i in 0..3 {
                let g = want[i];
                want[i] *= 1.0 - lr * wd;
                m[i] = b1 * m[i] + (1.0 - b1) * g;
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                let m_hat = m[i] / (1.0 - b1.powi(t));
                let v_hat = v[i] / (1.0 - b2.powi(t));
                want[i] -= lr * m_hat / (v_hat.sqrt() + eps);
            }
            seq.push(want.clone());
        }
        // the hand-computed first step
        for (a, b) in seq[0].iter().zip([0.899, -1.898, 0.3995]) {
            assert!((a - b).abs() < 1e-7, "{a} vs {b}");
        }
        let p = var(&[1.0, -2.0, 0.5]);
        let params = vec![("p".to_string(), p.clone())];
        let mut opt = AdamW::new(params.clone(), AdamWConfig { beta1: b1, beta2: b2, eps, weight_decay: wd }).unwrap();
        for want in &seq {
            let loss = (p.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
            let grads = Grads::from_store(&params, &loss.backward().unwrap()).unwrap();
            opt.step(&grads, lr).unwrap();
            let got = p.as_tensor().to_vec1::<f32>().unwrap();
            for (g, w) in got.iter().zip(want) {
                // f32 parameters: 1e-6 is a few ulps at |θ| ~ 1.
                assert!((*g as f64 - w).abs() < 1e-6, "got {got:?}, want {want:?}");
            }
        }
        assert_eq!(opt.step_count(), 5);
    }

    // Saving and loading the state continues the run bit-identically.
    #[test]
    fn adamw_state_round_trip_is_bit_identical() {
        let run = |split: Option<usize>| -> Vec<f32> {
            let p = var(&[0.3, -1.7, 2.2, 0.01]);
            let params = vec![("layer.ropo_u".to_string(), p.clone())];
            let cfg = AdamWConfig { weight_decay: 0.1, ..Default::default() };
            let mut opt = AdamW::new(params.clone(), cfg).unwrap();
            for step in 0..6 {
                if Some(step) == split {
                    let bytes = opt.state_bytes().unwrap();
                    let theta = p.as_tensor().copy().unwrap();
                    // a fresh optimiser and parameter, restored
                    let p2 = Var::from_tensor(&theta).unwrap();
                    p.set(p2.as_tensor()).unwrap();
                    let mut fresh = AdamW::new(params.clone(), cfg).unwrap();
                    fresh.load_bytes(&bytes).unwrap();
                    assert_eq!(fresh.step_count(), step as u64);
                    opt = fresh;
                }
                let loss = p.as_tensor().powf(3.0).unwrap().sum_all().unwrap();
                let grads = Grads::from_store(&params, &loss.backward().unwrap()).unwrap();
                opt.step(&grads, 0.05).unwrap();
            }
            p.as_tensor().to_vec1::<f32>().unwrap()
        };
        let straight = run(None);
        let resumed = run(Some(3));
        assert_eq!(straight.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), resumed.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    }

    #[test]
    fn adamw_load_rejects_mismatched_state() {
        let a = vec![("a".to_string(), var(&[1.0, 2.0]))];
        let opt = AdamW::new(a, AdamWConfig::default()).unwrap();
        let bytes = opt.state_bytes().unwrap();
        let mut other = AdamW::new(vec![("b".to_string(), var(&[1.0, 2.0]))], AdamWConfig::default()).unwrap();
        let e = other.load_bytes(&bytes).unwrap_err().to_string();
        assert!(e.contains("b.exp_avg"), "{e}");
        let mut wrong_shape = AdamW::new(vec![("a".to_string(), var(&[1.0, 2.0, 3.0]))], AdamWConfig::default()).unwrap();
        let e = wrong_shape.load_bytes(&bytes).unwrap_err().to_string();
        assert!(e.contains("a.exp_avg") && e.contains("[3]"), "{e}");
        assert!(other.load_bytes(b"garbage").is_err());
        let e = AdamW::new(vec![("a".into(), var(&[1.0])), ("a".into(), var(&[1.0]))], AdamWConfig::default()).unwrap_err();
        assert!(e.to_string().contains("twice"));
    }

    #[test]
    fn missing_gradient_is_named() {
        let a = var(&[1.0]);
        let b = var(&[2.0]);
        let params = vec![("a".to_string(), a.clone()), ("frozen.b".to_string(), b)];
        let store = a.as_tensor().sum_all().unwrap().backward().unwrap();
        let e = Grads::from_store(&params, &store).unwrap_err().to_string();
        assert_eq!(e, "no gradient for frozen.b");
    }

    // Global norm of ([3, 4], [12]) is 13; clipping to 6.5 halves every gradient (up to the
    // 1e-6 in PyTorch's coefficient), clipping to 100 changes nothing.
    #[test]
    fn clipping_by_global_norm() {
        let mk = || Grads(vec![Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap(), Tensor::new(&[12f32], &Device::Cpu).unwrap()]);
        let mut g = mk();
        assert_eq!(g.clip_global_norm(100.0).unwrap(), 13.0);
        assert_eq!(g.0[0].to_vec1::<f32>().unwrap(), vec![3.0, 4.0]);
        let mut g = mk();
        assert_eq!(g.clip_global_norm(6.5).unwrap(), 13.0);
        let coef = 6.5 / (13.0 + 1e-6);
        let got = g.0[0].to_vec1::<f32>().unwrap();
        assert!((got[0] as f64 - 3.0 * coef).abs() < 1e-6 && (got[1] as f64 - 4.0 * coef).abs() < 1e-6);
        assert!((g.global_norm().unwrap() - 6.5).abs() < 1e-5);
        let mut off = mk();
        assert_eq!(off.clip_global_norm(0.0).unwrap(), 13.0);
        assert_eq!(off.0[1].to_vec1::<f32>().unwrap(), vec![12.0], "max_norm 0 disables clipping");
        let mut bad = Grads(vec![Tensor::new(&[f32::NAN], &Device::Cpu).unwrap()]);
        assert!(bad.clip_global_norm(1.0).unwrap().is_nan());
    }

    // Two micro-batches of the mean loss accumulate to the gradient of the full batch.
    #[test]
    fn accumulation_equals_full_batch() {
        let w = var(&[0.5, -1.0]);
        let params = vec![("w".to_string(), w.clone())];
        let x = Tensor::new(&[[1f32, 2.0], [3.0, -1.0], [0.5, 0.5], [-2.0, 1.0]], &Device::Cpu).unwrap();
        let loss_of = |rows: &Tensor| rows.broadcast_mul(w.as_tensor()).unwrap().sum(1).unwrap().sqr().unwrap().mean_all().unwrap();
        let full = Grads::from_store(&params, &loss_of(&x).backward().unwrap()).unwrap();
        let mut acc = GradAccumulator::new(2);
        for half in [x.narrow(0, 0, 2).unwrap(), x.narrow(0, 2, 2).unwrap()] {
            acc.add(&params, &loss_of(&half).backward().unwrap()).unwrap();
        }
        assert_eq!(acc.count(), 2);
        let got = acc.take().unwrap().0[0].to_vec1::<f32>().unwrap();
        let want = full.0[0].to_vec1::<f32>().unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{got:?} vs {want:?}");
        }
        assert!(acc.take().is_err(), "empty after take");
    }

    // Values at known steps: peak 1e-3, warmup 10, total 110 (HF's formulas).
    #[test]
    fn schedule_values_at_known_steps() {
        let s = |kind| LrSchedule { peak: 1e-3, warmup_steps: 10, total_steps: 110, kind };
        for kind in [LrScheduler::Constant, LrScheduler::Linear, LrScheduler::Cosine] {
            assert_eq!(s(kind).lr_at(0), 0.0);
            assert!((s(kind).lr_at(5) - 5e-4).abs() < 1e-18);
            assert_eq!(s(kind).lr_at(10), 1e-3);
        }
        let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-15, "{a} vs {b}");
        close(s(LrScheduler::Constant).lr_at(109), 1e-3);
        close(s(LrScheduler::Linear).lr_at(60), 5e-4); // halfway through decay
        close(s(LrScheduler::Linear).lr_at(109), 1e-5);
        close(s(LrScheduler::Linear).lr_at(110), 0.0);
        close(s(LrScheduler::Linear).lr_at(500), 0.0);
        close(s(LrScheduler::Cosine).lr_at(60), 5e-4); // cos(π/2) = 0
        close(s(LrScheduler::Cosine).lr_at(35), 1e-3 * 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos()));
        close(s(LrScheduler::Cosine).lr_at(110), 0.0);
        // no warmup: the first step runs at the peak
        let nw = LrSchedule { peak: 2e-5, warmup_steps: 0, total_steps: 4, kind: LrScheduler::Linear };
        for (step, want) in [(0, 2e-5), (1, 1.5e-5), (2, 1e-5), (3, 5e-6)] {
            close(nw.lr_at(step), want);
        }
        assert_eq!(warmup_steps_from_ratio(110, 0.1), 11);
        assert_eq!(warmup_steps_from_ratio(7, 0.1), 1);
        assert_eq!(warmup_steps_from_ratio(7, 0.0), 0);
    }
}
