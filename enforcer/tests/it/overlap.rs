//! Overlapping decisions in the real kernel (issue 12 §2), in namespaces
//! the test creates (and removes, also on failure): a subscriber's prefix
//! decision and, inside it, a per-flow decision are both fallback rules,
//! the per-flow one first, so the flow's packets reach its own decision
//! and the rest of the subscriber's traffic the prefix's; once the
//! per-flow decision is removed, the prefix (back in its map) takes all.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::scale_support as support;

use qosloop_schema::{FlowSpec, Kbps, OutOfProfileAction};
use qosloop_testkit::traffic::{self, FlowGen, Schedule};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::*;

const FLOW_PORT: u16 = 5001;
const OTHER_PORT: u16 = 5002;
/// Packet lengths of the two flows: the counters' bytes tell them apart.
const FLOW_LEN: u64 = 300;
const OTHER_LEN: u64 = 200;
const AF11: u8 = 10;

/// Packets and bytes counted by the rules of chain `dID`.
fn counted(t: &Topo, id: u64) -> (u64, u64) {
    let out = t
        .router
        .command("nft")
        .args([
            "list",
            "chain",
            "inet",
            &format!("qosloop_{}", t.out_if),
            &format!("d{id}"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut sum = (0, 0);
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        for w in words.windows(5) {
            if w[0] == "counter" && w[1] == "packets" && w[3] == "bytes" {
                sum.0 += w[2].parse::<u64>().unwrap();
                sum.1 += w[4].parse::<u64>().unwrap();
            }
        }
    }
    sum
}

/// 200 packets of the flow to port 5001 and 200 of another to port 5002
/// (both to rx, 10.2.0.2, inside the /24), 100 packets/s each; returns
/// what was sent of each and what rx received of each.
fn two_flows(t: &Topo) -> ((u64, u64), (u64, u64)) {
    let stop = traffic::stop_flag();
    let sink_stop = stop.clone();
    let sink =
        t.rx.spawn_in(move || {
            traffic::sink(
                &[FLOW_PORT, OTHER_PORT],
                &sink_stop,
                Duration::from_secs(15),
            )
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let gen = |id: u16, port: u16, len: u64| {
        let flow = FlowGen {
            id,
            bind: SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 1), 6000 + id),
            dst: SocketAddrV4::new(Ipv4Addr::new(10, 2, 0, 2), port),
            packet_len: len as usize,
            dscp: AF11,
            schedule: Schedule::constant(100.0, Duration::from_secs(2)),
        };
        let gen_stop = traffic::stop_flag();
        t.tx.spawn_in(move || traffic::generate(&flow, &gen_stop))
            .unwrap()
    };
    let a = gen(1, FLOW_PORT, FLOW_LEN);
    let b = gen(2, OTHER_PORT, OTHER_LEN);
    let a = a.join().unwrap().unwrap().unwrap();
    let b = b.join().unwrap().unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let got = sink.join().unwrap().unwrap().unwrap();
    let received = |id: u16| got.flows.get(&id).map_or(0, |f| f.packets);
    assert!(a.packets > 0 && b.packets > 0, "{a:?} {b:?}");
    ((a.packets, b.packets), (received(1), received(2)))
}

fn sub(after: (u64, u64), before: (u64, u64)) -> (u64, u64) {
    (after.0 - before.0, after.1 - before.1)
}

#[test]
fn a_per_flow_decision_inside_a_prefix_takes_its_flow_until_removed() {
    let Some(()) = prerequisites() else { return };
    let t = topo();
    let mut e = start(&t.router, config(&t.out_if, Kbps(10_000)));
    let mut subscriber = decision(1, FlowSpec::default(), 1000, remark(125));
    subscriber.flow.dst = Some("10.2.0.0/24".parse().unwrap());
    let per_flow = decision(
        2,
        udp_flow(Ipv4Addr::new(10, 2, 0, 2), FLOW_PORT),
        1000,
        OutOfProfileAction::Drop,
    );
    t.router
        .run_in(|| e.apply(vec![subscriber, per_flow], Vec::new()))
        .unwrap()
        .unwrap();
    // Both are fallback rules, the per-flow one first; no map is in use.
    let table = listing(&t.router, &t.out_if);
    assert_eq!(fallback_ids(&table), vec![2, 1], "{table}");
    assert!(!table.contains(" map "), "{table}");

    let (before1, before2) = (counted(&t, 1), counted(&t, 2));
    let ((sent_a, sent_b), (got_a, got_b)) = two_flows(&t);
    // Well inside both profiles: everything arrives.
    assert_eq!((got_a, got_b), (sent_a, sent_b));
    let (d1, d2) = (sub(counted(&t, 1), before1), sub(counted(&t, 2), before2));
    // The flow's packets reached decision 2 only, the other flow's 1 only.
    assert_eq!(d2, (sent_a, sent_a * FLOW_LEN), "per-flow decision");
    assert_eq!(d1, (sent_b, sent_b * OTHER_LEN), "prefix decision");

    // The per-flow decision goes: the prefix is a map element again and
    // takes both flows.
    t.router.run_in(|| e.remove(2)).unwrap().unwrap();
    let table = listing(&t.router, &t.out_if);
    assert!(fallback_ids(&table).is_empty(), "{table}");
    assert!(table.contains("10.2.0.0/24 : jump d1"), "{table}");
    let before1 = counted(&t, 1);
    let ((sent_a, sent_b), (got_a, got_b)) = two_flows(&t);
    assert_eq!((got_a, got_b), (sent_a, sent_b));
    assert_eq!(
        sub(counted(&t, 1), before1),
        (sent_a + sent_b, sent_a * FLOW_LEN + sent_b * OTHER_LEN),
        "prefix decision after the removal"
    );
    t.router.run_in(|| e.cleanup()).unwrap().unwrap();
}
