//! Unit tests of the enforcer against the in-memory fake kernel.

use super::*;
use crate::backend::FakeKernel;
use qosloop_schema::{DecisionReason, Dscp, OutOfProfileAction, TrafficProfile};

pub(super) fn cfg() -> EnforcerConfig {
    EnforcerConfig {
        direction: qosloop_schema::Direction::Egress,
        interface: "eth1".into(),
        roles: vec!["edge".into()],
        capacity: Kbps(10_000),
        qdisc_major: DEFAULT_QDISC_MAJOR,
    }
}

pub(super) fn decision(id: u64, port: u16, action: OutOfProfileAction) -> Decision {
    Decision {
        id,
        version: 1,
        role: "edge".into(),
        policy_dn: "cn=gold".into(),
        flow: FlowSpec {
            src: Some("10.1.0.1".parse().unwrap()),
            dst: Some("10.2.0.2".parse().unwrap()),
            proto: Some(17),
            src_ports: None,
            dst_ports: Some(qosloop_schema::PortRange::single(port)),
            user: None,
        },
        profile: TrafficProfile {
            rate: Kbps(1000),
            burst_bytes: 15_000,
        },
        in_profile_dscp: Some(Dscp::CS6),
        out_of_profile: action,
        reason: DecisionReason {
            rate_kbps: 0.0,
            avg_rate_kbps: 0.0,
            link: "l".into(),
            link_load_kbps: 0.0,
            band: "low".into(),
        },
        issued_ns: 0,
    }
}

pub(super) fn accept(kbps: u64) -> OutOfProfileAction {
    OutOfProfileAction::Accept {
        shape: Some(Kbps(kbps)),
    }
}

pub(super) fn start(k: FakeKernel) -> Enforcer<FakeKernel> {
    Enforcer::start(k, cfg()).unwrap().0
}

#[test]
fn install_builds_qdisc_classes_and_table() {
    let mut e = start(FakeKernel::with_interface("eth1", 3));
    let s = e.install(decision(1, 5001, accept(875))).unwrap();
    // qdisc, root, default, steering filter, group class + qdisc + root, in, out.
    assert_eq!((s.installed, s.tc_messages, s.nft_transactions), (1, 9, 1));
    let k = e.backend();
    assert!(k.root_qdisc.is_some());
    assert_eq!(k.steer, Some((0xe500, 255, 0x100)));
    assert_eq!(k.classes.len(), 6);
    let group = k.classes[&TcHandle::new(0xe5, 0x100).0];
    assert_eq!(group.rate, Kbps(1000 + 8));
    assert_eq!(
        k.child_qdiscs[&group.classid.0].handle,
        TcHandle::new(0xe500, 0)
    );
    let t = k.table.as_ref().unwrap();
    // Guard, one map lookup, the jump to the fallback chain.
    assert_eq!(t.chains["postrouting"].rules.len(), 3);
    assert_eq!(t.chains["d1"].rules.len(), 2);
    assert_eq!(t.maps["v4_proto_saddr_daddr_dport"].1.len(), 1);
    assert!(t.limits.contains_key("l1"));
}

#[test]
fn shape_change_is_one_class_message_and_no_nft() {
    let mut e = start(FakeKernel::with_interface("eth1", 3));
    e.install(decision(1, 5001, accept(875))).unwrap();
    let nft_before = e.backend().nft_transactions;
    let mut d = decision(1, 5001, accept(500));
    d.version = 2;
    let s = e.install(d).unwrap();
    assert_eq!((s.changed, s.tc_messages, s.nft_transactions), (1, 1, 0));
    assert_eq!(e.backend().nft_transactions, nft_before);
    let out = e.backend().classes[&TcHandle::new(0xe500, 0x100).0];
    assert_eq!((out.rate, out.ceil), (Kbps(8), Kbps(500)));
}

