//! Access control of the HTTP API (issue 17 part 4) over real HTTP on
//! loopback: the real middleware on a router with a state-changing route,
//! and the real policy server with tokens (its `/metrics` counts the
//! refusals and parses strictly).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use axum::routing::get;
use axum::Router;
use common::*;
use qosloop_policy_server::auth::{self, Admin, Auth, FilterParamScope};
use qosloop_policy_server::web::WebConfig;
use qosloop_runtime::digest::{hex, sha256};
use qosloop_testkit::http::{Request, Response};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const READ: &str = "read-token-7f3a9c";
const ADMIN: &str = "admin-token-1b2e44";
const SCOPED: &str = "customer-token-9d0c1a";
const SCOPE: &str = "dst_addr = 10.9.0.0/16";

/// A tokens file as an operator writes it: hashes only.
fn tokens_file(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let path = dir.path().join("tokens.toml");
    let text = format!(
        "[[token]]\nname = \"grafana\"\nrole = \"read\"\nsha256 = \"{}\"\n\n\
         [[token]]\nname = \"ops\"\nrole = \"admin\"\nsha256 = \"{}\"\n\n\
         [[token]]\nname = \"customer-9\"\nrole = \"read\"\nsha256 = \"{}\"\nscope = \"{SCOPE}\"\n",
        hex(&sha256(READ.as_bytes())),
        hex(&sha256(ADMIN.as_bytes())),
        hex(&sha256(SCOPED.as_bytes())),
    );
    std::fs::write(&path, text).unwrap();
    assert!(!std::fs::read_to_string(&path).unwrap().contains(READ));
    path
}

fn load(dir: &tempfile::TempDir, origins: &[&str]) -> Auth {
    Auth::load(
        Some(&tokens_file(dir)),
        origins.iter().map(|o| (*o).to_owned()).collect(),
        Arc::new(FilterParamScope::default()),
    )
    .unwrap()
}

/// One request (bounded by `WAIT`); the answer.
async fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    request_with_body(addr, method, path, headers, "").await
}

/// One request carrying `body`; the answer.
async fn request_with_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Response {
    let request = headers
        .iter()
        .fold(Request::new(method, path), |r, (k, v)| r.header(k, v));
    request
        .body(body)
        .timeout(WAIT)
        .send_async(addr)
        .await
        .unwrap()
}

/// The value of header `name` in lower case, empty when absent.
fn header_lower(r: &Response, name: &str) -> String {
    r.header(name).unwrap_or_default().to_ascii_lowercase()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A router with a state-changing route (as later routes will be), a
/// GET that is admin-only, and one that echoes the filter it receives.
async fn serve_test_router(auth: Auth) -> (SocketAddr, Arc<AtomicU64>) {
    let changes = Arc::new(AtomicU64::new(0));
    let c = changes.clone();
    let router = Router::new()
        .route(
            "/api/v1/thing",
            get(|| async { "thing" }).post(move || {
                let c = c.clone();
                async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    "changed"
                }
            }),
        )
        .route(
            "/api/v1/secret",
            get(|Admin(p): Admin| async move { p.name }),
        )
        .route(
            "/api/v1/flows",
            get(
                |q: axum::extract::Query<Vec<(String, String)>>| async move {
                    q.0.iter()
                        .filter(|(k, _)| k == "filter")
                        .map(|(_, v)| v.clone())
                        .collect::<Vec<_>>()
                        .join("|")
                },
            ),
        );
    let router = auth::protect(router, auth);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (addr, changes)
}

