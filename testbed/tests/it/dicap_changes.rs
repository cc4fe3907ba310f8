//! DiCAP against the real kernel while its membership changes mid-traffic
//! (nodes in namespaces behind a `tc` mirror, a plain meter on another
//! mirror port as the reference that sees everything):
//!
//! - the coordinator killed (SIGKILL) and restarted while traffic flows:
//!   the nodes keep their filters meanwhile, come back with their shares,
//!   the restarted coordinator adopts them; no packet is captured twice or
//!   missed (no window is reported, none is needed);
//! - a node joining while traffic flows: make-before-break, the moved
//!   buckets captured by two nodes only inside the `handover` window the
//!   coordinator reports; every other flow exactly once, no flow short.
//!
//! Every sending loop is bounded in count and time; the namespaces, cgroups
//! and processes go when the link and members are dropped, also on failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_meter::dicap::{bucket_of, ShareMode};
use qosloop_schema::FlowRecord;
use qosloop_testbed::dicap::cluster::{
    collect, start_coordinator, start_member, wait_installed, Collected, Member, Role,
};
use qosloop_testbed::dicap::{gen, net::MirroredLink};
use qosloop_testbed::need;
use qosloop_testbed::procs::{component_dir, experiment_prerequisites};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

type Key = (IpAddr, IpAddr, u16, u16, u8);

fn key(r: &FlowRecord) -> Key {
    (r.src_addr, r.dst_addr, r.src_port, r.dst_port, r.proto)
}

/// Packets and bytes per flow (one direction each).
fn totals(records: &[FlowRecord]) -> BTreeMap<Key, (u64, u64)> {
    let mut t = BTreeMap::new();
    for r in records {
        let e = t.entry(key(r)).or_insert((0, 0));
        e.0 += r.packets;
        e.1 += r.bytes;
    }
    t
}

/// The flow-mode bucket of a UDP flow (a frame built from its key, hashed
/// as the nodes' socket filters hash it).
fn bucket(k: &Key) -> u8 {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (k.0, k.1) else {
        panic!("IPv4 flows only: {k:?}")
    };
    let mut f = vec![0u8; 14 + 20 + 8];
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14] = 0x45;
    f[23] = k.4;
    f[26..30].copy_from_slice(&s.octets());
    f[30..34].copy_from_slice(&d.octets());
    f[34..36].copy_from_slice(&k.2.to_be_bytes());
    f[36..38].copy_from_slice(&k.3.to_be_bytes());
    bucket_of(&f, ShareMode::Flow)
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The events logged before `end_ns`, in order: up to the first join,
/// assignment or loss at or after it (the teardown's own come after).
fn events_before(report: &Path, end_ns: u64) -> Vec<Value> {
    events(report)
        .into_iter()
        .take_while(|e| {
            ["at_ns", "detected_ns"]
                .iter()
                .find_map(|f| e[*f].as_u64())
                .is_none_or(|t| t < end_ns)
        })
        .collect()
}

fn events(report: &Path) -> Vec<Value> {
    std::fs::read_to_string(report)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits (bounded) until `ok`; the failure names what was awaited.
fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "still waiting for {what}");
        std::thread::sleep(Duration::from_millis(30));
    }
}

const FLOWS: u16 = 48;
const PPS: f64 = 2000.0;
const PACKETS: u64 = 12_000;

fn load() -> gen::Load {
    gen::Load {
        flows: FLOWS,
        frame_bytes: 300,
        pps: PPS,
        packets: PACKETS,
        both_directions: true,
        // Hard stop whatever was sent (about 6 s at the rate).
        limit: Duration::from_secs(15),
    }
}

/// The reference saw every packet sent, without drops; no node captured a
/// frame outside the shares it held or dropped one.
fn check_counts(nodes: &[Collected], reference: &Collected, sent: u64) {
    assert_eq!(
        reference.stats.analysed, sent,
        "the reference saw every packet"
    );
    assert_eq!(
        reference.stats.kernel_drops + reference.stats.consumer_drops,
        0
    );
    for (i, c) in nodes.iter().enumerate() {
        assert_eq!(
            c.stats.outside_share, 0,
            "node {i} captured outside its share"
        );
        assert_eq!(
            c.stats.kernel_drops + c.stats.consumer_drops,
            0,
            "node {i} dropped frames"
        );
    }
}