#[test]
fn action_change_rewrites_only_its_chain() {
    let mut e = start(FakeKernel::with_interface("eth1", 3));
    e.install(decision(1, 5001, accept(875))).unwrap();
    let s = e
        .install(decision(
            1,
            5001,
            OutOfProfileAction::Remark {
                dscp: Dscp::BEST_EFFORT,
                shape: Some(Kbps(125)),
            },
        ))
        .unwrap();
    assert_eq!((s.changed, s.tc_messages, s.nft_transactions), (1, 1, 1));
    let t = e.backend().table.clone().unwrap();
    assert!(t.chains["d1"].rules[0].to_string().contains("dscp set cs0"));
    // The meter survives the action change: the same limit object.
    assert_eq!(t.limits.len(), 1);
    let same = e
        .install(decision(
            1,
            5001,
            OutOfProfileAction::Remark {
                dscp: Dscp::BEST_EFFORT,
                shape: Some(Kbps(125)),
            },
        ))
        .unwrap();
    assert_eq!(
        (same.unchanged, same.tc_messages, same.nft_transactions),
        (1, 0, 0)
    );
}

#[test]
fn bad_decisions_are_refused_and_leave_state_intact() {
    let mut e = start(FakeKernel::with_interface("eth1", 3));
    e.install(decision(1, 5001, accept(875))).unwrap();
    let snapshot = (e.backend().classes.clone(), e.backend().table.clone());
    let mut zero = decision(2, 5002, accept(875));
    zero.profile.rate = Kbps(0);
    assert!(e
        .install(zero)
        .unwrap_err()
        .to_string()
        .contains("profile rate is 0"));
    let too_fast = decision(2, 5002, accept(20_000));
    assert!(e
        .install(too_fast)
        .unwrap_err()
        .to_string()
        .contains("above the capacity"));
    let mut role = decision(2, 5002, accept(875));
    role.role = "core".into();
    assert!(e.install(role).unwrap_err().to_string().contains("role"));
    let clash = decision(2, 5001, accept(875));
    assert!(matches!(
        e.install(clash),
        Err(EnforceError::Conflict { other: 1, .. })
    ));
    let mut mixed = decision(2, 5002, accept(875));
    mixed.flow.dst = Some("2001:db8::1".parse().unwrap());
    assert!(e
        .install(mixed)
        .unwrap_err()
        .to_string()
        .contains("address families"));
    let many: Vec<Decision> = (10..20)
        .map(|i| decision(i, 6000 + i as u16, accept(875)))
        .collect();
    assert!(matches!(
        e.apply(many, vec![]),
        Err(EnforceError::Oversubscribed { .. })
    ));
    assert_eq!(
        (e.backend().classes.clone(), e.backend().table.clone()),
        snapshot
    );
    assert!(e.install(decision(2, 5002, accept(875))).is_ok());
}

#[test]
fn kernel_refusals_roll_back() {
    let mut e = start(FakeKernel::with_interface("eth1", 3));
    e.install(decision(1, 5001, accept(875))).unwrap();
    let snapshot = (e.backend().classes.clone(), e.backend().table.clone());
    // nftables refuses: the classes created for decision 2 go again.
    e.backend().fail_next_nft = Some("nftables refused the transaction: boom".into());
    let err = e.install(decision(2, 5002, accept(875))).unwrap_err();
    assert!(err.to_string().contains("boom"));
    assert_eq!(
        (e.backend().classes.clone(), e.backend().table.clone()),
        snapshot
    );
    // HTB refuses the second class: the first one is deleted again.
    e.backend().fail_class = Some(TcHandle::new(0xe500, 0x101));
    let err = e.install(decision(2, 5002, accept(875))).unwrap_err();
    assert!(err.to_string().contains("e500:101"), "{err}");
    assert_eq!(
        (e.backend().classes.clone(), e.backend().table.clone()),
        snapshot
    );
    // A refused rate change is undone too.
    e.backend().fail_next_nft = Some("no".into());
    assert!(e
        .install(decision(1, 5001, OutOfProfileAction::Drop))
        .is_err());
    assert_eq!(
        (e.backend().classes.clone(), e.backend().table.clone()),
        snapshot
    );
    // First install failing removes the qdisc it created.
    let mut fresh = start(FakeKernel::with_interface("eth1", 3));
    fresh.backend().fail_next_nft = Some("no".into());
    assert!(fresh.install(decision(1, 5001, accept(875))).is_err());
    assert!(fresh.backend().root_qdisc.is_none() && fresh.backend().classes.is_empty());
    assert!(fresh.install(decision(1, 5001, accept(875))).is_ok());
}

