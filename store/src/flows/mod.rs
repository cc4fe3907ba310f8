//! The `flows` table, and the one mapping between its rows and
//! [`FlowRecord`]s: written by [`Db::commit_batches`] (the collector's
//! writer, CRANE and IPFIX alike), read by [`Db::flows_from`] (the policy
//! server's bandwidth manager, in id order) and [`Db::recent_flows`] (the
//! web API, the testbed's self-check). The writer keeps the per-minute
//! rollups of `flows_1m` (`rollup.rs`) and `flows_1m_dim`, with its hourly
//! level `flows_1h_dim` (`rollup_dim.rs`), in the same transaction.
//!
//! Rows are read with every column of the JSON contract. A row whose values
//! do not form a record (an address that does not parse, a negative
//! counter, a sampling interval below 1) is returned without one, so that
//! the reader counts it instead of stopping at it.

mod rollup;
mod rollup_dim;
mod write;

pub use rollup::MINUTE_NS;
pub use rollup_dim::{HOUR_NS, ROLLUP_DIMS};

use crate::db::Db;
use crate::dialect::Sql;
use qosloop_schema::FlowRecord;
use sqlx::Row;
use std::net::IpAddr;

/// One DATA message to store.
#[derive(Debug)]
pub struct Batch {
    pub exporter_id: i64,
    pub session_id: i64,
    pub seq: u32,
    pub records: Vec<FlowRecord>,
    /// De-duplicate by `(exporter_id, session_id, seq)` (CRANE re-sends).
    /// IPFIX/NetFlow batches are not: their sequence numbers restart with
    /// the exporter and say nothing about re-sends.
    pub dedup: bool,
}

/// What became of a stored message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Stored,
    /// Its key was already committed: nothing stored again.
    Duplicate,
}

/// A row of `flows` as read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowRow {
    /// SQLite's rowid, PostgreSQL's `BIGSERIAL`: increasing in the order
    /// ids were taken, not the order they became visible.
    pub id: i64,
    /// `None` when the row's values do not form a record.
    pub record: Option<FlowRecord>,
}

/// The columns of a row as they come out of either engine: every integer
/// as `i64`, addresses as text.
struct RawFlow {
    id: i64,
    src: String,
    dst: String,
    ints: [i64; 7],
    vlan: Option<i64>,
    dscp: Option<i64>,
    tcp_flags: Option<i64>,
    class: Option<String>,
    user: Option<String>,
    process: Option<String>,
    sampling: Option<i64>,
}

/// The select list matching [`RawFlow`].
fn columns(sql: Sql) -> String {
    format!(
        "id, {}, {}, CAST(src_port AS BIGINT), CAST(dst_port AS BIGINT), CAST(proto AS BIGINT), \
         packets, bytes, start_ns, end_ns, CAST(vlan AS BIGINT), CAST(dscp AS BIGINT), \
         CAST(tcp_flags AS BIGINT), class, \"user\", process, CAST(sampling_interval AS BIGINT)",
        sql.inet_text("src_addr"),
        sql.inet_text("dst_addr"),
    )
}

impl<'r, R> sqlx::FromRow<'r, R> for RawFlow
where
    R: Row,
    usize: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    fn from_row(row: &'r R) -> Result<Self, sqlx::Error> {
        let mut ints = [0i64; 7];
        for (i, v) in ints.iter_mut().enumerate() {
            *v = row.try_get(3 + i)?;
        }
        Ok(RawFlow {
            id: row.try_get(0)?,
            src: row.try_get(1)?,
            dst: row.try_get(2)?,
            ints,
            vlan: row.try_get(10)?,
            dscp: row.try_get(11)?,
            tcp_flags: row.try_get(12)?,
            class: row.try_get(13)?,
            user: row.try_get(14)?,
            process: row.try_get(15)?,
            sampling: row.try_get(16)?,
        })
    }
}

impl RawFlow {
    fn record(self) -> Option<FlowRecord> {
        let [sport, dport, proto, packets, bytes, start, end] = self.ints;
        let narrow = |v: Option<i64>| -> Option<Option<u16>> {
            match v {
                None => Some(None),
                Some(v) => Some(Some(u16::try_from(v).ok()?)),
            }
        };
        Some(FlowRecord {
            src_addr: self.src.parse::<IpAddr>().ok()?,
            dst_addr: self.dst.parse::<IpAddr>().ok()?,
            src_port: u16::try_from(sport).ok()?,
            dst_port: u16::try_from(dport).ok()?,
            proto: u8::try_from(proto).ok()?,
            packets: u64::try_from(packets).ok()?,
            bytes: u64::try_from(bytes).ok()?,
            start_ns: u64::try_from(start).ok()?,
            end_ns: u64::try_from(end).ok()?,
            vlan: narrow(self.vlan)?,
            dscp: match self.dscp {
                None => None,
                Some(d) => Some(u8::try_from(d).ok()?),
            },
            tcp_flags: narrow(self.tcp_flags)?,
            class: self.class,
            user: self.user,
            process: self.process,
            sampling_interval: match self.sampling {
                None => None,
                Some(n) => Some(u32::try_from(n).ok().filter(|n| *n >= 1)?),
            },
        })
    }

