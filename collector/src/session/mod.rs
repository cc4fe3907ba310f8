//! One exporter connection: START, templates, DATA handed to the writer,
//! DATA_ACK once committed. Anything malformed, out of order or beyond a
//! bound ends this session with an ERROR (counted by reason); the process
//! and every other session go on.
//!
//! What one peer can make this process hold is bounded here:
//! - time: START within `handshake_timeout`, FINAL_TMPL_DATA within
//!   `templates_timeout` of START (KEEPALIVE extends neither), then silence
//!   for three keepalive intervals ends the session; a write that blocks for
//!   10 s ends it too;
//! - templates: `max_templates` per session of at most `max_template_keys`
//!   keys, in at most `max_template_messages` TMPL_DATA messages; a template
//!   without an enabled fixed-size key (after the collector's own disabled
//!   keys) is refused, so every record takes bytes of its message;
//! - memory: a DATA message is decoded only once its decoded size (bounded
//!   by the bytes present: every count is checked against them first) is
//!   reserved from the session's budget and then from the collector's. A
//!   session over its own budget stops reading until its acknowledgements
//!   free room; one over the collector's waits for other sessions' commits;
//!   a message that could never fit is refused (`Oversized`). The
//!   reservation travels with the records to the writer and is given back
//!   when they are committed and dropped;
//! - identity: the exporter name is at most 255 printable bytes, must be the
//!   certificate's name over mutual TLS, and cannot be taken over while a
//!   session from another connection holds it.

use crate::config::Config;
use crate::store::{Batch, Outcome, Sink, WriteReq};
use bytes::BytesMut;
use futures_util::stream::FuturesOrdered;
use futures_util::{SinkExt, StreamExt};
use qosloop_runtime::tls::Io;
use qosloop_schema::crane::records::RecordLayout;
use qosloop_schema::crane::{
    ByteOrder, CraneCodec, CraneError, DataAck, ErrorCode, ErrorMsg, Frame, Message, StartAck,
    Status, CAP_KEEPALIVE, CAP_LITTLE_ENDIAN, READ_CHUNK, VERSION,
};
use qosloop_schema::guard::LogThrottle;
use qosloop_schema::IeId;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::WriteHalf;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;
use tokio_util::codec::FramedWrite;

mod budget;
mod checks;

use budget::{acquire_held, acquire_receiving, kib, Acquire, FrameReader, Held, Read, Received};
use checks::{accept_templates, check_data, claim_name, NameLease};

/// The bounds a session works within (from [`Config`]).
#[derive(Clone, Debug)]
pub struct SessionLimits {
    /// Messages a session may have waiting for storage before it stops
    /// reading.
    pub window: usize,
    pub max_message: usize,
    pub keepalive_s: u16,
    pub handshake_timeout: Duration,
    pub templates_timeout: Duration,
    pub max_templates: usize,
    pub max_template_keys: usize,
    pub max_template_messages: usize,
    pub decoded_bytes_per_session: usize,
    pub decoded_bytes_total: usize,
    pub large_message_bytes_total: usize,
}

impl SessionLimits {
    pub fn from_config(c: &Config) -> SessionLimits {
        SessionLimits {
            window: c.window,
            max_message: c.max_message,
            keepalive_s: c.keepalive_s,
            handshake_timeout: Duration::from_millis(c.handshake_timeout_ms),
            templates_timeout: Duration::from_millis(c.templates_timeout_ms),
            max_templates: c.max_templates,
            max_template_keys: c.max_template_keys,
            max_template_messages: c.max_template_messages,
            decoded_bytes_per_session: c.decoded_bytes_per_session,
            decoded_bytes_total: c.decoded_bytes_total,
            large_message_bytes_total: c.large_message_bytes_total,
        }
    }
}

/// Sessions ended or connections refused, by reason; logged and exported
/// together.
#[derive(Debug, Default)]
pub struct Counters {
    by_reason: Mutex<BTreeMap<&'static str, u64>>,
    /// DATA messages and records committed per exporter name (at most
    /// [`MAX_EXPORTER_ENTRIES`] names; later ones are summed under
    /// `other`).
    by_exporter: Mutex<HashMap<String, ExporterCounts>>,
    /// Decoded bytes reserved now, all sessions.
    decoded_in_flight: AtomicU64,
    /// Bytes of large messages being received now, all sessions.
    receiving: AtomicU64,
}

