use super::records::RecordLayout;
use super::*;
use crate::ie::{self, DataType, IeId};
use crate::{FlowRecord, Template};
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use std::net::IpAddr;
use tokio_util::codec::{Decoder, Encoder};

/// The specification, whose golden vectors these tests check.
const PROTOCOL_MD: &str = include_str!("../../../docs/protocol.md");

fn encode(frame: &Frame) -> Vec<u8> {
    let mut buf = BytesMut::new();
    CraneCodec::default().encode(frame, &mut buf).unwrap();
    buf.to_vec()
}

fn decode_all(bytes: &[u8]) -> Result<Vec<Frame>, CraneError> {
    let mut codec = CraneCodec::default();
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(f) = codec.decode(&mut buf)? {
        out.push(f);
    }
    if buf.is_empty() {
        Ok(out)
    } else {
        Err(CraneError::Truncated {
            what: "stream",
            need: 1,
        })
    }
}

/// The bytes of the ```` ```hex golden=NAME ```` block of docs/protocol.md.
fn golden(name: &str) -> Vec<u8> {
    let marker = format!("```hex golden={name}");
    let start = PROTOCOL_MD
        .find(&marker)
        .unwrap_or_else(|| panic!("docs/protocol.md has no golden vector {name}"));
    let body = &PROTOCOL_MD[start + marker.len()..];
    let end = body.find("```").unwrap();
    body[..end]
        .lines()
        .map(|l| l.split('#').next().unwrap())
        .flat_map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .map(|h| u8::from_str_radix(&h, 16).unwrap())
        .collect()
}

fn small_template() -> WireTemplate {
    WireTemplate {
        id: 256,
        keys: vec![
            WireKey {
                ie: ie::SOURCE_IPV4_ADDRESS.id,
                data_type: DataType::Ipv4Address,
                disabled: false,
            },
            WireKey {
                ie: ie::OCTET_DELTA_COUNT.id,
                data_type: DataType::Unsigned64,
                disabled: false,
            },
            WireKey {
                ie: ie::CLASS_LABEL.id,
                data_type: DataType::String,
                disabled: false,
            },
        ],
    }
}

fn golden_frames() -> Vec<(&'static str, Frame)> {
    let tmpl = small_template();
    let mut acked = tmpl.clone();
    acked.keys[2].disabled = true;
    let record = FlowRecord {
        src_addr: "192.0.2.1".parse().unwrap(),
        bytes: 1500,
        ..FlowRecord::default()
    };
    let mut records = BytesMut::new();
    RecordLayout::new(&acked, ByteOrder::Little)
        .encode(&record, &mut records)
        .unwrap();
    let f = |message| Frame {
        session: 1,
        message,
    };
    vec![
        (
            "start",
            f(Message::Start(Start {
                max_version: 1,
                capabilities: CAP_LITTLE_ENDIAN | CAP_KEEPALIVE,
                boot_ns: 0x1122_3344_5566_7788,
                stream_id: 42,
                exporter: "m1".into(),
            })),
        ),
        (
            "start_ack",
            f(Message::StartAck(StartAck {
                version: 1,
                capabilities: CAP_LITTLE_ENDIAN | CAP_KEEPALIVE,
                boot_ns: 0x1122_3344_5566_7788,
                keepalive_s: 5,
            })),
        ),
        (
            "tmpl_data",
            f(Message::TemplateData(TemplateSet {
                config_id: 1,
                byte_order: ByteOrder::Little,
                templates: vec![tmpl],
            })),
        ),
        (
            "tmpl_data_ack",
            f(Message::TemplateDataAck(TemplateSet {
                config_id: 1,
                byte_order: ByteOrder::Little,
                templates: vec![acked],
            })),
        ),
        (
            "final_tmpl_data",
            f(Message::FinalTemplateData { config_id: 1 }),
        ),
        (
            "data",
            f(Message::Data(Data {
                template_id: 256,
                config_id: 1,
                flags: DATA_FLAG_START,
                seq: 7,
                count: 1,
                records: records.freeze(),
            })),
        ),
        (
            "data_ack",
            f(Message::DataAck(DataAck {
                seq: 7,
                config_id: 1,
            })),
        ),
        (
            "error",
            f(Message::Error(ErrorMsg {
                time_ns: 0x1122_3344_5566_7788,
                code: ErrorCode::Sequence,
                text: "gap".into(),
            })),
        ),
        ("keepalive", f(Message::Keepalive)),
        ("stop", f(Message::Stop)),
    ]
}

