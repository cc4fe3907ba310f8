//! The policy server's attacks: idle sockets on both ports, a PEP that
//! stops reading, a forged OPN, an RPT flood and oversized PEPIDs.

use super::common::*;
use qosloop_schema::cops::{self, Handle, Message as Cops, PepHello, PepState};
use qosloop_schema::{EnforcementReport, ReportOutcome};
use qosloop_testkit::http::Request;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

/// Peak resident memory the policy server may reach under any one attack.
const POLICY_SERVER_BUDGET_KB: u64 = 256 * 1024;

/// The policy server under test (PDP + HTTP), with a SQLite database in
/// its bench's directory. The daemon is killed before the bench is let go.
struct PolicyServer {
    daemon: Daemon,
    pdp: SocketAddr,
    http: SocketAddr,
    bench: Bench,
}

const COPS_CAT: u8 = 7;
const COPS_CC: u8 = 8;

impl PolicyServer {
    /// The policy server on free loopback ports, or `None` when the test is
    /// skipped.
    async fn launch() -> Option<PolicyServer> {
        let bench = bench().await?;
        let dir = bench.dir.path();
        let (pdp, http) = (loopback_addr(), loopback_addr());
        let args = policy_server_args(&sqlite_url(dir), pdp.to_string(), http.to_string(), &[]);
        let log = dir.join("policy-server.log");
        let mut daemon = Daemon::start(&bench.bin, "qosloop-policy-server", &args, log);
        wait_listening(&mut daemon, http).await;
        wait_listening(&mut daemon, pdp).await;
        Some(PolicyServer {
            daemon,
            pdp,
            http,
            bench,
        })
    }

    /// GET `path` from 127.0.0.1: (status, body).
    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let answer = Request::get(path)
            .timeout(Duration::from_secs(15))
            .send_async(self.http)
            .await
            .ok()?;
        Some((answer.status, answer.text().into_owned()))
    }

    /// The body of a 200 answer to GET `path`; panics on anything else.
    async fn get_ok(&self, path: &str, what: &str) -> String {
        match self.get(path).await {
            Some((200, body)) => body,
            other => panic!("{what}: {other:?}\n{}", self.daemon.tail()),
        }
    }

    /// The counters of `/api/status` (`{"pdp": {…}, "http": {…}, …}`).
    async fn status(&self) -> serde_json::Value {
        let body = self
            .get_ok("/api/status", "/api/status did not answer")
            .await;
        serde_json::from_str(&body).unwrap_or_default()
    }

    /// The counter at `path` ("pdp.refused_pep_id_in_use"), 0 when absent.
    async fn counter(&self, path: &str) -> u64 {
        let status = self.status().await;
        let mut v = &status;
        for k in path.split('.') {
            v = &v[k];
        }
        v.as_u64().unwrap_or(0)
    }

    /// The API answers 200 on `/api/enforcers`; the body.
    async fn assert_api_answers(&self, when: &str) -> String {
        let what = format!("the web API did not answer {when}");
        self.get_ok("/api/enforcers", &what).await
    }

    /// The real enforcer (dry run) named `name`, connected from 127.0.0.1.
    fn enforcer(&self, name: &str) -> Daemon {
        let mut cmd = Command::new(self.bench.bin.join("qosloop-enforcer"));
        cmd.args(["--dry-run", "--interface", name, "--roles", "edge"])
            .args(["--capacity", "10mbit", "--pdp", &self.pdp.to_string()]);
        let log = self.bench.dir.path().join(format!("{name}.log"));
        Daemon::spawn(cmd, "qosloop-enforcer", log)
    }

    /// Waits until `/api/enforcers` shows the enforcer whose PEPID contains
    /// `name` (the enforcer's is `qosloop-enforcer/INTERFACE/PID`) in
    /// `state`; its entry.
    async fn wait_enforcer(&self, name: &str, state: &str, when: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some((200, body)) = self.get("/api/enforcers").await {
                if let Ok(serde_json::Value::Array(v)) = serde_json::from_str(&body) {
                    let named = |e: &serde_json::Value| {
                        e["name"].as_str().is_some_and(|n| n.contains(name))
                    };
                    if let Some(e) = v.into_iter().find(named) {
                        if e["state"] == state {
                            return e;
                        }
                        last = e.to_string();
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "enforcer {name} is not {state} {when}: {last}\n{}",
            self.daemon.tail()
        );
    }

    fn assert_healthy(&mut self, after: &str) {
        self.daemon.assert_bounded(POLICY_SERVER_BUDGET_KB, after);
    }
}

fn cops_bytes(m: &Cops) -> Vec<u8> {
    let mut codec = cops::CopsCodec::new(1 << 20);
    let mut buf = Default::default();
    cops::Encoder::encode(&mut codec, m.clone(), &mut buf).unwrap();
    let bytes: &[u8] = &buf;
    bytes.to_vec()
}

/// COPS op codes of what the PDP sends, until it closes, a CC, `limit`, or
/// `stop_after` messages.
async fn cops_answers(s: &mut TcpStream, limit: Duration, stop_after: usize) -> (Vec<u8>, bool) {
    let mut ops = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match read_message(s, deadline).await {
            Read::Quiet => return (ops, false),
            Read::Closed => return (ops, true),
            Read::Message(op, _) => {
                ops.push(op);
                if op == COPS_CC || ops.len() >= stop_after {
                    return (ops, false);
                }
            }
        }
    }
}

