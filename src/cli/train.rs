//! `ropo train`.

/// Arguments of `ropo train`.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {}

/// Run `ropo train`.
pub fn run(_args: TrainArgs) -> anyhow::Result<()> {
    anyhow::bail!("`ropo train` is not implemented yet")
}
