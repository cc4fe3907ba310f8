use clap::{Parser, Subcommand};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// qosloop-testbed: runs qosloop for real — storage self-check, and (as the
/// loop grows) topologies in network namespaces, the paper's experiments and
/// benchmarks against peers.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Log format: text or json.
    #[arg(long, default_value = "text", global = true)]
    log_format: qosloop_runtime::telemetry::LogFormat,
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
    /// Remove namespaces and test users left behind by killed test runs.
    Clean,
    /// Validate a topology file; with --hold, build it and keep it up until Ctrl-C.
    Topology {
        /// The topology (TOML).
        file: std::path::PathBuf,
        /// Build it and wait for Ctrl-C, then remove it.
        #[arg(long)]
        hold: bool,
    },
    /// The reference experiment of seeds/004 §IV, every component real.
    Paper(qosloop_testbed::paper::PaperArgs),
    /// Loss against offered throughput through the enforced router (Fig. 11).
    Loss(qosloop_testbed::loss::LossArgs),
    /// DiCAP: packets captured by 1, 2, 4 nodes sharing a mirrored link (seeds/000 Fig. 6).
    Dicap(qosloop_testbed::dicap::DicapArgs),
    /// Reconfiguration time per decision change, as a distribution.
    Reconfig(qosloop_testbed::reconfig::ReconfigArgs),
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
    /// IPFIX ingest: one stream over UDP into qosloop's decoder and collector
    /// (SQLite, PostgreSQL); vs nfcapd, nfacctd.
    Ipfix(qosloop_testbed::bench::ipfix::Args),
    /// Host agent: throughput over veth with and without it; ns per packet.
    Agent(qosloop_testbed::bench::agent::Args),
    /// Collector nodes: records/s committed and analysed with 1, 2, 4 nodes
    /// into one PostgreSQL; CPU per record per node; vs seeds/000 Fig. 5.
    Cluster(qosloop_testbed::bench::cluster::Args),
    /// Console API: top-N and a 24-hour series over 10M records vs a plain
    /// GROUP BY; SSE fan-out with a slow client.
    Api(qosloop_testbed::bench::api::Args),
    /// Knowledge base on PostgreSQL: updates/s with and without it; event
    /// latency p50/p99 from a record's commit to an SSE client.
    Kb(qosloop_testbed::bench::kb::Args),
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    qosloop_runtime::telemetry::init(args.log_format);
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
        Cmd::Bench(Bench::Ipfix(a)) => qosloop_testbed::bench::ipfix::run(a).await,
        Cmd::Bench(Bench::Agent(a)) => qosloop_testbed::bench::agent::run(a).await,
        Cmd::Bench(Bench::Cluster(a)) => qosloop_testbed::bench::cluster::run(a).await,
        Cmd::Bench(Bench::Api(a)) => qosloop_testbed::bench::api::run(a).await,
        Cmd::Bench(Bench::Kb(a)) => qosloop_testbed::bench::kb::run(a).await,
        Cmd::Paper(a) => {
            let stop = interrupt_flag();
            let out = a.out.clone();
            let summary =
                tokio::task::spawn_blocking(move || qosloop_testbed::paper::run(&a, stop))
                    .await??;
            for p in &summary.phases {
                println!(
                    "{:<6} {:>3}-{:<3}s load {:>6} kbit/s  out {:>5.0} kbit/s (target {:.0})  {}",
                    p.phase,
                    p.start_s,
                    p.end_s,
                    p.mean_link_load_kbps
                        .map(|l| format!("{l:.0}"))
                        .unwrap_or_else(|| "-".into()),
                    p.mean_out_kbps,
                    p.target_out_kbps,
                    if p.output_ok && p.load_in_band {
                        "ok"
                    } else {
                        "OFF"
                    }
                );
            }
            println!("reaction (s): {:?}", summary.reaction_s);
            println!(
                "reconfig: median {:?} us, p99 {:?} us",
                summary.reconfig_us.median, summary.reconfig_us.p99
            );
            println!(
                "wrote {}/summary.json, report.md, fig9-link-load.svg/.png, fig10-output.svg/.png",
                out.display()
            );
            // A run whose phases miss their bands did not reproduce the
            // paper: say which and by how much, and exit non-zero.
            let misses = summary.misses();
            for m in &misses {
                eprintln!("qosloop-testbed paper: MISSED {m}");
            }
            anyhow::ensure!(
                misses.is_empty(),
                "{} miss(es) in {} phase(s): the run did not stay in the paper's bands",
                misses.len(),
                summary.phases.len()
            );
            Ok(())
        }
        Cmd::Loss(a) => {
            let stop = interrupt_flag();
            let s =
                tokio::task::spawn_blocking(move || qosloop_testbed::loss::run(&a, stop)).await??;
            for st in &s.steps {
                println!(
                    "{:>5.1} Mbit/s offered  {:>6.2} sent  {:>6.2} received  loss {:.2}%",
                    st.offered_mbps, st.sent_mbps, st.received_mbps, st.loss_pct
                );
            }
            println!("loss-free up to {:.0}% of the link", s.loss_free_up_to_pct);
            Ok(())
        }
        Cmd::Dicap(a) => {
            let stop = interrupt_flag();
            let out = a.out.clone();
            tokio::task::spawn_blocking(move || qosloop_testbed::dicap::run(&a, stop)).await??;
            println!(
                "wrote {}/summary.json, report-dicap.md, fig6-dicap.svg/.png",
                out.display()
            );
            Ok(())
        }
        Cmd::Reconfig(a) => {
            let s =
                tokio::task::spawn_blocking(move || qosloop_testbed::reconfig::run(&a)).await??;
            let f = |p: &qosloop_testbed::paper::Percentiles| {
                format!(
                    "median {:.1} us, p99 {:.1} us over {}",
                    p.median.unwrap_or(f64::NAN),
                    p.p99.unwrap_or(f64::NAN),
                    p.count
                )
            };
            println!("shape-rate change: {}", f(&s.rate_change_us));
            println!("action change:     {}", f(&s.action_change_us));
            println!("paper (XORP+Click): ~45 us");
            Ok(())
        }
        Cmd::Topology { file, hold } => {
            let topo = qosloop_testbed::topology::Topology::load(&file)?;
            println!(
                "{}: {} host(s), {} link(s), {} route(s): valid",
                file.display(),
                topo.hosts.len(),
                topo.links.len(),
                topo.routes.len()
            );
            if hold {
                let tb = tokio::task::spawn_blocking(move || topo.build()).await??;
                for (host, ns) in tb.namespaces() {
                    println!("{host}: ip netns exec {ns} …");
                }
                println!("up; Ctrl-C removes it");
                tokio::signal::ctrl_c().await?;
                drop(tb);
            }
            Ok(())
        }
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
            let users = qosloop_testbed::harness::clean_leftover_users()?;
            println!(
                "removed {} test user(s){}",
                users.len(),
                if users.is_empty() {
                    String::new()
                } else {
                    format!(": {}", users.join(", "))
                }
            );
            Ok(())
        }
    }
}

/// A flag set by Ctrl-C, so that experiments stop and clean up.
fn interrupt_flag() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("qosloop-testbed: interrupted, cleaning up");
            flag.store(true, Ordering::Relaxed);
        }
    });
    stop
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
