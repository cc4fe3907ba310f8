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
//! - [`scaled`]: counters scaled by the record's sampling interval.

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
}

impl SubjectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SubjectKind::Flow => "flow",
            SubjectKind::Link => "link",
        }
    }

    pub fn parse(s: &str) -> Option<SubjectKind> {
        match s {
            "flow" => Some(SubjectKind::Flow),
            "link" => Some(SubjectKind::Link),
            _ => None,
        }
    }
}

/// What a record counts for under one policy: indexes into the policy's
/// `rules` and `links`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Subjects {
    pub rule: Option<usize>,
    pub links: Vec<usize>,
}

/// Classifies records against one policy without testing every rule.
#[derive(Clone, Debug, Default)]
pub struct Classifier {
    policy: PolicySet,
    index: RuleIndex,
}

impl Classifier {
    pub fn new(policy: &PolicySet) -> Classifier {
        Classifier {
            index: RuleIndex::build(&policy.rules),
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
        Subjects { rule: best, links }
    }

    /// The subjects a record counts for, as `(kind, key)`: the rule's DN,
    /// the links' names.
    pub fn subject_keys(&self, r: &FlowRecord) -> Vec<(SubjectKind, &str)> {
        let s = self.classify(r);
        s.rule
            .map(|i| (SubjectKind::Flow, self.policy.rules[i].dn.as_str()))
            .into_iter()
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
