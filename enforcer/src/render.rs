//! What a decision becomes in the kernel: two HTB classes and one nftables
//! chain, rendered as plain data so that a plan can be diffed and printed.
//!
//! The HTB tree on the enforcer's qdisc `MAJ:` (a byte, `e5` by default):
//! - `MAJ:1` root class (the capacity), `MAJ:2` default class;
//! - decisions live in *groups* of [`SLOTS_PER_GROUP`]: group `G` is the
//!   class `MAJ:(0x100+B)` (`B` the group's byte, see [`Layout::group_byte`];
//!   rate = the sum of its decisions' guaranteed rates, may borrow up to the
//!   capacity) holding a child HTB qdisc `MAJB:` (`MAJ` and `B` as one
//!   16-bit major, e.g. `e500:`) with its root class `MAJB:1` and one
//!   in-profile class `MAJB:2` shared by the group's decisions (rate = the
//!   sum of their profile rates, ceil = capacity, prio 1: nftables already
//!   holds each flow's in-profile traffic to its profile rate). The kernel
//!   walks every class of a qdisc when it creates one, so a flat tree costs
//!   O(n²) to build; groups keep each qdisc at ≤ 258 classes;
//! - decision in slot `S` (group `S / 256`, `k = S % 256`): one class
//!   `MAJB:(0x100+k)` for its out-of-profile traffic (ceil = the shape rate,
//!   guaranteed only a trickle: under congestion it yields to in-profile
//!   traffic; a trickle class for drop). Every HTB class also costs a walk
//!   of a list of all traffic-control blocks of the host when created on a
//!   device without `ndo_setup_tc` (veth, virtio: the indirect offload path,
//!   `flow_indr_dev_setup_offload`), so one class per decision, not two;
//! - `meta priority set MAJB:MIN` steers a packet; a cls_bpf filter on the
//!   root qdisc maps priority major `MAJB` to the group class `MAJ:(0x100+B)`,
//!   whose child qdisc then finds `MAJB:MIN` itself;
//! - chain `dID` in the enforcer's table: a `limit rate over PROFILE burst B`
//!   rule catches out-of-profile packets (accept / re-mark / drop, steered into
//!   the out class), and the next rule marks the rest in-profile and steers
//!   it into the in class;
//! - a rule in the base chain matching the flow and jumping to `dID`.

use crate::tc::{HtbClass, TcHandle};
use qosloop_schema::{Decision, Direction, Dscp, FlowSpec, IpPrefix, Kbps, OutOfProfileAction};
use std::fmt::Write as _;
use std::net::IpAddr;

/// The rate of a class nothing is steered into (HTB needs a rate > 0), and
/// the guarantee of an out-of-profile class.
pub const TRICKLE: Kbps = Kbps(8);
/// Minor of the root class (of the root qdisc and of each group qdisc).
pub const ROOT_MINOR: u16 = 1;
/// Minor of the class unmatched traffic goes to (root qdisc), and of the
/// shared in-profile class (group qdiscs).
pub const DEFAULT_MINOR: u16 = 2;
/// Minor of a group's shared in-profile class.
pub const IN_MINOR: u16 = 2;
/// Minor of group 0's class on the root qdisc; also the first decision
/// class minor inside a group qdisc.
pub const FIRST_GROUP_MINOR: u16 = 0x100;
/// Decisions per group (one class minor each inside the group's qdisc).
pub const SLOTS_PER_GROUP: u32 = 256;
/// Groups per interface: the usable low bytes of group qdisc majors (see
/// [`Layout::group_major`]); every qdisc major 1..fe has at least this many.
pub const MAX_GROUPS: u32 = 224;

/// The kernel keeps a device's qdiscs in a 16-bucket hash keyed by handle
/// (`hash_32(handle, 4)`, `dev->qdisc_hash`). The pfifo leaf of every HTB
/// class has handle 0, so with thousands of classes the bucket of 0 is long,
/// and every lookup of a group qdisc hashed into it (each class message for
/// that group) walks all of them: measured, 10,000 decisions took 1.7 s
/// instead of a fraction. Group qdisc majors avoid that bucket.
fn shares_the_leaf_bucket(major: u16) -> bool {
    let bucket = |v: u32| v.wrapping_mul(0x61C8_8647) >> 28;
    bucket(u32::from(major) << 16) == bucket(0)
}
/// How many decisions fit on one interface.
pub const MAX_SLOTS: u32 = SLOTS_PER_GROUP * MAX_GROUPS;

