//! The LDAP policy repository against a real slapd (the test kit's harness):
//! changes made in slapd reach the watch receiver, invalid entries are
//! rejected with their DN while the rest keep working, and a slapd restart
//! holds the last good policy and then resynchronises.
//!
//! Waits are bounded only so that a broken build fails instead of hanging;
//! the assertions are about the policy's content, never about timings.
// Test helpers may unwrap: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use qosloop_policy_server::repo::{
    build_strict, load_ldap, parse_ldif, watch_ldap, AuditChange, AuditEvent, LdapBind, LdapSource,
    PolicyWatch, RepoError,
};
use qosloop_schema::{Kbps, PolicySet, SAMPLE_POLICY_LDIF};
use qosloop_testkit::harness::Slapd;
use qosloop_testkit::need;
use std::sync::Arc;
use std::time::Duration;

const BASE: &str = "dc=qosloop,dc=example";
const GOLD: &str = "cn=gold,ou=classes,dc=qosloop,dc=example";
/// Upper bound of every wait: generous, so that a slow machine never fails
/// a correct build; a broken one fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(20);

fn start_slapd() -> Slapd {
    let slapd = match Slapd::start(BASE) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    slapd.add_ldif(SAMPLE_POLICY_LDIF).unwrap();
    slapd
}

fn source(slapd: &Slapd) -> LdapSource {
    let mut s = LdapSource::new(
        slapd.url(),
        BASE,
        LdapBind::Simple {
            dn: slapd.bind_dn().to_owned(),
            password: slapd.password().to_owned(),
        },
    );
    s.backoff_max = Duration::from_millis(500);
    s
}

fn sample_policy() -> PolicySet {
    build_strict(&parse_ldif(SAMPLE_POLICY_LDIF).unwrap()).unwrap()
}

/// Waits until the published policy satisfies `pred`.
async fn wait_for(
    w: &mut PolicyWatch,
    what: &str,
    pred: impl Fn(&PolicySet) -> bool,
) -> Arc<PolicySet> {
    let got = tokio::time::timeout(PATIENCE, w.policy.wait_for(|p| pred(p)))
        .await
        .ok()
        .and_then(|r| r.ok())
        .map(|p| p.clone());
    match got {
        Some(p) => p,
        None => panic!("the policy never reached: {what}; it is {:#?}", w.current()),
    }
}

