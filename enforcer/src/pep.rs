//! The PEP side of the decision protocol (COPS, RFC 2748, codec in
//! `qosloop_schema::cops`), and the daemon's main loop.
//!
//! The daemon connects to its PDPs in the configured order and stays with
//! the first that accepts it; when that connection ends it starts again
//! from the top of the list (fail-back to the preferred PDP). A session:
//! OPN (roles, interface) → CAT (keepalive timer) → SSQ → REQ with the
//! decisions installed (id, version) + SSC → DECs, each decision applied and
//! answered with one RPT (success, or failure with the kernel's or the
//! validator's reason) → KA every quarter of the timer.
//!
//! While no PDP answers, the daemon keeps the decisions it has (fail-static),
//! logs it and writes it to its state file, which `status` shows. Without
//! any PDP configured it holds what it applied until SIGTERM/SIGINT (still
//! restoring what someone changes in its table, every 30 s, as during a PDP
//! session), and leaves it in the kernel when it stops: `--cleanup` removes
//! it.

use crate::backend::KernelBackend;
use crate::config::Config;
use crate::enforcer::Enforcer;
use crate::metrics::{EnforcerMetrics, KERNEL_EVERY};
use futures_util::{SinkExt, StreamExt};
use qosloop_runtime::tls::Io;
use qosloop_schema::cops::payload::QosloopDecision;
use qosloop_schema::cops::{
    Body, CopsCodec, DecOutcome, ErrorCode, Handle, InstalledDecision, Message, PepHello, PepState,
};
use qosloop_schema::{EnforcementReport, ReportOutcome};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Why the daemon cannot go on: a change thread died with the enforcer.
const LOST: &str = "the enforcer was lost in a failed change";

/// How often the daemon compares its table with what it applied.
const RECONCILE_EVERY: Duration = Duration::from_secs(30);

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Where the daemon writes its mode for `status`: one file per network
/// namespace and interface.
pub fn state_file(interface: &str) -> PathBuf {
    let ns = std::fs::read_link("/proc/thread-self/ns/net")
        .map(|p| {
            p.to_string_lossy()
                .chars()
                .filter(char::is_ascii_digit)
                .collect::<String>()
        })
        .unwrap_or_default();
    PathBuf::from(format!("/run/qosloop-enforcer/{ns}-{interface}.json"))
}

struct Daemon<B: KernelBackend> {
    enforcer: Enforcer<B>,
    metrics: Arc<EnforcerMetrics>,
    roles: Vec<String>,
    pep_id: String,
    state_path: PathBuf,
    /// Whether accounting RPTs carry the HTB class statistics.
    class_accounting: bool,
}

impl<B: KernelBackend> Daemon<B> {
    fn publish(&self, mode: &str, pdp: Option<&str>, detail: &str) {
        let v = serde_json::json!({
            "pid": std::process::id(),
            "mode": mode,
            "pdp": pdp,
            "detail": detail,
            "decisions": self.enforcer.applied_ids().len(),
            "since_ns": now_ns(),
        });
        if let Some(dir) = self.state_path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = std::fs::write(&self.state_path, v.to_string()) {
            tracing::debug!(error = %e, path = %self.state_path.display(), "cannot write the state file");
        }
    }

    fn installed(&self) -> Vec<InstalledDecision> {
        self.enforcer
            .installed()
            .into_iter()
            .map(|(id, version)| InstalledDecision { id, version })
            .collect()
    }

