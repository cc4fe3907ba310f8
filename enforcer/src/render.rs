//! What a decision becomes in the kernel: two HTB classes and one nftables
//! chain, rendered as plain data so that a plan can be diffed and printed.
//!
//! Per decision `ID` in slot `S` on the enforcer's qdisc `MAJ:`:
//! - class `MAJ:(0x100+2S)` for in-profile traffic (rate = profile rate,
//!   ceil = capacity) and class `MAJ:(0x101+2S)` for out-of-profile traffic
//!   (rate = ceil = the shape rate; a trickle when nothing is steered there);
//! - chain `dID` in the enforcer's table: a `limit rate over PROFILE burst B`
//!   rule catches out-of-profile packets (accept / re-mark / drop, steered with
//!   `meta priority set` into the out class), and the next rule marks the
//!   rest in-profile and steers it into the in class;
//! - a rule in the base chain matching the flow and jumping to `dID`.

use crate::tc::{HtbClass, TcHandle};
use qosloop_schema::{Decision, Dscp, FlowSpec, IpPrefix, Kbps, OutOfProfileAction};
use std::fmt::Write as _;
use std::net::IpAddr;

/// The rate of a class nothing is steered into (HTB needs a rate > 0).
pub const TRICKLE: Kbps = Kbps(8);
/// Minor of the root class; every other class hangs below it.
pub const ROOT_MINOR: u16 = 1;
/// Minor of the class unmatched traffic goes to.
pub const DEFAULT_MINOR: u16 = 2;
const FIRST_SLOT_MINOR: u16 = 0x100;
/// How many decisions fit on one interface (two class minors each).
pub const MAX_SLOTS: u32 = (0xFFFF - FIRST_SLOT_MINOR as u32) / 2;

/// Where the enforcer renders: its interface, qdisc and table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub interface: String,
    pub qdisc_major: u16,
    pub capacity: Kbps,
}

impl Layout {
    /// The nftables table (family `inet`) the enforcer owns on this interface.
    pub fn table(&self) -> String {
        format!("qosloop_{}", self.interface)
    }
    pub fn handle(&self, minor: u16) -> TcHandle {
        TcHandle::new(self.qdisc_major, minor)
    }
    pub fn root_class(&self) -> HtbClass {
        HtbClass {
            classid: self.handle(ROOT_MINOR),
            parent: TcHandle(0),
            rate: self.capacity,
            ceil: self.capacity,
            prio: 0,
        }
    }
    /// Guaranteed a tenth of the link, may borrow all of it.
    pub fn default_class(&self) -> HtbClass {
        HtbClass {
            classid: self.handle(DEFAULT_MINOR),
            parent: self.handle(ROOT_MINOR),
            rate: self.default_rate(),
            ceil: self.capacity,
            prio: 7,
        }
    }
    pub fn default_rate(&self) -> Kbps {
        Kbps((self.capacity.0 / 10).max(TRICKLE.0))
    }
    pub fn slot_minors(slot: u32) -> (u16, u16) {
        let m = FIRST_SLOT_MINOR as u32 + 2 * slot;
        (m as u16, (m + 1) as u16)
    }
    /// The slot a class minor belongs to, if it is a decision class.
    pub fn slot_of_minor(minor: u16) -> Option<u32> {
        (minor >= FIRST_SLOT_MINOR).then(|| u32::from(minor - FIRST_SLOT_MINOR) / 2)
    }
}

/// A decision rendered for the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    pub id: u64,
    pub version: u64,
    pub slot: u32,
    pub in_class: HtbClass,
    pub out_class: HtbClass,
    /// The base-chain match selecting the flow (before `jump`).
    pub flow_match: String,
    /// The rules of chain `dID`, as nft statements.
    pub rules: Vec<String>,
    /// FNV-1a of `flow_match` and `rules`: equal means the same nftables objects.
    pub fingerprint: u64,
}

impl Rendered {
    pub fn chain(&self) -> String {
        chain_name(self.id)
    }
}

pub fn chain_name(id: u64) -> String {
    format!("d{id}")
}

/// Comment on the in-profile rule: what reconcile reads back after a restart.
pub fn meta_comment(id: u64, version: u64, slot: u32, kind: &str, fp: u64) -> String {
    format!("in id={id} v={version} slot={slot} kind={kind} fp={fp:016x}")
}

/// What `meta_comment` wrote, read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainMeta {
    pub id: u64,
    pub version: u64,
    pub slot: u32,
    pub kind: String,
    pub fingerprint: u64,
}

pub fn parse_meta_comment(c: &str) -> Option<ChainMeta> {
    let mut words = c.split_whitespace();
    if words.next()? != "in" {
        return None;
    }
    let (mut id, mut version, mut slot, mut kind, mut fp) = (None, None, None, None, None);
    for w in words {
        let (k, v) = w.split_once('=')?;
        match k {
            "id" => id = v.parse().ok(),
            "v" => version = v.parse().ok(),
            "slot" => slot = v.parse().ok(),
            "kind" => kind = Some(v.to_owned()),
            "fp" => fp = u64::from_str_radix(v, 16).ok(),
            _ => {}
        }
    }
    Some(ChainMeta {
        id: id?,
        version: version?,
        slot: slot?,
        kind: kind?,
        fingerprint: fp?,
    })
}

fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Why a flow spec cannot be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("source {src} and destination {dst} are of different address families")]
    MixedFamilies { src: IpPrefix, dst: IpPrefix },
    #[error("ports are given but protocol {0:?} has no ports (use 6, 17 or 132)")]
    PortsWithoutPortProtocol(Option<u8>),
}

fn is_v6(p: &IpPrefix) -> bool {
    matches!(p.addr(), IpAddr::V6(_))
}

/// The nft match for a flow spec (inet family).
pub fn flow_match(spec: &FlowSpec) -> Result<String, SpecError> {
    let v6 = match (spec.src, spec.dst) {
        (Some(s), Some(d)) if is_v6(&s) != is_v6(&d) => {
            return Err(SpecError::MixedFamilies { src: s, dst: d })
        }
        (Some(p), _) | (None, Some(p)) => is_v6(&p),
        (None, None) => false,
    };
    let ip = if v6 { "ip6" } else { "ip" };
    let mut m = String::new();
    if spec.src.is_none() && spec.dst.is_none() {
        m.push_str("meta nfproto ipv4 ");
    }
    let pfx = |p: IpPrefix| {
        if p.is_host() {
            p.addr().to_string()
        } else {
            p.to_string()
        }
    };
    if let Some(s) = spec.src {
        let _ = write!(m, "{ip} saddr {} ", pfx(s));
    }
    if let Some(d) = spec.dst {
        let _ = write!(m, "{ip} daddr {} ", pfx(d));
    }
    let l4 = match spec.proto {
        Some(6) => Some("tcp"),
        Some(17) => Some("udp"),
        Some(132) => Some("sctp"),
        _ => None,
    };
    match (l4, spec.src_ports.is_some() || spec.dst_ports.is_some()) {
        (None, true) => return Err(SpecError::PortsWithoutPortProtocol(spec.proto)),
        (Some(l4), true) => {
            if let Some(p) = spec.src_ports {
                let _ = write!(m, "{l4} sport {p} ");
            }
            if let Some(p) = spec.dst_ports {
                let _ = write!(m, "{l4} dport {p} ");
            }
        }
        (_, false) => {
            if let Some(p) = spec.proto {
                let _ = write!(m, "meta l4proto {p} ");
            }
        }
    }
    Ok(m.trim_end().to_owned())
}

fn dscp_set(v6: bool, d: Dscp) -> String {
    format!("{} dscp set {}", if v6 { "ip6" } else { "ip" }, d.value())
}

