//! The IPFIX (RFC 7011) message encoder: flow records into messages of at
//! most a given length, with the templates they use announced in front of
//! their first data set, and sequence numbers as the RFC counts them.
//!
//! A record's *shape* (IPv4 or IPv6, with or without VLAN, TCP flags, ICMP
//! type/code, sampling interval) picks one of 32 templates, ids 256–287, so
//! every field a record has is sent and none it lacks is invented. The
//! encoder is pure (no clock, no socket): the senders in [`super::udp`] and
//! [`super::tcp`] give it the export time and carry its messages.

use qosloop_schema::ie::{self, InformationElement};
use qosloop_schema::FlowRecord;
use std::net::IpAddr;

/// IPFIX version number in the message header.
pub const VERSION: u16 = 10;
/// Length of the message header.
pub const HEADER_LEN: usize = 16;
/// Set id of template sets.
pub const TEMPLATE_SET_ID: u16 = 2;
/// Template id of the first shape; shapes use `FIRST_TEMPLATE_ID..FIRST_TEMPLATE_ID + 32`.
pub const FIRST_TEMPLATE_ID: u16 = 256;
/// Smallest message length the encoder accepts (a full template set and a
/// record with three short strings fit).
pub const MIN_MESSAGE_LEN: usize = 512;
/// Largest: the header's 16-bit length.
pub const MAX_MESSAGE_LEN: usize = 65535;
/// Field length that marks a variable-length field in a template.
pub const VARLEN: u16 = 0xffff;
/// Strings are cut to at most this many bytes whatever the message length.
pub const MAX_STRING: usize = 4096;

/// Longest template set (the shape with every optional field).
const MAX_TEMPLATE_SET: usize = 4 + 4 + 18 * 4 + 3 * 4;
/// Longest record without its strings, plus three 3-byte length prefixes.
const MAX_FIXED_RECORD: usize = 16 + 16 + 2 + 1 + 1 + 2 + 8 * 4 + 2 + 2 + 8 + 9;

/// What the encoder refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpfixError {
    #[error("IPFIX message length {0} out of range {MIN_MESSAGE_LEN}..={MAX_MESSAGE_LEN}")]
    MessageLen(usize),
}

/// One field of a template: the element and its encoded length
/// ([`VARLEN`] for strings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub ie: InformationElement,
    pub len: u16,
}

const fn f(ie: InformationElement, len: u16) -> Field {
    Field { ie, len }
}

/// Which optional fields a record carries; one template per shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape(u8);

impl Shape {
    pub const V6: u8 = 1;
    pub const VLAN: u8 = 2;
    pub const TCP_FLAGS: u8 = 4;
    pub const ICMP: u8 = 8;
    pub const SAMPLED: u8 = 16;
    /// Number of shapes.
    pub const COUNT: usize = 32;

    /// The shape of `rec`. A record is IPv6 when either address is.
    pub fn of(rec: &FlowRecord) -> Shape {
        let v6 = rec.src_addr.is_ipv6() || rec.dst_addr.is_ipv6();
        let mut bits = 0;
        if v6 {
            bits |= Self::V6;
        }
        if rec.vlan.is_some() {
            bits |= Self::VLAN;
        }
        if rec.tcp_flags.is_some() {
            bits |= Self::TCP_FLAGS;
        }
        if (rec.proto == 1 && !v6) || (rec.proto == 58 && v6) {
            bits |= Self::ICMP;
        }
        if rec.sampling_interval.is_some() {
            bits |= Self::SAMPLED;
        }
        Shape(bits)
    }

    /// The shape with these bits (only the low five count).
    pub fn from_bits(bits: u8) -> Shape {
        Shape(bits & 31)
    }

