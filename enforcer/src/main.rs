use clap::Parser;
use std::process::ExitCode;

/// qosloop-enforcer: applies decisions in the Linux kernel (HTB, nftables).
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
    eprintln!("qosloop-enforcer: not built yet");
    ExitCode::FAILURE
}