#[tokio::test]
async fn state_changes_need_an_admin_token_and_refusals_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let auth = load(&dir, &[]);
    let stats = auth.stats.clone();
    let (addr, changes) = serve_test_router(auth).await;
    let post = |h: Vec<(&'static str, String)>| async move {
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        request(addr, "POST", "/api/v1/thing", &h).await
    };
    let r = post(vec![]).await;
    assert_eq!(r.status, 401);
    assert!(
        header_lower(&r, "www-authenticate").starts_with("bearer"),
        "{r:?}"
    );
    assert_eq!(
        post(vec![("Authorization", bearer("not-a-token"))])
            .await
            .status,
        401
    );
    assert_eq!(
        post(vec![("Authorization", "Basic b3BzOng=".into())])
            .await
            .status,
        401
    );
    assert_eq!(
        post(vec![("Authorization", bearer(READ))]).await.status,
        403
    );
    assert_eq!(
        post(vec![("Authorization", bearer(SCOPED))]).await.status,
        403
    );
    assert_eq!(
        changes.load(Ordering::SeqCst),
        0,
        "a refused request changed state"
    );
    for method in ["DELETE", "PUT", "PATCH"] {
        let code = request(
            addr,
            method,
            "/api/v1/thing",
            &[("Authorization", &bearer(READ))],
        )
        .await
        .status;
        assert_eq!(code, 403, "{method}");
    }
    let r = post(vec![("Authorization", bearer(ADMIN))]).await;
    assert_eq!((r.status, &*r.text()), (200, "changed"));
    assert_eq!(changes.load(Ordering::SeqCst), 1);

    // Reads: any token; the admin-only GET needs admin.
    let read = [("Authorization", bearer(READ))];
    let read: Vec<(&str, &str)> = read.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(
        request(addr, "GET", "/api/v1/thing", &read).await.status,
        200
    );
    assert_eq!(request(addr, "GET", "/api/v1/thing", &[]).await.status, 401);
    assert_eq!(
        request(addr, "GET", "/api/v1/secret", &read).await.status,
        403
    );
    let r = request(
        addr,
        "GET",
        "/api/v1/secret",
        &[("Authorization", &bearer(ADMIN))],
    )
    .await;
    assert_eq!((r.status, &*r.text()), (200, "ops"));

    let by: std::collections::HashMap<_, _> = stats.by_reason().into_iter().collect();
    // No header, and a Basic header, are both "no bearer token".
    assert_eq!(by["missing"], 3, "{by:?}");
    assert_eq!(by["invalid"], 1, "{by:?}");
    assert_eq!(by["forbidden"], 5, "{by:?}");
}

#[tokio::test]
async fn a_scoped_token_reads_only_through_its_scope() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, _) = serve_test_router(load(&dir, &[])).await;
    let h = bearer(SCOPED);
    let h = [("Authorization", h.as_str())];
    let r = request(addr, "GET", "/api/v1/flows?filter=proto%20%3D%206", &h).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), format!("({SCOPE}) AND (proto = 6)"));
    let r = request(addr, "GET", "/api/v1/flows?limit=5", &h).await;
    assert_eq!(r.text(), SCOPE);
    // A second filter parameter must not slip past the scope.
    let code = request(addr, "GET", "/api/v1/flows?filter=a&filter=b", &h)
        .await
        .status;
    assert_eq!(code, 403);
    // A route the scope cannot filter is refused, not served unscoped.
    assert_eq!(request(addr, "GET", "/api/v1/thing", &h).await.status, 403);
    // An unscoped read token is not rewritten.
    let r = bearer(READ);
    let r = request(
        addr,
        "GET",
        "/api/v1/flows?filter=proto%3D6",
        &[("Authorization", &r)],
    )
    .await;
    assert_eq!(r.text(), "proto=6");
}

#[tokio::test]
async fn cors_is_off_unless_an_origin_is_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let a = bearer(READ);
    let (closed, _) = serve_test_router(load(&dir, &[])).await;
    let r = request(
        closed,
        "GET",
        "/api/v1/thing",
        &[("Authorization", &a), ("Origin", "https://ui.example")],
    )
    .await;
    assert!(r.header("access-control-allow-origin").is_none(), "{r:?}");
    assert_eq!(
        request(
            closed,
            "OPTIONS",
            "/api/v1/thing",
            &[("Origin", "https://ui.example")]
        )
        .await
        .status,
        403
    );

    let (open, _) = serve_test_router(load(&dir, &["https://ui.example"])).await;
    let r = request(
        open,
        "GET",
        "/api/v1/thing",
        &[("Authorization", &a), ("Origin", "https://ui.example")],
    )
    .await;
    assert_eq!(
        header_lower(&r, "access-control-allow-origin"),
        "https://ui.example",
        "{r:?}"
    );
    let r = request(
        open,
        "GET",
        "/api/v1/thing",
        &[("Authorization", &a), ("Origin", "https://evil.example")],
    )
    .await;
    assert!(r.header("access-control-allow-origin").is_none(), "{r:?}");
    let r = request(
        open,
        "OPTIONS",
        "/api/v1/thing",
        &[("Origin", "https://ui.example")],
    )
    .await;
    assert_eq!(r.status, 204);
    assert!(
        header_lower(&r, "access-control-allow-headers").starts_with("authorization"),
        "{r:?}"
    );
}

