//! `flows` retention and partitions ahead: on a real PostgreSQL with
//! several handles (as several collector processes would) maintaining at
//! once, and on SQLite with chunked deletes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_schema::FlowRecord;
use qosloop_store::{on_pool, Batch, Db, Retention, DAY_NS};
use qosloop_testkit::harness::Postgres;
use qosloop_testkit::need;

/// Noon of a fixed day, so that the test does not depend on the clock.
const NOW: i64 = 20_000 * DAY_NS + DAY_NS / 2;

async fn scalar(db: &Db, q: &str) -> i64 {
    on_pool!(db, p, D => sqlx::query_scalar::<D, i64>(q).fetch_one(p).await).unwrap()
}

/// `n` records ending `days_ago` days before NOW.
async fn store(db: &Db, exporter: i64, seq: u32, days_ago: i64, n: usize) {
    let end = (NOW - days_ago * DAY_NS) as u64;
    let rec = FlowRecord {
        src_addr: "10.0.0.1".parse().unwrap(),
        dst_addr: "10.0.0.2".parse().unwrap(),
        packets: 1,
        bytes: 100,
        start_ns: end - 1_000,
        end_ns: end,
        ..FlowRecord::default()
    };
    let batch = Batch {
        exporter_id: exporter,
        session_id: 1,
        seq,
        records: vec![rec; n],
        dedup: false,
    };
    db.commit_batches(&[&batch]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_ahead_and_retention_with_four_nodes_at_once() {
    need!(Postgres::available());
    let pg = Postgres::start().unwrap();
    let first = Db::connect(&pg.url()).await.unwrap();
    first.migrate().await.unwrap();
    let ex = first
        .register_exporter("m", "127.0.0.1:1", 1)
        .await
        .unwrap();
    // Rows from before any partition existed land in the default one.
    store(&first, ex, 1, 10, 7).await;
    store(&first, ex, 2, 5, 11).await;
    store(&first, ex, 3, 0, 13).await;
    assert_eq!(
        scalar(&first, "SELECT count(*) FROM flows_default").await,
        31
    );

    // Four nodes make the partitions ahead at the same moment.
    let nodes: Vec<Db> = futures_join(4, &pg.url()).await;
    let retention = Retention {
        days: 0,
        ahead_days: 2,
        chunk_rows: 4,
    };
    let runs = nodes.iter().enumerate().map(|(i, db)| {
        let db = db.clone();
        tokio::spawn(async move { db.maintain_flows(&format!("n{i}"), retention, NOW).await })
    });
    let mut created = 0;
    for r in runs {
        created += r.await.unwrap().unwrap().partitions_created;
    }
    assert_eq!(created, 3, "today and two days ahead, each made once");
    let parts = first.flow_partitions().await.unwrap();
    assert_eq!(
        parts,
        (0..3)
            .map(|d| ((20_000 + d) * DAY_NS, (20_001 + d) * DAY_NS))
            .collect::<Vec<_>>()
    );
    // Today's rows moved out of the default partition into today's.
    assert_eq!(
        scalar(&first, "SELECT count(*) FROM flows_d20000").await,
        13
    );
    assert_eq!(
        scalar(&first, "SELECT count(*) FROM flows_default").await,
        18
    );
    // A past day gets its partition (its rows move with it).
    assert_eq!(
        first
            .ensure_flow_partitions(19_990 * DAY_NS, 19_991 * DAY_NS)
            .await
            .unwrap(),
        1
    );
    assert_eq!(scalar(&first, "SELECT count(*) FROM flows_d19990").await, 7);
    // New rows of a day made ahead go to its partition, not the default.
    store(&first, ex, 4, -1, 3).await;
    assert_eq!(scalar(&first, "SELECT count(*) FROM flows_d20001").await, 3);

    // Retention of 3 days, by four nodes at once: the partition of 10 days
    // ago is dropped whole, the rows of 5 days ago (still in the default
    // partition) deleted in chunks of 4, each once.
    let retention = Retention {
        days: 3,
        ..retention
    };
    let runs = nodes.iter().enumerate().map(|(i, db)| {
        let db = db.clone();
        tokio::spawn(async move { db.maintain_flows(&format!("n{i}"), retention, NOW).await })
    });
    let (mut dropped, mut deleted) = (0, 0);
    for r in runs {
        let m = r.await.unwrap().unwrap();
        assert_eq!(m.before_ns, Some(NOW - 3 * DAY_NS));
        dropped += m.partitions_dropped;
        deleted += m.rows_deleted;
    }
    assert_eq!(dropped, 1);
    assert_eq!(deleted, 11);
    assert_eq!(scalar(&first, "SELECT count(*) FROM flows").await, 16);
    assert!(first
        .flow_partitions()
        .await
        .unwrap()
        .iter()
        .all(|(start, _)| *start >= 20_000 * DAY_NS));
    assert_eq!(
        scalar(&first, "SELECT count(*) FROM flow_maintenance").await,
        8,
        "every run recorded"
    );
    for db in nodes {
        db.close().await;
    }
    first.close().await;
}

async fn futures_join(n: usize, url: &str) -> Vec<Db> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(Db::connect(url).await.unwrap());
    }
    out
}

#[tokio::test]
async fn sqlite_retention_deletes_in_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::connect(&format!("sqlite://{}", dir.path().join("r.db").display()))
        .await
        .unwrap();
    db.migrate().await.unwrap();
    let ex = db.register_exporter("m", "127.0.0.1:1", 1).await.unwrap();
    store(&db, ex, 1, 40, 25).await;
    store(&db, ex, 2, 1, 5).await;
    let m = db
        .maintain_flows(
            "solo",
            Retention {
                days: 30,
                ahead_days: 2,
                chunk_rows: 10,
            },
            NOW,
        )
        .await
        .unwrap();
    assert_eq!((m.partitions_created, m.partitions_dropped), (0, 0));
    assert_eq!(m.rows_deleted, 25);
    assert_eq!(scalar(&db, "SELECT count(*) FROM flows").await, 5);
    // Nothing configured: nothing removed.
    let m = db
        .maintain_flows("solo", Retention::default(), NOW + 100 * DAY_NS)
        .await
        .unwrap();
    assert_eq!((m.before_ns, m.rows_deleted), (None, 0));
    assert_eq!(scalar(&db, "SELECT count(*) FROM flows").await, 5);
}
