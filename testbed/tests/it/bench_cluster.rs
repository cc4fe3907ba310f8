//! `bench cluster` end to end on a small load: real collector processes,
//! a real PostgreSQL (fsync on and off). The benchmark itself fails unless
//! `flows` holds exactly the records sent and the owners computed every
//! window; here the table it writes is checked too: every stored record is
//! either analysed by the owners or late (committed after its window
//! closed: stored, not in its window's rate), none counted twice. How many
//! were late depends on the machine's speed and is reported, not asserted.
//!
//! The run uses a 5 s lag instead of the benchmark's 30 s (`--lag-ms`,
//! docs/testbed.md), so that the run waits less for its last window.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_testbed::bench::cluster::{run, Args};
use qosloop_testbed::harness::Postgres;
use qosloop_testbed::need;
use qosloop_testbed::procs::component_dir;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_cluster_small_run_writes_its_table() {
    need!(Postgres::available());
    need!(component_dir().map(|_| ()).map_err(|e| e.to_string()));
    let out = tempfile::tempdir().unwrap();
    run(Args {
        records: 20_000,
        quick: false,
        nodes: vec![1, 2],
        batch: 1000,
        out: out.path().to_path_buf(),
        lag_ms: 5000,
    })
    .await
    .unwrap();
    let table = std::fs::read_to_string(out.path().join("cluster.md")).unwrap();
    let rows: Vec<Vec<&str>> = table
        .lines()
        .skip(2)
        .map(|l| l.split('|').map(str::trim).collect())
        .collect();
    assert_eq!(rows.len(), 4, "{table}");
    // The records of each run: split evenly between the nodes' exporters.
    let records: u64 = 20_000;
    for (row, (nodes, fsync)) in
        rows.iter()
            .zip([("1", "on"), ("2", "on"), ("1", "off"), ("2", "off")])
    {
        assert_eq!((row[1], row[2]), (nodes, fsync), "{table}");
        let n: u64 = nodes.parse().unwrap();
        // Stored: what was sent (the benchmark fails otherwise).
        let stored = records / n * n;
        // Columns: committed and analysed records/s (over the same time),
        // late records, owners' delay, records moved, partial-sum rows
        // across nodes, CPU per record of each node, PostgreSQL's.
        let committed: f64 = row[3].parse().unwrap();
        let analysed: f64 = row[4].parse().unwrap();
        let late: u64 = row[5].parse().unwrap();
        assert!(committed > 0.0, "{table}");
        // Nothing counted twice, nothing lost: every stored record is
        // analysed or late. The rates share their time, so the analysed
        // count is the stored one scaled by their ratio; both are rounded
        // to whole records/s, which moves it by at most stored/committed.
        assert!(late <= stored, "more late records than stored: {table}");
        assert!(
            analysed <= committed + 1.0,
            "analysed more than stored: {table}"
        );
        let analysed_records = stored as f64 * analysed / committed;
        assert!(
            (analysed_records + late as f64 - stored as f64).abs()
                <= 1.0 + stored as f64 / committed,
            "{analysed_records:.1} analysed + {late} late is not the {stored} stored: {table}"
        );
        // An owner that counts nothing would leave every record late.
        assert!(late < stored, "no record analysed: {table}");
        eprintln!(
            "FIGURE bench cluster {nodes} nodes, fsync {fsync}: {late} of {stored} records late"
        );
        let _delay: f64 = row[6].parse().unwrap();
        assert_eq!(row[9].split(" / ").count(), nodes.parse::<usize>().unwrap());
    }
    assert!(out.path().join("cluster.svg").is_file());
}
