//! Reliability of the export path with real processes and real databases:
//! the exporter runs in this process, collectors are `qosloop-collector`
//! child processes killed with SIGKILL, PostgreSQL is the harness's real
//! server. Each test checks that the database holds every record exactly
//! once: count and sum of bytes equal the sender's own totals.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::collector_common as common;

use common::record as flow;
use qosloop_exporter::{Exporter, ExporterConfig, Report};
use qosloop_schema::FlowRecord;
use qosloop_testbed::harness::{free_port, Postgres};
use qosloop_testbed::need;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A `qosloop-collector` child process; SIGKILLed on drop.
struct Collector {
    child: Option<Child>,
    port: u16,
    db: String,
}

impl Collector {
    fn start(port: u16, db: &str) -> Collector {
        let mut c = Collector {
            child: None,
            port,
            db: db.to_owned(),
        };
        c.restart();
        c
    }

    fn restart(&mut self) {
        assert!(self.child.is_none());
        let child = Command::new(qosloop_testkit::component("qosloop-collector").unwrap())
            .args([
                "--listen",
                &format!("127.0.0.1:{}", self.port),
                "--db",
                &self.db,
            ])
            .env(
                "RUST_LOG",
                std::env::var("QOSLOOP_TEST_COLLECTOR_LOG").unwrap_or("warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("starting qosloop-collector");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "collector did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap(); // SIGKILL
            c.wait().unwrap();
        }
    }

    /// Sends `sig` (STOP, CONT) to the collector process.
    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        assert!(Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .unwrap()
            .success());
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Flow `i` of the shared records, with start and end times.
fn record(i: u64) -> FlowRecord {
    FlowRecord {
        start_ns: 1_700_000_000_000_000_000 + i * 1000,
        end_ns: 1_700_000_000_000_000_000 + i * 1000 + 500,
        ..flow(i)
    }
}

fn config(collectors: Vec<String>) -> ExporterConfig {
    let mut cfg = ExporterConfig::new(collectors);
    cfg.name = "reliability-test".into();
    cfg.finish_timeout = Duration::from_secs(60);
    cfg
}

/// Sends records `range`, calling `at(i)` before each; returns sum(bytes).
/// A send the exporter holds back (its window full, nothing acknowledged)
/// for [`STUCK`] fails the test instead of hanging it.
async fn send_range(
    ex: &mut Exporter,
    range: std::ops::Range<u64>,
    mut at: impl FnMut(u64, &Exporter),
) -> u64 {
    let mut sum = 0;
    for i in range {
        at(i, ex);
        let r = record(i);
        sum += r.bytes;
        tokio::time::timeout(STUCK, ex.send(&r))
            .await
            .unwrap_or_else(|_| panic!("record {i} held back for {STUCK:?}: {:?}", ex.stats()))
            .unwrap();
    }
    sum
}

/// How long a send may be held back before the test gives up: far longer
/// than any failover, reap or restart takes, however busy the host.
const STUCK: Duration = Duration::from_secs(180);

/// How long a test waits for the exporter to be on the collector it should
/// be on (a failover, a fail-back): far longer than either takes.
const TURN: Duration = Duration::from_secs(60);

async fn totals(url: &str) -> (i64, i64, i64) {
    let db = qosloop_store::Db::connect(url).await.unwrap();
    let q = "SELECT count(*), CAST(COALESCE(sum(bytes), 0) AS BIGINT), \
             (SELECT count(*) FROM (SELECT 1 FROM flows GROUP BY exporter_id, session_id, seq, start_ns HAVING count(*) > 1) d) FROM flows";
    let t = match &db {
        qosloop_store::Db::Sqlite(p) => sqlx::query_as(q).fetch_one(p).await.unwrap(),
        qosloop_store::Db::Postgres(p) => sqlx::query_as(q).fetch_one(p).await.unwrap(),
    };
    db.close().await;
    t
}

fn check(report: &Report, n: u64) {
    assert_eq!(report.records, n);
    assert!(
        report.complete(),
        "not every record acknowledged: {report:?}"
    );
    assert_eq!(report.dropped_records, 0, "{report:?}");
}

async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// kill -9 of the only collector in the middle of a stream of 1M records,
/// then a restart on the same port and database: exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_kill9_collector_mid_stream_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("flows.db").display());
    let port = free_port().unwrap();
    let mut collector = Collector::start(port, &url);
    let mut cfg = config(vec![collector.addr()]);
    cfg.batch_records = 5000;
    cfg.spool_dir = Some(dir.path().join("spool"));
    // A killed collector shows as a reset connection, not as a silence:
    // the acknowledgement timeout (a detector of silent collectors) is set
    // far above what a debug build on a busy host takes to commit a window
    // of 32 × 5,000 records, and the finish waits as long as it must.
    cfg.ack_timeout = Duration::from_secs(300);
    cfg.finish_timeout = Duration::from_secs(600);
    let mut ex = Exporter::start(cfg).unwrap();
    let n = 1_000_000u64;
    let mut killed_at = None;
    let sum = send_range(&mut ex, 0..n, |i, ex| {
        let acked = ex.stats().acked_records.load(Ordering::Relaxed);
        if killed_at.is_none() && (acked > 200_000 || i == n / 2) {
            collector.kill9();
            killed_at = Some(acked);
            std::thread::sleep(Duration::from_millis(300));
            collector.restart();
        }
    })
    .await;
    let report = ex.finish().await.unwrap();
    let acked_before = killed_at.expect("the collector was killed");
    assert!(acked_before < n, "killed mid-stream");
    check(&report, n);
    let (count, bytes, dups) = totals(&url).await;
    assert_eq!((count, bytes, dups), (n as i64, sum as i64, 0));
}

/// Two collectors on one PostgreSQL: the primary dies, records go on to the
/// secondary; the primary returns and the exporter fails back; exact totals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_failover_and_failback_exactly_once() {
    need!(Postgres::available());
    let pg = Postgres::start().unwrap();
    let url = pg.url();
    let mut primary = Collector::start(free_port().unwrap(), &url);
    let secondary = Collector::start(free_port().unwrap(), &url);
    let mut cfg = config(vec![primary.addr(), secondary.addr()]);
    cfg.batch_records = 500;
    let mut ex = Exporter::start(cfg).unwrap();
    let n = 300_000u64;
    let mut sum = 0;
    let chunk = n / 3;
    sum += send_range(&mut ex, 0..chunk, |_, _| {}).await;
    ex.flush().await.unwrap();
    // The exporter's silence detector (700 ms) may fail over on a busy
    // host and fail back later: each state is waited for, not caught at a
    // moment (generous deadlines, failing loudly).
    wait_until(TURN, || {
        ex.stats().acked_records.load(Ordering::Relaxed) > chunk / 2
            && ex.stats().collector.load(Ordering::Relaxed) == 0
    })
    .await;
    assert_eq!(
        ex.stats().collector.load(Ordering::Relaxed),
        0,
        "starts on the primary"
    );
    primary.kill9();
    sum += send_range(&mut ex, chunk..2 * chunk, |_, _| {}).await;
    ex.flush().await.unwrap();
    wait_until(TURN, || ex.stats().collector.load(Ordering::Relaxed) == 1).await;
    assert_eq!(
        ex.stats().collector.load(Ordering::Relaxed),
        1,
        "failed over to the secondary"
    );
    primary.restart();
    wait_until(TURN, || ex.stats().collector.load(Ordering::Relaxed) == 0).await;
    assert_eq!(
        ex.stats().collector.load(Ordering::Relaxed),
        0,
        "failed back to the primary"
    );
    sum += send_range(&mut ex, 2 * chunk..n, |_, _| {}).await;
    let report = ex.finish().await.unwrap();
    check(&report, n);
    assert!(report.failovers >= 2, "{report:?}");
    let (count, bytes, dups) = totals(&url).await;
    assert_eq!((count, bytes, dups), (n as i64, sum as i64, 0));
}

