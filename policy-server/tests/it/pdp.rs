//! The PDP over real TCP on loopback, with a real SQLite database: a fake
//! enforcer gets exactly its roles' decisions, also after reconnects and a
//! PDP restart; bad peers are refused without disturbing the others.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use qosloop_policy_server::testing::{paper_policy, policed_rule};
use qosloop_schema::cops::{Body, CopsCodec, ErrorCode, Message, PepHello};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

fn two_role_policy() -> qosloop_schema::PolicySet {
    let mut p = paper_policy();
    p.rules
        .push(policed_rule("core-flow", "10.71.1.9", 4056, "core"));
    p
}

fn installs(got: &[Got]) -> Vec<qosloop_schema::Decision> {
    got.iter()
        .filter_map(|g| match g {
            Got::Install(d) => Some(d.clone()),
            _ => None,
        })
        .collect()
}

/// An enforcer `name` of role edge with nothing installed, connected to
/// `addr`; the first decision it was sent.
async fn edge_pep(addr: SocketAddr, name: &str) -> (FakePep, qosloop_schema::Decision) {
    let (pep, got) = FakePep::connect(addr, name, &["edge"], &[]).await;
    let first = installs(&got)[0].clone();
    (pep, first)
}

async fn wait_for<F: std::future::Future<Output = bool>>(mut check: impl FnMut() -> F) {
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("condition not reached");
}

#[tokio::test]
async fn an_enforcer_gets_exactly_its_roles_decisions_across_reconnects_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let url = db_url(&dir);
    let (server, policy_tx) = start(&url, any_loopback_port(), two_role_policy(), 100).await;
    let addr = server.pdp_addr;

    // First connection: nothing installed → one install, for role edge only.
    let (mut pep, got) = FakePep::connect(addr, "pep-edge", &["edge"], &[]).await;
    let d = installs(&got);
    assert_eq!(d.len(), 1, "{got:?}");
    assert_eq!(got.len(), 1, "no removes: {got:?}");
    assert_eq!(d[0].role, "edge");
    assert_eq!(d[0].policy_dn, paper_policy().rules[0].dn);
    assert_eq!(d[0].kind(), qosloop_schema::DecisionKind::Accept);
    let edge = d[0].clone();

    // Its report reaches the database.
    pep.report(&edge).await;
    let store = server.store.clone();
    wait_for(|| {
        let store = store.clone();
        async move { !store.reports("pep-edge").await.unwrap().is_empty() }
    })
    .await;
    assert_eq!(
        store.reports("pep-edge").await.unwrap(),
        vec![(edge.id as i64, edge.version as i64, "installed".to_string())]
    );
    let enforcers = store.enforcers().await.unwrap();
    assert_eq!(enforcers[0].name, "pep-edge");
    assert_eq!(enforcers[0].roles, "edge");

    // A second enforcer with both roles gets both.
    let (_both, got) = FakePep::connect(addr, "pep-both", &["edge", "core"], &[]).await;
    let mut roles: Vec<String> = installs(&got).into_iter().map(|d| d.role).collect();
    roles.sort();
    assert_eq!(roles, ["core", "edge"]);

    // Reconnect with the decision installed: nothing to change.
    drop(pep);
    let (pep, got) =
        FakePep::connect(addr, "pep-edge", &["edge"], &[(edge.id, edge.version)]).await;
    assert_eq!(got, vec![Got::Nothing]);
    drop(pep);

    // Reconnect with a stale extra decision and an old version: the
    // difference only.
    let (mut pep, got) = FakePep::connect(
        addr,
        "pep-edge",
        &["edge"],
        &[(edge.id, edge.version - 1), (999, 1)],
    )
    .await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got.contains(&Got::Remove(999)));
    assert_eq!(installs(&got)[0].id, edge.id);

    // A policy change is pushed unsolicited: the edge rule goes away.
    let mut p = two_role_policy();
    p.rules.remove(0);
    policy_tx.send(std::sync::Arc::new(p)).unwrap();
    assert_eq!(pep.next_dec().await, vec![Got::Remove(edge.id)]);

    // Put it back, then restart the PDP on the same port and database.
    policy_tx
        .send(std::sync::Arc::new(two_role_policy()))
        .unwrap();
    let back = installs(&pep.next_dec().await);
    assert_eq!(back.len(), 1);
    let edge = back[0].clone();
    drop(pep);
    server.stop().await;
    let (server, _policy_tx) = start(&url, addr, two_role_policy(), 100).await;
    // The enforcer re-synchronises: its decision is the PDP's (restored
    // from the database), so nothing is re-installed.
    let (_pep, got) =
        FakePep::connect(addr, "pep-edge", &["edge"], &[(edge.id, edge.version)]).await;
    assert_eq!(got, vec![Got::Nothing]);
    server.stop().await;
}

