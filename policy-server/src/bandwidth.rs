//! The bandwidth manager's arithmetic: which policed flow and which links a
//! record counts for, the rate over one interval and its EWMA.
//!
//! Per interval `k` of length `Δt_k` (the wall time between two polls) and
//! per subject (a policed flow = one business rule; a link):
//!
//! ```text
//! rate_k    = 8 · Σ bytes of the records that became visible in interval k / Δt_k   [kbit/s]
//! avgRate_k = w · rate_k + (1 − w) · avgRate_{k−1},   avgRate_0 = rate_0,   0 < w ≤ 1
//! ```
//!
//! Records count when they become visible in SQL (see `store::FlowCursor`
//! for how "new" is defined exactly once), so a rate is measured on the
//! timescale of the exporter's cadence (its active timeout) or the poll
//! interval, whichever is longer; the EWMA smooths the jitter of the two
//! clocks beating against each other. A record counts for at most one
//! policed flow — the matching rule with the highest priority — and for
//! every link whose traffic it matches.

use qosloop_schema::{BusinessRule, FlowRecord, PolicySet};
use std::collections::HashMap;
use std::net::IpAddr;

/// Rate and average of one subject after an interval.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SubjectRate {
    /// The rule's DN, or the link's name.
    pub key: String,
    /// The name stored in the `rates` table.
    pub name: String,
    pub rate_kbps: f64,
    pub avg_rate_kbps: f64,
    /// Records counted in this interval.
    pub records: u64,
}

/// Everything measured in one interval.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Rates {
    pub at_ns: i64,
    pub interval_ns: i64,
    /// One per business rule, in policy order.
    pub flows: Vec<SubjectRate>,
    /// One per link, in policy order.
    pub links: Vec<SubjectRate>,
}

impl Rates {
    pub fn flow(&self, rule_dn: &str) -> Option<&SubjectRate> {
        self.flows.iter().find(|f| f.key == rule_dn)
    }
    pub fn link(&self, name: &str) -> Option<&SubjectRate> {
        self.links.iter().find(|l| l.key == name)
    }
}

#[derive(Clone, Debug)]
struct Accumulator {
    key: String,
    name: String,
    bytes: u64,
    records: u64,
    avg_kbps: Option<f64>,
}

impl Accumulator {
    fn new(key: String, name: String) -> Accumulator {
        Accumulator {
            key,
            name,
            bytes: 0,
            records: 0,
            avg_kbps: None,
        }
    }
}

/// Finds the rule a record belongs to without testing every rule: rules
/// whose specs name a source and destination host are indexed by that pair.
#[derive(Debug, Default)]
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

/// The bandwidth manager's state: accumulators and averages per subject.
#[derive(Debug)]
pub struct BandwidthManager {
    weight: f64,
    policy: PolicySet,
    index: RuleIndex,
    flows: Vec<Accumulator>,
    links: Vec<Accumulator>,
}

impl BandwidthManager {
    /// `weight` is the EWMA weight `w` of the newest interval, in (0, 1].
    pub fn new(policy: &PolicySet, weight: f64) -> BandwidthManager {
        let mut bm = BandwidthManager {
            weight: weight.clamp(f64::MIN_POSITIVE, 1.0),
            policy: PolicySet::default(),
            index: RuleIndex::default(),
            flows: Vec::new(),
            links: Vec::new(),
        };
        bm.set_policy(policy);
        bm
    }

    /// Adopts a new policy; subjects that keep their key keep their average.
    pub fn set_policy(&mut self, policy: &PolicySet) {
        let old_avg: HashMap<(bool, String), Option<f64>> = self
            .flows
            .iter()
            .map(|a| ((true, a.key.clone()), a.avg_kbps))
            .chain(
                self.links
                    .iter()
                    .map(|a| ((false, a.key.clone()), a.avg_kbps)),
            )
            .collect();
        let keep = |is_flow: bool, mut a: Accumulator| {
            a.avg_kbps = old_avg.get(&(is_flow, a.key.clone())).copied().flatten();
            a
        };
        self.flows = policy
            .rules
            .iter()
            .map(|r| keep(true, Accumulator::new(r.dn.clone(), r.name.clone())))
            .collect();
        self.links = policy
            .links
            .iter()
            .map(|l| keep(false, Accumulator::new(l.name.clone(), l.name.clone())))
            .collect();
        self.index = RuleIndex::build(&policy.rules);
        self.policy = policy.clone();
    }

    /// Seeds the average of a subject, e.g. from the last stored rates
    /// after a restart.
    pub fn seed_average(&mut self, is_flow: bool, key: &str, avg_kbps: f64) {
        let list = if is_flow {
            &mut self.flows
        } else {
            &mut self.links
        };
        if let Some(a) = list.iter_mut().find(|a| a.key == key) {
            a.avg_kbps = Some(avg_kbps);
        }
    }

