//! Topologies built for real: namespaces, veth links, TBF link emulation,
//! routes — and real traffic through them.
//!
//! Asserted is what the topology promises, not the host's speed: nothing
//! sent is lost below the link rate; through the emulated 10 Mbit/s link
//! at most `10 Mbit/s × T + the TBF's burst` arrives in every window of
//! `T` (kernel receive time), the TBF shows it held traffic back, and
//! every datagram the sender got onto the link arrives. Rates per second
//! are printed for humans.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_testbed::harness::{require_binary, require_root};
use qosloop_testbed::need;
use qosloop_testbed::topology::{Side, Testbed, Topology};
use qosloop_testbed::traffic::{
    bound_misses, generate, sink_timestamped, stop_flag, FlowGen, FlowReceived, GenReport,
    Schedule, StopWhen, BOUND_WINDOWS,
};
use qosloop_testkit::inprofile::{wall_ns, ProfileStep};
use std::time::Duration;

/// How long the sink waits at most beyond the traffic for what must
/// arrive: a bound for a broken run, which a slow one does not reach.
const DEADLINE: Duration = Duration::from_secs(60);
/// The emulated rate of the paper's links, and the TBF's bucket as the
/// testbed sizes it (10 ms of the rate, at least four frames).
const LINK_BYTES_PER_S: u64 = 10_000_000 / 8;
const TBF_BURST: u64 = 12_500;

fn prerequisites() -> Result<(), String> {
    require_root("creates network namespaces")?;
    require_binary("ip", "iproute2")?;
    require_binary("tc", "iproute2")?;
    Ok(())
}

/// Sends one flow tx → rx through the router at `pps` for `secs`; returns
/// what the generator sent and, once every datagram it sent has arrived
/// (or [`DEADLINE`] passed), what arrived, with kernel receive times.
fn run_flow(tb: &Testbed, pps: f64, len: usize, secs: u64) -> (GenReport, FlowReceived) {
    let until = StopWhen::new();
    let sink_until = until.clone();
    let limit = Duration::from_secs(secs) + DEADLINE;
    let rx = tb
        .ns("rx")
        .unwrap()
        .spawn_in(move || sink_timestamped(&[4055], &sink_until, limit))
        .unwrap();
    assert!(until.wait_ready(DEADLINE), "the sink did not start");
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
    let want = sent.packets;
    until.set(move |r| r.flows.get(&1).is_some_and(|f| f.packets >= want));
    let got = rx.join().unwrap().unwrap().unwrap();
    let f = got.flows.get(&1).cloned().unwrap_or_default();
    // Received kbit/s over the whole seconds (first and last left out).
    let steady: Vec<f64> = f
        .seconds
        .iter()
        .filter(|(s, _)| **s >= 1 && **s < secs)
        .map(|(_, v)| v.kbps())
        .collect();
    eprintln!(
        "{pps:.0} packets/s of {len} B for {secs} s: sent {} ({} refused, {} skipped behind \
         schedule), received {}; {:.0} kbit/s over the whole seconds",
        sent.packets,
        sent.send_errors,
        sent.skipped,
        f.packets,
        steady.iter().sum::<f64>() / steady.len().max(1) as f64
    );
    (sent, f)
}

/// What the TBF on tx's side of the link held back: (overlimits, drops),
/// from `tc -s qdisc show`.
fn tbf_held_back(tb: &Testbed) -> (u64, u64) {
    let dev = tb.interface("tx-r", Side::A).unwrap();
    let out = tb
        .ns("tx")
        .unwrap()
        .command("tc")
        .args(["-s", "qdisc", "show", "dev", dev])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let number_after = |key: &str| -> u64 {
        text.split(key)
            .nth(1)
            .and_then(|rest| {
                rest.trim_start()
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
            })
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {key:?} in\n{text}"))
    };
    assert!(text.contains("qdisc tbf"), "{text}");
    eprintln!("{text}");
    (number_after("overlimits"), number_after("dropped"))
}

#[test]
fn the_paper_topology_forwards_shapes_and_is_removed() {
    need!(prerequisites());
    let names: Vec<String>;
    {
        let tb = Topology::paper().build().unwrap();
        names = tb.namespaces().map(|(_, ns)| ns.to_owned()).collect();
        assert_eq!(names.len(), 4);

        // 2 Mbit/s of 256-byte packets passes the 10 Mbit/s links: every
        // datagram sent arrives.
        let (sent, got) = run_flow(&tb, 2_000_000.0 / 8.0 / 256.0, 256, 3);
        assert!(sent.packets > 0, "{sent:?}");
        assert_eq!(
            got.packets, sent.packets,
            "no loss well below the link rate: sent {}, received {}",
            sent.packets, got.packets
        );

        // 15 Mbit/s of 1024-byte packets is cut to the emulated 10 Mbit/s.
        // (A local sender is partly held back by the full qdisc, partly
        // refused with ENOBUFS: those it was refused are not sent.) In
        // every window of T at most 10 Mbit/s × T plus the TBF's bucket
        // arrives (TBF counts frames, the sink IP bytes: loose by 14 B a
        // packet), one packet for where the window's edge falls; the TBF
        // held traffic back; what got onto the link arrives.
        let start_ns = wall_ns();
        let (sent, got) = run_flow(&tb, 15_000_000.0 / 8.0 / 1024.0, 1024, 3);
        assert!(got.packets > 0, "nothing arrived through the shaped link");
        assert_eq!(
            got.packets, sent.packets,
            "sent {} (and {} refused), received {}",
            sent.packets, sent.send_errors, got.packets
        );
        let link = [ProfileStep {
            from_ns: start_ns,
            rate_bytes_per_s: LINK_BYTES_PER_S as f64,
            bucket_bytes: TBF_BURST as f64,
        }];
        let misses = bound_misses(
            "through the 10 Mbit/s link",
            &got.all_arrivals(),
            &link,
            &BOUND_WINDOWS,
            1024.0,
        );
        assert!(misses.is_empty(), "{}", misses.join("\n"));
        let (overlimits, drops) = tbf_held_back(&tb);
        assert!(
            overlimits + drops > 0,
            "the TBF never held a packet back at 15 Mbit/s offered"
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