/// Waits for an audit event matching `pred`, skipping others.
async fn wait_audit(
    w: &mut PolicyWatch,
    what: &str,
    pred: impl Fn(&AuditEvent) -> bool,
) -> AuditEvent {
    let found = tokio::time::timeout(PATIENCE, async {
        while let Some(e) = w.audit.recv().await {
            if pred(&e) {
                return Some(e);
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(e)) => e,
        _ => panic!("no audit event: {what}"),
    }
}

fn class_rate(p: &PolicySet) -> Option<Kbps> {
    p.classes
        .iter()
        .find(|c| c.name == "gold")
        .map(|c| c.profile.rate)
}

const SECOND_RULE: &str = "dn: cn=bulk,ou=rules,dc=qosloop,dc=example\n\
    objectClass: pcimRuleInstance\n\
    objectClass: qosloopRuleAuxClass\n\
    cn: bulk\n\
    pcimRuleName: bulk\n\
    pcimRulePriority: 10\n\
    pcimRoles: edge\n\
    qosloopLinkDN: cn=edge-ingress,ou=links,dc=qosloop,dc=example\n\
    \n\
    dn: cn=tcp,cn=bulk,ou=rules,dc=qosloop,dc=example\n\
    objectClass: pcimRuleConditionAssociation\n\
    objectClass: qosloopFlowCondition\n\
    cn: tcp\n\
    pcimConditionGroupNumber: 1\n\
    pcimConditionNegated: FALSE\n\
    qosloopDstPrefix: 10.71.2.0/24\n\
    qosloopProtocol: 6\n\
    \n\
    dn: cn=service,cn=bulk,ou=rules,dc=qosloop,dc=example\n\
    objectClass: pcimRuleActionAssociation\n\
    cn: service\n\
    pcimActionOrder: 1\n\
    pcimActionDN: cn=gold,ou=classes,dc=qosloop,dc=example\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_added_modified_and_deleted_in_slapd_reach_the_watch_receiver() {
    need!(Slapd::available());
    let slapd = start_slapd();
    let mut w = watch_ldap(source(&slapd), PATIENCE).await.unwrap();
    assert_eq!(*w.current(), sample_policy());
    // The initial load is audited as adds.
    wait_audit(&mut w, "initial add of gold", |e| {
        e.change == AuditChange::Add && e.dn == GOLD
    })
    .await;

    // Modify: the profile rate of the service class.
    slapd
        .modify_ldif(&format!(
            "dn: {GOLD}\nchangetype: modify\nreplace: qosloopProfileRate\nqosloopProfileRate: 2000\n"
        ))
        .unwrap();
    let p = wait_for(&mut w, "gold at 2000 kbit/s", |p| {
        class_rate(p) == Some(Kbps(2000))
    })
    .await;
    assert_eq!(p.rules, sample_policy().rules);
    let e = wait_audit(&mut w, "modify of gold", |e| {
        e.change == AuditChange::Modify
    })
    .await;
    assert_eq!(e.dn, GOLD);
    assert_eq!(e.source, slapd.url());

    // Add: a second rule (three entries, arriving one by one).
    slapd.add_ldif(SECOND_RULE).unwrap();
    let p = wait_for(&mut w, "rule bulk", |p| {
        p.rules.iter().any(|r| r.name == "bulk")
    })
    .await;
    let bulk = p.rules.iter().find(|r| r.name == "bulk").unwrap();
    assert_eq!(bulk.priority, 10);
    assert_eq!(bulk.flows[0].proto, Some(6));
    assert_eq!(p.rules[0].name, "policed-flow", "higher priority first");

    // Delete: the rule's entries, children first.
    for dn in [
        "cn=service,cn=bulk,ou=rules,dc=qosloop,dc=example",
        "cn=tcp,cn=bulk,ou=rules,dc=qosloop,dc=example",
        "cn=bulk,ou=rules,dc=qosloop,dc=example",
    ] {
        slapd.delete(dn).unwrap();
    }
    wait_for(&mut w, "rule bulk gone", |p| {
        !p.rules.iter().any(|r| r.name == "bulk")
    })
    .await;
    wait_audit(&mut w, "delete of bulk", |e| {
        e.change == AuditChange::Delete && e.dn == "cn=bulk,ou=rules,dc=qosloop,dc=example"
    })
    .await;

    // A child entry: the traffic that counts towards the link load.
    slapd
        .modify_ldif(
            "dn: cn=background,cn=edge-ingress,ou=links,dc=qosloop,dc=example\n\
             changetype: modify\n\
             replace: qosloopDstPorts\n\
             qosloopDstPorts: 5000-5099\n",
        )
        .unwrap();
    wait_for(&mut w, "narrower link traffic", |p| {
        p.links[0].traffic[0]
            .dst_ports
            .is_some_and(|r| r.last == 5099)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_entry_is_rejected_with_its_dn_while_the_rest_keep_working() {
    need!(Slapd::available());
    let slapd = start_slapd();
    let mut w = watch_ldap(source(&slapd), PATIENCE).await.unwrap();
    let good = w.current();

    // An action LDAP accepts (IA5 string) but qosloop does not know.
    let medium = "cn=medium,cn=gold,ou=classes,dc=qosloop,dc=example";
    slapd
        .modify_ldif(&format!(
            "dn: {medium}\nchangetype: modify\nreplace: qosloopBandAction\nqosloopBandAction: police\n"
        ))
        .unwrap();
    let e = wait_audit(&mut w, "reject of medium", |e| {
        e.change == AuditChange::Reject
    })
    .await;
    assert_eq!(e.dn, medium);
    let detail = e.detail.unwrap();
    assert!(detail.starts_with("qosloopBandAction:"), "{detail}");
    assert!(detail.contains("unknown action"), "{detail}");
    // The class keeps its last good version.
    assert_eq!(w.current().classes, good.classes);

    // A rule whose action points nowhere is rejected with its DN...
    slapd
        .add_ldif(&SECOND_RULE.replace("pcimActionDN: cn=gold,", "pcimActionDN: cn=platinum,"))
        .unwrap();
    let e = wait_audit(&mut w, "reject of the dangling action", |e| {
        e.change == AuditChange::Reject && e.dn.starts_with("cn=service,cn=bulk")
    })
    .await;
    assert!(e.detail.unwrap().starts_with("pcimActionDN:"));

    // ...while valid changes elsewhere still apply.
    slapd
        .modify_ldif(
            "dn: cn=edge-ingress,ou=links,dc=qosloop,dc=example\n\
             changetype: modify\n\
             replace: qosloopLinkCapacity\n\
             qosloopLinkCapacity: 20000\n",
        )
        .unwrap();
    let p = wait_for(&mut w, "link at 20000 kbit/s", |p| {
        p.links[0].capacity == Kbps(20_000)
    })
    .await;
    assert_eq!(p.classes, good.classes);
    assert_eq!(p.rules, good.rules);

    // Fixing the entries brings them in.
    slapd
        .modify_ldif(&format!(
            "dn: {medium}\nchangetype: modify\nreplace: qosloopBandAction\nqosloopBandAction: drop\n-\ndelete: qosloopRemarkDSCP\n-\ndelete: qosloopShapeRate\n"
        ))
        .unwrap();
    wait_for(&mut w, "medium band drops", |p| {
        p.classes[0].out_of_profile[1].action == qosloop_schema::OutOfProfileAction::Drop
    })
    .await;

    // A strict load names the DN and attribute of what is still wrong.
    let err = load_ldap(&source(&slapd)).await.unwrap_err();
    let RepoError::Policy(errs) = &err else {
        panic!("{err}")
    };
    assert!(
        errs.0.iter().any(|e| e.dn.starts_with("cn=service,cn=bulk")
            && e.attribute.as_deref() == Some("pcimActionDN")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slapd_stopped_and_restarted_last_good_policy_held_then_resynced() {
    need!(Slapd::available());
    let mut slapd = start_slapd();
    let mut w = watch_ldap(source(&slapd), PATIENCE).await.unwrap();
    let good = w.current();

    slapd.stop();
    // While slapd is down, the policy in force stays, and the source keeps
    // retrying (several backoff rounds pass in this time).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(*w.current(), *good);

    // A change made while the server was down (offline, slapmodify)...
    slapd
        .modify_offline(&format!(
            "dn: {GOLD}\nchangetype: modify\nreplace: qosloopProfileRate\nqosloopProfileRate: 3000\n"
        ))
        .unwrap();
    slapd.start_again().unwrap();
    // ...arrives with the refresh after reconnecting,
    wait_for(&mut w, "gold at 3000 kbit/s after resync", |p| {
        class_rate(p) == Some(Kbps(3000))
    })
    .await;
    wait_audit(&mut w, "modify found by the resync", |e| {
        e.change == AuditChange::Modify && e.dn == GOLD
    })
    .await;
    // and live changes flow again.
    slapd
        .modify_ldif(&format!(
            "dn: {GOLD}\nchangetype: modify\nreplace: qosloopProfileRate\nqosloopProfileRate: 1500\n"
        ))
        .unwrap();
    wait_for(&mut w, "gold at 1500 kbit/s", |p| {
        class_rate(p) == Some(Kbps(1500))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_external_over_ldapi_reads_the_policy() {
    need!(Slapd::available());
    let slapd = start_slapd();
    let mut s = LdapSource::new(slapd.ldapi_url(), BASE, LdapBind::SaslExternal);
    s.backoff_max = Duration::from_millis(500);
    let w = watch_ldap(s.clone(), PATIENCE).await.unwrap();
    assert_eq!(*w.current(), sample_policy());
    assert_eq!(load_ldap(&s).await.unwrap(), sample_policy());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_directory_is_a_clear_error() {
    let port = qosloop_testkit::harness::free_port().unwrap();
    let mut s = LdapSource::new(
        format!("ldap://127.0.0.1:{port}/"),
        BASE,
        LdapBind::Anonymous,
    );
    s.backoff_max = Duration::from_millis(200);
    let err = watch_ldap(s, Duration::from_secs(1)).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert!(text.contains("no complete policy"), "{text}");
}

/// The directory over TLS (rustls): `ldaps://` and StartTLS on `ldap://`,
/// trusting the directory's own CA, load the policy; without that CA (the
/// system's roots do not know it) the connection fails, naming the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_loads_over_ldaps_and_starttls_with_the_directorys_ca() {
    need!(Slapd::available());
    need!(qosloop_testkit::harness::require_binary(
        "openssl", "openssl"
    ));
    let slapd = Slapd::start_tls(BASE).unwrap();
    slapd.add_ldif(SAMPLE_POLICY_LDIF).unwrap();
    let ca = slapd.tls_dir().join("ca.pem");
    let ldaps_url = slapd.ldaps_url().unwrap();
    let mut ldaps = source(&slapd);
    ldaps.url = ldaps_url.clone();
    ldaps.tls_ca = Some(ca.clone());
    assert_eq!(load_ldap(&ldaps).await.unwrap(), sample_policy());
    let mut starttls = source(&slapd);
    starttls.starttls = true;
    starttls.tls_ca = Some(ca);
    assert_eq!(load_ldap(&starttls).await.unwrap(), sample_policy());
    let mut unknown_ca = source(&slapd);
    unknown_ca.url = ldaps_url.clone();
    let err = load_ldap(&unknown_ca).await.unwrap_err().to_string();
    assert!(err.contains(&ldaps_url), "{err}");
}

/// Issue 11 item 7, from LDAP: deleting the only rule (its entries, one by
/// one) would have left 0 rules and removed every decision. The version is
/// refused, the last good policy stays and the status says why; marked with
/// `pcimKeywords: qosloop-allow-drop` on the rules container, it applies.
/// Also: an attribute slapd accepts (via `extensibleObject`) that qosloop's
/// classes do not allow is rejected naming the DN and attribute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_every_rule_in_slapd_is_refused_unless_marked() {
    need!(Slapd::available());
    let slapd = start_slapd();
    let mut w = watch_ldap(source(&slapd), PATIENCE).await.unwrap();
    let good = w.current();
    assert_eq!(good.rules.len(), 1);

    // An attribute of another qosloop class on the band entry.
    let low = "cn=low,cn=gold,ou=classes,dc=qosloop,dc=example";
    slapd
        .modify_ldif(&format!(
            "dn: {low}\nchangetype: modify\nadd: objectClass\nobjectClass: extensibleObject\n-\nadd: qosloopLinkCapacity\nqosloopLinkCapacity: 5\n"
        ))
        .unwrap();
    let e = wait_audit(&mut w, "reject of the misplaced attribute", |e| {
        e.change == AuditChange::Reject && e.dn == low
    })
    .await;
    assert!(
        e.detail
            .as_deref()
            .unwrap_or("")
            .starts_with("qosloopLinkCapacity:"),
        "{e:?}"
    );
    assert_eq!(w.current().classes, good.classes);

    for dn in [
        "cn=service,cn=policed-flow,ou=rules,dc=qosloop,dc=example",
        "cn=five-tuple,cn=policed-flow,ou=rules,dc=qosloop,dc=example",
        "cn=policed-flow,ou=rules,dc=qosloop,dc=example",
    ] {
        slapd.delete(dn).unwrap();
    }
    let e = wait_audit(&mut w, "refusal of the emptied policy", |e| {
        e.change == AuditChange::Reject
            && e.detail
                .as_deref()
                .unwrap_or("")
                .contains("leave 0 of the 1 rules")
    })
    .await;
    assert_eq!(e.dn, slapd.url());
    assert_eq!(w.current().rules, good.rules, "the last good rules stay");
    assert!(w.status.borrow().refused.is_some());

    slapd
        .modify_ldif(
            "dn: ou=rules,dc=qosloop,dc=example\nchangetype: modify\nadd: objectClass\nobjectClass: pcimGroupAuxClass\n-\nadd: pcimKeywords\npcimKeywords: qosloop-allow-drop\n",
        )
        .unwrap();
    wait_for(&mut w, "no rules, as marked", |p| p.rules.is_empty()).await;
    assert!(w.status.borrow().refused.is_none());
}
