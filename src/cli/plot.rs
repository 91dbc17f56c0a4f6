//! `ropo plot`.

/// Arguments of `ropo plot`.
#[derive(Debug, clap::Args)]
pub struct PlotArgs {}

/// Run `ropo plot`.
pub fn run(_args: PlotArgs) -> anyhow::Result<()> {
    anyhow::bail!("`ropo plot` is not implemented yet")
}
