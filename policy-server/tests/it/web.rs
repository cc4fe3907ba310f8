//! The web API and page over real HTTP on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;
use qosloop_policy_server::testing::paper_policy;
use qosloop_policy_server::web::WebConfig;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn every_endpoint_answers_with_what_the_server_knows() {
    let (server, web, _dir) = web_with(WebConfig::default()).await;
    let (_pep, _) = FakePep::connect(server.pdp_addr, "edge-router", &["edge"], &[]).await;
    insert_flow(server.store.db(), "10.71.1.3", "10.71.2.2", 5001, 50_000, 1).await;
    // Let the loop store a few intervals of rates and the enforcer row.
    for _ in 0..100 {
        let (_, _, body) = get(web.local_addr, "/api/rates", "*/*").await;
        let (_, _, enf) = get(web.local_addr, "/api/enforcers", "*/*").await;
        if body.contains("edge-ingress") && enf.contains("edge-router") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let (status, _, body) = get(web.local_addr, "/api/rates", "*/*").await;
    assert_eq!(status, 200);
    let rates: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(rates
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["name"] == "edge-ingress"));

    let (_, _, body) = get(web.local_addr, "/api/decisions", "*/*").await;
    let d: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(d["current"][0]["role"], "edge");
    assert_eq!(d["current"][0]["out_of_profile"]["action"], "accept");
    assert_eq!(d["recent"][0]["kind"], "accept");

    let (_, _, body) = get(web.local_addr, "/api/policies", "*/*").await;
    let p: qosloop_schema::PolicySet = serde_json::from_str(&body).unwrap();
    assert_eq!(p, paper_policy());

    let (_, _, body) = get(web.local_addr, "/api/enforcers", "*/*").await;
    assert!(
        body.contains("\"edge-router\"") && body.contains("connected"),
        "{body}"
    );

    let (_, _, body) = get(web.local_addr, "/api/flows", "*/*").await;
    let flows: Vec<qosloop_schema::FlowRecord> = serde_json::from_str(&body).unwrap();
    assert_eq!(flows[0].bytes, 50_000);

    let (status, _, body) = get(web.local_addr, "/", "*/*").await;
    assert!(status == 200 && body.contains("/api/decisions"));
    let (status, _, _) = get(web.local_addr, "/nothing", "*/*").await;
    assert_eq!(status, 404);
    stop(server, web).await;
}

// ---------------------------------------------------------------------
// Clients that hold connections (issue 11, item 4) and tasks that end
// (item 10).

use qosloop_policy_server::web::WebHandle;

async fn web_with(
    config: WebConfig,
) -> (
    qosloop_policy_server::ServerHandle,
    WebHandle,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let (server, policy_tx) = start_paper(&dir).await;
    let web = qosloop_policy_server::web::serve(
        any_loopback_port(),
        &server,
        policy_tx.subscribe(),
        config,
    )
    .await
    .unwrap();
    (server, web, dir)
}

/// Stops the server, then waits for its web task to end cleanly.
async fn stop(server: qosloop_policy_server::ServerHandle, web: WebHandle) {
    server.stop().await;
    web.task.await.unwrap();
}

/// Whether the server closes `s` (EOF or reset) before `WAIT`, reading
/// and discarding whatever it says first.
async fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(WAIT, read_all).await.is_ok()
}

async fn status(addr: SocketAddr) -> serde_json::Value {
    let (_, _, body) = get(addr, "/api/status", "*/*").await;
    serde_json::from_str(&body).unwrap()
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_let_go() {
    // axum::serve has no header-read timeout: a client sending half a
    // request (or one byte now and then) held its connection forever.
    let (server, web, _dir) = web_with(WebConfig {
        header_timeout: std::time::Duration::from_millis(300),
        ..WebConfig::default()
    })
    .await;
    let mut half = TcpStream::connect(web.local_addr).await.unwrap();
    half.write_all(b"GET /api/rates HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(closed_by_server(&mut half).await, "a half request is held");

    // A byte every 100 ms: progress, but no complete header.
    let mut slow = TcpStream::connect(web.local_addr).await.unwrap();
    let mut closed = false;
    for b in b"GET /api/rates HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
        if slow.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        closed || closed_by_server(&mut slow).await,
        "a slow header is held"
    );
    let s = status(web.local_addr).await;
    assert!(s["http"]["timeouts"].as_u64().unwrap() >= 2, "{s}");
    stop(server, web).await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    // Keep-alive connections that said nothing more were held forever.
    let (server, web, _dir) = web_with(WebConfig {
        idle_timeout: std::time::Duration::from_millis(300),
        ..WebConfig::default()
    })
    .await;
    let mut s = TcpStream::connect(web.local_addr).await.unwrap();
    s.write_all(b"GET /api/policies HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    s.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    assert!(closed_by_server(&mut s).await, "an idle connection is held");
    stop(server, web).await;
}

#[tokio::test]
async fn http_connections_are_limited_per_peer_and_others_get_in() {
    // No connection limit: one address could take every descriptor.
    let (server, web, _dir) = web_with(WebConfig {
        limits: qosloop_schema::guard::ConnLimits {
            per_peer: 2,
            total: 16,
        },
        ..WebConfig::default()
    })
    .await;
    let from = || connect_from("127.0.0.2", web.local_addr);
    let _held = [from().await, from().await];
    let mut third = from().await;
    assert!(closed_by_server(&mut third).await);
    let (code, _, _) = get(web.local_addr, "/api/policies", "*/*").await;
    assert_eq!(code, 200);
    let s = status(web.local_addr).await;
    assert_eq!(s["http"]["refused_limit_per_peer"], 1, "{s}");
    assert!(s["pdp"]["refused"].is_u64(), "{s}");
    stop(server, web).await;
}

#[tokio::test]
async fn a_task_that_ends_before_shutdown_is_a_failure() {
    // The daemon logged "a server task ended" and exited 0 when its PDP or
    // web task ended.
    for (task, expect) in [
        (tokio::spawn(async {}), "the web server ended"),
        (
            tokio::spawn(async { panic!("boom") }),
            "the web server failed",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (server, _tx) = start_paper(&dir).await;
        let web = WebHandle {
            local_addr: "127.0.0.1:9".parse().unwrap(),
            task,
            metrics: std::sync::Arc::new(server.metrics_source()),
            events: qosloop_policy_server::console::events::EventBus::new(1, 1),
        };
        let ended = server
            .run_until(Some(web), std::future::pending(), std::future::pending())
            .await
            .unwrap_err();
        assert!(ended.contains(expect), "{ended}");
    }
    // Another task (the policy watcher in the daemon) ending is one too;
    // a requested shutdown is not.
    let dir = tempfile::tempdir().unwrap();
    let (server, _tx) = start_paper(&dir).await;
    let ended = server
        .run_until(
            None,
            async { "the watcher ended".to_owned() },
            std::future::pending(),
        )
        .await
        .unwrap_err();
    assert!(ended.contains("the watcher ended"), "{ended}");
    // A second server on the same database.
    let (server, _tx) = start_paper(&dir).await;
    assert_eq!(
        server
            .run_until(None, std::future::pending(), async {})
            .await,
        Ok(())
    );
}
