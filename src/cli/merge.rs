//! `ropo merge`.

/// Arguments of `ropo merge`.
#[derive(Debug, clap::Args)]
pub struct MergeArgs {}

/// Run `ropo merge`.
pub fn run(_args: MergeArgs) -> anyhow::Result<()> {
    anyhow::bail!("`ropo merge` is not implemented yet")
}
