//! The collector cluster with real processes and a real PostgreSQL: three
//! `qosloop-collector --cluster` nodes, exporters spread over them (each
//! fails over to the others), one node killed with SIGKILL mid-stream and
//! restarted, a fourth added mid-stream, one stopped cleanly. Then:
//!
//! - every record is in `flows` exactly once (count, bytes, no key twice);
//! - no window's rate holds more than was committed before its owner
//!   wrote it, and over the run each subject's bytes in the rates plus its
//!   late bytes (committed after their window was computed: reported) are
//!   the single-node computation on the same records (within 0.5%); every
//!   window written once, and the EWMA chain continues across owners
//!   (state resumed, not restarted);
//! - no bucket had two owners in one epoch, and every rate row was written
//!   by the owner of its subject's bucket in the epoch it names;
//! - a node with another routing configuration is refused, naming it.
//!
//! The gaps in fresh rates around each move are printed (figures for
//! `docs/cluster.md`), not asserted.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::type_complexity)]

use crate::cluster_support;

use cluster_support::*;
use qosloop_exporter::{Exporter, ExporterConfig};
use qosloop_store::Db;
use qosloop_testbed::harness::Postgres;
use qosloop_testbed::need;
use std::process::Command;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_kill_add_stop_exactly_once_and_rates_equal_one_node() {
    need!(Postgres::available());
    let pg = start_postgres().await;
    let url = pg.url();
    let db = Db::connect(&url).await.unwrap();
    db.migrate().await.unwrap();
    let policy = policy();
    db.publish_policy(&serde_json::to_string(&policy).unwrap())
        .await
        .unwrap();

    let mut nodes: Vec<Node> = (1..=3)
        .map(|i| Node::start(&format!("n{i}"), &url, &[]))
        .collect();
    // A node with another routing configuration is refused, by name.
    let out = Command::new(qosloop_testkit::component("qosloop-collector").unwrap())
        .args(Node::new("odd", &url, &["--cluster-buckets", "32"], &[]).args())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{text}");
    assert!(text.contains("buckets: cluster 64, this node 32"), "{text}");
    // (Each node started once it followed the published policy.)

    // Exporters, one per subject, each starting at another node.
    let mut exporters = Vec::new();
    for k in 0..SUBJECTS {
        let mut order: Vec<String> = nodes.iter().map(Node::addr).collect();
        let n = order.len();
        order.rotate_left(usize::from(k) % n);
        let mut cfg = ExporterConfig::new(order);
        cfg.name = format!("meter{k}");
        cfg.batch_records = 5;
        cfg.finish_timeout = Duration::from_secs(30);
        exporters.push(Exporter::start(cfg).unwrap());
    }
    let mut sent = (0u64, 0u64);
    let mut marks: Vec<(&str, u64)> = Vec::new();
    let first_record_ns = now_ns();
    run(&mut exporters, Duration::from_secs(2), &mut sent).await;
    marks.push(("kill -9 n2", now_ns()));
    nodes[1].kill9();
    run(&mut exporters, Duration::from_secs(2), &mut sent).await;
    marks.push(("restart n2", now_ns()));
    nodes[1].restart();
    run(&mut exporters, Duration::from_secs(2), &mut sent).await;
    marks.push(("add n4", now_ns()));
    nodes.push(Node::start("n4", &url, &[]));
    run(&mut exporters, Duration::from_secs(2), &mut sent).await;
    marks.push(("stop n3", now_ns()));
    nodes[2].stop();
    run(&mut exporters, Duration::from_secs(2), &mut sent).await;
    let last_record_ns = now_ns();
    for ex in exporters {
        let report = ex.finish().await.unwrap();
        assert!(report.complete(), "{report:?}");
    }

    let Checked { by_subject, epochs } =
        check_all(&db, &policy, sent, first_record_ns, last_record_ns, 4).await;

    // Figures: when each event's epoch started, and the freshness of rates
    // (written minus window end minus lag) around it.
    let lag = (LAG_MS * 1_000_000) as i64;
    for (what, at) in &marks {
        let next = epochs.iter().find(|e| e.2 >= *at as i64);
        let moved = next.map(|e| (e.2 - *at as i64) as f64 / 1e6);
        let worst = by_subject
            .values()
            .flatten()
            .filter(|r| r.0 + lag >= *at as i64 && r.0 + lag < *at as i64 + 4_000_000_000)
            .map(|r| (r.5 - r.0 - lag) as f64 / 1e6)
            .fold(0.0, f64::max);
        eprintln!(
            "FIGURE {what}: new epoch after {} ms; stalest rate written {worst:.0} ms after its window closed",
            moved.map_or("-".into(), |m| format!("{m:.0}"))
        );
    }
    drop(nodes);
    db.close().await;
}
