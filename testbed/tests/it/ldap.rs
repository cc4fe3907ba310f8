//! The policy repository's schema against a real slapd: qosloop's LDAP
//! schema loads into cn=config, the sample policy loads and reads back as
//! written, the schema's types are enforced, syncprov answers a
//! refreshAndPersist search, and data survives a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_schema::{LDAP_SCHEMA_LDIF, SAMPLE_POLICY_LDIF};
use qosloop_testbed::harness::{require_binary, Slapd};
use qosloop_testbed::need;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BASE: &str = "dc=qosloop,dc=example";

/// Entries of a simple LDIF (no continuation lines, no base64): DN (lower
/// case) → set of (attribute in lower case, value).
fn entries(ldif: &str) -> BTreeMap<String, BTreeSet<(String, String)>> {
    let mut out = BTreeMap::new();
    for block in ldif.split("\n\n") {
        let mut dn = None;
        let mut attrs = BTreeSet::new();
        for line in block
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let Some((k, v)) = line.split_once(':') else {
                panic!("not an attribute line: {line:?}")
            };
            assert!(!v.starts_with(':'), "base64 value in {line:?}");
            let v = v.trim().to_owned();
            if k.eq_ignore_ascii_case("dn") {
                dn = Some(v.to_ascii_lowercase());
            } else {
                attrs.insert((k.to_ascii_lowercase(), v));
            }
        }
        if let Some(dn) = dn {
            out.insert(dn, attrs);
        }
    }
    out
}

fn start() -> Slapd {
    match Slapd::start(BASE) {
        Ok(slapd) => slapd,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn schema_and_sample_policy_load_and_read_back() {
    need!(Slapd::available());
    let slapd = start();
    slapd.add_ldif(SAMPLE_POLICY_LDIF).unwrap();

    let written = entries(SAMPLE_POLICY_LDIF);
    let read = entries(&slapd.search(BASE, "(objectClass=*)", &[]).unwrap());
    assert_eq!(written.len(), 15, "sample policy entries");
    assert_eq!(read, written);

    // The schema as slapd publishes it names every class of the LDIF.
    let subschema = slapd
        .search_scope(
            "cn=Subschema",
            "base",
            "(objectClass=subschema)",
            &["objectClasses", "attributeTypes"],
        )
        .unwrap();
    for line in LDAP_SCHEMA_LDIF.lines() {
        for key in ["olcObjectClasses: ( ", "olcAttributeTypes: ( "] {
            if let Some(rest) = line.strip_prefix(key) {
                let oid = rest.split_whitespace().next().unwrap();
                let name = rest.split('\'').nth(1).unwrap();
                assert!(
                    subschema.contains(&format!("( {oid} NAME '{name}'")),
                    "slapd does not publish {oid} {name}"
                );
            }
        }
    }
}

#[test]
fn schema_types_are_enforced() {
    need!(Slapd::available());
    let slapd = start();
    slapd.add_ldif(SAMPLE_POLICY_LDIF).unwrap();
    let bad_integer = "dn: cn=bad,cn=gold,ou=classes,dc=qosloop,dc=example\n\
        objectClass: pcimPolicyInstance\n\
        objectClass: qosloopLoadBand\n\
        cn: bad\n\
        qosloopBandName: bad\n\
        qosloopBandFrom: three thousand\n\
        qosloopBandAction: drop\n";
    let err = slapd.add_ldif(bad_integer).unwrap_err().to_string();
    assert!(err.contains("qosloopBandFrom"), "{err}");
    let missing_must = "dn: cn=nameless,ou=links,dc=qosloop,dc=example\n\
        objectClass: pcimPolicyInstance\n\
        objectClass: qosloopLink\n\
        cn: nameless\n\
        qosloopLinkCapacity: 1000\n";
    let err = slapd.add_ldif(missing_must).unwrap_err().to_string();
    assert!(err.contains("qosloopLinkName"), "{err}");
}

#[test]
fn sasl_external_over_ldapi_binds_as_the_root_dn() {
    need!(Slapd::available());
    let whoami = need!(require_binary("ldapwhoami", "ldap-utils"));
    let slapd = start();
    let out = Command::new(whoami)
        .args(["-Q", "-Y", "EXTERNAL", "-H", &slapd.ldapi_url()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("dn:{}", slapd.bind_dn())
    );
}

/// A refreshAndPersist search (RFC 4533, `ldapsearch -E sync=rp`) sees an
/// entry added after the refresh: syncprov is on.
#[test]
fn syncprov_delivers_changes_to_a_persistent_sync_search() {
    need!(Slapd::available());
    let ldapsearch = need!(require_binary("ldapsearch", "ldap-utils"));
    let slapd = start();
    slapd.add_ldif(SAMPLE_POLICY_LDIF).unwrap();
    let mut child = Command::new(ldapsearch)
        .args([
            "-x",
            "-LLL",
            "-o",
            "ldif-wrap=no",
            "-H",
            &slapd.url(),
            "-b",
            BASE,
            "-E",
            "!sync=rp",
            "(objectClass=qosloopLink)",
            "qosloopLinkName",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait_for = |wanted: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(line) if line == wanted => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        false
    };
    // The refresh phase returns the existing link...
    assert!(wait_for("qosloopLinkName: edge-ingress"));
    // ...and the persist phase an added one.
    slapd
        .add_ldif(
            "dn: cn=core,ou=links,dc=qosloop,dc=example\n\
             objectClass: pcimPolicyInstance\n\
             objectClass: qosloopLink\n\
             cn: core\n\
             qosloopLinkName: core\n\
             qosloopLinkCapacity: 100000\n",
        )
        .unwrap();
    let seen = wait_for("qosloopLinkName: core");
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen,
        "the persistent sync search did not see the added entry"
    );
}

#[test]
fn data_survives_a_restart_on_the_same_url() {
    need!(Slapd::available());
    let mut slapd = start();
    slapd.add_ldif(SAMPLE_POLICY_LDIF).unwrap();
    let url = slapd.url();
    slapd.stop();
    assert!(!slapd.is_running());
    assert!(slapd.search(BASE, "(cn=gold)", &["dn"]).is_err());
    slapd.start_again().unwrap();
    assert_eq!(slapd.url(), url);
    let out = slapd
        .search(BASE, "(cn=gold)", &["qosloopProfileRate"])
        .unwrap();
    assert!(out.contains("qosloopProfileRate: 1000"), "{out}");
}
