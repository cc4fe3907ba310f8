//! Exporter and collector in one process over loopback, SQLite storage:
//! the protocol path end to end, quickly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_collector::{Config, Db, Sink};
use qosloop_exporter::{Exporter, ExporterConfig};
use qosloop_schema::FlowRecord;
use std::time::Duration;

fn record(i: u64) -> FlowRecord {
    FlowRecord {
        src_addr: if i % 7 == 0 {
            format!("2001:db8::{:x}", i % 65535).parse().unwrap()
        } else {
            format!("10.0.{}.{}", (i >> 8) % 256, i % 256)
                .parse()
                .unwrap()
        },
        dst_addr: "192.0.2.9".parse().unwrap(),
        src_port: (i % 60000) as u16,
        dst_port: 80,
        proto: 6,
        packets: 1 + i % 3,
        bytes: 40 + i % 1400,
        start_ns: 1_700_000_000_000_000_000 + i,
        end_ns: 1_700_000_000_000_000_000 + i + 10,
        class: (i % 5 == 0).then(|| "web".to_owned()),
        ..FlowRecord::default()
    }
}

async fn totals(db: &Db) -> (i64, i64) {
    let Db::Sqlite(pool) = db else { panic!() };
    sqlx::query_as("SELECT count(*), COALESCE(sum(bytes), 0) FROM flows")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_arrive_once_in_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("c.db").display());
    let config = Config {
        listen: "127.0.0.1:0".into(),
        db: url.clone(),
        disable_keys: vec!["userName".into()],
        ..Config::default()
    };
    let listener = qosloop_collector::bind(&config).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sink = qosloop_collector::open_sink(&url).await.unwrap();
    let server =
        tokio::spawn(async move { qosloop_collector::serve(listener, sink, &config).await });

    let mut cfg = ExporterConfig::new(vec![addr.to_string()]);
    cfg.batch_records = 500;
    let mut ex = Exporter::start(cfg).unwrap();
    let n = 20_000u64;
    let mut sum = 0;
    for i in 0..n {
        let r = record(i);
        sum += r.bytes;
        ex.send(&r).await.unwrap();
    }
    let report = tokio::time::timeout(Duration::from_secs(60), ex.finish())
        .await
        .unwrap()
        .unwrap();
    assert!(report.complete(), "{report:?}");
    let db = Db::connect(&url).await.unwrap();
    assert_eq!(totals(&db).await, (n as i64, sum as i64));
    let Db::Sqlite(pool) = &db else { panic!() };
    let (v6,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM flows WHERE src_addr LIKE '2001:db8::%'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(v6, (0..n).filter(|i| i % 7 == 0).count() as i64);
    let (templates, sessions): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM templates), (SELECT count(*) FROM sessions WHERE stopped_ns IS NOT NULL)")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!((templates, sessions), (2, 1));
    server.abort();
    let _ = Sink::Discard;
}
