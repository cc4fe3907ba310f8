//! The `stitch` analysis in SQL: the id horizon below which a bucket's
//! records are final, one step of a bucket (read after the cursor, stitch,
//! write rows and cursor in one fenced transaction), and the reads of the
//! output.

use super::{stitch, Biflow};
use crate::cluster::{fence, ClusterError};
use crate::db::Db;
use crate::dialect::{i64_of, Sql};
use sqlx::Connection;

/// Who writes a step: a cluster node in an epoch (checked like the rate
/// writes: lease, newest epoch, ownership of the bucket). A standalone
/// collector (and SQLite, which has one process) writes without one, under
/// cluster name `""`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub cluster: String,
    pub node: String,
    pub epoch: i64,
}

/// The flow ids below which every record is final: no transaction still
/// running can commit a row with a smaller id.
///
/// PostgreSQL hands ids out from a sequence before the rows commit, so ids
/// become visible out of order. A sample takes the sequence's last value
/// `S` and the database's clock `t`: every id ≤ `S` was taken by a
/// transaction that started before `t`. Once no client transaction of the
/// database that started at or before `t` is still running
/// (`pg_stat_activity.xact_start`), every id ≤ `S` is committed or never
/// will be, and `S` is the horizon. Backends whose activity this role may
/// not see make the check fall back to time: `S` is final `fallback` after
/// `t`. On SQLite ids are taken in commit order (one writer): the horizon
/// is the largest id.
#[derive(Clone, Debug, Default)]
pub struct Horizon {
    pending: Option<(i64, i64)>,
    safe: i64,
}

impl Horizon {
    /// The horizon now (advancing it when the pending sample became
    /// final, and taking the next sample).
    pub async fn advance(
        &mut self,
        db: &Db,
        fallback: std::time::Duration,
    ) -> Result<i64, sqlx::Error> {
        let pool = match db {
            Db::Sqlite(_) => {
                self.safe = self.safe.max(db.max_flow_id().await?);
                return Ok(self.safe);
            }
            Db::Postgres(p) => p,
        };
        if let Some((t_us, s)) = self.pending {
            let fallback_us = i64::try_from(fallback.as_micros()).unwrap_or(i64::MAX);
            let (blocking, unseen, now_us): (i64, i64, i64) = sqlx::query_as(
                "SELECT \
                   COUNT(*) FILTER (WHERE xact_start IS NOT NULL \
                     AND CAST(EXTRACT(EPOCH FROM xact_start) * 1000000 AS BIGINT) <= $1), \
                   COUNT(*) FILTER (WHERE query = '<insufficient privilege>'), \
                   CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT) \
                 FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid() \
                   AND backend_type = 'client backend'",
            )
            .bind(t_us)
            .fetch_one(pool)
            .await?;
            let final_ = if unseen > 0 {
                blocking == 0 && now_us.saturating_sub(t_us) >= fallback_us
            } else {
                blocking == 0
            };
            if final_ {
                self.safe = self.safe.max(s);
                self.pending = None;
            }
        }
        if self.pending.is_none() {
            let (s, t_us): (i64, i64) = sqlx::query_as(
                "SELECT COALESCE(pg_sequence_last_value(pg_get_serial_sequence('flows', 'id')::regclass), 0), \
                 CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT)",
            )
            .fetch_one(pool)
            .await?;
            self.pending = Some((t_us, s));
        }
        Ok(self.safe)
    }
}

/// What one step of one bucket did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StitchStep {
    /// Records read (and stitched).
    pub records: u64,
    /// Rows whose values do not form a record: skipped, counted.
    pub bad: u64,
    /// Output rows added to (inserted or updated).
    pub rows: u64,
    /// The cursor after the step (ids ≤ it are in the output).
    pub after_id: i64,
    /// Whether the step wrote (cursor or rows).
    pub wrote: bool,
}

