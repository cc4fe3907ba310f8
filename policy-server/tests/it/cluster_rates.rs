//! `--rates-from cluster` on a real PostgreSQL: the server publishes its
//! policy in SQL (again, with a new version, when the policy changes), and
//! decides from the rates the cluster's owners write — here one owner
//! node of a real cluster in the same database, writing through the
//! fenced path — without reading any flow record.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;
use qosloop_policy_server::server::RatesFrom;
use qosloop_policy_server::testing::paper_policy;
use qosloop_policy_server::Server;
use qosloop_schema::bandwidth::SubjectKind;
use qosloop_schema::{DecisionKind, PolicySet};
use qosloop_store::{bucket_of, Db, OwnerRate, RoutingConfig};
use qosloop_testkit::harness::Postgres;
use qosloop_testkit::need;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

async fn published(db: &Db) -> PolicySet {
    let (_, body) = db.published_policy().await.unwrap().unwrap();
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_follow_the_owners_rates_and_the_policy_is_published() {
    need!(Postgres::available());
    let pg = Postgres::start().unwrap();
    let policy = paper_policy();
    let (policy_tx, policy_rx) = watch::channel(Arc::new(policy.clone()));
    let mut config = loop_config(100);
    config.rates_from = RatesFrom::Cluster;
    let pdp = qosloop_policy_server::PdpConfig {
        ka_timer_secs: 30,
        open_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let server = Server::start(&pg.url(), any_loopback_port(), pdp, config, policy_rx)
        .await
        .unwrap();
    let db = server.store.db().clone();
    let deadline = Instant::now() + Duration::from_secs(5);
    while db.published_policy().await.unwrap().is_none() {
        assert!(Instant::now() < deadline, "no policy published");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(published(&db).await, policy);

    let (mut pep, got) = FakePep::connect(server.pdp_addr, "edge-router", &["edge"], &[]).await;
    let Got::Install(first) = &got[0] else {
        panic!("{got:?}")
    };
    assert_eq!(first.kind(), DecisionKind::Accept);

    // One owner of every bucket writes the link at 7500 kbit/s and the
    // policed flow out of profile: the server drops it.
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
    let link = &policy.links[0].name;
    let rule = &policy.rules[0];
    let mut prev: Option<i64> = None;
    let mut seen = DecisionKind::Accept;
    for k in 1..=40i64 {
        let end = k * 100_000_000;
        let row = |kind: SubjectKind, key: &str, name: &str, kbps: f64| OwnerRate {
            kind,
            subject: key.to_owned(),
            name: name.to_owned(),
            bucket: bucket_of(kind.as_str(), key, routing.buckets),
            previous_end_ns: prev,
            window_end_ns: end,
            interval_ns: 100_000_000,
            rate_kbps: kbps,
            avg_rate_kbps: kbps,
            records: 1,
        };
        db.write_owner_rates(
            "c",
            "owner",
            epoch.epoch,
            &[
                row(SubjectKind::Link, link, link, 7500.0),
                row(SubjectKind::Flow, &rule.dn, &rule.name, 1500.0),
            ],
        )
        .await
        .unwrap();
        prev = Some(end);
        if let Ok(decs) = tokio::time::timeout(Duration::from_millis(100), pep.next_dec()).await {
            for g in decs {
                if let Got::Install(d) = g {
                    assert_eq!(d.reason.link_load_kbps, 7500.0, "{d:?}");
                    pep.report(&d).await;
                    seen = d.kind();
                }
            }
        }
        if seen == DecisionKind::Drop {
            break;
        }
    }
    assert_eq!(
        seen,
        DecisionKind::Drop,
        "the owners' rates drove the decision"
    );
    assert_eq!(
        db.max_flow_id().await.unwrap(),
        0,
        "no flow record was needed"
    );

    // A policy change is published (a new version) for the owners.
    let v1 = db.published_policy_version().await.unwrap().unwrap();
    let mut changed = policy.clone();
    changed.rules[0].priority += 1;
    policy_tx.send_replace(Arc::new(changed.clone()));
    let deadline = Instant::now() + Duration::from_secs(5);
    while db.published_policy_version().await.unwrap() == Some(v1) {
        assert!(Instant::now() < deadline, "the change was not published");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(published(&db).await, changed);
    server.stop().await;
}
