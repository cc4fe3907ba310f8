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
//! A node the machine starves past the coordinator's heartbeat timeout is
//! reported lost and its buckets move although it still captures: a
//! duplicate no window names. When that happens (the report says "no
//! heartbeat"), a run still checks what holds — nothing missed, every
//! bucket whose owner never changed captured exactly once — and says which
//! checks of the membership change it could not make.
//!
//! Every sending loop is bounded in count and time; the namespaces, cgroups
//! and processes go when the link and members are dropped, also on failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::dicap::{events, start_watched, wait_read, wait_settled, DEADLINE};
use qosloop_meter::dicap::{bucket_of, ShareMode};
use qosloop_schema::FlowRecord;
use qosloop_testbed::dicap::cluster::{collect, start_coordinator, Collected, Member, Role};
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

/// The nodes the coordinator lost for want of a heartbeat (a starved
/// process, not a change the test made).
fn starved(ev: &[Value]) -> Vec<String> {
    ev.iter()
        .filter(|e| {
            e["event"] == "lost"
                && e["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("no heartbeat"))
        })
        .filter_map(|e| e["node"].as_str().map(str::to_owned))
        .collect()
}

/// The buckets whose owner changed in an assignment logged at or after
/// `since_ns` (`ev` in order, over one or more coordinators' reports).
fn moved_since(ev: &[Value], since_ns: u64) -> u64 {
    let mut owner: Vec<Option<String>> = vec![None; 64];
    let mut moved = 0u64;
    for e in ev.iter().filter(|e| e["event"] == "assigned") {
        let masks: BTreeMap<String, u64> =
            serde_json::from_value(e["masks"].clone()).unwrap_or_default();
        let counts = e["at_ns"].as_u64().is_some_and(|t| t >= since_ns);
        for (b, o) in owner.iter_mut().enumerate() {
            // A bucket nobody is given (a node missing for now) keeps its
            // last owner until someone else is given it.
            let Some(now) = masks.iter().find(|(_, m)| *m >> b & 1 == 1).map(|(n, _)| n) else {
                continue;
            };
            if counts && o.as_ref().is_some_and(|p| p != now) {
                moved |= 1 << b;
            }
            *o = Some(now.clone());
        }
    }
    moved
}

/// Nothing missed, and a flow of a bucket outside `moved` on one node,
/// exactly once: the nodes' records against the reference, flow by flow.
/// Returns the packets captured twice (all of moved buckets).
fn check_union(nodes: &[Collected], reference: &Collected, moved: u64) -> u64 {
    let all: Vec<FlowRecord> = nodes.iter().flat_map(|c| c.records.clone()).collect();
    let got = totals(&all);
    let per_node: Vec<BTreeMap<Key, (u64, u64)>> =
        nodes.iter().map(|c| totals(&c.records)).collect();
    let mut duplicates = 0;
    for (k, &(packets, _)) in &totals(&reference.records) {
        let n = got.get(k).map_or(0, |t| t.0);
        assert!(n >= packets, "flow {k:?}: {n} of {packets} packets");
        let b = bucket(k);
        if moved >> b & 1 == 0 {
            let on: Vec<usize> = (0..nodes.len())
                .filter(|&i| per_node[i].contains_key(k))
                .collect();
            assert_eq!(
                (on.len(), n),
                (1, packets),
                "flow {k:?} (bucket {b} never moved) on nodes {on:?}"
            );
        }
        duplicates += n - packets;
    }
    assert!(
        got.keys()
            .all(|k| totals(&reference.records).contains_key(k)),
        "a node has a flow the reference does not"
    );
    duplicates
}

/// After the traffic: the reference read every packet sent, and the nodes
/// together at least as many, then nothing more for a while (a node that
/// had not caught up would still be counting) — before they are stopped,
/// which discards what is left in their rings.
fn wait_caught_up(link: &MirroredLink, members: &mut [Member], reference: &mut Member, sent: u64) {
    let mut watched: Vec<&mut Member> = members.iter_mut().collect();
    watched.push(reference);
    wait_read(link, &mut watched, "every packet read", |read| {
        let (nodes, reference) = read.split_at(read.len() - 1);
        reference[0] >= sent && nodes.iter().sum::<u64>() >= sent
    });
    let mut last = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut now = Vec::new();
        wait_read(link, &mut watched, "the members' counters", |read| {
            now = read.to_vec();
            true
        });
        if now == last {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the nodes never stopped reading: {now:?}"
        );
        last = now;
        // The counters are published once a second.
        std::thread::sleep(Duration::from_millis(1500));
    }
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
        // About 6 s at the rate; the hard stop only bounds a broken run.
        limit: DEADLINE,
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
    let mut reference = start_watched(&link, &meter, 2, Role::Plain { threads: 1 }, dir.path());
    let mut members: Vec<Member> = (0..2)
        .map(|i| start_watched(&link, &meter, i, Role::Node, dir.path()))
        .collect();
    wait_settled(&mut members, 2, &report);
    let before: BTreeMap<String, u64> = events(&report)
        .iter()
        .rev()
        .find(|e| e["event"] == "assigned")
        .and_then(|e| serde_json::from_value(e["masks"].clone()).ok())
        .unwrap();

    let traffic_ns = now_ns();
    let sender = link
        .source
        .spawn_in(|| gen::send(&load(), &AtomicBool::new(false)))
        .unwrap();
    // A sixth of the traffic in (about 1 s): SIGKILL, half a second with
    // no coordinator at all, then a new one (its own report) on the same
    // port.
    wait_read(
        &link,
        &mut [&mut reference],
        "a sixth of the traffic",
        |read| read[0] >= PACKETS / 6,
    );
    pid_kill(&coordinator);
    drop(coordinator);
    std::thread::sleep(Duration::from_millis(500));
    let (restarted, report2) = start_coordinator(&link, &meter, "flow", dir2.path()).unwrap();
    // Both nodes come back (their backoff is at most 2 s) with their shares.
    wait_until(
        "both nodes back at the restarted coordinator",
        DEADLINE,
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
    wait_caught_up(&link, &mut members, &mut reference, sent.packets);
    // The coordinator first: the nodes keep their shares without it, and
    // stopping one node does not move buckets to another.
    let end_ns = now_ns();
    drop(restarted);
    let nodes: Vec<Collected> = members.into_iter().map(|m| collect(m).unwrap()).collect();
    let reference = collect(reference).unwrap();

    check_counts(&nodes, &reference, sent.packets);
    assert_eq!(totals(&reference.records).len(), 2 * FLOWS as usize);
    let ev1 = events(&report);
    let ev2 = events_before(&report2, end_ns);
    let all_events: Vec<Value> = ev1.iter().chain(&ev2).cloned().collect();
    let starved = starved(&all_events);
    // Nothing missed; a bucket that kept its owner exactly once.
    let duplicates = check_union(&nodes, &reference, moved_since(&all_events, traffic_ns));
    assert_eq!(
        nodes.iter().map(|c| c.stats.analysed).sum::<u64>() - duplicates,
        sent.packets,
        "the union less what moved buckets captured twice is what was sent"
    );
    if !starved.is_empty() {
        eprintln!(
            "{starved:?} starved past the heartbeat timeout and lost: their buckets moved, so \
             this run could not check that the restart changed no filter ({duplicates} packets \
             captured twice)"
        );
        return;
    }
    // Exactly once: the shares' sum is what was sent, flow by flow.
    assert_eq!(duplicates, 0, "captured twice across the restart");
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
    let mut reference = start_watched(&link, &meter, 3, Role::Plain { threads: 1 }, dir.path());
    let mut members: Vec<Member> = (0..2)
        .map(|i| start_watched(&link, &meter, i, Role::Node, dir.path()))
        .collect();
    wait_settled(&mut members, 2, &report);

    let traffic_ns = now_ns();
    let sender = link
        .source
        .spawn_in(|| gen::send(&load(), &AtomicBool::new(false)))
        .unwrap();
    // A quarter of the traffic in (about 1.5 s), n2 joins.
    wait_read(
        &link,
        &mut [&mut reference],
        "a quarter of the traffic",
        |read| read[0] >= PACKETS / 4,
    );
    // (The setup's own handover, n1 joining n0, came before this.)
    let join_ns = now_ns();
    members.push(start_watched(&link, &meter, 2, Role::Node, dir.path()));
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
    wait_until("the handover to n2", DEADLINE, || {
        !join_handovers(&events(&report)).is_empty()
    });
    let sent = sender.join().unwrap().unwrap().unwrap();
    assert_eq!(sent.packets, PACKETS, "{sent:?}");
    wait_caught_up(&link, &mut members, &mut reference, sent.packets);
    let end_ns = now_ns();
    drop(coordinator);
    let nodes: Vec<Collected> = members.into_iter().map(|m| collect(m).unwrap()).collect();
    let reference = collect(reference).unwrap();
    check_counts(&nodes, &reference, sent.packets);
    let reference_t = totals(&reference.records);
    assert_eq!(reference_t.len(), 2 * FLOWS as usize);

    let ev = events_before(&report, end_ns);
    let starved = starved(&ev);
    // Nothing missed anywhere; a bucket that kept its owner (the join's
    // and, if any, a starved node's moved) exactly once.
    let duplicates = check_union(&nodes, &reference, moved_since(&ev, traffic_ns));
    let captured: u64 = nodes.iter().map(|c| c.stats.analysed).sum();
    assert_eq!(
        captured - duplicates,
        sent.packets,
        "the union less the moved buckets' duplicates is what was sent"
    );
    let handovers = join_handovers(&ev);
    assert_eq!(handovers.len(), 1, "one join, one handover: {handovers:?}");
    let h = &handovers[0];
    let (from, to) = (
        h["duplicate_from_ns"].as_u64().unwrap(),
        h["duplicate_to_ns"].as_u64().unwrap(),
    );
    assert!(to >= from, "{h}");
    assert!(h["moved"].as_u64().unwrap() > 0, "{h}");
    if !starved.is_empty() {
        eprintln!(
            "{starved:?} starved past the heartbeat timeout and lost: buckets moved beyond the \
             join, so this run could not check the join's shares and window ({duplicates} \
             packets captured twice)"
        );
        return;
    }
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
    assert_eq!(
        moved_since(&ev, traffic_ns),
        moved,
        "the join moved exactly n2's buckets"
    );

    // A flow counted by two nodes is one of a moved bucket (checked
    // above), the two captures overlapping only while both could hold it:
    // from n2's join (the coordinator read its clock before it sent n2 any
    // share, so before n2 attached a filter) to the last giver's install
    // (read after it attached its smaller filter). No slack: both bounds
    // are clock readings on the right side of the attach.
    let joined = ev
        .iter()
        .filter(|e| e["event"] == "joined" && e["node"] == "n2")
        .find_map(|e| e["at_ns"].as_u64())
        .expect("n2's joined event");
    assert!(joined <= from, "n2 joined at {joined}, installed at {from}");
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
    let mut margins = (u64::MAX, u64::MAX);
    for k in reference_t.keys() {
        let on: Vec<usize> = (0..3).filter(|&i| per_node[i].contains_key(k)).collect();
        if on.len() < 2 {
            continue;
        }
        let b = bucket(k);
        assert_eq!(on.len(), 2, "flow {k:?} of moved bucket {b} on {on:?}");
        assert!(on.contains(&2), "flow {k:?} of moved bucket {b} on {on:?}");
        let loser = on[0];
        let (gained_first, _) = first_last(2, k);
        let (_, lost_last) = first_last(loser, k);
        if gained_first <= lost_last {
            assert!(
                gained_first >= joined && lost_last <= to,
                "flow {k:?}: both nodes from {gained_first} to {lost_last}, outside {joined}..{to}"
            );
            margins = (
                margins.0.min(gained_first - joined),
                margins.1.min(to - lost_last),
            );
        }
    }
    let margin = |m: u64| {
        if m == u64::MAX {
            "-".to_owned()
        } else {
            format!("{} µs", m / 1000)
        }
    };
    eprintln!(
        "join: {} buckets moved, duplicate window {:.1} ms, {duplicates} packets captured twice \
         of {}; captures on both nodes closest to the bounds: {} after the join, {} before the \
         last install",
        h["moved"],
        h["duplicate_ms"].as_f64().unwrap_or(f64::NAN),
        sent.packets,
        margin(margins.0),
        margin(margins.1)
    );
}