async fn expect_cc(stream: TcpStream, code: ErrorCode) {
    let mut wire = Framed::new(stream, CopsCodec::default());
    let m = tokio::time::timeout(WAIT, wire.next())
        .await
        .expect("an answer")
        .expect("a message")
        .expect("well-formed");
    match m.body {
        Body::Cc { error, .. } => assert_eq!(error.code, code as u16, "{error}"),
        other => panic!("expected CC, got {other:?}"),
    }
    // Closed (reset, when the PDP left part of a refused message unread).
    assert!(
        matches!(
            tokio::time::timeout(WAIT, wire.next()).await.unwrap(),
            None | Some(Err(_))
        ),
        "the connection is closed after CC"
    );
}

#[tokio::test]
async fn bad_peers_are_refused_and_others_unaffected() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _tx) = start_paper(&dir).await;
    let addr: SocketAddr = server.pdp_addr;
    let (mut good, _) = FakePep::connect(addr, "good", &["edge"], &[]).await;

    // An unknown client type.
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut wire = Framed::new(stream, CopsCodec::default());
    let mut opn = Message::opn("rsvp", &PepHello::default());
    opn.client_type = 1;
    wire.send(opn).await.unwrap();
    expect_cc(wire.into_inner(), ErrorCode::UnsupportedClientType).await;

    // Garbage.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    expect_cc(stream, ErrorCode::BadMessageFormat).await;

    // A well-formed message that is not OPN.
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut wire = Framed::new(stream, CopsCodec::default());
    wire.send(Message::ka()).await.unwrap();
    expect_cc(wire.into_inner(), ErrorCode::BadMessageFormat).await;

    // OPN without roles.
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut wire = Framed::new(stream, CopsCodec::default());
    wire.send(Message::new(Body::Opn {
        pep_id: "anon".into(),
        client_si: None,
        last_pdp: None,
    }))
    .await
    .unwrap();
    expect_cc(wire.into_inner(), ErrorCode::MandatoryClientSiMissing).await;

    // An enforcer of the other direction than its role's device entry
    // (the paper's edge router enforces egress).
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut wire = Framed::new(stream, CopsCodec::default());
    let ingress = PepHello {
        roles: vec!["edge".into()],
        direction: Some(qosloop_schema::Direction::Ingress),
        ..PepHello::default()
    };
    wire.send(Message::opn("wrong-way", &ingress))
        .await
        .unwrap();
    expect_cc(wire.into_inner(), ErrorCode::UnableToProcess).await;

    // A peer that never sends OPN (the test's open timeout is 300 ms).
    let stream = TcpStream::connect(addr).await.unwrap();
    expect_cc(stream, ErrorCode::CommunicationFailure).await;

    // A header announcing a huge message.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(&[0x10, 0x06, 0x80, 0x71, 0x7f, 0, 0, 0])
        .await
        .unwrap();
    expect_cc(stream, ErrorCode::BadMessageFormat).await;

    // A malformed message after a good OPN closes that session only.
    let (bad, _) = FakePep::connect(addr, "bad", &["edge"], &[]).await;
    let mut raw = bad.wire.into_inner();
    raw.write_all(&[0x10, 0x03, 0x80, 0x71, 0, 0, 0, 0x0c, 0, 2, 1, 1])
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, raw.read_to_end(&mut buf)).await;
    assert!(!buf.is_empty(), "a CC before the close");

    // The good enforcer still talks: KA is echoed.
    good.wire.send(Message::ka()).await.unwrap();
    let m = good.next().await;
    assert!(matches!(m.body, Body::Ka) && m.solicited, "{m:?}");
    assert!(
        server
            .pdp_stats
            .refused
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 6
    );
    server.stop().await;
}

