//! Rate thresholds in the knowledge base's events, against a real
//! PostgreSQL (the test kit's harness): the policy server computes alice's
//! per-user rate from the flow records stored in it; crossing her
//! threshold gives one `threshold` event (value: the threshold in kbit/s)
//! however long she stays above it; once her rate has fallen away and
//! risen again, one more.
//!
//! Waits are bounded only so that a broken build fails instead of hanging;
//! the assertions are about the events.
#![allow(clippy::unwrap_used)]

use crate::common;

use common::{any_loopback_port, loop_config};
use qosloop_policy_server::bandwidth::Rates;
use qosloop_policy_server::rate_thresholds::{follow, RateThresholds};
use qosloop_policy_server::server::LoopConfig;
use qosloop_policy_server::testing::paper_policy;
use qosloop_policy_server::{PdpConfig, Server};
use qosloop_schema::{BandBasis, FlowRecord};
use qosloop_store::{Db, KbEvent};
use qosloop_testkit::harness::Postgres;
use qosloop_testkit::need;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

const THRESHOLD_KBPS: u64 = 2000;

/// The bound on every wait: generous, so that only a broken server fails.
const DEADLINE: Duration = Duration::from_secs(60);

/// The server's rate lag: alice's records, written every ~100 ms, are
/// committed well within it even on a busy machine, so no byte is late.
const RATE_LAG: Duration = Duration::from_secs(2);

/// Alice's traffic in capture time: each record covers the time since the
/// previous one, `[previous end, now]`, with the bytes her rate gives over
/// exactly that span, so the rate the server computes from the record
/// timestamps is the one sent however slowly this loop runs.
struct Alice {
    seq: u32,
    /// The end of the previous record; `None` after a silence, so the
    /// next record starts when she starts sending again.
    end_ns: Option<u64>,
}

impl Alice {
    fn silent() -> Alice {
        Alice {
            seq: 0,
            end_ns: None,
        }
    }

    /// One record at `kbps` since the previous one (the first after a
    /// silence covers nothing and carries no byte).
    async fn sends(&mut self, db: &Db, kbps: u64) {
        let now = qosloop_store::now_ns() as u64;
        let start_ns = self.end_ns.unwrap_or(now);
        let end_ns = now.max(start_ns);
        let bytes = kbps * 1000 / 8 * (end_ns - start_ns) / 1_000_000_000;
        self.end_ns = Some(end_ns);
        if bytes == 0 {
            return;
        }
        let record = FlowRecord {
            src_addr: "10.9.0.7".parse().unwrap(),
            dst_addr: "10.9.1.1".parse().unwrap(),
            src_port: 40000,
            dst_port: 443,
            proto: 6,
            packets: (bytes / 1000).max(1),
            bytes,
            start_ns,
            end_ns,
            user: Some("alice".into()),
            ..Default::default()
        };
        self.seq += 1;
        let batch = qosloop_store::Batch {
            exporter_id: 1,
            session_id: 1,
            seq: self.seq,
            records: vec![record],
            dedup: false,
        };
        db.commit_batches(&[&batch]).await.unwrap();
    }

    /// Stops sending: the time until the next `sends` carries no traffic.
    fn stop(&mut self) {
        self.end_ns = None;
    }

