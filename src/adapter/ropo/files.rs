//! RoPO's adapter files: `adapter_model.safetensors` + `adapter_config.json` (PEFT's layout).
//!
//! Tensors are keyed by full module path + suffix (`model.layers.0.self_attn.q_proj.ropo_u`,
//! `….ropo_theta`, `….ropo_magnitude`), stored in the parameters' dtype, with the layout of
//! [`super::config::TENSOR_LAYOUT`] (the same order and meaning as
//! `../shared/golden/ropo_adapter_golden.json`, theta's stages concatenated). Both files are
//! written atomically (temporary sibling, then rename). Loading checks every shape against the
//! model and names the first mismatching key, in model order.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use super::config::RopoFileConfig;
use super::layer::{RopoAdapter, MAGNITUDE_SUFFIX, THETA_SUFFIX, U_SUFFIX};
use super::{attach, build_adapters, givens, RopoSet};
use crate::adapter::inject::model_params;
use crate::adapter::{read_weights, ADAPTER_CONFIG_FILE, WEIGHTS_FILE};
use crate::error::{Error, Result};
use crate::fsutil::write_atomic;
use crate::model::linear::Linear;
use crate::model::llama::Model;

/// Write `set` into the folder `dir` (created if missing): weights first, then the config,
/// each atomically. Errors: I/O (path named), serialization.
pub fn save(dir: &Path, set: &RopoSet) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::input(dir, None, format!("creating folder: {e}")))?;
    let vars = set.vars();
    let tensors: BTreeMap<String, Tensor> = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
        .map_err(|e| Error::Msg(format!("serializing {WEIGHTS_FILE}: {e}")))?;
    write_atomic(&dir.join(WEIGHTS_FILE), &bytes)?;
    let json = serde_json::to_string_pretty(&set.file_config()).map_err(|e| Error::Msg(e.to_string()))?;
    write_atomic(&dir.join(ADAPTER_CONFIG_FILE), format!("{json}\n").as_bytes())?;
    Ok(())
}

/// Read and check `dir/adapter_config.json`.
pub fn read_config(dir: &Path) -> Result<RopoFileConfig> {
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::input(&path, None, e.to_string()))?;
    RopoFileConfig::parse(&text, &path)
}

/// Attach the adapter stored in `dir` to `linears` (the target modules recorded in its config).
///
/// Tensors are converted to each base weight's dtype and device. `base_params` as in
/// [`attach`]. On any error nothing is attached. Errors: bad config; a missing tensor ([`Error::MissingTensor`]); a tensor of
/// the wrong shape ([`Error::Shape`], the first in model order, e.g. a model of other dimensions);
/// a tensor left over that no targeted module uses; no module matched.
pub fn load_linears(dir: &Path, linears: Vec<&mut Linear>, base_params: usize) -> Result<RopoSet> {
    let file_cfg = read_config(dir)?;
    let cfg = file_cfg.adapter_config();
    let mut tensors = read_weights(dir)?;
    let weights_path: PathBuf = dir.join(WEIGHTS_FILE);
    let built = build_adapters(&linears, &cfg, |lin| {
        let (n, d) = lin.dims();
        let a = givens::num_angles(d, cfg.givens_stages);
        let mut take = |suffix: &str, want: Option<Vec<usize>>| -> Result<Option<Tensor>> {
            let Some(want) = want else { return Ok(None) };
            let name = format!("{}.{suffix}", lin.path);
            let t = tensors.remove(&name).ok_or_else(|| Error::MissingTensor(format!("{name} in {}", weights_path.display())))?;
            if t.dims() != want.as_slice() {
                return Err(Error::Shape { name, expected: want, got: t.dims().to_vec() });
            }
            Ok(Some(t.to_device(lin.weight.device())?.to_dtype(lin.dtype())?))
        };
        let u = take(U_SUFFIX, (cfg.householder_reflections > 0).then(|| vec![cfg.householder_reflections, d]))?;
        let theta = take(THETA_SUFFIX, (a > 0).then(|| vec![a]))?;
        let m = take(MAGNITUDE_SUFFIX, cfg.magnitude.then(|| vec![n]))?;
        Ok(RopoAdapter::from_tensors(lin, cfg.householder_reflections, cfg.givens_stages, u, theta, m)?)
    })?;
    let mut left: Vec<&String> = tensors.keys().collect();
    left.sort();
    if let Some(k) = left.first() {
        return Err(Error::input(
            &weights_path,
            None,
            format!("tensor {k} belongs to no targeted module of this model ({} such tensors)", left.len()),
        ));
    }
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