// ---------------------------------------------------------------------
// Hostile and careless PEPs (issue 11, items 4, 5 and 6).

use qosloop_policy_server::server::ServerHandle;
use qosloop_policy_server::PdpConfig;
use qosloop_schema::cops::PepState;
use qosloop_schema::{EnforcementReport, ReportOutcome};
use std::sync::atomic::Ordering;
use tokio::net::TcpSocket;

/// A server with the paper's loop and SQLite in `dir`, its PDP configured
/// by `pdp`.
async fn start_with(
    dir: &tempfile::TempDir,
    policy: qosloop_schema::PolicySet,
    pdp: PdpConfig,
) -> (
    ServerHandle,
    tokio::sync::watch::Sender<std::sync::Arc<qosloop_schema::PolicySet>>,
) {
    start_with_pdp(&db_url(dir), any_loopback_port(), policy, pdp, 100).await
}

/// Polls `check` every 25 ms for at most 30 s.
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut check: impl FnMut() -> F,
) {
    for _ in 0..1200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("never: {what}");
}

async fn state_of(server: &ServerHandle, name: &str) -> Option<String> {
    server
        .store
        .enforcers()
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.name == name)
        .map(|e| e.state)
}

fn hello(roles: &[&str]) -> PepHello {
    PepHello {
        roles: roles.iter().map(|r| r.to_string()).collect(),
        ..PepHello::default()
    }
}

/// Connects from `source` and sends OPN.
async fn open_from(
    source: &str,
    addr: SocketAddr,
    pep_id: &str,
    roles: &[&str],
) -> Framed<TcpStream, CopsCodec> {
    let mut wire = Framed::new(connect_from(source, addr).await, CopsCodec::default());
    wire.send(Message::opn(pep_id, &hello(roles)))
        .await
        .unwrap();
    wire
}

