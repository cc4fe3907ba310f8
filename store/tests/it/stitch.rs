//! The `stitch` analysis' storage on SQLite and on a real PostgreSQL: the
//! bucket column written with the rows, a bucket's records read after its
//! cursor in pages, DiCAP's per-packet parts merged to exact totals, both
//! directions stitched into one row, added to (not duplicated) by later
//! records, a re-sent message not counted again; on PostgreSQL also the id
//! horizon held below a transaction still running, and the fencing of the
//! write (lease, epoch, ownership) leaving cursor and rows untouched.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_schema::{flow_hash, FlowRecord};
use qosloop_store::{
    flow_bucket, Batch, ClusterError, Db, Fence, Horizon, RoutingConfig, StitchedQuery, StitchedRow,
};
use qosloop_testkit::harness::Postgres;
use qosloop_testkit::need;
use std::time::Duration;

const BUCKETS: u32 = 8;
const SEC: u64 = 1_000_000_000;

fn part(src: &str, sp: u16, dst: &str, dp: u16, packets: u64, start: u64) -> FlowRecord {
    FlowRecord {
        src_addr: src.parse().unwrap(),
        dst_addr: dst.parse().unwrap(),
        src_port: sp,
        dst_port: dp,
        proto: 6,
        packets,
        bytes: packets * 100,
        start_ns: start,
        end_ns: start + SEC / 2,
        tcp_flags: Some(0x10),
        ..Default::default()
    }
}

async fn store(db: &Db, ex: i64, seq: u32, records: Vec<FlowRecord>) {
    let b = Batch {
        exporter_id: ex,
        session_id: 1,
        seq,
        records,
        dedup: true,
    };
    db.commit_batches_routed(&[&b], Some(BUCKETS), None, None, 1)
        .await
        .unwrap();
}

