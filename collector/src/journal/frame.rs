//! The journal's bytes: segment header, checksummed frames, and the
//! compact encoding of one batch of flow records inside a frame.
//!
//! A segment file starts with [`SEGMENT_MAGIC`] (8 bytes), then frames:
//!
//! ```text
//! u32 LE  payload length (at most MAX_FRAME)
//! u32 LE  CRC-32C of the payload
//! payload: u16 name length, name (the exporter's `exporters.name`),
//!          u16 address length, address, u32 domain, u32 sequence,
//!          u32 record count, records
//! record:  u8 flags (bit 0 IPv6 addresses, bits 1..7 which optional
//!          fields follow: vlan, dscp, tcp_flags, class, user, process,
//!          sampling_interval), addresses (4 or 16 bytes each), u16 ports,
//!          u8 proto, u64 packets, bytes, start_ns, end_ns, then the
//!          optional fields present (u16, u8, u16, u16-length strings, u32)
//! ```
//!
//! A frame whose length or checksum is wrong, or whose payload does not
//! decode to exactly its record count, ends what is read of its segment
//! (a torn write at a crash, or damage): what follows cannot be trusted to
//! start at a frame boundary.

use qosloop_schema::FlowRecord;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The first 8 bytes of every segment file (format version 1).
pub const SEGMENT_MAGIC: &[u8; 8] = b"QLJRNL01";
/// Bytes of a frame header.
pub const FRAME_HEADER: usize = 8;
/// The largest payload a frame may claim: reading a damaged length never
/// allocates more than this.
pub const MAX_FRAME: usize = 64 << 20;
/// The longest string field kept (class, user, process, names).
const MAX_STR: usize = u16::MAX as usize;

/// The batch one frame holds (without its records).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameHead {
    /// `exporters.name` of the exporter (e.g. `ipfix/udp/192.0.2.1:2055`).
    pub name: String,
    /// Its address as `exporters.addr` shows it.
    pub addr: String,
    pub domain: u32,
    pub seq: u32,
}

/// CRC-32C (Castagnoli), slicing by 16 (safe code: the workspace has no
/// `unsafe`, so no CRC instruction), tables built at compile time.
pub fn crc32c(data: &[u8]) -> u32 {
    const T: [[u32; 256]; 16] = tables();
    let mut crc = !0u32;
    let mut chunks = data.chunks_exact(16);
    for c in &mut chunks {
        let lo = crc ^ u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        crc = T[15][(lo & 0xff) as usize]
            ^ T[14][((lo >> 8) & 0xff) as usize]
            ^ T[13][((lo >> 16) & 0xff) as usize]
            ^ T[12][(lo >> 24) as usize]
            ^ T[11][c[4] as usize]
            ^ T[10][c[5] as usize]
            ^ T[9][c[6] as usize]
            ^ T[8][c[7] as usize]
            ^ T[7][c[8] as usize]
            ^ T[6][c[9] as usize]
            ^ T[5][c[10] as usize]
            ^ T[4][c[11] as usize]
            ^ T[3][c[12] as usize]
            ^ T[2][c[13] as usize]
            ^ T[1][c[14] as usize]
            ^ T[0][c[15] as usize];
    }
    for &b in chunks.remainder() {
        crc = T[0][((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

const fn tables() -> [[u32; 256]; 16] {
    let mut t = [[0u32; 256]; 16];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut s = 1;
        while s < 16 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            s += 1;
        }
        i += 1;
    }
    t
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Longer strings are cut at a character boundary (none from the
    // decoder comes near: its fields are at most 65535 bytes).
    let mut end = s.len().min(MAX_STR);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..end]);
}

/// Appends one frame (header and payload) holding `records` to `out`.
pub fn encode_frame(out: &mut Vec<u8>, head: &FrameHead, records: &[FlowRecord]) {
    let open = begin_frame(out, head);
    push_records(out, records);
    finish_frame(out, open, records.len() as u32);
}

/// A frame being written into a buffer: where it starts and where its
/// record count goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenFrame {
    start: usize,
    count_at: usize,
}

/// Starts a frame at the end of `out`; records follow with
/// [`push_records`], then [`finish_frame`].
pub fn begin_frame(out: &mut Vec<u8>, head: &FrameHead) -> OpenFrame {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER]);
    put_str(out, &head.name);
    put_str(out, &head.addr);
    out.extend_from_slice(&head.domain.to_le_bytes());
    out.extend_from_slice(&head.seq.to_le_bytes());
    let count_at = out.len();
    out.extend_from_slice(&[0; 4]);
    OpenFrame { start, count_at }
}