/// The DPMI controller's user is the token's name when a token proved
/// one: an `X-Qosloop-User` header naming someone else changes nothing.
#[tokio::test]
async fn a_dpmi_request_belongs_to_the_token_not_to_a_user_header() {
    let dir = tempfile::tempdir().unwrap();
    let db = qosloop_store::Db::connect(&db_url(&dir)).await.unwrap();
    db.migrate().await.unwrap();
    let router = auth::protect(qosloop_policy_server::dpmi::router(db), load(&dir, &[]));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    let (admin, read) = (bearer(ADMIN), bearer(READ));
    let point = r#"{"name": "mp1", "interface": "eth0", "max_filters": 4}"#;
    let r = request_with_body(
        addr,
        "POST",
        "/api/v1/points",
        &[("Authorization", &admin)],
        point,
    )
    .await;
    assert_eq!(r.status, 201, "{r:?}");
    let submit = r#"{"points": ["mp1"], "consumer": "127.0.0.1:9", "stop_s": 4000000000}"#;
    let r = request_with_body(
        addr,
        "POST",
        "/api/v1/requests",
        &[("Authorization", &admin), ("X-Qosloop-User", "mallory")],
        submit,
    )
    .await;
    assert_eq!(r.status, 201, "{r:?}");
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["owner"], "ops", "{r:?}");
    let id = v["id"].as_i64().unwrap();
    let path = format!("/api/v1/requests/{id}");
    // Another token naming the owner in the header is another user.
    let r = request(
        addr,
        "GET",
        &path,
        &[("Authorization", &read), ("X-Qosloop-User", "ops")],
    )
    .await;
    assert_eq!(r.status, 404, "{r:?}");
    let r = request(addr, "GET", &path, &[("Authorization", &admin)]).await;
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn bad_token_files_are_configuration_errors() {
    let dir = tempfile::tempdir().unwrap();
    let hook = || Arc::new(FilterParamScope::default());
    let h = hex(&sha256(b"x"));
    for (text, why) in [
        ("[[token]]\nname = \"a\"\nrole = \"read\"\nsha256 = \"abc\"\n", "64 hex"),
        (&format!("[[token]]\nname = \"a\"\nrole = \"root\"\nsha256 = \"{h}\"\n"), "role"),
        (&format!("[[token]]\nname = \"a\"\nrole = \"read\"\nsha256 = \"{h}\"\nscope = \"dst_addr ==\"\n"), "scope"),
        (&format!("[[token]]\nname = \"a\"\nrole = \"admin\"\nsha256 = \"{h}\"\nscope = \"proto = 6\"\n"), "admin token cannot be scoped"),
        (&format!("[[token]]\nname = \"a\"\nrole = \"read\"\nsha256 = \"{h}\"\n[[token]]\nname = \"b\"\nrole = \"admin\"\nsha256 = \"{h}\"\n"), "hash of another"),
        (&format!("[[token]]\nname = \"a\"\nrole = \"read\"\nsha256 = \"{h}\"\ntoken = \"plain\"\n"), "unknown field"),
    ] {
        let p = dir.path().join("t.toml");
        std::fs::write(&p, text).unwrap();
        let e = Auth::load(Some(&p), vec![], hook()).unwrap_err().to_string();
        assert!(e.starts_with("api_tokens_file") && e.contains(why), "{why}: {e}");
    }
    let e = Auth::load(None, vec!["https://ui.example/".into()], hook()).unwrap_err();
    assert_eq!(e.key, "cors_allowed_origins");
}

