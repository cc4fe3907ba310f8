//! The collector cluster with real processes and a real PostgreSQL: three
//! `qosloop-collector --cluster` nodes, exporters spread over them (each
//! fails over to the others), one node killed with SIGKILL mid-stream and
//! restarted, a fourth added mid-stream, one stopped cleanly. Then:
//!
//! - every record is in `flows` exactly once (count, bytes, no key twice);
//! - each subject's rate over the run equals the single-node computation
//!   on the same records (within 0.5%), every window written once, and the
//!   EWMA chain continues across owners (state resumed, not restarted);
//! - no bucket had two owners in one epoch, and every rate row was written
//!   by the owner of its subject's bucket in the epoch it names;
//! - a node with another routing configuration is refused, naming it.
//!
//! The gaps in fresh rates around each move are printed (figures for
//! `docs/cluster.md`), not asserted.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::type_complexity)]

use qosloop_exporter::{Exporter, ExporterConfig};
use qosloop_schema::bandwidth::{window::TimeBuckets, Classifier, SubjectKind};
use qosloop_schema::{BusinessRule, FlowRecord, FlowSpec, Kbps, Link, PolicySet, PortRange};
use qosloop_store::{bucket_of, Db};
use qosloop_testbed::harness::{free_port, Postgres};
use qosloop_testbed::need;
use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const CLUSTER: &str = "t";
const INTERVAL_MS: u64 = 500;
/// Covers an exporter's failover (dead_after 700 ms) plus a commit.
const LAG_MS: u64 = 2500;
const SUBJECTS: u16 = 6;

/// A cluster node, SIGKILLed on drop.
struct Node {
    name: String,
    port: u16,
    db: String,
    extra: Vec<String>,
    child: Option<Child>,
}

