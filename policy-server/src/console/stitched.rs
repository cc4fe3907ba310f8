//! `GET /api/v1/stitched` (JSON or CSV): the collector cluster's `stitch`
//! analysis, read-only (`docs/cluster.md`): one row per bidirectional flow
//! and interval, with the exact totals each way after DiCAP's per-packet
//! parts were merged. The console's conventions: a required time range
//! (`from`, `to`; rows whose first–last seen meets it), `limit`, and the
//! narrowing parameters `addr` (either endpoint) and `proto`.

use super::params::{ApiError, Params};
use super::respond::{answer, wants_csv, Table};
use super::Console;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use qosloop_store::StitchedQuery;
use serde_json::{json, Value};
use std::net::IpAddr;

const COLUMNS: [&str; 21] = [
    "cluster",
    "slot",
    "interval_ns",
    "a_addr",
    "a_port",
    "b_addr",
    "b_port",
    "proto",
    "vlan",
    "bucket",
    "packets_ab",
    "bytes_ab",
    "parts_ab",
    "packets_ba",
    "bytes_ba",
    "parts_ba",
    "first_ns",
    "last_ns",
    "tcp_flags",
    "node",
    "epoch",
];

pub async fn stitched(
    State(c): State<Console>,
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let p = Params::new(q, &["from", "to", "addr", "proto", "limit"])?;
    let csv = wants_csv(&p, &headers)?;
    let (from_ns, to_ns) = p.range(c.limits.max_range_ns())?;
    let limit = p.int("limit", 1000, 1, c.limits.max_page)?;
    let addr = match p.get("addr") {
        None => None,
        Some(v) => Some(
            v.parse::<IpAddr>()
                .map_err(|_| ApiError::bad("addr", format!("not an IP address: {v:?}")))?
                .to_string(),
        ),
    };
    let proto = match p.get("proto") {
        None => None,
        Some(v) => Some(proto_of(v)?),
    };
    let rows =
        c.db.stitched_flows(&StitchedQuery {
            from_ns,
            to_ns,
            addr,
            proto,
            limit,
        })
        .await?;
    let mut t = Table::new(&COLUMNS);
    let objects: Vec<Value> = rows.iter().map(|r| json!(r)).collect();
    for o in &objects {
        t.rows
            .push(COLUMNS.iter().map(|c| o[*c].clone()).collect::<Vec<_>>());
    }
    Ok(answer(csv, json!({ "rows": objects }), &t))
}

/// A protocol by number (0–255) or by the filter language's names.
fn proto_of(v: &str) -> Result<u8, ApiError> {
    if let Ok(n) = v.parse::<u8>() {
        return Ok(n);
    }
    // The names the console's filter knows (`proto tcp`).
    super::filter::parser::proto_number(v)
        .and_then(|n| u8::try_from(n).ok())
        .ok_or_else(|| ApiError::bad("proto", format!("not a protocol number or name: {v:?}")))
}
