//! The shorter way to a time series stacked by one dimension, when the
//! rollups by dimension answer it with no filter: rank the top values on
//! the range's hours (`rollup_1h_dim`, or its minutes when it holds no
//! whole hour), read only those values' steps through the index on
//! `(dim, dim_key, minute_ns)` (migration 0011), and take "Other" as each
//! step's total (the `total` rows: one per minute) minus the top values.
//!
//! Exact: the ranking sums the same rows the raw table would give; a value
//! is found again by its rollup keys (`=v`, or the backfill's `b=v`), which
//! the ranking returns beside it, so no key text is ever rebuilt from the
//! value. Every rollup row counts at least one record, so a step's records
//! minus the top values' says whether "Other" has rows at all — the
//! general query shows an Other series exactly then.
//!
//! The general query reads every (minute, value) row of the range twice
//! (ranking, then stacking): 0.29M rows for a day of 200 hosts. This one
//! reads the day's hours (24 rows per value), the top values' minutes
//! (1,440 per value) and the minute totals (1,440).

use super::dims::{Dim, Grouping, Metric};
use super::engine::{Selection, Series};
use super::params::ApiError;
use super::source::Source;
use qosloop_store::{Bind, Col, Db};
use serde_json::Value;
use std::collections::HashMap;

/// Whether a series stacked by `dim` over `sel` can take this way: no
/// filter, a rollup by that one dimension, and a group key that is the
/// stored value itself (not a prefix of it, an exporter's name or a rule).
pub fn keyed(dim: Dim, sel: &Selection) -> bool {
    let one_value = matches!(
        dim,
        Dim::SrcAddr
            | Dim::DstAddr
            | Dim::DstPort
            | Dim::Proto
            | Dim::Dscp
            | Dim::Vlan
            | Dim::Class
            | Dim::User
            | Dim::Process
    );
    one_value && sel.filter.is_none() && sel.source.dim().is_some()
}

/// Sums of the metric and of the records per step, from `sql`.
async fn per_step(
    db: &Db,
    sql: &str,
    binds: &[Bind],
    start: i64,
    step_ns: i64,
    steps: usize,
) -> Result<(Vec<i64>, Vec<i64>), ApiError> {
    let rows = db
        .fetch_cells(sql, binds, &[Col::Int, Col::Int, Col::Int])
        .await?;
    let (mut sums, mut records) = (vec![0; steps], vec![0; steps]);
    for r in rows {
        let (Some(t), Some(v), Some(n)) = (r[0].as_i64(), r[1].as_i64(), r[2].as_i64()) else {
            continue;
        };
        let at = ((t - start) / step_ns) as usize;
        if at < steps {
            sums[at] += v;
            records[at] += n;
        }
    }
    Ok((sums, records))
}

/// The series of the `limit` largest values of `dim` and Other (see the
/// module's text); `sel.source` is a rollup by `dim` ([`keyed`]).
#[allow(clippy::too_many_arguments)]
pub async fn by_keys(
    db: &Db,
    sel: &Selection,
    step_ns: i64,
    start: i64,
    steps: usize,
    dim: Dim,
    metric: Metric,
    limit: i64,
    grouping: &Grouping,
) -> Result<Vec<Series>, ApiError> {
    let d = db.dialect();
    let rank = sel.source;
    let steps_src = rank.for_step(step_ns);
    let total_src = steps_src
        .with_dim("total")
        .ok_or_else(|| ApiError::internal("a keyed series over no rollup by dimension"))?;
    let count = "CAST(SUM(flow_count) AS BIGINT)";

    // The ranking, with each value's rollup keys.
    let mut binds = Vec::new();
    let key = dim.sql(d, grouping, &mut binds);
    let w = sel.where_sql(d, &mut binds);
    binds.push(Bind::Int(limit));
    let sql = format!(
        "SELECT {key}, {}, MIN(dim_key), MAX(dim_key) FROM {} WHERE {w} \
         GROUP BY 1 ORDER BY 2 DESC, 1 ASC LIMIT ${}",
        metric.sql(rank),
        rank.table_sql(),
        binds.len()
    );
    let ranked = db
        .fetch_cells(&sql, &binds, &[Col::Text, Col::Int, Col::Text, Col::Text])
        .await?;
    let mut series = Vec::new();
    let mut slot_of: HashMap<String, usize> = HashMap::new();
    for (i, r) in ranked.iter().enumerate() {
        for k in [&r[2], &r[3]] {
            if let Value::String(k) = k {
                slot_of.insert(k.clone(), i);
            }
        }
        series.push(Series {
            key: Some(r[0].clone()),
            points: vec![0; steps],
        });
    }
    let mut top_records = vec![0i64; steps];
    if !slot_of.is_empty() {
        let mut binds = vec![Bind::Int(step_ns)];
        let mut keys = Vec::new();
        for k in slot_of.keys() {
            binds.push(Bind::Text(k.clone()));
            keys.push(format!("${}", binds.len()));
        }
        let cond = format!("dim_key IN ({})", keys.join(", "));
        let w = sel.where_sql(d, &mut binds);
        let sql = format!(
            "SELECT CAST((end_ns / $1) * $1 AS BIGINT), dim_key, {}, {count} \
             FROM {} WHERE {w} GROUP BY 1, 2",
            metric.sql(steps_src),
            steps_src.table_sql_where(&cond)
        );
        let rows = db
            .fetch_cells(&sql, &binds, &[Col::Int, Col::Text, Col::Int, Col::Int])
            .await?;
        for r in rows {
            let (Some(t), Some(k), Some(v), Some(n)) =
                (r[0].as_i64(), r[1].as_str(), r[2].as_i64(), r[3].as_i64())
            else {
                continue;
            };
            let (Some(&i), Ok(at)) = (slot_of.get(k), usize::try_from((t - start) / step_ns))
            else {
                continue;
            };
            if let (Some(p), Some(c)) = (series[i].points.get_mut(at), top_records.get_mut(at)) {
                *p += v;
                *c += n;
            }
        }
    }

    // Other: each step's total minus the top values.
    let mut binds = vec![Bind::Int(step_ns)];
    let w = sel.where_sql(d, &mut binds);
    let sql = format!(
        "SELECT CAST((end_ns / $1) * $1 AS BIGINT), {}, {count} FROM {} WHERE {w} GROUP BY 1",
        metric.sql(total_src),
        total_src.table_sql()
    );
    let (totals, records) = per_step(db, &sql, &binds, start, step_ns, steps).await?;
    let mut other = totals;
    for (o, s) in other.iter_mut().enumerate() {
        *s -= series.iter().map(|x| x.points[o]).sum::<i64>();
    }
    if records.iter().zip(&top_records).any(|(all, top)| all > top) {
        series.push(Series {
            key: None,
            points: other,
        });
    }
    Ok(series)
}

impl Source {
    /// Whether the series of this source at `step_ns` stacked by `stack`
    /// reads minute rows of every value (the general query), beyond what
    /// the source itself counts for the scan limit.
    pub fn series_reads_more(self, sel: &Selection, step_ns: i64, stack: Option<Dim>) -> bool {
        let keyed = stack.is_some_and(|d| keyed(d, sel));
        !keyed && self.for_step(step_ns) != self
    }
}
