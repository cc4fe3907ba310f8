//! `qosloop-testbed bench kb`: the knowledge base on PostgreSQL — updates/s
//! (records through the flow writer with the knowledge base kept, against
//! the same writes without it) and event latency p50/p99 from a record's
//! commit to a server-sent-events client of the policy server
//! (`/api/v1/kb/events`, woken by LISTEN/NOTIFY).
//!
//! [`Rig`] (a collector keeping the knowledge base and a policy server with
//! its HTTP API, both in this process, on one database) and [`SseClient`]
//! are shared with the integration test (tests/kb.rs).

use crate::harness::Postgres;
use qosloop_collector::{Config, Sink};
use qosloop_schema::FlowRecord;
use qosloop_store::{Batch, Db, KbConfig};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Options of `qosloop-testbed bench kb`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Records per write in the updates/s runs.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Writes per updates/s run.
    #[arg(long, default_value_t = 200)]
    pub writes: usize,
    /// Events timed from commit to SSE client.
    #[arg(long, default_value_t = 300)]
    pub events: usize,
}

/// A collector (export listener, flow writer keeping the knowledge base,
/// its sweep) and a policy server (HTTP API with the knowledge-base
/// endpoints), both on `db_url`.
#[allow(missing_debug_implementations)]
pub struct Rig {
    pub db: Db,
    pub collector: SocketAddr,
    pub http: SocketAddr,
    server: Option<qosloop_policy_server::ServerHandle>,
    _policy: tokio::sync::watch::Sender<std::sync::Arc<qosloop_schema::PolicySet>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Rig {
    pub async fn start(db_url: &str, kb: &Config) -> anyhow::Result<Rig> {
        let db = Db::connect(db_url).await?;
        db.migrate().await?;
        for (user, bytes) in kb.kb_threshold_pairs().map_err(anyhow::Error::msg)? {
            db.kb_set_threshold(&user, bytes).await?;
        }
        let config = Config {
            listen: "127.0.0.1:0".into(),
            db: db_url.into(),
            kb: true,
            ..kb.clone()
        };
        config.validate()?;
        let kbc = config
            .kb_config()
            .ok_or_else(|| anyhow::anyhow!("kb is off"))?;
        let listener = qosloop_collector::bind(&config).await?;
        let collector = listener.local_addr()?;
        let sink = Sink::Db(db.clone());
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn({
            let config = config.clone();
            async move {
                let _ = qosloop_collector::serve(listener, sink, &config).await;
            }
        }));
        tasks.push(tokio::spawn(qosloop_collector::maintenance::kb_sweeps(
            db.clone(),
            kbc,
            Duration::from_millis(config.kb_sweep_ms),
        )));
        let (policy_tx, policy_rx) =
            tokio::sync::watch::channel(std::sync::Arc::new(qosloop_schema::PolicySet::default()));
        let server = qosloop_policy_server::Server::start(
            db_url,
            "127.0.0.1:0".parse()?,
            qosloop_policy_server::pdp::PdpConfig::default(),
            qosloop_policy_server::server::LoopConfig {
                rates_from: qosloop_policy_server::server::RatesFrom::Records,
                interval: Duration::from_millis(1000),
                ewma_weight: 0.5,
                hysteresis: 0.05,
                min_hold: Duration::ZERO,
                confirm: Duration::ZERO,
                gap_hold: Duration::ZERO,
                rate_lag: Duration::from_millis(300),
                gap_timeout: Duration::from_secs(2),
            },
            policy_rx,
        )
        .await?;
        let web = qosloop_policy_server::web::serve(
            "127.0.0.1:0".parse()?,
            &server,
            policy_tx.subscribe(),
            qosloop_policy_server::web::WebConfig::default(),
        )
        .await?;
        Ok(Rig {
            db,
            collector,
            http: web.local_addr,
            server: Some(server),
            _policy: policy_tx,
            tasks,
        })
    }

    /// Stops the servers.
    pub async fn stop(mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(s) = self.server.take() {
            s.stop().await;
        }
        self.db.close().await;
    }

    /// `GET path` on the HTTP API: the body as JSON.
    pub async fn get_json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let mut s = TcpStream::connect(self.http).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut all)).await??;
        let text = String::from_utf8_lossy(&all);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow::anyhow!("no response head"))?;
        anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_owned()
        };
        Ok(serde_json::from_str(&body)?)
    }
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// A client of `/api/v1/kb/events`: each event with the instant it was
/// read.
#[derive(Debug)]
pub struct SseClient {
    stream: TcpStream,
    text: String,
}

/// One event as received.
#[derive(Clone, Debug)]
pub struct SseEvent {
    pub at: Instant,
    pub name: String,
    pub data: serde_json::Value,
}

