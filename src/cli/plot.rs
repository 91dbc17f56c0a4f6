//! `ropo plot`: training curves from a `metrics.jsonl` into a PNG.

use std::path::PathBuf;

use anyhow::Context;

/// Arguments of `ropo plot`.
#[derive(Debug, clap::Args)]
pub struct PlotArgs {
    /// The metrics file written by `ropo train` (one JSON record a line).
    ///
    /// Train values are read from `loss`, `rewards/accuracies` and `rewards/margins`; eval
    /// values from the same names prefixed `eval/` (or TRL's `eval_`); each record needs a
    /// numeric `step`.
    pub metrics: PathBuf,
    /// Where to write the PNG [default: curves.png beside the metrics file, sweep.png beside
    /// a sweep's results].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The file is a sweep's results.json (`scripts/sweep.py`): draw held-out accuracy and
    /// margin, length ratio and distinct-2 against the KL drift, one line per method.
    #[arg(long)]
    pub sweep: bool,
}

/// Run `ropo plot`.
pub fn run(args: PlotArgs) -> anyhow::Result<()> {
    if args.sweep {
        let out = args.out.unwrap_or_else(|| args.metrics.with_file_name("sweep.png"));
        let runs = crate::sweep_plot::read_runs(&args.metrics)?;
        crate::sweep_plot::plot_sweep(&runs, &out)?;
        println!("wrote {} ({} runs)", out.display(), runs.len());
        return Ok(());
    }
    let out = args.out.unwrap_or_else(|| args.metrics.with_file_name(crate::checkpoint::CURVES_FILE));
    let curves = crate::plot::plot_metrics_file(&args.metrics, &out)
        .with_context(|| format!("plotting {}", args.metrics.display()))?;
    let counts: Vec<String> = curves.panels().iter().map(|(n, s)| format!("{n}: {} train / {} eval points", s.train.len(), s.eval.len())).collect();
    println!("wrote {} ({})", out.display(), counts.join("; "));
    if curves.skipped > 0 {
        println!("skipped {} record(s) without a step", curves.skipped);
    }
    Ok(())
}
