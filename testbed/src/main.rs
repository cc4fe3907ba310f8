use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// qosloop-testbed: runs qosloop for real — storage self-check, and (as the
/// loop grows) topologies in network namespaces, the paper's experiments and
/// benchmarks against peers.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Log format: text or json.
    #[arg(long, default_value = "text", global = true)]
    log_format: qosloop_schema::telemetry::LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Bring a database to qosloop's schema, store a record, read it back.
    Selfcheck {
        /// Database URL (default: a SQLite file in a temporary directory).
        #[arg(long)]
        db: Option<String>,
        /// Also check a PostgreSQL started for the purpose.
        #[arg(long)]
        postgres: bool,
    },
    /// Remove namespaces left behind by killed testbed runs.
    Clean,
    /// Benchmarks against peers, measured in the same run.
    #[command(subcommand)]
    Bench(Bench),
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Meter: decode + classify + flow cache, regex throughput; vs softflowd, pmacctd.
    Meter(qosloop_testbed::bench::meter::Args),
    /// Export: records/s through the protocol and into SQL; vs nfcapd, nfacctd.
    Export(qosloop_testbed::bench::export::Args),
    /// Enforce: decision change time through netlink; vs forking tc / nft.
    Enforce(qosloop_testbed::bench::enforce::Args),
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    qosloop_schema::telemetry::init(args.log_format);
    match run(args.command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qosloop-testbed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Selfcheck { db, postgres } => {
            let tmp = tempfile::tempdir()?;
            let url = db
                .unwrap_or_else(|| format!("sqlite://{}", tmp.path().join("qosloop.db").display()));
            report(qosloop_testbed::selfcheck::run(&url).await?)?;
            if postgres {
                report(qosloop_testbed::selfcheck::run_postgres().await?)?;
            }
            Ok(())
        }
        Cmd::Bench(Bench::Meter(a)) => qosloop_testbed::bench::meter::run(a).await,
        Cmd::Bench(Bench::Export(a)) => qosloop_testbed::bench::export::run(a).await,
        Cmd::Bench(Bench::Enforce(a)) => qosloop_testbed::bench::enforce::run(a).await,
        Cmd::Clean => {
            let gone = qosloop_testbed::harness::clean_leftovers()?;
            println!(
                "removed {} namespace(s){}",
                gone.len(),
                if gone.is_empty() {
                    String::new()
                } else {
                    format!(": {}", gone.join(", "))
                }
            );
            Ok(())
        }
    }
}

fn report(c: qosloop_testbed::selfcheck::SelfCheck) -> anyhow::Result<()> {
    println!(
        "{}: {} migration(s) applied, {} on re-run; tables: {}",
        c.dialect,
        c.migrations_applied,
        c.migrations_on_rerun,
        c.tables.join(", ")
    );
    anyhow::ensure!(
        c.read_back == c.stored,
        "read back {:?}, stored {:?}",
        c.read_back,
        c.stored
    );
    println!(
        "{}: stored and read back {}",
        c.dialect,
        c.stored.to_json_line()
    );
    Ok(())
}
