//! `qosloop-testbed bench ipfix`: one IPFIX stream (the meter's encoder,
//! ≥ 2M records by default) replayed over UDP on loopback — first at a
//! fixed rate, then flat out — into each receiver in turn: qosloop's
//! decoder in this process (decode only), the `qosloop-collector` binary
//! committing to SQLite and to PostgreSQL (`--ipfix-listen`), nfcapd, and
//! pmacct's nfacctd. For each: records stored, kernel receive drops (the
//! `drops` column of `/proc/net/udp` for the receiver's socket) and
//! records/s (records stored per second from the first datagram until the
//! socket's queue is empty and, for SQL, the last row is committed);
//! ratios against nfcapd. Before that, the decoder alone on one core
//! (no socket): records/s per core. After it, the rate ladder
//! ([`super::ipfix_ladder`]).

use crate::harness::{find_binary, free_port, Postgres};
use qosloop_collector::ipfix::{Decoder, Limits};
use qosloop_exporter::ipfix::Encoder;
use qosloop_schema::FlowRecord;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Options of `qosloop-testbed bench ipfix`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Records in the stream.
    #[arg(long, default_value_t = 2_000_000)]
    pub records: u64,
    /// Quick form: 200 000 records.
    #[arg(long)]
    pub quick: bool,
    /// Records/s of the fixed-rate phase.
    #[arg(long, default_value_t = 500_000)]
    pub rate: u64,
    /// Receive buffer asked of every receiver (bytes), at most
    /// net.core.rmem_max so that every receiver gets the same (the peers'
    /// SO_RCVBUF is capped there, the collector's SO_RCVBUFFORCE is not).
    #[arg(long, default_value_t = 16 << 20)]
    pub rcvbuf: usize,
    /// Receive buffer asked of the collector alone (SO_RCVBUFFORCE, not
    /// capped by rmem_max), to see what a larger buffer buys it; the
    /// peers keep `--rcvbuf`.
    #[arg(long)]
    pub collector_rcvbuf: Option<usize>,
    /// Skip the PostgreSQL runs.
    #[arg(long)]
    pub no_postgres: bool,
    /// fsync interval of the collector's journal in the journal run, ms
    /// (0: every append).
    #[arg(long, default_value_t = 20)]
    pub journal_fsync_ms: u64,
    /// Receiving threads of the collector (`--ipfix-udp-threads`).
    #[arg(long, default_value_t = 1)]
    pub udp_threads: usize,
    /// Offered rates of the ladder, records/s, comma-separated: each
    /// receiver is run at each rate in turn until it loses more than
    /// `--ladder-loss` percent.
    #[arg(long, value_delimiter = ',', default_values_t = [500_000u64, 1_000_000, 1_500_000, 2_000_000, 3_000_000, 4_000_000, 6_000_000])]
    pub ladder: Vec<u64>,
    /// Loss (percent) a receiver may show and still pass a ladder step.
    #[arg(long, default_value_t = 0.1)]
    pub ladder_loss: f64,
    /// Skip the ladder.
    #[arg(long)]
    pub no_ladder: bool,
}

/// The stream: IPFIX messages of at most 1392 bytes (1400 bytes of IP
/// payload), each with its record count.
pub(super) struct Stream {
    datagrams: Vec<(Vec<u8>, u64)>,
    pub(super) records: u64,
}

fn record(i: u64) -> FlowRecord {
    FlowRecord {
        src_addr: Ipv4Addr::from(0x0a00_0000 | (i as u32 & 0x00ff_ffff)).into(),
        dst_addr: Ipv4Addr::new(192, 0, 2, (i % 200) as u8 + 1).into(),
        src_port: 1024 + (i % 60000) as u16,
        dst_port: [443, 80, 53, 8080][(i % 4) as usize],
        proto: if i % 4 == 2 { 17 } else { 6 },
        // One packet per record: the peers' packet sums count records.
        packets: 1,
        bytes: 40 + i % 1460,
        start_ns: 1_704_067_200_000_000_000 + i * 1_000_000,
        end_ns: 1_704_067_200_000_000_000 + i * 1_000_000 + 250_000_000,
        dscp: Some((i % 64) as u8),
        tcp_flags: (i % 4 != 2).then_some(0x1b),
        class: (i % 3 == 0).then(|| "bulk".to_owned()),
        ..FlowRecord::default()
    }
}

