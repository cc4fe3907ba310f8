//! How packets reach a decision: its flow as a key of the verdict map of
//! its shape (an exact map, or an interval map when a field is a prefix or
//! a range), or a rule in the fallback chain (when it names no field, or —
//! decided by the enforcer's plan — overlaps another decision's flow) and
//! the order of that chain; and the base chain that looks the maps up.

use super::{chain_name, Layout, FALLBACK_CHAIN};
use crate::nft::model::{Element, Field, IpFamily, KeyPart, Rule, Shape, Stmt};
use qosloop_schema::{FlowSpec, IpPrefix, PortRange};

/// How packets reach a decision's chain: an element of the verdict map of
/// its shape (one lookup per shape in use, whatever the number of
/// decisions), or a rule in the `fallback` chain when its flow names no
/// field at all or overlaps another decision's flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Classify {
    Map { shape: Shape, key: Vec<KeyPart> },
    Rule(Vec<Stmt>),
}

impl Classify {
    /// The map element jumping to `chain`, for a map classification.
    pub fn element(&self, chain: &str) -> Option<(Shape, Element)> {
        match self {
            Classify::Map { shape, key } => Some((
                shape.clone(),
                Element {
                    key: key.clone(),
                    chain: chain.to_owned(),
                },
            )),
            Classify::Rule(_) => None,
        }
    }
    /// The fallback rule jumping to `chain`, for a rule classification.
    pub fn rule(&self, id: u64) -> Option<Rule> {
        match self {
            Classify::Rule(stmts) => {
                let mut stmts = stmts.clone();
                stmts.push(Stmt::Jump(chain_name(id)));
                Some(Rule {
                    stmts,
                    comment: Some(format!("id={id}")),
                })
            }
            Classify::Map { .. } => None,
        }
    }
}

/// Where a decision's rule goes in the fallback chain: rules are sorted by
/// this key, then by decision id. The longest destination prefix first,
/// then the longest source prefix, the narrowest destination port range,
/// the narrowest source port range, and a flow naming a protocol before
/// one that names none (an absent field counts as the widest). When a
/// flow is contained in another, each of its fields is at least as narrow
/// and one is narrower (equal flows are refused), so it sorts first: the
/// more specific decision takes the packets both match.
/// A per-user decision's rule comes before every other (first key
/// `false`): its user's packets go to it, whatever flow decisions match.
pub type FallbackOrder = (
    bool,
    std::cmp::Reverse<u8>,
    std::cmp::Reverse<u8>,
    u32,
    u32,
    bool,
);

/// The fallback order key of `spec` (see [`FallbackOrder`]).
pub fn fallback_order(spec: &FlowSpec) -> FallbackOrder {
    let len = |p: Option<IpPrefix>| std::cmp::Reverse(p.map_or(0, |p| p.prefix_len()));
    let count =
        |r: Option<PortRange>| r.map_or(65_536, |r| u32::from(r.last) - u32::from(r.first) + 1);
    (
        spec.user.is_none(),
        len(spec.dst),
        len(spec.src),
        count(spec.dst_ports),
        count(spec.src_ports),
        spec.proto.is_none(),
    )
}

/// Why a flow spec cannot be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("source {src} and destination {dst} are of different address families")]
    MixedFamilies { src: IpPrefix, dst: IpPrefix },
    #[error("ports are given but protocol {0:?} has no ports (use 6, 17 or 132)")]
    PortsWithoutPortProtocol(Option<u8>),
    #[error("map key of {0} bytes is longer than nf_tables takes (64)")]
    KeyTooLong(usize),
    #[error("user {0}: no uid (the enforcer resolves a name before rendering)")]
    UserWithoutUid(String),
    #[error("user {0}: a per-user decision is enforced on the user's own host at egress; an ingress enforcer sees no local socket")]
    UserAtIngress(String),
}