#[tokio::test]
async fn the_policy_server_refuses_without_a_token_and_counts_it_in_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let (server, policy_tx) = start_paper(&dir).await;
    let web = qosloop_policy_server::web::serve(
        any_loopback_port(),
        &server,
        policy_tx.subscribe(),
        WebConfig {
            auth: load(&dir, &[]),
            ..WebConfig::default()
        },
    )
    .await
    .unwrap();
    let addr = web.local_addr;
    let read = bearer(READ);
    let read = [("Authorization", read.as_str())];
    let decisions_before = request(addr, "GET", "/api/decisions", &read).await;
    assert_eq!(decisions_before.status, 200);
    assert_eq!(request(addr, "GET", "/api/status", &[]).await.status, 401);
    assert_eq!(
        request(
            addr,
            "GET",
            "/api/v1/decisions",
            &[("Authorization", "Bearer nope")]
        )
        .await
        .status,
        401
    );
    assert_eq!(
        request(addr, "POST", "/api/decisions", &read).await.status,
        403
    );
    assert_eq!(request(addr, "GET", "/metrics", &[]).await.status, 401);
    // Admin passes the guard; the route itself takes GET only.
    let admin = bearer(ADMIN);
    assert_eq!(
        request(addr, "POST", "/api/decisions", &[("Authorization", &admin)])
            .await
            .status,
        405
    );
    let r = request(addr, "GET", "/metrics", &read).await;
    assert_eq!(r.status, 200);
    assert!(
        header_lower(&r, "content-type").starts_with("text/plain; version=0.0.4"),
        "{r:?}"
    );
    let scrape = qosloop_testkit::metrics::parse(&r.text()).unwrap();
    let failures = |r| scrape.value("qosloop_policy_http_auth_failures_total", &[("reason", r)]);
    assert_eq!(failures("missing"), Some(2.0));
    assert_eq!(failures("invalid"), Some(1.0));
    assert_eq!(failures("forbidden"), Some(1.0));
    assert_eq!(
        scrape.value(
            "qosloop_build_info",
            &[
                ("component", "policy-server"),
                ("version", env!("CARGO_PKG_VERSION"))
            ]
        ),
        Some(1.0)
    );
    server.stop().await;
    web.task.await.unwrap();
}

#[tokio::test]
async fn over_https_the_api_answers_a_token_and_refuses_plain_http() {
    use qosloop_runtime::tls;
    qosloop_testkit::need!(qosloop_testkit::harness::require_binary(
        "openssl", "openssl"
    ));
    let dir = tempfile::tempdir().unwrap();
    qosloop_testkit::harness::test_pki(dir.path()).unwrap();
    let p = |f: &str| dir.path().join(f);
    let (auth, https) = auth::web_security(
        Some(&tokens_file(&dir)),
        vec![],
        Some(&p("server.pem")),
        Some(&p("server.key")),
    )
    .unwrap();
    let (server, policy_tx) = start_paper(&dir).await;
    let web = qosloop_policy_server::web::serve(
        any_loopback_port(),
        &server,
        policy_tx.subscribe(),
        WebConfig {
            auth,
            tls: https,
            ..WebConfig::default()
        },
    )
    .await
    .unwrap();
    let addr = web.local_addr;
    let config = tls::client_config_with(&p("ca.pem"), None).unwrap();
    let get = |token: Option<&'static str>| {
        let config = config.clone();
        let request = token
            .iter()
            .fold(Request::get("/api/status"), |r, t| {
                r.header("Authorization", &bearer(t))
            })
            .timeout(WAIT);
        tokio::task::spawn_blocking(move || {
            let tcp = std::net::TcpStream::connect(addr).unwrap();
            tcp.set_read_timeout(Some(WAIT)).unwrap();
            tcp.set_write_timeout(Some(WAIT)).unwrap();
            let name = tls::server_name(&addr.to_string()).unwrap();
            let session = tokio_rustls::rustls::ClientConnection::new(config, name).unwrap();
            request
                .send_on(tokio_rustls::rustls::StreamOwned::new(session, tcp))
                .unwrap()
        })
    };
    let answer = get(Some(READ)).await.unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    let answer = get(None).await.unwrap();
    assert_eq!(answer.status, 401, "{answer:?}");
    // Plain HTTP on the HTTPS port gets no HTTP answer: the handshake fails
    // and the connection is closed (counted).
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET /api/v1/decisions HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut buf))
        .await
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&buf).contains("HTTP/1.1"),
        "answered in clear"
    );
    let scrape = qosloop_testkit::metrics::parse(&web.metrics.render()).unwrap();
    assert_eq!(
        scrape.value(
            "qosloop_policy_http_connections_refused_total",
            &[("reason", "tls")]
        ),
        Some(1.0)
    );
    server.stop().await;
    web.task.await.unwrap();
}