    /// Counts one record for its policed flow and its links.
    pub fn add(&mut self, r: &FlowRecord) {
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
        if let Some(i) = best {
            let a = &mut self.flows[i];
            a.bytes = a.bytes.saturating_add(r.bytes);
            a.records += 1;
        }
        for (link, a) in self.policy.links.iter().zip(self.links.iter_mut()) {
            if link.traffic.is_empty() || link.traffic.iter().any(|f| f.matches(r)) {
                a.bytes = a.bytes.saturating_add(r.bytes);
                a.records += 1;
            }
        }
    }

    /// Closes the interval that lasted `interval_ns` and ended at `at_ns`:
    /// computes every rate and average and starts the next interval.
    pub fn close_interval(&mut self, at_ns: i64, interval_ns: i64) -> Rates {
        let w = self.weight;
        let secs = (interval_ns.max(1)) as f64 / 1e9;
        let close = |a: &mut Accumulator| {
            let rate = a.bytes as f64 * 8.0 / 1000.0 / secs;
            let avg = match a.avg_kbps {
                Some(prev) => w * rate + (1.0 - w) * prev,
                None => rate,
            };
            let out = SubjectRate {
                key: a.key.clone(),
                name: a.name.clone(),
                rate_kbps: rate,
                avg_rate_kbps: avg,
                records: a.records,
            };
            a.avg_kbps = Some(avg);
            a.bytes = 0;
            a.records = 0;
            out
        };
        Rates {
            at_ns,
            interval_ns,
            flows: self.flows.iter_mut().map(close).collect(),
            links: self.links.iter_mut().map(close).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::paper_policy;

    fn record(src: &str, dst: &str, dport: u16, bytes: u64) -> FlowRecord {
        FlowRecord {
            src_addr: src.parse().unwrap(),
            dst_addr: dst.parse().unwrap(),
            src_port: 6055,
            dst_port: dport,
            proto: 17,
            bytes,
            ..FlowRecord::default()
        }
    }

    #[test]
    fn ewma_follows_the_documented_formula() {
        let p = paper_policy();
        let mut bm = BandwidthManager::new(&p, 0.5);
        let second = 1_000_000_000;
        // 125 000 bytes in 1 s = 1000 kbit/s.
        bm.add(&record("10.71.1.2", "10.71.2.2", 4055, 125_000));
        let r = bm.close_interval(second, second);
        let f = &r.flows[0];
        assert_eq!(
            (f.rate_kbps, f.avg_rate_kbps, f.records),
            (1000.0, 1000.0, 1)
        );
        bm.add(&record("10.71.1.2", "10.71.2.2", 4055, 375_000));
        let r = bm.close_interval(2 * second, second);
        assert_eq!(r.flows[0].rate_kbps, 3000.0);
        assert_eq!(r.flows[0].avg_rate_kbps, 0.5 * 3000.0 + 0.5 * 1000.0);
        let r = bm.close_interval(3 * second + second / 2, second / 2);
        assert_eq!(r.flows[0].rate_kbps, 0.0);
        assert_eq!(r.flows[0].avg_rate_kbps, 1000.0);
    }

    #[test]
    fn records_count_for_their_rule_and_their_links() {
        let p = paper_policy();
        let mut bm = BandwidthManager::new(&p, 1.0);
        // The policed flow: its rule, not the link (the sample link counts
        // only the generator's traffic).
        bm.add(&record("10.71.1.2", "10.71.2.2", 4055, 1000));
        // Generator traffic: the link only.
        bm.add(&record("10.71.1.3", "10.71.2.2", 5001, 2000));
        // Unrelated traffic: nothing.
        bm.add(&record("10.9.9.9", "10.9.9.8", 53, 4000));
        let r = bm.close_interval(1_000_000_000, 1_000_000_000);
        assert_eq!(r.flows[0].records, 1);
        assert_eq!(r.links[0].records, 1);
        assert_eq!(r.links[0].rate_kbps, 16.0);
    }

    #[test]
    fn averages_survive_a_policy_reload() {
        let p = paper_policy();
        let mut bm = BandwidthManager::new(&p, 0.5);
        bm.add(&record("10.71.1.2", "10.71.2.2", 4055, 125_000));
        bm.close_interval(1_000_000_000, 1_000_000_000);
        bm.set_policy(&p);
        let r = bm.close_interval(2_000_000_000, 1_000_000_000);
        assert_eq!(r.flows[0].avg_rate_kbps, 500.0);
    }

    #[test]
    fn the_highest_priority_rule_wins() {
        let mut p = paper_policy();
        let mut wide = p.rules[0].clone();
        wide.dn = "cn=wide".into();
        wide.name = "wide".into();
        wide.priority = p.rules[0].priority + 10;
        wide.flows = vec![qosloop_schema::FlowSpec {
            proto: Some(17),
            ..Default::default()
        }];
        p.rules.push(wide);
        let mut bm = BandwidthManager::new(&p, 1.0);
        bm.add(&record("10.71.1.2", "10.71.2.2", 4055, 1000));
        let r = bm.close_interval(1_000_000_000, 1_000_000_000);
        assert_eq!(r.flow("cn=wide").unwrap().records, 1);
        assert_eq!(r.flows[0].records, 0);
    }
}
