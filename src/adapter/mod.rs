//! Adapters: what `ropo train` trains on a frozen model, one folder per method, all through the
//! model's one [`Adapter`] hook (`crate::model::linear`).
//!
//! - [`ropo`]: RoPO rotation adapters, Householder x Givens x magnitude (spec: `../shared/docs/ropo-method.md`; notes: `docs/method.md`):
//!   [`ropo::householder`], [`ropo::givens`], [`ropo::layer`] (`y = (m / rho) ⊙ (W (R^T x)) + b`),
//!   [`ropo::config`] (hyperparameters and `adapter_config.json`), [`ropo::files`].
//! - [`lora`]: PEFT's LoRA baseline, `y = W x + b + (alpha / r) B A x`: [`lora::layer`],
//!   [`lora::files`] (PEFT's file layout).
//! - [`full`]: full-parameter training of the selected linears: [`full::layer`], [`full::files`].
//!
//! Shared by the three:
//! - [`targets`]: which linears (`target_modules`, `"all-linear"` too) and their selection;
//! - [`inject`]: attaching built adapters, parameter counts, detaching;
//! - [`AdapterSet`]: the adapters of one method attached to one model;
//! - [`any`]: [`any::AnyAdapterSet`], one handle for every method (inject, load by the stored
//!   type, save, vars, report);
//! - [`merge`]: bake any adapter into the weights (`ropo merge`).

pub mod any;
pub mod full;
pub mod inject;
pub mod lora;
pub mod merge;
pub mod ropo;
pub mod targets;

pub use any::AnyAdapterSet;
pub use ropo::RopoAdapter;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{CpuStorage, Layout, Tensor, Var, WithDType};

use crate::error::{Error, Result};
use crate::model::linear::{Adapter, Linear};
use inject::ParamReport;

/// File name of the weights inside an adapter folder (every method).
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// File name of the configuration inside an adapter folder (every method).
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";

/// `dir/adapter_config.json`: its path and text. Errors: unreadable (path named).
pub(crate) fn read_config_text(dir: &Path) -> Result<(PathBuf, String)> {
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::input(&path, None, e.to_string()))?;
    Ok((path, text))
}

/// The tensors of `dir/adapter_model.safetensors` (on the CPU, stored dtype), taken one by one
/// as a method builds its layers; what no layer takes is an error ([`StoredTensors::finish`]).
pub(crate) struct StoredTensors {
    tensors: HashMap<String, Tensor>,
    path: PathBuf,
}

impl StoredTensors {
    /// Read the weights file of `dir`. Errors: unreadable or malformed (path named).
    pub(crate) fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(WEIGHTS_FILE);
        let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).map_err(|e| Error::input(&path, None, e.to_string()))?;
        Ok(Self { tensors, path })
    }

    /// Take the tensor `name`, of shape `want`, converted to `lin`'s dtype and device.
    /// Errors: missing ([`Error::MissingTensor`]), another shape ([`Error::Shape`]).
    pub(crate) fn take(&mut self, name: String, want: &[usize], lin: &Linear) -> Result<Tensor> {
        let t = self.tensors.remove(&name).ok_or_else(|| Error::MissingTensor(format!("{name} in {}", self.path.display())))?;
        if t.dims() != want {
            return Err(Error::Shape { name, expected: want.to_vec(), got: t.dims().to_vec() });
        }
        Ok(t.to_device(lin.weight.device())?.to_dtype(lin.dtype())?)
    }

    /// Every tensor was taken. Errors: the first left over (sorted), with how many are.
    pub(crate) fn finish(self) -> Result<()> {
        let mut left: Vec<&String> = self.tensors.keys().collect();
        left.sort();
        match left.first() {
            Some(k) => Err(Error::input(&self.path, None, format!("tensor {k} belongs to no targeted module of this model ({} such tensors)", left.len()))),
            None => Ok(()),
        }
    }
}

