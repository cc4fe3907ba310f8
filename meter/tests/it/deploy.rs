//! The deployment files of `qosloop-meter` (deploy/): the example configuration
//! parses and validates with the daemon's own loader, and the systemd unit
//! keeps the capabilities it needs and no more, and passes
//! `systemd-analyze verify`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_testkit::harness::deploy::{capabilities, example, verify_unit};

const BIN_NAME: &str = "qosloop-meter";
const BIN: &str = env!("CARGO_BIN_EXE_qosloop-meter");

#[test]
fn the_deployment_example_loads_and_the_unit_keeps_only_cap_net_raw() {
    let file = qosloop_meter::Config::load(&example("meter.toml")).unwrap();
    // The unit gives the interface and the spool on the command line.
    let flags = qosloop_meter::Config {
        interface: Some("eth0".into()),
        export_spool: Some("/var/lib/qosloop-meter/eth0".into()),
        ..Default::default()
    };
    let c = file.merge(flags);
    c.validate().unwrap();
    assert_eq!(c.metrics_addr().unwrap().unwrap().port(), 9741);
    assert_eq!(c.export, ["crane://127.0.0.1:4740"]);
    // AF_PACKET needs CAP_NET_RAW; the capture sets no promiscuous mode
    // and no forced buffer size, so CAP_NET_ADMIN is not needed.
    assert_eq!(capabilities("qosloop-meter@.service"), ["CAP_NET_RAW"]);
    verify_unit("qosloop-meter@.service", Some("eth0"), BIN_NAME, BIN);
}
