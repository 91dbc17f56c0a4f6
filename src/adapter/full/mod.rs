//! Full-parameter training of the selected linears (the "full fine-tuning" DPO baseline):
//! [`layer`] (the trained copy of a layer), [`files`]; here, making a model's target linears
//! trainable.

pub mod files;
pub mod layer;

pub use layer::{FullAdapter, FullConfig};

use crate::adapter::inject::model_params;
use crate::adapter::{targets, AdapterSet};
use crate::error::Result;
use crate::model::linear::Linear;
use crate::model::llama::Model;

/// The fully trained layers of one model (per module `weight` then `bias`). Counts: trainable =
/// elements of the trained tensors, total = the base model's count (the trained tensors replace
/// their frozen copies; nothing is added).
pub type FullSet = AdapterSet<FullConfig, FullAdapter>;

/// Attach `built` and count.
pub(crate) fn attach(linears: Vec<&mut Linear>, built: Vec<(usize, FullAdapter)>, cfg: &FullConfig, base_model: &str, base_params: usize) -> FullSet {
    FullSet::attach(linears, built, cfg.clone(), base_model, base_params, false)
}

/// Make the target linears among `linears` trainable (copies of their weights: the output is
/// unchanged). Errors: see [`targets::select`]; on error nothing is attached.
pub fn inject_linears(linears: Vec<&mut Linear>, cfg: &FullConfig, base_model: &str, base_params: usize) -> Result<FullSet> {
    let idx = targets::select(&linears, &cfg.target_modules)?;
    let mut built = Vec::with_capacity(idx.len());
    for i in idx {
        built.push((i, FullAdapter::init(linears[i])?));
    }
    Ok(attach(linears, built, cfg, base_model, base_params))
}

/// Make `model`'s target linears trainable. Errors: as [`inject_linears`], a tied `lm_head`
/// among the targets; on error the model is unchanged.
pub fn inject(model: &mut Model, cfg: &FullConfig, base_model: &str) -> Result<FullSet> {
    targets::check_tied(model, &cfg.target_modules)?;
    let base_params = model_params(model);
    inject_linears(model.linears_mut(), cfg, base_model, base_params)
}
