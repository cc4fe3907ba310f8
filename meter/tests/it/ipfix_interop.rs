//! The meter's IPFIX export read by the real Debian peers, on loopback:
//! nfcapd/nfdump and pmacct's nfacctd must count every flow with the
//! packets and bytes of the meter's own JSONL, and tshark must decode every
//! set of the stream without a malformed packet or an expert warning.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use qosloop_testkit::frames as support;

use qosloop_meter::pcap::linktype;
use qosloop_meter::PcapWriter;
use qosloop_schema::FlowRecord;
use std::collections::BTreeMap;
use std::net::{IpAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// The bound on every wait for a peer: generous, so that only a broken
/// peer or meter fails, not a busy machine.
const DEADLINE: Duration = Duration::from_secs(60);

/// Flow identity the peers print: addresses, ports (ICMP: type·256+code
/// in the destination port), protocol.
type Key = (IpAddr, IpAddr, u16, u16, u8);

/// A child process stopped when the test ends, pass or fail: with its
/// stop signal (nfcapd: TERM; nfacctd: INT — it ignores TERM and leaves
/// its plugin behind when killed), then KILL.
struct Proc(Child, &'static str);

impl Drop for Proc {
    fn drop(&mut self) {
        self.terminate();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// The stop signal, then wait up to 10 s (the peers write their files then).
    fn terminate(&mut self) {
        if let Ok(Some(_)) = self.0.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .arg(format!("-{}", self.1))
            .arg(self.0.id().to_string())
            .status();
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The UDP socket bound to local port `port` (IPv4 or IPv6), from
/// `/proc/net/udp{,6}`: (bytes queued for the reader, datagrams dropped);
/// `None` while nothing is bound to it.
fn udp_socket(port: u16) -> Option<(u64, u64)> {
    let suffix = format!(":{port:04X}");
    ["/proc/net/udp", "/proc/net/udp6"].iter().find_map(|path| {
        let text = std::fs::read_to_string(path).ok()?;
        text.lines().skip(1).find_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if !f.get(1)?.ends_with(&suffix) {
                return None;
            }
            let rx_queue = u64::from_str_radix(f.get(4)?.split_once(':')?.1, 16).ok()?;
            let drops = f.last()?.parse().ok()?;
            Some((rx_queue, drops))
        })
    })
}

/// Waits until `peer` has bound UDP `port` and its socket holds what
/// `ok` wants (e.g. an empty queue); fails after [`DEADLINE`] or when the
/// peer exited.
fn wait_socket(peer: &mut Proc, port: u16, what: &str, ok: impl Fn(u64, u64) -> bool) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let socket = udp_socket(port);
        if socket.is_some_and(|(rx_queue, drops)| ok(rx_queue, drops)) {
            return;
        }
        if let Ok(Some(status)) = peer.0.try_wait() {
            panic!("the peer exited {status} before {what}");
        }
        assert!(
            Instant::now() < deadline,
            "not within {DEADLINE:?}: {what} (udp port {port}: queued bytes, drops {socket:?})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The number of IPFIX messages the meter says it sent ("… sent in N
/// messages").
fn messages_sent(stderr: &str) -> usize {
    stderr
        .split(" sent in ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no message count in the meter's summary: {stderr}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A capture with IPv4 UDP/TCP/ICMP, IPv6 UDP and VLAN-tagged TCP flows:
/// enough records for several datagrams and every template shape the meter
/// produces.
fn write_traffic(path: &Path) {
    let mut frames: Vec<Vec<u8>> = Vec::new();
    for i in 0..200u32 {
        let src = ip(&format!("10.1.{}.{}", i / 200, 1 + i % 200));
        for p in 0..3 {
            frames.push(ethernet(
                &[],
                0x0800,
                &ipv4(
                    src,
                    ip("10.2.0.1"),
                    17,
                    p,
                    0,
                    &[],
                    &udp(20000 + i as u16, 53, 20 + (i as usize % 50) + p as usize),
                ),
            ));
        }
    }
    for i in 0..40u32 {
        let (a, b) = (ip(&format!("10.3.0.{}", 1 + i)), ip("10.4.0.1"));
        for (n, flags) in [0x02u8, 0x10, 0x18, 0x11].into_iter().enumerate() {
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
                    &tcp(30000 + i as u16, 443, n as u32, 0, flags, n * 100),
                ),
            ));
        }
    }
    for i in 0..10u16 {
        for s in 0..2 {
            frames.push(ethernet(
                &[],
                0x0800,
                &ipv4(
                    ip(&format!("10.5.0.{}", 1 + i)),
                    ip("10.6.0.1"),
                    1,
                    s,
                    0,
                    &[],
                    &icmp_echo(i, s, 56),
                ),
            ));
        }
    }
    for i in 0..30u16 {
        let src = ip(&format!("2001:db8:1::{:x}", 1 + i));
        for p in 0..2 {
            frames.push(ethernet(
                &[],
                0x86dd,
                &ipv6(
                    src,
                    ip("2001:db8:2::1"),
                    17,
                    false,
                    &udp(40000 + i, 123, 48 + p),
                ),
            ));
        }
    }
    for i in 0..10u32 {
        let (a, b) = (ip(&format!("10.7.0.{}", 1 + i)), ip("10.8.0.1"));
        for (n, flags) in [0x02u8, 0x18, 0x11].into_iter().enumerate() {
            frames.push(ethernet(
                &[100],
                0x0800,
                &ipv4(
                    a,
                    b,
                    6,
                    n as u16,
                    0x4000,
                    &[],
                    &tcp(50000 + i as u16, 80, n as u32, 0, flags, 10),
                ),
            ));
        }
    }
    let file = std::fs::File::create(path).unwrap();
    let mut w = PcapWriter::new(file, linktype::ETHERNET, 65535).unwrap();
    let t0 = 1_704_067_200_000_000_000u64; // 2024-01-01
    for (n, f) in frames.iter().enumerate() {
        w.write_packet(t0 + n as u64 * 1_000_000, f, f.len() as u32)
            .unwrap();
    }
}

/// Runs the meter over `pcap` with `--export` to each target and
/// `--records-out`; returns its records and its stderr.
fn run_meter(pcap: &Path, jsonl: &Path, exports: &[String]) -> (Vec<FlowRecord>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qosloop-meter"));
    cmd.arg("--pcap").arg(pcap).arg("--records-out").arg(jsonl);
    for e in exports {
        cmd.arg("--export").arg(e);
    }
    let o = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "meter failed: {stderr}");
    assert!(stderr.contains("as IPFIX"), "{stderr}");
    let records = std::fs::read_to_string(jsonl)
        .unwrap()
        .lines()
        .map(|l| FlowRecord::from_json_line(l).unwrap())
        .collect();
    (records, stderr.into_owned())
}

/// Packets and bytes per flow key, summed over the records (interim
/// records of one flow add up).
fn sums(records: &[FlowRecord]) -> BTreeMap<Key, (u64, u64)> {
    let mut m = BTreeMap::new();
    for r in records {
        let e = m
            .entry((r.src_addr, r.dst_addr, r.src_port, r.dst_port, r.proto))
            .or_insert((0, 0));
        e.0 += r.packets;
        e.1 += r.bytes;
    }
    m
}

/// Fails naming the first differences between a peer's flows and the
/// meter's.
fn assert_same(theirs: &BTreeMap<Key, (u64, u64)>, ours: &BTreeMap<Key, (u64, u64)>, peer: &str) {
    let mut diffs = Vec::new();
    for (k, v) in ours {
        if theirs.get(k) != Some(v) {
            diffs.push(format!("{k:?}: meter {v:?}, {peer} {:?}", theirs.get(k)));
        }
    }
    for (k, v) in theirs {
        if !ours.contains_key(k) {
            diffs.push(format!("{k:?}: only {peer} has it, {v:?}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} of {} flows differ between {peer} and the meter's JSONL, e.g.:\n{}",
        diffs.len(),
        ours.len(),
        diffs.iter().take(8).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// A destination port as a peer prints it: a number, or `TYPE.CODE` for ICMP.
fn peer_port(s: &str) -> u16 {
    match s.split_once('.') {
        Some((t, c)) => t.trim().parse::<u16>().unwrap() * 256 + c.trim().parse::<u16>().unwrap(),
        None => s.trim().parse().unwrap(),
    }
}

fn traffic(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let pcap = dir.join("traffic.pcap");
    write_traffic(&pcap);
    (pcap, dir.join("records.jsonl"))
}

#[test]
fn nfcapd_stores_every_flow_with_the_meters_counts() {
    let Some(nfcapd) = need_binary("nfcapd", "nfdump") else {
        return;
    };
    let Some(nfdump) = need_binary("nfdump", "nfdump") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (pcap, jsonl) = traffic(dir.path());
    let flows = dir.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    let port = free_udp_port();
    let mut peer = Proc(
        Command::new(nfcapd)
            .args(["-b", "127.0.0.1", "-p", &port.to_string(), "-w"])
            .arg(&flows)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        "TERM",
    );
    wait_socket(&mut peer, port, "nfcapd binds its socket", |_, _| true);
    let (records, _) = run_meter(
        &pcap,
        &jsonl,
        &[format!(
            "ipfix://127.0.0.1:{port}?domain=5&max_message=1000"
        )],
    );
    // The meter has sent everything; nfcapd has read it all (nothing
    // queued, nothing dropped) before it is told to write its file.
    wait_socket(&mut peer, port, "nfcapd reads every datagram", |q, _| {
        q == 0
    });
    let (_, drops) = udp_socket(port).unwrap();
    assert_eq!(drops, 0, "datagrams to nfcapd dropped by the kernel");
    peer.terminate(); // nfcapd writes its file on SIGTERM
    let out = Command::new(nfdump)
        .arg("-R")
        .arg(&flows)
        .args(["-q", "-N", "-o", "fmt:%sa|%da|%sp|%dp|%pr|%pkt|%byt"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut theirs: BTreeMap<Key, (u64, u64)> = BTreeMap::new();
    for line in text.lines().filter(|l| l.contains('|')) {
        let f: Vec<&str> = line.split('|').map(str::trim).collect();
        let proto: u8 = match f[4] {
            "TCP" => 6,
            "UDP" => 17,
            "ICMP" => 1,
            "ICMP6" => 58,
            p => p.parse().unwrap(),
        };
        let e = theirs
            .entry((
                ip(f[0]),
                ip(f[1]),
                f[2].parse().unwrap(),
                peer_port(f[3]),
                proto,
            ))
            .or_insert((0, 0));
        e.0 += f[5].parse::<u64>().unwrap();
        e.1 += f[6].parse::<u64>().unwrap();
    }
    let ours = sums(&records);
    assert_eq!(ours.len(), 290, "the capture's flows");
    assert_same(&theirs, &ours, "nfdump");
}

#[test]
fn nfacctd_counts_every_flow_like_the_meter() {
    let Some(nfacctd) = need_binary("nfacctd", "pmacct") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (pcap, jsonl) = traffic(dir.path());
    let port = free_udp_port();
    let csv = dir.path().join("nfacctd.csv");
    let conf = dir.path().join("nfacctd.conf");
    std::fs::write(
        &conf,
        format!(
            "daemonize: false\n\
             nfacctd_ip: 127.0.0.1\n\
             nfacctd_port: {port}\n\
             nfacctd_time_new: true\n\
             plugins: print[p]\n\
             aggregate[p]: src_host, dst_host, src_port, dst_port, proto\n\
             print_output[p]: csv\n\
             print_output_file[p]: {}\n\
             print_output_file_append[p]: true\n\
             print_refresh_time[p]: 1\n",
            csv.display()
        ),
    )
    .unwrap();
    let log = dir.path().join("nfacctd.log");
    let mut peer = Proc(
        Command::new(nfacctd)
            .arg("-f")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
        "INT",
    );
    // Ready: the core waits for data on its socket and the print plugin
    // has been through its loop once (what the core reads before the
    // plugin runs is not accounted).
    wait_socket(&mut peer, port, "nfacctd binds its socket", |_, _| true);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("waiting for NetFlow/IPFIX data")
            && text.contains("( p/print ): *** Purging cache - END")
        {
            break;
        }
        if let Ok(Some(status)) = peer.0.try_wait() {
            panic!("nfacctd exited {status}: {text}");
        }
        assert!(
            Instant::now() < deadline,
            "nfacctd not ready within {DEADLINE:?}: {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (records, _) = run_meter(&pcap, &jsonl, &[format!("ipfix://127.0.0.1:{port}")]);
    // pmacct keeps ICMP type and code out of the ports: ICMP flows compare
    // with destination port 0.
    let ours: BTreeMap<Key, (u64, u64)> = sums(&records)
        .into_iter()
        .map(|((s, d, sp, dp, p), v)| ((s, d, sp, if p == 1 || p == 58 { 0 } else { dp }, p), v))
        .collect();
    // The print plugin writes once a second; wait until every flow is in
    // (a difference after the deadline is reported below).
    let until = Instant::now() + DEADLINE;
    let mut theirs = read_nfacctd_csv(&csv);
    while theirs != ours && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(200));
        theirs = read_nfacctd_csv(&csv);
    }
    peer.terminate();
    assert_eq!(ours.len(), 290, "the capture's flows");
    assert_same(&theirs, &ours, "nfacctd");
}

fn read_nfacctd_csv(path: &Path) -> BTreeMap<Key, (u64, u64)> {
    let mut m: BTreeMap<Key, (u64, u64)> = BTreeMap::new();
    let Ok(text) = std::fs::read_to_string(path) else {
        return m;
    };
    let mut cols: Vec<String> = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(',').collect();
        if f.first().is_some_and(|c| c.starts_with("SRC_IP")) {
            cols = f.iter().map(|s| s.to_string()).collect();
            continue;
        }
        let col = |name: &str| {
            let i = cols
                .iter()
                .position(|c| c == name)
                .unwrap_or_else(|| panic!("no column {name} in {cols:?}"));
            f[i]
        };
        if cols.is_empty() {
            continue;
        }
        let proto: u8 = match col("PROTOCOL").to_ascii_lowercase().as_str() {
            "tcp" => 6,
            "udp" => 17,
            "icmp" => 1,
            "ipv6-icmp" | "icmp6" => 58,
            p => p.parse().unwrap(),
        };
        let e = m
            .entry((
                ip(col("SRC_IP")),
                ip(col("DST_IP")),
                col("SRC_PORT").parse().unwrap(),
                col("DST_PORT").parse().unwrap(),
                proto,
            ))
            .or_insert((0, 0));
        e.0 += col("PACKETS").parse::<u64>().unwrap();
        e.1 += col("BYTES").parse::<u64>().unwrap();
    }
    m
}

/// The UDP datagrams the meter sends, received on a socket of the test's
/// own and written as a capture (IPv4/UDP frames) for tshark: every one of
/// the messages the meter says it sent.
fn capture_stream(pcap: &Path, jsonl: &Path, out: &Path, opts: &str) -> (u16, usize, Vec<Vec<u8>>) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = sock.local_addr().unwrap().port();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    // The number of messages, known once the meter has finished.
    let (sent_tx, sent_rx) = std::sync::mpsc::channel::<usize>();
    let receiver = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65535];
        let mut sent = None;
        // Bounded: until every message sent is in, or the deadline.
        let deadline = Instant::now() + DEADLINE;
        while sent.is_none_or(|n| got.len() < n) && Instant::now() < deadline {
            if sent.is_none() {
                sent = sent_rx.try_recv().ok();
            }
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                got.push((from.port(), buf[..n].to_vec()));
            }
        }
        got
    });
    let (records, stderr) = run_meter(pcap, jsonl, &[format!("ipfix://127.0.0.1:{port}{opts}")]);
    let sent = messages_sent(&stderr);
    sent_tx.send(sent).unwrap();
    let datagrams = receiver.join().unwrap();
    assert_eq!(
        datagrams.len(),
        sent,
        "datagrams received of the messages the meter sent: {stderr}"
    );
    write_stream(out, port, &datagrams);
    (
        port,
        records.len(),
        datagrams.into_iter().map(|(_, d)| d).collect(),
    )
}

/// Writes datagrams to `port` as a capture of IPv4/UDP frames.
fn write_stream(out: &Path, port: u16, datagrams: &[(u16, Vec<u8>)]) {
    let file = std::fs::File::create(out).unwrap();
    let mut w = PcapWriter::new(file, linktype::ETHERNET, 65535).unwrap();
    for (n, (sport, d)) in datagrams.iter().enumerate() {
        let mut u = Vec::with_capacity(8 + d.len());
        u.extend_from_slice(&sport.to_be_bytes());
        u.extend_from_slice(&port.to_be_bytes());
        u.extend_from_slice(&((8 + d.len()) as u16).to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.extend_from_slice(d);
        let frame = ethernet(
            &[],
            0x0800,
            &ipv4(
                ip("127.0.0.1"),
                ip("127.0.0.1"),
                17,
                n as u16,
                0x4000,
                &[],
                &u,
            ),
        );
        w.write_packet(
            1_704_067_300_000_000_000 + n as u64 * 1000,
            &frame,
            frame.len() as u32,
        )
        .unwrap();
        assert!(8 + d.len() <= 1400, "a datagram of {} bytes", d.len());
    }
}

#[test]
fn tshark_decodes_every_set_without_warnings() {
    let Some(tshark) = need_binary("tshark", "tshark") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (pcap, jsonl) = traffic(dir.path());
    let stream = dir.path().join("ipfix.pcap");
    // A refresh every 5 messages puts template sets amid the data too.
    let (port, n_records, datagrams) =
        capture_stream(&pcap, &jsonl, &stream, "?refresh_messages=5");
    let decode = format!("udp.port=={port},cflow");
    // No malformed packet, no expert item of warning severity or worse.
    let bad = Command::new(&tshark)
        .args(["-n", "-r"])
        .arg(&stream)
        .args([
            "-d",
            &decode,
            "-Y",
            "_ws.malformed || _ws.expert.severity >= 6291456",
        ])
        .output()
        .unwrap();
    assert!(
        bad.status.success(),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&bad.stdout).trim(),
        "",
        "malformed or warned packets"
    );
    // The same filter catches a broken message: the first template's field
    // count overruns its set.
    let mut broken = datagrams[0].clone();
    assert_eq!(
        &broken[16..18],
        &[0, 2],
        "the stream starts with a template set"
    );
    broken[22..24].copy_from_slice(&[0, 200]);
    let broken_pcap = dir.path().join("broken.pcap");
    write_stream(&broken_pcap, port, &[(40000, broken)]);
    let caught = Command::new(&tshark)
        .args(["-n", "-r"])
        .arg(&broken_pcap)
        .args([
            "-d",
            &decode,
            "-Y",
            "_ws.malformed || _ws.expert.severity >= 6291456",
        ])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&caught.stdout).trim().is_empty(),
        "the filter sees a broken set"
    );
    // Every data record decoded: tshark's per-record packet counters.
    let fields = Command::new(&tshark)
        .args(["-n", "-r"])
        .arg(&stream)
        .args([
            "-d",
            &decode,
            "-T",
            "fields",
            "-E",
            "occurrence=a",
            "-E",
            "aggregator=;",
            "-e",
            "cflow.packets",
            "-e",
            "cflow.version",
            "-e",
            "cflow.sequence",
        ])
        .output()
        .unwrap();
    assert!(
        fields.status.success(),
        "{}",
        String::from_utf8_lossy(&fields.stderr)
    );
    let text = String::from_utf8_lossy(&fields.stdout);
    let mut decoded = 0usize;
    let mut expect_seq = 0u64;
    for line in text.lines() {
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols[1], "10", "IPFIX version in {line:?}");
        // Sequence numbers count the data records before each message.
        assert_eq!(cols[2].parse::<u64>().unwrap(), expect_seq, "{line:?}");
        let n = cols[0].split(';').filter(|s| !s.is_empty()).count();
        decoded += n;
        expect_seq += n as u64;
    }
    assert_eq!(decoded, n_records, "records tshark decoded");
}

