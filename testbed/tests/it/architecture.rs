//! The dependency graph points one way, dev-dependencies included: the
//! daemon crates depend on the libraries below them and, for their tests,
//! on the test kit only; no daemon depends on another daemon or on the
//! testbed, and the test kit on no daemon. `cargo metadata` says so.

use serde_json::Value;
use std::collections::BTreeMap;

/// The daemons (and the exporter client the meter embeds) in the order
/// they may depend on one another: only the meter on the exporter.
const DAEMONS: [&str; 5] = [
    "qosloop-exporter",
    "qosloop-meter",
    "qosloop-collector",
    "qosloop-policy-server",
    "qosloop-enforcer",
];

/// Every workspace package with its workspace dependencies, each as
/// (name, kind: "normal", "dev" or "build").
fn graph() -> BTreeMap<String, Vec<(String, String)>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut g = BTreeMap::new();
    for p in meta["packages"].as_array().unwrap() {
        let deps = p["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["name"].as_str().unwrap().starts_with("qosloop-"))
            .map(|d| {
                let kind = d["kind"].as_str().unwrap_or("normal").to_owned();
                (d["name"].as_str().unwrap().to_owned(), kind)
            })
            .collect();
        g.insert(p["name"].as_str().unwrap().to_owned(), deps);
    }
    g
}

#[test]
fn the_dependency_graph_points_one_way() {
    let g = graph();
    assert!(g.contains_key("qosloop-testkit"), "{g:?}");
    for (pkg, deps) in &g {
        for (dep, kind) in deps {
            let edge = format!("{pkg} → {dep} ({kind})");
            assert_ne!(
                dep, "qosloop-testbed",
                "nothing depends on the testbed: {edge}"
            );
            if pkg == "qosloop-testkit" {
                assert!(
                    !DAEMONS.contains(&dep.as_str()),
                    "the kit links no daemon: {edge}"
                );
            }
            if DAEMONS.contains(&pkg.as_str()) && DAEMONS.contains(&dep.as_str()) {
                let allowed =
                    pkg == "qosloop-meter" && dep == "qosloop-exporter" && kind == "normal";
                let itself = pkg == dep;
                assert!(
                    allowed || itself,
                    "a daemon depends on another daemon: {edge}"
                );
            }
            if kind == "dev" && pkg != dep {
                assert_eq!(dep, "qosloop-testkit", "tests link the kit only: {edge}");
            }
        }
    }
}

/// One integration-test binary per crate (`tests/it/main.rs`), at most
/// twelve in all: each is linked once.
#[test]
fn each_crate_has_at_most_one_integration_test_binary() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut binaries = 0;
    for pkg in graph().keys() {
        let dir = root.join(pkg.trim_start_matches("qosloop-")).join("tests");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let here: Vec<String> = entries
            .map(|e| e.unwrap())
            .filter(|e| {
                let p = e.path();
                p.extension().is_some_and(|x| x == "rs") || p.join("main.rs").is_file()
            })
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(here.len() <= 1, "{pkg}: {here:?}");
        binaries += here.len();
    }
    assert!(
        (1..=12).contains(&binaries),
        "{binaries} integration-test binaries"
    );
}
