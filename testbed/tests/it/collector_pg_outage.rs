//! PostgreSQL unreachable for 10 s (issue 14, bad input), with a real
//! server from the test kit's harness stopped and started again and the
//! collector as its binary:
//!
//! - IPFIX over UDP has no acknowledgement: records are journaled
//!   (`--ipfix-journal-dir`); while the database is away the journal grows
//!   and the collector says so; when it is back the journal drains. Every
//!   record sent is in `flows` once.
//! - CRANE acknowledges only after commit: the exporter holds (window,
//!   spool) and re-sends what was not acknowledged; every record is in
//!   `flows` once and the exporter's report is complete.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::collector_common as common;
use qosloop_testkit::ipfix as ipfix_support;

use ipfix_support::*;
use qosloop_exporter::{Exporter, ExporterConfig};
use qosloop_testbed::harness::{free_port, Postgres};
use qosloop_testbed::need;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

const OUTAGE: Duration = Duration::from_secs(10);

/// One row of two numbers; (-1, -1) while the query fails (the schema
/// not there yet).
fn pg_query(url: &str, sql: &str) -> (i64, i64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        let v: Result<(i64, i64), _> = sqlx::query_as(sql).fetch_one(&pool).await;
        pool.close().await;
        v.unwrap_or((-1, -1))
    })
}

fn flows(url: &str) -> (i64, i64) {
    pg_query(
        url,
        "SELECT count(*), COALESCE(sum(bytes), 0)::bigint FROM flows",
    )
}

fn status(dir: &Path, key: &str) -> u64 {
    qosloop_collector::journal::read_status(dir)
        .into_iter()
        .find(|(k, _)| k == key)
        .map_or(0, |(_, v)| v)
}

fn wait(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cond()
}

/// 100 messages of 20 records each from `exporter`, sequence numbers from
/// `seq`; returns the sum of bytes.
fn send_burst(exporter: &UdpSocket, addr: SocketAddr, seq: &mut u32, sport: &mut u16) -> i64 {
    let mut sum = 0;
    for _ in 0..100 {
        let mut body = Vec::new();
        for _ in 0..20 {
            *sport = sport.wrapping_add(1);
            let bytes = 40 + u64::from(*sport % 1000);
            sum += bytes as i64;
            body.extend(v4_record(*sport, 1, bytes));
        }
        let m = Ipfix::default().set(256, &body).message(*seq, 1);
        *seq += 20;
        exporter.send_to(&m, addr).unwrap();
        std::thread::sleep(Duration::from_micros(500));
    }
    sum
}