/// Sets the sequence number of an open frame (the last message's).
pub fn set_seq(out: &mut [u8], open: OpenFrame, seq: u32) {
    out[open.count_at - 4..open.count_at].copy_from_slice(&seq.to_le_bytes());
}

/// Writes the length, record count and checksum of the frame.
pub fn finish_frame(out: &mut [u8], open: OpenFrame, count: u32) {
    out[open.count_at..open.count_at + 4].copy_from_slice(&count.to_le_bytes());
    let len = (out.len() - open.start - FRAME_HEADER) as u32;
    let crc = crc32c(&out[open.start + FRAME_HEADER..]);
    out[open.start..open.start + 4].copy_from_slice(&len.to_le_bytes());
    out[open.start + 4..open.start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Appends the encoding of `records` (inside an open frame).
pub fn push_records(out: &mut Vec<u8>, records: &[FlowRecord]) {
    out.reserve(records.len() * 56);
    for r in records {
        push_record(out, r);
    }
}

/// Appends the encoding of one record (inside an open frame).
#[inline]
pub fn push_record(out: &mut Vec<u8>, r: &FlowRecord) {
    let v6 = r.src_addr.is_ipv6() || r.dst_addr.is_ipv6();
    let flags = u8::from(v6)
        | u8::from(r.vlan.is_some()) << 1
        | u8::from(r.dscp.is_some()) << 2
        | u8::from(r.tcp_flags.is_some()) << 3
        | u8::from(r.class.is_some()) << 4
        | u8::from(r.user.is_some()) << 5
        | u8::from(r.process.is_some()) << 6
        | u8::from(r.sampling_interval.is_some()) << 7;
    if !v6 {
        // The common case in one copy: flags, IPv4 addresses, ports,
        // protocol, counters and times (46 bytes).
        let mut b = [0u8; 46];
        b[0] = flags;
        if let (IpAddr::V4(s), IpAddr::V4(d)) = (r.src_addr, r.dst_addr) {
            b[1..5].copy_from_slice(&s.octets());
            b[5..9].copy_from_slice(&d.octets());
        }
        b[9..11].copy_from_slice(&r.src_port.to_le_bytes());
        b[11..13].copy_from_slice(&r.dst_port.to_le_bytes());
        b[13] = r.proto;
        b[14..22].copy_from_slice(&r.packets.to_le_bytes());
        b[22..30].copy_from_slice(&r.bytes.to_le_bytes());
        b[30..38].copy_from_slice(&r.start_ns.to_le_bytes());
        b[38..46].copy_from_slice(&r.end_ns.to_le_bytes());
        out.extend_from_slice(&b);
    } else {
        out.push(flags);
        for ip in [r.src_addr, r.dst_addr] {
            match ip {
                IpAddr::V4(a) => out.extend_from_slice(&a.to_ipv6_mapped().octets()),
                IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
            }
        }
        out.extend_from_slice(&r.src_port.to_le_bytes());
        out.extend_from_slice(&r.dst_port.to_le_bytes());
        out.push(r.proto);
        for v in [r.packets, r.bytes, r.start_ns, r.end_ns] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    if let Some(v) = r.vlan {
        out.extend_from_slice(&v.to_le_bytes());
    }
    if let Some(v) = r.dscp {
        out.push(v);
    }
    if let Some(v) = r.tcp_flags {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for s in [&r.class, &r.user, &r.process].into_iter().flatten() {
        put_str(out, s);
    }
    if let Some(v) = r.sampling_interval {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Why bytes are not a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer bytes than the header, or than the length it claims: the end
    /// of what was written (or a torn write).
    #[error("incomplete frame")]
    Incomplete,
    #[error("frame length {0} over the limit")]
    TooLong(usize),
    #[error("frame checksum mismatch")]
    Checksum,
    #[error("frame payload does not decode ({0})")]
    Payload(&'static str),
}

/// The frame at the start of `buf`: its payload and its whole length.
pub fn split_frame(buf: &[u8]) -> Result<(&[u8], usize), FrameError> {
    let Some(h) = buf.get(..FRAME_HEADER) else {
        return Err(FrameError::Incomplete);
    };
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    if len > MAX_FRAME {
        return Err(FrameError::TooLong(len));
    }
    let Some(payload) = buf.get(FRAME_HEADER..FRAME_HEADER + len) else {
        return Err(FrameError::Incomplete);
    };
    if crc32c(payload) != crc {
        return Err(FrameError::Checksum);
    }
    Ok((payload, FRAME_HEADER + len))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.0.len() < n {
            return Err(FrameError::Payload("short"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn string(&mut self) -> Result<String, FrameError> {
        let n = self.u16()? as usize;
        std::str::from_utf8(self.take(n)?)
            .map(str::to_owned)
            .map_err(|_| FrameError::Payload("string not UTF-8"))
    }
    fn ip(&mut self, v6: bool) -> Result<IpAddr, FrameError> {
        Ok(if v6 {
            let mut a = [0u8; 16];
            a.copy_from_slice(self.take(16)?);
            IpAddr::V6(Ipv6Addr::from(a)).to_canonical()
        } else {
            let b = self.take(4)?;
            IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
        })
    }
}

/// Decodes a payload (checksum already checked) into its head and records.
pub fn decode_payload(payload: &[u8]) -> Result<(FrameHead, Vec<FlowRecord>), FrameError> {
    let mut r = Reader(payload);
    let head = FrameHead {
        name: r.string()?,
        addr: r.string()?,
        domain: r.u32()?,
        seq: r.u32()?,
    };
    let count = r.u32()? as usize;
    // A record takes at least 45 bytes: the count is bounded by the payload.
    if count > payload.len() / 45 {
        return Err(FrameError::Payload("record count past the payload"));
    }
    let mut records = Vec::with_capacity(count);
    for _ in 0..count {
        let flags = r.u8()?;
        let v6 = flags & 1 != 0;
        let mut rec = FlowRecord {
            src_addr: r.ip(v6)?,
            dst_addr: r.ip(v6)?,
            src_port: r.u16()?,
            dst_port: r.u16()?,
            proto: r.u8()?,
            packets: r.u64()?,
            bytes: r.u64()?,
            start_ns: r.u64()?,
            end_ns: r.u64()?,
            ..FlowRecord::default()
        };
        if flags & 2 != 0 {
            rec.vlan = Some(r.u16()?);
        }
        if flags & 4 != 0 {
            rec.dscp = Some(r.u8()?);
        }
        if flags & 8 != 0 {
            rec.tcp_flags = Some(r.u16()?);
        }
        if flags & 16 != 0 {
            rec.class = Some(r.string()?);
        }
        if flags & 32 != 0 {
            rec.user = Some(r.string()?);
        }
        if flags & 64 != 0 {
            rec.process = Some(r.string()?);
        }
        if flags & 128 != 0 {
            rec.sampling_interval = Some(r.u32()?);
        }
        records.push(rec);
    }
    if !r.0.is_empty() {
        return Err(FrameError::Payload("bytes after the last record"));
    }
    Ok((head, records))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn crc32c_known_answer() {
        // RFC 3720 appendix B.4 test vectors.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
    }

    /// The sliced form equals the bit-at-a-time definition at every length
    /// and alignment of the tail.
    #[test]
    fn crc32c_equals_the_bitwise_definition() {
        fn bitwise(data: &[u8]) -> u32 {
            let mut crc = !0u32;
            for &b in data {
                crc ^= u32::from(b);
                for _ in 0..8 {
                    crc = if crc & 1 != 0 {
                        (crc >> 1) ^ 0x82f6_3b78
                    } else {
                        crc >> 1
                    };
                }
            }
            !crc
        }
        let data: Vec<u8> = (0..300u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for len in 0..data.len() {
            assert_eq!(crc32c(&data[..len]), bitwise(&data[..len]), "length {len}");
        }
    }

    fn record() -> impl Strategy<Value = FlowRecord> {
        (
            any::<[u8; 16]>(),
            any::<u32>(),
            any::<bool>(),
            any::<(u16, u16, u8, u64, u64, u64, u64)>(),
            any::<(Option<u16>, Option<u8>, Option<u16>, Option<u32>)>(),
            proptest::option::of("[a-zé]{0,12}"),
            proptest::option::of("[a-z]{0,5}"),
        )
            .prop_map(|(a6, a4, v6, n, o, class, user)| FlowRecord {
                src_addr: if v6 {
                    IpAddr::V6(Ipv6Addr::from(a6))
                } else {
                    IpAddr::V4(Ipv4Addr::from(a4))
                }
                .to_canonical(),
                dst_addr: IpAddr::V4(Ipv4Addr::from(a4.rotate_left(7))),
                src_port: n.0,
                dst_port: n.1,
                proto: n.2,
                packets: n.3,
                bytes: n.4,
                start_ns: n.5,
                end_ns: n.6,
                vlan: o.0,
                dscp: o.1,
                tcp_flags: o.2,
                class,
                user,
                process: None,
                sampling_interval: o.3,
            })
    }

    proptest! {
        #[test]
        fn frames_round_trip(records in proptest::collection::vec(record(), 0..40), domain: u32, seq: u32) {
            let head = FrameHead { name: "ipfix/udp/192.0.2.1:2055".into(), addr: "192.0.2.1:2055".into(), domain, seq };
            let mut buf = vec![1, 2, 3];
            encode_frame(&mut buf, &head, &records);
            let (payload, len) = split_frame(&buf[3..]).unwrap();
            prop_assert_eq!(len, buf.len() - 3);
            let (h, back) = decode_payload(payload).unwrap();
            prop_assert_eq!(h, head);
            prop_assert_eq!(back, records);
        }

        /// Damage anywhere in a frame is caught (checksum, length, or an
        /// incomplete frame), never a panic or a wrong batch.
        #[test]
        fn damage_is_detected(records in proptest::collection::vec(record(), 1..10), at: usize, bit in 0u8..8) {
            let head = FrameHead { name: "n".into(), addr: "a".into(), domain: 1, seq: 2 };
            let mut buf = Vec::new();
            encode_frame(&mut buf, &head, &records);
            let at = at % buf.len();
            buf[at] ^= 1 << bit;
            prop_assert!(split_frame(&buf).is_err());
        }
    }

    #[test]
    fn a_torn_frame_is_incomplete() {
        let head = FrameHead {
            name: "n".into(),
            addr: "a".into(),
            domain: 1,
            seq: 2,
        };
        let mut buf = Vec::new();
        encode_frame(&mut buf, &head, &vec![FlowRecord::default(); 3]);
        for cut in [0, 3, FRAME_HEADER, buf.len() - 1] {
            assert_eq!(split_frame(&buf[..cut]), Err(FrameError::Incomplete));
        }
        let mut huge = buf.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            split_frame(&huge),
            Err(FrameError::TooLong(u32::MAX as usize))
        );
    }
}