#[test]
fn the_access_keys_are_validated_before_anything_starts() {
    use qosloop_policy_server::config::{Config, Settings};
    let dir = tempfile::tempdir().unwrap();
    let base = "db = \"sqlite://a.db\"\npolicies = \"p.ldif\"\n";
    for (extra, key) in [
        ("metrics = \"0.0.0.0:9743\"", "metrics"),
        (
            "api_tokens_file = \"/nonexistent/tokens.toml\"",
            "api_tokens_file",
        ),
        ("http_tls_cert = \"c.pem\"", "http_tls_cert"),
        ("cors_allowed_origins = [\"*\"]", "cors_allowed_origins"),
        // HTTP beyond loopback: tokens alone are not enough (they would
        // cross the network in clear).
        (
            "http = \"0.0.0.0:8080\"\napi_tokens_file = \"TOKENS\"",
            "http",
        ),
    ] {
        let text =
            format!("{base}{extra}\n").replace("TOKENS", &tokens_file(&dir).display().to_string());
        let e = Config::validate(Settings::from_toml(&text).unwrap(), true)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(key), "{key}: {e}");
    }
    let ok = format!("{base}metrics = \"127.0.0.1:9743\"\n");
    let c = Config::validate(Settings::from_toml(&ok).unwrap(), true).unwrap();
    assert_eq!(c.metrics.unwrap().port(), 9743);
    assert!(!c.web.auth.is_enforced());
}

