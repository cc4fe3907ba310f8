//! `qosloop-testbed bench meter`.

/// Options of `qosloop-testbed bench meter`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs the benchmark and prints its report.
pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("bench meter is not built yet")
}
