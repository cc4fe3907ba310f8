use clap::Parser;
use std::process::ExitCode;

/// qosloop-policy-server: computes rates, reads policies and pushes decisions to enforcers.
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
    eprintln!("qosloop-policy-server: not built yet");
    ExitCode::FAILURE
}
