//! The byte layout of RFC 2748 §2.1 (common header) and §2.2 (objects).
//!
//! ```text
//! 0       4       8              16                              32
//! +-------+-------+---------------+-------------------------------+
//! |Version| Flags |    Op Code    |          Client-type          |
//! +-------+-------+---------------+-------------------------------+
//! |                 Message Length (header included)              |
//! +---------------------------------------------------------------+
//! |  Object Length (header incl.) |    C-Num      |    C-Type     |  ×n, each padded
//! +-------------------------------+---------------+---------------+  to 4 bytes
//! ```

use super::*;
use bytes::{BufMut, BytesMut};

/// The `tokio_util` codec of COPS messages, with a size limit.
#[derive(Clone, Copy, Debug)]
pub struct CopsCodec {
    max_message: usize,
}

impl Default for CopsCodec {
    fn default() -> Self {
        CopsCodec {
            max_message: DEFAULT_MAX_MESSAGE,
        }
    }
}

impl CopsCodec {
    /// A codec that refuses messages longer than `max_message` bytes
    /// (at least the 8-byte header).
    pub fn new(max_message: usize) -> CopsCodec {
        CopsCodec {
            max_message: max_message.max(HEADER_LEN),
        }
    }

    pub fn max_message(&self) -> usize {
        self.max_message
    }

    /// Changes the limit (a PDP accepts only small messages before OPN).
    pub fn set_max_message(&mut self, max_message: usize) {
        self.max_message = max_message.max(HEADER_LEN);
    }
}

/// How far ahead of the bytes present the read buffer grows for a message
/// announced in a header: a header alone must not make the receiver
/// reserve the whole announced length (a peer could announce the maximum
/// on many connections and send nothing more).
const RESERVE_AHEAD: usize = 16 * 1024;

mod cnum {
    pub const HANDLE: u8 = 1;
    pub const CONTEXT: u8 = 2;
    pub const IN_INT: u8 = 3;
    pub const OUT_INT: u8 = 4;
    pub const REASON: u8 = 5;
    pub const DECISION: u8 = 6;
    pub const ERROR: u8 = 8;
    pub const CLIENT_SI: u8 = 9;
    pub const KA_TIMER: u8 = 10;
    pub const PEP_ID: u8 = 11;
    pub const REPORT_TYPE: u8 = 12;
    pub const PDP_REDIR: u8 = 13;
    pub const LAST_PDP: u8 = 14;
    pub const ACCT_TIMER: u8 = 15;
}

/// An object as read off the wire, typed but not yet placed in a message.
#[derive(Debug)]
enum Object {
    Handle(Handle),
    Context(Context),
    InInt(Interface),
    OutInt(Interface),
    Reason(Reason),
    DecisionFlags(Command, bool),
    DecisionData(DecisionData),
    Error(ErrorObject),
    ClientSi(ClientSi),
    KaTimer(u16),
    PepId(String),
    ReportType(ReportType),
    PdpRedir(PdpAddr),
    LastPdp(PdpAddr),
    AcctTimer(u16),
}

impl Object {
    fn name(&self) -> &'static str {
        match self {
            Object::Handle(_) => "Handle",
            Object::Context(_) => "Context",
            Object::InInt(_) => "IN-Int",
            Object::OutInt(_) => "OUT-Int",
            Object::Reason(_) => "Reason",
            Object::DecisionFlags(..) => "Decision Flags",
            Object::DecisionData(_) => "Decision Data",
            Object::Error(_) => "Error",
            Object::ClientSi(_) => "ClientSI",
            Object::KaTimer(_) => "KA Timer",
            Object::PepId(_) => "PEPID",
            Object::ReportType(_) => "Report-Type",
            Object::PdpRedir(_) => "PDPRedirAddr",
            Object::LastPdp(_) => "LastPDPAddr",
            Object::AcctTimer(_) => "ACCT Timer",
        }
    }
}

impl Decoder for CopsCodec {
    type Item = Message;
    type Error = CopsError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, CopsError> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let version = src[0] >> 4;
        if version != VERSION {
            return Err(CopsError::BadVersion(version));
        }
        let length = u32::from_be_bytes([src[4], src[5], src[6], src[7]]);
        if (length as usize) < HEADER_LEN || length % 4 != 0 {
            return Err(CopsError::BadLength(length));
        }
        let len = length as usize;
        if len > self.max_message {
            return Err(CopsError::TooLong {
                len,
                max: self.max_message,
            });
        }
        if src.len() < len {
            src.reserve((len - src.len()).min(RESERVE_AHEAD));
            return Ok(None);
        }
        let frame = src.split_to(len);
        decode_message(&frame).map(Some)
    }
}

