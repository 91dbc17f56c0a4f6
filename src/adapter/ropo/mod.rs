//! RoPO (Weights-Rotated Preference Optimization): `y = (m / rho) ⊙ (W (R^T x)) + b`,
//! `R = H_1 ··· H_r G_1 ··· G_S` (spec: `../shared/docs/ropo-method.md`; notes: `docs/method.md`).
//!
//! - [`householder`]: `H_r ··· H_1 x` on activations (rank-1 reference and compact WY form).
//! - [`givens`]: brick-wall Givens stages `G_S^T ··· G_1^T x` on activations.
//! - [`layer`]: [`RopoAdapter`], the adapted layer, and its merge.
//! - [`product`]: the layer's training product (rotation, frozen product, magnitude) as one op.
//! - [`config`]: [`RopoConfig`] (hyperparameters) and `adapter_config.json` ([`RopoFileConfig`]).
//! - [`files`]: `adapter_model.safetensors` + `adapter_config.json`, atomic save, checked load.
//! - here: wrap a model's target linears (PEFT's split, `tuners/hra/model.py`: this module only
//!   decides WHICH linears to wrap; the math lives in [`layer`]). The trainable tensors come in
//!   a fixed order: model order of the wrapped modules (`Model::linears`: layer by layer q, k,
//!   v, o, gate, up, down, then lm_head), and per module `ropo_u`, `ropo_theta`,
//!   `ropo_magnitude`.

pub mod config;
pub mod files;
pub mod givens;
mod givens_simd;
pub mod householder;
pub mod layer;
pub mod product;

pub use config::{RopoConfig, RopoFileConfig};
pub use layer::RopoAdapter;

// the fused ops' helpers, shared with the other methods' files
pub(crate) use super::{add_acc, cpu_slice, rows_per_task};

use crate::adapter::inject::model_params;
use crate::adapter::targets::check_tied;
use crate::adapter::AdapterSet;
use crate::error::Result;
use crate::model::linear::Linear;
use crate::model::llama::Model;

/// The RoPO adapters attached to one model.
pub type RopoSet = AdapterSet<RopoConfig, RopoAdapter>;

impl RopoSet {
    /// The `adapter_config.json` contents.
    pub fn file_config(&self) -> RopoFileConfig {
        RopoFileConfig::new(&self.config, &self.base_model)
    }
}

/// Build an adapter with `make` for every linear whose path `cfg.target_modules` matches,
/// WITHOUT attaching anything: `(index into linears, adapter)` in model order.
///
/// Errors: invalid `cfg`; no module matched (naming the patterns and some module paths);
/// a matched linear that already has an adapter; any error of `make`.
pub fn build_adapters(
    linears: &[&mut Linear],
    cfg: &RopoConfig,
    mut make: impl FnMut(&Linear) -> Result<RopoAdapter>,
) -> Result<Vec<(usize, RopoAdapter)>> {
    cfg.validate()?;
    crate::adapter::targets::select(linears, &cfg.target_modules)?.into_iter().map(|i| Ok((i, make(linears[i])?))).collect()
}

/// Attach adapters from [`build_adapters`] and count parameters (`base_params`: the base
/// model's parameter count). Cannot fail, so a failed build leaves the model untouched.
pub fn attach(linears: Vec<&mut Linear>, built: Vec<(usize, RopoAdapter)>, cfg: &RopoConfig, base_model: &str, base_params: usize) -> RopoSet {
    RopoSet::attach(linears, built, cfg.clone(), base_model, base_params, true)
}

/// Wrap the target linears with freshly initialized adapters (spec "Initialization": the
/// adapted model equals the base). Parameters take each weight's dtype and device.
///
/// Errors: as [`build_adapters`]; on error nothing is attached.
pub fn inject_linears(linears: Vec<&mut Linear>, cfg: &RopoConfig, base_model: &str, base_params: usize) -> Result<RopoSet> {
    let built = build_adapters(&linears, cfg, |lin| {
        Ok(RopoAdapter::init(lin, cfg.householder_reflections, cfg.givens_stages, cfg.magnitude, cfg.init_seed)?)
    })?;
    Ok(attach(linears, built, cfg, base_model, base_params))
}

/// Wrap `model`'s target linears with freshly initialized adapters (the model's logits stay
/// those of the base model, up to rounding). `base_model` (path or hub id) is recorded in the
/// adapter config. Errors: as [`build_adapters`], a tied lm_head among the targets; on error
/// the model is unchanged.
pub fn inject(model: &mut Model, cfg: &RopoConfig, base_model: &str) -> Result<RopoSet> {
    cfg.validate()?;
    check_tied(model, &cfg.target_modules)?;
    let base_params = model_params(model);
    inject_linears(model.linears_mut(), cfg, base_model, base_params)
}
