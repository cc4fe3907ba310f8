//! Per-user rules and user groups: the sample, and what `--check` says
//! about bad ones (DN and attribute named).

use super::*;
use crate::repo::ldif;
use qosloop_schema::SAMPLE_PER_USER_LDIF;

fn sample() -> Vec<Entry> {
    ldif::parse(SAMPLE_PER_USER_LDIF).unwrap()
}

fn edited(f: impl FnOnce(&mut Vec<Entry>)) -> Vec<PolicyError> {
    let mut e = sample();
    f(&mut e);
    build_strict(&e).unwrap_err().0
}

fn entry<'a>(entries: &'a mut [Entry], dn: &str) -> &'a mut Entry {
    entries.iter_mut().find(|e| e.dn.starts_with(dn)).unwrap()
}

fn set(e: &mut Entry, attr: &str, values: &[&str]) {
    e.attrs.retain(|(n, _)| !n.eq_ignore_ascii_case(attr));
    if !values.is_empty() {
        e.attrs.push((
            attr.to_owned(),
            values.iter().map(|v| (*v).to_owned()).collect(),
        ));
    }
}

#[test]
fn the_per_user_sample_names_users_and_group_members() {
    let p = build_strict(&sample()).unwrap();
    let alice = p.rules.iter().find(|r| r.name == "alice").unwrap();
    assert!(alice.per_user);
    assert_eq!(alice.users, vec!["alice".to_owned()]);
    assert_eq!(alice.band_basis, BandBasis::User);
    assert!(alice.flows.is_empty());
    let students = p.rules.iter().find(|r| r.name == "students").unwrap();
    assert!(students.per_user);
    assert_eq!(students.users, vec!["bob".to_owned(), "carol".to_owned()]);
    assert_eq!(students.band_basis, BandBasis::Link);
    let class = p.classes.iter().find(|c| c.name == "user-2m").unwrap();
    assert_eq!(class.profile.rate, Kbps(2000));
}

#[test]
fn a_posix_group_counts_its_member_uids() {
    let mut e = sample();
    e.extend(
        ldif::parse(
            "dn: cn=staff,ou=groups,dc=qosloop,dc=example\nobjectClass: posixGroup\n\
             cn: staff\ngidNumber: 5000\nmemberUid: dave\nmemberUid: erin\n",
        )
        .unwrap(),
    );
    set(
        entry(&mut e, "cn=students,ou=rules"),
        "qosloopRuleGroupDN",
        &["cn=staff,ou=groups,dc=qosloop,dc=example"],
    );
    let p = build_strict(&e).unwrap();
    let r = p.rules.iter().find(|r| r.name == "students").unwrap();
    assert_eq!(r.users, vec!["dave".to_owned(), "erin".to_owned()]);
}

#[test]
fn bad_per_user_rules_name_the_dn_and_the_attribute() {
    let has = |errs: &[PolicyError], dn: &str, attr: &str, text: &str| {
        assert!(
            errs.iter().any(|x| x.dn.starts_with(dn)
                && x.attribute.as_deref() == Some(attr)
                && x.message.contains(text)),
            "{dn} {attr} {text}: {errs:?}"
        );
    };
    let errs = edited(|e| {
        set(
            entry(e, "cn=students,ou=rules"),
            "qosloopRuleGroupDN",
            &["cn=nobody,ou=groups,dc=qosloop,dc=example"],
        )
    });
    has(
        &errs,
        "cn=students,ou=rules",
        "qosloopRuleGroupDN",
        "dangling DN",
    );
    let errs = edited(|e| {
        set(
            entry(e, "cn=students,ou=rules"),
            "qosloopRuleGroupDN",
            &["cn=user-2m,ou=classes,dc=qosloop,dc=example"],
        )
    });
    has(
        &errs,
        "cn=students,ou=rules",
        "qosloopRuleGroupDN",
        "is not a group",
    );
    let errs = edited(|e| set(entry(e, "cn=alice,ou=rules"), "qosloopBandBasis", &["own"]));
    has(
        &errs,
        "cn=alice,ou=rules",
        "qosloopBandBasis",
        "is not link",
    );
    let errs = edited(|e| set(entry(e, "cn=alice,ou=rules"), "qosloopRuleUser", &[]));
    has(
        &errs,
        "cn=alice,ou=rules",
        "qosloopRuleUser",
        "names no user",
    );
    let errs = edited(|e| {
        set(
            entry(e, "cn=students,ou=groups"),
            "qosloopMemberUid",
            &["bob", "bad\u{7}name"],
        )
    });
    has(
        &errs,
        "cn=students,ou=groups",
        "qosloopMemberUid",
        "control character",
    );
    let errs = edited(|e| set(entry(e, "cn=students,ou=groups"), "qosloopGroupName", &[]));
    has(&errs, "cn=students,ou=groups", "qosloopGroupName", "");
    // A per-user attribute on a rule without the class: not allowed.
    let errs = edited(|e| {
        let r = entry(e, "cn=alice,ou=rules");
        for (n, v) in &mut r.attrs {
            if n == "objectClass" {
                v.retain(|c| c != "qosloopPerUserRuleAuxClass");
            }
        }
    });
    has(&errs, "cn=alice,ou=rules", "qosloopRuleUser", "not allowed");
}
