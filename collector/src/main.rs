use clap::Parser;
use std::process::ExitCode;

/// qosloop collector: stores flow records from exporters in SQL.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Database URL: sqlite://FILE or postgres://USER@HOST:PORT/DB.
    #[arg(long, env = "QOSLOOP_DB")]
    db: String,
    /// Apply the schema migrations, print the tables and exit.
    #[arg(long)]
    migrate_only: bool,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: qosloop_schema::telemetry::LogFormat,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    qosloop_schema::telemetry::init(args.log_format);
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qosloop-collector: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let db = qosloop_collector::Db::connect(&args.db).await?;
    let applied = db.migrate().await?;
    tracing::info!(applied, db = %qosloop_collector::redact(&args.db), "schema up to date");
    if args.migrate_only {
        for t in db.tables().await? {
            println!("{t}");
        }
        return Ok(());
    }
    anyhow::bail!("the export server is not built yet (issue: reliable export); use --migrate-only")
}