impl Node {
    fn start(name: &str, db: &str, extra: &[&str]) -> Node {
        let mut n = Node {
            name: name.into(),
            port: free_port().unwrap(),
            db: db.into(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        n.restart();
        n
    }

    fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = [
            "--listen",
            &format!("127.0.0.1:{}", self.port),
            "--db",
            &self.db,
            "--cluster",
            CLUSTER,
            "--node",
            &self.name,
            "--cluster-lease-ms",
            "1000",
            "--cluster-interval-ms",
            &INTERVAL_MS.to_string(),
            "--cluster-lag-ms",
            &LAG_MS.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(self.extra.iter().cloned());
        a
    }

    fn restart(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_qosloop-collector"))
            .args(self.args())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("starting qosloop-collector");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "{} did not listen", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait: the node stops and gives its lease up.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = c.id().to_string();
            Command::new("kill").args(["-TERM", &pid]).status().unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    c.kill().unwrap();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            c.wait().unwrap();
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One rule per subscriber (UDP to port 5000 + k), one link of everything.
fn policy() -> PolicySet {
    let rule = |k: u16| BusinessRule {
        dn: format!("cn=sub{k},ou=rules"),
        name: format!("sub{k}"),
        priority: 10,
        enabled: true,
        roles: vec![],
        flows: vec![FlowSpec {
            proto: Some(17),
            dst_ports: Some(PortRange::single(5000 + k)),
            ..Default::default()
        }],
        users: vec![],
        service_class: "gold".into(),
        link: "edge".into(),
    };
    PolicySet {
        rules: (0..SUBJECTS).map(rule).collect(),
        links: vec![Link {
            dn: "cn=edge".into(),
            name: "edge".into(),
            capacity: Kbps(100_000),
            traffic: vec![],
        }],
        ..Default::default()
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Every exporter sends one record of the last 20 ms every 20 ms, for `d`;
/// `sent` counts records and bytes.
async fn run(exporters: &mut [Exporter], d: Duration, sent: &mut (u64, u64)) {
    let step = Duration::from_millis(20);
    let until = Instant::now() + d;
    while Instant::now() < until {
        let end = now_ns();
        for (k, ex) in (0u16..).zip(exporters.iter_mut()) {
            let r = FlowRecord {
                src_addr: "10.1.0.1".parse().unwrap(),
                dst_addr: "10.2.0.1".parse().unwrap(),
                src_port: 40000 + k,
                dst_port: 5000 + k,
                proto: 17,
                packets: 10,
                bytes: 1000 * (u64::from(k) + 1),
                start_ns: end - step.as_nanos() as u64,
                end_ns: end,
                ..FlowRecord::default()
            };
            sent.0 += 1;
            sent.1 += r.bytes;
            ex.send(&r).await.unwrap();
        }
        tokio::time::sleep(step).await;
    }
}

async fn scalar(db: &Db, q: &str) -> i64 {
    let Db::Postgres(p) = db else { unreachable!() };
    sqlx::query_scalar::<_, i64>(q).fetch_one(p).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_kill_add_stop_exactly_once_and_rates_equal_one_node() {
    need!(Postgres::available());
    let pg = Postgres::start().unwrap();
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
    let out = Command::new(env!("CARGO_BIN_EXE_qosloop-collector"))
        .args(
            Node {
                name: "odd".into(),
                port: free_port().unwrap(),
                db: url.clone(),
                extra: vec!["--cluster-buckets".into(), "32".into()],
                child: None,
            }
            .args(),
        )
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{text}");
    assert!(text.contains("buckets: cluster 64, this node 32"), "{text}");
    // The nodes follow the published policy (checked every 200 ms).
    tokio::time::sleep(Duration::from_millis(800)).await;

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

    // 1. Every record exactly once.
    let count = scalar(&db, "SELECT count(*) FROM flows").await;
    let bytes = scalar(&db, "SELECT CAST(sum(bytes) AS BIGINT) FROM flows").await;
    let twice = scalar(
        &db,
        "SELECT count(*) FROM (SELECT 1 FROM flows GROUP BY src_port, start_ns HAVING count(*) > 1) d",
    )
    .await;
    assert_eq!((count, bytes, twice), (sent.0 as i64, sent.1 as i64, 0));

    // Every window up to the last record's is closed and written.
    let width = (INTERVAL_MS * 1_000_000) as i64;
    let last_slot = (last_record_ns as i64).div_euclid(width);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let done = scalar(
            &db,
            &format!(
                "SELECT count(*) FROM rate_state WHERE window_end_ns > {}",
                last_slot * width
            ),
        )
        .await;
        if done == i64::from(SUBJECTS) + 1 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // 2. Rates equal the single-node computation on the same records.
    let Db::Postgres(p) = &db else { unreachable!() };
    let rows: Vec<(String, String, i64, f64, f64, String, i64, i64)> = sqlx::query_as(
        "SELECT subject, name, at_ns, rate_kbps, avg_rate_kbps, node, epoch, computed_ns FROM rates \
         WHERE node IS NOT NULL ORDER BY subject, name, at_ns",
    )
    .fetch_all(p)
    .await
    .unwrap();
    let mut by_subject: BTreeMap<(String, String), Vec<(i64, f64, f64, String, i64, i64)>> =
        BTreeMap::new();
    for (s, n, at, rate, avg, node, epoch, computed) in rows {
        by_subject
            .entry((s, n))
            .or_default()
            .push((at, rate, avg, node, epoch, computed));
    }
    assert_eq!(
        by_subject.len(),
        usize::from(SUBJECTS) + 1,
        "{:?}",
        by_subject.keys()
    );
    let classifier = Classifier::new(&policy);
    let mut reference: HashMap<(String, String), TimeBuckets> = HashMap::new();
    for row in db.flows_from(0, 1_000_000).await.unwrap() {
        let r = row.record.unwrap();
        for (kind, key) in classifier.subject_keys(&r) {
            let name = match kind {
                SubjectKind::Flow => policy
                    .rules
                    .iter()
                    .find(|x| x.dn == key)
                    .unwrap()
                    .name
                    .clone(),
                SubjectKind::Link => key.to_owned(),
            };
            reference
                .entry((kind.as_str().to_owned(), name))
                .or_insert_with(|| TimeBuckets::new(width))
                .add(r.start_ns as i64, r.end_ns as i64, r.bytes);
        }
    }
    let w = 0.5;
    let ownership: Vec<(i64, i32, String)> =
        sqlx::query_as("SELECT epoch, bucket, node FROM cluster_ownership WHERE cluster = $1")
            .bind(CLUSTER)
            .fetch_all(p)
            .await
            .unwrap();
    let owner: HashMap<(i64, u32), String> = ownership
        .iter()
        .map(|(e, b, n)| ((*e, *b as u32), n.clone()))
        .collect();
    for ((kind, name), rows) in &by_subject {
        let key = if kind == "flow" {
            policy
                .rules
                .iter()
                .find(|x| &x.name == name)
                .unwrap()
                .dn
                .clone()
        } else {
            name.clone()
        };
        let bucket = bucket_of(kind, &key, 64);
        // Each window once, consecutive, the EWMA chain unbroken.
        for pair in rows.windows(2) {
            assert_eq!(
                pair[1].0 - pair[0].0,
                width,
                "{name}: a window missing or twice"
            );
            let expect = w * pair[1].1 + (1.0 - w) * pair[0].2;
            assert!(
                (pair[1].2 - expect).abs() < 1e-6 * expect.abs().max(1.0),
                "{name}: the average at {} does not continue the one before ({} by {} then {} by {})",
                pair[1].0, pair[0].2, pair[0].3, pair[1].2, pair[1].3
            );
        }
        // Written by the bucket's owner in the epoch it names.
        for (at, _, _, node, epoch, _) in rows {
            assert_eq!(
                owner.get(&(*epoch, bucket)),
                Some(node),
                "{name} at {at}: written by {node}, not the owner of bucket {bucket} in epoch {epoch}"
            );
        }
        let (first, last) = (rows[0].0 - width, rows.last().unwrap().0);
        let ours: f64 = rows
            .iter()
            .map(|r| r.1 * 1000.0 / 8.0 * (width as f64 / 1e9))
            .sum();
        let theirs = reference
            .get_mut(&(kind.clone(), name.clone()))
            .map_or(0.0, |t| t.take(first, last));
        assert!(theirs > 0.0, "{name}: no traffic");
        assert!(
            (ours - theirs).abs() <= 0.005 * theirs,
            "{name}: {ours} bytes in the cluster's rates, {theirs} by one node"
        );
    }

    // 2b. `rate_partials` stays bounded: the rows every owner consumed are
    // pruned (a node prunes every 4 windows), so no row older than the
    // consumed window by more than 12 windows remains, while the rates
    // above were computed from the same rows.
    let stale_q = format!(
        "SELECT count(*) FROM rate_partials p JOIN rate_state s \
         ON s.cluster = p.cluster AND s.kind = p.kind AND s.subject = p.subject \
         WHERE p.slot < s.window_end_ns / {width} - 12"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stale = scalar(&db, &stale_q).await;
    while stale > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        stale = scalar(&db, &stale_q).await;
    }
    let left = scalar(&db, "SELECT count(*) FROM rate_partials").await;
    let slots_run = (last_record_ns as i64 - marks[0].1 as i64) / width + 4;
    eprintln!("FIGURE rate_partials: {left} rows left after {slots_run}+ windows of 7 subjects");
    assert_eq!(stale, 0, "consumed partial sums are not pruned");
    assert!(
        left < (i64::from(SUBJECTS) + 1) * 4 * (LAG_MS as i64 * 1_000_000 / width + 14),
        "{left} rows of rate_partials"
    );

    // 3. No bucket had two owners in one epoch; owners are members.
    let epochs: Vec<(i64, String, i64)> = sqlx::query_as(
        "SELECT epoch, members, started_ns FROM cluster_epochs WHERE cluster = $1 ORDER BY epoch",
    )
    .bind(CLUSTER)
    .fetch_all(p)
    .await
    .unwrap();
    let twice = scalar(
        &db,
        "SELECT count(*) FROM (SELECT epoch, bucket FROM cluster_ownership \
         GROUP BY epoch, bucket HAVING count(DISTINCT node) > 1) d",
    )
    .await;
    assert_eq!(twice, 0);
    for (e, b, n) in &ownership {
        let members = &epochs.iter().find(|x| x.0 == *e).unwrap().1;
        assert!(
            members.split(',').any(|m| m == n),
            "epoch {e} bucket {b}: {n} not a member"
        );
    }
    assert!(epochs.len() >= 4, "{epochs:?}");

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