/// A collector that goes silent without closing its socket (SIGSTOP: a hung
/// process, or a host gone without a reset) is failed over once nothing has
/// come from it for `dead_after` (700 ms); when it comes back the exporter
/// returns to it; totals exact. Prints how long the failover took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_silent_collector_is_failed_over_and_back_exactly_once() {
    need!(Postgres::available());
    let pg = Postgres::start().unwrap();
    let url = pg.url();
    let primary = Collector::start(free_port().unwrap(), &url);
    let _secondary = Collector::start(free_port().unwrap(), &url);
    let mut cfg = config(vec![primary.addr(), _secondary.addr()]);
    cfg.batch_records = 500;
    let mut ex = Exporter::start(cfg).unwrap();
    let n = 200_000u64;
    let mut sum = send_range(&mut ex, 0..n / 2, |_, _| {}).await;
    ex.flush().await.unwrap();
    wait_until(TURN, || {
        ex.stats().acked_records.load(Ordering::Relaxed) > n / 4
            && ex.stats().collector.load(Ordering::Relaxed) == 0
    })
    .await;
    assert_eq!(ex.stats().collector.load(Ordering::Relaxed), 0);
    primary.signal("STOP");
    let stopped = Instant::now();
    // Records keep coming (bounded: at most 1000 per 10 ms step, 2000 steps).
    let mut i = n / 2;
    for _ in 0..2000 {
        if ex.stats().collector.load(Ordering::Relaxed) == 1 || i + 1000 > 3 * n / 4 {
            break;
        }
        sum += send_range(&mut ex, i..i + 1000, |_, _| {}).await;
        i += 1000;
        ex.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_until(TURN, || ex.stats().collector.load(Ordering::Relaxed) == 1).await;
    let failover = stopped.elapsed();
    assert_eq!(
        ex.stats().collector.load(Ordering::Relaxed),
        1,
        "failed over to the secondary"
    );
    println!("silent collector: failed over {failover:?} after SIGSTOP");
    primary.signal("CONT");
    wait_until(TURN, || ex.stats().collector.load(Ordering::Relaxed) == 0).await;
    assert_eq!(
        ex.stats().collector.load(Ordering::Relaxed),
        0,
        "failed back to the primary"
    );
    sum += send_range(&mut ex, i..n, |_, _| {}).await;
    let report = ex.finish().await.unwrap();
    check(&report, n);
    let (count, bytes, dups) = totals(&url).await;
    assert_eq!((count, bytes, dups), (n as i64, sum as i64, 0));
}

