//! The flow explorer's endpoints: `/flows`, `/top`, `/timeseries`,
//! `/sankey`, over [`super::engine`].

use super::dims::{Dim, Grouping, Metric, Prefix, METRIC_NAMES};
use super::engine::{self, parse_cursor, Selection, Sort, FLOW_COLUMNS, SORTS};
use super::filter::parse_for;
use super::params::{duration_ns, ApiError, Params};
use super::respond::{answer, wants_csv, Table};
use super::source::{Source, SOURCE_NAMES};
use super::Console;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use qosloop_store::Dialect;
use serde_json::{json, Value};

type Pairs = Query<Vec<(String, String)>>;

/// Parameters every explorer endpoint takes.
const COMMON: [&str; 3] = ["from", "to", "filter"];

fn selection(c: &Console, p: &Params) -> Result<Selection, ApiError> {
    let (from, to) = p.range(c.limits.max_range_ns())?;
    let filter = match p.get("filter").map(str::trim) {
        None | Some("") => None,
        Some(f) => Some(parse_for(f, c.db.dialect() == Dialect::Postgres)?),
    };
    Ok(Selection {
        from,
        to,
        filter,
        source: Source::Raw,
    })
}

fn grouping(c: &Console, p: &Params) -> Result<Grouping, ApiError> {
    Ok(Grouping {
        prefix: Prefix {
            v4: p.int("prefix_v4", 24, 0, 32)? as u8,
            v6: p.int("prefix_v6", 64, 0, 128)? as u8,
        },
        policy: c.policy.borrow().clone(),
    })
}

