//! The policy server binary's `/metrics`: on its own port (`--metrics`)
//! and on the HTTP port behind the API's tokens, read with the strict
//! exposition parser; and what it says at start about the API's access.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_runtime::digest::{hex, sha256};
use qosloop_testkit::http::Request;
use qosloop_testkit::metrics::scrape;
use qosloop_testkit::metrics::{parse, Scrape};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(dir: &Path, extra: &[String]) -> (Kill, u16, u16) {
    let (pdp, http, metrics) = (free_port(), free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_qosloop-policy-server"))
        .arg("--db")
        .arg(format!("sqlite://{}", dir.join("q.db").display()))
        .arg("--policies")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../schema/ldap/sample-policy.ldif"))
        .args(["--pdp-listen", &format!("127.0.0.1:{pdp}")])
        .args(["--http", &format!("127.0.0.1:{http}")])
        .args(["--metrics", &format!("127.0.0.1:{metrics}")])
        .args(["--interval-ms", "200"])
        .args(extra)
        .stdout(std::fs::File::create(dir.join("out")).unwrap())
        .stderr(std::fs::File::create(dir.join("err")).unwrap())
        .spawn()
        .unwrap();
    (Kill(child), http, metrics)
}

/// Scrapes `--metrics` until `done` (bounded).
fn scrape_until(k: &mut Kill, dir: &Path, port: u16, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(exit)) = k.0.try_wait() {
            panic!(
                "the server exited ({exit}): {}",
                std::fs::read_to_string(dir.join("err")).unwrap_or_default()
            );
        }
        if let Ok(body) = scrape(addr, Duration::from_secs(5)) {
            let s = parse(&body).unwrap_or_else(|e| panic!("invalid exposition: {e}\n{body}"));
            if done(&s) {
                return s;
            }
        }
        assert!(Instant::now() < end, "the metrics never showed it");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `GET /metrics` on the HTTP port: status code and body.
fn http_metrics(port: u16, token: Option<&str>) -> (u16, String) {
    let answer = token
        .iter()
        .fold(Request::get("/metrics"), |r, t| {
            r.header("Authorization", &format!("Bearer {t}"))
        })
        .timeout(Duration::from_secs(5))
        .send(([127, 0, 0, 1], port).into())
        .unwrap();
    (answer.status, answer.text().into_owned())
}

#[test]
fn metrics_are_served_on_both_ports_and_count_refused_requests() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        format!(
            "[[token]]\nname = \"prometheus\"\nrole = \"read\"\nsha256 = \"{}\"\n",
            hex(&sha256(b"scrape-token-31"))
        ),
    )
    .unwrap();
    let (mut k, http, metrics) = start(
        dir.path(),
        &["--api-tokens-file".into(), tokens.display().to_string()],
    );
    // The loop decided at start and computed rates since.
    let s = scrape_until(&mut k, dir.path(), metrics, |s| {
        s.value("qosloop_policy_rates_age_seconds", &[])
            .is_some_and(f64::is_finite)
    });
    let in_force: f64 = s.samples("qosloop_policy_decisions").map(|x| x.value).sum();
    let issued: f64 = ["accept", "remark", "drop"]
        .iter()
        .map(|v| {
            s.value("qosloop_policy_decisions_issued_total", &[("verdict", v)])
                .unwrap()
        })
        .sum();
    assert!(issued >= in_force, "{issued} issued, {in_force} in force");
    assert_eq!(
        s.value(
            "qosloop_build_info",
            &[
                ("component", "policy-server"),
                ("version", env!("CARGO_PKG_VERSION"))
            ]
        ),
        Some(1.0)
    );
    // The HTTP port's /metrics needs a token; the refusal is counted.
    assert_eq!(http_metrics(http, None).0, 401);
    assert_eq!(http_metrics(http, Some("wrong")).0, 401);
    let (code, body) = http_metrics(http, Some("scrape-token-31"));
    assert_eq!(code, 200);
    parse(&body).unwrap();
    let s = scrape_until(&mut k, dir.path(), metrics, |s| {
        s.value(
            "qosloop_policy_http_auth_failures_total",
            &[("reason", "missing")],
        ) == Some(1.0)
    });
    assert_eq!(
        s.value(
            "qosloop_policy_http_auth_failures_total",
            &[("reason", "invalid")]
        ),
        Some(1.0)
    );
    let err = std::fs::read_to_string(dir.path().join("err")).unwrap();
    assert!(err.contains("bearer tokens required"), "{err}");
    let refused = err
        .lines()
        .find(|l| l.contains("HTTP API request refused"))
        .unwrap_or_else(|| panic!("no refusal logged: {err}"));
    assert!(
        refused.contains("127.0.0.1:"),
        "the peer is not named: {refused}"
    );
}

#[test]
fn without_tokens_the_server_says_at_start_that_the_api_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let (mut k, _, metrics) = start(dir.path(), &[]);
    scrape_until(&mut k, dir.path(), metrics, |_| true);
    let err = std::fs::read_to_string(dir.path().join("err")).unwrap();
    assert!(
        err.lines()
            .any(|l| l.contains("WARN") && l.contains("HTTP API is open")),
        "{err}"
    );
}
