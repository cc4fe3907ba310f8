//! The policy server's SQL: reading new flow records exactly once, storing
//! rates, decisions, enforcers and their reports, and the reads of the web
//! API. The SQL is `qosloop_store`'s (one storage layer for every process,
//! both dialects); this module adds what the policy server makes of it:
//! the cursor that reads each record once, and errors that say what was
//! being done.
//!
//! # What "new records" means
//!
//! Records are read by their `id` (SQLite rowid, PostgreSQL `BIGSERIAL`),
//! not by time: `id` is indexed, cheap to range-scan, and every record
//! counts once however late its `end_ns` is. But ids become visible out of
//! order on PostgreSQL (two collector transactions take ids 10 and 11;
//! 11 commits first). So the [`FlowCursor`] keeps the lowest id not seen
//! yet (`next`) and the set of ids above it that it has already counted;
//! each poll reads `id >= next` and skips the counted ones. A gap (an id
//! never seen) holds `next` back until it is filled, or until it is older
//! than `gap_timeout` (a rolled-back transaction leaves a permanent gap) —
//! then it is stepped over. A record committed more than `gap_timeout`
//! after its id was taken is still counted if its id is above `next`, and
//! is counted as `late_skipped` otherwise.

use crate::bandwidth::Rates;
use crate::engine::Changes;
use qosloop_schema::bandwidth::user_subject;
use qosloop_schema::{Decision, EnforcementReport, FlowRecord};
use qosloop_store::Db;
pub use qosloop_store::{EnforcerRow, RateRow};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// What went wrong with the database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database query failed ({what}): {source}")]
    Sql {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

fn sql(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Sql { what, source }
}

/// The policy server's view of the database.
#[derive(Clone, Debug)]
pub struct Store {
    db: Db,
}

pub use qosloop_schema::bandwidth::scaled;

/// Counts of one read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    pub records: u64,
    /// Rows whose values do not form a flow record (bad address, negative
    /// counter): skipped and counted.
    pub malformed: u64,
    /// Ids stepped over after `gap_timeout`.
    pub gaps_skipped: u64,
}

/// Reads each flow record once, in id order (see the module doc).
#[derive(Debug)]
pub struct FlowCursor {
    next: i64,
    counted_above: BTreeSet<i64>,
    gap_since: Option<Instant>,
    gap_timeout: Duration,
    page: i64,
}

impl FlowCursor {
    /// A cursor that starts after the records stored so far.
    pub async fn at_end(store: &Store, gap_timeout: Duration) -> Result<FlowCursor, StoreError> {
        let max = store
            .db
            .max_flow_id()
            .await
            .map_err(sql("reading the last flow id"))?;
        Ok(FlowCursor::from_id(max + 1, gap_timeout))
    }

    /// A cursor whose first record is `id`.
    pub fn from_id(id: i64, gap_timeout: Duration) -> FlowCursor {
        FlowCursor {
            next: id,
            counted_above: BTreeSet::new(),
            gap_since: None,
            gap_timeout,
            page: 20_000,
        }
    }

    /// The lowest id not counted yet.
    pub fn next_id(&self) -> i64 {
        self.next
    }

    /// Passes every record not counted before to `each`.
    pub async fn read_new(
        &mut self,
        store: &Store,
        mut each: impl FnMut(&FlowRecord),
    ) -> Result<ReadStats, StoreError> {
        let mut stats = ReadStats::default();
        let mut from = self.next;
        loop {
            let rows = store
                .db
                .flows_from(from, self.page)
                .await
                .map_err(sql("reading new flow records"))?;
            let full = rows.len() as i64 == self.page;
            for row in rows {
                let id = row.id;
                from = id + 1;
                if !self.counted_above.insert(id) {
                    continue;
                }
                // Rates are computed from what was on the wire: sampled
                // counters are scaled here, on the one read path of the
                // bandwidth manager.
                match row.record.map(scaled) {
                    Some(r) => {
                        each(&r);
                        stats.records += 1;
                    }
                    None => stats.malformed += 1,
                }
            }
            if !full {
                break;
            }
        }
        stats.gaps_skipped = self.advance(Instant::now());
        Ok(stats)
    }

