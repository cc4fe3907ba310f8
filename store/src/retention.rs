//! `flows` kept bounded in time: on PostgreSQL daily partitions created
//! ahead of the rows that will need them and dropped whole once past the
//! retention age; on SQLite the old rows deleted in bounded chunks. Every
//! collector node may run [`Db::maintain_flows`] at any time, several at
//! once: on PostgreSQL both steps run under one advisory lock inside the
//! SQL functions (migration 0004) and are idempotent; on SQLite the single
//! writer serialises them.

use crate::db::{now_ns, Db};
use crate::on_pool;

/// One day in nanoseconds: the width of a `flows` partition.
pub const DAY_NS: i64 = 86_400_000_000_000;

/// What to keep and what to prepare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Rows whose `end_ns` is older than this many days are removed; 0
    /// keeps everything.
    pub days: u32,
    /// Partitions exist from today through this many days ahead
    /// (PostgreSQL).
    pub ahead_days: u32,
    /// Rows one `DELETE` removes at most (SQLite, and PostgreSQL's default
    /// partition): a long delete never holds the writer for long.
    pub chunk_rows: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            days: 0,
            ahead_days: 2,
            chunk_rows: 10_000,
        }
    }
}

/// What one maintenance run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Maintenance {
    /// The cut-off: rows ending before it are gone (`None`: no retention).
    pub before_ns: Option<i64>,
    pub partitions_created: i32,
    pub partitions_dropped: i32,
    pub rows_deleted: u64,
}

impl Retention {
    /// The cut-off at `at_ns` (a partition is dropped only when all of it
    /// is older).
    pub fn before_ns(&self, at_ns: i64) -> Option<i64> {
        (self.days > 0).then(|| at_ns.saturating_sub(i64::from(self.days).saturating_mul(DAY_NS)))
    }
}

impl Db {
    /// Creates the partitions covering `[from_ns, to_ns)` that are missing
    /// (PostgreSQL; SQLite has none: 0). Returns how many it created.
    pub async fn ensure_flow_partitions(
        &self,
        from_ns: i64,
        to_ns: i64,
    ) -> Result<i32, sqlx::Error> {
        match self {
            Db::Sqlite(_) => Ok(0),
            Db::Postgres(pool) => {
                sqlx::query_scalar("SELECT qosloop_ensure_flow_partitions($1, $2)")
                    .bind(from_ns)
                    .bind(to_ns)
                    .fetch_one(pool)
                    .await
            }
        }
    }

    /// The daily partitions of `flows` as `[start_ns, end_ns)` ranges,
    /// oldest first (PostgreSQL; empty on SQLite).
    pub async fn flow_partitions(&self) -> Result<Vec<(i64, i64)>, sqlx::Error> {
        match self {
            Db::Sqlite(_) => Ok(Vec::new()),
            Db::Postgres(pool) => {
                let days: Vec<i64> = sqlx::query_scalar(
                    "SELECT substring(c.relname FROM 8)::BIGINT FROM pg_inherits i \
                     JOIN pg_class c ON c.oid = i.inhrelid \
                     WHERE i.inhparent = 'flows'::regclass AND c.relname ~ '^flows_d[0-9]+$' \
                     ORDER BY 1",
                )
                .fetch_all(pool)
                .await?;
                Ok(days
                    .into_iter()
                    // A day number from a table name: saturate rather
                    // than panic on a name no clock reaches.
                    .map(|d| {
                        let start = d.saturating_mul(DAY_NS);
                        (start, start.saturating_add(DAY_NS))
                    })
                    .collect())
            }
        }
    }

    /// Removes the flows ending before `before_ns`: whole partitions on
    /// PostgreSQL (plus, in chunks, old rows left in its default
    /// partition), chunks of `chunk_rows` rows on SQLite.
    pub async fn drop_flows_before(
        &self,
        before_ns: i64,
        chunk_rows: u32,
    ) -> Result<(i32, u64), sqlx::Error> {
        let dropped = match self {
            Db::Sqlite(_) => 0,
            Db::Postgres(pool) => {
                sqlx::query_scalar("SELECT qosloop_drop_flow_partitions($1)")
                    .bind(before_ns)
                    .fetch_one(pool)
                    .await?
            }
        };
        let table = match self {
            Db::Sqlite(_) => "flows",
            Db::Postgres(_) => "flows_default",
        };
        // By id through the end_ns index: each statement touches at most
        // chunk_rows rows, and another writer gets the database between.
        let q = format!(
            "DELETE FROM {table} WHERE id IN \
             (SELECT id FROM {table} WHERE end_ns < $1 LIMIT $2)"
        );
        let mut deleted = 0u64;
        loop {
            let n = on_pool!(self, pool, D => sqlx::query::<D>(&q)
                .bind(before_ns)
                .bind(i64::from(chunk_rows.max(1)))
                .execute(pool)
                .await
                .map(|r| r.rows_affected()))?;
            deleted += n;
            if n < u64::from(chunk_rows.max(1)) {
                break;
            }
            tokio::task::yield_now().await;
        }
        Ok((dropped, deleted))
    }

    /// One maintenance run at `at_ns` by `node`: partitions ahead, then
    /// retention; recorded in `flow_maintenance`.
    pub async fn maintain_flows(
        &self,
        node: &str,
        retention: Retention,
        at_ns: i64,
    ) -> Result<Maintenance, sqlx::Error> {
        let mut m = Maintenance {
            before_ns: retention.before_ns(at_ns),
            ..Maintenance::default()
        };
        let today = at_ns.div_euclid(DAY_NS) * DAY_NS;
        let ahead_to =
            today.saturating_add((i64::from(retention.ahead_days) + 1).saturating_mul(DAY_NS));
        m.partitions_created = self.ensure_flow_partitions(at_ns, ahead_to).await?;
        if let Some(before) = m.before_ns {
            let (dropped, deleted) = self.drop_flows_before(before, retention.chunk_rows).await?;
            m.partitions_dropped = dropped;
            m.rows_deleted = deleted;
        }
        let q = "INSERT INTO flow_maintenance (at_ns, node, before_ns, partitions_created, \
                 partitions_dropped, rows_deleted) VALUES ($1, $2, $3, $4, $5, $6)";
        on_pool!(self, pool, D => sqlx::query::<D>(q)
            .bind(now_ns())
            .bind(node)
            .bind(m.before_ns)
            .bind(m.partitions_created)
            .bind(m.partitions_dropped)
            .bind(i64::try_from(m.rows_deleted).unwrap_or(i64::MAX))
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `days` comes from the operator's configuration: a number of days
    /// past what i64 nanoseconds hold keeps everything, never panics.
    #[test]
    fn a_retention_past_the_clock_keeps_everything() {
        let now = 1_700_000_000_000_000_000;
        let r = Retention {
            days: 30,
            ..Retention::default()
        };
        assert_eq!(r.before_ns(now), Some(now - 30 * DAY_NS));
        let r = Retention {
            days: u32::MAX,
            ..Retention::default()
        };
        assert_eq!(r.before_ns(now), Some(now - i64::MAX));
        assert_eq!(Retention::default().before_ns(now), None);
    }
}
