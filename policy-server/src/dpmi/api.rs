//! The controller's HTTP routes under `/api/v1` (docs/dpmi.md):
//!
//! | route | who | what |
//! |---|---|---|
//! | `POST /api/v1/requests` | a user | submit a request; 201 with its id, 400 naming the bad field |
//! | `GET /api/v1/requests` | a user | the user's own requests |
//! | `GET /api/v1/requests/{id}` | its owner | the request, its state, whether its consumer must re-filter, what each point delivered to its consumer (drops included) |
//! | `DELETE /api/v1/requests/{id}` | its owner | end it now (its filter goes at the point's next poll) |
//! | `POST /api/v1/points` | a point | register (name, interface, max_filters, max_caplen) |
//! | `GET /api/v1/points` | anyone | the points and what they last installed |
//! | `GET /api/v1/points/{name}/filters` | anyone | the filter list the point would run now (read-only) |
//! | `POST /api/v1/points/{name}/filters` | a point | the filter list to run now, stored in `dpmi_filters` when it changed |
//! | `POST /api/v1/points/{name}/report` | a point | installed version or install error, per-consumer counters |
//!
//! The requesting user is the name of the bearer token the authentication
//! layer ([`crate::auth`]) proved, or, when the API is open (no token
//! configured), the `X-Qosloop-User` header; with neither, 401. A header
//! never overrides a token's identity. A request of another user
//! answers 404, as one that does not exist: delivery counters are reported
//! to the consumer's owner alone.

use super::merge::{merge, Active};
use super::request::Request;
use crate::auth::Principal;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use qosloop_schema::dpmi::{
    ConsumerSpec, Delivery, FieldError, Filter, FilterList, PointFilter, DEFAULT_CAPLEN,
};
use qosloop_store::{now_ns, Db, DeliveryRow, FilterRow, PointRow, PointStatus, RequestRow};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

/// The header naming the user when no token did.
pub const USER_HEADER: &str = "x-qosloop-user";

/// Live requests one user may hold.
const MAX_LIVE_PER_USER: usize = 256;
/// Consumers one point report may carry.
const MAX_REPORTED_CONSUMERS: usize = 4096;

/// The routes, over `db`.
pub fn router(db: Db) -> Router {
    Router::new()
        .route("/api/v1/requests", post(submit).get(list))
        .route("/api/v1/requests/{id}", get(show).delete(end))
        .route("/api/v1/points", post(register).get(points))
        .route(
            "/api/v1/points/{name}/filters",
            get(peek_filters).post(take_filters),
        )
        .route("/api/v1/points/{name}/report", post(report))
        .with_state(db)
}

fn error(status: StatusCode, field: Option<&str>, message: impl std::fmt::Display) -> Response {
    let mut body = serde_json::json!({ "error": message.to_string() });
    if let Some(f) = field {
        body["field"] = f.into();
    }
    (status, Json(body)).into_response()
}

fn boxed_error(
    status: StatusCode,
    field: Option<&str>,
    message: impl std::fmt::Display,
) -> Box<Response> {
    Box::new(error(status, field, message))
}

fn bad(e: FieldError) -> Response {
    error(StatusCode::BAD_REQUEST, Some(&e.field), &e)
}

fn failed(e: impl std::fmt::Display) -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, None, e)
}

/// The caller's principal, as the authentication layer left it.
type Caller = Option<Extension<Principal>>;

fn user(caller: Caller, headers: &HeaderMap) -> Result<String, Box<Response>> {
    if let Some(Extension(p)) = caller.filter(|Extension(p)| p.authenticated) {
        return Ok(p.name);
    }
    let name = headers
        .get(USER_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|u| {
            !u.is_empty()
                && u.len() <= 64
                && u.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b))
        });
    name.map(str::to_owned).ok_or_else(|| {
        boxed_error(
            StatusCode::UNAUTHORIZED,
            Some(USER_HEADER),
            "no user: authenticate or send X-Qosloop-User (1-64 of A-Z a-z 0-9 . _ - @)",
        )
    })
}

fn body_json(body: &[u8]) -> Result<serde_json::Value, Box<Response>> {
    serde_json::from_slice(body)
        .map_err(|e| Box::new(bad(FieldError::new("body", format!("not JSON: {e}")))))
}