    /// Applies the entries of one DEC: all as one change when there are
    /// several (an initial synchronisation of thousands of decisions then
    /// costs one nftables transaction), each on its own when that change is
    /// refused, so that every decision gets its own RPT with its own reason.
    fn apply_all(&mut self, entries: Vec<QosloopDecision>) -> Vec<EnforcementReport> {
        let mut upserts = Vec::new();
        let mut removes = Vec::new();
        for e in &entries {
            match e {
                QosloopDecision::Install(d) => upserts.push((**d).clone()),
                QosloopDecision::Remove(r) => removes.push(*r),
                QosloopDecision::Nothing => {}
            }
        }
        let mixed = removes.iter().any(|r| upserts.iter().any(|d| d.id == r.id));
        if upserts.len() + removes.len() > 1 && !mixed {
            let ids: Vec<(u64, u64, ReportOutcome)> = upserts
                .iter()
                .map(|d| (d.id, d.version, ReportOutcome::Installed))
                .chain(
                    removes
                        .iter()
                        .map(|r| (r.id, r.version, ReportOutcome::Removed)),
                )
                .collect();
            let remove_ids = removes.iter().map(|r| r.id).collect();
            let result = self.enforcer.apply(upserts, remove_ids);
            self.metrics.applied(&result, |s| s.elapsed);
            match result {
                Ok(s) => {
                    let reconfig_ns = s.elapsed.as_nanos() as u64;
                    tracing::info!(
                        decisions = ids.len(),
                        installed = s.installed,
                        changed = s.changed,
                        removed = s.removed,
                        reconfig_us = reconfig_ns / 1000,
                        "DEC applied as one change"
                    );
                    return ids
                        .into_iter()
                        .map(|(decision_id, version, outcome)| EnforcementReport {
                            decision_id,
                            version,
                            outcome,
                            reconfig_ns,
                            at_ns: now_ns(),
                        })
                        .collect();
                }
                Err(e) => {
                    tracing::info!(error = %e, "DEC refused as one change; applying its decisions one by one")
                }
            }
        }
        entries.into_iter().filter_map(|e| self.apply(e)).collect()
    }

    /// Applies one DEC entry and builds its report.
    fn apply(&mut self, entry: QosloopDecision) -> Option<EnforcementReport> {
        let (id, version, result) = match entry {
            QosloopDecision::Nothing => return None,
            QosloopDecision::Install(d) => {
                let (id, version) = (d.id, d.version);
                (
                    id,
                    version,
                    self.enforcer
                        .install(*d)
                        .map(|s| (s, ReportOutcome::Installed)),
                )
            }
            QosloopDecision::Remove(r) => (
                r.id,
                r.version,
                self.enforcer
                    .remove(r.id)
                    .map(|s| (s, ReportOutcome::Removed)),
            ),
        };
        self.metrics.applied(&result, |(s, _)| s.elapsed);
        let (outcome, reconfig_ns) = match result {
            Ok((s, outcome)) => (outcome, s.elapsed.as_nanos() as u64),
            Err(e) => (
                ReportOutcome::Failed {
                    reason: e.to_string(),
                },
                0,
            ),
        };
        tracing::info!(decision = id, version, outcome = ?outcome, reconfig_us = reconfig_ns / 1000, "decision applied");
        Some(EnforcementReport {
            decision_id: id,
            version,
            outcome,
            reconfig_ns,
            at_ns: now_ns(),
        })
    }
}

/// The PEPID a client certificate (PEM) gives: the name in it
/// ([`qosloop_runtime::tls::certificate_identity`]).
fn certificate_pep_id(path: &std::path::Path) -> anyhow::Result<String> {
    use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer};
    let cert = CertificateDer::from_pem_file(path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    qosloop_runtime::tls::certificate_identity(cert.as_ref()).ok_or_else(|| {
        anyhow::anyhow!(
            "{}: the certificate names no subject (common name or DNS name) to use as PEPID",
            path.display()
        )
    })
}