    fn into_row(self) -> FlowRow {
        FlowRow {
            id: self.id,
            record: self.record(),
        }
    }
}

impl Db {
    /// The highest flow id taken so far (0 for an empty table).
    pub async fn max_flow_id(&self) -> Result<i64, sqlx::Error> {
        let q = "SELECT COALESCE(MAX(id), 0) FROM flows";
        let (max,): (i64,) =
            crate::on_pool!(self, pool, D => sqlx::query_as(q).fetch_one(pool).await)?;
        Ok(max)
    }

    /// At most `limit` rows with `id >= from_id`, in id order.
    pub async fn flows_from(&self, from_id: i64, limit: i64) -> Result<Vec<FlowRow>, sqlx::Error> {
        let q = format!(
            "SELECT {} FROM flows WHERE id >= $1 ORDER BY id LIMIT $2",
            columns(Sql::of(self))
        );
        let rows: Vec<RawFlow> = crate::on_pool!(self, pool, D => sqlx::query_as(&q)
            .bind(from_id)
            .bind(limit)
            .fetch_all(pool)
            .await)?;
        Ok(rows.into_iter().map(RawFlow::into_row).collect())
    }

    /// At most `limit` rows of cluster bucket `bucket` with `after_id <
    /// id <= upto_id`, in id order (the index `flows_bucket_id`).
    pub async fn flows_of_bucket(
        &self,
        bucket: u32,
        after_id: i64,
        upto_id: i64,
        limit: i64,
    ) -> Result<Vec<FlowRow>, sqlx::Error> {
        let q = format!(
            "SELECT {} FROM flows WHERE bucket = $1 AND id > $2 AND id <= $3 ORDER BY id LIMIT $4",
            columns(Sql::of(self))
        );
        let rows: Vec<RawFlow> = crate::on_pool!(self, pool, D => sqlx::query_as(&q)
            .bind(i64::from(bucket))
            .bind(after_id)
            .bind(upto_id)
            .bind(limit)
            .fetch_all(pool)
            .await)?;
        Ok(rows.into_iter().map(RawFlow::into_row).collect())
    }

    /// The last `limit` rows, newest first.
    pub async fn recent_flows(&self, limit: i64) -> Result<Vec<FlowRow>, sqlx::Error> {
        let q = format!(
            "SELECT {} FROM flows ORDER BY id DESC LIMIT $1",
            columns(Sql::of(self))
        );
        let rows: Vec<RawFlow> =
            crate::on_pool!(self, pool, D => sqlx::query_as(&q).bind(limit).fetch_all(pool).await)?;
        Ok(rows.into_iter().map(RawFlow::into_row).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(sampling: Option<i64>) -> RawFlow {
        RawFlow {
            id: 1,
            src: "10.0.0.1".into(),
            dst: "10.0.0.2".into(),
            ints: [1000, 80, 6, 3, 180, 1, 2],
            vlan: Some(7),
            dscp: Some(46),
            tcp_flags: None,
            class: Some("web".into()),
            user: None,
            process: None,
            sampling,
        }
    }

    #[test]
    fn rows_map_to_records_or_to_none() {
        let r = raw(Some(100)).record().unwrap();
        assert_eq!(
            (r.src_port, r.packets, r.bytes, r.sampling_interval),
            (1000, 3, 180, Some(100))
        );
        assert_eq!(
            (r.vlan, r.dscp, r.class.as_deref()),
            (Some(7), Some(46), Some("web"))
        );
        assert_eq!(raw(None).record().unwrap().sampling_interval, None);
        // An interval of 0 or below is not a record.
        assert!(raw(Some(0)).record().is_none());
        assert!(raw(Some(-5)).record().is_none());
        // Nor a negative counter, an out-of-range port or a bad address.
        let mut bad = raw(None);
        bad.ints[4] = -1;
        assert!(bad.record().is_none());
        let mut bad = raw(None);
        bad.ints[0] = 70_000;
        assert!(bad.record().is_none());
        let mut bad = raw(None);
        bad.src = "10.0.0.300".into();
        assert!(bad.record().is_none());
        let mut bad = raw(None);
        bad.dscp = Some(300);
        assert!(bad.record().is_none());
    }
}
