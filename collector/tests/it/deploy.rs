//! The deployment files of `qosloop-collector` (deploy/): the example configuration
//! parses and validates with the daemon's own loader, and the systemd unit
//! keeps the capabilities it needs and no more, and passes
//! `systemd-analyze verify`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_testkit::harness::deploy::{capabilities, example, verify_unit};

const BIN_NAME: &str = "qosloop-collector";
const BIN: &str = env!("CARGO_BIN_EXE_qosloop-collector");

#[test]
fn the_deployment_example_loads_and_the_unit_keeps_no_capability() {
    let c = qosloop_collector::Config::from_file(&example("collector.toml")).unwrap();
    c.validate().unwrap();
    assert!(c.db.starts_with("postgres://"));
    assert_eq!(c.metrics_addr().unwrap().unwrap().port(), 9742);
    assert!(capabilities("qosloop-collector.service").is_empty());
    verify_unit("qosloop-collector.service", None, BIN_NAME, BIN);
}
