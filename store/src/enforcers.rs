//! `enforcers`, `enforcement_reports` and `enforcer_counters`: the
//! enforcers the policy server has seen, what each reported doing with a
//! decision, and the kernel counters each reported last.

use crate::db::{now_ns, Db};
use crate::on_pool;
use qosloop_schema::{AccountingReport, EnforcementReport, ReportOutcome};
use serde::Serialize;

/// A row of `enforcers`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EnforcerRow {
    pub name: String,
    /// Its roles, comma-separated.
    pub roles: String,
    pub address: Option<String>,
    /// `connected` or how it left.
    pub state: String,
    pub connected_ns: i64,
    pub last_seen_ns: i64,
}

impl Db {
    /// Records an enforcer connecting, being seen, or leaving.
    pub async fn upsert_enforcer(
        &self,
        name: &str,
        roles: &[String],
        address: &str,
        state: &str,
    ) -> Result<(), sqlx::Error> {
        let now = now_ns();
        let q = "INSERT INTO enforcers (name, roles, address, state, connected_ns, last_seen_ns) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO UPDATE SET \
                 roles = excluded.roles, address = excluded.address, state = excluded.state, \
                 connected_ns = CASE WHEN excluded.state = 'connected' AND enforcers.state <> 'connected' \
                 THEN excluded.connected_ns ELSE enforcers.connected_ns END, \
                 last_seen_ns = excluded.last_seen_ns";
        on_pool!(self, pool, D => sqlx::query(q)
            .bind(name)
            .bind(roles.join(","))
            .bind(address)
            .bind(state)
            .bind(now)
            .bind(now)
            .execute(pool)
            .await
            .map(|_| ()))
    }

    /// Forgets disconnected enforcers last seen before `oldest_ns`, and
    /// all but the `keep` most recently seen disconnected ones. Returns how
    /// many rows went.
    pub async fn prune_enforcers(&self, keep: i64, oldest_ns: i64) -> Result<u64, sqlx::Error> {
        let q = "DELETE FROM enforcers WHERE state <> 'connected' AND (last_seen_ns < $1 OR name NOT IN \
                 (SELECT name FROM enforcers WHERE state <> 'connected' ORDER BY last_seen_ns DESC, name LIMIT $2))";
        let gone = on_pool!(self, pool, D => sqlx::query(q)
            .bind(oldest_ns)
            .bind(keep)
            .execute(pool)
            .await
            .map(|r| r.rows_affected()))?;
        if gone > 0 {
            for q in [
                "DELETE FROM enforcer_counters WHERE enforcer NOT IN (SELECT name FROM enforcers)",
                "DELETE FROM enforcer_classes WHERE enforcer NOT IN (SELECT name FROM enforcers)",
            ] {
                on_pool!(self, pool, D => sqlx::query(q).execute(pool).await.map(|_| ()))?;
            }
        }
        Ok(gone)
    }