/// Runs the daemon until a termination signal.
pub fn run<B: KernelBackend + Send + 'static>(
    enforcer: Enforcer<B>,
    pdps: Vec<String>,
    config: &Config,
    metrics: Arc<EnforcerMetrics>,
) -> anyhow::Result<()> {
    let interface = enforcer.layout().interface.clone();
    // Under mutual TLS the PDP knows an enforcer by its certificate and
    // refuses any other PEPID.
    let pep_id = match &config.pdp_tls_cert {
        Some(cert) => certificate_pep_id(cert)?,
        None => format!("qosloop-enforcer/{interface}/{}", std::process::id()),
    };
    let daemon = Daemon {
        enforcer,
        metrics,
        roles: config.roles.clone(),
        pep_id,
        state_path: state_file(&interface),
        class_accounting: !config.no_class_accounting,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let tls = config.pdp_tls()?.map(tokio_rustls::TlsConnector::from);
    let state_path = daemon.state_path.clone();
    let result = rt.block_on(async move {
        if pdps.is_empty() {
            daemon.publish(
                "standalone",
                None,
                "no PDP configured; holding applied decisions",
            );
            tracing::info!(
                interface = %interface,
                decisions = daemon.enforcer.applied_ids().len(),
                "holding decisions (no PDP configured); stop with SIGTERM, remove with --cleanup"
            );
            return hold(daemon).await;
        }
        let mut slot = Some(daemon);
        tokio::select! {
            r = pdp_loop(&mut slot, &pdps, config.keepalive_s, tls.as_ref()) => r,
            r = wait_for_stop() => r,
        }
    });
    let _ = std::fs::remove_file(&state_path);
    result
}

/// Without a PDP: holds the applied decisions until a termination signal,
/// checking the table every [`RECONCILE_EVERY`] and restoring what was
/// changed behind the enforcer's back (as a PDP session does).
async fn hold<B: KernelBackend>(mut daemon: Daemon<B>) -> anyhow::Result<()> {
    let mut every = tokio::time::interval(RECONCILE_EVERY);
    every.reset();
    let mut kernel_tick = tokio::time::interval(KERNEL_EVERY);
    kernel_tick.reset();
    let stop = wait_for_stop();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            r = &mut stop => return r,
            _ = every.tick() => {
                if let Err(e) = daemon.enforcer.reconcile() {
                    daemon.metrics.reconcile_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "periodic reconcile failed");
                }
            }
            _ = kernel_tick.tick() => {
                daemon.metrics.refresh_kernel(&mut daemon.enforcer);
            }
        }
    }
}

async fn wait_for_stop() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r?,
    }
    tracing::info!("stopping; decisions stay in the kernel (fail-static)");
    Ok(())
}

async fn pdp_loop<B: KernelBackend + Send + 'static>(
    slot: &mut Option<Daemon<B>>,
    pdps: &[String],
    keepalive_s: Option<u64>,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(200);
    loop {
        for pdp in pdps {
            let stream = match tokio::time::timeout(
                CONNECT_TIMEOUT,
                TcpStream::connect(pdp.as_str()),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::warn!(%pdp, error = %e, "PDP unreachable; trying the next");
                    continue;
                }
                Err(_) => {
                    tracing::warn!(%pdp, "PDP did not answer within {CONNECT_TIMEOUT:?}; trying the next");
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let stream: Box<dyn Io> = match tls {
                None => Box::new(stream),
                Some(connector) => match tls_connect(connector, pdp, stream).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(%pdp, error = %e, "TLS with the PDP failed; trying the next");
                        continue;
                    }
                },
            };
            backoff = Duration::from_millis(200);
            let metrics = slot.as_ref().map(|d| d.metrics.clone());
            if let Some(m) = &metrics {
                m.pdp_connected.store(1, Ordering::Relaxed);
            }
            let why = session(slot, pdp, stream, keepalive_s).await;
            if let Some(m) = &metrics {
                m.pdp_connected.store(0, Ordering::Relaxed);
                m.pdp_sessions_ended.fetch_add(1, Ordering::Relaxed);
            }
            let Some(daemon) = slot.as_ref() else {
                anyhow::bail!("{why}");
            };
            let n = daemon.enforcer.applied_ids().len();
            tracing::warn!(%pdp, reason = %why, decisions = n, "PDP session ended; fail-static: keeping {n} decisions");
            daemon.publish("fail-static", Some(pdp), &why);
        }
        let Some(daemon) = slot.as_ref() else {
            anyhow::bail!("{LOST}");
        };
        let n = daemon.enforcer.applied_ids().len();
        daemon.publish("fail-static", None, "no PDP reachable");
        tracing::warn!(decisions = n, retry_in = ?backoff, "no PDP reachable; fail-static");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RETRY_MAX);
    }
}

