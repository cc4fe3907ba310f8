//! The policy server's SQL: reading new flow records exactly once, storing
//! rates, decisions, enforcers and their reports, and the reads of the web
//! API. Works on SQLite and PostgreSQL through `qosloop_collector::Db`,
//! with runtime queries (no checked macros: two dialects).
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
use qosloop_collector::{now_ns, Db};
use qosloop_schema::{Decision, EnforcementReport, FlowRecord, ReportOutcome};
use serde::Serialize;
use std::collections::BTreeSet;
use std::net::IpAddr;
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

/// Runs `$body` with `$pool` bound to the pool and `$Db` to the sqlx
/// database type of whichever dialect `$db` is.
macro_rules! on_pool {
    ($db:expr, $pool:ident, $Db:ident => $body:expr) => {
        match $db {
            Db::Sqlite($pool) => {
                #[allow(dead_code)]
                type $Db = sqlx::Sqlite;
                $body
            }
            Db::Postgres($pool) => {
                #[allow(dead_code)]
                type $Db = sqlx::Postgres;
                $body
            }
        }
    };
}

/// The policy server's view of the database.
#[derive(Clone, Debug)]
pub struct Store {
    db: Db,
}

type FlowRow = (
    i64,
    String,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    Option<String>,
    Option<i64>,
);

fn flow_columns(db: &Db) -> &'static str {
    match db {
        Db::Sqlite(_) => {
            "id, src_addr, dst_addr, src_port, dst_port, proto, packets, bytes, start_ns, end_ns, \"user\", \
             CAST(sampling_interval AS BIGINT)"
        }
        Db::Postgres(_) => {
            "id, host(src_addr), host(dst_addr), CAST(src_port AS BIGINT), CAST(dst_port AS BIGINT), \
             CAST(proto AS BIGINT), packets, bytes, start_ns, end_ns, \"user\", \
             CAST(sampling_interval AS BIGINT)"
        }
    }
}

fn record_of(row: &FlowRow) -> Option<FlowRecord> {
    let (_, src, dst, sport, dport, proto, packets, bytes, start, end, user, sampling) = row;
    Some(FlowRecord {
        src_addr: src.parse::<IpAddr>().ok()?,
        dst_addr: dst.parse::<IpAddr>().ok()?,
        src_port: u16::try_from(*sport).ok()?,
        dst_port: u16::try_from(*dport).ok()?,
        proto: u8::try_from(*proto).ok()?,
        packets: u64::try_from(*packets).ok()?,
        bytes: u64::try_from(*bytes).ok()?,
        start_ns: u64::try_from(*start).ok()?,
        end_ns: u64::try_from(*end).ok()?,
        user: user.clone(),
        sampling_interval: match sampling {
            None => None,
            Some(n) => Some(u32::try_from(*n).ok().filter(|n| *n >= 1)?),
        },
        ..FlowRecord::default()
    })
}

