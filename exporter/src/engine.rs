//! The engine task: sequence numbers, the window of unacknowledged
//! messages, the choice of collector (priority order, failover, fail-back),
//! and the spool while no collector answers.
//!
//! Messages are sent in sequence order from three places, oldest first:
//! `retry` (unacknowledged when a connection ended; re-sent with D set), the
//! spool, then `queue` (new messages).

use crate::spool::Spool;
use crate::{ExportError, ExporterConfig, Report, Stats};
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use qosloop_schema::crane::records::RecordLayout;
use qosloop_schema::crane::{
    ByteOrder, CraneCodec, Data, ErrorCode, Frame, Message, Start, TemplateSet, WireTemplate,
    CAP_KEEPALIVE, CAP_LITTLE_ENDIAN, DATA_FLAG_DUPLICATE, DATA_FLAG_START, VERSION,
};
use qosloop_schema::ie::{self, IeId};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::Framed;

/// One DATA message as the exporter keeps it: records encoded with the full
/// template in the exporter's byte order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Msg {
    pub seq: u32,
    pub template_id: u16,
    pub count: u32,
    pub records: Bytes,
    /// Sent before without an acknowledgement.
    pub duplicate: bool,
}

/// A batch from the handle, not numbered yet.
#[derive(Debug)]
pub struct Batch {
    pub template_id: u16,
    pub count: u32,
    pub records: Bytes,
}

#[derive(Debug)]
pub enum Cmd {
    Batch(Batch),
    Finish(oneshot::Sender<Report>),
}

pub const CONFIG_ID: u16 = 1;

/// Who this exporter run is: its boot time and its stream id.
#[derive(Clone, Copy, Debug)]
pub struct Identity {
    pub boot_ns: u64,
    pub stream_id: u64,
}

/// How long a collector that failed is tried last and left out of fail-back probes.
const SUSPECT_FOR: Duration = Duration::from_secs(3);

enum Ended {
    Failed(String),
    /// The oldest DATA in flight waited longer than `ack_timeout`.
    AckTimeout(String),
    FailBack(usize),
    Finished,
    /// `finish_timeout` passed with messages still unacknowledged.
    GaveUp,
}

/// Why a collector could not be used.
enum ConnectError {
    /// Not reachable, or the handshake failed: tried again later.
    Failed(ExportError),
    /// It refused the templates (an ERROR answer to TMPL_DATA, or a
    /// negotiation that keeps no flow key or no counter): trying again
    /// cannot help, so it is not tried again in this run.
    Refused(String),
}

/// The elements of which a negotiated template must keep at least one
/// (each group), or its records say nothing: the flow keys, the counters.
const MUST_KEEP_ONE_OF: [(&str, &[IeId]); 2] = [
    (
        "flow key (addresses, ports, protocol)",
        &[
            ie::SOURCE_IPV4_ADDRESS.id,
            ie::DESTINATION_IPV4_ADDRESS.id,
            ie::SOURCE_IPV6_ADDRESS.id,
            ie::DESTINATION_IPV6_ADDRESS.id,
            ie::SOURCE_TRANSPORT_PORT.id,
            ie::DESTINATION_TRANSPORT_PORT.id,
            ie::PROTOCOL_IDENTIFIER.id,
        ],
    ),
    (
        "counter (packets, bytes)",
        &[ie::PACKET_DELTA_COUNT.id, ie::OCTET_DELTA_COUNT.id],
    ),
];

/// Whether an ERROR is about the collector's own state, so that the same
/// request may succeed later.
fn transient(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::Storage
            | ErrorCode::Internal
            | ErrorCode::Shutdown
            | ErrorCode::Identity
            | ErrorCode::State
            | ErrorCode::Sequence
    )
}

