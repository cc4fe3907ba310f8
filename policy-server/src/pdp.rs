//! The PDP: COPS (RFC 2748) over TCP, qosloop client type 0x8071 (codec and
//! payloads in `qosloop_schema::cops`).
//!
//! Per connection:
//!
//! 1. The PEP sends OPN (PEPID = its name, ClientSI = [`PepHello`] with its
//!    roles) within `open_timeout`. Anything else — silence, a malformed
//!    message, another message, another client type — gets a CC naming
//!    the error (RFC 2748 error codes) and the connection is closed; other
//!    connections are not affected.
//! 2. The PDP answers CAT (KA timer) and SSQ: "tell me what you have".
//! 3. The PEP sends REQ (ClientSI = [`PepState`]: the decisions it has
//!    installed, by id and version) and SSC. The PDP answers one solicited
//!    DEC (or several, `dec_batch` decisions each) with the difference:
//!    install what is missing or older, remove what should not be there.
//!    A PEP that reconnects — or a PDP that restarted — converges this way.
//! 4. Each later change of the decision table is pushed as an unsolicited
//!    DEC on that handle; only changes for the PEP's roles are sent.
//! 5. The PEP reports each decision with RPT (Success/Failure, ClientSI =
//!    `EnforcementReport`): stored in `enforcement_reports`.
//! 6. Keepalive: the PEP sends KA at least every KA-timer seconds (the
//!    enforcer sends one every quarter of it); the PDP echoes it, and
//!    closes the connection with CC (communication failure) when nothing
//!    arrived for a whole KA-timer period (or `idle_timeout` when the KA
//!    timer is 0).
//!
//! # Who may speak for an enforcer
//!
//! Enforcement follows the decisions a PEP receives and the state it
//! reports, so a PEP's name (PEPID) is guarded:
//!
//! - A PEPID is 1..=[`MAX_PEP_ID`] printable ASCII bytes; roles are at most
//!   [`MAX_ROLES`], each 1..=[`MAX_ROLE`] printable bytes without a comma.
//! - With mutual TLS the enforcer *is* its client certificate: the PEPID
//!   must equal the certificate's common name (or, without one, its first
//!   DNS name); another PEPID gets CC (authentication failure).
//! - A PEPID held by a live connection is refused (CC unable to process),
//!   never taken over; only the connection holding a name reports it
//!   connected or disconnected, so a refused impostor leaves the real
//!   enforcer's state alone.
//!
//! # What one peer can hold
//!
//! Connections per peer address and in total are limited
//! ([`qosloop_schema::guard::ConnLimiter`]); a refused connection is closed
//! at once. Before OPN only [`PdpConfig::max_open_message`] bytes are
//! accepted per message; every write must make progress within
//! `write_timeout` (a PEP that stops reading is closed). Connected and
//! disconnected events are never dropped: the connection waits for room in
//! the event queue. A report waits at most `report_queue_wait` for room;
//! then it is dropped, counted (`reports_dropped_queue_full`) and logged
//! (rate-limited). Failure reasons longer than [`MAX_REPORT_REASON`] bytes
//! are cut (counted). Log lines a peer can repeat are rate-limited.

use crate::engine::DecisionTable;
use futures_util::{SinkExt, StreamExt};
use qosloop_schema::cops::{
    Body, CopsCodec, CopsError, DecisionEntry, DecisionRef, ErrorCode, Handle, InstalledDecision,
    Message, PepHello, PepState, CLIENT_TYPE_QOSLOOP,
};
use qosloop_schema::guard::{accept_next, ConnLimiter, ConnLimits, ConnStats, LogThrottle};
use qosloop_schema::tls::Io;
use qosloop_schema::Direction;
use qosloop_schema::EnforcementReport;
use serde::Serialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::codec::Framed;

