//! The web API and the live page (`--http HOST:PORT`).
//!
//! | path | what |
//! |---|---|
//! | `GET /api/flows` | the last 200 flow records stored |
//! | `GET /api/rates` | the last 500 rows of `rates` (newest first) |
//! | `GET /api/policies` | the policy in force (`PolicySet`) |
//! | `GET /api/decisions` | `{"current": [Decision…], "recent": [{issued_ns, kind, band, decision}…]}` |
//! | `GET /api/enforcers` | every enforcer seen (connected, and the last disconnected ones), with its state |
//! | `GET /api/status` | counters: `{"pdp": {…}, "http": {…}, "accept_failures": n, "policy": {…}}`; `policy` is the repository's [`crate::repo::PolicyStatus`] (rules in force, the last refused version) |
//! | `GET /` | a page polling the above every second |
//! | `GET /api/v1/…` | the console API ([`crate::console`], docs/api.md), live updates at `/api/v1/events` |
//! | `/api/v1/requests`, `/api/v1/points` | the DPMI controller ([`crate::dpmi`], docs/dpmi.md) |
//!
//! Served by hyper's HTTP/1 server directly (not `axum::serve`, which has
//! no timeouts): connections per peer address and in total are limited,
//! a client has `header_timeout` to send each request's headers, and a
//! connection on which nothing moves for `idle_timeout` is closed.

use crate::engine::DecisionTable;
use crate::metrics::HttpStats;
use crate::pdp::{stopped, PdpStats};
use crate::server::ServerHandle;
use crate::store::Store;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use qosloop_schema::guard::{accept_next, ConnLimiter, ConnLimits, IdleStream, LogThrottle};
use qosloop_schema::{Decision, PolicySet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How the web server treats its clients.
#[derive(Clone, Debug)]
pub struct WebConfig {
    /// Connections per peer address and in total.
    pub limits: ConnLimits,
    /// Time a client has to send a request's headers (and, with TLS, to
    /// complete the handshake).
    pub header_timeout: Duration,
    /// A connection on which no read or write progresses this long is
    /// closed (idle keep-alive connections included).
    pub idle_timeout: Duration,
    /// What one console query may do.
    pub console: crate::console::ConsoleLimits,
    /// Who may do what ([`crate::auth`]); open by default.
    pub auth: crate::auth::Auth,
    /// HTTPS: the server's certificate and key (`http_tls_cert`).
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            limits: ConnLimits::default(),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            console: crate::console::ConsoleLimits::default(),
            auth: crate::auth::Auth::open(),
            tls: None,
        }
    }
}

#[derive(Clone)]
struct App {
    store: Store,
    decisions: watch::Receiver<Arc<DecisionTable>>,
    policy: watch::Receiver<Arc<PolicySet>>,
    pdp_stats: Arc<PdpStats>,
    pdp_limiter: ConnLimiter,
    http_limiter: ConnLimiter,
    http_stats: Arc<HttpStats>,
    policy_status: Option<watch::Receiver<crate::repo::PolicyStatus>>,
    events: crate::console::events::EventBus,
}

