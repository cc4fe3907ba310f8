#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use proptest::prelude::*;
use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn v4_record() -> FlowRecord {
    FlowRecord {
        src_addr: Ipv4Addr::new(10, 0, 0, 1).into(),
        dst_addr: Ipv4Addr::new(10, 0, 0, 2).into(),
        src_port: 40000,
        dst_port: 80,
        proto: 6,
        packets: 3,
        bytes: 180,
        start_ns: 1_700_000_000_123_456_789,
        end_ns: 1_700_000_001_987_654_321,
        dscp: Some(46),
        tcp_flags: Some(0x1b),
        class: Some("web".into()),
        ..FlowRecord::default()
    }
}

/// A test-side reading of messages: templates by id, then each data
/// record back into a `FlowRecord` (ms precision), checking every length.
#[derive(Default)]
struct Reader {
    templates: HashMap<u16, Vec<(u16, u32, u16)>>,
}

impl Reader {
    fn read(&mut self, msg: &[u8]) -> (u32, u32, Vec<FlowRecord>) {
        assert_eq!(be16(msg, 0), 10);
        assert_eq!(usize::from(be16(msg, 2)), msg.len());
        let mut at = HEADER_LEN;
        let mut out = Vec::new();
        while at < msg.len() {
            let id = be16(msg, at);
            let len = usize::from(be16(msg, at + 2));
            assert!(len >= 4 && at + len <= msg.len(), "set length {len}");
            let body = &msg[at + 4..at + len];
            if id == TEMPLATE_SET_ID {
                let mut p = 0;
                while p + 4 <= body.len() {
                    let tid = be16(body, p);
                    let n = be16(body, p + 2);
                    p += 4;
                    let mut fields = Vec::new();
                    for _ in 0..n {
                        let raw = be16(body, p);
                        let flen = be16(body, p + 2);
                        p += 4;
                        let ent = if raw & 0x8000 != 0 {
                            p += 4;
                            be32(body, p - 4)
                        } else {
                            0
                        };
                        fields.push((raw & 0x7fff, ent, flen));
                    }
                    self.templates.insert(tid, fields);
                }
                assert_eq!(p, body.len(), "template set has no padding");
            } else {
                let fields = self
                    .templates
                    .get(&id)
                    .expect("template before data")
                    .clone();
                let mut p = 0;
                // Padding is shorter than any record.
                while body.len() - p >= 40 {
                    let mut r = FlowRecord::default();
                    for &(ie, ent, flen) in &fields {
                        let flen = if flen == VARLEN {
                            let l = body[p];
                            p += 1;
                            if l == 255 {
                                p += 2;
                                usize::from(be16(body, p - 2))
                            } else {
                                usize::from(l)
                            }
                        } else {
                            usize::from(flen)
                        };
                        let v = &body[p..p + flen];
                        p += flen;
                        let s = || {
                            Some(String::from_utf8(v.to_vec()).unwrap()).filter(|s| !s.is_empty())
                        };
                        match (ent, ie) {
                            (0, 8) => r.src_addr = Ipv4Addr::from(be32(v, 0)).into(),
                            (0, 12) => r.dst_addr = Ipv4Addr::from(be32(v, 0)).into(),
                            (0, 27) => {
                                r.src_addr = Ipv6Addr::from(<[u8; 16]>::try_from(v).unwrap()).into()
                            }
                            (0, 28) => {
                                r.dst_addr = Ipv6Addr::from(<[u8; 16]>::try_from(v).unwrap()).into()
                            }
                            (0, 7) => r.src_port = be16(v, 0),
                            (0, 11) | (0, 32) | (0, 139) => r.dst_port = be16(v, 0),
                            (0, 4) => r.proto = v[0],
                            (0, 195) => r.dscp = Some(v[0]),
                            (0, 2) => r.packets = be64(v, 0),
                            (0, 1) => r.bytes = be64(v, 0),
                            (0, 152) => r.start_ns = be64(v, 0) * 1_000_000,
                            (0, 153) => r.end_ns = be64(v, 0) * 1_000_000,
                            (0, 58) => r.vlan = Some(be16(v, 0)),
                            (0, 6) => r.tcp_flags = Some(be16(v, 0)),
                            (0, 305) => assert_eq!(be32(v, 0), 1),
                            (0, 306) => r.sampling_interval = Some(be32(v, 0) + 1),
                            (32473, 3) => r.class = s(),
                            (0, 371) => r.user = s(),
                            (32473, 2) => r.process = s(),
                            other => panic!("unexpected field {other:?}"),
                        }
                    }
                    out.push(r);
                }
                assert!(body[p..].iter().all(|&b| b == 0), "padding is zeros");
            }
            at += len;
        }
        (be32(msg, 4), be32(msg, 8), out)
    }
}