#[test]
fn golden_vectors_match_the_specification() {
    for (name, frame) in golden_frames() {
        let bytes = encode(&frame);
        assert_eq!(
            bytes,
            golden(name),
            "{name}: encoded {:02x?} differs from docs/protocol.md",
            bytes
        );
        let back = decode_all(&golden(name)).unwrap();
        assert_eq!(back, vec![frame], "{name} decodes back");
    }
}

#[test]
fn golden_data_record_reads_back() {
    let mut acked = small_template();
    acked.keys[2].disabled = true;
    let frames = decode_all(&golden("data")).unwrap();
    let Message::Data(d) = &frames[0].message else {
        panic!("not DATA")
    };
    let recs = RecordLayout::new(&acked, ByteOrder::Little)
        .decode(&d.records, d.count)
        .unwrap();
    assert_eq!(recs[0].src_addr, "192.0.2.1".parse::<IpAddr>().unwrap());
    assert_eq!(recs[0].bytes, 1500);
}

#[test]
fn malformed_input_is_an_error() {
    let good = golden("start");
    // Wrong version.
    let mut v = good.clone();
    v[0] = 2;
    assert!(matches!(decode_all(&v), Err(CraneError::Version(2))));
    // Unknown type.
    let mut t = good.clone();
    t[1] = 0x7f;
    assert!(matches!(decode_all(&t), Err(CraneError::UnknownType(0x7f))));
    // Length below the header.
    let mut u = good.clone();
    u[4..8].copy_from_slice(&4u32.to_be_bytes());
    assert!(matches!(decode_all(&u), Err(CraneError::Undersized { .. })));
    // Length beyond the limit.
    let mut o = good.clone();
    o[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(decode_all(&o), Err(CraneError::Oversized { .. })));
    // A body shorter than its fields: shrink the length by one and drop the
    // last byte.
    let mut s = good.clone();
    s.pop();
    let len = (s.len()) as u32;
    s[4..8].copy_from_slice(&len.to_be_bytes());
    assert!(matches!(decode_all(&s), Err(CraneError::Truncated { .. })));
    // A body longer than its fields.
    let mut l = good.clone();
    l.push(0);
    let len = l.len() as u32;
    l[4..8].copy_from_slice(&len.to_be_bytes());
    assert!(matches!(decode_all(&l), Err(CraneError::Trailing { .. })));
    // A truncated stream waits for more bytes rather than failing.
    let mut codec = CraneCodec::default();
    let mut part = BytesMut::from(&good[..good.len() - 1]);
    assert!(codec.decode(&mut part).unwrap().is_none());
}

#[test]
fn records_with_too_few_bytes_are_an_error() {
    let layout = RecordLayout::new(&small_template(), ByteOrder::Big);
    let mut buf = BytesMut::new();
    layout.encode(&FlowRecord::default(), &mut buf).unwrap();
    assert!(layout.decode(&buf[..buf.len() - 1], 1).is_err());
    assert!(layout.decode(&buf, 2).is_err());
    let mut extra = buf.to_vec();
    extra.push(0);
    assert!(layout.decode(&extra, 1).is_err());
    // A huge count with few bytes allocates nothing big and fails.
    assert!(layout.decode(&buf, u32::MAX).is_err());
}

