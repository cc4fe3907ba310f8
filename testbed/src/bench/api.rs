//! `qosloop-testbed bench api`: the console API over a large flow table.
//!
//! Fills PostgreSQL (10M records by default) and SQLite (1M) through the
//! store's flow writer — rows and per-minute rollups (by every dimension,
//! `flows_1m`, and by one at a time, `flows_1m_dim`) in one transaction —
//! with a day of traffic ending at the current minute, then serves the
//! console router on loopback and measures, median of `--runs`:
//!
//! - top-10 talkers (source address, bytes) over the last hour;
//! - a 24-hour time series at 1-minute steps stacked by the top-10 source
//!   addresses and Other;
//!
//! each through the API (which picks the narrowest rollup that answers:
//! both group on the source address alone, so `flows_1m_dim`) and, in the
//! same run, the same answer computed by a plain `GROUP BY` over the raw
//! table — checked equal, the ratio is the figure. Then server-sent-event
//! fan-out: 100 clients, events published at a steady rate; the delivery
//! latency of 99 readers with one slow client (run until its queue has
//! overflowed for a while, bounded), then of 100 readers for the same
//! events; every reader must get every event and no `lagged` notice, and
//! the slow client gets the rest of what the bus dropped for it, told in
//! `lagged` events.
//!
//! The traffic: `--hosts` sources with skewed activity (host k sends about
//! 1/(k+1) as much as host 0), each using 3 services (destination, port,
//! protocol, class), end times rising evenly through the day (as a
//! collector receives them: a write covers a few minutes).

use anyhow::Context as _;
use qosloop_policy_server::console::events::EventBus;
use qosloop_policy_server::console::{router, Console, ConsoleLimits};
use qosloop_policy_server::DecisionTable;
use qosloop_schema::{FlowRecord, PolicySet};
use qosloop_store::{Batch, Bind, Col, Db, MINUTE_NS};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;

/// Options of `qosloop-testbed bench api`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Records stored in PostgreSQL (0: skip it).
    #[arg(long, default_value_t = 10_000_000)]
    pub postgres_records: u64,
    /// Records stored in SQLite (0: skip it).
    #[arg(long, default_value_t = 1_000_000)]
    pub sqlite_records: u64,
    /// 200k records in PostgreSQL, 100k in SQLite, 3 runs: a smoke test.
    #[arg(long)]
    pub quick: bool,
    /// Timed runs of each query (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Distinct source hosts (at least 1).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    pub hosts: u64,
    /// Clients of the SSE fan-out (at least 1: the second round swaps one
    /// reader for a client that reads nothing).
    #[arg(long, default_value_t = 100, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub sse_clients: usize,
}

const DAY_NS: i64 = 86_400_000_000_000;
const HOUR_NS: i64 = 3_600_000_000_000;

/// `/proc/loadavg`'s first three fields, for the record.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

pub async fn run(mut a: Args) -> anyhow::Result<()> {
    println!("load average at the start: {}", load());
    if a.quick {
        a.postgres_records = a.postgres_records.min(200_000);
        a.sqlite_records = a.sqlite_records.min(100_000);
        a.runs = a.runs.min(3);
    }
    let now = qosloop_store::now_ns();
    let to = now - now.rem_euclid(MINUTE_NS);
    if a.postgres_records > 0 {
        crate::harness::Postgres::available().map_err(anyhow::Error::msg)?;
        let pg = crate::harness::Postgres::start()?;
        let db = Db::connect(&pg.url()).await?;
        // The plain GROUP BYs over 10M rows take longer than the store's
        // statement timeout (10 s) on a loaded machine: they get their own
        // connections without it.
        let raw = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .after_connect(|c, _| {
                Box::pin(async move {
                    sqlx::query("SET statement_timeout = 0")
                        .execute(c)
                        .await
                        .map(|_| ())
                })
            })
            .connect(&pg.url())
            .await?;
        let raw = Db::Postgres(raw);
        engine("PostgreSQL", &db, &raw, a.postgres_records, to, &a).await?;
        raw.close().await;
        db.close().await;
    }
    if a.sqlite_records > 0 {
        let dir = tempfile::tempdir()?;
        let db = Db::connect(&format!("sqlite://{}", dir.path().join("api.db").display())).await?;
        engine("SQLite", &db, &db, a.sqlite_records, to, &a).await?;
        db.close().await;
    }
    sse_fanout(a.sse_clients).await
}

