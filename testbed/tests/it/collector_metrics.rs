//! The collector binary's `/metrics` (`--metrics`), scraped over HTTP and
//! read with the strict exposition parser while real IPFIX datagrams are
//! stored: the counters must say what was sent.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::collector_common as common;
use qosloop_testkit::ipfix as ipfix_support;

use ipfix_support::*;
use qosloop_testkit::metrics::scrape;
use qosloop_testkit::metrics::{parse, Scrape};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::time::{Duration, Instant};

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Scrapes until `done` holds for the scrape (bounded by `limit`).
fn scrape_until(addr: SocketAddr, limit: Duration, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let end = Instant::now() + limit;
    loop {
        if let Ok(body) = scrape(addr, Duration::from_secs(5)) {
            let s = parse(&body).unwrap_or_else(|e| panic!("invalid exposition: {e}\n{body}"));
            if done(&s) || Instant::now() > end {
                return s;
            }
        } else if Instant::now() > end {
            panic!("no answer from {addr}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn metrics_count_the_records_and_drops_of_an_ipfix_exporter() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("flows.db");
    let udp: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let mut collector = start_collector(
        dir.path(),
        "collector",
        &[
            format!("--ipfix-listen=udp://{udp}"),
            format!("--db=sqlite://{}", db.display()),
            "--ipfix-flush-ms=20".into(),
            "--ipfix-stats-interval-s=1".into(),
            format!("--metrics={metrics}"),
        ],
    );
    wait_udp_bound(udp, Duration::from_secs(60));
    let exporter = UdpSocket::bind("127.0.0.1:0").unwrap();
    let m = Ipfix::default()
        .set(2, &v4_template())
        .set(
            256,
            &[1000u16, 1001, 1002, 1003, 1004]
                .iter()
                .flat_map(|p| v4_record(*p, 3, 180))
                .collect::<Vec<u8>>(),
        )
        .message(0, 7);
    exporter.send_to(&m, udp).unwrap();
    // A data set for a template never sent, then a message whose length
    // field lies: one drop each, charged to this exporter.
    let mut bad = Ipfix::default().set(256, &v4_record(1, 1, 1)).message(1, 7);
    bad[3] = bad[3].wrapping_add(40);
    exporter.send_to(&bad, udp).unwrap();
    assert_eq!(
        wait_for_value(
            &db,
            "SELECT count(*) FROM flows",
            5,
            Duration::from_secs(10)
        ),
        5
    );
    let me = [("exporter", "127.0.0.1")];
    let s = scrape_until(metrics, Duration::from_secs(10), |s| {
        s.value("qosloop_collector_ipfix_records_total", &me) == Some(5.0)
            && s.value("qosloop_collector_ipfix_messages_total", &me) == Some(1.0)
            && s.value("qosloop_collector_records_committed_total", &[]) == Some(5.0)
    });
    assert_eq!(
        s.value("qosloop_collector_ipfix_records_total", &me),
        Some(5.0)
    );
    assert_eq!(
        s.value("qosloop_collector_ipfix_messages_total", &me),
        Some(1.0)
    );
    assert_eq!(
        s.value("qosloop_collector_records_committed_total", &[]),
        Some(5.0)
    );
    let drops: f64 = s
        .samples("qosloop_collector_ipfix_drops_total")
        .filter(|x| x.labels.get("exporter").map(String::as_str) == Some("127.0.0.1"))
        .map(|x| x.value)
        .sum();
    assert!(drops >= 1.0, "no drop counted for the lying message");
    let commits = s
        .value("qosloop_collector_commit_seconds_count", &[])
        .unwrap();
    assert!(commits >= 1.0, "{commits}");
    let listener = format!("udp://{udp}");
    let datagrams = s
        .value(
            "qosloop_collector_ipfix_datagrams_total",
            &[("listener", &listener)],
        )
        .unwrap();
    assert!(datagrams >= 2.0, "{datagrams}");
    assert!(s
        .value("qosloop_collector_write_queue_messages", &[])
        .is_some());
    assert_eq!(
        s.value(
            "qosloop_build_info",
            &[
                ("component", "collector"),
                ("version", env!("CARGO_PKG_VERSION"))
            ]
        ),
        Some(1.0)
    );
    // Nothing per flow: no label holds a flow's address or port.
    for f in s.families.values() {
        for x in &f.samples {
            for v in x.labels.values() {
                assert!(!v.contains("10.0.0."), "per-flow label in {}", x.name);
            }
        }
    }
    assert!(collector.terminate(Duration::from_secs(20)));
}

#[test]
fn a_metrics_address_beyond_loopback_needs_the_flag() {
    let out = std::process::Command::new(collector_bin())
        .args(["--db=discard:", "--metrics=0.0.0.0:9742"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("metrics"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_records_of_a_crane_exporter_by_name() {
    use qosloop_exporter::{Exporter, ExporterConfig};
    let dir = tempfile::tempdir().unwrap();
    let export: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let db = dir.path().join("flows.db");
    let mut collector = start_collector(
        dir.path(),
        "collector",
        &[
            format!("--listen={export}"),
            format!("--db=sqlite://{}", db.display()),
            format!("--metrics={metrics}"),
        ],
    );
    let end = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(export).is_err() {
        assert!(Instant::now() < end, "the collector never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut cfg = ExporterConfig::new(vec![export.to_string()]);
    cfg.name = "meter-7".into();
    cfg.batch_records = 100;
    cfg.spool_dir = Some(dir.path().join("spool"));
    let mut ex = Exporter::start(cfg).unwrap();
    for i in 0..1000 {
        ex.send(&common::record(i)).await.unwrap();
    }
    let report = ex.finish().await.unwrap();
    assert_eq!(report.acked_records, 1000);
    let me = [("exporter", "meter-7")];
    let s = tokio::task::spawn_blocking(move || {
        scrape_until(metrics, Duration::from_secs(10), |s| {
            s.value("qosloop_collector_export_records_total", &me) == Some(1000.0)
        })
    })
    .await
    .unwrap();
    assert_eq!(
        s.value("qosloop_collector_export_records_total", &me),
        Some(1000.0)
    );
    let stored = s
        .value(
            "qosloop_collector_export_messages_total",
            &[("exporter", "meter-7"), ("outcome", "stored")],
        )
        .unwrap();
    assert_eq!(stored, 10.0, "1000 records in batches of 100");
    assert_eq!(
        s.value("qosloop_collector_records_committed_total", &[]),
        Some(1000.0)
    );
    assert!(collector.terminate(Duration::from_secs(20)));
}
