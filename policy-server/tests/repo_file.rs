//! The LDIF file source: strict loading with errors that name the line,
//! DN and attribute; watching a file that changes, including into
//! something invalid (the last good policy stays); the sample policy as
//! docs/policy.md shows it.
// Test helpers may unwrap: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use qosloop_policy_server::repo::{
    describe, load_ldif_file, parse_policy_ldif, watch_ldif_file, AuditChange, AuditEvent,
    PolicyWatch, RepoError,
};
use qosloop_schema::{Kbps, PolicySet, SAMPLE_POLICY_LDIF};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const PATIENCE: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(20);

fn write(path: &Path, text: &str) {
    // Write then rename, as editors and deployment tools do.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

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
        None => panic!("the policy never reached: {what}"),
    }
}

async fn next_reject(w: &mut PolicyWatch) -> AuditEvent {
    let found = tokio::time::timeout(PATIENCE, async {
        while let Some(e) = w.audit.recv().await {
            if e.change == AuditChange::Reject {
                return Some(e);
            }
        }
        None
    })
    .await;
    found.ok().flatten().unwrap()
}

#[test]
fn load_errors_name_line_dn_and_attribute() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.ldif");
    std::fs::write(
        &path,
        SAMPLE_POLICY_LDIF.replace("qosloopShapeRate: 875", "qosloopShapeRate 875"),
    )
    .unwrap();
    let err = load_ldif_file(&path).unwrap_err();
    let RepoError::Ldif { source, .. } = &err else {
        panic!("{err}")
    };
    let line = SAMPLE_POLICY_LDIF
        .lines()
        .position(|l| l == "qosloopShapeRate: 875")
        .unwrap()
        + 1;
    assert_eq!(source.line, line);
    assert_eq!(
        source.dn.as_deref(),
        Some("cn=low,cn=gold,ou=classes,dc=qosloop,dc=example")
    );
    assert!(err.to_string().contains(&format!("line {line}")), "{err}");

    std::fs::write(
        &path,
        SAMPLE_POLICY_LDIF.replace("qosloopDirection: egress", "qosloopDirection: sideways"),
    )
    .unwrap();
    let err = load_ldif_file(&path).unwrap_err().to_string();
    assert!(
        err.contains("cn=edge,ou=devices,dc=qosloop,dc=example: qosloopDirection:"),
        "{err}"
    );

    let err = load_ldif_file(dir.path().join("missing.ldif")).unwrap_err();
    assert!(matches!(err, RepoError::Io { .. }), "{err}");
}

#[tokio::test]
async fn a_watched_file_applies_changes_and_keeps_the_last_good_policy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.ldif");
    write(&path, SAMPLE_POLICY_LDIF);
    let mut w = watch_ldif_file(&path, POLL).unwrap();
    let good = w.current();
    assert_eq!(*good, parse_policy_ldif(SAMPLE_POLICY_LDIF).unwrap());

    // A change applies.
    let faster = SAMPLE_POLICY_LDIF.replace("qosloopProfileRate: 1000", "qosloopProfileRate: 1200");
    write(&path, &faster);
    let p = wait_for(&mut w, "profile 1200", |p| {
        p.classes[0].profile.rate == Kbps(1200)
    })
    .await;
    assert_eq!(p.rules, good.rules);

    // A file that does not parse is rejected whole.
    write(&path, &faster.replace("dn: cn=high", "cn=high"));
    let e = next_reject(&mut w).await;
    assert!(e.detail.unwrap().contains("keeping the last good policy"));
    assert_eq!(w.current().classes[0].profile.rate, Kbps(1200));

    // An invalid entry is rejected; the rest of the file applies.
    let bad_band = faster
        .replace("qosloopBandFrom: 6000", "qosloopBandFrom: 6500")
        .replace("qosloopLinkCapacity: 10000", "qosloopLinkCapacity: 12000");
    write(&path, &bad_band);
    let p = wait_for(&mut w, "link at 12000", |p| {
        p.links[0].capacity == Kbps(12_000)
    })
    .await;
    assert_eq!(p.classes[0].out_of_profile[2].from, Kbps(6000));
    let e = next_reject(&mut w).await;
    assert_eq!(e.dn, "cn=high,cn=gold,ou=classes,dc=qosloop,dc=example");
    assert!(e.detail.unwrap().starts_with("qosloopBandFrom:"));

    // Back to valid.
    write(&path, SAMPLE_POLICY_LDIF);
    wait_for(&mut w, "the sample again", |p| *p == *good).await;
}

#[test]
fn an_invalid_file_does_not_start_a_watch() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.ldif");
    write(
        &path,
        &SAMPLE_POLICY_LDIF.replace("qosloopBandAction: drop", "qosloopBandAction: police"),
    );
    let err = watch_ldif_file(&path, POLL).unwrap_err().to_string();
    assert!(
        err.contains("cn=high,cn=gold,ou=classes,dc=qosloop,dc=example: qosloopBandAction: "),
        "{err}"
    );
}

/// docs/policy.md shows what `--check` prints for the sample: keep it true.
#[test]
fn docs_show_the_sample_as_described() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/policy.md"))
            .unwrap();
    let after = doc.split("prints what it understood:").nth(1).unwrap();
    let block = after.split("```").nth(1).unwrap().trim();
    let printed = describe(&parse_policy_ldif(SAMPLE_POLICY_LDIF).unwrap());
    assert_eq!(block, printed.trim());
}
