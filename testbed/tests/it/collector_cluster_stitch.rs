//! The cluster's `stitch` analysis with real processes and a real
//! PostgreSQL: three `qosloop-collector --cluster … --cluster-analysis
//! stitch` nodes, six exporters spread over them (each failing over to the
//! others) standing for DiCAP capture nodes in per-packet mode: every flow's
//! a → b direction is exported in two parts by two exporters, its b → a
//! direction by a third. One node is killed with SIGKILL mid-stream and
//! restarted. Then:
//!
//! - every record is in `flows` exactly once;
//! - `stitched_flows` holds exactly one row per flow and interval, with the
//!   exact totals each way (packets, bytes, parts) of what was sent, and
//!   first/last seen of its parts — nothing lost or counted twice across
//!   the kill, the restart and the buckets' moves;
//! - every row and every cursor was last written by its bucket's owner in
//!   the epoch it names, and the buckets' cursors were written by more
//!   than one node (the moved buckets resumed from their cursors).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::type_complexity)]

use crate::cluster_support;

use cluster_support::*;
use qosloop_exporter::{Exporter, ExporterConfig};
use qosloop_schema::FlowRecord;
use qosloop_store::Db;
use qosloop_testbed::harness::Postgres;
use qosloop_testbed::need;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

const FLOWS: u16 = 8;
const EXPORTERS: usize = 6;

/// `(slot, a port)` → (packets, bytes, parts) a → b, the same b → a,
/// first start, last end.
type Expected = BTreeMap<(i64, i64), ([i64; 3], [i64; 3], i64, i64)>;

fn record(k: u16, forward: bool, packets: u64, start: u64) -> FlowRecord {
    let (a, ap, b, bp) = ("10.5.0.1", 20000 + k, "10.6.0.1", 443);
    let (src, sp, dst, dp) = if forward {
        (a, ap, b, bp)
    } else {
        (b, bp, a, ap)
    };
    FlowRecord {
        src_addr: src.parse().unwrap(),
        dst_addr: dst.parse().unwrap(),
        src_port: sp,
        dst_port: dp,
        proto: 6,
        packets,
        bytes: packets * 100 + u64::from(k),
        start_ns: start,
        end_ns: start + 10_000_000,
        ..FlowRecord::default()
    }
}