    pub fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }

    pub fn template_id(self) -> u16 {
        FIRST_TEMPLATE_ID + u16::from(self.0)
    }

    /// The template's fields, in record order.
    pub fn fields(self) -> Vec<Field> {
        let v6 = self.has(Self::V6);
        let mut out = Vec::with_capacity(18);
        if v6 {
            out.push(f(ie::SOURCE_IPV6_ADDRESS, 16));
            out.push(f(ie::DESTINATION_IPV6_ADDRESS, 16));
        } else {
            out.push(f(ie::SOURCE_IPV4_ADDRESS, 4));
            out.push(f(ie::DESTINATION_IPV4_ADDRESS, 4));
        }
        out.push(f(ie::SOURCE_TRANSPORT_PORT, 2));
        if self.has(Self::ICMP) {
            // The meter's dst_port holds type·256+code for ICMP: sent as
            // icmpTypeCodeIPv4/IPv6, with no destination port.
            out.push(f(
                if v6 {
                    ie::ICMP_TYPE_CODE_IPV6
                } else {
                    ie::ICMP_TYPE_CODE_IPV4
                },
                2,
            ));
        } else {
            out.push(f(ie::DESTINATION_TRANSPORT_PORT, 2));
        }
        out.push(f(ie::PROTOCOL_IDENTIFIER, 1));
        out.push(f(ie::IP_DIFF_SERV_CODE_POINT, 1));
        out.push(f(ie::PACKET_DELTA_COUNT, 8));
        out.push(f(ie::OCTET_DELTA_COUNT, 8));
        out.push(f(ie::FLOW_START_MILLISECONDS, 8));
        out.push(f(ie::FLOW_END_MILLISECONDS, 8));
        if self.has(Self::VLAN) {
            out.push(f(ie::VLAN_ID, 2));
        }
        if self.has(Self::TCP_FLAGS) {
            out.push(f(ie::TCP_CONTROL_BITS, 2));
        }
        if self.has(Self::SAMPLED) {
            // 1-in-N as RFC 5477 says: 1 packet selected, N-1 skipped.
            out.push(f(ie::SAMPLING_PACKET_INTERVAL, 4));
            out.push(f(ie::SAMPLING_PACKET_SPACE, 4));
        }
        out.push(f(ie::CLASS_LABEL, VARLEN));
        out.push(f(ie::USER_NAME, VARLEN));
        out.push(f(ie::PROCESS_NAME, VARLEN));
        out
    }

    /// Appends this shape's template record (RFC 7011 §3.4.1).
    pub fn put_template(self, out: &mut Vec<u8>) {
        let fields = self.fields();
        out.extend_from_slice(&self.template_id().to_be_bytes());
        out.extend_from_slice(&(fields.len() as u16).to_be_bytes());
        for fl in fields {
            let ent = fl.ie.id.enterprise;
            let id = if ent == 0 {
                fl.ie.id.id
            } else {
                fl.ie.id.id | 0x8000
            };
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&fl.len.to_be_bytes());
            if ent != 0 {
                out.extend_from_slice(&ent.to_be_bytes());
            }
        }
    }

    /// Length of this shape's template set (header included).
    pub fn template_set_len(self) -> usize {
        let fields = self.fields();
        let ent = fields.iter().filter(|f| f.ie.id.enterprise != 0).count();
        4 + 4 + fields.len() * 4 + ent * 4
    }
}

/// Appends a variable-length field (RFC 7011 §7): a 1-byte length below
/// 255, else 255 and a 2-byte length.
pub fn put_varlen(out: &mut Vec<u8>, value: &[u8]) {
    if value.len() < 255 {
        out.push(value.len() as u8);
    } else {
        out.push(255);
        out.extend_from_slice(&(value.len().min(0xffff) as u16).to_be_bytes());
    }
    out.extend_from_slice(&value[..value.len().min(0xffff)]);
}

