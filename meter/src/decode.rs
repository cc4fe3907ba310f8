//! Packet decoding: link layer (Ethernet, 802.1Q/QinQ, Linux cooked, raw IP),
//! IPv4 (options, fragments), IPv6 (extension headers, fragments), TCP, UDP,
//! ICMP and ICMPv6.
//!
//! The decoder is stateless and allocation-free; it reads only the bytes
//! that were captured, so a header-only capture (CAPLEN) still yields the
//! packet's real IP length from the IP header. A packet that cannot be
//! decoded yields a [`DecodeError`] whose [`reason`](DecodeError::reason) is
//! the name it is counted under.

use crate::pcap::linktype;

/// Ether types.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;
const ETHERTYPE_QINQ_OLD: u16 = 0x9100;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// At most this many stacked VLAN tags are walked.
const MAX_VLAN_TAGS: usize = 4;
/// At most this many IPv6 extension headers are walked.
const MAX_EXT_HEADERS: usize = 8;

/// Why a packet could not be decoded; each is counted under its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, thiserror::Error)]
pub enum DecodeError {
    #[error("unsupported link type")]
    UnsupportedLinkType,
    #[error("frame shorter than its link-layer header")]
    TruncatedLink,
    #[error("more VLAN tags than supported")]
    TooManyVlanTags,
    #[error("ether type is not IP")]
    NotIp,
    #[error("IP header truncated")]
    TruncatedIp,
    #[error("IP version field does not match")]
    BadIpVersion,
    #[error("IPv4 header length below 20 bytes")]
    BadIpHeaderLength,
    #[error("IP total length shorter than its header")]
    BadIpTotalLength,
    #[error("IPv6 extension header truncated or too many")]
    BadIpv6Extension,
    #[error("transport header truncated")]
    TruncatedTransport,
}

impl DecodeError {
    /// Every reason, in the order summaries print them.
    pub const ALL: [DecodeError; 10] = [
        DecodeError::UnsupportedLinkType,
        DecodeError::TruncatedLink,
        DecodeError::TooManyVlanTags,
        DecodeError::NotIp,
        DecodeError::TruncatedIp,
        DecodeError::BadIpVersion,
        DecodeError::BadIpHeaderLength,
        DecodeError::BadIpTotalLength,
        DecodeError::BadIpv6Extension,
        DecodeError::TruncatedTransport,
    ];

    /// The name this reason is counted under.
    pub fn reason(self) -> &'static str {
        match self {
            DecodeError::UnsupportedLinkType => "unsupported_linktype",
            DecodeError::TruncatedLink => "truncated_link",
            DecodeError::TooManyVlanTags => "too_many_vlan_tags",
            DecodeError::NotIp => "not_ip",
            DecodeError::TruncatedIp => "truncated_ip",
            DecodeError::BadIpVersion => "bad_ip_version",
            DecodeError::BadIpHeaderLength => "bad_ip_header_length",
            DecodeError::BadIpTotalLength => "bad_ip_total_length",
            DecodeError::BadIpv6Extension => "bad_ipv6_extension",
            DecodeError::TruncatedTransport => "truncated_transport",
        }
    }

    /// Index into a counter array of [`DecodeError::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Fragment information of an IP packet that is a fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fragment {
    /// IPv4 identification (16 bits) or IPv6 fragment identification.
    pub id: u32,
    /// Offset of this fragment's data, in bytes.
    pub offset: u32,
    pub more: bool,
}

/// The fields of one decoded packet.
///
/// Addresses are kept as `u128` (IPv4 in the low 32 bits, with
/// `ip_version` telling which) so that flow keys hash fast.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Decoded {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// The ether type after any VLAN tags.
    pub ether_type: u16,
    /// Outer and inner 802.1Q TCI (priority, DEI, VLAN id), if tagged.
    pub vlan_tci: Option<u16>,
    pub inner_vlan_tci: Option<u16>,
    pub ip_version: u8,
    pub src: u128,
    pub dst: u128,
    pub proto: u8,
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP flags with the NS bit as bit 8.
    pub tcp_flags: u16,
    pub dscp: u8,
    /// IP bytes on the wire: IPv4 total length or 40 + IPv6 payload length.
    pub ip_len: u32,
    pub fragment: Option<Fragment>,
    /// False for non-first fragments: ports are unknown.
    pub has_ports: bool,
    /// Offset of the IP header in the frame.
    pub l3_offset: u16,
    /// Offset of the transport header in the frame.
    pub l4_offset: u16,
}