/// Issue 11, item 1: a template without keys (or with every key disabled)
/// made the decoder build one empty record per count without consuming a
/// byte: a DATA of count 0xFFFFFFFF and no body grew until the allocation
/// failed and the collector aborted.
#[test]
fn keyless_template_with_huge_count_builds_no_records() {
    let keyless = WireTemplate {
        id: 300,
        keys: vec![],
    };
    let mut all_disabled = small_template();
    for k in &mut all_disabled.keys {
        k.disabled = true;
    }
    for t in [&keyless, &all_disabled] {
        let layout = RecordLayout::new(t, ByteOrder::Big);
        // A million records from nothing: the old decoder returned them.
        assert!(
            matches!(layout.decode(&[], 1_000_000), Err(CraneError::Count { .. })),
            "template {} decoded records from no bytes",
            t.id
        );
        assert!(layout.decode(&[], u32::MAX).is_err());
        let mut n = 0u64;
        assert!(layout.decode_each(&[], u32::MAX, |_| n += 1).is_err());
        assert_eq!(n, 0, "no record before the count is checked");
        // A peer's template like this is refused when it is announced.
        let e = RecordLayout::checked(t, ByteOrder::Big).unwrap_err();
        assert!(
            matches!(e, CraneError::NoFixedKey { template } if template == t.id),
            "{e}"
        );
    }
    // Only variable-length keys enabled: still no fixed-size key.
    let mut strings_only = small_template();
    strings_only.keys[0].disabled = true;
    strings_only.keys[1].disabled = true;
    assert!(RecordLayout::checked(&strings_only, ByteOrder::Big).is_err());
    assert!(RecordLayout::checked(&small_template(), ByteOrder::Big).is_ok());
}

/// Every count is bounded by the bytes present divided by the smallest
/// record, before anything is allocated.
#[test]
fn record_count_is_bounded_by_the_bytes_present() {
    let one_byte = WireTemplate {
        id: 301,
        keys: vec![WireKey {
            ie: ie::PROTOCOL_IDENTIFIER.id,
            data_type: DataType::Unsigned8,
            disabled: false,
        }],
    };
    let layout = RecordLayout::checked(&one_byte, ByteOrder::Big).unwrap();
    assert_eq!(layout.min_record_len(), 1);
    assert_eq!(layout.decode(&[6, 17, 1], 3).unwrap().len(), 3);
    assert!(matches!(
        layout.decode(&[6, 17, 1], 4),
        Err(CraneError::Count {
            count: 4,
            bytes: 3,
            min_len: 1
        })
    ));
    let small = RecordLayout::new(&small_template(), ByteOrder::Big);
    assert_eq!(small.min_record_len(), 4 + 8 + 2);
    assert!(small.check_count(14 * 10, 10).is_ok());
    assert!(small.check_count(14 * 10 - 1, 10).is_err());
    assert!(small.check_count(usize::MAX, u32::MAX).is_ok());
    assert!(RecordLayout::decoded_size(u32::MAX, usize::MAX) == usize::MAX);
}

/// Issue 11, item 3: an 8-byte header announcing 16 MiB made the decoder
/// reserve 16 MiB for a connection that had sent 8 bytes.
#[test]
fn header_alone_does_not_reserve_its_length() {
    let mut codec = CraneCodec::default();
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&[1, 0x20, 0, 0]);
    buf.extend_from_slice(&(DEFAULT_MAX_MESSAGE as u32).to_be_bytes());
    assert!(codec.decode(&mut buf).unwrap().is_none());
    assert!(
        buf.capacity() <= HEADER_LEN + READ_CHUNK,
        "reserved {} bytes for a header",
        buf.capacity()
    );
    // The buffer grows as the body arrives, and the message still decodes.
    let good = golden("data");
    let mut buf = BytesMut::from(&good[..HEADER_LEN]);
    assert!(codec.decode(&mut buf).unwrap().is_none());
    buf.extend_from_slice(&good[HEADER_LEN..]);
    assert!(codec.decode(&mut buf).unwrap().is_some());
}