/// The address family of a flow (IPv4 when it names no address).
pub fn family(spec: &FlowSpec) -> Result<IpFamily, SpecError> {
    match (spec.src, spec.dst) {
        (Some(s), Some(d)) if s.addr().is_ipv4() != d.addr().is_ipv4() => {
            Err(SpecError::MixedFamilies { src: s, dst: d })
        }
        (Some(p), _) | (None, Some(p)) => Ok(IpFamily::of(p.addr())),
        (None, None) => Ok(IpFamily::V4),
    }
}

/// How a flow spec is classified in a table of the given family: a key of
/// an exact map when every field it names is exact (a host, one port, a
/// protocol); a key of an interval map when one is a prefix or a port range
/// (the protocol is always part of an interval key, `0-255` when the flow
/// names none: the kernel's set of concatenated ranges needs two fields);
/// else (no field at all) a rule's match statements.
pub fn classify(spec: &FlowSpec, netdev: bool) -> Result<Classify, SpecError> {
    let fam = family(spec)?;
    if let Some(u) = &spec.user {
        if netdev {
            return Err(SpecError::UserAtIngress(u.name.clone()));
        }
        if u.uid.is_none() {
            return Err(SpecError::UserWithoutUid(u.name.clone()));
        }
        return Ok(Classify::Rule(fallback_match(spec, netdev)));
    }
    let has_ports = spec.src_ports.is_some() || spec.dst_ports.is_some();
    if has_ports && !matches!(spec.proto, Some(6 | 17 | 132)) {
        return Err(SpecError::PortsWithoutPortProtocol(spec.proto));
    }
    let exact_prefix = |p: Option<IpPrefix>| p.is_none_or(|p| p.is_host());
    let exact_ports = |p: Option<PortRange>| p.is_none_or(|p| p.first == p.last);
    let exact = exact_prefix(spec.src)
        && exact_prefix(spec.dst)
        && exact_ports(spec.src_ports)
        && exact_ports(spec.dst_ports);
    let mut fields = Vec::new();
    let mut key = Vec::new();
    let addr = |p: IpPrefix| {
        if exact {
            KeyPart::Addr(p.addr())
        } else {
            KeyPart::Prefix(p)
        }
    };
    let ports = |p: PortRange| {
        if exact {
            KeyPart::Port(p.first)
        } else {
            KeyPart::Ports(p.first, p.last)
        }
    };
    match (spec.proto, exact) {
        (Some(p), true) => {
            fields.push(Field::L4proto);
            key.push(KeyPart::Proto(p));
        }
        (Some(p), false) => {
            fields.push(Field::L4proto);
            key.push(KeyPart::Protos(p, p));
        }
        (None, false) => {
            fields.push(Field::L4proto);
            key.push(KeyPart::Protos(0, 255));
        }
        (None, true) => {}
    }
    if let Some(p) = spec.src {
        fields.push(Field::Saddr);
        key.push(addr(p));
    }
    if let Some(p) = spec.dst {
        fields.push(Field::Daddr);
        key.push(addr(p));
    }
    if let Some(p) = spec.src_ports {
        fields.push(Field::Sport);
        key.push(ports(p));
    }
    if let Some(p) = spec.dst_ports {
        fields.push(Field::Dport);
        key.push(ports(p));
    }
    if !fields.is_empty() {
        let shape = Shape {
            family: fam,
            fields,
            interval: !exact,
        };
        if shape.key_len() > crate::nft::model::MAX_KEY_LEN {
            return Err(SpecError::KeyTooLong(shape.key_len()));
        }
        return Ok(Classify::Map { shape, key });
    }
    Ok(Classify::Rule(fallback_match(spec, netdev)))
}

