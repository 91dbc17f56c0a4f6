//! Files of a full-parameter run: `adapter_model.safetensors` with the trained tensors under
//! their HF names (`model.layers.0.self_attn.q_proj.weight (d_out, d_in)`, `….bias (d_out,)`)
//! and `adapter_config.json` with `adapter_type "FULL"`, the base model and the target modules.
//! Both are written atomically; loading checks every shape against the model and names the
//! first mismatching tensor in model order; on error nothing is attached.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{attach, FullAdapter, FullConfig, FullSet};
use crate::adapter::inject::model_params;
use crate::adapter::targets::{self, TargetModules};
use crate::adapter::{read_config_text, write_folder, StoredTensors};
use crate::error::{Error, Result};
use crate::model::linear::Linear;
use crate::model::llama::Model;

/// `adapter_config.json`'s `adapter_type` for full-parameter training.
pub const ADAPTER_TYPE: &str = "FULL";
/// What the weights file holds (recorded and checked on load).
pub const TENSOR_LAYOUT: &str = "<module path>.weight (d_out, d_in) and <module path>.bias (d_out,): the trained weights, HF names and layout, replacing the base model's";

/// `adapter_config.json` of a full-parameter run (strict: our own file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullFileConfig {
    /// Always [`ADAPTER_TYPE`].
    pub adapter_type: String,
    /// The ropo version that wrote the file.
    pub ropo_version: String,
    /// The base model (path or hub id) as given when training.
    pub base_model: String,
    /// The trained layers.
    pub target_modules: TargetModules,
    /// [`TENSOR_LAYOUT`].
    pub conventions: String,
}

impl FullFileConfig {
    /// Parse the file's text; `path` names it in errors. Errors ([`Error::Input`]): bad JSON,
    /// unknown or missing keys, another adapter type or layout, an invalid regex.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let f: Self = serde_json::from_str(text).map_err(|e| Error::input(path, Some(e.line()), e.to_string()))?;
        let bad = |field: &str, msg: String| Err(Error::input(path, None, format!("{field}: {msg}")));
        if f.adapter_type != ADAPTER_TYPE {
            return bad("adapter_type", format!("expected {ADAPTER_TYPE:?}, got {:?}", f.adapter_type));
        }
        if f.conventions != TENSOR_LAYOUT {
            return bad("conventions", format!("this build implements {TENSOR_LAYOUT:?}, the file says {:?}", f.conventions));
        }
        f.target_modules.matcher().map_err(|e| Error::input(path, None, format!("target_modules: {e}")))?;
        Ok(f)
    }
}

/// Save `set` into `dir`.
pub fn save(dir: &Path, set: &FullSet) -> Result<()> {
    let tensors: BTreeMap<String, Tensor> = set.vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
    let cfg = FullFileConfig {
        adapter_type: ADAPTER_TYPE.into(),
        ropo_version: env!("CARGO_PKG_VERSION").into(),
        base_model: set.base_model.clone(),
        target_modules: set.config.target_modules.clone(),
        conventions: TENSOR_LAYOUT.into(),
    };
    write_folder(dir, &tensors, &serde_json::to_value(&cfg).map_err(|e| Error::Msg(e.to_string()))?)
}

/// Read and check `dir/adapter_config.json`.
pub fn read_config(dir: &Path) -> Result<FullFileConfig> {
    let (path, text) = read_config_text(dir)?;
    FullFileConfig::parse(&text, &path)
}

/// Attach the trained weights in `dir` to `linears` (converted to each base weight's dtype and
/// device). Errors: bad config; a missing tensor; a wrong shape ([`Error::Shape`], first in
/// model order); a tensor no targeted module uses; no module matched.
pub fn load_linears(dir: &Path, linears: Vec<&mut Linear>, base_params: usize) -> Result<FullSet> {
    let file_cfg = read_config(dir)?;
    let cfg = FullConfig { target_modules: file_cfg.target_modules.clone() };
    let mut stored = StoredTensors::read(dir)?;
    let idx = targets::select(&linears, &cfg.target_modules)?;
    let mut built = Vec::with_capacity(idx.len());
    for i in idx {
        let lin = &*linears[i];
        let w = stored.take(format!("{}.weight", lin.path), lin.weight.dims(), lin)?;
        let b = match &lin.bias {
            Some(b) => Some(stored.take(format!("{}.bias", lin.path), b.dims(), lin)?),
            None => None,
        };
        built.push((i, FullAdapter::from_tensors(lin, w, b)?));
    }
    stored.finish()?;
    Ok(attach(linears, built, &cfg, &file_cfg.base_model, base_params))
}

/// Load the full-parameter adapter in `dir` onto `model`; see [`load_linears`]. On error the
/// model is unchanged.
pub fn load(dir: &Path, model: &mut Model) -> Result<FullSet> {
    targets::check_tied(model, &read_config(dir)?.target_modules)?;
    let base_params = model_params(model);
    load_linears(dir, model.linears_mut(), base_params)
}
