//! The bandwidth manager's pure arithmetic, shared by everyone who
//! measures rates: the policy server when it reads records itself, and the
//! collector nodes of a cluster that add each record to per-window partial
//! sums as they store it (`docs/cluster.md`).
//!
//! - [`Classifier`]: which policed flow (the enabled business rule of
//!   highest priority that selects the record) and which links a record
//!   counts for — the bandwidth manager's *rate subjects*, its routing key;
//! - [`window::TimeBuckets`]: a record's bytes spread evenly over the
//!   capture time it covers, taken out per window;
//! - [`scaled`]: counters scaled by the record's sampling interval;
//! - [`rate_kbps`] and [`ewma`]: a window's rate and its moving average,
//!   the same for a policed flow, a link and a user of a per-user rule
//!   ([`Subjects::user`]).

pub mod window;

use crate::{BusinessRule, FlowRecord, PolicySet};
use std::collections::HashMap;
use std::net::IpAddr;

/// The record with its counters scaled by its 1-in-N sampling interval:
/// what the traffic was, for everything that computes rates. Records keep
/// the raw counters and the interval in SQL (IPFIX/NetFlow exporters that
/// sample); a record without an interval counted every packet.
pub fn scaled(mut r: FlowRecord) -> FlowRecord {
    r.packets = scale(r.packets, r.sampling_interval);
    r.bytes = scale(r.bytes, r.sampling_interval);
    r
}

/// One counter of a record scaled by its sampling interval (see
/// [`scaled`]), for code that needs a counter without copying the record.
pub fn scale(v: u64, sampling_interval: Option<u32>) -> u64 {
    match sampling_interval {
        Some(n) if n > 1 => v.saturating_mul(u64::from(n)),
        _ => v,
    }
}

/// The rate of `bytes` over a window of `interval_ns`, in kbit/s.
pub fn rate_kbps(bytes: f64, interval_ns: i64) -> f64 {
    let secs = interval_ns.max(1) as f64 / 1e9;
    bytes * 8.0 / 1000.0 / secs
}

/// The moving average after one more interval:
/// `avgRate_k = w · rate_k + (1 − w) · avgRate_{k−1}`, `avgRate_0 = rate_0`.
pub fn ewma(prev: Option<f64>, rate_kbps: f64, weight: f64) -> f64 {
    match prev {
        Some(prev) => weight * rate_kbps + (1.0 - weight) * prev,
        None => rate_kbps,
    }
}

/// The user of a per-user rule a record counts for: its index in the
/// rule's `users` when the record's `user` is one of them. `None` for a
/// rule that is not per user, or a record of another (or no) user.
pub fn per_user_index(rule: &BusinessRule, r: &FlowRecord) -> Option<usize> {
    if !rule.per_user {
        return None;
    }
    let user = r.user.as_deref()?;
    rule.users.iter().position(|u| u == user)
}

/// True when `rule` selects the record: any of its flow specs matches (or
/// it has none) and its user list names the record's user (or is empty).
/// A rule with neither specs nor users selects nothing.
pub fn rule_selects(rule: &BusinessRule, r: &FlowRecord) -> bool {
    if rule.flows.is_empty() && rule.users.is_empty() {
        return false;
    }
    let spec_ok = rule.flows.is_empty() || rule.flows.iter().any(|f| f.matches(r));
    let user_ok = rule.users.is_empty()
        || r.user
            .as_deref()
            .is_some_and(|u| rule.users.iter().any(|x| x == u));
    rule.enabled && spec_ok && user_ok
}

/// The kind of a rate subject, as stored in `rates.subject`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SubjectKind {
    /// A policed flow: one business rule, keyed by its DN.
    Flow,
    /// A link, keyed by its name.
    Link,
    /// A user of a per-user rule, keyed by [`user_subject`].
    User,
}

/// The key of the subject "user `user` of the per-user rule `rule_dn`"
/// (kind [`SubjectKind::User`]): the user, `@`, the rule's DN — its
/// routing key in a cluster and its `name` in table `rates`. Nobody parses
/// it back: readers build it from the policy.
pub fn user_subject(rule_dn: &str, user: &str) -> String {
    format!("{user}@{rule_dn}")
}

