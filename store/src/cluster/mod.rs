//! The collector cluster's tables (`docs/cluster.md`): membership with
//! leases on the database's clock, bucket ownership per epoch (the
//! ownership log), the per-node partial sums of the bandwidth manager's
//! subjects, the owners' fenced writes of rates with their EWMA state, and
//! the policy the policy server publishes for the owners.
//!
//! A cluster lives in PostgreSQL: every time here is the server's
//! `clock_timestamp()`, never a node's clock. SQLite has one process and
//! no cluster; these methods refuse it.

mod partials;
mod routing;

pub(crate) use partials::add_partials;
pub use partials::{Pruned, Tally};
pub use routing::{bucket_of, flow_bucket, rendezvous_owner, AnalysisKey, RoutingConfig};

use crate::db::Db;
use qosloop_schema::bandwidth::SubjectKind;
use sqlx::{Connection, PgPool, Row};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

/// The database's clock in ns since the Unix epoch.
pub(crate) const SERVER_NOW: &str =
    "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000000 AS BIGINT)";

/// The advisory lock between epoch changes (exclusive) and fenced writes
/// (shared).
const EPOCH_LOCK: i64 = 7_347_302;

/// What went wrong in a cluster operation.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("a collector cluster needs PostgreSQL (the database URL is SQLite)")]
    NotPostgres,
    #[error("cluster {cluster:?} refuses node {node:?}: its routing configuration differs ({differences})")]
    Refused {
        cluster: String,
        node: String,
        differences: String,
    },
    #[error("fenced: {0}")]
    Fenced(String),
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// One epoch of the ownership log: who owns each bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Epoch {
    pub epoch: i64,
    /// The live members it was computed from, sorted.
    pub members: Vec<String>,
    /// The owner of bucket `i`.
    pub owners: Vec<String>,
}

impl Epoch {
    /// The buckets `node` owns.
    pub fn buckets_of(&self, node: &str) -> BTreeSet<u32> {
        self.owners
            .iter()
            .enumerate()
            .filter(|(_, o)| *o == node)
            .map(|(b, _)| b as u32)
            .collect()
    }
}

/// A member row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub node: String,
    pub address: String,
    pub lease_until_ns: i64,
    pub alive: bool,
}

/// The owner's state of one subject.
#[derive(Clone, Debug, PartialEq)]
pub struct SubjectState {
    pub window_end_ns: i64,
    pub avg_rate_kbps: f64,
}

/// One computed window of one subject, to be written under fencing.
#[derive(Clone, Debug, PartialEq)]
pub struct OwnerRate {
    pub kind: SubjectKind,
    /// The rule's DN or the link's name (the `rate_state` key).
    pub subject: String,
    /// The name stored in `rates` (the rule's name, the link's name).
    pub name: String,
    pub bucket: u32,
    /// The state this window continues from (`None`: the first window).
    pub previous_end_ns: Option<i64>,
    pub window_end_ns: i64,
    pub interval_ns: i64,
    pub rate_kbps: f64,
    pub avg_rate_kbps: f64,
    pub records: i64,
}

pub(crate) fn pg(db: &Db) -> Result<&PgPool, ClusterError> {
    match db {
        Db::Postgres(p) => Ok(p),
        Db::Sqlite(_) => Err(ClusterError::NotPostgres),
    }
}

impl Db {
    /// The database's clock, ns since the Unix epoch.
    pub async fn server_now_ns(&self) -> Result<i64, ClusterError> {
        let (t,): (i64,) = sqlx::query_as(&format!("SELECT {SERVER_NOW}"))
            .fetch_one(pg(self)?)
            .await?;
        Ok(t)
    }

