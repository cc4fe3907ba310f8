//! What the collector's tests in the testbed share: the synthetic flow
//! records they export, and the legitimate exporter that must still get
//! every record acknowledged while and after an attack runs.

// Each test binary uses only part of this module.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use qosloop_exporter::{Exporter, ExporterConfig};
use qosloop_schema::FlowRecord;
use std::net::SocketAddr;
use std::time::Duration;

/// Flow `i`: a TCP flow to 192.0.2.9:443 from one of 65,536 addresses in
/// 10.0.0.0/16, one packet of 40 to 1,499 bytes; no timestamps.
pub fn record(i: u64) -> FlowRecord {
    FlowRecord {
        src_addr: std::net::Ipv4Addr::from(0x0a00_0000 + (i as u32 % 65536)).into(),
        dst_addr: "192.0.2.9".parse().unwrap(),
        src_port: (i % 60000) as u16,
        dst_port: 443,
        proto: 6,
        packets: 1,
        bytes: 40 + i % 1460,
        ..FlowRecord::default()
    }
}

/// A legitimate exporter named `name` sends records `0..n` to `addr`;
/// panics unless every one is acknowledged.
pub async fn legitimate_export(addr: SocketAddr, name: &str, n: u64) {
    let mut cfg = ExporterConfig::new(vec![addr.to_string()]);
    cfg.name = name.into();
    cfg.finish_timeout = Duration::from_secs(30);
    let mut ex = Exporter::start(cfg).unwrap();
    for i in 0..n {
        ex.send(&record(i)).await.unwrap();
    }
    let report = ex.finish().await.unwrap();
    assert!(report.complete(), "{name}: {report:?}");
}