impl Decoded {
    /// The outer VLAN id (12 bits), if tagged.
    pub fn vlan_id(&self) -> Option<u16> {
        self.vlan_tci.map(|t| t & 0x0fff)
    }
}

#[inline]
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline]
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be128(b: &[u8], at: usize) -> u128 {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    u128::from_be_bytes(a)
}

/// Decodes one frame of the given link type. `orig_len` is the length on
/// the wire (used when an IP header gives no length, e.g. TSO frames).
pub fn decode(link: u32, frame: &[u8], orig_len: u32) -> Result<Decoded, DecodeError> {
    let mut d = Decoded::default();
    let (l3, ether_type) = match link {
        linktype::ETHERNET => decode_ethernet(frame, &mut d)?,
        linktype::RAW | linktype::IPV4 | linktype::IPV6 => {
            let v = frame.first().ok_or(DecodeError::TruncatedIp)? >> 4;
            match v {
                4 => (0, ETHERTYPE_IPV4),
                6 => (0, ETHERTYPE_IPV6),
                _ => return Err(DecodeError::BadIpVersion),
            }
        }
        linktype::LINUX_SLL => {
            if frame.len() < 16 {
                return Err(DecodeError::TruncatedLink);
            }
            (16, be16(frame, 14))
        }
        linktype::LINUX_SLL2 => {
            if frame.len() < 20 {
                return Err(DecodeError::TruncatedLink);
            }
            (20, be16(frame, 0))
        }
        _ => return Err(DecodeError::UnsupportedLinkType),
    };
    d.ether_type = ether_type;
    d.l3_offset = l3 as u16;
    let wire_ip_len = orig_len.saturating_sub(l3 as u32);
    match ether_type {
        ETHERTYPE_IPV4 => decode_ipv4(&frame[l3..], l3, wire_ip_len, &mut d)?,
        ETHERTYPE_IPV6 => decode_ipv6(&frame[l3..], l3, wire_ip_len, &mut d)?,
        _ => return Err(DecodeError::NotIp),
    }
    Ok(d)
}

fn decode_ethernet(f: &[u8], d: &mut Decoded) -> Result<(usize, u16), DecodeError> {
    if f.len() < 14 {
        return Err(DecodeError::TruncatedLink);
    }
    d.dst_mac.copy_from_slice(&f[0..6]);
    d.src_mac.copy_from_slice(&f[6..12]);
    let mut ether_type = be16(f, 12);
    let mut at = 14;
    let mut tags = 0;
    while matches!(
        ether_type,
        ETHERTYPE_VLAN | ETHERTYPE_QINQ | ETHERTYPE_QINQ_OLD
    ) {
        if tags == MAX_VLAN_TAGS {
            return Err(DecodeError::TooManyVlanTags);
        }
        if f.len() < at + 4 {
            return Err(DecodeError::TruncatedLink);
        }
        let tci = be16(f, at);
        match tags {
            0 => d.vlan_tci = Some(tci),
            1 => d.inner_vlan_tci = Some(tci),
            _ => {}
        }
        ether_type = be16(f, at + 2);
        at += 4;
        tags += 1;
    }
    Ok((at, ether_type))
}

