//! The per-node partial sums a receiving node adds to `rate_partials` in
//! the transaction that stores the records (so a record counts once iff it
//! is stored once).

use qosloop_schema::bandwidth::{scale, window::TimeBuckets, Classifier, SubjectKind};
use qosloop_schema::FlowRecord;
use std::collections::BTreeMap;
use std::sync::Arc;

/// How a node tallies the records it stores: its cluster and name, the
/// slot width (the cluster's rate interval) and the published policy's
/// classifier.
#[derive(Clone, Debug)]
pub struct Tally {
    pub cluster: String,
    pub node: String,
    pub width_ns: i64,
    pub classifier: Arc<Classifier>,
}

/// `(kind, subject, slot)` → `(bytes, records)`; the subjects borrow from
/// the tally's classifier.
pub(crate) type Partials<'a> = BTreeMap<(SubjectKind, &'a str, i64), (f64, i64)>;

impl Tally {
    /// The partial sums of `records`: each record's (sampling-scaled)
    /// bytes spread over its `[start_ns, end_ns]` into slots of the rate
    /// interval, for every subject it counts for; the record itself counts
    /// in the slot of its end.
    pub(crate) fn partials<'r>(
        &self,
        records: impl Iterator<Item = &'r FlowRecord>,
    ) -> Partials<'_> {
        let mut out = Partials::new();
        let width = self.width_ns.max(1);
        for r in records {
            // Per stored record: classified as it is (subjects do not
            // depend on the counters), only its bytes scaled.
            let keys = self.classifier.subject_keys(r);
            if keys.is_empty() {
                continue;
            }
            let start = i64::try_from(r.start_ns).unwrap_or(i64::MAX);
            let end = i64::try_from(r.end_ns).unwrap_or(i64::MAX);
            let mut tb = TimeBuckets::new(width);
            tb.add(start, end, scale(r.bytes, r.sampling_interval));
            let end_slot = end.max(start).div_euclid(width);
            for (kind, key) in keys {
                for (slot, bytes) in tb.buckets() {
                    out.entry((kind, key, slot)).or_default().0 += bytes;
                }
                out.entry((kind, key, end_slot)).or_default().1 += 1;
            }
        }
        out
    }
}

/// Adds `partials` to the node's rows, in key order (two transactions of
/// one node lock the rows in the same order).
pub(crate) async fn add_partials(
    tx: &mut sqlx::PgConnection,
    tally: &Tally,
    partials: &Partials<'_>,
) -> Result<(), sqlx::Error> {
    let rows: Vec<_> = partials.iter().collect();
    for chunk in rows.chunks(1000) {
        let mut qb = sqlx::QueryBuilder::<sqlx::Postgres>::new(
            "INSERT INTO rate_partials (cluster, kind, subject, slot, node, bytes, records) ",
        );
        qb.push_values(chunk, |mut b, ((kind, subject, slot), (bytes, records))| {
            b.push_bind(&tally.cluster)
                .push_bind(kind.as_str())
                .push_bind(subject)
                .push_bind(*slot)
                .push_bind(&tally.node)
                .push_bind(*bytes)
                .push_bind(*records);
        });
        qb.push(
            " ON CONFLICT (cluster, kind, subject, slot, node) DO UPDATE SET \
             bytes = rate_partials.bytes + excluded.bytes, records = rate_partials.records + excluded.records",
        );
        qb.build().execute(&mut *tx).await?;
    }
    Ok(())
}

/// The advisory lock of pruning: one node prunes at a time (the others
/// skip the run), so that deletes never queue behind each other.
const PRUNE_LOCK: i64 = 7_347_303;

/// What one run of [`Db::prune_rate_partials`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Rows deleted.
    pub rows: u64,
    /// Whether this node held the lock (another node pruning: `false`).
    pub ran: bool,
}