/// A deterministic xorshift.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Record `i` of `n`: end times rise through the day, as a collector
/// receives them.
fn record(rng: &mut Rng, hosts: u64, to: i64, i: u64, n: u64) -> FlowRecord {
    // Skewed: host = floor(hosts^u) - 1 for u uniform, about 1/(k+1).
    let u = (rng.next() % 1_000_000) as f64 / 1_000_000.0;
    let host = ((hosts as f64).powf(u) as u64)
        .saturating_sub(1)
        .min(hosts - 1);
    let service = rng.next() % 3;
    let step = DAY_NS / n.max(1) as i64;
    let end = to - DAY_NS + i as i64 * step + (rng.next() % step.max(1) as u64) as i64;
    let bytes = 64 + rng.next() % 200_000;
    FlowRecord {
        src_addr: IpAddr::from([10, (host >> 8) as u8, host as u8, 1]),
        dst_addr: IpAddr::from([192, 0, 2, ((host * 7 + service) % 50) as u8]),
        src_port: (1024 + rng.next() % 60_000) as u16,
        dst_port: [443, 53, 5001][service as usize],
        proto: if service == 1 { 17 } else { 6 },
        packets: bytes / 800 + 1,
        bytes,
        start_ns: (end - 1_000_000_000) as u64,
        end_ns: end as u64,
        class: Some(["web", "dns", "bulk"][service as usize].to_owned()),
        ..FlowRecord::default()
    }
}

async fn fill(db: &Db, n: u64, to: i64, hosts: u64) -> anyhow::Result<f64> {
    let exporter = db.register_exporter("bench", "127.0.0.1:1", 1).await?;
    db.open_session(exporter, 1, "big").await?;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let started = Instant::now();
    let mut seq = 0u32;
    let mut left = n;
    while left > 0 {
        let k = left.min(20_000);
        let records = (n - left..n - left + k)
            .map(|i| record(&mut rng, hosts, to, i, n))
            .collect();
        seq += 1;
        let batch = Batch {
            exporter_id: exporter,
            session_id: 1,
            seq,
            records,
            dedup: false,
        };
        db.commit_batches(&[&batch]).await?;
        left -= k;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

async fn serve(db: &Db, events: EventBus) -> anyhow::Result<SocketAddr> {
    let (_dtx, decisions) = watch::channel(Arc::new(DecisionTable::default()));
    let (_ptx, policy) = watch::channel(Arc::new(PolicySet::default()));
    std::mem::forget((_dtx, _ptx));
    let app = router(Console {
        db: db.clone(),
        decisions,
        policy,
        policy_status: None,
        limits: ConsoleLimits {
            max_scan_rows: i64::MAX / 2,
            ..ConsoleLimits::default()
        },
        events,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8(buf)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP head")?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "{path}: {head}\n{body}");
    Ok(serde_json::from_str(&body)?)
}

fn dechunk(mut s: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (len, rest) = s.split_once("\r\n").context("chunk")?;
        let n = usize::from_str_radix(len.trim(), 16)?;
        if n == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..n).context("chunk length")?);
        s = rest.get(n + 2..).context("chunk end")?;
    }
}

/// The median of `runs` timings of `f`, in ms, and its last answer.
async fn timed<T, F, Fut>(runs: usize, mut f: F) -> anyhow::Result<(f64, T)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        last = Some(f().await?);
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], last.context("no run")?))
}

const SCALED: &str =
    "CASE WHEN sampling_interval > 1 THEN bytes * sampling_interval ELSE bytes END";

