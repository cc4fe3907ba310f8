//! The enforcer binary's `/metrics` (`--metrics`), scraped inside the
//! namespace it enforces in: it applies a decisions file on a real veth
//! (HTB and nftables), bounded UDP traffic crosses it, and the exposition
//! (read with the strict parser) shows the change's latency, the decision
//! in the kernel and the kernel's packet counters for its class.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_schema::{
    Decision, DecisionReason, Dscp, FlowSpec, Kbps, OutOfProfileAction, PortRange, TrafficProfile,
};
use qosloop_testkit::harness::{prerequisite, require_binary, require_root, Netns, VethPair};
use qosloop_testkit::metrics::scrape;
use qosloop_testkit::metrics::{parse, Scrape};
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// The daemon, killed and reaped when dropped (also on a failed assert).
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn decision() -> Decision {
    Decision {
        id: 1,
        version: 1,
        role: "edge".into(),
        policy_dn: "cn=gold".into(),
        flow: FlowSpec {
            src: Some("10.61.0.1".parse().unwrap()),
            dst: Some("10.61.0.2".parse().unwrap()),
            proto: Some(17),
            src_ports: None,
            dst_ports: Some(PortRange::single(5001)),
            user: None,
        },
        profile: TrafficProfile {
            rate: Kbps(1000),
            burst_bytes: 15_000,
        },
        in_profile_dscp: Some(Dscp::CS6),
        out_of_profile: OutOfProfileAction::Accept { shape: None },
        reason: DecisionReason {
            rate_kbps: 0.0,
            avg_rate_kbps: 0.0,
            link: "edge".into(),
            link_load_kbps: 0.0,
            band: "test".into(),
        },
        issued_ns: 0,
    }
}

fn scrape_in(ns: &Netns, addr: SocketAddr) -> Option<Scrape> {
    let body = ns
        .run_in(move || scrape(addr, Duration::from_secs(5)))
        .unwrap()
        .ok()?;
    Some(parse(&body).unwrap_or_else(|e| panic!("invalid exposition: {e}\n{body}")))
}

fn packets(s: &Scrape, profile: &str) -> f64 {
    s.value(
        "qosloop_enforcer_kernel_packets_total",
        &[("class", "accept"), ("profile", profile)],
    )
    .unwrap_or(0.0)
}

#[test]
fn metrics_show_the_change_and_the_kernel_counters_of_its_class() {
    if prerequisite(require_root("programs HTB and nftables in namespaces")).is_none()
        || prerequisite(require_binary("nft", "nftables")).is_none()
        || prerequisite(require_binary("bash", "bash")).is_none()
    {
        return;
    }
    let tx = Netns::create("mtx").unwrap();
    let rx = Netns::create("mrx").unwrap();
    let veth = VethPair::connect(&tx, "10.61.0.1/24", &rx, "10.61.0.2/24").unwrap();
    tx.ip(&["link", "set", "lo", "up"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("decisions.json");
    std::fs::write(&file, serde_json::to_string(&[decision()]).unwrap()).unwrap();
    let addr: SocketAddr = "127.0.0.1:9744".parse().unwrap();
    let mut cmd = tx.command(env!("CARGO_BIN_EXE_qosloop-enforcer"));
    cmd.args([
        "--interface",
        &veth.a_if,
        "--roles",
        "edge",
        "--capacity",
        "10mbit",
    ])
    .arg("--decisions")
    .arg(&file)
    .args(["--metrics", &addr.to_string()])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let _daemon = Daemon(cmd.spawn().unwrap());

    // Up and holding the decision: the change was timed once.
    let end = Instant::now() + Duration::from_secs(20);
    let first = loop {
        if let Some(s) = scrape_in(&tx, addr) {
            if s.value("qosloop_enforcer_decisions", &[("class", "accept")]) == Some(1.0) {
                break s;
            }
        }
        assert!(
            Instant::now() < end,
            "the enforcer never showed its decision"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        first.value("qosloop_enforcer_apply_seconds_count", &[]),
        Some(1.0)
    );
    assert_eq!(
        first.value("qosloop_enforcer_apply_failures_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        first.value("qosloop_enforcer_pdp_connected", &[]),
        Some(0.0)
    );
    let before = packets(&first, "in") + packets(&first, "out");

    // 60 datagrams of the decision's flow, 5 ms apart: bounded.
    let sent = tx
        .command("bash")
        .args([
            "-c",
            "for i in $(seq 60); do echo qosloop > /dev/udp/10.61.0.2/5001; sleep 0.005; done",
        ])
        .output()
        .unwrap();
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    // The kernel counters are read every 5 s: wait for the next read.
    let end = Instant::now() + Duration::from_secs(20);
    let after = loop {
        if let Some(s) = scrape_in(&tx, addr) {
            if packets(&s, "in") + packets(&s, "out") >= before + 60.0 {
                break s;
            }
        }
        assert!(
            Instant::now() < end,
            "the kernel counters never showed the traffic"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // 60 small datagrams fit the 15,000-byte burst: all in profile.
    assert_eq!(packets(&after, "in") - packets(&first, "in"), 60.0);
    assert!(
        after
            .value(
                "qosloop_enforcer_kernel_bytes_total",
                &[("class", "accept"), ("profile", "in")]
            )
            .unwrap()
            > 0.0
    );
    assert_eq!(
        after.value("qosloop_enforcer_decisions", &[("class", "drop")]),
        Some(0.0)
    );
}

#[test]
fn a_metrics_address_beyond_loopback_is_refused_before_the_kernel() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qosloop-enforcer"))
        .args([
            "--dry-run",
            "--interface",
            "lo",
            "--metrics",
            "0.0.0.0:9744",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("metrics") && !stderr.contains("reconciled kernel state"),
        "{stderr}"
    );
}
