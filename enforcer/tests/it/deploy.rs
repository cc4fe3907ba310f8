//! The deployment files of `qosloop-enforcer` (deploy/): the example configuration
//! parses and validates with the daemon's own loader, and the systemd unit
//! keeps the capabilities it needs and no more, and passes
//! `systemd-analyze verify`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_testkit::harness::deploy::{capabilities, example, verify_unit};

const BIN_NAME: &str = "qosloop-enforcer";
const BIN: &str = env!("CARGO_BIN_EXE_qosloop-enforcer");

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
    verify_unit("qosloop-enforcer@.service", Some("eth1"), BIN_NAME, BIN);
}