fn decode_ipv4(ip: &[u8], l3: usize, wire_len: u32, d: &mut Decoded) -> Result<(), DecodeError> {
    if ip.len() < 20 {
        return Err(DecodeError::TruncatedIp);
    }
    if ip[0] >> 4 != 4 {
        return Err(DecodeError::BadIpVersion);
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ihl < 20 {
        return Err(DecodeError::BadIpHeaderLength);
    }
    if ip.len() < ihl {
        return Err(DecodeError::TruncatedIp);
    }
    let total = u32::from(be16(ip, 2));
    d.ip_len = if total == 0 {
        // Segmentation offload: the header carries no length.
        wire_len
    } else if (total as usize) < ihl {
        return Err(DecodeError::BadIpTotalLength);
    } else {
        total
    };
    d.ip_version = 4;
    d.dscp = ip[1] >> 2;
    d.proto = ip[9];
    d.src = u128::from(be32(ip, 12));
    d.dst = u128::from(be32(ip, 16));
    let frag = be16(ip, 6);
    let offset = u32::from(frag & 0x1fff) * 8;
    let more = frag & 0x2000 != 0;
    if offset != 0 || more {
        d.fragment = Some(Fragment {
            id: u32::from(be16(ip, 4)),
            offset,
            more,
        });
    }
    d.l4_offset = (l3 + ihl) as u16;
    if offset != 0 {
        return Ok(());
    }
    decode_transport(&ip[ihl..], d)
}

fn decode_ipv6(ip: &[u8], l3: usize, wire_len: u32, d: &mut Decoded) -> Result<(), DecodeError> {
    if ip.len() < 40 {
        return Err(DecodeError::TruncatedIp);
    }
    if ip[0] >> 4 != 6 {
        return Err(DecodeError::BadIpVersion);
    }
    d.ip_version = 6;
    d.dscp = ((be16(ip, 0) >> 6) & 0x3f) as u8;
    let payload = u32::from(be16(ip, 4));
    d.ip_len = if payload == 0 { wire_len } else { 40 + payload };
    d.src = be128(ip, 8);
    d.dst = be128(ip, 24);
    let mut next = ip[6];
    let mut at = 40;
    for _ in 0..=MAX_EXT_HEADERS {
        match next {
            // Hop-by-hop, routing, destination options, mobility, HIP, shim6.
            0 | 43 | 60 | 135 | 139 | 140 => {
                if ip.len() < at + 8 {
                    return Err(DecodeError::BadIpv6Extension);
                }
                next = ip[at];
                at += (usize::from(ip[at + 1]) + 1) * 8;
            }
            // Authentication header: length in 4-byte units, minus 2.
            51 => {
                if ip.len() < at + 8 {
                    return Err(DecodeError::BadIpv6Extension);
                }
                next = ip[at];
                at += (usize::from(ip[at + 1]) + 2) * 4;
            }
            44 => {
                if ip.len() < at + 8 {
                    return Err(DecodeError::BadIpv6Extension);
                }
                let off_flags = be16(ip, at + 2);
                let offset = u32::from(off_flags >> 3) * 8;
                let more = off_flags & 1 != 0;
                d.fragment = Some(Fragment {
                    id: be32(ip, at + 4),
                    offset,
                    more,
                });
                next = ip[at];
                at += 8;
                if offset != 0 {
                    d.proto = next;
                    d.l4_offset = (l3 + at) as u16;
                    return Ok(());
                }
            }
            _ => {
                if at > ip.len() {
                    return Err(DecodeError::BadIpv6Extension);
                }
                d.proto = next;
                d.l4_offset = (l3 + at) as u16;
                return decode_transport(&ip[at..], d);
            }
        }
    }
    Err(DecodeError::BadIpv6Extension)
}

fn decode_transport(l4: &[u8], d: &mut Decoded) -> Result<(), DecodeError> {
    match d.proto {
        PROTO_TCP => {
            if l4.len() < 14 {
                return Err(DecodeError::TruncatedTransport);
            }
            d.src_port = be16(l4, 0);
            d.dst_port = be16(l4, 2);
            d.tcp_flags = u16::from(l4[13]) | (u16::from(l4[12] & 1) << 8);
        }
        PROTO_UDP | 132 /* SCTP */ | 136 /* UDP-Lite */ => {
            if l4.len() < 4 {
                return Err(DecodeError::TruncatedTransport);
            }
            d.src_port = be16(l4, 0);
            d.dst_port = be16(l4, 2);
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            if l4.len() < 2 {
                return Err(DecodeError::TruncatedTransport);
            }
            // NetFlow's convention: type and code in the destination port.
            d.dst_port = u16::from(l4[0]) << 8 | u16::from(l4[1]);
        }
        _ => {}
    }
    d.has_ports = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn eth(ether_type: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0xaa; 6];
        f.extend_from_slice(&[0xbb; 6]);
        f.extend_from_slice(&ether_type.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn ipv4_udp(frag: u16) -> Vec<u8> {
        let mut ip = vec![
            0x45, 0xb8, 0, 36, 0x12, 0x34, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        ip[6..8].copy_from_slice(&frag.to_be_bytes());
        ip.extend_from_slice(&[0x13, 0x88, 0x00, 0x35, 0, 16, 0, 0]);
        ip.extend_from_slice(&[0; 8]);
        ip
    }

    #[test]
    fn ipv4_udp_in_ethernet() {
        let d = decode(linktype::ETHERNET, &eth(0x0800, &ipv4_udp(0)), 50).unwrap();
        assert_eq!(d.ip_version, 4);
        assert_eq!(d.src, 0x0a00_0001);
        assert_eq!((d.src_port, d.dst_port, d.proto), (5000, 53, 17));
        assert_eq!(d.dscp, 46);
        assert_eq!(d.ip_len, 36);
        assert!(d.has_ports && d.fragment.is_none());
    }

    #[test]
    fn qinq_tags_are_read() {
        let mut inner = 0x8100u16.to_be_bytes().to_vec();
        inner.splice(0..0, 0x0064u16.to_be_bytes());
        let mut payload = vec![];
        payload.extend_from_slice(&0x2005u16.to_be_bytes()); // outer TCI: prio 1, vlan 5
        payload.extend_from_slice(&0x8100u16.to_be_bytes());
        payload.extend_from_slice(&0x0064u16.to_be_bytes()); // inner vlan 100
        payload.extend_from_slice(&0x0800u16.to_be_bytes());
        payload.extend_from_slice(&ipv4_udp(0));
        let d = decode(linktype::ETHERNET, &eth(0x88a8, &payload), 0).unwrap();
        assert_eq!(d.vlan_id(), Some(5));
        assert_eq!(d.vlan_tci, Some(0x2005));
        assert_eq!(d.inner_vlan_tci, Some(100));
        assert_eq!(d.l3_offset, 22);
    }

    #[test]
    fn later_fragment_has_no_ports() {
        let d = decode(linktype::ETHERNET, &eth(0x0800, &ipv4_udp(185)), 0).unwrap();
        let f = d.fragment.unwrap();
        assert_eq!((f.id, f.offset, f.more), (0x1234, 1480, false));
        assert!(!d.has_ports);
        let first = decode(linktype::ETHERNET, &eth(0x0800, &ipv4_udp(0x2000)), 0).unwrap();
        assert!(first.has_ports && first.fragment.unwrap().more);
    }

    #[test]
    fn ipv6_with_extension_headers() {
        let mut ip = vec![0x60, 0, 0, 0, 0, 24, 0, 64];
        ip.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8].repeat(4));
        ip.extend_from_slice(&[0xfe, 0x80, 0, 0].repeat(4));
        // hop-by-hop (8 bytes) -> fragment (8 bytes, first, more) -> TCP
        ip.extend_from_slice(&[44, 0, 1, 4, 0, 0, 0, 0]);
        ip.extend_from_slice(&[6, 0, 0, 1, 0, 0, 0, 7]);
        ip.extend_from_slice(&[0, 80, 0x1f, 0x90, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0x12]);
        let d = decode(linktype::ETHERNET, &eth(0x86dd, &ip), 0).unwrap();
        assert_eq!(d.ip_version, 6);
        assert_eq!((d.proto, d.src_port, d.dst_port), (6, 80, 8080));
        assert_eq!(d.tcp_flags, 0x12);
        assert_eq!(d.fragment.unwrap().id, 7);
        assert_eq!(d.ip_len, 64);
    }

    #[test]
    fn reasons_are_counted_names() {
        assert_eq!(
            decode(linktype::ETHERNET, &eth(0x0806, &[0; 28]), 0),
            Err(DecodeError::NotIp)
        );
        assert_eq!(
            decode(linktype::ETHERNET, &[0; 10], 0),
            Err(DecodeError::TruncatedLink)
        );
        let mut short = eth(0x0800, &ipv4_udp(0));
        short.truncate(14 + 22);
        assert_eq!(
            decode(linktype::ETHERNET, &short, 0),
            Err(DecodeError::TruncatedTransport)
        );
        assert_eq!(
            decode(999, &[0; 60], 0),
            Err(DecodeError::UnsupportedLinkType)
        );
        for (i, e) in DecodeError::ALL.iter().enumerate() {
            assert_eq!(e.index(), i);
        }
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), link in prop_oneof![Just(1u32), Just(101), Just(113), Just(276), any::<u32>()]) {
            let _ = decode(link, &bytes, bytes.len() as u32);
        }

        #[test]
        fn never_panics_on_ip_like_frames(mut bytes in proptest::collection::vec(any::<u8>(), 14..120), v6 in any::<bool>()) {
            bytes[12..14].copy_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
            if bytes.len() > 14 { bytes[14] = if v6 { 0x60 } else { 0x45 | (bytes[14] & 0x0f) }; }
            let _ = decode(1, &bytes, bytes.len() as u32);
        }
    }
}