impl SubjectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SubjectKind::Flow => "flow",
            SubjectKind::Link => "link",
            SubjectKind::User => "user",
        }
    }

    pub fn parse(s: &str) -> Option<SubjectKind> {
        match s {
            "flow" => Some(SubjectKind::Flow),
            "link" => Some(SubjectKind::Link),
            "user" => Some(SubjectKind::User),
            _ => None,
        }
    }
}

/// What a record counts for under one policy: indexes into the policy's
/// `rules` and `links`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Subjects {
    pub rule: Option<usize>,
    /// When `rule` is per user: the index of the record's user in the
    /// rule's `users` (the record counts for that user, not the rule).
    pub user: Option<usize>,
    pub links: Vec<usize>,
}

/// Classifies records against one policy without testing every rule.
#[derive(Clone, Debug, Default)]
pub struct Classifier {
    policy: PolicySet,
    index: RuleIndex,
    /// Per rule: the [`user_subject`] key of each of its users (empty for
    /// a rule that is not per user).
    user_keys: Vec<Vec<String>>,
}

impl Classifier {
    pub fn new(policy: &PolicySet) -> Classifier {
        Classifier {
            index: RuleIndex::build(&policy.rules),
            user_keys: policy
                .rules
                .iter()
                .map(|r| {
                    if r.per_user {
                        r.users.iter().map(|u| user_subject(&r.dn, u)).collect()
                    } else {
                        Vec::new()
                    }
                })
                .collect(),
            policy: policy.clone(),
        }
    }

    pub fn policy(&self) -> &PolicySet {
        &self.policy
    }

    /// The policed flow (the selecting rule of highest priority) and every
    /// link whose traffic the record matches.
    pub fn classify(&self, r: &FlowRecord) -> Subjects {
        let rules = &self.policy.rules;
        let candidates = self
            .index
            .by_hosts
            .get(&(r.src_addr, r.dst_addr))
            .into_iter()
            .flatten()
            .chain(self.index.others.iter());
        let mut best: Option<usize> = None;
        for &i in candidates {
            if rule_selects(&rules[i], r)
                && best.is_none_or(|b| rules[i].priority > rules[b].priority)
            {
                best = Some(i);
            }
        }
        let links = self
            .policy
            .links
            .iter()
            .enumerate()
            .filter(|(_, l)| l.traffic.is_empty() || l.traffic.iter().any(|f| f.matches(r)))
            .map(|(i, _)| i)
            .collect();
        let user = best.and_then(|i| per_user_index(&rules[i], r));
        Subjects {
            rule: best,
            user,
            links,
        }
    }

    /// The subjects a record counts for, as `(kind, key)`: the rule's DN,
    /// or for a per-user rule the [`user_subject`] of the record's user
    /// (a per-user rule is no subject of its own); the links' names.
    pub fn subject_keys(&self, r: &FlowRecord) -> Vec<(SubjectKind, &str)> {
        let s = self.classify(r);
        let rule = s.rule.and_then(|i| {
            if self.policy.rules[i].per_user {
                let key = self.user_keys.get(i)?.get(s.user?)?;
                Some((SubjectKind::User, key.as_str()))
            } else {
                Some((SubjectKind::Flow, self.policy.rules[i].dn.as_str()))
            }
        });
        rule.into_iter()
            .chain(
                s.links
                    .iter()
                    .map(|&i| (SubjectKind::Link, self.policy.links[i].name.as_str())),
            )
            .collect()
    }
}

/// Finds the rule a record belongs to without testing every rule: rules
/// whose specs name a source and destination host are indexed by that pair.
#[derive(Clone, Debug, Default)]
struct RuleIndex {
    by_hosts: HashMap<(IpAddr, IpAddr), Vec<usize>>,
    others: Vec<usize>,
}

