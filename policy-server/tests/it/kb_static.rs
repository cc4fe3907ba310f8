//! Static user ↔ address mappings from the LDAP repository into the
//! knowledge base, against a real slapd and a real PostgreSQL (the test
//! kit's harness): the per-user sample's `qosloopUserMapping` entries are in
//! `kb_mappings` (source `ldap`, persistent) after the load; an address
//! added in slapd is bound, a deleted entry unbinds its addresses, an
//! invalid entry binds nothing and is audited with its DN and attribute.
//!
//! Waits are bounded only so that a broken build fails instead of hanging;
//! the assertions are about the mappings' content.
#![allow(clippy::unwrap_used)]

use qosloop_policy_server::kb_static;
use qosloop_policy_server::repo::{watch_ldap, AuditChange, LdapBind, LdapSource, PolicyWatch};
use qosloop_schema::SAMPLE_PER_USER_LDIF;
use qosloop_store::Db;
use qosloop_testkit::harness::{Postgres, Slapd};
use qosloop_testkit::need;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const BASE: &str = "dc=qosloop,dc=example";
const PATIENCE: Duration = Duration::from_secs(20);

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

type Bound = BTreeSet<(String, String, String, bool)>;

async fn bound(db: &Db) -> Bound {
    db.kb_mappings(i64::MAX / 2, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.addr, m.user, m.source, m.persistent))
        .collect()
}

fn ldap(pairs: &[(&str, &str)]) -> Bound {
    pairs
        .iter()
        .map(|(a, u)| (a.to_string(), u.to_string(), "ldap".to_string(), true))
        .collect()
}

async fn wait_bound(db: &Db, what: &str, want: &Bound) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let got = bound(db).await;
        if &got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: kb_mappings never became {want:?}; it is {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_reject(w: &mut PolicyWatch, dn: &str) -> String {
    let found = tokio::time::timeout(PATIENCE, async {
        while let Some(e) = w.audit.recv().await {
            if e.change == AuditChange::Reject && e.dn == dn {
                return e.detail;
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(d)) => d,
        _ => panic!("no reject audit event for {dn}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ldap_mapping_entries_follow_into_the_knowledge_base() {
    need!(Slapd::available());
    need!(Postgres::available());
    let pg = tokio::task::spawn_blocking(Postgres::start)
        .await
        .unwrap()
        .unwrap();
    let db = Db::connect(&pg.url()).await.unwrap();
    db.migrate().await.unwrap();
    // A mapping of the same source left from an earlier run of the server
    // whose entry is gone by now: the first sync removes it.
    db.kb_sync_static("ldap", &[("198.51.100.1".into(), "mallory".into())], 1)
        .await
        .unwrap();

    let slapd = Slapd::start(BASE).unwrap();
    slapd.add_ldif(SAMPLE_PER_USER_LDIF).unwrap();
    let mut w = watch_ldap(source(&slapd), PATIENCE).await.unwrap();
    let follower = tokio::spawn(kb_static::follow(db.clone(), w.mappings.clone()));

    let sample = [
        ("192.0.2.10", "alice"),
        ("2001:db8::10", "alice"),
        ("192.0.2.11", "bob"),
    ];
    wait_bound(&db, "after the load", &ldap(&sample)).await;

    // A second address for alice, added in slapd.
    slapd
        .modify_ldif(
            "dn: cn=alice-desk,ou=mappings,dc=qosloop,dc=example\nchangetype: modify\n\
             add: qosloopUserAddress\nqosloopUserAddress: 192.0.2.20\n",
        )
        .unwrap();
    let mut more = sample.to_vec();
    more.push(("192.0.2.20", "alice"));
    wait_bound(&db, "after adding an address", &ldap(&more)).await;

    // Bob's entry deleted: his address is unbound, alice's stay.
    slapd
        .delete("cn=bob-laptop,ou=mappings,dc=qosloop,dc=example")
        .unwrap();
    let without_bob = [
        ("192.0.2.10", "alice"),
        ("192.0.2.20", "alice"),
        ("2001:db8::10", "alice"),
    ];
    wait_bound(&db, "after deleting bob's entry", &ldap(&without_bob)).await;

    // An invalid entry (a prefix, not an address) binds nothing and is
    // rejected naming its DN and the attribute; a valid one added after it
    // still binds.
    let bad = "cn=carol-net,ou=mappings,dc=qosloop,dc=example";
    slapd
        .add_ldif(&format!(
            "dn: {bad}\nobjectClass: qosloopUserMapping\ncn: carol-net\n\
             qosloopMappedUser: carol\nqosloopUserAddress: 192.0.2.0/24\n"
        ))
        .unwrap();
    let detail = wait_reject(&mut w, bad).await;
    assert!(
        detail.starts_with("qosloopUserAddress:") && detail.contains("192.0.2.0/24"),
        "{detail}"
    );
    slapd
        .add_ldif(
            "dn: cn=dave,ou=mappings,dc=qosloop,dc=example\nobjectClass: qosloopUserMapping\n\
             cn: dave\nqosloopMappedUser: dave\nqosloopUserAddress: 192.0.2.30\n",
        )
        .unwrap();
    let mut with_dave = without_bob.to_vec();
    with_dave.push(("192.0.2.30", "dave"));
    wait_bound(&db, "after an invalid and a valid entry", &ldap(&with_dave)).await;

    // Agent-learned mappings are not the policy server's to remove: the
    // sync touches source `ldap` only.
    assert!(bound(&db).await.iter().all(|m| m.2 == "ldap"));
    follower.abort();
    drop(w);
}