#[test]
fn remove_and_restart_reconcile_without_duplicates_or_orphans() {
    let mut e = start(FakeKernel::with_interface("eth1", 3));
    for i in 1..=3 {
        e.install(decision(i, 5000 + i as u16, accept(875)))
            .unwrap();
    }
    e.remove(2).unwrap();
    // root, default, group class, its qdisc's root and in-profile class, 2 out classes.
    assert_eq!(e.backend().classes.len(), 5 + 2);
    assert!(!e
        .backend()
        .table
        .as_ref()
        .unwrap()
        .chains
        .contains_key("d2"));
    // "Crash": a new enforcer over the same kernel adopts 1 and 3.
    let mut kernel = std::mem::take(e.backend());
    // Leave an orphan class and a duplicate jump behind, as a crash might.
    kernel.classes.insert(
        TcHandle::new(0xe500, 0x1ff).0,
        HtbClass {
            classid: TcHandle::new(0xe500, 0x1ff),
            parent: TcHandle::new(0xe500, 1),
            rate: Kbps(8),
            ceil: Kbps(8),
            prio: 2,
        },
    );
    // ... and a map element deleted behind the enforcer's back, and a
    // stray element jumping to decision 3's chain under another key.
    let t = kernel.table.as_mut().unwrap();
    let (_, elems) = t.maps.get_mut("v4_proto_saddr_daddr_dport").unwrap();
    let key1 = elems.iter().find(|(_, c)| *c == "d1").unwrap().0.clone();
    elems.remove(&key1);
    let mut stray = key1.clone();
    stray[3] = crate::nft::model::KeyPart::Port(9999);
    elems.insert(stray, "d3".into());
    let (mut e, report) = Enforcer::start(kernel, cfg()).unwrap();
    assert_eq!(report.adopted, 2);
    assert_eq!(report.cleaned_classes, 1);
    assert_eq!((report.restored_elements, report.cleaned_elements), (1, 1));
    let t = e.backend().table.clone().unwrap();
    let elems = &t.maps["v4_proto_saddr_daddr_dport"].1;
    assert_eq!(elems.get(&key1).map(String::as_str), Some("d1"));
    assert_eq!(elems.len(), 2);
    // The PDP resynchronises with 1 (unchanged) and 4 (new): 3 goes.
    let s = e
        .sync(vec![
            decision(1, 5001, accept(875)),
            decision(4, 5004, accept(875)),
        ])
        .unwrap();
    assert_eq!((s.unchanged, s.installed, s.removed), (1, 1, 1));
    let k = e.backend();
    assert_eq!(k.classes.len(), 5 + 2);
    let t = k.table.as_ref().unwrap();
    assert_eq!(t.maps["v4_proto_saddr_daddr_dport"].1.len(), 2);
    assert_eq!(t.limits.len(), 2);
    assert_eq!(
        t.chains.keys().cloned().collect::<Vec<_>>(),
        vec![
            "d1".to_owned(),
            "d4".to_owned(),
            "fallback".to_owned(),
            "postrouting".to_owned(),
            "replies".to_owned()
        ]
    );
    e.cleanup().unwrap();
    assert!(e.backend().table.is_none() && e.backend().root_qdisc.is_none());
}

#[test]
fn decisions_whose_classes_vanished_are_dropped_at_start() {
    let mut e = start(FakeKernel::with_interface("eth1", 3));
    e.install(decision(1, 5001, accept(875))).unwrap();
    e.install(decision(2, 5002, accept(875))).unwrap();
    let mut kernel = std::mem::take(e.backend());
    kernel.classes.remove(&TcHandle::new(0xe500, 0x100).0);
    let (mut e, report) = Enforcer::start(kernel, cfg()).unwrap();
    assert_eq!((report.adopted, report.cleaned_chains), (1, 1));
    assert_eq!(e.installed(), vec![(2, 1)]);
    let k = e.backend();
    assert_eq!(k.classes.len(), 5 + 1);
    assert!(!k.table.as_ref().unwrap().chains.contains_key("d1"));
    // The group's rates follow what stayed.
    assert_eq!(k.classes[&TcHandle::new(0xe5, 0x100).0].rate, Kbps(1008));
    assert_eq!(k.classes[&TcHandle::new(0xe500, 2).0].rate, Kbps(1000));
}

