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
