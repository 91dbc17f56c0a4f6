//! RoPO rotation adapters: Householder x Givens x magnitude (spec: `../shared/docs/ropo-method.md`).
//!
//! - [`householder`]: `H_r ··· H_1 x` on activations (rank-1 reference and compact WY form).
//! - [`givens`]: brick-wall Givens stages `G_S^T ··· G_1^T x` on activations.
//! - [`layer`]: [`layer::RopoAdapter`], `y = (m / rho) ⊙ (W (R^T x)) + b`, and its merge.
//! - [`config`]: [`config::AdapterConfig`] (hyperparameters) and `adapter_config.json`.
//! - [`inject`]: wrap a model's target linears; trainable `Var`s in a fixed order; parameter counts.
//! - [`files`]: `adapter_model.safetensors` + `adapter_config.json`, atomic save, checked load.
//! - [`merge`]: bake `W' = diag(m / rho) W R^T` into the weights.
//!
//! Baselines through the same `Adapter` trait (`adapter.type = "lora" | "full"`):
//! - [`lora`]: PEFT's LoRA, `y = W x + b + (alpha / r) B A x`; [`peft`]: its PEFT-layout files.
//! - [`full`]: full-parameter training of the selected linears; [`full_files`]: its files.
//! - [`targets`]: the run config's `target_modules` (`"all-linear"` too) and module selection.
//! - [`any`]: [`any::AnyAdapterSet`], one handle for every kind (inject, load by the stored
//!   type, save, vars, report).

pub mod any;
pub mod config;
pub mod files;
pub mod full;
pub mod full_files;
pub mod givens;
pub mod householder;
pub mod inject;
pub mod layer;
pub mod lora;
pub mod merge;
pub mod peft;
pub mod product;
pub mod targets;

pub use any::AnyAdapterSet;

use candle_core::{CpuStorage, Layout, WithDType};

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
pub use layer::RopoAdapter;
