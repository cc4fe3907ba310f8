//! The deployment files of `qosloop-policy-server` (deploy/): the example configuration
//! parses and validates with the daemon's own loader, and the systemd unit
//! keeps the capabilities it needs and no more, and passes
//! `systemd-analyze verify`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_testkit::harness::deploy::{capabilities, example, verify_unit};

const BIN_NAME: &str = "qosloop-policy-server";
const BIN: &str = env!("CARGO_BIN_EXE_qosloop-policy-server");

#[test]
fn the_deployment_example_loads_and_the_unit_keeps_no_capability() {
    use qosloop_policy_server::config::{Config, PolicySource, Settings};
    // The file names /etc/qosloop/tokens.toml: read the example beside it.
    let text = std::fs::read_to_string(example("policy-server.toml"))
        .unwrap()
        .replace("/etc/qosloop/", &format!("{}/", example("").display()));
    let c = Config::validate(Settings::from_toml(&text).unwrap(), true).unwrap();
    assert!(matches!(c.policies, PolicySource::Ldap { .. }));
    assert!(
        c.web.auth.is_enforced(),
        "the example tokens were not loaded"
    );
    assert_eq!(c.metrics.unwrap().port(), 9743);
    assert!(capabilities("qosloop-policy-server.service").is_empty());
    verify_unit("qosloop-policy-server.service", None, BIN_NAME, BIN);
}

#[test]
fn the_example_tokens_are_the_hashes_the_file_says() {
    use qosloop_policy_server::auth::{Auth, FilterParamScope};
    let auth = Auth::load(
        Some(&example("tokens.toml")),
        vec![],
        std::sync::Arc::new(FilterParamScope::default()),
    )
    .unwrap();
    assert!(auth.is_enforced());
    let text = std::fs::read_to_string(example("tokens.toml")).unwrap();
    for word in ["example-read", "example-admin", "example-customer"] {
        let h = qosloop_runtime::digest::hex(&qosloop_runtime::digest::sha256(word.as_bytes()));
        assert!(text.contains(&h), "{word}");
    }
}
