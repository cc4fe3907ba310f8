//! The UDP journal across a crash: while its SQLite database is locked by
//! the test (so nothing loads), the collector journals 6,000 records, is
//! killed with SIGKILL and started again on the same journal and database.
//! Every record that was durable in the journal reaches `flows`, once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_testkit::ipfix as ipfix_support;

use ipfix_support::*;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

fn status(dir: &Path, key: &str) -> u64 {
    qosloop_collector::journal::read_status(dir)
        .into_iter()
        .find(|(k, _)| k == key)
        .map_or(0, |(_, v)| v)
}

/// 100 messages of 20 records with source ports from `*sport + 1`.
fn burst(exporter: &UdpSocket, addr: SocketAddr, seq: &mut u32, sport: &mut u16) {
    for _ in 0..100 {
        let mut body = Vec::new();
        for _ in 0..20 {
            *sport += 1;
            body.extend(v4_record(*sport, 1, 100));
        }
        exporter
            .send_to(&Ipfix::default().set(256, &body).message(*seq, 1), addr)
            .unwrap();
        *seq += 20;
        std::thread::sleep(Duration::from_micros(300));
    }
}

#[test]
fn records_synced_before_a_kill_9_reach_sql_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let db = dir.path().join("flows.db");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let args = vec![
        format!("--ipfix-listen=udp://{addr}"),
        format!("--db=sqlite://{}", db.display()),
        format!("--ipfix-journal-dir={}", journal.display()),
        // Every append synced before the thread goes on.
        "--ipfix-journal-fsync-ms=0".into(),
        "--ipfix-flush-ms=10".into(),
    ];
    let exporter = UdpSocket::bind("127.0.0.1:0").unwrap();
    let template = Ipfix::default().set(2, &v4_template()).message(0, 1);
    let (mut seq, mut sport) = (0u32, 0u16);

    let mut first = start_collector(dir.path(), "first", &args);
    wait_udp_bound(addr, Duration::from_secs(30));
    exporter.send_to(&template, addr).unwrap();
    // The template is stored; then the database is locked by this test
    // (an exclusive transaction), so the first run can load nothing.
    assert_eq!(
        wait_for_value(
            &db,
            "SELECT count(*) FROM templates",
            1,
            Duration::from_secs(10)
        ),
        1
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let lock = rt.block_on(async {
        use sqlx::Connection;
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        sqlx::raw_sql("BEGIN EXCLUSIVE")
            .execute(&mut c)
            .await
            .unwrap();
        c
    });
    for _ in 0..3 {
        burst(&exporter, addr, &mut seq, &mut sport);
    }
    let end = Instant::now() + Duration::from_secs(10);
    while status(&journal, "synced_records") < 6000 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    let synced = status(&journal, "synced_records");
    assert_eq!(synced, 6000, "every record durable in the journal");
    assert_eq!(status(&journal, "loaded_records"), 0, "SQL was locked");
    // Killed without a chance to flush, load or write its cursor.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    rt.block_on(async move {
        use sqlx::Connection;
        let mut lock = lock;
        sqlx::raw_sql("ROLLBACK").execute(&mut lock).await.unwrap();
        lock.close().await.unwrap();
    });
    let rows: Vec<(i64,)> = sqlite_query(&db, "SELECT count(*) FROM flows");
    assert_eq!(rows[0].0, 0, "nothing was loaded before the kill");

    let mut second = start_collector(dir.path(), "second", &args);
    wait_udp_bound(addr, Duration::from_secs(30));
    // A restarted collector has the template from SQL; sent again anyway,
    // as a UDP exporter would.
    exporter.send_to(&template, addr).unwrap();
    burst(&exporter, addr, &mut seq, &mut sport);
    let distinct = wait_for_value(
        &db,
        "SELECT count(DISTINCT src_port) FROM flows",
        8000,
        Duration::from_secs(30),
    );
    assert_eq!(distinct, 8000, "every record sent is in flows");
    assert!(second.terminate(Duration::from_secs(20)));
    let rows: Vec<(i64,)> = sqlite_query(&db, "SELECT count(*) FROM flows");
    let total = rows[0].0;
    // Nothing of the first run was committed: each record once.
    assert_eq!(total, 8000);
    assert_eq!(status(&journal, "corrupt_frames"), 0);
    assert_eq!(
        status(&journal, "dropped_full") + status(&journal, "dropped_io"),
        0
    );
}