#[test]
fn ipfix_journal_holds_through_a_10s_postgres_outage() {
    need!(Postgres::available());
    let mut pg = Postgres::start().unwrap();
    let url = pg.url();
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let mut collector = start_collector(
        dir.path(),
        "collector",
        &[
            format!("--ipfix-listen=udp://{addr}"),
            format!("--db={url}"),
            format!("--ipfix-journal-dir={}", journal.display()),
            "--ipfix-journal-fsync-ms=20".into(),
            "--ipfix-flush-ms=20".into(),
            "--ipfix-stats-interval-s=1".into(),
        ],
    );
    wait_udp_bound(addr, Duration::from_secs(30));
    let exporter = UdpSocket::bind("127.0.0.1:0").unwrap();
    exporter
        .send_to(&Ipfix::default().set(2, &v4_template()).message(0, 1), addr)
        .unwrap();
    let (mut seq, mut sport) = (0u32, 0u16);
    let mut sum = send_burst(&exporter, addr, &mut seq, &mut sport);
    assert!(wait(Duration::from_secs(60), || flows(&url).0 == 2000));

    // The database goes away for 10 s; records keep coming.
    pg.stop();
    let away = Instant::now();
    let mut sent = 2000;
    while away.elapsed() < OUTAGE - Duration::from_secs(1) && sent < 20_000 {
        sum += send_burst(&exporter, addr, &mut seq, &mut sport);
        sent += 2000;
        std::thread::sleep(Duration::from_millis(900));
    }
    // Held in the journal, durable, not loaded.
    assert!(
        wait(Duration::from_secs(5), || status(
            &journal,
            "synced_records"
        ) == sent),
        "synced {} of {sent}",
        status(&journal, "synced_records")
    );
    assert_eq!(status(&journal, "loaded_records"), 2000);
    assert!(status(&journal, "disk_bytes") > 8 * (sent - 2000));
    std::thread::sleep(OUTAGE.saturating_sub(away.elapsed()));
    pg.start_again().unwrap();

    // Back: the journal drains into SQL, each record once.
    assert!(
        wait(Duration::from_secs(40), || flows(&url).0 == sent as i64),
        "flows {:?} of {sent}",
        flows(&url)
    );
    assert_eq!(flows(&url), (sent as i64, sum));
    assert!(collector.terminate(Duration::from_secs(20)));
    assert_eq!(status(&journal, "loaded_records"), sent);
    for key in [
        "dropped_full",
        "dropped_io",
        "dropped_load",
        "corrupt_frames",
    ] {
        assert_eq!(status(&journal, key), 0, "{key}");
    }
    // It said so.
    let log = std::fs::read_to_string(dir.path().join("collector.log")).unwrap();
    assert!(log.contains("storage unavailable"), "{log}");
    assert!(log.contains("storage is back"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crane_exporter_holds_and_resends_through_a_10s_postgres_outage() {
    need!(Postgres::available());
    let mut pg = Some(Postgres::start().unwrap());
    let url = pg.as_ref().unwrap().url();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let _collector = start_collector(
        dir.path(),
        "crane-collector",
        &[format!("--listen=127.0.0.1:{port}"), format!("--db={url}")],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "collector did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut cfg = ExporterConfig::new(vec![format!("127.0.0.1:{port}")]);
    cfg.name = "outage-test".into();
    cfg.batch_records = 500;
    cfg.finish_timeout = Duration::from_secs(60);
    cfg.spool_dir = Some(dir.path().join("spool"));
    let mut ex = Exporter::start(cfg).unwrap();
    let (n, mut sum) = (60_000u64, 0i64);
    let mut outage = None;
    for i in 0..n {
        if i == 20_000 {
            ex.flush().await.unwrap();
            // The collector binds before it migrates: the first part is
            // committed (so the collector is up on its database) first.
            let u = url.clone();
            let committed = tokio::task::spawn_blocking(move || {
                wait(Duration::from_secs(30), || flows(&u).0 == 20_000)
            });
            assert!(committed.await.unwrap());
            // Away for 10 s while the rest is sent.
            let mut pg = pg.take().unwrap();
            pg.stop();
            outage = Some(tokio::task::spawn_blocking(move || {
                std::thread::sleep(OUTAGE);
                pg.start_again().unwrap();
                pg
            }));
        }
        if i >= 20_000 && i % 4_000 == 0 {
            tokio::time::sleep(Duration::from_millis(800)).await;
        }
        let r = common::record(i);
        sum += r.bytes as i64;
        ex.send(&r).await.unwrap();
    }
    let _pg = outage.unwrap().await.unwrap();
    let report = ex.finish().await.unwrap();
    if !report.complete() {
        let log = std::fs::read_to_string(dir.path().join("crane-collector.log")).unwrap();
        eprintln!("collector log:\n{log}");
    }
    assert_eq!(report.records, n);
    assert!(
        report.complete(),
        "not every record acknowledged: {report:?}"
    );
    assert_eq!(report.dropped_records, 0, "{report:?}");
    let (totals, (dups, _)) = tokio::task::spawn_blocking(move || {
        let dups = pg_query(
            &url,
            "SELECT count(*), 0::bigint FROM (SELECT 1 FROM flows GROUP BY exporter_id, session_id, seq, src_addr, src_port \
             HAVING count(*) > 1) d",
        );
        (flows(&url), dups)
    })
    .await
    .unwrap();
    assert_eq!(totals, (n as i64, sum));
    assert_eq!(dups, 0);
}

/// A node started while PostgreSQL is down: it starts, says so and
/// retries; UDP records wait in the journal and CRANE records are not
/// acknowledged; once the server is up (and the schema migrated by the
/// node) every record is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn started_while_postgres_is_down_it_holds_then_stores_once() {
    need!(Postgres::available());
    let mut pg = Postgres::start().unwrap();
    let url = pg.url();
    pg.stop();
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let udp: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let port = free_port().unwrap();
    let mut collector = start_collector(
        dir.path(),
        "collector-early",
        &[
            format!("--listen=127.0.0.1:{port}"),
            format!("--ipfix-listen=udp://{udp}"),
            format!("--db={url}"),
            format!("--ipfix-journal-dir={}", journal.display()),
            "--ipfix-journal-fsync-ms=20".into(),
            "--ipfix-flush-ms=20".into(),
        ],
    );
    let log = dir.path().join("collector-early.log");
    let said = |what: &'static str| {
        let log = log.clone();
        move || std::fs::read_to_string(&log).is_ok_and(|l| l.contains(what))
    };
    let retrying = tokio::task::spawn_blocking({
        let said = said("database unreachable, retrying");
        move || {
            wait_udp_bound(udp, Duration::from_secs(30));
            wait(Duration::from_secs(60), said)
        }
    });
    assert!(retrying.await.unwrap(), "the node did not say it retries");
    assert!(
        collector.wait(Duration::from_millis(100)).is_none(),
        "the node exited"
    );

    // UDP records arrive: durable in the journal, not loaded.
    let (sum_udp, synced, loaded) = tokio::task::spawn_blocking({
        let journal = journal.clone();
        move || {
            let exporter = UdpSocket::bind("127.0.0.1:0").unwrap();
            exporter
                .send_to(&Ipfix::default().set(2, &v4_template()).message(0, 1), udp)
                .unwrap();
            let (mut seq, mut sport) = (0u32, 0u16);
            let sum = send_burst(&exporter, udp, &mut seq, &mut sport);
            wait(Duration::from_secs(60), || {
                status(&journal, "synced_records") == 2000
            });
            (
                sum,
                status(&journal, "synced_records"),
                status(&journal, "loaded_records"),
            )
        }
    })
    .await
    .unwrap();
    assert_eq!((synced, loaded), (2000, 0));

    // A CRANE exporter sends; nothing is acknowledged while the server
    // is away.
    let mut cfg = ExporterConfig::new(vec![format!("127.0.0.1:{port}")]);
    cfg.name = "early-test".into();
    cfg.batch_records = 200;
    cfg.finish_timeout = Duration::from_secs(60);
    cfg.spool_dir = Some(dir.path().join("spool"));
    let mut ex = Exporter::start(cfg).unwrap();
    let (n, mut sum_crane) = (5_000u64, 0i64);
    for i in 0..n {
        let r = common::record(i);
        sum_crane += r.bytes as i64;
        ex.send(&r).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        ex.stats()
            .acked_records
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "acknowledged before anything was stored"
    );

    // The server comes up: the node migrates, the journal drains, the
    // exporter's records are stored and acknowledged, each once.
    let pg = tokio::task::spawn_blocking(move || {
        pg.start_again().unwrap();
        pg
    })
    .await
    .unwrap();
    let report = ex.finish().await.unwrap();
    assert!(report.complete(), "{report:?}");
    assert_eq!(report.dropped_records, 0, "{report:?}");
    let total = 2000 + n as i64;
    let (flows_now, dups) = tokio::task::spawn_blocking({
        let url = url.clone();
        move || {
            wait(Duration::from_secs(40), || flows(&url).0 == total);
            let dups = pg_query(
                &url,
                "SELECT count(*), 0::bigint FROM (SELECT 1 FROM flows \
                 GROUP BY exporter_id, session_id, seq, src_addr, src_port, start_ns HAVING count(*) > 1) d",
            );
            (flows(&url), dups.0)
        }
    })
    .await
    .unwrap();
    assert_eq!(flows_now, (total, sum_udp + sum_crane));
    assert_eq!(dups, 0);
    assert!(said("database reachable; storage ready")());
    assert!(collector.terminate(Duration::from_secs(20)));
    assert_eq!(status(&journal, "loaded_records"), 2000);
    drop(pg);
}
