//! The reference experiment end to end, with the component binaries of this
//! workspace (`cargo build` builds them; `cargo nextest run --workspace` too).

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
/// keeps its contract ([`Summary::contract_violations`]): each change of
/// band brings the prescribed decision, in-profile output within its token
/// bucket in kernel time, out-of-profile output as each decision says. The
/// paper's per-second bands and reaction times are in `report.md`.
///
/// [`Summary::contract_violations`]: qosloop_testbed::paper::Summary::contract_violations
#[test]
fn the_paper_experiment_keeps_the_loops_contract() {
    need!(experiment_prerequisites());
    let (out, s, report) = quick_run(None);
    assert_eq!(s.in_profile.windows.len(), 2, "{report}");
    let breaches = s.contract_violations();
    assert!(breaches.is_empty(), "{breaches:#?}\n{report}");
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
/// compute (it reads no flow record) and the loop keeps the same contract.
#[test]
fn the_paper_experiment_on_a_two_node_cluster_keeps_the_loops_contract() {
    need!(experiment_prerequisites());
    need!(qosloop_testbed::harness::Postgres::available());
    let (out, s, report) = quick_run(Some(2));
    let breaches = s.contract_violations();
    assert!(breaches.is_empty(), "{breaches:#?}\n{report}");
    for node in ["collector1", "collector2"] {
        // A missing log fails: the names are the ones paper gives nodes.
        let log =
            std::fs::read_to_string(out.path().join("logs").join(format!("{node}.log"))).unwrap();
        assert!(!log.contains("refuses"), "{node}: {log}");
    }
}