/// The tokens of the policy directory: a real slapd (the test kit's harness) with
/// the sample policy and `qosloopApiToken` entries, followed by the
/// repository's sync search; the real middleware in front of a
/// state-changing route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ldap_tokens_read_write_and_stop_working_when_removed() {
    use qosloop_policy_server::repo::{watch_ldap, LdapBind, LdapSource};
    use qosloop_testkit::harness::Slapd;
    qosloop_testkit::need!(Slapd::available());
    const BASE: &str = "dc=qosloop,dc=example";
    const LDAP_READ: &str = "ldap-read-token-4c1d";
    const LDAP_ADMIN: &str = "ldap-admin-token-8e02";
    const LATER: &str = "ldap-later-token-31aa";
    let slapd = Slapd::start(BASE).unwrap_or_else(|e| panic!("{e}"));
    slapd.add_ldif(qosloop_schema::SAMPLE_POLICY_LDIF).unwrap();
    let entry = |cn: &str, role: &str, token: &str| {
        format!(
            "dn: cn={cn},ou=tokens,{BASE}\nobjectClass: qosloopApiToken\ncn: {cn}\n\
             qosloopTokenRole: {role}\nqosloopTokenSHA256: {}\n\n",
            hex(&sha256(token.as_bytes()))
        )
    };
    slapd
        .add_ldif(&format!(
            "dn: ou=tokens,{BASE}\nobjectClass: organizationalUnit\nou: tokens\n\n{}{}",
            entry("dashboards", "read", LDAP_READ),
            entry("ops", "admin", LDAP_ADMIN)
        ))
        .unwrap();
    // Only the hashes are in the directory.
    let stored = slapd
        .search(
            &format!("ou=tokens,{BASE}"),
            "(objectClass=qosloopApiToken)",
            &["*"],
        )
        .unwrap();
    assert!(stored.contains("qosloopTokenSHA256"), "{stored}");
    assert!(!stored.contains(LDAP_READ) && !stored.contains(LDAP_ADMIN));

    let mut source = LdapSource::new(
        slapd.url(),
        BASE,
        LdapBind::Simple {
            dn: slapd.bind_dn().to_owned(),
            password: slapd.password().to_owned(),
        },
    );
    source.backoff_max = std::time::Duration::from_millis(500);
    let mut w = watch_ldap(source, WAIT).await.unwrap();
    assert_eq!(w.tokens.borrow().len(), 2, "loaded with the policy");
    let auth = Auth::load(None, vec![], Arc::new(FilterParamScope::default()))
        .unwrap()
        .with_directory_tokens(w.tokens.clone());
    assert!(auth.is_enforced());
    let stats = auth.stats.clone();
    let (addr, changes) = serve_test_router(auth).await;
    let call = |method: &'static str, token: &'static str| async move {
        let h = bearer(token);
        request(addr, method, "/api/v1/thing", &[("Authorization", &h)])
            .await
            .status
    };

    // The read token reads and cannot write; the admin token writes.
    assert_eq!(call("GET", LDAP_READ).await, 200);
    assert_eq!(call("POST", LDAP_READ).await, 403);
    assert_eq!(changes.load(Ordering::SeqCst), 0, "a read token wrote");
    assert_eq!(call("POST", LDAP_ADMIN).await, 200);
    assert_eq!(changes.load(Ordering::SeqCst), 1);
    assert_eq!(call("GET", LATER).await, 401, "not in the directory yet");

    // Reload: an entry removed stops working, one added starts, a role
    // lowered in place loses admin.
    slapd
        .delete(&format!("cn=dashboards,ou=tokens,{BASE}"))
        .unwrap();
    slapd.add_ldif(&entry("later", "read", LATER)).unwrap();
    slapd
        .modify_ldif(&format!(
            "dn: cn=ops,ou=tokens,{BASE}\nchangetype: modify\n\
             replace: qosloopTokenRole\nqosloopTokenRole: read\n"
        ))
        .unwrap();
    let reloaded = tokio::time::timeout(
        WAIT,
        w.tokens.wait_for(|t| {
            t.iter().any(|t| t.name == "later")
                && !t.iter().any(|t| t.name == "dashboards")
                && t.iter().all(|t| t.role == auth::Role::Read)
        }),
    )
    .await
    .map(|r| r.is_ok());
    assert_eq!(
        reloaded,
        Ok(true),
        "the tokens never followed the directory: {:?}",
        *w.tokens.borrow()
    );
    assert_eq!(
        call("GET", LDAP_READ).await,
        401,
        "a removed entry still works"
    );
    assert_eq!(call("GET", LATER).await, 200);
    assert_eq!(call("POST", LDAP_ADMIN).await, 403);
    assert_eq!(changes.load(Ordering::SeqCst), 1, "a refused request wrote");

    // A broken entry is refused with its DN (audited) and does not work.
    slapd
        .add_ldif(&entry("broken", "superuser", "broken-token"))
        .unwrap();
    let rejected = tokio::time::timeout(WAIT, async {
        while let Some(e) = w.audit.recv().await {
            if e.change == qosloop_policy_server::repo::AuditChange::Reject
                && e.dn == format!("cn=broken,ou=tokens,{BASE}")
            {
                return e.detail;
            }
        }
        None
    })
    .await
    .unwrap();
    assert!(
        rejected
            .as_deref()
            .unwrap_or("")
            .starts_with("qosloopTokenRole"),
        "{rejected:?}"
    );
    assert_eq!(call("GET", "broken-token").await, 401);
    let by: std::collections::HashMap<_, _> = stats.by_reason().into_iter().collect();
    assert_eq!(by["invalid"], 3, "{by:?}");
    assert_eq!(by["forbidden"], 2, "{by:?}");
}