    /// Sends at `kbps` until `until` holds for the threshold events; fails
    /// after [`DEADLINE`].
    async fn send_until(&mut self, db: &Db, kbps: u64, what: &str, until: impl Fn(usize) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            self.sends(db, kbps).await;
            let got = thresholds(db).await;
            if until(got.len()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {DEADLINE:?} of alice sending {kbps} kbit/s: {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends at `kbps` for `slices` records about 100 ms apart.
    async fn send_slices(&mut self, db: &Db, kbps: u64, slices: usize) {
        for _ in 0..slices {
            self.sends(db, kbps).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.sends(db, kbps).await;
    }
}

async fn thresholds(db: &Db) -> Vec<KbEvent> {
    db.kb_events_after(0, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "threshold")
        .collect()
}

/// Waits until the server has closed a window ending at or after `end_ns`
/// in capture time: every byte written up to `end_ns` has been judged.
async fn wait_judged(rates: &mut watch::Receiver<Arc<Rates>>, end_ns: u64) {
    let lag = RATE_LAG.as_nanos() as i64;
    let closed = |r: &Rates| r.at_ns - lag >= end_ns as i64;
    tokio::time::timeout(DEADLINE, rates.wait_for(|r| closed(r)))
        .await
        .expect("the server closes its windows")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_crossing_its_threshold_is_one_event_per_crossing() {
    need!(Postgres::available());
    let pg = tokio::task::spawn_blocking(Postgres::start)
        .await
        .unwrap()
        .unwrap();
    let mut policy = paper_policy();
    let mut rule = policy.rules[0].clone();
    rule.dn = "cn=alice,ou=rules,dc=qosloop,dc=example".into();
    rule.flows.clear();
    rule.users = vec!["alice".into()];
    rule.per_user = true;
    rule.band_basis = BandBasis::User;
    policy.rules = vec![rule];
    let (_policy_tx, policy_rx) = watch::channel(Arc::new(policy));
    let config = LoopConfig {
        rate_lag: RATE_LAG,
        ..loop_config(100)
    };
    let server = Server::start(
        &pg.url(),
        any_loopback_port(),
        PdpConfig::default(),
        config,
        policy_rx,
    )
    .await
    .unwrap();
    let db = server.store.db().clone();
    let t = RateThresholds::parse(&[format!("alice={THRESHOLD_KBPS}"), "*=100000".into()]).unwrap();
    let events = tokio::spawn(follow(db.clone(), server.rates.clone(), t));
    let mut rates = server.rates.clone();
    let mut alice = Alice::silent();

    // Alice at twice her threshold: one event once her average gets there.
    alice
        .send_until(&db, 2 * THRESHOLD_KBPS, "the first event", |n| n >= 1)
        .await;
    let got = thresholds(&db).await;
    assert_eq!(
        got.len(),
        1,
        "one threshold event while alice sent 4 Mbit/s: {got:?}"
    );
    assert_eq!(got[0].user.as_deref(), Some("alice"));
    assert_eq!(got[0].value, Some(THRESHOLD_KBPS as i64));
    assert!(
        got[0].detail.as_deref().unwrap_or("").starts_with("rate "),
        "{got:?}"
    );
    // She stays above for twenty more slices (two seconds of capture
    // time), all of them judged by the server: no second event.
    alice.send_slices(&db, 2 * THRESHOLD_KBPS, 20).await;
    wait_judged(&mut rates, alice.end_ns.unwrap()).await;
    assert_eq!(
        thresholds(&db).await.len(),
        1,
        "{:?}",
        thresholds(&db).await
    );

    // Silent until her average has decayed below the hysteresis (the
    // server's rates say so), then above again: a second event.
    alice.stop();
    let decayed = |r: &Rates| {
        r.users
            .iter()
            .filter(|u| u.name == "alice")
            .map(|u| u.avg_rate_kbps)
            .fold(0.0, f64::max)
            < THRESHOLD_KBPS as f64 * 0.5
    };
    let fell = tokio::time::timeout(DEADLINE, rates.wait_for(|r| decayed(r)))
        .await
        .is_ok();
    assert!(
        fell,
        "alice's average never fell: {:?}",
        rates.borrow().users
    );
    assert_eq!(thresholds(&db).await.len(), 1);
    alice
        .send_until(&db, 2 * THRESHOLD_KBPS, "the second event", |n| n >= 2)
        .await;
    let got = thresholds(&db).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[1].user.as_deref(), Some("alice"));
    assert!(got[1].id > got[0].id);
    events.abort();
    server.stop().await;
}

/// With `--rates-from cluster` the per-user rates are the owners' `user`
/// rows (docs/cluster.md): alice's rows above her threshold give her
/// per-user rate and one threshold event, with no flow record stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_cluster_mode_the_owners_user_rates_cross_the_threshold() {
    use qosloop_policy_server::server::RatesFrom;
    use qosloop_schema::bandwidth::{user_subject, SubjectKind};
    use qosloop_store::{bucket_of, OwnerRate, RoutingConfig};

    need!(Postgres::available());
    let pg = tokio::task::spawn_blocking(Postgres::start)
        .await
        .unwrap()
        .unwrap();
    let mut policy = paper_policy();
    let mut rule = policy.rules[0].clone();
    rule.dn = "cn=alice,ou=rules,dc=qosloop,dc=example".into();
    rule.flows.clear();
    rule.users = vec!["alice".into(), "bob".into()];
    rule.per_user = true;
    rule.band_basis = BandBasis::User;
    policy.rules = vec![rule.clone()];
    let (_policy_tx, policy_rx) = watch::channel(Arc::new(policy));
    let mut config = loop_config(100);
    config.rates_from = RatesFrom::Cluster;
    let server = Server::start(
        &pg.url(),
        any_loopback_port(),
        PdpConfig::default(),
        config,
        policy_rx,
    )
    .await
    .unwrap();
    let db = server.store.db().clone();
    let t = RateThresholds::parse(&[format!("alice={THRESHOLD_KBPS}"), "*=100000".into()]).unwrap();
    let events = tokio::spawn(follow(db.clone(), server.rates.clone(), t));

    // One owner of every bucket writes alice at twice her threshold and
    // bob at a tenth of it, window after window.
    let routing = RoutingConfig::default();
    db.cluster_join(
        "c",
        "owner",
        "127.0.0.1:1",
        &routing,
        // A lease outliving the test's deadline: the owner stays the owner.
        Duration::from_secs(300),
    )
    .await
    .unwrap();
    let epoch = db.cluster_rebalance("c", routing.buckets).await.unwrap();
    let row = |user: &str, prev: Option<i64>, end: i64, kbps: f64| {
        let key = user_subject(&rule.dn, user);
        OwnerRate {
            kind: SubjectKind::User,
            bucket: bucket_of("user", &key, routing.buckets),
            subject: key.clone(),
            name: key,
            previous_end_ns: prev,
            window_end_ns: end,
            interval_ns: 100_000_000,
            rate_kbps: kbps,
            avg_rate_kbps: kbps,
            records: 1,
        }
    };
    let alice_kbps = 2.0 * THRESHOLD_KBPS as f64;
    let mut rates = server.rates.clone();
    let mut prev = None;
    let mut seen = None;
    let deadline = Instant::now() + DEADLINE;
    for k in 1.. {
        if Instant::now() > deadline {
            break;
        }
        let end = k * 100_000_000;
        db.write_owner_rates(
            "c",
            "owner",
            epoch.epoch,
            &[
                row("alice", prev, end, alice_kbps),
                row("bob", prev, end, THRESHOLD_KBPS as f64 / 10.0),
            ],
        )
        .await
        .unwrap();
        prev = Some(end);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = rates.borrow_and_update().clone();
        let alice = r.user(&rule.dn, "alice").map(|u| u.avg_rate_kbps);
        let bob = r.user(&rule.dn, "bob").map(|u| u.avg_rate_kbps);
        if alice == Some(alice_kbps) && !thresholds(&db).await.is_empty() {
            seen = Some((alice, bob));
            break;
        }
    }
    assert_eq!(
        seen,
        Some((Some(alice_kbps), Some(THRESHOLD_KBPS as f64 / 10.0))),
        "the owners' user rows never became alice's rate and event"
    );
    let got = thresholds(&db).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].user.as_deref(), Some("alice"));
    assert_eq!(got[0].value, Some(THRESHOLD_KBPS as i64));
    assert_eq!(
        db.max_flow_id().await.unwrap(),
        0,
        "no flow record was needed"
    );
    events.abort();
    server.stop().await;
}