/// Exporter names tracked by [`Counters`] at most.
pub const MAX_EXPORTER_ENTRIES: usize = 4096;

/// What one exporter's sessions got committed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExporterCounts {
    /// DATA messages committed (duplicates included).
    pub messages: u64,
    /// … of which re-sent messages already stored.
    pub duplicates: u64,
    /// Records stored.
    pub records: u64,
}

impl ExporterCounts {
    /// Adds `other`'s counts (exporters summed under one label).
    pub fn add(&mut self, other: &ExporterCounts) {
        self.messages += other.messages;
        self.duplicates += other.duplicates;
        self.records += other.records;
    }

    fn count(&mut self, records: u64, stored: bool) {
        self.messages += 1;
        if stored {
            self.records += records;
        } else {
            self.duplicates += 1;
        }
    }
}

impl Counters {
    /// Counts one committed DATA message of `exporter`.
    pub fn committed(&self, exporter: &str, records: u64, stored: bool) {
        let mut m = self.by_exporter.lock().unwrap_or_else(|p| p.into_inner());
        // Per DATA message: a known name is counted without allocating.
        match m.get_mut(exporter) {
            Some(c) => c.count(records, stored),
            None => {
                let key = if m.len() < MAX_EXPORTER_ENTRIES {
                    exporter
                } else {
                    qosloop_runtime::metrics::OTHER
                };
                m.entry(key.to_owned()).or_default().count(records, stored);
            }
        }
    }

