//! COPS framing (RFC 2748) for qosloop's decision push, PDP and PEP sides.
//!
//! # API in one screen
//!
//! - [`CopsCodec`] is the `tokio_util` [`Encoder`]`<`[`Message`]`>` +
//!   [`Decoder`] pair: wrap a socket in `Framed::new(sock, CopsCodec::default())`.
//!   It refuses messages longer than [`CopsCodec::max_message`]
//!   (default [`DEFAULT_MAX_MESSAGE`], 1 MiB) in both directions.
//! - A [`Message`] is `client_type` + `solicited` flag + a typed [`Body`],
//!   one variant per RFC 2748 op code (OPN, CAT, REQ, DEC, RPT, DRQ, SSQ,
//!   SSC, KA, CC), holding typed objects ([`Handle`], [`Context`],
//!   [`DecisionEntry`], [`ReportType`], [`ErrorObject`], [`ClientSi`], …).
//! - qosloop's client type is [`CLIENT_TYPE_QOSLOOP`] = `0x8071`, in the range
//!   RFC 2748 §6 leaves to enterprise use (0x8000–0xFFFF).
//! - qosloop's payloads are JSON inside opaque objects; [`payload`] has the
//!   types and the constructors ([`Message::opn`], [`Message::dec_install`],
//!   [`Message::rpt`], …) that put them there.
//!
//! # The conversation (docs/decisions.md has the byte-level vectors)
//!
//! ```text
//! PEP                                         PDP
//!  OPN  PEPID=name, ClientSI={roles,…}   ──►
//!                                        ◄──  CAT  KA timer          (or CC: unsupported client type)
//!                                        ◄──  SSQ                    (synchronise state)
//!  REQ  Handle, Context=config,          ──►
//!       ClientSI={roles, installed:[{id,version}]}
//!  SSC                                   ──►
//!                                        ◄──  DEC  Handle, solicited: install/remove for the difference
//!  RPT  Handle, Success|Failure,         ──►       (one RPT per decision)
//!       ClientSI=EnforcementReport
//!                                        ◄──  DEC  Handle, unsolicited: each later change
//!  KA                                    ──►
//!                                        ◄──  KA
//!  CC / DRQ                              ──►       (either side may send CC)
//! ```
//!
//! A decision rides in a DEC as `Context(R-Type=Configuration)` +
//! `Decision Flags(Install|Remove)` + `Decision: Client Specific Data`
//! (C-Num 6, C-Type 4) holding a JSON [`crate::Decision`] (install) or a
//! JSON [`payload::DecisionRef`] (remove).
//!
//! Decoding never panics on any input (property-tested and fuzzed); every
//! refusal is a [`CopsError`] that maps to an RFC 2748 error code through
//! [`CopsError::cops_error_code`], for the CC that closes the connection.

mod codec;
pub mod payload;

pub use codec::CopsCodec;
pub use payload::{DecisionRef, InstalledDecision, PepHello, PepState};

use std::fmt;
use std::net::IpAddr;
pub use tokio_util::codec::{Decoder, Encoder};

/// The COPS version this codec speaks (RFC 2748 §2.1).
pub const VERSION: u8 = 1;

/// qosloop's own client type (RFC 2748 §6: 0x8000–0xFFFF is for enterprise
/// use). KA messages carry client type 0, as the RFC requires.
pub const CLIENT_TYPE_QOSLOOP: u16 = 0x8071;

/// The registered TCP port of COPS (RFC 2748 §2.1).
pub const DEFAULT_PORT: u16 = 3288;

/// The largest message the codec accepts or emits unless told otherwise.
/// A DEC that would be larger must be split by the sender.
pub const DEFAULT_MAX_MESSAGE: usize = 1 << 20;

/// Size of the common header.
pub const HEADER_LEN: usize = 8;

