//! `qosloop-testbed bench export`: records/s from the exporter to the
//! collector over loopback — (a) through the protocol into a collector that
//! discards, (b) committed to PostgreSQL (binary COPY) with `fsync=off` and
//! (b') again with PostgreSQL's durable defaults (`fsync=on`,
//! `synchronous_commit=on`: each commit waits for its WAL flush), (c)
//! committed to
//! SQLite (multi-row INSERT, WAL) — and, in the same run, the peer
//! softflowd → nfcapd on a generated pcap with as many flows. Exporter and
//! collector run in this process (the collector's library, as its binary
//! runs it), each with its own tasks.

use crate::harness::{find_binary, free_port, Postgres};
use qosloop_collector::{Config, Sink};
use qosloop_exporter::{Exporter, ExporterConfig};
use qosloop_schema::FlowRecord;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Options of `qosloop-testbed bench export`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Records per run.
    #[arg(long, default_value_t = 1_000_000)]
    pub records: u64,
    /// Records per DATA message.
    #[arg(long, default_value_t = 5000)]
    pub batch: usize,
    /// Flows in the peer's pcap (softflowd → nfcapd).
    #[arg(long, default_value_t = 200_000)]
    pub peer_flows: u32,
    /// Skip the PostgreSQL run.
    #[arg(long)]
    pub no_postgres: bool,
}

fn record(i: u64) -> FlowRecord {
    FlowRecord {
        src_addr: Ipv4Addr::from(0x0a00_0000 + (i as u32 & 0xffff)).into(),
        dst_addr: Ipv4Addr::new(192, 0, 2, 9).into(),
        src_port: (i % 60000) as u16,
        dst_port: 443,
        proto: 17,
        packets: 1,
        bytes: 64 + i % 1400,
        start_ns: 1_700_000_000_000_000_000 + i * 1000,
        end_ns: 1_700_000_000_000_000_000 + i * 1000 + 500,
        ..FlowRecord::default()
    }
}

/// Sends `n` records to a collector on `sink`; returns records/s from the
/// first record to the last acknowledgement.
async fn run_one(sink: Sink, n: u64, batch: usize) -> anyhow::Result<f64> {
    let config = Config {
        listen: "127.0.0.1:0".into(),
        db: "discard:".into(),
        ..Config::default()
    };
    let listener = qosloop_collector::bind(&config).await?;
    let addr = listener.local_addr()?;
    let server =
        tokio::spawn(async move { qosloop_collector::serve(listener, sink, &config).await });
    let mut cfg = ExporterConfig::new(vec![addr.to_string()]);
    cfg.name = "bench".into();
    cfg.batch_records = batch;
    cfg.finish_timeout = Duration::from_secs(600);
    let records: Vec<FlowRecord> = (0..n).map(record).collect();
    let mut ex = Exporter::start(cfg)?;
    let start = Instant::now();
    for r in &records {
        ex.send(r).await?;
    }
    let report = ex.finish().await?;
    let elapsed = start.elapsed().as_secs_f64();
    server.abort();
    anyhow::ensure!(
        report.complete(),
        "not every record acknowledged: {report:?}"
    );
    Ok(n as f64 / elapsed)
}

