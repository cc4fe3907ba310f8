//! The bandwidth manager's arithmetic: which policed flow and which links a
//! record counts for, the rate over one interval and its EWMA.
//!
//! Per interval `k` — the poll at `t_k` closes the window
//! `W_k = [t_{k-1} − lag, t_k − lag)` of length `Δt_k` — and per subject (a
//! policed flow = one business rule; a link):
//!
//! ```text
//! rate_k    = 8 · (bytes of the records' traffic that happened within W_k) / Δt_k   [kbit/s]
//! avgRate_k = w · rate_k + (1 − w) · avgRate_{k−1},   avgRate_0 = rate_0,   0 < w ≤ 1
//! ```
//!
//! A record's bytes are spread evenly over the capture time it covers,
//! `[start_ns, end_ns]` (an interim record: the packets since the flow's
//! previous record), and counted in the windows that time falls in
//! ([`crate::window`]). The `lag` leaves the meter time to export what it
//! saw: it must exceed the meter's interim interval plus the export and
//! commit delay (default 1.2 s, for the meter's default 1 s interim
//! updates). Traffic whose record arrives after its window closed is counted
//! as late and reported, never moved into a later window. Each record is
//! read once (see `store::FlowCursor` for how "new" is defined exactly
//! once). A record counts for at most one policed flow — the matching rule
//! with the highest priority — and for every link whose traffic it matches.
//! A per-user rule (`BusinessRule::per_user`) is no single policed flow:
//! each of its users is a subject of its own (`Rates::users`), counting
//! the records whose `user` is that user, with the same arithmetic
//! (`qosloop_schema::bandwidth::{rate_kbps, ewma}`).
//! Record times are the meters' clocks and windows the server's: they are
//! assumed synchronised (NTP), as on one machine.

pub use qosloop_schema::bandwidth::rule_selects;
use qosloop_schema::bandwidth::{ewma, rate_kbps, user_subject, window::TimeBuckets, Classifier};
use qosloop_schema::{FlowRecord, PolicySet};
use std::collections::HashMap;
use std::time::Duration;

/// Default `lag` (see the module doc).
pub const DEFAULT_LAG: Duration = Duration::from_millis(1200);

/// Width of the time buckets records are spread into.
const BUCKET_NS: i64 = 20_000_000;

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
    /// One per user of each per-user rule, in policy order: `key` is the
    /// rule's DN, `name` the user.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<SubjectRate>,
}

impl Rates {
    pub fn flow(&self, rule_dn: &str) -> Option<&SubjectRate> {
        self.flows.iter().find(|f| f.key == rule_dn)
    }
    pub fn link(&self, name: &str) -> Option<&SubjectRate> {
        self.links.iter().find(|l| l.key == name)
    }
    /// The rate of `user` under the per-user rule `rule_dn`.
    pub fn user(&self, rule_dn: &str, user: &str) -> Option<&SubjectRate> {
        self.users
            .iter()
            .find(|u| u.key == rule_dn && u.name == user)
    }
}

#[derive(Clone, Debug)]
struct Accumulator {
    key: String,
    name: String,
    window: TimeBuckets,
    records: u64,
    avg_kbps: Option<f64>,
}

impl Accumulator {
    fn new(key: String, name: String) -> Accumulator {
        Accumulator {
            key,
            name,
            window: TimeBuckets::new(BUCKET_NS),
            records: 0,
            avg_kbps: None,
        }
    }
}

/// The bandwidth manager's state: accumulators and averages per subject.
#[derive(Debug)]
pub struct BandwidthManager {
    weight: f64,
    lag_ns: i64,
    classifier: Classifier,
    flows: Vec<Accumulator>,
    links: Vec<Accumulator>,
    /// Per rule (policy order), per user of a per-user rule (the rule's
    /// `users` order); empty for other rules.
    users: Vec<Vec<Accumulator>>,
}

impl BandwidthManager {
    /// `weight` is the EWMA weight `w` of the newest interval, in (0, 1].
    pub fn new(policy: &PolicySet, weight: f64) -> BandwidthManager {
        let mut bm = BandwidthManager {
            weight: weight.clamp(f64::MIN_POSITIVE, 1.0),
            lag_ns: DEFAULT_LAG.as_nanos() as i64,
            classifier: Classifier::default(),
            flows: Vec::new(),
            links: Vec::new(),
            users: Vec::new(),
        };
        bm.set_policy(policy);
        bm
    }