/// Decodes one complete message (header included).
pub(super) fn decode_message(frame: &[u8]) -> Result<Message, CopsError> {
    let flags = frame[0] & 0x0f;
    let op = OpCode::from_u8(frame[1]).ok_or(CopsError::UnknownOpCode(frame[1]))?;
    let client_type = u16::from_be_bytes([frame[2], frame[3]]);
    let mut objects = Vec::new();
    let mut at = HEADER_LEN;
    while at < frame.len() {
        let (obj, next) = decode_object(frame, at)?;
        objects.push(obj);
        at = next;
    }
    let body = assemble(op, objects)?;
    Ok(Message {
        client_type,
        solicited: flags & 0x1 != 0,
        body,
    })
}

fn decode_object(frame: &[u8], at: usize) -> Result<(Object, usize), CopsError> {
    let bad = |c_num, c_type, why| CopsError::BadObject {
        c_num,
        c_type,
        offset: at,
        why,
    };
    if frame.len() - at < 4 {
        return Err(bad(0, 0, "object header is truncated"));
    }
    let length = usize::from(u16::from_be_bytes([frame[at], frame[at + 1]]));
    let (c_num, c_type) = (frame[at + 2], frame[at + 3]);
    if length < 4 {
        return Err(bad(c_num, c_type, "object length is below 4"));
    }
    let padded = length.div_ceil(4) * 4;
    if padded > frame.len() - at {
        return Err(bad(
            c_num,
            c_type,
            "object runs past the end of the message",
        ));
    }
    let body = &frame[at + 4..at + length];
    let next = at + padded;
    let u16_at = |i: usize| u16::from_be_bytes([body[i], body[i + 1]]);
    let want = |n: usize| {
        if body.len() == n {
            Ok(())
        } else {
            Err(bad(
                c_num,
                c_type,
                "object has the wrong length for its type",
            ))
        }
    };
    let obj = match (c_num, c_type) {
        (cnum::HANDLE, 1) => Object::Handle(Handle(body.to_vec())),
        (cnum::CONTEXT, 1) => {
            want(4)?;
            Object::Context(Context {
                r_type: u16_at(0),
                m_type: u16_at(2),
            })
        }
        (cnum::IN_INT | cnum::OUT_INT, 1 | 2) => {
            let addr =
                ip_of(body, c_type == 2).ok_or(bad(c_num, c_type, "bad interface length"))?;
            let n = body.len();
            let ifindex = u32::from_be_bytes([body[n - 4], body[n - 3], body[n - 2], body[n - 1]]);
            let i = Interface { addr, ifindex };
            if c_num == cnum::IN_INT {
                Object::InInt(i)
            } else {
                Object::OutInt(i)
            }
        }
        (cnum::REASON, 1) => {
            want(4)?;
            Object::Reason(Reason {
                code: u16_at(0),
                sub_code: u16_at(2),
            })
        }
        (cnum::DECISION, 1) => {
            want(4)?;
            Object::DecisionFlags(Command::from_code(u16_at(0)), u16_at(2) & 0x1 != 0)
        }
        (cnum::DECISION, 2..=5) => Object::DecisionData(DecisionData {
            c_type,
            bytes: body.to_vec(),
        }),
        (cnum::ERROR, 1) => {
            want(4)?;
            Object::Error(ErrorObject {
                code: u16_at(0),
                sub_code: u16_at(2),
            })
        }
        (cnum::CLIENT_SI, 1 | 2) => Object::ClientSi(ClientSi {
            named: c_type == 2,
            data: body.to_vec(),
        }),
        (cnum::KA_TIMER, 1) => {
            want(4)?;
            Object::KaTimer(u16_at(2))
        }
        (cnum::ACCT_TIMER, 1) => {
            want(4)?;
            Object::AcctTimer(u16_at(2))
        }
        (cnum::PEP_ID, 1) => {
            // A NUL-terminated ASCII string; padding is NULs too.
            let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
            let s = std::str::from_utf8(&body[..end])
                .ok()
                .filter(|s| s.is_ascii())
                .ok_or(bad(c_num, c_type, "PEPID is not ASCII"))?;
            Object::PepId(s.to_owned())
        }
        (cnum::REPORT_TYPE, 1) => {
            want(4)?;
            Object::ReportType(ReportType::from_code(u16_at(0)))
        }
        (cnum::PDP_REDIR | cnum::LAST_PDP, 1 | 2) => {
            let addr = ip_of(body, c_type == 2).ok_or(bad(c_num, c_type, "bad address length"))?;
            let n = body.len();
            let a = PdpAddr {
                addr,
                port: u16::from_be_bytes([body[n - 2], body[n - 1]]),
            };
            if c_num == cnum::PDP_REDIR {
                Object::PdpRedir(a)
            } else {
                Object::LastPdp(a)
            }
        }
        _ => return Err(CopsError::UnknownObject { c_num, c_type }),
    };
    Ok((obj, next))
}

