//! The storage self-check: bring a database to qosloop's schema, store one
//! flow record the way the collector will, read it back, and say what was
//! found. It runs on SQLite by default and on a PostgreSQL the harness
//! starts with `--postgres`.

use crate::harness::Postgres;
use qosloop_schema::FlowRecord;
use qosloop_store::{Batch, Db};

/// What the self-check found.
#[derive(Debug)]
pub struct SelfCheck {
    pub dialect: String,
    pub migrations_applied: usize,
    pub migrations_on_rerun: usize,
    pub tables: Vec<String>,
    pub stored: FlowRecord,
    pub read_back: FlowRecord,
}

/// A record like the reference experiment's policed flow.
pub fn sample_record() -> FlowRecord {
    FlowRecord {
        src_addr: [172, 20, 1, 2].into(),
        dst_addr: [172, 20, 3, 3].into(),
        src_port: 6055,
        dst_port: 4055,
        proto: 17,
        packets: 4000,
        bytes: 4000 * 256,
        start_ns: 1_700_000_000_000_000_000,
        end_ns: 1_700_000_001_000_000_000,
        dscp: Some(48),
        class: Some("policed".into()),
        ..FlowRecord::default()
    }
}

/// Runs the check against `url`.
pub async fn run(url: &str) -> anyhow::Result<SelfCheck> {
    let db = Db::connect(url).await?;
    let migrations_applied = db.migrate().await?;
    let migrations_on_rerun = db.migrate().await?;
    let tables = db.tables().await?;
    let stored = sample_record();
    let read_back = round_trip(&db, &stored).await?;
    db.close().await;
    Ok(SelfCheck {
        dialect: format!("{:?}", db.dialect()),
        migrations_applied,
        migrations_on_rerun,
        tables,
        stored,
        read_back,
    })
}

/// Runs the check against a PostgreSQL started for it.
pub async fn run_postgres() -> anyhow::Result<SelfCheck> {
    let pg = tokio::task::spawn_blocking(Postgres::start).await??;
    let result = run(&pg.url()).await;
    drop(pg);
    result
}

/// Stores `r` through the collector's writer path (one DATA message, not
/// de-duplicated) and reads the newest row back through the mapping every
/// reader uses.
async fn round_trip(db: &Db, r: &FlowRecord) -> anyhow::Result<FlowRecord> {
    let batch = Batch {
        exporter_id: 0,
        session_id: 0,
        seq: 0,
        records: vec![r.clone()],
        dedup: false,
    };
    db.commit_batches(&[&batch]).await?;
    let row = db
        .recent_flows(1)
        .await?
        .pop()
        .ok_or_else(|| anyhow::anyhow!("the stored record is not in flows"))?;
    row.record
        .ok_or_else(|| anyhow::anyhow!("row {} does not read back as a flow record", row.id))
}
