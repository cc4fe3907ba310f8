//! The enforcer daemon as a COPS PEP against a PDP speaking the same codec
//! (`qosloop_schema::cops`), in a namespace the test creates: failover past
//! a dead PDP, OPN with roles, REQ/SSC after SSQ, DEC install/remove applied
//! in the kernel with one RPT each (failure with the reason), fail-static
//! when the PDP goes away, resynchronisation on reconnect.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures_util::{SinkExt, StreamExt};
use qosloop_schema::cops::{
    Body, CopsCodec, DecisionEntry, DecisionRef, Handle, Message, PepHello, PepState,
};
use qosloop_schema::{
    Decision, DecisionReason, Dscp, EnforcementReport, FlowSpec, Kbps, OutOfProfileAction,
    PortRange, ReportOutcome, TrafficProfile,
};
use qosloop_testkit::harness::{prerequisite, require_binary, require_root, Netns, VethPair};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

type Wire = Framed<TcpStream, CopsCodec>;

fn decision(id: u64, version: u64, rate: u64, action: OutOfProfileAction) -> Decision {
    Decision {
        id,
        version,
        role: "edge".into(),
        policy_dn: "cn=gold".into(),
        flow: FlowSpec {
            src: None,
            dst: Some("10.2.0.2".parse().unwrap()),
            proto: Some(17),
            src_ports: None,
            dst_ports: Some(PortRange::single(5000 + id as u16)),
            user: None,
        },
        profile: TrafficProfile {
            rate: Kbps(rate),
            burst_bytes: 15_000,
        },
        in_profile_dscp: Some(Dscp::CS6),
        out_of_profile: action,
        reason: DecisionReason {
            rate_kbps: 0.0,
            avg_rate_kbps: 0.0,
            link: "edge".into(),
            link_load_kbps: 0.0,
            band: "low".into(),
        },
        issued_ns: 0,
    }
}

async fn next(wire: &mut Wire) -> Message {
    tokio::time::timeout(Duration::from_secs(10), wire.next())
        .await
        .expect("PEP silent for 10 s")
        .expect("PEP closed")
        .expect("bad message from PEP")
}

/// Next message that is not a keepalive or a periodic accounting RPT.
async fn next_real(wire: &mut Wire) -> Message {
    loop {
        let m = next(wire).await;
        let accounting = matches!(m.accounting(), Ok(Some(_)));
        if !matches!(m.body, Body::Ka) && !accounting {
            return m;
        }
    }
}

/// The next accounting RPT (the kernel's counters, every 5 s).
async fn next_accounting(wire: &mut Wire) -> qosloop_schema::AccountingReport {
    loop {
        if let Some(a) = next(wire).await.accounting().unwrap() {
            return a;
        }
    }
}

async fn accept_session(listener: &TcpListener) -> (Wire, PepHello, PepState) {
    let (sock, _) = tokio::time::timeout(Duration::from_secs(15), listener.accept())
        .await
        .expect("no PEP connected")
        .unwrap();
    let mut wire = Framed::new(sock, CopsCodec::default());
    let opn = next_real(&mut wire).await;
    let Body::Opn { client_si, .. } = &opn.body else {
        panic!("expected OPN, got {opn:?}")
    };
    let hello = PepHello::from_client_si(client_si.as_ref().unwrap()).unwrap();
    wire.send(Message::cat(4)).await.unwrap();
    wire.send(Message::ssq()).await.unwrap();
    let req = next_real(&mut wire).await;
    let Body::Req { client_si, .. } = &req.body else {
        panic!("expected REQ, got {req:?}")
    };
    let state = PepState::from_client_si(&client_si[0]).unwrap();
    let ssc = next_real(&mut wire).await;
    assert!(matches!(ssc.body, Body::Ssc { .. }), "{ssc:?}");
    (wire, hello, state)
}

async fn reports(wire: &mut Wire, n: usize) -> Vec<EnforcementReport> {
    let mut out = Vec::new();
    while out.len() < n {
        let m = next_real(wire).await;
        out.push(m.report().unwrap().expect("RPT"));
    }
    out
}