#[test]
fn groups_hold_256_decisions_are_created_on_demand_and_go_when_empty() {
    let big = EnforcerConfig {
        capacity: Kbps(10_000_000),
        ..cfg()
    };
    let (mut e, _) = Enforcer::start(FakeKernel::with_interface("eth1", 3), big.clone()).unwrap();
    let all: Vec<Decision> = (1..=600)
        .map(|i| decision(i, 1000 + i as u16, accept(875)))
        .collect();
    let s = e.apply(all, vec![]).unwrap();
    assert_eq!(s.installed, 600);
    let k = e.backend();
    assert_eq!(k.child_qdiscs.len(), 3);
    // Group bytes: 0, 2, 3 (e501: shares the kernel's leaf-qdisc hash bucket).
    let rates = |k: &FakeKernel, g: usize| {
        let byte = [0u16, 2, 3][g];
        let outer = k.classes.get(&TcHandle::new(0xe5, 0x100 + byte).0)?;
        let inner = k.classes.get(&TcHandle::new(0xe500 | byte, 2).0)?;
        Some((outer.rate, inner.rate))
    };
    assert_eq!(rates(k, 0), Some((Kbps(256 * 1008), Kbps(256 * 1000))));
    assert_eq!(rates(k, 2), Some((Kbps(88 * 1008), Kbps(88 * 1000))));
    // Slot 259 (decision 260) is the fourth of group 1: e502:103.
    assert!(k.classes.contains_key(&TcHandle::new(0xe502, 0x103).0));
    // Emptying group 1 deletes its class (and qdisc) only: one message.
    let s = e.apply(vec![], (257..=512).collect()).unwrap();
    assert_eq!((s.removed, s.tc_messages), (256, 1));
    let k = e.backend();
    assert_eq!(rates(k, 1), None);
    assert_eq!(k.child_qdiscs.len(), 2);
    assert_eq!(k.classes.len(), 2 + 2 * 3 + 344);
    // A profile change moves both sums of its group, and nothing else.
    let mut d = decision(1, 1001, accept(875));
    d.profile.rate = Kbps(2000);
    let s = e.install(d).unwrap();
    assert_eq!((s.changed, s.tc_messages, s.nft_transactions), (1, 2, 1));
    assert_eq!(
        rates(e.backend(), 0),
        Some((Kbps(256 * 1008 + 1000), Kbps(256 * 1000 + 1000)))
    );
    // A restart adopts all 344, keeps both groups, cleans nothing.
    let kernel = std::mem::take(e.backend());
    let (mut e, report) = Enforcer::start(kernel, big).unwrap();
    assert_eq!((report.adopted, report.cleaned_classes), (344, 0));
    // A new decision takes the first free slot, in group 1, which comes back.
    e.install(decision(900, 9000, accept(875))).unwrap();
    assert_eq!(rates(e.backend(), 1), Some((Kbps(1008), Kbps(1000))));
}

/// The HTB deletes a removal plans, as class ids.
fn planned_deletes(e: &Enforcer<FakeKernel>, remove: impl IntoIterator<Item = u64>) -> Vec<u32> {
    let removing: BTreeSet<u64> = remove.into_iter().collect();
    let plan = e.plan(&[], &removing, &mut ApplySummary::default());
    plan.tc_post
        .iter()
        .map(|op| match op {
            TcOp::DeleteClass { classid, .. } => classid.0,
            other => panic!("a removal plans only class deletes, not {other}"),
        })
        .collect()
}