/// The match statements of a fallback rule for `spec` (a checked flow):
/// the family when it names no address, then its addresses, ports or
/// protocol. Used for a flow that names no field, and for a flow that
/// overlaps another decision's (which no map key can express).
pub fn fallback_match(spec: &FlowSpec, netdev: bool) -> Vec<Stmt> {
    let fam = family(spec).unwrap_or(IpFamily::V4);
    let has_ports = spec.src_ports.is_some() || spec.dst_ports.is_some();
    let mut stmts = Vec::new();
    // A user's sockets are of both families: a per-user flow that names no
    // address matches IPv4 and IPv6 (`meta skuid` and `ct mark` need no
    // network header); any other flow naming none is IPv4.
    if spec.src.is_none() && spec.dst.is_none() && spec.user.is_none() {
        stmts.push(Stmt::Family {
            netdev,
            family: fam,
        });
    }
    if let Some(p) = spec.src {
        stmts.push(Stmt::Addr {
            src: true,
            prefix: p,
        });
    }
    if let Some(p) = spec.dst {
        stmts.push(Stmt::Addr {
            src: false,
            prefix: p,
        });
    }
    match (spec.proto, has_ports) {
        (Some(proto), true) => {
            for (src, ports) in [(true, spec.src_ports), (false, spec.dst_ports)] {
                if let Some(r) = ports {
                    stmts.push(Stmt::Port {
                        proto,
                        src,
                        first: r.first,
                        last: r.last,
                    });
                }
            }
        }
        (Some(p), false) => stmts.push(Stmt::L4proto(p)),
        (None, _) => {}
    }
    if let Some(uid) = spec.user.as_ref().and_then(|u| u.uid) {
        stmts.push(Stmt::Skuid(uid));
        stmts.push(Stmt::CtMarkSet(user_ct_mark(uid)));
    }
    stmts
}

/// The rule of the `replies` chain (input hook) for a per-user decision's
/// fallback rule: the connections the rule tags (`ct mark set`) on the way
/// out, matched on the way in by their mark and by the flow reversed
/// (source and destination swapped), jumping to the same decision chain.
/// `None` for a rule that tags nothing (a flow decision).
pub fn reply_rule(fallback: &Rule) -> Option<Rule> {
    let mark = fallback.stmts.iter().find_map(|s| match s {
        Stmt::CtMarkSet(m) => Some(*m),
        _ => None,
    })?;
    let mut stmts = vec![Stmt::CtMark(mark)];
    for s in &fallback.stmts {
        match s {
            Stmt::Skuid(_) | Stmt::CtMarkSet(_) => {}
            Stmt::Addr { src, prefix } => stmts.push(Stmt::Addr {
                src: !src,
                prefix: *prefix,
            }),
            Stmt::Port {
                proto,
                src,
                first,
                last,
            } => stmts.push(Stmt::Port {
                proto: *proto,
                src: !src,
                first: *first,
                last: *last,
            }),
            other => stmts.push(other.clone()),
        }
    }
    Some(Rule {
        stmts,
        comment: fallback.comment.clone(),
    })
}

/// The conntrack mark a per-user decision gives its user's connections on
/// the way out (`ct mark set`), so that their replies can be told on the
/// way in: the uid in the low 24 bits under qosloop's tag `0x71` (uids
/// above 2^24 share marks modulo 2^24).
pub fn user_ct_mark(uid: u32) -> u32 {
    0x7100_0000 | (uid & 0x00ff_ffff)
}

/// The base chain's rule for the map of `shape` (with an explicit family
/// match when the key names no address).
pub fn lookup_rule(shape: &Shape, netdev: bool) -> Rule {
    let mut stmts = Vec::new();
    if !shape.has_address() {
        stmts.push(Stmt::Family {
            netdev,
            family: shape.family,
        });
    }
    stmts.push(Stmt::Lookup(shape.clone()));
    Rule {
        stmts,
        comment: None,
    }
}

/// The base chain's rules: the guard, one lookup per map in use, then the
/// fallback chain.
pub fn base_rules<'a>(layout: &Layout, shapes: impl Iterator<Item = &'a Shape>) -> Vec<Rule> {
    let mut rules = vec![layout.guard_rule()];
    rules.extend(shapes.map(|s| lookup_rule(s, layout.ingress())));
    rules.push(Rule {
        stmts: vec![Stmt::Jump(FALLBACK_CHAIN.into())],
        comment: None,
    });
    rules
}
