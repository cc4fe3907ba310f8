//! The storage self-check: bring a database to qosloop's schema, store one
//! flow record the way the collector will, read it back, and say what was
//! found. It runs on SQLite by default and on a PostgreSQL the harness
//! starts with `--postgres`.

use crate::harness::Postgres;
use qosloop_collector::Db;
use qosloop_schema::FlowRecord;

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

async fn round_trip(db: &Db, r: &FlowRecord) -> anyhow::Result<FlowRecord> {
    type Row = (
        String,
        String,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
        Option<i64>,
        Option<String>,
    );
    let row: Row = match db {
        Db::Sqlite(pool) => {
            sqlx::query(
                "INSERT INTO flows (exporter_id, session_id, seq, src_addr, dst_addr, src_port, dst_port, proto, \
                 packets, bytes, start_ns, end_ns, dscp, class) VALUES (0, 0, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(r.src_addr.to_string())
            .bind(r.dst_addr.to_string())
            .bind(i64::from(r.src_port))
            .bind(i64::from(r.dst_port))
            .bind(i64::from(r.proto))
            .bind(r.packets as i64)
            .bind(r.bytes as i64)
            .bind(r.start_ns as i64)
            .bind(r.end_ns as i64)
            .bind(r.dscp.map(i64::from))
            .bind(r.class.clone())
            .execute(pool)
            .await?;
            sqlx::query_as(
                "SELECT src_addr, dst_addr, src_port, dst_port, proto, packets, bytes, start_ns, end_ns, dscp, class \
                 FROM flows ORDER BY id DESC LIMIT 1",
            )
            .fetch_one(pool)
            .await?
        }
        Db::Postgres(pool) => {
            sqlx::query(
                "INSERT INTO flows (exporter_id, session_id, seq, src_addr, dst_addr, src_port, dst_port, proto, \
                 packets, bytes, start_ns, end_ns, dscp, class) \
                 VALUES (0, 0, 0, $1::inet, $2::inet, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .bind(r.src_addr.to_string())
            .bind(r.dst_addr.to_string())
            .bind(i32::from(r.src_port))
            .bind(i32::from(r.dst_port))
            .bind(i16::from(r.proto))
            .bind(r.packets as i64)
            .bind(r.bytes as i64)
            .bind(r.start_ns as i64)
            .bind(r.end_ns as i64)
            .bind(r.dscp.map(i16::from))
            .bind(r.class.clone())
            .execute(pool)
            .await?;
            sqlx::query_as(
                "SELECT host(src_addr), host(dst_addr), src_port::BIGINT, dst_port::BIGINT, proto::BIGINT, packets, bytes, \
                 start_ns, end_ns, dscp::BIGINT, class FROM flows ORDER BY id DESC LIMIT 1",
            )
            .fetch_one(pool)
            .await?
        }
    };
    let (src, dst, sp, dp, proto, packets, bytes, start, end, dscp, class) = row;
    Ok(FlowRecord {
        src_addr: src.parse()?,
        dst_addr: dst.parse()?,
        src_port: u16::try_from(sp)?,
        dst_port: u16::try_from(dp)?,
        proto: u8::try_from(proto)?,
        packets: u64::try_from(packets)?,
        bytes: u64::try_from(bytes)?,
        start_ns: u64::try_from(start)?,
        end_ns: u64::try_from(end)?,
        dscp: dscp.map(u8::try_from).transpose()?,
        class,
        ..FlowRecord::default()
    })
}
