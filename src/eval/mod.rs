//! Evaluation: the reward-hacking diagnostics of `ropo eval`, base vs adapted.
//!
//! RoPO exists to stop reward hacking; these modules measure its four symptoms:
//! - [`preference`]: preference metrics on held-out pairs (TRL's `rewards/*`, `logps/*`, loss);
//! - [`generation`]: longer, cut-off, less diverse, more repetitive generations;
//! - [`mmlu`]: forgotten knowledge (MMLU answer-letter log-likelihood);
//! - [`drift`]: how far the adapter moved the model from the reference on held-out prompts
//!   (per-token KL over the reference's own greedy completions);
//! - [`energy`]: collapsed neurons (hyperspherical energy of the adapted weights);
//!
//! and [`report`] puts them side by side (`base | adapted | delta`, and JSON).
//! The pure parts take numbers or closures, so they are tested without a model.

pub mod drift;
pub mod energy;
pub mod generation;
pub mod mmlu;
pub mod preference;
pub mod report;

pub use energy::{hyperspherical_energy, row_cosines, EnergyReport, LayerEnergy};
pub use generation::{generation_stats, GenerationStats};
pub use mmlu::{LetterScorer, MmluScores};
pub use preference::{preference_metrics, PreferenceMetrics};
pub use report::{EvalReport, ModelReport};
