//! `qosloop-testbed bench cluster`: records/s committed and analysed with
//! 1, 2 and 4 collector nodes on this machine — each node a
//! `qosloop-collector` process on loopback, one CRANE exporter per node in
//! this process, all nodes committing into one PostgreSQL, run once with
//! `fsync=on` (PostgreSQL's durable defaults) and once with `fsync=off`.
//! Per node: the CPU it spent per record committed (`/proc/PID/stat`), which
//! is what predicts scaling on machines with more cores than this one.
//! Records moved between nodes: none — every record is stored by the node
//! that received it, and no analysis here forwards records (0/s, printed).
//!
//! The nodes are plain collectors sharing one database: the collector's
//! cluster flags (`--cluster`, `--node`, `--advertise`) are not passed, so
//! no lease or owner analysis runs beside the ingest measured here;
//! [`cluster_args`] is the one place to add them.

use crate::harness::{find_binary, free_port, Postgres};
use crate::plot::{Chart, Series};
use qosloop_exporter::{Exporter, ExporterConfig};
use qosloop_schema::FlowRecord;
use qosloop_store::Db;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Options of `qosloop-testbed bench cluster`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Records per run (split evenly between the nodes' exporters).
    #[arg(long, default_value_t = 1_000_000)]
    pub records: u64,
    /// Quick form: 100 000 records.
    #[arg(long)]
    pub quick: bool,
    /// Node counts, comma-separated.
    #[arg(long, default_value = "1,2,4", value_delimiter = ',')]
    pub nodes: Vec<usize>,
    /// Records per DATA message.
    #[arg(long, default_value_t = 5000)]
    pub batch: usize,
    /// Where the table and the plot go.
    #[arg(long, default_value = "bench-cluster")]
    pub out: PathBuf,
}

/// The cluster flags of node `index` of `nodes`: none (plain collectors
/// against one database, as the figures in docs/testbed.md were measured).
/// To run the nodes as a cluster:
/// `--cluster bench --node n{index} --advertise 127.0.0.1:{port}`.
fn cluster_args(_index: usize, _nodes: usize, _port: u16) -> Vec<String> {
    Vec::new()
}

fn record(i: u64) -> FlowRecord {
    FlowRecord {
        src_addr: Ipv4Addr::from(0x0a00_0000 + (i as u32 & 0xffff)).into(),
        dst_addr: Ipv4Addr::new(192, 0, 2, (i % 200) as u8 + 1).into(),
        src_port: (i % 60000) as u16,
        dst_port: 443,
        proto: 6,
        packets: 1,
        bytes: 64 + i % 1400,
        start_ns: 1_700_000_000_000_000_000 + i * 1000,
        end_ns: 1_700_000_000_000_000_000 + i * 1000 + 500,
        ..FlowRecord::default()
    }
}

/// A collector node; SIGKILLed and reaped when dropped.
struct Node {
    child: Child,
    port: u16,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// utime + stime of `pid`, seconds (/proc counts in USER_HZ = 100).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds of the PostgreSQL server of `pg`: the postmaster and its
/// children (backends, WAL writer, checkpointer).
fn postgres_cpu(pg: &Postgres) -> f64 {
    let Some(master) = std::fs::read_to_string(pg.dir().join("data/postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
    else {
        return 0.0;
    };
    let mut total = cpu_seconds(master);
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                let rest = s.rsplit_once(')')?.1.to_owned();
                rest.split_whitespace().nth(1)?.parse::<u32>().ok()
            });
        if ppid == Some(master) {
            total += cpu_seconds(pid);
        }
    }
    total
}

/// One run's figures.
#[derive(Debug, Clone)]
struct Run {
    nodes: usize,
    committed_per_s: f64,
    analysed_per_s: f64,
    /// CPU µs per record committed, per node (its own records).
    node_us: Vec<f64>,
    postgres_us: f64,
}

/// `qosloop-collector` next to this binary (or one level up, for test
/// binaries in `deps/`).
fn collector_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dirs: Vec<&Path> = exe.ancestors().skip(1).take(2).collect();
    find_binary("qosloop-collector", &dirs)
        .ok_or_else(|| anyhow::anyhow!("qosloop-collector not found next to {}", exe.display()))
}

