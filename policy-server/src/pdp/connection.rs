//! One PEP connection, from OPN to the closing CC: the checks at OPN
//! (identity, certificate, client type, direction, a PEPID already held),
//! state synchronisation, decision pushes, reports and keepalive — steps
//! 1–6 of the parent module's essay. The listener, the shared state and
//! the counters live in the parent.

use super::{bump, check_identity, stopped, PdpEvent, PdpShared, PdpStats, MAX_REPORT_REASON};
use crate::engine::DecisionTable;
use futures_util::{SinkExt, StreamExt};
use qosloop_runtime::tls::Io;
use qosloop_schema::cops::{
    Body, CopsCodec, CopsError, DecisionEntry, DecisionRef, ErrorCode, Handle, InstalledDecision,
    Message, PepHello, PepState, ReportType, CLIENT_TYPE_QOSLOOP,
};
use qosloop_schema::Direction;
use qosloop_schema::EnforcementReport;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::codec::Framed;

pub(super) struct Connection {
    pub(super) id: u64,
    pub(super) peer: SocketAddr,
    pub(super) identity: Option<String>,
    pub(super) shared: PdpShared,
    pub(super) decisions: watch::Receiver<Arc<DecisionTable>>,
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

    pub(super) async fn serve(mut self, stream: Box<dyn Io>) {
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
                    // An idle PEP must not keep a large message's buffer.
                    qosloop_schema::guard::shrink_read_buffer(wire.read_buffer_mut());
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
                        Body::Rpt { report_type: ReportType::Accounting, .. } => match msg.accounting() {
                            Ok(Some(report)) => {
                                bump(&self.stats().accounting_reports);
                                let name = name.to_owned();
                                self.emit_report(&name.clone(), PdpEvent::Counters { name, report }).await;
                            }
                            Ok(None) => {}
                            Err(e) => return Close::from_cops(e),
                        },
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