impl RuleIndex {
    fn build(rules: &[BusinessRule]) -> RuleIndex {
        let mut idx = RuleIndex::default();
        for (i, r) in rules.iter().enumerate() {
            if !r.enabled {
                continue;
            }
            let hosts: Option<Vec<(IpAddr, IpAddr)>> = if r.users.is_empty() && !r.flows.is_empty()
            {
                r.flows
                    .iter()
                    .map(|f| match (f.src, f.dst) {
                        (Some(s), Some(d)) if s.is_host() && d.is_host() => {
                            Some((s.addr(), d.addr()))
                        }
                        _ => None,
                    })
                    .collect()
            } else {
                None
            };
            match hosts {
                Some(pairs) => {
                    for p in pairs {
                        let v = idx.by_hosts.entry(p).or_default();
                        if !v.contains(&i) {
                            v.push(i);
                        }
                    }
                }
                None => idx.others.push(i),
            }
        }
        idx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FlowSpec;

    fn rule(users: &[&str], per_user: bool) -> BusinessRule {
        BusinessRule {
            dn: "cn=r".into(),
            name: "r".into(),
            priority: 0,
            enabled: true,
            roles: vec!["host".into()],
            flows: vec![],
            users: users.iter().map(|u| u.to_string()).collect(),
            per_user,
            band_basis: Default::default(),
            service_class: "c".into(),
            link: "l".into(),
        }
    }

    fn record(user: Option<&str>) -> FlowRecord {
        FlowRecord {
            src_addr: "10.0.0.1".parse().unwrap(),
            dst_addr: "10.0.0.2".parse().unwrap(),
            proto: 17,
            bytes: 1000,
            user: user.map(str::to_owned),
            ..FlowRecord::default()
        }
    }

    #[test]
    fn per_user_rules_count_each_user_apart() {
        let policy = PolicySet {
            rules: vec![rule(&["alice", "bob"], true)],
            ..PolicySet::default()
        };
        let c = Classifier::new(&policy);
        assert_eq!(c.classify(&record(Some("bob"))).user, Some(1));
        assert_eq!(c.classify(&record(Some("alice"))).user, Some(0));
        assert_eq!(c.classify(&record(Some("carol"))).rule, None);
        assert_eq!(c.classify(&record(None)).rule, None);
        // Not per user: one subject for both, no user index.
        let policy = PolicySet {
            rules: vec![rule(&["alice", "bob"], false)],
            ..PolicySet::default()
        };
        let s = Classifier::new(&policy).classify(&record(Some("bob")));
        assert_eq!((s.rule, s.user), (Some(0), None));
    }

    #[test]
    fn a_per_user_rules_records_count_for_their_user_subject() {
        let policy = PolicySet {
            rules: vec![rule(&["alice", "bob"], true)],
            ..PolicySet::default()
        };
        let c = Classifier::new(&policy);
        assert_eq!(user_subject("cn=r", "bob"), "bob@cn=r");
        assert_eq!(
            c.subject_keys(&record(Some("bob"))),
            [(SubjectKind::User, "bob@cn=r")]
        );
        assert!(c.subject_keys(&record(Some("carol"))).is_empty());
        let policy = PolicySet {
            rules: vec![rule(&["alice", "bob"], false)],
            ..PolicySet::default()
        };
        assert_eq!(
            Classifier::new(&policy).subject_keys(&record(Some("bob"))),
            [(SubjectKind::Flow, "cn=r")]
        );
        for k in [SubjectKind::Flow, SubjectKind::Link, SubjectKind::User] {
            assert_eq!(SubjectKind::parse(k.as_str()), Some(k));
        }
    }

    #[test]
    fn a_user_in_a_flow_spec_matches_that_users_records() {
        let spec = FlowSpec {
            user: Some(crate::UserRef::named("alice")),
            ..FlowSpec::default()
        };
        assert!(spec.matches(&record(Some("alice"))));
        assert!(!spec.matches(&record(Some("bob"))));
        assert!(!spec.matches(&record(None)));
    }

    #[test]
    fn the_ewma_is_the_documented_formula() {
        assert_eq!(rate_kbps(125_000.0, 1_000_000_000), 1000.0);
        assert_eq!(ewma(None, 1000.0, 0.5), 1000.0);
        assert_eq!(ewma(Some(1000.0), 3000.0, 0.5), 2000.0);
        assert_eq!(ewma(Some(1000.0), 3000.0, 1.0), 3000.0);
    }
}
