//! The reference experiment's decisions from synthetic flow records written
//! into real SQL (SQLite, and PostgreSQL started by the harness) at
//! controlled rates: low load → accept, medium → remark, high → drop, and
//! back, seen by a fake enforcer over TCP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;
use qosloop_policy_server::server::{LoopConfig, Server};
use qosloop_policy_server::testing::paper_policy;
use qosloop_policy_server::PdpConfig;
use qosloop_schema::{DecisionKind, FlowRecord};
use qosloop_testkit::harness::Postgres;
use qosloop_testkit::need;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long a phase may take to reach its decision: generous, so that only
/// a broken loop fails, not a slow machine.
const PHASE_DEADLINE: Duration = Duration::from_secs(60);

/// The server's rate lag: records must be committed within it to count in
/// their window. This test writes every ~100 ms; a lag of 2 s leaves a busy
/// machine room, so every window sees exactly the rate written.
const RATE_LAG: Duration = Duration::from_secs(2);

/// Writes traffic in capture time: each call's records cover the time since
/// the previous call, `[previous end, now]`, with the bytes `kbps` gives
/// over exactly that span. The rates the server computes (from record
/// timestamps) are then the rates written however slowly the loop runs.
struct Traffic {
    seq: u32,
    end_ns: u64,
}

impl Traffic {
    fn starting_now() -> Traffic {
        Traffic {
            seq: 0,
            end_ns: qosloop_store::now_ns() as u64,
        }
    }

    /// Generator traffic at `kbps` since the previous slice, plus the
    /// policed flow out of profile at 1500 kbit/s (which does not count in
    /// the link load), committed as one batch.
    async fn write_slice(&mut self, db: &qosloop_store::Db, kbps: u64) {
        let start_ns = self.end_ns;
        let end_ns = (qosloop_store::now_ns() as u64).max(start_ns + 1);
        let bytes_at = |kbps: u64| kbps * 1000 / 8 * (end_ns - start_ns) / 1_000_000_000;
        let record = |src: &str, dport: u16, bytes: u64| FlowRecord {
            src_addr: src.parse().unwrap(),
            dst_addr: "10.71.2.2".parse().unwrap(),
            src_port: 6055,
            dst_port: dport,
            proto: 17,
            packets: (bytes / 256).max(1),
            bytes,
            start_ns,
            end_ns,
            ..Default::default()
        };
        // Four generator flows sharing the load.
        let mut records: Vec<FlowRecord> = (0..4u16)
            .map(|i| record("10.71.1.3", 5001 + i, bytes_at(kbps) / 4))
            .collect();
        records.push(record("10.71.1.2", 4055, bytes_at(1500)));
        self.seq += 1;
        let batch = qosloop_store::Batch {
            exporter_id: 1,
            session_id: 1,
            seq: self.seq,
            records,
            dedup: false,
        };
        db.commit_batches(&[&batch]).await.unwrap();
        self.end_ns = end_ns;
    }
}

async fn run_phases(url: &str) {
    let (_tx, rx) = watch::channel(Arc::new(paper_policy()));
    let config = LoopConfig {
        rate_lag: RATE_LAG,
        ..loop_config(100)
    };
    let server = Server::start(url, any_loopback_port(), PdpConfig::default(), config, rx)
        .await
        .unwrap();
    let db = server.store.db().clone();
    let (mut pep, got) = FakePep::connect(server.pdp_addr, "edge-router", &["edge"], &[]).await;
    let Got::Install(first) = &got[0] else {
        panic!("{got:?}")
    };
    assert_eq!(first.kind(), DecisionKind::Accept, "no load yet: accept");

    let mut traffic = Traffic::starting_now();
    let phases = [
        ("low", 2000, DecisionKind::Accept),
        ("medium", 4500, DecisionKind::Remark),
        ("high", 7500, DecisionKind::Drop),
        ("low again", 1500, DecisionKind::Accept),
    ];
    let mut current = DecisionKind::Accept;
    for (phase, kbps, want) in phases {
        // Write slices until the decision changes (the deadline only
        // turns a broken loop into a failure).
        let deadline = Instant::now() + PHASE_DEADLINE;
        let mut seen = current;
        while seen != want && Instant::now() < deadline {
            traffic.write_slice(&db, kbps).await;
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
        }
        assert_eq!(
            seen, want,
            "phase {phase} at {kbps} kbit/s: no decision within {PHASE_DEADLINE:?}"
        );
        current = seen;
        // Stay in the phase a while: no flapping.
        for _ in 0..10 {
            traffic.write_slice(&db, kbps).await;
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
    // The rates are the ones written, in capture time: the high phase's
    // link load, and the policed flow's 1500 kbit/s (its newest window
    // with records; the writes cover it).
    let rates = server.store.recent_rates(1000).await.unwrap();
    let near = |rate: f64, want: f64| (rate - want).abs() < want * 0.01;
    assert!(
        rates
            .iter()
            .any(|r| r.subject == "link" && r.name == "edge-ingress" && near(r.rate_kbps, 7500.0)),
        "no window of the high phase at 7500 kbit/s: {:?}",
        rates
            .iter()
            .filter(|r| r.subject == "link")
            .collect::<Vec<_>>()
    );
    let policed = rates
        .iter()
        .find(|r| r.subject == "flow" && r.records > 0)
        .unwrap();
    assert!(near(policed.rate_kbps, 1500.0), "{policed:?}");
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
