//! The capability probe: tries each kernel feature the backends need in a
//! throwaway network namespace (a thread that unshares its network
//! namespace; the namespace and its veth pair vanish with the thread), so the
//! host is never touched.

use crate::backend::LinuxBackend;
use crate::enforcer::{Enforcer, EnforcerConfig};
use crate::nft::model::{
    Batch, Command, Element, Field, Hook, IpFamily, KeyPart, Limit, Rule, Shape, Stmt, TableId,
};
use crate::render::Layout;
use crate::tc::{HtbClass, TcHandle, TcOp};
use qosloop_schema::{
    Decision, DecisionReason, Dscp, FlowSpec, Kbps, OutOfProfileAction, TrafficProfile,
};
use serde::Serialize;

/// One capability and whether it works here.
#[derive(Clone, Debug, Serialize)]
pub struct Capability {
    pub name: &'static str,
    pub works: bool,
    pub detail: String,
}

/// The probe's findings.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeReport {
    pub capabilities: Vec<Capability>,
    /// Backends usable here, best first.
    pub usable_backends: Vec<&'static str>,
}

impl ProbeReport {
    pub fn works(&self, name: &str) -> bool {
        self.capabilities.iter().any(|c| c.name == name && c.works)
    }
}

fn cap(name: &'static str, r: Result<String, String>) -> Capability {
    match r {
        Ok(detail) => Capability {
            name,
            works: true,
            detail,
        },
        Err(detail) => Capability {
            name,
            works: false,
            detail,
        },
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip: {e} (Debian package iproute2)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs the probe (needs CAP_NET_ADMIN and CAP_SYS_ADMIN for the namespace).
pub fn probe() -> ProbeReport {
    let caps = std::thread::scope(|s| {
        s.spawn(probe_in_fresh_namespace)
            .join()
            .unwrap_or_else(|_| vec![cap("netns", Err("probe thread panicked".into()))])
    });
    let mut usable = Vec::new();
    let works = |n: &str| caps.iter().any(|c| c.name == n && c.works);
    if works("htb-netlink")
        && works("nftables")
        && works("nft-limit-object")
        && works("nft-concat-verdict-map")
        && works("nft-interval-map")
    {
        usable.push("htb+nft");
    }
    ProbeReport {
        capabilities: caps,
        usable_backends: usable,
    }
}

fn probe_in_fresh_namespace() -> Vec<Capability> {
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
        return vec![cap(
            "netns",
            Err(format!(
                "cannot create a throwaway network namespace: {e} (run as root)"
            )),
        )];
    }
    let mut caps = vec![cap("netns", Ok("throwaway namespace created".into()))];
    let veth = ip(&[
        "link", "add", "qlp0", "type", "veth", "peer", "name", "qlp1",
    ])
    .and_then(|_| ip(&["link", "set", "qlp0", "up"]))
    .and_then(|_| ip(&["link", "set", "qlp1", "up"]));
    caps.push(cap(
        "veth",
        veth.clone().map(|_| "veth pair qlp0/qlp1".into()),
    ));
    let ifindex = crate::sys::if_index("qlp0");
    caps.push(cap(
        "htb-netlink",
        ifindex
            .ok_or_else(|| "no test interface".to_owned())
            .and_then(probe_htb),
    ));
    caps.push(cap("nft-limit-object", probe_limit_object()));
    caps.push(cap("nft-concat-verdict-map", probe_concat_map()));
    caps.push(cap("nft-interval-map", probe_interval_map()));
    caps.push(cap("nftables", probe_nft()));
    caps.push(cap(
        "ifb",
        ip(&["link", "add", "qlpifb", "type", "ifb"])
            .map(|_| "ifb device created (used by --direction ingress)".into()),
    ));
    caps
}

fn probe_htb(ifindex: u32) -> Result<String, String> {
    let mut be = LinuxBackend::open().map_err(|e| format!("netlink socket: {e}"))?;
    let h = |m| TcHandle::new(0xe5, m);
    let class = |rate| HtbClass {
        classid: h(1),
        parent: TcHandle(0),
        rate: Kbps(rate),
        ceil: Kbps(rate),
        prio: 0,
    };
    let ops = [
        TcOp::CreateQdisc {
            ifindex,
            handle: h(0),
            parent: TcHandle(0),
            default_minor: 1,
        },
        TcOp::CreateClass {
            ifindex,
            class: class(10_000),
        },
        TcOp::ChangeClass {
            ifindex,
            class: class(5_000),
        },
    ];
    for (op, r) in ops.iter().zip(be.rtnl().execute(&ops)) {
        r.map_err(|e| format!("{op}: {e}"))?;
    }
    // Group steering: an eBPF cls_bpf filter on the root qdisc.
    let steer = TcOp::Steer {
        ifindex,
        qdisc: h(0),
        first_major: 0xe500,
        groups: 255,
        first_minor: 0x100,
    };
    let steering = be.rtnl().execute_one(&steer);
    let classes = be
        .rtnl()
        .classes(ifindex, 0xe5)
        .map_err(|e| format!("class dump: {e}"))?;
    if !classes.iter().any(|c| c.rate_kbps == 5_000) {
        return Err("class change did not show in the dump".into());
    }
    be.rtnl()
        .execute_one(&TcOp::DeleteQdisc {
            ifindex,
            handle: h(0),
        })
        .map_err(|e| format!("delete qdisc: {e}"))?;
    steering.map_err(|e| {
        format!("capability ebpf-steering missing (cls_bpf with an eBPF program, needs CONFIG_BPF_SYSCALL and CAP_BPF): {e}")
    })?;
    Ok("HTB qdisc and classes over rtnetlink (hand-encoded TCA_HTB_*), eBPF cls_bpf group steering".into())
}

/// One throwaway table holding what `fill` adds, applied and deleted.
fn probe_table(fill: impl FnOnce(&mut Batch)) -> Result<(), String> {
    let mut nft = crate::nfnl::Nftnl::open().map_err(|e| format!("nf_tables socket: {e}"))?;
    let table = TableId {
        netdev: false,
        name: "qosloop_probe".into(),
    };
    let mut batch = Batch::new(table.clone());
    batch.push(Command::AddTable);
    fill(&mut batch);
    let applied = nft.apply(&batch);
    let mut del = Batch::new(table);
    del.push(Command::DeleteTable);
    let _ = nft.apply(&del);
    applied
}

/// A named `limit` object referenced by a rule: each flow's meter, kept
/// across decision changes (kernel 4.19+ for named limits).
fn probe_limit_object() -> Result<String, String> {
    probe_table(|b| {
        b.push(Command::AddLimit(Limit {
            name: "l1".into(),
            bytes_per_sec: 125_000,
            burst_bytes: 3028,
        }));
        b.push(Command::AddChain {
            name: "d1".into(),
            hook: None,
        });
        b.push(Command::AddRule {
            chain: "d1".into(),
            rule: Rule {
                stmts: vec![Stmt::LimitRef("l1".into()), Stmt::Counter, Stmt::Drop],
                comment: None,
            },
        });
    })
    .map(|()| "named limit object referenced by a rule (per-flow meter kept across changes)".into())
    .map_err(|e| format!("named limit objects refused ({e}); every decision needs one"))
}

/// A verdict map keyed on a concatenation, looked up from a base chain:
/// how decisions are classified at constant cost per packet.
fn probe_concat_map() -> Result<String, String> {
    let shape = Shape {
        family: IpFamily::V6,
        fields: vec![
            Field::L4proto,
            Field::Saddr,
            Field::Daddr,
            Field::Sport,
            Field::Dport,
        ],
        interval: false,
    };
    probe_table(|b| {
        b.push(Command::AddMap(shape.clone()));
        b.push(Command::AddChain {
            name: "d1".into(),
            hook: None,
        });
        b.push(Command::AddChain {
            name: "postrouting".into(),
            hook: Some(Hook::Postrouting),
        });
        b.push(Command::AddRule {
            chain: "postrouting".into(),
            rule: Rule {
                stmts: vec![Stmt::Lookup(shape.clone())],
                comment: None,
            },
        });
        b.push(Command::AddElements {
            shape: shape.clone(),
            elements: vec![Element {
                key: vec![
                    KeyPart::Proto(17),
                    KeyPart::Addr(
                        "2001:db8::1"
                            .parse()
                            .unwrap_or(std::net::Ipv6Addr::LOCALHOST.into()),
                    ),
                    KeyPart::Addr(
                        "2001:db8::2"
                            .parse()
                            .unwrap_or(std::net::Ipv6Addr::LOCALHOST.into()),
                    ),
                    KeyPart::Port(1),
                    KeyPart::Port(2),
                ],
                chain: "d1".into(),
            }],
        });
    })
    .map(|()| "verdict map on a 44-byte concatenated key (IPv6 five-tuple) with elements".into())
    .map_err(|e| format!("verdict maps on concatenations refused ({e}); classification needs them"))
}

/// A verdict map of concatenated ranges (`flags interval`, kernel 5.6+):
/// how decisions with a prefix or a port range are classified.
fn probe_interval_map() -> Result<String, String> {
    let shape = Shape {
        family: IpFamily::V4,
        fields: vec![Field::Daddr, Field::Dport],
        interval: true,
    };
    let prefix = qosloop_schema::IpPrefix::new(std::net::Ipv4Addr::new(192, 0, 2, 0).into(), 24)
        .map_err(|e| e.to_string())?;
    probe_table(|b| {
        b.push(Command::AddMap(shape.clone()));
        b.push(Command::AddChain {
            name: "d1".into(),
            hook: None,
        });
        b.push(Command::AddElements {
            shape: shape.clone(),
            elements: vec![Element {
                key: vec![KeyPart::Prefix(prefix), KeyPart::Ports(1000, 2000)],
                chain: "d1".into(),
            }],
        });
    })
    .map(|()| "verdict map of concatenated ranges (prefix . port range)".into())
    .map_err(|e| format!("interval maps on concatenations refused ({e}); decisions with prefixes or port ranges need them"))
}

fn probe_nft() -> Result<String, String> {
    // The whole path: a decision rendered and installed on the test veth.
    let decision = Decision {
        id: 1,
        version: 1,
        role: "probe".into(),
        policy_dn: "probe".into(),
        flow: FlowSpec {
            dst: Some("192.0.2.1".parse().map_err(|_| "address")?),
            proto: Some(17),
            dst_ports: Some(qosloop_schema::PortRange::single(9)),
            user: None,
            ..FlowSpec::default()
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
            rate_kbps: 0.0,
            avg_rate_kbps: 0.0,
            link: String::new(),
            link_load_kbps: 0.0,
            band: String::new(),
        },
        issued_ns: 0,
    };
    let be = LinuxBackend::open().map_err(|e| format!("netlink socket: {e}"))?;
    let config = EnforcerConfig {
        direction: qosloop_schema::Direction::Egress,
        interface: "qlp0".into(),
        roles: Vec::new(),
        capacity: Kbps(10_000),
        qdisc_major: 0xe5,
    };
    let (mut e, _) = Enforcer::start(be, config).map_err(|e| e.to_string())?;
    e.install(decision).map_err(|e| e.to_string())?;
    let layout: Layout = e.layout().clone();
    let ifindex = e.ifindex();
    crate::enforcer::cleanup(e.backend(), &layout, ifindex).map_err(|e| e.to_string())?;
    Ok("a decision through nf_tables netlink batches: map element, limit object, dscp set, meta priority set, counters".into())
}
