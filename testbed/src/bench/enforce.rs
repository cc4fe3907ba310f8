//! `qosloop-testbed bench enforce`.

/// Options of `qosloop-testbed bench enforce`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs the benchmark and prints its report.
pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("bench enforce is not built yet")
}
