//! One handle for every adapter kind (`adapter.type = "ropo" | "lora" | "full"`), used by the
//! training loop, `ropo merge`, `ropo generate --adapter` and `ropo eval`.
//!
//! [`AnyAdapterSet::inject`] builds the kind a run config asks for; [`AnyAdapterSet::load`] reads
//! an adapter folder and dispatches on its `adapter_config.json`: `"adapter_type": "ROPO"`
//! ([`super::ropo::files`]), `"peft_type": "LORA"` ([`super::lora::files`], PEFT's layout) or
//! `"adapter_type": "FULL"` ([`super::full::files`]). Merging is kind-agnostic
//! ([`super::merge::merge_into`], through `Adapter::merged`).

use std::path::Path;

use candle_core::Var;

use super::full::{self, FullConfig, FullSet};
use super::inject::ParamReport;
use super::lora::{self, LoraConfig, LoraSet};
use super::ropo::{self, RopoConfig, RopoSet};
use super::{targets, ADAPTER_CONFIG_FILE};
use crate::config::{AdapterKind, AdapterSection};
use crate::error::{Error, Result};
use crate::model::llama::Model;

/// The adapters attached to one model, of any kind.
#[derive(Debug, Clone)]
pub enum AnyAdapterSet {
    /// RoPO rotations (Householder × Givens × magnitude).
    Ropo(RopoSet),
    /// LoRA (PEFT's definition).
    Lora(LoraSet),
    /// Full-parameter training of the selected linears.
    Full(FullSet),
}

/// The RoPO hyperparameters of a run config's `[adapter]` for `model` (target modules resolved
/// by [`targets::resolve`]).
pub fn ropo_config(section: &AdapterSection, model: &Model) -> Result<RopoConfig> {
    Ok(RopoConfig {
        target_modules: targets::resolve(&section.target_modules, model)?,
        householder_reflections: section.householder_reflections,
        givens_stages: section.givens_stages,
        magnitude: section.magnitude,
        init_seed: section.init_seed,
    })
}

/// The LoRA hyperparameters of a run config's `[adapter]` for `model`.
pub fn lora_config(section: &AdapterSection, model: &Model) -> Result<LoraConfig> {
    Ok(LoraConfig {
        target_modules: targets::resolve(&section.target_modules, model)?,
        r: section.lora_r,
        lora_alpha: section.lora_alpha,
        lora_dropout: section.lora_dropout,
        init_seed: section.init_seed,
    })
}

/// The full-training selection of a run config's `[adapter]` for `model`.
pub fn full_config(section: &AdapterSection, model: &Model) -> Result<FullConfig> {
    Ok(FullConfig { target_modules: targets::resolve(&section.target_modules, model)? })
}

/// The kind of the adapter stored in `dir`, from its `adapter_config.json`.
///
/// Errors ([`Error::Input`] naming the file): unreadable, not JSON, neither
/// `"adapter_type": "ROPO" | "FULL"` nor `"peft_type": "LORA"`.
pub fn stored_kind(dir: &Path) -> Result<AdapterKind> {
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::input(&path, None, e.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::input(&path, Some(e.line()), e.to_string()))?;
    let field = |k: &str| v.get(k).and_then(|x| x.as_str());
    match (field("adapter_type"), field("peft_type")) {
        (Some(ropo::config::ADAPTER_TYPE), _) => Ok(AdapterKind::Ropo),
        (Some(full::files::ADAPTER_TYPE), _) => Ok(AdapterKind::Full),
        (None, Some(lora::files::PEFT_TYPE)) => Ok(AdapterKind::Lora),
        (a, p) => Err(Error::input(
            &path,
            None,
            format!("unknown adapter type (adapter_type {a:?}, peft_type {p:?}); this ropo reads adapter_type \"ROPO\" or \"FULL\", or peft_type \"LORA\""),
        )),
    }
}

