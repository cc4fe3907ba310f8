//! Unit tests of per-user decisions: the uid resolved on this host, the
//! fallback rule matching the user's sockets and tagging their
//! connections, placed before flow decisions, and users kept apart.

use super::tests::{accept, decision, start};
use super::*;
use crate::backend::FakeKernel;
use qosloop_schema::UserRef;

fn for_user(id: u64, name: &str, uid: Option<u32>) -> Decision {
    let mut d = decision(id, 1, accept(100));
    d.profile.rate = Kbps(100);
    d.flow = FlowSpec {
        user: Some(UserRef {
            name: name.into(),
            uid,
        }),
        ..FlowSpec::default()
    };
    d
}

fn fallback_rules(e: &mut Enforcer<FakeKernel>) -> Vec<String> {
    e.backend().table.as_ref().unwrap().chains["fallback"]
        .rules
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn per_user_decisions_match_the_users_sockets_first() {
    let mut e = start(FakeKernel::with_interface("eth1", 3));
    // A flow decision that also names no field: a fallback rule too.
    let mut wide = decision(1, 5001, accept(100));
    wide.profile.rate = Kbps(100);
    wide.flow = FlowSpec::default();
    e.install(wide).unwrap();
    e.install(for_user(2, "alice", Some(1001))).unwrap();
    // The same flow for another user is no conflict.
    e.install(for_user(3, "bob", Some(1002))).unwrap();
    let rules = fallback_rules(&mut e);
    assert_eq!(
        rules,
        vec![
            "meta skuid 1001 ct mark set 0x710003e9 jump d2 comment \"id=2\"",
            "meta skuid 1002 ct mark set 0x710003ea jump d3 comment \"id=3\"",
            "meta nfproto ipv4 jump d1 comment \"id=1\"",
        ]
    );
    // The same user twice with the same flow is refused like any flow.
    let err = e.install(for_user(4, "alice", Some(1001))).unwrap_err();
    assert!(err.to_string().contains("alice"), "{err}");
}

#[test]
fn a_user_name_is_resolved_on_this_host() {
    // root is uid 0 on every Linux host.
    let d = resolve_user(for_user(5, "root", None)).unwrap();
    assert_eq!(d.flow.user.unwrap().uid, Some(0));
    // The host agent's form for a uid without a name.
    let d = resolve_user(for_user(6, "uid 4242", None)).unwrap();
    assert_eq!(d.flow.user.unwrap().uid, Some(4242));
    let err = resolve_user(for_user(7, "no-such-user-qosloop", None)).unwrap_err();
    assert!(err.to_string().contains("not known on this host"), "{err}");
}

#[test]
fn the_uid_survives_a_restart_in_the_chain_comment() {
    let mut e = start(FakeKernel::with_interface("eth1", 3));
    e.install(for_user(2, "alice", Some(1001))).unwrap();
    let good = e.backend().table.clone();
    let kernel = std::mem::take(e.backend());
    let (mut again, report) = Enforcer::start(kernel, super::tests::cfg()).unwrap();
    assert_eq!(report.adopted, 1);
    assert_eq!(again.backend().table, good);
    assert_eq!(
        fallback_rules(&mut again),
        vec!["meta skuid 1001 ct mark set 0x710003e9 jump d2 comment \"id=2\""]
    );
}

fn chain_rules(e: &mut Enforcer<FakeKernel>, chain: &str) -> Vec<String> {
    e.backend().table.as_ref().unwrap().chains[chain]
        .rules
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn replies_of_tagged_connections_are_matched_on_input() {
    let mut e = start(FakeKernel::with_interface("eth1", 3));
    // A flow decision: no reply rule.
    let mut wide = decision(1, 5001, accept(100));
    wide.profile.rate = Kbps(100);
    e.install(wide).unwrap();
    // Alice's traffic to one server port: her replies come from it.
    let mut d = for_user(2, "alice", Some(1001));
    d.flow.dst = Some("10.9.0.1".parse().unwrap());
    d.flow.proto = Some(17);
    d.flow.dst_ports = Some("5301".parse().unwrap());
    e.install(d).unwrap();
    e.install(for_user(3, "bob", Some(1002))).unwrap();
    assert_eq!(
        chain_rules(&mut e, "fallback")[..2],
        [
            "ip daddr 10.9.0.1 udp dport 5301 meta skuid 1001 ct mark set 0x710003e9 jump d2 comment \"id=2\"",
            "meta skuid 1002 ct mark set 0x710003ea jump d3 comment \"id=3\"",
        ]
    );
    assert_eq!(
        chain_rules(&mut e, "replies"),
        vec![
            "ct mark 0x710003e9 ip saddr 10.9.0.1 udp sport 5301 jump d2 comment \"id=2\"",
            "ct mark 0x710003ea jump d3 comment \"id=3\"",
        ]
    );
    let hook = e.backend().table.as_ref().unwrap().chains["replies"]
        .hook
        .clone();
    assert_eq!(hook, Some(crate::nft::model::Hook::Input));
    // The listing (what `nft list table` shows) has the same chain.
    let listing = e.listing().to_string();
    assert!(
        listing.contains("chain replies {\n\t\ttype filter hook input priority filter; policy accept;\n\t\tct mark 0x710003e9"),
        "{listing}"
    );
    // Removing a user's decision takes its reply rule away.
    e.remove(3).unwrap();
    assert_eq!(chain_rules(&mut e, "replies").len(), 1);
    e.remove(2).unwrap();
    assert!(chain_rules(&mut e, "replies").is_empty());
}

#[test]
fn a_per_user_remark_marks_both_families() {
    let mut e = start(FakeKernel::with_interface("eth1", 3));
    let mut d = for_user(2, "alice", Some(1001));
    d.out_of_profile = qosloop_schema::OutOfProfileAction::Remark {
        dscp: qosloop_schema::Dscp::BEST_EFFORT,
        shape: None,
    };
    d.in_profile_dscp = Some(qosloop_schema::Dscp::CS6);
    e.install(d).unwrap();
    let rules = chain_rules(&mut e, "d2");
    assert_eq!(rules.len(), 4, "{rules:?}");
    assert!(
        rules[0].starts_with(
            "meta nfproto ipv6 limit name \"l2\" counter packets 0 bytes 0 ip6 dscp set cs0"
        ),
        "{rules:?}"
    );
    assert!(
        rules[1].starts_with(
            "meta nfproto ipv4 limit name \"l2\" counter packets 0 bytes 0 ip dscp set cs0"
        ),
        "{rules:?}"
    );
    assert!(
        rules[2].starts_with("meta nfproto ipv6 counter packets 0 bytes 0 ip6 dscp set cs6"),
        "{rules:?}"
    );
    assert!(
        rules[3].starts_with("counter packets 0 bytes 0 ip dscp set cs6"),
        "{rules:?}"
    );
    // The metadata stays on the last rule: a restart adopts the decision.
    let kernel = std::mem::take(e.backend());
    let (_, report) = Enforcer::start(kernel, super::tests::cfg()).unwrap();
    assert_eq!(report.adopted, 1);
}

#[test]
fn a_table_without_a_replies_chain_gets_one_at_start() {
    let mut e = start(FakeKernel::with_interface("eth1", 3));
    e.install(for_user(2, "alice", Some(1001))).unwrap();
    let mut kernel = std::mem::take(e.backend());
    // As an enforcer of the previous version left it.
    kernel.table.as_mut().unwrap().chains.remove("replies");
    let (mut again, report) = Enforcer::start(kernel, super::tests::cfg()).unwrap();
    assert_eq!(report.adopted, 1);
    assert_eq!(
        chain_rules(&mut again, "replies"),
        vec!["ct mark 0x710003e9 jump d2 comment \"id=2\""]
    );
}
