// TEAM: read /work/TEAM.md now (rules, target dirs, commit policy, DEADLINE 10:35 UTC). Delete this line when you edit this file.
use clap::Parser;
use std::process::ExitCode;

/// qosloop-meter: measures traffic (pcap files or a live interface) into flow records.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: qosloop_schema::telemetry::LogFormat,
}

fn main() -> ExitCode {
    let args = Args::parse();
    qosloop_schema::telemetry::init(args.log_format);
    eprintln!("qosloop-meter: not built yet");
    ExitCode::FAILURE
}
