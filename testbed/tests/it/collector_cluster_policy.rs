//! A policy change reaches the cluster's nodes (issue 14 part 3: "a policy
//! change reaches [the owners] within a second"), with real processes and a
//! real PostgreSQL: three `qosloop-collector --cluster` nodes, each
//! receiving traffic for a subscriber the published policy does not name
//! yet; then a new version names it. Asserted: every node classifies the
//! new subject's records with the new version (its partial sums appear in
//! `rate_partials` from every node) and its owner computes its rates (rows
//! in `rates`); the traffic runs until they do (bounded by a generous
//! deadline that only a broken cluster reaches). How long that took is
//! printed (figures for
//! `docs/cluster.md`), not asserted: per node, from the publication to the
//! end of the first window in which the node counted the new subject
//! (100 ms windows: that is the resolution), and to the owner's first rate.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::cluster_support;

use cluster_support::{edge_link, subscriber_rule, DEADLINE};
use qosloop_exporter::{Exporter, ExporterConfig};
use qosloop_schema::{FlowRecord, PolicySet};
use qosloop_store::Db;
use qosloop_testbed::harness::{free_port, Postgres};
use qosloop_testbed::need;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const CLUSTER: &str = "p";
const INTERVAL_MS: u64 = 100;
const LAG_MS: u64 = 1000;
const NODES: usize = 3;
/// The subscriber the second policy version adds.
const NEW_PORT: u16 = 5009;
const NEW_DN: &str = "cn=sub9,ou=rules";

/// A cluster node, SIGKILLed on drop.
struct Node {
    name: String,
    port: u16,
    child: Child,
}

impl Node {
    fn start(name: &str, db: &str) -> Node {
        let port = free_port().unwrap();
        let child = Command::new(qosloop_testkit::component("qosloop-collector").unwrap())
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--db",
                db,
                "--cluster",
                CLUSTER,
                "--node",
                name,
                "--cluster-lease-ms",
                "1000",
                "--cluster-interval-ms",
                &INTERVAL_MS.to_string(),
                "--cluster-lag-ms",
                &LAG_MS.to_string(),
            ])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("starting qosloop-collector");
        let node = Node {
            name: name.into(),
            port,
            child,
        };
        let deadline = Instant::now() + DEADLINE;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "{name} did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        node
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Version 1: subscriber 0 and the link; version 2 adds subscriber 9.
fn policy(with_new: bool) -> PolicySet {
    let mut rules = vec![subscriber_rule(0)];
    if with_new {
        rules.push(subscriber_rule(NEW_PORT - 5000));
    }
    PolicySet {
        rules,
        links: vec![edge_link()],
        ..Default::default()
    }
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

/// The nodes that wrote partial sums of `kind` (and `subject`, if given).
async fn counting_nodes(p: &sqlx::PgPool, kind: &str, subject: Option<&str>) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT DISTINCT node FROM rate_partials WHERE cluster = $1 AND kind = $2 \
         AND ($3::text IS NULL OR subject = $3) ORDER BY node",
    )
    .bind(CLUSTER)
    .bind(kind)
    .bind(subject)
    .fetch_all(p)
    .await
    .unwrap()
}

/// Every exporter sends one record of the last 20 ms to the new
/// subscriber's port every 20 ms (bounded: 50 records a second), until
/// every node of `want` wrote partial sums of `kind` (and `subject`);
/// fails after [`DEADLINE`] naming the nodes that did.
async fn run_until(
    exporters: &mut [Exporter],
    p: &sqlx::PgPool,
    kind: &str,
    subject: Option<&str>,
    want: &[String],
) {
    let deadline = Instant::now() + DEADLINE;
    let mut checked = Instant::now();
    loop {
        if checked.elapsed() >= Duration::from_millis(200) {
            checked = Instant::now();
            let nodes = counting_nodes(p, kind, subject).await;
            if nodes == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{kind} {subject:?}: only {nodes:?} of {want:?} counted within {DEADLINE:?}"
            );
        }
        send_round(exporters).await;
    }
}

