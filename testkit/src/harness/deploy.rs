//! Checks of the deployment files in deploy/ shared by every daemon's
//! `tests/deploy.rs`: where the examples are, which capabilities a systemd
//! unit keeps (and that it keeps its hardening), and `systemd-analyze verify`
//! on a unit with its ExecStart pointed at the binary cargo built.
//!
//! These are assertion helpers: they panic with the unit's name on failure.

use std::path::{Path, PathBuf};

/// The repository root (this crate sits one level below it, as every
/// daemon crate does).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `deploy/examples/<name>`.
pub fn example(name: &str) -> PathBuf {
    repo().join("deploy/examples").join(name)
}

fn unit_text(unit: &str) -> String {
    let path = repo().join("deploy/systemd").join(unit);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The capabilities `unit` (from deploy/systemd/) keeps, after asserting that
/// its bounding and ambient sets agree and that it has its hardening lines.
pub fn capabilities(unit: &str) -> Vec<String> {
    let text = unit_text(unit);
    let set = |key: &str| -> Vec<String> {
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("{unit}: no {key}"));
        line.split_whitespace().map(str::to_owned).collect()
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

/// `systemd-analyze verify` on `unit` (from deploy/systemd/), instantiated as
/// `instance` when given, after asserting that it runs
/// `/usr/local/bin/<bin_name>` and replacing that with `bin` (the path cargo
/// built, `env!("CARGO_BIN_EXE_<bin_name>")`). Skipped with the reason when
/// systemd-analyze is absent (not required under CI).
pub fn verify_unit(unit: &str, instance: Option<&str>, bin_name: &str, bin: &str) {
    let Some(analyze) = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
    else {
        eprintln!("skipped: systemd-analyze not installed (Debian package systemd); the unit is not verified");
        return;
    };
    let text = unit_text(unit);
    let installed = format!("/usr/local/bin/{bin_name}");
    assert!(text.contains(&installed), "{unit} does not run {installed}");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temporary directory: {e}"));
    let name = match instance {
        Some(i) => unit.replace("@.", &format!("@{i}.")),
        None => unit.to_owned(),
    };
    let path = dir.path().join(name);
    std::fs::write(&path, text.replace(&installed, bin))
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    let out = std::process::Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", analyze.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "{unit}: {stderr}"
    );
}
