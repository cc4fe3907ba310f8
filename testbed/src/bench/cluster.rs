//! `qosloop-testbed bench cluster`: records/s committed and analysed with
//! 1, 2 and 4 collector nodes on this machine — each node a
//! `qosloop-collector --cluster` process on loopback, one CRANE exporter per
//! node in this process, all nodes committing into one PostgreSQL, run once
//! with `fsync=on` (PostgreSQL's durable defaults) and once with
//! `fsync=off`. Per node: the CPU it spent per record committed
//! (`/proc/PID/stat`), which is what predicts scaling on machines with more
//! cores than this one.
//!
//! The nodes run as a cluster ([`cluster_args`]): a policy of 16 rules and
//! one link is published, each node adds what it stores to its partial
//! sums, and the owner of each subject's bucket computes its rates.
//! "Analysed" is the owners' analysis: the records counted in the `rates`
//! rows the owners wrote, over the same time as the commits (a record is
//! classified and summed in its commit's transaction; the owner combines
//! per subject and window, not per record), with the records stored but
//! not counted (late) and the owners' delay: how long after a window
//! closed (its end plus the lag) its rate was written, at worst. "Moved" is what crosses nodes:
//! no record (each is stored and summed by the node that received it), but
//! the partial-sum rows an owner reads from the other nodes — sampled from
//! `rate_partials` during the run (before they are pruned).

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
    /// The cluster's lag (`--cluster-lag-ms` of every node): a window is
    /// closed this long after its end. It must exceed the longest time a
    /// record waits between its end and its commit, or the record is late
    /// (stored, not in its window's rate); the run then waits this long for
    /// the last window. The default covers an exporter sending 1,000,000
    /// records flat out, which queues many seconds ahead of the commits; a
    /// short lag is enough only when the exporters cannot get far ahead (a
    /// small record count), as in the test.
    #[arg(long, default_value_t = DEFAULT_LAG_MS)]
    pub lag_ms: u64,
}

/// The rate window the bench's cluster runs with, ms.
const INTERVAL_MS: u64 = 1000;
/// The default lag ([`Args::lag_ms`]): longer than any record waits for its
/// commit in the full runs (an exporter sending flat out queues ahead of
/// the commits), so that every record counts in its window.
pub const DEFAULT_LAG_MS: u64 = 30_000;
/// Rules of the published policy (records spread over them by port).
const RULES: u16 = 16;

/// The cluster flags of node `index`, listening on `port`, with the lag.
fn cluster_args(cluster: &str, index: usize, port: u16, lag_ms: u64) -> Vec<String> {
    vec![
        "--cluster".into(),
        cluster.into(),
        "--node".into(),
        format!("n{index}"),
        "--advertise".into(),
        format!("127.0.0.1:{port}"),
        "--cluster-interval-ms".into(),
        INTERVAL_MS.to_string(),
        "--cluster-lag-ms".into(),
        lag_ms.to_string(),
    ]
}

