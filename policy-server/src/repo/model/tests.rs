//! Unit tests of building a policy from the sample LDIF and variations.

use super::rules::combine;
use super::*;
use crate::repo::ldif;
use qosloop_schema::{DecisionKind, SAMPLE_POLICY_LDIF};

fn sample() -> Vec<Entry> {
    ldif::parse(SAMPLE_POLICY_LDIF).unwrap()
}

fn with_entry(mut entries: Vec<Entry>, text: &str) -> Vec<Entry> {
    entries.extend(ldif::parse(text).unwrap());
    entries
}

fn replace(entries: &mut [Entry], dn: &str, attr: &str, value: Option<&str>) {
    let e = entries.iter_mut().find(|e| e.dn.starts_with(dn)).unwrap();
    e.attrs.retain(|(n, _)| !n.eq_ignore_ascii_case(attr));
    if let Some(v) = value {
        e.push(attr, v);
    }
}

#[test]
fn the_sample_policy_is_the_reference_experiment() {
    let p = build_strict(&sample()).unwrap();
    assert_eq!(p.rules.len(), 1);
    let r = &p.rules[0];
    assert_eq!(
        (r.name.as_str(), r.priority, r.enabled),
        ("policed-flow", 100, true)
    );
    assert_eq!(r.roles, ["edge"]);
    assert_eq!(r.service_class, "gold");
    assert_eq!(r.link, "edge-ingress");
    assert_eq!(r.flows.len(), 1);
    assert_eq!(
        r.flows[0].to_string(),
        "10.71.1.2/32:* -> 10.71.2.2/32:4055 proto 17"
    );
    let c = &p.classes[0];
    assert_eq!(c.profile.rate, Kbps(1000));
    assert_eq!(c.profile.burst_bytes, 15_000);
    assert_eq!(c.in_profile_dscp, Some(Dscp::CS6));
    let kinds: Vec<_> = [0, 2999, 3000, 5999, 6000, 100_000]
        .iter()
        .map(|&l| c.band_for(Kbps(l)).map(|b| b.action.kind()))
        .collect();
    use DecisionKind::*;
    assert_eq!(
        kinds,
        [Accept, Accept, Remark, Remark, Drop, Drop].map(Some)
    );
    assert_eq!(c.out_of_profile[0].action.shape(), Some(Kbps(875)));
    assert_eq!(
        c.out_of_profile[1].action,
        OutOfProfileAction::Remark {
            dscp: Dscp::BEST_EFFORT,
            shape: Some(Kbps(125))
        }
    );
    assert_eq!(p.links[0].capacity, Kbps(10_000));
    assert_eq!(
        p.links[0].traffic[0].to_string(),
        "*:* -> 10.71.2.0/24:5000-5999 proto 17"
    );
    assert_eq!(p.devices[0].role, "edge");
    assert_eq!(p.devices[0].direction, Direction::Egress);
}

/// The error of the entry whose DN starts with `dn`; errors of other
/// entries may only be the consequence (a rule whose class is invalid).
fn error_of(entries: &[Entry], dn: &str) -> PolicyError {
    let errs = build_strict(entries).unwrap_err().0;
    let (mine, others): (Vec<_>, Vec<_>) = errs.into_iter().partition(|e| e.dn.starts_with(dn));
    assert_eq!(mine.len(), 1, "{mine:?}");
    for o in &others {
        assert!(o.message.contains("invalid"), "unrelated error {o}");
    }
    mine[0].clone()
}

fn only_error(entries: &[Entry]) -> PolicyError {
    let errs = build_strict(entries).unwrap_err().0;
    assert_eq!(errs.len(), 1, "{errs:?}");
    errs[0].clone()
}

#[test]
fn wrong_types_name_the_dn_and_attribute() {
    let mut e = sample();
    replace(&mut e, "cn=gold", "qosloopProfileRate", Some("fast"));
    let err = error_of(&e, "cn=gold");
    assert_eq!(err.dn, "cn=gold,ou=classes,dc=qosloop,dc=example");
    assert_eq!(err.attribute.as_deref(), Some("qosloopProfileRate"));

    let mut e = sample();
    replace(&mut e, "cn=five-tuple", "qosloopProtocol", Some("300"));
    let err = only_error(&e);
    assert!(err.dn.starts_with("cn=five-tuple"));
    assert_eq!(err.attribute.as_deref(), Some("qosloopProtocol"));

    let mut e = sample();
    replace(
        &mut e,
        "cn=five-tuple",
        "qosloopDstPrefix",
        Some("10.71.2.300"),
    );
    assert_eq!(
        only_error(&e).attribute.as_deref(),
        Some("qosloopDstPrefix")
    );

    let mut e = sample();
    replace(&mut e, "cn=medium", "qosloopBandAction", Some("police"));
    let err = error_of(&e, "cn=medium");
    assert!(err.dn.starts_with("cn=medium"));
    assert!(err.message.contains("unknown action"), "{err}");
}