    /// Replaces the kernel counters of `enforcer` with those of `report`
    /// (one transaction: a reader sees the previous report or this one).
    pub async fn replace_counters(
        &self,
        enforcer: &str,
        report: &AccountingReport,
    ) -> Result<(), sqlx::Error> {
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        on_pool!(self, pool, D => {
            let mut tx = pool.begin().await?;
            sqlx::query::<D>("DELETE FROM enforcer_counters WHERE enforcer = $1")
                .bind(enforcer)
                .execute(&mut *tx)
                .await?;
            for d in &report.decisions {
                sqlx::query::<D>(
                    "INSERT INTO enforcer_counters (enforcer, decision_id, version, kind, in_profile_packets, \
                     in_profile_bytes, out_of_profile_packets, out_of_profile_bytes) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (enforcer, decision_id) DO NOTHING",
                )
                .bind(enforcer)
                .bind(int(d.decision_id))
                .bind(int(d.version))
                .bind(d.kind.to_string())
                .bind(int(d.in_profile_packets))
                .bind(int(d.in_profile_bytes))
                .bind(int(d.out_of_profile_packets))
                .bind(int(d.out_of_profile_bytes))
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query::<D>("DELETE FROM enforcer_classes WHERE enforcer = $1")
                .bind(enforcer)
                .execute(&mut *tx)
                .await?;
            for c in &report.classes {
                sqlx::query::<D>(
                    "INSERT INTO enforcer_classes (enforcer, classid, parent, bytes, packets, drops, \
                     overlimits, backlog_bytes) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                     ON CONFLICT (enforcer, classid) DO NOTHING",
                )
                .bind(enforcer)
                .bind(&c.classid)
                .bind(&c.parent)
                .bind(int(c.bytes))
                .bind(int(c.packets))
                .bind(int(c.drops))
                .bind(int(c.overlimits))
                .bind(int(c.backlog_bytes))
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query::<D>("UPDATE enforcers SET counters_at_ns = $2, counters_omitted = $3, \
                              classes_omitted = $4 WHERE name = $1")
                .bind(enforcer)
                .bind(int(report.at_ns))
                .bind(int(report.omitted))
                .bind(int(report.classes_omitted))
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        })
    }

    /// The kernel counters `enforcer` reported last, by decision id:
    /// `(decision id, version, kind, in packets, in bytes, out packets, out bytes)`.
    #[allow(clippy::type_complexity)]
    pub async fn counters(
        &self,
        enforcer: &str,
    ) -> Result<Vec<(i64, i64, String, i64, i64, i64, i64)>, sqlx::Error> {
        let q = "SELECT decision_id, version, kind, in_profile_packets, in_profile_bytes, \
                 out_of_profile_packets, out_of_profile_bytes FROM enforcer_counters \
                 WHERE enforcer = $1 ORDER BY decision_id";
        on_pool!(self, pool, D => sqlx::query_as(q).bind(enforcer).fetch_all(pool).await)
    }

    /// The HTB class statistics `enforcer` reported last, by class id:
    /// `(classid, parent, bytes, packets, drops, overlimits, backlog bytes)`.
    #[allow(clippy::type_complexity)]
    pub async fn class_counters(
        &self,
        enforcer: &str,
    ) -> Result<Vec<(String, String, i64, i64, i64, i64, i64)>, sqlx::Error> {
        let q = "SELECT classid, parent, bytes, packets, drops, overlimits, backlog_bytes \
                 FROM enforcer_classes WHERE enforcer = $1 ORDER BY classid";
        on_pool!(self, pool, D => sqlx::query_as(q).bind(enforcer).fetch_all(pool).await)
    }

    /// Every enforcer, by name.
    pub async fn enforcers(&self) -> Result<Vec<EnforcerRow>, sqlx::Error> {
        let q = "SELECT name, roles, address, state, connected_ns, last_seen_ns FROM enforcers ORDER BY name";
        let rows: Vec<(String, String, Option<String>, String, i64, i64)> =
            on_pool!(self, pool, D => sqlx::query_as(q).fetch_all(pool).await)?;
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

    /// Stores what `enforcer` reported.
    pub async fn insert_report(
        &self,
        enforcer: &str,
        r: &EnforcementReport,
    ) -> Result<(), sqlx::Error> {
        let (outcome, reason) = match &r.outcome {
            ReportOutcome::Installed => ("installed", None),
            ReportOutcome::Removed => ("removed", None),
            ReportOutcome::Failed { reason } => ("failed", Some(reason.clone())),
        };
        let q = "INSERT INTO enforcement_reports (enforcer, decision_id, version, outcome, reason, reconfig_ns, at_ns) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)";
        on_pool!(self, pool, D => sqlx::query(q)
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
    }

    /// Reports of `enforcer`, oldest first: `(decision id, version, outcome)`.
    pub async fn reports(&self, enforcer: &str) -> Result<Vec<(i64, i64, String)>, sqlx::Error> {
        let q = "SELECT decision_id, version, outcome FROM enforcement_reports WHERE enforcer = $1 ORDER BY id";
        on_pool!(self, pool, D => sqlx::query_as(q).bind(enforcer).fetch_all(pool).await)
    }
}