/// The address of an interface or PDP address object: 4 or 16 bytes of
/// address followed by 4 bytes (ifindex, or reserved + port).
fn ip_of(body: &[u8], v6: bool) -> Option<IpAddr> {
    if v6 {
        let a: [u8; 16] = body.get(..16)?.try_into().ok()?;
        (body.len() == 20).then_some(IpAddr::from(a))
    } else {
        let a: [u8; 4] = body.get(..4)?.try_into().ok()?;
        (body.len() == 8).then_some(IpAddr::from(a))
    }
}

/// Walks the objects of one message in order, per its grammar.
struct Objects {
    op: OpCode,
    items: std::iter::Peekable<std::vec::IntoIter<Object>>,
}

impl Objects {
    fn take<T>(&mut self, pick: impl Fn(&Object) -> Option<T>) -> Option<T> {
        let v = self.items.peek().and_then(pick)?;
        self.items.next();
        Some(v)
    }
    fn need<T>(
        &mut self,
        object: &'static str,
        pick: impl Fn(&Object) -> Option<T>,
    ) -> Result<T, CopsError> {
        self.take(pick).ok_or(CopsError::Missing {
            op: self.op,
            object,
        })
    }
    fn finish(mut self) -> Result<(), CopsError> {
        match self.items.next() {
            None => Ok(()),
            Some(o) => Err(CopsError::Unexpected {
                op: self.op,
                object: o.name(),
            }),
        }
    }
}

macro_rules! pick {
    ($pat:pat => $v:expr) => {
        |o: &Object| match o {
            $pat => Some($v),
            _ => None,
        }
    };
}