#[test]
fn dangling_dns_are_errors() {
    let mut e = sample();
    replace(
        &mut e,
        "cn=service",
        "pcimActionDN",
        Some("cn=silver,ou=classes,dc=qosloop,dc=example"),
    );
    let err = only_error(&e);
    assert!(err.dn.starts_with("cn=service"));
    assert_eq!(err.attribute.as_deref(), Some("pcimActionDN"));
    assert!(err.message.contains("dangling"), "{err}");

    let mut e = sample();
    replace(
        &mut e,
        "cn=policed-flow",
        "qosloopLinkDN",
        Some("cn=nowhere"),
    );
    assert_eq!(only_error(&e).attribute.as_deref(), Some("qosloopLinkDN"));
}

#[test]
fn band_gaps_and_overlaps_are_errors() {
    let mut e = sample();
    replace(&mut e, "cn=medium", "qosloopBandFrom", Some("3500"));
    let err = error_of(&e, "cn=medium");
    assert!(err.dn.starts_with("cn=medium"));
    assert!(err.message.contains("gap"), "{err}");

    let mut e = sample();
    replace(&mut e, "cn=medium", "qosloopBandTo", Some("6500"));
    let err = error_of(&e, "cn=high");
    assert!(err.dn.starts_with("cn=high"));
    assert!(err.message.contains("overlap"), "{err}");

    let mut e = sample();
    replace(&mut e, "cn=high", "qosloopBandTo", Some("9000"));
    assert_eq!(
        error_of(&e, "cn=high").attribute.as_deref(),
        Some("qosloopBandTo")
    );

    let mut e = sample();
    replace(&mut e, "cn=low", "qosloopBandFrom", Some("100"));
    assert!(error_of(&e, "cn=low").message.contains("gap"));
}

const SECOND_RULE: &str = "dn: cn=other,ou=rules,dc=qosloop,dc=example\n\
    objectClass: pcimRuleInstance\n\
    objectClass: qosloopRuleAuxClass\n\
    cn: other\n\
    pcimRulePriority: 100\n\
    pcimRoles: edge\n\
    qosloopLinkDN: cn=edge-ingress,ou=links,dc=qosloop,dc=example\n\
    pcimRuleConditionList: cn=udp-to-receiver,ou=rules,dc=qosloop,dc=example\n\
    \n\
    dn: cn=udp-to-receiver,ou=rules,dc=qosloop,dc=example\n\
    objectClass: pcimRuleConditionAssociation\n\
    objectClass: qosloopFlowCondition\n\
    cn: udp-to-receiver\n\
    pcimConditionGroupNumber: 1\n\
    pcimConditionNegated: FALSE\n\
    qosloopDstPrefix: 10.71.2.0/24\n\
    qosloopProtocol: 17\n\
    \n\
    dn: cn=service,cn=other,ou=rules,dc=qosloop,dc=example\n\
    objectClass: pcimRuleActionAssociation\n\
    cn: service\n\
    pcimActionOrder: 1\n\
    pcimActionDN: cn=gold,ou=classes,dc=qosloop,dc=example\n";

#[test]
fn overlapping_rules_of_equal_priority_conflict() {
    let e = with_entry(sample(), SECOND_RULE);
    let err = only_error(&e);
    assert_eq!(err.attribute.as_deref(), Some("pcimRulePriority"));
    let (other, policed) = (
        "cn=other,ou=rules,dc=qosloop,dc=example",
        "cn=policed-flow,ou=rules,dc=qosloop,dc=example",
    );
    assert!(
        (err.dn == other && err.message.contains(policed))
            || (err.dn == policed && err.message.contains(other)),
        "{err}"
    );
    // The rule in force stays, even when the newcomer sorts first.
    let prev = build_strict(&sample()).unwrap();
    let b = build(&e, &prev);
    assert_eq!(b.policy, prev);
    assert_eq!(b.errors[0].dn, other);
    // Another priority resolves it.
    let e = with_entry(
        sample(),
        &SECOND_RULE.replace("pcimRulePriority: 100", "pcimRulePriority: 10"),
    );
    let p = build_strict(&e).unwrap();
    assert_eq!(
        p.rules.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        ["policed-flow", "other"]
    );
}