/// One row of `stitched_flows` as read back.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StitchedRow {
    pub cluster: String,
    pub slot: i64,
    pub interval_ns: i64,
    pub a_addr: String,
    pub a_port: i64,
    pub b_addr: String,
    pub b_port: i64,
    pub proto: i64,
    /// -1: no VLAN.
    pub vlan: i64,
    pub bucket: i64,
    pub packets_ab: i64,
    pub bytes_ab: i64,
    pub parts_ab: i64,
    pub packets_ba: i64,
    pub bytes_ba: i64,
    pub parts_ba: i64,
    pub first_ns: i64,
    pub last_ns: i64,
    pub tcp_flags: Option<i64>,
    pub node: Option<String>,
    pub epoch: Option<i64>,
}

/// Which stitched rows to read: those whose `[first_ns, last_ns]` meets
/// `[from_ns, to_ns)`, optionally with `addr` as either endpoint and of
/// protocol `proto`; newest last-seen first, at most `limit`.
#[derive(Clone, Debug, Default)]
pub struct StitchedQuery {
    pub from_ns: i64,
    pub to_ns: i64,
    pub addr: Option<String>,
    pub proto: Option<u8>,
    pub limit: i64,
}

/// Rows per multi-row upsert (22 parameters each, under SQLite's limit).
const ROWS_PER_UPSERT: usize = 500;

fn upsert_sql(sql: Sql, rows: usize) -> String {
    let least = match sql.0 {
        crate::Dialect::Sqlite => "MIN",
        crate::Dialect::Postgres => "LEAST",
    };
    let greatest = sql.greatest();
    let mut s = String::from(
        "INSERT INTO stitched_flows (cluster, slot, a_addr, a_port, b_addr, b_port, proto, vlan, \
         interval_ns, bucket, packets_ab, bytes_ab, parts_ab, packets_ba, bytes_ba, parts_ba, \
         first_ns, last_ns, tcp_flags, node, epoch, updated_ns) VALUES ",
    );
    for i in 0..rows {
        if i > 0 {
            s.push(',');
        }
        s.push('(');
        for c in 0..22 {
            if c > 0 {
                s.push(',');
            }
            s.push_str(&format!("${}", i * 22 + c + 1));
        }
        s.push(')');
    }
    s.push_str(&format!(
        " ON CONFLICT (cluster, slot, a_addr, a_port, b_addr, b_port, proto, vlan) DO UPDATE SET \
         packets_ab = stitched_flows.packets_ab + excluded.packets_ab, \
         bytes_ab = stitched_flows.bytes_ab + excluded.bytes_ab, \
         parts_ab = stitched_flows.parts_ab + excluded.parts_ab, \
         packets_ba = stitched_flows.packets_ba + excluded.packets_ba, \
         bytes_ba = stitched_flows.bytes_ba + excluded.bytes_ba, \
         parts_ba = stitched_flows.parts_ba + excluded.parts_ba, \
         first_ns = {least}(stitched_flows.first_ns, excluded.first_ns), \
         last_ns = {greatest}(stitched_flows.last_ns, excluded.last_ns), \
         tcp_flags = CASE WHEN stitched_flows.tcp_flags IS NULL THEN excluded.tcp_flags \
           WHEN excluded.tcp_flags IS NULL THEN stitched_flows.tcp_flags \
           ELSE stitched_flows.tcp_flags | excluded.tcp_flags END, \
         node = excluded.node, epoch = excluded.epoch, updated_ns = excluded.updated_ns"
    ));
    s
}