impl Stream {
    fn generate(n: u64) -> anyhow::Result<Stream> {
        let mut enc = Encoder::new(1, 1392, false)?;
        let mut datagrams = Vec::with_capacity((n / 20) as usize + 1);
        let mut in_msg = 0u64;
        let export_time = 1_704_067_300;
        for i in 0..n {
            if let Some(m) = enc.push(&record(i), export_time) {
                datagrams.push((m, in_msg));
                in_msg = 0;
            }
            in_msg += 1;
            // A template refresh every 1000 messages, as an exporter would.
            if datagrams.len() % 1000 == 999 && in_msg == 1 {
                enc.forget_templates();
            }
        }
        if let Some(m) = enc.finish(export_time) {
            datagrams.push((m, in_msg));
        }
        Ok(Stream {
            datagrams,
            records: n,
        })
    }

    fn bytes(&self) -> usize {
        self.datagrams.iter().map(|(d, _)| d.len()).sum()
    }
}

/// The decoder alone on this thread: records/s per core.
fn decode_per_core(stream: &Stream) -> anyhow::Result<f64> {
    let from: SocketAddr = "127.0.0.1:40000".parse()?;
    let mut best = 0f64;
    let mut out = Vec::with_capacity(64);
    // Three passes, the best: the first warms caches and allocator.
    for _ in 0..3 {
        let mut dec = Decoder::new(Limits::default());
        let mut n = 0u64;
        let t = Instant::now();
        for (d, _) in &stream.datagrams {
            out.clear();
            let _ = dec.decode_udp(from, d, 0, &mut out);
            n += out.len() as u64;
        }
        let secs = t.elapsed().as_secs_f64();
        anyhow::ensure!(
            n == stream.records,
            "decoded {n} of {} records",
            stream.records
        );
        best = best.max(n as f64 / secs);
    }
    Ok(best)
}

