//! The per-minute rollups (`flows_1m`) kept by the flow writer equal the
//! same sums computed by a plain GROUP BY over the raw rows, on SQLite and
//! on a real PostgreSQL: after several writes that touch the same groups
//! (the upsert merges), and after the migration's backfill. The same for
//! the rollups by one dimension at a time (`flows_1m_dim`), dimension by
//! dimension and for the minute's totals, and for their hourly level
//! (`flows_1h_dim`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_schema::sql::{migrations, Dialect};
use qosloop_schema::FlowRecord;
use qosloop_store::{on_pool, Batch, Bind, Col, Db, Sql, HOUR_NS, MINUTE_NS, ROLLUP_DIMS};
use qosloop_testkit::harness::Postgres;
use qosloop_testkit::need;
use std::net::IpAddr;

#[tokio::test]
async fn rollups_equal_the_raw_rows_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    rollups_equal_raw(&format!("sqlite://{}", dir.path().join("r.db").display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_equal_the_raw_rows_on_postgres() {
    need!(Postgres::available());
    let pg = Postgres::start().unwrap();
    rollups_equal_raw(&pg.url()).await;
}

/// Records that share groups across writes: few addresses and ports, some
/// sampled, some without DSCP/VLAN/class, one IPv6 pair.
fn records(write: u64, n: u64) -> Vec<FlowRecord> {
    let base = 1_700_000_000 * 1_000_000_000u64;
    (0..n)
        .map(|i| {
            let k = i * 7 + write * 3;
            let v6 = k % 11 == 0;
            FlowRecord {
                src_addr: if v6 {
                    "2001:db8::1".parse().unwrap()
                } else {
                    IpAddr::from([10, 0, 0, (k % 5) as u8])
                },
                dst_addr: if v6 {
                    "2001:db8::2".parse().unwrap()
                } else {
                    IpAddr::from([192, 0, 2, (k % 3) as u8])
                },
                src_port: (30_000 + k % 1000) as u16,
                dst_port: [80, 443, 53][(k % 3) as usize],
                proto: if k % 3 == 2 { 17 } else { 6 },
                packets: 1 + k % 13,
                bytes: 60 + k * 17 % 1500,
                // Over 4 hours (k % 4 is a function of k % 600: no more
                // groups than over one).
                start_ns: base + k % 600 * 1_000_000_000 + (k % 4) * HOUR_NS as u64,
                end_ns: base + k % 600 * 1_000_000_000 + (k % 4) * (HOUR_NS + MINUTE_NS / 3) as u64,
                vlan: (k % 4 == 0).then_some(10),
                dscp: (k % 5 != 0).then_some((k % 3 * 10) as u8),
                class: (k % 6 != 0).then(|| ["web", "dns|x", ""][(k % 3) as usize].to_owned()),
                user: (k % 2 == 0).then(|| "alice".to_owned()),
                process: None,
                sampling_interval: [None, Some(1), Some(100)][(k % 3) as usize],
                ..FlowRecord::default()
            }
        })
        .collect()
}

const DIMS: &str = "CAST(exporter_id AS TEXT), {src}, {dst}, CAST(dst_port AS TEXT), \
    CAST(proto AS TEXT), CAST(dscp AS TEXT), CAST(vlan AS TEXT), class, \"user\", process";

async fn grouped(db: &Db, table: &str) -> Vec<Vec<serde_json::Value>> {
    let sql = Sql::of(db);
    let dims = DIMS
        .replace("{src}", &sql.inet_text("src_addr"))
        .replace("{dst}", &sql.inet_text("dst_addr"));
    let (minute, bytes, packets, flows) = if table == "flows" {
        (
            format!("(end_ns / {MINUTE_NS}) * {MINUTE_NS}"),
            "CASE WHEN sampling_interval > 1 THEN bytes * sampling_interval ELSE bytes END",
            "CASE WHEN sampling_interval > 1 THEN packets * sampling_interval ELSE packets END",
            "1",
        )
    } else {
        ("minute_ns".to_owned(), "bytes", "packets", "flows")
    };
    let q = format!(
        "SELECT CAST({minute} AS TEXT) AS m, {dims}, CAST(SUM({bytes}) AS TEXT), \
         CAST(SUM({packets}) AS TEXT), CAST(SUM({flows}) AS TEXT) FROM {table} \
         GROUP BY m, {dims} ORDER BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11"
    );
    db.fetch_cells(&q, &[], &[Col::Text; 14]).await.unwrap()
}

/// The column of `flows` (and `flows_1m_dim`) a dimension name reads, as
/// text; `None` for the totals.
fn dim_column(db: &Db, dim: &str) -> Option<String> {
    let sql = Sql::of(db);
    Some(match dim {
        "total" => return None,
        "exporter" => "CAST(exporter_id AS TEXT)".into(),
        "src_addr" | "dst_addr" => sql.inet_text(dim),
        "user" => "\"user\"".into(),
        "class" | "process" => dim.into(),
        _ => format!("CAST({dim} AS TEXT)"),
    })
}

/// Per minute (or hour: `step`) and value of `dim`: scaled bytes, packets,
/// records — from the raw rows, or from `flows_1m_dim` (`flows_1h_dim`).
async fn by_dim(db: &Db, dim: &str, rollup: bool, step: i64) -> Vec<Vec<serde_json::Value>> {
    let col = dim_column(db, dim).unwrap_or_else(|| "''".into());
    let (table, time) = if step == HOUR_NS {
        ("flows_1h_dim", "hour_ns")
    } else {
        ("flows_1m_dim", "minute_ns")
    };
    let q = if rollup {
        format!(
            "SELECT CAST({time} AS TEXT) AS m, {col} AS k, CAST(SUM(bytes) AS TEXT), \
             CAST(SUM(packets) AS TEXT), CAST(SUM(flows) AS TEXT) FROM {table} WHERE dim = $1 \
             GROUP BY m, k ORDER BY 1, 2"
        )
    } else {
        format!(
            "SELECT CAST((end_ns / {step}) * {step} AS TEXT) AS m, {col} AS k, \
             CAST(SUM(CASE WHEN sampling_interval > 1 THEN bytes * sampling_interval ELSE bytes END) AS TEXT), \
             CAST(SUM(CASE WHEN sampling_interval > 1 THEN packets * sampling_interval ELSE packets END) AS TEXT), \
             CAST(COUNT(*) AS TEXT) FROM flows WHERE $1 = $1 GROUP BY m, k ORDER BY 1, 2"
        )
    };
    db.fetch_cells(&q, &[Bind::Text(dim.into())], &[Col::Text; 5])
        .await
        .unwrap()
}

/// Both levels of the rollups by one dimension equal the raw rows' sums.
async fn dims_equal_raw(db: &Db) {
    for step in [MINUTE_NS, HOUR_NS] {
        for dim in ROLLUP_DIMS {
            let raw = by_dim(db, dim, false, step).await;
            assert!(!raw.is_empty());
            assert_eq!(by_dim(db, dim, true, step).await, raw, "{dim} by {step} ns");
        }
    }
    // The records span several hours.
    let hours = by_dim(db, "total", false, HOUR_NS).await;
    assert!(hours.len() >= 3, "{hours:?}");
    // Only the named dimension's column is set.
    let stray = db
        .fetch_cells(
            "SELECT COUNT(*) FROM flows_1m_dim WHERE dim <> 'src_addr' AND src_addr IS NOT NULL",
            &[],
            &[Col::Int],
        )
        .await
        .unwrap();
    assert_eq!(stray[0][0].as_i64(), Some(0));
}

async fn rollups_equal_raw(url: &str) {
    let db = Db::connect(url).await.unwrap();
    db.migrate().await.unwrap();
    let a = db.register_exporter("m1", "127.0.0.1:1", 1).await.unwrap();
    let b = db.register_exporter("m2", "127.0.0.1:2", 1).await.unwrap();
    for ex in [a, b] {
        db.open_session(ex, 1, "big").await.unwrap();
    }
    for write in 0..4u64 {
        let batches: Vec<Batch> = [a, b]
            .iter()
            .enumerate()
            .map(|(i, ex)| Batch {
                exporter_id: *ex,
                session_id: 1,
                seq: write as u32 * 2 + i as u32,
                records: records(write + i as u64, 1500),
                dedup: true,
            })
            .collect();
        db.commit_batches(&batches.iter().collect::<Vec<_>>())
            .await
            .unwrap();
    }
    let raw = grouped(&db, "flows").await;
    let (rollup_rows, flow_rows) = (
        db.fetch_cells("SELECT COUNT(*) FROM flows_1m", &[], &[Col::Int])
            .await
            .unwrap(),
        db.fetch_cells("SELECT COUNT(*) FROM flows", &[], &[Col::Int])
            .await
            .unwrap(),
    );
    assert_eq!(flow_rows[0][0], 12_000);
    let groups = rollup_rows[0][0].as_i64().unwrap();
    assert!(
        groups < 6_000 && groups as usize == raw.len(),
        "the upserts merged groups across writes: {groups} rows for {} groups",
        raw.len()
    );
    assert_eq!(grouped(&db, "flows_1m").await, raw);
    assert!(raw.iter().any(|r| r[8] == "dns|x"));
    dims_equal_raw(&db).await;
    let per_dim = db
        .fetch_cells("SELECT COUNT(*) FROM flows_1m_dim", &[], &[Col::Int])
        .await
        .unwrap()[0][0]
        .as_i64()
        .unwrap();
    assert!(
        per_dim < groups,
        "{per_dim} rows by one dimension, {groups} by all"
    );

    // The migration's backfill gives the same sums from the raw rows.
    let q = "DELETE FROM flows_1m";
    on_pool!(&db, p, D => sqlx::query::<D>(q).execute(p).await.map(|_| ())).unwrap();
    let m = migrations(db.dialect())
        .iter()
        .find(|m| m.name == "flow_rollups")
        .unwrap();
    on_pool!(&db, p, D => sqlx::raw_sql(m.sql).execute(p).await.map(|_| ())).unwrap();
    assert_eq!(grouped(&db, "flows_1m").await, raw);
    let back = db
        .fetch_cells(
            "SELECT COUNT(*) FROM flows_1m WHERE dims_key LIKE $1",
            &[Bind::Text("b%".into())],
            &[Col::Int],
        )
        .await
        .unwrap();
    assert_eq!(back[0][0].as_i64().unwrap(), groups);
    // Rows written after the backfill land beside it, and the sums hold.
    let more = Batch {
        exporter_id: a,
        session_id: 1,
        seq: 100,
        records: records(0, 500),
        dedup: true,
    };
    db.commit_batches(&[&more]).await.unwrap();
    assert_eq!(grouped(&db, "flows_1m").await, grouped(&db, "flows").await);
    dims_equal_raw(&db).await;

    // Migration 0007's backfill (from `flows_1m`) gives the same sums, and
    // writes after it land beside it.
    let q = "DELETE FROM flows_1m_dim";
    on_pool!(&db, p, D => sqlx::query::<D>(q).execute(p).await.map(|_| ())).unwrap();
    let m = migrations(db.dialect())
        .iter()
        .find(|m| m.name == "flow_rollups_by_dim")
        .unwrap();
    on_pool!(&db, p, D => sqlx::raw_sql(m.sql).execute(p).await.map(|_| ())).unwrap();
    let back = db
        .fetch_cells(
            "SELECT COUNT(*) FROM flows_1m_dim WHERE dim_key NOT LIKE $1",
            &[Bind::Text("b%".into())],
            &[Col::Int],
        )
        .await
        .unwrap();
    assert_eq!(back[0][0].as_i64(), Some(0));
    dims_equal_raw(&db).await;
    let more = Batch {
        exporter_id: b,
        session_id: 1,
        seq: 101,
        records: records(2, 700),
        dedup: true,
    };
    db.commit_batches(&[&more]).await.unwrap();
    dims_equal_raw(&db).await;

    // Migration 0011's backfill of the hourly level (from `flows_1m_dim`)
    // gives the same sums, and writes after it land beside it.
    let q = "DELETE FROM flows_1h_dim";
    on_pool!(&db, p, D => sqlx::query::<D>(q).execute(p).await.map(|_| ())).unwrap();
    let m = migrations(db.dialect())
        .iter()
        .find(|m| m.name == "flow_rollups_by_hour")
        .unwrap();
    on_pool!(&db, p, D => sqlx::raw_sql(m.sql).execute(p).await.map(|_| ())).unwrap();
    dims_equal_raw(&db).await;
    let more = Batch {
        exporter_id: a,
        session_id: 1,
        seq: 102,
        records: records(3, 600),
        dedup: true,
    };
    db.commit_batches(&[&more]).await.unwrap();
    dims_equal_raw(&db).await;
    assert_eq!(
        db.dialect() == Dialect::Postgres,
        url.starts_with("postgres")
    );
    db.close().await;
}
