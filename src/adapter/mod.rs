//! RoPO rotation adapters: Householder x Givens x magnitude (spec: `../shared/docs/ropo-method.md`).
//!
//! - [`householder`]: `H_r ··· H_1 x` on activations (rank-1 reference and compact WY form).
//! - [`givens`]: brick-wall Givens stages `G_S^T ··· G_1^T x` on activations.
//! - [`layer`]: [`layer::RopoAdapter`], `y = (m / rho) ⊙ (W (R^T x)) + b`, and its merge.
//! - [`config`]: [`config::AdapterConfig`] (hyperparameters) and `adapter_config.json`.
//! - [`inject`]: wrap a model's target linears; trainable `Var`s in a fixed order; parameter counts.
//! - [`files`]: `adapter_model.safetensors` + `adapter_config.json`, atomic save, checked load.
//! - [`merge`]: bake `W' = diag(m / rho) W R^T` into the weights.
//! - [`energy`]: hyperspherical energy of a weight's neurons.

pub mod config;
pub mod energy;
pub mod files;
pub mod givens;
pub mod householder;
pub mod inject;
pub mod layer;
pub mod merge;

pub use energy::hyperspherical_energy;
pub use layer::RopoAdapter;
