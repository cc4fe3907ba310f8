//! The web API and the live page (`--http HOST:PORT`).
//!
//! | path | what |
//! |---|---|
//! | `GET /api/flows` | the last 200 flow records stored |
//! | `GET /api/rates` | the last 500 rows of `rates` (newest first) |
//! | `GET /api/policies` | the policy in force (`PolicySet`) |
//! | `GET /api/decisions` | `{"current": [Decision…], "recent": [{issued_ns, kind, band, decision}…]}` |
//! | `GET /api/enforcers` | every enforcer seen, with its state |
//! | `GET /` | a page polling the above every second |

use crate::engine::DecisionTable;
use crate::pdp::stopped;
use crate::store::Store;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use qosloop_schema::{Decision, PolicySet};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;

#[derive(Clone)]
struct App {
    store: Store,
    decisions: watch::Receiver<Arc<DecisionTable>>,
    policy: watch::Receiver<Arc<PolicySet>>,
}

/// A running web server.
#[derive(Debug)]
pub struct WebHandle {
    pub local_addr: SocketAddr,
    pub task: tokio::task::JoinHandle<()>,
}

fn failed(e: impl std::fmt::Display) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(serde_json::json!({ "error": e.to_string() })),
    )
        .into_response()
}

async fn flows(State(app): State<App>) -> Response {
    match app.store.recent_flows(200).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => failed(e),
    }
}

async fn rates(State(app): State<App>) -> Response {
    match app.store.recent_rates(500).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => failed(e),
    }
}

async fn policies(State(app): State<App>) -> Response {
    let p = app.policy.borrow().clone();
    Json(&*p).into_response()
}

async fn get_decisions(State(app): State<App>) -> Response {
    let table = app.decisions.borrow().clone();
    let mut current: Vec<&Decision> = table.all().map(|d| &**d).collect();
    current.sort_by_key(|d| (d.role.clone(), d.id));
    let recent = match app.store.recent_decisions(100).await {
        Ok(rows) => rows
            .into_iter()
            .map(|(issued_ns, kind, band, body)| {
                serde_json::json!({
                    "issued_ns": issued_ns,
                    "kind": kind,
                    "band": band,
                    "decision": serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default(),
                })
            })
            .collect::<Vec<_>>(),
        Err(e) => return failed(e),
    };
    Json(serde_json::json!({ "current": current, "recent": recent })).into_response()
}

async fn enforcers(State(app): State<App>) -> Response {
    match app.store.enforcers().await {
        Ok(v) => Json(v).into_response(),
        Err(e) => failed(e),
    }
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// Binds `addr` and serves until `shutdown` turns true.
pub async fn serve(
    addr: SocketAddr,
    store: Store,
    decisions: watch::Receiver<Arc<DecisionTable>>,
    policy: watch::Receiver<Arc<PolicySet>>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<WebHandle> {
    let app = App {
        store,
        decisions,
        policy,
    };
    let router = Router::new()
        .route("/", get(page))
        .route("/api/flows", get(flows))
        .route("/api/rates", get(rates))
        .route("/api/policies", get(policies))
        .route("/api/decisions", get(get_decisions))
        .route("/api/enforcers", get(enforcers))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local_addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { stopped(&mut shutdown).await })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "web server stopped");
        }
    });
    Ok(WebHandle { local_addr, task })
}

const PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>qosloop policy server</title>
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em}h2{font-size:1.05em;margin-top:1.5em}
table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;padding:2px 8px;text-align:left}
.accept{color:#070}.remark{color:#a60}.drop{color:#b00}.remove{color:#666}
#err{color:#b00}
</style></head><body>
<h1>qosloop policy server</h1><div id="err"></div>
<h2>Links</h2><table id="links"></table>
<h2>Decisions in force</h2><table id="current"></table>
<h2>Enforcers</h2><table id="enforcers"></table>
<h2>Recent decision changes</h2><table id="recent"></table>
<h2>Recent flow records</h2><table id="flows"></table>
<script>
const esc = s => String(s ?? "").replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;","\"":"&quot;"}[c]));
const row = (cells, cls) => "<tr" + (cls ? ` class="${cls}"` : "") + ">" + cells.map(c => `<td>${esc(c)}</td>`).join("") + "</tr>";
const head = cells => "<tr>" + cells.map(c => `<th>${esc(c)}</th>`).join("") + "</tr>";
const kbps = v => (Math.round(v * 10) / 10).toFixed(1);
const time = ns => new Date(ns / 1e6).toLocaleTimeString();
async function get(path) { const r = await fetch(path); if (!r.ok) throw new Error(path + ": " + r.status); return r.json(); }
async function refresh() {
  try {
    const [rates, dec, enf, flows] = await Promise.all([get("/api/rates"), get("/api/decisions"), get("/api/enforcers"), get("/api/flows")]);
    const seen = new Set(), links = [];
    for (const r of rates) if (r.subject === "link" && !seen.has(r.name)) { seen.add(r.name); links.push(r); }
    document.getElementById("links").innerHTML = head(["link", "rate kbit/s", "avgRate kbit/s", "at"]) +
      links.map(r => row([r.name, kbps(r.rate_kbps), kbps(r.avg_rate_kbps), time(r.at_ns)])).join("");
    document.getElementById("current").innerHTML = head(["role", "policy", "flow", "decision", "band", "avgRate", "link load", "version"]) +
      dec.current.map(d => row([d.role, d.policy_dn, JSON.stringify(d.flow), d.out_of_profile.action, d.reason.band,
        kbps(d.reason.avg_rate_kbps), kbps(d.reason.link_load_kbps), d.version], d.out_of_profile.action)).join("");
    document.getElementById("enforcers").innerHTML = head(["name", "roles", "address", "state", "last seen"]) +
      enf.map(e => row([e.name, e.roles, e.address, e.state, time(e.last_seen_ns)])).join("");
    document.getElementById("recent").innerHTML = head(["at", "kind", "band", "role", "policy", "link load"]) +
      dec.recent.slice(0, 20).map(r => row([time(r.issued_ns), r.kind, r.band, r.decision.role, r.decision.policy_dn,
        kbps(r.decision.reason?.link_load_kbps ?? 0)], r.kind)).join("");
    document.getElementById("flows").innerHTML = head(["src", "dst", "proto", "bytes", "end"]) +
      flows.slice(0, 20).map(f => row([f.src_addr + ":" + f.src_port, f.dst_addr + ":" + f.dst_port, f.proto, f.bytes, time(f.end_ns)])).join("");
    document.getElementById("err").textContent = "";
  } catch (e) { document.getElementById("err").textContent = String(e); }
}
refresh(); setInterval(refresh, 1000);
</script></body></html>
"#;
