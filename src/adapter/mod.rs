//! RoPO rotation adapters: Householder x Givens x magnitude (spec: `../shared/docs/ropo-method.md`).
//!
//! - [`householder`]: `H_r ··· H_1 x` on activations (rank-1 reference and compact WY form).
//! - [`givens`]: brick-wall Givens stages `G_S^T ··· G_1^T x` on activations.
//! - [`layer`]: [`layer::RopoAdapter`], `y = (m / rho) ⊙ (W (R^T x)) + b`, and its merge.
//! - [`energy`]: hyperspherical energy of a weight's neurons.

pub mod energy;
pub mod givens;
pub mod householder;
pub mod layer;

pub use energy::hyperspherical_energy;
pub use layer::RopoAdapter;