/// The record with its counters scaled by its 1-in-N sampling interval:
/// what the traffic was, for everything that computes rates. Records keep
/// the raw counters and the interval in SQL (IPFIX/NetFlow exporters that
/// sample); a record without an interval counted every packet.
pub fn scaled(mut r: FlowRecord) -> FlowRecord {
    if let Some(n) = r.sampling_interval.filter(|n| *n > 1) {
        r.packets = r.packets.saturating_mul(u64::from(n));
        r.bytes = r.bytes.saturating_mul(u64::from(n));
    }
    r
}

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
        let q = "SELECT COALESCE(MAX(id), 0) FROM flows";
        let (max,): (i64,) =
            on_pool!(&store.db, pool, D => sqlx::query_as(q).fetch_one(pool).await)
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
        let q = format!(
            "SELECT {} FROM flows WHERE id >= $1 ORDER BY id LIMIT $2",
            flow_columns(&store.db)
        );
        let mut from = self.next;
        loop {
            let rows: Vec<FlowRow> = on_pool!(&store.db, pool, D => sqlx::query_as(&q)
                .bind(from)
                .bind(self.page)
                .fetch_all(pool)
                .await)
            .map_err(sql("reading new flow records"))?;
            let full = rows.len() as i64 == self.page;
            for row in &rows {
                let id = row.0;
                from = id + 1;
                if !self.counted_above.insert(id) {
                    continue;
                }
                // Rates are computed from what was on the wire: sampled
                // counters are scaled here, on the one read path of the
                // bandwidth manager.
                match record_of(row).map(scaled) {
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

/// A row of `enforcers`.
#[derive(Clone, Debug, Serialize)]
pub struct EnforcerRow {
    pub name: String,
    pub roles: String,
    pub address: Option<String>,
    pub state: String,
    pub connected_ns: i64,
    pub last_seen_ns: i64,
}

/// A row of `rates`.
#[derive(Clone, Debug, Serialize)]
pub struct RateRow {
    pub at_ns: i64,
    pub interval_ns: i64,
    pub subject: String,
    pub name: String,
    pub rate_kbps: f64,
    pub avg_rate_kbps: f64,
    pub records: i64,
}

impl Store {
    pub fn new(db: Db) -> Store {
        Store { db }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Stores one interval's rates: every link, and the policed flows that
    /// carried traffic or still have an average above 0.5 kbit/s (idle
    /// flows would otherwise fill the table at 100k rows per interval).
    pub async fn insert_rates(&self, rates: &Rates) -> Result<(), StoreError> {
        let rows: Vec<(&str, &crate::bandwidth::SubjectRate)> = rates
            .links
            .iter()
            .map(|l| ("link", l))
            .chain(
                rates
                    .flows
                    .iter()
                    .filter(|f| f.records > 0 || f.avg_rate_kbps > 0.5)
                    .map(|f| ("flow", f)),
            )
            .collect();
        for chunk in rows.chunks(1000) {
            on_pool!(&self.db, pool, D => {
                let mut qb = sqlx::QueryBuilder::<D>::new(
                    "INSERT INTO rates (at_ns, interval_ns, subject, name, rate_kbps, avg_rate_kbps, records) ",
                );
                qb.push_values(chunk, |mut b, (subject, r)| {
                    b.push_bind(rates.at_ns)
                        .push_bind(rates.interval_ns)
                        .push_bind(*subject)
                        .push_bind(r.name.clone())
                        .push_bind(r.rate_kbps)
                        .push_bind(r.avg_rate_kbps)
                        .push_bind(r.records as i64);
                });
                qb.build().execute(pool).await.map(|_| ())
            })
            .map_err(sql("storing rates"))?;
        }
        Ok(())
    }

    /// Stores every change of one evaluation with its reason.
    pub async fn insert_decisions(&self, changes: &Changes) -> Result<(), StoreError> {
        let rows: Vec<(&Decision, &str)> = changes
            .installed
            .iter()
            .map(|d| (&**d, kind_name(d)))
            .chain(changes.removed.iter().map(|d| (&**d, "remove")))
            .collect();
        let jsonb = matches!(self.db, Db::Postgres(_));
        for chunk in rows.chunks(500) {
            on_pool!(&self.db, pool, D => {
                let mut qb = sqlx::QueryBuilder::<D>::new(
                    "INSERT INTO decisions (decision_id, version, issued_ns, role, policy_dn, flow, kind, band, \
                     rate_kbps, avg_rate_kbps, link, link_load_kbps, body) ",
                );
                qb.push_values(chunk, |mut b, (d, kind)| {
                    b.push_bind(d.id as i64)
                        .push_bind(d.version as i64)
                        .push_bind(d.issued_ns as i64)
                        .push_bind(d.role.clone())
                        .push_bind(d.policy_dn.clone())
                        .push_bind(d.flow.to_string())
                        .push_bind(*kind)
                        .push_bind(d.reason.band.clone())
                        .push_bind(d.reason.rate_kbps)
                        .push_bind(d.reason.avg_rate_kbps)
                        .push_bind(d.reason.link.clone())
                        .push_bind(d.reason.link_load_kbps)
                        .push_bind(serde_json::to_string(d).unwrap_or_default());
                    if jsonb {
                        b.push_unseparated("::jsonb");
                    }
                });
                qb.build().execute(pool).await.map(|_| ())
            })
            .map_err(sql("storing decisions"))?;
        }
        Ok(())
    }

    /// The last stored state of every decision not removed since, for the
    /// engine to resume after a restart.
    pub async fn latest_decisions(&self) -> Result<Vec<Decision>, StoreError> {
        let body = match self.db {
            Db::Sqlite(_) => "d.body",
            Db::Postgres(_) => "d.body::text",
        };
        let q = format!(
            "SELECT d.kind, {body} FROM decisions d JOIN \
             (SELECT decision_id, MAX(id) AS id FROM decisions GROUP BY decision_id) last ON last.id = d.id"
        );
        let rows: Vec<(String, String)> =
            on_pool!(&self.db, pool, D => sqlx::query_as(&q).fetch_all(pool).await)
                .map_err(sql("reading the last decisions"))?;
        Ok(rows
            .into_iter()
            .filter(|(kind, _)| kind != "remove")
            .filter_map(|(_, body)| serde_json::from_str(&body).ok())
            .collect())
    }

    /// The last stored average of each subject newer than `since_ns`.
    pub async fn latest_averages(
        &self,
        since_ns: i64,
    ) -> Result<Vec<(String, String, f64)>, StoreError> {
        let q = "SELECT r.subject, r.name, r.avg_rate_kbps FROM rates r JOIN \
                 (SELECT subject, name, MAX(id) AS id FROM rates WHERE at_ns >= $1 GROUP BY subject, name) last \
                 ON last.id = r.id";
        on_pool!(&self.db, pool, D => sqlx::query_as(q).bind(since_ns).fetch_all(pool).await)
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
        let now = now_ns();
        let q = "INSERT INTO enforcers (name, roles, address, state, connected_ns, last_seen_ns) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO UPDATE SET \
                 roles = excluded.roles, address = excluded.address, state = excluded.state, \
                 connected_ns = CASE WHEN excluded.state = 'connected' AND enforcers.state <> 'connected' \
                 THEN excluded.connected_ns ELSE enforcers.connected_ns END, \
                 last_seen_ns = excluded.last_seen_ns";
        on_pool!(&self.db, pool, D => sqlx::query(q)
            .bind(name)
            .bind(roles.join(","))
            .bind(address)
            .bind(state)
            .bind(now)
            .bind(now)
            .execute(pool)
            .await
            .map(|_| ()))
        .map_err(sql("storing an enforcer"))?;
        Ok(())
    }

    /// Forgets disconnected enforcers last seen before `oldest_ns`, and
    /// all but the `keep` most recently seen disconnected ones (a PEPID
    /// changes with every enforcer restart: the table must not grow with
    /// them). Returns how many rows went.
    pub async fn prune_enforcers(&self, keep: i64, oldest_ns: i64) -> Result<u64, StoreError> {
        let q = "DELETE FROM enforcers WHERE state <> 'connected' AND (last_seen_ns < $1 OR name NOT IN \
                 (SELECT name FROM enforcers WHERE state <> 'connected' ORDER BY last_seen_ns DESC, name LIMIT $2))";
        let done = on_pool!(&self.db, pool, D => sqlx::query(q)
            .bind(oldest_ns)
            .bind(keep)
            .execute(pool)
            .await
            .map(|r| r.rows_affected()))
        .map_err(sql("forgetting old enforcers"))?;
        Ok(done)
    }

    pub async fn insert_report(
        &self,
        enforcer: &str,
        r: &EnforcementReport,
    ) -> Result<(), StoreError> {
        let (outcome, reason) = match &r.outcome {
            ReportOutcome::Installed => ("installed", None),
            ReportOutcome::Removed => ("removed", None),
            ReportOutcome::Failed { reason } => ("failed", Some(reason.clone())),
        };
        let q = "INSERT INTO enforcement_reports (enforcer, decision_id, version, outcome, reason, reconfig_ns, at_ns) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)";
        on_pool!(&self.db, pool, D => sqlx::query(q)
            .bind(enforcer)
            .bind(r.decision_id as i64)
            .bind(r.version as i64)
            .bind(outcome)
            .bind(reason)
            .bind(i64::try_from(r.reconfig_ns).unwrap_or(i64::MAX))
            .bind(i64::try_from(r.at_ns).unwrap_or(i64::MAX))
            .execute(pool)
            .await
            .map(|_| ()))
        .map_err(sql("storing an enforcement report"))?;
        Ok(())
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
        let q = "INSERT INTO policy_audit (at_ns, source, dn, change, detail) VALUES ($1, $2, $3, $4, $5)";
        on_pool!(&self.db, pool, D => sqlx::query(q)
            .bind(i64::try_from(at_ns).unwrap_or(i64::MAX))
            .bind(source)
            .bind(dn)
            .bind(change)
            .bind(detail)
            .execute(pool)
            .await
            .map(|_| ()))
        .map_err(sql("storing a policy audit event"))?;
        Ok(())
    }

    pub async fn enforcers(&self) -> Result<Vec<EnforcerRow>, StoreError> {
        let q = "SELECT name, roles, address, state, connected_ns, last_seen_ns FROM enforcers ORDER BY name";
        let rows: Vec<(String, String, Option<String>, String, i64, i64)> =
            on_pool!(&self.db, pool, D => sqlx::query_as(q).fetch_all(pool).await)
                .map_err(sql("reading enforcers"))?;
        Ok(rows
            .into_iter()
            .map(
                |(name, roles, address, state, connected_ns, last_seen_ns)| EnforcerRow {
                    name,
                    roles,
                    address,
                    state,
                    connected_ns,
                    last_seen_ns,
                },
            )
            .collect())
    }

    /// Reports of `enforcer`, oldest first: (decision id, version, outcome).
    pub async fn reports(&self, enforcer: &str) -> Result<Vec<(i64, i64, String)>, StoreError> {
        let q = "SELECT decision_id, version, outcome FROM enforcement_reports WHERE enforcer = $1 ORDER BY id";
        on_pool!(&self.db, pool, D => sqlx::query_as(q).bind(enforcer).fetch_all(pool).await)
            .map_err(sql("reading enforcement reports"))
    }

    /// The rates of the last `limit` rows, newest first.
    pub async fn recent_rates(&self, limit: i64) -> Result<Vec<RateRow>, StoreError> {
        let q = "SELECT at_ns, interval_ns, subject, name, rate_kbps, avg_rate_kbps, records FROM rates \
                 ORDER BY id DESC LIMIT $1";
        let rows: Vec<(i64, i64, String, String, f64, f64, i64)> =
            on_pool!(&self.db, pool, D => sqlx::query_as(q).bind(limit).fetch_all(pool).await)
                .map_err(sql("reading rates"))?;
        Ok(rows
            .into_iter()
            .map(
                |(at_ns, interval_ns, subject, name, rate_kbps, avg_rate_kbps, records)| RateRow {
                    at_ns,
                    interval_ns,
                    subject,
                    name,
                    rate_kbps,
                    avg_rate_kbps,
                    records,
                },
            )
            .collect())
    }

    /// The last `limit` decision changes, newest first:
    /// (issued_ns, kind, band, body JSON).
    pub async fn recent_decisions(
        &self,
        limit: i64,
    ) -> Result<Vec<(i64, String, String, String)>, StoreError> {
        let body = match self.db {
            Db::Sqlite(_) => "body",
            Db::Postgres(_) => "body::text",
        };
        let q = format!(
            "SELECT issued_ns, kind, band, {body} FROM decisions ORDER BY id DESC LIMIT $1"
        );
        on_pool!(&self.db, pool, D => sqlx::query_as(&q).bind(limit).fetch_all(pool).await)
            .map_err(sql("reading decisions"))
    }

    /// The last `limit` flow records, newest first.
    pub async fn recent_flows(&self, limit: i64) -> Result<Vec<FlowRecord>, StoreError> {
        let q = format!(
            "SELECT {} FROM flows ORDER BY id DESC LIMIT $1",
            flow_columns(&self.db)
        );
        let rows: Vec<FlowRow> =
            on_pool!(&self.db, pool, D => sqlx::query_as(&q).bind(limit).fetch_all(pool).await)
                .map_err(sql("reading flows"))?;
        Ok(rows.iter().filter_map(record_of).collect())
    }
}

fn kind_name(d: &Decision) -> &'static str {
    match d.kind() {
        qosloop_schema::DecisionKind::Accept => "accept",
        qosloop_schema::DecisionKind::Remark => "remark",
        qosloop_schema::DecisionKind::Drop => "drop",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampled_counters_are_scaled_for_rates() {
        let row = |sampling: Option<i64>| -> FlowRow {
            (
                1,
                "10.0.0.1".into(),
                "10.0.0.2".into(),
                1000,
                80,
                6,
                3,
                180,
                1,
                2,
                None,
                sampling,
            )
        };
        let r = record_of(&row(Some(100))).unwrap();
        assert_eq!(
            (r.packets, r.bytes, r.sampling_interval),
            (3, 180, Some(100))
        );
        let s = scaled(r);
        assert_eq!((s.packets, s.bytes), (300, 18_000));
        let unsampled = scaled(record_of(&row(None)).unwrap());
        assert_eq!((unsampled.packets, unsampled.bytes), (3, 180));
        // An interval of 0 or below is not a record.
        assert!(record_of(&row(Some(0))).is_none());
        assert!(record_of(&row(Some(-5))).is_none());
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