/// What went wrong decoding or encoding a message.
#[derive(Debug, thiserror::Error)]
pub enum CopsError {
    #[error("COPS connection I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("COPS message of {len} bytes exceeds the limit of {max} bytes")]
    TooLong { len: usize, max: usize },
    #[error("COPS message length {0} is invalid (at least 8 and a multiple of 4)")]
    BadLength(u32),
    #[error("unsupported COPS version {0} (this peer speaks version 1)")]
    BadVersion(u8),
    #[error("unknown COPS op code {0}")]
    UnknownOpCode(u8),
    #[error("malformed COPS object (C-Num {c_num}, C-Type {c_type}) at byte {offset}: {why}")]
    BadObject {
        c_num: u8,
        c_type: u8,
        offset: usize,
        why: &'static str,
    },
    #[error("unknown COPS object C-Num {c_num} C-Type {c_type}")]
    UnknownObject { c_num: u8, c_type: u8 },
    #[error("{op} lacks its mandatory {object} object")]
    Missing { op: OpCode, object: &'static str },
    #[error("{op} carries an unexpected {object} object")]
    Unexpected { op: OpCode, object: &'static str },
    #[error("qosloop payload in {what} is not valid JSON: {source}")]
    Payload {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

impl CopsError {
    /// The RFC 2748 §2.2.8 error code that reports this error to the peer.
    pub fn cops_error_code(&self) -> ErrorCode {
        match self {
            CopsError::Io(_) => ErrorCode::CommunicationFailure,
            CopsError::TooLong { .. }
            | CopsError::BadLength(_)
            | CopsError::BadVersion(_)
            | CopsError::UnknownOpCode(_)
            | CopsError::BadObject { .. }
            | CopsError::Unexpected { .. } => ErrorCode::BadMessageFormat,
            CopsError::UnknownObject { .. } => ErrorCode::UnknownObject,
            CopsError::Missing { .. } => ErrorCode::MandatoryObjectMissing,
            CopsError::Payload { .. } => ErrorCode::MandatoryClientSiMissing,
        }
    }
}

/// The op codes of RFC 2748 §2.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum OpCode {
    Req = 1,
    Dec = 2,
    Rpt = 3,
    Drq = 4,
    Ssq = 5,
    Opn = 6,
    Cat = 7,
    Cc = 8,
    Ka = 9,
    Ssc = 10,
}

impl OpCode {
    pub fn from_u8(v: u8) -> Option<OpCode> {
        Some(match v {
            1 => OpCode::Req,
            2 => OpCode::Dec,
            3 => OpCode::Rpt,
            4 => OpCode::Drq,
            5 => OpCode::Ssq,
            6 => OpCode::Opn,
            7 => OpCode::Cat,
            8 => OpCode::Cc,
            9 => OpCode::Ka,
            10 => OpCode::Ssc,
            _ => return None,
        })
    }
}

impl fmt::Display for OpCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OpCode::Req => "REQ",
            OpCode::Dec => "DEC",
            OpCode::Rpt => "RPT",
            OpCode::Drq => "DRQ",
            OpCode::Ssq => "SSQ",
            OpCode::Opn => "OPN",
            OpCode::Cat => "CAT",
            OpCode::Cc => "CC",
            OpCode::Ka => "KA",
            OpCode::Ssc => "SSC",
        })
    }
}

/// A client handle (C-Num 1, C-Type 1): opaque, chosen by the PEP.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Handle(pub Vec<u8>);

impl Handle {
    /// A handle holding `v` as 4 big-endian bytes, as qosloop's PEPs use.
    pub fn from_u32(v: u32) -> Handle {
        Handle(v.to_be_bytes().to_vec())
    }
}

impl fmt::Display for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("0x")?;
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Context (C-Num 2, C-Type 1): what a request or decision is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Context {
    /// Request type: a bit of [`Context::INCOMING`] …
    /// [`Context::CONFIGURATION`].
    pub r_type: u16,
    /// Client-specific message type.
    pub m_type: u16,
}

impl Context {
    pub const INCOMING: u16 = 0x01;
    pub const RESOURCE_ALLOCATION: u16 = 0x02;
    pub const OUTGOING: u16 = 0x04;
    pub const CONFIGURATION: u16 = 0x08;

