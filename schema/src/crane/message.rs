//! The messages of the protocol and the encoding of their bodies.

use super::{CraneError, Reader};
use crate::ie::{self, DataType, IeId};
use crate::Template;
use bytes::{BufMut, Bytes, BytesMut};

/// Capability bit: the exporter may announce little-endian record data.
pub const CAP_LITTLE_ENDIAN: u16 = 0x0001;
/// Capability bit: KEEPALIVE messages are understood.
pub const CAP_KEEPALIVE: u16 = 0x0002;
/// Capability bit: the connection runs over TLS.
pub const CAP_TLS: u16 = 0x0004;

/// DATA flag S: the first message of a sequence; the sequence number need not
/// follow the previous one.
pub const DATA_FLAG_START: u8 = 0x01;
/// DATA flag D: possibly a duplicate (re-sent after a reconnect).
pub const DATA_FLAG_DUPLICATE: u8 = 0x02;

/// Message type codes (the header's MessageID).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    Start = 0x01,
    StartAck = 0x02,
    Stop = 0x03,
    StopAck = 0x04,
    TemplateData = 0x10,
    TemplateDataAck = 0x11,
    FinalTemplateData = 0x12,
    FinalTemplateDataAck = 0x13,
    Data = 0x20,
    DataAck = 0x21,
    Error = 0x23,
    StatusReq = 0x30,
    StatusRsp = 0x31,
    Keepalive = 0x32,
}

impl MessageType {
    pub fn from_u8(v: u8) -> Result<MessageType, CraneError> {
        Ok(match v {
            0x01 => MessageType::Start,
            0x02 => MessageType::StartAck,
            0x03 => MessageType::Stop,
            0x04 => MessageType::StopAck,
            0x10 => MessageType::TemplateData,
            0x11 => MessageType::TemplateDataAck,
            0x12 => MessageType::FinalTemplateData,
            0x13 => MessageType::FinalTemplateDataAck,
            0x20 => MessageType::Data,
            0x21 => MessageType::DataAck,
            0x23 => MessageType::Error,
            0x30 => MessageType::StatusReq,
            0x31 => MessageType::StatusRsp,
            0x32 => MessageType::Keepalive,
            other => return Err(CraneError::UnknownType(other)),
        })
    }
}

/// The byte order of record data, chosen by the exporter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ByteOrder {
    Big,
    Little,
}

impl ByteOrder {
    /// This machine's order.
    pub const fn native() -> ByteOrder {
        if cfg!(target_endian = "big") {
            ByteOrder::Big
        } else {
            ByteOrder::Little
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            ByteOrder::Big => "big",
            ByteOrder::Little => "little",
        }
    }
}

/// START: the exporter opens a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Start {
    /// Highest protocol version the exporter speaks.
    pub max_version: u8,
    /// `CAP_*` bits the exporter offers.
    pub capabilities: u16,
    /// The exporter's boot time, ns since the epoch (echoed in START_ACK).
    pub boot_ns: u64,
    /// The stream this connection continues: sequence numbers and the
    /// de-duplication key `(exporter, stream, seq)` belong to it, across
    /// reconnects and collectors.
    pub stream_id: u64,
    /// The exporter's stable name (its identity in the `exporters` table).
    pub exporter: String,
}

/// START_ACK: the collector accepts the session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartAck {
    pub version: u8,
    /// The offered capabilities the collector accepts.
    pub capabilities: u16,
    /// The exporter's boot time, echoed.
    pub boot_ns: u64,
    /// Seconds of silence after which either side may declare the peer dead.
    pub keepalive_s: u16,
}

/// One key of a template on the wire: element, type, disabled bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WireKey {
    pub ie: IeId,
    pub data_type: DataType,
    pub disabled: bool,
}

/// A template on the wire: every key carries its type, so a collector can
/// skip elements it does not know.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WireTemplate {
    pub id: u16,
    pub keys: Vec<WireKey>,
}

impl WireTemplate {
    /// The wire form of `t`; fails on an element without a known type.
    pub fn from_template(t: &Template) -> Result<WireTemplate, CraneError> {
        let keys = t
            .keys
            .iter()
            .map(|k| {
                let e = ie::by_id(k.ie).ok_or(CraneError::UnknownElement(k.ie))?;
                Ok(WireKey {
                    ie: k.ie,
                    data_type: e.data_type,
                    disabled: !k.enabled,
                })
            })
            .collect::<Result<Vec<_>, CraneError>>()?;
        Ok(WireTemplate { id: t.id, keys })
    }

    pub fn to_template(&self) -> Template {
        Template {
            id: self.id,
            keys: self
                .keys
                .iter()
                .map(|k| crate::TemplateKey {
                    ie: k.ie,
                    enabled: !k.disabled,
                })
                .collect(),
        }
    }

