//! The deployment files of `qosloop-enforcer` (deploy/): the example configuration
//! parses and validates with the daemon's own loader, and the systemd unit
//! keeps the capabilities it needs and no more, and passes
//! `systemd-analyze verify`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

const BIN: &str = env!("CARGO_BIN_EXE_qosloop-enforcer");
const BIN_NAME: &str = "qosloop-enforcer";

/// `systemd-analyze verify` on `unit` (from deploy/systemd/) with its
/// ExecStart binary replaced by the one cargo built; skipped with the
/// reason when systemd-analyze is absent (not required under CI).
fn verify_unit(unit: &str, instance: Option<&str>) {
    let Some(analyze) = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .iter()
        .map(std::path::Path::new)
        .find(|p| p.is_file())
    else {
        eprintln!("skipped: systemd-analyze not installed (Debian package systemd); the unit is not verified");
        return;
    };
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(repo.join("deploy/systemd").join(unit)).unwrap();
    let installed = format!("/usr/local/bin/{}", BIN_NAME);
    assert!(text.contains(&installed), "{unit} does not run {installed}");
    let dir = tempfile::tempdir().unwrap();
    let name = match instance {
        Some(i) => unit.replace("@.", &format!("@{i}.")),
        None => unit.to_owned(),
    };
    let path = dir.path().join(name);
    std::fs::write(&path, text.replace(&installed, BIN)).unwrap();
    let out = std::process::Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "{unit}: {stderr}"
    );
}

/// The capabilities `unit` keeps: bounding set and ambient set agree.
fn capabilities(unit: &str) -> Vec<String> {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(repo.join("deploy/systemd").join(unit)).unwrap();
    let set = |key: &str| -> Vec<String> {
        let line = text
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("{unit}: no {key}"));
        line[key.len()..]
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let bounding = set("CapabilityBoundingSet=");
    assert_eq!(bounding, set("AmbientCapabilities="), "{unit}");
    for hardening in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "User=qosloop",
    ] {
        assert!(
            text.lines().any(|l| l == hardening),
            "{unit}: no {hardening}"
        );
    }
    bounding
}

fn example(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(name)
}

#[test]
fn the_deployment_example_loads_and_the_unit_keeps_only_cap_net_admin() {
    let mut c = qosloop_enforcer::Config::load(&example("enforcer.toml")).unwrap();
    // The unit gives the interface on the command line.
    c.interface = Some("eth1".into());
    let e = c.enforcer().unwrap();
    assert_eq!(e.capacity, qosloop_schema::Kbps(100_000));
    assert_eq!(c.pdps().unwrap(), ["127.0.0.1:3288"]);
    c.check_pdp_tls().unwrap();
    assert_eq!(c.metrics_addr().unwrap().unwrap().port(), 9744);
    assert_eq!(capabilities("qosloop-enforcer@.service"), ["CAP_NET_ADMIN"]);
    verify_unit("qosloop-enforcer@.service", Some("eth1"));
}
