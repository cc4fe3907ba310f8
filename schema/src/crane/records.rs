//! Flow records in DATA messages: the enabled keys of the template, in
//! order, without descriptors, numbers in the exporter's byte order.
//!
//! Fixed-size values take their type's size. Addresses are byte strings and
//! keep network order whatever the byte order. Strings and octet arrays are
//! a 16-bit length (in the record byte order) and the bytes. Absent optional
//! values use sentinels: `0xFFFF` for `vlanId`, `tcpControlBits` and as a
//! string length, `0xFF` for `ipDiffServCodePoint`, `0` for
//! `samplingPacketInterval`.

use super::message::{ByteOrder, WireKey, WireTemplate};
use super::{CraneError, Reader};
use crate::ie::{self, DataType, IeId};
use crate::FlowRecord;
use bytes::{BufMut, BytesMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const ABSENT_U16: u16 = 0xFFFF;
const ABSENT_U8: u8 = 0xFF;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    SrcV4,
    DstV4,
    SrcV6,
    DstV6,
    SrcPort,
    DstPort,
    Proto,
    Packets,
    Bytes,
    StartNs,
    EndNs,
    Vlan,
    Dscp,
    TcpFlags,
    Class,
    User,
    Process,
    Sampling,
    /// An element FlowRecord does not hold: skipped on decode, zero on encode.
    Other,
}

fn field_of(id: IeId) -> Field {
    match id {
        x if x == ie::SOURCE_IPV4_ADDRESS.id => Field::SrcV4,
        x if x == ie::DESTINATION_IPV4_ADDRESS.id => Field::DstV4,
        x if x == ie::SOURCE_IPV6_ADDRESS.id => Field::SrcV6,
        x if x == ie::DESTINATION_IPV6_ADDRESS.id => Field::DstV6,
        x if x == ie::SOURCE_TRANSPORT_PORT.id => Field::SrcPort,
        x if x == ie::DESTINATION_TRANSPORT_PORT.id => Field::DstPort,
        x if x == ie::PROTOCOL_IDENTIFIER.id => Field::Proto,
        x if x == ie::PACKET_DELTA_COUNT.id => Field::Packets,
        x if x == ie::OCTET_DELTA_COUNT.id => Field::Bytes,
        x if x == ie::FLOW_START_NANOSECONDS.id => Field::StartNs,
        x if x == ie::FLOW_END_NANOSECONDS.id => Field::EndNs,
        x if x == ie::VLAN_ID.id => Field::Vlan,
        x if x == ie::IP_DIFF_SERV_CODE_POINT.id => Field::Dscp,
        x if x == ie::TCP_CONTROL_BITS.id => Field::TcpFlags,
        x if x == ie::CLASS_LABEL.id => Field::Class,
        x if x == ie::USER_NAME.id => Field::User,
        x if x == ie::PROCESS_NAME.id => Field::Process,
        x if x == ie::SAMPLING_PACKET_INTERVAL.id => Field::Sampling,
        _ => Field::Other,
    }
}

/// A template compiled for encoding and decoding records.
#[derive(Clone, Debug)]
pub struct RecordLayout {
    fields: Vec<(Field, DataType)>,
    order: ByteOrder,
    /// The fewest bytes one record can take (a variable-length value takes
    /// at least its 2-byte length).
    min_len: usize,
}

impl RecordLayout {
    /// The layout of `template`'s enabled keys in `order`. A known element
    /// announced with a type other than its own is read as `Other`.
    pub fn new(template: &WireTemplate, order: ByteOrder) -> RecordLayout {
        let fields = template
            .enabled()
            .map(|k: &WireKey| {
                let f = field_of(k.ie);
                let own_type = ie::by_id(k.ie).map(|e| e.data_type);
                if f != Field::Other && own_type == Some(k.data_type) {
                    (f, k.data_type)
                } else {
                    (Field::Other, k.data_type)
                }
            })
            .collect::<Vec<_>>();
        let min_len = fields
            .iter()
            .map(|(_, ty)| ty.fixed_len().unwrap_or(2))
            .sum();
        RecordLayout {
            fields,
            order,
            min_len,
        }
    }

    /// The layout of a template a peer announced: refused unless it has an
    /// enabled fixed-size key, so that every record takes bytes of the
    /// message and no count can make the decoder produce records from
    /// nothing.
    pub fn checked(template: &WireTemplate, order: ByteOrder) -> Result<RecordLayout, CraneError> {
        if !template
            .enabled()
            .any(|k| k.data_type.fixed_len().is_some())
        {
            return Err(CraneError::NoFixedKey {
                template: template.id,
            });
        }
        Ok(RecordLayout::new(template, order))
    }

    /// The fewest bytes one record takes.
    pub fn min_record_len(&self) -> usize {
        self.min_len
    }