async fn submit(
    State(db): State<Db>,
    caller: Caller,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let owner = match user(caller, &headers) {
        Ok(u) => u,
        Err(r) => return *r,
    };
    let value = match body_json(&body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let now = now_ns();
    let points = match db.dpmi_points().await {
        Ok(p) => p,
        Err(e) => return failed(e),
    };
    let request = match Request::parse(&value, &points, now) {
        Ok(r) => r,
        Err(e) => return bad(e),
    };
    let live = match db.dpmi_requests_live(now).await {
        Ok(l) => l,
        Err(e) => return failed(e),
    };
    if live.iter().filter(|r| r.owner == owner).count() >= MAX_LIVE_PER_USER {
        return bad(FieldError::new(
            "body",
            format!("{owner} already holds {MAX_LIVE_PER_USER} live requests"),
        ));
    }
    if let Err(e) = request.check_against(&owner, &live) {
        return bad(e);
    }
    let row = request.row(&owner, now);
    match db.insert_dpmi_request(&row).await {
        Ok(id) => {
            tracing::info!(id, %owner, consumer = %row.consumer, points = %row.points, "DPMI request accepted");
            let mut v = request_json(&RequestRow { id, ..row }, now);
            v["id"] = id.into();
            (StatusCode::CREATED, Json(v)).into_response()
        }
        Err(e) => failed(e),
    }
}

fn state(r: &RequestRow, now: i64) -> &'static str {
    match r.ended_ns {
        Some(_) => "ended",
        None if now >= r.stop_ns => "expired",
        None if now < r.start_ns => "pending",
        None => "active",
    }
}

fn request_json(r: &RequestRow, now: i64) -> serde_json::Value {
    serde_json::json!({
        "id": r.id,
        "owner": r.owner,
        "points": serde_json::from_str::<serde_json::Value>(&r.points).unwrap_or_default(),
        "filter": serde_json::from_str::<serde_json::Value>(&r.filter).unwrap_or_default(),
        "consumer": r.consumer,
        "delivery": r.delivery,
        "caplen": r.caplen,
        "anonymise": r.anonymise,
        "start_s": r.start_ns as f64 / 1e9,
        "stop_s": r.stop_ns as f64 / 1e9,
        "ended_s": r.ended_ns.map(|e| e as f64 / 1e9),
        "state": state(r, now),
    })
}

