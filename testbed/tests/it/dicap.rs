//! DiCAP against the real kernel: nodes in namespaces behind a `tc`
//! mirror split the traffic with their socket filters. The union of their
//! records is compared with a plain meter on another mirror port of the
//! same link (it sees everything), flow by flow, packets and bytes exact.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_meter::dicap::merge;
use qosloop_schema::FlowRecord;
use qosloop_testbed::dicap::cluster::{
    collect, start_coordinator, start_member, wait_installed, Collected, Role,
};
use qosloop_testbed::dicap::{gen, net::MirroredLink, DicapArgs};
use qosloop_testbed::need;
use qosloop_testbed::procs::{component_dir, experiment_prerequisites};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

type Key = (IpAddr, IpAddr, u16, u16, u8);

fn key(r: &FlowRecord) -> Key {
    (r.src_addr, r.dst_addr, r.src_port, r.dst_port, r.proto)
}

fn totals(records: &[FlowRecord]) -> BTreeMap<Key, (u64, u64)> {
    let mut t = BTreeMap::new();
    for r in records {
        let e = t.entry(key(r)).or_insert((0, 0));
        e.0 += r.packets;
        e.1 += r.bytes;
    }
    t
}

fn canonical(k: &Key) -> Key {
    if (k.0, k.2) <= (k.1, k.3) {
        *k
    } else {
        (k.1, k.0, k.3, k.2, k.4)
    }
}

/// Runs `nodes` DiCAP nodes in `mode` plus a reference meter; returns the
/// nodes' and the reference's results and the coordinator's events. With
/// `starve`, node 0's namespace allows too little socket memory for a
/// share filter (its install fails in the kernel).
fn split_run(
    nodes: usize,
    mode: &str,
    starve: bool,
) -> (Vec<Collected>, Collected, Vec<serde_json::Value>) {
    let meter = component_dir().unwrap().join("qosloop-meter");
    let dir = tempfile::tempdir().unwrap();
    let link = MirroredLink::build(nodes + 1).unwrap();
    if starve {
        // Room for the initial reject-all program, not for a second one
        // while it is swapped.
        link.nodes[0]
            .ns
            .sysctl("net.core.optmem_max", "4000")
            .unwrap();
    }
    let (coordinator, report) = start_coordinator(&link, &meter, mode, dir.path()).unwrap();
    let reference = start_member(
        &link,
        &meter,
        nodes,
        Role::Plain { threads: 1 },
        1.0,
        0,
        dir.path(),
    )
    .unwrap();
    let mut members: Vec<_> = (0..nodes)
        .map(|i| start_member(&link, &meter, i, Role::Node, 1.0, 0, dir.path()).unwrap())
        .collect();
    let healthy = if starve { nodes - 1 } else { nodes };
    if starve {
        // The starved node never logs an install: wait for the others.
        let mut rest = members.split_off(1);
        wait_installed(&mut rest, healthy, &report).unwrap();
        members.extend(rest);
    } else {
        wait_installed(&mut members, nodes, &report).unwrap();
    }
    let load = gen::Load {
        flows: 48,
        frame_bytes: 300,
        pps: 4000.0,
        packets: 4000,
        both_directions: true,
        limit: Duration::from_secs(5),
    };
    let sent = link
        .source
        .run_in(move || gen::send(&load, &AtomicBool::new(false)))
        .unwrap()
        .unwrap();
    assert_eq!(sent.packets, 4000, "{sent:?}");
    std::thread::sleep(Duration::from_millis(300));
    let got: Vec<Collected> = members.into_iter().map(|m| collect(m).unwrap()).collect();
    let reference = collect(reference).unwrap();
    drop(coordinator);
    let events = std::fs::read_to_string(&report)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (got, reference, events)
}

fn assert_union_exact(got: &[Collected], reference: &Collected) {
    assert_eq!(
        reference.stats.analysed, 4000,
        "the reference saw every packet"
    );
    assert_eq!(
        reference.stats.kernel_drops + reference.stats.consumer_drops,
        0
    );
    for c in got {
        assert_eq!(
            c.stats.outside_share, 0,
            "a node captured outside its share"
        );
        assert_eq!(c.stats.kernel_drops + c.stats.consumer_drops, 0);
    }
    assert_eq!(got.iter().map(|c| c.stats.analysed).sum::<u64>(), 4000);
    let all: Vec<FlowRecord> = got.iter().flat_map(|c| c.records.clone()).collect();
    let merged = merge(&all, 0);
    assert_eq!(totals(&merged), totals(&reference.records));
    assert_eq!(totals(&reference.records).len(), 96);
}