/// Where the enforcer renders: its interface, qdisc and table.
///
/// Egress (the default): the HTB tree on the interface, the table `inet`
/// with its base chain on the postrouting hook. Ingress: packets arriving on
/// the interface pass a `netdev` table's base chain on the interface's
/// ingress hook, which meters, marks and steers them as on egress and then
/// forwards them (`fwd to`) to an IFB device owned by the enforcer
/// ([`Layout::ifb`]), whose egress carries the HTB tree; the IFB hands them
/// back to the interface's receive path, where the base chain's first rule
/// lets packets with a priority already set pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub interface: String,
    pub direction: Direction,
    /// One byte (1..=fe): group qdisc majors are this byte followed by the group.
    pub qdisc_major: u16,
    pub capacity: Kbps,
}

impl Layout {
    /// The name of the nftables table the enforcer owns on this interface.
    pub fn table(&self) -> String {
        format!("qosloop_{}", self.interface)
    }
    pub fn ingress(&self) -> bool {
        self.direction == Direction::Ingress
    }
    /// The table as nft statements name it: `inet NAME` or `netdev NAME`.
    pub fn nft_table(&self) -> String {
        let family = if self.ingress() { "netdev" } else { "inet" };
        format!("{family} {}", self.table())
    }
    /// The IFB device that carries the HTB tree of ingress enforcement:
    /// `ql` and the interface name, or a hash of it when that is too long.
    pub fn ifb(&self) -> String {
        if self.interface.len() <= 13 {
            format!("ql{}", self.interface)
        } else {
            format!("ql{:08x}", fnv1a(&[&self.interface]) as u32)
        }
    }
    /// Where the HTB tree lives: the interface, or its IFB for ingress.
    pub fn shaping_interface(&self) -> String {
        if self.ingress() {
            self.ifb()
        } else {
            self.interface.clone()
        }
    }
    /// The hook part of the base chain's `add chain` statement.
    pub fn base_chain_spec(&self) -> String {
        if self.ingress() {
            format!(
                "{{ type filter hook ingress device \"{}\" priority filter; policy accept; }}",
                self.interface
            )
        } else {
            "{ type filter hook postrouting priority filter; policy accept; }".to_owned()
        }
    }
    /// The base chain's first rule: on egress, packets leaving through
    /// another interface return at once; on ingress, packets the IFB hands
    /// back (their priority is set) are not handled twice.
    pub fn guard_rule(&self) -> String {
        if self.ingress() {
            "meta priority != 0 accept comment \"guard\"".to_owned()
        } else {
            format!("oifname != \"{}\" accept comment \"guard\"", self.interface)
        }
    }
    /// How a steered packet leaves its decision chain.
    pub fn verdict(&self) -> String {
        if self.ingress() {
            format!("fwd to \"{}\"", self.ifb())
        } else {
            "accept".to_owned()
        }
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
    pub fn group_of(slot: u32) -> u32 {
        slot / SLOTS_PER_GROUP
    }
    /// The low bytes group qdisc majors use, in group order.
    fn group_bytes(&self) -> impl Iterator<Item = u16> + '_ {
        (0..0xffu16)
            .filter(|b| !shares_the_leaf_bucket((self.qdisc_major << 8) | b))
            .take(MAX_GROUPS as usize)
    }
    /// The low byte of group `g`'s qdisc major (`ff` when `g` is out of range).
    pub fn group_byte(&self, g: u32) -> u16 {
        self.group_bytes().nth(g as usize).unwrap_or(0xff)
    }
    /// The major of group `g`'s qdisc: the enforcer's major, then a byte.
    pub fn group_major(&self, g: u32) -> u16 {
        (self.qdisc_major << 8) | self.group_byte(g)
    }
    /// The group whose qdisc has major `major`, if it is one of ours.
    pub fn group_of_major(&self, major: u16) -> Option<u32> {
        if major >> 8 != self.qdisc_major {
            return None;
        }
        self.group_bytes()
            .position(|b| b == major & 0xff)
            .map(|g| g as u32)
    }
    /// Group `g`'s class on the root qdisc, guaranteeing `rate`: minor
    /// `0x100 + its byte` (what the steering program computes).
    pub fn group_class(&self, g: u32, rate: Kbps) -> HtbClass {
        HtbClass {
            classid: self.handle(FIRST_GROUP_MINOR + self.group_byte(g)),
            parent: self.handle(ROOT_MINOR),
            rate,
            ceil: self.capacity,
            prio: 1,
        }
    }
    /// The group a root-qdisc class minor stands for.
    pub fn group_of_minor(&self, minor: u16) -> Option<u32> {
        let b = minor.checked_sub(FIRST_GROUP_MINOR)?;
        self.group_bytes().position(|x| x == b).map(|g| g as u32)
    }
    /// The root class of group `g`'s qdisc (never limits: the group class does).
    pub fn group_root(&self, g: u32) -> HtbClass {
        HtbClass {
            classid: TcHandle::new(self.group_major(g), ROOT_MINOR),
            parent: TcHandle::new(self.group_major(g), 0),
            rate: self.capacity,
            ceil: self.capacity,
            prio: 0,
        }
    }
    /// Group `g`'s in-profile class, shared by its decisions: `rate` is
    /// the sum of their profile rates.
    pub fn group_in_class(&self, g: u32, rate: Kbps) -> HtbClass {
        HtbClass {
            classid: TcHandle::new(self.group_major(g), IN_MINOR),
            parent: TcHandle::new(self.group_major(g), ROOT_MINOR),
            rate,
            ceil: self.capacity,
            prio: 1,
        }
    }
    /// The out-of-profile class id of `slot`.
    pub fn slot_classid(&self, slot: u32) -> TcHandle {
        let major = self.group_major(Self::group_of(slot));
        TcHandle::new(
            major,
            (u32::from(FIRST_GROUP_MINOR) + slot % SLOTS_PER_GROUP) as u16,
        )
    }
    /// The slot a class inside group `g`'s qdisc belongs to, if a decision class.
    pub fn slot_of_class(g: u32, minor: u16) -> Option<u32> {
        let k = u32::from(minor.checked_sub(FIRST_GROUP_MINOR)?);
        (k < SLOTS_PER_GROUP).then_some(g * SLOTS_PER_GROUP + k)
    }
}