    /// Per exporter name, in name order.
    pub fn by_exporter(&self) -> Vec<(String, ExporterCounts)> {
        let m = self.by_exporter.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<(String, ExporterCounts)> = m.iter().map(|(k, c)| (k.clone(), *c)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn count(&self, reason: &'static str) {
        let mut m = self.by_reason.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(reason).or_insert(0) += 1;
    }

    /// How often each reason occurred since the start.
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.by_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Decoded bytes waiting for storage now, all sessions.
    pub fn decoded_in_flight(&self) -> u64 {
        self.decoded_in_flight.load(Ordering::Relaxed)
    }

    /// Bytes reserved for large messages being received now.
    pub fn receiving(&self) -> u64 {
        self.receiving.load(Ordering::Relaxed)
    }
}

/// What every session shares.
#[derive(Debug)]
pub struct SessionCtx {
    pub sink: Sink,
    pub writer: mpsc::Sender<WriteReq>,
    pub limits: SessionLimits,
    /// Keys the collector does not want (disabled in TMPL_DATA_ACK).
    pub disabled_keys: Vec<IeId>,
    /// The collector's decoded-memory budget, in KiB permits.
    pub memory: Arc<Semaphore>,
    /// The budget of large messages being received, in KiB permits.
    pub receiving: Arc<Semaphore>,
    /// Exporter names with a live session, and the connection holding each.
    pub live: Arc<Mutex<HashMap<String, (u64, SocketAddr)>>>,
    pub counters: Arc<Counters>,
    /// For the log lines a peer can repeat at will.
    pub log_refusals: LogThrottle,
    pub log_sessions: LogThrottle,
    next_conn: AtomicU64,
}

impl SessionCtx {
    pub fn new(
        sink: Sink,
        writer: mpsc::Sender<WriteReq>,
        limits: SessionLimits,
        disabled_keys: Vec<IeId>,
        counters: Arc<Counters>,
    ) -> SessionCtx {
        let permits = |bytes| (kib(bytes) as usize).min(Semaphore::MAX_PERMITS);
        SessionCtx {
            sink,
            writer,
            memory: Arc::new(Semaphore::new(permits(limits.decoded_bytes_total))),
            receiving: Arc::new(Semaphore::new(permits(limits.large_message_bytes_total))),
            limits,
            disabled_keys,
            live: Arc::default(),
            counters,
            log_refusals: LogThrottle::new(Duration::from_secs(1)),
            log_sessions: LogThrottle::new(Duration::from_secs(1)),
            next_conn: AtomicU64::new(1),
        }
    }
}

/// Why a session ended with an ERROR.
#[derive(Debug)]
struct Refusal {
    code: ErrorCode,
    /// The counter it is counted under.
    reason: &'static str,
    text: String,
}

fn refuse(code: ErrorCode, reason: &'static str, text: impl Into<String>) -> Refusal {
    Refusal {
        code,
        reason,
        text: text.into(),
    }
}

impl From<CraneError> for Refusal {
    fn from(e: CraneError) -> Self {
        let (code, reason) = match &e {
            CraneError::Version(_) => (ErrorCode::Version, "version"),
            CraneError::Oversized { .. } => (ErrorCode::Oversized, "oversized_message"),
            _ => (ErrorCode::Malformed, "malformed"),
        };
        refuse(code, reason, e.to_string())
    }
}

/// A peer's string made safe for a log line or an ERROR text: control
/// characters escaped, at most `max` characters.
pub(crate) fn printable(s: &str, max: usize) -> String {
    let mut out: String = s.chars().take(max).flat_map(char::escape_debug).collect();
    if s.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

/// A message waiting for storage: its seq, record count, decoded bytes and
/// fate.
type Pending = Pin<Box<dyn Future<Output = (u32, u64, usize, Result<Outcome, String>)> + Send>>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitStart,
    Templates,
    Data,
}

struct Stream {
    /// The name the exporter gave in START.
    exporter: String,
    exporter_id: i64,
    session_id: i64,
    byte_order: ByteOrder,
    config_id: u16,
    layouts: HashMap<u16, RecordLayout>,
    template_messages: usize,
    last_seq: Option<u32>,
    last_acked: u32,
    committed: u64,
}

type Writer = FramedWrite<WriteHalf<Box<dyn Io>>, CraneCodec>;

/// Serves one connection until STOP, an error, a deadline or the peer's
/// end. `identity` is the name in the peer's certificate (mutual TLS).
pub async fn serve(
    stream: Box<dyn Io>,
    peer: SocketAddr,
    identity: Option<String>,
    ctx: Arc<SessionCtx>,
) {
    let conn = ctx.next_conn.fetch_add(1, Ordering::Relaxed);
    let (rd, wr) = tokio::io::split(stream);
    let codec = CraneCodec::with_max_message(ctx.limits.max_message);
    let mut reader = FrameReader {
        rd,
        buf: BytesMut::new(),
        codec,
    };
    let mut writer: Writer = FramedWrite::new(wr, codec);
    let mut session_no = 0u8;
    let mut decoded_in_flight = 0usize;
    let result = run(
        &ctx,
        peer,
        conn,
        identity,
        &mut reader,
        &mut writer,
        &mut session_no,
        &mut decoded_in_flight,
    )
    .await;
    ctx.counters
        .decoded_in_flight
        .fetch_sub(decoded_in_flight as u64, Ordering::Relaxed);
    if let Err(r) = result {
        ctx.counters.count(r.reason);
        if let Some(suppressed) = ctx.log_refusals.check() {
            tracing::warn!(%peer, code = ?r.code, reason = r.reason, error = %r.text, suppressed,
                "session closed with an error");
        }
        let msg = Message::Error(ErrorMsg {
            time_ns: qosloop_store::now_ns().max(0) as u64,
            code: r.code,
            text: r.text,
        });
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            writer.send(Frame {
                session: session_no,
                message: msg,
            }),
        )
        .await;
    }
}

/// The session's loop; `Err` ends it with an ERROR.
#[allow(clippy::too_many_arguments)]
async fn run(
    ctx: &SessionCtx,
    peer: SocketAddr,
    conn: u64,
    identity: Option<String>,
    reader: &mut FrameReader,
    writer: &mut Writer,
    session_no: &mut u8,
    decoded_in_flight: &mut usize,
) -> Result<(), Refusal> {
    let limits = &ctx.limits;
    let mut state = State::AwaitStart;
    let mut st: Option<Stream> = None;
    let mut _lease: Option<NameLease> = None;
    let mut pending: FuturesOrdered<Pending> = FuturesOrdered::new();
    let mut held: Option<Held> = None;
    // The reservation for the large message being received, and one being
    // waited for.
    let mut received: Option<Received> = None;
    let mut receive_acquire: Option<(usize, Acquire)> = None;
    let mut stopping = false;
    let idle = Duration::from_secs(u64::from(limits.keepalive_s.max(1)) * 3);
    let mut deadline = Instant::now() + limits.handshake_timeout;
    // While batches wait for their commit, a keepalive every 250 ms tells the
    // exporter this collector is alive (it fails over after 1 s of silence),
    // however slow the database.
    let mut heartbeat = tokio::time::interval(Duration::from_millis(250));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heartbeats = false;

    loop {
        if stopping && pending.is_empty() && held.is_none() {
            if let Some(s) = &st {
                if let Sink::Db(db) = &ctx.sink {
                    let _ = db.stop_session(s.exporter_id, s.session_id).await;
                }
            }
            send(writer, *session_no, Message::StopAck).await?;
            if ctx.log_sessions.check().is_some() {
                tracing::info!(%peer, "session stopped by the exporter");
            }
            return Ok(());
        }
        // A held message asks the collector's budget once the session's own
        // has room for it.
        if let Some(h) = held.as_mut() {
            if h.acquire.is_none()
                && *decoded_in_flight + h.decoded_bytes <= limits.decoded_bytes_per_session
            {
                h.acquire = Some(Box::pin(
                    ctx.memory.clone().acquire_many_owned(kib(h.decoded_bytes)),
                ));
            }
        }
        let handshaking = state != State::Data;
        let waiting = !pending.is_empty() || held.is_some() || receive_acquire.is_some();
        let covered = received.as_ref().map_or(0, |r| r.bytes);
        tokio::select! {
            biased;
            Some((seq, count, bytes, outcome)) = pending.next(), if !pending.is_empty() => {
                *decoded_in_flight = decoded_in_flight.saturating_sub(bytes);
                ctx.counters.decoded_in_flight.fetch_sub(bytes as u64, Ordering::Relaxed);
                match outcome {
                    Ok(o) => {
                        if let Some(s) = st.as_mut() {
                            s.last_acked = seq;
                            if o == Outcome::Stored { s.committed += count; }
                            ctx.counters.committed(&s.exporter, count, o == Outcome::Stored);
                            let config_id = s.config_id;
                            send(writer, *session_no, Message::DataAck(DataAck { seq, config_id })).await?;
                        }
                    }
                    Err(e) => return Err(refuse(ErrorCode::Storage, "storage", e)),
                }
            }
            permit = acquire_held(&mut held), if held.as_ref().is_some_and(|h| h.acquire.is_some()) => {
                let permit = permit.map_err(|_| refuse(ErrorCode::Shutdown, "shutdown", "collector is stopping"))?;
                let (Some(h), Some(s)) = (held.take(), st.as_mut()) else { continue };
                let Some(layout) = s.layouts.get(&h.data.template_id) else { continue };
                let d = h.data;
                let records = layout.decode(&d.records, d.count)
                    .map_err(|e| refuse(ErrorCode::Malformed, "malformed", format!("DATA seq {}: {e}", d.seq)))?;
                *decoded_in_flight += h.decoded_bytes;
                ctx.counters.decoded_in_flight.fetch_add(h.decoded_bytes as u64, Ordering::Relaxed);
                let (done, wait) = oneshot::channel();
                let req = WriteReq {
                    batch: Batch { exporter_id: s.exporter_id, session_id: s.session_id, seq: d.seq, records, dedup: true },
                    done,
                    memory: Some(permit),
                };
                let (seq, count, bytes) = (d.seq, u64::from(d.count), h.decoded_bytes);
                // Counted before the send: the pending future gives it back.
                pending.push_back(Box::pin(async move {
                    (seq, count, bytes, wait.await.unwrap_or_else(|_| Err("writer stopped".to_owned())))
                }));
                ctx.writer.send(req).await.map_err(|_| refuse(ErrorCode::Shutdown, "shutdown", "collector is stopping"))?;
            }
            permit = acquire_receiving(&mut receive_acquire), if receive_acquire.is_some() => {
                let permit = permit.map_err(|_| refuse(ErrorCode::Shutdown, "shutdown", "collector is stopping"))?;
                if let Some((bytes, _)) = receive_acquire.take() {
                    ctx.counters.receiving.fetch_add(bytes as u64, Ordering::Relaxed);
                    received = Some(Received { bytes, _permit: permit, counters: ctx.counters.clone() });
                }
            }
            _ = heartbeat.tick(), if heartbeats && waiting => {
                send(writer, *session_no, Message::Keepalive).await?;
            }
            _ = tokio::time::sleep_until(deadline), if handshaking => {
                return Err(match state {
                    State::AwaitStart => refuse(ErrorCode::Limit, "handshake_timeout",
                        format!("no START within {} ms of connecting", limits.handshake_timeout.as_millis())),
                    _ => refuse(ErrorCode::Limit, "templates_timeout",
                        format!("no FINAL_TMPL_DATA within {} ms of START", limits.templates_timeout.as_millis())),
                });
            }
            frame = reader.next(covered), if pending.len() < limits.window && held.is_none() && receive_acquire.is_none() && !stopping => {
                let frame = match frame {
                    None => {
                        if ctx.log_sessions.check().is_some() {
                            tracing::info!(%peer, "exporter closed the connection");
                        }
                        return Ok(());
                    }
                    Some(Err(CraneError::Io(e))) => {
                        if ctx.log_sessions.check().is_some() {
                            tracing::info!(%peer, error = %e, "connection lost");
                        }
                        return Ok(());
                    }
                    Some(Err(e)) => return Err(e.into()),
                    Some(Ok(Read::NeedBudget(bytes))) => {
                        // Until the templates are final a peer is nobody yet:
                        // it may not hold the shared receiving budget (START
                        // and a full TMPL_DATA fit in READ_CHUNK).
                        if state != State::Data {
                            return Err(refuse(ErrorCode::Oversized, "large_before_data",
                                format!("a {bytes}-byte message before the templates are final (at most {READ_CHUNK} bytes until then)")));
                        }
                        receive_acquire = Some((bytes, Box::pin(ctx.receiving.clone().acquire_many_owned(kib(bytes)))));
                        continue;
                    }
                    Some(Ok(Read::Frame(f))) => f,
                };
                // The frame is out of the buffer: its reservation goes with
                // it (a DATA message keeps it until it is decoded).
                let frame_received = received.take();
                *session_no = frame.session;
                match (state, frame.message) {
                    (_, Message::Keepalive) => send(writer, *session_no, Message::Keepalive).await?,
                    (State::AwaitStart, Message::Start(s)) => {
                        if s.max_version < VERSION {
                            return Err(refuse(ErrorCode::Version, "version", format!("exporter speaks up to version {}, this collector {}", s.max_version, VERSION)));
                        }
                        _lease = Some(claim_name(ctx, &s, identity.as_deref(), peer, conn)?);
                        let session_id = s.stream_id as i64;
                        let exporter_id = match &ctx.sink {
                            Sink::Db(db) => db.register_exporter(&s.exporter, &peer.to_string(), s.boot_ns).await
                                .map_err(|e| refuse(ErrorCode::Storage, "storage", format!("recording exporter: {e}")))?,
                            Sink::Discard => 0,
                        };
                        if ctx.log_sessions.check().is_some() {
                            tracing::info!(%peer, exporter = %s.exporter, exporter_id, stream = s.stream_id, "session started");
                        }
                        st = Some(Stream { exporter: s.exporter.clone(), exporter_id, session_id, byte_order: ByteOrder::Big, config_id: 0,
                            layouts: HashMap::new(), template_messages: 0, last_seq: None, last_acked: 0, committed: 0 });
                        state = State::Templates;
                        deadline = Instant::now() + limits.templates_timeout;
                        heartbeats = s.capabilities & CAP_KEEPALIVE != 0;
                        send(writer, *session_no, Message::StartAck(StartAck {
                            version: VERSION,
                            capabilities: s.capabilities & (CAP_LITTLE_ENDIAN | CAP_KEEPALIVE),
                            boot_ns: s.boot_ns,
                            keepalive_s: limits.keepalive_s,
                        })).await?;
                    }
                    (State::Templates, Message::TemplateData(set)) => {
                        let Some(s) = st.as_mut() else { return Err(refuse(ErrorCode::State, "state", "templates before START")) };
                        let ack = accept_templates(ctx, s, set).await?;
                        send(writer, *session_no, Message::TemplateDataAck(ack)).await?;
                    }
                    (State::Templates, Message::FinalTemplateData { config_id }) => {
                        let Some(s) = st.as_mut() else { return Err(refuse(ErrorCode::State, "state", "templates before START")) };
                        if config_id != s.config_id || s.layouts.is_empty() {
                            return Err(refuse(ErrorCode::ConfigMismatch, "config_mismatch", format!("FINAL_TMPL_DATA for config {config_id}, negotiated {}", s.config_id)));
                        }
                        if let Sink::Db(db) = &ctx.sink {
                            db.open_session(s.exporter_id, s.session_id, s.byte_order.as_str()).await
                                .map_err(|e| refuse(ErrorCode::Storage, "storage", format!("recording session: {e}")))?;
                        }
                        state = State::Data;
                        send(writer, *session_no, Message::FinalTemplateDataAck { config_id }).await?;
                    }
                    (State::Data, Message::Data(d)) => {
                        let Some(s) = st.as_mut() else { return Err(refuse(ErrorCode::State, "state", "DATA before START")) };
                        let mut h = check_data(limits, s, d)?;
                        h._received = frame_received;
                        held = Some(h);
                    }
                    (_, Message::StatusReq) => {
                        let (last_acked_seq, committed_records) = st.as_ref().map(|s| (s.last_acked, s.committed)).unwrap_or((0, 0));
                        send(writer, *session_no, Message::StatusRsp(Status { last_acked_seq, pending: pending.len() as u32, committed_records })).await?;
                    }
                    (_, Message::Stop) => stopping = true,
                    (_, Message::Error(e)) => {
                        ctx.counters.count("exporter_error");
                        if let Some(suppressed) = ctx.log_refusals.check() {
                            tracing::warn!(%peer, code = ?e.code, text = %printable(&e.text, 200), suppressed,
                                "exporter reported an error; closing");
                        }
                        return Ok(());
                    }
                    (_, other) => {
                        return Err(refuse(ErrorCode::State, "state", format!("{:?} not allowed here", other.kind())));
                    }
                }
            }
            _ = tokio::time::sleep(idle), if !waiting => {
                ctx.counters.count("idle_timeout");
                if ctx.log_sessions.check().is_some() {
                    tracing::info!(%peer, idle_s = idle.as_secs(), "exporter silent; closing");
                }
                return Ok(());
            }
        }
    }
}

async fn send(writer: &mut Writer, session: u8, message: Message) -> Result<(), Refusal> {
    // An exporter that stops reading must not hold its session (and the
    // records it waits on) forever.
    match tokio::time::timeout(WRITE_TIMEOUT, writer.send(Frame { session, message })).await {
        Ok(r) => r.map_err(|e| {
            refuse(
                ErrorCode::Internal,
                "write_failed",
                format!("writing to the exporter: {e}"),
            )
        }),
        Err(_) => Err(refuse(
            ErrorCode::Internal,
            "write_timeout",
            format!("exporter stopped reading for {} s", WRITE_TIMEOUT.as_secs()),
        )),
    }
}

/// How long a write to an exporter may block.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn peer_strings_are_escaped_and_cut() {
        assert_eq!(printable("m1", 64), "m1");
        assert_eq!(printable("a\nb\u{1b}[31m", 64), "a\\nb\\u{1b}[31m");
        assert_eq!(printable(&"x".repeat(100), 3), "xxx…");
    }

    #[test]
    fn committed_messages_are_counted_per_exporter_up_to_the_cap() {
        use super::{Counters, ExporterCounts, MAX_EXPORTER_ENTRIES};
        let c = Counters::default();
        for i in 0..MAX_EXPORTER_ENTRIES {
            c.committed(&format!("e{i}"), 1, true);
        }
        c.committed("e0", 5, true);
        c.committed("e0", 5, false);
        c.committed("late", 7, true);
        c.committed("later", 1, false);
        let all = c.by_exporter();
        assert_eq!(all.len(), MAX_EXPORTER_ENTRIES + 1);
        let get = |name: &str| all.iter().find(|(n, _)| n == name).map(|(_, c)| *c);
        let e0 = ExporterCounts {
            messages: 3,
            duplicates: 1,
            records: 6,
        };
        assert_eq!(get("e0"), Some(e0));
        assert_eq!(get("late"), None);
        let other = ExporterCounts {
            messages: 2,
            duplicates: 1,
            records: 7,
        };
        assert_eq!(get(qosloop_runtime::metrics::OTHER), Some(other));
    }
}