/// A running web server.
#[derive(Debug)]
pub struct WebHandle {
    pub local_addr: SocketAddr,
    pub task: tokio::task::JoinHandle<()>,
    /// What its `/metrics` shows (the server's and the web server's).
    pub metrics: Arc<crate::metrics::MetricsSource>,
    /// The live-update bus: other parts of the server publish on it.
    pub events: crate::console::events::EventBus,
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

async fn status(State(app): State<App>) -> Response {
    let http = app.http_limiter.stats();
    Json(serde_json::json!({
        "pdp": app.pdp_stats.snapshot(&app.pdp_limiter.stats()),
        "http": {
            "connections_open": http.open,
            "refused_limit_per_peer": http.refused_per_peer,
            "refused_limit_total": http.refused_total,
            "timeouts": app.http_stats.timeouts.load(Ordering::Relaxed),
            "errors": app.http_stats.errors.load(Ordering::Relaxed),
        },
        "accept_failures": qosloop_schema::guard::accept_failures(),
        "policy": app.policy_status.as_ref().map(|s| s.borrow().clone()),
        "events": app.events.stats(),
    }))
    .into_response()
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// Binds `addr` and serves `server`'s state and `policy` until the server
/// stops.
pub async fn serve(
    addr: SocketAddr,
    server: &ServerHandle,
    policy: watch::Receiver<Arc<PolicySet>>,
    config: WebConfig,
) -> std::io::Result<WebHandle> {
    serve_with_policy_status(addr, server, policy, None, config).await
}

/// [`serve`], with the policy repository's status in `GET /api/status`.
pub async fn serve_with_policy_status(
    addr: SocketAddr,
    server: &ServerHandle,
    policy: watch::Receiver<Arc<PolicySet>>,
    policy_status: Option<watch::Receiver<crate::repo::PolicyStatus>>,
    config: WebConfig,
) -> std::io::Result<WebHandle> {
    let http_limiter = ConnLimiter::new("HTTP", config.limits);
    let http_stats = Arc::new(HttpStats::default());
    let events = crate::console::events::EventBus::new(
        config.console.event_queue,
        config.console.event_clients,
    );
    tokio::spawn(crate::console::feed::feed(
        events.clone(),
        server.rates.clone(),
        server.decisions.clone(),
        server.stopping(),
    ));
    tokio::spawn(crate::console::kb::bridge(
        server.store.db().clone(),
        events.clone(),
        server.decisions.clone(),
        server.stopping(),
    ));
    let console = crate::console::router(crate::console::Console {
        db: server.store.db().clone(),
        decisions: server.decisions.clone(),
        policy: policy.clone(),
        policy_status: policy_status.clone(),
        limits: config.console,
        events: events.clone(),
    });
    let app = App {
        store: server.store.clone(),
        decisions: server.decisions.clone(),
        policy,
        pdp_stats: server.pdp_stats.clone(),
        pdp_limiter: server.pdp_limiter.clone(),
        http_limiter: http_limiter.clone(),
        http_stats: http_stats.clone(),
        policy_status,
        events: events.clone(),
    };
    let (metrics_router, metrics) = metrics_route(server, &http_limiter, &http_stats, &config.auth);
    let router = Router::new()
        .route("/", get(page))
        .route("/api/flows", get(flows))
        .route("/api/rates", get(rates))
        .route("/api/policies", get(policies))
        .route("/api/decisions", get(get_decisions))
        .route("/api/enforcers", get(enforcers))
        .route("/api/status", get(status))
        .with_state(app)
        .merge(console)
        .merge(metrics_router)
        .merge(crate::dpmi::router(server.store.db().clone()));
    // Every route, those above and any merged later, passes access control.
    let router = crate::auth::protect(router, config.auth.clone());
    let tls = config.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let (header_timeout, idle_timeout) = (config.header_timeout, config.idle_timeout);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local_addr = listener.local_addr()?;
    let mut shutdown = server.stopping();
    let task = tokio::spawn(async move {
        let error_log = Arc::new(LogThrottle::new(Duration::from_secs(1)));
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                (stream, peer) = accept_next(&listener, "HTTP") => {
                    // Over a limit: closed at once (counted and logged by the limiter).
                    let Ok(permit) = http_limiter.try_acquire(peer.ip()) else { continue };
                    // The peer for access control's logs: put on each
                    // request (a `Router::layer` here would rebuild every
                    // route for every connection).
                    let inner = TowerToHyperService::new(router.clone());
                    let service = hyper::service::service_fn(
                        move |mut req: hyper::Request<hyper::body::Incoming>| {
                            req.extensions_mut().insert(crate::auth::PeerAddr(peer));
                            hyper::service::Service::call(&inner, req)
                        },
                    );
                    let mut stop = shutdown.clone();
                    let (stats, log, tls) = (http_stats.clone(), error_log.clone(), tls.clone());
                    conns.spawn(async move {
                        let stream: Box<dyn Io> = match tls {
                            None => Box::new(stream),
                            Some(acceptor) => {
                                match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                                    Ok(Ok(s)) => Box::new(s),
                                    _ => {
                                        stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                                        drop(permit);
                                        return;
                                    }
                                }
                            }
                        };
                        let io = TokioIo::new(IdleStream::new(stream, idle_timeout));
                        let mut builder = hyper::server::conn::http1::Builder::new();
                        builder
                            .timer(TokioTimer::new())
                            .header_read_timeout(header_timeout);
                        let conn = builder.serve_connection(io, service);
                        tokio::pin!(conn);
                        let served = tokio::select! {
                            r = conn.as_mut() => r,
                            _ = stopped(&mut stop) => {
                                conn.as_mut().graceful_shutdown();
                                conn.await
                            }
                        };
                        drop(permit);
                        if let Err(e) = served {
                            let timed_out = e.is_timeout() || is_io_timeout(&e);
                            let counter = if timed_out { &stats.timeouts } else { &stats.errors };
                            counter.fetch_add(1, Ordering::Relaxed);
                            if let Some(suppressed) = log.check() {
                                tracing::debug!(%peer, error = %e, suppressed, "HTTP connection ended");
                            }
                        }
                    });
                }
                _ = stopped(&mut shutdown) => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        while conns.join_next().await.is_some() {}
    });
    Ok(WebHandle {
        local_addr,
        task,
        metrics,
        events,
    })
}

/// A connection's byte stream, plain or TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// `GET /metrics` on the HTTP port ([`crate::metrics`]).
fn metrics_route(
    server: &ServerHandle,
    http_limiter: &ConnLimiter,
    http_stats: &Arc<HttpStats>,
    auth: &crate::auth::Auth,
) -> (Router, Arc<crate::metrics::MetricsSource>) {
    let mut source = server.metrics_source();
    source.http = Some((http_limiter.clone(), http_stats.clone(), auth.stats.clone()));
    let source = Arc::new(source);
    let shared = source.clone();
    let router = Router::new().route(
        "/metrics",
        get(move || {
            let source = source.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        qosloop_runtime::metrics::CONTENT_TYPE,
                    )],
                    source.render(),
                )
            }
        }),
    );
    (router, shared)
}

/// Whether `e` comes from an [`IdleStream`] timing out.
fn is_io_timeout(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::TimedOut;
        }
        source = s.source();
    }
    false
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
