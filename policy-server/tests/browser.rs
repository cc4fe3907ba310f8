//! The live page (`/live`) in a real headless Chromium, driven over
//! WebDriver (Debian's chromedriver, plain HTTP + JSON: no new
//! dependency): it loads with no console error, the link chart moves while
//! the test writes flow records (so the loop computes rates), a filter
//! typed into the explorer returns the right rows and lands in the URL, and
//! a screenshot is saved under target/ as an artifact.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use qosloop_policy_server::web::WebConfig;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ELEMENT: &str = "element-6066-11e4-a52f-4d8a6e89a0ff";

/// One WebDriver command.
async fn wd(port: u16, method: &str, path: &str, body: Option<Value>) -> Value {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // chromedriver keeps the connection open: read the head, then the
    // body by its length.
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 65536];
        loop {
            let n = s.read(&mut chunk).await.unwrap();
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                });
                let done = match len {
                    Some(len) => body.len() >= len,
                    None => n == 0 || body.ends_with("0\r\n\r\n"),
                };
                if done {
                    return (head.to_owned(), body.to_owned());
                }
            }
            if n == 0 {
                panic!("chromedriver closed the connection");
            }
        }
    };
    let (head, body) = tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("chromedriver did not answer");
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(&body)
    } else {
        body
    };
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "{method} {path}: {head}\n{body}"
    );
    v["value"].clone()
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let bytes: Vec<u8> = s
        .bytes()
        .filter(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
        .map(val)
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, b) in chunk.iter().enumerate() {
            n |= u32::from(*b) << (18 - 6 * i);
        }
        let k = chunk.len().saturating_sub(1);
        out.extend_from_slice(&n.to_be_bytes()[1..1 + k]);
    }
    out
}

/// chromedriver and the browser it started (found by the test's own
/// profile directory in its command line), killed when dropped — also
/// when the test fails.
struct Driver(std::process::Child, std::path::PathBuf);
impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let profile = self.1.display().to_string();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        for p in procs.flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&profile) {
                let _ = std::process::Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status();
            }
        }
    }
}

async fn script(port: u16, session: &str, js: &str) -> Value {
    wd(
        port,
        "POST",
        &format!("/session/{session}/execute/sync"),
        Some(json!({ "script": js, "args": [] })),
    )
    .await
}

