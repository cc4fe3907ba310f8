//! The model's two renderings agree, statement by statement: each kind's
//! `Display` text (what `--dry-run` prints and `nft -f` reads) and the
//! expressions the encoder sends for it, against the expressions `nft`
//! itself generates for that text (golden, from `nft --debug=netlink`; the
//! kernel test `native_batches_list_exactly_like_nft_f` checks the same
//! against the real `nft`).

use super::encode::encode;
use super::model::*;
use crate::tc::TcHandle;

fn exprs(stmts: Vec<Stmt>, netdev: bool) -> Vec<String> {
    let mut b = Batch::new(TableId {
        netdev,
        name: "t".into(),
    });
    b.push(Command::AddRule {
        chain: "c".into(),
        rule: Rule {
            stmts,
            comment: None,
        },
    });
    let mut buf = Vec::new();
    encode(&b, 1, &mut buf).unwrap();
    crate::nfnl::describe(&buf)
        .into_iter()
        .find(|m| !m.3.is_empty())
        .map(|m| m.3)
        .unwrap_or_default()
}

/// Every statement kind, listed here or this does not compile.
fn kind(s: &Stmt) -> &'static str {
    match s {
        Stmt::Family { .. } => "family",
        Stmt::L4proto(_) => "l4proto",
        Stmt::Addr { .. } => "addr",
        Stmt::Port { .. } => "port",
        Stmt::OifnameNot(_) => "oifname",
        Stmt::Received => "received",
        Stmt::PriorityNotZero => "priority-not-zero",
        Stmt::Skuid(_) => "skuid",
        Stmt::CtMarkSet(_) => "ct-mark-set",
        Stmt::CtMark(_) => "ct-mark",
        Stmt::Lookup(_) => "lookup",
        Stmt::LimitRef(_) => "limit",
        Stmt::LimitOver { .. } => "limit-over",
        Stmt::Counter => "counter",
        Stmt::DscpSet { .. } => "dscp",
        Stmt::PrioritySet(_) => "priority-set",
        Stmt::Accept => "accept",
        Stmt::Drop => "drop",
        Stmt::Jump(_) => "jump",
        Stmt::Fwd { .. } => "fwd",
    }
}

#[test]
fn display_and_encoder_agree_for_every_statement_kind() {
    let five = Shape {
        family: IpFamily::V4,
        fields: vec![Field::L4proto, Field::Saddr, Field::Daddr, Field::Dport],
        interval: false,
    };
    let v4 = IpFamily::V4;
    let cases: Vec<(Stmt, bool, &str, &[&str])> = vec![
        (
            Stmt::Family {
                netdev: false,
                family: v4,
            },
            false,
            "meta nfproto ipv4",
            &["meta", "cmp"],
        ),
        (
            Stmt::Family {
                netdev: true,
                family: IpFamily::V6,
            },
            true,
            "meta protocol ip6",
            &["meta", "cmp"],
        ),
        (
            Stmt::L4proto(17),
            false,
            "meta l4proto udp",
            &["meta", "cmp"],
        ),
        (
            Stmt::Addr {
                src: true,
                prefix: "10.1.0.1".parse().unwrap(),
            },
            false,
            "ip saddr 10.1.0.1",
            &["meta", "cmp", "payload", "cmp"],
        ),
        (
            Stmt::Addr {
                src: false,
                prefix: "2001:db8:8000::/33".parse().unwrap(),
            },
            false,
            "ip6 daddr 2001:db8:8000::/33",
            &["meta", "cmp", "payload", "bitwise", "cmp"],
        ),
        (
            Stmt::Port {
                proto: 6,
                src: true,
                first: 1024,
                last: 2048,
            },
            false,
            "tcp sport 1024-2048",
            &["meta", "cmp", "payload", "cmp", "cmp"],
        ),
        (
            Stmt::Port {
                proto: 17,
                src: false,
                first: 5001,
                last: 5001,
            },
            false,
            "udp dport 5001",
            &["meta", "cmp", "payload", "cmp"],
        ),
        (
            Stmt::OifnameNot("eth1".into()),
            false,
            "oifname != \"eth1\"",
            &["meta", "cmp"],
        ),
        (Stmt::Received, false, "iif != 0", &["meta", "cmp"]),
        (
            Stmt::LimitOver {
                bytes_per_sec: 375_000,
                burst_bytes: 25_000,
            },
            false,
            "limit rate over 375000 bytes/second burst 25000 bytes",
            &["limit"],
        ),
        (
            Stmt::PriorityNotZero,
            true,
            "meta priority != none",
            &["meta", "cmp"],
        ),
        (
            Stmt::Skuid(1001),
            false,
            "meta skuid 1001",
            &["meta", "cmp"],
        ),
        (
            Stmt::CtMarkSet(0x7100_03e9),
            false,
            "ct mark set 0x710003e9",
            &["immediate", "ct"],
        ),
        (
            Stmt::CtMark(0x7100_03e9),
            false,
            "ct mark 0x710003e9",
            &["ct", "cmp"],
        ),
        (
            Stmt::Lookup(five),
            false,
            "meta l4proto . ip saddr . ip daddr . th dport vmap @v4_proto_saddr_daddr_dport",
            &[
                "meta", "cmp", "meta", "payload", "payload", "payload", "lookup",
            ],
        ),
        (
            Stmt::LimitRef("l1".into()),
            false,
            "limit name \"l1\"",
            &["objref"],
        ),
        (
            Stmt::Counter,
            false,
            "counter packets 0 bytes 0",
            &["counter"],
        ),
        (
            Stmt::DscpSet {
                family: v4,
                dscp: 0,
            },
            false,
            "ip dscp set cs0",
            &["meta", "cmp", "payload", "bitwise", "payload"],
        ),
        (
            Stmt::PrioritySet(TcHandle::new(0xe500, 0x100)),
            false,
            "meta priority set e500:100",
            &["immediate", "meta"],
        ),
        (Stmt::Accept, false, "accept", &["immediate"]),
        (Stmt::Drop, false, "drop", &["immediate"]),
        (Stmt::Jump("d1".into()), false, "jump d1", &["immediate"]),
        (
            Stmt::Fwd {
                device: "qleth1".into(),
                ifindex: 7,
            },
            true,
            "fwd to \"qleth1\"",
            &["immediate", "fwd"],
        ),
    ];
    let mut seen = std::collections::BTreeSet::new();
    for (stmt, netdev, text, want) in cases {
        seen.insert(kind(&stmt));
        assert_eq!(stmt.to_string(), text);
        assert_eq!(exprs(vec![stmt], netdev), want, "{text}");
    }
    assert_eq!(seen.len(), 20, "every statement kind has a case: {seen:?}");
}