/// Steps every bucket (pages of `limit`) until each cursor reached the
/// horizon; returns the records read.
async fn stitch_all(db: &Db, fence: Option<&Fence>, horizon: &mut Horizon, limit: i64) -> u64 {
    let max = db.max_flow_id().await.unwrap();
    let mut h = 0;
    for _ in 0..50 {
        h = horizon.advance(db, Duration::from_secs(5)).await.unwrap();
        if h >= max {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(h >= max, "the horizon {h} did not reach {max}");
    let mut records = 0;
    for b in 0..BUCKETS {
        loop {
            let s = db
                .stitch_step(fence, b, h, SEC as i64, BUCKETS, limit)
                .await
                .unwrap();
            records += s.records;
            assert_eq!(s.bad, 0);
            if s.after_id >= h {
                break;
            }
        }
    }
    records
}

async fn rows(db: &Db) -> Vec<StitchedRow> {
    let mut r = db
        .stitched_flows(&StitchedQuery {
            from_ns: 0,
            to_ns: i64::MAX,
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    r.sort_by(|x, y| (x.slot, &x.a_addr, x.a_port).cmp(&(y.slot, &y.a_addr, y.a_port)));
    r
}

/// The scenario both engines run; `fence` on PostgreSQL.
async fn exercise(db: &Db, fence: Option<&Fence>) {
    let ex = db.register_exporter("m", "127.0.0.1:5", 1).await.unwrap();
    db.open_session(ex, 1, "little").await.unwrap();
    let t = 10 * SEC;
    // Flow 1: two capture nodes' parts of a -> b, one part of b -> a.
    // Flow 2: one direction only. Flow 1 again in the next interval.
    let first = vec![
        part("10.0.0.1", 5000, "10.0.0.2", 80, 3, t + 100),
        part("10.0.0.1", 5000, "10.0.0.2", 80, 4, t + 50),
        part("10.0.0.2", 80, "10.0.0.1", 5000, 5, t + 200),
        part("10.0.0.3", 6000, "10.0.0.2", 80, 1, t),
        part("10.0.0.1", 5000, "10.0.0.2", 80, 2, t + SEC + 1),
    ];
    store(db, ex, 1, first.clone()).await;
    // A re-sent message is not stored, so not stitched again.
    store(db, ex, 1, first).await;
    // The bucket column is the flow hash's bucket, both directions alike.
    let h = i64::from(flow_hash(
        "10.0.0.1".parse().unwrap(),
        "10.0.0.2".parse().unwrap(),
        5000,
        80,
        6,
    ));
    let b1 = flow_bucket(h, BUCKETS);
    let in_b1 = db
        .flows_of_bucket(b1, 0, i64::MAX, 100)
        .await
        .unwrap()
        .len();
    assert!(in_b1 >= 4, "{in_b1} rows of flow 1 in its bucket {b1}");

    let mut horizon = Horizon::default();
    // Pages of 2 records: the cursor moves page by page.
    assert_eq!(stitch_all(db, fence, &mut horizon, 2).await, 5);
    let r = rows(db).await;
    assert_eq!(r.len(), 3, "{r:?}");
    let f1 = &r[0];
    assert_eq!(
        (f1.a_addr.as_str(), f1.a_port, f1.b_addr.as_str(), f1.b_port),
        ("10.0.0.1", 5000, "10.0.0.2", 80)
    );
    assert_eq!((f1.packets_ab, f1.bytes_ab, f1.parts_ab), (7, 700, 2));
    assert_eq!((f1.packets_ba, f1.bytes_ba, f1.parts_ba), (5, 500, 1));
    assert_eq!(
        (f1.first_ns, f1.last_ns),
        ((t + 50) as i64, (t + 200 + SEC / 2) as i64)
    );
    assert_eq!(
        (f1.tcp_flags, f1.vlan, f1.bucket),
        (Some(0x10), -1, i64::from(b1))
    );
    // 10.0.0.3:6000 -> 10.0.0.2:80 is b -> a (a is the lower endpoint).
    assert_eq!(
        (r[1].b_port, r[1].packets_ab, r[1].packets_ba),
        (6000, 0, 1)
    );
    assert_eq!((r[2].slot, r[2].packets_ab), (11, 2));
    // Nothing new: no step reads or writes.
    assert_eq!(stitch_all(db, fence, &mut horizon, 2).await, 0);

    // A third capture node's part of flow 1, later: added to the same row.
    store(
        db,
        ex,
        2,
        vec![part("10.0.0.2", 80, "10.0.0.1", 5000, 6, t + 300)],
    )
    .await;
    assert_eq!(stitch_all(db, fence, &mut horizon, 100).await, 1);
    let r = rows(db).await;
    assert_eq!(r.len(), 3);
    assert_eq!(
        (r[0].packets_ba, r[0].parts_ba, r[0].packets_ab),
        (11, 2, 7)
    );
    let parts: i64 = r.iter().map(|x| x.parts_ab + x.parts_ba).sum();
    assert_eq!(parts, 6, "every stored record in exactly one row");

    // The API's filters: by endpoint and protocol, by time.
    let by_addr = db
        .stitched_flows(&StitchedQuery {
            from_ns: 0,
            to_ns: i64::MAX,
            addr: Some("10.0.0.3".into()),
            proto: Some(6),
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(by_addr.len(), 1);
    let late = db
        .stitched_flows(&StitchedQuery {
            from_ns: (t + SEC) as i64,
            to_ns: i64::MAX,
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(late.len(), 1, "{late:?}");
    assert!(db
        .stitched_flows(&StitchedQuery {
            from_ns: 0,
            to_ns: i64::MAX,
            proto: Some(17),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn stitch_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("s.db").display());
    let db = Db::connect(&url).await.unwrap();
    db.migrate().await.unwrap();
    exercise(&db, None).await;
    // A cluster's fence needs PostgreSQL.
    let f = Fence {
        cluster: "c".into(),
        node: "a".into(),
        epoch: 1,
    };
    assert!(matches!(
        db.stitch_step(Some(&f), 0, 100, 1, BUCKETS, 10).await,
        Err(ClusterError::NotPostgres)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stitch_on_postgres_fenced_with_the_horizon_below_running_transactions() {
    need!(Postgres::available());
    let pg = Postgres::start().unwrap();
    let db = Db::connect(&pg.url()).await.unwrap();
    db.migrate().await.unwrap();
    let routing = RoutingConfig {
        buckets: BUCKETS,
        ..Default::default()
    };
    let lease = Duration::from_secs(30);
    db.cluster_join("c", "a", "127.0.0.1:1", &routing, lease)
        .await
        .unwrap();
    let e1 = db.cluster_rebalance("c", BUCKETS).await.unwrap();
    let fa = Fence {
        cluster: "c".into(),
        node: "a".into(),
        epoch: e1.epoch,
    };
    exercise(&db, Some(&fa)).await;

    // The horizon stays below the id of a transaction still running,
    // though later ids commit; its row is stitched once it committed.
    let Db::Postgres(pool) = &db else {
        unreachable!()
    };
    let mut horizon = Horizon::default();
    let before = stitch_all(&db, Some(&fa), &mut horizon, 100).await;
    assert_eq!(before, 0);
    let mut open = pool.begin().await.unwrap();
    let hash = i64::from(flow_hash(
        "10.9.0.1".parse().unwrap(),
        "10.9.0.2".parse().unwrap(),
        7000,
        53,
        17,
    ));
    let (slow_id,): (i64,) = sqlx::query_as(
        "INSERT INTO flows (exporter_id, session_id, seq, src_addr, dst_addr, src_port, dst_port, proto, \
         packets, bytes, start_ns, end_ns, flow_hash, bucket) \
         VALUES (1, 1, 99, '10.9.0.1', '10.9.0.2', 7000, 53, 17, 1, 60, 20000000000, 20000000001, $1, $2) RETURNING id",
    )
    .bind(hash)
    .bind(flow_bucket(hash, BUCKETS) as i32)
    .fetch_one(&mut *open)
    .await
    .unwrap();
    let ex = db.register_exporter("m2", "127.0.0.1:6", 1).await.unwrap();
    db.open_session(ex, 1, "little").await.unwrap();
    store(
        &db,
        ex,
        1,
        vec![part("10.0.0.7", 1, "10.0.0.8", 2, 1, 30 * SEC)],
    )
    .await;
    let later = db.max_flow_id().await.unwrap();
    assert!(later > slow_id);
    for _ in 0..5 {
        let h = horizon.advance(&db, Duration::from_secs(60)).await.unwrap();
        assert!(
            h < slow_id,
            "the horizon {h} passed the running transaction's id {slow_id}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    open.commit().await.unwrap();
    assert_eq!(stitch_all(&db, Some(&fa), &mut horizon, 100).await, 2);

    // Fencing: a node without a lease, a stale epoch, a bucket not owned
    // write nothing, and the cursor stays.
    store(
        &db,
        ex,
        2,
        vec![part("10.0.0.7", 1, "10.0.0.8", 2, 1, 31 * SEC)],
    )
    .await;
    let b = flow_bucket(
        i64::from(flow_hash(
            "10.0.0.7".parse().unwrap(),
            "10.0.0.8".parse().unwrap(),
            1,
            2,
            6,
        )),
        BUCKETS,
    );
    let top = db.max_flow_id().await.unwrap();
    let cursor = db.stitch_cursor("c", b).await.unwrap();
    let stranger = Fence {
        node: "x".into(),
        ..fa.clone()
    };
    let err = db
        .stitch_step(Some(&stranger), b, top, SEC as i64, BUCKETS, 100)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no valid lease"), "{err}");
    db.cluster_join("c", "b", "127.0.0.1:2", &routing, lease)
        .await
        .unwrap();
    let e2 = db.cluster_rebalance("c", BUCKETS).await.unwrap();
    let err = db
        .stitch_step(Some(&fa), b, top, SEC as i64, BUCKETS, 100)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not the newest"), "{err}");
    let owner = e2.owners[b as usize].clone();
    let other = if owner == "a" { "b" } else { "a" };
    let wrong = Fence {
        cluster: "c".into(),
        node: other.into(),
        epoch: e2.epoch,
    };
    let err = db
        .stitch_step(Some(&wrong), b, top, SEC as i64, BUCKETS, 100)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not own bucket"), "{err}");
    assert_eq!(db.stitch_cursor("c", b).await.unwrap(), cursor);
    // The bucket's owner in the new epoch resumes from the cursor.
    let right = Fence {
        node: owner,
        ..wrong
    };
    let s = db
        .stitch_step(Some(&right), b, top, SEC as i64, BUCKETS, 100)
        .await
        .unwrap();
    assert_eq!((s.records, s.after_id), (1, top));
    let r = rows(&db).await;
    let f = r
        .iter()
        .find(|x| x.a_addr == "10.0.0.7" && x.slot == 31)
        .unwrap();
    assert_eq!(
        (f.parts_ab, f.node.as_deref()),
        (1, Some(right.node.as_str()))
    );
    db.close().await;
}
