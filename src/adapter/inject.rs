//! Wrap a model's target linears with RoPO adapters and report what is trainable.
//!
//! PEFT's split (`tuners/hra/model.py`): this module only decides WHICH linears to wrap; the
//! math lives in [`super::layer`]. The trainable tensors are returned in a fixed order: model
//! order of the wrapped modules (`Model::linears`: layer by layer q, k, v, o, gate, up, down,
//! then lm_head), and per module `ropo_u`, `ropo_theta`, `ropo_magnitude`.

use std::sync::Arc;

use candle_core::Var;

use super::config::{AdapterConfig, AdapterFileConfig};
use super::layer::RopoAdapter;
use crate::error::{Error, Result};
use crate::model::linear::{Adapter, Linear};
use crate::model::llama::Model;

/// Trainable / total parameter counts (total = base model + adapters, as PEFT counts them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamReport {
    /// Adapter parameters (`Σ r·d + A + n` over wrapped layers).
    pub trainable: usize,
    /// Base model parameters plus the adapter's.
    pub total: usize,
}

impl ParamReport {
    /// `trainable / total` (0 for an empty model).
    pub fn fraction(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.trainable as f64 / self.total as f64
        }
    }
}

/// `1234567` -> `1,234,567`.
fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl std::fmt::Display for ParamReport {
    /// PEFT's `print_trainable_parameters` line:
    /// `trainable params: 1,234 || all params: 135,000,000 || trainable%: 0.0009`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            thousands(self.trainable),
            thousands(self.total),
            100.0 * self.fraction()
        )
    }
}

/// The adapters attached to one model.
#[derive(Debug, Clone)]
pub struct AdapterSet {
    /// The hyperparameters.
    pub config: AdapterConfig,
    /// The base model (path or hub id) as recorded in `adapter_config.json`.
    pub base_model: String,
    /// One adapter per wrapped linear, in model order (shares its `Var`s with the model).
    pub adapters: Vec<Arc<RopoAdapter>>,
    /// Counts.
    pub report: ParamReport,
}

impl AdapterSet {
    /// Every trainable tensor with its full name (`<module path>.ropo_u`, …), in the fixed order
    /// of the module docs. These are the same `Var`s the model's layers use.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.adapters.iter().flat_map(|a| a.trainable()).collect()
    }

    /// The `adapter_config.json` contents.
    pub fn file_config(&self) -> AdapterFileConfig {
        AdapterFileConfig::new(&self.config, &self.base_model)
    }
}

/// Build an adapter with `make` for every linear whose path `cfg.target_modules` matches,
/// WITHOUT attaching anything: `(index into linears, adapter)` in model order.
///
/// Errors: invalid `cfg`; no module matched (naming the patterns and some module paths);
/// a matched linear that already has an adapter; any error of `make`.
pub fn build_adapters(
    linears: &[&mut Linear],
    cfg: &AdapterConfig,
    mut make: impl FnMut(&Linear) -> Result<RopoAdapter>,
) -> Result<Vec<(usize, RopoAdapter)>> {
    cfg.validate()?;
    super::targets::select(linears, &cfg.target_modules)?.into_iter().map(|i| Ok((i, make(linears[i])?))).collect()
}

/// Attach each built adapter (`built`: index into `linears`, adapter) to its linear, in order,
/// and return the shared handles. Cannot fail. One mechanism for RoPO, LoRA and full adapters.
pub(crate) fn attach_each<A: Adapter + 'static>(mut linears: Vec<&mut Linear>, built: Vec<(usize, A)>) -> Vec<Arc<A>> {
    let mut adapters = Vec::with_capacity(built.len());
    for (i, a) in built {
        let a = Arc::new(a);
        linears[i].adapter = Some(a.clone() as Arc<dyn Adapter>);
        adapters.push(a);
    }
    adapters
}

/// Attach adapters from [`build_adapters`] and count parameters (`base_params`: the base
/// model's parameter count). Cannot fail, so a failed build leaves the model untouched.
pub fn attach(
    linears: Vec<&mut Linear>,
    built: Vec<(usize, RopoAdapter)>,
    cfg: &AdapterConfig,
    base_model: &str,
    base_params: usize,
) -> AdapterSet {
    let adapters = attach_each(linears, built);
    let trainable = adapters.iter().map(|a| a.num_trainable()).sum();
    AdapterSet {
        config: cfg.clone(),
        base_model: base_model.into(),
        adapters,
        report: ParamReport { trainable, total: base_params + trainable },
    }
}

/// Wrap the target linears with freshly initialized adapters (spec "Initialization": the
/// adapted model equals the base). Parameters take each weight's dtype and device.
///
/// Errors: as [`build_adapters`]; on error nothing is attached.
pub fn inject_linears(linears: Vec<&mut Linear>, cfg: &AdapterConfig, base_model: &str, base_params: usize) -> Result<AdapterSet> {
    let built = build_adapters(&linears, cfg, |lin| {
        Ok(RopoAdapter::init(lin, cfg.householder_reflections, cfg.givens_stages, cfg.magnitude, cfg.init_seed)?)
    })?;
    Ok(attach(linears, built, cfg, base_model, base_params))
}

/// The base model's parameter count: every stored tensor once (a tied `lm_head` is not counted
/// twice), as `Model::tensors` lists them.
pub fn model_params(model: &Model) -> usize {
    model.tensors().iter().map(|(_, t)| t.elem_count()).sum()
}

/// Refuse a tied `lm_head` among the targets: its weight IS the embedding matrix, so a merged
/// lm_head could not be written back as one tensor.
pub(crate) fn check_tied(model: &Model, cfg: &AdapterConfig) -> Result<()> {
    if model.config().tie_word_embeddings && cfg.target_modules.matcher()?.is_match(&model.lm_head.path) {
        return Err(Error::Config(format!(
            "adapter.target_modules ({}) matches {}, whose weight is tied to the embeddings; leave it out",
            cfg.target_modules, model.lm_head.path
        )));
    }
    Ok(())
}

/// Wrap `model`'s target linears with freshly initialized adapters (the model's logits stay
/// those of the base model, up to rounding). `base_model` (path or hub id) is recorded in the
/// adapter config. Errors: as [`build_adapters`], a tied lm_head among the targets; on error
/// the model is unchanged.
pub fn inject(model: &mut Model, cfg: &AdapterConfig, base_model: &str) -> Result<AdapterSet> {
    cfg.validate()?;
    check_tied(model, cfg)?;
    let base_params = model_params(model);
    inject_linears(model.linears_mut(), cfg, base_model, base_params)
}

/// Remove every adapter from `model` (it becomes the base model again).
pub fn detach(model: &mut Model) {
    detach_linears(model.linears_mut());
}

/// Remove every adapter from `linears` (the model becomes the base model again).
pub fn detach_linears(linears: Vec<&mut Linear>) {
    for lin in linears {
        lin.adapter = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_prints_like_peft() {
        let r = ParamReport { trainable: 123_456, total: 134_638_656 };
        assert_eq!(r.to_string(), "trainable params: 123,456 || all params: 134,638,656 || trainable%: 0.0917");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
    }
}
