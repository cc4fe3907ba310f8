//! Round trip: the meter's IPFIX export, captured on a loopback socket,
//! decoded by the collector's IPFIX decoder — every field survives
//! (addresses, ports, protocol, packets, bytes, start/end at the export's
//! millisecond precision, VLAN, DSCP, TCP flags, ICMP type/code, class,
//! user, process, sampling interval). Over UDP from the meter itself (a
//! generated capture, classes from field rules) and from the exporter with
//! records that use every optional field; over TCP with the collector
//! coming up only after records were queued; and through the
//! `qosloop-collector` binary (`--ipfix-listen`) into SQLite.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use qosloop_testkit::frames as support;

use qosloop_collector::ipfix::{ipfix_message_len, Decoder, Limits};
use qosloop_exporter::ipfix::tcp::TcpExporter;
use qosloop_exporter::ipfix::udp::UdpExporter;
use qosloop_exporter::ipfix::IpfixConfig;
use qosloop_meter::pcap::linktype;
use qosloop_meter::{run_file, Config, MultiSink, PcapWriter, Progress, RecordSink, VecSink};
use qosloop_schema::FlowRecord;
use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// What the export keeps of a record: times in whole milliseconds.
fn at_export_precision(r: &FlowRecord) -> FlowRecord {
    FlowRecord {
        start_ns: r.start_ns / 1_000_000 * 1_000_000,
        end_ns: r.end_ns / 1_000_000 * 1_000_000,
        ..r.clone()
    }
}

fn sorted(mut v: Vec<FlowRecord>) -> Vec<FlowRecord> {
    v.sort_by_key(|r| format!("{r:?}"));
    v
}

/// Receives datagrams on a fresh loopback socket until 0.5 s after the
/// last one (at most 100 000): the capture of the stream.
/// Datagrams with their sources, in arrival order.
type Captured = Vec<(SocketAddr, Vec<u8>)>;

fn receiver() -> (u16, std::thread::JoinHandle<Captured>) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = sock.local_addr().unwrap().port();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let handle = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65535];
        let started = Instant::now();
        while got.len() < 100_000 && started.elapsed() < Duration::from_secs(60) {
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => got.push((from, buf[..n].to_vec())),
                Err(_) if !got.is_empty() => break,
                Err(_) => {}
            }
        }
        got
    });
    (port, handle)
}

fn decode_udp(datagrams: &[(SocketAddr, Vec<u8>)]) -> Vec<FlowRecord> {
    let mut dec = Decoder::new(Limits::default());
    let mut out = Vec::new();
    for (from, d) in datagrams {
        dec.decode_udp(*from, d, 1_704_067_300_000_000_000, &mut out)
            .unwrap();
    }
    for s in dec.stats() {
        let drops: Vec<_> = s.counters.nonzero_drops().collect();
        assert!(drops.is_empty(), "decoder drops: {drops:?}");
    }
    out
}