/// The meter stops while no collector answers: its spool stays on disk. The
/// next run re-sends it, under the earlier run's stream id, along with its
/// own records; exact totals, nothing left on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_spool_of_an_earlier_run_is_resent_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("flows.db").display());
    let port = free_port().unwrap();
    let spool_dir = dir.path().join("spool");
    let mut cfg = config(vec![format!("127.0.0.1:{port}")]);
    cfg.batch_records = 1000;
    cfg.spool_dir = Some(spool_dir.clone());
    cfg.finish_timeout = Duration::from_secs(1);
    let first = 50_000u64;
    let mut ex = Exporter::start(cfg.clone()).unwrap();
    let mut sum = send_range(&mut ex, 0..first, |_, _| {}).await;
    let report = ex.finish().await.unwrap();
    assert_eq!(report.acked_records, 0, "{report:?}");
    assert_eq!(report.dropped_records, 0, "{report:?}");
    assert!(report.spool_messages > 0, "{report:?}");
    assert_eq!(qosloop_exporter::spool_leftovers(&spool_dir).len(), 1);
    let _collector = Collector::start(port, &url);
    cfg.finish_timeout = Duration::from_secs(60);
    let second = 10_000u64;
    let mut ex = Exporter::start(cfg).unwrap();
    sum += send_range(&mut ex, first..first + second, |_, _| {}).await;
    let report = ex.finish().await.unwrap();
    check(&report, second);
    assert_eq!(report.earlier_runs_acked_records, first, "{report:?}");
    assert_eq!(report.earlier_runs_spool_messages, 0, "{report:?}");
    assert!(qosloop_exporter::spool_leftovers(&spool_dir).is_empty());
    let (count, bytes, dups) = totals(&url).await;
    assert_eq!(
        (count, bytes, dups),
        ((first + second) as i64, sum as i64, 0)
    );
}

