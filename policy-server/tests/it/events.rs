//! Live updates over real HTTP (`/api/v1/events`): the loop's rate samples
//! arrive as they are computed; a client that reads nothing and one that
//! vanished cost a reading client nothing — it gets every event, in order,
//! with no loss — while the slow one's losses are counted and announced.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;
use qosloop_policy_server::console::ConsoleLimits;
use qosloop_policy_server::web::{WebConfig, WebHandle};
use qosloop_testkit::http::Request;
use serde_json::json;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

async fn serve(
    dir: &tempfile::TempDir,
    event_queue: usize,
) -> (qosloop_policy_server::ServerHandle, WebHandle) {
    let (server, policy_tx) = start_paper(dir).await;
    let web = qosloop_policy_server::web::serve(
        any_loopback_port(),
        &server,
        policy_tx.subscribe(),
        WebConfig {
            console: ConsoleLimits {
                event_queue,
                ..ConsoleLimits::default()
            },
            ..WebConfig::default()
        },
    )
    .await
    .unwrap();
    (server, web)
}

/// Opens the event stream `path` and returns the stream after the response
/// head. Raw: the tests read the stream as it arrives (or not at all),
/// which the kit's client, reading whole answers, does not do.
async fn open(stream: &mut TcpStream, path: &str) -> (u16, String) {
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, stream.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 1, "connection closed in the head");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    (head.split(' ').nth(1).unwrap().parse().unwrap(), head)
}

/// Reads until `done` holds for the text so far (or the time is up).
async fn read_until(stream: &mut TcpStream, text: &mut String, done: impl Fn(&str) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut buf = vec![0u8; 256 * 1024];
    while !done(text) {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .expect("the events did not arrive in time")
            .unwrap();
        assert!(n > 0, "the stream ended");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

/// The `i` of every `test` event in the stream, in order.
fn indices(text: &str) -> Vec<u64> {
    text.split('\n')
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok()?["i"].as_u64())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_samples_arrive_as_the_loop_computes_them() {
    let dir = tempfile::tempdir().unwrap();
    let (server, web) = serve(&dir, 64).await;
    let mut s = TcpStream::connect(web.local_addr).await.unwrap();
    let (status, head) = open(&mut s, "/api/v1/events?types=rates").await;
    assert_eq!(status, 200);
    assert!(head.contains("text/event-stream"), "{head}");
    for seq in 0..5 {
        insert_flow(
            server.store.db(),
            "10.0.0.1",
            "10.0.1.1",
            5001,
            100_000,
            seq,
        )
        .await;
    }
    let mut text = String::new();
    read_until(&mut s, &mut text, |t| {
        t.matches("event: rates").count() >= 2
    })
    .await;
    let data = text
        .split('\n')
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(data).unwrap();
    assert!(v["at_ns"].as_i64().unwrap() > 0, "{v}");
    assert!(v["links"].is_array() && v["flows"].is_array(), "{v}");
    assert!(
        !text.contains("event: decisions"),
        "only the types asked for"
    );

    // Bad input: an unknown type is a 400 naming the parameter.
    let bad = Request::get("/api/v1/events?types=rates,nope")
        .header("Accept", "text/event-stream")
        .timeout(WAIT)
        .send_async(web.local_addr)
        .await
        .unwrap();
    assert_eq!(bad.status, 400);
    let body = bad.text();
    assert!(
        body.contains("\"types\"") && body.contains("nope"),
        "{body}"
    );
    drop(s);
    server.stop().await;
    web.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_vanished_client_does_not_stall_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let (server, web) = serve(&dir, 32).await;
    web.events.register_kind("test");
    let path = "/api/v1/events?types=test";
    let addr: SocketAddr = web.local_addr;

    // A client that reads nothing, with a tiny receive buffer.
    let slow_socket = TcpSocket::new_v4().unwrap();
    slow_socket.set_recv_buffer_size(4096).unwrap();
    let mut slow = slow_socket.connect(addr).await.unwrap();
    // A client that subscribes and vanishes.
    let mut gone = TcpStream::connect(addr).await.unwrap();
    // A client that reads.
    let mut fast = TcpStream::connect(addr).await.unwrap();
    for s in [&mut slow, &mut gone, &mut fast] {
        assert_eq!(open(s, path).await.0, 200);
    }
    drop(gone);
    let reader = tokio::spawn(async move {
        let mut text = String::new();
        // Until the last event is whole: its data line ends the event with
        // a blank line (the keys are sorted, so `last` comes before the
        // 32 KiB pad and can arrive before the rest of the line).
        read_until(&mut fast, &mut text, |t| {
            t.find("\"last\":true")
                .is_some_and(|at| t[at..].contains("\n\n"))
        })
        .await;
        text
    });

    // 400 events of 32 KiB: 12.8 MB, far more than the slow client's
    // socket buffers and queue hold. Published at a pace a reading client
    // keeps up with.
    let pad = "x".repeat(32 * 1024);
    let n = 400;
    for i in 0..n {
        if i == 50 {
            let stats = web.events.stats();
            assert_eq!(stats.clients, 2, "the vanished client is gone: {stats:?}");
        }
        web.events
            .publish("test", &json!({ "i": i, "pad": pad, "last": i == n - 1 }));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let text = reader.await.unwrap();
    assert_eq!(
        indices(&text),
        (0..n).collect::<Vec<_>>(),
        "the reading client got every event, in order"
    );
    assert!(!text.contains("event: lagged"));
    let stats = web.events.stats();
    assert!(
        stats.dropped_slow > 0,
        "the slow client lost events: {stats:?}"
    );
    assert!(
        stats.dropped_slow < n,
        "only the slow client lost events: {stats:?}"
    );

    // The slow client, reading at last, hears what it lost.
    let mut rest = String::new();
    read_until(&mut slow, &mut rest, |t| t.contains("event: lagged")).await;
    drop(slow);
    server.stop().await;
    web.task.await.unwrap();
}