#[test]
fn an_invalid_object_keeps_its_last_good_version_and_the_rest_update() {
    let prev = build_strict(&sample()).unwrap();
    let mut e = sample();
    replace(&mut e, "cn=gold", "qosloopProfileRate", Some("-5"));
    replace(
        &mut e,
        "cn=edge-ingress",
        "qosloopLinkCapacity",
        Some("20000"),
    );
    let b = build(&e, &prev);
    assert_eq!(b.errors.len(), 1);
    assert_eq!(b.policy.classes, prev.classes);
    assert_eq!(b.policy.links[0].capacity, Kbps(20_000));
    assert_eq!(b.policy.rules, prev.rules);
    // A new invalid rule is rejected; the others stay.
    let e = with_entry(sample(), &SECOND_RULE.replace("pcimRoles: edge\n", ""));
    let b = build(&e, &prev);
    assert_eq!(b.policy, prev);
    assert_eq!(b.errors[0].attribute.as_deref(), Some("pcimRoles"));
}

#[test]
fn dnf_groups_intersect_and_cnf_multiplies_out() {
    let a: FlowSpec = FlowSpec {
        dst: Some("10.0.0.0/8".parse().unwrap()),
        ..FlowSpec::default()
    };
    let b = FlowSpec {
        dst: Some("10.1.0.0/16".parse().unwrap()),
        proto: Some(6),
        ..FlowSpec::default()
    };
    let c = FlowSpec {
        proto: Some(17),
        ..FlowSpec::default()
    };
    let mut g = BTreeMap::new();
    g.insert(1, vec![a.clone(), b.clone()]);
    assert_eq!(combine(g.clone(), false).unwrap(), vec![b.clone()]);
    g.insert(2, vec![c.clone()]);
    assert_eq!(combine(g.clone(), false).unwrap().len(), 2);
    // CNF: (a or b) and (c) = a∩c (b∩c is empty).
    let cnf = combine(g, true).unwrap();
    assert_eq!(cnf, vec![intersect(&a, &c).unwrap()]);
    let mut g = BTreeMap::new();
    g.insert(1, vec![b, c]);
    assert!(combine(g, false).is_err());
}

/// Issue 11 item 7: `qosloopShapRate` (misspelled) was ignored and the
/// band became unshaped accept.
#[test]
fn a_misspelled_optional_attribute_is_an_error_naming_dn_and_attribute() {
    let mut e = sample();
    let shaped = "cn=low,cn=gold";
    replace(&mut e, shaped, "qosloopShapeRate", None);
    replace(&mut e, shaped, "qosloopShapRate", Some("875"));
    let errs = build_strict(&e).unwrap_err().0;
    let err = errs
        .iter()
        .find(|x| x.dn.starts_with(shaped))
        .unwrap_or_else(|| panic!("{errs:?}"));
    assert_eq!(err.attribute.as_deref(), Some("qosloopShapRate"));
    assert!(err.message.contains("unknown attribute"), "{err}");
    // Running: the class keeps its last good version (shaped), the
    // misspelling is reported.
    let prev = build_strict(&sample()).unwrap();
    let b = build(&e, &prev);
    assert_eq!(b.policy.classes, prev.classes);
    assert!(b
        .errors
        .iter()
        .any(|x| x.attribute.as_deref() == Some("qosloopShapRate")));
}

#[test]
fn an_attribute_of_another_class_is_an_error() {
    let mut e = sample();
    replace(&mut e, "cn=policed-flow", "qosloopShapeRate", Some("100"));
    let err = only_error(&e);
    assert!(err.dn.starts_with("cn=policed-flow"), "{err}");
    assert_eq!(err.attribute.as_deref(), Some("qosloopShapeRate"));
    assert!(err.message.contains("not allowed"), "{err}");
}

/// Issue 11 item 7: a DN given twice was accepted (the last copy won).
#[test]
fn a_duplicate_dn_is_an_error_naming_the_dn() {
    let text = format!(
        "{SAMPLE_POLICY_LDIF}\ndn: cn=edge-ingress,ou=links,dc=qosloop,dc=example\n\
         objectClass: pcimPolicyInstance\nobjectClass: qosloopLink\n\
         cn: edge-ingress\nqosloopLinkName: edge-ingress\nqosloopLinkCapacity: 99\n"
    );
    let e = ldif::parse(&text).unwrap();
    let errs = build_strict(&e).unwrap_err().0;
    let dup = errs
        .iter()
        .find(|x| x.message.contains("duplicate DN"))
        .unwrap_or_else(|| panic!("{errs:?}"));
    assert_eq!(dup.dn, "cn=edge-ingress,ou=links,dc=qosloop,dc=example");
    assert!(dup.message.contains("2 times"), "{dup}");
    // Running: the link keeps its last good version.
    let prev = build_strict(&sample()).unwrap();
    assert_eq!(build(&e, &prev).policy.links, prev.links);
}

#[test]
fn negated_conditions_are_refused() {
    let mut e = sample();
    replace(
        &mut e,
        "cn=five-tuple",
        "pcimConditionNegated",
        Some("TRUE"),
    );
    assert_eq!(
        only_error(&e).attribute.as_deref(),
        Some("pcimConditionNegated")
    );
}
