//! The subjects of a rule the engine decides for: each flow spec of an
//! ordinary rule; each (user, flow spec) of a per-user rule, for an
//! enforcer on the user's host (the flow names the user); and each (user,
//! current address, flow spec) of a per-user rule on a role whose device
//! role matches users by address (`UserMatch::Address`: a router), the flow
//! then naming the address as its source instead of the user. The
//! addresses are the knowledge base's live mappings ([`UserAddresses`],
//! read by the server before it decides), so the router's rules follow a
//! user to a new address and drop an expired one.

use crate::repo::intersect;
use qosloop_schema::{BusinessRule, FlowSpec, IpPrefix, PolicySet, UserMatch, UserRef};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

/// Each user's current addresses (sorted), from the knowledge base.
pub type UserAddresses = BTreeMap<String, BTreeSet<IpAddr>>;

/// Most live mappings read per decision round (bounds the query).
pub const MAX_MAPPINGS_READ: i64 = 65_536;

/// The roles whose device role matches per-user decisions by address.
pub(crate) fn address_roles(policy: &PolicySet) -> HashSet<&str> {
    policy
        .devices
        .iter()
        .filter(|d| d.user_match == UserMatch::Address)
        .map(|d| d.role.as_str())
        .collect()
}

/// Whether deciding `policy` needs the users' addresses: a per-user rule
/// with a role matched by address.
pub fn needs_user_addresses(policy: &PolicySet) -> bool {
    let roles = address_roles(policy);
    !roles.is_empty()
        && policy
            .rules
            .iter()
            .any(|r| r.enabled && r.per_user && r.roles.iter().any(|x| roles.contains(x.as_str())))
}

/// The live mappings of the knowledge base as [`UserAddresses`]. An
/// address that is not one (a hand-edited row) is skipped and counted.
pub fn user_addresses(mappings: &[qosloop_store::KbMapping]) -> (UserAddresses, u64) {
    let mut out = UserAddresses::new();
    let mut bad = 0;
    for m in mappings {
        match m.addr.parse::<IpAddr>() {
            Ok(a) => {
                out.entry(m.user.clone()).or_default().insert(a);
            }
            Err(_) => bad += 1,
        }
    }
    (out, bad)
}

/// One policed subject of a rule: a flow spec of an ordinary rule, or a
/// (flow spec, user) of a per-user rule, with its rates.
pub(crate) struct Subject {
    /// What the decision id hashes (with the spec index and the role).
    pub(crate) id_key: String,
    pub(crate) index: usize,
    pub(crate) spec: FlowSpec,
    pub(crate) rate: f64,
    pub(crate) avg: f64,
}

/// The name a decision gives a user, and the uid when the name is the
/// host agent's form for a uid without a name (`uid 1234`).
pub(crate) fn user_ref(name: &str) -> UserRef {
    UserRef {
        name: name.to_owned(),
        uid: name.strip_prefix("uid ").and_then(|n| n.parse().ok()),
    }
}

pub(crate) fn subjects(
    rule: &BusinessRule,
    flow_rates: &HashMap<&str, (f64, f64)>,
    user_rates: &HashMap<(&str, &str), (f64, f64)>,
) -> Vec<Subject> {
    if !rule.per_user {
        let (rate, avg) = flow_rates
            .get(rule.dn.as_str())
            .copied()
            .unwrap_or((0.0, 0.0));
        return rule
            .flows
            .iter()
            .enumerate()
            .map(|(index, spec)| Subject {
                id_key: rule.dn.clone(),
                index,
                spec: spec.clone(),
                rate,
                avg,
            })
            .collect();
    }
    let any = [FlowSpec::default()];
    let specs: &[FlowSpec] = if rule.flows.is_empty() {
        &any
    } else {
        &rule.flows
    };
    let mut out = Vec::with_capacity(rule.users.len() * specs.len());
    for user in &rule.users {
        let (rate, avg) = user_rates
            .get(&(rule.dn.as_str(), user.as_str()))
            .copied()
            .unwrap_or((0.0, 0.0));
        for (index, spec) in specs.iter().enumerate() {
            out.push(Subject {
                id_key: format!("{}\u{0}user={user}", rule.dn),
                index,
                spec: FlowSpec {
                    user: Some(user_ref(user)),
                    ..spec.clone()
                },
                rate,
                avg,
            });
        }
    }
    out
}

