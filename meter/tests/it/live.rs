//! Live capture on a veth inside network namespaces this test creates (and
//! always deletes): AF_PACKET TPACKET_V3 ring, PACKET_FANOUT over two
//! threads, a classic BPF filter; bounded UDP traffic sent inside the
//! namespaces only.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use qosloop_testkit::frames as support;

use qosloop_schema::FlowRecord;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The bound on every wait for the meter: generous, so that only a broken
/// meter fails, not a busy machine.
const DEADLINE: Duration = Duration::from_secs(60);

/// The meter killed and the namespaces deleted on drop, also when the test
/// panics.
struct Cleanup {
    namespaces: Vec<String>,
    meter: Option<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(m) = &mut self.meter {
            let _ = m.kill();
            let _ = m.wait();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// The meter's `qosloop_meter_metered_packets_total`, read over `/metrics`
/// from inside `ns` (bash's /dev/tcp); `None` while it does not answer.
fn metered_packets(ns: &str, port: u16) -> Option<u64> {
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port} && \
         printf 'GET /metrics HTTP/1.1\\r\\nHost: t\\r\\nConnection: close\\r\\n\\r\\n' >&3 && \
         timeout 10 cat <&3"
    );
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "bash", "-c", &script])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("qosloop_meter_metered_packets_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// Polls `metered_packets` until `ok` holds for it; fails after
/// [`DEADLINE`] or when the meter exited.
fn wait_metered(cleanup: &mut Cleanup, ns: &str, port: u16, what: &str, ok: impl Fn(u64) -> bool) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let seen = metered_packets(ns, port);
        if seen.is_some_and(&ok) {
            return;
        }
        if let Some(status) = cleanup.meter.as_mut().unwrap().try_wait().unwrap() {
            panic!("the meter exited {status} before {what}");
        }
        assert!(
            Instant::now() < deadline,
            "not within {DEADLINE:?}: {what} (metered packets: {seen:?})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// ldh [12]; jeq #0x800 else drop; ldb [23]; jeq #17 else drop; accept.
const UDP_ONLY_BPF: &str = "6,40 0 0 12,21 0 3 2048,48 0 0 23,21 0 1 17,6 0 0 262144,6 0 0 0";

#[test]
fn captures_on_a_veth_with_fanout_and_bpf() {
    if support::need_binary("ip", "iproute2").is_none()
        || support::need_binary("bash", "bash").is_none()
    {
        return;
    }
    if support::need_root("network namespaces").is_none() {
        return;
    }
    let tag = std::process::id();
    let (a, b) = (
        format!("qlt-{tag}-0-meter-a"),
        format!("qlt-{tag}-1-meter-b"),
    );
    let (va, vb) = (format!("qm{tag}a"), format!("qm{tag}b"));
    let (va, vb) = (&va[..va.len().min(15)], &vb[..vb.len().min(15)]);
    let mut cleanup = Cleanup {
        namespaces: vec![a.clone(), b.clone()],
        meter: None,
    };
    support::ip(&["netns", "add", &a]);
    support::ip(&["netns", "add", &b]);
    support::ip(&[
        "link", "add", va, "netns", &a, "type", "veth", "peer", "name", vb, "netns", &b,
    ]);
    support::ip(&["-n", &a, "addr", "add", "10.77.0.1/24", "dev", va]);
    support::ip(&["-n", &b, "addr", "add", "10.77.0.2/24", "dev", vb]);
    support::ip(&["-n", &a, "link", "set", va, "up"]);
    support::ip(&["-n", &b, "link", "set", vb, "up"]);
    support::ip(&["-n", &a, "link", "set", "lo", "up"]);
    support::ip(&["-n", &b, "link", "set", "lo", "up"]);

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("live.jsonl");
    let stderr_path = dir.path().join("meter.log");
    // Runs until SIGTERM; /metrics (in its namespace) is bound only once
    // the capture rings are open, and counts what they delivered.
    let metrics_port = 9742;
    cleanup.meter = Some(
        Command::new("ip")
            .args(["netns", "exec", &b, env!("CARGO_BIN_EXE_qosloop-meter")])
            .args(["--interface", vb, "--threads", "2", "--bpf", UDP_ONLY_BPF])
            .args(["--interim-ms", "0", "--caplen", "96", "--records-out"])
            .arg(&out)
            .args(["--metrics", &format!("127.0.0.1:{metrics_port}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_metered(
        &mut cleanup,
        &b,
        metrics_port,
        "the capture is open",
        |_| true,
    );
    // 40 datagrams of 9 bytes each to a closed port, 10 ms apart: bounded.
    let send = Command::new("ip")
        .args(["netns", "exec", &a, "bash", "-c"])
        .arg("for i in $(seq 40); do echo qosloop1 > /dev/udp/10.77.0.2/5555; sleep 0.01; done")
        .output()
        .unwrap();
    assert!(
        send.status.success(),
        "{}",
        String::from_utf8_lossy(&send.stderr)
    );
    // Every datagram read from the rings (the counters are published
    // every second) before the meter is stopped.
    wait_metered(&mut cleanup, &b, metrics_port, "40 packets metered", |n| {
        n >= 40
    });
    let mut meter = cleanup.meter.take().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(meter.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = meter.wait().unwrap();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert!(status.success(), "meter: {stderr}");
    let records: Vec<FlowRecord> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| FlowRecord::from_json_line(l).unwrap())
        .collect();
    let udp: Vec<&FlowRecord> = records
        .iter()
        .filter(|r| r.proto == 17 && r.dst_port == 5555 && r.src_addr.to_string() == "10.77.0.1")
        .collect();
    assert_eq!(
        udp.iter().map(|r| r.packets).sum::<u64>(),
        40,
        "{records:?}\n{stderr}"
    );
    assert_eq!(udp.iter().map(|r| r.bytes).sum::<u64>(), 40 * (20 + 8 + 9));
    // The filter let only UDP through: no ARP, no ICMP unreachables.
    assert!(records.iter().all(|r| r.proto == 17), "{records:?}");
    assert!(!stderr.contains("not_ip"), "{stderr}");
    assert!(stderr.contains("capture drops 0"), "{stderr}");
}