#[test]
fn flow_shares_split_exactly_and_keep_both_directions_together() {
    need!(experiment_prerequisites());
    for nodes in [2, 4] {
        let (got, reference, _) = split_run(nodes, "flow", false);
        assert_union_exact(&got, &reference);
        // No flow (either direction) on two nodes.
        let mut home: BTreeMap<Key, usize> = BTreeMap::new();
        for (i, c) in got.iter().enumerate() {
            assert!(c.stats.analysed > 0, "{nodes} nodes: node {i} got nothing");
            for r in &c.records {
                let prev = home.insert(canonical(&key(r)), i);
                assert!(
                    prev.is_none_or(|p| p == i),
                    "{nodes} nodes: flow {:?} on nodes {prev:?} and {i}",
                    key(r)
                );
            }
        }
        assert_eq!(home.len(), 48, "48 bidirectional flows");
    }
}

#[test]
fn packet_shares_split_flows_and_merge_to_exact_totals() {
    need!(experiment_prerequisites());
    for nodes in [2, 4] {
        let (got, reference, _) = split_run(nodes, "packet", false);
        assert_union_exact(&got, &reference);
        // Per-packet shares do split flows over nodes.
        let split = totals(&reference.records)
            .keys()
            .filter(|k| {
                got.iter()
                    .filter(|c| c.records.iter().any(|r| key(r) == **k))
                    .count()
                    > 1
            })
            .count();
        assert!(split > 0, "{nodes} nodes: no flow was split");
    }
}

#[test]
fn a_node_whose_filter_install_fails_hands_its_share_to_the_others() {
    need!(experiment_prerequisites());
    let (got, reference, events) = split_run(3, "flow", true);
    let failed = events
        .iter()
        .find(|e| e["event"] == "install_failed")
        .expect("install_failed event");
    assert_eq!(failed["node"], "n0");
    let why = failed["error"].as_str().unwrap();
    assert!(
        why.contains("SO_ATTACH_FILTER") && why.contains("optmem_max"),
        "{why}"
    );
    assert_eq!(got[0].stats.analysed, 0, "the failed node captured nothing");
    assert_eq!(got[0].stats.mask, 0);
    assert_union_exact(&got, &reference);
}

/// The experiment in its quick form: every packet accounted for, nothing
/// counted twice, and the killed node's share reassigned within 2 s.
#[test]
fn quick_dicap_experiment_accounts_for_every_packet() {
    need!(experiment_prerequisites());
    let out = tempfile::tempdir().unwrap();
    let args = DicapArgs {
        out: out.path().to_path_buf(),
        quick: true,
    };
    let s = qosloop_testbed::dicap::run(&args, Arc::new(AtomicBool::new(false))).unwrap();
    assert!(
        s.runs.iter().any(|r| r.mode == "packet")
            && s.runs.iter().any(|r| r.mode == "fanout-baseline")
    );
    for r in &s.runs {
        assert!(r.sent > 0, "{r:?}");
        assert_eq!(r.unaccounted, 0, "{r:?}");
        assert_eq!(r.duplicates, 0, "{r:?}");
        assert!(r.path_drops >= 0, "{r:?}");
        let once = (r.captured_fraction * r.sent as f64).round() as i64;
        assert_eq!(
            once + r.kernel_drops as i64 + r.consumer_drops as i64 + r.path_drops,
            r.sent as i64,
            "{r:?}"
        );
        assert_eq!(r.captured_per_node.len(), r.nodes);
    }
    let l = &s.node_loss;
    assert!(
        l.detected_after_ms < 2000.0 && l.reassigned_after_ms < 2000.0,
        "{l:?}"
    );
    assert!(l.uncovered_ms > 0.0, "{l:?}");
    assert_eq!(l.duplicates, 0);
    for f in [
        "summary.json",
        "report-dicap.md",
        "fig6-dicap.svg",
        "fig6-dicap.png",
    ] {
        assert!(out.path().join(f).is_file(), "{f} missing");
    }
}
