//! What the cluster tests share: a collector node as a process (optionally
//! under a wrapper such as `faketime`), the published policy, the
//! exporters' sending loop, and the checks every scenario must pass.
//!
//! A record committed after its window's owner computed the window is late:
//! stored, not in that window's rate (docs/cluster.md). Whether a record was
//! late is read from PostgreSQL itself ([`start_postgres`] turns on
//! `track_commit_timestamp`): its commit time against the time the owner
//! wrote the window (`rates.computed_ns`, the same clock). The checks then
//! hold however slowly the machine commits: the owners' bytes plus the late
//! bytes are the single-node computation, and late bytes are reported.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::type_complexity
)]

use qosloop_exporter::Exporter;
use qosloop_schema::bandwidth::{window::TimeBuckets, Classifier};
use qosloop_schema::{BusinessRule, FlowRecord, FlowSpec, Kbps, Link, PolicySet, PortRange};
use qosloop_store::{bucket_of, Db};
use qosloop_testbed::harness::{free_port, Postgres};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The bound on every wait of the cluster tests: generous, so that only a
/// broken cluster fails, not a busy machine.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A PostgreSQL for a cluster test, recording every transaction's commit
/// time (`track_commit_timestamp`, which needs a restart to take effect).
pub async fn start_postgres() -> Postgres {
    let pg = tokio::task::spawn_blocking(Postgres::start)
        .await
        .unwrap()
        .unwrap();
    let db = Db::connect(&pg.url()).await.unwrap();
    let Db::Postgres(p) = &db else { unreachable!() };
    sqlx::query("ALTER SYSTEM SET track_commit_timestamp = on")
        .execute(p)
        .await
        .unwrap();
    db.close().await;
    tokio::task::spawn_blocking(move || {
        let mut pg = pg;
        pg.restart().unwrap();
        pg
    })
    .await
    .unwrap()
}

pub const CLUSTER: &str = "t";
pub const INTERVAL_MS: u64 = 500;
/// Covers an exporter's failover (dead_after 700 ms) plus a commit.
pub const LAG_MS: u64 = 2500;
pub const SUBJECTS: u16 = 6;