#[tokio::test]
async fn an_impostor_with_a_live_pepid_is_refused_and_leaves_the_real_session_alone() {
    // Issue 11 item 5: a second OPN with a connected enforcer's PEPID took
    // its name, got its decisions, and on closing marked it disconnected.
    let dir = tempfile::tempdir().unwrap();
    let (server, _tx) = start_paper(&dir).await;
    let addr = server.pdp_addr;
    let (mut real, decision) = edge_pep(addr, "pep-edge").await;
    eventually("the real enforcer is stored", || async {
        state_of(&server, "pep-edge").await.as_deref() == Some("connected")
    })
    .await;

    let impostor = open_from("127.0.0.2", addr, "pep-edge", &["edge"]).await;
    expect_cc(impostor.into_inner(), ErrorCode::UnableToProcess).await;
    // Events are written in order: once a later enforcer is stored, the
    // impostor's would have been too.
    let (_later, _) = FakePep::connect(addr, "pep-later", &["edge"], &[]).await;
    eventually("the later enforcer is stored", || async {
        state_of(&server, "pep-later").await.is_some()
    })
    .await;
    assert_eq!(
        state_of(&server, "pep-edge").await.as_deref(),
        Some("connected")
    );
    assert_eq!(
        server
            .pdp_stats
            .refused_pep_id_in_use
            .load(Ordering::Relaxed),
        1
    );

    // The real session is untouched: KA echoed, reports stored as its own.
    real.wire.send(Message::ka()).await.unwrap();
    assert!(matches!(real.next().await.body, Body::Ka));
    real.report(&decision).await;
    let store = server.store.clone();
    eventually("the real report is stored", || {
        let store = store.clone();
        async move { store.reports("pep-edge").await.unwrap().len() == 1 }
    })
    .await;

    // Once the real enforcer has gone, its name is free again.
    drop(real);
    eventually("the real enforcer is disconnected", || async {
        state_of(&server, "pep-edge").await.as_deref() == Some("disconnected")
    })
    .await;
    let (_again, got) = FakePep::connect(addr, "pep-edge", &["edge"], &[]).await;
    assert_eq!(installs(&got).len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn a_pep_that_stops_reading_is_closed_by_the_write_timeout() {
    // Issue 11 item 4: a PEP that stops reading was never closed; its
    // session (and descriptor) stayed forever.
    let dir = tempfile::tempdir().unwrap();
    let mut policy = paper_policy();
    policy.rules.extend((0..400).map(|i| {
        policed_rule(
            &format!("r{i}"),
            &format!("10.72.{}.{}", i / 250, i % 250 + 1),
            4000,
            "edge",
        )
    }));
    let pdp = PdpConfig {
        write_timeout: Duration::from_millis(300),
        ..PdpConfig::default()
    };
    let (server, _tx) = start_with(&dir, policy, pdp).await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.pdp_addr).await.unwrap();
    let mut wire = Framed::new(stream, CopsCodec::default());
    wire.send(Message::opn("sleepy", &hello(&["edge"])))
        .await
        .unwrap();
    for _ in 0..2 {
        tokio::time::timeout(WAIT, wire.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    eventually("the PEP is stored", || async {
        state_of(&server, "sleepy").await.as_deref() == Some("connected")
    })
    .await;
    // Each REQ asks for every decision again (~250 KB); the PEP reads none.
    let state = PepState {
        roles: vec!["edge".into()],
        installed: vec![],
    };
    for _ in 0..64 {
        let sent = tokio::time::timeout(
            Duration::from_secs(1),
            wire.send(Message::req(
                qosloop_schema::cops::Handle::from_u32(1),
                &state,
            )),
        )
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            break;
        }
    }
    eventually("the PDP lets the PEP go", || async {
        state_of(&server, "sleepy").await.as_deref() == Some("disconnected")
    })
    .await;
    assert!(server.pdp_stats.write_timeouts.load(Ordering::Relaxed) >= 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_flood_loses_no_real_reports_and_no_state_events() {
    // Issue 11 item 5: an RPT flood from other PEPs lost 15 of 20 real
    // reports and the Disconnected event, silently.
    let dir = tempfile::tempdir().unwrap();
    let (server, _tx) = start_paper(&dir).await;
    let addr = server.pdp_addr;
    let (mut real, decision) = edge_pep(addr, "real").await;

    let flood_report = Message::rpt(
        qosloop_schema::cops::Handle::from_u32(9),
        &EnforcementReport {
            decision_id: 77,
            version: 1,
            outcome: ReportOutcome::Installed,
            reconfig_ns: 1,
            at_ns: 1,
        },
    );
    // Eight PEPs send 1,500 reports each, then 1,500 more while the real
    // enforcer reports and leaves.
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(9));
    let mut flooders = Vec::new();
    for i in 0..8 {
        let m = flood_report.clone();
        let barrier = barrier.clone();
        flooders.push(tokio::spawn(async move {
            let mut wire = open_from("127.0.0.2", addr, &format!("flood-{i}"), &["edge"]).await;
            for _ in 0..2 {
                let _ = tokio::time::timeout(WAIT, wire.next()).await;
            }
            for half in 0..2 {
                for _ in 0..1500 {
                    match tokio::time::timeout(Duration::from_secs(5), wire.feed(m.clone())).await {
                        Ok(Ok(())) => {}
                        _ => break,
                    }
                }
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    SinkExt::<Message>::flush(&mut wire),
                )
                .await;
                if half == 0 {
                    barrier.wait().await;
                }
            }
            wire
        }));
    }
    barrier.wait().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..20 {
        real.report(&decision).await;
    }
    drop(real);
    let mut held = Vec::new();
    for f in flooders {
        held.push(f.await.unwrap());
    }
    let store = server.store.clone();
    eventually("all 20 real reports are stored", || {
        let store = store.clone();
        async move { store.reports("real").await.unwrap().len() == 20 }
    })
    .await;
    eventually("the real enforcer is disconnected", || async {
        state_of(&server, "real").await.as_deref() == Some("disconnected")
    })
    .await;
    drop(held);
    server.stop().await;
}

#[tokio::test]
async fn oversized_or_unprintable_pepids_and_roles_are_refused() {
    // Issue 11 item 6: 60 KB PEPIDs were accepted, stored, served by
    // /api/enforcers and logged.
    let dir = tempfile::tempdir().unwrap();
    let (server, _tx) = start_paper(&dir).await;
    let addr = server.pdp_addr;
    let too_many: Vec<String> = (0..65).map(|i| format!("r{i}")).collect();
    let too_many: Vec<&str> = too_many.iter().map(String::as_str).collect();
    let long_role = "r".repeat(65);
    let cases: Vec<(String, Vec<&str>)> = vec![
        ("p".repeat(60_000), vec!["edge"]),
        ("p".repeat(256), vec!["edge"]),
        ("tab\there".into(), vec!["edge"]),
        ("many-roles".into(), too_many),
        ("long-role".into(), vec![long_role.as_str()]),
        ("comma-role".into(), vec!["edge,core"]),
    ];
    for (pep_id, roles) in &cases {
        let wire = open_from("127.0.0.1", addr, pep_id, roles).await;
        expect_cc(wire.into_inner(), ErrorCode::BadMessageFormat).await;
    }
    assert_eq!(
        server
            .pdp_stats
            .refused_bad_identity
            .load(Ordering::Relaxed),
        cases.len() as u64 - 1,
        "the 60 KB OPN is refused as too long before it is read"
    );
    // 255 printable bytes are a valid name.
    let name = "p".repeat(255);
    let (_pep, got) = FakePep::connect(addr, &name, &["edge"], &[]).await;
    assert_eq!(installs(&got).len(), 1);
    eventually("the long but valid name is stored", || async {
        state_of(&server, &name).await.is_some()
    })
    .await;
    let rows = server.store.enforcers().await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    server.stop().await;
}

#[tokio::test]
async fn failure_reasons_are_cut_and_disconnected_enforcers_are_capped() {
    // Issue 11 item 6: report text and enforcer rows grew with what peers
    // sent (every enforcer restart is a new PEPID).
    let dir = tempfile::tempdir().unwrap();
    reasons_cut_and_enforcers_capped(&db_url(&dir)).await;
}

#[tokio::test]
async fn failure_reasons_are_cut_and_disconnected_enforcers_are_capped_on_postgres() {
    use qosloop_testkit::harness::Postgres;
    qosloop_testkit::need!(Postgres::available());
    let pg = tokio::task::spawn_blocking(Postgres::start)
        .await
        .unwrap()
        .unwrap();
    reasons_cut_and_enforcers_capped(&pg.url()).await;
}

async fn reasons_cut_and_enforcers_capped(url: &str) {
    let (server, _tx) = start(url, any_loopback_port(), paper_policy(), 100).await;
    let addr = server.pdp_addr;
    let (mut pep, d) = edge_pep(addr, "failing").await;
    let report = EnforcementReport {
        decision_id: d.id,
        version: d.version,
        outcome: ReportOutcome::Failed {
            reason: "é".repeat(20_000),
        },
        reconfig_ns: 0,
        at_ns: 1,
    };
    pep.wire
        .send(Message::rpt(pep.handle.clone(), &report))
        .await
        .unwrap();
    let store = server.store.clone();
    eventually("the failure is stored", || {
        let store = store.clone();
        async move { store.reports("failing").await.unwrap().len() == 1 }
    })
    .await;
    let q = "SELECT reason FROM enforcement_reports WHERE enforcer = 'failing'";
    let (reason,): (String,) = match server.store.db() {
        qosloop_store::Db::Sqlite(pool) => sqlx::query_as(q).fetch_one(pool).await,
        qosloop_store::Db::Postgres(pool) => sqlx::query_as(q).fetch_one(pool).await,
    }
    .unwrap();
    assert!(
        reason.len() <= qosloop_policy_server::pdp::MAX_REPORT_REASON + 3,
        "{} bytes stored",
        reason.len()
    );
    assert!(reason.starts_with("éé") && reason.ends_with('…'));
    assert_eq!(
        server.pdp_stats.reports_truncated.load(Ordering::Relaxed),
        1
    );
    drop(pep);

    // 140 enforcers come and go (as restarts do: a new PEPID each time).
    let cap = qosloop_policy_server::server::MAX_DISCONNECTED_ENFORCERS as usize;
    for i in 0..cap + 12 {
        let mut wire = open_from("127.0.0.1", addr, &format!("restart-{i}"), &["edge"]).await;
        let cat = tokio::time::timeout(WAIT, wire.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(matches!(cat.body, Body::Cat { .. }), "{cat:?}");
    }
    eventually("old enforcers are forgotten", || async {
        server.pdp_stats.enforcers_pruned.load(Ordering::Relaxed) >= 13
    })
    .await;
    let rows = server.store.enforcers().await.unwrap();
    assert_eq!(rows.len(), cap, "kept {} rows", rows.len());
    assert!(!rows
        .iter()
        .any(|r| r.name == "failing" || r.name == "restart-0"));
    server.stop().await;
}

#[tokio::test]
async fn a_peer_over_its_connection_limit_is_closed_and_others_get_in() {
    // Issue 11 item 4: no connection limit on the PDP port.
    let dir = tempfile::tempdir().unwrap();
    let pdp = PdpConfig {
        open_timeout: Duration::from_secs(60),
        limits: qosloop_schema::guard::ConnLimits {
            per_peer: 4,
            total: 8,
        },
        ..PdpConfig::default()
    };
    let (server, _tx) = start_with(&dir, paper_policy(), pdp).await;
    let addr = server.pdp_addr;
    let closed_at_once = |mut s: TcpStream| async move {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(WAIT, s.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    };
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_from("127.0.0.2", addr).await);
    }
    assert!(closed_at_once(connect_from("127.0.0.2", addr).await).await);
    let (_pep, got) = FakePep::connect(addr, "pep-edge", &["edge"], &[]).await;
    assert_eq!(installs(&got).len(), 1);
    for _ in 0..3 {
        held.push(connect_from("127.0.0.3", addr).await);
    }
    eventually("eight connections are open", || async {
        server.pdp_limiter.stats().open == 8
    })
    .await;
    assert!(closed_at_once(connect_from("127.0.0.4", addr).await).await);
    let c = server.pdp_counters();
    assert_eq!(
        (c.refused_limit_per_peer, c.refused_limit_total),
        (1, 1),
        "{c:?}"
    );
    drop(held);
    server.stop().await;
}

#[tokio::test]
async fn under_mutual_tls_a_pepid_other_than_the_certificates_is_refused() {
    // Issue 11 item 5: with TLS, an enforcer is the name in its
    // certificate; any PEP could claim any name before.
    use qosloop_runtime::tls;
    qosloop_testkit::need!(qosloop_testkit::harness::require_binary(
        "openssl", "openssl"
    ));
    let dir = tempfile::tempdir().unwrap();
    qosloop_testkit::harness::test_pki(dir.path()).unwrap();
    let p = |f: &str| dir.path().join(f);
    let pdp = PdpConfig {
        tls: Some(
            tls::server_config_with(&p("server.pem"), &p("server.key"), Some(&p("ca.pem")))
                .unwrap(),
        ),
        ..PdpConfig::default()
    };
    let (server, _tx) = start_with(&dir, paper_policy(), pdp).await;
    let addr = server.pdp_addr;
    let connector = tokio_rustls::TlsConnector::from(
        tls::client_config_with(&p("ca.pem"), Some((&p("client.pem"), &p("client.key")))).unwrap(),
    );
    let open = |pep_id: &'static str| {
        let connector = connector.clone();
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = tls::server_name(&addr.to_string()).unwrap();
            let stream = connector.connect(name, tcp).await.unwrap();
            let mut wire = Framed::new(stream, CopsCodec::default());
            wire.send(Message::opn(pep_id, &hello(&["edge"])))
                .await
                .unwrap();
            let first = tokio::time::timeout(WAIT, wire.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            (wire, first)
        }
    };
    let (_, first) = open("qosloop-enforcer/eth1/42").await;
    match first.body {
        Body::Cc { error, .. } => assert_eq!(
            error.code,
            ErrorCode::AuthenticationFailure as u16,
            "{error}"
        ),
        other => panic!("expected CC, got {other:?}"),
    }
    let (_good, first) = open("qosloop client").await;
    assert!(matches!(first.body, Body::Cat { .. }), "{first:?}");
    assert_eq!(
        server
            .pdp_stats
            .refused_certificate_mismatch
            .load(Ordering::Relaxed),
        1
    );
    // The enforcer derives the same name from its certificate file.
    let pem = std::fs::read_to_string(p("client.pem")).unwrap();
    let der = pem_body(&pem);
    assert_eq!(
        qosloop_runtime::tls::certificate_identity(&der).as_deref(),
        Some("qosloop client")
    );
    server.stop().await;
}

/// The DER of the first PEM block.
fn pem_body(pem: &str) -> Vec<u8> {
    use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer};
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec()
}
