//! The decision engine: `seeds/004` Fig. 8 with hysteresis.
//!
//! For each enabled business rule, each of its flow specs and each of its
//! roles there is one decision (id = a stable hash of rule DN, spec index
//! and role). Its content is the rule's service class rendered for the
//! link-load band the rule's link is in:
//!
//! | avg link load (kbit/s) | in profile (≤ profile rate) | out of profile |
//! |---|---|---|
//! | band `low` `[0, Min_th)` | marked `in_profile_dscp` | accept, shaped at the band's rate |
//! | band `medium` `[Min_th, Max_th)` | marked `in_profile_dscp` | re-mark to the band's DSCP, shaped |
//! | band `high` `[Max_th, ∞)` | marked `in_profile_dscp` | drop |
//!
//! The enforcer meters the profile in the kernel (token bucket); the
//! engine chooses which out-of-profile treatment the meter applies. The
//! band is chosen from the link's EWMA load (`avgRate`), and the flow's
//! own rate and avgRate are recorded with the decision as its reason.
//!
//! Hysteresis: a rule stays in its current band while the load is within
//! the band widened by `hysteresis` (a fraction) of each boundary:
//! `[from·(1−h), to·(1+h))`. Only when the load leaves the widened band is
//! the band re-chosen, plainly. With h = 0.05 and Min_th = 3000, a rule in
//! `low` moves to `medium` at 3150 and back to `low` below 2850, so a load
//! hovering around 3000 does not flap.
//!
//! Confirmation (`confirm`, default 0 = off): the load must ask for a band
//! on the same side of the current one (above, or below) in evaluations
//! spanning at least `confirm` before the change is taken; then the band it
//! asks for last is taken. One window that comes out short or long (a poll
//! late under load, records spread unevenly over two windows) moves the
//! average across an edge and back before it is confirmed, so it changes
//! nothing; a real step reacts `confirm` later (with 100 ms windows and
//! `confirm` = 100 ms: at the step's second window).
//!
//! Gap hold (`gap_hold`, default 0 = off): a window in which a link had no
//! record at all, less than `gap_hold` after a window in which it had some,
//! is taken as no measurement (the meters' records stalled on their way),
//! not as a load of zero: the decisions on that link keep their band. A
//! link that really falls silent is followed once `gap_hold` has passed.
//!
//! Minimum hold (`min_hold`, default 0 = off): hysteresis in time. After a
//! decision's band changed because of the load, a change *back* — to a band
//! on the side it came from — waits until `min_hold` has passed since that
//! change; until then the decision stays (and the held evaluations are
//! counted in [`Changes::held`]). A change further in the same direction (a
//! step from `low` through `medium` to `high`) and the first change after a
//! quiet spell are taken at once, so a real step reacts in the same
//! evaluation; a load oscillating around an edge changes the action at most
//! twice per `min_hold` (there and back). Changes of the policy itself (a
//! new class, spec or role) are never held.
//!
//! A per-user rule (`BusinessRule::per_user`) has one decision per user
//! (and flow spec, and role): its flow names the user (`FlowSpec::user`),
//! for an enforcer on the user's host, and its rates are the user's own.
//! On a role whose device role matches users by address (a router), it
//! has one per user *address* instead, the flow's source being the
//! address ([`crate::subjects`], [`Engine::set_user_addresses`]).
//! With `band_basis: user` the band is chosen from the subject's own
//! average rate instead of the link's load (`seeds/000`'s threshold case).
//!
//! A decision's `version` increases only when what the enforcer must do
//! changes (flow, profile, marking, out-of-profile action, role); a change
//! of the measured inputs alone is not pushed.

use crate::bandwidth::Rates;
use crate::subjects::{address_roles, address_subjects, subjects, UserAddresses};
use qosloop_schema::{BandBasis, Decision, DecisionReason, FlowSpec, PolicySet, ServiceClass};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// Every current decision, by role and id: what the PDP pushes.
#[derive(Clone, Debug, Default)]
pub struct DecisionTable {
    /// Increases with every published change.
    pub epoch: u64,
    pub by_role: HashMap<String, BTreeMap<u64, Arc<Decision>>>,
    /// Direction of each role's device entry (tier 3): the PDP refuses an
    /// enforcer that enforces the other direction.
    pub devices: HashMap<String, qosloop_schema::Direction>,
}

