//! The policy model (three tiers, DESIGN.md §5) and what flows out of it:
//! decisions for enforcers and their reports back (DESIGN.md §6).
//!
//! Tier 1 ([`BusinessRule`]) says who gets which service class; tier 2
//! ([`ServiceClass`], [`Link`]) what a class means — profile, in-profile
//! marking, out-of-profile treatment per link-load band; tier 3
//! ([`DeviceRole`]) where an enforcer renders it.

use crate::flow::FlowRecord;
use crate::units::{Dscp, IpPrefix, Kbps, PortRange};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Which packets a rule, link or decision is about. Absent fields match all.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FlowSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<IpPrefix>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<IpPrefix>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_ports: Option<PortRange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_ports: Option<PortRange>,
    /// The local user whose sockets send or receive the traffic: set on
    /// per-user decisions (absent in older messages: any user). Records
    /// match by name; an enforcer on the user's host matches the uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<UserRef>,
}

/// A local user as a per-user decision names it: the name records carry
/// (`FlowRecord::user`) and, when the policy server knows it, the uid. An
/// enforcer resolves a missing uid from the name through its own host's
/// user database.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UserRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
}

impl UserRef {
    pub fn named(name: &str) -> UserRef {
        UserRef {
            name: name.to_owned(),
            uid: None,
        }
    }
}

impl fmt::Display for UserRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.uid {
            Some(uid) => write!(f, "{} (uid {uid})", self.name),
            None => f.write_str(&self.name),
        }
    }
}

impl FlowSpec {
    pub fn matches(&self, r: &FlowRecord) -> bool {
        self.src.is_none_or(|p| p.contains(r.src_addr))
            && self.dst.is_none_or(|p| p.contains(r.dst_addr))
            && self.proto.is_none_or(|p| p == r.proto)
            && self.src_ports.is_none_or(|p| p.contains(r.src_port))
            && self.dst_ports.is_none_or(|p| p.contains(r.dst_port))
            && self
                .user
                .as_ref()
                .is_none_or(|u| r.user.as_deref() == Some(u.name.as_str()))
    }

    /// True when `self` and `other` can match a common packet.
    pub fn overlaps(&self, other: &FlowSpec) -> bool {
        fn pfx(a: Option<IpPrefix>, b: Option<IpPrefix>) -> bool {
            match (a, b) {
                (Some(a), Some(b)) => {
                    let shorter = if a.prefix_len() <= b.prefix_len() {
                        a
                    } else {
                        b
                    };
                    let longer = if a.prefix_len() <= b.prefix_len() {
                        b
                    } else {
                        a
                    };
                    shorter.contains(longer.addr())
                }
                _ => true,
            }
        }
        fn ports(a: Option<PortRange>, b: Option<PortRange>) -> bool {
            match (a, b) {
                (Some(a), Some(b)) => a.first <= b.last && b.first <= a.last,
                _ => true,
            }
        }
        pfx(self.src, other.src)
            && pfx(self.dst, other.dst)
            && match (self.proto, other.proto) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
            && ports(self.src_ports, other.src_ports)
            && ports(self.dst_ports, other.dst_ports)
            && match (&self.user, &other.user) {
                (Some(a), Some(b)) => match (a.uid, b.uid) {
                    (Some(x), Some(y)) => x == y,
                    _ => a.name == b.name,
                },
                _ => true,
            }
    }
}

impl fmt::Display for FlowSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let any = |o: Option<String>| o.unwrap_or_else(|| "*".into());
        write!(
            f,
            "{}:{} -> {}:{} proto {}",
            any(self.src.map(|p| p.to_string())),
            any(self.src_ports.map(|p| p.to_string())),
            any(self.dst.map(|p| p.to_string())),
            any(self.dst_ports.map(|p| p.to_string())),
            any(self.proto.map(|p| p.to_string())),
        )?;
        match &self.user {
            Some(u) => write!(f, " user {u}"),
            None => Ok(()),
        }
    }
}

