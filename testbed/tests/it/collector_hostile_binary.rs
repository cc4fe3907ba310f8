//! Issue 11's attacks on the export port against the real
//! `qosloop-collector` binary, run as the report ran them: under a 2 GiB
//! address-space cap, or with 1,024 descriptors. Before the fixes each of
//! these aborted the collector or locked exporters out; now the process
//! stays up, within its memory budget, and a legitimate exporter completes
//! its work while and after the attack runs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::collector_common as common;

use common::legitimate_export;
use futures_util::{SinkExt, StreamExt};
use qosloop_schema::crane::{
    ByteOrder, CraneCodec, Data, Frame, Message, Start, TemplateSet, WireKey, WireTemplate,
    DATA_FLAG_START, DEFAULT_MAX_MESSAGE,
};
use qosloop_schema::ie;
use qosloop_testbed::harness::free_port;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::codec::Framed;

/// A collector process under `ulimit` caps; killed on drop.
struct Daemon {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// `limits`: shell `ulimit` options, e.g. `-v 2097152` (KiB of address
    /// space) or `-n 1024` (descriptors).
    fn start(limits: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("collector.log");
        let port = free_port().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        // QOSLOOP_COLLECTOR_BIN runs the attacks against another build (an
        // older one, to see them fail).
        let bin = std::env::var("QOSLOOP_COLLECTOR_BIN").unwrap_or_else(|_| {
            qosloop_testkit::component("qosloop-collector")
                .unwrap()
                .display()
                .to_string()
        });
        let child = Command::new("sh")
            .args([
                "-c",
                &format!("ulimit {limits} && exec \"$0\" \"$@\""),
                &bin,
                "--listen",
                &addr.to_string(),
                "--db",
                "discard:",
            ])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting qosloop-collector");
        let mut d = Daemon {
            child,
            addr,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(d.alive(), "collector exited: {}", d.log_text());
            assert!(Instant::now() < deadline, "collector did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A field of /proc/PID/status in KiB (VmHWM: peak resident memory).
    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim_start_matches(':').split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/PID/status"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Conn = Framed<TcpStream, CraneCodec>;

async fn send(f: &mut Conn, message: Message) -> bool {
    f.send(Frame {
        session: 1,
        message,
    })
    .await
    .is_ok()
}

/// The next message other than KEEPALIVE; `None` when the connection ended
/// (or nothing came for 20 s).
async fn next(f: &mut Conn) -> Option<Message> {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), f.next()).await {
            Ok(Some(Ok(Frame {
                message: Message::Keepalive,
                ..
            }))) => continue,
            Ok(Some(Ok(fr))) => return Some(fr.message),
            _ => return None,
        }
    }
}

/// START, then `t` as the only template, FINAL and `data`, stopping at the
/// first refusal. Returns the ERROR text if the collector refused.
async fn attack(
    addr: SocketAddr,
    name: String,
    t: WireTemplate,
    count: u32,
    body: Vec<u8>,
) -> Option<String> {
    let mut f = Framed::new(TcpStream::connect(addr).await.ok()?, CraneCodec::default());
    let steps = [
        Message::Start(Start {
            max_version: 1,
            capabilities: 0,
            boot_ns: 1,
            stream_id: 1,
            exporter: name,
        }),
        Message::TemplateData(TemplateSet {
            config_id: 1,
            byte_order: ByteOrder::Big,
            templates: vec![t],
        }),
        Message::FinalTemplateData { config_id: 1 },
        Message::Data(Data {
            template_id: 256,
            config_id: 1,
            flags: DATA_FLAG_START,
            seq: 1,
            count,
            records: body.into(),
        }),
    ];
    for step in steps {
        if !send(&mut f, step).await {
            return None;
        }
        match next(&mut f).await {
            Some(Message::Error(e)) => return Some(e.text),
            Some(_) => continue,
            None => return None,
        }
    }
    None
}

fn one_byte_template() -> WireTemplate {
    WireTemplate {
        id: 256,
        keys: vec![WireKey {
            ie: ie::PROTOCOL_IDENTIFIER.id,
            data_type: ie::PROTOCOL_IDENTIFIER.data_type,
            disabled: false,
        }],
    }
}

/// Items 1-3 under a 2 GiB address-space cap: a keyless template and a
/// DATA of count 0xFFFFFFFF (aborted the collector), a 16 MiB DATA of 1-byte
/// records and four 4 MiB ones (2.8 GB and 4 × 700 MB decoded: aborted it),
/// and 130 connections that send only a header announcing 16 MiB (reserved
/// 16 MiB each: 114 aborted it). The collector refuses each, stays up with
/// a bounded peak RSS, and an exporter completes after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_attacks_under_a_2gib_cap_leave_the_collector_up() {
    let mut d = Daemon::start("-v 2097152");
    let addr = d.addr;