/// Write an adapter folder (every method): the tensors (safetensors, `format = pt`) and the
/// JSON config (pretty, its own key order) into `dir` (created if
/// missing), each atomically, weights first. Errors: I/O (path named), serialization.
pub(crate) fn write_folder(dir: &Path, tensors: &BTreeMap<String, Tensor>, config: &impl serde::Serialize) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::input(dir, None, format!("creating folder: {e}")))?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
        .map_err(|e| Error::Msg(format!("serializing {WEIGHTS_FILE}: {e}")))?;
    crate::fsutil::write_atomic(&dir.join(WEIGHTS_FILE), &bytes)?;
    let json = serde_json::to_string_pretty(config).map_err(|e| Error::Msg(e.to_string()))?;
    crate::fsutil::write_atomic(&dir.join(ADAPTER_CONFIG_FILE), format!("{json}\n").as_bytes())?;
    Ok(())
}

/// The adapters of one method attached to one model: `C` its hyperparameters, `A` its layer
/// ([`ropo::RopoSet`], [`lora::LoraSet`], [`full::FullSet`]).
#[derive(Debug)]
pub struct AdapterSet<C, A> {
    /// The hyperparameters.
    pub config: C,
    /// The base model (path or hub id) as recorded in `adapter_config.json`.
    pub base_model: String,
    /// One adapter per wrapped linear, in model order (shares its `Var`s with the model).
    pub adapters: Vec<Arc<A>>,
    /// Counts.
    pub report: ParamReport,
}

impl<C: Clone, A> Clone for AdapterSet<C, A> {
    /// The same adapters (shared handles, the same `Var`s).
    fn clone(&self) -> Self {
        Self { config: self.config.clone(), base_model: self.base_model.clone(), adapters: self.adapters.clone(), report: self.report }
    }
}

impl<C, A: Adapter + 'static> AdapterSet<C, A> {
    /// Every trainable tensor with its full name, in the model order of the wrapped modules and,
    /// per module, the method's order (RoPO `ropo_u`, `ropo_theta`, `ropo_magnitude`; LoRA
    /// `lora_A.weight`, `lora_B.weight`; full `weight`, `bias`). These are the same `Var`s the
    /// model's layers use.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.adapters.iter().flat_map(|a| a.trainable()).collect()
    }

    /// Attach `built` (index into `linears`, adapter; [`inject::attach_each`]) and count the
    /// trainable elements. `base_params`: the base model's count; `adds_params`: the adapters'
    /// tensors are new (RoPO, LoRA: total = base + trainable) rather than trained copies that
    /// replace their frozen originals (full: total = base). Cannot fail, so a failed build
    /// leaves the model untouched.
    pub(crate) fn attach(linears: Vec<&mut Linear>, built: Vec<(usize, A)>, config: C, base_model: &str, base_params: usize, adds_params: bool) -> Self {
        let adapters = inject::attach_each(linears, built);
        let trainable = adapters.iter().flat_map(|a| a.trainable()).map(|(_, v)| v.elem_count()).sum();
        let total = if adds_params { base_params + trainable } else { base_params };
        Self { config, base_model: base_model.into(), adapters, report: ParamReport { trainable, total } }
    }
}

/// The contiguous slice of a CPU storage seen through `layout` (inputs of the fused ops are made
/// contiguous by their wrappers). Errors: a strided layout, a dtype other than `T`.
pub(crate) fn cpu_slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("ropo fused op: non-contiguous input".into()))?;
    Ok(&s.as_slice::<T>()?[a..b])
}

/// Rows per rayon task for the fused ops: about two tasks a thread (the work is small; more
/// tasks only add contention on a busy machine).
pub(crate) fn rows_per_task(rows: usize) -> usize {
    (rows / (2 * rayon::current_num_threads()).max(1)).max(1)
}

/// Element-wise sum of two f64 accumulators (the rayon reduce of the fused backward passes).
pub(crate) fn add_acc(mut l: Vec<f64>, r: Vec<f64>) -> Vec<f64> {
    l.iter_mut().zip(r).for_each(|(a, b)| *a += b);
    l
}