/// Runs the benchmark and prints its report.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let n = args.records;
    println!(
        "bench export: {n} records, {} per DATA message, loopback",
        args.batch
    );
    let discard = run_one(Sink::Discard, n, args.batch).await?;
    println!(
        "  (a) protocol only, discarding collector: {:>10.0} records/s",
        discard
    );

    let tmp = tempfile::tempdir()?;
    let sqlite_url = format!("sqlite://{}", tmp.path().join("bench.db").display());
    let sqlite = run_one(
        qosloop_collector::open_sink(&sqlite_url).await?,
        n,
        args.batch,
    )
    .await?;
    println!(
        "  (c) committed to SQLite (WAL, multi-row INSERT): {:>10.0} records/s",
        sqlite
    );

    let mut postgres = None;
    if !args.no_postgres {
        match Postgres::available() {
            Ok(()) => {
                let pg = tokio::task::spawn_blocking(Postgres::start).await??;
                let sink = qosloop_collector::open_sink(&pg.url()).await?;
                let rate = run_one(sink, n, args.batch).await?;
                println!(
                    "  (b) committed to PostgreSQL (binary COPY, fsync=off): {:>10.0} records/s",
                    rate
                );
                postgres = Some(rate);
                tokio::task::spawn_blocking(move || drop(pg)).await?;
                // The same with PostgreSQL's durable defaults: every commit
                // waits for its WAL flush (fsync=on, synchronous_commit=on).
                let pg = tokio::task::spawn_blocking(Postgres::start_durable).await??;
                let sink = qosloop_collector::open_sink(&pg.url()).await?;
                let durable = run_one(sink, n, args.batch).await?;
                println!(
                    "  (b') committed to PostgreSQL durably (binary COPY, fsync=on, synchronous_commit=on): {:>10.0} records/s",
                    durable
                );
                tokio::task::spawn_blocking(move || drop(pg)).await?;
            }
            Err(why) => println!("  (b) PostgreSQL skipped: {why}"),
        }
    }

    match peer_softflowd_nfcapd(args.peer_flows, tmp.path()) {
        Ok((flows, rate)) => {
            println!(
                "  peer softflowd -> nfcapd (NetFlow v9 over UDP, {flows} flows received): {:>10.0} flows/s",
                rate
            );
            println!(
                "  ratios vs peer: protocol {:.1}x, SQLite {:.1}x{}",
                discard / rate,
                sqlite / rate,
                postgres
                    .map(|p| format!(", PostgreSQL {:.1}x", p / rate))
                    .unwrap_or_default()
            );
        }
        Err(e) => println!("  peer softflowd -> nfcapd not measured: {e:#}"),
    }
    match peer_nfacctd_sqlite(tmp.path()).await {
        Ok((rows, rate)) => {
            println!(
                "  peer softflowd -> nfacctd -> SQLite (pmacct sqlite3 plugin, {rows} rows): {:>10.0} rows/s",
                rate
            );
            println!(
                "  ratio vs nfacctd->SQLite: qosloop SQLite {:.1}x",
                sqlite / rate
            );
        }
        Err(e) => println!("  peer nfacctd -> SQLite not measured: {e:#}"),
    }
    Ok(())
}

/// softflowd replays the same pcap as NetFlow v9 to pmacct's nfacctd, whose
/// sqlite3 plugin writes one row per flow; returns (rows, rows/s from the
/// start of softflowd to the last new row). nfacctd commits every second
/// (`sql_refresh_time: 1`), so the figure is good to about a second.
async fn peer_nfacctd_sqlite(dir: &Path) -> anyhow::Result<(i64, f64)> {
    let nfacctd = find_binary("nfacctd", &[])
        .ok_or_else(|| anyhow::anyhow!("nfacctd not found (Debian package pmacct)"))?;
    let softflowd = find_binary("softflowd", &[])
        .ok_or_else(|| anyhow::anyhow!("softflowd not found (Debian package softflowd)"))?;
    let schema =
        std::fs::read_to_string("/usr/share/doc/pmacct/sql/pmacct-create-table_v1.sqlite3")?;
    let db_path = dir.join("pmacct.db");
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&db_path)
        .create_if_missing(true)
        // nfacctd holds the write lock for a whole purge of its cache.
        .busy_timeout(Duration::from_secs(120));
    let pool = sqlx::SqlitePool::connect_with(opts).await?;
    sqlx::raw_sql(&schema).execute(&pool).await?;
    let port = free_port()?;
    let conf = dir.join("nfacctd.conf");
    std::fs::write(
        &conf,
        format!(
            "daemonize: false\nnfacctd_ip: 127.0.0.1\nnfacctd_port: {port}\nplugins: sqlite3\n\
             sql_db: {}\nsql_table: acct\nsql_table_version: 1\nsql_refresh_time: 1\n\
             aggregate: src_host, dst_host, src_port, dst_port, proto\n\
             plugin_pipe_size: 104857600\nplugin_buffer_size: 1024000\nnfacctd_pipe_size: 8388608\n",
            db_path.display()
        ),
    )?;
    let mut acctd = tokio::process::Command::new(&nfacctd)
        .arg("-f")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let start = Instant::now();
    let status = tokio::process::Command::new(&softflowd)
        .arg("-r")
        .arg(dir.join("peer.pcap"))
        .args([
            "-v",
            "9",
            "-A",
            "milli",
            "-n",
            &format!("127.0.0.1:{port}"),
            "-p",
        ])
        .arg(dir.join("softflowd-acct.pid"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await?;
    anyhow::ensure!(status.success(), "softflowd failed: {status}");
    let (mut rows, mut last_change) = (0i64, start.elapsed());
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline && start.elapsed() < last_change + Duration::from_secs(4) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM acct")
            .fetch_one(&pool)
            .await?;
        if n != rows {
            rows = n;
            last_change = start.elapsed();
        }
    }
    let _ = acctd.kill().await;
    pool.close().await;
    anyhow::ensure!(rows > 0, "nfacctd stored no rows");
    Ok((rows, rows as f64 / last_change.as_secs_f64()))
}

