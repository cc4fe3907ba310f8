//! The knowledge base on the HTTP API (docs/kb.md): `/api/v1/kb/hosts`,
//! `/users`, `/mappings` (JSON or CSV), `/api/v1/kb/events` (server-sent
//! events), and the bridge that brings the database's events onto the
//! console's bus: it wakes on `NOTIFY qosloop_kb` (PostgreSQL) or the
//! in-process channel, or once a second, and publishes every event after
//! the last it saw, in id order, as kind `kb.<kind>`. It also records a
//! `decision` event whenever the published decision table changes.

use super::events::{sse, EventBus};
use super::params::{ApiError, Params};
use super::respond::{answer, wants_csv, Table};
use super::Console;
use crate::engine::DecisionTable;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use qosloop_store::{now_ns, Db, KbEvent};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The bus kinds of knowledge-base events.
pub const KINDS: [&str; 4] = ["kb.logon", "kb.logoff", "kb.threshold", "kb.decision"];

type Pairs = Query<Vec<(String, String)>>;

fn table<T: serde::Serialize>(columns: &[&str], rows: &[T]) -> (Vec<Value>, Table) {
    let mut t = Table::new(columns);
    let objects: Vec<Value> = rows.iter().map(|r| json!(r)).collect();
    for o in &objects {
        t.rows
            .push(columns.iter().map(|c| o[*c].clone()).collect::<Vec<_>>());
    }
    (objects, t)
}

pub async fn hosts(
    State(c): State<Console>,
    headers: HeaderMap,
    Query(q): Pairs,
) -> Result<Response, ApiError> {
    let p = Params::new(q, &["limit"])?;
    let csv = wants_csv(&p, &headers)?;
    let limit = p.int("limit", 1000, 1, c.limits.max_page)?;
    let rows = c.db.kb_hosts(limit).await?;
    let (objects, t) = table(
        &[
            "addr",
            "bytes_in",
            "bytes_out",
            "packets_in",
            "packets_out",
            "first_seen_ns",
            "last_seen_ns",
        ],
        &rows,
    );
    Ok(answer(csv, json!({ "rows": objects }), &t))
}

pub async fn users(
    State(c): State<Console>,
    headers: HeaderMap,
    Query(q): Pairs,
) -> Result<Response, ApiError> {
    let p = Params::new(q, &["limit"])?;
    let csv = wants_csv(&p, &headers)?;
    let limit = p.int("limit", 1000, 1, c.limits.max_page)?;
    let rows = c.db.kb_users(limit).await?;
    let (objects, t) = table(
        &[
            "user",
            "online",
            "online_since_ns",
            "session_bytes",
            "bytes_in",
            "bytes_out",
            "packets_in",
            "packets_out",
            "first_seen_ns",
            "last_seen_ns",
        ],
        &rows,
    );
    Ok(answer(csv, json!({ "rows": objects }), &t))
}

pub async fn mappings(
    State(c): State<Console>,
    headers: HeaderMap,
    Query(q): Pairs,
) -> Result<Response, ApiError> {
    let p = Params::new(q, &["limit"])?;
    let csv = wants_csv(&p, &headers)?;
    let limit = p.int("limit", 1000, 1, c.limits.max_page)?;
    let rows = c.db.kb_mappings(now_ns(), limit).await?;
    let (objects, t) = table(
        &[
            "addr",
            "user",
            "source",
            "persistent",
            "first_seen_ns",
            "last_seen_ns",
            "expires_ns",
        ],
        &rows,
    );
    Ok(answer(csv, json!({ "rows": objects }), &t))
}

/// `GET /api/v1/kb/events`: the knowledge base's events as they come.
pub async fn events(State(bus): State<EventBus>, Query(q): Pairs) -> Result<Response, ApiError> {
    Params::new(q, &[])?;
    let kinds: BTreeSet<String> = KINDS.iter().map(|k| k.to_string()).collect();
    let Some(sub) = bus.subscribe(Some(kinds)) else {
        let mut e = ApiError::bad("events", "too many event clients: try again later");
        e.status = axum::http::StatusCode::SERVICE_UNAVAILABLE;
        return Err(e);
    };
    Ok(sse(sub))
}

fn publish(bus: &EventBus, e: &KbEvent) {
    bus.publish(&format!("kb.{}", e.kind), &json!(e));
}

/// Runs the bridge until `stop` turns true. Database errors (tables not
/// there yet, the database away) are logged at most once a minute and the
/// bridge tries again each second.
pub async fn bridge(
    db: Db,
    bus: EventBus,
    mut decisions: watch::Receiver<Arc<DecisionTable>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut last: Option<i64> = None;
    let mut listener = None;
    let mut last_error = None::<std::time::Instant>;
    let mut seen = decisions.borrow_and_update().epoch;
    loop {
        let step = async {
            if listener.is_none() {
                listener = Some(db.kb_listener().await?);
            }
            if last.is_none() {
                last = Some(db.kb_last_event_id().await?);
            }
            let from = last.unwrap_or(0);
            let events = db.kb_events_after(from, 1000).await?;
            for e in &events {
                publish(&bus, e);
                last = Some(e.id);
            }
            if events.len() == 1000 {
                return Ok::<bool, sqlx::Error>(true);
            }
            let woke = match listener.as_mut() {
                Some(l) => l.wait(Duration::from_secs(1)).await?,
                None => false,
            };
            Ok(woke)
        };
        let result = tokio::select! {
            r = step => r,
            r = decisions.changed() => {
                if r.is_err() { return }
                let t = decisions.borrow_and_update().clone();
                if t.epoch != seen {
                    seen = t.epoch;
                    let detail = format!("epoch {}: {} decisions", t.epoch, t.all().count());
                    db.kb_publish("decision", None, Some(&detail), now_ns()).await.map(|_| true)
                } else {
                    Ok(true)
                }
            }
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() { return }
                Ok(true)
            }
        };
        if let Err(e) = result {
            listener = None;
            if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                tracing::warn!(error = %e, "knowledge-base events: reading failed; trying again");
                last_error = Some(std::time::Instant::now());
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
