//! LoRA (Hu et al. 2021, arXiv 2106.09685), the baseline, exactly as PEFT defines it:
//! [`layer`] (the adapted layer and its hyperparameters), [`files`] (PEFT's file layout); here,
//! wrapping a model's target linears (total parameters = base + LoRA, as PEFT counts them).

pub mod files;
pub mod layer;

pub use layer::{LoraAdapter, LoraConfig, A_SUFFIX, B_SUFFIX};

use crate::adapter::inject::model_params;
use crate::adapter::{targets, AdapterSet};
use crate::error::Result;
use crate::model::linear::Linear;
use crate::model::llama::Model;

/// The LoRA adapters attached to one model (per module `lora_A.weight` then `lora_B.weight`).
pub type LoraSet = AdapterSet<LoraConfig, LoraAdapter>;

/// Attach `built` (index into `linears`, adapter) and count (`base_params`: the base model's count).
pub(crate) fn attach(linears: Vec<&mut Linear>, built: Vec<(usize, LoraAdapter)>, cfg: &LoraConfig, base_model: &str, base_params: usize) -> LoraSet {
    LoraSet::attach(linears, built, cfg.clone(), base_model, base_params, true)
}

/// Wrap the target linears among `linears` with fresh LoRA adapters (B = 0: the output is
/// unchanged). Errors: invalid `cfg`, see [`targets::select`]; on error nothing is attached.
pub fn inject_linears(linears: Vec<&mut Linear>, cfg: &LoraConfig, base_model: &str, base_params: usize) -> Result<LoraSet> {
    cfg.validate()?;
    let idx = targets::select(&linears, &cfg.target_modules)?;
    let mut built = Vec::with_capacity(idx.len());
    for i in idx {
        built.push((i, LoraAdapter::init(linears[i], cfg.r, cfg.lora_alpha, cfg.init_seed)?));
    }
    Ok(attach(linears, built, cfg, base_model, base_params))
}

/// Wrap `model`'s target linears with fresh LoRA adapters. Errors: as [`inject_linears`], a
/// tied `lm_head` among the targets; on error the model is unchanged.
pub fn inject(model: &mut Model, cfg: &LoraConfig, base_model: &str) -> Result<LoraSet> {
    cfg.validate()?;
    targets::check_tied(model, &cfg.target_modules)?;
    let base_params = model_params(model);
    inject_linears(model.linears_mut(), cfg, base_model, base_params)
}