/// Polls `js` until it returns true (or fails after 20 s).
async fn wait_for(port: u16, session: &str, js: &str) {
    for _ in 0..200 {
        if script(port, session, js).await == Value::Bool(true) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for: {js}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_page_moves_filters_and_reports_no_error() {
    let chromium = qosloop_testbed::need!(qosloop_testbed::harness::require_binary(
        "chromium", "chromium"
    ));
    let chromedriver = qosloop_testbed::need!(qosloop_testbed::harness::require_binary(
        "chromedriver",
        "chromium-driver"
    ));
    let dir = tempfile::tempdir().unwrap();
    let (server, policy_tx) = start_paper(&dir).await;
    let web = qosloop_policy_server::web::serve(
        any_loopback_port(),
        &server,
        policy_tx.subscribe(),
        WebConfig::default(),
    )
    .await
    .unwrap();
    let addr: SocketAddr = web.local_addr;
    let db = server.store.db().clone();
    // What the filter must find: two sources to port 5001, one elsewhere.
    for (i, (src, dport, bytes)) in [
        ("10.0.0.1", 5001, 3000u64),
        ("10.0.0.2", 5001, 1000),
        ("10.0.0.3", 5002, 5000),
    ]
    .into_iter()
    .enumerate()
    {
        insert_flow(&db, src, "10.0.1.1", dport, bytes, i as i64).await;
    }
    // Traffic for the live charts while the page is open (bounded).
    let writer = tokio::spawn(async move {
        for seq in 10..400 {
            insert_flow(
                &db,
                "10.9.9.9",
                "10.0.1.1",
                9000,
                50_000 + seq as u64 * 100,
                seq,
            )
            .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let profile = tempfile::tempdir().unwrap();
    let _driver = Driver(
        std::process::Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
        profile.path().to_owned(),
    );
    for _ in 0..100 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let caps = json!({ "capabilities": { "alwaysMatch": {
        "browserName": "chrome",
        "goog:loggingPrefs": { "browser": "ALL" },
        "goog:chromeOptions": {
            "binary": chromium.to_string_lossy(),
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1300,1800",
                format!("--user-data-dir={}", profile.path().display())],
        },
    }}});
    let session = wd(port, "POST", "/session", Some(caps)).await["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let base = format!("/session/{session}");

    // The view's state comes from the URL.
    let url = format!("http://{addr}/live?range=1h&dims=src_addr&metric=bytes");
    wd(
        port,
        "POST",
        &format!("{base}/url"),
        Some(json!({ "url": url })),
    )
    .await;
    wait_for(port, &session, "return document.readyState === 'complete'").await;
    assert_eq!(
        script(
            port,
            &session,
            "return document.getElementById('metric').value"
        )
        .await,
        "bytes"
    );

    // The link chart moves while rates come in.
    wait_for(port, &session, "return window.qosloopLive.rateEvents >= 3").await;
    wait_for(
        port,
        &session,
        "return +document.getElementById('link-chart').dataset.points > 0",
    )
    .await;
    let read = "const c = document.getElementById('link-chart'); \
                return [+c.dataset.points, +c.dataset.tmax, window.qosloopLive.rateEvents]";
    let before = script(port, &session, read).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = script(port, &session, read).await;
    assert!(
        after[1].as_f64().unwrap() > before[1].as_f64().unwrap()
            && after[2].as_i64().unwrap() > before[2].as_i64().unwrap(),
        "the chart did not move: {before} then {after}"
    );

    // A filter typed in returns the right rows, and is kept in the URL.
    let input = wd(
        port,
        "POST",
        &format!("{base}/element"),
        Some(json!({ "using": "css selector", "value": "#filter" })),
    )
    .await;
    let input = input
        .get(ELEMENT)
        .or_else(|| input.as_object()?.values().next())
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no element: {input}"))
        .to_owned();
    wd(
        port,
        "POST",
        &format!("{base}/element/{input}/value"),
        Some(json!({ "text": "dst_port = 5001\u{E007}" })),
    )
    .await;
    wait_for(
        port,
        &session,
        "return location.search.includes('filter=dst_port') && window.qosloopLive.topRows.length === 2",
    )
    .await;
    let rows = script(port, &session, "return window.qosloopLive.topRows").await;
    assert_eq!(rows, json!([["10.0.0.1", 3000], ["10.0.0.2", 1000]]));
    let shown = script(
        port,
        &session,
        "return [...document.querySelectorAll('#top-table tbody td')].map(td => td.textContent)",
    )
    .await;
    assert_eq!(shown, json!(["10.0.0.1", "3,000", "10.0.0.2", "1,000"]));
    // A malformed filter shows the API's error, naming the token.
    script(
        port,
        &session,
        "document.getElementById('filter').value = 'dst_port = = 1'; \
         document.getElementById('apply').click(); return true",
    )
    .await;
    wait_for(
        port,
        &session,
        "return document.getElementById('explorer-error').textContent.includes('offset')",
    )
    .await;
    script(
        port,
        &session,
        "document.getElementById('filter').value = 'dst_port = 5001'; \
         document.getElementById('apply').click(); return true",
    )
    .await;
    wait_for(
        port,
        &session,
        "return document.getElementById('explorer-error').textContent === '' && \
         document.getElementById('series-chart').dataset.series !== undefined && \
         document.querySelectorAll('#sankey path').length > 0",
    )
    .await;

    // The screenshot, as an artifact under target/.
    let png = wd(port, "GET", &format!("{base}/screenshot"), None).await;
    let bytes = base64_decode(png.as_str().unwrap());
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("live.png"), &bytes).unwrap();
    eprintln!("screenshot: {}", out.join("live.png").display());

    // No console error at any point (the 400 of the malformed filter is
    // the one expected resource error).
    let logs = wd(
        port,
        "POST",
        &format!("{base}/se/log"),
        Some(json!({ "type": "browser" })),
    )
    .await;
    let errors: Vec<&Value> = logs
        .as_array()
        .unwrap_or_else(|| panic!("no browser log: {logs}"))
        .iter()
        .filter(|l| l["level"] == "SEVERE")
        .filter(|l| {
            !l["message"]
                .as_str()
                .unwrap_or("")
                .contains("400 (Bad Request)")
        })
        .collect();
    assert!(errors.is_empty(), "console errors: {errors:?}");

    wd(port, "DELETE", &base, None).await;
    writer.abort();
    server.stop().await;
    web.task.await.unwrap();
}
