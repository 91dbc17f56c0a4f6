//! The `ropo` command line: one subcommand a module, each with its `Args` and `run`.

pub mod data;
pub mod eval;
pub mod generate;
pub mod merge;
pub mod plot;
pub mod train;

use clap::{Parser, Subcommand};

/// RoPO: weights-rotated preference optimization for causal language models.
#[derive(Debug, Parser)]
#[command(name = "ropo", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a RoPO (or DPO-variant) adapter on preference pairs.
    Train(train::TrainArgs),
    /// Evaluate a model (optionally with an adapter): preferences, generations, MMLU, energy.
    Eval(eval::EvalArgs),
    /// Bake an adapter into the weights and write a standard HF model folder.
    Merge(merge::MergeArgs),
    /// Generate text (optionally as chat) with or without an adapter.
    Generate(generate::GenerateArgs),
    /// Inspect preference data files.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Plot training curves from a metrics.jsonl file into a PNG.
    Plot(plot::PlotArgs),
}

/// The model every subcommand loads: `--model` and `--revision` (flattened into each
/// subcommand's arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// The model: an HF model folder, a .gguf file or a hub repo id (org/name).
    #[arg(long = "model", value_name = "PATH_OR_ID")]
    pub path_or_id: String,
    /// Hub revision (branch, tag or commit) when --model is a repo id.
    #[arg(long)]
    pub revision: Option<String>,
    /// Where to run: `cpu` (default), `cuda` or `cuda:N` (a build with the `cuda` feature,
    /// README "GPU").
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    pub device: crate::device::DeviceSpec,
}

impl ModelArgs {
    /// How to load it, in `dtype` on `--device`. Errors: the device cannot be opened
    /// ([`crate::device::DeviceSpec::open`]).
    pub fn load_options(&self, dtype: candle_core::DType) -> crate::error::Result<crate::model::LoadOptions> {
        Ok(crate::model::LoadOptions { revision: self.revision.clone(), dtype, device: self.device.open()? })
    }
}

/// Run one parsed command line; `eval` and `generate` on a thread of the compute pool
/// ([`crate::process::on_compute_pool`]), as one-process training (see [`train::run`]).
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(a) => train::run(a),
        Command::Eval(a) => on_pool(move || eval::run(a))?,
        Command::Merge(a) => merge::run(a),
        Command::Generate(a) => on_pool(move || generate::run(a))?,
        Command::Data(a) => data::run(a),
        Command::Plot(a) => plot::run(a),
    }
}

/// `f`'s result, `f` run on a thread of the compute pool ([`crate::process::on_compute_pool`]
/// with [`crate::process::COMPUTE_STACK_BYTES`]); errors: the pool's threads cannot start.
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> anyhow::Result<R> {
    use anyhow::Context;
    crate::process::on_compute_pool(crate::process::COMPUTE_STACK_BYTES, f).context("starting the compute threads")
}