/// Sends the stream to `port`: at `rate` records/s, or flat out. Returns
/// when the last datagram left.
fn send(stream: &Stream, port: u16, rate: Option<u64>) -> anyhow::Result<Duration> {
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.connect(("127.0.0.1", port))?;
    let start = Instant::now();
    let mut sent_records = 0u64;
    for (d, n) in &stream.datagrams {
        if let Some(rate) = rate {
            // Paced: never ahead of rate × elapsed.
            loop {
                let allowed = (start.elapsed().as_secs_f64() * rate as f64) as u64;
                if sent_records < allowed {
                    break;
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        // Loopback refuses with ENOBUFS rarely; such a datagram is lost
        // like a drop and shows in the stored count.
        let _ = sock.send(d);
        sent_records += n;
    }
    Ok(start.elapsed())
}

/// `(rx_queue bytes, drops)` of the UDP sockets bound to 127.0.0.1:`port`,
/// summed (a receiver may bind several with SO_REUSEPORT); `None` when
/// none is bound.
fn udp_socket_state(port: u16) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/net/udp").ok()?;
    let want = format!("0100007F:{port:04X}");
    let mut found = None;
    for l in text.lines().skip(1) {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.get(1) != Some(&want.as_str()) {
            continue;
        }
        let rx = f
            .get(4)
            .and_then(|q| q.split(':').nth(1))
            .and_then(|q| u64::from_str_radix(q, 16).ok())
            .unwrap_or(0);
        let drops = f.last().and_then(|d| d.parse::<u64>().ok()).unwrap_or(0);
        let (r, d) = found.unwrap_or((0, 0));
        found = Some((r + rx, d + drops));
    }
    found
}

/// Waits (at most 120 s) until the socket's queue stays empty for 100 ms;
/// returns when it first emptied.
fn wait_drained(port: u16, start: Instant) -> Duration {
    let limit = Instant::now() + Duration::from_secs(120);
    let mut empty_since: Option<Instant> = None;
    while Instant::now() < limit {
        let rx = udp_socket_state(port).map_or(0, |s| s.0);
        match (rx, empty_since) {
            (0, None) => empty_since = Some(Instant::now()),
            (0, Some(t)) if t.elapsed() >= Duration::from_millis(100) => {
                return t.duration_since(start);
            }
            (0, Some(_)) => {}
            _ => empty_since = None,
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    start.elapsed()
}

/// One receiver's figures in one phase.
#[derive(Debug, Clone)]
pub(super) struct Row {
    pub(super) stored: u64,
    pub(super) drops: u64,
    pub(super) secs: f64,
    /// Seconds the sender took for the whole stream.
    pub(super) sent_secs: f64,
    /// Journal run: seconds from "durable in the journal" until the loader
    /// had every record committed to SQL, and the records it committed.
    load: Option<(f64, u64)>,
}

impl Row {
    pub(super) fn rate(&self) -> f64 {
        self.stored as f64 / self.secs.max(1e-9)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Decoder,
    CollectorSqlite,
    CollectorPostgres,
    CollectorJournal,
    CollectorJournalOnly,
    Nfcapd,
    Nfacctd,
}

impl Kind {
    pub(super) fn label(self) -> &'static str {
        match self {
            Kind::Decoder => "qosloop decoder (in-process, decode only)",
            Kind::CollectorSqlite => "qosloop-collector -> SQLite",
            Kind::CollectorPostgres => "qosloop-collector -> PostgreSQL",
            Kind::CollectorJournal => "qosloop-collector -> journal (-> SQLite)",
            Kind::CollectorJournalOnly => "qosloop-collector -> journal (no SQL)",
            Kind::Nfcapd => "nfcapd (nfdump 1.7)",
            Kind::Nfacctd => "nfacctd (pmacct, print plugin)",
        }
    }
}

/// A child process stopped (its stop signal, then SIGKILL) when dropped.
/// nfacctd stops on SIGINT (it ignores SIGTERM, and killed it leaves its
/// plugin process behind); the others on SIGTERM.
struct Peer(Child, nix::sys::signal::Signal);

impl Peer {
    fn stop(&mut self) {
        if let Ok(Some(_)) = self.0.try_wait() {
            return;
        }
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), self.1);
        let limit = Instant::now() + Duration::from_secs(10);
        while Instant::now() < limit {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn(cmd: &mut Command, log: &Path) -> anyhow::Result<Peer> {
    let f = std::fs::File::create(log)?;
    Ok(Peer(
        cmd.stdout(Stdio::null()).stderr(Stdio::from(f)).spawn()?,
        nix::sys::signal::Signal::SIGTERM,
    ))
}

/// Waits until `port` is bound on 127.0.0.1 (at most 10 s).
fn wait_bound(port: u16) -> anyhow::Result<()> {
    let limit = Instant::now() + Duration::from_secs(10);
    while Instant::now() < limit {
        if udp_socket_state(port).is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    anyhow::bail!("nothing bound UDP port {port} within 10 s")
}

fn component(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.to_path_buf();
    find_binary(name, &[&dir])
}

/// Counts rows of `flows` until the count stops growing for 1.5 s;
/// returns the count and when it last grew.
async fn settle_rows(url: &str, start: Instant) -> anyhow::Result<(u64, Duration)> {
    let db = qosloop_store::Db::connect(url).await?;
    let (mut last, mut grew_at) = (0u64, start.elapsed());
    let mut still = Instant::now();
    let limit = Instant::now() + Duration::from_secs(300);
    while Instant::now() < limit && still.elapsed() < Duration::from_millis(1500) {
        let n: i64 = qosloop_store::on_pool!(&db, p, D => {
            sqlx::query_scalar("SELECT count(*) FROM flows")
                .fetch_one(p)
                .await?
        });
        if n as u64 != last {
            last = n as u64;
            grew_at = start.elapsed();
            still = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    db.close().await;
    Ok((last, grew_at))
}

fn journal_value(dir: &Path, key: &str) -> u64 {
    qosloop_collector::journal::read_status(dir)
        .into_iter()
        .find(|(k, _)| k == key)
        .map_or(0, |(_, v)| v)
}

/// Watches a collector's journal status: records synced (durable in the
/// journal) until the count holds for 1 s, and when it reached its final
/// value; then until the loader has committed them all to SQL (at most
/// 300 s): `(synced, synced_at, loaded_at, loaded)`.
fn settle_journal(dir: &Path, start: Instant) -> (u64, Duration, Duration, u64) {
    let (mut synced, mut synced_at) = (0u64, start.elapsed());
    let (mut loaded, mut loaded_at) = (0u64, start.elapsed());
    let mut still = Instant::now();
    let limit = Instant::now() + Duration::from_secs(300);
    // Until the synced count has held for 1 s and the loader has it all.
    while Instant::now() < limit && (still.elapsed() < Duration::from_secs(1) || loaded < synced) {
        let n = journal_value(dir, "synced_records");
        if n != synced {
            synced = n;
            synced_at = start.elapsed();
            still = Instant::now();
        }
        let l = journal_value(dir, "loaded_records");
        if l != loaded {
            loaded = l;
            loaded_at = start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    (synced, synced_at, loaded_at.max(synced_at), loaded)
}

/// Sum of the PACKETS column of nfacctd's CSV files (each record carries
/// one packet).
fn nfacctd_packets(path: &Path) -> u64 {
    let Ok(text) = std::fs::read_to_string(path) else {
        return 0;
    };
    let mut col = None;
    let mut sum = 0;
    for line in text.lines() {
        let f: Vec<&str> = line.split(',').collect();
        if let Some(i) = f.iter().position(|c| *c == "PACKETS") {
            col = Some(i);
            continue;
        }
        if let Some(v) = col
            .and_then(|i| f.get(i))
            .and_then(|v| v.parse::<u64>().ok())
        {
            sum += v;
        }
    }
    sum
}

/// Runs one receiver through one phase.
pub(super) async fn run_one(
    kind: Kind,
    stream: Arc<Stream>,
    rate: Option<u64>,
    args: &Args,
    dir: &Path,
    pg: Option<&Postgres>,
    phase: usize,
) -> anyhow::Result<Row> {
    let port = free_port()?;
    let work = dir.join(format!("{kind:?}-{phase}"));
    std::fs::create_dir_all(&work)?;
    let mut peer: Option<Peer> = None;
    let mut in_process: Option<(Arc<AtomicBool>, std::thread::JoinHandle<u64>)> = None;
    let mut db_url = None;
    match kind {
        Kind::Decoder => {
            let sock = UdpSocket::bind(("127.0.0.1", port))?;
            // SO_RCVBUF like the peers ask (capped by net.core.rmem_max).
            nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::RcvBuf, &args.rcvbuf)?;
            sock.set_read_timeout(Some(Duration::from_millis(50)))?;
            let stop = Arc::new(AtomicBool::new(false));
            let stop2 = stop.clone();
            let handle = std::thread::spawn(move || {
                let mut dec = Decoder::new(Limits::default());
                let mut buf = vec![0u8; 65535];
                let mut out = Vec::with_capacity(64);
                let mut n = 0u64;
                while !stop2.load(Ordering::Relaxed) {
                    if let Ok((len, from)) = sock.recv_from(&mut buf) {
                        out.clear();
                        let _ = dec.decode_udp(from, &buf[..len], 0, &mut out);
                        n += out.len() as u64;
                    }
                }
                n
            });
            in_process = Some((stop, handle));
        }
        Kind::CollectorSqlite
        | Kind::CollectorPostgres
        | Kind::CollectorJournal
        | Kind::CollectorJournalOnly => {
            let bin = component("qosloop-collector").ok_or_else(|| {
                anyhow::anyhow!("qosloop-collector not found next to this binary")
            })?;
            let url = match (kind, pg) {
                (Kind::CollectorPostgres, Some(pg)) => {
                    let name = format!("ipfix_{phase}");
                    pg.create_database(&name)?;
                    pg.url_for(&name)
                }
                (Kind::CollectorPostgres, None) => anyhow::bail!("PostgreSQL not started"),
                (Kind::CollectorJournalOnly, _) => "discard:".to_owned(),
                _ => format!("sqlite://{}", work.join("flows.db").display()),
            };
            let mut cmd = Command::new(bin);
            cmd.arg("--ipfix-listen")
                .arg(format!("udp://127.0.0.1:{port}"))
                .arg("--ipfix-rcvbuf")
                .arg(args.collector_rcvbuf.unwrap_or(args.rcvbuf).to_string())
                .arg("--ipfix-udp-threads")
                .arg(args.udp_threads.to_string())
                .arg("--db")
                .arg(&url);
            if matches!(kind, Kind::CollectorJournal | Kind::CollectorJournalOnly) {
                cmd.arg("--ipfix-journal-dir")
                    .arg(work.join("journal"))
                    .arg("--ipfix-journal-fsync-ms")
                    .arg(args.journal_fsync_ms.to_string())
                    // The stream must fit whatever SQL's lag.
                    .arg("--ipfix-journal-max-bytes")
                    .arg((stream.records * 128 + (64 << 20)).to_string());
            }
            peer = Some(spawn(&mut cmd, &work.join("collector.log"))?);
            db_url = Some(url);
        }
        Kind::Nfcapd => {
            let bin = find_binary("nfcapd", &[])
                .ok_or_else(|| anyhow::anyhow!("nfcapd not found (Debian package nfdump)"))?;
            peer = Some(spawn(
                Command::new(bin)
                    .args(["-b", "127.0.0.1", "-p", &port.to_string(), "-t", "3600"])
                    .args(["-B", &args.rcvbuf.to_string(), "-w"])
                    .arg(&work),
                &work.join("nfcapd.log"),
            )?);
        }
        Kind::Nfacctd => {
            let bin = find_binary("nfacctd", &[])
                .ok_or_else(|| anyhow::anyhow!("nfacctd not found (Debian package pmacct)"))?;
            let conf = work.join("nfacctd.conf");
            std::fs::write(
                &conf,
                format!(
                    "daemonize: false\nnfacctd_ip: 127.0.0.1\nnfacctd_port: {port}\n\
                     nfacctd_time_new: true\nnfacctd_pipe_size: {}\nplugin_pipe_size: 268435456\nplugin_buffer_size: 65536\n\
                     plugins: print[p]\naggregate[p]: proto\nprint_output[p]: csv\n\
                     print_output_file[p]: {}\nprint_output_file_append[p]: true\n\
                     print_refresh_time[p]: 1\n",
                    args.rcvbuf,
                    work.join("out.csv").display()
                ),
            )?;
            let mut p = spawn(
                Command::new(bin).arg("-f").arg(&conf),
                &work.join("nfacctd.log"),
            )?;
            p.1 = nix::sys::signal::Signal::SIGINT;
            peer = Some(p);
        }
    }
    if let Err(e) = wait_bound(port) {
        let log = std::fs::read_dir(&work)?
            .filter_map(|e| e.ok())
            .find(|e| e.path().extension().is_some_and(|x| x == "log"))
            .map(|e| crate::harness::tail_of(&e.path(), 5))
            .unwrap_or_default();
        anyhow::bail!("{e}: {log}");
    }
    // Every receiver gets a second after binding to finish starting up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = Instant::now();
    let s2 = stream.clone();
    let sent = tokio::task::spawn_blocking(move || send(&s2, port, rate)).await??;
    let drained = tokio::task::spawn_blocking(move || wait_drained(port, start)).await?;
    let drops = udp_socket_state(port).map_or(0, |s| s.1);
    let mut load = None;
    let (stored, secs) = match kind {
        Kind::Decoder => {
            let (stop, handle) = in_process
                .take()
                .ok_or_else(|| anyhow::anyhow!("no receiver"))?;
            stop.store(true, Ordering::Relaxed);
            let n = tokio::task::spawn_blocking(move || handle.join())
                .await?
                .map_err(|_| anyhow::anyhow!("receiver thread panicked"))?;
            (n, drained)
        }
        Kind::CollectorSqlite | Kind::CollectorPostgres => {
            let url = db_url.clone().unwrap_or_default();
            let (n, at) = settle_rows(&url, start).await?;
            (n, at.max(drained))
        }
        Kind::CollectorJournal | Kind::CollectorJournalOnly => {
            let dir = work.join("journal");
            let (synced, at, loaded_at, loaded) =
                tokio::task::spawn_blocking(move || settle_journal(&dir, start)).await?;
            load = Some(((loaded_at - at).as_secs_f64(), loaded));
            (synced, at.max(drained))
        }
        Kind::Nfcapd => {
            if let Some(mut p) = peer.take() {
                tokio::task::spawn_blocking(move || p.stop()).await?;
            }
            let nfdump = find_binary("nfdump", &[])
                .ok_or_else(|| anyhow::anyhow!("nfdump not found (Debian package nfdump)"))?;
            let out = Command::new(nfdump)
                .arg("-R")
                .arg(&work)
                .args(["-q", "-N", "-A", "proto", "-o", "fmt:%pkt"])
                .output()?;
            let n = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.trim().parse::<u64>().ok())
                .sum();
            (n, drained)
        }
        Kind::Nfacctd => {
            // The print plugin writes every second: wait until the sum holds.
            let csv = work.join("out.csv");
            let mut last = 0;
            let mut still = Instant::now();
            let limit = Instant::now() + Duration::from_secs(120);
            while Instant::now() < limit && still.elapsed() < Duration::from_millis(2500) {
                let n = nfacctd_packets(&csv);
                if n != last {
                    last = n;
                    still = Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (last, drained)
        }
    };
    drop(peer);
    Ok(Row {
        stored,
        drops,
        secs: secs.as_secs_f64(),
        sent_secs: sent.as_secs_f64(),
        load,
    })
}

/// Runs the benchmark and prints its report.
pub async fn run(mut args: Args) -> anyhow::Result<()> {
    let n = if args.quick { 200_000 } else { args.records };
    if let Some(max) = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
    {
        args.rcvbuf = args.rcvbuf.min(max);
    }
    let stream = Arc::new(tokio::task::spawn_blocking(move || Stream::generate(n)).await??);
    println!(
        "bench ipfix: {} records in {} IPFIX messages ({:.1} MB, <= 1392 bytes each), UDP over loopback",
        stream.records,
        stream.datagrams.len(),
        stream.bytes() as f64 / 1e6
    );
    let s2 = stream.clone();
    let per_core = tokio::task::spawn_blocking(move || decode_per_core(&s2)).await??;
    println!("  qosloop decoder alone, one core, no socket: {per_core:>12.0} records/s");

    let tmp = tempfile::tempdir()?;
    let mut pg = None;
    if !args.no_postgres {
        match Postgres::available() {
            Ok(()) => pg = Some(tokio::task::spawn_blocking(Postgres::start).await??),
            Err(why) => println!("  PostgreSQL skipped: {why}"),
        }
    }
    let kinds = [
        Kind::Decoder,
        Kind::CollectorSqlite,
        Kind::CollectorPostgres,
        Kind::CollectorJournal,
        Kind::CollectorJournalOnly,
        Kind::Nfcapd,
        Kind::Nfacctd,
    ];
    let phases = [
        (
            format!("fixed rate {} records/s", args.rate),
            Some(args.rate),
        ),
        ("flat out".to_owned(), None),
    ];
    let counter = AtomicU64::new(0);
    for (name, rate) in &phases {
        let collector_buf = args
            .collector_rcvbuf
            .map(|c| format!(", {c} of the collector"))
            .unwrap_or_default();
        println!(
            "  {name} (receive buffer {} bytes asked of each{collector_buf}):",
            args.rcvbuf
        );
        println!(
            "    {:<44} {:>10} {:>10} {:>8} {:>12} {:>8}",
            "receiver", "stored", "drops", "loss %", "records/s", "vs nfcapd"
        );
        let mut rows: Vec<(Kind, anyhow::Result<Row>)> = Vec::new();
        for kind in kinds {
            if kind == Kind::CollectorPostgres && pg.is_none() {
                continue;
            }
            let phase = counter.fetch_add(1, Ordering::Relaxed) as usize;
            let row = run_one(
                kind,
                stream.clone(),
                *rate,
                &args,
                tmp.path(),
                pg.as_ref(),
                phase,
            )
            .await;
            rows.push((kind, row));
        }
        let nfcapd = rows
            .iter()
            .find(|(k, _)| *k == Kind::Nfcapd)
            .and_then(|(_, r)| r.as_ref().ok())
            .map(Row::rate);
        for (kind, row) in &rows {
            match row {
                Ok(r) => println!(
                    "    {:<44} {:>10} {:>10} {:>8.2} {:>12.0} {:>8}",
                    kind.label(),
                    r.stored,
                    r.drops,
                    100.0 * (stream.records.saturating_sub(r.stored)) as f64
                        / stream.records as f64,
                    r.rate(),
                    nfcapd
                        .filter(|x| *x > 0.0)
                        .map(|x| format!("{:.2}x", r.rate() / x))
                        .unwrap_or_else(|| "-".into())
                ),
                Err(e) => println!("    {:<44} not measured: {e:#}", kind.label()),
            }
            if let Ok(Row {
                load: Some((lag, loaded)),
                ..
            }) = row
            {
                println!(
                    "    {:<44} {:>10} loaded by the loader, {:.2} s after the last was durable in the journal",
                    "  (journal's SQL load)", loaded, lag
                );
            }
        }
    }
    if !args.no_ladder {
        let first = counter.load(Ordering::Relaxed) as usize;
        super::ipfix_ladder::run(&args, stream.clone(), tmp.path(), first).await?;
    }
    if let Some(pg) = pg {
        tokio::task::spawn_blocking(move || drop(pg)).await?;
    }
    Ok(())
}