fn allowed(extra: &[&'static str]) -> Vec<&'static str> {
    COMMON.iter().chain(extra).copied().collect()
}

pub async fn flows(
    State(c): State<Console>,
    headers: HeaderMap,
    Query(q): Pairs,
) -> Result<Response, ApiError> {
    let p = Params::new(q, &allowed(&["sort", "limit", "cursor"]))?;
    let csv = wants_csv(&p, &headers)?;
    let sel = selection(&c, &p)?;
    let sort = Sort::parse(p.choice("sort", &SORTS, "-end_ns")?);
    let limit = p.int("limit", 100, 1, c.limits.max_page)?;
    let after = p.get("cursor").map(parse_cursor).transpose()?;
    engine::check_scan(&c.db, &sel, c.limits.max_scan_rows).await?;
    let (rows, next) = engine::flows(&c.db, &sel, sort, limit, after).await?;
    let table = Table {
        columns: FLOW_COLUMNS.iter().map(|s| s.to_string()).collect(),
        rows,
    };
    let body = json!({ "rows": table.objects(), "next_cursor": next });
    Ok(answer(csv, body, &table))
}

/// Dimension, metric and limit of the grouped endpoints.
fn dims_metric_limit(
    c: &Console,
    p: &Params,
    param: &str,
    min: usize,
    max: usize,
) -> Result<(Vec<Dim>, Metric, i64), ApiError> {
    let dims_text = p
        .get(param)
        .ok_or_else(|| ApiError::bad(param, "required: a comma-separated list of dimensions"))?;
    let dims = Dim::list(param, dims_text, min, max)?;
    let metric = Metric::parse(p.choice("metric", &METRIC_NAMES, "bps")?);
    let limit = p.int("limit", 10, 1, c.limits.max_groups)?;
    Ok((dims, metric, limit))
}

const OTHER: &str = "Other";

/// What `/top` (1-2 dimensions) and `/sankey` (2-3) share: the grouped
/// query, and its CSV table (one row per group, then `Other`).
struct GroupedAnswer {
    csv: bool,
    source: Source,
    dims: Vec<Dim>,
    metric: Metric,
    g: engine::Grouped,
    secs: f64,
    table: Table,
}

async fn grouped(
    c: &Console,
    headers: &HeaderMap,
    q: Vec<(String, String)>,
    min_dims: usize,
    max_dims: usize,
) -> Result<GroupedAnswer, ApiError> {
    let p = Params::new(
        q,
        &allowed(&[
            "dims",
            "metric",
            "limit",
            "prefix_v4",
            "prefix_v6",
            "source",
        ]),
    )?;
    let csv = wants_csv(&p, headers)?;
    let mut sel = selection(c, &p)?;
    let (dims, metric, limit) = dims_metric_limit(c, &p, "dims", min_dims, max_dims)?;
    let grouping = grouping(c, &p)?;
    sel.source = Source::choose(
        p.choice("source", &SOURCE_NAMES, "auto")?,
        &sel,
        &dims,
        None,
    )?;
    engine::check_scan(&c.db, &sel, c.limits.max_scan_rows).await?;
    let g = engine::top(&c.db, &sel, &dims, metric, limit, &grouping).await?;
    let secs = sel.seconds();
    let mut columns: Vec<&str> = dims.iter().map(|d| d.name()).collect();
    columns.push("value");
    let mut table = Table::new(&columns);
    for (keys, v) in &g.rows {
        let mut r = keys.clone();
        r.push(metric.value(*v, secs));
        table.rows.push(r);
    }
    if g.other > 0 {
        let mut r: Vec<Value> = vec![OTHER.into(); dims.len()];
        r.push(metric.value(g.other, secs));
        table.rows.push(r);
    }
    Ok(GroupedAnswer {
        csv,
        source: sel.source,
        dims,
        metric,
        g,
        secs,
        table,
    })
}

pub async fn top(
    State(c): State<Console>,
    headers: HeaderMap,
    Query(q): Pairs,
) -> Result<Response, ApiError> {
    let a = grouped(&c, &headers, q, 1, 2).await?;
    let (metric, secs) = (a.metric, a.secs);
    let rows: Vec<Value> =
        a.g.rows
            .iter()
            .map(|(keys, v)| json!({ "keys": keys, "value": metric.value(*v, secs) }))
            .collect();
    let body = json!({
        "dims": a.dims.iter().map(|d| d.name()).collect::<Vec<_>>(),
        "metric": METRIC_NAMES[metric as usize],
        "source": a.source.name(),
        "rows": rows,
        "other": metric.value(a.g.other, secs),
        "total": metric.value(a.g.total, secs),
    });
    Ok(answer(a.csv, body, &a.table))
}

pub async fn timeseries(
    State(c): State<Console>,
    headers: HeaderMap,
    Query(q): Pairs,
) -> Result<Response, ApiError> {
    let p = Params::new(
        q,
        &allowed(&[
            "step",
            "stack",
            "metric",
            "limit",
            "prefix_v4",
            "prefix_v6",
            "source",
        ]),
    )?;
    let csv = wants_csv(&p, &headers)?;
    let mut sel = selection(&c, &p)?;
    let step_text = p.get("step").unwrap_or("60s");
    let step_ns = duration_ns(step_text)
        .filter(|s| *s >= 1_000_000_000)
        .ok_or_else(|| ApiError::bad("step", "a duration of at least 1s, like 10s, 1m, 1h"))?;
    // A step of centuries would overflow the count: refused like any
    // count over the limit.
    let points = (sel.to - sel.from)
        .checked_add(step_ns - 1)
        .map_or(i64::MAX, |n| n / step_ns + 1);
    if points > c.limits.max_points {
        return Err(ApiError::bad(
            "step",
            format!(
                "{points} points: more than the configured limit of {}",
                c.limits.max_points
            ),
        ));
    }
    let stack = p.get("stack").map(|s| Dim::parse("stack", s)).transpose()?;
    let metric = Metric::parse(p.choice("metric", &METRIC_NAMES, "bps")?);
    let limit = p.int("limit", 10, 1, c.limits.max_groups)?;
    let grouping = grouping(&c, &p)?;
    sel.source = Source::choose(
        p.choice("source", &SOURCE_NAMES, "auto")?,
        &sel,
        stack.as_slice(),
        Some(step_ns),
    )?;
    engine::check_scan(&c.db, &sel, c.limits.max_scan_rows).await?;
    if sel.source.series_reads_more(&sel, step_ns, stack) {
        let minutes = Selection {
            source: sel.source.for_step(step_ns),
            ..sel.clone()
        };
        engine::check_scan(&c.db, &minutes, c.limits.max_scan_rows).await?;
    }
    let (start, series) =
        engine::timeseries(&c.db, &sel, step_ns, stack, metric, limit, &grouping).await?;
    let secs = step_ns as f64 / 1e9;
    let mut table = Table::new(&["t_ns", "key", "value"]);
    let mut out = Vec::new();
    for s in &series {
        let key = s.key.clone().unwrap_or_else(|| OTHER.into());
        let values: Vec<Value> = s.points.iter().map(|v| metric.value(*v, secs)).collect();
        for (i, v) in values.iter().enumerate() {
            table.rows.push(vec![
                (start + i as i64 * step_ns).into(),
                key.clone(),
                v.clone(),
            ]);
        }
        out.push(json!({ "key": key, "other": s.key.is_none(), "values": values }));
    }
    let body = json!({
        "start_ns": start,
        "step_ns": step_ns,
        "stack": stack.map(|d| d.name()),
        "source": sel.source.name(),
        "metric": METRIC_NAMES[metric as usize],
        "series": out,
    });
    Ok(answer(csv, body, &table))
}

pub async fn sankey(
    State(c): State<Console>,
    headers: HeaderMap,
    Query(q): Pairs,
) -> Result<Response, ApiError> {
    let a = grouped(&c, &headers, q, 2, 3).await?;
    let (dims, metric, secs, g) = (&a.dims, a.metric, a.secs, &a.g);
    let node =
        |d: Dim, k: &Value| -> String { format!("{}={}", d.name(), k.as_str().unwrap_or("")) };
    // Links between neighbouring dimensions, summed over the paths.
    let mut links: Vec<((String, String), i64)> = Vec::new();
    for (keys, v) in &g.rows {
        for i in 0..dims.len() - 1 {
            let pair = (node(dims[i], &keys[i]), node(dims[i + 1], &keys[i + 1]));
            match links.iter_mut().find(|(p, _)| *p == pair) {
                Some((_, sum)) => *sum += v,
                None => links.push((pair, *v)),
            }
        }
    }
    let mut nodes: Vec<String> = Vec::new();
    for ((a, b), _) in &links {
        for n in [a, b] {
            if !nodes.contains(n) {
                nodes.push(n.clone());
            }
        }
    }
    let body = json!({
        "dims": dims.iter().map(|d| d.name()).collect::<Vec<_>>(),
        "metric": METRIC_NAMES[metric as usize],
        "source": a.source.name(),
        "nodes": nodes,
        "links": links.iter().map(|((s, t), v)| json!({"source": s, "target": t, "value": metric.value(*v, secs)})).collect::<Vec<_>>(),
        "paths": g.rows.iter().map(|(k, v)| json!({"keys": k, "value": metric.value(*v, secs)})).collect::<Vec<_>>(),
        "other": metric.value(g.other, secs),
        "total": metric.value(g.total, secs),
    });
    Ok(answer(a.csv, body, &a.table))
}
