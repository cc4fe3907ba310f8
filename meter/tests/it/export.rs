//! `--export` against collectors that answer but do not help (issue 11):
//! one whose negotiation keeps no flow key (item 8: the meter said "all
//! acknowledged" while the database held all-zero rows) makes the meter
//! exit 64 with one line saying why; one that never acknowledges DATA
//! (item 9: the meter reconnected to it forever) is given up after
//! `--export-ack-timeout-ms` and the meter ends as with a dead collector,
//! its records in the spool. The fake collector is a loopback listener
//! speaking just enough CRANE; every loop in it is bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use qosloop_testkit::frames as support;

use futures_util::{SinkExt, StreamExt};
use qosloop_meter::pcap::linktype;
use qosloop_meter::PcapWriter;
use qosloop_schema::crane::{CraneCodec, Frame, Message, StartAck, VERSION};
use qosloop_schema::ie;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::*;
use tokio_util::codec::Framed;

/// A fake collector on its own runtime thread: acknowledges START,
/// TMPL_DATA (with the keys in `disable` disabled) and FINAL_TMPL_DATA,
/// then sends KEEPALIVE every 100 ms and never acknowledges DATA. Serves
/// at most 20 connections, each for at most 30 s.
fn fake_collector(disable: &'static [ie::IeId]) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            for _ in 0..20 {
                let Ok(Ok((stream, _))) =
                    tokio::time::timeout(Duration::from_secs(60), listener.accept()).await
                else {
                    return;
                };
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(30), session(stream, disable))
                        .await;
                });
            }
        });
    });
    addr
}

async fn session(stream: tokio::net::TcpStream, disable: &'static [ie::IeId]) {
    let mut framed = Framed::new(stream, CraneCodec::default());
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    let mut negotiated = false;
    loop {
        tokio::select! {
            frame = framed.next() => {
                let Some(Ok(frame)) = frame else { return };
                let answer = match frame.message {
                    Message::Start(s) => Some(Message::StartAck(StartAck {
                        version: VERSION,
                        capabilities: s.capabilities,
                        boot_ns: s.boot_ns,
                        keepalive_s: 1,
                    })),
                    Message::TemplateData(mut set) => {
                        for t in &mut set.templates {
                            for k in &mut t.keys {
                                k.disabled |= disable.contains(&k.ie);
                            }
                        }
                        Some(Message::TemplateDataAck(set))
                    }
                    Message::FinalTemplateData { config_id } => {
                        negotiated = true;
                        Some(Message::FinalTemplateDataAck { config_id })
                    }
                    Message::Stop => Some(Message::StopAck),
                    _ => None,
                };
                if let Some(message) = answer {
                    if framed.send(Frame { session: 1, message }).await.is_err() {
                        return;
                    }
                }
            }
            _ = ticker.tick(), if negotiated => {
                if framed.send(Frame { session: 1, message: Message::Keepalive }).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Five UDP flows of two packets each.
fn small_pcap(dir: &Path) -> PathBuf {
    let path = dir.join("flows.pcap");
    let mut w = PcapWriter::new(
        std::fs::File::create(&path).unwrap(),
        linktype::ETHERNET,
        65535,
    )
    .unwrap();
    let mut t = 1_700_000_000_000_000_000u64;
    for port in 5000..5005u16 {
        let frame = ethernet(
            &[],
            0x0800,
            &ipv4(
                ip("10.0.1.2"),
                ip("10.0.2.2"),
                17,
                1,
                0,
                &[],
                &udp(port, 4055, 10),
            ),
        );
        for _ in 0..2 {
            t += 1_000_000;
            w.write_packet(t, &frame, frame.len() as u32).unwrap();
        }
    }
    path
}

/// Runs the meter, killing it after 60 s (a meter that never ends is the
/// bug; nothing is asserted about how long it took).
fn meter(args: &[&str]) -> (Output, bool) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qosloop-meter"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ended = true;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            ended = false;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (child.wait_with_output().unwrap(), ended)
}

#[test]
fn export_to_a_collector_that_disables_every_flow_key_exits_64() {
    let every_key: &'static [ie::IeId] = &[
        ie::SOURCE_IPV4_ADDRESS.id,
        ie::DESTINATION_IPV4_ADDRESS.id,
        ie::SOURCE_IPV6_ADDRESS.id,
        ie::DESTINATION_IPV6_ADDRESS.id,
        ie::SOURCE_TRANSPORT_PORT.id,
        ie::DESTINATION_TRANSPORT_PORT.id,
        ie::PROTOCOL_IDENTIFIER.id,
    ];
    let addr = fake_collector(every_key);
    let dir = tempfile::tempdir().unwrap();
    let pcap = small_pcap(dir.path());
    let spool = dir.path().join("spool");
    let (out, ended) = meter(&[
        "--pcap",
        pcap.to_str().unwrap(),
        "--export",
        &format!("crane://{addr}"),
        "--export-spool",
        spool.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(ended, "the meter did not end: {stderr}");
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(!stderr.contains("all acknowledged"), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("refused") && last.contains("flow key") && last.contains(&addr),
        "{stderr}"
    );
}

#[test]
fn export_to_a_collector_that_never_acknowledges_ends_with_the_records_spooled() {
    let addr = fake_collector(&[]);
    let dir = tempfile::tempdir().unwrap();
    let pcap = small_pcap(dir.path());
    let spool = dir.path().join("spool");
    let (out, ended) = meter(&[
        "--pcap",
        pcap.to_str().unwrap(),
        "--export",
        &format!("crane://{addr}"),
        "--export-spool",
        spool.to_str().unwrap(),
        "--export-ack-timeout-ms",
        "500",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(ended, "the meter did not end: {stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("does not acknowledge"), "{stderr}");
    assert!(
        stderr.contains("NOT acknowledged and left in the spool"),
        "{stderr}"
    );
}