/// Tier 1: who gets which service class, on which link, for which roles.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusinessRule {
    pub dn: String,
    pub name: String,
    /// Higher wins (RFC 3703 `pcimRulePriority`).
    pub priority: u32,
    pub enabled: bool,
    /// Enforcer roles the rule is rendered for (RFC 3703 `pcimRoles`).
    pub roles: Vec<String>,
    /// Traffic the rule selects (DNF: any spec may match).
    pub flows: Vec<FlowSpec>,
    /// Users the rule selects, matched against records' `user` (with
    /// `per_user`, the members of the rule's groups too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    /// Each user of `users` separately: its own rate, its own decision
    /// (for the enforcer on the user's host), instead of one policed flow
    /// for all of them together.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub per_user: bool,
    /// What selects the out-of-profile band: the link's load (the paper)
    /// or, for a per-user rule, the user's own average rate.
    #[serde(default, skip_serializing_if = "BandBasis::is_link")]
    pub band_basis: BandBasis,
    /// Name of the [`ServiceClass`].
    pub service_class: String,
    /// Name of the [`Link`] whose load selects the out-of-profile band.
    pub link: String,
}

/// What selects a rule's out-of-profile band (see [`BusinessRule::band_basis`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BandBasis {
    /// The average load of the rule's link.
    #[default]
    Link,
    /// The average rate of the policed subject itself (a user's own
    /// traffic: `seeds/000`'s threshold case).
    User,
}

impl BandBasis {
    pub fn is_link(&self) -> bool {
        *self == BandBasis::Link
    }
}

/// A traffic profile: the committed rate and burst of a token bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TrafficProfile {
    pub rate: Kbps,
    pub burst_bytes: u64,
}

/// The bytes of one full-size Ethernet frame: the unit of the burst floor.
pub const MTU_BYTES: u64 = 1514;

impl TrafficProfile {
    /// The burst of a flow's meter, in bytes: the decision's burst, but at
    /// least 20 ms of the profile rate and at least two full-size frames (so
    /// that a flow at its profile rate is never metered out of profile by the
    /// jitter of its own packets), and at most 4 GiB − 1.
    ///
    /// The kernel's byte bucket holds one second of the rate *plus* this burst
    /// (`tokens_max = unit × (rate + burst) / rate`, the unit at least one
    /// second), so over any window of `T` seconds a flow passes at most
    /// `rate × (T + 1 s) + burst` bytes in profile — see [`Self::bucket_bytes`].
    pub fn meter_burst_bytes(&self) -> u32 {
        let floor = (self.rate.bytes_per_sec() / 50).max(2 * MTU_BYTES);
        self.burst_bytes.max(floor).min(u64::from(u32::MAX)) as u32
    }

    /// The depth of the kernel's bucket: what a flow can send in profile at
    /// once after being idle, and the bound of the in-profile bytes over any
    /// window of `T` seconds beyond `rate × T`.
    pub fn bucket_bytes(&self) -> u64 {
        self.rate.bytes_per_sec() + u64::from(self.meter_burst_bytes())
    }
}

/// What happens to traffic above its profile, in one link-load band.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum OutOfProfileAction {
    /// Forward it, shaped to `shape` when given.
    Accept {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        shape: Option<Kbps>,
    },
    /// Re-mark it to `dscp` and forward it, shaped to `shape` when given.
    Remark {
        dscp: Dscp,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        shape: Option<Kbps>,
    },
    /// Drop it.
    Drop,
}

impl OutOfProfileAction {
    pub fn kind(&self) -> DecisionKind {
        match self {
            OutOfProfileAction::Accept { .. } => DecisionKind::Accept,
            OutOfProfileAction::Remark { .. } => DecisionKind::Remark,
            OutOfProfileAction::Drop => DecisionKind::Drop,
        }
    }
    pub fn shape(&self) -> Option<Kbps> {
        match self {
            OutOfProfileAction::Accept { shape } | OutOfProfileAction::Remark { shape, .. } => {
                *shape
            }
            OutOfProfileAction::Drop => None,
        }
    }
}

/// One link-load band of a service class: `[from, to)` in kbit/s.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LoadBand {
    /// `low`, `medium`, `high`, or the operator's own name.
    pub name: String,
    pub from: Kbps,
    /// Exclusive upper bound; `None` is unbounded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Kbps>,
    pub action: OutOfProfileAction,
}

impl LoadBand {
    pub fn contains(&self, load: Kbps) -> bool {
        self.from <= load && self.to.is_none_or(|to| load < to)
    }
}

/// Tier 2: a service class.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceClass {
    pub dn: String,
    pub name: String,
    pub profile: TrafficProfile,
    /// DSCP that in-profile packets are marked with (e.g. CS6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_profile_dscp: Option<Dscp>,
    /// Bands ordered by `from`, covering `[0, ∞)` without gaps.
    pub out_of_profile: Vec<LoadBand>,
}