/// Each device role's direction, from the policy.
pub fn device_directions(policy: &PolicySet) -> HashMap<String, qosloop_schema::Direction> {
    policy
        .devices
        .iter()
        .map(|d| (d.role.clone(), d.direction))
        .collect()
}

impl DecisionTable {
    pub fn len(&self) -> usize {
        self.by_role.values().map(BTreeMap::len).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The decisions for any of `roles`.
    pub fn for_roles<'a>(&'a self, roles: &'a [String]) -> impl Iterator<Item = &'a Arc<Decision>> {
        roles
            .iter()
            .filter_map(|r| self.by_role.get(r))
            .flat_map(|m| m.values())
    }
    pub fn all(&self) -> impl Iterator<Item = &Arc<Decision>> {
        self.by_role.values().flat_map(|m| m.values())
    }
}

/// What one evaluation changed.
#[derive(Debug, Default)]
pub struct Changes {
    /// Band changes the minimum hold kept back in this evaluation.
    pub held: usize,
    /// New or changed decisions.
    pub installed: Vec<Arc<Decision>>,
    /// Decisions that no longer exist (their last state).
    pub removed: Vec<Arc<Decision>>,
    /// Rules skipped, with why (dangling class or link, no flow spec, no band).
    pub skipped: Vec<(String, &'static str)>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.installed.is_empty() && self.removed.is_empty()
    }
}

#[derive(Debug)]
struct Current {
    band: usize,
    decision: Arc<Decision>,
    /// When the load last moved this decision to another band, and from
    /// which (none: first install or restored).
    moved: Option<(u64, usize)>,
    /// Since when the load has asked for a band on this side of the
    /// current one (+1 above, −1 below) without the change being taken
    /// yet (the confirmation of the module doc).
    pending: Option<(u64, i8)>,
}

/// The engine's state between evaluations.
#[derive(Debug)]
pub struct Engine {
    hysteresis: f64,
    min_hold_ns: u64,
    confirm_ns: u64,
    gap_hold_ns: u64,
    /// When each link last had records in its window.
    link_seen: HashMap<String, u64>,
    current: HashMap<u64, Current>,
    epoch: u64,
    /// The users' current addresses, for roles matched by address.
    user_addresses: UserAddresses,
}

/// The stable id of the decision for spec `spec_index` of rule `dn` on
/// `role`: FNV-1a, kept below 2^53 so that JavaScript reads it exactly.
pub fn decision_id(dn: &str, spec_index: usize, role: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in dn
        .bytes()
        .chain([0])
        .chain((spec_index as u64).to_be_bytes())
        .chain(role.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h & ((1 << 53) - 1)
}

/// The band for `load`, keeping `current` while the load is inside it
/// widened by `h` (see the module doc).
pub fn select_band(
    class: &ServiceClass,
    load_kbps: f64,
    current: Option<usize>,
    h: f64,
) -> Option<usize> {
    let bands = &class.out_of_profile;
    if let Some(b) = current.and_then(|i| bands.get(i)) {
        let lo = b.from.0 as f64 * (1.0 - h);
        let inside = load_kbps >= lo && b.to.is_none_or(|to| load_kbps < to.0 as f64 * (1.0 + h));
        if inside {
            return current;
        }
    }
    let load = qosloop_schema::Kbps(load_kbps.max(0.0) as u64);
    bands.iter().position(|b| b.contains(load))
}

/// The part of a decision the enforcer acts on.
fn same_action(a: &Decision, b: &Decision) -> bool {
    a.role == b.role
        && a.policy_dn == b.policy_dn
        && a.flow == b.flow
        && a.profile == b.profile
        && a.in_profile_dscp == b.in_profile_dscp
        && a.out_of_profile == b.out_of_profile
}

impl Engine {
    /// `hysteresis` is the fraction `h` of the module doc (0 disables it).
    pub fn new(hysteresis: f64) -> Engine {
        Engine {
            hysteresis: hysteresis.clamp(0.0, 0.5),
            min_hold_ns: 0,
            confirm_ns: 0,
            gap_hold_ns: 0,
            link_seen: HashMap::new(),
            current: HashMap::new(),
            epoch: 0,
            user_addresses: UserAddresses::new(),
        }
    }

    /// Sets the confirmation time of the module doc (zero disables it).
    pub fn with_confirm(mut self, confirm: std::time::Duration) -> Engine {
        self.confirm_ns = u64::try_from(confirm.as_nanos()).unwrap_or(u64::MAX);
        self
    }

    /// Sets the gap hold of the module doc (zero disables it).
    pub fn with_gap_hold(mut self, gap_hold: std::time::Duration) -> Engine {
        self.gap_hold_ns = u64::try_from(gap_hold.as_nanos()).unwrap_or(u64::MAX);
        self
    }

    /// Sets the minimum hold of the module doc (zero disables it).
    pub fn with_min_hold(mut self, min_hold: std::time::Duration) -> Engine {
        self.min_hold_ns = u64::try_from(min_hold.as_nanos()).unwrap_or(u64::MAX);
        self
    }

    /// The users' current addresses (the knowledge base's live mappings)
    /// for the next evaluations: per-user decisions on roles matched by
    /// address follow them.
    pub fn set_user_addresses(&mut self, addresses: UserAddresses) {
        self.user_addresses = addresses;
    }

    /// Restores decisions taken before a restart, so that unchanged ones
    /// keep their version and are not pushed again.
    pub fn restore(&mut self, policy: &PolicySet, decisions: impl IntoIterator<Item = Decision>) {
        for d in decisions {
            let band = policy
                .rules
                .iter()
                .find(|r| r.dn == d.policy_dn)
                .and_then(|r| policy.classes.iter().find(|c| c.name == r.service_class))
                .and_then(|c| {
                    c.out_of_profile
                        .iter()
                        .position(|b| b.name == d.reason.band)
                });
            if let Some(band) = band {
                self.current.insert(
                    d.id,
                    Current {
                        band,
                        decision: Arc::new(d),
                        moved: None,
                        pending: None,
                    },
                );
            }
        }
    }

    /// Decides for every policed flow from this interval's rates.
    pub fn evaluate(&mut self, policy: &PolicySet, rates: &Rates, now_ns: u64) -> Changes {
        let mut changes = Changes::default();
        let classes: HashMap<&str, &ServiceClass> = policy
            .classes
            .iter()
            .map(|c| (c.name.as_str(), c))
            .collect();
        let flow_rates: HashMap<&str, (f64, f64)> = rates
            .flows
            .iter()
            .map(|f| (f.key.as_str(), (f.rate_kbps, f.avg_rate_kbps)))
            .collect();
        let user_rates: HashMap<(&str, &str), (f64, f64)> = rates
            .users
            .iter()
            .map(|u| {
                (
                    (u.key.as_str(), u.name.as_str()),
                    (u.rate_kbps, u.avg_rate_kbps),
                )
            })
            .collect();
        let link_loads: HashMap<&str, f64> = rates
            .links
            .iter()
            .map(|l| (l.key.as_str(), l.avg_rate_kbps))
            .collect();
        // Links whose window held no record although records came within
        // the gap hold: no measurement, not a load of zero.
        let mut no_data: HashSet<&str> = HashSet::new();
        for l in &rates.links {
            if l.records > 0 {
                self.link_seen.insert(l.key.clone(), now_ns);
            } else if self.gap_hold_ns > 0
                && self
                    .link_seen
                    .get(&l.key)
                    .is_some_and(|&t| now_ns.saturating_sub(t) < self.gap_hold_ns)
            {
                no_data.insert(l.key.as_str());
            }
        }
        let by_address = address_roles(policy);
        let mut alive: HashSet<u64> = HashSet::with_capacity(self.current.len());
        for rule in policy.rules.iter().filter(|r| r.enabled) {
            let Some(class) = classes.get(rule.service_class.as_str()) else {
                changes
                    .skipped
                    .push((rule.dn.clone(), "service class not found"));
                continue;
            };
            if !policy.links.iter().any(|l| l.name == rule.link) {
                changes.skipped.push((rule.dn.clone(), "link not found"));
                continue;
            }
            if rule.flows.is_empty() && !rule.per_user {
                changes
                    .skipped
                    .push((rule.dn.clone(), "no flow spec to enforce"));
                continue;
            }
            let link_load = link_loads.get(rule.link.as_str()).copied().unwrap_or(0.0);
            // A per-user rule's roles matched by address get the users'
            // current addresses; its other roles (and every role of an
            // ordinary rule) get the subjects as they are.
            let (addr_roles, other_roles): (Vec<&String>, Vec<&String>) = rule
                .roles
                .iter()
                .partition(|r| rule.per_user && by_address.contains(r.as_str()));
            let mut work = Vec::new();
            if !other_roles.is_empty() {
                for s in subjects(rule, &flow_rates, &user_rates) {
                    work.push((s, &other_roles));
                }
            }
            if !addr_roles.is_empty() {
                for s in address_subjects(rule, &user_rates, &self.user_addresses) {
                    work.push((s, &addr_roles));
                }
            }
            for (subject, roles) in work {
                let (rate, avg) = (subject.rate, subject.avg);
                let load = match rule.band_basis {
                    BandBasis::Link => link_load,
                    BandBasis::User => avg,
                };
                let (i, spec) = (subject.index, &subject.spec);
                for &role in roles {
                    let id = decision_id(&subject.id_key, i, role);
                    let prev = self.current.get(&id);
                    let Some(mut band) =
                        select_band(class, load, prev.map(|c| c.band), self.hysteresis)
                    else {
                        changes
                            .skipped
                            .push((rule.dn.clone(), "no band covers the link load"));
                        continue;
                    };
                    let mut pending = None;
                    if let Some(p) = prev {
                        if band != p.band && no_data.contains(rule.link.as_str()) {
                            changes.held += 1;
                            band = p.band;
                            pending = p.pending;
                        } else if self.holds(class, p, band, now_ns) {
                            changes.held += 1;
                            band = p.band;
                        } else if let Some(since) = self.unconfirmed(class, p, band, now_ns) {
                            changes.held += 1;
                            band = p.band;
                            pending = Some(since);
                        }
                    }
                    alive.insert(id);
                    // Fast path: the same band and the same rendering as
                    // before — nothing to build, nothing to push.
                    if let Some(p) = prev {
                        let d = &p.decision;
                        if p.band == band
                            && d.out_of_profile == class.out_of_profile[band].action
                            && d.profile == class.profile
                            && d.in_profile_dscp == class.in_profile_dscp
                            && d.flow == *spec
                            && d.policy_dn == rule.dn
                            && d.role == *role
                        {
                            if let Some(c) = self.current.get_mut(&id) {
                                c.pending = pending;
                            }
                            continue;
                        }
                    }
                    let mut d = decision_for(class, band, rule.dn.clone(), spec.clone(), role);
                    d.id = id;
                    d.issued_ns = now_ns;
                    d.reason = DecisionReason {
                        rate_kbps: rate,
                        avg_rate_kbps: avg,
                        link: rule.link.clone(),
                        link_load_kbps: load,
                        band: class.out_of_profile[band].name.clone(),
                    };
                    let moved = match prev {
                        Some(p) if p.band != band => Some((now_ns, p.band)),
                        Some(p) => p.moved,
                        None => None,
                    };
                    match prev {
                        Some(p) if same_action(&p.decision, &d) => {
                            if let Some(c) = self.current.get_mut(&id) {
                                c.pending = pending;
                            }
                            continue;
                        }
                        Some(p) => d.version = p.decision.version + 1,
                        None => d.version = 1,
                    }
                    let d = Arc::new(d);
                    changes.installed.push(d.clone());
                    self.current.insert(
                        id,
                        Current {
                            band,
                            decision: d,
                            moved,
                            pending,
                        },
                    );
                }
            }
        }
        let gone: Vec<u64> = self
            .current
            .keys()
            .filter(|id| !alive.contains(id))
            .copied()
            .collect();
        for id in gone {
            if let Some(c) = self.current.remove(&id) {
                changes.removed.push(c.decision);
            }
        }
        if !changes.is_empty() {
            self.epoch += 1;
        }
        changes
    }

    /// Whether the minimum hold keeps `cur` in its band instead of `band`:
    /// a move back towards the band it last came from, sooner than
    /// `min_hold` after that move. Bands are ordered by their lower edge.
    fn holds(&self, class: &ServiceClass, cur: &Current, band: usize, now_ns: u64) -> bool {
        let Some((at, from)) = cur.moved else {
            return false;
        };
        if self.min_hold_ns == 0
            || band == cur.band
            || now_ns.saturating_sub(at) >= self.min_hold_ns
        {
            return false;
        }
        let edge = |i: usize| class.out_of_profile.get(i).map(|b| b.from.0);
        let (Some(from), Some(cur), Some(new)) = (edge(from), edge(cur.band), edge(band)) else {
            return false;
        };
        // Came up (from below cur): going down again is back; and the
        // other way round.
        (from < cur && new < cur) || (from > cur && new > cur)
    }

    /// Whether the confirmation keeps `cur` in its band although the load
    /// asks for `band`: `Some((since, side))`, the pending request to keep,
    /// while the load has asked for a band on that side for less than
    /// `confirm`; `None` when the change may be taken (or nothing changes).
    fn unconfirmed(
        &self,
        class: &ServiceClass,
        cur: &Current,
        band: usize,
        now_ns: u64,
    ) -> Option<(u64, i8)> {
        if self.confirm_ns == 0 || band == cur.band {
            return None;
        }
        let edge = |i: usize| class.out_of_profile.get(i).map(|b| b.from.0);
        let (Some(c), Some(n)) = (edge(cur.band), edge(band)) else {
            return None;
        };
        let side: i8 = if n > c { 1 } else { -1 };
        match cur.pending {
            Some((since, s)) if s == side => {
                (now_ns.saturating_sub(since) < self.confirm_ns).then_some((since, s))
            }
            _ => Some((now_ns, side)),
        }
    }

    /// The current decisions, for the PDP.
    pub fn table(&self) -> DecisionTable {
        let mut t = DecisionTable {
            epoch: self.epoch,
            by_role: HashMap::new(),
            devices: HashMap::new(),
        };
        for c in self.current.values() {
            t.by_role
                .entry(c.decision.role.clone())
                .or_default()
                .insert(c.decision.id, c.decision.clone());
        }
        t
    }
}

fn decision_for(
    class: &ServiceClass,
    band: usize,
    policy_dn: String,
    flow: FlowSpec,
    role: &str,
) -> Decision {
    Decision {
        id: 0,
        version: 0,
        role: role.to_owned(),
        policy_dn,
        flow,
        profile: class.profile,
        in_profile_dscp: class.in_profile_dscp,
        out_of_profile: class.out_of_profile[band].action,
        reason: DecisionReason {
            rate_kbps: 0.0,
            avg_rate_kbps: 0.0,
            link: String::new(),
            link_load_kbps: 0.0,
            band: String::new(),
        },
        issued_ns: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bandwidth::SubjectRate;
    use crate::testing::{gold_class, paper_policy};
    use qosloop_schema::DecisionKind;
    use std::time::Duration;

    fn rates(policy: &PolicySet, flow_avg: f64, load: f64) -> Rates {
        Rates {
            at_ns: 0,
            interval_ns: 1_000_000_000,
            flows: policy
                .rules
                .iter()
                .map(|r| SubjectRate {
                    key: r.dn.clone(),
                    name: r.name.clone(),
                    rate_kbps: flow_avg,
                    avg_rate_kbps: flow_avg,
                    records: 1,
                })
                .collect(),
            links: policy
                .links
                .iter()
                .map(|l| SubjectRate {
                    key: l.name.clone(),
                    name: l.name.clone(),
                    rate_kbps: load,
                    avg_rate_kbps: load,
                    records: 1,
                })
                .collect(),
            users: Vec::new(),
        }
    }

    #[test]
    fn per_user_rules_decide_for_each_user_from_its_own_rate() {
        let mut p = paper_policy();
        let mut r = p.rules[0].clone();
        r.dn = "cn=users".into();
        r.flows.clear();
        r.users = vec!["alice".into(), "uid 4242".into()];
        r.per_user = true;
        r.band_basis = BandBasis::User;
        p.rules = vec![r];
        let mut e = Engine::new(0.0);
        let mut rt = rates(&p, 0.0, 0.0);
        let user = |name: &str, avg: f64| SubjectRate {
            key: "cn=users".into(),
            name: name.into(),
            rate_kbps: avg,
            avg_rate_kbps: avg,
            records: 1,
        };
        // gold: drop from 6000 kbit/s; alice is above, uid 4242 is not.
        rt.users = vec![user("alice", 7000.0), user("uid 4242", 1000.0)];
        let c = e.evaluate(&p, &rt, 1);
        assert_eq!(c.installed.len(), 2, "{:?}", c.skipped);
        let by_user = |n: &str| {
            c.installed
                .iter()
                .find(|d| d.flow.user.as_ref().is_some_and(|u| u.name == n))
                .unwrap()
                .clone()
        };
        let alice = by_user("alice");
        assert_eq!(alice.kind(), DecisionKind::Drop);
        assert_eq!(alice.reason.avg_rate_kbps, 7000.0);
        assert_eq!(alice.flow.user.as_ref().unwrap().uid, None);
        let other = by_user("uid 4242");
        assert_eq!(other.kind(), DecisionKind::Accept);
        assert_eq!(other.flow.user.as_ref().unwrap().uid, Some(4242));
        assert_ne!(alice.id, other.id);
        // A user leaving the rule removes only its decision.
        p.rules[0].users.pop();
        let c = e.evaluate(&p, &rt, 2);
        assert_eq!(c.removed.len(), 1);
        assert_eq!(c.removed[0].id, other.id);
    }

    #[test]
    fn load_bands_give_the_papers_decisions() {
        let p = paper_policy();
        let mut e = Engine::new(0.0);
        let mut kinds = Vec::new();
        for load in [1000.0, 4500.0, 7000.0, 2000.0] {
            let c = e.evaluate(&p, &rates(&p, 1500.0, load), 1);
            assert_eq!(c.installed.len(), 1, "one change at {load}");
            kinds.push(c.installed[0].kind());
        }
        use DecisionKind::*;
        assert_eq!(kinds, [Accept, Remark, Drop, Accept]);
        let d = &e.table().by_role["edge"];
        let d = d.values().next().unwrap();
        assert_eq!(d.version, 4);
        assert_eq!(d.reason.band, "low");
        assert_eq!(d.reason.avg_rate_kbps, 1500.0);
    }

    #[test]
    fn unchanged_actions_are_not_pushed_again() {
        let p = paper_policy();
        let mut e = Engine::new(0.05);
        assert_eq!(
            e.evaluate(&p, &rates(&p, 1500.0, 1000.0), 1)
                .installed
                .len(),
            1
        );
        let c = e.evaluate(&p, &rates(&p, 900.0, 1200.0), 2);
        assert!(c.is_empty(), "only the inputs changed: {c:?}");
        assert_eq!(e.table().epoch, 1);
    }

    #[test]
    fn hysteresis_stops_flapping_at_a_threshold() {
        let class = gold_class();
        let h = 0.05;
        // Hovering around Min_th = 3000 from below: stays low.
        let mut band = select_band(&class, 2900.0, None, h);
        for load in [3010.0, 2990.0, 3100.0, 2860.0, 3149.0] {
            band = select_band(&class, load, band, h);
            assert_eq!(band, Some(0), "at {load}");
        }
        band = select_band(&class, 3150.0, band, h);
        assert_eq!(band, Some(1));
        for load in [2990.0, 2860.0, 3050.0] {
            band = select_band(&class, load, band, h);
            assert_eq!(band, Some(1), "at {load}");
        }
        assert_eq!(select_band(&class, 2849.0, band, h), Some(0));
        // Without hysteresis the same walk flaps.
        assert_eq!(select_band(&class, 3010.0, Some(0), 0.0), Some(1));
        assert_eq!(select_band(&class, 2990.0, Some(1), 0.0), Some(0));
    }

    const MS: u64 = 1_000_000;

    /// Evaluates `loads` one per 100 ms from `t0`; the actions taken.
    fn walk(e: &mut Engine, p: &PolicySet, t0: u64, loads: &[f64]) -> Vec<(u64, DecisionKind)> {
        let mut taken = Vec::new();
        for (i, &load) in loads.iter().enumerate() {
            let t = t0 + i as u64 * 100 * MS;
            for d in e.evaluate(p, &rates(p, 1500.0, load), t).installed {
                taken.push((t, d.kind()));
            }
        }
        taken
    }

    #[test]
    fn the_minimum_hold_bounds_changes_of_a_load_oscillating_at_an_edge() {
        let p = paper_policy();
        // Around Min_th = 3000, beyond the 1 % hysteresis, every 100 ms,
        // for 10 s.
        let loads: Vec<f64> = (0..100)
            .map(|i| if i % 2 == 0 { 2900.0 } else { 3100.0 })
            .collect();
        let mut plain = Engine::new(0.01);
        assert_eq!(
            walk(&mut plain, &p, 0, &loads).len(),
            100,
            "without the hold it flaps"
        );
        let mut e = Engine::new(0.01).with_min_hold(Duration::from_millis(1000));
        let taken = walk(&mut e, &p, 0, &loads);
        // The first install, then at most a change there and one back per
        // second.
        assert!(
            taken.len() <= 1 + 2 * 10,
            "{} changes: {taken:?}",
            taken.len()
        );
        assert!(taken.len() > 2, "the hold delays, never freezes: {taken:?}");
        // After the first move every change is a move back.
        for w in taken.windows(2).skip(1) {
            assert!(
                w[1].0 - w[0].0 >= 1000 * MS,
                "a move back within the hold: {taken:?}"
            );
        }
    }

    #[test]
    fn the_minimum_hold_lets_a_real_step_react_at_once() {
        use DecisionKind::*;
        let p = paper_policy();
        let mut e = Engine::new(0.01).with_min_hold(Duration::from_millis(1000));
        // Low for 2 s, then a step to high passing through medium: each
        // evaluation takes the band it reaches.
        let mut loads = vec![1600.0; 20];
        loads.extend([4400.0, 6800.0, 7500.0, 7500.0]);
        let taken = walk(&mut e, &p, 0, &loads);
        assert_eq!(
            taken,
            [(0, Accept), (2000 * MS, Remark), (2100 * MS, Drop)],
            "every change at once"
        );
        // Straight back down 300 ms after the last move: held until 1 s
        // after it, then taken.
        let back = walk(&mut e, &p, 2400 * MS, &[1600.0; 8]);
        assert_eq!(back, [(3100 * MS, Accept)]);
        // After a quiet spell a step reacts at once, whichever way.
        let up = walk(&mut e, &p, 5000 * MS, &[5600.0]);
        assert_eq!(up, [(5000 * MS, Remark)]);
    }

    #[test]
    fn the_confirmation_ignores_single_window_artefacts() {
        use DecisionKind::*;
        let p = paper_policy();
        // Medium (remark) steady, then one window dips under Min_th, one
        // spikes over Max_th, two alternate around Min_th window by window.
        let mut loads = vec![4500.0; 10];
        loads.extend([
            2500.0, 4500.0, 4500.0, 6500.0, 4500.0, 2900.0, 3100.0, 2900.0, 3100.0,
        ]);
        loads.extend([4500.0; 5]);
        let mut plain = Engine::new(0.01);
        let flaps = walk(&mut plain, &p, 0, &loads);
        assert_eq!(
            flaps.len(),
            1 + 8,
            "without it every artefact is a change: {flaps:?}"
        );
        let mut e = Engine::new(0.01).with_confirm(Duration::from_millis(100));
        assert_eq!(walk(&mut e, &p, 0, &loads), [(0, Remark)]);
    }

    #[test]
    fn the_confirmation_takes_a_real_step_one_window_later() {
        use DecisionKind::*;
        let p = paper_policy();
        let mut e = Engine::new(0.01).with_confirm(Duration::from_millis(100));
        // Low, then a step to high whose first window lands in medium:
        // taken at the second window, straight to high.
        let mut loads = vec![1600.0; 10];
        loads.extend([4400.0, 6800.0, 7500.0, 7500.0]);
        // Down to medium: taken at its second window.
        loads.extend([5600.0, 5600.0, 5600.0]);
        let taken = walk(&mut e, &p, 0, &loads);
        assert_eq!(
            taken,
            [(0, Accept), (1100 * MS, Drop), (1500 * MS, Remark)],
            "{taken:?}"
        );
        // A load alternating every two windows changes at most once per
        // two windows.
        let loads: Vec<f64> = (0..40)
            .map(|i| if (i / 2) % 2 == 0 { 2900.0 } else { 3100.0 })
            .collect();
        let mut e = Engine::new(0.01).with_confirm(Duration::from_millis(100));
        let taken = walk(&mut e, &p, 0, &loads);
        assert!(taken.len() <= 1 + 20, "{taken:?}");
    }

    #[test]
    fn the_gap_hold_takes_windows_without_records_as_no_measurement() {
        use DecisionKind::*;
        let p = paper_policy();
        let at = |load: f64, records: u64| {
            let mut r = rates(&p, 1500.0, load);
            r.links[0].records = records;
            r
        };
        let mut e = Engine::new(0.01).with_gap_hold(Duration::from_millis(500));
        let mut plain = Engine::new(0.01);
        let mut kinds = Vec::new();
        let mut plain_kinds = Vec::new();
        // High, then three windows without a record (the pipeline stalled),
        // then high again; later the link falls silent for good.
        let mut walk: Vec<(f64, u64)> = vec![(7400.0, 2), (7400.0, 2)];
        walk.extend([(0.0, 0); 3]);
        walk.extend([(7400.0, 2), (7400.0, 2)]);
        walk.extend([(0.0, 0); 8]);
        for (i, (load, records)) in walk.into_iter().enumerate() {
            let t = i as u64 * 100 * MS;
            for d in e.evaluate(&p, &at(load, records), t).installed {
                kinds.push((t / MS, d.kind()));
            }
            for d in plain.evaluate(&p, &at(load, records), t).installed {
                plain_kinds.push((t / MS, d.kind()));
            }
        }
        assert_eq!(
            plain_kinds,
            [(0, Drop), (200, Accept), (500, Drop), (700, Accept)]
        );
        // The stall changes nothing; the silence is followed 500 ms after
        // the last window with records (600 ms).
        assert_eq!(kinds, [(0, Drop), (1100, Accept)]);
    }

    #[test]
    fn removed_rules_and_roles_are_removed() {
        let mut p = paper_policy();
        p.rules[0].roles.push("core".into());
        let mut e = Engine::new(0.05);
        assert_eq!(e.evaluate(&p, &rates(&p, 0.0, 0.0), 1).installed.len(), 2);
        p.rules[0].roles.pop();
        let c = e.evaluate(&p, &rates(&p, 0.0, 0.0), 2);
        assert_eq!(c.removed.len(), 1);
        assert_eq!(c.removed[0].role, "core");
        p.rules[0].enabled = false;
        let c = e.evaluate(&p, &rates(&p, 0.0, 0.0), 3);
        assert_eq!((c.installed.len(), c.removed.len()), (0, 1));
        assert!(e.table().is_empty());
    }

    #[test]
    fn dangling_references_are_skipped_with_a_reason() {
        let mut p = paper_policy();
        p.rules[0].service_class = "platinum".into();
        let c = Engine::new(0.0).evaluate(&p, &rates(&p, 0.0, 0.0), 1);
        assert!(c.installed.is_empty());
        assert_eq!(c.skipped[0].1, "service class not found");
    }

    #[test]
    fn restored_decisions_keep_their_version() {
        let p = paper_policy();
        let mut first = Engine::new(0.05);
        first.evaluate(&p, &rates(&p, 1500.0, 7000.0), 1);
        let saved: Vec<Decision> = first.table().all().map(|d| (**d).clone()).collect();
        let mut second = Engine::new(0.05);
        second.restore(&p, saved);
        assert!(second
            .evaluate(&p, &rates(&p, 1500.0, 6900.0), 2)
            .is_empty());
    }

    #[test]
    fn decision_ids_are_stable_and_distinct() {
        let a = decision_id("cn=a", 0, "edge");
        assert_eq!(a, decision_id("cn=a", 0, "edge"));
        assert_ne!(a, decision_id("cn=a", 1, "edge"));
        assert_ne!(a, decision_id("cn=a", 0, "core"));
        assert!(a < 1 << 53);
    }
}