/// What a negotiated template lacks, if it keeps no element of a group
/// of [`MUST_KEEP_ONE_OF`] that the offered template had.
fn unusable(ours: &WireTemplate, theirs: &WireTemplate) -> Option<String> {
    for (what, group) in MUST_KEEP_ONE_OF {
        let offered = ours.keys.iter().any(|k| group.contains(&k.ie));
        let kept = theirs
            .keys
            .iter()
            .any(|k| !k.disabled && group.contains(&k.ie));
        if offered && !kept {
            return Some(format!(
                "the collector disabled every {what} of template {}: its records would be stored empty",
                ours.id
            ));
        }
    }
    None
}

pub struct Engine {
    cfg: ExporterConfig,
    stats: Arc<Stats>,
    rx: mpsc::Receiver<Cmd>,
    templates: Vec<WireTemplate>,
    next_seq: u32,
    retry: VecDeque<Msg>,
    spool: Spool,
    queue: VecDeque<Msg>,
    finish: Option<oneshot::Sender<Report>>,
    finish_deadline: Option<Instant>,
    boot_ns: u64,
    stream_id: u64,
    current: Option<usize>,
    tls: Option<tokio_rustls::TlsConnector>,
    /// Collectors that failed lately are tried last and not probed for
    /// fail-back until then: a hung collector's kernel still accepts TCP
    /// connections, only the handshake would show it is gone.
    suspect_until: Vec<Option<Instant>>,
    /// Collectors that left DATA unacknowledged past `ack_timeout` are not
    /// tried again until then.
    unacking_until: Vec<Option<Instant>>,
    /// Collectors that refused the templates, with why: not tried again.
    refused: Vec<Option<String>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("collectors", &self.cfg.collectors)
            .field("next_seq", &self.next_seq)
            .finish()
    }
}

struct Conn {
    framed: Framed<Box<dyn crate::Io>, CraneCodec>,
    /// Negotiated layouts when the collector disabled keys (else None: send
    /// the stored bytes as they are).
    transcode: Vec<(u16, RecordLayout, RecordLayout)>,
}

impl Engine {
    pub fn new(
        cfg: ExporterConfig,
        stats: Arc<Stats>,
        rx: mpsc::Receiver<Cmd>,
        templates: Vec<WireTemplate>,
        spool: Spool,
        identity: Identity,
        tls: Option<tokio_rustls::TlsConnector>,
    ) -> Engine {
        let Identity { boot_ns, stream_id } = identity;
        let cfg_len = cfg.collectors.len();
        Engine {
            cfg,
            stats,
            rx,
            templates,
            next_seq: 1,
            retry: VecDeque::new(),
            spool,
            queue: VecDeque::new(),
            finish: None,
            finish_deadline: None,
            boot_ns,
            stream_id,
            current: None,
            suspect_until: vec![None; cfg_len],
            unacking_until: vec![None; cfg_len],
            refused: vec![None; cfg_len],
            tls,
        }
    }

    fn suspect(&self, idx: usize) -> bool {
        self.suspect_until
            .get(idx)
            .copied()
            .flatten()
            .is_some_and(|t| Instant::now() < t)
    }

    /// Whether `idx` may be connected to now.
    fn usable(&self, idx: usize) -> bool {
        let unacking = self
            .unacking_until
            .get(idx)
            .copied()
            .flatten()
            .is_some_and(|t| Instant::now() < t);
        !unacking && self.refused.get(idx).is_some_and(Option::is_none)
    }

    /// Why every collector refused the templates, when all did.
    fn all_refused(&self) -> Option<String> {
        if self.refused.iter().all(Option::is_some) {
            let why: Vec<String> = self
                .cfg
                .collectors
                .iter()
                .zip(&self.refused)
                .map(|(c, r)| format!("{c}: {}", r.as_deref().unwrap_or("")))
                .collect();
            Some(why.join("; "))
        } else {
            None
        }
    }

    fn mark_suspect(&mut self, idx: usize) {
        if let Some(s) = self.suspect_until.get_mut(idx) {
            *s = Some(Instant::now() + SUSPECT_FOR);
        }
    }

    fn all_sent(&self) -> bool {
        self.retry.is_empty() && self.spool.is_empty() && self.queue.is_empty()
    }

