//! The real daemon against peers that hold its ports (issue 11, items 4, 5
//! and 10): run as a child process with 1,024 descriptors, on loopback;
//! the attacker speaks from 127.0.0.2, the legitimate enforcer and API
//! client from 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;
use qosloop_testkit::http::Request;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::net::{TcpSocket, TcpStream};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_qosloop-policy-server"))
}

fn sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../schema/ldap/sample-policy.ldif")
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// The daemon, killed and reaped on drop.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts the daemon under `ulimit -n 1024` (soft and hard, so that it
    /// cannot raise its way out).
    fn start(dir: &Path, pdp: SocketAddr, http: SocketAddr) -> Daemon {
        let log = dir.join("policy-server.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("sh")
            .arg("-c")
            .arg("ulimit -n 1024 && exec \"$0\" \"$@\"")
            .arg(bin())
            .arg("--db")
            .arg(format!("sqlite://{}", dir.join("q.db").display()))
            .arg("--policies")
            .arg(sample())
            .arg("--pdp-listen")
            .arg(pdp.to_string())
            .arg("--http")
            .arg(http.to_string())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Daemon { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_listening(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the daemon exited ({status}):\n{}", self.log());
            }
            if TcpStream::connect(addr).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{addr} never listened:\n{}", self.log());
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens `n` connections from 127.0.0.2, alternating between `targets`,
/// and keeps them open (idle).
async fn idle_sockets(targets: &[SocketAddr], n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let target = targets[i % targets.len()];
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_secs(2), socket.connect(target)).await
        {
            held.push(s);
        }
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_from_one_address_starve_neither_enforcers_nor_api_clients() {
    // Issue 11 item 4: 1,100 idle sockets against a daemon with 1,024
    // descriptors left the HTTP port silent and the PDP unable to accept.
    qosloop_schema::guard::raise_nofile_limit();
    let dir = tempfile::tempdir().unwrap();
    let (pdp, http) = (free_addr(), free_addr());
    let mut daemon = Daemon::start(dir.path(), pdp, http);
    daemon.wait_listening(pdp).await;
    daemon.wait_listening(http).await;

    // HTTP connections had no timeout at all: 1,100 of them exhausted the
    // descriptors; a few at the PDP too.
    let mut held = idle_sockets(&[http], 1100).await;
    held.extend(idle_sockets(&[pdp], 100).await);
    assert!(held.len() > 1100, "only {} connections opened", held.len());

    // A legitimate enforcer gets its decisions…
    let (mut pep, got) = tokio::time::timeout(
        Duration::from_secs(30),
        FakePep::connect(pdp, "real-edge", &["edge"], &[]),
    )
    .await
    .unwrap_or_else(|_| panic!("the enforcer got no session:\n{}", daemon.log()));
    assert!(!got.is_empty(), "{got:?}");
    // … and an API client its answer, while the idle sockets stay open.
    let api = |path: &str| {
        Request::get(path)
            .timeout(Duration::from_secs(5))
            .send_async(http)
    };
    let mut seen = None;
    for _ in 0..100 {
        match api("/api/enforcers").await {
            Ok(answer) if answer.text().contains("real-edge") => {
                seen = Some(answer.status);
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let status =
        seen.unwrap_or_else(|| panic!("the API never showed the enforcer:\n{}", daemon.log()));
    assert_eq!(status, 200);
    // The session still works: KA is echoed.
    futures_util::SinkExt::send(&mut pep.wire, qosloop_schema::cops::Message::ka())
        .await
        .unwrap();
    let ka = pep.next().await;
    assert!(matches!(ka.body, qosloop_schema::cops::Body::Ka), "{ka:?}");

    // The attack is counted and logged, the log rate-limited.
    let answer = api("/api/status").await.expect("status answers");
    let status: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    let refused = status["pdp"]["refused_limit_per_peer"].as_u64().unwrap()
        + status["http"]["refused_limit_per_peer"].as_u64().unwrap();
    assert!(refused > 900, "{status}");
    let log = daemon.log();
    let lines = log.matches("connection refused").count();
    assert!(
        (1..=20).contains(&lines),
        "{lines} refusal lines for {refused} refusals"
    );
    assert!(!log.contains("Too many open files"), "{log}");
    drop(held);
}

#[tokio::test]
async fn listeners_beyond_loopback_need_mutual_tls_or_the_opt_in_and_nothing_opens_on_bad_config() {
    // Issue 11 items 5 and 10: the PDP listened on 0.0.0.0 by default;
    // configuration is validated before any socket opens.
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("q.db").display());
    // A daemon that starts instead of refusing is killed after 10 s.
    let run = |args: &[&str]| {
        let err_path = dir.path().join("stderr");
        let mut child = Command::new(bin())
            .args(["--db", &db, "--policies"])
            .arg(sample())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err_path).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let code = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (code, std::fs::read_to_string(&err_path).unwrap())
    };
    let port = free_addr().port();
    let (code, err) = run(&["--pdp-listen", &format!("0.0.0.0:{port}")]);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("pdp_listen") && err.contains("--allow-insecure-remote"),
        "{err}"
    );
    let (code, err) = run(&[
        "--pdp-listen",
        "127.0.0.1:0",
        "--http",
        &format!("0.0.0.0:{port}"),
    ]);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("http") && err.contains("--allow-insecure-remote"),
        "{err}"
    );
    // TLS files that do not exist: refused before the PDP port opens.
    let pdp = free_addr();
    let (code, err) = run(&[
        "--pdp-listen",
        &pdp.to_string(),
        "--pdp-tls-cert",
        "/nonexistent/cert.pem",
        "--pdp-tls-key",
        "/nonexistent/key.pem",
    ]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("/nonexistent/cert.pem"), "{err}");
    assert!(std::net::TcpListener::bind(pdp).is_ok());
}

#[tokio::test]
async fn a_terminated_daemon_exits_0() {
    // The honest exit's other half: a requested shutdown is a success.
    let dir = tempfile::tempdir().unwrap();
    let pdp = free_addr();
    let mut daemon = Daemon::start(dir.path(), pdp, free_addr());
    daemon.wait_listening(pdp).await;
    let pid = daemon.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = daemon.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "still running:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}:\n{}", daemon.log());
}
