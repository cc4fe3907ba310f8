//! The knowledge base end to end on a real PostgreSQL: the real exporter
//! sends host-agent records (user and process set) to a collector keeping
//! the knowledge base; the policy server's HTTP API shows the counters,
//! the mapping learned and its expiry, and an SSE subscriber of
//! `/api/v1/kb/events` sees logon → threshold → logoff in order.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_collector::Config;
use qosloop_exporter::{Exporter, ExporterConfig};
use qosloop_schema::FlowRecord;
use qosloop_testbed::bench::kb::{Rig, SseClient};
use qosloop_testbed::harness::Postgres;
use qosloop_testbed::need;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn rec(src: &str, dst: &str, bytes: u64, user: Option<&str>, process: Option<&str>) -> FlowRecord {
    FlowRecord {
        src_addr: src.parse().unwrap(),
        dst_addr: dst.parse().unwrap(),
        src_port: 40_000,
        dst_port: 443,
        proto: 6,
        packets: bytes / 1000,
        bytes,
        start_ns: 1,
        end_ns: 2,
        user: user.map(str::to_owned),
        process: process.map(str::to_owned),
        ..FlowRecord::default()
    }
}

/// Sends `records` and waits for every acknowledgement (the commit).
async fn export(collector: SocketAddr, name: &str, records: &[FlowRecord]) {
    let mut cfg = ExporterConfig::new(vec![collector.to_string()]);
    cfg.name = name.into();
    cfg.finish_timeout = Duration::from_secs(20);
    let mut ex = Exporter::start(cfg).unwrap();
    for r in records {
        ex.send(r).await.unwrap();
    }
    let report = ex.finish().await.unwrap();
    assert!(report.complete(), "{report:?}");
}

fn user_row(users: &serde_json::Value, name: &str) -> Option<serde_json::Value> {
    users["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["user"] == name)
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_mappings_and_events_through_collector_and_api() {
    need!(Postgres::available());
    let pg = Postgres::start().unwrap();
    let config = Config {
        kb_mapping_ttl_s: 2,
        kb_idle_s: 1,
        kb_sweep_ms: 100,
        kb_thresholds: vec!["alice=100000".into()],
        ..Config::default()
    };
    let rig = Rig::start(&pg.url(), &config).await.unwrap();
    let mut sse = SseClient::connect(rig.http).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The agent exports from 127.0.0.1 (its connection's address): its
    // records from and to 127.0.0.1 are alice's traffic on this host.
    let sent = Instant::now();
    export(
        rig.collector,
        "agent",
        &[
            rec(
                "127.0.0.1",
                "192.0.2.10",
                40_000,
                Some("alice"),
                Some("curl"),
            ),
            rec(
                "192.0.2.10",
                "127.0.0.1",
                20_000,
                Some("alice"),
                Some("curl"),
            ),
        ],
    )
    .await;
    // The counters, polled through the API from the moment of sending.
    let visible = loop {
        let users = rig.get_json("/api/v1/kb/users").await.unwrap();
        if let Some(a) = user_row(&users, "alice") {
            break (sent.elapsed(), a);
        }
        assert!(
            sent.elapsed() < Duration::from_secs(10),
            "alice never appeared"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!(
        "knowledge-base counters visible {:.1} ms after the records were sent",
        visible.0.as_secs_f64() * 1e3
    );
    let a = visible.1;
    assert_eq!(
        (
            &a["bytes_out"],
            &a["bytes_in"],
            &a["packets_out"],
            &a["packets_in"]
        ),
        (
            &serde_json::json!(40_000),
            &serde_json::json!(20_000),
            &serde_json::json!(40),
            &serde_json::json!(20)
        )
    );
    assert_eq!(a["online"], true);
    let hosts = rig.get_json("/api/v1/kb/hosts").await.unwrap();
    let h = hosts["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["addr"] == "192.0.2.10")
        .unwrap()
        .clone();
    assert_eq!(
        (h["bytes_in"].clone(), h["bytes_out"].clone()),
        (40_000.into(), 20_000.into())
    );

    // The mapping learned: 127.0.0.1 is alice's, volatile.
    let maps = rig.get_json("/api/v1/kb/mappings").await.unwrap();
    let rows = maps["rows"].as_array().unwrap().clone();
    assert_eq!(rows.len(), 1, "{maps}");
    assert_eq!(
        (
            &rows[0]["addr"],
            &rows[0]["user"],
            &rows[0]["source"],
            &rows[0]["persistent"]
        ),
        (
            &"127.0.0.1".into(),
            &"alice".into(),
            &"agent".into(),
            &false.into()
        )
    );
    // A router's record without a user to alice's address is stored as
    // hers (the destination's mapping), and takes her over 100,000 bytes.
    export(
        rig.collector,
        "router",
        &[rec("192.0.2.20", "127.0.0.1", 50_000, None, None)],
    )
    .await;
    let stored = rig.db.recent_flows(1).await.unwrap();
    assert_eq!(
        stored[0].record.as_ref().unwrap().user.as_deref(),
        Some("alice")
    );
    let learned_at = Instant::now();

    // The mapping goes after its TTL (2 s from the agent's records); alice
    // then logs off (idle 1 s, no live mapping).
    let gone = loop {
        let maps = rig.get_json("/api/v1/kb/mappings").await.unwrap();
        if maps["rows"].as_array().unwrap().is_empty() {
            break learned_at.elapsed();
        }
        assert!(
            learned_at.elapsed() < Duration::from_secs(20),
            "the mapping never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "volatile mapping gone {:.2} s after the last write",
        gone.as_secs_f64()
    );

    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|(k, _): &(String, String)| k == "kb.logoff")
    {
        let e = sse.next(Duration::from_secs(10)).await.unwrap();
        if e.data["user"] == "alice" {
            seen.push((
                e.name.clone(),
                e.data["detail"].as_str().unwrap_or("").to_owned(),
            ));
        }
    }
    let kinds: Vec<&str> = seen.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["kb.logon", "kb.threshold", "kb.logoff"], "{seen:?}");
    assert_eq!(seen[1].1, "110000 bytes since logon");
    let users = rig.get_json("/api/v1/kb/users").await.unwrap();
    let a = user_row(&users, "alice").unwrap();
    assert_eq!(
        (a["online"].clone(), a["bytes_in"].clone()),
        (false.into(), 70_000.into())
    );
    rig.stop().await;
}