    /// Joins `cluster` as `node`: creates the cluster with `routing` if it
    /// does not exist, refuses the node (naming every difference) if the
    /// cluster's routing configuration is another one, and takes a lease
    /// of `lease` on the database's clock.
    pub async fn cluster_join(
        &self,
        cluster: &str,
        node: &str,
        advertise: &str,
        routing: &RoutingConfig,
        lease: Duration,
    ) -> Result<(), ClusterError> {
        let pool = pg(self)?;
        sqlx::query(&format!(
            "INSERT INTO cluster_config (cluster, buckets, routing, created_ns) \
             VALUES ($1, $2, $3, {SERVER_NOW}) ON CONFLICT DO NOTHING"
        ))
        .bind(cluster)
        .bind(routing.buckets as i32)
        .bind(routing.to_text())
        .execute(pool)
        .await?;
        let (text,): (String,) =
            sqlx::query_as("SELECT routing FROM cluster_config WHERE cluster = $1")
                .bind(cluster)
                .fetch_one(pool)
                .await?;
        let differences = routing.differences(&text);
        if !differences.is_empty() {
            return Err(ClusterError::Refused {
                cluster: cluster.to_owned(),
                node: node.to_owned(),
                differences: differences.join("; "),
            });
        }
        let other: Option<(String,)> =
            sqlx::query_as("SELECT cluster FROM cluster_members WHERE node = $1 AND cluster <> $2")
                .bind(node)
                .bind(cluster)
                .fetch_optional(pool)
                .await?;
        if let Some((c,)) = other {
            return Err(ClusterError::Refused {
                cluster: cluster.to_owned(),
                node: node.to_owned(),
                differences: format!("the node name is a member of cluster {c:?}"),
            });
        }
        self.cluster_renew(cluster, node, advertise, lease).await?;
        Ok(())
    }

