//! Rate thresholds in the knowledge base's events, against a real
//! PostgreSQL (testbed harness): the policy server computes alice's
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
use qosloop_policy_server::rate_thresholds::{follow, RateThresholds};
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

/// One interval's worth of alice's traffic at `kbps` (100 ms).
async fn alice_sends(db: &Db, kbps: u64, seq: &mut u32) {
    let now = qosloop_store::now_ns() as u64;
    let bytes = kbps * 1000 / 8 / 10;
    let record = FlowRecord {
        src_addr: "10.9.0.7".parse().unwrap(),
        dst_addr: "10.9.1.1".parse().unwrap(),
        src_port: 40000,
        dst_port: 443,
        proto: 6,
        packets: (bytes / 1000).max(1),
        bytes,
        start_ns: now - 100_000_000,
        end_ns: now,
        user: Some("alice".into()),
        ..Default::default()
    };
    *seq += 1;
    let batch = qosloop_store::Batch {
        exporter_id: 1,
        session_id: 1,
        seq: *seq,
        records: vec![record],
        dedup: false,
    };
    db.commit_batches(&[&batch]).await.unwrap();
}

async fn thresholds(db: &Db) -> Vec<KbEvent> {
    db.kb_events_after(0, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "threshold")
        .collect()
}

/// Sends at `kbps` for `secs`, or until `until` holds for the events.
async fn send_for(db: &Db, kbps: u64, secs: u64, seq: &mut u32, until: impl Fn(usize) -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if kbps > 0 {
            alice_sends(db, kbps, seq).await;
        }
        if until(thresholds(db).await.len()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    let server = Server::start(
        &pg.url(),
        any_loopback_port(),
        PdpConfig::default(),
        loop_config(100),
        policy_rx,
    )
    .await
    .unwrap();
    let db = server.store.db().clone();
    let t = RateThresholds::parse(&[format!("alice={THRESHOLD_KBPS}"), "*=100000".into()]).unwrap();
    let events = tokio::spawn(follow(db.clone(), server.rates.clone(), t));
    let mut seq = 0;

    // Alice at twice her threshold: one event once her average gets there.
    send_for(&db, 2 * THRESHOLD_KBPS, 20, &mut seq, |n| n >= 1).await;
    let got = thresholds(&db).await;
    assert_eq!(
        got.len(),
        1,
        "no threshold event while alice sent 4 Mbit/s: {got:?}"
    );
    assert_eq!(got[0].user.as_deref(), Some("alice"));
    assert_eq!(got[0].value, Some(THRESHOLD_KBPS as i64));
    assert!(
        got[0].detail.as_deref().unwrap_or("").starts_with("rate "),
        "{got:?}"
    );
    // She stays above for two more seconds: no second event.
    send_for(&db, 2 * THRESHOLD_KBPS, 2, &mut seq, |_| false).await;
    assert_eq!(
        thresholds(&db).await.len(),
        1,
        "{:?}",
        thresholds(&db).await
    );

    // Silent until her average has decayed below the hysteresis (the
    // server's rates say so), then above again: a second event.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut rates = server.rates.clone();
    loop {
        let avg = rates
            .borrow_and_update()
            .users
            .iter()
            .filter(|u| u.name == "alice")
            .map(|u| u.avg_rate_kbps)
            .fold(0.0, f64::max);
        if avg < THRESHOLD_KBPS as f64 * 0.5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alice's average never fell: {avg}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(thresholds(&db).await.len(), 1);
    send_for(&db, 2 * THRESHOLD_KBPS, 20, &mut seq, |n| n >= 2).await;
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
        Duration::from_secs(30),
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
    for k in 1..=100i64 {
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
