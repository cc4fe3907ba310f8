//! The live page (`/live`) in a real headless Chromium, driven over
//! WebDriver (Debian's chromedriver, plain HTTP + JSON: no new
//! dependency): it loads with no console error, the link chart moves while
//! the test writes flow records (so the loop computes rates), a filter
//! typed into the explorer returns the right rows and lands in the URL, and
//! a screenshot is saved under target/ as an artifact. A second run with
//! tokens configured: the page asks for a token, a wrong one brings the
//! prompt back, the right one (kept in sessionStorage, never in the URL)
//! makes every request and the fetch-streamed live updates work with no
//! console error.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;
use qosloop_policy_server::web::WebConfig;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One browser at a time: the machine's cores are few and each run
/// starts a Chromium.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ELEMENT: &str = "element-6066-11e4-a52f-4d8a6e89a0ff";

/// The bound on every wait for the page: generous, so that only a broken
/// page fails, not a busy machine.
const DEADLINE: Duration = Duration::from_secs(60);

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

/// Polls `js` until it returns true; fails after [`DEADLINE`].
async fn wait_for(port: u16, session: &str, js: &str) {
    let deadline = Instant::now() + DEADLINE;
    while script(port, session, js).await != Value::Bool(true) {
        assert!(Instant::now() < deadline, "not within {DEADLINE:?}: {js}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A WebDriver session in a headless Chromium; chromedriver and the
/// browser are killed when it is dropped.
struct Browser {
    port: u16,
    session: String,
    _driver: Driver,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a session, or skips (`None`) saying why.
    async fn start() -> Option<Browser> {
        let chromium = qosloop_testkit::harness::prerequisite(
            qosloop_testkit::harness::require_binary("chromium", "chromium"),
        )?;
        let chromedriver = qosloop_testkit::harness::prerequisite(
            qosloop_testkit::harness::require_binary("chromedriver", "chromium-driver"),
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let profile = tempfile::tempdir().unwrap();
        let driver = Driver(
            std::process::Command::new(&chromedriver)
                .arg(format!("--port={port}"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
            profile.path().to_owned(),
        );
        let deadline = Instant::now() + DEADLINE;
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen on port {port} within {DEADLINE:?}"
            );
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
        Some(Browser {
            port,
            session,
            _driver: driver,
            _profile: profile,
        })
    }

    fn base(&self) -> String {
        format!("/session/{}", self.session)
    }

    async fn open(&self, url: &str) {
        wd(
            self.port,
            "POST",
            &format!("{}/url", self.base()),
            Some(json!({ "url": url })),
        )
        .await;
        self.wait_for("return document.readyState === 'complete'")
            .await;
    }

    async fn script(&self, js: &str) -> Value {
        script(self.port, &self.session, js).await
    }

    async fn wait_for(&self, js: &str) {
        wait_for(self.port, &self.session, js).await
    }

    /// Types `text` into the element `css` (a trailing `\u{E007}` is Enter).
    async fn type_into(&self, css: &str, text: &str) {
        let base = self.base();
        let el = wd(
            self.port,
            "POST",
            &format!("{base}/element"),
            Some(json!({ "using": "css selector", "value": css })),
        )
        .await;
        let el = el
            .get(ELEMENT)
            .or_else(|| el.as_object()?.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {css}: {el}"))
            .to_owned();
        wd(
            self.port,
            "POST",
            &format!("{base}/element/{el}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    /// The browser's console entries at level SEVERE logged at or after
    /// `since_ms` (the page's `Date.now()`).
    async fn console_errors(&self, since_ms: f64) -> Vec<Value> {
        let logs = wd(
            self.port,
            "POST",
            &format!("{}/se/log", self.base()),
            Some(json!({ "type": "browser" })),
        )
        .await;
        logs.as_array()
            .unwrap_or_else(|| panic!("no browser log: {logs}"))
            .iter()
            .filter(|l| l["level"] == "SEVERE")
            .filter(|l| l["timestamp"].as_f64().unwrap_or(f64::MAX) >= since_ms)
            .cloned()
            .collect()
    }

    /// Asserts that the link chart moves: a later last point and more rate
    /// events than at a first reading (waited for, not timed).
    async fn assert_chart_moves(&self) {
        self.wait_for("return window.qosloopLive.rateEvents >= 3")
            .await;
        self.wait_for("return +document.getElementById('link-chart').dataset.points > 0")
            .await;
        let read = "const c = document.getElementById('link-chart'); \
                    return [+c.dataset.points, +c.dataset.tmax, window.qosloopLive.rateEvents]";
        let before = self.script(read).await;
        let (tmax, events) = (before[1].as_f64().unwrap(), before[2].as_i64().unwrap());
        self.wait_for(&format!(
            "const c = document.getElementById('link-chart'); \
             return +c.dataset.tmax > {tmax} && window.qosloopLive.rateEvents > {events}"
        ))
        .await;
    }

    async fn close(self) {
        wd(self.port, "DELETE", &self.base(), None).await;
    }
}

/// Flow records for the live charts while the page is open, until the
/// test aborts the task (or its runtime ends with the test).
fn write_traffic(db: qosloop_store::Db) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for seq in 10.. {
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
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_page_moves_filters_and_reports_no_error() {
    let _one = ONE_BROWSER.lock().await;
    let Some(browser) = Browser::start().await else {
        return;
    };
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
    let writer = write_traffic(db);
    // An enforcer whose last accounting report held two HTB classes.
    let store = &server.store;
    store
        .upsert_enforcer("pep-b", &["edge".into()], "127.0.0.1:40001", "connected")
        .await
        .unwrap();
    let class = |id: &str, parent: &str, [bytes, drops, overlimits, backlog]: [u64; 4]| {
        qosloop_schema::ClassCounters {
            classid: id.into(),
            parent: parent.into(),
            bytes,
            packets: bytes / 100,
            drops,
            overlimits,
            backlog_bytes: backlog,
        }
    };
    let report = qosloop_schema::AccountingReport {
        at_ns: 1_700_000_000_000_000_000,
        decisions: vec![],
        omitted: 0,
        classes: vec![
            class("e5:1", "root", [9000, 0, 2, 0]),
            class("e5:2", "e5:1", [9000, 1200, 3, 1500]),
        ],
        classes_omitted: 0,
    };
    store.replace_counters("pep-b", &report).await.unwrap();
    let base = browser.base();
    let port = browser.port;

    // The view's state comes from the URL.
    browser
        .open(&format!(
            "http://{addr}/live?range=1h&dims=src_addr&metric=bytes"
        ))
        .await;
    assert_eq!(
        browser
            .script("return document.getElementById('metric').value")
            .await,
        "bytes"
    );
    // An open API: no token asked for.
    assert_eq!(
        browser
            .script("return document.getElementById('token-form').hidden")
            .await,
        true
    );

    // The link chart moves while rates come in.
    browser.assert_chart_moves().await;

    // The enforcer table: the HTB classes' count, sums of drops,
    // overlimits and backlog, each class in the count's tooltip.
    let row = "[...document.querySelectorAll('#enforcers tbody tr')].find(r => r.cells[0].textContent === 'pep-b')";
    browser
        .wait_for(&format!("return {row} !== undefined"))
        .await;
    let cells = browser
        .script(&format!(
            "return [...{row}.cells].slice(-4).map(c => c.textContent)"
        ))
        .await;
    assert_eq!(cells, json!(["2", "1,200", "5", "1,500"]));
    let title = browser
        .script(&format!("return {row}.cells[{row}.cells.length - 4].title"))
        .await;
    assert_eq!(
        title,
        "e5:1 (parent root): 9000 B, 90 packets, 0 drops, 2 overlimits, 0 B queued\n\
         e5:2 (parent e5:1): 9000 B, 90 packets, 1200 drops, 3 overlimits, 1500 B queued"
    );

    // A filter typed in returns the right rows, and is kept in the URL.
    browser
        .type_into("#filter", "dst_port = 5001\u{E007}")
        .await;
    browser
        .wait_for(
            "return location.search.includes('filter=dst_port') && window.qosloopLive.topRows.length === 2",
        )
        .await;
    let rows = browser.script("return window.qosloopLive.topRows").await;
    assert_eq!(rows, json!([["10.0.0.1", 3000], ["10.0.0.2", 1000]]));
    let shown = browser
        .script(
            "return [...document.querySelectorAll('#top-table tbody td')].map(td => td.textContent)",
        )
        .await;
    assert_eq!(shown, json!(["10.0.0.1", "3,000", "10.0.0.2", "1,000"]));
    // A malformed filter shows the API's error, naming the token.
    browser
        .script(
            "document.getElementById('filter').value = 'dst_port = = 1'; \
             document.getElementById('apply').click(); return true",
        )
        .await;
    browser
        .wait_for("return document.getElementById('explorer-error').textContent.includes('offset')")
        .await;
    browser
        .script(
            "document.getElementById('filter').value = 'dst_port = 5001'; \
             document.getElementById('apply').click(); return true",
        )
        .await;
    browser
        .wait_for(
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
    let errors: Vec<Value> = browser
        .console_errors(0.0)
        .await
        .into_iter()
        .filter(|l| {
            !l["message"]
                .as_str()
                .unwrap_or("")
                .contains("400 (Bad Request)")
        })
        .collect();
    assert!(errors.is_empty(), "console errors: {errors:?}");

    browser.close().await;
    writer.abort();
    server.stop().await;
    web.task.await.unwrap();
}

const READ_TOKEN: &str = "live-page-read-token-5e21";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tokens_the_live_page_asks_for_one_and_works_with_it() {
    use qosloop_policy_server::auth::{Auth, FilterParamScope};
    use qosloop_runtime::digest::{hex, sha256};
    let _one = ONE_BROWSER.lock().await;
    let Some(browser) = Browser::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        format!(
            "[[token]]\nname = \"live\"\nrole = \"read\"\nsha256 = \"{}\"\n",
            hex(&sha256(READ_TOKEN.as_bytes()))
        ),
    )
    .unwrap();
    let auth = Auth::load(
        Some(&tokens),
        vec![],
        std::sync::Arc::new(FilterParamScope::default()),
    )
    .unwrap();
    let refusals = auth.stats.clone();
    let (server, policy_tx) = start_paper(&dir).await;
    let web = qosloop_policy_server::web::serve(
        any_loopback_port(),
        &server,
        policy_tx.subscribe(),
        WebConfig {
            auth,
            ..WebConfig::default()
        },
    )
    .await
    .unwrap();
    let addr: SocketAddr = web.local_addr;
    let db = server.store.db().clone();
    insert_flow(&db, "10.0.0.1", "10.0.1.1", 5001, 3000, 0).await;
    let writer = write_traffic(db);

    // No token yet: the page asks for one (and makes no refused request).
    browser
        .open(&format!(
            "http://{addr}/live?range=1h&dims=src_addr&metric=bytes"
        ))
        .await;
    browser
        .wait_for(
            "return window.qosloopLive.needsToken && \
             !document.getElementById('token-form').hidden && \
             document.getElementById('token-prompt').textContent.includes('needs an API token')",
        )
        .await;
    assert!(browser.console_errors(0.0).await.is_empty());

    // A wrong token: refused, the prompt says so; only 401s in the console.
    browser.type_into("#token", "not-the-token\u{E007}").await;
    browser
        .wait_for(
            "return !document.getElementById('token-form').hidden && \
             document.getElementById('token-prompt').textContent.includes('refused (401)')",
        )
        .await;
    let refused = browser.console_errors(0.0).await;
    assert!(!refused.is_empty(), "the wrong token was never sent");
    for e in &refused {
        assert!(
            e["message"].as_str().unwrap_or("").contains("401"),
            "not a refusal: {e}"
        );
    }
    assert_eq!(
        browser.script("return window.qosloopLive.rateEvents").await,
        0
    );

    // The right token: everything loads, the chart moves, no console error.
    let entered = browser.script("return Date.now()").await.as_f64().unwrap();
    browser
        .type_into("#token", &format!("{READ_TOKEN}\u{E007}"))
        .await;
    browser
        .wait_for(
            "return document.getElementById('token-form').hidden && \
             window.qosloopLive.connects >= 1 && window.qosloopLive.topRows.length >= 1 && \
             document.getElementById('status').textContent === 'live'",
        )
        .await;
    browser.assert_chart_moves().await;
    // The token is in this tab's sessionStorage, never in the URL.
    let url = browser.script("return location.href").await;
    assert!(!url.as_str().unwrap().contains(READ_TOKEN), "{url}");
    assert_eq!(
        browser
            .script("return sessionStorage.getItem('qosloop.apiToken')")
            .await,
        READ_TOKEN
    );
    let errors = browser.console_errors(entered).await;
    assert!(
        errors.is_empty(),
        "console errors after the token: {errors:?}"
    );
    // The server saw the refusals (and only the wrong token's).
    let by: std::collections::HashMap<_, _> = refusals.by_reason().into_iter().collect();
    assert_eq!(by["missing"], 0, "the page sent a request with no token");
    assert!(by["invalid"] >= 1, "{by:?}");

    browser.close().await;
    writer.abort();
    server.stop().await;
    web.task.await.unwrap();
}