    /// The keys data records carry, in order.
    pub fn enabled(&self) -> impl Iterator<Item = &WireKey> {
        self.keys.iter().filter(|k| !k.disabled)
    }
}

/// TMPL_DATA and TMPL_DATA_ACK: a configuration of templates; in the ack,
/// the collector's disabled bits are set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateSet {
    pub config_id: u16,
    /// Record byte order (only meaningful from the exporter).
    pub byte_order: ByteOrder,
    pub templates: Vec<WireTemplate>,
}

/// DATA: records of one template, without descriptors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Data {
    pub template_id: u16,
    pub config_id: u16,
    /// `DATA_FLAG_*` bits.
    pub flags: u8,
    pub seq: u32,
    pub count: u32,
    /// `count` records encoded by [`super::records`].
    pub records: Bytes,
}

/// DATA_ACK: the message `seq` is committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataAck {
    pub seq: u32,
    pub config_id: u16,
}

/// Error codes of ERROR messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    Version,
    Malformed,
    Oversized,
    UnknownTemplate,
    ConfigMismatch,
    Sequence,
    State,
    Storage,
    Internal,
    Shutdown,
    /// The exporter's name is not acceptable: malformed, not the name in
    /// its certificate, or in use by a live session from another connection.
    Identity,
    /// A bound of the collector was reached: templates, keys, template
    /// messages, handshake or template deadlines.
    Limit,
    Other(u16),
}

impl ErrorCode {
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::Version => 1,
            ErrorCode::Malformed => 2,
            ErrorCode::Oversized => 3,
            ErrorCode::UnknownTemplate => 4,
            ErrorCode::ConfigMismatch => 5,
            ErrorCode::Sequence => 6,
            ErrorCode::State => 7,
            ErrorCode::Storage => 8,
            ErrorCode::Internal => 9,
            ErrorCode::Shutdown => 10,
            ErrorCode::Identity => 11,
            ErrorCode::Limit => 12,
            ErrorCode::Other(c) => c,
        }
    }
    pub fn from_u16(v: u16) -> ErrorCode {
        match v {
            1 => ErrorCode::Version,
            2 => ErrorCode::Malformed,
            3 => ErrorCode::Oversized,
            4 => ErrorCode::UnknownTemplate,
            5 => ErrorCode::ConfigMismatch,
            6 => ErrorCode::Sequence,
            7 => ErrorCode::State,
            8 => ErrorCode::Storage,
            9 => ErrorCode::Internal,
            10 => ErrorCode::Shutdown,
            11 => ErrorCode::Identity,
            12 => ErrorCode::Limit,
            other => ErrorCode::Other(other),
        }
    }
}

/// ERROR: time, code, text; the sender closes the session after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorMsg {
    pub time_ns: u64,
    pub code: ErrorCode,
    pub text: String,
}

/// STATUS_RSP: what the collector has committed of this stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    pub last_acked_seq: u32,
    pub pending: u32,
    pub committed_records: u64,
}

/// A message body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Start(Start),
    StartAck(StartAck),
    Stop,
    StopAck,
    TemplateData(TemplateSet),
    TemplateDataAck(TemplateSet),
    FinalTemplateData { config_id: u16 },
    FinalTemplateDataAck { config_id: u16 },
    Data(Data),
    DataAck(DataAck),
    Error(ErrorMsg),
    StatusReq,
    StatusRsp(Status),
    Keepalive,
}

/// A message with its header's session id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub session: u8,
    pub message: Message,
}

impl Message {
    pub fn kind(&self) -> MessageType {
        match self {
            Message::Start(_) => MessageType::Start,
            Message::StartAck(_) => MessageType::StartAck,
            Message::Stop => MessageType::Stop,
            Message::StopAck => MessageType::StopAck,
            Message::TemplateData(_) => MessageType::TemplateData,
            Message::TemplateDataAck(_) => MessageType::TemplateDataAck,
            Message::FinalTemplateData { .. } => MessageType::FinalTemplateData,
            Message::FinalTemplateDataAck { .. } => MessageType::FinalTemplateDataAck,
            Message::Data(_) => MessageType::Data,
            Message::DataAck(_) => MessageType::DataAck,
            Message::Error(_) => MessageType::Error,
            Message::StatusReq => MessageType::StatusReq,
            Message::StatusRsp(_) => MessageType::StatusRsp,
            Message::Keepalive => MessageType::Keepalive,
        }
    }