#[test]
fn pep_installs_reports_fails_static_and_resyncs() {
    if prerequisite(require_root("programs HTB and nftables in a namespace")).is_none()
        || prerequisite(require_binary("nft", "nftables")).is_none()
    {
        return;
    }
    let router = Netns::create("pep").unwrap();
    let peer = Netns::create("peer").unwrap();
    let link = VethPair::connect(&router, "10.2.0.1/24", &peer, "10.2.0.2/24").unwrap();
    let interface = link.a_if.clone();
    let nft = |router: &Netns| {
        let out = router
            .command("nft")
            .args(["list", "ruleset"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The PDP lives in the router namespace, on its loopback.
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let (dead_tx, dead_rx) = std::sync::mpsc::channel();
    let (step_tx, step_rx) = std::sync::mpsc::channel::<&'static str>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let pdp = router
        .spawn_in(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                // A port nobody listens on: the PEP must fail over past it.
                let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                dead_tx.send(dead.local_addr().unwrap().port()).unwrap();
                drop(dead);
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                port_tx.send(listener.local_addr().unwrap().port()).unwrap();
                let (mut wire, hello, state) = accept_session(&listener).await;
                assert_eq!(hello.roles, vec!["edge".to_owned()]);
                assert!(state.installed.is_empty());
                let h = Handle::from_u32(1);
                let good = decision(
                    1,
                    1,
                    1000,
                    OutOfProfileAction::Accept {
                        shape: Some(Kbps(875)),
                    },
                );
                let too_fast = decision(2, 1, 50_000, OutOfProfileAction::Drop);
                let mut m = Message::dec_install(h.clone(), [&good, &too_fast]);
                m.solicited = true;
                wire.send(m).await.unwrap();
                let r = reports(&mut wire, 2).await;
                assert_eq!(
                    (r[0].decision_id, &r[0].outcome),
                    (1, &ReportOutcome::Installed)
                );
                assert!(r[0].reconfig_ns > 0);
                match &r[1].outcome {
                    ReportOutcome::Failed { reason } => {
                        assert!(reason.contains("above the capacity"), "{reason}")
                    }
                    o => panic!("decision 2 should fail, got {o:?}"),
                }
                // An unsolicited change: out of profile is now dropped.
                let dropped = decision(1, 2, 1000, OutOfProfileAction::Drop);
                wire.send(Message::dec_install(h.clone(), [&dropped]))
                    .await
                    .unwrap();
                let r = reports(&mut wire, 1).await;
                assert_eq!(
                    (r[0].version, &r[0].outcome),
                    (2, &ReportOutcome::Installed)
                );
                // The kernel's counters follow, unsolicited: the decision
                // in force, as read from the kernel (none counted yet).
                let a = loop {
                    let a = next_accounting(&mut wire).await;
                    if a.decisions.first().is_some_and(|d| d.version == 2) {
                        break a;
                    }
                };
                assert_eq!(a.decisions.len(), 1, "{a:?}");
                assert_eq!(a.decisions[0].decision_id, 1);
                assert_eq!(a.decisions[0].kind, qosloop_schema::DecisionKind::Drop);
                assert_eq!(a.omitted, 0);
                assert!(a.at_ns > 0);
                // The HTB classes' statistics, by handle: the root class
                // (under the qdisc), the default class, the group's.
                let ids: Vec<(&str, &str)> = a
                    .classes
                    .iter()
                    .map(|c| (c.classid.as_str(), c.parent.as_str()))
                    .collect();
                assert!(
                    ids.starts_with(&[("e5:1", "root"), ("e5:2", "e5:1")]),
                    "{ids:?}"
                );
                assert!(ids.contains(&("e500:1", "root")), "{ids:?}");
                assert_eq!(a.classes_omitted, 0);
                step_tx.send("installed").unwrap();
                go_rx.recv().unwrap();
                // The PDP goes away: the PEP must keep its decisions.
                drop(wire);
                step_tx.send("closed").unwrap();
                go_rx.recv().unwrap();
                // It comes back: the PEP resynchronises and gets the removal.
                let (mut wire, _, state) = accept_session(&listener).await;
                assert_eq!(state.installed.len(), 1);
                assert_eq!((state.installed[0].id, state.installed[0].version), (1, 2));
                // One DEC with several entries is applied as one change.
                let three = decision(3, 1, 500, OutOfProfileAction::Drop);
                let four = decision(4, 1, 500, OutOfProfileAction::Accept { shape: None });
                let mut m = Message::dec(
                    h.clone(),
                    vec![
                        DecisionEntry::remove(DecisionRef { id: 1, version: 2 }),
                        DecisionEntry::install(&three),
                        DecisionEntry::install(&four),
                    ],
                );
                m.solicited = true;
                wire.send(m).await.unwrap();
                let mut r = reports(&mut wire, 3).await;
                r.sort_by_key(|r| r.decision_id);
                assert_eq!(
                    (r[0].decision_id, &r[0].outcome),
                    (1, &ReportOutcome::Removed)
                );
                assert_eq!(
                    (r[1].decision_id, &r[1].outcome),
                    (3, &ReportOutcome::Installed)
                );
                assert_eq!(
                    (r[2].decision_id, &r[2].outcome),
                    (4, &ReportOutcome::Installed)
                );
                step_tx.send("removed").unwrap();
                go_rx.recv().unwrap();
            })
        })
        .unwrap();
    let dead = dead_rx.recv().unwrap();
    let port = port_rx.recv().unwrap();
    let mut daemon = router
        .command(env!("CARGO_BIN_EXE_qosloop-enforcer"))
        .args([
            "--interface",
            &interface,
            "--capacity",
            "10mbit",
            "--roles",
            "edge",
        ])
        .args(["--pdp", &format!("127.0.0.1:{dead},127.0.0.1:{port}")])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let wait = |what: &str| {
        let got = step_rx.recv_timeout(Duration::from_secs(30));
        assert_eq!(got.ok(), Some(what), "PDP did not reach step {what:?}");
    };
    wait("installed");
    let rules = nft(&router);
    assert!(
        rules.contains("jump d1") && rules.contains("drop comment \"out\""),
        "{rules}"
    );
    assert!(!rules.contains("jump d2"), "{rules}");
    go_tx.send(()).unwrap();
    wait("closed");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        nft(&router).contains("jump d1"),
        "fail-static keeps the decision"
    );
    let status = router
        .command(env!("CARGO_BIN_EXE_qosloop-enforcer"))
        .args(["--interface", &interface, "status", "--json"])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["decisions"].as_array().unwrap().len(), 1);
    assert_eq!(status["daemon"]["mode"], "fail-static", "{status}");
    go_tx.send(()).unwrap();
    wait("removed");
    let rules = nft(&router);
    assert!(
        !rules.contains("jump d1") && rules.contains("jump d3") && rules.contains("jump d4"),
        "{rules}"
    );
    go_tx.send(()).unwrap();
    pdp.join().unwrap().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let code = daemon.wait().unwrap();
    assert!(code.success(), "{code:?}");
    let out = router
        .command(env!("CARGO_BIN_EXE_qosloop-enforcer"))
        .args(["--interface", &interface, "--cleanup"])
        .output()
        .unwrap();
    assert!(out.status.success());
}
