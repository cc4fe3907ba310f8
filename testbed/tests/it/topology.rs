//! Topologies built for real: namespaces, veth links, TBF link emulation,
//! routes — and real traffic through them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_testbed::harness::{require_binary, require_root};
use qosloop_testbed::need;
use qosloop_testbed::topology::Topology;
use qosloop_testbed::traffic::{generate, sink, stop_flag, FlowGen, Schedule};
use std::sync::atomic::Ordering;
use std::time::Duration;

fn prerequisites() -> Result<(), String> {
    require_root("creates network namespaces")?;
    require_binary("ip", "iproute2")?;
    require_binary("tc", "iproute2")?;
    Ok(())
}

/// Sends one flow tx → rx through the router at `pps` for `secs`; returns
/// (received kbit/s over the steady seconds, lost packets).
fn run_flow(
    tb: &qosloop_testbed::topology::Testbed,
    pps: f64,
    len: usize,
    secs: u64,
) -> (f64, u64, u64) {
    let stop = stop_flag();
    let sink_stop = stop.clone();
    let rx = tb
        .ns("rx")
        .unwrap()
        .spawn_in(move || sink(&[4055], &sink_stop, Duration::from_secs(30)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let flow = FlowGen {
        id: 1,
        bind: "10.71.1.2:6055".parse().unwrap(),
        dst: "10.71.2.2:4055".parse().unwrap(),
        packet_len: len,
        dscp: 0,
        schedule: Schedule::constant(pps, Duration::from_secs(secs)),
    };
    let gen_stop = stop_flag();
    let sent = tb
        .ns("tx")
        .unwrap()
        .run_in(move || generate(&flow, &gen_stop))
        .unwrap()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let got = rx.join().unwrap().unwrap().unwrap();
    let f = got.flows.get(&1).cloned().unwrap_or_default();
    // Skip the first and last second (partial), average the rest.
    let steady: Vec<f64> = f
        .seconds
        .iter()
        .filter(|(s, _)| **s >= 1 && **s < secs)
        .map(|(_, v)| v.kbps())
        .collect();
    let kbps = steady.iter().sum::<f64>() / steady.len().max(1) as f64;
    (kbps, sent.packets.saturating_sub(f.packets), sent.packets)
}

#[test]
fn the_paper_topology_forwards_shapes_and_is_removed() {
    need!(prerequisites());
    let names: Vec<String>;
    {
        let tb = Topology::paper().build().unwrap();
        names = tb.namespaces().map(|(_, ns)| ns.to_owned()).collect();
        assert_eq!(names.len(), 4);

        // 2 Mbit/s of 256-byte packets passes the 10 Mbit/s links untouched.
        let (kbps, lost, sent) = run_flow(&tb, 2_000_000.0 / 8.0 / 256.0, 256, 3);
        assert!(sent > 2500, "sent {sent}");
        assert_eq!(lost, 0, "no loss well below the link rate");
        assert!(
            (kbps - 2000.0).abs() < 100.0,
            "received {kbps:.0} kbit/s of 2000"
        );

        // 15 Mbit/s of 1024-byte packets is cut to the emulated 10 Mbit/s.
        // (A local sender is partly held back by the full qdisc, partly
        // refused with ENOBUFS: what counts is what arrives.)
        let (kbps, _, _) = run_flow(&tb, 15_000_000.0 / 8.0 / 1024.0, 1024, 3);
        assert!(
            kbps > 9_000.0 && kbps < 10_300.0,
            "received {kbps:.0} kbit/s through a 10 Mbit/s link"
        );
    }
    let list = String::from_utf8(
        std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for n in &names {
        assert!(!list.contains(n.as_str()), "{n} left behind");
    }
}
