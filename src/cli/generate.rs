//! `ropo generate`.

/// Arguments of `ropo generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {}

/// Run `ropo generate`.
pub fn run(_args: GenerateArgs) -> anyhow::Result<()> {
    anyhow::bail!("`ropo generate` is not implemented yet")
}