#[test]
fn encoding_refuses_oversized_messages() {
    let mut codec = CraneCodec::with_max_message(64);
    let frame = Frame {
        session: 0,
        message: Message::Data(Data {
            template_id: 256,
            config_id: 1,
            flags: 0,
            seq: 0,
            count: 0,
            records: Bytes::from(vec![0u8; 100]),
        }),
    };
    let mut buf = BytesMut::new();
    assert!(matches!(
        codec.encode(frame, &mut buf),
        Err(CraneError::Oversized { .. })
    ));
    assert!(buf.is_empty(), "nothing half-written");
}

#[test]
fn flow_templates_have_wire_forms() {
    for t in [Template::flow_v4(256), Template::flow_v6(257)] {
        let w = WireTemplate::from_template(&t).unwrap();
        assert_eq!(w.to_template(), t);
    }
}

fn arb_addr(v6: bool) -> BoxedStrategy<IpAddr> {
    if v6 {
        any::<[u8; 16]>()
            .prop_map(|b| std::net::Ipv6Addr::from(b).to_canonical())
            .boxed()
    } else {
        any::<[u8; 4]>()
            .prop_map(|b| IpAddr::from(std::net::Ipv4Addr::from(b)))
            .boxed()
    }
}

fn arb_record(v6: bool) -> impl Strategy<Value = FlowRecord> {
    (
        (
            arb_addr(v6),
            arb_addr(v6),
            any::<u16>(),
            any::<u16>(),
            any::<u8>(),
        ),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()),
        (
            proptest::option::of(0u16..0xFFFF),
            proptest::option::of(0u8..64),
            proptest::option::of(0u16..0xFFFF),
            proptest::option::of("[a-z0-9 ]{0,12}"),
            proptest::option::of("\\PC{0,8}"),
            proptest::option::of(1u32..),
        ),
    )
        .prop_map(
            |(
                (src_addr, dst_addr, src_port, dst_port, proto),
                (packets, bytes, start_ns, end_ns),
                (vlan, dscp, tcp_flags, class, user, sampling_interval),
            )| FlowRecord {
                src_addr,
                dst_addr,
                src_port,
                dst_port,
                proto,
                packets,
                bytes,
                start_ns,
                end_ns,
                vlan,
                dscp,
                tcp_flags,
                class,
                user,
                process: None,
                sampling_interval,
            },
        )
}

fn arb_key() -> impl Strategy<Value = WireKey> {
    (
        any::<u32>(),
        any::<u16>(),
        prop::sample::select(vec![
            DataType::Unsigned8,
            DataType::Unsigned64,
            DataType::String,
            DataType::Ipv6Address,
        ]),
        any::<bool>(),
    )
        .prop_map(|(enterprise, id, data_type, disabled)| WireKey {
            ie: IeId { enterprise, id },
            data_type,
            disabled,
        })
}

fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            any::<u8>(),
            any::<u16>(),
            any::<u64>(),
            any::<u64>(),
            "\\PC{0,20}"
        )
            .prop_map(
                |(max_version, capabilities, boot_ns, stream_id, exporter)| Message::Start(Start {
                    max_version,
                    capabilities,
                    boot_ns,
                    stream_id,
                    exporter
                })
            ),
        (any::<u8>(), any::<u16>(), any::<u64>(), any::<u16>()).prop_map(
            |(version, capabilities, boot_ns, keepalive_s)| Message::StartAck(StartAck {
                version,
                capabilities,
                boot_ns,
                keepalive_s
            })
        ),
        Just(Message::Stop),
        Just(Message::StopAck),
        Just(Message::StatusReq),
        Just(Message::Keepalive),
        (
            any::<u16>(),
            any::<bool>(),
            prop::collection::vec((any::<u16>(), prop::collection::vec(arb_key(), 0..5)), 0..4),
            any::<bool>()
        )
            .prop_map(|(config_id, big, ts, ack)| {
                let set = TemplateSet {
                    config_id,
                    byte_order: if big {
                        ByteOrder::Big
                    } else {
                        ByteOrder::Little
                    },
                    templates: ts
                        .into_iter()
                        .map(|(id, keys)| WireTemplate { id, keys })
                        .collect(),
                };
                if ack {
                    Message::TemplateDataAck(set)
                } else {
                    Message::TemplateData(set)
                }
            }),
        any::<u16>().prop_map(|config_id| Message::FinalTemplateData { config_id }),
        any::<u16>().prop_map(|config_id| Message::FinalTemplateDataAck { config_id }),
        (
            any::<u16>(),
            any::<u16>(),
            any::<u8>(),
            any::<u32>(),
            any::<u32>(),
            prop::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(template_id, config_id, flags, seq, count, records)| {
                Message::Data(Data {
                    template_id,
                    config_id,
                    flags,
                    seq,
                    count,
                    records: Bytes::from(records),
                })
            }),
        (any::<u32>(), any::<u16>())
            .prop_map(|(seq, config_id)| Message::DataAck(DataAck { seq, config_id })),
        (any::<u64>(), any::<u16>(), "\\PC{0,30}").prop_map(|(time_ns, code, text)| {
            Message::Error(ErrorMsg {
                time_ns,
                code: ErrorCode::from_u16(code),
                text,
            })
        }),
        (any::<u32>(), any::<u32>(), any::<u64>()).prop_map(
            |(last_acked_seq, pending, committed_records)| Message::StatusRsp(Status {
                last_acked_seq,
                pending,
                committed_records
            })
        ),
    ]
}

proptest! {
    #[test]
    fn frames_round_trip(session in any::<u8>(), messages in prop::collection::vec(arb_message(), 1..4)) {
        let frames: Vec<Frame> = messages.into_iter().map(|message| Frame { session, message }).collect();
        let mut buf = BytesMut::new();
        for f in &frames {
            CraneCodec::default().encode(f, &mut buf).unwrap();
        }
        prop_assert_eq!(decode_all(&buf).unwrap(), frames);
    }

    #[test]
    fn records_round_trip(v6 in any::<bool>(), big in any::<bool>(), recs in prop::collection::vec(arb_record(false), 0..20)) {
        let order = if big { ByteOrder::Big } else { ByteOrder::Little };
        let t = if v6 { Template::flow_v6(257) } else { Template::flow_v4(256) };
        let layout = RecordLayout::new(&WireTemplate::from_template(&t).unwrap(), order);
        let mut buf = BytesMut::new();
        for r in &recs {
            layout.encode(r, &mut buf).unwrap();
        }
        prop_assert_eq!(layout.decode(&buf, recs.len() as u32).unwrap(), recs);
    }

    #[test]
    fn v6_records_round_trip(recs in prop::collection::vec(arb_record(true), 0..10)) {
        let layout = RecordLayout::new(&WireTemplate::from_template(&Template::flow_v6(257)).unwrap(), ByteOrder::native());
        let mut buf = BytesMut::new();
        for r in &recs {
            layout.encode(r, &mut buf).unwrap();
        }
        prop_assert_eq!(layout.decode(&buf, recs.len() as u32).unwrap(), recs);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_all(&bytes);
        let layout = RecordLayout::new(&WireTemplate::from_template(&Template::flow_v4(256)).unwrap(), ByteOrder::Big);
        let _ = layout.decode(&bytes, 3);
    }

    #[test]
    fn valid_header_with_random_body_never_panics(kind in any::<u8>(), body in prop::collection::vec(any::<u8>(), 0..128)) {
        let mut bytes = vec![1, kind, 0, 0];
        bytes.extend_from_slice(&((body.len() + 8) as u32).to_be_bytes());
        bytes.extend_from_slice(&body);
        let _ = decode_all(&bytes);
    }
}
