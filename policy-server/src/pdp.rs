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
//!    arrived for a whole KA-timer period.

use crate::engine::DecisionTable;
use futures_util::{SinkExt, StreamExt};
use qosloop_schema::cops::{
    Body, CopsCodec, CopsError, DecisionEntry, DecisionRef, ErrorCode, Handle, InstalledDecision,
    Message, PepHello, PepState, CLIENT_TYPE_QOSLOOP,
};
use qosloop_schema::tls::Io;
use qosloop_schema::Direction;
use qosloop_schema::EnforcementReport;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::codec::Framed;

/// How the PDP behaves.
#[derive(Clone, Debug)]
pub struct PdpConfig {
    /// Keepalive interval announced in CAT, seconds (0: no keepalive).
    pub ka_timer_secs: u16,
    /// How long a new connection may take to send OPN.
    pub open_timeout: Duration,
    /// Largest COPS message accepted or sent.
    pub max_message: usize,
    /// Decisions per DEC message.
    pub dec_batch: usize,
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
            dec_batch: 256,
            tls: None,
        }
    }
}

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

/// Counters of the PDP.
#[derive(Debug, Default)]
pub struct PdpStats {
    pub connections: AtomicU64,
    pub refused: AtomicU64,
    pub decisions_sent: AtomicU64,
    pub reports: AtomicU64,
    pub events_dropped: AtomicU64,
}

/// A bound PDP, ready to serve.
#[derive(Debug)]
pub struct Pdp {
    listener: TcpListener,
    config: PdpConfig,
    decisions: watch::Receiver<Arc<DecisionTable>>,
    events: mpsc::Sender<PdpEvent>,
    stats: Arc<PdpStats>,
}