    /// Renews (or takes again, after it lapsed) the node's lease; returns
    /// whether the lease was still valid.
    pub async fn cluster_renew(
        &self,
        cluster: &str,
        node: &str,
        advertise: &str,
        lease: Duration,
    ) -> Result<bool, ClusterError> {
        let pool = pg(self)?;
        let lease_ns = i64::try_from(lease.as_nanos()).unwrap_or(i64::MAX);
        let mut tx = pool.begin().await?;
        let before: Option<(bool,)> = sqlx::query_as(&format!(
            "SELECT lease_until_ns > {SERVER_NOW} FROM cluster_members WHERE node = $1 FOR UPDATE"
        ))
        .bind(node)
        .fetch_optional(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "INSERT INTO cluster_members (node, address, lease_until_ns, joined_ns, cluster) \
             VALUES ($1, $2, {SERVER_NOW} + $3, {SERVER_NOW}, $4) \
             ON CONFLICT (node) DO UPDATE SET address = excluded.address, \
             lease_until_ns = excluded.lease_until_ns, cluster = excluded.cluster, \
             joined_ns = CASE WHEN cluster_members.lease_until_ns > {SERVER_NOW} \
                 THEN cluster_members.joined_ns ELSE excluded.joined_ns END"
        ))
        .bind(node)
        .bind(advertise)
        .bind(lease_ns)
        .bind(cluster)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(before.is_some_and(|(alive,)| alive))
    }

    /// Gives the lease up (a clean stop): the others take the node's
    /// buckets at their next rebalance instead of after the lease.
    pub async fn cluster_leave(&self, cluster: &str, node: &str) -> Result<(), ClusterError> {
        sqlx::query(
            "UPDATE cluster_members SET lease_until_ns = 0 WHERE node = $1 AND cluster = $2",
        )
        .bind(node)
        .bind(cluster)
        .execute(pg(self)?)
        .await?;
        Ok(())
    }

    /// The members of `cluster`, alive or not, by name.
    pub async fn cluster_members(&self, cluster: &str) -> Result<Vec<Member>, ClusterError> {
        let rows = sqlx::query(&format!(
            "SELECT node, address, lease_until_ns, lease_until_ns > {SERVER_NOW} AS alive \
             FROM cluster_members WHERE cluster = $1 ORDER BY node"
        ))
        .bind(cluster)
        .fetch_all(pg(self)?)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Member {
                    node: r.try_get(0)?,
                    address: r.try_get(1)?,
                    lease_until_ns: r.try_get(2)?,
                    alive: r.try_get(3)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// The newest epoch of `cluster`, if any.
    pub async fn cluster_epoch(&self, cluster: &str) -> Result<Option<Epoch>, ClusterError> {
        let pool = pg(self)?;
        let mut conn = pool.acquire().await?;
        read_epoch(&mut conn, cluster).await
    }

    /// Makes the newest epoch match the live members: when they differ
    /// from the newest epoch's, writes epoch + 1 with every bucket assigned
    /// by rendezvous hashing, under the exclusive epoch lock (so no fenced
    /// write of the old epoch is in flight). Any node may call it; the
    /// lock and the re-check make concurrent calls write one epoch.
    pub async fn cluster_rebalance(
        &self,
        cluster: &str,
        buckets: u32,
    ) -> Result<Epoch, ClusterError> {
        let pool = pg(self)?;
        let live = live_members(pool, cluster).await?;
        if let Some(e) = self.cluster_epoch(cluster).await? {
            if e.members == live {
                return Ok(e);
            }
        }
        let mut conn = pool.acquire().await?;
        let mut tx = conn.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(EPOCH_LOCK)
            .execute(&mut *tx)
            .await?;
        let live = live_members(&mut *tx, cluster).await?;
        let current = read_epoch(&mut tx, cluster).await?;
        if let Some(e) = &current {
            if e.members == live {
                return Ok(e.clone());
            }
        }
        let epoch = current.map_or(1, |e| e.epoch + 1);
        let owners: Vec<String> = (0..buckets)
            .map(|b| rendezvous_owner(&live, b).unwrap_or_default().to_owned())
            .collect();
        sqlx::query(&format!(
            "INSERT INTO cluster_epochs (cluster, epoch, started_ns, members) VALUES ($1, $2, {SERVER_NOW}, $3)"
        ))
        .bind(cluster)
        .bind(epoch)
        .bind(live.join(","))
        .execute(&mut *tx)
        .await?;
        if !live.is_empty() {
            let mut qb = sqlx::QueryBuilder::<sqlx::Postgres>::new(
                "INSERT INTO cluster_ownership (cluster, epoch, bucket, node) ",
            );
            qb.push_values(owners.iter().enumerate(), |mut b, (bucket, node)| {
                b.push_bind(cluster)
                    .push_bind(epoch)
                    .push_bind(bucket as i32)
                    .push_bind(node.clone());
            });
            qb.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(Epoch {
            epoch,
            members: live,
            owners,
        })
    }

    /// The owners' state of every subject of `cluster`.
    pub async fn rate_states(
        &self,
        cluster: &str,
    ) -> Result<HashMap<(SubjectKind, String), SubjectState>, ClusterError> {
        let rows: Vec<(String, String, i64, f64)> = sqlx::query_as(
            "SELECT kind, subject, window_end_ns, avg_rate_kbps FROM rate_state WHERE cluster = $1",
        )
        .bind(cluster)
        .fetch_all(pg(self)?)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(k, s, end, avg)| {
                Some((
                    (SubjectKind::parse(&k)?, s),
                    SubjectState {
                        window_end_ns: end,
                        avg_rate_kbps: avg,
                    },
                ))
            })
            .collect())
    }

    /// Writes computed windows under fencing, all or nothing: in one
    /// transaction holding the shared epoch lock, the node's lease must be
    /// valid on the database's clock, `epoch` must be the newest and the
    /// node must own every row's bucket in it; each subject's state must
    /// still be the one the window continues from (so a window is written
    /// once whoever computes it). Returns the rows written, or
    /// [`ClusterError::Fenced`] naming the check that failed.
    pub async fn write_owner_rates(
        &self,
        cluster: &str,
        node: &str,
        epoch: i64,
        rows: &[OwnerRate],
    ) -> Result<usize, ClusterError> {
        let pool = pg(self)?;
        let mut conn = pool.acquire().await?;
        let mut tx = conn.begin().await?;
        fence(&mut tx, cluster, node, epoch, rows.iter().map(|r| r.bucket)).await?;
        let mut written = 0;
        for r in rows {
            let moved = match r.previous_end_ns {
                None => sqlx::query(
                    "INSERT INTO rate_state (cluster, kind, subject, window_end_ns, avg_rate_kbps, epoch, node) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                )
                .bind(cluster)
                .bind(r.kind.as_str())
                .bind(&r.subject)
                .bind(r.window_end_ns)
                .bind(r.avg_rate_kbps)
                .bind(epoch)
                .bind(node)
                .execute(&mut *tx)
                .await?
                .rows_affected(),
                Some(prev) => sqlx::query(
                    "UPDATE rate_state SET window_end_ns = $4, avg_rate_kbps = $5, epoch = $6, node = $7 \
                     WHERE cluster = $1 AND kind = $2 AND subject = $3 AND window_end_ns = $8",
                )
                .bind(cluster)
                .bind(r.kind.as_str())
                .bind(&r.subject)
                .bind(r.window_end_ns)
                .bind(r.avg_rate_kbps)
                .bind(epoch)
                .bind(node)
                .bind(prev)
                .execute(&mut *tx)
                .await?
                .rows_affected(),
            };
            if moved != 1 {
                return Err(ClusterError::Fenced(format!(
                    "the state of {} {:?} moved on under the writer",
                    r.kind.as_str(),
                    r.subject
                )));
            }
            sqlx::query(
                &format!("INSERT INTO rates (at_ns, interval_ns, subject, name, rate_kbps, avg_rate_kbps, records, node, epoch, computed_ns) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, {SERVER_NOW})"),
            )
            .bind(r.window_end_ns)
            .bind(r.interval_ns)
            .bind(r.kind.as_str())
            .bind(&r.name)
            .bind(r.rate_kbps)
            .bind(r.avg_rate_kbps)
            .bind(r.records)
            .bind(node)
            .bind(epoch)
            .execute(&mut *tx)
            .await?;
            written += 1;
        }
        tx.commit().await?;
        Ok(written)
    }

    /// Publishes the policy the policy server runs (its JSON); the version
    /// goes up only when the text changed. Returns the version.
    pub async fn publish_policy(&self, body: &str) -> Result<i64, sqlx::Error> {
        let now = crate::now_ns();
        let q = "INSERT INTO published_policy (id, version, body, published_ns) VALUES (1, 1, $1, $2) \
                 ON CONFLICT (id) DO UPDATE SET version = published_policy.version + 1, body = excluded.body, \
                 published_ns = excluded.published_ns WHERE published_policy.body <> excluded.body";
        crate::on_pool!(self, pool, D => sqlx::query::<D>(q).bind(body).bind(now).execute(pool).await.map(|_| ()))?;
        let (v,): (i64,) = crate::on_pool!(self, pool, D => sqlx::query_as::<D, (i64,)>(
            "SELECT version FROM published_policy WHERE id = 1").fetch_one(pool).await)?;
        Ok(v)
    }

    /// The published policy's version, if one was published.
    pub async fn published_policy_version(&self) -> Result<Option<i64>, sqlx::Error> {
        let r: Option<(i64,)> = crate::on_pool!(self, pool, D => sqlx::query_as::<D, (i64,)>(
            "SELECT version FROM published_policy WHERE id = 1").fetch_optional(pool).await)?;
        Ok(r.map(|(v,)| v))
    }

    /// The published policy: `(version, JSON)`.
    pub async fn published_policy(&self) -> Result<Option<(i64, String)>, sqlx::Error> {
        crate::on_pool!(self, pool, D => sqlx::query_as::<D, (i64, String)>(
            "SELECT version, body FROM published_policy WHERE id = 1").fetch_optional(pool).await)
    }

    /// The rows the cluster's owners wrote after row `after_id`, oldest
    /// first, at most `limit`: `(id, row)`. The highest id so far is
    /// [`Db::max_rate_id`].
    pub async fn owner_rates_after(
        &self,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<(i64, crate::RateRow)>, sqlx::Error> {
        let q = "SELECT id, at_ns, interval_ns, subject, name, rate_kbps, avg_rate_kbps, records FROM rates \
                 WHERE id > $1 AND node IS NOT NULL ORDER BY id LIMIT $2";
        type Raw = (i64, i64, i64, String, String, f64, f64, i64);
        let rows: Vec<Raw> = crate::on_pool!(self, pool, D =>
            sqlx::query_as(q).bind(after_id).bind(limit).fetch_all(pool).await)?;
        Ok(rows
            .into_iter()
            .map(
                |(id, at_ns, interval_ns, subject, name, rate_kbps, avg_rate_kbps, records)| {
                    (
                        id,
                        crate::RateRow {
                            at_ns,
                            interval_ns,
                            subject,
                            name,
                            rate_kbps,
                            avg_rate_kbps,
                            records,
                        },
                    )
                },
            )
            .collect())
    }

    /// The highest id of `rates` (0 when empty).
    pub async fn max_rate_id(&self) -> Result<i64, sqlx::Error> {
        let (v,): (Option<i64>,) = crate::on_pool!(self, pool, D =>
            sqlx::query_as("SELECT MAX(id) FROM rates").fetch_one(pool).await)?;
        Ok(v.unwrap_or(0))
    }

    /// The combined partial sums of every node for slots `[from, to]`:
    /// `(kind, subject, slot, bytes, records)`.
    pub async fn combined_partials(
        &self,
        cluster: &str,
        from_slot: i64,
        to_slot: i64,
    ) -> Result<Vec<(SubjectKind, String, i64, f64, i64)>, ClusterError> {
        let rows: Vec<(String, String, i64, f64, i64)> = sqlx::query_as(
            "SELECT kind, subject, slot, SUM(bytes), CAST(SUM(records) AS BIGINT) FROM rate_partials \
             WHERE cluster = $1 AND slot BETWEEN $2 AND $3 GROUP BY kind, subject, slot",
        )
        .bind(cluster)
        .bind(from_slot)
        .bind(to_slot)
        .fetch_all(pg(self)?)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(k, s, slot, b, n)| Some((SubjectKind::parse(&k)?, s, slot, b, n)))
            .collect())
    }
}