impl ServiceClass {
    /// The service class of the reference experiment (DESIGN.md §1, the
    /// sample policy's `gold`): 1000 kbit/s profile, CS6 in profile; out of
    /// profile accept shaped 875 kbit/s below 3000, re-mark BE shaped 125
    /// below 6000, drop above.
    pub fn paper(dn: &str) -> ServiceClass {
        let band = |name: &str, from: u64, to: Option<u64>, action| LoadBand {
            name: name.into(),
            from: Kbps(from),
            to: to.map(Kbps),
            action,
        };
        ServiceClass {
            dn: dn.into(),
            name: "gold".into(),
            profile: TrafficProfile {
                rate: Kbps(1000),
                burst_bytes: 15_000,
            },
            in_profile_dscp: Some(Dscp::CS6),
            out_of_profile: vec![
                band(
                    "low",
                    0,
                    Some(3000),
                    OutOfProfileAction::Accept {
                        shape: Some(Kbps(875)),
                    },
                ),
                band(
                    "medium",
                    3000,
                    Some(6000),
                    OutOfProfileAction::Remark {
                        dscp: Dscp::BEST_EFFORT,
                        shape: Some(Kbps(125)),
                    },
                ),
                band("high", 6000, None, OutOfProfileAction::Drop),
            ],
        }
    }

    /// The band a link load falls in.
    pub fn band_for(&self, load: Kbps) -> Option<&LoadBand> {
        self.out_of_profile.iter().find(|b| b.contains(load))
    }
}

/// Tier 2: a link whose load the bandwidth manager measures.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub dn: String,
    pub name: String,
    pub capacity: Kbps,
    /// Traffic that counts towards the link's load (empty: all records).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic: Vec<FlowSpec>,
}

/// Direction of enforcement on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Egress,
    Ingress,
}

/// Tier 3: how one enforcer role renders decisions on its device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRole {
    pub dn: String,
    pub role: String,
    pub interface: String,
    pub direction: Direction,
    /// Rate of the HTB root: the interface's usable capacity.
    pub capacity: Kbps,
    /// How per-user decisions for this role match the user's traffic
    /// (`qosloopUserMatch`; absent: [`UserMatch::Uid`]).
    #[serde(default, skip_serializing_if = "UserMatch::is_uid")]
    pub user_match: UserMatch,
}

/// How an enforcer role matches a per-user decision's traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UserMatch {
    /// By the user's sockets (`meta skuid`), on the user's own host.
    #[default]
    Uid,
    /// By the user's current addresses (the knowledge base's live
    /// mappings, as source): a router between the users and the rest.
    Address,
}

impl UserMatch {
    pub fn is_uid(&self) -> bool {
        *self == UserMatch::Uid
    }
}

/// Everything the policy repository holds, validated.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySet {
    pub rules: Vec<BusinessRule>,
    pub classes: Vec<ServiceClass>,
    pub links: Vec<Link>,
    pub devices: Vec<DeviceRole>,
}

/// The three outcomes of `seeds/004` Fig. 8 for out-of-profile traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecisionKind {
    Accept,
    Remark,
    Drop,
}

impl fmt::Display for DecisionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DecisionKind::Accept => "accept",
            DecisionKind::Remark => "remark",
            DecisionKind::Drop => "drop",
        })
    }
}

/// Why a decision was taken: the inputs the engine saw.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecisionReason {
    pub rate_kbps: f64,
    pub avg_rate_kbps: f64,
    pub link: String,
    pub link_load_kbps: f64,
    pub band: String,
}

/// One decision for one policed flow, as pushed to the enforcers of `role`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Stable per policed flow: a new decision for the same flow replaces it.
    pub id: u64,
    /// Increases with every change of this decision.
    pub version: u64,
    pub role: String,
    pub policy_dn: String,
    pub flow: FlowSpec,
    pub profile: TrafficProfile,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_profile_dscp: Option<Dscp>,
    pub out_of_profile: OutOfProfileAction,
    pub reason: DecisionReason,
    pub issued_ns: u64,
}

impl Decision {
    pub fn kind(&self) -> DecisionKind {
        self.out_of_profile.kind()
    }
}

/// How an enforcer's attempt to apply a decision ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "lowercase")]
pub enum ReportOutcome {
    Installed,
    Removed,
    Failed { reason: String },
}

/// Most decisions one [`AccountingReport`] carries (the first by id); the
/// rest are counted in `omitted`. About 200 bytes of JSON each: a report
/// stays far below the COPS codec's 1 MiB.
pub const MAX_ACCOUNTED_DECISIONS: usize = 1024;

