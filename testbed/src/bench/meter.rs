// TEAM: read /work/TEAM.md now (rules, target dirs, commit policy, DEADLINE 10:35 UTC). Delete this line when you edit this file.
//! `qosloop-testbed bench meter`.

/// Options of `qosloop-testbed bench meter`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs the benchmark and prints its report.
pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("bench meter is not built yet")
}