async fn list(State(db): State<Db>, caller: Caller, headers: HeaderMap) -> Response {
    let owner = match user(caller, &headers) {
        Ok(u) => u,
        Err(r) => return *r,
    };
    let now = now_ns();
    match db.dpmi_requests_of(&owner, 500).await {
        Ok(rows) => Json(
            rows.iter()
                .map(|r| request_json(r, now))
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => failed(e),
    }
}

async fn owned(
    db: &Db,
    caller: Caller,
    headers: &HeaderMap,
    id: &str,
) -> Result<RequestRow, Box<Response>> {
    let owner = user(caller, headers)?;
    let id: i64 = id.parse().map_err(|_| {
        Box::new(bad(FieldError::new(
            "id",
            format!("{id:?} is not a request id"),
        )))
    })?;
    match db.dpmi_request(id).await {
        Ok(Some(r)) if r.owner == owner => Ok(r),
        Ok(_) => Err(boxed_error(
            StatusCode::NOT_FOUND,
            Some("id"),
            format!("no request {id} of {owner}"),
        )),
        Err(e) => Err(Box::new(failed(e))),
    }
}

async fn show(
    State(db): State<Db>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let r = match owned(&db, caller, &headers, &id).await {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let now = now_ns();
    let mut v = request_json(&r, now);
    let points: Vec<String> = serde_json::from_str(&r.points).unwrap_or_default();
    let mut refilter = false;
    let mut filters = serde_json::Map::new();
    for p in &points {
        let rows = match db.dpmi_filters(p).await {
            Ok(rows) => rows,
            Err(e) => return failed(e),
        };
        let mine: Vec<serde_json::Value> = rows
            .iter()
            .filter(|f| serde_json::from_str::<Vec<String>>(&f.consumers).is_ok_and(|c| c.contains(&r.consumer)))
            .map(|f| {
                refilter |= f.widened && !serde_json::from_str::<Filter>(&f.filter).is_ok_and(|g| {
                    serde_json::from_str::<Filter>(&r.filter).is_ok_and(|own| own.contains(&g))
                });
                serde_json::json!({
                    "position": f.position,
                    "filter": serde_json::from_str::<serde_json::Value>(&f.filter).unwrap_or_default(),
                    "widened": f.widened,
                })
            })
            .collect();
        filters.insert(p.clone(), mine.into());
    }
    let deliveries = match db.dpmi_deliveries(&r.consumer).await {
        Ok(d) => d
            .into_iter()
            .filter(|d| points.contains(&d.point))
            .collect::<Vec<_>>(),
        Err(e) => return failed(e),
    };
    // A consumer of anonymised frames is re-filtered by the point.
    v["refilter"] = (refilter && !r.anonymise).into();
    v["point_filters"] = filters.into();
    v["deliveries"] = serde_json::to_value(deliveries).unwrap_or_default();
    Json(v).into_response()
}

async fn end(
    State(db): State<Db>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let r = match owned(&db, caller, &headers, &id).await {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let now = now_ns();
    match db.end_dpmi_request(r.id, now).await {
        Ok(_) => match db.dpmi_request(r.id).await {
            Ok(Some(r)) => Json(request_json(&r, now)).into_response(),
            Ok(None) => error(StatusCode::NOT_FOUND, Some("id"), "gone"),
            Err(e) => failed(e),
        },
        Err(e) => failed(e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Registration {
    name: String,
    interface: String,
    max_filters: u32,
    #[serde(default)]
    max_caplen: Option<u32>,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

async fn register(State(db): State<Db>, body: axum::body::Bytes) -> Response {
    let reg: Registration = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad(FieldError::new("body", e.to_string())),
    };
    if !valid_name(&reg.name) {
        return bad(FieldError::new("name", "1-64 of A-Z a-z 0-9 . _ -"));
    }
    if reg.interface.is_empty() || reg.interface.len() > 15 {
        return bad(FieldError::new(
            "interface",
            "must be an interface name (1-15 bytes)",
        ));
    }
    if !(1..=1024).contains(&reg.max_filters) {
        return bad(FieldError::new("max_filters", "must be 1..=1024"));
    }
    let max_caplen = reg.max_caplen.unwrap_or(DEFAULT_CAPLEN);
    if !(34..=65_535).contains(&max_caplen) {
        return bad(FieldError::new("max_caplen", "must be 34..=65535"));
    }
    let now = now_ns();
    let row = PointRow {
        name: reg.name,
        interface: reg.interface,
        max_filters: i64::from(reg.max_filters),
        max_caplen: i64::from(max_caplen),
        registered_ns: now,
        seen_ns: now,
        installed_version: None,
        install_error: None,
        frames: 0,
        matched: 0,
        kernel_drops: 0,
    };
    match db.upsert_dpmi_point(&row).await {
        Ok(()) => {
            tracing::info!(point = %row.name, interface = %row.interface, max_filters = row.max_filters, "DPMI point registered");
            (StatusCode::CREATED, Json(row)).into_response()
        }
        Err(e) => failed(e),
    }
}

async fn points(State(db): State<Db>) -> Response {
    match db.dpmi_points().await {
        Ok(p) => Json(p).into_response(),
        Err(e) => failed(e),
    }
}

/// The filter list `point` runs at `now`; with `store`, stored in
/// `dpmi_filters` when it changed (the point's own poll, a POST), else
/// only computed (a GET changes nothing).
pub async fn point_filters(
    db: &Db,
    point: &PointRow,
    now: i64,
    store: bool,
) -> Result<FilterList, sqlx::Error> {
    let live = db.dpmi_requests_live(now).await?;
    let active: Vec<&RequestRow> = live
        .iter()
        .filter(|r| r.start_ns <= now)
        .filter(|r| {
            serde_json::from_str::<Vec<String>>(&r.points).is_ok_and(|p| p.contains(&point.name))
        })
        .collect();
    let mut merge_in = Vec::new();
    let mut specs: BTreeMap<String, ConsumerSpec> = BTreeMap::new();
    for r in &active {
        // Stored by the controller itself: a filter that no longer reads
        // (a newer schema) is left out, and said.
        let Ok(filter) = serde_json::from_str::<Filter>(&r.filter) else {
            tracing::warn!(id = r.id, "DPMI request with an unreadable filter left out");
            continue;
        };
        merge_in.push(Active {
            id: r.id,
            filter: filter.clone(),
            consumer: r.consumer.clone(),
        });
        let spec = specs
            .entry(r.consumer.clone())
            .or_insert_with(|| ConsumerSpec {
                address: r.consumer.clone(),
                delivery: if r.delivery == "flows" {
                    Delivery::Flows
                } else {
                    Delivery::Packets
                },
                caplen: r.caplen.clamp(34, point.max_caplen) as u32,
                anonymise: r.anonymise,
                refilter: false,
                exact: Vec::new(),
            });
        if spec.anonymise {
            spec.exact.push(filter);
        }
    }
    let plan = merge(&merge_in, usize::try_from(point.max_filters).unwrap_or(1));
    for c in &plan.refilter {
        // An anonymised consumer is re-filtered by the point (`exact`).
        if let Some(s) = specs.get_mut(c).filter(|s| !s.anonymise) {
            s.refilter = true;
        }
    }
    let consumers: Vec<ConsumerSpec> = specs.into_values().collect();
    let index = |a: &str| consumers.iter().position(|c| c.address == a);
    let filters: Vec<PointFilter> = plan
        .filters
        .iter()
        .map(|m| PointFilter {
            filter: m.filter.clone(),
            consumers: m.consumers.iter().filter_map(|c| index(c)).collect(),
        })
        .collect();
    let mut list = FilterList {
        version: String::new(),
        filters,
        consumers,
    };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(&list)
        .unwrap_or_default()
        .hash(&mut h);
    list.version = format!("{:016x}", h.finish());
    let stored = db.dpmi_filters(&point.name).await?;
    let stored_version = stored.first().map(|f| f.version.as_str()).unwrap_or("");
    let unchanged = if list.filters.is_empty() {
        stored.is_empty()
    } else {
        stored_version == list.version
    };
    if store && !unchanged {
        let rows: Vec<FilterRow> = plan
            .filters
            .iter()
            .enumerate()
            .map(|(i, m)| FilterRow {
                position: i as i64,
                version: list.version.clone(),
                filter: m.filter.to_json().to_string(),
                consumers: serde_json::to_string(&m.consumers).unwrap_or_default(),
                requests: serde_json::to_string(&m.requests).unwrap_or_default(),
                widened: m.widened,
                computed_ns: now,
            })
            .collect();
        db.replace_dpmi_filters(&point.name, &rows).await?;
        tracing::info!(point = %point.name, version = %list.version, filters = rows.len(),
            refilter = plan.refilter.len(), "DPMI filter list changed");
    }
    Ok(list)
}

async fn find_point(db: &Db, name: &str) -> Result<PointRow, Box<Response>> {
    match db.dpmi_points().await {
        Ok(p) => p.into_iter().find(|p| p.name == name).ok_or_else(|| {
            boxed_error(
                StatusCode::NOT_FOUND,
                Some("name"),
                format!("unknown measurement point {name:?}"),
            )
        }),
        Err(e) => Err(Box::new(failed(e))),
    }
}

/// `GET`: what the point would run now; nothing is written.
async fn peek_filters(State(db): State<Db>, Path(name): Path<String>) -> Response {
    filters(&db, &name, false).await
}

/// `POST` (an admin token when tokens are configured): the point's poll;
/// the list is stored when it changed.
async fn take_filters(State(db): State<Db>, Path(name): Path<String>) -> Response {
    filters(&db, &name, true).await
}

async fn filters(db: &Db, name: &str, store: bool) -> Response {
    let point = match find_point(db, name).await {
        Ok(p) => p,
        Err(r) => return *r,
    };
    match point_filters(db, &point, now_ns(), store).await {
        Ok(list) => Json(list).into_response(),
        Err(e) => failed(e),
    }
}

/// What a point reports after each poll.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub version: Option<String>,
    pub install_error: Option<String>,
    #[serde(default)]
    pub frames: u64,
    #[serde(default)]
    pub matched: u64,
    #[serde(default)]
    pub kernel_drops: u64,
    #[serde(default)]
    pub consumers: Vec<ConsumerReport>,
}

/// A point's counters of one consumer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerReport {
    pub address: String,
    pub delivered: u64,
    pub bytes: u64,
    pub dropped_full: u64,
    pub dropped_disconnected: u64,
    pub connected: bool,
    pub error: Option<String>,
}

async fn report(
    State(db): State<Db>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let point = match find_point(&db, &name).await {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let rep: Report = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad(FieldError::new("body", e.to_string())),
    };
    if rep.consumers.len() > MAX_REPORTED_CONSUMERS {
        return bad(FieldError::new(
            "consumers",
            format!("more than {MAX_REPORTED_CONSUMERS}"),
        ));
    }
    let now = now_ns();
    let sat = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let cut = |s: Option<String>| s.map(|s| s.chars().take(512).collect::<String>());
    if let Some(e) = &rep.install_error {
        tracing::warn!(point = %point.name, error = %e, "DPMI point failed to install its filters");
    }
    if let Err(e) = db
        .set_dpmi_point_status(
            &point.name,
            &PointStatus {
                installed_version: cut(rep.version.clone()).as_deref(),
                install_error: cut(rep.install_error.clone()).as_deref(),
                frames: sat(rep.frames),
                matched: sat(rep.matched),
                kernel_drops: sat(rep.kernel_drops),
            },
            now,
        )
        .await
    {
        return failed(e);
    }
    let rows: Vec<DeliveryRow> = rep
        .consumers
        .into_iter()
        .map(|c| DeliveryRow {
            point: point.name.clone(),
            consumer: c.address.chars().take(128).collect(),
            delivered: sat(c.delivered),
            bytes: sat(c.bytes),
            dropped_full: sat(c.dropped_full),
            dropped_disconnected: sat(c.dropped_disconnected),
            connected: c.connected,
            error: cut(c.error),
            updated_ns: now,
        })
        .collect();
    match db.upsert_dpmi_deliveries(&rows).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => failed(e),
    }
}