    fn advance(&mut self, now: Instant) -> u64 {
        let mut skipped = 0;
        loop {
            while self.counted_above.first() == Some(&self.next) {
                self.counted_above.pop_first();
                self.next += 1;
            }
            let Some(&first) = self.counted_above.first() else {
                self.gap_since = None;
                return skipped;
            };
            let since = *self.gap_since.get_or_insert(now);
            if now.duration_since(since) < self.gap_timeout {
                return skipped;
            }
            skipped += (first - self.next) as u64;
            self.next = first;
            self.gap_since = None;
        }
    }
}

impl Store {
    pub fn new(db: Db) -> Store {
        Store { db }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Stores one interval's rates: every link, and the policed flows and
    /// users of per-user rules (subject `user`, named by
    /// `qosloop_schema::bandwidth::user_subject`) that carried traffic or
    /// still have an average above 0.5 kbit/s (idle flows would otherwise
    /// fill the table at 100k rows per interval).
    pub async fn insert_rates(&self, rates: &Rates) -> Result<(), StoreError> {
        let row = |subject: &str, r: &crate::bandwidth::SubjectRate| RateRow {
            at_ns: rates.at_ns,
            interval_ns: rates.interval_ns,
            subject: subject.to_owned(),
            name: r.name.clone(),
            rate_kbps: r.rate_kbps,
            avg_rate_kbps: r.avg_rate_kbps,
            records: r.records as i64,
        };
        let rows: Vec<RateRow> = rates
            .links
            .iter()
            .map(|l| row("link", l))
            .chain(
                rates
                    .flows
                    .iter()
                    .filter(|f| f.records > 0 || f.avg_rate_kbps > 0.5)
                    .map(|f| row("flow", f)),
            )
            .chain(
                rates
                    .users
                    .iter()
                    .filter(|u| u.records > 0 || u.avg_rate_kbps > 0.5)
                    .map(|u| RateRow {
                        name: user_subject(&u.key, &u.name),
                        ..row("user", u)
                    }),
            )
            .collect();
        self.db
            .insert_rates(&rows)
            .await
            .map_err(sql("storing rates"))
    }

    /// Stores every change of one evaluation with its reason.
    pub async fn insert_decisions(&self, changes: &Changes) -> Result<(), StoreError> {
        let installed: Vec<&Decision> = changes.installed.iter().map(|d| &**d).collect();
        let removed: Vec<&Decision> = changes.removed.iter().map(|d| &**d).collect();
        self.db
            .insert_decisions(&installed, &removed)
            .await
            .map_err(sql("storing decisions"))
    }

    /// The last stored state of every decision not removed since, for the
    /// engine to resume after a restart.
    pub async fn latest_decisions(&self) -> Result<Vec<Decision>, StoreError> {
        self.db
            .latest_decisions()
            .await
            .map_err(sql("reading the last decisions"))
    }

    /// The last stored average of each subject newer than `since_ns`.
    pub async fn latest_averages(
        &self,
        since_ns: i64,
    ) -> Result<Vec<(String, String, f64)>, StoreError> {
        self.db
            .latest_averages(since_ns)
            .await
            .map_err(sql("reading the last averages"))
    }

    /// Records an enforcer connecting, being seen, or leaving.
    pub async fn upsert_enforcer(
        &self,
        name: &str,
        roles: &[String],
        address: &str,
        state: &str,
    ) -> Result<(), StoreError> {
        self.db
            .upsert_enforcer(name, roles, address, state)
            .await
            .map_err(sql("storing an enforcer"))
    }

    /// Forgets disconnected enforcers last seen before `oldest_ns`, and
    /// all but the `keep` most recently seen disconnected ones (a PEPID
    /// changes with every enforcer restart: the table must not grow with
    /// them). Returns how many rows went.
    pub async fn prune_enforcers(&self, keep: i64, oldest_ns: i64) -> Result<u64, StoreError> {
        self.db
            .prune_enforcers(keep, oldest_ns)
            .await
            .map_err(sql("forgetting old enforcers"))
    }

    /// The kernel counters `enforcer` reported last, replacing the previous.
    pub async fn replace_counters(
        &self,
        enforcer: &str,
        r: &qosloop_schema::AccountingReport,
    ) -> Result<(), StoreError> {
        self.db
            .replace_counters(enforcer, r)
            .await
            .map_err(sql("storing an enforcer's kernel counters"))
    }

    pub async fn insert_report(
        &self,
        enforcer: &str,
        r: &EnforcementReport,
    ) -> Result<(), StoreError> {
        self.db
            .insert_report(enforcer, r)
            .await
            .map_err(sql("storing an enforcement report"))
    }

    /// Records a change of the policy repository (`policy_audit`).
    pub async fn insert_audit(
        &self,
        at_ns: u64,
        source: &str,
        dn: &str,
        change: &str,
        detail: Option<&str>,
    ) -> Result<(), StoreError> {
        self.db
            .insert_audit(at_ns, source, dn, change, detail)
            .await
            .map_err(sql("storing a policy audit event"))
    }

    pub async fn enforcers(&self) -> Result<Vec<EnforcerRow>, StoreError> {
        self.db.enforcers().await.map_err(sql("reading enforcers"))
    }

    /// Reports of `enforcer`, oldest first: (decision id, version, outcome).
    pub async fn reports(&self, enforcer: &str) -> Result<Vec<(i64, i64, String)>, StoreError> {
        self.db
            .reports(enforcer)
            .await
            .map_err(sql("reading enforcement reports"))
    }

    /// The rates of the last `limit` rows, newest first.
    pub async fn recent_rates(&self, limit: i64) -> Result<Vec<RateRow>, StoreError> {
        self.db
            .recent_rates(limit)
            .await
            .map_err(sql("reading rates"))
    }

    /// The last `limit` decision changes, newest first:
    /// (issued_ns, kind, band, body JSON).
    pub async fn recent_decisions(
        &self,
        limit: i64,
    ) -> Result<Vec<(i64, String, String, String)>, StoreError> {
        self.db
            .recent_decisions(limit)
            .await
            .map_err(sql("reading decisions"))
    }

    /// The last `limit` flow records, newest first.
    pub async fn recent_flows(&self, limit: i64) -> Result<Vec<FlowRecord>, StoreError> {
        let rows = self
            .db
            .recent_flows(limit)
            .await
            .map_err(sql("reading flows"))?;
        Ok(rows.into_iter().filter_map(|r| r.record).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampled_counters_are_scaled_for_rates() {
        // The mapping of rows (intervals below 1 are no record) is
        // qosloop_store's, tested there.
        let sampled = FlowRecord {
            packets: 3,
            bytes: 180,
            sampling_interval: Some(100),
            ..FlowRecord::default()
        };
        let s = scaled(sampled);
        assert_eq!((s.packets, s.bytes), (300, 18_000));
        let unsampled = scaled(FlowRecord {
            packets: 3,
            bytes: 180,
            ..FlowRecord::default()
        });
        assert_eq!((unsampled.packets, unsampled.bytes), (3, 180));
        // Scaling saturates instead of wrapping.
        let huge = FlowRecord {
            bytes: u64::MAX / 2,
            sampling_interval: Some(4),
            ..FlowRecord::default()
        };
        assert_eq!(scaled(huge).bytes, u64::MAX);
    }

    #[test]
    fn the_cursor_waits_for_gaps_then_steps_over_them() {
        let mut c = FlowCursor::from_id(10, Duration::from_secs(2));
        let t0 = Instant::now();
        // 10, 11 and 13 seen; 12 not (yet).
        for id in [10, 11, 13] {
            c.counted_above.insert(id);
        }
        assert_eq!(c.advance(t0), 0);
        assert_eq!(c.next_id(), 12, "holds at the gap");
        assert_eq!(c.advance(t0 + Duration::from_secs(1)), 0);
        assert_eq!(c.next_id(), 12);
        // 12 commits late: counted, and the cursor moves past 13.
        c.counted_above.insert(12);
        assert_eq!(c.advance(t0 + Duration::from_secs(1)), 0);
        assert_eq!(c.next_id(), 14);
        // 14 never comes (rolled back); 15 does.
        c.counted_above.insert(15);
        assert_eq!(c.advance(t0 + Duration::from_secs(2)), 0);
        assert_eq!(c.advance(t0 + Duration::from_secs(5)), 1);
        assert_eq!(c.next_id(), 16);
    }
}