impl crate::db::Db {
    /// Deletes the partial sums every owner has consumed, in batches of at
    /// most `batch` rows and `max_batches` transactions: a row is consumed
    /// when its subject's state (`rate_state`, written by whichever owner
    /// computed the window) is past its slot. Rows of subjects without a
    /// state (no owner measures them: not in the published policy, or
    /// before an owner's first window) are deleted once their slot ended
    /// more than `horizon` before the database's clock. Safe with several
    /// nodes: a transaction-scoped advisory lock taken with `try` lets one
    /// node prune at a time, and rows a writer holds are skipped (`SKIP
    /// LOCKED`), so the records' transactions never wait for it; deleting
    /// a consumed row twice is deleting nothing.
    pub async fn prune_rate_partials(
        &self,
        cluster: &str,
        width_ns: i64,
        horizon: std::time::Duration,
        batch: i64,
        max_batches: u32,
    ) -> Result<Pruned, super::ClusterError> {
        let pool = super::pg(self)?;
        let width = width_ns.max(1);
        let horizon_ns = i64::try_from(horizon.as_nanos()).unwrap_or(i64::MAX);
        let mut out = Pruned::default();
        for _ in 0..max_batches {
            let mut tx = pool.begin().await?;
            let (held,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_xact_lock($1)")
                .bind(PRUNE_LOCK)
                .fetch_one(&mut *tx)
                .await?;
            if !held {
                return Ok(out);
            }
            out.ran = true;
            let deleted = sqlx::query(&format!(
                "DELETE FROM rate_partials WHERE ctid = ANY(ARRAY(\
                   SELECT p.ctid FROM rate_partials p LEFT JOIN rate_state s \
                     ON s.cluster = p.cluster AND s.kind = p.kind AND s.subject = p.subject \
                   WHERE p.cluster = $1 AND ( \
                     (s.subject IS NOT NULL AND p.slot < s.window_end_ns / $2) \
                     OR (s.subject IS NULL AND (p.slot + 1) * $2 < {} - $3)) \
                   LIMIT $4 FOR UPDATE OF p SKIP LOCKED))",
                super::SERVER_NOW
            ))
            .bind(cluster)
            .bind(width)
            .bind(horizon_ns)
            .bind(batch.max(1))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            out.rows += deleted;
            if deleted < batch.max(1) as u64 {
                break;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qosloop_schema::{BusinessRule, FlowSpec, Link, PolicySet};

    #[test]
    fn bytes_spread_over_slots_and_count_for_rule_and_link() {
        let rule = BusinessRule {
            dn: "cn=r".into(),
            name: "r".into(),
            priority: 1,
            enabled: true,
            roles: vec![],
            flows: vec![FlowSpec {
                proto: Some(17),
                ..Default::default()
            }],
            users: vec![],
            per_user: false,
            band_basis: Default::default(),
            service_class: "gold".into(),
            link: "l".into(),
        };
        let link = Link {
            dn: "cn=l".into(),
            name: "l".into(),
            capacity: qosloop_schema::Kbps(1000),
            traffic: vec![],
        };
        let policy = PolicySet {
            rules: vec![rule],
            links: vec![link],
            ..Default::default()
        };
        let t = Tally {
            cluster: "c".into(),
            node: "n".into(),
            width_ns: 1_000_000_000,
            classifier: Arc::new(Classifier::new(&policy)),
        };
        let rec = FlowRecord {
            proto: 17,
            bytes: 3000,
            start_ns: 500_000_000,
            end_ns: 2_000_000_000,
            sampling_interval: Some(2),
            ..Default::default()
        };
        let p = t.partials([rec].iter());
        let get = |k: SubjectKind, s: &str, slot| p.get(&(k, s, slot)).copied();
        assert_eq!(get(SubjectKind::Flow, "cn=r", 0), Some((2000.0, 0)));
        assert_eq!(get(SubjectKind::Flow, "cn=r", 1), Some((4000.0, 0)));
        assert_eq!(get(SubjectKind::Flow, "cn=r", 2), Some((0.0, 1)));
        assert_eq!(get(SubjectKind::Link, "l", 1), Some((4000.0, 0)));
    }
}