    /// Appends the body (everything after the header).
    pub(crate) fn encode_body(&self, out: &mut BytesMut) -> Result<(), CraneError> {
        match self {
            Message::Start(s) => {
                out.put_u8(s.max_version);
                out.put_u8(0);
                out.put_u16(s.capabilities);
                out.put_u64(s.boot_ns);
                out.put_u64(s.stream_id);
                put_str(out, "exporter name", &s.exporter)?;
            }
            Message::StartAck(a) => {
                out.put_u8(a.version);
                out.put_u8(0);
                out.put_u16(a.capabilities);
                out.put_u64(a.boot_ns);
                out.put_u16(a.keepalive_s);
                out.put_u16(0);
            }
            Message::Stop | Message::StopAck | Message::StatusReq | Message::Keepalive => {}
            Message::TemplateData(t) | Message::TemplateDataAck(t) => {
                out.put_u16(t.config_id);
                out.put_u8(match t.byte_order {
                    ByteOrder::Big => 1,
                    ByteOrder::Little => 0,
                });
                out.put_u8(0);
                put_len(out, "template count", t.templates.len())?;
                out.put_u16(0);
                for tmpl in &t.templates {
                    out.put_u16(tmpl.id);
                    put_len(out, "key count", tmpl.keys.len())?;
                    for k in &tmpl.keys {
                        out.put_u32(k.ie.enterprise);
                        out.put_u16(0);
                        out.put_u16(k.ie.id);
                        out.put_u16(key_type(k.data_type));
                        out.put_u16(0);
                        out.put_u32(u32::from(k.disabled));
                    }
                }
            }
            Message::FinalTemplateData { config_id }
            | Message::FinalTemplateDataAck { config_id } => {
                out.put_u16(*config_id);
                out.put_u16(0);
            }
            Message::Data(d) => {
                out.put_u16(d.template_id);
                out.put_u16(d.config_id);
                out.put_u8(d.flags);
                out.put_u8(0);
                out.put_u16(0);
                out.put_u32(d.seq);
                out.put_u32(d.count);
                out.extend_from_slice(&d.records);
            }
            Message::DataAck(a) => {
                out.put_u32(a.seq);
                out.put_u16(a.config_id);
                out.put_u16(0);
            }
            Message::Error(e) => {
                out.put_u64(e.time_ns);
                out.put_u16(e.code.to_u16());
                put_str(out, "error text", &e.text)?;
            }
            Message::StatusRsp(s) => {
                out.put_u32(s.last_acked_seq);
                out.put_u32(s.pending);
                out.put_u64(s.committed_records);
            }
        }
        Ok(())
    }

    /// Parses a body of type `kind`; the whole body must be consumed.
    pub(crate) fn decode_body(kind: MessageType, body: Bytes) -> Result<Message, CraneError> {
        let mut r = Reader::new(&body, body_name(kind));
        let msg = match kind {
            MessageType::Start => {
                let max_version = r.u8()?;
                r.u8()?;
                let capabilities = r.u16()?;
                let boot_ns = r.u64()?;
                let stream_id = r.u64()?;
                let exporter = get_str(&mut r, "exporter name")?;
                Message::Start(Start {
                    max_version,
                    capabilities,
                    boot_ns,
                    stream_id,
                    exporter,
                })
            }
            MessageType::StartAck => {
                let version = r.u8()?;
                r.u8()?;
                let capabilities = r.u16()?;
                let boot_ns = r.u64()?;
                let keepalive_s = r.u16()?;
                r.u16()?;
                Message::StartAck(StartAck {
                    version,
                    capabilities,
                    boot_ns,
                    keepalive_s,
                })
            }
            MessageType::Stop => Message::Stop,
            MessageType::StopAck => Message::StopAck,
            MessageType::StatusReq => Message::StatusReq,
            MessageType::Keepalive => Message::Keepalive,
            MessageType::TemplateData | MessageType::TemplateDataAck => {
                let config_id = r.u16()?;
                let byte_order = if r.u8()? & 1 == 1 {
                    ByteOrder::Big
                } else {
                    ByteOrder::Little
                };
                r.u8()?;
                let n = r.u16()?;
                r.u16()?;
                // Each template needs at least 4 bytes: no count can make us
                // allocate more than the message holds.
                let mut templates = Vec::with_capacity(usize::from(n).min(r.remaining() / 4));
                for _ in 0..n {
                    let id = r.u16()?;
                    let nkeys = r.u16()?;
                    let mut keys = Vec::with_capacity(usize::from(nkeys).min(r.remaining() / 16));
                    for _ in 0..nkeys {
                        let enterprise = r.u32()?;
                        r.u16()?;
                        let id = r.u16()?;
                        let data_type = data_type(r.u16()?)?;
                        r.u16()?;
                        let attributes = r.u32()?;
                        keys.push(WireKey {
                            ie: IeId { enterprise, id },
                            data_type,
                            disabled: attributes & 1 == 1,
                        });
                    }
                    templates.push(WireTemplate { id, keys });
                }
                let set = TemplateSet {
                    config_id,
                    byte_order,
                    templates,
                };
                if kind == MessageType::TemplateData {
                    Message::TemplateData(set)
                } else {
                    Message::TemplateDataAck(set)
                }
            }
            MessageType::FinalTemplateData | MessageType::FinalTemplateDataAck => {
                let config_id = r.u16()?;
                r.u16()?;
                if kind == MessageType::FinalTemplateData {
                    Message::FinalTemplateData { config_id }
                } else {
                    Message::FinalTemplateDataAck { config_id }
                }
            }
            MessageType::Data => {
                let template_id = r.u16()?;
                let config_id = r.u16()?;
                let flags = r.u8()?;
                r.u8()?;
                r.u16()?;
                let seq = r.u32()?;
                let count = r.u32()?;
                let consumed = body.len() - r.remaining();
                r.rest();
                Message::Data(Data {
                    template_id,
                    config_id,
                    flags,
                    seq,
                    count,
                    records: body.slice(consumed..),
                })
            }
            MessageType::DataAck => {
                let seq = r.u32()?;
                let config_id = r.u16()?;
                r.u16()?;
                Message::DataAck(DataAck { seq, config_id })
            }
            MessageType::Error => {
                let time_ns = r.u64()?;
                let code = ErrorCode::from_u16(r.u16()?);
                let text = get_str(&mut r, "error text")?;
                Message::Error(ErrorMsg {
                    time_ns,
                    code,
                    text,
                })
            }
            MessageType::StatusRsp => Message::StatusRsp(Status {
                last_acked_seq: r.u32()?,
                pending: r.u32()?,
                committed_records: r.u64()?,
            }),
        };
        r.finish()?;
        Ok(msg)
    }
}

