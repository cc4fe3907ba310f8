//! Per-user subjects in cluster mode (issue 16, docs/cluster.md), with
//! real processes and a real PostgreSQL: three `qosloop-collector
//! --cluster` nodes, the published policy a per-user rule of three users
//! and one link, three exporters each sending every user's records to its
//! own node first (so each user's records are spread over the nodes).
//! Asserted: the owners write a `rates` row of kind `user` per user and
//! window (none for the per-user rule itself), each by the owner of the
//! user subject's bucket, every window once and the EWMA chain unbroken;
//! no window holds more than was committed before its owner wrote it, and
//! over the run each user's bytes in the rates plus the late bytes
//! (committed after their window was computed: a loaded machine; reported)
//! are the single-node computation on the same records read back from
//! `flows` (within 0.5 %, cluster_support::check_windows).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::cluster_support;

use cluster_support::{
    check_windows, edge_link, now_ns, reference_by_commit, start_postgres, Node, CLUSTER, DEADLINE,
    INTERVAL_MS, LAG_MS,
};
use qosloop_exporter::{Exporter, ExporterConfig};
use qosloop_schema::bandwidth::user_subject;
use qosloop_schema::{BusinessRule, FlowRecord, FlowSpec, PolicySet};
use qosloop_store::{bucket_of, Db};
use qosloop_testbed::harness::Postgres;
use qosloop_testbed::need;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

const NODES: usize = 3;
/// An owner's `rates` row: window end, rate, average, node, epoch, when
/// it was written.
type OwnerRow = (i64, f64, f64, String, i64, i64);
/// A `rates` row: subject, name, then an [`OwnerRow`]'s columns.
type RateRow = (String, String, i64, f64, f64, String, i64, i64);
const USERS: [&str; 3] = ["alice", "bob", "carol"];
const RULE_DN: &str = "cn=users,ou=rules";

fn policy() -> PolicySet {
    PolicySet {
        rules: vec![BusinessRule {
            dn: RULE_DN.into(),
            name: "users".into(),
            priority: 10,
            enabled: true,
            roles: vec![],
            flows: vec![FlowSpec {
                proto: Some(17),
                ..Default::default()
            }],
            users: USERS.iter().map(|u| u.to_string()).collect(),
            per_user: true,
            band_basis: Default::default(),
            service_class: "gold".into(),
            link: "edge".into(),
        }],
        links: vec![edge_link()],
        ..Default::default()
    }
}

