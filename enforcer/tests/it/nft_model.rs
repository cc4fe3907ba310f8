//! The typed nftables model against the real kernel: its netlink encoder
//! and its `nft -f` text produce the same table, in a namespace the test
//! creates (the decisions' behaviour under traffic is in `kernel.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_testkit::harness::{require_binary, require_root, Netns};

fn prerequisites() -> Option<()> {
    qosloop_testkit::harness::prerequisite(require_root("programs nftables in a namespace"))?;
    qosloop_testkit::harness::prerequisite(require_binary("nft", "nftables"))?;
    Some(())
}

/// The typed model's two renderings agree: a batch holding every statement
/// kind the enforcer writes (base chain with guard, verdict maps of one and
/// several fields with elements, a named limit object and its reference,
/// IPv4/IPv6 prefixes on and off byte boundaries, port ranges, the three
/// actions, DSCP marking of both families, priority steering, comments,
/// per-user statements: `meta skuid`, `ct mark set`, `ct mark` in an
/// input-hook chain, a family test before a limit) is
/// applied once through the netlink encoder and once as its `Display` text
/// through `nft -f`; `nft list` shows the same table for both, and that
/// listing is exactly the model's `Listing` text. Then change forms (flush
/// and refill, element delete, limit replace), a refused batch (nothing
/// changes, the command is named), and the ingress forms.
#[test]
fn native_batches_list_exactly_like_nft_f() {
    use qosloop_enforcer::nft::model::*;
    use qosloop_enforcer::tc::TcHandle;
    let Some(()) = prerequisites() else { return };
    let ns = Netns::create("enl").unwrap();
    ns.ip(&[
        "link", "add", "name", "nla", "type", "veth", "peer", "name", "nlb",
    ])
    .unwrap();
    let five = Shape {
        family: IpFamily::V4,
        fields: vec![Field::L4proto, Field::Saddr, Field::Daddr, Field::Dport],
        interval: false,
    };
    let v6 = Shape {
        family: IpFamily::V6,
        fields: vec![Field::Daddr],
        interval: false,
    };
    let proto = Shape {
        family: IpFamily::V4,
        fields: vec![Field::L4proto, Field::Sport],
        interval: false,
    };
    let ranges = Shape {
        family: IpFamily::V4,
        fields: vec![Field::L4proto, Field::Saddr, Field::Daddr, Field::Dport],
        interval: true,
    };
    let e_iv = Element {
        key: vec![
            KeyPart::Protos(17, 17),
            KeyPart::Prefix("10.1.0.1".parse().unwrap()),
            KeyPart::Prefix("10.4.0.0/24".parse().unwrap()),
            KeyPart::Ports(5001, 5010),
        ],
        chain: "d42".into(),
    };
    let e_iv2 = Element {
        key: vec![
            KeyPart::Protos(6, 6),
            KeyPart::Prefix("10.5.0.0/16".parse().unwrap()),
            KeyPart::Prefix("10.6.0.1".parse().unwrap()),
            KeyPart::Ports(80, 80),
        ],
        chain: "d43".into(),
    };
    let rule = |stmts: Vec<Stmt>, comment: Option<&str>| Rule {
        stmts,
        comment: comment.map(str::to_owned),
    };
    let limit = Limit {
        name: "l42".into(),
        bytes_per_sec: 125_000,
        burst_bytes: 15_000,
    };
    let l43 = Limit {
        name: "l43".into(),
        bytes_per_sec: 109_375,
        burst_bytes: 0,
    };
    let d42 = vec![
        rule(
            vec![
                Stmt::LimitRef("l42".into()),
                Stmt::Counter,
                Stmt::DscpSet {
                    family: IpFamily::V4,
                    dscp: 0,
                },
                Stmt::PrioritySet(TcHandle::new(0xe5, 0x107)),
                Stmt::Accept,
            ],
            Some("out"),
        ),
        rule(
            vec![
                Stmt::Counter,
                Stmt::DscpSet {
                    family: IpFamily::V4,
                    dscp: 48,
                },
                Stmt::PrioritySet(TcHandle::new(0xe5, 0x106)),
                Stmt::Accept,
            ],
            Some("in id=42 v=1"),
        ),
    ];
    let d43 = vec![
        // A shaping per-user decision polices what its user receives.
        rule(
            vec![
                Stmt::Received,
                Stmt::LimitOver {
                    bytes_per_sec: 375_000,
                    burst_bytes: 25_000,
                },
                Stmt::Counter,
                Stmt::Drop,
            ],
            Some("replies"),
        ),
        // A per-user decision's IPv6 and IPv4 out rules, each family
        // tested before the limit.
        rule(
            vec![
                Stmt::Family {
                    netdev: false,
                    family: IpFamily::V6,
                },
                Stmt::LimitRef("l43".into()),
                Stmt::Counter,
                Stmt::DscpSet {
                    family: IpFamily::V6,
                    dscp: 0,
                },
                Stmt::PrioritySet(TcHandle::new(0xe5, 0x108)),
                Stmt::Accept,
            ],
            Some("out6"),
        ),
        rule(
            vec![
                Stmt::Family {
                    netdev: false,
                    family: IpFamily::V4,
                },
                Stmt::LimitRef("l43".into()),
                Stmt::Counter,
                Stmt::DscpSet {
                    family: IpFamily::V4,
                    dscp: 0,
                },
                Stmt::PrioritySet(TcHandle::new(0xe5, 0x108)),
                Stmt::Accept,
            ],
            Some("out"),
        ),
        rule(
            vec![Stmt::LimitRef("l43".into()), Stmt::Counter, Stmt::Drop],
            Some("out"),
        ),
        rule(
            vec![
                Stmt::Counter,
                Stmt::DscpSet {
                    family: IpFamily::V6,
                    dscp: 46,
                },
                Stmt::PrioritySet(TcHandle::new(0xe5, 0x108)),
                Stmt::Accept,
            ],
            None,
        ),
    ];
    // Per-user rules: the user's sockets tagged on the way out, and the
    // tagged connections' inbound packets (the flow reversed) on input.
    let replies = vec![
        rule(
            vec![
                Stmt::CtMark(0x7100_03e9),
                Stmt::Addr {
                    src: true,
                    prefix: "10.2.0.0/16".parse().unwrap(),
                },
                Stmt::Port {
                    proto: 17,
                    src: true,
                    first: 5001,
                    last: 5001,
                },
                Stmt::Jump("d42".into()),
            ],
            Some("id=42"),
        ),
        rule(
            vec![Stmt::CtMark(0x7100_03ea), Stmt::Jump("d43".into())],
            Some("id=43"),
        ),
    ];
    let fallback = vec![
        rule(
            vec![
                Stmt::Skuid(1002),
                Stmt::CtMarkSet(0x7100_03ea),
                Stmt::Jump("d43".into()),
            ],
            Some("id=43"),
        ),
        rule(
            vec![
                Stmt::Addr {
                    src: true,
                    prefix: "10.1.0.1".parse().unwrap(),
                },
                Stmt::Addr {
                    src: false,
                    prefix: "10.2.0.0/16".parse().unwrap(),
                },
                Stmt::Port {
                    proto: 17,
                    src: false,
                    first: 5001,
                    last: 5001,
                },
                Stmt::Jump("d42".into()),
            ],
            Some("id=42"),
        ),
        rule(
            vec![
                Stmt::Addr {
                    src: true,
                    prefix: "2001:db8::1".parse().unwrap(),
                },
                Stmt::Addr {
                    src: false,
                    prefix: "2001:db8:8000::/33".parse().unwrap(),
                },
                Stmt::Port {
                    proto: 6,
                    src: true,
                    first: 1024,
                    last: 2048,
                },
                Stmt::Port {
                    proto: 6,
                    src: false,
                    first: 80,
                    last: 80,
                },
                Stmt::Jump("d43".into()),
            ],
            None,
        ),
        rule(
            vec![
                Stmt::Addr {
                    src: true,
                    prefix: "10.0.0.0/20".parse().unwrap(),
                },
                Stmt::Port {
                    proto: 132,
                    src: false,
                    first: 80,
                    last: 80,
                },
                Stmt::Jump("d43".into()),
            ],
            None,
        ),
        rule(
            vec![
                Stmt::Family {
                    netdev: false,
                    family: IpFamily::V4,
                },
                Stmt::L4proto(17),
                Stmt::Jump("d43".into()),
            ],
            None,
        ),
    ];
    let base = vec![
        rule(
            vec![Stmt::OifnameNot("nla".into()), Stmt::Accept],
            Some("guard"),
        ),
        rule(vec![Stmt::Lookup(five.clone())], None),
        rule(vec![Stmt::Lookup(v6.clone())], None),
        rule(
            vec![
                Stmt::Family {
                    netdev: false,
                    family: IpFamily::V4,
                },
                Stmt::Lookup(proto.clone()),
            ],
            None,
        ),
        rule(vec![Stmt::Lookup(ranges.clone())], None),
        rule(vec![Stmt::Jump("fallback".into())], None),
    ];
    let e42 = Element {
        key: vec![
            KeyPart::Proto(17),
            KeyPart::Addr("10.1.0.1".parse().unwrap()),
            KeyPart::Addr("10.2.0.2".parse().unwrap()),
            KeyPart::Port(5001),
        ],
        chain: "d42".into(),
    };
    let e43 = Element {
        key: vec![KeyPart::Addr("2001:db8::7".parse().unwrap())],
        chain: "d43".into(),
    };
    let e43b = Element {
        key: vec![KeyPart::Proto(6), KeyPart::Port(443)],
        chain: "d43".into(),
    };
    let build = |t: &str| {
        let mut b = Batch::new(TableId {
            netdev: false,
            name: t.into(),
        });
        b.push(Command::AddTable);
        b.push(Command::AddLimit(limit.clone()));
        b.push(Command::AddLimit(l43.clone()));
        for s in [&five, &v6, &proto, &ranges] {
            b.push(Command::AddMap(s.clone()));
        }
        for (name, hook, rules) in [
            ("d42", None, &d42),
            ("d43", None, &d43),
            ("fallback", None, &fallback),
            ("postrouting", Some(Hook::Postrouting), &base),
            ("replies", Some(Hook::Input), &replies),
        ] {
            b.push(Command::AddChain {
                name: name.into(),
                hook,
            });
            for r in rules.iter() {
                b.push(Command::AddRule {
                    chain: name.into(),
                    rule: r.clone(),
                });
            }
        }
        b.push(Command::AddElements {
            shape: five.clone(),
            elements: vec![e42.clone()],
        });
        b.push(Command::AddElements {
            shape: v6.clone(),
            elements: vec![e43.clone()],
        });
        b.push(Command::AddElements {
            shape: proto.clone(),
            elements: vec![e43b.clone()],
        });
        b.push(Command::AddElements {
            shape: ranges.clone(),
            elements: vec![e_iv.clone(), e_iv2.clone()],
        });
        b
    };
    let list_fam = |family: &str, t: &str| {
        let out = ns
            .command("nft")
            .args(["list", "table", family, t])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).replace(t, "T")
    };
    let list = |t: &str| list_fam("inet", t);
    let nft_f = |s: &str| {
        let mut child = ns
            .command("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{s}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let native = |b: Batch| {
        ns.run_in(move || qosloop_enforcer::nfnl::Nftnl::open().unwrap().apply(&b))
            .unwrap()
    };
    native(build("qosloop_native")).unwrap();
    nft_f(&build("qosloop_nft").to_string());
    let listed = list("qosloop_native");
    assert_eq!(listed, list("qosloop_nft"));
    let model = Listing {
        table: TableId {
            netdev: false,
            name: "T".into(),
        },
        limits: vec![limit.clone(), l43.clone()],
        maps: vec![
            (five.clone(), vec![e42.clone()]),
            (v6.clone(), vec![e43.clone()]),
            (proto.clone(), vec![e43b.clone()]),
            (ranges.clone(), vec![e_iv.clone(), e_iv2.clone()]),
        ],
        chains: vec![
            ("d42".into(), None, d42.clone()),
            ("d43".into(), None, d43.clone()),
            ("fallback".into(), None, fallback.clone()),
            ("postrouting".into(), Some(Hook::Postrouting), base.clone()),
            ("replies".into(), Some(Hook::Input), replies.clone()),
        ],
    };
    // Counters are zero: nothing passed the table yet.
    assert_eq!(listed, model.to_string());

    // Changing forms: flush and refill a chain with the limit replaced,
    // delete and add an element.
    let change = |t: &str| {
        let mut b = Batch::new(TableId {
            netdev: false,
            name: t.into(),
        });
        b.push(Command::FlushChain("d42".into()));
        b.push(Command::DeleteLimit("l42".into()));
        b.push(Command::AddLimit(Limit {
            burst_bytes: 3028,
            ..limit.clone()
        }));
        b.push(Command::AddRule {
            chain: "d42".into(),
            rule: d42[0].clone(),
        });
        b.push(Command::DeleteElements {
            shape: v6.clone(),
            keys: vec![e43.key.clone()],
        });
        b.push(Command::DeleteElements {
            shape: ranges.clone(),
            keys: vec![e_iv.key.clone()],
        });
        b.push(Command::AddElements {
            shape: v6.clone(),
            elements: vec![Element {
                chain: "d42".into(),
                ..e43.clone()
            }],
        });
        b
    };
    native(change("qosloop_native")).unwrap();
    nft_f(&change("qosloop_nft").to_string());
    assert_eq!(list("qosloop_native"), list("qosloop_nft"));
    assert!(list("qosloop_native").contains("burst 3028 bytes"));
    assert!(!list("qosloop_native").contains("10.4.0.0/24"));

    // A refused batch changes nothing and names the command.
    let before = list("qosloop_native");
    let mut bad = Batch::new(TableId {
        netdev: false,
        name: "qosloop_native".into(),
    });
    bad.push(Command::AddChain {
        name: "d45".into(),
        hook: None,
    });
    bad.push(Command::AddRule {
        chain: "fallback".into(),
        rule: rule(vec![Stmt::Jump("d99".into())], None),
    });
    bad.push(Command::AddRule {
        chain: "d45".into(),
        rule: rule(vec![Stmt::Accept], None),
    });
    let err = native(bad).unwrap_err();
    assert!(err.contains("jump d99"), "{err}");
    assert_eq!(list("qosloop_native"), before);
    let mut busy = Batch::new(TableId {
        netdev: false,
        name: "qosloop_native".into(),
    });
    busy.push(Command::DeleteLimit("l42".into()));
    let err = native(busy).unwrap_err();
    assert!(
        err.contains("delete limit") && err.contains("busy"),
        "{err}"
    );
    for t in ["qosloop_native", "qosloop_nft"] {
        let mut b = Batch::new(TableId {
            netdev: false,
            name: t.into(),
        });
        b.push(Command::DeleteTable);
        native(b).unwrap();
    }

    // The ingress forms: a netdev table on the ingress hook of nla, the
    // guard against packets an IFB hands back, `meta protocol`
    // dependencies and `fwd to` the IFB device.
    ns.ip(&["link", "add", "name", "nlq", "type", "ifb"])
        .unwrap();
    let nlq = ns
        .run_in(|| qosloop_enforcer::tc::if_index("nlq"))
        .unwrap()
        .unwrap();
    let ingress = |t: &str| {
        let mut b = Batch::new(TableId {
            netdev: true,
            name: t.into(),
        });
        let fwd = Stmt::Fwd {
            device: "nlq".into(),
            ifindex: nlq,
        };
        b.push(Command::AddTable);
        b.push(Command::AddLimit(limit.clone()));
        b.push(Command::AddMap(five.clone()));
        b.push(Command::AddChain {
            name: "postrouting".into(),
            hook: Some(Hook::Ingress {
                device: "nla".into(),
            }),
        });
        b.push(Command::AddChain {
            name: "d7".into(),
            hook: None,
        });
        for r in [
            rule(
                vec![
                    Stmt::LimitRef("l42".into()),
                    Stmt::Counter,
                    Stmt::DscpSet {
                        family: IpFamily::V4,
                        dscp: 0,
                    },
                    Stmt::PrioritySet(TcHandle::new(0xe500, 0x100)),
                    fwd.clone(),
                ],
                Some("out"),
            ),
            rule(
                vec![
                    Stmt::Counter,
                    Stmt::PrioritySet(TcHandle::new(0xe500, 2)),
                    fwd,
                ],
                Some("in"),
            ),
        ] {
            b.push(Command::AddRule {
                chain: "d7".into(),
                rule: r,
            });
        }
        for r in [
            rule(vec![Stmt::PriorityNotZero, Stmt::Accept], Some("guard")),
            rule(vec![Stmt::Lookup(five.clone())], None),
            rule(
                vec![
                    Stmt::Addr {
                        src: false,
                        prefix: "2001:db8::/33".parse().unwrap(),
                    },
                    Stmt::Jump("d7".into()),
                ],
                None,
            ),
            rule(
                vec![
                    Stmt::Family {
                        netdev: true,
                        family: IpFamily::V4,
                    },
                    Stmt::L4proto(17),
                    Stmt::Jump("d7".into()),
                ],
                None,
            ),
        ] {
            b.push(Command::AddRule {
                chain: "postrouting".into(),
                rule: r,
            });
        }
        b.push(Command::AddElements {
            shape: five.clone(),
            elements: vec![Element {
                chain: "d7".into(),
                ..e42.clone()
            }],
        });
        b
    };
    native(ingress("qosloop_native")).unwrap();
    nft_f(&ingress("qosloop_nft").to_string());
    let (a, b) = (
        list_fam("netdev", "qosloop_native"),
        list_fam("netdev", "qosloop_nft"),
    );
    assert_eq!(a, b);
    assert!(a.contains("fwd to \"nlq\""), "{a}");
    for t in ["qosloop_native", "qosloop_nft"] {
        let mut b = Batch::new(TableId {
            netdev: true,
            name: t.into(),
        });
        b.push(Command::DeleteTable);
        native(b).unwrap();
    }
    let out = ns
        .command("nft")
        .args(["list", "ruleset"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "");
}
