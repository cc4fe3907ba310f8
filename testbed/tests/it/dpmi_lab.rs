//! The DPMI laboratory shared by `policy_dpmi`, `policy_dpmi_secure` and
//! `policy_dpmi_v6`:
//! a point's namespace with the controller and consumers in it, a sender's
//! namespace, a veth between them.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use qosloop_meter::dpmi::{run_point, PointConfig};
use qosloop_policy_server::auth::{protect, Auth, FilterParamScope};
use qosloop_runtime::digest::{hex, sha256};
use qosloop_store::Db;
use qosloop_testbed::harness::{Netns, VethPair};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const SRC: &str = "10.88.0.1";
pub const MP: &str = "10.88.0.2";
pub const OTHER_SRC: &str = "10.89.0.1";
pub const SLOW_FRAMES: u32 = 20_000;
/// IPv6 of a lab built [`Lab::with_ipv6`]: two senders in two /80s of
/// the link's /64, the point's end.
pub const SRC6: &str = "2001:db8:88:0:1::1";
pub const OTHER_SRC6: &str = "2001:db8:88:0:2::1";
pub const MP6: &str = "2001:db8:88::2";

/// The bound on every wait of the DPMI tests: generous, so that only a
/// broken point or controller fails, not a busy machine.
pub const DEADLINE: Duration = Duration::from_secs(60);

pub struct Lab {
    pub mp: Netns,
    pub src: Netns,
    pub veth: VethPair,
    pub controller: SocketAddr,
    /// With tokens: the controller sits behind `api_tokens_file` and
    /// every user `u` presents the token `secret-u` (admins: `alice`,
    /// `bob`, the point `mp1`; `reader` reads).
    pub tokens: bool,
    /// With TLS: the controller serves HTTPS, [`Lab::api`] trusts it with
    /// this client configuration.
    pub client_tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    _db_dir: tempfile::TempDir,
    _runtime: std::thread::JoinHandle<()>,
}

impl Lab {
    pub fn new() -> Lab {
        Lab::build(false)
    }

    /// A lab whose controller wants tokens.
    pub fn with_tokens() -> Lab {
        Lab::build(true)
    }

    /// A lab whose controller wants tokens and serves HTTPS with `server`
    /// (a certificate for 127.0.0.1); `client` is how the test's own calls
    /// trust it.
    pub fn with_tokens_over_tls(
        server: Arc<tokio_rustls::rustls::ServerConfig>,
        client: Arc<tokio_rustls::rustls::ClientConfig>,
    ) -> Lab {
        Lab::build_with(true, Some((server, client)))
    }

