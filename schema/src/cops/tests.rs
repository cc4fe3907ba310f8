use super::*;
use crate::policy::*;
use crate::units::{Dscp, Kbps};
use bytes::BytesMut;
use proptest::prelude::*;

fn encode(m: &Message) -> Vec<u8> {
    let mut buf = BytesMut::new();
    CopsCodec::default().encode(m, &mut buf).unwrap();
    buf.to_vec()
}

fn decode_all(bytes: &[u8]) -> Result<Vec<Message>, CopsError> {
    let mut codec = CopsCodec::default();
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(m) = codec.decode(&mut buf)? {
        out.push(m);
    }
    Ok(out)
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Each golden vector: the message, and its bytes as docs/decisions.md shows them.
fn golden() -> Vec<(&'static str, Message, Vec<u8>)> {
    vec![
        ("KA", Message::ka(), hex("10 09 0000 00000008")),
        (
            "OPN",
            Message::new(Body::Opn {
                pep_id: "pep1".into(),
                client_si: None,
                last_pdp: None,
            }),
            hex("10 06 8071 00000014  0009 0b 01 70657031 00 000000"),
        ),
        (
            "CAT",
            Message::cat(30),
            hex("10 07 8071 00000010  0008 0a 01 0000 001e"),
        ),
        (
            "CC unsupported client type",
            Message::cc(ErrorCode::UnsupportedClientType),
            hex("10 08 8071 00000010  0008 08 01 0006 0000"),
        ),
        ("SSQ", Message::ssq(), hex("10 05 8071 00000008")),
        ("SSC", Message::ssc(), hex("10 0a 8071 00000008")),
        (
            "DEC remove (solicited)",
            Message::dec(
                Handle::from_u32(1),
                vec![DecisionEntry::remove(DecisionRef { id: 7, version: 2 })],
            )
            .solicited(),
            {
                let mut v = hex(
                    "11 02 8071 00000038  0008 01 01 00000001  0008 02 01 0008 0000  \
                     0008 06 01 0002 0000  0018 06 04",
                );
                v.extend_from_slice(br#"{"id":7,"version":2}"#);
                v
            },
        ),
        (
            "RPT success",
            Message::new(Body::Rpt {
                handle: Handle::from_u32(1),
                report_type: ReportType::Success,
                client_si: None,
            }),
            hex("10 03 8071 00000018  0008 01 01 00000001  0008 0c 01 0001 0000"),
        ),
    ]
}

#[test]
fn golden_vectors_encode_and_decode() {
    for (name, msg, bytes) in golden() {
        assert_eq!(encode(&msg), bytes, "{name} encodes to its golden bytes");
        assert_eq!(decode_all(&bytes).unwrap(), vec![msg], "{name} decodes");
    }
}

fn paper_decision() -> Decision {
    Decision {
        id: 42,
        version: 3,
        role: "edge".into(),
        policy_dn: "cn=policed,ou=rules,dc=qosloop,dc=test".into(),
        flow: FlowSpec {
            src: Some("172.20.1.2".parse().unwrap()),
            dst: Some("172.20.3.2".parse().unwrap()),
            proto: Some(17),
            src_ports: None,
            dst_ports: Some("4055".parse().unwrap()),
            user: None,
        },
        profile: TrafficProfile {
            rate: Kbps(1000),
            burst_bytes: 15_000,
        },
        in_profile_dscp: Some(Dscp::CS6),
        out_of_profile: OutOfProfileAction::Remark {
            dscp: Dscp::BEST_EFFORT,
            shape: Some(Kbps(125)),
        },
        reason: DecisionReason {
            rate_kbps: 1500.0,
            avg_rate_kbps: 1400.5,
            link: "edge-ingress".into(),
            link_load_kbps: 4500.25,
            band: "medium".into(),
        },
        issued_ns: 1_700_000_000_000_000_000,
    }
}

#[test]
fn qosloop_payloads_round_trip() {
    let d = paper_decision();
    let m = Message::dec_install(Handle::from_u32(9), [&d]);
    let back = decode_all(&encode(&m)).unwrap().remove(0);
    let Body::Dec {
        outcome: DecOutcome::Decisions(entries),
        ..
    } = &back.body
    else {
        panic!("not a DEC with decisions: {back:?}");
    };
    assert_eq!(
        entries[0].qosloop().unwrap(),
        payload::QosloopDecision::Install(Box::new(d))
    );

    let hello = PepHello {
        roles: vec!["edge".into(), "core".into()],
        interface: Some("veth0".into()),
        direction: None,
        software: "qosloop-enforcer 0.1.0".into(),
    };
    let back = decode_all(&encode(&Message::opn("pep-a", &hello)))
        .unwrap()
        .remove(0);
    let Body::Opn {
        pep_id,
        client_si: Some(si),
        ..
    } = &back.body
    else {
        panic!("not an OPN: {back:?}");
    };
    assert_eq!(pep_id, "pep-a");
    assert_eq!(PepHello::from_client_si(si).unwrap(), hello);

    let report = EnforcementReport {
        decision_id: 42,
        version: 3,
        outcome: ReportOutcome::Failed {
            reason: "no HTB".into(),
        },
        reconfig_ns: 6000,
        at_ns: 1,
    };
    let m = Message::rpt(Handle::from_u32(9), &report);
    assert!(matches!(
        m.body,
        Body::Rpt {
            report_type: ReportType::Failure,
            ..
        }
    ));
    let back = decode_all(&encode(&m)).unwrap().remove(0);
    assert_eq!(back.report().unwrap(), Some(report));
    assert_eq!(back.accounting().unwrap(), None);

    // The kernel counters: an accounting RPT, bounded in decisions.
    let counters = |n: usize| crate::AccountingReport {
        at_ns: 7,
        decisions: (0..n as u64)
            .map(|id| crate::DecisionCounters {
                decision_id: id,
                version: 1,
                kind: crate::DecisionKind::Remark,
                in_profile_packets: 10,
                in_profile_bytes: 1000,
                out_of_profile_packets: 2,
                out_of_profile_bytes: u64::MAX,
            })
            .collect(),
        omitted: 3,
        classes: vec![crate::ClassCounters {
            classid: "1:a".into(),
            parent: "1:1".into(),
            bytes: 1 << 40,
            packets: 5,
            drops: 1,
            overlimits: 2,
            backlog_bytes: 0,
        }],
        classes_omitted: 0,
    };
    let m = Message::rpt_accounting(Handle::from_u32(9), &counters(2));
    let back = decode_all(&encode(&m)).unwrap().remove(0);
    assert!(matches!(
        back.body,
        Body::Rpt {
            report_type: ReportType::Accounting,
            ..
        }
    ));
    assert_eq!(back.report().unwrap(), None, "not an enforcement report");
    assert_eq!(back.accounting().unwrap(), Some(counters(2)));
    let over = Message::rpt_accounting(
        Handle::from_u32(9),
        &counters(crate::MAX_ACCOUNTED_DECISIONS + 1),
    );
    let mut many = counters(1);
    many.classes = vec![many.classes[0].clone(); crate::MAX_ACCOUNTED_CLASSES + 1];
    let e = Message::rpt_accounting(Handle::from_u32(9), &many)
        .accounting()
        .unwrap_err()
        .to_string();
    assert!(e.contains("HTB classes"), "{e}");
    // A report with no classes reads as before (the fields are optional).
    let mut none = counters(1);
    none.classes.clear();
    let m = Message::rpt_accounting(Handle::from_u32(9), &none);
    assert_eq!(m.accounting().unwrap(), Some(none.clone()));
    // ... and is written as before: what a PDP older than the classes
    // reads (the enforcer's --no-class-accounting sends this).
    let json = serde_json::to_string(&none).unwrap();
    assert!(!json.contains("classes"), "{json}");
    let e = over.accounting().unwrap_err().to_string();
    assert!(e.contains("more than 1024"), "{e}");

    assert_eq!(
        DecisionEntry::null().qosloop().unwrap(),
        payload::QosloopDecision::Nothing
    );
    let mut garbage = DecisionEntry::remove(DecisionRef { id: 1, version: 1 });
    garbage.data[0].bytes = b"{not json".to_vec();
    let e = garbage.qosloop().unwrap_err();
    assert!(e.to_string().contains("DEC remove data"), "{e}");
}

#[test]
fn an_empty_dec_becomes_a_null_decision() {
    let m = Message::dec(Handle::from_u32(1), vec![]);
    let back = decode_all(&encode(&m)).unwrap().remove(0);
    assert_eq!(back, m);
}

#[test]
fn bad_input_is_a_clear_error() {
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("version 2", hex("20 09 0000 00000008"), "version 2"),
        ("short length", hex("10 09 0000 00000004"), "length 4"),
        (
            "unaligned length",
            hex("10 09 0000 0000000a 0000"),
            "length 10",
        ),
        ("op code 11", hex("10 0b 0000 00000008"), "op code 11"),
        (
            "object length 2",
            hex("10 05 8071 0000000c 0002 01 01"),
            "below 4",
        ),
        (
            "object past the end",
            hex("10 05 8071 0000000c 0010 01 01"),
            "past the end",
        ),
        (
            "integrity object",
            hex("10 09 0000 00000010 0008 10 01 00000000"),
            "C-Num 16",
        ),
        ("OPN without PEPID", hex("10 06 8071 00000008"), "PEPID"),
        (
            "DEC without decisions",
            hex("10 02 8071 00000010 0008 01 01 00000001"),
            "Decision or Error",
        ),
        (
            "KA with a handle",
            hex("10 09 0000 00000010 0008 01 01 00000001"),
            "unexpected Handle",
        ),
        (
            "context of 2 bytes",
            hex("10 01 8071 00000018 0008 01 01 00000001 0006 02 01 0008 0000"),
            "wrong length",
        ),
    ];
    for (name, bytes, needle) in cases {
        let e = decode_all(&bytes).expect_err(name);
        assert!(e.to_string().contains(needle), "{name}: {e}");
    }
}

#[test]
fn size_limit_holds_both_ways() {
    let mut codec = CopsCodec::new(64);
    let big = Message::new(Body::Ssq {
        handle: Some(Handle(vec![7; 100])),
    });
    let mut buf = BytesMut::new();
    let e = codec.encode(&big, &mut buf).unwrap_err();
    assert!(matches!(e, CopsError::TooLong { max: 64, .. }), "{e}");
    assert!(buf.is_empty(), "nothing written on failure");
    // A header announcing 1 GiB is refused before the bytes arrive.
    let mut buf = BytesMut::from(&hex("10 05 8071 40000000")[..]);
    let e = codec.decode(&mut buf).unwrap_err();
    assert!(e.to_string().contains("exceeds the limit of 64"), "{e}");
    assert_eq!(e.cops_error_code(), ErrorCode::BadMessageFormat);
}

#[test]
fn partial_input_waits_for_more() {
    let bytes = golden()
        .into_iter()
        .flat_map(|(_, _, b)| b)
        .collect::<Vec<_>>();
    let mut codec = CopsCodec::default();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for b in bytes {
        buf.extend_from_slice(&[b]);
        while let Some(m) = codec.decode(&mut buf).unwrap() {
            got.push(m);
        }
    }
    let want: Vec<Message> = golden().into_iter().map(|(_, m, _)| m).collect();
    assert_eq!(got, want);
}

fn arb_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u8; 16]>().prop_map(IpAddr::from),
    ]
}