/// A decision rendered for the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    pub id: u64,
    pub version: u64,
    pub slot: u32,
    /// The profile rate (what the decision adds to its group's in-profile class).
    pub profile: Kbps,
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
pub fn meta_comment(
    id: u64,
    version: u64,
    slot: u32,
    kind: &str,
    fp: u64,
    profile: Kbps,
) -> String {
    format!(
        "in id={id} v={version} slot={slot} kind={kind} fp={fp:016x} p={}",
        profile.0
    )
}

/// What `meta_comment` wrote, read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainMeta {
    pub id: u64,
    pub version: u64,
    pub slot: u32,
    pub kind: String,
    pub fingerprint: u64,
    /// The profile rate, kbit/s.
    pub profile: Kbps,
}

pub fn parse_meta_comment(c: &str) -> Option<ChainMeta> {
    let mut words = c.split_whitespace();
    if words.next()? != "in" {
        return None;
    }
    let (mut id, mut version, mut slot, mut kind, mut fp) = (None, None, None, None, None);
    let mut profile = None;
    for w in words {
        let (k, v) = w.split_once('=')?;
        match k {
            "id" => id = v.parse().ok(),
            "v" => version = v.parse().ok(),
            "slot" => slot = v.parse().ok(),
            "kind" => kind = Some(v.to_owned()),
            "fp" => fp = u64::from_str_radix(v, 16).ok(),
            "p" => profile = v.parse().ok().map(Kbps),
            _ => {}
        }
    }
    Some(ChainMeta {
        id: id?,
        version: version?,
        slot: slot?,
        kind: kind?,
        fingerprint: fp?,
        profile: profile?,
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

/// The nft match for a flow spec: for an `inet` table, or a `netdev` one.
pub fn flow_match(spec: &FlowSpec, netdev: bool) -> Result<String, SpecError> {
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
        m.push_str(if netdev {
            "meta protocol ip "
        } else {
            "meta nfproto ipv4 "
        });
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
    let flow = flow_match(&d.flow, layout.ingress())?;
    let v6 = flow.starts_with("ip6 ");
    let group = Layout::group_of(slot);
    let parent = layout.group_root(group).classid;
    let in_classid = layout.group_in_class(group, d.profile.rate).classid;
    // Out of profile: a trickle guaranteed, the shape rate as ceiling (so a
    // shape change is one class message and moves no group rate).
    let out_ceil = match d.out_of_profile.shape() {
        Some(s) => s.max(TRICKLE),
        None if d.out_of_profile == OutOfProfileAction::Drop => TRICKLE,
        None => layout.capacity,
    };
    let out_class = HtbClass {
        classid: layout.slot_classid(slot),
        parent,
        rate: TRICKLE.min(out_ceil),
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
    let verdict = layout.verdict();
    let out_rule = match d.out_of_profile {
        OutOfProfileAction::Accept { .. } => format!(
            "{limit} counter meta priority set {} {verdict} comment \"out\"",
            out_class.classid
        ),
        OutOfProfileAction::Remark { dscp, .. } => format!(
            "{limit} counter {} meta priority set {} {verdict} comment \"out\"",
            dscp_set(v6, dscp),
            out_class.classid
        ),
        OutOfProfileAction::Drop => format!("{limit} counter drop comment \"out\""),
    };
    let mark = d
        .in_profile_dscp
        .map(|dscp| format!("{} ", dscp_set(v6, dscp)))
        .unwrap_or_default();
    let in_body = format!("counter {mark}meta priority set {in_classid} {verdict}");
    let kind = d.kind().to_string();
    let fingerprint = fnv1a(&[&flow, &out_rule, &in_body]);
    let in_rule = format!(
        "{in_body} comment \"{}\"",
        meta_comment(d.id, d.version, slot, &kind, fingerprint, d.profile.rate)
    );
    Ok(Rendered {
        id: d.id,
        version: d.version,
        slot,
        profile: d.profile.rate,
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
            direction: Direction::Egress,
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
            "limit rate over 125000 bytes/second burst 15000 bytes counter ip dscp set 0 meta priority set e500:103 accept comment \"out\""
        );
        assert!(r.rules[1].starts_with("counter ip dscp set 48 meta priority set e500:2 accept comment \"in id=42 v=1 slot=3 kind=remark fp="));
        assert_eq!((r.out_class.rate, r.out_class.ceil), (TRICKLE, Kbps(125)));
        assert_eq!(r.out_class.parent, TcHandle::new(0xe500, 1));
        assert_eq!(r.profile, Kbps(1000));
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
        assert_eq!(flow_match(&s, false).unwrap(), "meta nfproto ipv4");
        assert_eq!(flow_match(&s, true).unwrap(), "meta protocol ip");
        s.proto = Some(17);
        assert_eq!(
            flow_match(&s, false).unwrap(),
            "meta nfproto ipv4 meta l4proto 17"
        );
        s.dst = Some("2001:db8::/32".parse().unwrap());
        s.src_ports = Some("1024-2048".parse().unwrap());
        assert_eq!(
            flow_match(&s, false).unwrap(),
            "ip6 daddr 2001:db8::/32 udp sport 1024-2048"
        );
        s.src = Some("10.0.0.1".parse().unwrap());
        assert!(matches!(
            flow_match(&s, false),
            Err(SpecError::MixedFamilies { .. })
        ));
        let p = FlowSpec {
            proto: Some(1),
            dst_ports: Some("80".parse().unwrap()),
            ..FlowSpec::default()
        };
        assert!(matches!(
            flow_match(&p, false),
            Err(SpecError::PortsWithoutPortProtocol(Some(1)))
        ));
    }

    #[test]
    fn slots_map_to_groups_and_back() {
        let l = layout();
        assert_eq!(l.slot_classid(0), TcHandle::new(0xe500, 0x100));
        assert_eq!(Layout::slot_of_class(1, 0x105), Some(261));
        assert_eq!(Layout::slot_of_class(0, 1), None);
        assert_eq!(Layout::slot_of_class(0, 0x100 + 256), None);
        assert_eq!(
            l.group_in_class(0, Kbps(5)).classid,
            TcHandle::new(0xe500, IN_MINOR)
        );
        // e501: shares the kernel's hash bucket with the leaf qdiscs: skipped.
        assert!(shares_the_leaf_bucket(0xe501));
        assert_eq!(l.slot_classid(260), TcHandle::new(0xe502, 0x104));
        assert_eq!(l.group_of_major(0xe502), Some(1));
        assert_eq!(l.group_of_major(0xe501), None);
        assert_eq!(l.group_of_major(0xe5ff), None);
        assert_eq!(l.group_of_major(0xe602), None);
        assert_eq!(
            l.group_class(1, Kbps(5)).classid,
            TcHandle::new(0xe5, 0x102)
        );
        assert_eq!(l.group_of_minor(0x102), Some(1));
        assert_eq!(l.group_of_minor(0x101), None);
        assert_eq!(l.group_of_minor(2), None);
        let last = l.slot_classid(MAX_SLOTS - 1);
        assert_eq!(last.minor(), 0x1ff);
        assert_ne!(last.major() & 0xff, 0xff);
        // Every usable qdisc major has MAX_GROUPS groups, all distinct.
        for major in 1..=0xfe {
            let l = Layout {
                qdisc_major: major,
                ..layout()
            };
            let bytes: Vec<u16> = l.group_bytes().collect();
            assert_eq!(bytes.len(), MAX_GROUPS as usize, "major {major:x}");
            assert!(bytes
                .iter()
                .all(|b| *b < 0xff && !shares_the_leaf_bucket((major << 8) | b)));
        }
    }
}