/// The TLS handshake with `pdp`, checking its certificate names its host.
async fn tls_connect(
    connector: &tokio_rustls::TlsConnector,
    pdp: &str,
    stream: TcpStream,
) -> Result<Box<dyn Io>, String> {
    let name = qosloop_runtime::tls::server_name(pdp)?;
    match tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, stream)).await {
        Ok(Ok(s)) => Ok(Box::new(s)),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("handshake took more than {CONNECT_TIMEOUT:?}")),
    }
}

/// Runs `job` on the daemon in a blocking thread that owns it meanwhile,
/// sending a KA at every `tick` until it is done: a slow or stuck kernel
/// change delays its answer, never the keepalives. `Err` says why the
/// session cannot go on (a KA could not be sent, or the thread died and the
/// daemon with it).
async fn off_thread<B, R, F>(
    slot: &mut Option<Daemon<B>>,
    wire: &mut Framed<Box<dyn Io>, CopsCodec>,
    tick: &mut tokio::time::Interval,
    job: F,
) -> Result<R, String>
where
    B: KernelBackend + Send + 'static,
    R: Send + 'static,
    F: FnOnce(&mut Daemon<B>) -> R + Send + 'static,
{
    let Some(mut daemon) = slot.take() else {
        return Err(LOST.into());
    };
    let handle = tokio::task::spawn_blocking(move || {
        let r = job(&mut daemon);
        (daemon, r)
    });
    tokio::pin!(handle);
    loop {
        tokio::select! {
            done = &mut handle => {
                return match done {
                    Ok((back, r)) => {
                        *slot = Some(back);
                        Ok(r)
                    }
                    Err(e) => Err(format!("{LOST}: the change thread failed: {e}")),
                };
            }
            _ = tick.tick() => {
                if let Err(e) = wire.send(Message::ka()).await {
                    *slot = handle.await.ok().map(|(d, _)| d);
                    return Err(format!("sending KA: {e}"));
                }
            }
        }
    }
}