#[test]
fn removals_delete_emptied_groups_whole_and_newest_first() {
    let big = EnforcerConfig {
        capacity: Kbps(10_000_000),
        ..cfg()
    };
    let (mut e, _) = Enforcer::start(FakeKernel::with_interface("eth1", 3), big).unwrap();
    let all: Vec<Decision> = (1..=600)
        .map(|i| decision(i, 1000 + i as u16, accept(875)))
        .collect();
    e.apply(all, vec![]).unwrap();
    let layout = e.layout().clone();
    let group = |g: u32| layout.group_class(g, Kbps(0)).classid.0;
    let classes: BTreeMap<u64, u32> = e
        .applied
        .iter()
        .map(|(id, a)| (*id, a.out_class.unwrap().classid.0))
        .collect();
    let class = |id: u64| classes[&id];
    // Everything: one delete per group (its qdisc and classes go with it),
    // the newest group first, no delete of a decision's class.
    assert_eq!(
        planned_deletes(&e, 1..=600),
        vec![group(2), group(1), group(0)]
    );
    // Group 1 emptied, two decisions of group 2 and one of group 0 removed:
    // their classes one by one, group 1 whole, in descending slot order.
    let mut remove: Vec<u64> = (257..=512).collect();
    remove.extend([3, 520, 599]);
    let deletes = planned_deletes(&e, remove.iter().copied());
    assert_eq!(deletes, vec![class(599), class(520), group(1), class(3)]);
    assert!((257..=512).all(|id| !deletes.contains(&class(id))));
    // The plan run leaves exactly what stays.
    let s = e.apply(vec![], remove).unwrap();
    // Four deletes, and the two rates of groups 0 and 2 lowered.
    assert_eq!((s.removed, s.tc_messages), (259, 4 + 2 * 2));
    let k = e.backend();
    assert!(!k.classes.contains_key(&group(1)));
    assert_eq!(k.child_qdiscs.len(), 2);
    assert_eq!(k.classes.len(), 2 + 2 * 3 + 600 - 259);
    // Then all the rest: the two remaining groups whole, the fake empty of them.
    let s = e.sync(vec![]).unwrap();
    assert_eq!((s.removed, s.tc_messages), (341, 2));
    let k = e.backend();
    assert!(k.child_qdiscs.is_empty());
    assert_eq!(k.classes.len(), 2);
}

#[test]
fn flow_change_replaces_the_jump() {
    let mut e = start(FakeKernel::with_interface("eth1", 3));
    e.install(decision(1, 5001, accept(875))).unwrap();
    e.install(decision(1, 5009, accept(875))).unwrap();
    let t = e.backend().table.as_ref().unwrap();
    let elems = &t.maps["v4_proto_saddr_daddr_dport"].1;
    assert_eq!(elems.len(), 1);
    let key = elems.keys().next().unwrap();
    assert_eq!(key[3], crate::nft::model::KeyPart::Port(5009));
    // A flow with a prefix goes to the interval map of its shape, and the
    // empty exact map goes with its lookup.
    let mut wide = decision(1, 5009, accept(875));
    wide.flow.dst = Some("10.2.0.0/24".parse().unwrap());
    e.install(wide).unwrap();
    let t = e.backend().table.as_ref().unwrap();
    assert_eq!(
        t.maps.keys().collect::<Vec<_>>(),
        vec!["v4iv_proto_saddr_daddr_dport"]
    );
    assert_eq!(t.chains["postrouting"].rules.len(), 3);
    // A flow of one prefix alone: any protocol, in an interval map.
    let mut alone = decision(1, 5009, accept(875));
    alone.flow = FlowSpec {
        dst: Some("10.2.0.0/24".parse().unwrap()),
        ..FlowSpec::default()
    };
    e.install(alone).unwrap();
    let t = e.backend().table.as_ref().unwrap();
    assert_eq!(t.maps.keys().collect::<Vec<_>>(), vec!["v4iv_proto_daddr"]);
    // A flow that names nothing goes to the fallback chain, and the empty
    // map goes with its lookup.
    let mut all = decision(1, 5009, accept(875));
    all.flow = FlowSpec::default();
    e.install(all).unwrap();
    let t = e.backend().table.as_ref().unwrap();
    assert!(t.maps.is_empty());
    assert_eq!(t.chains["postrouting"].rules.len(), 2);
    assert_eq!(
        t.chains["fallback"].rules[0].to_string(),
        "meta nfproto ipv4 jump d1 comment \"id=1\""
    );
}