/// Longest PEPID accepted, bytes.
pub const MAX_PEP_ID: usize = 255;
/// Most roles one PEP may announce.
pub const MAX_ROLES: usize = 64;
/// Longest role name accepted, bytes.
pub const MAX_ROLE: usize = 64;
/// Failure reasons of reports are cut to this many bytes.
pub const MAX_REPORT_REASON: usize = 512;
/// Largest message accepted before OPN is accepted (an OPN is small).
pub const DEFAULT_MAX_OPEN_MESSAGE: usize = 16 * 1024;

/// How the PDP behaves.
#[derive(Clone, Debug)]
pub struct PdpConfig {
    /// Keepalive interval announced in CAT, seconds (0: no keepalive).
    pub ka_timer_secs: u16,
    /// How long a new connection may take to send OPN (TLS handshake
    /// included).
    pub open_timeout: Duration,
    /// Largest COPS message accepted or sent.
    pub max_message: usize,
    /// Largest message accepted before OPN is accepted.
    pub max_open_message: usize,
    /// Decisions per DEC message.
    pub dec_batch: usize,
    /// A write (DEC, KA, CC) that makes no progress this long closes the
    /// connection.
    pub write_timeout: Duration,
    /// Without keepalive (KA timer 0), a session that hears nothing this
    /// long is closed.
    pub idle_timeout: Duration,
    /// How long a report may wait for room in the event queue before it
    /// is dropped (counted).
    pub report_queue_wait: Duration,
    /// Connections per peer address and in total.
    pub limits: ConnLimits,
    /// COPS over TLS (every connection starts with the handshake); `None`:
    /// plain TCP.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

impl Default for PdpConfig {
    fn default() -> Self {
        PdpConfig {
            ka_timer_secs: 30,
            open_timeout: Duration::from_secs(5),
            max_message: qosloop_schema::cops::DEFAULT_MAX_MESSAGE,
            max_open_message: DEFAULT_MAX_OPEN_MESSAGE,
            dec_batch: 256,
            write_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            report_queue_wait: Duration::from_secs(2),
            limits: ConnLimits::default(),
            tls: None,
        }
    }
}

/// Room in the event queue between the PDP and the writer of what it
/// hears. Connected/disconnected events wait for room; reports wait at most
/// `report_queue_wait`.
pub const EVENT_QUEUE: usize = 4096;

/// What the PDP tells the rest of the server (stored by the server).
#[derive(Clone, Debug)]
pub enum PdpEvent {
    Connected {
        name: String,
        roles: Vec<String>,
        address: SocketAddr,
    },
    Report {
        name: String,
        report: EnforcementReport,
    },
    Disconnected {
        name: String,
        roles: Vec<String>,
        address: SocketAddr,
        why: String,
    },
}

/// Counters of the PDP (shown by `GET /api/status`).
#[derive(Debug, Default)]
pub struct PdpStats {
    /// Sessions opened (OPN accepted).
    pub connections: AtomicU64,
    /// Connections closed before or at OPN, every reason below included.
    pub refused: AtomicU64,
    /// … of which: PEPID or roles out of bounds.
    pub refused_bad_identity: AtomicU64,
    /// … of which: PEPID other than the client certificate's.
    pub refused_certificate_mismatch: AtomicU64,
    /// … of which: PEPID held by another live connection.
    pub refused_pep_id_in_use: AtomicU64,
    /// … of which: TLS handshake failed or timed out.
    pub refused_tls: AtomicU64,
    /// Sessions closed because nothing arrived within the KA timer (or
    /// the idle timeout).
    pub idle_timeouts: AtomicU64,
    /// Sessions closed because a write made no progress.
    pub write_timeouts: AtomicU64,
    pub decisions_sent: AtomicU64,
    /// Reports received (RPT with a report).
    pub reports: AtomicU64,
    /// Reports dropped because the event queue stayed full.
    pub reports_dropped_queue_full: AtomicU64,
    /// Reports whose failure reason was cut to [`MAX_REPORT_REASON`].
    pub reports_truncated: AtomicU64,
    /// Events (connected, disconnected, reports) the database refused.
    pub events_store_failed: AtomicU64,
    /// Disconnected enforcers forgotten (expired or over the cap).
    pub enforcers_pruned: AtomicU64,
}

/// A snapshot of [`PdpStats`] and the listener's connection counts.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PdpCounters {
    pub connections: u64,
    pub connections_open: usize,
    pub refused: u64,
    pub refused_bad_identity: u64,
    pub refused_certificate_mismatch: u64,
    pub refused_pep_id_in_use: u64,
    pub refused_tls: u64,
    pub refused_limit_per_peer: u64,
    pub refused_limit_total: u64,
    pub idle_timeouts: u64,
    pub write_timeouts: u64,
    pub decisions_sent: u64,
    pub reports: u64,
    pub reports_dropped_queue_full: u64,
    pub reports_truncated: u64,
    pub events_store_failed: u64,
    pub enforcers_pruned: u64,
}

