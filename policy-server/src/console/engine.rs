//! The one query engine behind the flow list, top-N, time series and
//! sankey: a [`Selection`] (time range + filter) becomes one WHERE clause;
//! grouping by dimensions and summing a metric is one SQL shape.
//! Counters are scaled by their sampling interval in SQL. Grouped queries
//! read the raw rows or the rollups ([`Source`]); a series stacked by one
//! dimension of the rollups by dimension takes a shorter way
//! ([`super::stack`]).

use super::dims::{Dim, Grouping, Metric};
use super::filter::{compile, Expr};
use super::params::ApiError;
use super::source::Source;
use super::stack;
use qosloop_store::{Bind, Cells as Row, Col, Db, Dialect, Sql};
use serde_json::Value;

/// The records a query reads: `end_ns` in `[from, to)` and the filter,
/// from the raw rows or the rollups.
#[derive(Clone, Debug)]
pub struct Selection {
    pub from: i64,
    pub to: i64,
    pub filter: Option<Expr>,
    pub source: Source,
}

impl Selection {
    /// The WHERE clause; parameters are appended to `binds`.
    pub fn where_sql(&self, d: Dialect, binds: &mut Vec<Bind>) -> String {
        binds.push(Bind::Int(self.from));
        let from = binds.len();
        binds.push(Bind::Int(self.to));
        let mut sql = format!("end_ns >= ${from} AND end_ns < ${}", from + 1);
        if let Some(f) = &self.filter {
            sql.push_str(" AND ");
            sql.push_str(&compile(f, d, binds));
        }
        sql
    }

    pub fn seconds(&self) -> f64 {
        (self.to - self.from) as f64 / 1e9
    }
}

/// Refuses a selection that holds more than `max_rows` rows of `src`
/// (counting stops at `max_rows + 1`).
pub async fn check_scan(db: &Db, sel: &Selection, max_rows: i64) -> Result<(), ApiError> {
    let src = sel.source;
    let mut binds = Vec::new();
    let w = sel.where_sql(db.dialect(), &mut binds);
    binds.push(Bind::Int(max_rows.saturating_add(1)));
    let sql = format!(
        "SELECT CAST(COUNT(*) AS BIGINT) FROM (SELECT 1 FROM {} WHERE {w} LIMIT ${}) AS s",
        src.table_sql(),
        binds.len()
    );
    let rows = db.fetch_cells(&sql, &binds, &[Col::Int]).await?;
    let n = rows.first().and_then(|r| r[0].as_i64()).unwrap_or(0);
    if n > max_rows {
        return Err(ApiError::bad(
            "from",
            format!(
                "the query would read more than the configured limit of {max_rows} records: \
                 narrow the time range or the filter"
            ),
        ));
    }
    Ok(())
}

/// How the flow list is ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sort {
    pub key: &'static str,
    pub descending: bool,
}

pub const SORTS: [&str; 8] = [
    "-end_ns",
    "end_ns",
    "-start_ns",
    "start_ns",
    "-bytes",
    "bytes",
    "-packets",
    "packets",
];

impl Sort {
    pub fn parse(s: &str) -> Sort {
        let (descending, key) = match s.strip_prefix('-') {
            Some(k) => (true, k),
            None => (false, s),
        };
        let key = match key {
            "start_ns" => "start_ns",
            "bytes" => "bytes",
            "packets" => "packets",
            _ => "end_ns",
        };
        Sort { key, descending }
    }

    fn sql(self) -> &'static str {
        match self.key {
            "bytes" => super::filter::compile::SCALED_BYTES,
            "packets" => super::filter::compile::SCALED_PACKETS,
            "start_ns" => "start_ns",
            _ => "end_ns",
        }
    }
}

/// A position in the flow list: the sort key and id of the last row seen.
pub fn parse_cursor(s: &str) -> Result<(i64, i64), ApiError> {
    s.split_once('.')
        .and_then(|(k, id)| Some((k.parse().ok()?, id.parse().ok()?)))
        .ok_or_else(|| ApiError::bad("cursor", "not a cursor of this API (KEY.ID)"))
}

pub const FLOW_COLUMNS: [&str; 18] = [
    "id",
    "exporter",
    "src_addr",
    "dst_addr",
    "src_port",
    "dst_port",
    "proto",
    "packets",
    "bytes",
    "start_ns",
    "end_ns",
    "vlan",
    "dscp",
    "tcp_flags",
    "class",
    "user",
    "process",
    "sampling_interval",
];