    /// The context of qosloop's configuration requests and decisions.
    pub const fn configuration() -> Context {
        Context {
            r_type: Context::CONFIGURATION,
            m_type: 0,
        }
    }
}

/// In-Interface / Out-Interface (C-Num 3 / 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Interface {
    pub addr: IpAddr,
    pub ifindex: u32,
}

/// Reason (C-Num 5): why a DRQ deletes state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Reason {
    pub code: u16,
    pub sub_code: u16,
}

impl Reason {
    pub const MANAGEMENT: u16 = 2;
    pub const SYNC_HANDLE: u16 = 12;
}

/// The command of a Decision Flags object (C-Num 6, C-Type 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    Null,
    Install,
    Remove,
    /// A command code RFC 2748 does not define, kept as received.
    Other(u16),
}

impl Command {
    fn code(self) -> u16 {
        match self {
            Command::Null => 0,
            Command::Install => 1,
            Command::Remove => 2,
            Command::Other(c) => c,
        }
    }
    fn from_code(c: u16) -> Command {
        match c {
            0 => Command::Null,
            1 => Command::Install,
            2 => Command::Remove,
            c => Command::Other(c),
        }
    }
}

/// One decision in a DEC: its context, flags and data objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecisionEntry {
    pub context: Context,
    pub command: Command,
    /// The Trigger Error flag (0x01).
    pub trigger_error: bool,
    /// Decision data objects (C-Num 6, C-Type 2 stateless, 3 replacement,
    /// 4 client-specific, 5 named), in the order received.
    pub data: Vec<DecisionData>,
}

/// One decision data object of a [`DecisionEntry`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecisionData {
    /// 2..=5 (RFC 2748 §2.2.6).
    pub c_type: u8,
    pub bytes: Vec<u8>,
}

impl DecisionData {
    pub const STATELESS: u8 = 2;
    pub const REPLACEMENT: u8 = 3;
    pub const CLIENT_SPECIFIC: u8 = 4;
    pub const NAMED: u8 = 5;
}

impl DecisionEntry {
    /// The client-specific decision data (C-Type 4), where qosloop's JSON lives.
    pub fn client_data(&self) -> Option<&[u8]> {
        self.data
            .iter()
            .find(|d| d.c_type == DecisionData::CLIENT_SPECIFIC)
            .map(|d| d.bytes.as_slice())
    }
}

/// Report-Type (C-Num 12).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReportType {
    Success,
    Failure,
    Accounting,
    Other(u16),
}

impl ReportType {
    fn code(self) -> u16 {
        match self {
            ReportType::Success => 1,
            ReportType::Failure => 2,
            ReportType::Accounting => 3,
            ReportType::Other(c) => c,
        }
    }
    fn from_code(c: u16) -> ReportType {
        match c {
            1 => ReportType::Success,
            2 => ReportType::Failure,
            3 => ReportType::Accounting,
            c => ReportType::Other(c),
        }
    }
}

/// The error codes of RFC 2748 §2.2.8.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    BadHandle = 1,
    InvalidHandleReference = 2,
    BadMessageFormat = 3,
    UnableToProcess = 4,
    MandatoryClientSiMissing = 5,
    UnsupportedClientType = 6,
    MandatoryObjectMissing = 7,
    ClientFailure = 8,
    CommunicationFailure = 9,
    Unspecified = 10,
    ShuttingDown = 11,
    RedirectToPreferredServer = 12,
    UnknownObject = 13,
    AuthenticationFailure = 14,
    AuthenticationRequired = 15,
}

/// Error (C-Num 8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ErrorObject {
    pub code: u16,
    pub sub_code: u16,
}

impl ErrorObject {
    pub fn new(code: ErrorCode) -> ErrorObject {
        ErrorObject {
            code: code as u16,
            sub_code: 0,
        }
    }
}