impl PdpStats {
    pub fn snapshot(&self, limiter: &ConnStats) -> PdpCounters {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PdpCounters {
            connections: n(&self.connections),
            connections_open: limiter.open,
            refused: n(&self.refused),
            refused_bad_identity: n(&self.refused_bad_identity),
            refused_certificate_mismatch: n(&self.refused_certificate_mismatch),
            refused_pep_id_in_use: n(&self.refused_pep_id_in_use),
            refused_tls: n(&self.refused_tls),
            refused_limit_per_peer: limiter.refused_per_peer,
            refused_limit_total: limiter.refused_total,
            idle_timeouts: n(&self.idle_timeouts),
            write_timeouts: n(&self.write_timeouts),
            decisions_sent: n(&self.decisions_sent),
            reports: n(&self.reports),
            reports_dropped_queue_full: n(&self.reports_dropped_queue_full),
            reports_truncated: n(&self.reports_truncated),
            events_store_failed: n(&self.events_store_failed),
            enforcers_pruned: n(&self.enforcers_pruned),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Log lines a peer can repeat, each at most once per period.
#[derive(Debug)]
struct Throttles {
    refused: LogThrottle,
    session: LogThrottle,
    failed_report: LogThrottle,
    dropped_report: LogThrottle,
}

impl Default for Throttles {
    fn default() -> Self {
        Throttles {
            refused: LogThrottle::new(Duration::from_secs(1)),
            session: LogThrottle::new(Duration::from_millis(100)),
            failed_report: LogThrottle::new(Duration::from_secs(1)),
            dropped_report: LogThrottle::new(Duration::from_secs(1)),
        }
    }
}

/// What every connection of one PDP shares.
#[derive(Clone, Debug)]
pub struct PdpShared {
    config: PdpConfig,
    decisions: watch::Receiver<Arc<DecisionTable>>,
    events: mpsc::Sender<PdpEvent>,
    stats: Arc<PdpStats>,
    /// Live sessions by PEPID: the id of the connection holding the name.
    names: Arc<Mutex<HashMap<String, u64>>>,
    next_conn: Arc<AtomicU64>,
    throttles: Arc<Throttles>,
    shutdown: watch::Receiver<bool>,
}

impl PdpShared {
    /// The state of a PDP without a listener: [`PdpShared::serve_connection`]
    /// serves one connection over any stream (the fuzz target's seam).
    pub fn new(
        config: PdpConfig,
        decisions: watch::Receiver<Arc<DecisionTable>>,
        events: mpsc::Sender<PdpEvent>,
        shutdown: watch::Receiver<bool>,
    ) -> PdpShared {
        PdpShared {
            config,
            decisions,
            events,
            stats: Arc::default(),
            names: Arc::default(),
            next_conn: Arc::default(),
            throttles: Arc::default(),
            shutdown,
        }
    }

    pub fn stats(&self) -> Arc<PdpStats> {
        self.stats.clone()
    }

    /// Serves one connection (after any TLS handshake) from `peer`;
    /// `identity` is the name in the peer's client certificate, if any.
    pub async fn serve_connection(
        &self,
        io: Box<dyn Io>,
        peer: SocketAddr,
        identity: Option<String>,
    ) {
        let conn = Connection {
            id: self.next_conn.fetch_add(1, Ordering::Relaxed),
            peer,
            identity,
            shared: self.clone(),
            decisions: self.decisions.clone(),
        };
        conn.serve(io).await;
    }

    fn refused(&self, peer: SocketAddr, why: &str) {
        bump(&self.stats.refused);
        if let Some(suppressed) = self.throttles.refused.check() {
            tracing::warn!(%peer, reason = %why, suppressed, "PEP refused");
        }
    }
}

/// A bound PDP, ready to serve.
#[derive(Debug)]
pub struct Pdp {
    listener: TcpListener,
    shared: PdpShared,
    limiter: ConnLimiter,
}

impl Pdp {
    pub async fn bind(
        addr: SocketAddr,
        config: PdpConfig,
        decisions: watch::Receiver<Arc<DecisionTable>>,
        events: mpsc::Sender<PdpEvent>,
        shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<Pdp> {
        let limiter = ConnLimiter::new("PDP", config.limits);
        Ok(Pdp {
            listener: TcpListener::bind(addr).await?,
            shared: PdpShared::new(config, decisions, events, shutdown),
            limiter,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn stats(&self) -> Arc<PdpStats> {
        self.shared.stats()
    }

    pub fn limiter(&self) -> ConnLimiter {
        self.limiter.clone()
    }

    /// Accepts connections until shutdown; then every connection is closed
    /// with CC (shutting down).
    pub async fn run(self) {
        let mut tasks = tokio::task::JoinSet::new();
        let acceptor = self
            .shared
            .config
            .tls
            .clone()
            .map(tokio_rustls::TlsAcceptor::from);
        let mut shutdown = self.shared.shutdown.clone();
        loop {
            tokio::select! {
                (stream, peer) = accept_next(&self.listener, "PDP") => {
                    // Over a limit: closed at once (counted and logged by the limiter).
                    let Ok(permit) = self.limiter.try_acquire(peer.ip()) else { continue };
                    let _ = stream.set_nodelay(true);
                    let shared = self.shared.clone();
                    let acceptor = acceptor.clone();
                    tasks.spawn(async move {
                        start(shared, stream, peer, acceptor).await;
                        drop(permit);
                    });
                },
                _ = stopped(&mut shutdown) => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// The TLS handshake, when configured (within the OPN timeout), then the
/// COPS conversation.
async fn start(
    shared: PdpShared,
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let (io, identity): (Box<dyn Io>, Option<String>) = match tls {
        None => (Box::new(stream), None),
        Some(acceptor) => {
            match tokio::time::timeout(shared.config.open_timeout, acceptor.accept(stream)).await {
                Ok(Ok(s)) => {
                    let identity = s
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| qosloop_schema::tls::certificate_identity(c.as_ref()));
                    (Box::new(s), identity)
                }
                Ok(Err(e)) => {
                    bump(&shared.stats.refused_tls);
                    shared.refused(peer, &format!("TLS handshake failed: {e}"));
                    return;
                }
                Err(_) => {
                    bump(&shared.stats.refused_tls);
                    shared.refused(peer, "TLS handshake failed: none within the OPN timeout");
                    return;
                }
            }
        }
    };
    shared.serve_connection(io, peer, identity).await;
}

/// Resolves when `shutdown` turns true (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// Whether `s` is 1..=`max` printable ASCII bytes (space included),
/// without `forbidden`.
fn printable(s: &str, max: usize, forbidden: &[u8]) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| (0x20..0x7f).contains(&b) && !forbidden.contains(&b))
}

/// Why a PEPID or its roles are refused.
pub fn check_identity(pep_id: &str, roles: &[String]) -> Result<(), String> {
    if !printable(pep_id, MAX_PEP_ID, &[]) {
        return Err(format!(
            "PEPID of {} bytes: must be 1..={MAX_PEP_ID} printable ASCII characters",
            pep_id.len()
        ));
    }
    if roles.len() > MAX_ROLES {
        return Err(format!(
            "PEP {pep_id:?} announces {} roles (at most {MAX_ROLES})",
            roles.len()
        ));
    }
    if let Some(bad) = roles.iter().find(|r| !printable(r, MAX_ROLE, b",")) {
        return Err(format!(
            "PEP {pep_id:?} announces a role of {} bytes: a role is 1..={MAX_ROLE} printable ASCII characters without a comma",
            bad.len()
        ));
    }
    Ok(())
}

struct Connection {
    id: u64,
    peer: SocketAddr,
    identity: Option<String>,
    shared: PdpShared,
    decisions: watch::Receiver<Arc<DecisionTable>>,
}

/// Why a connection ends: the CC to send (if any) and the reason to log.
struct Close {
    cc: Option<ErrorCode>,
    why: String,
}

impl Close {
    fn with(code: ErrorCode, why: impl Into<String>) -> Close {
        Close {
            cc: Some(code),
            why: why.into(),
        }
    }
    fn from_cops(e: CopsError) -> Close {
        match e {
            CopsError::Io(e) => Close {
                cc: None,
                why: format!("connection failed: {e}"),
            },
            e => Close::with(e.cops_error_code(), e.to_string()),
        }
    }
}

/// The name a session holds; releasing it (on drop) frees the name only if
/// this connection still holds it.
struct NameClaim {
    names: Arc<Mutex<HashMap<String, u64>>>,
    name: String,
    id: u64,
}

impl Drop for NameClaim {
    fn drop(&mut self) {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        if names.get(&self.name) == Some(&self.id) {
            names.remove(&self.name);
        }
    }
}

type Wire = Framed<Box<dyn Io>, CopsCodec>;

impl Connection {
    fn stats(&self) -> &PdpStats {
        &self.shared.stats
    }

    /// Sends one message, failing when the write makes no progress within
    /// the write timeout.
    async fn send(&self, wire: &mut Wire, m: Message) -> Result<(), Close> {
        match tokio::time::timeout(self.shared.config.write_timeout, wire.send(m)).await {
            Ok(r) => r.map_err(Close::from_cops),
            Err(_) => Err(self.write_timed_out()),
        }
    }

    fn write_timed_out(&self) -> Close {
        bump(&self.stats().write_timeouts);
        Close {
            cc: None,
            why: format!(
                "the PEP stopped reading (a write made no progress for {:?})",
                self.shared.config.write_timeout
            ),
        }
    }

    /// A state event: waits for room (never dropped).
    async fn emit_state(&self, e: PdpEvent) {
        // Only fails when the writer is gone (shutting down).
        let _ = self.shared.events.send(e).await;
    }

    /// A report: waits at most `report_queue_wait` for room, then is
    /// dropped (counted, logged).
    async fn emit_report(&self, name: &str, e: PdpEvent) {
        let wait = self.shared.config.report_queue_wait;
        if let Ok(Ok(())) = tokio::time::timeout(wait, self.shared.events.send(e)).await {
            return;
        }
        let n = self
            .stats()
            .reports_dropped_queue_full
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        if let Some(suppressed) = self.shared.throttles.dropped_report.check() {
            tracing::warn!(pep = %name, peer = %self.peer, dropped_total = n, suppressed,
                "report dropped: the event queue stayed full for {wait:?}");
        }
    }

    async fn close_with(&self, wire: &mut Wire, close: &Close) {
        if let Some(code) = close.cc {
            let _ = self.send(wire, Message::cc(code)).await;
        }
    }

    async fn serve(mut self, stream: Box<dyn Io>) {
        let mut codec = CopsCodec::new(self.shared.config.max_message);
        codec.set_max_message(
            self.shared
                .config
                .max_open_message
                .min(self.shared.config.max_message),
        );
        let mut wire = Framed::new(stream, codec);
        let (claim, hello) = match self.open(&mut wire).await {
            Ok(v) => v,
            Err(close) => {
                self.shared.refused(self.peer, &close.why);
                self.close_with(&mut wire, &close).await;
                return;
            }
        };
        wire.codec_mut()
            .set_max_message(self.shared.config.max_message);
        let name = claim.name.clone();
        bump(&self.stats().connections);
        if let Some(suppressed) = self.shared.throttles.session.check() {
            tracing::info!(peer = %self.peer, pep = %name, roles = ?hello.roles, suppressed, "PEP connected");
        }
        self.emit_state(PdpEvent::Connected {
            name: name.clone(),
            roles: hello.roles.clone(),
            address: self.peer,
        })
        .await;
        let close = self.session(&mut wire, &name, &hello.roles).await;
        self.close_with(&mut wire, &close).await;
        if let Some(suppressed) = self.shared.throttles.session.check() {
            tracing::info!(peer = %self.peer, pep = %name, reason = %close.why, suppressed, "PEP disconnected");
        }
        // Queue the event before the name is free: a new session under the
        // same name reports connected after this.
        self.emit_state(PdpEvent::Disconnected {
            name,
            roles: hello.roles,
            address: self.peer,
            why: close.why,
        })
        .await;
        drop(claim);
    }

    /// Waits for OPN, checks who is speaking and accepts it with CAT + SSQ.
    async fn open(&self, wire: &mut Wire) -> Result<(NameClaim, PepHello), Close> {
        let first = tokio::time::timeout(self.shared.config.open_timeout, wire.next()).await;
        let msg = match first {
            Err(_) => {
                return Err(Close::with(
                    ErrorCode::CommunicationFailure,
                    format!("no OPN within {:?}", self.shared.config.open_timeout),
                ))
            }
            Ok(None) => {
                return Err(Close {
                    cc: None,
                    why: "closed before OPN".into(),
                })
            }
            Ok(Some(Err(e))) => return Err(Close::from_cops(e)),
            Ok(Some(Ok(m))) => m,
        };
        let Body::Opn {
            pep_id, client_si, ..
        } = &msg.body
        else {
            return Err(Close::with(
                ErrorCode::BadMessageFormat,
                format!("expected OPN first, got {}", msg.op_code()),
            ));
        };
        // The PEPID goes into log lines from here on: bound it first.
        if let Err(why) = check_identity(pep_id, &[]) {
            bump(&self.stats().refused_bad_identity);
            return Err(Close::with(ErrorCode::BadMessageFormat, why));
        }
        if msg.client_type != CLIENT_TYPE_QOSLOOP {
            return Err(Close::with(
                ErrorCode::UnsupportedClientType,
                format!(
                    "unsupported client type {:#06x} from PEP {pep_id:?} (qosloop is {CLIENT_TYPE_QOSLOOP:#06x})",
                    msg.client_type
                ),
            ));
        }
        let Some(si) = client_si else {
            return Err(Close::with(
                ErrorCode::MandatoryClientSiMissing,
                format!("OPN from {pep_id:?} names no roles (ClientSI missing)"),
            ));
        };
        let hello = PepHello::from_client_si(si).map_err(Close::from_cops)?;
        if let Err(why) = check_identity(pep_id, &hello.roles) {
            bump(&self.stats().refused_bad_identity);
            return Err(Close::with(ErrorCode::BadMessageFormat, why));
        }
        if let Some(identity) = &self.identity {
            if identity != pep_id {
                bump(&self.stats().refused_certificate_mismatch);
                return Err(Close::with(
                    ErrorCode::AuthenticationFailure,
                    format!(
                        "PEPID {pep_id:?} is not the name in the PEP's certificate ({identity:?})"
                    ),
                ));
            }
        }
        // A policy that puts a role's device on ingress needs an enforcer
        // enforcing ingress (and vice versa): refuse rather than shape the
        // wrong traffic.
        let theirs = hello.direction.unwrap_or(Direction::Egress);
        let clash = {
            let table = self.decisions.borrow();
            hello.roles.iter().find_map(|r| {
                table
                    .devices
                    .get(r)
                    .filter(|want| **want != theirs)
                    .map(|want| (r.clone(), *want))
            })
        };
        if let Some((role, want)) = clash {
            return Err(Close::with(
                ErrorCode::UnableToProcess,
                format!(
                    "PEP {pep_id:?} enforces {theirs:?} but the policy's device entry for role {role} asks for {want:?} (start the enforcer with --direction {})",
                    format!("{want:?}").to_lowercase()
                ),
            ));
        }
        let claim = {
            let mut names = self.shared.names.lock().unwrap_or_else(|p| p.into_inner());
            if names.contains_key(pep_id) {
                drop(names);
                bump(&self.stats().refused_pep_id_in_use);
                return Err(Close::with(
                    ErrorCode::UnableToProcess,
                    format!("PEPID {pep_id:?} is in use by another live connection"),
                ));
            }
            names.insert(pep_id.clone(), self.id);
            NameClaim {
                names: self.shared.names.clone(),
                name: pep_id.clone(),
                id: self.id,
            }
        };
        self.send(wire, Message::cat(self.shared.config.ka_timer_secs))
            .await?;
        self.send(wire, Message::ssq()).await?;
        Ok((claim, hello))
    }

    async fn session(&mut self, wire: &mut Wire, name: &str, roles: &[String]) -> Close {
        let ka = match self.shared.config.ka_timer_secs {
            0 => self.shared.config.idle_timeout,
            s => Duration::from_secs(u64::from(s)),
        };
        let mut handle: Option<Handle> = None;
        let mut sent: HashMap<u64, u64> = HashMap::new();
        let mut shutdown = self.shared.shutdown.clone();
        let mut last_heard = tokio::time::Instant::now();
        loop {
            tokio::select! {
                msg = wire.next() => {
                    let msg = match msg {
                        None => return Close { cc: None, why: "PEP closed the connection".into() },
                        Some(Err(e)) => return Close::from_cops(e),
                        Some(Ok(m)) => m,
                    };
                    last_heard = tokio::time::Instant::now();
                    match msg.body {
                        Body::Req { handle: h, client_si, .. } => {
                            let state = match client_si.first().map(PepState::from_client_si) {
                                Some(Ok(s)) => s,
                                Some(Err(e)) => return Close::from_cops(e),
                                None => PepState::default(),
                            };
                            sent = state
                                .installed
                                .iter()
                                .map(|InstalledDecision { id, version }| (*id, *version))
                                .collect();
                            handle = Some(h.clone());
                            let table = self.decisions.borrow_and_update().clone();
                            let entries = diff(&table, roles, &mut sent);
                            tracing::debug!(pep = %name, had = state.installed.len(), changes = entries.len(), "state synchronised");
                            if let Err(c) = self.send_decs(wire, &h, entries, true).await {
                                return c;
                            }
                        }
                        Body::Rpt { .. } => match msg.report() {
                            Ok(Some(report)) => self.report(name, report).await,
                            Ok(None) => {}
                            Err(e) => return Close::from_cops(e),
                        },
                        Body::Ka => {
                            if let Err(c) = self.send(wire, Message::ka().solicited()).await {
                                return c;
                            }
                        }
                        Body::Ssc { .. } => tracing::debug!(pep = %name, "synchronisation complete"),
                        Body::Drq { .. } => {
                            handle = None;
                            sent.clear();
                        }
                        Body::Cc { error, .. } => {
                            return Close { cc: None, why: format!("PEP closed: {error}") }
                        }
                        other => {
                            return Close::with(
                                ErrorCode::BadMessageFormat,
                                format!("a PEP must not send {}", other.op_code()),
                            )
                        }
                    }
                }
                changed = self.decisions.changed() => {
                    if changed.is_err() {
                        return Close::with(ErrorCode::ShuttingDown, "decision engine stopped");
                    }
                    let Some(h) = handle.clone() else { continue };
                    let table = self.decisions.borrow_and_update().clone();
                    let entries = diff(&table, roles, &mut sent);
                    if !entries.is_empty() {
                        if let Err(c) = self.send_decs(wire, &h, entries, false).await {
                            return c;
                        }
                    }
                }
                _ = tokio::time::sleep_until(last_heard + ka) => {
                    bump(&self.stats().idle_timeouts);
                    return Close::with(
                        ErrorCode::CommunicationFailure,
                        format!("nothing received for {ka:?} (keepalive timeout)"),
                    );
                }
                _ = stopped(&mut shutdown) => {
                    return Close::with(ErrorCode::ShuttingDown, "PDP shutting down");
                }
            }
        }
    }

    async fn report(&self, name: &str, mut report: EnforcementReport) {
        bump(&self.stats().reports);
        if let qosloop_schema::ReportOutcome::Failed { reason } = &mut report.outcome {
            if reason.len() > MAX_REPORT_REASON {
                let mut cut = MAX_REPORT_REASON;
                while !reason.is_char_boundary(cut) {
                    cut -= 1;
                }
                reason.truncate(cut);
                reason.push('…');
                bump(&self.stats().reports_truncated);
            }
            if let Some(suppressed) = self.shared.throttles.failed_report.check() {
                tracing::warn!(pep = %name, decision = report.decision_id, %reason, suppressed, "enforcement failed");
            }
        }
        self.emit_report(
            name,
            PdpEvent::Report {
                name: name.to_owned(),
                report,
            },
        )
        .await;
    }

    async fn send_decs(
        &self,
        wire: &mut Wire,
        handle: &Handle,
        mut entries: Vec<DecisionEntry>,
        solicited: bool,
    ) -> Result<(), Close> {
        let n = entries.len() as u64;
        if entries.is_empty() {
            entries.push(DecisionEntry::null());
        }
        let write = async {
            for chunk in entries.chunks(self.shared.config.dec_batch.max(1)) {
                let mut m = Message::dec(handle.clone(), chunk.to_vec());
                m.solicited = solicited;
                wire.feed(m).await?;
            }
            SinkExt::<Message>::flush(wire).await
        };
        // Each chunk must go out within the write timeout (a large table
        // is many chunks; a PEP that reads makes progress on each).
        let chunks = entries.len().div_ceil(self.shared.config.dec_batch.max(1)) as u32;
        let limit = self.shared.config.write_timeout * chunks.max(1);
        match tokio::time::timeout(limit, write).await {
            Ok(r) => r.map_err(Close::from_cops)?,
            Err(_) => return Err(self.write_timed_out()),
        }
        self.stats().decisions_sent.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

/// The decisions that turn what the PEP has (`sent`: id → version) into
/// what its roles should have; updates `sent` to the result.
pub fn diff(
    table: &DecisionTable,
    roles: &[String],
    sent: &mut HashMap<u64, u64>,
) -> Vec<DecisionEntry> {
    let mut out = Vec::new();
    let mut wanted: HashMap<u64, ()> = HashMap::new();
    for d in table.for_roles(roles) {
        wanted.insert(d.id, ());
        if sent.get(&d.id) != Some(&d.version) {
            out.push(DecisionEntry::install(d));
            sent.insert(d.id, d.version);
        }
    }
    let stale: Vec<(u64, u64)> = sent
        .iter()
        .filter(|(id, _)| !wanted.contains_key(id))
        .map(|(id, v)| (*id, *v))
        .collect();
    for (id, version) in stale {
        sent.remove(&id);
        out.push(DecisionEntry::remove(DecisionRef { id, version }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_bounded_and_printable() {
        assert!(check_identity("qosloop-enforcer/eth0/42", &["edge".into()]).is_ok());
        assert!(check_identity("qosloop client", &[]).is_ok());
        assert!(check_identity("", &[]).is_err());
        assert!(check_identity(&"p".repeat(MAX_PEP_ID), &[]).is_ok());
        assert!(check_identity(&"p".repeat(MAX_PEP_ID + 1), &[]).is_err());
        assert!(check_identity("a\nb", &[]).is_err());
        assert!(check_identity("a\u{7f}", &[]).is_err());
        assert!(check_identity("p", &["a,b".into()]).is_err());
        assert!(check_identity("p", &["".into()]).is_err());
        assert!(check_identity("p", &["r".repeat(MAX_ROLE + 1)]).is_err());
        let many: Vec<String> = (0..=MAX_ROLES).map(|i| format!("r{i}")).collect();
        assert!(check_identity("p", &many).is_err());
    }
}
