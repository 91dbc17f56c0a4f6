//! `ropo data ...`.

/// Data subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum DataCommand {
    /// Show format, row counts, drops and token-length percentiles of a preference file.
    Inspect(InspectArgs),
}

/// Arguments of `ropo data inspect`.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {}

/// Run a data subcommand.
pub fn run(cmd: DataCommand) -> anyhow::Result<()> {
    match cmd {
        DataCommand::Inspect(_) => anyhow::bail!("`ropo data inspect` is not implemented yet"),
    }
}
