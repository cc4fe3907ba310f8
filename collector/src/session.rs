//! One exporter connection: START, templates, DATA handed to the writer,
//! DATA_ACK once committed. Anything malformed or out of order ends this
//! session with an ERROR; the process and every other session go on.

use crate::store::{Batch, Outcome, Sink, WriteReq};
use futures_util::stream::FuturesOrdered;
use futures_util::{SinkExt, StreamExt};
use qosloop_exporter::Io;
use qosloop_schema::crane::records::RecordLayout;
use qosloop_schema::crane::{
    ByteOrder, CraneCodec, CraneError, DataAck, ErrorCode, ErrorMsg, Frame, Message, StartAck,
    Status, TemplateSet, WireTemplate, CAP_KEEPALIVE, CAP_LITTLE_ENDIAN, DATA_FLAG_START, VERSION,
};
use qosloop_schema::IeId;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::WriteHalf;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};

/// What every session shares.
#[derive(Debug)]
pub struct SessionCtx {
    pub sink: Sink,
    pub writer: mpsc::Sender<WriteReq>,
    /// Messages a session may have waiting for storage before it stops
    /// reading.
    pub window: usize,
    pub max_message: usize,
    pub keepalive_s: u16,
    /// Keys the collector does not want (disabled in TMPL_DATA_ACK).
    pub disabled_keys: Vec<IeId>,
}

/// Why a session ended with an ERROR.
#[derive(Debug)]
struct Refusal {
    code: ErrorCode,
    text: String,
}

fn refuse(code: ErrorCode, text: impl Into<String>) -> Refusal {
    Refusal {
        code,
        text: text.into(),
    }
}

impl From<CraneError> for Refusal {
    fn from(e: CraneError) -> Self {
        let code = match &e {
            CraneError::Version(_) => ErrorCode::Version,
            CraneError::Oversized { .. } => ErrorCode::Oversized,
            _ => ErrorCode::Malformed,
        };
        refuse(code, e.to_string())
    }
}

/// A message waiting for storage: its seq, record count and fate.
type Pending = Pin<Box<dyn Future<Output = (u32, u64, Result<Outcome, String>)> + Send>>;

enum State {
    AwaitStart,
    Templates,
    Data,
}

struct Stream {
    exporter_id: i64,
    session_id: i64,
    byte_order: ByteOrder,
    config_id: u16,
    layouts: HashMap<u16, RecordLayout>,
    last_seq: Option<u32>,
    last_acked: u32,
    committed: u64,
}

