//! The host agent at its limits, against the real kernel: a counter map
//! far too small for the sockets sending, an agent killed with SIGKILL
//! in the middle of traffic and started again on its pinned maps and links,
//! and one killed inside a drain (held there by the test-only hook
//! `QOSLOOP_AGENT_TEST_PAUSE_IN_DRAIN`) before and after its records are
//! out.
//! Each test attaches the agent to a cgroup it creates and starts its
//! generators in it, so only their sockets are counted (the rest of the
//! host's traffic can neither fill the map nor blur the totals), and the
//! comparison is exact: UDP datagrams × (payload + 28 IP bytes).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::agent_common;

use agent_common::*;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Opens `n` UDP sockets one after the other; each sends `per` datagrams
/// of `size` bytes to 127.0.0.1:`base + i` (nobody listens) and closes.
const MANY: &str = r#"
import os, socket, sys, time
base, n, per, size = map(int, sys.argv[1:5])
print(os.getpid(), flush=True)
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(per):
        s.sendto(b"m" * size, ("127.0.0.1", base + i))
    s.close()
    time.sleep(0.002)
print("sent", flush=True)
"#;

#[test]
fn a_full_counter_map_counts_the_rest_as_overflow_and_drains_the_oldest_first() {
    if prerequisites().is_none() {
        return;
    }
    let cgroup = TestCgroup::new("full");
    let ns = Netns::new("f");
    let frank = User::new("qlaf");
    let agent = AgentRun::start_with(
        &ns,
        300,
        &[
            "--agent-cgroup".into(),
            cgroup.arg(),
            "--agent-map-entries".into(),
            "16".into(),
        ],
    );
    let (base, n, per, size) = (41_000u16, 400u16, 5u64, 100u64);
    let args: Vec<String> = [base.into(), n.into(), per, size]
        .iter()
        .map(|v: &u64| v.to_string())
        .collect();
    let mut g = Gen::start_in(&ns, &frank, MANY, &args, Some(&cgroup));
    g.wait_line("sent");
    g.wait();
    std::thread::sleep(Duration::from_millis(400));
    let (records, log) = agent.stop();
    let ours: Vec<_> = records
        .iter()
        .filter(|r| r.proto == 17 && (base..base + n).contains(&r.dst_port))
        .collect();
    for r in &ours {
        assert_eq!(r.user.as_deref(), Some(frank.name.as_str()), "{r:?}");
    }
    let attributed: u64 = ours.iter().map(|r| r.bytes).sum();
    let sent = u64::from(n) * per * (size + 28);
    let (full_packets, full_bytes) =
        map_full(&log).unwrap_or_else(|| panic!("no summary line: {log}"));
    assert!(
        full_packets > 0,
        "a 16-entry map took {n} sockets' packets without overflow: {log}"
    );
    // Everything the generator sent is either in a record or reported as
    // not attributed: nothing is lost, nothing counted twice.
    assert_eq!(
        attributed + full_bytes,
        sent,
        "attributed {attributed} + not attributed {full_bytes} != sent {sent}; {log}"
    );
    // The first socket's datagrams went in while the map had room.
    let first: u64 = ours
        .iter()
        .filter(|r| r.dst_port == base)
        .map(|r| r.bytes)
        .sum();
    assert_eq!(first, per * (size + 28), "first socket; {log}");
    // Early drains emptied the full map again and again: far more flows
    // were attributed than one map holds.
    let flows: BTreeSet<u16> = ours.iter().map(|r| r.dst_port).collect();
    assert!(
        flows.len() > 2 * 16,
        "only {} flows attributed with a 16-entry map: {log}",
        flows.len()
    );
}