/// Writes a pcap of `flows` one-packet UDP flows (Ethernet, IPv4).
fn write_pcap(path: &Path, flows: u32) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    f.write_all(&0xa1b2_c3d4u32.to_le_bytes())?;
    f.write_all(&2u16.to_le_bytes())?;
    f.write_all(&4u16.to_le_bytes())?;
    f.write_all(&0i32.to_le_bytes())?;
    f.write_all(&0u32.to_le_bytes())?;
    f.write_all(&65535u32.to_le_bytes())?;
    f.write_all(&1u32.to_le_bytes())?;
    for i in 0..flows {
        let mut pkt = Vec::with_capacity(64);
        pkt.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00]);
        let total_len: u16 = 20 + 8 + 18;
        let src = Ipv4Addr::from(0x0a00_0000 + (i >> 14)).octets();
        let dst = [192, 0, 2, 9];
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
        ip[2..4].copy_from_slice(&total_len.to_be_bytes());
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        let mut sum: u32 = ip
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        pkt.extend_from_slice(&ip);
        let sport = 1024 + (i & 0x3fff) as u16;
        pkt.extend_from_slice(&sport.to_be_bytes());
        pkt.extend_from_slice(&9u16.to_be_bytes());
        pkt.extend_from_slice(&26u16.to_be_bytes());
        pkt.extend_from_slice(&0u16.to_be_bytes());
        pkt.extend_from_slice(&[0u8; 18]);
        let ts_us = u64::from(i) * 10;
        f.write_all(&(1_700_000_000 + (ts_us / 1_000_000) as u32).to_le_bytes())?;
        f.write_all(&((ts_us % 1_000_000) as u32).to_le_bytes())?;
        f.write_all(&(pkt.len() as u32).to_le_bytes())?;
        f.write_all(&(pkt.len() as u32).to_le_bytes())?;
        f.write_all(&pkt)?;
    }
    f.flush()
}

/// softflowd reads the pcap and exports NetFlow v9 to nfcapd on loopback;
/// returns (flows nfcapd stored, flows/s over softflowd's run).
fn peer_softflowd_nfcapd(flows: u32, dir: &Path) -> anyhow::Result<(u64, f64)> {
    let softflowd = find_binary("softflowd", &[])
        .ok_or_else(|| anyhow::anyhow!("softflowd not found (Debian package softflowd)"))?;
    let nfcapd = find_binary("nfcapd", &[])
        .ok_or_else(|| anyhow::anyhow!("nfcapd not found (Debian package nfdump)"))?;
    let nfdump = find_binary("nfdump", &[])
        .ok_or_else(|| anyhow::anyhow!("nfdump not found (Debian package nfdump)"))?;
    let pcap = dir.join("peer.pcap");
    write_pcap(&pcap, flows)?;
    let flow_dir = dir.join("nfcapd");
    std::fs::create_dir_all(&flow_dir)?;
    let port = free_port()?;
    let mut capd = Command::new(&nfcapd)
        .args([
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            "3600",
            "-B",
            "8388608",
            "-w",
        ])
        .arg(&flow_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    let status = Command::new(&softflowd)
        .args(["-r"])
        .arg(&pcap)
        .args([
            "-v",
            "9",
            "-A",
            "milli",
            "-n",
            &format!("127.0.0.1:{port}"),
            "-p",
        ])
        .arg(dir.join("softflowd.pid"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    let elapsed = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(capd.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = capd.wait();
    anyhow::ensure!(status.success(), "softflowd failed: {status}");
    let out = Command::new(&nfdump)
        .arg("-R")
        .arg(&flow_dir)
        .args(["-q", "-o", "fmt:%pr"])
        .output()?;
    let received = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count() as u64;
    anyhow::ensure!(received > 0, "nfcapd stored no flows");
    Ok((received, received as f64 / elapsed))
}