/// One decision's kernel counters: the nftables meter's in-profile and
/// out-of-profile counters of its rules, as `nft list` shows them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionCounters {
    pub decision_id: u64,
    pub version: u64,
    /// What happens out of profile.
    pub kind: DecisionKind,
    pub in_profile_packets: u64,
    pub in_profile_bytes: u64,
    /// Over the profile: accepted, re-marked or dropped per `kind`.
    pub out_of_profile_packets: u64,
    pub out_of_profile_bytes: u64,
}

/// Most HTB classes one [`AccountingReport`] carries (the first by class
/// id); the rest are counted in `classes_omitted`. About 130 bytes of JSON
/// each.
pub const MAX_ACCOUNTED_CLASSES: usize = 1024;

/// One HTB class's statistics, as the kernel reports them (`tc -s class
/// show`: TCA_STATS2 basic and queue counters).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassCounters {
    /// `major:minor`, hexadecimal as tc prints it (e.g. `1:a`).
    pub classid: String,
    /// The parent's `major:minor`, or `root`.
    pub parent: String,
    pub bytes: u64,
    pub packets: u64,
    pub drops: u64,
    pub overlimits: u64,
    /// Bytes queued when read.
    pub backlog_bytes: u64,
}

/// An enforcer's periodic report of the kernel's counters (COPS RPT with
/// Report-Type Accounting), sent every time it reads them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountingReport {
    /// When the kernel was read, ns since the Unix epoch.
    pub at_ns: u64,
    /// At most [`MAX_ACCOUNTED_DECISIONS`], by decision id.
    pub decisions: Vec<DecisionCounters>,
    /// Decisions in the kernel left out of `decisions`.
    #[serde(default)]
    pub omitted: u64,
    /// The enforcer's HTB classes, at most [`MAX_ACCOUNTED_CLASSES`], by
    /// class id (absent from reports of enforcers that do not send them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<ClassCounters>,
    /// HTB classes left out of `classes`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub classes_omitted: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// An enforcer's report on one decision (COPS RPT).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnforcementReport {
    pub decision_id: u64,
    pub version: u64,
    pub outcome: ReportOutcome,
    /// Time spent changing the kernel, in nanoseconds.
    pub reconfig_ns: u64,
    pub at_ns: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_select_the_papers_actions() {
        let c = ServiceClass::paper("cn=gold");
        let kind = |l| c.band_for(Kbps(l)).map(|b| b.action.kind());
        assert_eq!(kind(0), Some(DecisionKind::Accept));
        assert_eq!(kind(2999), Some(DecisionKind::Accept));
        assert_eq!(kind(3000), Some(DecisionKind::Remark));
        assert_eq!(kind(5999), Some(DecisionKind::Remark));
        assert_eq!(kind(6000), Some(DecisionKind::Drop));
        assert_eq!(kind(1_000_000), Some(DecisionKind::Drop));
    }

    #[test]
    fn flow_spec_matching_and_overlap() {
        let spec = FlowSpec {
            src: Some("172.20.1.2".parse().unwrap()),
            dst: Some("172.20.3.0/24".parse().unwrap()),
            proto: Some(17),
            src_ports: None,
            dst_ports: Some("4055".parse().unwrap()),
            user: None,
        };
        let mut r = FlowRecord {
            src_addr: "172.20.1.2".parse().unwrap(),
            dst_addr: "172.20.3.3".parse().unwrap(),
            src_port: 6055,
            dst_port: 4055,
            proto: 17,
            ..FlowRecord::default()
        };
        assert!(spec.matches(&r));
        r.dst_port = 4056;
        assert!(!spec.matches(&r));
        let wide = FlowSpec {
            dst: Some("172.20.0.0/16".parse().unwrap()),
            ..FlowSpec::default()
        };
        assert!(spec.overlaps(&wide) && wide.overlaps(&spec));
        let tcp = FlowSpec {
            proto: Some(6),
            ..FlowSpec::default()
        };
        assert!(!spec.overlaps(&tcp));
    }

    #[test]
    fn actions_serialise_tagged() {
        let a = OutOfProfileAction::Remark {
            dscp: Dscp::BEST_EFFORT,
            shape: Some(Kbps(125)),
        };
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, r#"{"action":"remark","dscp":"be","shape":125}"#);
        assert_eq!(
            serde_json::from_str::<OutOfProfileAction>(&json).unwrap(),
            a
        );
    }
}
