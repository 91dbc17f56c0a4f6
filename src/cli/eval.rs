//! `ropo eval`.

/// Arguments of `ropo eval`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {}

/// Run `ropo eval`.
pub fn run(_args: EvalArgs) -> anyhow::Result<()> {
    anyhow::bail!("`ropo eval` is not implemented yet")
}
