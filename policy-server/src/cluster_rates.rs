//! Rates from a collector cluster (`docs/cluster.md`): the owners of the
//! subjects write one `rates` row per subject and window; the decision
//! loop takes the newest row of each subject instead of reading records.
//! The policy server's own bandwidth manager (reading records) stays the
//! default and the paper's way.

use crate::bandwidth::{Rates, SubjectRate};
use crate::store::{Store, StoreError};
use qosloop_schema::bandwidth::user_subject;
use qosloop_schema::PolicySet;
use qosloop_store::RateRow;
use std::collections::HashMap;

/// The newest owner row of each subject, read incrementally by id.
#[derive(Debug)]
pub struct ClusterRates {
    after_id: i64,
    latest: HashMap<(String, String), RateRow>,
}

impl ClusterRates {
    /// Starts after the rows stored so far.
    pub async fn start(store: &Store) -> Result<ClusterRates, StoreError> {
        let after_id = store
            .db()
            .max_rate_id()
            .await
            .map_err(|source| StoreError::Sql {
                what: "reading the last rate id",
                source,
            })?;
        Ok(ClusterRates {
            after_id,
            latest: HashMap::new(),
        })
    }

    /// The rates of every subject of `policy` after the rows written since
    /// the last call; `None` when no owner wrote anything new.
    pub async fn read(
        &mut self,
        store: &Store,
        policy: &PolicySet,
    ) -> Result<Option<Rates>, StoreError> {
        let mut fresh = false;
        loop {
            let rows = store
                .db()
                .owner_rates_after(self.after_id, 10_000)
                .await
                .map_err(|source| StoreError::Sql {
                    what: "reading the cluster's rates",
                    source,
                })?;
            let full = rows.len() == 10_000;
            for (id, row) in rows {
                self.after_id = id;
                fresh = true;
                let key = (row.subject.clone(), row.name.clone());
                if self.latest.get(&key).is_none_or(|r| r.at_ns <= row.at_ns) {
                    self.latest.insert(key, row);
                }
            }
            if !full {
                break;
            }
        }
        if !fresh {
            return Ok(None);
        }
        Ok(Some(self.rates(policy)))
    }

    /// The newest rates in the policy's order (a subject without a row yet
    /// reads 0).
    fn rates(&self, policy: &PolicySet) -> Rates {
        let subject = |kind: &str, key: &str, name: &str| {
            let row = self.latest.get(&(kind.to_owned(), name.to_owned()));
            SubjectRate {
                key: key.to_owned(),
                name: name.to_owned(),
                rate_kbps: row.map_or(0.0, |r| r.rate_kbps),
                avg_rate_kbps: row.map_or(0.0, |r| r.avg_rate_kbps),
                records: row.map_or(0, |r| r.records.max(0) as u64),
            }
        };
        let newest = self.latest.values().max_by_key(|r| r.at_ns);
        Rates {
            at_ns: newest.map_or(0, |r| r.at_ns),
            interval_ns: newest.map_or(0, |r| r.interval_ns),
            flows: policy
                .rules
                .iter()
                .map(|r| subject("flow", &r.dn, &r.name))
                .collect(),
            // Each user of each per-user rule, as the records mode has
            // them (key the rule's DN, name the user).
            users: policy
                .rules
                .iter()
                .filter(|r| r.per_user)
                .flat_map(|r| r.users.iter().map(move |u| (r, u)))
                .map(|(r, u)| SubjectRate {
                    key: r.dn.clone(),
                    name: u.clone(),
                    ..subject("user", &r.dn, &user_subject(&r.dn, u))
                })
                .collect(),
            links: policy
                .links
                .iter()
                .map(|l| subject("link", &l.name, &l.name))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qosloop_schema::BusinessRule;

    fn row(subject: &str, name: &str, at_ns: i64, avg: f64) -> RateRow {
        RateRow {
            at_ns,
            interval_ns: 100,
            subject: subject.into(),
            name: name.into(),
            rate_kbps: avg * 2.0,
            avg_rate_kbps: avg,
            records: 3,
        }
    }

    #[test]
    fn the_owners_user_rows_become_the_per_user_rates() {
        let rule = BusinessRule {
            dn: "cn=u".into(),
            name: "u".into(),
            priority: 1,
            enabled: true,
            roles: vec![],
            flows: vec![],
            users: vec!["alice".into(), "bob".into()],
            per_user: true,
            band_basis: Default::default(),
            service_class: "gold".into(),
            link: "l".into(),
        };
        let policy = PolicySet {
            rules: vec![rule],
            ..Default::default()
        };
        let mut c = ClusterRates {
            after_id: 0,
            latest: HashMap::new(),
        };
        for r in [
            row("user", "alice@cn=u", 100, 40.0),
            row("user", "carol@cn=u", 100, 9.0),
        ] {
            c.latest.insert((r.subject.clone(), r.name.clone()), r);
        }
        let rates = c.rates(&policy);
        let alice = rates.user("cn=u", "alice").unwrap();
        assert_eq!(
            (alice.avg_rate_kbps, alice.rate_kbps, alice.records),
            (40.0, 80.0, 3)
        );
        // A user without a row yet reads 0; one the policy does not name is not there.
        assert_eq!(rates.user("cn=u", "bob").unwrap().avg_rate_kbps, 0.0);
        assert!(rates.user("cn=u", "carol").is_none());
        assert_eq!(rates.users.len(), 2);
    }
}
