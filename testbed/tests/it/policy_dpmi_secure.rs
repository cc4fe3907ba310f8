//! DPMI behind access control and on the wire (issue 15): a point that
//! presents an admin token works against a controller with
//! `api_tokens_file`, one without a token or with a read token is refused
//! saying so; reading a point's filter list (`GET`) stores nothing, the
//! point's poll is a `POST`.

#![allow(clippy::unwrap_used, clippy::expect_used)]
use crate::dpmi_lab;

use dpmi_lab::*;
use qosloop_meter::dpmi::{run_point, PointConfig, PointError};
use qosloop_testbed::harness::require_root;
use qosloop_testbed::need;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn point_config(lab: &Lab, token: Option<&str>) -> PointConfig {
    PointConfig {
        name: "mp1".into(),
        controller: lab.controller,
        token: token.map(str::to_owned),
        controller_tls: None,
        interface: lab.veth.b_if.clone(),
        max_filters: 4,
        max_caplen: 128,
        consumer_buffer: 4096,
        poll: Duration::from_millis(150),
        key: None,
        consumer_tls: None,
    }
}

/// Runs a point that must fail at registration; its error.
fn refused(lab: &Lab, token: Option<&str>) -> String {
    let cfg = point_config(lab, token);
    let stop = Arc::new(AtomicBool::new(false));
    let r = lab
        .mp
        .spawn_in(move || run_point(cfg, stop))
        .unwrap()
        .join()
        .unwrap()
        .unwrap();
    match r {
        Err(e @ PointError::Refused { .. }) => e.to_string(),
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("a point with token {token:?} ran"),
    }
}

fn stored_filters(lab: &Lab, id: i64) -> Value {
    let (status, v) = lab.api(
        "GET",
        &format!("/api/v1/requests/{id}"),
        Some("alice"),
        None,
    );
    assert_eq!(status, 200, "{v}");
    v["point_filters"]["mp1"].clone()
}

