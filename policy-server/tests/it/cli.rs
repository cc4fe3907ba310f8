//! The binary's contract: --check, exit 64 on bad configuration, --help.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qosloop-policy-server"))
}

fn sample() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../schema/ldap/sample-policy.ldif")
}

#[test]
fn check_prints_the_sample_policy_and_exits_0() {
    let out = bin()
        .arg("--policies")
        .arg(sample())
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("policed-flow"), "{text}");
}

#[test]
fn check_names_the_dn_and_attribute_of_an_invalid_entry() {
    let dir = tempfile::tempdir().unwrap();
    let bad = std::fs::read_to_string(sample())
        .unwrap()
        .replace("qosloopProfileRate: 1000", "qosloopProfileRate: fast");
    let path = dir.path().join("bad.ldif");
    std::fs::write(&path, bad).unwrap();
    let out = bin()
        .arg("--policies")
        .arg(&path)
        .arg("--check")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cn=gold,ou=classes,dc=qosloop,dc=example"),
        "{err}"
    );
    assert!(err.contains("qosloopProfileRate"), "{err}");
}

#[test]
fn bad_configuration_exits_64_naming_the_key() {
    let out = bin()
        .args(["--db", "sqlite://x.db", "--interval-ms", "5"])
        .arg("--policies")
        .arg(sample())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("interval_ms"));

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "pdp_lisen = \"x\"\n").unwrap();
    let out = bin().arg("--config").arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pdp_lisen"));

    let out = bin().arg("--no-such-flag").output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(bin().arg("--help").output().unwrap().status.success());
}

#[test]
fn the_example_config_runs_check() {
    // example.toml names the sample policy relative to the repository root.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = bin()
        .current_dir(&root)
        .args(["--config", "policy-server/example.toml", "--check"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--ldap-bind-dn` without a password used to bind with an empty password
/// (an unauthenticated bind that slapd accepts as anonymous): issue 11
/// item 10. Each case exits 64 naming the key, before any connection (the
/// URL points at a port where nothing listens).
#[test]
fn ldap_bind_dn_without_a_password_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let ldap = [
        "--ldap",
        "ldap://127.0.0.1:9",
        "--ldap-base",
        "dc=qosloop,dc=example",
    ];
    let run = |extra: &[&str]| {
        let out = bin()
            .args(ldap)
            .args(extra)
            .arg("--check")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--ldap-bind-dn", "cn=admin,dc=qosloop,dc=example"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("ldap_password_file"), "{err}");
    assert!(
        !err.contains("127.0.0.1:9"),
        "no connection was tried: {err}"
    );

    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let (code, err) = run(&[
        "--ldap-bind-dn",
        "cn=admin,dc=qosloop,dc=example",
        "--ldap-password-file",
        empty.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("is empty"), "{err}");

    let missing = dir.path().join("missing");
    let (code, err) = run(&[
        "--ldap-bind-dn",
        "cn=admin,dc=qosloop,dc=example",
        "--ldap-password-file",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("missing"), "{err}");

    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let (code, err) = run(&["--ldap-password-file", secret.to_str().unwrap()]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("ldap_bind_dn"), "{err}");
}

/// An unreadable `--ldap-tls-ca` used to fail only when the LDAP connection
/// was made (after the initial wait, exit 1): issue 11 item 10. It is a
/// configuration error (exit 64) naming the key, before any connection.
#[test]
fn an_unreadable_ldap_tls_ca_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-ca.pem");
    let out = bin()
        .args([
            "--ldap",
            "ldaps://127.0.0.1:9",
            "--ldap-base",
            "dc=qosloop,dc=example",
            "--ldap-tls-ca",
        ])
        .arg(&missing)
        .arg("--check")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("ldap_tls_ca"), "{err}");
    assert!(
        !err.contains("127.0.0.1:9"),
        "no connection was tried: {err}"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on 127.0.0.1; the body, or `None` (bounded: 5 s).
fn http_get(port: u16, path: &str) -> Option<String> {
    let answer = qosloop_testkit::http::Request::get(path)
        .timeout(std::time::Duration::from_secs(5))
        .send(([127, 0, 0, 1], port).into())
        .ok()?;
    Some(answer.text().into_owned())
}

/// Issue 11 item 7: a policy file emptied under a running server was put
/// in force (0 rules, every decision removed). The server keeps the last
/// good policy and `GET /api/status` shows the refusal.
#[test]
fn an_emptied_policy_file_is_refused_and_the_api_says_so() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.ldif");
    std::fs::copy(sample(), &policy).unwrap();
    let (pdp, http) = (free_port(), free_port());
    let log = dir.path().join("log");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Kill(
        bin()
            .arg("--db")
            .arg(format!("sqlite://{}", dir.path().join("q.db").display()))
            .arg("--policies")
            .arg(&policy)
            .args(["--pdp-listen", &format!("127.0.0.1:{pdp}")])
            .args(["--http", &format!("127.0.0.1:{http}")])
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path().join("err")).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut status = |until: &dyn Fn(&serde_json::Value) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(exit)) = child.0.try_wait() {
                panic!(
                    "the server exited ({exit}): {}",
                    std::fs::read_to_string(dir.path().join("err")).unwrap_or_default()
                );
            }
            let got = http_get(http, "/api/status")
                .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok());
            if let Some(v) = got.filter(|v| until(v)) {
                return v;
            }
            assert!(Instant::now() < deadline, "the status never showed it");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let v = status(&|v| v["policy"]["rules_in_force"] == 1);
    assert!(v["policy"]["refused"].is_null(), "{v}");

    std::fs::write(&policy, "").unwrap();
    let v = status(&|v| !v["policy"]["refused"].is_null());
    let reason = v["policy"]["refused"]["reason"].as_str().unwrap();
    assert!(reason.contains("leave 0 of the 1 rules"), "{reason}");
    assert_eq!(v["policy"]["rules_in_force"], 1);
    let policies = http_get(http, "/api/policies").unwrap();
    assert!(policies.contains("policed-flow"), "{policies}");
    let err = std::fs::read_to_string(dir.path().join("err")).unwrap();
    assert!(
        err.lines()
            .any(|l| l.contains("WARN") && l.contains("leave 0 of the 1 rules")),
        "{err}"
    );
}

/// Issue 11 item 7: `--check` accepted a misspelled optional attribute
/// (the band became unshaped) and a DN given twice.
#[test]
fn check_refuses_a_misspelled_attribute_and_a_duplicate_dn() {
    let dir = tempfile::tempdir().unwrap();
    let sample = std::fs::read_to_string(sample()).unwrap();
    let check = |text: &str| {
        let path = dir.path().join("p.ldif");
        std::fs::write(&path, text).unwrap();
        let out = bin()
            .arg("--policies")
            .arg(&path)
            .arg("--check")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = check(&sample.replace("qosloopShapeRate: 875", "qosloopShapRate: 875"));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(
            "cn=low,cn=gold,ou=classes,dc=qosloop,dc=example: qosloopShapRate: unknown attribute"
        ),
        "{err}"
    );
    let duplicate = format!(
        "{sample}\ndn: cn=edge-ingress,ou=links,dc=qosloop,dc=example\nobjectClass: pcimPolicyInstance\n\
         objectClass: qosloopLink\ncn: edge-ingress\nqosloopLinkName: edge-ingress\nqosloopLinkCapacity: 99\n"
    );
    let (code, err) = check(&duplicate);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cn=edge-ingress,ou=links,dc=qosloop,dc=example: duplicate DN"),
        "{err}"
    );
}