    /// Sets the `lag` between a poll and the end of the window it closes.
    pub fn set_lag(&mut self, lag: Duration) {
        self.lag_ns = i64::try_from(lag.as_nanos()).unwrap_or(i64::MAX);
    }

    /// Adopts a new policy; subjects that keep their key keep their average
    /// and the traffic already placed in time.
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
        let mut old_windows: HashMap<(bool, String), TimeBuckets> = self
            .flows
            .drain(..)
            .map(|a| ((true, a.key), a.window))
            .chain(self.links.drain(..).map(|a| ((false, a.key), a.window)))
            .collect();
        let mut old_users: HashMap<(String, String), Accumulator> = self
            .users
            .drain(..)
            .flatten()
            .map(|a| ((a.key.clone(), a.name.clone()), a))
            .collect();
        self.users = policy
            .rules
            .iter()
            .map(|r| {
                if !r.per_user {
                    return Vec::new();
                }
                r.users
                    .iter()
                    .map(|u| {
                        let mut a = Accumulator::new(r.dn.clone(), u.clone());
                        if let Some(old) = old_users.remove(&(r.dn.clone(), u.clone())) {
                            a.window = old.window;
                            a.avg_kbps = old.avg_kbps;
                        }
                        a
                    })
                    .collect()
            })
            .collect();
        let mut keep = |is_flow: bool, mut a: Accumulator| {
            a.avg_kbps = old_avg.get(&(is_flow, a.key.clone())).copied().flatten();
            if let Some(w) = old_windows.remove(&(is_flow, a.key.clone())) {
                a.window = w;
            }
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
        self.classifier = Classifier::new(policy);
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

    /// Sets the average of the user subject `subject`
    /// (`qosloop_schema::bandwidth::user_subject`), as stored in `rates`.
    pub fn seed_user_average(&mut self, subject: &str, avg_kbps: f64) {
        if let Some(a) = self
            .users
            .iter_mut()
            .flatten()
            .find(|a| user_subject(&a.key, &a.name) == subject)
        {
            a.avg_kbps = Some(avg_kbps);
        }
    }

    /// Counts one record for its policed flow and its links.
    pub fn add(&mut self, r: &FlowRecord) {
        let subjects = self.classifier.classify(r);
        let start = i64::try_from(r.start_ns).unwrap_or(i64::MAX);
        let end = i64::try_from(r.end_ns).unwrap_or(i64::MAX);
        if let (Some(i), Some(u)) = (subjects.rule, subjects.user) {
            let a = &mut self.users[i][u];
            a.window.add(start, end, r.bytes);
            a.records += 1;
        } else if let Some(i) = subjects.rule {
            let a = &mut self.flows[i];
            a.window.add(start, end, r.bytes);
            a.records += 1;
        }
        for i in subjects.links {
            let a = &mut self.links[i];
            a.window.add(start, end, r.bytes);
            a.records += 1;
        }
    }

    /// Closes the interval that lasted `interval_ns` and ended at `at_ns`
    /// (its window ends `lag` earlier): computes every rate and average and
    /// starts the next interval.
    pub fn close_interval(&mut self, at_ns: i64, interval_ns: i64) -> Rates {
        let w = self.weight;
        let interval_ns = interval_ns.max(1);
        let to = at_ns.saturating_sub(self.lag_ns);
        let from = to.saturating_sub(interval_ns);
        let close = |a: &mut Accumulator| {
            let rate = rate_kbps(a.window.take(from, to), interval_ns);
            let avg = ewma(a.avg_kbps, rate, w);
            let out = SubjectRate {
                key: a.key.clone(),
                name: a.name.clone(),
                rate_kbps: rate,
                avg_rate_kbps: avg,
                records: a.records,
            };
            a.avg_kbps = Some(avg);
            a.records = 0;
            out
        };
        Rates {
            at_ns,
            interval_ns,
            flows: self.flows.iter_mut().map(close).collect(),
            links: self.links.iter_mut().map(close).collect(),
            users: self.users.iter_mut().flatten().map(close).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::paper_policy;

    /// A record of traffic at t = 0.5 s.
    fn record(src: &str, dst: &str, dport: u16, bytes: u64) -> FlowRecord {
        record_at(src, dst, dport, bytes, 500_000_000, 500_000_000)
    }

    fn record_at(
        src: &str,
        dst: &str,
        dport: u16,
        bytes: u64,
        start_ns: u64,
        end_ns: u64,
    ) -> FlowRecord {
        FlowRecord {
            start_ns,
            end_ns,
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
        bm.set_lag(Duration::ZERO);
        let second: i64 = 1_000_000_000;
        let s = second as u64;
        // 125 000 bytes in 1 s = 1000 kbit/s.
        bm.add(&record_at("10.71.1.2", "10.71.2.2", 4055, 125_000, 0, s));
        let r = bm.close_interval(second, second);
        let f = &r.flows[0];
        assert_eq!(
            (f.rate_kbps, f.avg_rate_kbps, f.records),
            (1000.0, 1000.0, 1)
        );
        bm.add(&record_at(
            "10.71.1.2",
            "10.71.2.2",
            4055,
            375_000,
            s,
            2 * s,
        ));
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
        bm.set_lag(Duration::ZERO);
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
    fn per_user_rules_rate_each_user_apart() {
        let mut p = paper_policy();
        let mut r = p.rules[0].clone();
        r.dn = "cn=users".into();
        r.flows.clear();
        r.users = vec!["alice".into(), "bob".into()];
        r.per_user = true;
        r.priority += 1;
        p.rules.push(r);
        let mut bm = BandwidthManager::new(&p, 0.5);
        bm.set_lag(Duration::ZERO);
        let second = 1_000_000_000i64;
        let mut add = |user: &str, bytes: u64, from: u64| {
            let mut rec = record_at(
                "10.9.0.1",
                "10.9.0.2",
                80,
                bytes,
                from,
                from + 1_000_000_000,
            );
            rec.user = Some(user.into());
            bm.add(&rec);
        };
        add("alice", 250_000, 0); // 2000 kbit/s
        add("bob", 62_500, 0); // 500 kbit/s
        add("carol", 1_000_000, 0); // not named: nothing
        let r1 = bm.close_interval(second, second);
        let alice = r1.user("cn=users", "alice").unwrap();
        assert_eq!((alice.rate_kbps, alice.avg_rate_kbps), (2000.0, 2000.0));
        assert_eq!(r1.user("cn=users", "bob").unwrap().rate_kbps, 500.0);
        assert!(r1.user("cn=users", "carol").is_none());
        assert_eq!(r1.flow("cn=users").unwrap().records, 0);
        bm.set_policy(&p);
        let r2 = bm.close_interval(2 * second, second);
        // The same EWMA as every subject, kept across a reload.
        assert_eq!(r2.user("cn=users", "alice").unwrap().avg_rate_kbps, 1000.0);
    }

    #[test]
    fn averages_survive_a_policy_reload() {
        let p = paper_policy();
        let mut bm = BandwidthManager::new(&p, 0.5);
        bm.set_lag(Duration::ZERO);
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
        bm.set_lag(Duration::ZERO);
        bm.add(&record("10.71.1.2", "10.71.2.2", 4055, 1000));
        let r = bm.close_interval(1_000_000_000, 1_000_000_000);
        assert_eq!(r.flow("cn=wide").unwrap().records, 1);
        assert_eq!(r.flows[0].records, 0);
    }

    #[test]
    fn the_lag_waits_for_late_exports_and_interim_records_give_exact_rates() {
        // 2000 kbit/s as interim records every 250 ms, each visible only
        // when it ends; polls every second at an unrelated phase.
        let p = paper_policy();
        let mut bm = BandwidthManager::new(&p, 1.0);
        bm.set_lag(Duration::from_millis(400));
        let ms = 1_000_000u64;
        let mut next_record_end = 250 * ms + 13 * ms;
        let mut rates = Vec::new();
        for poll in 1..=8u64 {
            let at = poll * 1000 * ms + 77 * ms;
            while next_record_end <= at {
                let bytes = 2_000_000 / 8 / 4; // 250 ms at 2000 kbit/s
                bm.add(&record_at(
                    "10.71.1.2",
                    "10.71.2.2",
                    4055,
                    bytes,
                    next_record_end - 250 * ms,
                    next_record_end,
                ));
                next_record_end += 250 * ms;
            }
            rates.push(bm.close_interval(at as i64, 1_000_000_000).flows[0].rate_kbps);
        }
        for r in &rates[1..] {
            assert!((r - 2000.0).abs() < 1.0, "{rates:?}");
        }
    }
}
