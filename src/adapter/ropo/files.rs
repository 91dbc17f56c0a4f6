//! RoPO's adapter files: `adapter_model.safetensors` + `adapter_config.json` (PEFT's layout).
//!
//! Tensors are keyed by full module path + suffix (`model.layers.0.self_attn.q_proj.ropo_u`,
//! `….ropo_theta`, `….ropo_magnitude`), stored in the parameters' dtype, with the layout of
//! [`super::config::TENSOR_LAYOUT`] (the same order and meaning as
//! `../shared/golden/ropo_adapter_golden.json`, theta's stages concatenated). Both files are
//! written atomically (temporary sibling, then rename). Loading checks every shape against the
//! model and names the first mismatching key, in model order.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;

use super::config::RopoFileConfig;
use super::layer::{RopoAdapter, MAGNITUDE_SUFFIX, THETA_SUFFIX, U_SUFFIX};
use super::{attach, build_adapters, givens, RopoSet};
use crate::adapter::inject::model_params;
use crate::adapter::{read_config_text, write_folder, StoredTensors};
use crate::error::Result;
use crate::model::linear::Linear;
use crate::model::llama::Model;

/// Write `set` into the folder `dir` (created if missing): weights first, then the config,
/// each atomically. Errors: I/O (path named), serialization.
pub fn save(dir: &Path, set: &RopoSet) -> Result<()> {
    let tensors: BTreeMap<String, Tensor> = set.vars().iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    write_folder(dir, &tensors, &set.file_config())
}

/// Read and check `dir/adapter_config.json`.
pub fn read_config(dir: &Path) -> Result<RopoFileConfig> {
    let (path, text) = read_config_text(dir)?;
    RopoFileConfig::parse(&text, &path)
}

/// Attach the adapter stored in `dir` to `linears` (the target modules recorded in its config).
///
/// Tensors are converted to each base weight's dtype and device. `base_params` as in
/// [`attach`]. On any error nothing is attached. Errors: bad config; a missing tensor ([`crate::error::Error::MissingTensor`]); a tensor of
/// the wrong shape ([`crate::error::Error::Shape`], the first in model order, e.g. a model of other dimensions);
/// a tensor left over that no targeted module uses; no module matched.
pub fn load_linears(dir: &Path, linears: Vec<&mut Linear>, base_params: usize) -> Result<RopoSet> {
    let file_cfg = read_config(dir)?;
    let cfg = file_cfg.adapter_config();
    let mut stored = StoredTensors::read(dir)?;
    let built = build_adapters(&linears, &cfg, |lin| {
        let (n, d) = lin.dims();
        let a = givens::num_angles(d, cfg.givens_stages);
        let mut take = |suffix: &str, want: Option<Vec<usize>>| -> Result<Option<Tensor>> {
            want.map(|want| stored.take(format!("{}.{suffix}", lin.path), &want, lin)).transpose()
        };
        let u = take(U_SUFFIX, (cfg.householder_reflections > 0).then(|| vec![cfg.householder_reflections, d]))?;
        let theta = take(THETA_SUFFIX, (a > 0).then(|| vec![a]))?;
        let m = take(MAGNITUDE_SUFFIX, cfg.magnitude.then(|| vec![n]))?;
        Ok(RopoAdapter::from_tensors(lin, cfg.householder_reflections, cfg.givens_stages, u, theta, m)?)
    })?;
    stored.finish()?;
    Ok(attach(linears, built, &cfg, &file_cfg.base_model, base_params))
}

/// Load the adapter in `dir` onto `model` (tensors converted to the model's dtype and device).
///
/// Errors: as [`load_linears`]; e.g. an adapter trained on a model of other dimensions gives
/// `shape mismatch for model.layers.0.self_attn.q_proj.ropo_u: expected [4, 64], got [4, 576]`.
/// On error the model is unchanged.
pub fn load(dir: &Path, model: &mut Model) -> Result<RopoSet> {
    crate::adapter::targets::check_tied(model, &read_config(dir)?.target_modules)?;
    let base_params = model_params(model);
    load_linears(dir, model.linears_mut(), base_params)
}