fn write_traffic(path: &Path) {
    let mut frames: Vec<Vec<u8>> = Vec::new();
    for i in 0..60u16 {
        // Voice on VLAN 100 (class voice-vlan from the field rules).
        let src = ip(&format!("10.1.0.{}", 1 + i));
        for p in 0..3 {
            frames.push(ethernet(
                &[100],
                0x0800,
                &ipv4(
                    src,
                    ip("10.2.0.1"),
                    17,
                    p,
                    0,
                    &[],
                    &udp(7000 + i, 16400 + i, 100 + p as usize),
                ),
            ));
        }
    }
    for i in 0..30u16 {
        let (a, b) = (ip(&format!("10.3.0.{}", 1 + i)), ip("10.4.0.1"));
        for (n, flags) in [0x02u8, 0x18, 0x11].into_iter().enumerate() {
            frames.push(ethernet(
                &[],
                0x0800,
                &ipv4(
                    a,
                    b,
                    6,
                    n as u16,
                    0x4000,
                    &[],
                    &tcp(30000 + i, 443, n as u32, 0, flags, n * 200),
                ),
            ));
        }
    }
    for i in 0..5u16 {
        frames.push(ethernet(
            &[],
            0x0800,
            &ipv4(
                ip(&format!("10.5.0.{}", 1 + i)),
                ip("10.6.0.1"),
                1,
                i,
                0,
                &[],
                &icmp_echo(i, 1, 32),
            ),
        ));
        let mut echo6 = icmp_echo(i, 1, 32);
        echo6[0] = 128;
        frames.push(ethernet(
            &[],
            0x86dd,
            &ipv6(
                ip(&format!("2001:db8::{}", 1 + i)),
                ip("2001:db8::ff"),
                58,
                false,
                &echo6,
            ),
        ));
        frames.push(ethernet(
            &[],
            0x86dd,
            &ipv6(
                ip(&format!("2001:db8:1::{}", 1 + i)),
                ip("2001:db8:2::1"),
                17,
                false,
                &udp(5000 + i, 53, 40),
            ),
        ));
    }
    let file = std::fs::File::create(path).unwrap();
    let mut w = PcapWriter::new(file, linktype::ETHERNET, 65535).unwrap();
    let t0 = 1_704_067_200_123_456_789u64;
    for (n, f) in frames.iter().enumerate() {
        // 3.7 ms apart: start and end times with sub-millisecond parts.
        w.write_packet(t0 + n as u64 * 3_700_001, f, f.len() as u32)
            .unwrap();
    }
}

/// Runs the meter (in-process, its real sinks) over a generated capture
/// with class rules, exporting IPFIX to a loopback socket of the test's;
/// returns its own records and the datagrams it sent.
fn meter_export(dir: &Path) -> (Vec<FlowRecord>, Captured) {
    let pcap = dir.join("t.pcap");
    write_traffic(&pcap);
    let rules = dir.join("fields.toml");
    std::fs::write(
        &rules,
        "[[filter]]\nid = 0\nclass = \"voice-vlan\"\nvlan_tci = 100\nip_proto = 17\n\n\
         [[filter]]\nid = 1\nclass = \"web\"\nip_proto = 6\ndst_port = 443\n",
    )
    .unwrap();
    let (port, rx) = receiver();
    let target = format!("ipfix://127.0.0.1:{port}?domain=42&max_message=700");
    let config = Config {
        pcap: Some(pcap.clone()),
        field_rules: vec![rules],
        export: vec![target.clone()],
        ..Config::default()
    };
    let validated = config.validate().unwrap();
    let mine = VecSink::default();
    let ipfix = qosloop_meter::ipfix_sink::IpfixSink::start(
        &target,
        &IpfixConfig::from_url(&target).unwrap(),
    )
    .unwrap();
    let mut sink = MultiSink(vec![Box::new(mine.clone()), Box::new(ipfix)]);
    let summary = run_file(
        &pcap,
        validated.pipeline,
        Arc::new(validated.classifier),
        &mut sink as &mut dyn RecordSink,
        Progress::Never,
    )
    .unwrap();
    assert!(summary.sink.unwrap_or_default().contains("as IPFIX"));
    let datagrams = rx.join().unwrap();
    assert!(datagrams.len() > 3, "several datagrams");
    assert!(datagrams.iter().all(|(_, d)| d.len() <= 700));
    let records = mine.records();
    assert_eq!(records.len(), 105, "one record per flow of the capture");
    assert!(records
        .iter()
        .any(|r| r.class.as_deref() == Some("voice-vlan") && r.vlan == Some(100)));
    assert!(records
        .iter()
        .any(|r| r.class.as_deref() == Some("web") && r.tcp_flags == Some(0x1b)));
    assert!(records
        .iter()
        .any(|r| r.proto == 58 && r.dst_port == 128 * 256));
    (records, datagrams)
}

fn assert_same_records(got: Vec<FlowRecord>, sent: &[FlowRecord]) {
    let want = sorted(sent.iter().map(at_export_precision).collect());
    let got = sorted(got);
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g, w);
    }
}

