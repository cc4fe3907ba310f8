//! `qosloop-testbed bench export`.

/// Options of `qosloop-testbed bench export`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs the benchmark and prints its report.
pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("bench export is not built yet")
}