#[test]
fn unknown_interface_and_foreign_qdisc_are_errors() {
    let err = Enforcer::start(FakeKernel::default(), cfg()).unwrap_err();
    assert_eq!(err, EnforceError::UnknownInterface("eth1".into()));
    let mut k = FakeKernel::with_interface("eth1", 3);
    k.root_qdisc = Some(crate::tc::QdiscInfo {
        ifindex: 3,
        handle: TcHandle::new(1, 0),
        parent: u32::MAX,
        kind: "tbf".into(),
    });
    assert!(matches!(
        Enforcer::start(k, cfg()),
        Err(EnforceError::ForeignQdisc { .. })
    ));
    let mut bad = cfg();
    bad.interface = "eth 1;".into();
    assert!(matches!(
        Enforcer::start(FakeKernel::default(), bad),
        Err(EnforceError::UnusableInterfaceName(_))
    ));
}

/// The nftables commands of a plan, as `nft -f` text.
pub(super) fn plan_text(
    e: &Enforcer<FakeKernel>,
    upsert: Option<Decision>,
    remove: &[u64],
) -> Vec<String> {
    let rendered: Vec<Rendered> = upsert
        .iter()
        .map(|d| {
            let slot = e.applied.get(&d.id).map_or(9, |a| a.slot);
            render::render(e.layout(), d, slot, e.ifindex()).unwrap()
        })
        .collect();
    let removing: BTreeSet<u64> = remove.iter().copied().collect();
    let plan = e.plan(&rendered, &removing, &mut ApplySummary::default());
    let t = &plan.nft.batch.table;
    plan.nft.batch.commands.iter().map(|c| c.text(t)).collect()
}

#[test]
fn plans_change_only_what_differs_and_keep_the_meter() {
    let mut e = start(FakeKernel::with_interface("eth1", 3));
    e.install(decision(1, 5001, accept(875))).unwrap();
    e.install(decision(2, 5002, accept(875))).unwrap();
    // Action change: the chain's rules, not its limit object.
    let remark = OutOfProfileAction::Remark {
        dscp: Dscp::BEST_EFFORT,
        shape: Some(Kbps(125)),
    };
    let p = plan_text(&e, Some(decision(1, 5001, remark)), &[]);
    assert_eq!(p.len(), 3, "{p:#?}");
    assert_eq!(p[0], "flush chain inet qosloop_eth1 d1");
    assert!(p[1].starts_with(
        "add rule inet qosloop_eth1 d1 limit name \"l1\" counter packets 0 bytes 0 ip dscp set cs0"
    ));
    // Profile change: the limit object is replaced (a new bucket for a new profile).
    let mut faster = decision(1, 5001, accept(875));
    faster.profile.rate = Kbps(2000);
    let p = plan_text(&e, Some(faster), &[]);
    assert!(
        p.contains(&"delete limit inet qosloop_eth1 l1".to_owned()),
        "{p:#?}"
    );
    assert!(p.contains(
        &"add limit inet qosloop_eth1 l1 { rate over 250000 bytes/second burst 15000 bytes; }"
            .to_owned()
    ));
    // Flow change: one element out, one in; the chain untouched but its meta comment.
    let p = plan_text(&e, Some(decision(1, 5009, accept(875))), &[]);
    assert!(p.iter().any(|c| c == "delete element inet qosloop_eth1 v4_proto_saddr_daddr_dport { udp . 10.1.0.1 . 10.2.0.2 . 5001 }"), "{p:#?}");
    assert!(p.iter().any(|c| c == "add element inet qosloop_eth1 v4_proto_saddr_daddr_dport { udp . 10.1.0.1 . 10.2.0.2 . 5009 : jump d1 }"), "{p:#?}");
    // Removal: element, chain, limit; the map stays for decision 2.
    let p = plan_text(&e, None, &[1]);
    assert_eq!(
        p,
        vec![
            "delete element inet qosloop_eth1 v4_proto_saddr_daddr_dport { udp . 10.1.0.1 . 10.2.0.2 . 5001 }",
            "flush chain inet qosloop_eth1 d1",
            "delete chain inet qosloop_eth1 d1",
            "delete limit inet qosloop_eth1 l1",
        ]
    );
    // Removing both: the map goes too, after the base chain stops looking it up.
    let p = plan_text(&e, None, &[1, 2]);
    assert_eq!(
        p.last().unwrap(),
        "delete map inet qosloop_eth1 v4_proto_saddr_daddr_dport"
    );
    assert!(p.contains(&"flush chain inet qosloop_eth1 postrouting".to_owned()));
    // Planning sent nothing.
    let before = e.backend().nft_transactions;
    let _ = plan_text(&e, None, &[1, 2]);
    assert_eq!(e.backend().nft_transactions, before);
}