/// The fencing of an owner's write, in its transaction: takes the epoch
/// lock shared (a new epoch waits for this transaction), then checks on
/// the database's clock that `node`'s lease is valid, that `epoch` is the
/// newest and that `node` owns every bucket of `buckets` in it.
pub(crate) async fn fence(
    tx: &mut sqlx::PgConnection,
    cluster: &str,
    node: &str,
    epoch: i64,
    mut buckets: impl Iterator<Item = u32>,
) -> Result<(), ClusterError> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
        .bind(EPOCH_LOCK)
        .execute(&mut *tx)
        .await?;
    let alive: Option<(bool,)> = sqlx::query_as(&format!(
        "SELECT lease_until_ns > {SERVER_NOW} FROM cluster_members WHERE node = $1 AND cluster = $2"
    ))
    .bind(node)
    .bind(cluster)
    .fetch_optional(&mut *tx)
    .await?;
    if !alive.is_some_and(|(a,)| a) {
        return Err(ClusterError::Fenced(format!(
            "node {node:?} holds no valid lease"
        )));
    }
    let (newest,): (Option<i64>,) =
        sqlx::query_as("SELECT MAX(epoch) FROM cluster_epochs WHERE cluster = $1")
            .bind(cluster)
            .fetch_one(&mut *tx)
            .await?;
    if newest != Some(epoch) {
        return Err(ClusterError::Fenced(format!(
            "epoch {epoch} is not the newest ({newest:?})"
        )));
    }
    let owned: Vec<(i32,)> = sqlx::query_as(
        "SELECT bucket FROM cluster_ownership WHERE cluster = $1 AND epoch = $2 AND node = $3",
    )
    .bind(cluster)
    .bind(epoch)
    .bind(node)
    .fetch_all(&mut *tx)
    .await?;
    let owned: BTreeSet<u32> = owned.into_iter().map(|(b,)| b as u32).collect();
    if let Some(b) = buckets.find(|b| !owned.contains(b)) {
        return Err(ClusterError::Fenced(format!(
            "node {node:?} does not own bucket {b} in epoch {epoch}"
        )));
    }
    Ok(())
}

