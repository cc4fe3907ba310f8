//! Fixtures shared by unit tests, integration tests and benchmarks: the
//! reference experiment's policy (DESIGN.md §1) as a [`PolicySet`], the same
//! entries `schema/ldap/sample-policy.ldif` holds.

use qosloop_schema::{
    BusinessRule, DeviceRole, Direction, FlowSpec, Kbps, Link, PolicySet, ServiceClass,
};

const BASE: &str = "dc=qosloop,dc=example";

/// The service class `gold`: 1000 kbit/s profile, CS6 in profile; out of
/// profile accept shaped 875 below 3000, remark BE shaped 125 below 6000,
/// drop above.
pub fn gold_class() -> ServiceClass {
    ServiceClass::paper(&format!("cn=gold,ou=classes,{BASE}"))
}

/// A policed 5-tuple `10.71.1.2 → 10.71.2.2:dst_port/udp` for `role`.
pub fn policed_rule(name: &str, src: &str, dst_port: u16, role: &str) -> BusinessRule {
    BusinessRule {
        dn: format!("cn={name},ou=rules,{BASE}"),
        name: name.into(),
        priority: 100,
        enabled: true,
        roles: vec![role.into()],
        flows: vec![FlowSpec {
            src: src.parse().ok(),
            dst: "10.71.2.2".parse().ok(),
            proto: Some(17),
            src_ports: None,
            dst_ports: Some(qosloop_schema::PortRange::single(dst_port)),
            user: None,
        }],
        users: Vec::new(),
        per_user: false,
        band_basis: Default::default(),
        service_class: "gold".into(),
        link: "edge-ingress".into(),
    }
}

/// The reference experiment: one policed flow for role `edge`, the link
/// `edge-ingress` counting the generator's traffic (UDP to 10.71.2.0/24
/// ports 5000–5999) — the policed flow does not count in the link load.
pub fn paper_policy() -> PolicySet {
    PolicySet {
        rules: vec![policed_rule("policed-flow", "10.71.1.2", 4055, "edge")],
        classes: vec![gold_class()],
        links: vec![Link {
            dn: format!("cn=edge-ingress,ou=links,{BASE}"),
            name: "edge-ingress".into(),
            capacity: Kbps(10_000),
            traffic: vec![FlowSpec {
                dst: "10.71.2.0/24".parse().ok(),
                proto: Some(17),
                dst_ports: "5000-5999".parse().ok(),
                user: None,
                ..FlowSpec::default()
            }],
        }],
        devices: vec![DeviceRole {
            dn: format!("cn=edge,ou=devices,{BASE}"),
            role: "edge".into(),
            interface: "r-eth1".into(),
            direction: Direction::Egress,
            capacity: Kbps(10_000),
            user_match: Default::default(),
        }],
    }
}

/// `n` policed flows (distinct source hosts in 10.64.0.0/10), spread over
/// roles `edge0` … `edge{roles-1}`, on the paper's class and link.
pub fn many_flows_policy(n: usize, roles: usize) -> PolicySet {
    let mut p = paper_policy();
    p.rules = (0..n)
        .map(|i| {
            let src = format!(
                "10.{}.{}.{}",
                64 + (i >> 16) % 64,
                (i >> 8) & 0xff,
                i & 0xff
            );
            policed_rule(
                &format!("flow{i}"),
                &src,
                4055,
                &format!("edge{}", i % roles.max(1)),
            )
        })
        .collect();
    p
}