fn pid_kill(m: &qosloop_testbed::procs::Proc) {
    let pid = m.pid().expect("the coordinator runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

#[test]
fn a_coordinator_killed_and_restarted_mid_traffic_changes_no_filter_and_loses_nothing() {
    need!(experiment_prerequisites());
    let meter = component_dir().unwrap().join("qosloop-meter");
    let (dir, dir2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let link = MirroredLink::build(3).unwrap();
    let (coordinator, report) = start_coordinator(&link, &meter, "flow", dir.path()).unwrap();
    let reference = start_member(
        &link,
        &meter,
        2,
        Role::Plain { threads: 1 },
        1.0,
        0,
        dir.path(),
    )
    .unwrap();
    let mut members: Vec<Member> = (0..2)
        .map(|i| start_member(&link, &meter, i, Role::Node, 1.0, 0, dir.path()).unwrap())
        .collect();
    wait_installed(&mut members, 2, &report).unwrap();
    let before: BTreeMap<String, u64> = events(&report)
        .iter()
        .rev()
        .find(|e| e["event"] == "assigned")
        .and_then(|e| serde_json::from_value(e["masks"].clone()).ok())
        .unwrap();

    let sender = link
        .source
        .spawn_in(|| gen::send(&load(), &AtomicBool::new(false)))
        .unwrap();
    // About 1 s into the traffic: SIGKILL, half a second with no
    // coordinator at all, then a new one (its own report) on the same port.
    std::thread::sleep(Duration::from_millis(1000));
    pid_kill(&coordinator);
    drop(coordinator);
    std::thread::sleep(Duration::from_millis(500));
    let (restarted, report2) = start_coordinator(&link, &meter, "flow", dir2.path()).unwrap();
    // Both nodes come back (their backoff is at most 2 s) with their shares.
    wait_until(
        "both nodes back at the restarted coordinator",
        Duration::from_secs(10),
        || {
            events(&report2)
                .iter()
                .filter(|e| e["event"] == "joined")
                .count()
                >= 2
        },
    );
    let sent = sender.join().unwrap().unwrap().unwrap();
    assert_eq!(sent.packets, PACKETS, "{sent:?}");
    std::thread::sleep(Duration::from_millis(300));
    // The coordinator first: the nodes keep their shares without it, and
    // stopping one node does not move buckets to another.
    let end_ns = now_ns();
    drop(restarted);
    let nodes: Vec<Collected> = members.into_iter().map(|m| collect(m).unwrap()).collect();
    let reference = collect(reference).unwrap();

    check_counts(&nodes, &reference, sent.packets);
    // Exactly once: the shares' sum is what was sent, flow by flow.
    assert_eq!(
        nodes.iter().map(|c| c.stats.analysed).sum::<u64>(),
        sent.packets,
        "captured twice or missed across the restart"
    );
    let all: Vec<FlowRecord> = nodes.iter().flat_map(|c| c.records.clone()).collect();
    assert_eq!(totals(&all), totals(&reference.records));
    assert_eq!(totals(&reference.records).len(), 2 * FLOWS as usize);
    // The filters stayed: each node ended with the share it had before
    // the kill, and it reconnected. (Had a node dropped its filter while
    // no coordinator ran, packets would be missing above; had it widened
    // it, counted twice or outside its share.)
    for (i, c) in nodes.iter().enumerate() {
        let name = format!("n{i}");
        assert_eq!(c.stats.mask, before[&name], "{name}'s share changed");
        assert!(c.stats.reconnects >= 1, "{name} never reconnected");
    }
    assert_eq!(nodes[0].stats.mask | nodes[1].stats.mask, u64::MAX);
    assert_eq!(nodes[0].stats.mask & nodes[1].stats.mask, 0);
    // The restarted coordinator reports no window: nothing was moved,
    // lost or left uncovered.
    let ev2 = events_before(&report2, end_ns);
    for e in &ev2 {
        assert!(
            !["handover", "lost", "uncovered", "covered"]
                .contains(&e["event"].as_str().unwrap_or("")),
            "the restart reported {e}"
        );
    }
}

#[test]
fn a_node_joining_mid_traffic_is_handed_over_make_before_break_inside_the_reported_window() {
    need!(experiment_prerequisites());
    let meter = component_dir().unwrap().join("qosloop-meter");
    let dir = tempfile::tempdir().unwrap();
    let link = MirroredLink::build(4).unwrap();
    let (coordinator, report) = start_coordinator(&link, &meter, "flow", dir.path()).unwrap();
    let reference = start_member(
        &link,
        &meter,
        3,
        Role::Plain { threads: 1 },
        1.0,
        0,
        dir.path(),
    )
    .unwrap();
    let mut members: Vec<Member> = (0..2)
        .map(|i| start_member(&link, &meter, i, Role::Node, 1.0, 0, dir.path()).unwrap())
        .collect();
    wait_installed(&mut members, 2, &report).unwrap();

    let sender = link
        .source
        .spawn_in(|| gen::send(&load(), &AtomicBool::new(false)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // (The setup's own handover, n1 joining n0, came before this.)
    let join_ns = now_ns();
    members.push(start_member(&link, &meter, 2, Role::Node, 1.0, 0, dir.path()).unwrap());
    let join_handovers = |ev: &[Value]| -> Vec<Value> {
        ev.iter()
            .filter(|e| {
                e["event"] == "handover"
                    && e["duplicate_from_ns"]
                        .as_u64()
                        .is_some_and(|t| t >= join_ns)
            })
            .cloned()
            .collect()
    };
    wait_until("the handover to n2", Duration::from_secs(10), || {
        !join_handovers(&events(&report)).is_empty()
    });
    let sent = sender.join().unwrap().unwrap().unwrap();
    assert_eq!(sent.packets, PACKETS, "{sent:?}");
    std::thread::sleep(Duration::from_millis(300));
    let end_ns = now_ns();
    drop(coordinator);
    let nodes: Vec<Collected> = members.into_iter().map(|m| collect(m).unwrap()).collect();
    let reference = collect(reference).unwrap();
    check_counts(&nodes, &reference, sent.packets);

    let ev = events_before(&report, end_ns);
    let handovers = join_handovers(&ev);
    assert_eq!(handovers.len(), 1, "one join, one handover: {handovers:?}");
    let h = &handovers[0];
    let (from, to) = (
        h["duplicate_from_ns"].as_u64().unwrap(),
        h["duplicate_to_ns"].as_u64().unwrap(),
    );
    assert!(to >= from, "{h}");
    assert!(h["moved"].as_u64().unwrap() > 0, "{h}");
    assert!(
        !ev.iter()
            .any(|e| e["event"] == "lost" || e["event"] == "uncovered"),
        "a join left something uncovered: {ev:?}"
    );
    // n2 took buckets from the others only: the three final shares
    // partition the buckets, and what n0 and n1 gave up is n2's.
    let masks: Vec<u64> = nodes.iter().map(|c| c.stats.mask).collect();
    assert_eq!(masks[0] | masks[1] | masks[2], u64::MAX);
    assert_eq!(
        masks[0] & masks[1] | masks[0] & masks[2] | masks[1] & masks[2],
        0
    );
    assert_eq!(nodes[2].stats.held, masks[2], "n2 held only its share");
    // (n0 held every bucket before n1 joined in the setup.)
    let moved = (nodes[0].stats.held | nodes[1].stats.held) & masks[2];
    assert_eq!(u64::from(moved.count_ones()), h["moved"].as_u64().unwrap());

    // Flow by flow against the reference: nothing short anywhere; a flow
    // of a bucket that did not move exactly once; a flow counted by two
    // nodes is one of a moved bucket, the two captures overlapping only
    // inside the reported window.
    let reference_t = totals(&reference.records);
    assert_eq!(reference_t.len(), 2 * FLOWS as usize);
    let per_node: Vec<BTreeMap<Key, (u64, u64)>> =
        nodes.iter().map(|c| totals(&c.records)).collect();
    let first_last = |i: usize, k: &Key| {
        nodes[i]
            .records
            .iter()
            .filter(|r| key(r) == *k)
            .fold((u64::MAX, 0), |(a, b), r| {
                (a.min(r.start_ns), b.max(r.end_ns))
            })
    };
    // A packet timestamped between a filter's attach and the node reading
    // its clock for `installed_ns` sits up to this much outside the window.
    let slack = 20_000_000u64;
    let mut duplicates = 0u64;
    for (k, &(packets, _)) in &reference_t {
        let on: Vec<usize> = (0..3).filter(|&i| per_node[i].contains_key(k)).collect();
        let got: u64 = on.iter().map(|&i| per_node[i][k].0).sum();
        assert!(got >= packets, "flow {k:?}: {got} of {packets} packets");
        let b = bucket(k);
        if moved >> b & 1 == 0 {
            assert_eq!(
                (on.len(), got),
                (1, packets),
                "flow {k:?} (bucket {b} stayed)"
            );
            continue;
        }
        if on.len() == 2 {
            assert!(on.contains(&2), "flow {k:?} of moved bucket {b} on {on:?}");
            let loser = on[0];
            let (gained_first, _) = first_last(2, k);
            let (_, lost_last) = first_last(loser, k);
            if gained_first <= lost_last {
                assert!(
                    gained_first + slack >= from && lost_last <= to + slack,
                    "flow {k:?}: both nodes from {gained_first} to {lost_last}, outside the window {from}..{to}"
                );
            }
        }
        duplicates += got - packets;
    }
    let captured: u64 = nodes.iter().map(|c| c.stats.analysed).sum();
    assert_eq!(
        captured - duplicates,
        sent.packets,
        "the union less the handover's duplicates is what was sent"
    );
    eprintln!(
        "join: {} buckets moved, duplicate window {:.1} ms, {duplicates} packets captured twice of {}",
        h["moved"],
        h["duplicate_ms"].as_f64().unwrap_or(f64::NAN),
        sent.packets
    );
}
