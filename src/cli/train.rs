//! `ropo train --config FILE.toml [--set key=value ...] [--resume [DIR]] [--overwrite] [--print-config]`.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use anyhow::Context;

use crate::config::RunConfig;
use crate::train::{self, Outcome, TrainOptions, STOP_REQUESTED};

/// Arguments of `ropo train`.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// The run's TOML config ([model], [data], [adapter], [training]).
    #[arg(long, value_name = "FILE.toml")]
    pub config: PathBuf,
    /// Override a config value: `--set training.beta=0.2` (repeatable; TOML values).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue a run from its newest complete checkpoint; DIR defaults to training.output_dir.
    #[arg(long, value_name = "DIR", num_args = 0..=1)]
    pub resume: Option<Option<PathBuf>>,
    /// Replace the ropo run already in training.output_dir.
    #[arg(long)]
    pub overwrite: bool,
    /// Print the fully resolved config (defaults filled in) and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Train on this device: `cpu`, `cuda` or `cuda:N` (overrides model.device; CUDA needs a
    /// build with the `cuda` feature, README "GPU").
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<crate::device::DeviceSpec>,
}

/// Run `ropo train`: threads from `training.threads` (else `RAYON_NUM_THREADS`, else all cores),
/// a Ctrl-C handler that sets [`STOP_REQUESTED`] (a second Ctrl-C exits at once, code 130),
/// then [`train::run_in`] over [`crate::collective::from_launch`] (one process, or one rank of
/// an `mpirun`/`srun` job with the `mpi` feature; a failing rank aborts the job); one process
/// trains on a compute thread ([`crate::process::on_compute_pool`]).
pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    // --device is model.device, validated with the rest of the config
    let mut set = args.set.clone();
    if let Some(d) = args.device {
        set.push(format!("model.device=\"{d}\""));
    }
    let mut cfg = RunConfig::load(Some(&args.config), &set)?;
    if args.overwrite {
        cfg.training.overwrite = true;
    }
    if args.print_config {
        print!("{}", cfg.to_toml_string());
        return Ok(());
    }
    crate::process::configure_threads(cfg.training.threads);
    ctrlc::set_handler(|| {
        if STOP_REQUESTED.swap(true, Ordering::SeqCst) {
            eprintln!("\nropo: second interrupt, exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\nropo: interrupt: a checkpoint will be written at the end of this step (Ctrl-C again to quit now)");
    })
    .context("installing the Ctrl-C handler")?;
    let resume = args.resume.map(|d| d.unwrap_or_else(|| PathBuf::from(&cfg.training.output_dir)));
    let opts = TrainOptions { resume, progress: true };
    // one process, or (launched by mpirun/srun, `mpi` feature) one rank of a data-parallel run
    let world = crate::collective::from_launch()?;
    let result = match world.size() {
        // one process: on a compute thread (process::on_compute_pool); MPI calls stay on the
        // thread that initialised MPI
        1 => super::on_pool(|| train::run(&cfg, &opts))?,
        _ => train::run_in(&cfg, &opts, world.as_ref()),
    };
    let summary = match result {
        Ok(s) => s,
        Err(e) if world.size() > 1 => {
            // the other ranks may wait in an exchange: stop them all (MPI_Abort)
            eprintln!("ropo: rank {} of {}: {}", world.rank(), world.size(), crate::model::hub::redact_token(&format!("{e:#}")));
            world.abort(2)
        }
        Err(e) => return Err(e.into()),
    };
    if !world.is_main() {
        return Ok(());
    }
    if let (Some(a), Some(b)) = (&summary.first_eval, &summary.last_eval) {
        eprintln!(
            "eval before -> after: loss {:.4} -> {:.4}, rewards/accuracies {:.3} -> {:.3}, rewards/ties {:.3} -> {:.3}, rewards/margins {:.4} -> {:.4}",
            a.loss,
            b.loss,
            a.rewards.rewards_accuracies,
            b.rewards.rewards_accuracies,
            a.rewards.rewards_ties,
            b.rewards.rewards_ties,
            a.rewards.rewards_margins,
            b.rewards.rewards_margins
        );
    }
    if let Outcome::Interrupted { step, .. } = summary.outcome {
        eprintln!("ropo: stopped after step {step} by Ctrl-C");
    }
    Ok(())
}
