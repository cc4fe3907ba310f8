//! The experiments end to end, with the component binaries of this
//! workspace (`cargo test --workspace` builds them all).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_testbed::harness::{require_binary, require_root};
use qosloop_testbed::need;
use qosloop_testbed::procs::component_dir;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

fn prerequisites() -> Result<(), String> {
    require_root("creates network namespaces")?;
    require_binary("tc", "iproute2")?;
    require_binary("nft", "nftables")?;
    require_binary("rsvg-convert", "librsvg2-bin")?;
    component_dir().map(|_| ()).map_err(|e| e.to_string())
}

#[test]
fn the_enforced_router_is_loss_free_to_95_percent_of_the_link() {
    need!(prerequisites());
    let out = tempfile::tempdir().unwrap();
    let args = qosloop_testbed::loss::LossArgs {
        out: out.path().to_path_buf(),
        quick: true,
    };
    let s = qosloop_testbed::loss::run(&args, Arc::new(AtomicBool::new(false))).unwrap();
    for step in &s.steps {
        assert_eq!(
            step.lost_packets, 0,
            "loss at {} Mbit/s: {step:?}",
            step.offered_mbps
        );
        assert!(step.received_mbps > step.offered_mbps * 0.97, "{step:?}");
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