/// The policy the bench publishes: rule `k` selects destination port
/// 5000 + k; every rule counts for one link.
fn policy() -> qosloop_schema::PolicySet {
    use qosloop_schema::{BusinessRule, FlowSpec, Kbps, Link, PolicySet, PortRange};
    PolicySet {
        rules: (0..RULES)
            .map(|k| BusinessRule {
                dn: format!("cn=r{k},ou=rules"),
                name: format!("r{k}"),
                priority: 10,
                enabled: true,
                roles: vec![],
                flows: vec![FlowSpec {
                    proto: Some(6),
                    dst_ports: Some(PortRange::single(5000 + k)),
                    ..Default::default()
                }],
                users: vec![],
                per_user: false,
                band_basis: Default::default(),
                service_class: "gold".into(),
                link: "edge".into(),
            })
            .collect(),
        links: vec![Link {
            dn: "cn=edge".into(),
            name: "edge".into(),
            capacity: Kbps(10_000_000),
            traffic: vec![],
        }],
        ..Default::default()
    }
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Record `i`, ending now (the owners compute windows of the present).
fn record(i: u64) -> FlowRecord {
    let end = now_ns();
    FlowRecord {
        src_addr: Ipv4Addr::from(0x0a00_0000 + (i as u32 & 0xffff)).into(),
        dst_addr: Ipv4Addr::new(192, 0, 2, (i % 200) as u8 + 1).into(),
        src_port: (i % 60000) as u16,
        dst_port: 5000 + (i % u64::from(RULES)) as u16,
        proto: 6,
        packets: 1,
        bytes: 64 + i % 1400,
        start_ns: end - 1_000_000,
        end_ns: end,
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
    /// Records stored but not in a window's rate (committed after it
    /// closed).
    late: i64,
    /// The stalest rate: written this long after its window closed, ms.
    owner_delay_ms: f64,
    /// Partial-sum rows read by an owner from another node, per second,
    /// and the records they summed.
    moved_rows_per_s: f64,
    moved_records_per_s: f64,
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
    db.publish_policy(&serde_json::to_string(&policy())?)
        .await?;
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
            .args(cluster_args(database, i, port, args.lag_ms))
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
    // The nodes join, agree on an epoch and follow the published policy
    // (checked every 200 ms).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cpu0: Vec<f64> = procs.iter().map(|p| cpu_seconds(p.child.id())).collect();
    let pg_cpu0 = postgres_cpu(pg);
    let per = n / nodes as u64;
    let start = Instant::now();
    // What crosses nodes: the partial-sum rows, sampled every 500 ms (a
    // row lives at least the lag plus four windows before it is pruned).
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let sampler = {
        let db = db.clone();
        tokio::spawn(async move {
            let mut rows: std::collections::HashMap<(String, String, i64, String), i64> =
                Default::default();
            loop {
                let got: Vec<(String, String, i64, String, i64)> = qosloop_store::on_pool!(&db, p, D => {
                    sqlx::query_as("SELECT kind, subject, slot, node, records FROM rate_partials")
                        .fetch_all(p).await?
                });
                for (k, s, slot, node, r) in got {
                    let e = rows.entry((k, s, slot, node)).or_default();
                    *e = (*e).max(r);
                }
                if *stop_rx.borrow() {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = stop_rx.changed() => {}
                }
            }
            Ok::<_, sqlx::Error>(rows)
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
    let stored: i64 = qosloop_store::on_pool!(&db, p, D => {
        sqlx::query_scalar("SELECT count(*) FROM flows").fetch_one(p).await?
    });
    anyhow::ensure!(
        stored as u64 == per * nodes as u64,
        "stored {stored}, sent {}",
        per * nodes as u64
    );
    // The owners' analysis: wait until every subject's windows up to the
    // last record's are written.
    let width = (INTERVAL_MS * 1_000_000) as i64;
    let last_end = now_ns() as i64;
    let subjects = i64::from(RULES) + 1;
    let limit = Instant::now() + Duration::from_secs(60) + Duration::from_millis(args.lag_ms);
    loop {
        let done: i64 = qosloop_store::on_pool!(&db, p, D => {
            sqlx::query_scalar("SELECT count(*) FROM rate_state WHERE window_end_ns > $1")
                .bind(last_end.div_euclid(width) * width).fetch_one(p).await?
        });
        if done >= subjects {
            break;
        }
        anyhow::ensure!(
            Instant::now() < limit,
            "the owners did not compute every window"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop_tx.send(true);
    let sampled = sampler.await??;
    type RateRow = (String, i64, String, i64, i64);
    let rates: Vec<RateRow> = qosloop_store::on_pool!(&db, p, D => {
        sqlx::query_as("SELECT name, at_ns, node, records, computed_ns FROM rates \
                        WHERE node IS NOT NULL AND subject = 'flow' AND records > 0")
            .fetch_all(p).await?
    });
    let analysed: i64 = rates.iter().map(|r| r.3).sum();
    let lag_ns = i64::try_from(args.lag_ms.saturating_mul(1_000_000)).unwrap_or(i64::MAX);
    let owner_delay_ms = rates
        .iter()
        .map(|r| (r.4 - r.1 - lag_ns) as f64 / 1e6)
        .fold(0.0, f64::max);
    let analysed_secs = done.as_secs_f64().max(1e-3);
    // The owner of each rule's window, from the rows it wrote.
    let owner: std::collections::HashMap<(String, i64), String> = rates
        .iter()
        .map(|r| {
            (
                (format!("cn={},ou=rules", r.0), r.1 / width - 1),
                r.2.clone(),
            )
        })
        .collect();
    let (mut moved_rows, mut moved_records) = (0u64, 0i64);
    for ((kind, subject, slot, node), records) in &sampled {
        if kind != "flow" {
            continue;
        }
        if let Some(o) = owner.get(&(subject.clone(), *slot)) {
            if o != node {
                moved_rows += 1;
                moved_records += records;
            }
        }
    }
    drop(procs);
    db.close().await;
    Ok(Run {
        nodes,
        committed_per_s: stored as f64 / done.as_secs_f64(),
        analysed_per_s: analysed as f64 / analysed_secs,
        late: stored - analysed,
        owner_delay_ms,
        moved_rows_per_s: moved_rows as f64 / analysed_secs,
        moved_records_per_s: moved_records as f64 / analysed_secs,
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
        "bench cluster: {n} records per run over CRANE into 1 PostgreSQL, cluster lag {} ms; {cores} cores on this machine \
         (every node, exporter and the server share them: scaling beyond {cores} processes busy at once cannot show here)",
        args.lag_ms
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
    text.push_str("| nodes | fsync | committed records/s | analysed records/s (owners) | late records | owners' delay after close, ms | records moved between nodes/s | partial-sum rows read across nodes/s (records summed) | CPU µs/record per node | PostgreSQL CPU µs/record |\n");
    text.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    for (fsync, r) in &table {
        text.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {} | {:.0} | 0 | {:.1} ({:.0}) | {} | {:.1} |\n",
            r.nodes,
            if *fsync { "on" } else { "off" },
            r.committed_per_s,
            r.analysed_per_s,
            r.late,
            r.owner_delay_ms,
            r.moved_rows_per_s,
            r.moved_records_per_s,
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
