//! One connection to a collector: the handshake (START, the templates and
//! the check of what the collector kept of them), then the window of DATA
//! in flight, acknowledgements, keepalives, fail-back probes and the ack
//! timeout until the connection ends ([`Ended`]). Which collector to use,
//! and what becomes of the messages when none answers, is the parent's.

use super::{Engine, Msg, CONFIG_ID};
use crate::ExportError;
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
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

pub(super) enum Ended {
    Failed(String),
    /// The oldest DATA in flight waited longer than `ack_timeout`.
    AckTimeout(String),
    FailBack(usize),
    Finished,
    /// `finish_timeout` passed with messages still unacknowledged.
    GaveUp,
}

/// Why a collector could not be used.
pub(super) enum ConnectError {
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

pub(super) struct Conn {
    framed: Framed<Box<dyn crate::Io>, CraneCodec>,
    /// Negotiated layouts when the collector disabled keys (else None: send
    /// the stored bytes as they are).
    transcode: Vec<(u16, RecordLayout, RecordLayout)>,
}

impl Engine {
    pub(super) async fn connect(&mut self, idx: usize) -> Result<Conn, ConnectError> {
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
                let name = qosloop_runtime::tls::server_name(&addr).map_err(failed)?;
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

    pub(super) async fn serve(
        &mut self,
        idx: usize,
        mut conn: Conn,
        channel_open: &mut bool,
    ) -> Ended {
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