#[test]
fn a_point_with_an_admin_token_works_behind_tokens_and_reading_its_list_changes_nothing() {
    need!(require_root("creates network namespaces"));
    let lab = Lab::with_tokens();
    let e = refused(&lab, None);
    assert!(e.contains("(401)"), "{e}");
    let e = refused(&lab, Some("secret-reader"));
    assert!(e.contains("(403)") && e.contains("admin"), "{e}");
    let e = refused(&lab, Some("secret-nobody"));
    assert!(e.contains("(401)"), "{e}");

    // The point is known (registered by hand, as an admin), a request is
    // active: a GET of the list answers it and writes nothing.
    let (status, v) = lab.api(
        "POST",
        "/api/v1/points",
        Some("alice"),
        Some(json!({"name": "mp1", "interface": lab.veth.b_if, "max_filters": 4})),
    );
    assert_eq!(status, 201, "{v}");
    let consumer = Consumer::start(&lab, false, false);
    let id = request(
        &lab,
        "alice",
        json!({"ip_src": SRC, "ip_proto": "17", "dst_port": "5001"}),
        consumer.addr,
        300.0,
    );
    let (status, list) = lab.api("GET", "/api/v1/points/mp1/filters", Some("reader"), None);
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["filters"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(stored_filters(&lab, id), json!([]), "a GET stored the list");
    // The state-changing poll needs an admin token.
    let (status, v) = lab.api("POST", "/api/v1/points/mp1/filters", Some("reader"), None);
    assert_eq!(status, 403, "{v}");
    let (status, v) = lab.api("POST", "/api/v1/points/mp1/filters", None, None);
    assert_eq!(status, 401, "{v}");
    let (status, v) = lab.api("GET", "/api/v1/points/mp1/filters", None, None);
    assert_eq!(status, 401, "{v}");
    assert_eq!(stored_filters(&lab, id), json!([]));

    // The point with its admin token: registers, polls (POST, stored),
    // reports, delivers.
    let stop = Arc::new(AtomicBool::new(false));
    let point = lab.point(4, 4096, 128, stop.clone());
    wait_for(
        "the list installed and reported",
        Duration::from_secs(10),
        || {
            let (_, p) = lab.api("GET", "/api/v1/points", Some("reader"), None);
            p[0]["installed_version"] == list["version"]
        },
    );
    let stored = stored_filters(&lab, id);
    assert_eq!(stored.as_array().map(Vec::len), Some(1), "{stored}");
    wait_for("the consumer connected", Duration::from_secs(10), || {
        connected(&lab, "alice", id)
    });
    lab.send(SRC, 5001, 300, 64);
    lab.send(SRC, 5002, 300, 64);
    wait_for("the consumer's frames", Duration::from_secs(10), || {
        consumer.tags(|_| true).len() >= 300
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(consumer.tags(|_| true), expected(&[(5001, 300)]));
    stop.store(true, Ordering::Relaxed);
    point.join().unwrap();
}

/// The point ↔ controller link over TLS: the controller serves HTTPS with
/// a certificate of the test's CA; a point trusting that CA presents its
/// token over TLS, installs and delivers; a point trusting another CA
/// stops at its first call saying the certificate did not verify, and the
/// controller never hears its token (it is not registered).
#[test]
fn over_tls_the_point_presents_its_token_and_refuses_a_controller_it_cannot_verify() {
    use qosloop_testbed::harness::{require_binary, test_pki};
    need!(require_root("creates network namespaces"));
    need!(require_binary("openssl", "openssl"));
    let (pki, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    test_pki(pki.path()).unwrap();
    test_pki(other.path()).unwrap();
    let server = qosloop_runtime::tls::server_config_with(
        &pki.path().join("server.pem"),
        &pki.path().join("server.key"),
        None,
    )
    .unwrap();
    let trust = |dir: &std::path::Path| {
        qosloop_runtime::tls::client_config_with(&dir.join("ca.pem"), None).unwrap()
    };
    let lab = Lab::with_tokens_over_tls(server, trust(pki.path()));

    // Another CA: the handshake fails, the point does not start.
    let mut cfg = point_config(&lab, Some("secret-mp1"));
    cfg.controller_tls = Some(qosloop_meter::dpmi::ControllerTls {
        config: trust(other.path()),
        name: qosloop_runtime::tls::server_name("127.0.0.1").unwrap(),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let r = lab
        .mp
        .spawn_in(move || run_point(cfg, stop))
        .unwrap()
        .join()
        .unwrap()
        .unwrap();
    let e = match r {
        Err(e @ PointError::Controller { .. }) => e.to_string(),
        Err(e) => panic!("stopped for another reason: {e}"),
        Ok(_) => panic!("a point trusting another CA ran"),
    };
    eprintln!("the point trusting another CA: {e}");
    assert!(
        e.contains("TLS: invalid peer certificate"),
        "the error does not say the certificate failed: {e}"
    );
    let (status, points) = lab.api("GET", "/api/v1/points", Some("reader"), None);
    assert_eq!((status, points.clone()), (200, json!([])), "{points}");
    // Plain HTTP to the HTTPS controller: no answer it can read either.
    let mut plain = point_config(&lab, Some("secret-mp1"));
    plain.controller_tls = None;
    let stop = Arc::new(AtomicBool::new(false));
    let r = lab
        .mp
        .spawn_in(move || run_point(plain, stop))
        .unwrap()
        .join()
        .unwrap()
        .unwrap();
    assert!(r.is_err(), "a plain point ran against an HTTPS controller");

    // The right CA: registers with its token, polls, installs, delivers.
    let stop = Arc::new(AtomicBool::new(false));
    let point = lab.point(4, 4096, 128, stop.clone());
    let consumer = Consumer::start(&lab, false, false);
    let id = request(
        &lab,
        "alice",
        json!({"ip_src": SRC, "ip_proto": "17", "dst_port": "5001"}),
        consumer.addr,
        300.0,
    );
    let (_, list) = lab.api("GET", "/api/v1/points/mp1/filters", Some("reader"), None);
    assert_eq!(list["filters"].as_array().map(Vec::len), Some(1), "{list}");
    wait_for(
        "the list installed and reported over TLS",
        Duration::from_secs(10),
        || {
            let (_, p) = lab.api("GET", "/api/v1/points", Some("reader"), None);
            p[0]["installed_version"] == list["version"]
        },
    );
    wait_for("the consumer connected", Duration::from_secs(10), || {
        connected(&lab, "alice", id)
    });
    lab.send(SRC, 5001, 200, 64);
    lab.send(SRC, 5002, 200, 64);
    wait_for("the consumer's frames", Duration::from_secs(10), || {
        consumer.tags(|_| true).len() >= 200
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(consumer.tags(|_| true), expected(&[(5001, 200)]));
    stop.store(true, Ordering::Relaxed);
    point.join().unwrap();
}
