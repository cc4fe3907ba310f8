//! The reference experiment's decisions from synthetic flow records written
//! into real SQL (SQLite, and PostgreSQL started by the harness) at
//! controlled rates: low load → accept, medium → remark, high → drop, and
//! back, seen by a fake enforcer over TCP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;
use qosloop_policy_server::testing::paper_policy;
use qosloop_schema::DecisionKind;
use qosloop_testkit::harness::Postgres;
use qosloop_testkit::need;
use std::time::Duration;

/// Generator traffic at `kbps` for one 100 ms slice, plus the policed flow
/// out of profile at 1500 kbit/s (which does not count in the link load).
async fn write_slice(db: &qosloop_store::Db, kbps: u64, seq: &mut i64) {
    let bytes = kbps * 1000 / 8 / 10;
    // Four generator flows sharing the load.
    for i in 0..4u16 {
        *seq += 1;
        insert_flow(db, "10.71.1.3", "10.71.2.2", 5001 + i, bytes / 4, *seq).await;
    }
    *seq += 1;
    insert_flow(
        db,
        "10.71.1.2",
        "10.71.2.2",
        4055,
        1500 * 1000 / 8 / 10,
        *seq,
    )
    .await;
}

async fn run_phases(url: &str) {
    let (server, _tx) = start(url, "127.0.0.1:0".parse().unwrap(), paper_policy(), 100).await;
    let db = server.store.db().clone();
    let (mut pep, got) = FakePep::connect(server.pdp_addr, "edge-router", &["edge"], &[]).await;
    let Got::Install(first) = &got[0] else {
        panic!("{got:?}")
    };
    assert_eq!(first.kind(), DecisionKind::Accept, "no load yet: accept");

    let mut seq = 0;
    let phases = [
        ("low", 2000, DecisionKind::Accept),
        ("medium", 4500, DecisionKind::Remark),
        ("high", 7500, DecisionKind::Drop),
        ("low again", 1500, DecisionKind::Accept),
    ];
    let mut current = DecisionKind::Accept;
    for (phase, kbps, want) in phases {
        // Write 100 ms slices until the decision changes (bounded: 10 s).
        let mut seen = current;
        for _ in 0..100 {
            write_slice(&db, kbps, &mut seq).await;
            if let Ok(decs) = tokio::time::timeout(Duration::from_millis(100), pep.next_dec()).await
            {
                for g in decs {
                    if let Got::Install(d) = g {
                        // On the way down the EWMA may pass through the
                        // band between; every decision moves towards
                        // the phase's and matches the load it saw.
                        let towards = if want >= current {
                            current <= d.kind() && d.kind() <= want
                        } else {
                            want <= d.kind() && d.kind() <= current
                        };
                        assert!(towards, "{phase}: unexpected {d:?}");
                        let band = paper_policy().classes[0]
                            .band_for(qosloop_schema::Kbps(d.reason.link_load_kbps as u64))
                            .map(|b| b.name.clone());
                        assert_eq!(band.as_deref(), Some(d.reason.band.as_str()), "{d:?}");
                        pep.report(&d).await;
                        seen = d.kind();
                    }
                }
            }
            if seen == want {
                break;
            }
        }
        assert_eq!(seen, want, "phase {phase} at {kbps} kbit/s");
        current = seen;
        // Stay in the phase a while: no flapping.
        for _ in 0..10 {
            write_slice(&db, kbps, &mut seq).await;
            if let Ok(decs) = tokio::time::timeout(Duration::from_millis(100), pep.next_dec()).await
            {
                panic!("{phase}: decision changed while the load stayed: {decs:?}");
            }
        }
    }

    // The decisions and their reasons are stored, in order.
    let rows = server.store.recent_decisions(100).await.unwrap();
    let kinds: Vec<String> = rows.iter().rev().map(|r| r.1.clone()).collect();
    assert_eq!(kinds[..4], ["accept", "remark", "drop", "remark"]);
    assert_eq!(kinds.last().map(String::as_str), Some("accept"));
    let rates = server.store.recent_rates(1000).await.unwrap();
    assert!(rates
        .iter()
        .any(|r| r.subject == "link" && r.name == "edge-ingress" && r.rate_kbps > 6000.0));
    let policed = rates
        .iter()
        .find(|r| r.subject == "flow" && r.records > 0)
        .unwrap();
    assert!((policed.rate_kbps - 1500.0).abs() < 1000.0, "{policed:?}");
    server.stop().await;
}

#[tokio::test]
async fn paper_phases_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    run_phases(&format!("sqlite://{}", dir.path().join("q.db").display())).await;
}

#[tokio::test]
async fn paper_phases_on_postgres() {
    need!(Postgres::available());
    let pg = tokio::task::spawn_blocking(Postgres::start)
        .await
        .unwrap()
        .unwrap();
    run_phases(&pg.url()).await;
}