#[test]
fn the_meters_udp_export_decodes_to_its_own_records() {
    let dir = tempfile::tempdir().unwrap();
    let (records, datagrams) = meter_export(dir.path());
    assert_same_records(decode_udp(&datagrams), &records);
}

/// Records using every optional field, IPv4 and IPv6, with strings long
/// enough for the 3-byte length form and for cutting.
fn rich_records() -> Vec<FlowRecord> {
    (0..500u64)
        .map(|i| {
            let v6 = i % 3 == 0;
            let (src, dst) = if v6 {
                (
                    ip(&format!("2001:db8::{:x}", i + 1)),
                    ip("2001:db8:ffff::1"),
                )
            } else {
                (
                    ip(&format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256)),
                    ip("192.0.2.1"),
                )
            };
            let proto = match i % 4 {
                0 => 6,
                1 => 17,
                2 if v6 => 58,
                2 => 1,
                _ => 132,
            };
            FlowRecord {
                src_addr: src,
                dst_addr: dst,
                src_port: if proto == 1 || proto == 58 {
                    0
                } else {
                    1000 + i as u16
                },
                dst_port: if proto == 1 || proto == 58 {
                    3 * 256 + 1
                } else {
                    80
                },
                proto,
                packets: 1 + i * 1_000_003,
                bytes: 40 + i * 5_000_000_011,
                start_ns: 1_704_067_200_000_000_000 + i * 1_234_567,
                end_ns: 1_704_067_200_000_000_000 + i * 1_234_567 + 999_999_999,
                vlan: (i % 2 == 0).then_some((i % 4095) as u16 + 1),
                dscp: Some((i % 64) as u8),
                tcp_flags: (proto == 6).then_some(0x1ff & i as u16),
                class: (i % 5 != 0).then(|| format!("class-{i}")),
                user: (i % 2 == 1).then(|| "ü".repeat(1 + (i as usize % 150))),
                process: (i % 7 != 0).then(|| format!("/usr/bin/p{i}")),
                sampling_interval: (i % 10 == 0).then_some(100),
            }
        })
        .collect()
}

#[test]
fn every_field_survives_udp_export_and_decoding() {
    // Unpadded sets (the default) and sets padded to 4 bytes.
    for opts in ["?refresh_messages=7", "?refresh_messages=7&pad=1"] {
        let (port, rx) = receiver();
        let cfg = IpfixConfig::from_url(&format!("ipfix://127.0.0.1:{port}{opts}")).unwrap();
        let mut ex = UdpExporter::connect(&cfg).unwrap();
        let recs = rich_records();
        for r in &recs {
            ex.push(r);
        }
        let report = ex.finish();
        assert_eq!(report.sent_records, recs.len() as u64);
        assert_eq!(report.dropped_records, 0);
        let datagrams = rx.join().unwrap();
        assert!(datagrams.iter().all(|(_, d)| d.len() <= 1392));
        assert_same_records(decode_udp(&datagrams), &recs);
    }
}

#[test]
fn tcp_export_queues_until_the_collector_comes_and_decodes_whole() {
    // A port with no listener yet: the exporter retries with backoff.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = IpfixConfig::from_url(&format!(
        "ipfix+tcp://127.0.0.1:{port}?linger_ms=20000&max_message=4000"
    ))
    .unwrap();
    let mut ex = TcpExporter::start(&cfg).unwrap();
    let recs = rich_records();
    for r in &recs {
        ex.push(r).unwrap();
    }
    ex.flush().unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let reader = std::thread::spawn(move || {
        let (mut conn, from) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut bytes = Vec::new();
        conn.read_to_end(&mut bytes).unwrap();
        (from, bytes)
    });
    let report = ex.finish().unwrap();
    assert_eq!(report.sent_records, recs.len() as u64);
    assert_eq!((report.unsent_records, report.dropped_records), (0, 0));
    assert_eq!(report.connections, 1);
    let (from, bytes) = reader.join().unwrap();
    let mut dec = Decoder::new(Limits::default());
    let mut got = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len = ipfix_message_len(&bytes[at..]).unwrap().unwrap();
        assert!(len <= 4000);
        dec.decode_tcp(from, 1, &bytes[at..at + len], 0, &mut got)
            .unwrap();
        at += len;
    }
    let want = sorted(recs.iter().map(at_export_precision).collect());
    let got = sorted(got);
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g, w);
    }
}