/// Every 20 ms each exporter sends one record of the last 20 ms per user
/// (and one of a user the rule does not name), for `d`: bounded at 200
/// records a second per exporter. Returns (records, bytes) sent.
async fn run(exporters: &mut [Exporter], d: Duration) -> (u64, u64) {
    let step = Duration::from_millis(20);
    let until = Instant::now() + d;
    let mut sent = (0, 0);
    let mut round = 0u64;
    while Instant::now() < until {
        let end = now_ns();
        for (k, ex) in (0u16..).zip(exporters.iter_mut()) {
            for (j, user) in (0u64..).zip(USERS.iter().copied().chain(["dave"])) {
                let r = FlowRecord {
                    src_addr: "10.1.0.1".parse().unwrap(),
                    dst_addr: "10.2.0.1".parse().unwrap(),
                    src_port: 40000 + k * 10 + j as u16,
                    dst_port: 5000,
                    proto: 17,
                    packets: 1,
                    // Different per user, exporter and round.
                    bytes: 200 * (j + 1) + 37 * u64::from(k) + round % 17,
                    start_ns: end - step.as_nanos() as u64,
                    end_ns: end,
                    user: Some(user.to_owned()),
                    ..FlowRecord::default()
                };
                sent.0 += 1;
                sent.1 += r.bytes;
                ex.send(&r).await.unwrap();
            }
        }
        round += 1;
        tokio::time::sleep(step).await;
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_users_rate_equals_the_single_node_computation() {
    need!(Postgres::available());
    let pg = start_postgres().await;
    let url = pg.url();
    let db = Db::connect(&url).await.unwrap();
    db.migrate().await.unwrap();
    let policy = policy();
    db.publish_policy(&serde_json::to_string(&policy).unwrap())
        .await
        .unwrap();
    let nodes: Vec<Node> = (1..=NODES)
        .map(|i| Node::start(&format!("n{i}"), &url, &[]))
        .collect();
    let Db::Postgres(p) = &db else { unreachable!() };
    // (Each node started once it followed the published policy: a record
    // stored before would count for nothing.)

    // One exporter per node, each sending to its own node first.
    let mut exporters = Vec::new();
    for k in 0..nodes.len() {
        let mut order: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        order.rotate_left(k);
        let mut cfg = ExporterConfig::new(order);
        cfg.name = format!("agent{k}");
        cfg.batch_records = 4;
        cfg.finish_timeout = Duration::from_secs(30);
        exporters.push(Exporter::start(cfg).unwrap());
    }
    let sent = run(&mut exporters, Duration::from_secs(8)).await;
    let last_record_ns = now_ns() as i64;
    for ex in exporters {
        let report = ex.finish().await.unwrap();
        assert!(report.complete(), "{report:?}");
    }
    let (count, bytes): (i64, i64) =
        sqlx::query_as("SELECT count(*), CAST(sum(bytes) AS BIGINT) FROM flows")
            .fetch_one(p)
            .await
            .unwrap();
    assert_eq!((count, bytes), (sent.0 as i64, sent.1 as i64));

    // Each user's records came through every node.
    let spread: Vec<(String, i64)> = sqlx::query_as(
        "SELECT subject, count(DISTINCT node) FROM rate_partials WHERE cluster = $1 AND kind = 'user' \
         GROUP BY subject ORDER BY subject",
    )
    .bind(CLUSTER)
    .fetch_all(p)
    .await
    .unwrap();
    let keys: Vec<String> = USERS.iter().map(|u| user_subject(RULE_DN, u)).collect();
    assert_eq!(
        spread,
        keys.iter()
            .map(|k| (k.clone(), NODES as i64))
            .collect::<Vec<_>>(),
        "every user's partial sums from every node"
    );

    // Every window up to the last record's is written for every user.
    let width = (INTERVAL_MS * 1_000_000) as i64;
    let last_slot = last_record_ns.div_euclid(width);
    let deadline = Instant::now() + DEADLINE + Duration::from_millis(LAG_MS);
    loop {
        let (done,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM rate_state WHERE kind = 'user' AND window_end_ns > $1",
        )
        .bind(last_slot * width)
        .fetch_one(p)
        .await
        .unwrap();
        if done == USERS.len() as i64 {
            break;
        }
        assert!(Instant::now() < deadline, "the users' windows not closed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The owners' rows.
    let rows: Vec<RateRow> = sqlx::query_as(
        "SELECT subject, name, at_ns, rate_kbps, avg_rate_kbps, node, epoch, computed_ns FROM rates \
         WHERE node IS NOT NULL ORDER BY subject, name, at_ns",
    )
    .fetch_all(p)
    .await
    .unwrap();
    assert!(
        rows.iter().all(|r| r.0 != "flow"),
        "the per-user rule is no subject of its own"
    );
    let mut by_user: BTreeMap<String, Vec<OwnerRow>> = BTreeMap::new();
    for (s, name, at, rate, avg, node, epoch, computed) in rows {
        if s == "user" {
            by_user
                .entry(name)
                .or_default()
                .push((at, rate, avg, node, epoch, computed));
        }
    }
    assert_eq!(by_user.keys().cloned().collect::<Vec<_>>(), keys);
    let owner: HashMap<(i64, u32), String> = sqlx::query_as::<_, (i64, i32, String)>(
        "SELECT epoch, bucket, node FROM cluster_ownership WHERE cluster = $1",
    )
    .bind(CLUSTER)
    .fetch_all(p)
    .await
    .unwrap()
    .into_iter()
    .map(|(e, b, n)| ((e, b as u32), n))
    .collect();

    // The single-node computation on the records stored, split by whether
    // each committed before or after its window's owner wrote it.
    let computed: HashMap<(String, String, i64), i64> = by_user
        .iter()
        .flat_map(|(key, rows)| {
            rows.iter()
                .map(move |r| (("user".to_owned(), key.clone(), r.0), r.5))
        })
        .collect();
    let reference = reference_by_commit(&db, &policy, width, &computed).await;
    let w = 0.5;
    for (key, rows) in &by_user {
        let bucket = bucket_of("user", key, 64);
        for (i, (at, rate, got_avg, node, epoch, _)) in rows.iter().enumerate() {
            if i > 0 {
                let prev = &rows[i - 1];
                assert_eq!(at - prev.0, width, "{key}: a window missing or twice");
                let expect = w * rate + (1.0 - w) * prev.2;
                assert!(
                    (got_avg - expect).abs() < 1e-6 * expect.abs().max(1.0),
                    "{key} at {at}: the average {got_avg} does not continue {} ({expect})",
                    prev.2
                );
            }
            assert_eq!(
                owner.get(&(*epoch, bucket)),
                Some(node),
                "{key} at {at}: written by {node}, not the owner of bucket {bucket} in epoch {epoch}"
            );
        }
        let windows: Vec<(i64, f64)> = rows.iter().map(|r| (r.0, r.1)).collect();
        let subject = ("user".to_owned(), key.clone());
        let (ours, late, theirs) = check_windows(
            key,
            &windows,
            reference.get(&subject).expect("the user's records"),
            width,
        );
        eprintln!(
            "FIGURE {key}: {} windows; {ours:.0} bytes by the owners, {late:.0} late, {theirs:.0} by one node",
            rows.len()
        );
    }
    drop(nodes);
    db.close().await;
}
