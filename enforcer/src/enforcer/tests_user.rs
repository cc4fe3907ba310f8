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
            "meta nfproto ipv4 meta skuid 1001 ct mark set 0x710003e9 jump d2 comment \"id=2\"",
            "meta nfproto ipv4 meta skuid 1002 ct mark set 0x710003ea jump d3 comment \"id=3\"",
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
        vec!["meta nfproto ipv4 meta skuid 1001 ct mark set 0x710003e9 jump d2 comment \"id=2\""]
    );
}