async fn live_members<'e, E>(e: E, cluster: &str) -> Result<Vec<String>, sqlx::Error>
where
    E: sqlx::PgExecutor<'e>,
{
    let rows: Vec<(String,)> = sqlx::query_as(&format!(
        "SELECT node FROM cluster_members WHERE cluster = $1 AND lease_until_ns > {SERVER_NOW} ORDER BY node"
    ))
    .bind(cluster)
    .fetch_all(e)
    .await?;
    Ok(rows.into_iter().map(|(n,)| n).collect())
}

async fn read_epoch(
    conn: &mut sqlx::PgConnection,
    cluster: &str,
) -> Result<Option<Epoch>, ClusterError> {
    let head: Option<(i64, String)> = sqlx::query_as(
        "SELECT epoch, members FROM cluster_epochs WHERE cluster = $1 ORDER BY epoch DESC LIMIT 1",
    )
    .bind(cluster)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((epoch, members)) = head else {
        return Ok(None);
    };
    let rows: Vec<(i32, String)> = sqlx::query_as(
        "SELECT bucket, node FROM cluster_ownership WHERE cluster = $1 AND epoch = $2 ORDER BY bucket",
    )
    .bind(cluster)
    .bind(epoch)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Some(Epoch {
        epoch,
        members: members
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        owners: rows.into_iter().map(|(_, n)| n).collect(),
    }))
}