/// Renders `d` into `slot` of `layout`. The decision must have been validated.
pub fn render(layout: &Layout, d: &Decision, slot: u32) -> Result<Rendered, SpecError> {
    let flow = flow_match(&d.flow)?;
    let v6 = flow.starts_with("ip6 ");
    let (in_minor, out_minor) = Layout::slot_minors(slot);
    let parent = layout.handle(ROOT_MINOR);
    let in_class = HtbClass {
        classid: layout.handle(in_minor),
        parent,
        rate: d.profile.rate,
        ceil: layout.capacity,
        prio: 1,
    };
    let (out_rate, out_ceil) = match d.out_of_profile.shape() {
        Some(s) => (s, s),
        None if d.out_of_profile == OutOfProfileAction::Drop => (TRICKLE, TRICKLE),
        None => (TRICKLE, layout.capacity),
    };
    let out_class = HtbClass {
        classid: layout.handle(out_minor),
        parent,
        rate: out_rate,
        ceil: out_ceil,
        prio: 2,
    };
    // nft's limit: bytes per second; burst 0 means "one second of traffic".
    let limit = if d.profile.burst_bytes > 0 {
        format!(
            "limit rate over {} bytes/second burst {} bytes",
            d.profile.rate.bytes_per_sec(),
            d.profile.burst_bytes
        )
    } else {
        format!(
            "limit rate over {} bytes/second",
            d.profile.rate.bytes_per_sec()
        )
    };
    let out_rule = match d.out_of_profile {
        OutOfProfileAction::Accept { .. } => format!(
            "{limit} counter meta priority set {} accept comment \"out\"",
            out_class.classid
        ),
        OutOfProfileAction::Remark { dscp, .. } => format!(
            "{limit} counter {} meta priority set {} accept comment \"out\"",
            dscp_set(v6, dscp),
            out_class.classid
        ),
        OutOfProfileAction::Drop => format!("{limit} counter drop comment \"out\""),
    };
    let mark = d
        .in_profile_dscp
        .map(|dscp| format!("{} ", dscp_set(v6, dscp)))
        .unwrap_or_default();
    let in_body = format!(
        "counter {mark}meta priority set {} accept",
        in_class.classid
    );
    let kind = d.kind().to_string();
    let fingerprint = fnv1a(&[&flow, &out_rule, &in_body]);
    let in_rule = format!(
        "{in_body} comment \"{}\"",
        meta_comment(d.id, d.version, slot, &kind, fingerprint)
    );
    Ok(Rendered {
        id: d.id,
        version: d.version,
        slot,
        in_class,
        out_class,
        flow_match: flow,
        rules: vec![out_rule, in_rule],
        fingerprint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use qosloop_schema::{DecisionReason, TrafficProfile};

    pub(crate) fn decision(id: u64, action: OutOfProfileAction) -> Decision {
        Decision {
            id,
            version: 1,
            role: "edge".into(),
            policy_dn: "cn=gold".into(),
            flow: FlowSpec {
                src: Some("10.1.0.1".parse().unwrap()),
                dst: Some("10.2.0.2".parse().unwrap()),
                proto: Some(17),
                src_ports: None,
                dst_ports: Some("5001".parse().unwrap()),
            },
            profile: TrafficProfile {
                rate: Kbps(1000),
                burst_bytes: 15_000,
            },
            in_profile_dscp: Some(Dscp::CS6),
            out_of_profile: action,
            reason: DecisionReason {
                rate_kbps: 0.0,
                avg_rate_kbps: 0.0,
                link: "l".into(),
                link_load_kbps: 0.0,
                band: "low".into(),
            },
            issued_ns: 0,
        }
    }

    fn layout() -> Layout {
        Layout {
            interface: "eth1".into(),
            qdisc_major: 0xe5,
            capacity: Kbps(10_000),
        }
    }

    #[test]
    fn paper_remark_renders_like_fig10() {
        let d = decision(
            42,
            OutOfProfileAction::Remark {
                dscp: Dscp::BEST_EFFORT,
                shape: Some(Kbps(125)),
            },
        );
        let r = render(&layout(), &d, 3).unwrap();
        assert_eq!(
            r.flow_match,
            "ip saddr 10.1.0.1 ip daddr 10.2.0.2 udp dport 5001"
        );
        assert_eq!(
            r.rules[0],
            "limit rate over 125000 bytes/second burst 15000 bytes counter ip dscp set 0 meta priority set e5:107 accept comment \"out\""
        );
        assert!(r.rules[1].starts_with("counter ip dscp set 48 meta priority set e5:106 accept comment \"in id=42 v=1 slot=3 kind=remark fp="));
        assert_eq!((r.out_class.rate, r.out_class.ceil), (Kbps(125), Kbps(125)));
        assert_eq!(r.in_class.rate, Kbps(1000));
        let meta = parse_meta_comment(r.rules[1].split('"').nth(1).unwrap()).unwrap();
        assert_eq!((meta.id, meta.slot, meta.kind.as_str()), (42, 3, "remark"));
        assert_eq!(meta.fingerprint, r.fingerprint);
    }

    #[test]
    fn shape_change_keeps_the_fingerprint() {
        let a = render(
            &layout(),
            &decision(
                1,
                OutOfProfileAction::Accept {
                    shape: Some(Kbps(875)),
                },
            ),
            0,
        )
        .unwrap();
        let b = render(
            &layout(),
            &decision(
                1,
                OutOfProfileAction::Accept {
                    shape: Some(Kbps(500)),
                },
            ),
            0,
        )
        .unwrap();
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_ne!(a.out_class, b.out_class);
        let c = render(&layout(), &decision(1, OutOfProfileAction::Drop), 0).unwrap();
        assert_ne!(a.fingerprint, c.fingerprint);
        assert!(c.rules[0].contains("counter drop"));
    }

    #[test]
    fn flow_matches() {
        let mut s = FlowSpec::default();
        assert_eq!(flow_match(&s).unwrap(), "meta nfproto ipv4");
        s.proto = Some(17);
        assert_eq!(flow_match(&s).unwrap(), "meta nfproto ipv4 meta l4proto 17");
        s.dst = Some("2001:db8::/32".parse().unwrap());
        s.src_ports = Some("1024-2048".parse().unwrap());
        assert_eq!(
            flow_match(&s).unwrap(),
            "ip6 daddr 2001:db8::/32 udp sport 1024-2048"
        );
        s.src = Some("10.0.0.1".parse().unwrap());
        assert!(matches!(
            flow_match(&s),
            Err(SpecError::MixedFamilies { .. })
        ));
        let p = FlowSpec {
            proto: Some(1),
            dst_ports: Some("80".parse().unwrap()),
            ..FlowSpec::default()
        };
        assert!(matches!(
            flow_match(&p),
            Err(SpecError::PortsWithoutPortProtocol(Some(1)))
        ));
    }

    #[test]
    fn slots_map_to_minors_and_back() {
        assert_eq!(Layout::slot_minors(0), (0x100, 0x101));
        assert_eq!(Layout::slot_of_minor(0x107), Some(3));
        assert_eq!(Layout::slot_of_minor(2), None);
        let (_, last) = Layout::slot_minors(MAX_SLOTS - 1);
        assert!(last > 0x101);
    }
}