    /// Checks that `count` records can fit in `bytes` bytes: the bound on
    /// every count, applied before anything is allocated. A layout without
    /// fields holds no records.
    pub fn check_count(&self, bytes: usize, count: u32) -> Result<(), CraneError> {
        let fits = match self.min_len {
            0 => count == 0 && bytes == 0,
            n => (count as usize)
                .checked_mul(n)
                .is_some_and(|need| need <= bytes),
        };
        if fits {
            Ok(())
        } else {
            Err(CraneError::Count {
                count,
                bytes,
                min_len: self.min_len,
            })
        }
    }

    /// An upper bound of the memory `count` decoded records from `bytes`
    /// bytes take: the records themselves plus their strings (which can
    /// hold no more than the bytes they came from).
    pub fn decoded_size(count: u32, bytes: usize) -> usize {
        (count as usize)
            .saturating_mul(std::mem::size_of::<FlowRecord>())
            .saturating_add(bytes)
    }

    /// Whether this layout carries IPv6 addresses (else IPv4).
    pub fn is_v6(&self) -> bool {
        self.fields
            .iter()
            .any(|(f, _)| matches!(f, Field::SrcV6 | Field::DstV6))
    }

    /// Appends one record. IPv4 addresses go into IPv6 keys as mapped
    /// addresses; an IPv6 address in an IPv4 key is an error.
    pub fn encode(&self, rec: &FlowRecord, out: &mut BytesMut) -> Result<(), CraneError> {
        for &(field, ty) in &self.fields {
            match field {
                Field::SrcV4 => out.put_slice(&v4(rec.src_addr, "sourceIPv4Address")?.octets()),
                Field::DstV4 => {
                    out.put_slice(&v4(rec.dst_addr, "destinationIPv4Address")?.octets())
                }
                Field::SrcV6 => out.put_slice(&v6(rec.src_addr).octets()),
                Field::DstV6 => out.put_slice(&v6(rec.dst_addr).octets()),
                Field::SrcPort => self.put_u16(out, rec.src_port),
                Field::DstPort => self.put_u16(out, rec.dst_port),
                Field::Proto => out.put_u8(rec.proto),
                Field::Packets => self.put_u64(out, rec.packets),
                Field::Bytes => self.put_u64(out, rec.bytes),
                Field::StartNs => self.put_u64(out, rec.start_ns),
                Field::EndNs => self.put_u64(out, rec.end_ns),
                Field::Vlan => self.put_u16(out, rec.vlan.unwrap_or(ABSENT_U16)),
                Field::Dscp => out.put_u8(rec.dscp.unwrap_or(ABSENT_U8)),
                Field::TcpFlags => self.put_u16(out, rec.tcp_flags.unwrap_or(ABSENT_U16)),
                Field::Class => self.put_str(out, rec.class.as_deref(), "qosloopClassLabel")?,
                Field::User => self.put_str(out, rec.user.as_deref(), "userName")?,
                Field::Process => {
                    self.put_str(out, rec.process.as_deref(), "qosloopProcessName")?
                }
                Field::Sampling => self.put_u32(out, rec.sampling_interval.unwrap_or(0)),
                Field::Other => match ty.fixed_len() {
                    Some(n) => out.put_bytes(0, n),
                    None => self.put_u16(out, ABSENT_U16),
                },
            }
        }
        Ok(())
    }

    /// Decodes exactly `count` records from `bytes`, calling `each` per
    /// record; left-over bytes are an error, and so is a count that cannot
    /// fit in the bytes (checked first).
    pub fn decode_each(
        &self,
        bytes: &[u8],
        count: u32,
        mut each: impl FnMut(FlowRecord),
    ) -> Result<(), CraneError> {
        self.check_count(bytes.len(), count)?;
        let mut r = Reader::new(bytes, "DATA records");
        for _ in 0..count {
            each(self.decode_one(&mut r)?);
        }
        r.finish()
    }

    /// Decodes `count` records.
    pub fn decode(&self, bytes: &[u8], count: u32) -> Result<Vec<FlowRecord>, CraneError> {
        // The count is bounded by the bytes present before the vector is
        // allocated: `count` records of at least `min_len` bytes each.
        self.check_count(bytes.len(), count)?;
        let mut out = Vec::with_capacity(count as usize);
        self.decode_each(bytes, count, |rec| out.push(rec))?;
        Ok(out)
    }