    /// A lab with IPv6 on the link (`SRC6`, `OTHER_SRC6`, `MP6`).
    pub fn with_ipv6() -> Lab {
        let lab = Lab::build(false);
        for (ns, ifname, addrs) in [
            (&lab.src, &lab.veth.a_if, vec![SRC6, OTHER_SRC6]),
            (&lab.mp, &lab.veth.b_if, vec![MP6]),
        ] {
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "0").unwrap();
            ns.sysctl(&format!("net.ipv6.conf.{ifname}.disable_ipv6"), "0")
                .unwrap();
            for a in addrs {
                ns.ip(&["addr", "add", &format!("{a}/64"), "dev", ifname, "nodad"])
                    .unwrap();
            }
        }
        lab
    }

    fn build(tokens: bool) -> Lab {
        Lab::build_with(tokens, None)
    }

    fn build_with(
        tokens: bool,
        tls: Option<(
            Arc<tokio_rustls::rustls::ServerConfig>,
            Arc<tokio_rustls::rustls::ClientConfig>,
        )>,
    ) -> Lab {
        let (server_tls, client_tls) = tls.unzip();
        let mp = Netns::create("dpmi-mp").unwrap();
        let src = Netns::create("dpmi-src").unwrap();
        let veth = VethPair::connect(&src, &format!("{SRC}/24"), &mp, &format!("{MP}/24")).unwrap();
        src.ip(&["addr", "add", &format!("{OTHER_SRC}/32"), "dev", &veth.a_if])
            .unwrap();
        // No IPv6 chatter (router solicitations) on the link.
        for ns in [&mp, &src] {
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1").unwrap();
        }
        let db_dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", db_dir.path().join("c.db").display());
        let listener = mp
            .run_in(|| TcpListener::bind("127.0.0.1:0").unwrap())
            .unwrap();
        let controller = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let tokens_file = db_dir.path().join("tokens.toml");
        let mut text = String::new();
        for (name, role) in [
            ("alice", "admin"),
            ("bob", "admin"),
            ("mp1", "admin"),
            ("reader", "read"),
        ] {
            let digest = hex(&sha256(format!("secret-{name}").as_bytes()));
            text.push_str(&format!(
                "[[token]]\nname = \"{name}\"\nrole = \"{role}\"\nsha256 = \"{digest}\"\n\n"
            ));
        }
        std::fs::write(&tokens_file, text).unwrap();
        let runtime = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let db = Db::connect(&url).await.unwrap();
                db.migrate().await.unwrap();
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let mut app = qosloop_policy_server::dpmi::router(db);
                if tokens {
                    let auth = Auth::load(
                        Some(&tokens_file),
                        Vec::new(),
                        Arc::new(FilterParamScope::default()),
                    )
                    .unwrap();
                    app = protect(app, auth);
                }
                match server_tls {
                    None => axum::serve(listener, app).await.unwrap(),
                    Some(cfg) => serve_tls(listener, app, cfg).await,
                }
            });
        });
        Lab {
            mp,
            src,
            veth,
            controller,
            tokens,
            client_tls,
            _db_dir: db_dir,
            _runtime: runtime,
        }
    }

    /// How a point trusts this lab's controller: its CA (the one `api`
    /// trusts), the name 127.0.0.1.
    pub fn controller_tls(&self) -> Option<qosloop_meter::dpmi::ControllerTls> {
        self.client_tls
            .clone()
            .map(|config| qosloop_meter::dpmi::ControllerTls {
                config,
                name: qosloop_runtime::tls::server_name("127.0.0.1").unwrap(),
            })
    }

    /// One HTTP call to the controller (from inside the namespace).
    pub fn api(
        &self,
        method: &str,
        path: &str,
        user: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let addr = self.controller;
        let (method, path) = (method.to_owned(), path.to_owned());
        let user = match (user, self.tokens) {
            (Some(u), false) => format!("X-Qosloop-User: {u}\r\n"),
            (Some(u), true) => format!("Authorization: Bearer secret-{u}\r\n"),
            (None, _) => String::new(),
        };
        let tls = self.client_tls.clone();
        self.mp
            .run_in(move || {
                let body = body.map(|b| b.to_string()).unwrap_or_default();
                let tcp = TcpStream::connect(addr).unwrap();
                tcp.set_read_timeout(Some(DEADLINE)).unwrap();
                let mut s: Box<dyn ReadWrite> = match tls {
                    None => Box::new(tcp),
                    Some(cfg) => {
                        let name = qosloop_runtime::tls::server_name(&addr.to_string()).unwrap();
                        let conn = tokio_rustls::rustls::ClientConnection::new(cfg, name).unwrap();
                        Box::new(tokio_rustls::rustls::StreamOwned::new(conn, tcp))
                    }
                };
                write!(
                    s,
                    "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{user}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
                let mut raw = Vec::new();
                // A TLS peer may close without close_notify: what was read stands.
                let _ = s.read_to_end(&mut raw);
                let raw = String::from_utf8(raw).unwrap();
                let status: u16 = raw.split_whitespace().nth(1).unwrap().parse().unwrap();
                let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
                (status, serde_json::from_str(body).unwrap_or(Value::Null))
            })
            .unwrap()
    }

    pub fn point(
        &self,
        max_filters: u32,
        buffer: usize,
        max_caplen: u32,
        stop: Arc<AtomicBool>,
    ) -> std::thread::JoinHandle<()> {
        let cfg = PointConfig {
            name: "mp1".into(),
            controller: self.controller,
            token: self.tokens.then(|| "secret-mp1".to_owned()),
            controller_tls: self.controller_tls(),
            interface: self.veth.b_if.clone(),
            max_filters,
            max_caplen,
            consumer_buffer: buffer,
            poll: Duration::from_millis(150),
            key: None,
            consumer_tls: None,
        };
        let h = self
            .mp
            .spawn_in(move || run_point(cfg, stop).map(|_| ()))
            .unwrap();
        wait_for("the point to register", DEADLINE, || {
            let (_, v) = self.api("GET", "/api/v1/points", Some("reader"), None);
            v.as_array().is_some_and(|p| !p.is_empty())
        });
        std::thread::spawn(move || {
            h.join().unwrap().unwrap().unwrap();
        })
    }

    /// Sends `count` UDP datagrams from `from` to `MP:port`, each naming
    /// its port and sequence number, paced at about 5,000 a second.
    pub fn send(&self, from: &'static str, port: u16, count: u32, size: usize) {
        self.src
            .run_in(move || {
                let s = UdpSocket::bind(format!("{from}:0")).unwrap();
                let mut payload = vec![0u8; size];
                for seq in 0..count {
                    payload[..8].copy_from_slice(&tag(port, seq).to_be_bytes());
                    s.send_to(&payload, format!("{MP}:{port}")).unwrap();
                    if seq % 50 == 49 {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            })
            .unwrap();
    }
}

impl Lab {
    /// As [`Lab::send`], paced by what arrived instead of by the clock:
    /// datagrams go out in batches of `batch`, each batch only once
    /// `arrived()` (what the consumer the test watches holds) has reached
    /// everything sent before. The sender never outruns that consumer,
    /// however slow the machine; a consumer that stops receiving fails the
    /// test after [`DEADLINE`].
    pub fn send_paced(
        &self,
        from: &'static str,
        port: u16,
        count: u32,
        size: usize,
        batch: u32,
        arrived: impl Fn() -> usize,
    ) {
        // A socket made in the sender's namespace stays in it.
        let s = self
            .src
            .run_in(move || UdpSocket::bind(format!("{from}:0")).unwrap())
            .unwrap();
        let to = format!("{MP}:{port}");
        let mut payload = vec![0u8; size];
        for seq in 0..count {
            if seq > 0 && seq % batch.max(1) == 0 {
                let deadline = Instant::now() + DEADLINE;
                while arrived() < seq as usize {
                    assert!(
                        Instant::now() < deadline,
                        "{} of the first {seq} datagrams arrived within {DEADLINE:?}",
                        arrived()
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            payload[..8].copy_from_slice(&tag(port, seq).to_be_bytes());
            s.send_to(&payload, &to).unwrap();
        }
    }

    /// As [`Lab::send`], over IPv6 from `from` to `[MP6]:port`.
    pub fn send6(&self, from: &'static str, port: u16, count: u32, size: usize) {
        self.src
            .run_in(move || {
                let s = UdpSocket::bind(format!("[{from}]:0")).unwrap();
                let mut payload = vec![0u8; size];
                for seq in 0..count {
                    payload[..8].copy_from_slice(&tag(port, seq).to_be_bytes());
                    s.send_to(&payload, format!("[{MP6}]:{port}")).unwrap();
                    if seq % 50 == 49 {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            })
            .unwrap();
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Serves `app` over TLS, one task per connection (the policy server's
/// own HTTPS listener does the same with limits and timeouts, web.rs).
async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    cfg: Arc<tokio_rustls::rustls::ServerConfig>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            // A client that does not trust the certificate hangs up here.
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
}

pub fn tag(port: u16, seq: u32) -> u64 {
    0x5150_0000_0000_0000 | u64::from(port) << 32 | u64::from(seq)
}

pub fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A consumer: accepts connections and keeps every frame of the pcap
/// streams it reads (unless `stall`, when it accepts and never reads, or
/// `hang_up`, when it closes each connection at once).
#[derive(Clone)]
pub struct Consumer {
    pub addr: SocketAddr,
    pub frames: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Consumer {
    pub fn start(lab: &Lab, stall: bool, hang_up: bool) -> Consumer {
        let listener = lab
            .mp
            .run_in(|| TcpListener::bind("127.0.0.1:0").unwrap())
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let frames = Arc::new(Mutex::new(Vec::new()));
        let f = frames.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                if hang_up {
                    drop(conn);
                    continue;
                }
                if stall {
                    held.push(conn);
                    continue;
                }
                let f = f.clone();
                std::thread::spawn(move || {
                    let mut head = [0u8; 24];
                    if conn.read_exact(&mut head).is_err() {
                        return;
                    }
                    assert_eq!(head[..4], 0xa1b2_c3d4u32.to_le_bytes());
                    loop {
                        let mut rec = [0u8; 16];
                        if conn.read_exact(&mut rec).is_err() {
                            return;
                        }
                        let caplen = u32::from_le_bytes(rec[8..12].try_into().unwrap()) as usize;
                        assert!(caplen <= 65_535);
                        let mut data = vec![0u8; caplen];
                        if conn.read_exact(&mut data).is_err() {
                            return;
                        }
                        f.lock().unwrap().push(data);
                    }
                });
            }
        });
        Consumer { addr, frames }
    }

    /// The (port, seq) tags of the test's datagrams among the frames
    /// `keep` accepts, with how often each came.
    pub fn tags(&self, mut keep: impl FnMut(&[u8]) -> bool) -> BTreeMap<u64, u32> {
        let mut out = BTreeMap::new();
        for f in self.frames.lock().unwrap().iter() {
            if !keep(f) || f.len() < 14 + 20 + 8 + 8 || f[23] != 17 {
                continue;
            }
            let t = u64::from_be_bytes(f[42..50].try_into().unwrap());
            *out.entry(t).or_insert(0) += 1;
        }
        out
    }
}

pub fn expected(ports: &[(u16, u32)]) -> BTreeMap<u64, u32> {
    ports
        .iter()
        .flat_map(|&(p, n)| (0..n).map(move |s| (tag(p, s), 1)))
        .collect()
}

pub fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "still waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `got()` equals `want`; fails after `limit` showing both.
pub fn wait_for_eq<T: PartialEq + std::fmt::Debug>(
    what: &str,
    limit: Duration,
    want: &T,
    mut got: impl FnMut() -> T,
) {
    let start = Instant::now();
    loop {
        let now = got();
        if &now == want {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "{what}: not within {limit:?}\n got: {now:?}\nwant: {want:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn request(lab: &Lab, user: &str, filter: Value, consumer: SocketAddr, stop_in: f64) -> i64 {
    let (status, v) = lab.api(
        "POST",
        "/api/v1/requests",
        Some(user),
        Some(
            json!({"points": ["mp1"], "filter": filter, "consumer": consumer.to_string(),
                    "stop_s": now_s() + stop_in}),
        ),
    );
    assert_eq!(status, 201, "{v}");
    v["id"].as_i64().unwrap()
}

pub fn connected(lab: &Lab, user: &str, id: i64) -> bool {
    let (_, v) = lab.api("GET", &format!("/api/v1/requests/{id}"), Some(user), None);
    v["deliveries"]
        .as_array()
        .is_some_and(|d| d.iter().any(|d| d["connected"] == json!(true)))
}

pub fn filters(lab: &Lab) -> Value {
    lab.api("GET", "/api/v1/points/mp1/filters", None, None).1
}

/// Reads JSON lines (flow records) from every connection it accepts.
pub fn line_consumer(lab: &Lab) -> (SocketAddr, Arc<Mutex<Vec<Value>>>) {
    let listener = lab
        .mp
        .run_in(|| TcpListener::bind("127.0.0.1:0").unwrap())
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l = lines.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let l = l.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(conn).lines() {
                    let Ok(line) = line else { return };
                    l.lock().unwrap().push(serde_json::from_str(&line).unwrap());
                }
            });
        }
    });
    (addr, lines)
}
