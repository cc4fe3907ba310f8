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

/// Collects audit events until `until` holds for one (or PATIENCE ends).
async fn events_until(w: &mut PolicyWatch, until: impl Fn(&AuditEvent) -> bool) -> Vec<AuditEvent> {
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, async {
        while let Some(e) = w.audit.recv().await {
            let done = until(&e);
            seen.push(e);
            if done {
                return;
            }
        }
    })
    .await;
    seen
}

/// The sample without its rule entries, the rules container marked as
/// allowing a wholesale drop.
fn sample_without_rules(marked: bool) -> String {
    let mut out = String::new();
    for block in SAMPLE_POLICY_LDIF.split("\n\n") {
        if block.contains("dn: cn=") && block.contains(",ou=rules,") {
            continue;
        }
        if marked && block.contains("dn: ou=rules,") {
            out.push_str(&block.replace(
                "ou: rules",
                "objectClass: pcimGroupAuxClass\nou: rules\npcimKeywords: qosloop-allow-drop",
            ));
        } else {
            out.push_str(block);
        }
        out.push_str("\n\n");
    }
    out
}

/// Issue 11 item 7: a policy file truncated to 0 bytes was put in force
/// with 0 rules (every decision removed), logged at INFO.
#[tokio::test]
async fn an_emptied_policy_file_is_refused_and_the_last_good_policy_stays() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.ldif");
    write(&path, SAMPLE_POLICY_LDIF);
    let mut w = watch_ldif_file(&path, POLL).unwrap();
    let good = w.current();
    assert_eq!(good.rules.len(), 1);
    assert!(w.status.borrow().refused.is_none());

    std::fs::write(&path, "").unwrap();
    let e = next_reject(&mut w).await;
    let detail = e.detail.unwrap();
    assert!(detail.contains("leave 0 of the 1 rules"), "{detail}");
    assert!(detail.contains("qosloop-allow-drop"), "{detail}");
    assert_eq!(w.current(), good, "the last good policy stays");
    let status = w.status.borrow().clone();
    let refused = status.refused.expect("the status shows the refusal");
    assert_eq!(refused.rules_offered, 0);
    assert_eq!(status.rules_in_force, 1);

    // The same without the rule entries: also refused.
    write(&path, &sample_without_rules(false));
    let e = next_reject(&mut w).await;
    assert!(e.detail.unwrap().contains("leave 0 of the 1 rules"));
    assert_eq!(w.current(), good);

    // Marked as deliberate: applied, the refusal cleared.
    write(&path, &sample_without_rules(true));
    wait_for(&mut w, "no rules", |p| p.rules.is_empty()).await;
    let status = w.status.borrow().clone();
    assert!(status.refused.is_none(), "{status:?}");
    assert_eq!(status.rules_in_force, 0);
}

/// Issue 11 item 7: a file caught while being written (75% of it) was
/// read and put in force. Written in 12 chunks 25 ms apart, it changes at
/// every look (300 ms apart), so only the complete file may be read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_being_written_is_read_only_once_complete() {
    let slow_poll = Duration::from_millis(300);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.ldif");
    write(&path, SAMPLE_POLICY_LDIF);
    let mut w = watch_ldif_file(&path, slow_poll).unwrap();
    let mut policy = w.policy.clone();
    let target =
        SAMPLE_POLICY_LDIF.replace("qosloopLinkCapacity: 10000", "qosloopLinkCapacity: 20000");
    let expected = parse_policy_ldif(&target).unwrap();
    let bytes = target.as_bytes().to_vec();
    let writer = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut f = std::fs::File::create(&path).unwrap();
        for chunk in bytes.chunks(bytes.len().div_ceil(12)) {
            f.write_all(chunk).unwrap();
            f.flush().unwrap();
            std::thread::sleep(Duration::from_millis(25));
        }
    });
    // Every version published until the final one must be the final one.
    let published = tokio::time::timeout(PATIENCE, async {
        let mut versions = Vec::new();
        while policy.changed().await.is_ok() {
            let p = policy.borrow_and_update().clone();
            let done = *p == expected;
            versions.push(p);
            if done {
                break;
            }
        }
        versions
    })
    .await
    .unwrap();
    writer.await.unwrap();
    assert_eq!(published.len(), 1, "partial versions were published");
    // Nothing was rejected on the way (a partial read would be).
    while let Ok(e) = w.audit.try_recv() {
        assert_ne!(e.change, AuditChange::Reject, "{e:?}");
    }
}

/// Issue 11 item 7: on reload, a misspelled attribute (`qosloopShapRate`)
/// silently made a shaped band unshaped; a duplicate DN was accepted.
/// Both are rejected naming the DN (and the attribute); the objects keep
/// their last good version.
#[tokio::test]
async fn a_reload_with_a_misspelled_attribute_or_a_duplicate_dn_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.ldif");
    write(&path, SAMPLE_POLICY_LDIF);
    let mut w = watch_ldif_file(&path, POLL).unwrap();
    let good = w.current();

    write(
        &path,
        &SAMPLE_POLICY_LDIF.replace("qosloopShapeRate: 875", "qosloopShapRate: 875"),
    );
    let e = next_reject(&mut w).await;
    assert_eq!(e.dn, "cn=low,cn=gold,ou=classes,dc=qosloop,dc=example");
    assert!(
        e.detail.as_deref().unwrap().starts_with("qosloopShapRate:"),
        "{e:?}"
    );
    assert_eq!(w.current().classes, good.classes, "the band stays shaped");

    write(&path, SAMPLE_POLICY_LDIF);
    // The class comes back unchanged; give the watcher the valid file first.
    let _ = events_until(&mut w, |_| true).await;
    let duplicate = format!(
        "{SAMPLE_POLICY_LDIF}\ndn: cn=edge-ingress,ou=links,dc=qosloop,dc=example\n\
         objectClass: pcimPolicyInstance\nobjectClass: qosloopLink\ncn: edge-ingress\n\
         qosloopLinkName: edge-ingress\nqosloopLinkCapacity: 99\n"
    );
    write(&path, &duplicate);
    let events = events_until(&mut w, |e| {
        e.change == AuditChange::Reject
            && e.detail.as_deref().unwrap_or("").contains("duplicate DN")
    })
    .await;
    let e = events.last().unwrap();
    assert_eq!(
        e.dn, "cn=edge-ingress,ou=links,dc=qosloop,dc=example",
        "{events:?}"
    );
    assert_eq!(w.current().links, good.links);
}
