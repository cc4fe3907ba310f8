//! Commit rate of the collector's storage writer into SQLite: N flow
//! records, in batches of 8,192 (the IPFIX flush size) from one exporter,
//! through `store::spawn_writer` as the collector starts it (group of
//! 50,000 records per transaction), into a fresh database file (WAL,
//! synchronous=NORMAL, as `Db::connect` opens it). Prints records/s from
//! the first send to the last commit.
//!
//!   cargo run --release -p qosloop-collector --example sqlite_write_rate [RECORDS] [DIR]

use qosloop_collector::{spawn_writer, Batch, Sink, WriteReq};
use qosloop_schema::FlowRecord;
use qosloop_store::Db;
use std::time::Instant;
use tokio::sync::oneshot;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let records: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2_000_000);
    let dir = tempfile::tempdir_in(std::env::args().nth(2).unwrap_or_else(|| ".".into()))?;
    let url = format!("sqlite://{}", dir.path().join("rate.db").display());
    let db = Db::connect(&url).await?;
    db.migrate().await?;
    let exporter = db
        .register_exporter("ipfix/udp/192.0.2.1:2055", "192.0.2.1:2055", 0)
        .await?;
    let (tx, _tasks) = spawn_writer(Sink::Db(db.clone()), 64, 50_000, 1);
    let per_batch = 8192;
    let start = Instant::now();
    let mut answers = Vec::new();
    let mut sent = 0usize;
    let mut seq = 0u32;
    while sent < records {
        let n = per_batch.min(records - sent);
        let batch: Vec<FlowRecord> = (0..n)
            .map(|i| {
                let k = (sent + i) as u32;
                FlowRecord {
                    src_addr: std::net::Ipv4Addr::from(0x0a00_0000 | (k & 0xffff)).into(),
                    dst_addr: std::net::Ipv4Addr::from(0xc633_6400 | (k >> 16 & 0xff)).into(),
                    src_port: (k % 60_000) as u16,
                    dst_port: 443,
                    proto: 6,
                    packets: 10,
                    bytes: 1500,
                    start_ns: 1_700_000_000_000_000_000 + u64::from(k),
                    end_ns: 1_700_000_000_500_000_000 + u64::from(k),
                    tcp_flags: Some(0x1b),
                    dscp: Some(0),
                    ..FlowRecord::default()
                }
            })
            .collect();
        let (done, answer) = oneshot::channel();
        let req = WriteReq {
            batch: Batch {
                exporter_id: exporter,
                session_id: 1,
                seq,
                records: batch,
                dedup: false,
            },
            done,
            memory: None,
        };
        tx.send(req).await.map_err(|_| "the writer stopped")?;
        answers.push(answer);
        sent += n;
        seq = seq.wrapping_add(n as u32);
    }
    for a in answers {
        a.await?.map_err(|e| format!("not committed: {e}"))?;
    }
    let secs = start.elapsed().as_secs_f64();
    let Db::Sqlite(pool) = &db else {
        return Err("SQLite only".into());
    };
    let (stored,): (i64,) = sqlx::query_as("SELECT count(*) FROM flows")
        .fetch_one(pool)
        .await?;
    if stored as usize != records {
        return Err(format!("{stored} rows stored of {records}").into());
    }
    println!(
        "{records} records committed to SQLite in {secs:.2} s: {:.0} records/s",
        records as f64 / secs
    );
    Ok(())
}