impl SseClient {
    pub async fn connect(http: SocketAddr) -> anyhow::Result<SseClient> {
        let mut stream = TcpStream::connect(http).await?;
        stream
            .write_all(
                b"GET /api/v1/kb/events HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n",
            )
            .await?;
        let mut c = SseClient {
            stream,
            text: String::new(),
        };
        while !c.text.contains("\r\n\r\n") {
            c.fill(Duration::from_secs(10)).await?;
        }
        let (head, rest) = c.text.split_once("\r\n\r\n").unwrap_or_default();
        anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "kb/events: {head}");
        c.text = rest.to_owned();
        Ok(c)
    }

    async fn fill(&mut self, wait: Duration) -> anyhow::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        let n = tokio::time::timeout(wait, self.stream.read(&mut buf)).await??;
        anyhow::ensure!(n > 0, "the event stream ended");
        self.text.push_str(&String::from_utf8_lossy(&buf[..n]));
        Ok(())
    }

    /// The next event (chunk framing and comments skipped), waiting at most
    /// `wait`.
    pub async fn next(&mut self, wait: Duration) -> anyhow::Result<SseEvent> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(e) = self.take() {
                return Ok(e);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            anyhow::ensure!(!left.is_zero(), "no event within {wait:?}");
            self.fill(left).await?;
        }
    }

    /// An event whose `event:` and `data:` lines are both in the text.
    fn take(&mut self) -> Option<SseEvent> {
        let at = Instant::now();
        loop {
            let start = self.text.find("event: ")?;
            let data_at = start + self.text[start..].find("\ndata: ")? + 7;
            let end = data_at + self.text[data_at..].find('\n')?;
            let name = self.text[start + 7..].lines().next()?.trim().to_owned();
            let data = self.text[data_at..end].trim().to_owned();
            self.text.drain(..end);
            if let Ok(data) = serde_json::from_str(&data) {
                return Some(SseEvent { at, name, data });
            }
        }
    }
}

fn record(i: u64, user: Option<String>, process: Option<&str>) -> FlowRecord {
    FlowRecord {
        src_addr: std::net::Ipv4Addr::from(0x0a00_0000 + (i as u32 % 4096)).into(),
        dst_addr: std::net::Ipv4Addr::new(192, 0, 2, (i % 200) as u8).into(),
        src_port: (i % 60_000) as u16,
        dst_port: 443,
        proto: 6,
        packets: 1 + i % 10,
        bytes: 64 + i % 1400,
        start_ns: 1,
        end_ns: 2,
        user,
        process: process.map(str::to_owned),
        ..FlowRecord::default()
    }
}

/// Records/s of `writes` writes of `batch` records, with or without the
/// knowledge base.
async fn updates(
    db: &Db,
    ex: i64,
    session: i64,
    args: &Args,
    kb: Option<&KbConfig>,
) -> anyhow::Result<f64> {
    db.open_session(ex, session, "little").await?;
    let batches: Vec<Batch> = (0..args.writes)
        .map(|w| Batch {
            exporter_id: ex,
            session_id: session,
            seq: w as u32,
            records: (0..args.batch as u64)
                .map(|i| {
                    let k = w as u64 * args.batch as u64 + i;
                    // A user on every fourth record (100 users).
                    record(k, (k % 4 == 0).then(|| format!("u{}", k % 100)), None)
                })
                .collect(),
            dedup: true,
        })
        .collect();
    let start = Instant::now();
    for b in &batches {
        db.commit_batches_kb(&[b], None, kb).await?;
    }
    Ok((args.writes * args.batch) as f64 / start.elapsed().as_secs_f64())
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p / 100.0).round() as usize]
}

/// Runs the benchmark and prints its report.
pub async fn run(args: Args) -> anyhow::Result<()> {
    Postgres::available().map_err(anyhow::Error::msg)?;
    let pg = tokio::task::spawn_blocking(Postgres::start).await??;
    let kb = Config {
        kb: true,
        kb_idle_s: 3_600,
        kb_mapping_ttl_s: 3_600,
        ..Config::default()
    };
    let rig = Rig::start(&pg.url(), &kb).await?;
    let db = rig.db.clone();
    let ex = db.register_exporter("bench", "127.0.0.1:1", 1).await?;
    let kbc = kb.kb_config().ok_or_else(|| anyhow::anyhow!("kb is off"))?;
    let without = updates(&db, ex, 1, &args, None).await?;
    let with = updates(&db, ex, 2, &args, Some(&kbc)).await?;
    println!(
        "bench kb (PostgreSQL, fsync=off): {} writes of {} records (a user on every 4th, 100 users, \
         4,096 + 200 hosts): {with:.0} records/s with the knowledge base kept, {without:.0} without ({:.0}%)",
        args.writes,
        args.batch,
        100.0 * with / without
    );
    // Event latency: one write per event, each a new user's first record
    // (a logon), timed from the commit's return to the SSE client reading
    // it.
    let mut sse = SseClient::connect(rig.http).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    db.open_session(ex, 3, "little").await?;
    let mut lat = Vec::with_capacity(args.events);
    for i in 0..args.events {
        let user = format!("lat{i}");
        let b = Batch {
            exporter_id: ex,
            session_id: 3,
            seq: i as u32,
            records: vec![record(i as u64, Some(user.clone()), None)],
            dedup: true,
        };
        db.commit_batches_kb(&[&b], None, Some(&kbc)).await?;
        let committed = Instant::now();
        loop {
            let e = sse.next(Duration::from_secs(10)).await?;
            if e.name == "kb.logon" && e.data["user"] == user.as_str() {
                lat.push(e.at.saturating_duration_since(committed).as_secs_f64() * 1e6);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "  event latency, commit -> SSE client ({} logons, LISTEN/NOTIFY -> bridge -> bus): \
         p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
        lat.len(),
        pct(&lat, 50.0),
        pct(&lat, 99.0),
        lat.last().copied().unwrap_or(f64::NAN)
    );
    rig.stop().await;
    drop(pg);
    Ok(())
}
