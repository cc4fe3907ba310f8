//! The collector cluster with nodes whose clocks are skewed (issue 14, bad
//! input): three `qosloop-collector --cluster` processes on a real
//! PostgreSQL, one at +30 s and one at -30 s (Debian's libfaketime:
//! `LD_PRELOAD` of `libfaketime.so.1` with `FAKETIME=+30s`, what `faketime
//! -f +30s` sets — but the `faketime` wrapper forks and waits, so SIGKILL
//! would reach the wrapper and not the node), exporters spread over them;
//! the +30 s node is killed with SIGKILL mid-stream and restarted (still
//! skewed).
//! The same properties as the kill/restart test hold, because no node
//! reads its own clock for leases, ownership or windows: every record
//! once, rates plus late bytes equal to the single-node computation within
//! 0.5 % (cluster_support::check_windows), every
//! window once with the EWMA chain unbroken, no bucket with two owners in
//! one epoch; and the skewed nodes did own buckets and write rates.
//!
//! Needs `faketime` (Debian package `faketime`): a failure under
//! `CI=true` when missing, a skip saying so elsewhere.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::type_complexity)]

use crate::cluster_support;

use cluster_support::*;
use qosloop_exporter::{Exporter, ExporterConfig};
use qosloop_store::Db;
use qosloop_testbed::harness::{require_binary, Postgres};
use qosloop_testbed::need;
use std::process::Command;
use std::time::Duration;

/// Debian's libfaketime (package `libfaketime`, a dependency of
/// `faketime`).
fn libfaketime() -> Result<String, String> {
    require_binary("faketime", "faketime")?;
    std::fs::read_dir("/usr/lib")
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|d| d.path().join("faketime/libfaketime.so.1"))
        .chain([std::path::PathBuf::from(
            "/usr/lib/faketime/libfaketime.so.1",
        )])
        .find(|p| p.is_file())
        .map(|p| p.to_string_lossy().into_owned())
        .ok_or_else(|| "libfaketime.so.1 not found: install the Debian package faketime".into())
}

/// The offset a program run with libfaketime and `FAKETIME=offset` sees,
/// seconds.
fn seen_offset(lib: &str, offset: &str) -> i64 {
    let out = Command::new("date")
        .arg("+%s")
        .env("LD_PRELOAD", lib)
        .env("FAKETIME", offset)
        .output()
        .unwrap();
    let theirs: i64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    theirs - (now_ns() / 1_000_000_000) as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_at_plus_and_minus_30s_keep_every_property() {
    need!(Postgres::available());
    let lib = need!(libfaketime());
    // The library does shift the clock of what it runs under.
    let (ahead, behind) = (seen_offset(&lib, "+30s"), seen_offset(&lib, "-30s"));
    assert!((28..=32).contains(&ahead), "FAKETIME=+30s shows {ahead} s");
    assert!(
        (-32..=-28).contains(&behind),
        "FAKETIME=-30s shows {behind} s"
    );

    let pg = start_postgres().await;
    let url = pg.url();
    let db = Db::connect(&url).await.unwrap();
    db.migrate().await.unwrap();
    let policy = policy();
    db.publish_policy(&serde_json::to_string(&policy).unwrap())
        .await
        .unwrap();
    let mut nodes = vec![
        Node::start("n1", &url, &[]),
        Node::start_with_env(
            "n2",
            &url,
            &[],
            &[("LD_PRELOAD", &lib), ("FAKETIME", "+30s")],
        ),
        Node::start_with_env(
            "n3",
            &url,
            &[],
            &[("LD_PRELOAD", &lib), ("FAKETIME", "-30s")],
        ),
    ];
    // (Each node started once it followed the published policy.)

    let mut exporters = Vec::new();
    for k in 0..SUBJECTS {
        let mut order: Vec<String> = nodes.iter().map(Node::addr).collect();
        order.rotate_left(usize::from(k) % 3);
        let mut cfg = ExporterConfig::new(order);
        cfg.name = format!("meter{k}");
        cfg.batch_records = 5;
        cfg.finish_timeout = Duration::from_secs(30);
        exporters.push(Exporter::start(cfg).unwrap());
    }
    let mut sent = (0u64, 0u64);
    let first_record_ns = now_ns();
    run(&mut exporters, Duration::from_secs(3), &mut sent).await;
    nodes[1].kill9();
    run(&mut exporters, Duration::from_secs(2), &mut sent).await;
    nodes[1].restart();
    run(&mut exporters, Duration::from_secs(3), &mut sent).await;
    let last_record_ns = now_ns();
    for ex in exporters {
        let report = ex.finish().await.unwrap();
        assert!(report.complete(), "{report:?}");
    }

    let Checked { by_subject, epochs } =
        check_all(&db, &policy, sent, first_record_ns, last_record_ns, 3).await;
    // The skewed nodes took part: they owned buckets and wrote rates.
    for skewed in ["n2", "n3"] {
        let wrote = by_subject
            .values()
            .flatten()
            .filter(|r| r.3 == skewed)
            .count();
        eprintln!(
            "FIGURE skew: {skewed} wrote {wrote} rate rows; {} epochs",
            epochs.len()
        );
        assert!(wrote > 0, "{skewed} wrote no rate row");
    }
    drop(nodes);
    db.close().await;
}