/// One record per exporter, then 20 ms.
async fn send_round(exporters: &mut [Exporter]) {
    let step = Duration::from_millis(20);
    let end = now_ns() as u64;
    for (k, ex) in (0u16..).zip(exporters.iter_mut()) {
        let r = FlowRecord {
            src_addr: "10.1.0.1".parse().unwrap(),
            dst_addr: "10.2.0.1".parse().unwrap(),
            src_port: 40000 + k,
            dst_port: NEW_PORT,
            proto: 17,
            packets: 10,
            bytes: 1000,
            start_ns: end - step.as_nanos() as u64,
            end_ns: end,
            ..FlowRecord::default()
        };
        ex.send(&r).await.unwrap();
    }
    tokio::time::sleep(step).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_reaches_every_node_and_the_owner() {
    need!(Postgres::available());
    let pg = Postgres::start().unwrap();
    let url = pg.url();
    let db = Db::connect(&url).await.unwrap();
    db.migrate().await.unwrap();
    db.publish_policy(&serde_json::to_string(&policy(false)).unwrap())
        .await
        .unwrap();
    let nodes: Vec<Node> = (1..=NODES)
        .map(|i| Node::start(&format!("n{i}"), &url))
        .collect();
    let Db::Postgres(p) = &db else { unreachable!() };

    // One exporter per node, each sending to its own node first.
    let mut exporters = Vec::new();
    for (k, _) in nodes.iter().enumerate() {
        let mut order: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        order.rotate_left(k);
        let mut cfg = ExporterConfig::new(order);
        cfg.name = format!("meter{k}");
        cfg.batch_records = 1;
        cfg.finish_timeout = Duration::from_secs(30);
        exporters.push(Exporter::start(cfg).unwrap());
    }
    // Under version 1 every node counts the traffic, for the link only.
    let want: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    run_until(&mut exporters, p, "link", None, &want).await;
    assert_eq!(
        counting_nodes(p, "flow", Some(NEW_DN)).await,
        Vec::<String>::new(),
        "nobody counts the new subject under version 1"
    );

    let published_ns = now_ns();
    let version = db
        .publish_policy(&serde_json::to_string(&policy(true)).unwrap())
        .await
        .unwrap();
    assert_eq!(version, 2);
    // Every node classifies the new subject's records with version 2.
    run_until(&mut exporters, p, "flow", Some(NEW_DN), &want).await;
    for ex in exporters {
        let report = ex.finish().await.unwrap();
        assert!(report.complete(), "{report:?}");
    }

    let width = (INTERVAL_MS * 1_000_000) as i64;
    let first: Vec<(String, i64)> = sqlx::query_as(
        "SELECT node, min(slot) FROM rate_partials WHERE cluster = $1 AND kind = 'flow' \
         AND subject = $2 GROUP BY node ORDER BY node",
    )
    .bind(CLUSTER)
    .bind(NEW_DN)
    .fetch_all(p)
    .await
    .unwrap();
    let names: Vec<String> = first.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(names, want, "every node counts the new subject");

    // Its owner computes its rates.
    let deadline = Instant::now() + DEADLINE + Duration::from_millis(LAG_MS);
    let first_rate = loop {
        let row: Option<(i64, f64, Option<i64>)> = sqlx::query_as(
            "SELECT at_ns, rate_kbps, computed_ns FROM rates WHERE subject = 'flow' \
             AND name = 'sub9' AND rate_kbps > 0 ORDER BY at_ns LIMIT 1",
        )
        .fetch_optional(p)
        .await
        .unwrap();
        if let Some(r) = row {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "no rate of the new subject from its owner"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let mut worst = f64::MIN;
    for (node, slot) in &first {
        let ms = ((slot + 1) * width - published_ns) as f64 / 1e6;
        worst = worst.max(ms);
        eprintln!(
            "FIGURE policy version 2 at {node}: first window counting the new subject ends {ms:.0} ms after the publication"
        );
    }
    let (at_ns, _, computed_ns) = first_rate;
    eprintln!(
        "FIGURE policy change: every node classifies with it within {worst:.0} ms (window resolution {INTERVAL_MS} ms); \
         the owner's first rate of the new subject is for the window ending {:.0} ms after the publication, written {} ms after it (lag {LAG_MS} ms)",
        (at_ns - published_ns) as f64 / 1e6,
        computed_ns.map_or("-".into(), |c| format!("{:.0}", (c - published_ns) as f64 / 1e6)),
    );
    drop(nodes);
    db.close().await;
}