    fn number(&mut self, b: Batch) -> Msg {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1).max(1);
        Msg {
            seq,
            template_id: b.template_id,
            count: b.count,
            records: b.records,
            duplicate: false,
        }
    }

    /// Spools `msg`, counting it as dropped when the bound is reached or
    /// the disk fails.
    fn spool_or_drop(&mut self, msg: Msg) {
        let count = u64::from(msg.count);
        match self.spool.push(msg) {
            Ok(true) => {
                self.stats
                    .spooled_records
                    .fetch_add(count, Ordering::Relaxed);
            }
            Ok(false) => {
                self.stats
                    .dropped_records
                    .fetch_add(count, Ordering::Relaxed);
                self.stats.dropped_messages.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    records = count,
                    spool_bytes = self.spool.bytes(),
                    bound = self.cfg.spool_max_bytes,
                    "spool full; records dropped"
                );
            }
            Err(e) => {
                self.stats
                    .dropped_records
                    .fetch_add(count, Ordering::Relaxed);
                self.stats.dropped_messages.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, records = count, "cannot spool; records dropped");
            }
        }
    }

    fn handle_cmd(&mut self, cmd: Cmd, connected: bool) {
        match cmd {
            Cmd::Batch(b) => {
                let msg = self.number(b);
                if connected {
                    self.queue.push_back(msg);
                } else {
                    self.spool_or_drop(msg);
                }
            }
            Cmd::Finish(reply) => {
                self.finish = Some(reply);
                self.finish_deadline = Some(Instant::now() + self.cfg.finish_timeout);
            }
        }
    }

    fn report(&self) -> Report {
        let unsent: u64 = self
            .retry
            .iter()
            .chain(self.queue.iter())
            .map(|m| u64::from(m.count))
            .sum();
        Report {
            records: self.stats.records.load(Ordering::Relaxed),
            acked_records: self.stats.acked_records.load(Ordering::Relaxed),
            dropped_records: self.stats.dropped_records.load(Ordering::Relaxed),
            unacked_records: self
                .stats
                .records
                .load(Ordering::Relaxed)
                .saturating_sub(self.stats.acked_records.load(Ordering::Relaxed))
                .saturating_sub(self.stats.dropped_records.load(Ordering::Relaxed)),
            spool_messages: self.spool.len() as u64,
            unsent_in_memory_records: unsent,
            failovers: self.stats.failovers.load(Ordering::Relaxed),
            earlier_runs_acked_records: 0,
            earlier_runs_spool_messages: 0,
            ack_timeouts: self.stats.ack_timeouts.load(Ordering::Relaxed),
            refused: self.stats.refused(),
        }
    }

    pub async fn run(mut self) {
        let mut channel_open = true;
        loop {
            if !channel_open && self.finish.is_none() {
                // The handle was dropped without finish(): nothing to report to.
                self.finish_deadline
                    .get_or_insert(Instant::now() + self.cfg.finish_timeout);
            }
            // Best first; when connected to a lower one, only better ones
            // are tried by the probe inside `serve`.
            let mut connected = None;
            let n = self.cfg.collectors.len();
            let order: Vec<usize> = (0..n)
                .filter(|i| !self.suspect(*i))
                .chain((0..n).filter(|i| self.suspect(*i)))
                .filter(|i| self.usable(*i))
                .collect();
            for idx in order {
                match self.connect(idx).await {
                    Ok(conn) => {
                        connected = Some((idx, conn));
                        break;
                    }
                    Err(ConnectError::Failed(e)) => {
                        self.mark_suspect(idx);
                        tracing::debug!(collector = %self.cfg.collectors[idx], error = %e, "collector not answering")
                    }
                    Err(ConnectError::Refused(why)) => {
                        tracing::error!(collector = %self.cfg.collectors[idx], error = %why, "collector refused the templates; not tried again");
                        self.refused[idx] = Some(why);
                        if let Some(all) = self.all_refused() {
                            if let Ok(mut r) = self.stats.refused.lock() {
                                *r = Some(all);
                            }
                        }
                    }
                }
            }
            match connected {
                Some((idx, conn)) => {
                    if self.current.is_some_and(|c| c != idx) {
                        self.stats.failovers.fetch_add(1, Ordering::Relaxed);
                    }
                    self.current = Some(idx);
                    self.stats.collector.store(idx, Ordering::Relaxed);
                    tracing::info!(collector = %self.cfg.collectors[idx], priority = idx, "exporting");
                    let ended = self.serve(idx, conn, &mut channel_open).await;
                    match ended {
                        Ended::Finished => break,
                        Ended::GaveUp => {
                            tracing::warn!(collector = %self.cfg.collectors[idx], "finish timeout: unacknowledged messages left in the spool");
                            break;
                        }
                        Ended::AckTimeout(why) => {
                            self.stats.ack_timeouts.fetch_add(1, Ordering::Relaxed);
                            self.mark_suspect(idx);
                            if let Some(u) = self.unacking_until.get_mut(idx) {
                                *u = Some(Instant::now() + self.cfg.ack_timeout);
                            }
                            tracing::warn!(collector = %self.cfg.collectors[idx], error = %why, "collector does not acknowledge; failing over");
                        }
                        Ended::FailBack(better) => {
                            tracing::info!(from = %self.cfg.collectors[idx], to = %self.cfg.collectors[better], "failing back to a better collector");
                        }
                        Ended::Failed(why) => {
                            self.mark_suspect(idx);
                            tracing::warn!(collector = %self.cfg.collectors[idx], error = %why, "collector lost; failing over");
                        }
                    }
                }
                None => {
                    if self.current.take().is_some() {
                        tracing::warn!("no collector answers; spooling");
                    }
                    self.stats.collector.store(usize::MAX, Ordering::Relaxed);
                    // Everything not in `retry` goes to the spool, in order.
                    while let Some(m) = self.queue.pop_front() {
                        self.spool_or_drop(m);
                    }
                    // Finishing with every collector refusing: waiting cannot help.
                    if self.finish_deadline.is_some_and(|d| Instant::now() >= d)
                        || (self.finish.is_some() && self.all_refused().is_some())
                    {
                        break;
                    }
                    let wait = tokio::time::sleep(self.cfg.retry_interval);
                    tokio::pin!(wait);
                    loop {
                        tokio::select! {
                            _ = &mut wait => break,
                            cmd = self.rx.recv(), if channel_open => match cmd {
                                Some(c) => self.handle_cmd(c, false),
                                None => channel_open = false,
                            },
                        }
                    }
                }
            }
        }
        // Whatever no collector took stays on disk (or in the memory spool),
        // counted as spooled or dropped.
        while let Some(m) = self.retry.pop_front() {
            self.spool_or_drop(m);
        }
        while let Some(m) = self.queue.pop_front() {
            self.spool_or_drop(m);
        }
        let report = self.report();
        if let Some(reply) = self.finish.take() {
            let _ = reply.send(report);
        }
    }

    async fn connect(&mut self, idx: usize) -> Result<Conn, ConnectError> {
        let addr = self.cfg.collectors[idx].clone();
        let failed = |detail: String| {
            ConnectError::Failed(ExportError::Collector {
                addr: addr.clone(),
                detail,
            })
        };
        let limit = self.cfg.connect_timeout;
        let stream = tokio::time::timeout(limit, TcpStream::connect(&addr))
            .await
            .map_err(|_| failed("connect timed out".into()))?
            .map_err(|e| failed(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let io: Box<dyn crate::Io> = match &self.tls {
            None => Box::new(stream),
            Some(connector) => {
                let name = qosloop_schema::tls::server_name(&addr).map_err(failed)?;
                let tls =
                    tokio::time::timeout(Duration::from_secs(2), connector.connect(name, stream))
                        .await
                        .map_err(|_| failed("TLS handshake timed out".into()))?
                        .map_err(|e| failed(format!("TLS: {e}")))?;
                Box::new(tls)
            }
        };
        let mut framed = Framed::new(io, CraneCodec::default());
        let handshake = async {
            let f = |message| Frame {
                session: 1,
                message,
            };
            framed
                .send(f(Message::Start(Start {
                    max_version: VERSION,
                    capabilities: CAP_LITTLE_ENDIAN | CAP_KEEPALIVE,
                    boot_ns: self.boot_ns,
                    stream_id: self.stream_id,
                    exporter: self.cfg.name.clone(),
                })))
                .await
                .map_err(|e| failed(e.to_string()))?;
            match framed.next().await {
                Some(Ok(Frame {
                    message: Message::StartAck(a),
                    ..
                })) => {
                    if a.version != VERSION {
                        return Err(failed(format!("collector chose version {}", a.version)));
                    }
                }
                other => {
                    return Err(failed(format!(
                        "expected START_ACK, got {}",
                        describe(other)
                    )))
                }
            }
            framed
                .send(f(Message::TemplateData(TemplateSet {
                    config_id: CONFIG_ID,
                    byte_order: ByteOrder::native(),
                    templates: self.templates.clone(),
                })))
                .await
                .map_err(|e| failed(e.to_string()))?;
            let acked = match framed.next().await {
                Some(Ok(Frame {
                    message: Message::TemplateDataAck(set),
                    ..
                })) => set,
                // The collector refuses the templates themselves: the same
                // templates would be refused again. Errors of its own state
                // (storage down, stopping, a name still in use) pass.
                Some(Ok(Frame {
                    message: Message::Error(e),
                    ..
                })) => {
                    let why = format!("ERROR {:?} in answer to the templates: {}", e.code, e.text);
                    return Err(if transient(e.code) {
                        failed(why)
                    } else {
                        ConnectError::Refused(why)
                    });
                }
                other => {
                    return Err(failed(format!(
                        "expected TMPL_DATA_ACK, got {}",
                        describe(other)
                    )))
                }
            };
            framed
                .send(f(Message::FinalTemplateData {
                    config_id: CONFIG_ID,
                }))
                .await
                .map_err(|e| failed(e.to_string()))?;
            match framed.next().await {
                Some(Ok(Frame {
                    message: Message::FinalTemplateDataAck { .. },
                    ..
                })) => {}
                other => {
                    return Err(failed(format!(
                        "expected FINAL_TMPL_DATA_ACK, got {}",
                        describe(other)
                    )))
                }
            }
            let mut transcode = Vec::new();
            for ours in &self.templates {
                let Some(theirs) = acked.templates.iter().find(|t| t.id == ours.id) else {
                    return Err(failed(format!(
                        "collector did not acknowledge template {}",
                        ours.id
                    )));
                };
                if theirs.keys.len() != ours.keys.len()
                    || theirs
                        .keys
                        .iter()
                        .zip(&ours.keys)
                        .any(|(a, b)| a.ie != b.ie)
                {
                    return Err(failed(format!("collector changed template {}", ours.id)));
                }
                if let Some(why) = unusable(ours, theirs) {
                    return Err(ConnectError::Refused(why));
                }
                if theirs.keys.iter().any(|k| k.disabled) {
                    transcode.push((
                        ours.id,
                        RecordLayout::new(ours, ByteOrder::native()),
                        RecordLayout::new(theirs, ByteOrder::native()),
                    ));
                }
            }
            Ok(transcode)
        };
        let transcode = tokio::time::timeout(Duration::from_secs(2), handshake)
            .await
            .map_err(|_| failed("handshake timed out".into()))??;
        Ok(Conn { framed, transcode })
    }

    fn next_to_send(&mut self) -> Option<Msg> {
        if let Some(m) = self.retry.pop_front() {
            return Some(m);
        }
        if !self.spool.is_empty() {
            match self.spool.pop() {
                Ok(Some(m)) => return Some(m),
                Ok(None) => {}
                Err(e) => {
                    // The spool's remaining count is lost with the file.
                    tracing::error!(error = %e, "spool unreadable; its messages are lost");
                    let lost = self.spool.len() as u64;
                    self.stats
                        .dropped_messages
                        .fetch_add(lost, Ordering::Relaxed);
                }
            }
        }
        self.queue.pop_front()
    }

    async fn serve(&mut self, idx: usize, mut conn: Conn, channel_open: &mut bool) -> Ended {
        // Sent and not yet acknowledged, with when each was sent.
        let mut inflight: VecDeque<(Msg, Instant)> = VecDeque::new();
        let mut last_sent: Option<u32> = None;
        let mut last_heard = Instant::now();
        let mut last_said = Instant::now();
        let mut probe = tokio::time::interval(self.cfg.probe_interval);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut fail_back: Option<(usize, Instant)> = None;
        let mut stop_sent = false;
        let ended = loop {
            // Fill the window.
            let mut wrote = false;
            let mut write_failed = None;
            while inflight.len() < self.cfg.window && fail_back.is_none() && !stop_sent {
                let Some(mut m) = self.next_to_send() else {
                    break;
                };
                let mut flags = 0;
                if last_sent.is_none_or(|l| l.wrapping_add(1) != m.seq) {
                    flags |= DATA_FLAG_START;
                }
                if m.duplicate {
                    flags |= DATA_FLAG_DUPLICATE;
                }
                let records = match transcode(&conn.transcode, &m) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(seq = m.seq, error = %e, "cannot re-encode a message; dropped");
                        self.stats
                            .dropped_records
                            .fetch_add(u64::from(m.count), Ordering::Relaxed);
                        continue;
                    }
                };
                let frame = Frame {
                    session: 1,
                    message: Message::Data(Data {
                        template_id: m.template_id,
                        config_id: CONFIG_ID,
                        flags,
                        seq: m.seq,
                        count: m.count,
                        records,
                    }),
                };
                if let Err(e) = conn.framed.feed(frame).await {
                    m.duplicate = true;
                    inflight.push_back((m, Instant::now()));
                    write_failed = Some(format!("writing: {e}"));
                    break;
                }
                last_sent = Some(m.seq);
                m.duplicate = true;
                inflight.push_back((m, Instant::now()));
                wrote = true;
            }
            if let Some(e) = write_failed {
                break Ended::Failed(e);
            }
            if wrote {
                match tokio::time::timeout(
                    self.cfg.dead_after,
                    SinkExt::<Frame>::flush(&mut conn.framed),
                )
                .await
                {
                    Ok(Ok(())) => last_said = Instant::now(),
                    Ok(Err(e)) => break Ended::Failed(format!("writing: {e}")),
                    Err(_) => break Ended::Failed("collector stopped reading".into()),
                }
            }
            if self.finish.is_some() && self.all_sent() && inflight.is_empty() && !stop_sent {
                if conn
                    .framed
                    .send(Frame {
                        session: 1,
                        message: Message::Stop,
                    })
                    .await
                    .is_err()
                {
                    break Ended::Finished;
                }
                stop_sent = true;
            }
            if let Some((better, since)) = fail_back {
                if inflight.is_empty() || since.elapsed() > Duration::from_secs(2) {
                    let _ = conn
                        .framed
                        .send(Frame {
                            session: 1,
                            message: Message::Stop,
                        })
                        .await;
                    break Ended::FailBack(better);
                }
            }
            // Checked on every turn, not on the tick: a collector that
            // floods keepalives would starve the tick (the select is biased
            // to reading). Keepalives keep `last_heard` fresh; only an
            // acknowledgement moves the oldest message on.
            if let Some((m, sent)) = inflight.front() {
                if sent.elapsed() > self.cfg.ack_timeout {
                    break Ended::AckTimeout(format!(
                        "DATA seq {} unacknowledged for {:?}",
                        m.seq, self.cfg.ack_timeout
                    ));
                }
                if self.finish_deadline.is_some_and(|d| Instant::now() >= d) {
                    break Ended::GaveUp;
                }
            }
            let room = self.queue.len() < self.cfg.window * 2;
            tokio::select! {
                biased;
                frame = conn.framed.next() => {
                    last_heard = Instant::now();
                    match frame {
                        Some(Ok(Frame { message: Message::DataAck(a), .. })) => {
                            if let Some(pos) = inflight.iter().position(|(m, _)| m.seq == a.seq) {
                                // Acknowledgements come in order; anything
                                // before an acknowledged message is settled too.
                                for (m, _) in inflight.drain(..=pos) {
                                    self.stats.acked_records.fetch_add(u64::from(m.count), Ordering::Relaxed);
                                }
                            } else {
                                tracing::debug!(seq = a.seq, "acknowledgement for no message in flight");
                            }
                        }
                        Some(Ok(Frame { message: Message::StopAck, .. })) if stop_sent => break Ended::Finished,
                        Some(Ok(Frame { message: Message::Keepalive | Message::StatusRsp(_), .. })) => {}
                        Some(Ok(Frame { message: Message::Error(e), .. })) => {
                            break Ended::Failed(format!("collector error {:?}: {}", e.code, e.text));
                        }
                        Some(Ok(other)) => break Ended::Failed(format!("unexpected {:?}", other.message.kind())),
                        Some(Err(e)) => break Ended::Failed(e.to_string()),
                        None => break Ended::Failed("connection closed".into()),
                    }
                }
                cmd = self.rx.recv(), if *channel_open && room => match cmd {
                    Some(c) => self.handle_cmd(c, true),
                    None => *channel_open = false,
                },
                _ = probe.tick(), if idx > 0 && fail_back.is_none() => {
                    for better in (0..idx).filter(|b| !self.suspect(*b) && self.usable(*b)) {
                        let addr = &self.cfg.collectors[better];
                        if let Ok(Ok(_probe)) = tokio::time::timeout(self.cfg.connect_timeout, TcpStream::connect(addr)).await {
                            fail_back = Some((better, Instant::now()));
                            break;
                        }
                    }
                }
                _ = tick.tick() => {
                    if !inflight.is_empty() && last_heard.elapsed() > self.cfg.dead_after {
                        break Ended::Failed(format!("no answer for {:?}", self.cfg.dead_after));
                    }
                    if last_said.elapsed() > Duration::from_secs(1) {
                        if conn.framed.send(Frame { session: 1, message: Message::Keepalive }).await.is_err() {
                            break Ended::Failed("writing keepalive".into());
                        }
                        last_said = Instant::now();
                    }
                    if stop_sent && last_heard.elapsed() > Duration::from_secs(2) {
                        break Ended::Finished;
                    }
                }
            }
        };
        // Unacknowledged messages go first next time, marked as possible
        // duplicates.
        while let Some((m, _)) = inflight.pop_back() {
            self.retry.push_front(m);
        }
        ended
    }
}

fn describe(f: Option<Result<Frame, qosloop_schema::crane::CraneError>>) -> String {
    match f {
        None => "end of stream".into(),
        Some(Err(e)) => e.to_string(),
        Some(Ok(Frame {
            message: Message::Error(e),
            ..
        })) => format!("ERROR {:?}: {}", e.code, e.text),
        Some(Ok(fr)) => format!("{:?}", fr.message.kind()),
    }
}

fn transcode(
    layouts: &[(u16, RecordLayout, RecordLayout)],
    m: &Msg,
) -> Result<Bytes, qosloop_schema::crane::CraneError> {
    let Some((_, full, negotiated)) = layouts.iter().find(|(id, _, _)| *id == m.template_id) else {
        return Ok(m.records.clone());
    };
    let mut out = BytesMut::with_capacity(m.records.len());
    let mut result = Ok(());
    full.decode_each(&m.records, m.count, |r| {
        if result.is_ok() {
            result = negotiated.encode(&r, &mut out);
        }
    })?;
    result?;
    Ok(out.freeze())
}
