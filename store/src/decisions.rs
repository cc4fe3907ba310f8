//! `decisions`: every change of a decision, with the inputs it was taken
//! on and its whole body as JSON.

use crate::db::Db;
use crate::dialect::Sql;
use crate::on_pool;
use qosloop_schema::{Decision, DecisionKind};

/// The `decisions.kind` of an installed decision.
fn kind_name(d: &Decision) -> &'static str {
    match d.kind() {
        DecisionKind::Accept => "accept",
        DecisionKind::Remark => "remark",
        DecisionKind::Drop => "drop",
    }
}

impl Db {
    /// Stores every change of one evaluation: the decisions installed or
    /// changed (their kind), then those removed (kind `remove`, their last
    /// state), 500 to a statement.
    pub async fn insert_decisions(
        &self,
        installed: &[&Decision],
        removed: &[&Decision],
    ) -> Result<(), sqlx::Error> {
        let rows: Vec<(&Decision, &str)> = installed
            .iter()
            .map(|d| (*d, kind_name(d)))
            .chain(removed.iter().map(|d| (*d, "remove")))
            .collect();
        let jsonb = matches!(self, Db::Postgres(_));
        for chunk in rows.chunks(500) {
            on_pool!(self, pool, D => {
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
                    // The body's placeholder is pushed by the builder; its
                    // cast is the one fragment the dialects disagree on.
                    if jsonb {
                        b.push_unseparated("::jsonb");
                    }
                });
                qb.build().execute(pool).await.map(|_| ())
            })?;
        }
        Ok(())
    }

    /// The last stored state of every decision not removed since, for the
    /// engine to resume after a restart. Bodies that do not parse are
    /// skipped.
    pub async fn latest_decisions(&self) -> Result<Vec<Decision>, sqlx::Error> {
        let q = format!(
            "SELECT d.kind, {} FROM decisions d JOIN \
             (SELECT decision_id, MAX(id) AS id FROM decisions GROUP BY decision_id) last ON last.id = d.id",
            Sql::of(self).json_text("d.body")
        );
        let rows: Vec<(String, String)> =
            on_pool!(self, pool, D => sqlx::query_as(&q).fetch_all(pool).await)?;
        Ok(rows
            .into_iter()
            .filter(|(kind, _)| kind != "remove")
            .filter_map(|(_, body)| serde_json::from_str(&body).ok())
            .collect())
    }

    /// The last `limit` decision changes, newest first:
    /// `(issued_ns, kind, band, body JSON)`.
    pub async fn recent_decisions(
        &self,
        limit: i64,
    ) -> Result<Vec<(i64, String, String, String)>, sqlx::Error> {
        let q = format!(
            "SELECT issued_ns, kind, band, {} FROM decisions ORDER BY id DESC LIMIT $1",
            Sql::of(self).json_text("body")
        );
        on_pool!(self, pool, D => sqlx::query_as(&q).bind(limit).fetch_all(pool).await)
    }
}
