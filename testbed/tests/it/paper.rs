//! The reference experiment end to end, with the component binaries of this
//! workspace (`cargo test --workspace` builds them all).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_testbed::need;
use qosloop_testbed::procs::experiment_prerequisites;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// `paper --quick` (with `--cluster N` when given): its output directory,
/// summary and report.
fn quick_run(cluster: Option<u16>) -> (tempfile::TempDir, qosloop_testbed::paper::Summary, String) {
    let out = tempfile::tempdir().unwrap();
    let args = qosloop_testbed::paper::PaperArgs {
        out: out.path().to_path_buf(),
        quick: true,
        postgres: false,
        ldap: false,
        topology: None,
        phase_s: None,
        seed: 4,
        fast: false,
        cluster,
    };
    let s = qosloop_testbed::paper::run(&args, Arc::new(AtomicBool::new(false))).unwrap();
    let report = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    (out, s, report)
}

/// `qosloop-testbed paper --quick`: the whole loop, every component real,
/// reaches the paper's bands.
#[test]
fn the_paper_experiment_reaches_its_bands() {
    need!(experiment_prerequisites());
    let (out, s, report) = quick_run(None);
    for p in &s.phases {
        assert!(
            p.load_in_band,
            "{} phase: link load {:?} outside its band\n{report}",
            p.phase, p.mean_link_load_kbps
        );
        assert!(
            p.output_ok,
            "{} phase: {:.0} kbit/s out of profile, target {:.0}\n{report}",
            p.phase, p.mean_out_kbps, p.target_out_kbps
        );
    }
    for (i, r) in s.reaction_s.iter().enumerate() {
        assert!(
            r.is_some_and(|r| r <= 3.0),
            "change {}: decision after {r:?} s\n{report}",
            i + 1
        );
    }
    // Issue 12: in-profile output within its token bucket in every window,
    // and no refilled bucket at a decision change.
    assert_eq!(s.in_profile.windows.len(), 2, "{report}");
    assert!(s.in_profile.packets > 0, "no in-profile packets\n{report}");
    let misses = s.in_profile.misses(s.epoch_ns.max(0) as u64);
    assert!(misses.is_empty(), "{misses:?}\n{report}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("summary.json")).unwrap())
            .unwrap();
    for key in [
        "t_s",
        "phase",
        "offered_kbps",
        "link_load_kbps",
        "policed_out_kbps",
        "decision",
    ] {
        assert!(
            json["series"][0].get(key).is_some(),
            "summary.json series lacks {key}"
        );
    }
    assert!(json["reconfig_us"]["median"].is_number());
    for f in [
        "fig9-link-load.svg",
        "fig9-link-load.png",
        "fig10-output.svg",
        "fig10-output.png",
    ] {
        assert!(out.path().join(f).is_file(), "{f} missing");
    }
}

/// `qosloop-testbed paper --quick --cluster 2`: two collector nodes on
/// PostgreSQL; the policy server decides from the rates their owners
/// compute (it reads no flow record) and the run still reaches the bands.
#[test]
fn the_paper_experiment_on_a_two_node_cluster_reaches_its_bands() {
    need!(experiment_prerequisites());
    need!(qosloop_testbed::harness::Postgres::available());
    let (out, s, report) = quick_run(Some(2));
    for p in &s.phases {
        assert!(
            p.load_in_band && p.output_ok,
            "{} phase: link load {:?}, {:.0} kbit/s out of profile (target {:.0})\n{report}",
            p.phase,
            p.mean_link_load_kbps,
            p.mean_out_kbps,
            p.target_out_kbps
        );
    }
    for (i, r) in s.reaction_s.iter().enumerate() {
        assert!(
            r.is_some(),
            "change {}: the decision never changed\n{report}",
            i + 1
        );
    }
    for node in ["collector1", "collector2"] {
        // A missing log fails: the names are the ones paper gives nodes.
        let log =
            std::fs::read_to_string(out.path().join("logs").join(format!("{node}.log"))).unwrap();
        assert!(!log.contains("refuses"), "{node}: {log}");
    }
}