/// Fills `db`, then times the API against the plain GROUP BYs, which run
/// on `plain` (the same database).
async fn engine(name: &str, db: &Db, plain: &Db, n: u64, to: i64, a: &Args) -> anyhow::Result<()> {
    db.migrate().await?;
    let rate = fill(db, n, to, a.hosts).await?;
    if let Db::Postgres(pool) = db {
        sqlx::query("ANALYZE").execute(pool).await?;
    }
    let counts = db
        .fetch_cells(
            "SELECT (SELECT COUNT(*) FROM flows), (SELECT COUNT(*) FROM flows_1m), \
             (SELECT COUNT(*) FROM flows_1m_dim), \
             (SELECT COUNT(*) FROM flows_1m_dim WHERE dim = 'src_addr'), \
             (SELECT COUNT(*) FROM flows_1h_dim), \
             (SELECT COUNT(*) FROM flows_1h_dim WHERE dim = 'src_addr')",
            &[],
            &[Col::Int; 6],
        )
        .await?;
    println!(
        "{name}: {} records stored at {rate:.0} records/s with rollups ({} rows in flows_1m, \
         {} in flows_1m_dim, {} of them by src_addr; {} in flows_1h_dim, {} by src_addr)",
        counts[0][0], counts[0][1], counts[0][2], counts[0][3], counts[0][4], counts[0][5]
    );
    let addr = serve(db, EventBus::new(16, 16)).await?;
    let inet = qosloop_store::Sql::of(db).inet_text("src_addr");

    // Top-10 talkers over the last hour.
    let from = to - HOUR_NS;
    let path = format!("/api/v1/top?from={from}&to={to}&dims=src_addr&metric=bytes&limit=10");
    let (api_ms, api) = timed(a.runs, || get(addr, &path)).await?;
    let source = api["source"].as_str().unwrap_or("?").to_owned();
    anyhow::ensure!(source.starts_with("rollup"), "top read {source}");
    let sql = format!(
        "SELECT {inet}, CAST(SUM({SCALED}) AS BIGINT) FROM flows WHERE end_ns >= $1 AND end_ns < $2 \
         GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 10"
    );
    let binds = [Bind::Int(from), Bind::Int(to)];
    let (raw_ms, raw) = timed(a.runs, || async {
        Ok(plain
            .fetch_cells(&sql, &binds, &[Col::Text, Col::Int])
            .await?)
    })
    .await?;
    let api_rows: Vec<(Value, Value)> = api["rows"]
        .as_array()
        .context("rows")?
        .iter()
        .map(|r| (r["keys"][0].clone(), r["value"].clone()))
        .collect();
    let raw_rows: Vec<(Value, Value)> = raw
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect();
    anyhow::ensure!(
        api_rows == raw_rows,
        "top-10 differ:\n{api_rows:?}\n{raw_rows:?}"
    );
    println!(
        "{name}: top-10 talkers, last hour: API ({source}) {api_ms:.1} ms, plain GROUP BY {raw_ms:.1} ms, \
         ratio {:.1}x (median of {})",
        raw_ms / api_ms,
        a.runs
    );

    // 24-hour stacked series at 1-minute steps.
    let from = to - DAY_NS;
    let path = format!(
        "/api/v1/timeseries?from={from}&to={to}&step=1m&stack=src_addr&metric=bytes&limit=10"
    );
    let (api_ms, api) = timed(a.runs, || get(addr, &path)).await?;
    let source = api["source"].as_str().unwrap_or("?").to_owned();
    anyhow::ensure!(source.starts_with("rollup"), "series read {source}");
    let top_sql = format!(
        "SELECT {inet} FROM flows WHERE end_ns >= $1 AND end_ns < $2 \
         GROUP BY 1 ORDER BY SUM({SCALED}) DESC, 1 LIMIT 10"
    );
    let binds = [Bind::Int(from), Bind::Int(to)];
    let (raw_ms, raw) = timed(a.runs, || async {
        let top = plain.fetch_cells(&top_sql, &binds, &[Col::Text]).await?;
        let keys: Vec<String> = top
            .iter()
            .filter_map(|r| r[0].as_str().map(str::to_owned))
            .collect();
        let list = keys
            .iter()
            .map(|k| format!("'{k}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let series_sql = format!(
            "SELECT CAST((end_ns / {MINUTE_NS}) * {MINUTE_NS} AS BIGINT), \
             CASE WHEN {inet} IN ({list}) THEN {inet} ELSE 'Other' END, CAST(SUM({SCALED}) AS BIGINT) \
             FROM flows WHERE end_ns >= $1 AND end_ns < $2 GROUP BY 1, 2"
        );
        Ok(plain
            .fetch_cells(&series_sql, &binds, &[Col::Int, Col::Text, Col::Int])
            .await?)
    })
    .await?;
    let mut want: BTreeMap<(i64, String), i64> = BTreeMap::new();
    for r in raw {
        let key = (
            r[0].as_i64().unwrap_or(0),
            r[1].as_str().unwrap_or("").to_owned(),
        );
        *want.entry(key).or_default() += r[2].as_i64().unwrap_or(0);
    }
    let start = api["start_ns"].as_i64().context("start_ns")?;
    let mut got: BTreeMap<(i64, String), i64> = BTreeMap::new();
    for s in api["series"].as_array().context("series")? {
        let key = s["key"].as_str().unwrap_or("Other").to_owned();
        for (i, v) in s["values"].as_array().context("values")?.iter().enumerate() {
            let v = v.as_i64().unwrap_or(0);
            if v != 0 {
                got.insert((start + i as i64 * MINUTE_NS, key.clone()), v);
            }
        }
    }
    want.retain(|_, v| *v != 0);
    anyhow::ensure!(
        got == want,
        "the 24-hour series differ ({} vs {} points)",
        got.len(),
        want.len()
    );
    println!(
        "{name}: 24 h stacked series, 1 min steps (1440 × 11): API ({source}) {api_ms:.1} ms, plain GROUP BY \
         {raw_ms:.1} ms, ratio {:.1}x (median of {})",
        raw_ms / api_ms,
        a.runs
    );
    println!("{name}: load average now: {}", load());
    Ok(())
}

/// Percentile `p` (0..=100) of sorted `v`.
fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p / 100.0).round() as usize]
}

