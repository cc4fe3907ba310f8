//! `bench cluster` end to end on a small load: real collector processes,
//! a real PostgreSQL (fsync on and off). The benchmark itself fails unless
//! `flows` holds exactly the records sent and the owners computed every
//! window; here the table it writes is checked too: every stored record
//! analysed by the owners, none late.
//!
//! The run uses a 5 s lag instead of the benchmark's 30 s
//! (`--lag-ms`, docs/testbed.md): with 20,000 records per run the exporters
//! cannot queue far ahead of the commits, so 5 s covers every record's wait
//! for its commit — and were it too short, records would be late and the
//! test would fail, not pass wrongly.

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
    for (row, (nodes, fsync)) in
        rows.iter()
            .zip([("1", "on"), ("2", "on"), ("1", "off"), ("2", "off")])
    {
        assert_eq!((row[1], row[2]), (nodes, fsync), "{table}");
        let committed: f64 = row[3].parse().unwrap();
        let analysed: f64 = row[4].parse().unwrap();
        assert!(committed > 0.0 && analysed > 0.0, "{table}");
        // Columns: late records, owners' delay, records moved, partial-sum
        // rows across nodes, CPU per record of each node, PostgreSQL's.
        let late: u64 = row[5].parse().unwrap();
        assert_eq!(late, 0, "records stored but not in their window: {table}");
        assert_eq!(row[3], row[4], "committed and analysed differ: {table}");
        let _delay: f64 = row[6].parse().unwrap();
        assert_eq!(row[9].split(" / ").count(), nodes.parse::<usize>().unwrap());
    }
    assert!(out.path().join("cluster.svg").is_file());
}
