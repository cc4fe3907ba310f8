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
//!
//! [`PepHello`]: qosloop_schema::cops::PepHello
//! [`PepState`]: qosloop_schema::cops::PepState

use crate::engine::DecisionTable;
use qosloop_runtime::tls::Io;
use qosloop_schema::guard::{accept_next, ConnLimiter, ConnLimits, ConnStats, LogThrottle};
use qosloop_schema::EnforcementReport;
use serde::Serialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

mod connection;

pub use connection::diff;
use connection::Connection;

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
    /// The kernel counters an enforcer read (accounting RPT).
    Counters {
        name: String,
        report: qosloop_schema::AccountingReport,
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
    /// Accounting reports received (RPT with the kernel's counters).
    pub accounting_reports: AtomicU64,
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
    pub accounting_reports: u64,
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
            accounting_reports: n(&self.accounting_reports),
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
                        .and_then(|c| qosloop_runtime::tls::certificate_identity(c.as_ref()));
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