fn ms(r: &FlowRecord) -> FlowRecord {
    FlowRecord {
        start_ns: r.start_ns / 1_000_000 * 1_000_000,
        end_ns: r.end_ns / 1_000_000 * 1_000_000,
        dscp: Some(r.dscp.unwrap_or(0)),
        ..r.clone()
    }
}

#[test]
fn one_record_message_is_byte_exact() {
    let mut enc = Encoder::new(7, 1392, false).unwrap();
    assert!(enc.push(&v4_record(), 1_700_000_002).is_none());
    let msg = enc.finish(1_700_000_002).unwrap();
    // Header.
    assert_eq!(&msg[0..2], &[0, 10]);
    assert_eq!(usize::from(be16(&msg, 2)), msg.len());
    assert_eq!(be32(&msg, 4), 1_700_000_002);
    assert_eq!(be32(&msg, 8), 0, "no record before the first message");
    assert_eq!(be32(&msg, 12), 7);
    // Template set: id 2, template 256+TCP_FLAGS, 14 fields, 2 of them enterprise.
    assert_eq!(be16(&msg, 16), 2);
    let tlen = usize::from(be16(&msg, 18));
    assert_eq!(tlen, 4 + 4 + 14 * 4 + 2 * 4);
    assert_eq!(be16(&msg, 20), 256 + u16::from(Shape::TCP_FLAGS));
    assert_eq!(be16(&msg, 22), 14);
    let fields: Vec<u8> = msg[24..16 + tlen].to_vec();
    #[rustfmt::skip]
    let want: Vec<u8> = [
        &[0, 8, 0, 4][..], &[0, 12, 0, 4], &[0, 7, 0, 2], &[0, 11, 0, 2], &[0, 4, 0, 1],
        &[0, 195, 0, 1], &[0, 2, 0, 8], &[0, 1, 0, 8], &[0, 152, 0, 8], &[0, 153, 0, 8],
        &[0, 6, 0, 2],
        &[0x80, 3, 0xff, 0xff, 0, 0, 0x7e, 0xd9],
        &[1, 0x73, 0xff, 0xff],
        &[0x80, 2, 0xff, 0xff, 0, 0, 0x7e, 0xd9],
    ]
    .concat();
    assert_eq!(fields, want);
    // Data set.
    let d = 16 + tlen;
    assert_eq!(be16(&msg, d), 256 + u16::from(Shape::TCP_FLAGS));
    #[rustfmt::skip]
    let record: Vec<u8> = [
        &[10, 0, 0, 1][..], &[10, 0, 0, 2], &40000u16.to_be_bytes(), &80u16.to_be_bytes(), &[6], &[46],
        &3u64.to_be_bytes(), &180u64.to_be_bytes(),
        &1_700_000_000_123u64.to_be_bytes(), &1_700_000_001_987u64.to_be_bytes(),
        &0x1bu16.to_be_bytes(),
        &[3], b"web", &[0], &[0],
    ]
    .concat();
    assert_eq!(
        usize::from(be16(&msg, d + 2)),
        4 + record.len(),
        "no padding by default"
    );
    assert_eq!(&msg[d + 4..], &record[..]);
}

#[test]
fn sets_are_padded_to_four_bytes_when_asked() {
    let mut enc = Encoder::new(1, 1392, true).unwrap();
    enc.push(&v4_record(), 0);
    let msg = enc.finish(0).unwrap();
    let tlen = usize::from(be16(&msg, 18));
    let dlen = usize::from(be16(&msg, 16 + tlen + 2));
    assert_eq!(dlen % 4, 0);
    // The record is 4+4+2+2+1+1+8*4+2+(1+3)+1+1 = 55 bytes: one zero byte.
    assert_eq!(dlen, 4 + 55 + 1);
    assert_eq!(msg[msg.len() - 1], 0);
    assert_eq!(Reader::default().read(&msg).2, vec![ms(&v4_record())]);
}

#[test]
fn varlen_uses_three_bytes_from_255() {
    let mut out = Vec::new();
    put_varlen(&mut out, &[b'a'; 254]);
    assert_eq!(out[0], 254);
    assert_eq!(out.len(), 255);
    out.clear();
    put_varlen(&mut out, &[b'a'; 255]);
    assert_eq!(&out[..3], &[255, 0, 255]);
    assert_eq!(out.len(), 258);
    out.clear();
    put_varlen(&mut out, b"");
    assert_eq!(out, [0]);
}