fn assemble(op: OpCode, objects: Vec<Object>) -> Result<Body, CopsError> {
    let mut o = Objects {
        op,
        items: objects.into_iter().peekable(),
    };
    let body = match op {
        OpCode::Req => {
            let handle = o.need("Handle", pick!(Object::Handle(h) => h.clone()))?;
            let context = o.need("Context", pick!(Object::Context(c) => *c))?;
            let in_interface = o.take(pick!(Object::InInt(i) => *i));
            let out_interface = o.take(pick!(Object::OutInt(i) => *i));
            let mut client_si = Vec::new();
            while let Some(si) = o.take(pick!(Object::ClientSi(s) => s.clone())) {
                client_si.push(si);
            }
            Body::Req {
                handle,
                context,
                in_interface,
                out_interface,
                client_si,
            }
        }
        OpCode::Dec => {
            let handle = o.need("Handle", pick!(Object::Handle(h) => h.clone()))?;
            if let Some(error) = o.take(pick!(Object::Error(e) => *e)) {
                Body::Dec {
                    handle,
                    outcome: DecOutcome::Error(error),
                }
            } else {
                let mut decisions = Vec::new();
                while let Some(context) = o.take(pick!(Object::Context(c) => *c)) {
                    let (command, trigger_error) = o.need(
                        "Decision Flags",
                        pick!(Object::DecisionFlags(c, t) => (*c, *t)),
                    )?;
                    let mut data = Vec::new();
                    while let Some(d) = o.take(pick!(Object::DecisionData(d) => d.clone())) {
                        data.push(d);
                    }
                    decisions.push(DecisionEntry {
                        context,
                        command,
                        trigger_error,
                        data,
                    });
                }
                if decisions.is_empty() {
                    return Err(CopsError::Missing {
                        op,
                        object: "Decision or Error",
                    });
                }
                Body::Dec {
                    handle,
                    outcome: DecOutcome::Decisions(decisions),
                }
            }
        }
        OpCode::Rpt => Body::Rpt {
            handle: o.need("Handle", pick!(Object::Handle(h) => h.clone()))?,
            report_type: o.need("Report-Type", pick!(Object::ReportType(r) => *r))?,
            client_si: o.take(pick!(Object::ClientSi(s) => s.clone())),
        },
        OpCode::Drq => Body::Drq {
            handle: o.need("Handle", pick!(Object::Handle(h) => h.clone()))?,
            reason: o.need("Reason", pick!(Object::Reason(r) => *r))?,
        },
        OpCode::Ssq => Body::Ssq {
            handle: o.take(pick!(Object::Handle(h) => h.clone())),
        },
        OpCode::Ssc => Body::Ssc {
            handle: o.take(pick!(Object::Handle(h) => h.clone())),
        },
        OpCode::Opn => Body::Opn {
            pep_id: o.need("PEPID", pick!(Object::PepId(p) => p.clone()))?,
            client_si: o.take(pick!(Object::ClientSi(s) => s.clone())),
            last_pdp: o.take(pick!(Object::LastPdp(a) => *a)),
        },
        OpCode::Cat => Body::Cat {
            ka_timer_secs: o.need("KA Timer", pick!(Object::KaTimer(t) => *t))?,
            acct_timer_secs: o.take(pick!(Object::AcctTimer(t) => *t)),
        },
        OpCode::Cc => Body::Cc {
            error: o.need("Error", pick!(Object::Error(e) => *e))?,
            redirect: o.take(pick!(Object::PdpRedir(a) => *a)),
        },
        OpCode::Ka => Body::Ka,
    };
    o.finish()?;
    Ok(body)
}

impl Encoder<Message> for CopsCodec {
    type Error = CopsError;

    fn encode(&mut self, msg: Message, dst: &mut BytesMut) -> Result<(), CopsError> {
        self.encode(&msg, dst)
    }
}

impl Encoder<&Message> for CopsCodec {
    type Error = CopsError;

    fn encode(&mut self, msg: &Message, dst: &mut BytesMut) -> Result<(), CopsError> {
        let start = dst.len();
        dst.put_u8((VERSION << 4) | u8::from(msg.solicited));
        dst.put_u8(msg.op_code() as u8);
        dst.put_u16(msg.client_type);
        dst.put_u32(0); // length, patched below
        if let Err(e) = encode_body(&msg.body, dst) {
            dst.truncate(start);
            return Err(e);
        }
        let len = dst.len() - start;
        if len > self.max_message || u32::try_from(len).is_err() {
            dst.truncate(start);
            return Err(CopsError::TooLong {
                len,
                max: self.max_message,
            });
        }
        dst[start + 4..start + 8].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }
}

/// Writes one object: header, body, padding to 4 bytes.
fn put_object(dst: &mut BytesMut, c_num: u8, c_type: u8, body: &[u8]) -> Result<(), CopsError> {
    let length = u16::try_from(body.len() + 4).map_err(|_| CopsError::BadObject {
        c_num,
        c_type,
        offset: dst.len(),
        why: "object body exceeds 65531 bytes",
    })?;
    dst.put_u16(length);
    dst.put_u8(c_num);
    dst.put_u8(c_type);
    dst.put_slice(body);
    let pad = (4 - body.len() % 4) % 4;
    dst.put_bytes(0, pad);
    Ok(())
}

fn two(a: u16, b: u16) -> [u8; 4] {
    let [a0, a1] = a.to_be_bytes();
    let [b0, b1] = b.to_be_bytes();
    [a0, a1, b0, b1]
}

fn addr_body(addr: IpAddr, tail: [u8; 4]) -> Vec<u8> {
    let mut v = match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    v.extend_from_slice(&tail);
    v
}

fn addr_ctype(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        1
    } else {
        2
    }
}