/// One connection to one PDP; returns why it ended.
async fn session<B: KernelBackend + Send + 'static>(
    slot: &mut Option<Daemon<B>>,
    pdp: &str,
    stream: Box<dyn Io>,
    keepalive_s: Option<u64>,
) -> String {
    let mut wire = Framed::new(stream, CopsCodec::default());
    let Some(daemon) = slot.as_ref() else {
        return LOST.into();
    };
    let hello = PepHello {
        roles: daemon.roles.clone(),
        interface: Some(daemon.enforcer.layout().interface.clone()),
        direction: Some(daemon.enforcer.layout().direction),
        software: format!("qosloop-enforcer {}", env!("CARGO_PKG_VERSION")),
    };
    if let Err(e) = wire.send(Message::opn(&daemon.pep_id, &hello)).await {
        return format!("sending OPN: {e}");
    }
    let handle = Handle::from_u32(1);
    // Until CAT names the PDP's timer: our own, or 30 s.
    let mut ka = Duration::from_secs(keepalive_s.unwrap_or(30).max(1));
    let mut tick = tokio::time::interval(ka / 4);
    // The table is compared with what was applied, and restored, this often.
    let mut reconcile_tick = tokio::time::interval(RECONCILE_EVERY);
    reconcile_tick.reset();
    let mut kernel_tick = tokio::time::interval(KERNEL_EVERY);
    kernel_tick.reset();
    let mut last_heard = tokio::time::Instant::now();
    loop {
        let deadline = last_heard + ka * 2;
        tokio::select! {
            msg = wire.next() => {
                let msg = match msg {
                    None => return "PDP closed the connection".into(),
                    Some(Err(e)) => {
                        let _ = wire.send(Message::cc(e.cops_error_code())).await;
                        return format!("bad message from PDP: {e}");
                    }
                    Some(Ok(m)) => m,
                };
                last_heard = tokio::time::Instant::now();
                match msg.body {
                    Body::Cat { ka_timer_secs, .. } => {
                        if ka_timer_secs > 0 && keepalive_s.is_none() {
                            ka = Duration::from_secs(u64::from(ka_timer_secs));
                            tick = tokio::time::interval((ka / 4).max(Duration::from_millis(250)));
                        }
                        tracing::info!(%pdp, ka_s = ka.as_secs(), "accepted by PDP");
                        if let Some(daemon) = slot.as_ref() {
                            daemon.publish("connected", Some(pdp), "synchronising");
                        }
                    }
                    Body::Ssq { .. } => {
                        let Some(daemon) = slot.as_ref() else { return LOST.into() };
                        let state = PepState { roles: daemon.roles.clone(), installed: daemon.installed() };
                        let sent = async {
                            wire.feed(Message::req(handle.clone(), &state)).await?;
                            wire.feed(Message::ssc()).await?;
                            SinkExt::<Message>::flush(&mut wire).await
                        };
                        if let Err(e) = sent.await {
                            return format!("sending REQ/SSC: {e}");
                        }
                    }
                    Body::Dec { handle: h, outcome } => {
                        let entries = match outcome {
                            DecOutcome::Decisions(entries) => entries,
                            DecOutcome::Error(err) => {
                                tracing::warn!(%pdp, error = %err, "PDP answered with an error");
                                continue;
                            }
                        };
                        let mut decoded = Vec::new();
                        let mut reports = Vec::new();
                        for entry in entries {
                            match entry.qosloop() {
                                Ok(d) => decoded.push(d),
                                Err(e) => reports.push(EnforcementReport {
                                    decision_id: 0,
                                    version: 0,
                                    outcome: ReportOutcome::Failed { reason: format!("undecodable decision: {e}") },
                                    reconfig_ns: 0,
                                    at_ns: now_ns(),
                                }),
                            }
                        }
                        // The change runs on a blocking thread that owns the
                        // daemon meanwhile; keepalives keep flowing here.
                        match off_thread(slot, &mut wire, &mut tick, move |d| d.apply_all(decoded)).await {
                            Ok(applied) => reports.extend(applied),
                            Err(why) => return why,
                        }
                        for r in reports {
                            if let Err(e) = wire.feed(Message::rpt(h.clone(), &r)).await {
                                return format!("sending RPT: {e}");
                            }
                        }
                        if let Err(e) = SinkExt::<Message>::flush(&mut wire).await {
                            return format!("sending RPT: {e}");
                        }
                        if let Some(daemon) = slot.as_ref() {
                            daemon.publish("connected", Some(pdp), "in sync");
                        }
                    }
                    Body::Ka => {}
                    Body::Cc { error, .. } => return format!("PDP closed the session: {error}"),
                    other => {
                        let _ = wire.send(Message::cc(ErrorCode::BadMessageFormat)).await;
                        return format!("a PDP must not send {}", other.op_code());
                    }
                }
            }
            _ = tick.tick() => {
                if let Err(e) = wire.send(Message::ka()).await {
                    return format!("sending KA: {e}");
                }
            }
            _ = reconcile_tick.tick() => {
                // Reading the table back takes a while with many decisions:
                // off the COPS loop too.
                match off_thread(slot, &mut wire, &mut tick, |d| d.enforcer.reconcile()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        if let Some(d) = slot.as_ref() {
                            d.metrics.reconcile_failures.fetch_add(1, Ordering::Relaxed);
                        }
                        tracing::warn!(error = %e, "periodic reconcile failed")
                    }
                    Err(why) => return why,
                }
            }
            _ = kernel_tick.tick() => {
                // The counters go to the PDP too: an accounting RPT on
                // the session's handle, every read.
                match off_thread(slot, &mut wire, &mut tick, |d| d.metrics.refresh_kernel(&mut d.enforcer)).await {
                    Ok(Some(mut report)) => {
                        if slot.as_ref().is_some_and(|d| !d.class_accounting) {
                            report.classes.clear();
                            report.classes_omitted = 0;
                        }
                        if let Err(e) = wire.send(Message::rpt_accounting(handle.clone(), &report)).await {
                            return format!("sending RPT (accounting): {e}");
                        }
                    }
                    Ok(None) => {}
                    Err(why) => return why,
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                let _ = wire.send(Message::cc(ErrorCode::CommunicationFailure)).await;
                return format!("nothing from the PDP for {:?}", ka * 2);
            }
        }
    }
}