fn opn(name: &str) -> Vec<u8> {
    cops_bytes(&Cops::opn(
        name,
        &PepHello {
            roles: vec!["edge".into()],
            interface: Some(name.chars().take(15).collect()),
            direction: None,
            software: "hostile".into(),
        },
    ))
}

/// Issue 11, item 4 on the policy server: 1,100 idle sockets on the HTTP
/// port and 1,100 on the PDP port (1,024 descriptors) left the API
/// answering nothing and the PDP accepting no enforcer; a PEP that stops
/// reading was never closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_server_limits_idle_sockets_and_closes_a_pep_that_stops_reading() {
    let Some(mut ps) = PolicyServer::launch().await else {
        return;
    };
    let n = attack_sockets(1100, 2);
    let idle_http = open_many(n, 2, 4, ps.http).await;
    let idle_pdp = open_many(n, 6, 4, ps.pdp).await;
    eprintln!(
        "{} idle HTTP and {} idle PDP connections open",
        idle_http.len(),
        idle_pdp.len()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    ps.daemon.assert_alive("with 2,200 idle connections");
    ps.assert_api_answers("while 2,200 idle connections are open")
        .await;
    let mut enforcer = ps.enforcer("qhostile0");
    ps.wait_enforcer(
        "qhostile0",
        "connected",
        "while 2,200 idle connections are open",
    )
    .await;
    enforcer.assert_alive("connected to the PDP under attack");

    // A PEP that opens, then sends KA after KA and never reads the echoes,
    // with a small receive buffer: the PDP's writes block; it must close it.
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.bind(SocketAddr::new(attacker(12), 0)).unwrap();
    let mut deaf = sock.connect(ps.pdp).await.unwrap();
    assert!(send_bounded(&mut deaf, &opn("deaf-pep")).await);
    let ka = cops_bytes(&Cops::ka());
    let burst: Vec<u8> = ka.iter().copied().cycle().take(ka.len() * 4096).collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut closed = false;
    while Instant::now() < deadline {
        if let Ok(Err(_)) =
            tokio::time::timeout(Duration::from_secs(1), deaf.write_all(&burst)).await
        {
            closed = true;
        }
        if closed || ps.counter("pdp.write_timeouts").await > 0 {
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "a PEP that stopped reading was still served after 90 s\n{}",
        ps.daemon.tail()
    );
    let status = ps.status().await;
    eprintln!("counters after the attack: {status}");
    assert!(
        status["pdp"]["write_timeouts"].as_u64() >= Some(1),
        "the deaf PEP's write timeout is not counted: {status}"
    );
    for port in ["http", "pdp"] {
        assert!(
            status[port]["refused_limit_per_peer"].as_u64() > Some(0),
            "no {port} connection over the per-address limit was counted: {status}"
        );
    }
    drop(deaf);
    ps.assert_healthy("after the idle-socket and deaf-PEP attacks");
    drop(idle_http);
    drop(idle_pdp);
    ps.assert_api_answers("after the idle-socket attack").await;
    ps.wait_enforcer("qhostile0", "connected", "after the idle-socket attack")
        .await;
    enforcer.assert_alive("after the attack");
}

/// Issue 11, item 5 on the PDP: a second OPN with a connected enforcer's
/// PEPID overwrote its state ("disconnected" while connected), and an RPT
/// flood lost real reports and the Disconnected event, silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pdp_refuses_a_second_opn_for_a_connected_pep_and_counts_a_report_flood() {
    let Some(mut ps) = PolicyServer::launch().await else {
        return;
    };
    let mut enforcer = ps.enforcer("qhostile1");
    let real = ps
        .wait_enforcer("qhostile1", "connected", "before the attack")
        .await;
    eprintln!("real enforcer: {real}");

    let pep_id = real["name"].as_str().unwrap().to_owned();
    // Refusals are logged at most once a second: let the one of the
    // readiness probe's connection ("closed before OPN") pass.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut forged = connect_from(attacker(2), ps.pdp).await.unwrap();
    assert!(send_bounded(&mut forged, &opn(&pep_id)).await);
    let (ops, closed) = cops_answers(&mut forged, Duration::from_secs(5), 2).await;
    eprintln!("forged OPN answered {ops:?}, closed {closed}");
    assert!(
        ops.first() == Some(&COPS_CC) || (closed && !ops.contains(&COPS_CAT)),
        "a second OPN with a connected PEP's name was accepted: {ops:?}"
    );
    drop(forged);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = ps
        .wait_enforcer("qhostile1", "connected", "after the forged OPN")
        .await;
    assert_eq!(
        after["address"], real["address"],
        "the forged OPN overwrote the enforcer's address"
    );
    ps.daemon
        .assert_logged(&["127.0.0.2", "qhostile1", "in use"], "the refused OPN");
    assert!(ps.counter("pdp.refused_pep_id_in_use").await >= 1);

    // A PEP of its own floods RPTs: 20,000 in at most 20 s.
    let mut flood = connect_from(attacker(3), ps.pdp).await.unwrap();
    assert!(send_bounded(&mut flood, &opn("flooder")).await);
    let (ops, _) = cops_answers(&mut flood, Duration::from_secs(5), 2).await;
    assert_eq!(ops, [COPS_CAT, 5], "OPN → CAT + SSQ");
    let h = Handle::from_u32(1);
    let mut msg = cops_bytes(&Cops::req(
        h.clone(),
        &PepState {
            roles: vec!["edge".into()],
            installed: vec![],
        },
    ));
    msg.extend(cops_bytes(&Cops::ssc()));
    assert!(send_bounded(&mut flood, &msg).await);
    let report = |i: u64| EnforcementReport {
        decision_id: i,
        version: 1,
        outcome: ReportOutcome::Installed,
        reconfig_ns: 1,
        at_ns: 1,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut sent = 0u64;
    while sent < 20_000 && Instant::now() < deadline {
        let batch: Vec<u8> = (sent..sent + 500)
            .flat_map(|i| cops_bytes(&Cops::rpt(h.clone(), &report(i))))
            .collect();
        if !send_bounded(&mut flood, &batch).await {
            break;
        }
        sent += 500;
    }
    eprintln!("{sent} RPTs sent");
    // Every report is counted: received (and stored or, past the queue,
    // dropped and counted as such).
    let deadline = Instant::now() + Duration::from_secs(30);
    while ps.counter("pdp.reports").await < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(flood);
    let status = ps.status().await;
    eprintln!("counters after the RPT flood: {status}");
    // The real enforcer's own reports count too.
    assert!(
        status["pdp"]["reports"].as_u64().unwrap_or(0) >= sent,
        "of {sent} RPTs, reports went uncounted: {status}"
    );
    ps.assert_healthy("after the RPT flood");
    ps.assert_api_answers("after the RPT flood").await;
    // The real enforcer's end is recorded, flood or not.
    let _ = enforcer.child.kill();
    ps.wait_enforcer("qhostile1", "disconnected", "after it was killed")
        .await;
    let _ = enforcer.child.wait();
}

/// Issue 11, item 6 on the PDP: 500 OPNs with 60 KB PEPIDs made
/// `/api/enforcers` 30.8 MB per GET and wrote 60 MB of log in 0.2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pdp_bounds_pep_identifiers_and_their_log() {
    let Some(mut ps) = PolicyServer::launch().await else {
        return;
    };
    let log_before = ps.daemon.log_size();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..500u32 {
        let pdp = ps.pdp;
        set.spawn(async move {
            let name = format!("{i:05}{}", "x".repeat(60_000));
            let Ok(mut s) = connect_from(attacker(2 + (i % 20) as u8), pdp).await else {
                return;
            };
            if send_bounded(&mut s, &opn(&name)).await {
                let _ = cops_answers(&mut s, Duration::from_secs(5), 2).await;
            }
        });
        if set.len() >= 50 {
            set.join_next().await;
        }
    }
    while set.join_next().await.is_some() {}
    ps.daemon.assert_alive("after 500 OPNs with 60 KB PEPIDs");
    let body = ps
        .assert_api_answers("after 500 OPNs with 60 KB PEPIDs")
        .await;
    eprintln!("/api/enforcers: {} bytes", body.len());
    assert!(
        body.len() < 1 << 20,
        "/api/enforcers is {} bytes after 500 OPNs with 60 KB PEPIDs",
        body.len()
    );
    let grown = ps.daemon.log_size() - log_before;
    eprintln!("log grew by {grown} bytes");
    assert!(
        grown < 4 << 20,
        "500 OPNs with 60 KB PEPIDs wrote {grown} bytes of log"
    );
    let refused = ps.counter("pdp.refused").await
        + ps.counter("pdp.refused_limit_per_peer").await
        + ps.counter("pdp.refused_limit_total").await;
    eprintln!("{refused} long PEPIDs refused (at OPN or by the connection limits)");
    assert!(
        refused >= 500,
        "only {refused} of 500 long PEPIDs were refused and counted"
    );
    ps.assert_healthy("after 500 OPNs with 60 KB PEPIDs");
    let _enforcer = ps.enforcer("qhostile2");
    ps.wait_enforcer("qhostile2", "connected", "after the long-PEPID attack")
        .await;
}