/// The body of the write, the same text for both engines' transactions.
macro_rules! write_step {
    ($tx:expr, $D:ty, $sql:expr, $cluster:expr, $fence:expr, $bucket:expr, $prev:expr,
     $next:expr, $rows:expr, $interval:expr, $now:expr) => {{
        let (node, epoch) = match $fence {
            Some(f) => (Some(f.node.clone()), Some(f.epoch)),
            None => (None, None),
        };
        let moved = match $prev {
            None => sqlx::query::<$D>(
                "INSERT INTO stitch_cursors (cluster, bucket, after_id, epoch, node, updated_ns) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            )
            .bind($cluster)
            .bind(i64::from($bucket))
            .bind($next)
            .bind(epoch)
            .bind(node.clone())
            .bind($now)
            .execute(&mut *$tx)
            .await?
            .rows_affected(),
            Some(p) => sqlx::query::<$D>(
                "UPDATE stitch_cursors SET after_id = $3, epoch = $4, node = $5, updated_ns = $6 \
                 WHERE cluster = $1 AND bucket = $2 AND after_id = $7",
            )
            .bind($cluster)
            .bind(i64::from($bucket))
            .bind($next)
            .bind(epoch)
            .bind(node.clone())
            .bind($now)
            .bind(p)
            .execute(&mut *$tx)
            .await?
            .rows_affected(),
        };
        if moved != 1 {
            return Err(ClusterError::Fenced(format!(
                "the stitch cursor of bucket {} moved on under the writer",
                $bucket
            )));
        }
        for chunk in $rows.chunks(ROWS_PER_UPSERT) {
            let q = upsert_sql($sql, chunk.len());
            let mut query = sqlx::query::<$D>(&q);
            for r in chunk {
                query = query
                    .bind($cluster)
                    .bind(r.slot)
                    .bind(r.a_addr.to_string())
                    .bind(i64::from(r.a_port))
                    .bind(r.b_addr.to_string())
                    .bind(i64::from(r.b_port))
                    .bind(i64::from(r.proto))
                    .bind(r.vlan.map_or(-1, i64::from))
                    .bind($interval)
                    .bind(i64::from(r.bucket))
                    .bind(i64_of(r.packets_ab))
                    .bind(i64_of(r.bytes_ab))
                    .bind(i64_of(r.parts_ab))
                    .bind(i64_of(r.packets_ba))
                    .bind(i64_of(r.bytes_ba))
                    .bind(i64_of(r.parts_ba))
                    .bind(i64_of(r.first_ns))
                    .bind(i64_of(r.last_ns))
                    .bind(r.tcp_flags.map(i64::from))
                    .bind(node.clone())
                    .bind(epoch)
                    .bind($now);
            }
            query.execute(&mut *$tx).await?;
        }
    }};
}

impl Db {
    /// The cursor of `bucket` (`None`: the bucket was never stitched).
    pub async fn stitch_cursor(
        &self,
        cluster: &str,
        bucket: u32,
    ) -> Result<Option<i64>, sqlx::Error> {
        let q = "SELECT after_id FROM stitch_cursors WHERE cluster = $1 AND bucket = $2";
        let r: Option<(i64,)> = crate::on_pool!(self, pool, D => sqlx::query_as(q)
            .bind(cluster).bind(i64::from(bucket)).fetch_optional(pool).await)?;
        Ok(r.map(|(v,)| v))
    }

    /// One step of the `stitch` analysis for `bucket`: reads at most
    /// `limit` of the bucket's records after its cursor and at or below
    /// `horizon` ([`Horizon`]), merges and stitches them ([`stitch`],
    /// intervals of `interval_ns`, `buckets` in the cluster) and, in one
    /// transaction, adds the rows to `stitched_flows` and moves the cursor
    /// (compare-and-set: a cursor moved by another writer fails the step,
    /// nothing written). With a `fence`, the transaction is fenced like the
    /// rate writes; a node that lost the bucket writes nothing for it.
    #[allow(clippy::too_many_arguments)]
    pub async fn stitch_step(
        &self,
        fence: Option<&Fence>,
        bucket: u32,
        horizon: i64,
        interval_ns: i64,
        buckets: u32,
        limit: i64,
    ) -> Result<StitchStep, ClusterError> {
        let cluster = fence.map_or("", |f| f.cluster.as_str());
        let prev = self.stitch_cursor(cluster, bucket).await?;
        let after = prev.unwrap_or(0);
        if horizon <= after {
            return Ok(StitchStep {
                after_id: after,
                ..StitchStep::default()
            });
        }
        let limit = limit.max(1);
        let read = self.flows_of_bucket(bucket, after, horizon, limit).await?;
        let next = if (read.len() as i64) < limit {
            horizon
        } else {
            read.last().map_or(horizon, |r| r.id)
        };
        let bad = read.iter().filter(|r| r.record.is_none()).count() as u64;
        let records: Vec<_> = read.into_iter().filter_map(|r| r.record).collect();
        let rows: Vec<Biflow> = stitch(&records, u64::try_from(interval_ns).unwrap_or(0), buckets);
        let now = crate::now_ns();
        let sql = Sql::of(self);
        match self {
            Db::Postgres(pool) => {
                let mut conn = pool.acquire().await?;
                let mut tx = conn.begin().await?;
                if let Some(f) = fence {
                    fence_check(&mut tx, f, bucket).await?;
                }
                write_step!(
                    tx,
                    sqlx::Postgres,
                    sql,
                    cluster,
                    fence,
                    bucket,
                    prev,
                    next,
                    rows,
                    interval_ns,
                    now
                );
                tx.commit().await?;
            }
            Db::Sqlite(pool) => {
                if fence.is_some() {
                    return Err(ClusterError::NotPostgres);
                }
                let mut conn = pool.acquire().await?;
                let mut tx = conn.begin().await?;
                write_step!(
                    tx,
                    sqlx::Sqlite,
                    sql,
                    cluster,
                    fence,
                    bucket,
                    prev,
                    next,
                    rows,
                    interval_ns,
                    now
                );
                tx.commit().await?;
            }
        }
        Ok(StitchStep {
            records: records.len() as u64,
            bad,
            rows: rows.len() as u64,
            after_id: next,
            wrote: true,
        })
    }

    /// Stitched rows ([`StitchedQuery`]).
    pub async fn stitched_flows(&self, q: &StitchedQuery) -> Result<Vec<StitchedRow>, sqlx::Error> {
        let text = "SELECT cluster, slot, interval_ns, a_addr, CAST(a_port AS BIGINT), b_addr, \
                    CAST(b_port AS BIGINT), CAST(proto AS BIGINT), CAST(vlan AS BIGINT), CAST(bucket AS BIGINT), \
                    packets_ab, bytes_ab, parts_ab, packets_ba, bytes_ba, parts_ba, first_ns, last_ns, \
                    CAST(tcp_flags AS BIGINT), node, epoch FROM stitched_flows \
                    WHERE last_ns >= $1 AND first_ns < $2 \
                      AND (CAST($3 AS TEXT) IS NULL OR a_addr = CAST($3 AS TEXT) OR b_addr = CAST($3 AS TEXT)) \
                      AND (CAST($4 AS BIGINT) IS NULL OR proto = CAST($4 AS BIGINT)) \
                    ORDER BY last_ns DESC, cluster, slot, a_addr, a_port, b_addr, b_port, proto, vlan LIMIT $5";
        type Raw = (
            String,
            i64,
            i64,
            String,
            i64,
            String,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
        );
        let proto = q.proto.map(i64::from);
        let rows: Vec<sqlx::Result<StitchedRow>> = crate::on_pool!(self, pool, D => {
            let rows = sqlx::query::<D>(text)
                .bind(q.from_ns)
                .bind(q.to_ns)
                .bind(q.addr.clone())
                .bind(proto)
                .bind(q.limit)
                .fetch_all(pool)
                .await?;
            rows.iter().map(|r| {
                use sqlx::Row;
                let head: Raw = (
                    r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?, r.try_get(4)?,
                    r.try_get(5)?, r.try_get(6)?, r.try_get(7)?, r.try_get(8)?, r.try_get(9)?,
                    r.try_get(10)?, r.try_get(11)?, r.try_get(12)?, r.try_get(13)?, r.try_get(14)?,
                    r.try_get(15)?,
                );
                Ok(StitchedRow {
                    cluster: head.0, slot: head.1, interval_ns: head.2, a_addr: head.3,
                    a_port: head.4, b_addr: head.5, b_port: head.6, proto: head.7, vlan: head.8,
                    bucket: head.9, packets_ab: head.10, bytes_ab: head.11, parts_ab: head.12,
                    packets_ba: head.13, bytes_ba: head.14, parts_ba: head.15,
                    first_ns: r.try_get(16)?, last_ns: r.try_get(17)?, tcp_flags: r.try_get(18)?,
                    node: r.try_get(19)?, epoch: r.try_get(20)?,
                })
            }).collect()
        });
        rows.into_iter().collect()
    }
}

async fn fence_check(
    tx: &mut sqlx::PgConnection,
    f: &Fence,
    bucket: u32,
) -> Result<(), ClusterError> {
    fence(tx, &f.cluster, &f.node, f.epoch, std::iter::once(bucket)).await
}