fn arb_bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..40)
}

fn arb_handle() -> impl Strategy<Value = Handle> {
    arb_bytes().prop_map(Handle)
}

fn arb_context() -> impl Strategy<Value = Context> {
    (any::<u16>(), any::<u16>()).prop_map(|(r_type, m_type)| Context { r_type, m_type })
}

fn arb_client_si() -> impl Strategy<Value = ClientSi> {
    (any::<bool>(), arb_bytes()).prop_map(|(named, data)| ClientSi { named, data })
}

fn arb_pdp() -> impl Strategy<Value = PdpAddr> {
    (arb_ip(), any::<u16>()).prop_map(|(addr, port)| PdpAddr { addr, port })
}

fn arb_error() -> impl Strategy<Value = ErrorObject> {
    (any::<u16>(), any::<u16>()).prop_map(|(code, sub_code)| ErrorObject { code, sub_code })
}

fn arb_entry() -> impl Strategy<Value = DecisionEntry> {
    (
        arb_context(),
        any::<u16>(),
        any::<bool>(),
        proptest::collection::vec((2u8..=5, arb_bytes()), 0..3),
    )
        .prop_map(|(context, cmd, trigger_error, data)| DecisionEntry {
            context,
            command: Command::from_code(cmd),
            trigger_error,
            data: data
                .into_iter()
                .map(|(c_type, bytes)| DecisionData { c_type, bytes })
                .collect(),
        })
}