async fn run_one(
    pg: &Postgres,
    database: &str,
    nodes: usize,
    args: &Args,
    n: u64,
    dir: &Path,
) -> anyhow::Result<Run> {
    pg.create_database(database)?;
    let url = pg.url_for(database);
    let db = Db::connect(&url).await?;
    db.migrate().await?;
    let bin = collector_bin()?;
    let mut procs = Vec::new();
    for i in 0..nodes {
        let port = free_port()?;
        let log = std::fs::File::create(dir.join(format!("{database}-node{i}.log")))?;
        let child = Command::new(&bin)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--db")
            .arg(&url)
            .args(cluster_args(i, nodes, port))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        procs.push(Node { child, port });
    }
    for p in &procs {
        let limit = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", p.port)).is_err() {
            anyhow::ensure!(Instant::now() < limit, "a collector node did not listen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // The nodes connect to the database after binding.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu0: Vec<f64> = procs.iter().map(|p| cpu_seconds(p.child.id())).collect();
    let pg_cpu0 = postgres_cpu(pg);
    let per = n / nodes as u64;
    let start = Instant::now();
    // The analysis: one reader follows `flows` by id, as the policy
    // server's bandwidth manager polls it. Ids are taken in one order and
    // become visible in another (several writers): the reader counts each
    // id once and goes back to its oldest gap whenever it catches up.
    let reader = {
        let db = db.clone();
        let total = per * nodes as u64;
        tokio::spawn(async move {
            let mut seen = vec![false; (total as usize) * 2 + 2];
            let (mut gap, mut scan, mut read) = (1i64, 1i64, 0u64);
            let limit = Instant::now() + Duration::from_secs(600);
            while read < total && Instant::now() < limit {
                let rows = db.flows_from(scan, 50_000).await?;
                for r in &rows {
                    if let Some(s) = seen.get_mut(r.id as usize) {
                        if !*s {
                            *s = true;
                            read += 1;
                        }
                    }
                }
                while seen.get(gap as usize).copied().unwrap_or(true) && (gap as usize) < seen.len()
                {
                    gap += 1;
                }
                match rows.last() {
                    Some(last) => scan = last.id + 1,
                    None => {
                        scan = gap;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            Ok::<_, sqlx::Error>((read, start.elapsed()))
        })
    };
    let mut senders = Vec::new();
    for (i, p) in procs.iter().enumerate() {
        let mut cfg = ExporterConfig::new(vec![format!("127.0.0.1:{}", p.port)]);
        cfg.name = format!("bench-{i}");
        cfg.batch_records = args.batch;
        cfg.finish_timeout = Duration::from_secs(600);
        let first = i as u64 * per;
        senders.push(tokio::spawn(async move {
            let mut ex = Exporter::start(cfg)?;
            for j in first..first + per {
                ex.send(&record(j)).await?;
            }
            let report = ex.finish().await?;
            anyhow::ensure!(
                report.complete(),
                "not every record acknowledged: {report:?}"
            );
            Ok(start.elapsed())
        }));
    }
    let mut done = Duration::ZERO;
    for s in senders {
        done = done.max(s.await??);
    }
    let node_us = procs
        .iter()
        .zip(&cpu0)
        .map(|(p, c0)| (cpu_seconds(p.child.id()) - c0) * 1e6 / per as f64)
        .collect();
    let postgres_us = (postgres_cpu(pg) - pg_cpu0) * 1e6 / (per * nodes as u64) as f64;
    let (read, analysed_at) = reader.await??;
    let stored: i64 = qosloop_store::on_pool!(&db, p, D => {
        sqlx::query_scalar("SELECT count(*) FROM flows").fetch_one(p).await?
    });
    anyhow::ensure!(
        stored as u64 == per * nodes as u64 && read == stored as u64,
        "stored {stored}, read {read}, sent {}",
        per * nodes as u64
    );
    drop(procs);
    db.close().await;
    Ok(Run {
        nodes,
        committed_per_s: stored as f64 / done.as_secs_f64(),
        analysed_per_s: read as f64 / analysed_at.as_secs_f64(),
        node_us,
        postgres_us,
    })
}

/// Runs the benchmark, prints the table and writes the plot.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let n = if args.quick { 100_000 } else { args.records };
    Postgres::available().map_err(|e| anyhow::anyhow!(e))?;
    std::fs::create_dir_all(&args.out)?;
    let tmp = tempfile::tempdir()?;
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    println!(
        "bench cluster: {n} records per run over CRANE into 1 PostgreSQL; {cores} cores on this machine \
         (every node, exporter and the server share them: scaling beyond {cores} processes busy at once cannot show here)"
    );
    let mut table: Vec<(bool, Run)> = Vec::new();
    for fsync in [true, false] {
        let pg = tokio::task::spawn_blocking(move || {
            if fsync {
                Postgres::start_durable()
            } else {
                Postgres::start()
            }
        })
        .await??;
        for &nodes in &args.nodes {
            let name = format!("cluster_{}_{nodes}", if fsync { "on" } else { "off" });
            let r = run_one(&pg, &name, nodes.max(1), &args, n, tmp.path()).await?;
            table.push((fsync, r));
        }
        tokio::task::spawn_blocking(move || drop(pg)).await?;
    }
    let mut text = String::new();
    text.push_str("| nodes | fsync | committed records/s | analysed records/s | moved between nodes/s | CPU µs/record per node | PostgreSQL CPU µs/record |\n");
    text.push_str("|---|---|---|---|---|---|---|\n");
    for (fsync, r) in &table {
        text.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | 0 | {} | {:.1} |\n",
            r.nodes,
            if *fsync { "on" } else { "off" },
            r.committed_per_s,
            r.analysed_per_s,
            r.node_us
                .iter()
                .map(|u| format!("{u:.1}"))
                .collect::<Vec<_>>()
                .join(" / "),
            r.postgres_us
        ));
    }
    print!("{text}");
    std::fs::write(args.out.join("cluster.md"), &text)?;
    let series = |fsync: bool, name: &str, color| Series {
        name: name.into(),
        color,
        points: table
            .iter()
            .filter(|(f, _)| *f == fsync)
            .map(|(_, r)| (r.nodes as f64, r.committed_per_s))
            .collect(),
    };
    let chart = Chart {
        title: "Records/s committed by N collector nodes into one PostgreSQL (this 2-core machine) beside seeds/000 Fig. 5".into(),
        x_label: "collector nodes".into(),
        y_label: "records/s committed".into(),
        series: vec![
            series(true, "qosloop, fsync=on", "#1f77b4"),
            series(false, "qosloop, fsync=off", "#ff7f0e"),
            Series {
                name: "SCRIPT, seeds/000 Fig. 5 (1 node 250k/s, 8 nodes 600k/s)".into(),
                color: "#7f7f7f",
                points: vec![(1.0, 250_000.0), (8.0, 600_000.0)],
            },
        ],
        ..Chart::default()
    };
    if let Err(e) = chart.write(&args.out, "cluster") {
        println!("  plot: {e:#} (the SVG is written)");
    }
    println!(
        "  written: {}/cluster.md, cluster.svg, cluster.png",
        args.out.display()
    );
    Ok(())
}