    // Item 1.
    let keyless = WireTemplate {
        id: 256,
        keys: vec![],
    };
    let refused = attack(addr, "keyless".into(), keyless, u32::MAX, vec![]).await;
    assert!(d.alive(), "collector died: {}", d.log_text());
    let text = refused.expect("the keyless template is refused");
    assert!(text.contains("template 256"), "{text}");

    // Item 2: one 16 MiB message, then four 4 MiB ones at once.
    let n = DEFAULT_MAX_MESSAGE - 8 - 16;
    let refused = attack(
        addr,
        "dense-16".into(),
        one_byte_template(),
        n as u32,
        vec![6; n],
    )
    .await;
    assert!(d.alive(), "collector died: {}", d.log_text());
    assert!(refused.is_some_and(|t| t.contains("budget")));
    let four = (0..4).map(|i| {
        let n = 4 << 20;
        tokio::spawn(attack(
            addr,
            format!("dense-4-{i}"),
            one_byte_template(),
            n as u32,
            vec![17; n],
        ))
    });
    for a in four {
        let refused = a.await.unwrap();
        assert!(refused.is_some_and(|t| t.contains("budget")));
    }
    assert!(d.alive(), "collector died: {}", d.log_text());

    // Item 3: headers alone.
    let mut held = Vec::new();
    for _ in 0..130 {
        let Ok(mut s) = TcpStream::connect(addr).await else {
            continue;
        };
        let mut header = vec![1, 0x01, 1, 0];
        header.extend_from_slice(&(DEFAULT_MAX_MESSAGE as u32).to_be_bytes());
        if s.write_all(&header).await.is_ok() {
            held.push(s);
        }
    }
    assert!(held.len() >= 114, "only {} connections opened", held.len());
    legitimate_export(addr, "legit", 5_000).await;
    assert!(d.alive(), "collector died: {}", d.log_text());
    let peak_mib = d.status_kib("VmHWM") / 1024;
    let size_mib = d.status_kib("VmSize") / 1024;
    eprintln!(
        "collector after the memory attacks: peak RSS {peak_mib} MiB, address space {size_mib} MiB"
    );
    assert!(peak_mib < 256, "peak RSS {peak_mib} MiB");
    drop(held);
}

/// Item 4 with 1,024 descriptors: 1,100 connections from 127.0.0.2 that
/// send a KEEPALIVE now and then and never START took every descriptor (the
/// old collector held them for ever and logged "Too many open files").
/// Now 32 per address are let in, the rest are closed at once and counted,
/// and an exporter from 127.0.0.1 completes meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_from_one_address_leave_room_for_an_exporter() {
    // This test process holds the 1,100 sockets.
    qosloop_schema::guard::raise_nofile_limit();
    let mut d = Daemon::start("-n 1024");
    let addr = d.addr;
    let mut idle = Vec::new();
    for _ in 0..1_100 {
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), sock.connect(addr)).await {
            idle.push(s);
        }
    }
    // The attack goes on while the exporter works: a KEEPALIVE from every
    // open connection every 500 ms, at most 120 rounds.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attacker = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let keepalive = [1u8, 0x32, 1, 0, 0, 0, 0, 8];
            for _ in 0..120 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let mut still = Vec::with_capacity(idle.len());
                for mut s in idle.drain(..) {
                    if s.write_all(&keepalive).await.is_ok() {
                        still.push(s);
                    }
                }
                idle = still;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            idle.len()
        })
    };
    legitimate_export(addr, "legit-during", 5_000).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    attacker.await.unwrap();
    legitimate_export(addr, "legit-after", 5_000).await;
    assert!(d.alive(), "collector died: {}", d.log_text());
    let log = d.log_text();
    assert!(log.contains("connection refused"), "{log}");
    assert!(
        !log.contains("Too many open files"),
        "descriptors ran out: {log}"
    );
}