fn body_name(kind: MessageType) -> &'static str {
    match kind {
        MessageType::Start => "START",
        MessageType::StartAck => "START_ACK",
        MessageType::Stop => "STOP",
        MessageType::StopAck => "STOP_ACK",
        MessageType::TemplateData => "TMPL_DATA",
        MessageType::TemplateDataAck => "TMPL_DATA_ACK",
        MessageType::FinalTemplateData => "FINAL_TMPL_DATA",
        MessageType::FinalTemplateDataAck => "FINAL_TMPL_DATA_ACK",
        MessageType::Data => "DATA",
        MessageType::DataAck => "DATA_ACK",
        MessageType::Error => "ERROR",
        MessageType::StatusReq => "STATUS_REQ",
        MessageType::StatusRsp => "STATUS_RSP",
        MessageType::Keepalive => "KEEPALIVE",
    }
}

fn put_len(out: &mut BytesMut, field: &'static str, len: usize) -> Result<(), CraneError> {
    let len16 = u16::try_from(len).map_err(|_| CraneError::TooLong { field, len })?;
    out.put_u16(len16);
    Ok(())
}

fn put_str(out: &mut BytesMut, field: &'static str, s: &str) -> Result<(), CraneError> {
    put_len(out, field, s.len())?;
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn get_str(r: &mut Reader<'_>, field: &'static str) -> Result<String, CraneError> {
    let len = r.u16()?;
    let raw = r.take(usize::from(len))?;
    std::str::from_utf8(raw)
        .map(str::to_owned)
        .map_err(|_| CraneError::Utf8 { field })
}

/// Key type codes of key blocks.
pub(crate) fn key_type(t: DataType) -> u16 {
    match t {
        DataType::Boolean => 1,
        DataType::Unsigned8 => 2,
        DataType::Unsigned16 => 3,
        DataType::Unsigned32 => 4,
        DataType::Unsigned64 => 5,
        DataType::Signed64 => 6,
        DataType::Float64 => 7,
        DataType::MacAddress => 8,
        DataType::Ipv4Address => 9,
        DataType::Ipv6Address => 10,
        DataType::DateTimeMilliseconds => 11,
        DataType::DateTimeNanoseconds => 12,
        DataType::String => 13,
        DataType::OctetArray => 14,
    }
}

fn data_type(code: u16) -> Result<DataType, CraneError> {
    Ok(match code {
        1 => DataType::Boolean,
        2 => DataType::Unsigned8,
        3 => DataType::Unsigned16,
        4 => DataType::Unsigned32,
        5 => DataType::Unsigned64,
        6 => DataType::Signed64,
        7 => DataType::Float64,
        8 => DataType::MacAddress,
        9 => DataType::Ipv4Address,
        10 => DataType::Ipv6Address,
        11 => DataType::DateTimeMilliseconds,
        12 => DataType::DateTimeNanoseconds,
        13 => DataType::String,
        14 => DataType::OctetArray,
        other => return Err(CraneError::KeyType(other)),
    })
}
