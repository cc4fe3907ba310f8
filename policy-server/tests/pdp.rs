//! The PDP over real TCP on loopback, with a real SQLite database: a fake
//! enforcer gets exactly its roles' decisions, also after reconnects and a
//! PDP restart; bad peers are refused without disturbing the others.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

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
    let url = format!("sqlite://{}", dir.path().join("q.db").display());
    let (server, policy_tx) =
        start(&url, "127.0.0.1:0".parse().unwrap(), two_role_policy(), 100).await;
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
    assert!(
        tokio::time::timeout(WAIT, wire.next())
            .await
            .unwrap()
            .is_none(),
        "the connection is closed after CC"
    );
}

#[tokio::test]
async fn bad_peers_are_refused_and_others_unaffected() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("q.db").display());
    let (server, _tx) = start(&url, "127.0.0.1:0".parse().unwrap(), paper_policy(), 100).await;
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