/// Runs the meter with extra flags; returns (success, stderr).
fn meter_with(pcap: &Path, jsonl: &Path, extra: &[String]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_qosloop-meter"))
        .arg("--pcap")
        .arg(pcap)
        .arg("--records-out")
        .arg(jsonl)
        .args(extra)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn crane_and_ipfix_targets_together_keep_each_contract() {
    let dir = tempfile::tempdir().unwrap();
    let (pcap, jsonl) = traffic(dir.path());
    // Nothing listens on the crane:// port: its records spool, the run
    // still succeeds (DESIGN.md §3), and the IPFIX copy goes out.
    let dead = free_udp_port();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    // The meter has finished before the read: the datagram is there, the
    // timeout only turns a lost one into a failure.
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    let port = sock.local_addr().unwrap().port();
    let spool = dir.path().join("spool");
    let (ok, stderr) = meter_with(
        &pcap,
        &jsonl,
        &[
            "--export".into(),
            format!("crane://127.0.0.1:{dead}"),
            "--export".into(),
            format!("ipfix://127.0.0.1:{port}"),
            "--export-spool".into(),
            spool.display().to_string(),
        ],
    );
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("NOT acknowledged and left in the spool"),
        "{stderr}"
    );
    assert!(stderr.contains("as IPFIX"), "{stderr}");
    let mut buf = [0u8; 2048];
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..2], &[0, 10], "an IPFIX message, {n} bytes");
    // IPFIX over TCP to nobody: after the linger time the records are
    // unsent and the run fails, naming them.
    let (ok, stderr) = meter_with(
        &pcap,
        &jsonl,
        &[
            "--export".into(),
            format!("ipfix+tcp://127.0.0.1:{dead}?linger_ms=300&connect_timeout_ms=100"),
        ],
    );
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("NOT sent"), "{stderr}");
}
