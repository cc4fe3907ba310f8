//! Unit tests of overlapping decisions: where they are placed (map element
//! or ordered fallback rule), the order of the fallback chain, moves
//! between the two as overlaps come and go, and reconcile agreeing.

use super::tests::{accept, decision, plan_text, start};
use super::*;
use crate::backend::FakeKernel;
use qosloop_schema::PortRange;

/// A decision on `flow` with small rates (many fit the 10 Mbit/s link).
fn on(id: u64, flow: FlowSpec) -> Decision {
    let mut d = decision(id, 1, accept(100));
    d.profile.rate = Kbps(100);
    d.flow = flow;
    d
}

fn dst(prefix: &str) -> FlowSpec {
    FlowSpec {
        dst: Some(prefix.parse().unwrap()),
        ..FlowSpec::default()
    }
}

fn udp_to(prefix: &str, first: u16, last: u16) -> FlowSpec {
    FlowSpec {
        dst: Some(prefix.parse().unwrap()),
        proto: Some(17),
        dst_ports: Some(PortRange { first, last }),
        user: None,
        ..FlowSpec::default()
    }
}

/// The fallback chain's rules as `nft list` shows them.
fn fallback_rules(e: &mut Enforcer<FakeKernel>) -> Vec<String> {
    e.backend().table.as_ref().unwrap().chains["fallback"]
        .rules
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// Every map element's target chain in the fake kernel.
fn element_targets(e: &mut Enforcer<FakeKernel>) -> Vec<String> {
    let t = e.backend().table.as_ref().unwrap();
    t.maps
        .values()
        .flat_map(|(_, elems)| elems.values().cloned())
        .collect()
}

#[test]
fn a_prefix_over_an_exact_decision_moves_it_to_fallback_and_back() {
    let mut e = start(FakeKernel::with_interface("eth1", 3));
    e.install(decision(1, 5001, accept(875))).unwrap();
    assert_eq!(element_targets(&mut e), vec!["d1"]);
    // The plan of the prefix over it: d1's element goes, the fallback
    // chain is rewritten with d1 (a 5-tuple) before d2 (its /24).
    let plan = plan_text(&e, Some(on(2, dst("10.2.0.0/24"))), &[]);
    let pos = |needle: &str| {
        plan.iter()
            .position(|c| c.contains(needle))
            .unwrap_or_else(|| panic!("no `{needle}` in {plan:#?}"))
    };
    let del = pos("delete element");
    assert!(plan[del].contains("5001"), "{}", plan[del]);
    let flush = pos("flush chain inet qosloop_eth1 fallback");
    let rule1 = pos("jump d1 comment");
    let rule2 = pos("jump d2 comment");
    assert!(del < flush && flush < rule1 && rule1 < rule2, "{plan:#?}");
    assert!(
        !plan.iter().any(|c| c.starts_with("add element")),
        "{plan:#?}"
    );
    // Applied: both are fallback rules in that order, no element left.
    e.install(on(2, dst("10.2.0.0/24"))).unwrap();
    assert!(element_targets(&mut e).is_empty());
    assert_eq!(
        fallback_rules(&mut e),
        vec![
            "ip saddr 10.1.0.1 ip daddr 10.2.0.2 udp dport 5001 jump d1 comment \"id=1\"",
            "ip daddr 10.2.0.0/24 jump d2 comment \"id=2\"",
        ]
    );
    assert_eq!(e.fallback.ids().collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(e.reconcile().unwrap(), StartReport::default());
    // The prefix goes: d1 is a map element again, the chain is empty.
    let plan = plan_text(&e, None, &[2]);
    let add = plan
        .iter()
        .position(|c| c.starts_with("add element"))
        .expect("d1's element comes back");
    assert!(plan[add].contains("jump d1"), "{}", plan[add]);
    e.remove(2).unwrap();
    assert_eq!(element_targets(&mut e), vec!["d1"]);
    assert!(fallback_rules(&mut e).is_empty());
    assert_eq!(e.reconcile().unwrap(), StartReport::default());
}

#[test]
fn the_fallback_chain_puts_the_more_specific_flow_first_then_the_lower_id() {
    let mut e = start(FakeKernel::with_interface("eth1", 3));
    // Installed in one change, ids against specificity: 1 is the widest.
    let wide = on(1, dst("10.2.0.0/16"));
    let subscriber = on(2, dst("10.2.0.0/24"));
    let flow = on(3, udp_to("10.2.0.2/32", 5001, 5001));
    // Two partial overlaps of equal specificity: by id.
    let b = on(5, udp_to("10.3.0.0/24", 5001, 5002));
    let a = on(4, udp_to("10.3.0.0/24", 5002, 5003));
    // Overlaps nothing: stays a map element.
    let alone = on(6, udp_to("10.9.0.9/32", 53, 53));
    e.apply(vec![wide, subscriber, flow, b, a, alone], Vec::new())
        .unwrap();
    assert_eq!(e.fallback.ids().collect::<Vec<_>>(), vec![3, 4, 5, 2, 1]);
    assert_eq!(element_targets(&mut e), vec!["d6"]);
    let rules = fallback_rules(&mut e);
    assert_eq!(rules.len(), 5);
    assert!(rules[0].starts_with("ip daddr 10.2.0.2 udp dport 5001 jump d3"));
    assert!(rules[1].starts_with("ip daddr 10.3.0.0/24 udp dport 5002-5003 jump d4"));
    // By the key (destination prefix length first), the two /24s with a
    // port range come before the /24 without, whatever the ids; a packet
    // of the 5-tuple matches 3 first, one to 10.2.0.9 matches 2 before 1.
    assert_eq!(e.reconcile().unwrap(), StartReport::default());
    // The /16 and the /24 go: the 5-tuple overlaps nothing any more.
    e.apply(Vec::new(), vec![1, 2]).unwrap();
    assert_eq!(e.fallback.ids().collect::<Vec<_>>(), vec![4, 5]);
    let mut targets = element_targets(&mut e);
    targets.sort();
    assert_eq!(targets, vec!["d3", "d6"]);
    assert_eq!(e.reconcile().unwrap(), StartReport::default());
}

#[test]
fn the_same_flow_twice_is_refused_overlaps_are_not() {
    let mut e = start(FakeKernel::with_interface("eth1", 3));
    e.install(on(1, dst("10.2.0.0/24"))).unwrap();
    let err = e.install(on(2, dst("10.2.0.0/24"))).unwrap_err();
    assert!(
        matches!(
            err,
            EnforceError::Conflict {
                id: 2,
                other: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("already the flow of decision 1"));
    let err = e
        .apply(
            vec![on(3, dst("10.4.0.0/24")), on(4, dst("10.4.0.0/24"))],
            Vec::new(),
        )
        .unwrap_err();
    assert!(matches!(
        err,
        EnforceError::Conflict {
            id: 4,
            other: 3,
            ..
        }
    ));
    // Replacing a decision by one of the same flow under a new id, in one
    // change, is fine.
    e.apply(vec![on(5, dst("10.2.0.0/24"))], vec![1]).unwrap();
    e.install(on(6, dst("10.2.0.0/25"))).unwrap();
    assert_eq!(e.fallback.ids().collect::<Vec<_>>(), vec![6, 5]);
}

#[test]
fn a_flow_change_that_ends_an_overlap_moves_both_back() {
    let mut e = start(FakeKernel::with_interface("eth1", 3));
    e.install(on(1, dst("10.2.0.0/24"))).unwrap();
    e.install(on(2, udp_to("10.2.0.2/32", 5001, 5001))).unwrap();
    assert_eq!(e.fallback.ids().collect::<Vec<_>>(), vec![2, 1]);
    // 2 moves out of the /24: neither overlaps the other any more.
    e.install(on(2, udp_to("10.5.0.2/32", 5001, 5001))).unwrap();
    assert!(fallback_rules(&mut e).is_empty());
    let mut targets = element_targets(&mut e);
    targets.sort();
    assert_eq!(targets, vec!["d1", "d2"]);
    assert_eq!(e.reconcile().unwrap(), StartReport::default());
}

#[test]
fn restart_adopts_overlapping_decisions_as_fallback_rules() {
    let mut e = start(FakeKernel::with_interface("eth1", 3));
    e.install(decision(1, 5001, accept(875))).unwrap();
    e.install(on(2, dst("10.2.0.0/24"))).unwrap();
    e.install(decision(3, 5003, accept(875))).unwrap();
    let good = e.backend().table.clone();
    // A new enforcer over the same kernel: nothing to clean or restore.
    let kernel = std::mem::take(e.backend());
    let (mut e, report) = Enforcer::start(kernel, super::tests::cfg()).unwrap();
    assert_eq!(report.adopted, 3);
    assert_eq!((report.cleaned_elements, report.restored_elements), (0, 0));
    assert_eq!(e.backend().table, good);
    assert_eq!(e.fallback.ids().collect::<Vec<_>>(), vec![1, 3, 2]);
    // Removing the prefix after the restart moves both back to the map.
    e.remove(2).unwrap();
    let mut targets = element_targets(&mut e);
    targets.sort();
    assert_eq!(targets, vec!["d1", "d3"]);
    assert!(fallback_rules(&mut e).is_empty());
    assert_eq!(e.reconcile().unwrap(), StartReport::default());
}
