//! ropo: RoPO (Weights-Rotated Preference Optimization) for causal language models, on candle.
//!
//! The pipeline, in the order data flows through it:
//! data -> tokenize -> model + adapter -> logps -> loss -> optimiser -> checkpoint.
//! The method is specified in `../shared/docs/ropo-method.md` (Yang et al., EMNLP 2025,
//! arXiv 2508.17637); `docs/method.md` says where each part of it lives in this crate.

/// Typed errors (file/line/field, tensor/expected/got) and the `Result` alias.
pub mod error;
/// Preference data: row formats, chat templates, tokenization with completion masks, batching.
pub mod data;
/// Where the tensors live: `cpu` or `cuda[:N]` (cargo feature `cuda`), with clear errors.
pub mod device;
/// The Llama-family model runtime and its loaders (HF folder, hub id, GGUF).
pub mod model;
/// RoPO rotation adapters (Householder x Givens x magnitude), adapter files, merge.
pub mod adapter;
/// Completion log-probs of the policy and the reference: one entry point over the dense, fused
/// (LM head at completion positions only) and shared-prompt paths.
pub mod logps;
/// The DPO-family preference losses and TRL's reward metrics (TRL's definitions).
pub mod loss;
/// AdamW with saveable moments, learning-rate schedules, global-norm clipping.
pub mod optim;
/// The training run's TOML configuration: defaults, strict keys, validation.
pub mod config;
/// The reference's log-probs precomputed for every pair, and their cache on disk.
pub mod reference;
/// The training loop, top to bottom (one process, or one rank of a data-parallel run).
pub mod train;
/// The exchange between data-parallel ranks: a small trait, one process, MPI (feature `mpi`).
pub mod collective;
/// Checkpoints: adapter, optimiser, scheduler, RNG and data position; atomic writes; resume.
pub mod checkpoint;
/// TRL metric names, `metrics.jsonl`, the progress bar.
pub mod metrics;
/// Evaluation: preference metrics, generation statistics, knowledge retention, energy.
pub mod eval;
/// Sampling with a KV cache (greedy, temperature, top-p; seeded).
pub mod generate;
/// Training-curve PNGs.
pub mod plot;
/// The picture of a sweep of runs: win (held-out preference accuracy, margin) against drift.
pub mod sweep_plot;
/// Small filesystem helpers: atomic writes (temporary file, then rename), safetensors bytes.
pub mod fsutil;
/// Process tuning for every subcommand (threads, candle's element-wise pool, allocator) and peak RSS.
pub mod process;
/// The command-line interface: one module per subcommand.
pub mod cli;