impl fmt::Display for ErrorObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.code {
            1 => "bad handle",
            2 => "invalid handle reference",
            3 => "bad message format",
            4 => "unable to process",
            5 => "mandatory client-specific info missing",
            6 => "unsupported client type",
            7 => "mandatory COPS object missing",
            8 => "client failure",
            9 => "communication failure",
            10 => "unspecified",
            11 => "shutting down",
            12 => "redirect to preferred server",
            13 => "unknown COPS object",
            14 => "authentication failure",
            15 => "authentication required",
            _ => "unknown error",
        };
        write!(f, "{name} (code {}, sub-code {})", self.code, self.sub_code)
    }
}

/// Client Specific Information (C-Num 9): C-Type 1 signaled, 2 named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientSi {
    pub named: bool,
    pub data: Vec<u8>,
}

impl ClientSi {
    pub fn signaled(data: Vec<u8>) -> ClientSi {
        ClientSi { named: false, data }
    }
}

/// PDPRedirAddr / LastPDPAddr (C-Num 13 / 14).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PdpAddr {
    pub addr: IpAddr,
    pub port: u16,
}

/// The outcome a DEC carries: decisions, or an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecOutcome {
    Decisions(Vec<DecisionEntry>),
    Error(ErrorObject),
}

/// The objects of each message, per the grammar of RFC 2748 §3.
/// Integrity objects (C-Num 16) are not supported and are refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// `<Handle><Context>[<IN-Int>][<OUT-Int>][<ClientSI(s)>]`
    Req {
        handle: Handle,
        context: Context,
        in_interface: Option<Interface>,
        out_interface: Option<Interface>,
        client_si: Vec<ClientSi>,
    },
    /// `<Handle><Decision(s)> | <Handle><Error>`
    Dec { handle: Handle, outcome: DecOutcome },
    /// `<Handle><Report-Type>[<ClientSI>]`
    Rpt {
        handle: Handle,
        report_type: ReportType,
        client_si: Option<ClientSi>,
    },
    /// `<Handle><Reason>`
    Drq { handle: Handle, reason: Reason },
    /// `[<Handle>]`
    Ssq { handle: Option<Handle> },
    /// `<PEPID>[<ClientSI>][<LastPDPAddr>]`
    Opn {
        pep_id: String,
        client_si: Option<ClientSi>,
        last_pdp: Option<PdpAddr>,
    },
    /// `<KA Timer>[<ACCT Timer>]`
    Cat {
        ka_timer_secs: u16,
        acct_timer_secs: Option<u16>,
    },
    /// `<Error>[<PDPRedirAddr>]`
    Cc {
        error: ErrorObject,
        redirect: Option<PdpAddr>,
    },
    /// no objects
    Ka,
    /// `[<Handle>]`
    Ssc { handle: Option<Handle> },
}

impl Body {
    pub fn op_code(&self) -> OpCode {
        match self {
            Body::Req { .. } => OpCode::Req,
            Body::Dec { .. } => OpCode::Dec,
            Body::Rpt { .. } => OpCode::Rpt,
            Body::Drq { .. } => OpCode::Drq,
            Body::Ssq { .. } => OpCode::Ssq,
            Body::Opn { .. } => OpCode::Opn,
            Body::Cat { .. } => OpCode::Cat,
            Body::Cc { .. } => OpCode::Cc,
            Body::Ka => OpCode::Ka,
            Body::Ssc { .. } => OpCode::Ssc,
        }
    }
}

/// One COPS message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub client_type: u16,
    /// Flag 0x1: the message answers a request (a DEC to a REQ, a KA to a KA, …).
    pub solicited: bool,
    pub body: Body,
}

impl Message {
    /// A qosloop message (client type [`CLIENT_TYPE_QOSLOOP`]), unsolicited.
    pub fn new(body: Body) -> Message {
        let client_type = if matches!(body, Body::Ka) {
            0
        } else {
            CLIENT_TYPE_QOSLOOP
        };
        Message {
            client_type,
            solicited: false,
            body,
        }
    }

    /// The same message with the solicited flag set.
    pub fn solicited(mut self) -> Message {
        self.solicited = true;
        self
    }

    pub fn op_code(&self) -> OpCode {
        self.body.op_code()
    }
}

#[cfg(test)]
mod tests;
