//! The operator's console API under `/api/v1` (docs/api.md): the flow
//! explorer (filtered flow list with cursor pagination, top-N, stacked
//! time series, sankey — one engine, [`engine`]), the filter language
//! ([`filter`]), and the loop's state (rates, policies, decisions,
//! enforcers, collectors, exporters). Every query endpoint answers JSON or
//! CSV; `/api/v1/openapi.json` describes them all.
//!
//! [`router`] gives a `Router` to merge into the web server, so that later
//! layers (authentication) wrap or extend it. Live updates are server-sent
//! events from one bus ([`events`]), fed by the loop ([`feed`]) and by
//! the knowledge base ([`kb`], which also serves its tables).

mod dims;
mod engine;
pub mod events;
mod explore;
pub mod feed;
pub mod filter;
pub mod kb;
mod params;
mod respond;
mod source;
mod stack;
mod state;
mod stitched;

use crate::engine::DecisionTable;
use crate::repo::PolicyStatus;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use qosloop_schema::PolicySet;
use qosloop_store::Db;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// What the console lets one query do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsoleLimits {
    /// The longest time range of a query.
    pub max_range: Duration,
    /// A query that would read more flow records than this is refused.
    pub max_scan_rows: i64,
    /// The most rows of one page (`limit`).
    pub max_page: i64,
    /// The most groups of a top-N, series of a stack, paths of a sankey.
    pub max_groups: i64,
    /// The most points of a time series.
    pub max_points: i64,
    /// Events queued per live-update client before it loses some.
    pub event_queue: usize,
    /// Live-update clients at once.
    pub event_clients: usize,
}

impl Default for ConsoleLimits {
    fn default() -> Self {
        ConsoleLimits {
            max_range: Duration::from_secs(31 * 86_400),
            max_scan_rows: 20_000_000,
            max_page: 10_000,
            max_groups: 100,
            max_points: 5_000,
            event_queue: 256,
            event_clients: 1_000,
        }
    }
}

impl ConsoleLimits {
    fn max_range_ns(&self) -> i64 {
        i64::try_from(self.max_range.as_nanos()).unwrap_or(i64::MAX)
    }
}

/// What the console reads.
#[derive(Clone, Debug)]
pub struct Console {
    pub db: Db,
    pub decisions: watch::Receiver<Arc<DecisionTable>>,
    pub policy: watch::Receiver<Arc<PolicySet>>,
    pub policy_status: Option<watch::Receiver<PolicyStatus>>,
    pub limits: ConsoleLimits,
    /// The live updates of `/api/v1/events`.
    pub events: events::EventBus,
}

/// The OpenAPI 3 description of `/api/v1`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// The live page (`/live`): committed HTML, CSS and JS, no build step.
const LIVE_HTML: &str = include_str!("live/index.html");
const LIVE_JS: &str = include_str!("live/live.js");
const LIVE_CSS: &str = include_str!("live/live.css");

async fn live_html() -> impl IntoResponse {
    axum::response::Html(LIVE_HTML)
}

async fn live_js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        LIVE_JS,
    )
}

async fn live_css() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        LIVE_CSS,
    )
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

/// The `/api/v1` routes.
pub fn router(console: Console) -> Router {
    for k in kb::KINDS {
        console.events.register_kind(k);
    }
    let events = Router::new()
        .route("/api/v1/events", get(events::events))
        .route("/api/v1/kb/events", get(kb::events))
        .with_state(console.events.clone());
    Router::new()
        .route("/live", get(live_html))
        .route("/live/live.js", get(live_js))
        .route("/live/live.css", get(live_css))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/flows", get(explore::flows))
        .route("/api/v1/top", get(explore::top))
        .route("/api/v1/timeseries", get(explore::timeseries))
        .route("/api/v1/sankey", get(explore::sankey))
        .route("/api/v1/rates", get(state::rates))
        .route("/api/v1/policies", get(state::policies))
        .route("/api/v1/decisions", get(state::decisions))
        .route("/api/v1/enforcers", get(state::enforcers))
        .route("/api/v1/collectors", get(state::collectors))
        .route("/api/v1/exporters", get(state::exporters))
        .route("/api/v1/kb/hosts", get(kb::hosts))
        .route("/api/v1/kb/users", get(kb::users))
        .route("/api/v1/kb/mappings", get(kb::mappings))
        .route("/api/v1/stitched", get(stitched::stitched))
        .with_state(console)
        .merge(events)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_openapi_document_is_json_and_names_every_route() {
        let doc: serde_json::Value = serde_json::from_str(super::OPENAPI).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        for path in [
            "/api/v1/flows",
            "/api/v1/top",
            "/api/v1/timeseries",
            "/api/v1/sankey",
            "/api/v1/rates",
            "/api/v1/policies",
            "/api/v1/decisions",
            "/api/v1/enforcers",
            "/api/v1/collectors",
            "/api/v1/exporters",
            "/api/v1/events",
            "/api/v1/kb/hosts",
            "/api/v1/kb/users",
            "/api/v1/kb/mappings",
            "/api/v1/kb/events",
            "/api/v1/stitched",
        ] {
            assert!(doc["paths"][path]["get"].is_object(), "{path}");
        }
        // The DPMI point routes: reading a list is a GET, the point's poll
        // (which stores it) a POST.
        for (path, method) in [
            ("/api/v1/points", "get"),
            ("/api/v1/points/{name}/filters", "get"),
            ("/api/v1/points/{name}/filters", "post"),
        ] {
            assert!(doc["paths"][path][method].is_object(), "{method} {path}");
        }
    }
}
