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
//! - the named limit object `lID` (rate = the profile, burst from
//!   [`meter_burst_bytes`]): the flow's token bucket, which lives as long as
//!   the decision, whatever its action becomes;
//! - chain `dID` in the enforcer's table: a `limit name "lID"` rule catches
//!   out-of-profile packets (accept / re-mark / drop, steered into the out
//!   class), and the next rule marks the rest in-profile and steers it into
//!   the in class;
//! - an element of the verdict map of the flow's shape jumping to `dID`
//!   ([`classify`]), or a rule in the fallback chain when the flow names no
//!   field.

use crate::nft::model::{Hook, IpFamily, Limit, Rule, Stmt, TableId};
use crate::tc::{HtbClass, TcHandle};
use qosloop_schema::{Decision, Direction, Kbps, OutOfProfileAction};

mod classify;
mod meta;

pub use classify::{
    base_rules, classify, fallback_match, fallback_order, family, lookup_rule, reply_rule,
    user_ct_mark, Classify, FallbackOrder, SpecError,
};
pub use meta::{meta_comment, parse_meta_comment, ChainMeta};

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
    /// The table as a typed id.
    pub fn table_id(&self) -> TableId {
        TableId {
            netdev: self.ingress(),
            name: self.table(),
        }
    }
    /// The base chain's hook.
    pub fn hook(&self) -> Hook {
        if self.ingress() {
            Hook::Ingress {
                device: self.interface.clone(),
            }
        } else {
            Hook::Postrouting
        }
    }
    /// The base chain's first rule: on egress, packets leaving through
    /// another interface return at once; on ingress, packets the IFB hands
    /// back (their priority is set) are not handled twice.
    pub fn guard_rule(&self) -> Rule {
        let test = if self.ingress() {
            Stmt::PriorityNotZero
        } else {
            Stmt::OifnameNot(self.interface.clone())
        };
        Rule {
            stmts: vec![test, Stmt::Accept],
            comment: Some("guard".into()),
        }
    }
    /// How a steered packet leaves its decision chain (`ifb_index`: the IFB
    /// device's index, for ingress).
    pub fn verdict(&self, ifb_index: u32) -> Stmt {
        if self.ingress() {
            Stmt::Fwd {
                device: self.ifb(),
                ifindex: ifb_index,
            }
        } else {
            Stmt::Accept
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
    /// The decision's flow.
    pub flow: qosloop_schema::FlowSpec,
    /// How packets reach chain `dID` when its flow overlaps no other
    /// decision's (else it is a fallback rule: see the enforcer's plan).
    pub classify: Classify,
    /// The flow's meter: a named limit object that outlives rule changes.
    pub limit: Limit,
    /// The rules of chain `dID`.
    pub rules: Vec<Rule>,
    /// FNV-1a of the classification, meter and rules: equal means the same
    /// nftables objects.
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

/// The name of decision `id`'s limit object.
pub fn limit_name(id: u64) -> String {
    format!("l{id}")
}

/// The comments of a per-user decision's IPv6 rules (a flow of both
/// families: see [`render`]); their counters add to the `out` rule's and
/// the in rule's.
pub const OUT6_COMMENT: &str = "out6";
pub const IN6_COMMENT: &str = "in6";
/// The comment of a shaping per-user decision's rule that polices what its
/// user receives (see [`render`]).
pub const POLICE_COMMENT: &str = "replies";

/// The chain holding the rules of decisions that are not map keys.
pub const FALLBACK_CHAIN: &str = "fallback";

/// The base chain on the input hook of an egress table: one rule per
/// per-user decision, matching the inbound packets of the connections it
/// tagged on the way out ([`reply_rule`]).
pub const REPLIES_CHAIN: &str = "replies";

/// The bytes of one full-size Ethernet frame: the unit of the burst floor
/// (the token-bucket contract lives with [`qosloop_schema::TrafficProfile`]).
pub use qosloop_schema::MTU_BYTES;

/// The burst of a flow's meter, in bytes ([`TrafficProfile::meter_burst_bytes`]).
///
/// [`TrafficProfile::meter_burst_bytes`]: qosloop_schema::TrafficProfile::meter_burst_bytes
pub fn meter_burst_bytes(profile: &qosloop_schema::TrafficProfile) -> u32 {
    profile.meter_burst_bytes()
}

/// The depth of the kernel's bucket for `profile` ([`TrafficProfile::bucket_bytes`]).
///
/// [`TrafficProfile::bucket_bytes`]: qosloop_schema::TrafficProfile::bucket_bytes
pub fn bucket_bytes(profile: &qosloop_schema::TrafficProfile) -> u64 {
    profile.bucket_bytes()
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

/// Renders `d` into `slot` of `layout` (`ifb_index`: the IFB device of
/// ingress enforcement). The decision must have been validated.
pub fn render(
    layout: &Layout,
    d: &Decision,
    slot: u32,
    ifb_index: u32,
) -> Result<Rendered, SpecError> {
    let classify = classify(&d.flow, layout.ingress())?;
    let fam = family(&d.flow)?;
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
    let limit = Limit {
        name: limit_name(d.id),
        bytes_per_sec: d.profile.rate.bytes_per_sec(),
        burst_bytes: meter_burst_bytes(&d.profile),
    };
    let verdict = layout.verdict(ifb_index);
    // A per-user flow naming no address is of both families (its match
    // names none): a DSCP statement is per family, so the rules that set
    // one come twice, each behind its family test (before the limit, so
    // that a packet takes one token bucket step, not two).
    let both = d.flow.user.is_some() && d.flow.src.is_none() && d.flow.dst.is_none();
    let out_stmts = |fam: IpFamily| {
        let mut out = vec![Stmt::LimitRef(limit.name.clone()), Stmt::Counter];
        match d.out_of_profile {
            OutOfProfileAction::Accept { .. } => {
                out.extend([Stmt::PrioritySet(out_class.classid), verdict.clone()]);
            }
            OutOfProfileAction::Remark { dscp, .. } => out.extend([
                Stmt::DscpSet {
                    family: fam,
                    dscp: dscp.value(),
                },
                Stmt::PrioritySet(out_class.classid),
                verdict.clone(),
            ]),
            OutOfProfileAction::Drop => out.push(Stmt::Drop),
        }
        out
    };
    let in_stmts = |fam: IpFamily| {
        let mut stmts = vec![Stmt::Counter];
        if let Some(dscp) = d.in_profile_dscp {
            stmts.push(Stmt::DscpSet {
                family: fam,
                dscp: dscp.value(),
            });
        }
        stmts.extend([Stmt::PrioritySet(in_classid), verdict.clone()]);
        stmts
    };
    let family_test = |family: IpFamily| Stmt::Family {
        netdev: false,
        family,
    };
    let remarks = matches!(d.out_of_profile, OutOfProfileAction::Remark { .. });
    let mut rules = Vec::new();
    // What a per-user decision's user receives (the replies chain jumps
    // here from the input hook) has no queue to be shaped in: with a shape
    // rate, received packets beyond the profile plus the shape rate are
    // dropped (policed) — only received packets have an input interface.
    if let (Some(shape), Some(_), false) = (
        d.out_of_profile.shape(),
        d.flow.user.as_ref(),
        layout.ingress(),
    ) {
        rules.push(Rule {
            stmts: vec![
                Stmt::Received,
                Stmt::LimitOver {
                    bytes_per_sec: Kbps(d.profile.rate.0 + shape.0).bytes_per_sec(),
                    burst_bytes: meter_burst_bytes(&d.profile),
                },
                Stmt::Counter,
                Stmt::Drop,
            ],
            comment: Some(POLICE_COMMENT.into()),
        });
    }
    let mut out = out_stmts(fam);
    if both && remarks {
        let mut v6 = vec![family_test(IpFamily::V6)];
        v6.extend(out_stmts(IpFamily::V6));
        rules.push(Rule {
            stmts: v6,
            comment: Some(OUT6_COMMENT.into()),
        });
        out.insert(0, family_test(IpFamily::V4));
    }
    let out_rule = Rule {
        stmts: out,
        comment: Some("out".into()),
    };
    rules.push(out_rule.clone());
    if both && d.in_profile_dscp.is_some() {
        let mut v6 = vec![family_test(IpFamily::V6)];
        v6.extend(in_stmts(IpFamily::V6));
        rules.push(Rule {
            stmts: v6,
            comment: Some(IN6_COMMENT.into()),
        });
    }
    let kind = d.kind().to_string();
    let in_body = Rule {
        stmts: in_stmts(fam),
        comment: None,
    };
    let mut parts = vec![
        format!("{classify:?}"),
        format!("{limit:?}"),
        out_rule.to_string(),
        in_body.to_string(),
    ];
    // The IPv6 rules (none for most decisions: the fingerprint stays).
    parts.extend(
        rules
            .iter()
            .filter(|r| r.comment.as_deref() != Some("out"))
            .map(ToString::to_string),
    );
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    let fingerprint = fnv1a(&parts);
    rules.push(Rule {
        stmts: in_body.stmts,
        comment: Some(meta_comment(
            d.id,
            d.version,
            slot,
            &kind,
            fingerprint,
            &d.profile,
            &d.flow,
        )),
    });
    Ok(Rendered {
        id: d.id,
        version: d.version,
        slot,
        profile: d.profile.rate,
        out_class,
        flow: d.flow.clone(),
        classify,
        limit,
        rules,
        fingerprint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use qosloop_schema::{DecisionReason, Dscp, FlowSpec, TrafficProfile};

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
                user: None,
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
        let r = render(&layout(), &d, 3, 0).unwrap();
        let Classify::Map { shape, key } = &r.classify else {
            panic!("a host flow is a map key: {:?}", r.classify)
        };
        assert_eq!(shape.map_name(), "v4_proto_saddr_daddr_dport");
        assert_eq!(
            crate::nft::model::Key(key).to_string(),
            "udp . 10.1.0.1 . 10.2.0.2 . 5001"
        );
        assert_eq!(
            r.rules[0].to_string(),
            "limit name \"l42\" counter packets 0 bytes 0 ip dscp set cs0 meta priority set e500:103 accept comment \"out\""
        );
        assert!(r.rules[1].to_string().starts_with("counter packets 0 bytes 0 ip dscp set cs6 meta priority set e500:2 accept comment \"in id=42 v=1 slot=3 kind=remark fp="));
        assert_eq!(r.limit.bytes_per_sec, 125_000);
        assert_eq!(r.limit.burst_bytes, 15_000);
        assert_eq!((r.out_class.rate, r.out_class.ceil), (TRICKLE, Kbps(125)));
        assert_eq!(r.out_class.parent, TcHandle::new(0xe500, 1));
        assert_eq!(r.profile, Kbps(1000));
        let meta = parse_meta_comment(r.rules[1].comment.as_deref().unwrap()).unwrap();
        assert_eq!((meta.id, meta.slot, meta.kind.as_str()), (42, 3, "remark"));
        assert_eq!(meta.fingerprint, r.fingerprint);
        assert_eq!(meta.flow, d.flow);
        assert_eq!(meta.burst_bytes, 15_000);
    }

    #[test]
    fn burst_is_sized_from_the_profile() {
        let p = |kbps: u64, burst: u64| TrafficProfile {
            rate: Kbps(kbps),
            burst_bytes: burst,
        };
        // The decision's own burst when above the floors.
        assert_eq!(meter_burst_bytes(&p(1000, 15_000)), 15_000);
        // Two full-size frames at least.
        assert_eq!(meter_burst_bytes(&p(100, 0)), 3028);
        // 20 ms of the rate at least: 100 Mbit/s = 12.5 MB/s → 250 kB.
        assert_eq!(meter_burst_bytes(&p(100_000, 1000)), 250_000);
        assert_eq!(bucket_bytes(&p(1000, 15_000)), 125_000 + 15_000);
    }

    #[test]
    fn shape_change_keeps_the_fingerprint() {
        let accept = |kbps| OutOfProfileAction::Accept {
            shape: Some(Kbps(kbps)),
        };
        let a = render(&layout(), &decision(1, accept(875)), 0, 0).unwrap();
        let b = render(&layout(), &decision(1, accept(500)), 0, 0).unwrap();
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_ne!(a.out_class, b.out_class);
        let c = render(&layout(), &decision(1, OutOfProfileAction::Drop), 0, 0).unwrap();
        assert_ne!(a.fingerprint, c.fingerprint);
        // An action change keeps the meter: same limit object.
        assert_eq!(a.limit, c.limit);
        assert!(c.rules[0]
            .to_string()
            .contains("counter packets 0 bytes 0 drop"));
    }

    #[test]
    fn flows_become_map_keys_or_fallback_rules() {
        let text = |c: &Classify| match c {
            Classify::Map { shape, key } => {
                format!("map {} {}", shape.map_name(), crate::nft::model::Key(key))
            }
            Classify::Rule(stmts) => Rule {
                stmts: stmts.clone(),
                comment: None,
            }
            .to_string(),
        };
        let mut s = FlowSpec::default();
        assert_eq!(text(&classify(&s, false).unwrap()), "meta nfproto ipv4");
        assert_eq!(text(&classify(&s, true).unwrap()), "meta protocol ip");
        s.proto = Some(17);
        assert_eq!(text(&classify(&s, false).unwrap()), "map v4_proto udp");
        s.dst = Some("2001:db8::/32".parse().unwrap());
        s.src_ports = Some("1024-2048".parse().unwrap());
        assert_eq!(
            text(&classify(&s, false).unwrap()),
            "map v6iv_proto_daddr_sport udp . 2001:db8::/32 . 1024-2048"
        );
        // One field that is a prefix: any protocol, in an interval map.
        let wide = FlowSpec {
            dst: Some("10.2.0.0/24".parse().unwrap()),
            ..FlowSpec::default()
        };
        assert_eq!(
            text(&classify(&wide, false).unwrap()),
            "map v4iv_proto_daddr 0-255 . 10.2.0.0/24"
        );
        s.dst = Some("2001:db8::1".parse().unwrap());
        s.src_ports = Some("1024".parse().unwrap());
        assert_eq!(
            text(&classify(&s, false).unwrap()),
            "map v6_proto_daddr_sport udp . 2001:db8::1 . 1024"
        );
        s.src = Some("10.0.0.1".parse().unwrap());
        assert!(matches!(
            classify(&s, false),
            Err(SpecError::MixedFamilies { .. })
        ));
        let p = FlowSpec {
            proto: Some(1),
            dst_ports: Some("80".parse().unwrap()),
            user: None,
            ..FlowSpec::default()
        };
        assert!(matches!(
            classify(&p, false),
            Err(SpecError::PortsWithoutPortProtocol(Some(1)))
        ));
        // The longest key: IPv6 five-tuple, 44 bytes, fits.
        let full = FlowSpec {
            src: Some("2001:db8::1".parse().unwrap()),
            dst: Some("2001:db8::2".parse().unwrap()),
            proto: Some(6),
            src_ports: Some("1".parse().unwrap()),
            dst_ports: Some("2".parse().unwrap()),
            user: None,
        };
        let Classify::Map { shape, .. } = classify(&full, false).unwrap() else {
            panic!()
        };
        assert_eq!(shape.key_len(), 44);
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