impl AnyAdapterSet {
    /// Attach fresh adapters of `section.kind` to `model` (the model's output stays the base
    /// model's: RoPO up to rounding, LoRA and full exactly). `base_model` (path or hub id) is
    /// recorded in the adapter config. Errors: invalid options (naming the key), no module
    /// matched, a tied `lm_head` among the targets; on error the model is unchanged.
    pub fn inject(model: &mut Model, section: &AdapterSection, base_model: &str) -> Result<Self> {
        Ok(match section.kind {
            AdapterKind::Ropo => AnyAdapterSet::Ropo(ropo::inject(model, &ropo_config(section, model)?, base_model)?),
            AdapterKind::Lora => AnyAdapterSet::Lora(lora::inject(model, &lora_config(section, model)?, base_model)?),
            AdapterKind::Full => AnyAdapterSet::Full(full::inject(model, &full_config(section, model)?, base_model)?),
        })
    }

    /// Load the adapter folder `dir` onto `model`, whatever its kind (see [`stored_kind`]);
    /// tensors converted to the model's dtype and device. Errors: those of [`stored_kind`] and
    /// of the kind's loader (missing tensor, first mismatching shape by name, ...); on error the
    /// model is unchanged.
    pub fn load(dir: &Path, model: &mut Model) -> Result<Self> {
        Ok(match stored_kind(dir)? {
            AdapterKind::Ropo => AnyAdapterSet::Ropo(ropo::files::load(dir, model)?),
            AdapterKind::Lora => AnyAdapterSet::Lora(lora::files::load(dir, model)?),
            AdapterKind::Full => AnyAdapterSet::Full(full::files::load(dir, model)?),
        })
    }

    /// Write `adapter_model.safetensors` + `adapter_config.json` into `dir` (created if
    /// missing), each atomically, in the kind's layout.
    pub fn save(&self, dir: &Path) -> Result<()> {
        match self {
            AnyAdapterSet::Ropo(s) => ropo::files::save(dir, s),
            AnyAdapterSet::Lora(s) => lora::files::save(dir, s),
            AnyAdapterSet::Full(s) => full::files::save(dir, s),
        }
    }

    /// Every trainable tensor with its full name, in a fixed order (modules in model order):
    /// RoPO `<path>.ropo_u/.ropo_theta/.ropo_magnitude`, LoRA `<path>.lora_A.weight`,
    /// `<path>.lora_B.weight`, full `<path>.weight`, `<path>.bias`. The model's layers use
    /// these same `Var`s.
    pub fn vars(&self) -> Vec<(String, Var)> {
        match self {
            AnyAdapterSet::Ropo(s) => s.vars(),
            AnyAdapterSet::Lora(s) => s.vars(),
            AnyAdapterSet::Full(s) => s.vars(),
        }
    }

    /// Trainable / total parameter counts (PEFT's `print_trainable_parameters` via `Display`).
    pub fn report(&self) -> ParamReport {
        match self {
            AnyAdapterSet::Ropo(s) => s.report,
            AnyAdapterSet::Lora(s) => s.report,
            AnyAdapterSet::Full(s) => s.report,
        }
    }

    /// The kind.
    pub fn kind(&self) -> AdapterKind {
        match self {
            AnyAdapterSet::Ropo(_) => AdapterKind::Ropo,
            AnyAdapterSet::Lora(_) => AdapterKind::Lora,
            AnyAdapterSet::Full(_) => AdapterKind::Full,
        }
    }

    /// The base model recorded in the adapter config.
    pub fn base_model(&self) -> &str {
        match self {
            AnyAdapterSet::Ropo(s) => &s.base_model,
            AnyAdapterSet::Lora(s) => &s.base_model,
            AnyAdapterSet::Full(s) => &s.base_model,
        }
    }

    /// The paths of the adapted modules, in model order.
    pub fn module_paths(&self) -> Vec<String> {
        match self {
            AnyAdapterSet::Ropo(s) => s.adapters.iter().map(|a| a.path.clone()).collect(),
            AnyAdapterSet::Lora(s) => s.adapters.iter().map(|a| a.path.clone()).collect(),
            AnyAdapterSet::Full(s) => s.adapters.iter().map(|a| a.path.clone()).collect(),
        }
    }
}
