//! COPS over TLS between the real binaries, on loopback: a policy server
//! with a certificate that asks enforcers for theirs (mutual TLS), and
//! enforcers in dry-run mode (no kernel changes, no root). The one with the
//! CA and a client certificate is accepted and shows up at the PDP; one
//! speaking plain TCP, one trusting another CA and one without a client
//! certificate are refused and never do.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_testbed::harness::{free_port, require_binary, spawn_logged, tail_of, test_pki, Kid};
use qosloop_testbed::need;
use qosloop_testbed::procs::component_dir;
use qosloop_testkit::http::Request;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn spawn(bin: &Path, args: &[&str], log: &Path) -> Kid {
    spawn_logged(Command::new(bin).args(args), log).unwrap()
}

/// The body of `GET /api/enforcers` of the policy server's web API, as
/// text; empty when no answer came.
fn enforcers(http: u16) -> String {
    Request::get("/api/enforcers")
        .timeout(Duration::from_secs(5))
        .send(([127, 0, 0, 1], http).into())
        .map(|answer| answer.text().into_owned())
        .unwrap_or_default()
}

#[test]
fn cops_over_tls_admits_only_enforcers_with_the_right_certificates() {
    need!(require_binary("openssl", "openssl"));
    need!(component_dir().map(|_| ()).map_err(|e| e.to_string()));
    let bin = component_dir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    test_pki(d).unwrap();
    // A second CA the PDP's certificate does not chain to.
    let other = d.join("other");
    std::fs::create_dir(&other).unwrap();
    test_pki(&other).unwrap();
    let p = |name: &str| d.join(name).display().to_string();
    let (pdp_port, http_port) = (free_port().unwrap(), free_port().unwrap());
    let pdp_addr = format!("127.0.0.1:{pdp_port}");
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schema/ldap/sample-policy.ldif");
    let _server = spawn(
        &bin.join("qosloop-policy-server"),
        &[
            "--db",
            &format!("sqlite://{}", p("flows.db")),
            "--policies",
            policies.to_str().unwrap(),
            "--pdp-listen",
            &pdp_addr,
            "--http",
            &format!("127.0.0.1:{http_port}"),
            "--pdp-tls-cert",
            &p("server.pem"),
            "--pdp-tls-key",
            &p("server.key"),
            "--pdp-tls-client-ca",
            &p("ca.pem"),
        ],
        &d.join("policy-server.log"),
    );
    let enforcer = |name: &str, tls: &[String]| {
        let mut args: Vec<String> = [
            "--dry-run",
            "--interface",
            name,
            "--roles",
            "edge",
            "--capacity",
            "10mbit",
            "--pdp",
            &pdp_addr,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(tls.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        spawn(
            &bin.join("qosloop-enforcer"),
            &args,
            &d.join(format!("{name}.log")),
        )
    };
    let s = |v: &str| v.to_owned();
    let _good = enforcer(
        "qtlsgood",
        &[
            s("--pdp-tls-ca"),
            p("ca.pem"),
            s("--pdp-tls-cert"),
            p("client.pem"),
            s("--pdp-tls-key"),
            p("client.key"),
        ],
    );
    let _plain = enforcer("qtlsplain", &[]);
    let other_ca = other.join("ca.pem").display().to_string();
    let _wrong_ca = enforcer(
        "qtlswrongca",
        &[
            s("--pdp-tls-ca"),
            other_ca,
            s("--pdp-tls-cert"),
            p("client.pem"),
            s("--pdp-tls-key"),
            p("client.key"),
        ],
    );
    let _no_cert = enforcer("qtlsnocert", &[s("--pdp-tls-ca"), p("ca.pem")]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = String::new();
    while Instant::now() < deadline {
        seen = enforcers(http_port);
        // Under mutual TLS an enforcer is the name in its certificate.
        if seen.contains("qosloop client") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let logs = || {
        [
            "policy-server",
            "qtlsgood",
            "qtlsplain",
            "qtlswrongca",
            "qtlsnocert",
        ]
        .iter()
        .map(|n| format!("--- {n}\n{}", tail_of(&d.join(format!("{n}.log")), 8)))
        .collect::<Vec<_>>()
        .join("\n")
    };
    assert!(
        seen.contains("qosloop client"),
        "the enforcer with the CA and a client certificate did not reach the PDP: {seen}\n{}",
        logs()
    );
    // The others have had as long; give them two more seconds of retries.
    std::thread::sleep(Duration::from_secs(2));
    let seen = enforcers(http_port);
    for refused in ["qtlsplain", "qtlswrongca", "qtlsnocert"] {
        assert!(
            !seen.contains(refused),
            "{refused} got in: {seen}\n{}",
            logs()
        );
    }
    let server_log = std::fs::read_to_string(d.join("policy-server.log")).unwrap();
    assert!(
        server_log.contains("TLS handshake failed"),
        "the PDP names the refusal:\n{}",
        logs()
    );
}