#[test]
fn commands_print_as_nft_reads_them() {
    let t = TableId {
        netdev: false,
        name: "q".into(),
    };
    let iv = Shape {
        family: IpFamily::V4,
        fields: vec![Field::L4proto, Field::Daddr],
        interval: true,
    };
    let elem = Element {
        key: vec![
            KeyPart::Protos(0, 255),
            KeyPart::Prefix("10.2.0.0/24".parse().unwrap()),
        ],
        chain: "d1".into(),
    };
    let cases = [
        (Command::AddTable, "add table inet q"),
        (
            Command::AddChain { name: "postrouting".into(), hook: Some(Hook::Postrouting) },
            "add chain inet q postrouting { type filter hook postrouting priority filter; policy accept; }",
        ),
        (Command::AddMap(iv.clone()), "add map inet q v4iv_proto_daddr { type inet_proto . ipv4_addr : verdict; flags interval; }"),
        (
            Command::AddElements { shape: iv.clone(), elements: vec![elem.clone()] },
            "add element inet q v4iv_proto_daddr { 0-255 . 10.2.0.0/24 : jump d1 }",
        ),
        (
            Command::DeleteElements { shape: iv, keys: vec![elem.key] },
            "delete element inet q v4iv_proto_daddr { 0-255 . 10.2.0.0/24 }",
        ),
        (
            Command::AddLimit(Limit { name: "l1".into(), bytes_per_sec: 125_000, burst_bytes: 3028 }),
            "add limit inet q l1 { rate over 125000 bytes/second burst 3028 bytes; }",
        ),
        (Command::DeleteLimit("l1".into()), "delete limit inet q l1"),
        (Command::FlushChain("d1".into()), "flush chain inet q d1"),
        (Command::DeleteChain("d1".into()), "delete chain inet q d1"),
        (Command::DeleteTable, "delete table inet q"),
    ];
    for (c, text) in cases {
        assert_eq!(c.text(&t), text);
        // Every command encodes (one message, or one per element chunk).
        let mut b = Batch::new(t.clone());
        b.push(c);
        let mut buf = Vec::new();
        assert_eq!(encode(&b, 1, &mut buf).unwrap(), vec![0]);
    }
    // Shapes name their maps and come back from the name.
    for name in ["v4_proto_saddr_daddr_dport", "v6_daddr", "v4iv_proto_daddr"] {
        assert_eq!(Shape::from_map_name(name).unwrap().map_name(), name);
    }
    assert!(Shape::from_map_name("v4_daddr_saddr").is_none());
    assert!(Shape::from_map_name("v5_daddr").is_none());
}

#[test]
fn keys_that_do_not_fit_their_map_are_refused() {
    let exact = Shape {
        family: IpFamily::V4,
        fields: vec![Field::Daddr],
        interval: false,
    };
    let mut b = Batch::new(TableId {
        netdev: false,
        name: "q".into(),
    });
    b.push(Command::AddElements {
        shape: exact,
        elements: vec![Element {
            key: vec![KeyPart::Addr("2001:db8::1".parse().unwrap())],
            chain: "d1".into(),
        }],
    });
    let err = encode(&b, 1, &mut Vec::new()).unwrap_err();
    assert!(
        err.to_string()
            .contains("does not fit field Daddr of map v4_daddr"),
        "{err}"
    );
    // An interval map of one field is not something the kernel has.
    let mut b = Batch::new(TableId {
        netdev: false,
        name: "q".into(),
    });
    b.push(Command::AddMap(Shape {
        family: IpFamily::V4,
        fields: vec![Field::Daddr],
        interval: true,
    }));
    assert!(encode(&b, 1, &mut Vec::new()).is_err());
}