impl Pdp {
    pub async fn bind(
        addr: SocketAddr,
        config: PdpConfig,
        decisions: watch::Receiver<Arc<DecisionTable>>,
        events: mpsc::Sender<PdpEvent>,
    ) -> std::io::Result<Pdp> {
        Ok(Pdp {
            listener: TcpListener::bind(addr).await?,
            config,
            decisions,
            events,
            stats: Arc::default(),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn stats(&self) -> Arc<PdpStats> {
        self.stats.clone()
    }

    /// Accepts connections until `shutdown` turns true; then every
    /// connection is closed with CC (shutting down).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut tasks = tokio::task::JoinSet::new();
        let acceptor = self.config.tls.clone().map(tokio_rustls::TlsAcceptor::from);
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        let conn = Connection {
                            peer,
                            config: self.config.clone(),
                            decisions: self.decisions.clone(),
                            events: self.events.clone(),
                            stats: self.stats.clone(),
                            shutdown: shutdown.clone(),
                        };
                        tasks.spawn(conn.start(stream, acceptor.clone()));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a PEP connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = stopped(&mut shutdown) => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// Resolves when `shutdown` turns true (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

struct Connection {
    peer: SocketAddr,
    config: PdpConfig,
    decisions: watch::Receiver<Arc<DecisionTable>>,
    events: mpsc::Sender<PdpEvent>,
    stats: Arc<PdpStats>,
    shutdown: watch::Receiver<bool>,
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

type Wire = Framed<Box<dyn Io>, CopsCodec>;

impl Connection {
    fn emit(&self, e: PdpEvent) {
        if self.events.try_send(e).is_err() {
            self.stats.events_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The TLS handshake, when configured (within the OPN timeout), then
    /// the COPS conversation.
    async fn start(self, stream: TcpStream, tls: Option<tokio_rustls::TlsAcceptor>) {
        let stream: Box<dyn Io> = match tls {
            None => Box::new(stream),
            Some(acceptor) => {
                match tokio::time::timeout(self.config.open_timeout, acceptor.accept(stream)).await
                {
                    Ok(Ok(s)) => Box::new(s),
                    Ok(Err(e)) => {
                        self.stats.refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(peer = %self.peer, error = %e, "PEP refused: TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        self.stats.refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(peer = %self.peer, "PEP refused: no TLS handshake within the OPN timeout");
                        return;
                    }
                }
            }
        };
        self.serve(stream).await;
    }

    async fn serve(mut self, stream: Box<dyn Io>) {
        let mut wire = Framed::new(stream, CopsCodec::new(self.config.max_message));
        let (name, hello) = match self.open(&mut wire).await {
            Ok(v) => v,
            Err(close) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = %self.peer, reason = %close.why, "PEP refused");
                if let Some(code) = close.cc {
                    let _ = wire.send(Message::cc(code)).await;
                }
                return;
            }
        };
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        tracing::info!(peer = %self.peer, pep = %name, roles = ?hello.roles, "PEP connected");
        self.emit(PdpEvent::Connected {
            name: name.clone(),
            roles: hello.roles.clone(),
            address: self.peer,
        });
        let close = self.session(&mut wire, &name, &hello.roles).await;
        if let Some(code) = close.cc {
            let _ = wire.send(Message::cc(code)).await;
        }
        tracing::info!(peer = %self.peer, pep = %name, reason = %close.why, "PEP disconnected");
        self.emit(PdpEvent::Disconnected {
            name,
            roles: hello.roles,
            address: self.peer,
            why: close.why,
        });
    }

    /// Waits for OPN and accepts it with CAT + SSQ.
    async fn open(&self, wire: &mut Wire) -> Result<(String, PepHello), Close> {
        let first = tokio::time::timeout(self.config.open_timeout, wire.next()).await;
        let msg = match first {
            Err(_) => {
                return Err(Close::with(
                    ErrorCode::CommunicationFailure,
                    format!("no OPN within {:?}", self.config.open_timeout),
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
        wire.send(Message::cat(self.config.ka_timer_secs))
            .await
            .map_err(Close::from_cops)?;
        wire.send(Message::ssq()).await.map_err(Close::from_cops)?;
        Ok((pep_id.clone(), hello))
    }

    async fn session(&mut self, wire: &mut Wire, name: &str, roles: &[String]) -> Close {
        let ka = Duration::from_secs(u64::from(self.config.ka_timer_secs));
        let mut handle: Option<Handle> = None;
        let mut sent: HashMap<u64, u64> = HashMap::new();
        let mut shutdown = self.shutdown.clone();
        let mut last_heard = tokio::time::Instant::now();
        loop {
            let idle = async {
                if ka.is_zero() {
                    std::future::pending::<()>().await
                } else {
                    tokio::time::sleep_until(last_heard + ka).await
                }
            };
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
                            tracing::info!(pep = %name, had = state.installed.len(), changes = entries.len(), "state synchronised");
                            if let Err(c) = self.send_decs(wire, &h, entries, true).await {
                                return c;
                            }
                        }
                        Body::Rpt { .. } => match msg.report() {
                            Ok(Some(report)) => {
                                self.stats.reports.fetch_add(1, Ordering::Relaxed);
                                if let qosloop_schema::ReportOutcome::Failed { reason } = &report.outcome {
                                    tracing::warn!(pep = %name, decision = report.decision_id, %reason, "enforcement failed");
                                }
                                self.emit(PdpEvent::Report { name: name.to_owned(), report });
                            }
                            Ok(None) => {}
                            Err(e) => return Close::from_cops(e),
                        },
                        Body::Ka => {
                            if let Err(e) = wire.send(Message::ka().solicited()).await {
                                return Close::from_cops(e);
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
                _ = idle => {
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
        for chunk in entries.chunks(self.config.dec_batch.max(1)) {
            let mut m = Message::dec(handle.clone(), chunk.to_vec());
            m.solicited = solicited;
            wire.feed(m).await.map_err(Close::from_cops)?;
        }
        SinkExt::<Message>::flush(wire)
            .await
            .map_err(Close::from_cops)?;
        self.stats.decisions_sent.fetch_add(n, Ordering::Relaxed);
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