fn encode_body(body: &Body, dst: &mut BytesMut) -> Result<(), CopsError> {
    let handle = |dst: &mut BytesMut, h: &Handle| put_object(dst, cnum::HANDLE, 1, &h.0);
    let client_si = |dst: &mut BytesMut, s: &ClientSi| {
        put_object(dst, cnum::CLIENT_SI, if s.named { 2 } else { 1 }, &s.data)
    };
    let pdp = |dst: &mut BytesMut, c_num: u8, a: &PdpAddr| {
        put_object(
            dst,
            c_num,
            addr_ctype(a.addr),
            &addr_body(a.addr, two(0, a.port)),
        )
    };
    match body {
        Body::Req {
            handle: h,
            context,
            in_interface,
            out_interface,
            client_si: sis,
        } => {
            handle(dst, h)?;
            put_object(dst, cnum::CONTEXT, 1, &two(context.r_type, context.m_type))?;
            for (c_num, i) in [(cnum::IN_INT, in_interface), (cnum::OUT_INT, out_interface)] {
                if let Some(i) = i {
                    let body = addr_body(i.addr, i.ifindex.to_be_bytes());
                    put_object(dst, c_num, addr_ctype(i.addr), &body)?;
                }
            }
            for s in sis {
                client_si(dst, s)?;
            }
        }
        Body::Dec { handle: h, outcome } => {
            handle(dst, h)?;
            match outcome {
                DecOutcome::Error(e) => put_object(dst, cnum::ERROR, 1, &two(e.code, e.sub_code))?,
                DecOutcome::Decisions(ds) => {
                    if ds.is_empty() {
                        return Err(CopsError::Missing {
                            op: OpCode::Dec,
                            object: "Decision or Error",
                        });
                    }
                    for d in ds {
                        let c = d.context;
                        put_object(dst, cnum::CONTEXT, 1, &two(c.r_type, c.m_type))?;
                        let flags = two(d.command.code(), u16::from(d.trigger_error));
                        put_object(dst, cnum::DECISION, 1, &flags)?;
                        for data in &d.data {
                            if !(2..=5).contains(&data.c_type) {
                                return Err(CopsError::BadObject {
                                    c_num: cnum::DECISION,
                                    c_type: data.c_type,
                                    offset: dst.len(),
                                    why: "decision data C-Type must be 2..=5",
                                });
                            }
                            put_object(dst, cnum::DECISION, data.c_type, &data.bytes)?;
                        }
                    }
                }
            }
        }
        Body::Rpt {
            handle: h,
            report_type,
            client_si: si,
        } => {
            handle(dst, h)?;
            put_object(dst, cnum::REPORT_TYPE, 1, &two(report_type.code(), 0))?;
            if let Some(s) = si {
                client_si(dst, s)?;
            }
        }
        Body::Drq { handle: h, reason } => {
            handle(dst, h)?;
            put_object(dst, cnum::REASON, 1, &two(reason.code, reason.sub_code))?;
        }
        Body::Ssq { handle: h } | Body::Ssc { handle: h } => {
            if let Some(h) = h {
                handle(dst, h)?;
            }
        }
        Body::Opn {
            pep_id,
            client_si: si,
            last_pdp,
        } => {
            if !pep_id.is_ascii() || pep_id.contains('\0') {
                return Err(CopsError::BadObject {
                    c_num: cnum::PEP_ID,
                    c_type: 1,
                    offset: dst.len(),
                    why: "PEPID must be ASCII without NUL",
                });
            }
            let mut id = pep_id.as_bytes().to_vec();
            id.push(0);
            put_object(dst, cnum::PEP_ID, 1, &id)?;
            if let Some(s) = si {
                client_si(dst, s)?;
            }
            if let Some(a) = last_pdp {
                pdp(dst, cnum::LAST_PDP, a)?;
            }
        }
        Body::Cat {
            ka_timer_secs,
            acct_timer_secs,
        } => {
            put_object(dst, cnum::KA_TIMER, 1, &two(0, *ka_timer_secs))?;
            if let Some(t) = acct_timer_secs {
                put_object(dst, cnum::ACCT_TIMER, 1, &two(0, *t))?;
            }
        }
        Body::Cc { error, redirect } => {
            put_object(dst, cnum::ERROR, 1, &two(error.code, error.sub_code))?;
            if let Some(a) = redirect {
                pdp(dst, cnum::PDP_REDIR, a)?;
            }
        }
        Body::Ka => {}
    }
    Ok(())
}