#[test]
fn the_fake_refuses_what_the_kernel_refuses() {
    use crate::nft::model::{Batch, Command, Stmt};
    let mut e = start(FakeKernel::with_interface("eth1", 3));
    e.install(decision(1, 5001, accept(875))).unwrap();
    let table = e.layout().table_id();
    let run = |e: &mut Enforcer<FakeKernel>, cmds: Vec<Command>| {
        let mut b = Batch::new(table.clone());
        b.commands = cmds;
        e.backend().nft(&b)
    };
    let before = e.backend().table.clone();
    let jump = |c: &str| Command::AddRule {
        chain: "fallback".into(),
        rule: Rule {
            stmts: vec![Stmt::Jump(c.into())],
            comment: None,
        },
    };
    for (cmds, why) in [
        (vec![jump("d99")], "jump d99"),
        (
            vec![Command::AddChain {
                name: "d1".into(),
                hook: None,
            }],
            "File exists",
        ),
        (vec![Command::DeleteChain("d1".into())], "not empty"),
        (
            vec![
                Command::FlushChain("d1".into()),
                Command::DeleteChain("d1".into()),
            ],
            "in use",
        ),
        (vec![Command::DeleteLimit("l1".into())], "busy"),
        (
            vec![Command::AddElements {
                shape: crate::nft::model::Shape {
                    family: crate::nft::model::IpFamily::V4,
                    fields: vec![crate::nft::model::Field::Daddr],
                    interval: false,
                },
                elements: vec![],
            }],
            "v4_daddr: No such file",
        ),
        (
            vec![Command::AddLimit(e.applied[&1].limit.clone())],
            "File exists",
        ),
    ] {
        let err = run(&mut e, cmds).unwrap_err();
        assert!(err.contains(why), "{err} (wanted {why})");
        assert_eq!(e.backend().table, before, "a refused batch changes nothing");
    }
}

#[test]
fn reconcile_restores_a_table_changed_behind_its_back() {
    let mut e = start(FakeKernel::with_interface("eth1", 3));
    e.install(decision(1, 5001, accept(875))).unwrap();
    e.install(decision(2, 5002, accept(875))).unwrap();
    let good = e.backend().table.clone();
    assert_eq!(e.reconcile().unwrap(), StartReport::default());
    // Someone deletes an element, adds one, and flushes a chain.
    let t = e.backend().table.as_mut().unwrap();
    let (_, elems) = t.maps.get_mut("v4_proto_saddr_daddr_dport").unwrap();
    let k1 = elems.iter().find(|(_, c)| *c == "d1").unwrap().0.clone();
    elems.remove(&k1);
    let mut other = k1.clone();
    other[3] = crate::nft::model::KeyPart::Port(7);
    elems.insert(other, "d2".into());
    t.chains.get_mut("d2").unwrap().rules.clear();
    t.chains.get_mut("postrouting").unwrap().rules.clear();
    let r = e.reconcile().unwrap();
    assert_eq!(
        (r.restored_elements, r.cleaned_elements, r.cleaned_chains),
        (1, 1, 1)
    );
    assert_eq!(e.backend().table, good);
}

#[test]
fn overlap_index_finds_wide_and_host_specs() {
    let mut idx = FlowIndex::default();
    let host = FlowSpec {
        dst: Some("10.0.0.1".parse().unwrap()),
        ..FlowSpec::default()
    };
    let wide = FlowSpec {
        dst: Some("10.0.0.0/24".parse().unwrap()),
        ..FlowSpec::default()
    };
    idx.insert(1, host.clone());
    assert_eq!(idx.overlapping(&wide, &|_| false).map(|x| x.0), Some(1));
    idx.remove(1);
    idx.insert(2, wide);
    assert_eq!(idx.overlapping(&host, &|_| false).map(|x| x.0), Some(2));
    assert!(idx.overlapping(&host, &|id| id == 2).is_none());
}