/// Serves one connection until STOP, an error or the peer's end.
pub async fn serve(stream: Box<dyn Io>, peer: SocketAddr, ctx: Arc<SessionCtx>) {
    let (rd, wr) = tokio::io::split(stream);
    let codec = CraneCodec::with_max_message(ctx.max_message);
    let mut reader = FramedRead::new(rd, codec);
    let mut writer = FramedWrite::new(wr, codec);
    let mut state = State::AwaitStart;
    let mut st: Option<Stream> = None;
    let mut session_no = 0u8;
    let mut pending: FuturesOrdered<Pending> = FuturesOrdered::new();
    let mut stopping = false;
    let idle = Duration::from_secs(u64::from(ctx.keepalive_s.max(1)) * 3);
    // While batches wait for their commit, a keepalive every 250 ms tells the
    // exporter this collector is alive (it fails over after 1 s of silence),
    // however slow the database.
    let mut heartbeat = tokio::time::interval(Duration::from_millis(250));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heartbeats = false;

    let result: Result<(), Refusal> = async {
        loop {
            if stopping && pending.is_empty() {
                if let Some(s) = &st {
                    if let Sink::Db(db) = &ctx.sink {
                        let _ = db.stop_session(s.exporter_id, s.session_id).await;
                    }
                }
                send(&mut writer, session_no, Message::StopAck).await?;
                tracing::info!(%peer, "session stopped by the exporter");
                return Ok(());
            }
            tokio::select! {
                biased;
                Some((seq, count, outcome)) = pending.next(), if !pending.is_empty() => {
                    match outcome {
                        Ok(o) => {
                            if let Some(s) = st.as_mut() {
                                s.last_acked = seq;
                                if o == Outcome::Stored { s.committed += count; }
                                let config_id = s.config_id;
                                send(&mut writer, session_no, Message::DataAck(DataAck { seq, config_id })).await?;
                            }
                        }
                        Err(e) => return Err(refuse(ErrorCode::Storage, e)),
                    }
                }
                _ = heartbeat.tick(), if heartbeats && !pending.is_empty() => {
                    send(&mut writer, session_no, Message::Keepalive).await?;
                }
                frame = reader.next(), if pending.len() < ctx.window && !stopping => {
                    let frame = match frame {
                        None => {
                            tracing::info!(%peer, "exporter closed the connection");
                            return Ok(());
                        }
                        Some(Err(CraneError::Io(e))) => {
                            tracing::info!(%peer, error = %e, "connection lost");
                            return Ok(());
                        }
                        Some(Err(e)) => return Err(e.into()),
                        Some(Ok(f)) => f,
                    };
                    session_no = frame.session;
                    match (&state, frame.message) {
                        (_, Message::Keepalive) => send(&mut writer, session_no, Message::Keepalive).await?,
                        (State::AwaitStart, Message::Start(s)) => {
                            if s.max_version < VERSION {
                                return Err(refuse(ErrorCode::Version, format!("exporter speaks up to version {}, this collector {}", s.max_version, VERSION)));
                            }
                            let session_id = s.stream_id as i64;
                            let exporter_id = match &ctx.sink {
                                Sink::Db(db) => db.register_exporter(&s.exporter, &peer.to_string(), s.boot_ns).await
                                    .map_err(|e| refuse(ErrorCode::Storage, format!("recording exporter: {e}")))?,
                                Sink::Discard => 0,
                            };
                            tracing::info!(%peer, exporter = %s.exporter, exporter_id, stream = s.stream_id, "session started");
                            st = Some(Stream { exporter_id, session_id, byte_order: ByteOrder::Big, config_id: 0,
                                layouts: HashMap::new(), last_seq: None, last_acked: 0, committed: 0 });
                            state = State::Templates;
                            heartbeats = s.capabilities & CAP_KEEPALIVE != 0;
                            send(&mut writer, session_no, Message::StartAck(StartAck {
                                version: VERSION,
                                capabilities: s.capabilities & (CAP_LITTLE_ENDIAN | CAP_KEEPALIVE),
                                boot_ns: s.boot_ns,
                                keepalive_s: ctx.keepalive_s,
                            })).await?;
                        }
                        (State::Templates, Message::TemplateData(set)) => {
                            let Some(s) = st.as_mut() else { return Err(refuse(ErrorCode::State, "templates before START")) };
                            let ack = accept_templates(&ctx, s, set).await?;
                            send(&mut writer, session_no, Message::TemplateDataAck(ack)).await?;
                        }
                        (State::Templates, Message::FinalTemplateData { config_id }) => {
                            let Some(s) = st.as_mut() else { return Err(refuse(ErrorCode::State, "templates before START")) };
                            if config_id != s.config_id || s.layouts.is_empty() {
                                return Err(refuse(ErrorCode::ConfigMismatch, format!("FINAL_TMPL_DATA for config {config_id}, negotiated {}", s.config_id)));
                            }
                            if let Sink::Db(db) = &ctx.sink {
                                db.open_session(s.exporter_id, s.session_id, s.byte_order.as_str()).await
                                    .map_err(|e| refuse(ErrorCode::Storage, format!("recording session: {e}")))?;
                            }
                            state = State::Data;
                            send(&mut writer, session_no, Message::FinalTemplateDataAck { config_id }).await?;
                        }
                        (State::Data, Message::Data(d)) => {
                            let Some(s) = st.as_mut() else { return Err(refuse(ErrorCode::State, "DATA before START")) };
                            if d.config_id != s.config_id {
                                return Err(refuse(ErrorCode::ConfigMismatch, format!("DATA seq {} names config {}, negotiated {}", d.seq, d.config_id, s.config_id)));
                            }
                            let Some(layout) = s.layouts.get(&d.template_id) else {
                                return Err(refuse(ErrorCode::UnknownTemplate, format!("DATA seq {} names template {}, not negotiated", d.seq, d.template_id)));
                            };
                            if let Some(last) = s.last_seq {
                                let ok = if d.flags & DATA_FLAG_START != 0 { d.seq > last } else { Some(d.seq) == last.checked_add(1) };
                                if !ok {
                                    return Err(refuse(ErrorCode::Sequence, format!("DATA seq {} after {} (flags {:#04x})", d.seq, last, d.flags)));
                                }
                            }
                            let records = layout.decode(&d.records, d.count)
                                .map_err(|e| refuse(ErrorCode::Malformed, format!("DATA seq {}: {e}", d.seq)))?;
                            s.last_seq = Some(d.seq);
                            let (done, wait) = oneshot::channel();
                            let req = WriteReq { batch: Batch { exporter_id: s.exporter_id, session_id: s.session_id, seq: d.seq, records }, done };
                            ctx.writer.send(req).await.map_err(|_| refuse(ErrorCode::Shutdown, "collector is stopping"))?;
                            let (seq, count) = (d.seq, u64::from(d.count));
                            pending.push_back(Box::pin(async move {
                                (seq, count, wait.await.unwrap_or_else(|_| Err("writer stopped".to_owned())))
                            }));
                        }
                        (_, Message::StatusReq) => {
                            let (last_acked_seq, committed_records) = st.as_ref().map(|s| (s.last_acked, s.committed)).unwrap_or((0, 0));
                            send(&mut writer, session_no, Message::StatusRsp(Status { last_acked_seq, pending: pending.len() as u32, committed_records })).await?;
                        }
                        (_, Message::Stop) => stopping = true,
                        (_, Message::Error(e)) => {
                            tracing::warn!(%peer, code = ?e.code, text = %e.text, "exporter reported an error; closing");
                            return Ok(());
                        }
                        (_, other) => {
                            return Err(refuse(ErrorCode::State, format!("{:?} not allowed here", other.kind())));
                        }
                    }
                }
                _ = tokio::time::sleep(idle), if pending.is_empty() => {
                    tracing::info!(%peer, idle_s = idle.as_secs(), "exporter silent; closing");
                    return Ok(());
                }
            }
        }
    }
    .await;

    if let Err(r) = result {
        tracing::warn!(%peer, code = ?r.code, error = %r.text, "session closed with an error");
        let msg = Message::Error(ErrorMsg {
            time_ns: crate::now_ns().max(0) as u64,
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

async fn send(
    writer: &mut FramedWrite<WriteHalf<Box<dyn Io>>, CraneCodec>,
    session: u8,
    message: Message,
) -> Result<(), Refusal> {
    // An exporter that stops reading must not hold its session (and the
    // records it waits on) forever.
    match tokio::time::timeout(WRITE_TIMEOUT, writer.send(Frame { session, message })).await {
        Ok(r) => {
            r.map_err(|e| refuse(ErrorCode::Internal, format!("writing to the exporter: {e}")))
        }
        Err(_) => Err(refuse(
            ErrorCode::Internal,
            format!("exporter stopped reading for {} s", WRITE_TIMEOUT.as_secs()),
        )),
    }
}

/// How long a write to an exporter may block.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

async fn accept_templates(
    ctx: &SessionCtx,
    s: &mut Stream,
    mut set: TemplateSet,
) -> Result<TemplateSet, Refusal> {
    if !s.layouts.is_empty() && set.config_id != s.config_id {
        return Err(refuse(
            ErrorCode::ConfigMismatch,
            format!(
                "TMPL_DATA for config {} after config {}",
                set.config_id, s.config_id
            ),
        ));
    }
    s.config_id = set.config_id;
    s.byte_order = set.byte_order;
    for t in &mut set.templates {
        for k in &mut t.keys {
            if ctx.disabled_keys.contains(&k.ie) {
                k.disabled = true;
            }
        }
        s.layouts.insert(t.id, RecordLayout::new(t, set.byte_order));
        if let Sink::Db(db) = &ctx.sink {
            let definition =
                serde_json::to_string(&WireTemplate::to_template(t)).unwrap_or_default();
            db.store_template(
                s.exporter_id,
                s.session_id,
                t.id,
                set.config_id,
                &definition,
            )
            .await
            .map_err(|e| {
                refuse(
                    ErrorCode::Storage,
                    format!("recording template {}: {e}", t.id),
                )
            })?;
        }
    }
    Ok(set)
}