/// A cluster node, SIGKILLed on drop. Its log (warnings, and the policy
/// it follows) goes to a file of its own, kept across restarts.
pub struct Node {
    pub name: String,
    pub port: u16,
    pub db: String,
    pub extra: Vec<String>,
    /// Environment of the node's process (e.g. libfaketime's).
    pub env: Vec<(String, String)>,
    pub child: Option<Child>,
    pub log: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl Node {
    /// A node not started yet.
    pub fn new(name: &str, db: &str, extra: &[&str], env: &[(&str, &str)]) -> Node {
        let dir = tempfile::tempdir().unwrap();
        Node {
            name: name.into(),
            port: free_port().unwrap(),
            db: db.into(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            log: dir.path().join(format!("{name}.log")),
            _log_dir: dir,
        }
    }

    /// A started node that follows the published policy.
    pub fn start(name: &str, db: &str, extra: &[&str]) -> Node {
        Node::start_with_env(name, db, extra, &[])
    }

    /// A node whose process has `env` set besides.
    pub fn start_with_env(name: &str, db: &str, extra: &[&str], env: &[(&str, &str)]) -> Node {
        let mut n = Node::new(name, db, extra, env);
        n.restart();
        n
    }

    /// How many times this node's log says it took the published policy.
    pub fn policies_taken(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("following the published policy"))
            .count()
    }

    /// The last lines of the node's log, for a failure message.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    pub fn args(&self) -> Vec<String> {
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

    /// Starts the node's process and waits until it listens and has taken
    /// the published policy (its log says so): a record it stored before
    /// would count for no subject.
    pub fn restart(&mut self) {
        let taken = self.policies_taken();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(qosloop_testkit::component("qosloop-collector").unwrap())
            .args(self.args())
            .envs(self.env.iter().cloned())
            .env("RUST_LOG", "warn,qosloop_collector::cluster=info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting qosloop-collector");
        self.child = Some(child);
        let deadline = Instant::now() + DEADLINE;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err()
            || self.policies_taken() <= taken
        {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{} exited {status}: {}", self.name, self.log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "{} did not listen and take the published policy within {DEADLINE:?}: {}",
                self.name,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait: the node stops and gives its lease up.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = c.id().to_string();
            Command::new("kill").args(["-TERM", &pid]).status().unwrap();
            let deadline = Instant::now() + DEADLINE;
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

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Subscriber `k`'s rule: UDP to port 5000 + k, on the link `edge`.
pub fn subscriber_rule(k: u16) -> BusinessRule {
    BusinessRule {
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
        per_user: false,
        band_basis: Default::default(),
        service_class: "gold".into(),
        link: "edge".into(),
    }
}

/// The one link, of everything.
pub fn edge_link() -> Link {
    Link {
        dn: "cn=edge".into(),
        name: "edge".into(),
        capacity: Kbps(100_000),
        traffic: vec![],
    }
}

/// One rule per subscriber, one link of everything.
pub fn policy() -> PolicySet {
    PolicySet {
        rules: (0..SUBJECTS).map(subscriber_rule).collect(),
        links: vec![edge_link()],
        ..Default::default()
    }
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Every exporter sends one record of the last 20 ms every 20 ms, for `d`;
/// `sent` counts records and bytes.
pub async fn run(exporters: &mut [Exporter], d: Duration, sent: &mut (u64, u64)) {
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

pub async fn scalar(db: &Db, q: &str) -> i64 {
    let Db::Postgres(p) = db else { unreachable!() };
    sqlx::query_scalar::<_, i64>(q).fetch_one(p).await.unwrap()
}

/// Bytes of one subject's window: committed before its owner wrote the
/// window, and committed after (late: stored, not in the window's rate).
#[derive(Clone, Copy, Debug, Default)]
pub struct WindowBytes {
    pub before: f64,
    pub late: f64,
}

/// The single-node computation on the stored records, split by commit
/// time: per subject `(kind, key)` and window end, each record's bytes
/// spread over its windows as the nodes spread them, on the side of the
/// owner's write (`computed`: per `(kind, key, window end)`, when the
/// owner wrote it) its commit fell. Bytes of a window no owner wrote count
/// as before.
pub async fn reference_by_commit(
    db: &Db,
    policy: &PolicySet,
    width: i64,
    computed: &HashMap<(String, String, i64), i64>,
) -> HashMap<(String, String), BTreeMap<i64, WindowBytes>> {
    let Db::Postgres(p) = db else { unreachable!() };
    type Row = (
        String,
        String,
        i32,
        i32,
        i16,
        i64,
        i64,
        i64,
        Option<String>,
        Option<i64>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT host(src_addr), host(dst_addr), src_port, dst_port, proto, bytes, start_ns, end_ns, \"user\", \
         CAST(EXTRACT(EPOCH FROM pg_xact_commit_timestamp(xmin)) * 1000000000 AS BIGINT) FROM flows",
    )
    .fetch_all(p)
    .await
    .unwrap();
    let classifier = Classifier::new(policy);
    let mut out: HashMap<(String, String), BTreeMap<i64, WindowBytes>> = HashMap::new();
    for (src, dst, sport, dport, proto, bytes, start, end, user, committed) in rows {
        let committed =
            committed.expect("no commit time: the database was not started by start_postgres");
        let r = FlowRecord {
            src_addr: src.parse().unwrap(),
            dst_addr: dst.parse().unwrap(),
            src_port: sport as u16,
            dst_port: dport as u16,
            proto: proto as u8,
            bytes: bytes as u64,
            start_ns: start as u64,
            end_ns: end as u64,
            user,
            ..FlowRecord::default()
        };
        let mut spread = TimeBuckets::new(width);
        spread.add(start, end, r.bytes);
        for (kind, key) in classifier.subject_keys(&r) {
            let subject = (kind.as_str().to_owned(), key.to_owned());
            let windows = out.entry(subject.clone()).or_default();
            for (slot, b) in spread.buckets() {
                let window_end = (slot + 1) * width;
                let w = windows.entry(window_end).or_default();
                match computed.get(&(subject.0.clone(), subject.1.clone(), window_end)) {
                    Some(&at) if committed > at => w.late += b,
                    _ => w.before += b,
                }
            }
        }
    }
    out
}

/// Checks one subject's owner windows (`(window end, rate kbit/s)`)
/// against the records: no window holds more than was committed before
/// its owner wrote it (nothing counted twice, nothing made up), and over
/// the run the owners' bytes plus the late bytes are the single-node
/// computation within 0.5 % (nothing lost; the margin covers records a
/// node stored after a restart before it had the policy, and commits in
/// the instant between an owner's read and its write). Returns (the
/// owners' bytes, the late bytes, the single-node bytes).
pub fn check_windows(
    what: &str,
    windows: &[(i64, f64)],
    reference: &BTreeMap<i64, WindowBytes>,
    width: i64,
) -> (f64, f64, f64) {
    let secs = width as f64 / 1e9;
    let (mut ours, mut late, mut theirs) = (0.0, 0.0, 0.0);
    for &(end, rate) in windows {
        let got = rate * 1000.0 / 8.0 * secs;
        let r = reference.get(&end).copied().unwrap_or_default();
        assert!(
            got <= r.before * (1.0 + 1e-9) + 1e-6,
            "{what}: the window ending {end} has {got} bytes, only {} were committed before its owner wrote it",
            r.before
        );
        ours += got;
        late += r.late;
        theirs += r.before + r.late;
    }
    assert!(theirs > 0.0, "{what}: no traffic");
    assert!(
        (ours + late - theirs).abs() <= 0.005 * theirs,
        "{what}: {ours} bytes in the cluster's rates and {late} late, {theirs} by one node"
    );
    (ours, late, theirs)
}

/// What the checks found, for the figures.
pub struct Checked {
    pub by_subject: BTreeMap<(String, String), Vec<(i64, f64, f64, String, i64, i64)>>,
    pub epochs: Vec<(i64, String, i64)>,
}

/// The properties every scenario must have once the exporters finished:
/// every record in `flows` exactly once; each subject's rates checked
/// against the single-node computation on the same records by
/// [`check_windows`] (late bytes reported), every window once and the EWMA
/// chain unbroken; `rate_partials`
/// pruned; no bucket with two owners in one epoch and every rate row
/// written by its bucket's owner in the epoch it names; at least
/// `min_epochs` epochs.
pub async fn check_all(
    db: &Db,
    policy: &PolicySet,
    sent: (u64, u64),
    first_record_ns: u64,
    last_record_ns: u64,
    min_epochs: usize,
) -> Checked {
    // 1. Every record exactly once.
    let count = scalar(db, "SELECT count(*) FROM flows").await;
    let bytes = scalar(db, "SELECT CAST(sum(bytes) AS BIGINT) FROM flows").await;
    let twice = scalar(
        db,
        "SELECT count(*) FROM (SELECT 1 FROM flows GROUP BY src_port, start_ns HAVING count(*) > 1) d",
    )
    .await;
    assert_eq!((count, bytes, twice), (sent.0 as i64, sent.1 as i64, 0));

    // Every window up to the last record's is closed and written.
    let width = (INTERVAL_MS * 1_000_000) as i64;
    let last_slot = (last_record_ns as i64).div_euclid(width);
    let deadline = Instant::now() + DEADLINE + Duration::from_millis(LAG_MS);
    loop {
        let done = scalar(
            db,
            &format!(
                "SELECT count(*) FROM rate_state WHERE window_end_ns > {}",
                last_slot * width
            ),
        )
        .await;
        if done == i64::from(SUBJECTS) + 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{done} of {} subjects' windows up to the last record's written",
            SUBJECTS + 1
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // 2. Rates equal the single-node computation on the same records.
    let Db::Postgres(p) = db else { unreachable!() };
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
    let key_of = |kind: &str, name: &str| -> String {
        if kind == "flow" {
            policy
                .rules
                .iter()
                .find(|x| x.name == name)
                .unwrap()
                .dn
                .clone()
        } else {
            name.to_owned()
        }
    };
    let computed: HashMap<(String, String, i64), i64> = by_subject
        .iter()
        .flat_map(|((kind, name), rows)| {
            let key = key_of(kind, name);
            rows.iter()
                .map(move |r| ((kind.clone(), key.clone(), r.0), r.5))
        })
        .collect();
    let reference = reference_by_commit(db, policy, width, &computed).await;
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
        let key = key_of(kind, name);
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
        let windows: Vec<(i64, f64)> = rows.iter().map(|r| (r.0, r.1)).collect();
        let empty = BTreeMap::new();
        let (ours, late, theirs) = check_windows(
            name,
            &windows,
            reference.get(&(kind.clone(), key)).unwrap_or(&empty),
            width,
        );
        eprintln!(
            "FIGURE late {kind} {name}: {late:.0} of {theirs:.0} bytes committed after their window was computed ({ours:.0} in the rates)"
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
    let deadline = Instant::now() + DEADLINE;
    let mut stale = scalar(db, &stale_q).await;
    while stale > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        stale = scalar(db, &stale_q).await;
    }
    let left = scalar(db, "SELECT count(*) FROM rate_partials").await;
    let slots_run = (last_record_ns as i64 - first_record_ns as i64) / width + 4;
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
        db,
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
    assert!(epochs.len() >= min_epochs, "{epochs:?}");

    Checked { by_subject, epochs }
}
