//! Live capture on a veth inside network namespaces this test creates (and
//! always deletes): AF_PACKET TPACKET_V3 ring, PACKET_FANOUT over two
//! threads, a classic BPF filter; bounded UDP traffic sent inside the
//! namespaces only.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use qosloop_testkit::frames as support;

use qosloop_schema::FlowRecord;
use std::process::Command;
use std::time::Duration;

/// Namespaces deleted on drop, also when the test panics.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
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
    let _guard = Namespaces(vec![a.clone(), b.clone()]);
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

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("live.jsonl");
    let meter = Command::new("ip")
        .args(["netns", "exec", &b, env!("CARGO_BIN_EXE_qosloop-meter")])
        .args([
            "--interface",
            vb,
            "--threads",
            "2",
            "--duration-s",
            "4",
            "--bpf",
            UDP_ONLY_BPF,
        ])
        .args(["--interim-ms", "0", "--caplen", "96", "--records-out"])
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1200));
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
    let o = meter.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "meter: {stderr}");
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