fn arb_body() -> impl Strategy<Value = Body> {
    let iface = || (arb_ip(), any::<u32>()).prop_map(|(addr, ifindex)| Interface { addr, ifindex });
    prop_oneof![
        (
            arb_handle(),
            arb_context(),
            proptest::option::of(iface()),
            proptest::option::of(iface()),
            proptest::collection::vec(arb_client_si(), 0..3)
        )
            .prop_map(|(handle, context, i, o, client_si)| Body::Req {
                handle,
                context,
                in_interface: i,
                out_interface: o,
                client_si
            }),
        (
            arb_handle(),
            prop_oneof![
                arb_error().prop_map(DecOutcome::Error),
                proptest::collection::vec(arb_entry(), 1..4).prop_map(DecOutcome::Decisions)
            ]
        )
            .prop_map(|(handle, outcome)| Body::Dec { handle, outcome }),
        (
            arb_handle(),
            any::<u16>(),
            proptest::option::of(arb_client_si())
        )
            .prop_map(|(handle, r, client_si)| Body::Rpt {
                handle,
                report_type: ReportType::from_code(r),
                client_si
            }),
        (arb_handle(), any::<u16>(), any::<u16>()).prop_map(|(handle, code, sub_code)| {
            Body::Drq {
                handle,
                reason: Reason { code, sub_code },
            }
        }),
        proptest::option::of(arb_handle()).prop_map(|handle| Body::Ssq { handle }),
        proptest::option::of(arb_handle()).prop_map(|handle| Body::Ssc { handle }),
        (
            "[ -~]{0,20}",
            proptest::option::of(arb_client_si()),
            proptest::option::of(arb_pdp())
        )
            .prop_map(|(pep_id, client_si, last_pdp)| Body::Opn {
                pep_id,
                client_si,
                last_pdp
            }),
        (any::<u16>(), proptest::option::of(any::<u16>())).prop_map(|(k, a)| Body::Cat {
            ka_timer_secs: k,
            acct_timer_secs: a
        }),
        (arb_error(), proptest::option::of(arb_pdp()))
            .prop_map(|(error, redirect)| Body::Cc { error, redirect }),
        Just(Body::Ka),
    ]
}