/// One page of flow records (counters scaled) and the cursor of the next.
pub async fn flows(
    db: &Db,
    sel: &Selection,
    sort: Sort,
    limit: i64,
    after: Option<(i64, i64)>,
) -> Result<(Vec<Row>, Option<String>), ApiError> {
    let d = db.dialect();
    let mut binds = Vec::new();
    let mut w = sel.where_sql(d, &mut binds);
    let key = sort.sql();
    let (cmp, dir) = if sort.descending {
        ("<", "DESC")
    } else {
        (">", "ASC")
    };
    if let Some((k, id)) = after {
        binds.push(Bind::Int(k));
        binds.push(Bind::Int(id));
        let (pk, pid) = (binds.len() - 1, binds.len());
        w.push_str(&format!(
            " AND ({key} {cmp} ${pk} OR ({key} = ${pk} AND id {cmp} ${pid}))"
        ));
    }
    binds.push(Bind::Int(limit + 1));
    let sql = format!(
        "SELECT CAST(id AS BIGINT), (SELECT e.name FROM exporters e WHERE e.id = flows.exporter_id), \
         {}, {}, CAST(src_port AS BIGINT), CAST(dst_port AS BIGINT), CAST(proto AS BIGINT), \
         CAST({} AS BIGINT), CAST({} AS BIGINT), start_ns, end_ns, CAST(vlan AS BIGINT), \
         CAST(dscp AS BIGINT), CAST(tcp_flags AS BIGINT), class, \"user\", process, \
         CAST(sampling_interval AS BIGINT), CAST({key} AS BIGINT) \
         FROM flows WHERE {w} ORDER BY {key} {dir}, id {dir} LIMIT ${}",
        Sql(d).inet_text("src_addr"),
        Sql(d).inet_text("dst_addr"),
        super::filter::compile::SCALED_PACKETS,
        super::filter::compile::SCALED_BYTES,
        binds.len()
    );
    use Col::*;
    let cols = [
        Int, Text, Text, Text, Int, Int, Int, Int, Int, Int, Int, Int, Int, Int, Text, Text, Text,
        Int, Int,
    ];
    let mut rows = db.fetch_cells(&sql, &binds, &cols).await?;
    let mut next = None;
    if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        if let Some(last) = rows.last() {
            next = Some(format!("{}.{}", last[18], last[0]));
        }
    }
    for r in &mut rows {
        r.truncate(FLOW_COLUMNS.len());
    }
    Ok((rows, next))
}

/// Sums of a metric grouped by dimensions: the largest groups, and what
/// the rest and everything add up to.
#[derive(Debug, Default)]
pub struct Grouped {
    /// Keys (text or null) and the sum, largest first.
    pub rows: Vec<(Vec<Value>, i64)>,
    pub other: i64,
    pub total: i64,
}

/// The `limit` largest groups of `dims` by `metric`, with the remainder.
pub async fn top(
    db: &Db,
    sel: &Selection,
    dims: &[Dim],
    metric: Metric,
    limit: i64,
    grouping: &Grouping,
) -> Result<Grouped, ApiError> {
    let mut out = largest(db, sel, dims, metric, limit, grouping).await?;
    let mut binds = Vec::new();
    let w = sel.where_sql(db.dialect(), &mut binds);
    let src = sel.source;
    let sql = format!(
        "SELECT {} FROM {} WHERE {w}",
        metric.sql(src),
        src.table_sql()
    );
    let total = db.fetch_cells(&sql, &binds, &[Col::Int]).await?;
    out.total = total.first().and_then(|r| r[0].as_i64()).unwrap_or(0);
    out.other = out.total - out.rows.iter().map(|(_, v)| v).sum::<i64>();
    Ok(out)
}

/// The `limit` largest groups only (no total, no remainder).
async fn largest(
    db: &Db,
    sel: &Selection,
    dims: &[Dim],
    metric: Metric,
    limit: i64,
    grouping: &Grouping,
) -> Result<Grouped, ApiError> {
    let (d, src) = (db.dialect(), sel.source);
    let mut binds = Vec::new();
    let keys: Vec<String> = dims
        .iter()
        .map(|k| k.sql(d, grouping, &mut binds))
        .collect();
    let w = sel.where_sql(d, &mut binds);
    binds.push(Bind::Int(limit));
    let n = dims.len();
    let group: Vec<String> = (1..=n).map(|i| i.to_string()).collect();
    let order: Vec<String> = (1..=n).map(|i| format!("{i} ASC")).collect();
    let sql = format!(
        "SELECT {}, {} FROM {} WHERE {w} GROUP BY {} ORDER BY {} DESC, {} LIMIT ${}",
        keys.join(", "),
        metric.sql(src),
        src.table_sql(),
        group.join(", "),
        n + 1,
        order.join(", "),
        binds.len()
    );
    let mut cols = vec![Col::Text; n];
    cols.push(Col::Int);
    let rows = db.fetch_cells(&sql, &binds, &cols).await?;
    let mut out = Grouped::default();
    for mut r in rows {
        let v = r.pop().and_then(|v| v.as_i64()).unwrap_or(0);
        out.rows.push((r, v));
    }
    Ok(out)
}