/// Under a 2 GiB address-space cap, 150 connections (30 from each of five
/// addresses, within the per-address limit) negotiate a session and send
/// 15 MiB of a 16 MiB DATA each, then stall. Without the receiving budget
/// the collector buffered all of it (2.2 GiB) and aborted; now 16 of them
/// are read (256 MiB) and the rest wait unread, the collector stays up and
/// an exporter (messages under 64 KiB) completes meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_large_messages_on_many_connections_stay_within_the_cap() {
    qosloop_schema::guard::raise_nofile_limit();
    let mut d = Daemon::start("-v 2097152");
    let addr = d.addr;
    let body = DEFAULT_MAX_MESSAGE - 8 - 16;
    let count = (body / 8) as u32;
    let mut frame = bytes::BytesMut::new();
    tokio_util::codec::Encoder::encode(
        &mut CraneCodec::default(),
        Frame {
            session: 1,
            message: Message::Data(Data {
                template_id: 256,
                config_id: 1,
                flags: DATA_FLAG_START,
                seq: 1,
                count,
                records: vec![7u8; count as usize * 8].into(),
            }),
        },
        &mut frame,
    )
    .unwrap();
    let partial = bytes::Bytes::from(frame.split_to(15 << 20));
    let eight = WireTemplate {
        id: 256,
        keys: vec![WireKey {
            ie: ie::OCTET_DELTA_COUNT.id,
            data_type: ie::OCTET_DELTA_COUNT.data_type,
            disabled: false,
        }],
    };
    let mut senders = Vec::new();
    for i in 0..150u32 {
        let source = format!("127.0.0.{}:0", 2 + i % 5);
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind(source.parse().unwrap()).unwrap();
        let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(5), sock.connect(addr)).await
        else {
            continue;
        };
        let mut f = Framed::new(s, CraneCodec::default());
        let steps = [
            Message::Start(Start {
                max_version: 1,
                capabilities: 0,
                boot_ns: 1,
                stream_id: 1,
                exporter: format!("stall-{i}"),
            }),
            Message::TemplateData(TemplateSet {
                config_id: 1,
                byte_order: ByteOrder::Big,
                templates: vec![eight.clone()],
            }),
            Message::FinalTemplateData { config_id: 1 },
        ];
        let mut ok = true;
        for step in steps {
            ok = ok && send(&mut f, step).await && next(&mut f).await.is_some();
        }
        assert!(
            d.alive(),
            "collector died after {i} stalled messages: {}",
            d.log_text()
        );
        assert!(ok, "session {i} was not negotiated: {}", d.log_text());
        let mut s = f.into_inner();
        let partial = partial.clone();
        // Each writes until the collector stops reading it (at most 10 s).
        senders.push(tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), s.write_all(&partial)).await;
            s
        }));
    }
    assert_eq!(senders.len(), 150);
    legitimate_export(addr, "legit-beside-stalls", 5_000).await;
    assert!(d.alive(), "collector died: {}", d.log_text());
    let held: Vec<TcpStream> = futures_util::future::join_all(senders)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(d.alive(), "collector died: {}", d.log_text());
    let peak_mib = d.status_kib("VmHWM") / 1024;
    eprintln!("collector with 150 stalled 16 MiB messages: peak RSS {peak_mib} MiB");
    assert!(peak_mib < 512, "peak RSS {peak_mib} MiB");
    drop(held);
}

/// Item 5: anyone who could reach the port fed records into the loop. A
/// listen address beyond loopback without mutual TLS is a configuration
/// error (exit 64) naming the opt-in flag, before any socket opens.
#[test]
fn remote_listen_without_mutual_tls_exits_64_naming_the_flag() {
    let out = Command::new(qosloop_testkit::component("qosloop-collector").unwrap())
        .args(["--listen", "0.0.0.0:4740", "--db", "discard:"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("0.0.0.0:4740") && stderr.contains("--allow-insecure-remote"),
        "{stderr}"
    );
}
