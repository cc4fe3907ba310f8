//! The experiments end to end, with the component binaries of this
//! workspace (`cargo build` builds them; `cargo nextest run --workspace` too).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_testbed::need;
use qosloop_testbed::procs::experiment_prerequisites;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// The paper's Fig. 11, with qosloop's generator and with iperf3 (one
/// after the other: traffic tests share two cores). The contract is that
/// the enforced router loses nothing up to 95% of the link: every packet
/// and byte sent at each step arrives. The Mbit/s each step reached is the
/// figure (`loss.json`, `fig11-loss.svg`), not asserted: a busy host sends
/// below the offered rate.
#[test]
fn the_enforced_router_is_loss_free_to_95_percent_of_the_link() {
    need!(experiment_prerequisites());
    need!(qosloop_testbed::harness::require_binary("iperf3", "iperf3"));
    for iperf3 in [false, true] {
        let out = tempfile::tempdir().unwrap();
        let args = qosloop_testbed::loss::LossArgs {
            out: out.path().to_path_buf(),
            quick: true,
            iperf3,
        };
        let s = qosloop_testbed::loss::run(&args, Arc::new(AtomicBool::new(false))).unwrap();
        for step in &s.steps {
            assert_eq!(
                step.lost_packets, 0,
                "iperf3 {iperf3}: loss at {} Mbit/s: {step:?}",
                step.offered_mbps
            );
            assert!(
                step.sent_packets > 0,
                "iperf3 {iperf3}: nothing sent: {step:?}"
            );
            assert_eq!(
                step.received_bytes, step.sent_bytes,
                "iperf3 {iperf3}: bytes lost at {} Mbit/s: {step:?}",
                step.offered_mbps
            );
        }
        assert!(s.loss_free_up_to_pct >= 95.0);
        for f in [
            "loss.json",
            "fig11-loss.svg",
            "fig11-loss.png",
            "report-loss.md",
        ] {
            assert!(out.path().join(f).is_file(), "{f} missing");
        }
    }
}
