//! The meter binary's `/metrics` during a live capture on a veth inside
//! network namespaces this test creates (and always deletes): bounded UDP
//! traffic crosses it, and the exposition, scraped inside the meter's
//! namespace with the test kit's HTTP client and read with the strict
//! parser, counts it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_testkit::frames as support;

use qosloop_testkit::harness::Netns;
use qosloop_testkit::metrics::{parse, scrape, Scrape};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The meter killed on drop, also on a panic.
struct Cleanup {
    meter: Option<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(m) = &mut self.meter {
            let _ = m.kill();
            let _ = m.wait();
        }
    }
}

/// `GET /metrics` from inside `ns`: the parsed body of a 200 answer.
fn scrape_in(ns: &Netns, port: u16) -> Option<Scrape> {
    let body = ns
        .run_in(move || scrape(([127, 0, 0, 1], port).into(), Duration::from_secs(5)))
        .ok()?
        .ok()?;
    Some(parse(&body).unwrap_or_else(|e| panic!("invalid exposition: {e}\n{body}")))
}

#[test]
fn metrics_count_the_packets_and_flows_of_a_live_capture() {
    if support::need_binary("ip", "iproute2").is_none()
        || support::need_binary("bash", "bash").is_none()
    {
        return;
    }
    if support::need_root("network namespaces").is_none() {
        return;
    }
    let tag = std::process::id();
    let (a, b) = (format!("qlt-{tag}-mm-a"), format!("qlt-{tag}-mm-b"));
    let (va, vb) = (format!("qx{tag}a"), format!("qx{tag}b"));
    let (va, vb) = (&va[..va.len().min(15)], &vb[..vb.len().min(15)]);
    // Deleted on drop, after `cleanup` killed the meter.
    let _ns_a = Netns::create_named(&a).unwrap();
    let ns_b = Netns::create_named(&b).unwrap();
    let mut cleanup = Cleanup { meter: None };
    support::ip(&[
        "link", "add", va, "netns", &a, "type", "veth", "peer", "name", vb, "netns", &b,
    ]);
    support::ip(&["-n", &a, "addr", "add", "10.78.0.1/24", "dev", va]);
    support::ip(&["-n", &b, "addr", "add", "10.78.0.2/24", "dev", vb]);
    support::ip(&["-n", &a, "link", "set", va, "up"]);
    support::ip(&["-n", &b, "link", "set", vb, "up"]);

    let dir = tempfile::tempdir().unwrap();
    let port = 9741;
    let meter = Command::new("ip")
        .args(["netns", "exec", &b, env!("CARGO_BIN_EXE_qosloop-meter")])
        .args(["--interface", vb, "--duration-s", "30", "--records-out"])
        .arg(dir.path().join("live.jsonl"))
        .args(["--metrics", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    cleanup.meter = Some(meter);
    let end = Instant::now() + Duration::from_secs(20);
    let first = loop {
        if let Some(s) = scrape_in(&ns_b, port) {
            break s;
        }
        assert!(Instant::now() < end, "the meter never answered on /metrics");
        std::thread::sleep(Duration::from_millis(100));
    };
    let before = first.value("qosloop_meter_packets_total", &[]).unwrap();
    // 40 datagrams to a closed port, 10 ms apart: bounded.
    let send = Command::new("ip")
        .args(["netns", "exec", &a, "bash", "-c"])
        .arg("for i in $(seq 40); do echo qosloop1 > /dev/udp/10.78.0.2/5555; sleep 0.01; done")
        .output()
        .unwrap();
    assert!(
        send.status.success(),
        "{}",
        String::from_utf8_lossy(&send.stderr)
    );
    // Capture threads publish their counters every second.
    let end = Instant::now() + Duration::from_secs(20);
    let after = loop {
        if let Some(s) = scrape_in(&ns_b, port) {
            let metered = s.value("qosloop_meter_metered_packets_total", &[]).unwrap();
            if metered >= 40.0 && s.value("qosloop_meter_flow_records_total", &[]).unwrap() >= 1.0 {
                break s;
            }
        }
        assert!(Instant::now() < end, "the metrics never showed the traffic");
        std::thread::sleep(Duration::from_millis(200));
    };
    let seen = after.value("qosloop_meter_packets_total", &[]).unwrap() - before;
    // The 40 datagrams, plus what the kernel says back (ICMP port
    // unreachable, ARP): at least 40, and not wildly more.
    assert!((40.0..200.0).contains(&seen), "{seen}");
    assert!(
        after
            .value("qosloop_meter_metered_bytes_total", &[])
            .unwrap()
            >= 40.0 * 37.0
    );
    assert!(after.value("qosloop_meter_flows_total", &[]).unwrap() >= 1.0);
    assert_eq!(
        after.value("qosloop_meter_capture_drops_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        after.value(
            "qosloop_build_info",
            &[
                ("component", "meter"),
                ("version", env!("CARGO_PKG_VERSION"))
            ]
        ),
        Some(1.0)
    );
}