/// Every 25 ms, for each flow: two parts of a → b from two exporters, one
/// part of b → a from a third; `sent` counts records, `want` the rows.
async fn send(
    exporters: &mut [Exporter],
    d: Duration,
    round: &mut u64,
    sent: &mut u64,
    want: &mut Expected,
) {
    let width = (INTERVAL_MS * 1_000_000) as i64;
    let until = Instant::now() + d;
    while Instant::now() < until {
        let start = now_ns();
        for k in 0..FLOWS {
            let i = usize::from(k);
            let parts = [
                (i % EXPORTERS, true, 1 + *round % 3),
                ((i + 1) % EXPORTERS, true, 2 + u64::from(k % 2)),
                ((i + 2) % EXPORTERS, false, 1 + (*round + u64::from(k)) % 4),
            ];
            for (e, forward, packets) in parts {
                let r = record(k, forward, packets, start);
                exporters[e].send(&r).await.unwrap();
                *sent += 1;
                let slot = start as i64 / width;
                let row = want.entry((slot, i64::from(20000 + k))).or_insert((
                    [0; 3],
                    [0; 3],
                    i64::MAX,
                    0,
                ));
                let way = if forward { &mut row.0 } else { &mut row.1 };
                way[0] += r.packets as i64;
                way[1] += r.bytes as i64;
                way[2] += 1;
                row.2 = row.2.min(r.start_ns as i64);
                row.3 = row.3.max(r.end_ns as i64);
            }
        }
        *round += 1;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_stitch_every_flow_once_with_exact_totals_across_a_kill() {
    need!(Postgres::available());
    let pg = Postgres::start().unwrap();
    let url = pg.url();
    let db = Db::connect(&url).await.unwrap();
    db.migrate().await.unwrap();
    db.publish_policy(&serde_json::to_string(&policy()).unwrap())
        .await
        .unwrap();
    let extra = [
        "--cluster-analysis",
        "bandwidth",
        "--cluster-analysis",
        "stitch",
    ];
    let mut nodes: Vec<Node> = (1..=3)
        .map(|i| Node::start(&format!("n{i}"), &url, &extra))
        .collect();
    let mut exporters = Vec::new();
    for k in 0..EXPORTERS {
        let mut order: Vec<String> = nodes.iter().map(Node::addr).collect();
        order.rotate_left(k % 3);
        let mut cfg = ExporterConfig::new(order);
        cfg.name = format!("capture{k}");
        cfg.batch_records = 4;
        cfg.finish_timeout = Duration::from_secs(30);
        exporters.push(Exporter::start(cfg).unwrap());
    }
    let (mut round, mut sent, mut want) = (0u64, 0u64, Expected::new());
    send(
        &mut exporters,
        Duration::from_secs(2),
        &mut round,
        &mut sent,
        &mut want,
    )
    .await;
    nodes[1].kill9();
    send(
        &mut exporters,
        Duration::from_secs(2),
        &mut round,
        &mut sent,
        &mut want,
    )
    .await;
    nodes[1].restart();
    send(
        &mut exporters,
        Duration::from_secs(2),
        &mut round,
        &mut sent,
        &mut want,
    )
    .await;
    for ex in exporters {
        let report = ex.finish().await.unwrap();
        assert!(report.complete(), "{report:?}");
    }

    // Every record stored once.
    assert_eq!(scalar(&db, "SELECT count(*) FROM flows").await, sent as i64);
    let unbucketed = scalar(&db, "SELECT count(*) FROM flows WHERE bucket IS NULL").await;
    assert_eq!(unbucketed, 0, "every row of a cluster node has its bucket");

    // The owners catch up with every stored record.
    let parts_q =
        "SELECT CAST(COALESCE(sum(parts_ab + parts_ba), 0) AS BIGINT) FROM stitched_flows";
    let deadline = Instant::now() + DEADLINE;
    let mut parts = scalar(&db, parts_q).await;
    while parts < sent as i64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        parts = scalar(&db, parts_q).await;
    }
    // No more arrive after (nothing counted twice later).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        scalar(&db, parts_q).await,
        sent as i64,
        "parts stitched vs records sent"
    );

    // One row per flow and interval, exact each way.
    let Db::Postgres(p) = &db else { unreachable!() };
    let rows: Vec<(i64, String, i64, String, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, String, i64)> =
        sqlx::query_as(
            "SELECT slot, a_addr, CAST(a_port AS BIGINT), b_addr, CAST(b_port AS BIGINT), packets_ab, bytes_ab, parts_ab, \
             packets_ba, bytes_ba, parts_ba, first_ns, last_ns, CAST(bucket AS BIGINT), node, epoch \
             FROM stitched_flows ORDER BY slot, a_port",
        )
        .fetch_all(p)
        .await
        .unwrap();
    let mut got = Expected::new();
    for r in &rows {
        assert_eq!(
            (r.1.as_str(), r.3.as_str(), r.4),
            ("10.5.0.1", "10.6.0.1", 443)
        );
        let old = got.insert((r.0, r.2), ([r.5, r.6, r.7], [r.8, r.9, r.10], r.11, r.12));
        assert!(old.is_none(), "flow {} slot {} stitched twice", r.2, r.0);
    }
    assert_eq!(got.len(), want.len());
    for (k, w) in &want {
        assert_eq!(got.get(k), Some(w), "flow {} slot {}", k.1, k.0);
    }

    // Last written by the owner of the bucket in the epoch named.
    let ownership: Vec<(i64, i32, String)> =
        sqlx::query_as("SELECT epoch, bucket, node FROM cluster_ownership WHERE cluster = $1")
            .bind(CLUSTER)
            .fetch_all(p)
            .await
            .unwrap();
    let owner: HashMap<(i64, i64), String> = ownership
        .into_iter()
        .map(|(e, b, n)| ((e, i64::from(b)), n))
        .collect();
    for r in &rows {
        assert_eq!(
            owner.get(&(r.15, r.13)),
            Some(&r.14),
            "row of flow {} slot {}",
            r.2,
            r.0
        );
    }
    let cursors: Vec<(i32, String, i64)> =
        sqlx::query_as("SELECT bucket, node, epoch FROM stitch_cursors WHERE cluster = $1")
            .bind(CLUSTER)
            .fetch_all(p)
            .await
            .unwrap();
    for (b, n, e) in &cursors {
        assert_eq!(
            owner.get(&(*e, i64::from(*b))),
            Some(n),
            "cursor of bucket {b}"
        );
    }
    let epochs = scalar(&db, "SELECT count(*) FROM cluster_epochs").await;
    assert!(
        epochs >= 3,
        "{epochs} epochs: the kill and the restart moved buckets"
    );
    let writers = scalar(&db, "SELECT count(DISTINCT node) FROM stitch_cursors").await;
    assert!(writers >= 2, "cursors written by {writers} node(s)");
    eprintln!(
        "FIGURE stitch: {sent} records -> {} rows over {epochs} epochs, cursors of {} buckets by {writers} nodes",
        rows.len(),
        cursors.len()
    );
    drop(nodes);
    db.close().await;
}