/// What one event-stream client heard.
#[derive(Debug, Default)]
struct Heard {
    /// Each `bench` event's latency in µs (now − its `t_ns`).
    latencies: Vec<f64>,
    /// `lagged` notices: the events the server told this client it lost.
    told: u64,
}

/// A client's pace: a reader takes what arrives; a slow client reads 4 KiB
/// every 100 ms (about a tenth of the stream) while events are published,
/// then everything left, to count what it got and was told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pace {
    Reader,
    Slow,
}

/// Reads an event stream until the event with `"last": true`, or `deadline`
/// (a reader whose last event was dropped), or — for the slow client once
/// publishing is `done` — 2 s with nothing to read. Lines are cut in place
/// (one copy per read, not one per line).
async fn reader(
    addr: SocketAddr,
    pace: Pace,
    done: watch::Receiver<bool>,
    deadline: tokio::time::Instant,
) -> anyhow::Result<Heard> {
    let mut s = if pace == Pace::Slow {
        let sock = TcpSocket::new_v4()?;
        sock.set_recv_buffer_size(4096)?;
        sock.connect(addr).await?
    } else {
        TcpStream::connect(addr).await?
    };
    s.write_all(b"GET /api/v1/events?types=bench HTTP/1.1\r\nHost: b\r\n\r\n")
        .await?;
    let mut buf: Vec<u8> = Vec::with_capacity(128 * 1024);
    let mut chunk = vec![0u8; if pace == Pace::Slow { 4096 } else { 64 * 1024 }];
    let mut heard = Heard::default();
    let mut lagged = false;
    loop {
        let slow_now = pace == Pace::Slow && !*done.borrow();
        if slow_now {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let until = if pace == Pace::Slow && !slow_now {
            deadline.min(tokio::time::Instant::now() + Duration::from_secs(2))
        } else {
            deadline
        };
        let Ok(n) = tokio::time::timeout_at(until, s.read(&mut chunk)).await else {
            return Ok(heard);
        };
        let n = n?;
        anyhow::ensure!(n > 0, "stream ended");
        let at = qosloop_store::now_ns();
        buf.extend_from_slice(&chunk[..n]);
        let mut from = 0;
        while let Some(len) = buf[from..].iter().position(|b| *b == b'\n') {
            let line = &buf[from..from + len];
            from += len + 1;
            if line.starts_with(b"event: ") {
                lagged = line == b"event: lagged";
            } else if let Some(d) = line.strip_prefix(b"data: ") {
                if lagged {
                    heard.told += number_after(d, b"\"dropped\":").unwrap_or(0) as u64;
                    continue;
                }
                if let Some(t) = number_after(d, b"\"t_ns\":") {
                    heard.latencies.push((at - t) as f64 / 1e3);
                }
                if find(d, b"\"last\":true").is_some() {
                    return Ok(heard);
                }
            }
        }
        buf.drain(..from);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The decimal number right after `key` in `d`.
fn number_after(d: &[u8], key: &[u8]) -> Option<i64> {
    let at = find(d, key)? + key.len();
    let digits: &[u8] = &d[at..];
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

/// What one fan-out round measured.
struct Round {
    /// The readers' latencies (µs), sorted.
    latencies: Vec<f64>,
    /// Per reader: events received, losses told.
    readers: Vec<(usize, u64)>,
    /// The slow client, when there was one.
    slow: Option<(usize, u64)>,
    /// Events published.
    events: usize,
    /// Events the bus dropped for full queues (its `dropped_slow` counter).
    dropped: u64,
}

/// Events of 2 KiB published every 5 ms (200/s).
const PAD: usize = 2048;
const TICK: Duration = Duration::from_millis(5);
/// The least and the most events of the round with the slow client: it
/// runs until the slow client's queue has overflowed and then
/// `AFTER_OVERFLOW` more (the readers' latency is measured while the bus
/// drops its events), at most `MAX_EVENTS` (30 s).
const MIN_EVENTS: usize = 500;
const AFTER_OVERFLOW: usize = 500;
const MAX_EVENTS: usize = 6000;

/// One fan-out round: `clients` readers, plus a slow client when `slow`;
/// `events` events, or with `None` as many as the slow client needs to
/// overflow (above). The server (and the publisher) run on this runtime;
/// the clients on a runtime of their own thread, so that their reading is
/// not the server's work.
async fn round(
    clients: usize,
    slow: bool,
    events: Option<usize>,
    queue: usize,
) -> anyhow::Result<Round> {
    let dir = tempfile::tempdir()?;
    let db = Db::connect(&format!("sqlite://{}", dir.path().join("e.db").display())).await?;
    let bus = EventBus::new(queue, clients + 8);
    bus.register_kind("bench");
    let addr = serve(&db, bus.clone()).await?;
    let most = events.unwrap_or(MAX_EVENTS);
    let deadline = tokio::time::Instant::now() + TICK * most as u32 + Duration::from_secs(60);
    let (done_tx, done) = watch::channel(false);
    let clients_thread =
        std::thread::spawn(move || -> anyhow::Result<(Vec<Heard>, Option<Heard>)> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for _ in 0..clients {
                    tasks.push(tokio::spawn(reader(
                        addr,
                        Pace::Reader,
                        done.clone(),
                        deadline,
                    )));
                }
                let slow =
                    slow.then(|| tokio::spawn(reader(addr, Pace::Slow, done.clone(), deadline)));
                let mut heard = Vec::new();
                for t in tasks {
                    heard.push(t.await??);
                }
                let slow = match slow {
                    Some(t) => Some(t.await??),
                    None => None,
                };
                Ok((heard, slow))
            })
        });
    let want = clients + usize::from(slow);
    let connected = tokio::time::Instant::now() + Duration::from_secs(30);
    while bus.stats().clients < want {
        anyhow::ensure!(
            tokio::time::Instant::now() < connected,
            "{} of {want} event clients connected",
            bus.stats().clients
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pad = "x".repeat(PAD);
    let mut tick = tokio::time::interval(TICK);
    let mut overflowed_at = None;
    let mut i = 0;
    loop {
        tick.tick().await;
        i += 1;
        if overflowed_at.is_none() && bus.stats().dropped_slow > 0 {
            overflowed_at = Some(i);
        }
        let last = match events {
            Some(n) => i >= n,
            None => {
                i >= most
                    || overflowed_at.is_some_and(|at| i >= MIN_EVENTS.max(at + AFTER_OVERFLOW))
            }
        };
        bus.publish(
            "bench",
            &serde_json::json!({ "t_ns": qosloop_store::now_ns(), "pad": pad, "last": last }),
        );
        if last {
            break;
        }
    }
    done_tx.send_replace(true);
    let (heard, slow) = tokio::task::spawn_blocking(move || clients_thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the event clients' thread panicked"))??;
    let mut latencies = Vec::new();
    let mut readers = Vec::new();
    for h in heard {
        readers.push((h.latencies.len(), h.told));
        latencies.extend(h.latencies);
    }
    latencies.sort_by(f64::total_cmp);
    Ok(Round {
        latencies,
        readers,
        slow: slow.map(|h| (h.latencies.len(), h.told)),
        events: i,
        dropped: bus.stats().dropped_slow,
    })
}

async fn sse_fanout(clients: usize) -> anyhow::Result<()> {
    // The server's own default queue per client.
    let queue = ConsoleLimits::default().event_queue;
    let readers = clients - 1;
    let with = round(readers, true, None, queue).await?;
    let base = round(clients, false, Some(with.events), queue).await?;
    println!("SSE fan-out: load average now: {}", load());
    let n = with.events;
    let lost = |r: &Round| {
        r.readers
            .iter()
            .filter(|(got, told)| *got != n || *told > 0)
            .count()
    };
    let (slow_got, slow_told) = with.slow.unwrap_or_default();
    println!(
        "SSE fan-out, {n} events of 2 KiB at 200/s, queue {queue} events per client: \
         {clients} readers: p50 {:.0} µs, p99 {:.0} µs ({} events received, {} dropped by the bus); \
         {readers} readers + 1 slow client: readers' p50 {:.0} µs, p99 {:.0} µs ({} events received); \
         readers that missed an event: {} without the slow client, {} with it; \
         the slow client got {slow_got} of {n} events, the bus dropped {} for it and told it {slow_told} \
         in lagged events before its next ones",
        pct(&base.latencies, 50.0),
        pct(&base.latencies, 99.0),
        base.latencies.len(),
        base.dropped,
        pct(&with.latencies, 50.0),
        pct(&with.latencies, 99.0),
        with.latencies.len(),
        lost(&base),
        lost(&with),
        with.dropped,
    );
    anyhow::ensure!(
        lost(&base) == 0 && lost(&with) == 0 && base.dropped == 0,
        "a reader lost events ({} readers without the slow client, {} with it)",
        lost(&base),
        lost(&with)
    );
    // The readers lost nothing, so every drop was the slow client's: it got
    // the rest, and was told of drops (the last ones only if an event
    // followed them).
    anyhow::ensure!(
        with.dropped > 0 && slow_got as u64 + with.dropped == n as u64,
        "the slow client got {slow_got} of {n} events, the bus dropped {}",
        with.dropped
    );
    anyhow::ensure!(
        slow_told > 0 && slow_told <= with.dropped,
        "the slow client was told of {slow_told} lost events, the bus dropped {}",
        with.dropped
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    // Both used to pass clap and then underflow (`hosts - 1`,
    // `clients - 1`) once the benchmark had filled its databases.
    #[test]
    fn zero_hosts_or_zero_sse_clients_are_refused_when_parsed() {
        assert!(Cli::try_parse_from(["api", "--hosts", "0"]).is_err());
        assert!(Cli::try_parse_from(["api", "--sse-clients", "0"]).is_err());
        let ok = Cli::try_parse_from(["api", "--hosts", "1", "--sse-clients", "1"]).unwrap();
        assert_eq!((ok.args.hosts, ok.args.sse_clients), (1, 1));
    }
}