/// One stacked series: its key (`None` for "Other") and a sum per step.
#[derive(Debug)]
pub struct Series {
    pub key: Option<Value>,
    pub points: Vec<i64>,
}

/// Sums per step from `from` (rounded down to the step) to `to`, stacked
/// by the `limit` largest values of `stack` and the rest.
pub async fn timeseries(
    db: &Db,
    sel: &Selection,
    step_ns: i64,
    stack: Option<Dim>,
    metric: Metric,
    limit: i64,
    grouping: &Grouping,
) -> Result<(i64, Vec<Series>), ApiError> {
    let start = sel.from - sel.from.rem_euclid(step_ns);
    // `start` >= 0 (times are), and the caller bounded the steps: no overflow.
    let steps = ((sel.to - start).saturating_add(step_ns - 1) / step_ns).max(1) as usize;
    if let Some(dim) = stack.filter(|d| stack::keyed(*d, sel)) {
        let series =
            stack::by_keys(db, sel, step_ns, start, steps, dim, metric, limit, grouping).await?;
        return Ok((start, series));
    }
    let (d, src) = (db.dialect(), sel.source.for_step(step_ns));
    let tops = match stack {
        Some(dim) => largest(db, sel, &[dim], metric, limit, grouping)
            .await?
            .rows
            .into_iter()
            .map(|(mut k, _)| k.remove(0))
            .collect(),
        None => Vec::new(),
    };
    let mut binds = Vec::new();
    binds.push(Bind::Int(step_ns));
    let s = binds.len();
    // Each row's series: its slot, 1 + the index of its key among the top
    // values, 0 for Other. A simple CASE computes the key once per row
    // (the IS NULL test, when NULL is a top value, once more), and the
    // groups are (step, slot): a few thousand, whatever the rows.
    let slot = match stack {
        Some(dim) => {
            let key = dim.sql(d, grouping, &mut binds);
            let mut whens = String::new();
            let mut null_slot = None;
            for (i, k) in tops.iter().enumerate() {
                match k {
                    Value::String(t) => {
                        binds.push(Bind::Text(t.clone()));
                        whens.push_str(&format!(" WHEN ${} THEN {}", binds.len(), i + 1));
                    }
                    _ => null_slot = Some(i + 1),
                }
            }
            let by_value = if whens.is_empty() {
                "0".to_owned()
            } else {
                format!("CASE {key}{whens} ELSE 0 END")
            };
            match null_slot {
                Some(n) => {
                    let again = dim.sql(d, grouping, &mut binds);
                    format!("CASE WHEN {again} IS NULL THEN {n} ELSE {by_value} END")
                }
                None => by_value,
            }
        }
        None => "1".to_owned(),
    };
    let w = sel.where_sql(d, &mut binds);
    let sql = format!(
        "SELECT CAST((end_ns / ${s}) * ${s} AS BIGINT), CAST({slot} AS BIGINT), {} \
         FROM {} WHERE {w} GROUP BY 1, 2",
        metric.sql(src),
        src.table_sql()
    );
    let rows = db
        .fetch_cells(&sql, &binds, &[Col::Int, Col::Int, Col::Int])
        .await?;
    // Slot i + 1 is series i; Other (slot 0), when it has rows, is last.
    let mut series: Vec<Series> = tops
        .into_iter()
        .map(|k| Series {
            key: Some(k),
            points: vec![0; steps],
        })
        .collect();
    if stack.is_none() {
        series.push(Series {
            key: Some(Value::Null),
            points: vec![0; steps],
        });
    }
    let named = series.len();
    for r in rows {
        let (Some(t), Some(slot), Some(v)) = (r[0].as_i64(), r[1].as_i64(), r[2].as_i64()) else {
            continue;
        };
        let at = ((t - start) / step_ns) as usize;
        let idx = match usize::try_from(slot) {
            Ok(i) if (1..=named).contains(&i) => i - 1,
            _ => {
                if series.len() == named {
                    series.push(Series {
                        key: None,
                        points: vec![0; steps],
                    });
                }
                named
            }
        };
        if let Some(p) = series[idx].points.get_mut(at) {
            *p += v;
        }
    }
    Ok((start, series))
}