/// `s` cut to at most `cap` bytes at a character boundary.
fn cut(s: &str, cap: usize) -> &str {
    if s.len() <= cap {
        return s;
    }
    let mut end = cap;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Appends `rec` encoded with `shape`'s template; strings cut to `cap`.
/// Returns whether a string was cut.
pub fn put_record(rec: &FlowRecord, shape: Shape, cap: usize, out: &mut Vec<u8>) -> bool {
    fn addr(out: &mut Vec<u8>, a: IpAddr, v6: bool) {
        match (a, v6) {
            (IpAddr::V4(a), false) => out.extend_from_slice(&a.octets()),
            (IpAddr::V4(a), true) => out.extend_from_slice(&a.to_ipv6_mapped().octets()),
            (IpAddr::V6(a), _) => out.extend_from_slice(&a.octets()),
        }
    }
    let v6 = shape.has(Shape::V6);
    addr(out, rec.src_addr, v6);
    addr(out, rec.dst_addr, v6);
    out.extend_from_slice(&rec.src_port.to_be_bytes());
    out.extend_from_slice(&rec.dst_port.to_be_bytes());
    out.push(rec.proto);
    out.push(rec.dscp.unwrap_or(0) & 0x3f);
    out.extend_from_slice(&rec.packets.to_be_bytes());
    out.extend_from_slice(&rec.bytes.to_be_bytes());
    out.extend_from_slice(&(rec.start_ns / 1_000_000).to_be_bytes());
    out.extend_from_slice(&(rec.end_ns / 1_000_000).to_be_bytes());
    if shape.has(Shape::VLAN) {
        out.extend_from_slice(&rec.vlan.unwrap_or(0).to_be_bytes());
    }
    if shape.has(Shape::TCP_FLAGS) {
        out.extend_from_slice(&rec.tcp_flags.unwrap_or(0).to_be_bytes());
    }
    if shape.has(Shape::SAMPLED) {
        let n = rec.sampling_interval.unwrap_or(1).max(1);
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(&(n - 1).to_be_bytes());
    }
    let mut was_cut = false;
    for s in [&rec.class, &rec.user, &rec.process] {
        let s = s.as_deref().unwrap_or("");
        let c = cut(s, cap);
        was_cut |= c.len() < s.len();
        put_varlen(out, c.as_bytes());
    }
    was_cut
}

/// Builds messages from records; one per observation domain and transport
/// session.
#[derive(Debug)]
pub struct Encoder {
    domain: u32,
    max_len: usize,
    string_cap: usize,
    pad: bool,
    /// Data records in messages finished so far (the next message's
    /// sequence number), mod 2^32.
    seq: u32,
    msg: Vec<u8>,
    msg_records: u32,
    /// The open data set: its template id and where its header is.
    set: Option<(u16, usize)>,
    /// Shapes whose template this session has been sent (bit per shape).
    announced: u32,
    /// Shapes ever used (kept across [`Encoder::forget_templates`]).
    used: u32,
    scratch: Vec<u8>,
    /// Records whose strings were cut to fit.
    pub cut_records: u64,
}

impl Encoder {
    /// An encoder for observation domain `domain` whose messages are at
    /// most `max_len` bytes. With `pad`, each set is padded with zeros to a
    /// multiple of 4 bytes (RFC 7011 §3.3.1 allows it; off by default).
    pub fn new(domain: u32, max_len: usize, pad: bool) -> Result<Encoder, IpfixError> {
        if !(MIN_MESSAGE_LEN..=MAX_MESSAGE_LEN).contains(&max_len) {
            return Err(IpfixError::MessageLen(max_len));
        }
        // Room for the header, a data set header, one template set and the
        // longest record: what is left is shared by the three strings.
        let string_cap = ((max_len - HEADER_LEN - 4 - 3 - MAX_TEMPLATE_SET - MAX_FIXED_RECORD) / 3)
            .min(MAX_STRING);
        let mut msg = Vec::with_capacity(max_len);
        msg.resize(HEADER_LEN, 0);
        Ok(Encoder {
            domain,
            max_len,
            string_cap,
            pad,
            seq: 0,
            msg,
            msg_records: 0,
            set: None,
            announced: 0,
            used: 0,
            scratch: Vec::with_capacity(256),
            cut_records: 0,
        })
    }

    /// Longest string sent; longer ones are cut at a character boundary.
    pub fn string_cap(&self) -> usize {
        self.string_cap
    }

    /// The sequence number the next message will carry.
    pub fn sequence(&self) -> u32 {
        self.seq
    }

    /// Records in the message being built.
    pub fn pending_records(&self) -> u32 {
        self.msg_records
    }

    /// Template refresh: each template in use is sent again before its
    /// next record (in this message if it fits, else the next).
    pub fn forget_templates(&mut self) {
        self.announced = 0;
    }

    /// Sends the template of every shape used so far in the current message
    /// (on a refresh, so a collector that started late learns them even
    /// before their next record). Returns finished messages that filled up.
    pub fn announce_used(&mut self, export_time: u32) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for bits in 0..Shape::COUNT as u8 {
            let shape = Shape::from_bits(bits);
            let bit = 1u32 << bits;
            if self.used & bit == 0 || self.announced & bit != 0 {
                continue;
            }
            if self.msg.len() + self.close_cost() + shape.template_set_len() > self.max_len {
                out.extend(self.finish(export_time));
            }
            self.close_set();
            self.put_template_set(shape);
        }
        out
    }

    /// Adds `rec`. When it does not fit in the message being built, that
    /// message is finished and returned and `rec` starts the next one.
    pub fn push(&mut self, rec: &FlowRecord, export_time: u32) -> Option<Vec<u8>> {
        let shape = Shape::of(rec);
        let tid = shape.template_id();
        let bit = 1u32 << shape.0;
        self.scratch.clear();
        if put_record(rec, shape, self.string_cap, &mut self.scratch) {
            self.cut_records += 1;
        }
        let mut need = self.scratch.len();
        let announced = self.announced & bit != 0;
        // A template set in front closes the open data set.
        let same_set = announced && matches!(self.set, Some((t, _)) if t == tid);
        if !same_set {
            need += 4 + self.close_cost();
        }
        if !announced {
            need += shape.template_set_len();
        }
        // The set this record ends up in is padded when it closes.
        if self.pad {
            need += 3;
        }
        let mut done = None;
        if self.msg.len() + need > self.max_len && self.msg.len() > HEADER_LEN {
            done = self.finish(export_time);
        }
        if self.announced & bit == 0 {
            self.close_set();
            self.put_template_set(shape);
        }
        if !matches!(self.set, Some((t, _)) if t == tid) {
            self.close_set();
            self.set = Some((tid, self.msg.len()));
            self.msg.extend_from_slice(&tid.to_be_bytes());
            self.msg.extend_from_slice(&[0, 0]);
        }
        self.used |= bit;
        self.msg.extend_from_slice(&self.scratch);
        self.msg_records += 1;
        done
    }

    /// Finishes the message being built (`None` when it is empty): fills in
    /// the header with `export_time` (seconds since the epoch), the
    /// sequence number and the domain.
    pub fn finish(&mut self, export_time: u32) -> Option<Vec<u8>> {
        self.close_set();
        if self.msg.len() == HEADER_LEN {
            return None;
        }
        let len = self.msg.len() as u16;
        let h = &mut self.msg[..HEADER_LEN];
        h[0..2].copy_from_slice(&VERSION.to_be_bytes());
        h[2..4].copy_from_slice(&len.to_be_bytes());
        h[4..8].copy_from_slice(&export_time.to_be_bytes());
        h[8..12].copy_from_slice(&self.seq.to_be_bytes());
        h[12..16].copy_from_slice(&self.domain.to_be_bytes());
        self.seq = self.seq.wrapping_add(self.msg_records);
        self.msg_records = 0;
        let mut next = Vec::with_capacity(self.max_len);
        next.resize(HEADER_LEN, 0);
        Some(std::mem::replace(&mut self.msg, next))
    }

    fn put_template_set(&mut self, shape: Shape) {
        let start = self.msg.len();
        self.msg.extend_from_slice(&TEMPLATE_SET_ID.to_be_bytes());
        self.msg.extend_from_slice(&[0, 0]);
        shape.put_template(&mut self.msg);
        let len = (self.msg.len() - start) as u16;
        self.msg[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
        self.announced |= 1 << shape.0;
    }

    /// Bytes closing the open set may add (padding).
    fn close_cost(&self) -> usize {
        if self.pad && self.set.is_some() {
            3
        } else {
            0
        }
    }

    fn close_set(&mut self) {
        let Some((_, start)) = self.set.take() else {
            return;
        };
        if self.pad {
            while (self.msg.len() - start) % 4 != 0 {
                self.msg.push(0);
            }
        }
        let len = (self.msg.len() - start) as u16;
        self.msg[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
    }
}

#[cfg(test)]
#[path = "encode_tests.rs"]
mod tests;
