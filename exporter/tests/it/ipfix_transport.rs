//! The IPFIX senders on real loopback sockets: template refresh over UDP
//! by time and by message count; over TCP a new connection after the
//! collector drops one, starting a new session (templates first, sequence
//! from 0).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use qosloop_exporter::ipfix::tcp::TcpExporter;
use qosloop_exporter::ipfix::udp::UdpExporter;
use qosloop_exporter::ipfix::IpfixConfig;
use qosloop_schema::FlowRecord;
use std::io::Read;
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::time::Duration;

fn rec(i: u32) -> FlowRecord {
    FlowRecord {
        src_addr: Ipv4Addr::from(0x0a00_0000 + i).into(),
        dst_addr: Ipv4Addr::new(192, 0, 2, 1).into(),
        src_port: 1000,
        dst_port: 80,
        proto: 17,
        packets: 1,
        bytes: 100,
        start_ns: 1_704_067_200_000_000_000,
        end_ns: 1_704_067_200_000_000_000,
        dscp: Some(0),
        ..FlowRecord::default()
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

/// Set ids of a message, in order.
fn set_ids(msg: &[u8]) -> Vec<u16> {
    assert_eq!(be16(msg, 0), 10);
    assert_eq!(usize::from(be16(msg, 2)), msg.len());
    let mut at = 16;
    let mut ids = Vec::new();
    while at + 4 <= msg.len() {
        ids.push(be16(msg, at));
        at += usize::from(be16(msg, at + 2));
    }
    assert_eq!(at, msg.len(), "sets fill the message");
    ids
}

fn udp_pair(opts: &str) -> (UdpSocket, UdpExporter) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let port = sock.local_addr().unwrap().port();
    let cfg = IpfixConfig::from_url(&format!("ipfix://127.0.0.1:{port}{opts}")).unwrap();
    (sock, UdpExporter::connect(&cfg).unwrap())
}

fn recv(sock: &UdpSocket) -> Vec<u8> {
    let mut buf = vec![0u8; 65535];
    let n = sock.recv(&mut buf).unwrap();
    buf.truncate(n);
    buf
}

#[test]
fn udp_templates_come_again_after_the_refresh_interval() {
    let (sock, mut ex) = udp_pair("?refresh_messages=0");
    let mut cfg_time = IpfixConfig::from_url("ipfix://127.0.0.1:9").unwrap();
    cfg_time.refresh = Duration::from_millis(100);
    // The same with a 100 ms refresh (the URL takes whole seconds).
    let port = sock.local_addr().unwrap().port();
    cfg_time.collector = format!("127.0.0.1:{port}");
    cfg_time.refresh_messages = 0;
    let mut timed = UdpExporter::connect(&cfg_time).unwrap();
    for ex in [&mut ex, &mut timed] {
        ex.push(&rec(1));
        ex.flush();
        ex.push(&rec(2));
        ex.flush();
    }
    let first = recv(&sock);
    let second = recv(&sock);
    assert_eq!(set_ids(&first), [2, 256]);
    assert_eq!(set_ids(&second), [256], "no refresh within 60 s");
    assert_eq!(be32(&second, 8), 1, "one record before");
    let (t1, t2) = (recv(&sock), recv(&sock));
    assert_eq!(set_ids(&t1), [2, 256]);
    assert_eq!(set_ids(&t2), [256]);
    std::thread::sleep(Duration::from_millis(150));
    timed.push(&rec(3));
    timed.flush();
    let t3 = recv(&sock);
    assert_eq!(set_ids(&t3), [2, 256], "templates again after 100 ms");
    assert_eq!(be32(&t3, 8), 2);
    let report = timed.finish();
    assert_eq!((report.records, report.sent_records), (3, 3));
}

#[test]
fn udp_templates_come_again_every_n_messages() {
    let (sock, mut ex) = udp_pair("?refresh_messages=3&refresh_s=0");
    for i in 0..8 {
        ex.push(&rec(i));
        ex.flush();
    }
    let with_templates: Vec<bool> = (0..8).map(|_| set_ids(&recv(&sock))[0] == 2).collect();
    // Messages 1, 4 and 7 carry templates (the first, then after every 3).
    assert_eq!(
        with_templates,
        [true, false, false, true, false, false, true, false]
    );
}

/// Reads IPFIX messages from a TCP byte stream.
fn messages(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut at = 0;
    let mut out = Vec::new();
    while at + 4 <= bytes.len() {
        let len = usize::from(be16(bytes, at + 2));
        if len < 16 || at + len > bytes.len() {
            break; // a message cut by the broken connection
        }
        out.push(bytes[at..at + len].to_vec());
        at += len;
    }
    out
}

/// Data records of a message (every record here has the same length).
fn records_in(msg: &[u8], record_len: usize) -> usize {
    let mut at = 16;
    let mut n = 0;
    while at + 4 <= msg.len() {
        let (id, len) = (be16(msg, at), usize::from(be16(msg, at + 2)));
        if id >= 256 {
            n += (len - 4) / record_len;
        }
        at += len;
    }
    n
}

#[test]
fn tcp_reconnects_after_the_collector_drops_the_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let cfg =
        IpfixConfig::from_url(&format!("ipfix+tcp://127.0.0.1:{port}?linger_ms=10000")).unwrap();
    let mut ex = TcpExporter::start(&cfg).unwrap();
    for i in 0..600 {
        ex.push(&rec(i)).unwrap();
    }
    ex.flush().unwrap();
    // The first connection: read the first message, then drop it.
    let (mut c1, _) = listener.accept().unwrap();
    c1.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = [0u8; 16];
    c1.read_exact(&mut head).unwrap();
    assert_eq!(be32(&head, 8), 0, "a session starts at sequence 0");
    drop(c1);
    // Records after the break: the sender finds the connection dead and
    // makes a new one.
    for round in 0..20 {
        for i in 0..100 {
            ex.push(&rec(10_000 + round * 100 + i)).unwrap();
        }
        ex.flush().unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    let (mut c2, _) = listener.accept().unwrap();
    c2.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = c2.read_to_end(&mut bytes);
        bytes
    });
    let report = ex.finish().unwrap();
    let bytes = reader.join().unwrap();
    let msgs = messages(&bytes);
    assert!(!msgs.is_empty());
    assert_eq!(
        set_ids(&msgs[0])[0],
        2,
        "templates first on the new connection"
    );
    assert_eq!(be32(&msgs[0], 8), 0, "the new session counts from 0");
    // Record: 4+4+2+2+1+1+8·4+3 = 49 bytes.
    let on_second: usize = msgs.iter().map(|m| records_in(m, 49)).sum();
    let mut counted = 0u32;
    for m in &msgs {
        assert_eq!(be32(m, 8), counted, "sequence numbers on the new session");
        counted += records_in(m, 49) as u32;
    }
    assert_eq!(report.connections, 2);
    assert_eq!(report.records, 2600);
    assert_eq!(report.unsent_records, 0);
    // What the dead connection's kernel buffer took may be lost; what the
    // second connection carries was counted as sent.
    assert!(on_second > 0 && on_second as u64 <= report.sent_records);
    assert!(report.sent_records <= 2600);
}