/// No collector at all for 10 s: records spool to disk, then drain in order
/// once one starts; exact totals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_no_collector_for_10s_spools_then_drains() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("flows.db").display());
    let port = free_port().unwrap();
    let spool_dir = dir.path().join("spool");
    let mut cfg = config(vec![format!("127.0.0.1:{port}")]);
    cfg.batch_records = 1000;
    cfg.spool_dir = Some(spool_dir.clone());
    let mut ex = Exporter::start(cfg).unwrap();
    let n = 200_000u64;
    let started = Instant::now();
    let mut sum = 0;
    // Paced over ten seconds, bounded in count.
    for step in 0..20u64 {
        let per = n / 20;
        sum += send_range(&mut ex, step * per..(step + 1) * per, |_, _| {}).await;
        ex.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(started.elapsed() >= Duration::from_secs(10));
    assert_eq!(ex.stats().acked_records.load(Ordering::Relaxed), 0);
    assert!(ex.stats().spooled_records.load(Ordering::Relaxed) > 0);
    assert!(spool_files(&spool_dir) > 0, "the spool is on disk");
    let _collector = Collector::start(port, &url);
    let report = ex.finish().await.unwrap();
    check(&report, n);
    assert_eq!(spool_files(&spool_dir), 0, "drained segments are deleted");
    let (count, bytes, dups) = totals(&url).await;
    assert_eq!((count, bytes, dups), (n as i64, sum as i64, 0));
}

/// A spool too small for an outage: what does not fit is dropped, counted
/// and reported; everything else arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_spool_bound_drops_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("flows.db").display());
    let port = free_port().unwrap();
    let mut cfg = config(vec![format!("127.0.0.1:{port}")]);
    cfg.batch_records = 100;
    cfg.spool_dir = Some(dir.path().join("spool"));
    cfg.spool_max_bytes = 200_000;
    let mut ex = Exporter::start(cfg).unwrap();
    let n = 20_000u64;
    send_range(&mut ex, 0..n, |_, _| {}).await;
    ex.flush().await.unwrap();
    wait_until(TURN, || {
        let s = ex.stats();
        s.spooled_records.load(Ordering::Relaxed) + s.dropped_records.load(Ordering::Relaxed) >= n
    })
    .await;
    let _collector = Collector::start(port, &url);
    let report = ex.finish().await.unwrap();
    assert!(report.dropped_records > 0, "{report:?}");
    assert_eq!(
        report.acked_records + report.dropped_records,
        n,
        "{report:?}"
    );
    let (count, _, dups) = totals(&url).await;
    assert_eq!((count as u64, dups), (report.acked_records, 0));
}

/// PostgreSQL restarted under load: the collector reconnects and retries;
/// nothing acknowledged is lost, nothing is stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_postgres_restart_under_load_loses_nothing() {
    need!(Postgres::available());
    let mut pg = Postgres::start_durable().unwrap();
    let url = pg.url();
    let collector = Collector::start(free_port().unwrap(), &url);
    let mut cfg = config(vec![collector.addr()]);
    cfg.batch_records = 1000;
    let mut ex = Exporter::start(cfg).unwrap();
    let n = 300_000u64;
    let mut sum = send_range(&mut ex, 0..n / 2, |_, _| {}).await;
    ex.flush().await.unwrap();
    let restart = tokio::task::spawn_blocking(move || {
        pg.restart().unwrap();
        pg
    });
    sum += send_range(&mut ex, n / 2..n, |_, _| {}).await;
    let pg = restart.await.unwrap();
    let report = ex.finish().await.unwrap();
    check(&report, n);
    let (count, bytes, dups) = totals(&pg.url()).await;
    assert_eq!((count, bytes, dups), (n as i64, sum as i64, 0));
    drop(collector);
}

/// Segment files under `dir` and its stream directories.
fn spool_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            if e.path().is_dir() {
                spool_files(&e.path())
            } else {
                usize::from(e.path().extension().is_some_and(|x| x == "spool"))
            }
        })
        .sum()
}
