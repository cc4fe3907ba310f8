//! The command line's exits, without root: configuration is validated
//! before any kernel object changes (issue 11 item 10). `--dry-run` prints
//! every operation the enforcer would make on standard output and logs
//! "reconciled kernel state at start" once it has read (and, for real,
//! cleaned) the kernel's state: neither may appear before a configuration
//! error.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

fn enforcer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qosloop-enforcer"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

#[test]
fn a_missing_pdp_tls_ca_exits_64_before_the_kernel_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-ca.pem");
    let out = enforcer(&[
        "--dry-run",
        "--interface",
        "qosloop-nosuch0",
        "--roles",
        "edge",
        "--pdp",
        "127.0.0.1:9",
        "--pdp-tls-ca",
        missing.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("pdp_tls_ca"), "{stderr}");
    assert!(stderr.contains("no-such-ca.pem"), "{stderr}");
    assert!(
        stdout.trim().is_empty(),
        "operations were made before the TLS files were checked:\n{stdout}"
    );
    assert!(
        !stderr.contains("reconciled kernel state"),
        "the kernel was reconciled before the TLS files were checked:\n{stderr}"
    );
}

#[test]
fn a_certificate_without_its_key_exits_64_before_the_kernel_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    std::fs::write(&cert, "not a certificate").unwrap();
    let out = enforcer(&[
        "--dry-run",
        "--interface",
        "qosloop-nosuch0",
        "--pdp",
        "127.0.0.1:9",
        "--pdp-tls-cert",
        cert.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty());
    assert!(!stderr.contains("reconciled kernel state"), "{stderr}");
}

#[test]
fn a_dry_run_with_valid_configuration_reaches_the_kernel_step() {
    // The contrast: the same command without the TLS mistake does reach
    // the kernel step (and logs it), so the tests above prove the order.
    let dir = tempfile::tempdir().unwrap();
    let decisions = dir.path().join("d.json");
    std::fs::write(&decisions, "[]").unwrap();
    let out = enforcer(&[
        "--dry-run",
        "--interface",
        "qosloop-nosuch0",
        "--decisions",
        decisions.to_str().unwrap(),
        "apply",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("reconciled kernel state"), "{stderr}");
}
