//! `rates`: per policed flow and per link, the rate over an interval and
//! its moving average.

use crate::db::Db;
use crate::on_pool;
use serde::Serialize;

/// A row of `rates`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RateRow {
    pub at_ns: i64,
    pub interval_ns: i64,
    /// `flow` or `link`.
    pub subject: String,
    pub name: String,
    pub rate_kbps: f64,
    pub avg_rate_kbps: f64,
    pub records: i64,
}

impl Db {
    /// Stores rows of `rates`, 1,000 to a statement.
    pub async fn insert_rates(&self, rows: &[RateRow]) -> Result<(), sqlx::Error> {
        for chunk in rows.chunks(1000) {
            on_pool!(self, pool, D => {
                let mut qb = sqlx::QueryBuilder::<D>::new(
                    "INSERT INTO rates (at_ns, interval_ns, subject, name, rate_kbps, avg_rate_kbps, records) ",
                );
                qb.push_values(chunk, |mut b, r| {
                    b.push_bind(r.at_ns)
                        .push_bind(r.interval_ns)
                        .push_bind(r.subject.clone())
                        .push_bind(r.name.clone())
                        .push_bind(r.rate_kbps)
                        .push_bind(r.avg_rate_kbps)
                        .push_bind(r.records);
                });
                qb.build().execute(pool).await.map(|_| ())
            })?;
        }
        Ok(())
    }

    /// The last stored average of each subject newer than `since_ns`:
    /// `(subject, name, avg_rate_kbps)`.
    pub async fn latest_averages(
        &self,
        since_ns: i64,
    ) -> Result<Vec<(String, String, f64)>, sqlx::Error> {
        let q = "SELECT r.subject, r.name, r.avg_rate_kbps FROM rates r JOIN \
                 (SELECT subject, name, MAX(id) AS id FROM rates WHERE at_ns >= $1 GROUP BY subject, name) last \
                 ON last.id = r.id";
        on_pool!(self, pool, D => sqlx::query_as(q).bind(since_ns).fetch_all(pool).await)
    }

    /// The last `limit` rows, newest first.
    pub async fn recent_rates(&self, limit: i64) -> Result<Vec<RateRow>, sqlx::Error> {
        let q = "SELECT at_ns, interval_ns, subject, name, rate_kbps, avg_rate_kbps, records FROM rates \
                 ORDER BY id DESC LIMIT $1";
        let rows: Vec<(i64, i64, String, String, f64, f64, i64)> =
            on_pool!(self, pool, D => sqlx::query_as(q).bind(limit).fetch_all(pool).await)?;
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
}