/// The subjects of a per-user rule on roles matched by address: for each
/// user, each of its current addresses and each flow spec, the spec
/// narrowed to that source address (a spec whose source prefix does not
/// hold the address gives none). A user without an address has none.
pub(crate) fn address_subjects(
    rule: &BusinessRule,
    user_rates: &HashMap<(&str, &str), (f64, f64)>,
    addresses: &UserAddresses,
) -> Vec<Subject> {
    let any = [FlowSpec::default()];
    let specs: &[FlowSpec] = if rule.flows.is_empty() {
        &any
    } else {
        &rule.flows
    };
    let mut out = Vec::new();
    for user in &rule.users {
        let Some(addrs) = addresses.get(user) else {
            continue;
        };
        let (rate, avg) = user_rates
            .get(&(rule.dn.as_str(), user.as_str()))
            .copied()
            .unwrap_or((0.0, 0.0));
        for addr in addrs {
            let from = FlowSpec {
                src: Some(IpPrefix::host(*addr)),
                ..FlowSpec::default()
            };
            for (index, spec) in specs.iter().enumerate() {
                let Some(spec) = intersect(spec, &from) else {
                    continue;
                };
                out.push(Subject {
                    id_key: format!("{}\u{0}user={user}\u{0}addr={addr}", rule.dn),
                    index,
                    spec: FlowSpec { user: None, ..spec },
                    rate,
                    avg,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bandwidth::{Rates, SubjectRate};
    use crate::engine::Engine;
    use crate::testing::paper_policy;
    use qosloop_schema::{BandBasis, DecisionKind, DeviceRole};

    /// The paper's policy with one per-user rule for alice on the host
    /// role `edge` (by uid) and a router role `router` (by address).
    fn policy() -> PolicySet {
        let mut p = paper_policy();
        let mut r = p.rules[0].clone();
        r.dn = "cn=users".into();
        r.flows.clear();
        r.users = vec!["alice".into(), "bob".into()];
        r.per_user = true;
        r.band_basis = BandBasis::User;
        r.roles = vec!["edge".into(), "router".into()];
        p.rules = vec![r];
        let router = DeviceRole {
            dn: "cn=router".into(),
            role: "router".into(),
            user_match: UserMatch::Address,
            ..p.devices[0].clone()
        };
        p.devices.push(router);
        p
    }

    fn alice_at(rates_avg: f64) -> Rates {
        Rates {
            users: vec![SubjectRate {
                key: "cn=users".into(),
                name: "alice".into(),
                rate_kbps: rates_avg,
                avg_rate_kbps: rates_avg,
                records: 1,
            }],
            ..Rates::default()
        }
    }

    fn addrs(pairs: &[(&str, &str)]) -> UserAddresses {
        let mut out = UserAddresses::new();
        for (u, a) in pairs {
            out.entry(u.to_string())
                .or_default()
                .insert(a.parse().unwrap());
        }
        out
    }

    #[test]
    fn router_decisions_name_the_users_current_addresses_and_follow_them() {
        let p = policy();
        assert!(needs_user_addresses(&p));
        let mut e = Engine::new(0.0);
        e.set_user_addresses(addrs(&[("alice", "10.0.0.7")]));
        // gold drops from 6000 kbit/s: alice is above it.
        let c = e.evaluate(&p, &alice_at(7000.0), 1);
        let on = |role: &str| -> Vec<_> {
            c.installed
                .iter()
                .filter(|d| d.role == role)
                .cloned()
                .collect()
        };
        // The host role: one decision per user, by name.
        assert_eq!(on("edge").len(), 2);
        assert!(on("edge").iter().all(|d| d.flow.user.is_some()));
        // The router: only alice has an address; her flow is its source.
        let router = on("router");
        assert_eq!(router.len(), 1, "{router:?}");
        assert_eq!(router[0].flow.src, Some("10.0.0.7/32".parse().unwrap()));
        assert_eq!(router[0].flow.user, None);
        assert_eq!(router[0].kind(), DecisionKind::Drop);
        let old = router[0].id;

        // Alice moves (and gets an IPv6 address): the old address's
        // decision goes, the new ones come; the host role is unchanged.
        e.set_user_addresses(addrs(&[("alice", "10.0.0.8"), ("alice", "2001:db8::8")]));
        let c = e.evaluate(&p, &alice_at(7000.0), 2);
        assert_eq!(c.removed.len(), 1);
        assert_eq!(c.removed[0].id, old);
        let srcs: BTreeSet<String> = c
            .installed
            .iter()
            .map(|d| {
                assert_eq!(d.role, "router");
                d.flow.src.unwrap().to_string()
            })
            .collect();
        assert_eq!(
            srcs,
            BTreeSet::from(["10.0.0.8/32".to_string(), "2001:db8::8/128".to_string()])
        );

        // The mapping expires: the router's decisions are removed.
        e.set_user_addresses(UserAddresses::new());
        let c = e.evaluate(&p, &alice_at(7000.0), 3);
        assert_eq!(c.removed.len(), 2);
        assert!(c.installed.is_empty());
    }

    #[test]
    fn a_spec_whose_source_excludes_the_address_gives_no_router_decision() {
        let mut p = policy();
        p.rules[0].flows = vec![FlowSpec {
            src: Some("10.1.0.0/16".parse().unwrap()),
            ..FlowSpec::default()
        }];
        let mut e = Engine::new(0.0);
        e.set_user_addresses(addrs(&[("alice", "10.0.0.7"), ("bob", "10.1.2.3")]));
        let c = e.evaluate(&p, &alice_at(0.0), 1);
        let router: Vec<_> = c.installed.iter().filter(|d| d.role == "router").collect();
        assert_eq!(router.len(), 1);
        assert_eq!(router[0].flow.src, Some("10.1.2.3/32".parse().unwrap()));
    }
}