    fn decode_one(&self, r: &mut Reader<'_>) -> Result<FlowRecord, CraneError> {
        let mut rec = FlowRecord::default();
        for &(field, ty) in &self.fields {
            match field {
                Field::SrcV4 => rec.src_addr = IpAddr::V4(Ipv4Addr::from(r.array::<4>()?)),
                Field::DstV4 => rec.dst_addr = IpAddr::V4(Ipv4Addr::from(r.array::<4>()?)),
                Field::SrcV6 => rec.src_addr = Ipv6Addr::from(r.array::<16>()?).to_canonical(),
                Field::DstV6 => rec.dst_addr = Ipv6Addr::from(r.array::<16>()?).to_canonical(),
                Field::SrcPort => rec.src_port = self.u16(r)?,
                Field::DstPort => rec.dst_port = self.u16(r)?,
                Field::Proto => rec.proto = r.u8()?,
                Field::Packets => rec.packets = self.u64(r)?,
                Field::Bytes => rec.bytes = self.u64(r)?,
                Field::StartNs => rec.start_ns = self.u64(r)?,
                Field::EndNs => rec.end_ns = self.u64(r)?,
                Field::Vlan => rec.vlan = Some(self.u16(r)?).filter(|&v| v != ABSENT_U16),
                Field::Dscp => rec.dscp = Some(r.u8()?).filter(|&v| v != ABSENT_U8),
                Field::TcpFlags => rec.tcp_flags = Some(self.u16(r)?).filter(|&v| v != ABSENT_U16),
                Field::Class => rec.class = self.str(r, "qosloopClassLabel")?,
                Field::User => rec.user = self.str(r, "userName")?,
                Field::Process => rec.process = self.str(r, "qosloopProcessName")?,
                Field::Sampling => rec.sampling_interval = Some(self.u32(r)?).filter(|&v| v != 0),
                Field::Other => match ty.fixed_len() {
                    Some(n) => {
                        r.take(n)?;
                    }
                    None => {
                        let len = self.u16(r)?;
                        if len != ABSENT_U16 {
                            r.take(usize::from(len))?;
                        }
                    }
                },
            }
        }
        Ok(rec)
    }

    fn put_u16(&self, out: &mut BytesMut, v: u16) {
        match self.order {
            ByteOrder::Big => out.put_u16(v),
            ByteOrder::Little => out.put_u16_le(v),
        }
    }
    fn put_u32(&self, out: &mut BytesMut, v: u32) {
        match self.order {
            ByteOrder::Big => out.put_u32(v),
            ByteOrder::Little => out.put_u32_le(v),
        }
    }
    fn put_u64(&self, out: &mut BytesMut, v: u64) {
        match self.order {
            ByteOrder::Big => out.put_u64(v),
            ByteOrder::Little => out.put_u64_le(v),
        }
    }
    fn put_str(
        &self,
        out: &mut BytesMut,
        s: Option<&str>,
        field: &'static str,
    ) -> Result<(), CraneError> {
        match s {
            None => self.put_u16(out, ABSENT_U16),
            Some(s) => {
                let len = u16::try_from(s.len())
                    .ok()
                    .filter(|&l| l != ABSENT_U16)
                    .ok_or(CraneError::TooLong {
                        field,
                        len: s.len(),
                    })?;
                self.put_u16(out, len);
                out.put_slice(s.as_bytes());
            }
        }
        Ok(())
    }
    fn u16(&self, r: &mut Reader<'_>) -> Result<u16, CraneError> {
        let b = r.array()?;
        Ok(match self.order {
            ByteOrder::Big => u16::from_be_bytes(b),
            ByteOrder::Little => u16::from_le_bytes(b),
        })
    }
    fn u32(&self, r: &mut Reader<'_>) -> Result<u32, CraneError> {
        let b = r.array()?;
        Ok(match self.order {
            ByteOrder::Big => u32::from_be_bytes(b),
            ByteOrder::Little => u32::from_le_bytes(b),
        })
    }
    fn u64(&self, r: &mut Reader<'_>) -> Result<u64, CraneError> {
        let b = r.array()?;
        Ok(match self.order {
            ByteOrder::Big => u64::from_be_bytes(b),
            ByteOrder::Little => u64::from_le_bytes(b),
        })
    }
    fn str(&self, r: &mut Reader<'_>, field: &'static str) -> Result<Option<String>, CraneError> {
        let len = self.u16(r)?;
        if len == ABSENT_U16 {
            return Ok(None);
        }
        let raw = r.take(usize::from(len))?;
        std::str::from_utf8(raw)
            .map(|s| Some(s.to_owned()))
            .map_err(|_| CraneError::Utf8 { field })
    }
}

fn v4(addr: IpAddr, field: &'static str) -> Result<Ipv4Addr, CraneError> {
    match addr {
        IpAddr::V4(a) => Ok(a),
        IpAddr::V6(a) => a.to_ipv4_mapped().ok_or(CraneError::Value { field }),
    }
}

fn v6(addr: IpAddr) -> Ipv6Addr {
    match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}