#[test]
fn an_agent_killed_mid_traffic_and_restarted_on_its_pins_counts_exactly() {
    if prerequisites().is_none() {
        return;
    }
    let cgroup = TestCgroup::new("restart");
    let pins = Bpffs::new();
    let ns = Netns::new("r");
    let gina = User::new("qlag");
    let extra = [
        "--agent-cgroup".into(),
        cgroup.arg(),
        "--agent-pin-dir".into(),
        pins.path().display().to_string(),
    ];
    let first = AgentRun::start_with(&ns, 300, &extra);
    let port = 40_006;
    let (count, size) = (40_000u64, 200u64);
    let mut g = Gen::start_in(
        &ns,
        &gina,
        r#"
import os, socket, sys, time
port, count, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
print(os.getpid(), flush=True)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(count):
    s.sendto(b"k" * size, ("127.0.0.1", port))
    if i % 16 == 15:
        time.sleep(0.001)
print("sent", flush=True)
"#,
        &[port.to_string(), count.to_string(), size.to_string()],
        Some(&cgroup),
    );
    // Kill right after a drain has written its records (the next one is
    // an interval away), while the generator is still sending.
    let deadline = Instant::now() + Duration::from_secs(10);
    while first.records_len() == 0 {
        assert!(Instant::now() < deadline, "the first agent wrote nothing");
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(30));
    let before = first.kill9();
    let second = AgentRun::start_with(&ns, 300, &extra);
    g.wait_line("sent");
    g.wait();
    std::thread::sleep(Duration::from_millis(400));
    let (after, log) = second.stop();
    let is_gina = |r: &qosloop_schema::FlowRecord| r.user.as_deref() == Some(&gina.name);
    let got_before = udp_bytes(&before, port, is_gina);
    let got_after = udp_bytes(&after, port, is_gina);
    let want = count * (size + 28);
    assert!(
        got_before > 0 && got_after > 0,
        "not killed mid-traffic: {got_before} before, {got_after} after"
    );
    assert_eq!(
        got_before + got_after,
        want,
        "before the kill {got_before} + after {got_after}; {log}"
    );
    assert!(
        log.contains("still attached"),
        "the restarted agent did not take over the pinned links: {log}"
    );
    // A clean stop removes the link pins (the programs are detached); the
    // maps stay pinned for the next agent.
    let left: Vec<String> = std::fs::read_dir(pins.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        left.iter().all(|n| !n.starts_with("qla_link")),
        "link pins left: {left:?}"
    );
    assert!(
        left.iter().any(|n| n == "qla_count0"),
        "maps not pinned: {left:?}"
    );
}

/// UDP datagrams from one socket, paced, until `count` are sent.
const PACED: &str = r#"
import os, socket, sys, time
port, count, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
print(os.getpid(), flush=True)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(count):
    s.sendto(b"d" * size, ("127.0.0.1", port))
    if i % 16 == 15:
        time.sleep(0.001)
print("sent", flush=True)
"#;

/// Kills the agent while the hook holds it at `point` inside a drain that
/// has records, starts another on the same pins and checks the two
/// agents' records add up to exactly what was sent.
fn killed_inside_a_drain(point: &str, tag: &str, port: u16) {
    let cgroup = TestCgroup::new(tag);
    let pins = Bpffs::new();
    let ns = Netns::new(tag);
    let user = User::new(&format!("qla{tag}"));
    let extra = [
        "--agent-cgroup".into(),
        cgroup.arg(),
        "--agent-pin-dir".into(),
        pins.path().display().to_string(),
    ];
    let first = AgentRun::start_with_env(
        &ns,
        200,
        &extra,
        &[("QOSLOOP_AGENT_TEST_PAUSE_IN_DRAIN", point)],
    );
    let (count, size) = (20_000u64, 300u64);
    let mut g = Gen::start_in(
        &ns,
        &user,
        PACED,
        &[port.to_string(), count.to_string(), size.to_string()],
        Some(&cgroup),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !first.log().contains("pausing inside a drain") {
        assert!(
            Instant::now() < deadline,
            "the hook never paused: {}",
            first.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = first.kill9();
    let second = AgentRun::start_with(&ns, 200, &extra);
    g.wait_line("sent");
    g.wait();
    std::thread::sleep(Duration::from_millis(400));
    let (after, log) = second.stop();
    let ours = |r: &qosloop_schema::FlowRecord| r.user.as_deref() == Some(&user.name);
    let got_before = udp_bytes(&before, port, ours);
    let got_after = udp_bytes(&after, port, ours);
    let want = count * (size + 28);
    assert!(
        got_after > 0,
        "{point}: the restarted agent counted nothing; {log}"
    );
    assert_eq!(
        got_before + got_after,
        want,
        "{point}: before the kill {got_before} + after {got_after} != sent {want}; {log}"
    );
    if point == "before_clear" {
        assert!(
            got_before > 0,
            "{point}: the batch was not out before the kill"
        );
        assert!(
            log.contains("not exported again"),
            "{point}: the restarted agent did not clear the exported batch: {log}"
        );
    }
}

#[test]
fn an_agent_killed_inside_a_drain_before_its_records_are_out_loses_nothing() {
    if prerequisites().is_none() {
        return;
    }
    killed_inside_a_drain("before_export", "dx", 40_011);
}

#[test]
fn an_agent_killed_inside_a_drain_after_its_records_are_out_counts_nothing_twice() {
    if prerequisites().is_none() {
        return;
    }
    killed_inside_a_drain("before_clear", "dc", 40_012);
}
