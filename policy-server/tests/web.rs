//! The web API and page over real HTTP on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use qosloop_policy_server::testing::paper_policy;
use qosloop_policy_server::web::WebConfig;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

#[tokio::test]
async fn every_endpoint_answers_with_what_the_server_knows() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("q.db").display());
    let (server, policy_tx) =
        start(&url, "127.0.0.1:0".parse().unwrap(), paper_policy(), 100).await;
    let web = qosloop_policy_server::web::serve(
        "127.0.0.1:0".parse().unwrap(),
        &server,
        policy_tx.subscribe(),
        WebConfig::default(),
    )
    .await
    .unwrap();
    let (_pep, _) = FakePep::connect(server.pdp_addr, "edge-router", &["edge"], &[]).await;
    insert_flow(server.store.db(), "10.71.1.3", "10.71.2.2", 5001, 50_000, 1).await;
    // Let the loop store a few intervals of rates and the enforcer row.
    for _ in 0..100 {
        let (_, body) = http_get(web.local_addr, "/api/rates").await;
        let (_, enf) = http_get(web.local_addr, "/api/enforcers").await;
        if body.contains("edge-ingress") && enf.contains("edge-router") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let (status, body) = http_get(web.local_addr, "/api/rates").await;
    assert!(status.contains("200"), "{status}");
    let rates: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(rates
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["name"] == "edge-ingress"));

    let (_, body) = http_get(web.local_addr, "/api/decisions").await;
    let d: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(d["current"][0]["role"], "edge");
    assert_eq!(d["current"][0]["out_of_profile"]["action"], "accept");
    assert_eq!(d["recent"][0]["kind"], "accept");

    let (_, body) = http_get(web.local_addr, "/api/policies").await;
    let p: qosloop_schema::PolicySet = serde_json::from_str(&body).unwrap();
    assert_eq!(p, paper_policy());

    let (_, body) = http_get(web.local_addr, "/api/enforcers").await;
    assert!(
        body.contains("\"edge-router\"") && body.contains("connected"),
        "{body}"
    );

    let (_, body) = http_get(web.local_addr, "/api/flows").await;
    let flows: Vec<qosloop_schema::FlowRecord> = serde_json::from_str(&body).unwrap();
    assert_eq!(flows[0].bytes, 50_000);

    let (status, body) = http_get(web.local_addr, "/").await;
    assert!(status.contains("200") && body.contains("/api/decisions"));
    let (status, _) = http_get(web.local_addr, "/nothing").await;
    assert!(status.contains("404"), "{status}");
    server.stop().await;
    web.task.await.unwrap();
}