/// The collector binary next to this test's target directory, or why not.
fn collector_binary() -> Result<std::path::PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // Test binaries live in target/PROFILE/deps.
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("no target directory")?;
    let bin = dir.join("qosloop-collector");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "{} not built: cargo build -p qosloop-collector first",
            bin.display()
        ))
    }
}

/// True once a UDP socket is bound to 127.0.0.1:`port`.
fn udp_bound(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/udp")
        .map(|t| {
            t.lines()
                .any(|l| l.split_whitespace().nth(1) == Some(&want))
        })
        .unwrap_or(false)
}

/// Stops the collector (SIGTERM, then SIGKILL) also when the test fails.
struct Collector(std::process::Child);

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_collector_binary_stores_the_meters_ipfix_in_sqlite() {
    let bin = qosloop_testbed::need!(collector_binary());
    let dir = tempfile::tempdir().unwrap();
    let (records, datagrams) = meter_export(dir.path());
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let db = dir.path().join("flows.db");
    let log = std::fs::File::create(dir.path().join("collector.log")).unwrap();
    let _collector = Collector(
        std::process::Command::new(bin)
            .arg("--ipfix-listen")
            .arg(format!("udp://127.0.0.1:{port}"))
            .arg("--db")
            .arg(format!("sqlite://{}", db.display()))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let until = Instant::now() + Duration::from_secs(20);
    while !udp_bound(port) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(udp_bound(port), "the collector did not bind UDP {port}");
    // The capture replayed from one socket, as the meter sent it.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    for (_, d) in &datagrams {
        sock.send_to(d, ("127.0.0.1", port)).unwrap();
        std::thread::sleep(Duration::from_micros(200));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stored = rt.block_on(async {
        let url = format!("sqlite://{}", db.display());
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM flows")
                .fetch_one(&pool)
                .await
                .unwrap_or(0);
            if n as usize >= records.len() || Instant::now() > until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let rows: Vec<FlowRecord> = sqlx::query(
            "SELECT src_addr, dst_addr, src_port, dst_port, proto, packets, bytes, start_ns, end_ns, \
             vlan, dscp, tcp_flags, class, \"user\", process, sampling_interval FROM flows",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
        .iter()
        .map(stored_record)
        .collect();
        pool.close().await;
        rows
    });
    assert_same_records(stored, &records);
}

/// A `flows` row back into a record.
fn stored_record(row: &sqlx::sqlite::SqliteRow) -> FlowRecord {
    use sqlx::Row;
    let int = |c: &str| row.get::<i64, _>(c);
    let opt = |c: &str| row.get::<Option<i64>, _>(c);
    FlowRecord {
        src_addr: row.get::<String, _>("src_addr").parse().unwrap(),
        dst_addr: row.get::<String, _>("dst_addr").parse().unwrap(),
        src_port: int("src_port") as u16,
        dst_port: int("dst_port") as u16,
        proto: int("proto") as u8,
        packets: int("packets") as u64,
        bytes: int("bytes") as u64,
        start_ns: int("start_ns") as u64,
        end_ns: int("end_ns") as u64,
        vlan: opt("vlan").map(|v| v as u16),
        dscp: opt("dscp").map(|v| v as u8),
        tcp_flags: opt("tcp_flags").map(|v| v as u16),
        class: row.get("class"),
        user: row.get("user"),
        process: row.get("process"),
        sampling_interval: opt("sampling_interval").map(|v| v as u32),
    }
}