#[test]
fn icmp_goes_as_type_code_and_ipv6_as_its_own_template() {
    let rec = FlowRecord {
        src_addr: "2001:db8::1".parse().unwrap(),
        dst_addr: "2001:db8::2".parse().unwrap(),
        proto: 58,
        dst_port: 128 * 256,
        vlan: Some(42),
        ..FlowRecord::default()
    };
    let shape = Shape::of(&rec);
    assert_eq!(
        shape,
        Shape::from_bits(Shape::V6 | Shape::VLAN | Shape::ICMP)
    );
    let ids: Vec<u16> = shape.fields().iter().map(|f| f.ie.id.id).collect();
    assert!(ids.contains(&139) && !ids.contains(&11) && ids.contains(&58));
    let mut enc = Encoder::new(1, 600, false).unwrap();
    enc.push(&rec, 5);
    let msg = enc.finish(5).unwrap();
    assert_eq!(Reader::default().read(&msg).2, vec![ms(&rec)]);
}

#[test]
fn message_lengths_are_checked() {
    assert_eq!(
        Encoder::new(0, 511, false).unwrap_err(),
        IpfixError::MessageLen(511)
    );
    assert!(Encoder::new(0, 65536, false).is_err());
    assert!(Encoder::new(0, 65535, false).is_ok());
}

#[test]
fn templates_are_resent_after_forget_and_announce_used() {
    let mut enc = Encoder::new(1, 1392, false).unwrap();
    enc.push(&v4_record(), 0);
    let first = enc.finish(0).unwrap();
    enc.push(&v4_record(), 0);
    let second = enc.finish(0).unwrap();
    assert_eq!(
        be16(&second, 16),
        256 + u16::from(Shape::TCP_FLAGS),
        "no template"
    );
    assert!(second.len() < first.len());
    enc.forget_templates();
    assert!(enc.announce_used(0).is_empty());
    let third = enc.finish(0).unwrap();
    assert_eq!(be16(&third, 16), TEMPLATE_SET_ID);
    assert_eq!(be32(&third, 8), 2, "two records before the third message");
}

fn arb_record() -> impl Strategy<Value = FlowRecord> {
    let addr = prop_oneof![
        any::<u32>().prop_map(|a| (
            IpAddr::from(Ipv4Addr::from(a)),
            IpAddr::from(Ipv4Addr::from(a ^ 0x5555))
        )),
        any::<u128>().prop_map(|a| (
            IpAddr::from(Ipv6Addr::from(a)),
            IpAddr::from(Ipv6Addr::from(!a))
        )),
    ];
    let s = proptest::option::of("[a-zé€]{0,300}");
    (
        addr,
        any::<(u16, u16, u8, u64, u64)>(),
        (0u64..1 << 62, 0u64..1 << 40),
        proptest::option::of(0u16..4096),
        proptest::option::of(0u8..64),
        proptest::option::of(any::<u16>()),
        (s.clone(), s.clone(), s),
        proptest::option::of(1u32..100_000),
    )
        .prop_map(
            |(
                (src, dst),
                (sp, dp, proto, packets, bytes),
                (start, dur),
                vlan,
                dscp,
                tcp_flags,
                (class, user, process),
                sampling,
            )| FlowRecord {
                src_addr: src,
                dst_addr: dst,
                src_port: sp,
                dst_port: dp,
                proto,
                packets,
                bytes,
                start_ns: start,
                end_ns: start + dur,
                vlan,
                dscp,
                tcp_flags,
                class: class.filter(|s| !s.is_empty()),
                user: user.filter(|s| !s.is_empty()),
                process: process.filter(|s| !s.is_empty()),
                sampling_interval: sampling,
            },
        )
}

proptest! {
    #[test]
    fn every_record_comes_back_in_bounded_messages_with_counted_sequence(
        recs in proptest::collection::vec(arb_record(), 1..120),
        max_len in 512usize..3000,
        pad in any::<bool>(),
        refresh_every in 1usize..50,
    ) {
        let mut enc = Encoder::new(99, max_len, pad).unwrap();
        let cap = enc.string_cap();
        let mut msgs = Vec::new();
        for (i, r) in recs.iter().enumerate() {
            if i % refresh_every == 0 {
                enc.forget_templates();
                msgs.extend(enc.announce_used(1));
            }
            msgs.extend(enc.push(r, 1));
        }
        msgs.extend(enc.finish(1));
        let mut reader = Reader::default();
        let mut back = Vec::new();
        let mut counted = 0u32;
        for m in &msgs {
            prop_assert!(m.len() <= max_len);
            prop_assert_eq!(be32(m, 12), 99);
            let (_, seq, recs) = reader.read(m);
            prop_assert_eq!(seq, counted);
            counted += recs.len() as u32;
            back.extend(recs);
        }
        let want: Vec<FlowRecord> = recs.iter().map(|r| {
            let mut r = ms(r);
            for s in [&mut r.class, &mut r.user, &mut r.process] {
                *s = s.take().map(|v| cut(&v, cap).to_owned());
            }
            if r.src_addr.is_ipv6() != r.dst_addr.is_ipv6() { unreachable!() }
            r
        }).collect();
        prop_assert_eq!(back, want);
    }
}