fn arb_message() -> impl Strategy<Value = Message> {
    (any::<u16>(), any::<bool>(), arb_body()).prop_map(|(client_type, solicited, body)| Message {
        client_type,
        solicited,
        body,
    })
}

proptest! {
    #[test]
    fn every_message_round_trips(msgs in proptest::collection::vec(arb_message(), 1..4)) {
        let mut codec = CopsCodec::default();
        let mut buf = BytesMut::new();
        for m in &msgs {
            codec.encode(m, &mut buf).unwrap();
        }
        prop_assert_eq!(buf.len() % 4, 0);
        prop_assert_eq!(decode_all(&buf).unwrap(), msgs);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode_all(&bytes);
    }

    #[test]
    fn mutated_messages_never_panic(m in arb_message(), at in any::<usize>(), v in any::<u8>()) {
        let mut bytes = encode(&m);
        let i = at % bytes.len();
        bytes[i] = v;
        let _ = decode_all(&bytes);
    }
}

#[test]
fn a_header_announcing_the_maximum_does_not_reserve_it() {
    // Issue 11 item 3/4 on the PDP port: an 8-byte header announcing 1 MiB
    // made the PDP reserve 1 MiB per connection before any body byte came.
    let mut codec = CopsCodec::default();
    let mut buf = BytesMut::new();
    let len = (DEFAULT_MAX_MESSAGE as u32).to_be_bytes();
    buf.extend_from_slice(&[0x10, 0x03, 0x80, 0x71, len[0], len[1], len[2], len[3]]);
    assert!(codec.decode(&mut buf).unwrap().is_none());
    assert!(
        buf.capacity() <= 64 * 1024,
        "reserved {} bytes for a header alone",
        buf.capacity()
    );
}

#[test]
fn the_limit_can_be_changed_between_messages() {
    let mut codec = CopsCodec::new(64);
    let big = encode(&Message::opn(&"p".repeat(100), &PepHello::default()));
    let mut buf = BytesMut::from(&big[..]);
    assert!(matches!(
        codec.decode(&mut buf),
        Err(CopsError::TooLong { .. })
    ));
    codec.set_max_message(DEFAULT_MAX_MESSAGE);
    let mut buf = BytesMut::from(&big[..]);
    assert!(codec.decode(&mut buf).unwrap().is_some());
}
