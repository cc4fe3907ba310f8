//! The meter's per-flow counts against tshark's conversation statistics on
//! a capture this test generates: TCP/UDP/ICMP, IPv4/IPv6, VLAN and QinQ,
//! IPv4 options, fragments, truncated and non-IP frames, pcap and pcapng.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use qosloop_testkit::frames as support;

use qosloop_meter::pcap::linktype;
use qosloop_meter::{PcapWriter, PcapngWriter};
use qosloop_schema::FlowRecord;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use support::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

struct Frame {
    ts_ns: u64,
    data: Vec<u8>,
    orig_len: u32,
}

/// The generated traffic, and for each address pair the link-layer header
/// length of its frames (so frame bytes convert to IP bytes).
fn traffic() -> (Vec<Frame>, BTreeMap<(IpAddr, IpAddr), u64>) {
    let mut frames = Vec::new();
    let mut link: BTreeMap<(IpAddr, IpAddr), u64> = BTreeMap::new();
    let t0 = 1_700_000_000_000_000_000u64;
    let mut t = t0;
    let mut push = |data: Vec<u8>, t: &mut u64| {
        *t += 7_000_000; // 7 ms apart: interim records every second split long flows
        let orig_len = data.len() as u32;
        frames.push(Frame {
            ts_ns: *t,
            data,
            orig_len,
        });
    };
    let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
    let (c, d) = (ip("10.0.1.1"), ip("10.0.1.2"));
    let (e, f) = (ip("192.168.5.1"), ip("192.168.5.2"));
    let (g, h) = (ip("10.9.0.1"), ip("10.9.0.2"));
    let (o1, o2) = (ip("10.7.0.1"), ip("10.7.0.2"));
    let (x, y) = (ip("2001:db8::1"), ip("2001:db8::2"));
    let (ix, iy) = (ip("2001:db8:1::1"), ip("2001:db8:1::2"));
    for (p, l) in [
        ((a, b), 14),
        ((c, d), 18),
        ((e, f), 14),
        ((g, h), 22),
        ((o1, o2), 14),
        ((x, y), 14),
        ((ix, iy), 14),
    ] {
        link.insert(p, l);
    }
    for round in 0..60u32 {
        // TCP a:40000 <-> b:80, handshake, data both ways, FIN both ways.
        let flags = match round {
            0 => 0x02,
            59 => 0x11,
            _ => 0x18,
        };
        push(
            ethernet(
                &[],
                0x0800,
                &ipv4(
                    a,
                    b,
                    6,
                    round as u16,
                    0x4000,
                    &[],
                    &tcp(40000, 80, round, 0, flags, (round % 4) as usize * 5),
                ),
            ),
            &mut t,
        );
        let back = if round == 0 {
            0x12
        } else if round == 59 {
            0x11
        } else {
            0x10
        };
        push(
            ethernet(
                &[],
                0x0800,
                &ipv4(
                    b,
                    a,
                    6,
                    round as u16,
                    0x4000,
                    &[],
                    &tcp(80, 40000, round, round, back, 0),
                ),
            ),
            &mut t,
        );
        // UDP c:5000 -> d:53 in VLAN 100, answers back.
        push(
            ethernet(
                &[100],
                0x0800,
                &ipv4(
                    c,
                    d,
                    17,
                    1,
                    0,
                    &[],
                    &udp(5000, 53, 20 + (round % 5) as usize),
                ),
            ),
            &mut t,
        );
        if round % 2 == 0 {
            push(
                ethernet(
                    &[100],
                    0x0800,
                    &ipv4(d, c, 17, 1, 0, &[], &udp(53, 5000, 60)),
                ),
                &mut t,
            );
        }
        // A second UDP flow on the same pair.
        if round % 4 == 0 {
            push(
                ethernet(
                    &[100],
                    0x0800,
                    &ipv4(c, d, 17, 2, 0, &[], &udp(5001, 123, 48)),
                ),
                &mut t,
            );
        }
        // ICMP echo e -> f.
        if round % 4 == 0 {
            push(
                ethernet(
                    &[],
                    0x0800,
                    &ipv4(e, f, 1, 9, 0, &[], &icmp_echo(7, round as u16, 56)),
                ),
                &mut t,
            );
        }
        // QinQ UDP g -> h.
        if round % 5 == 0 {
            push(
                ethernet(
                    &[10, 20],
                    0x0800,
                    &ipv4(g, h, 17, 3, 0, &[], &udp(7000, 7001, 100)),
                ),
                &mut t,
            );
        }
        // IPv4 with options (router alert, 4 bytes) o1 -> o2.
        if round % 6 == 0 {
            push(
                ethernet(
                    &[],
                    0x0800,
                    &ipv4(o1, o2, 17, 4, 0, &[0x94, 0x04, 0, 0], &udp(1111, 2222, 30)),
                ),
                &mut t,
            );
        }
        // IPv6 UDP with hop-by-hop, and IPv6 TCP.
        if round % 2 == 1 {
            push(
                ethernet(&[], 0x86dd, &ipv6(x, y, 17, true, &udp(6000, 6001, 40))),
                &mut t,
            );
            push(
                ethernet(
                    &[],
                    0x86dd,
                    &ipv6(y, x, 6, false, &tcp(443, 50000, round, 0, 0x10, 10)),
                ),
                &mut t,
            );
        }
        // ICMPv6 echo.
        if round % 10 == 0 {
            let mut echo = icmp_echo(1, round as u16, 8);
            echo[0] = 128;
            push(
                ethernet(&[], 0x86dd, &ipv6(ix, iy, 58, false, &echo)),
                &mut t,
            );
        }
    }
    // Truncated frames (inside Ethernet, inside the IP header), ARP.
    push(vec![0xff; 10], &mut t);
    let mut short = ethernet(&[], 0x0800, &ipv4(a, b, 17, 5, 0, &[], &udp(1, 2, 10)));
    short.truncate(14 + 12);
    let orig = 14 + 20 + 18;
    push(ethernet(&[], 0x0806, &[0u8; 28]), &mut t);
    frames_push_with_orig(&mut frames, short, orig, &mut t);
    (frames, link)
}

fn frames_push_with_orig(frames: &mut Vec<Frame>, data: Vec<u8>, orig_len: u32, t: &mut u64) {
    *t += 7_000_000;
    frames.push(Frame {
        ts_ns: *t,
        data,
        orig_len,
    });
}

/// Fragmented UDP (1400 data bytes in three fragments) 10.5.0.1 -> 10.5.0.2.
fn fragments(frames: &mut Vec<Frame>, link: &mut BTreeMap<(IpAddr, IpAddr), u64>) {
    let (s, d) = (ip("10.5.0.1"), ip("10.5.0.2"));
    link.insert((s, d), 14);
    let datagram = udp(9000, 9001, 1400);
    let mut t = frames.last().map_or(0, |f| f.ts_ns);
    for (i, chunk) in datagram.chunks(480).enumerate() {
        let offset = (i * 480 / 8) as u16;
        let more = if (i + 1) * 480 < datagram.len() {
            0x2000
        } else {
            0
        };
        t += 1_000_000;
        let data = ethernet(
            &[],
            0x0800,
            &ipv4(s, d, 17, 0x4242, more | offset, &[], chunk),
        );
        frames.push(Frame {
            ts_ns: t,
            orig_len: data.len() as u32,
            data,
        });
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Count {
    packets: u64,
    bytes: u64,
}

/// tshark's conversations of one kind: unordered endpoint pair → total
/// frames and frame bytes.
fn tshark_conv(tshark: &Path, file: &Path, kind: &str) -> BTreeMap<(String, String), Count> {
    let out = Command::new(tshark)
        .args(["-n", "-q", "-r"])
        .arg(file)
        .args(["-z", &format!("conv,{kind}")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tshark: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut convs = BTreeMap::new();
    for line in text.lines() {
        let tok: Vec<&str> = line.split_whitespace().collect();
        if tok.len() < 12 || tok[1] != "<->" {
            continue;
        }
        assert_eq!(
            tok[11], "bytes",
            "tshark printed a unit other than bytes: {line}"
        );
        let (p, b) = (tok[9].parse().unwrap(), tok[10].parse().unwrap());
        let (x, y) = (tok[0].to_owned(), tok[2].to_owned());
        let key = if x <= y { (x, y) } else { (y, x) };
        convs.insert(
            key,
            Count {
                packets: p,
                bytes: b,
            },
        );
    }
    convs
}

fn endpoint(a: IpAddr, port: Option<u16>) -> String {
    match (a, port) {
        (IpAddr::V6(_), Some(p)) => format!("{a}:{p}"),
        (_, Some(p)) => format!("{a}:{p}"),
        (_, None) => a.to_string(),
    }
}

fn pair(a: String, b: String) -> (String, String) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

fn run_meter(pcap: &Path, out: &Path) -> (Vec<FlowRecord>, String) {
    run_meter_with(pcap, out, &[])
}

fn run_meter_with(pcap: &Path, out: &Path, extra: &[&str]) -> (Vec<FlowRecord>, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_qosloop-meter"))
        .arg("--pcap")
        .arg(pcap)
        .arg("--records-out")
        .arg(out)
        .args(["--interim-ms", "1000"])
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "meter failed: {stderr}");
    let text = std::fs::read_to_string(out).unwrap();
    (
        text.lines()
            .map(|l| FlowRecord::from_json_line(l).unwrap())
            .collect(),
        stderr,
    )
}

fn check_against_tshark(ng: bool) {
    let Some(tshark) = need_binary("tshark", "tshark") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (mut frames, mut link) = traffic();
    fragments(&mut frames, &mut link);
    let file = dir
        .path()
        .join(if ng { "mixed.pcapng" } else { "mixed.pcap" });
    let out = std::fs::File::create(&file).unwrap();
    if ng {
        let mut w = PcapngWriter::new(out, linktype::ETHERNET, 65535).unwrap();
        for f in &frames {
            w.write_packet(f.ts_ns, &f.data, f.orig_len).unwrap();
        }
    } else {
        let mut w = PcapWriter::new(out, linktype::ETHERNET, 65535).unwrap();
        for f in &frames {
            w.write_packet(f.ts_ns, &f.data, f.orig_len).unwrap();
        }
    }
    let (records, stderr) = run_meter(&file, &dir.path().join("r.jsonl"));

    // Interim records: long flows were reported more than once.
    let mut per_key: BTreeMap<_, u64> = BTreeMap::new();
    for r in &records {
        *per_key.entry(r.key()).or_default() += 1;
    }
    assert!(per_key.values().any(|&n| n > 1), "expected interim records");

    // Transport conversations (fragmented pair excluded: tshark reassembles).
    let frag_pair = (ip("10.5.0.1"), ip("10.5.0.2"));
    for (kind, proto) in [("tcp", 6u8), ("udp", 17u8)] {
        let theirs = tshark_conv(&tshark, &file, kind);
        let mut ours: BTreeMap<(String, String), Count> = BTreeMap::new();
        for r in records
            .iter()
            .filter(|r| r.proto == proto && (r.src_addr, r.dst_addr) != frag_pair)
        {
            let l = link
                .get(&(r.src_addr, r.dst_addr))
                .or(link.get(&(r.dst_addr, r.src_addr)))
                .copied()
                .unwrap();
            let c = ours
                .entry(pair(
                    endpoint(r.src_addr, Some(r.src_port)),
                    endpoint(r.dst_addr, Some(r.dst_port)),
                ))
                .or_default();
            c.packets += r.packets;
            c.bytes += r.bytes + r.packets * l;
        }
        let theirs: BTreeMap<_, _> = theirs
            .into_iter()
            .filter(|(k, _)| !k.0.starts_with("10.5.0."))
            .collect();
        assert!(!theirs.is_empty());
        assert_eq!(ours, theirs, "{kind} conversations differ");
    }
    // Network conversations: every IP packet, fragments included.
    for kind in ["ipv4", "ipv6"] {
        let theirs = tshark_conv(&tshark, &file, kind);
        let mut ours: BTreeMap<(String, String), Count> = BTreeMap::new();
        for r in records
            .iter()
            .filter(|r| r.src_addr.is_ipv4() == (kind == "ipv4"))
        {
            let l = link
                .get(&(r.src_addr, r.dst_addr))
                .or(link.get(&(r.dst_addr, r.src_addr)))
                .copied()
                .unwrap();
            let c = ours
                .entry(pair(endpoint(r.src_addr, None), endpoint(r.dst_addr, None)))
                .or_default();
            c.packets += r.packets;
            c.bytes += r.bytes + r.packets * l;
        }
        assert_eq!(ours, theirs, "{kind} conversations differ");
    }
    // All three fragments went to the datagram's 5-tuple.
    let frag: Vec<_> = records
        .iter()
        .filter(|r| (r.src_addr, r.dst_addr) == frag_pair)
        .collect();
    assert_eq!(frag.iter().map(|r| r.packets).sum::<u64>(), 3);
    assert!(
        frag.iter()
            .all(|r| (r.src_port, r.dst_port) == (9000, 9001)),
        "{frag:?}"
    );
    // VLAN and class fields.
    assert!(records
        .iter()
        .any(|r| r.vlan == Some(100) && r.dst_port == 53));
    assert!(records
        .iter()
        .any(|r| r.vlan == Some(10) && r.dst_port == 7001));
    assert!(records
        .iter()
        .filter(|r| r.proto == 6)
        .all(|r| r.tcp_flags.is_some()));
    // The summary names the undecodable frames by reason.
    for reason in [
        "truncated_link 1",
        "truncated_ip 1",
        "not_ip 1",
        "fragments matched 2",
    ] {
        assert!(
            stderr.contains(reason),
            "summary lacks {reason:?}: {stderr}"
        );
    }
    let keys: BTreeSet<_> = records.iter().map(|r| r.key()).collect();
    assert!(keys.len() >= 9, "{}", keys.len());
}

#[test]
fn pcap_counts_equal_tshark_conversations() {
    check_against_tshark(false);
}

#[test]
fn pcapng_counts_equal_tshark_conversations() {
    check_against_tshark(true);
}

/// A cache bound far below the number of flows: flows are evicted early,
/// exported and counted, and every flow's records still sum to the same
/// totals as without the bound.
#[test]
fn eviction_exports_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut frames, mut link) = traffic();
    fragments(&mut frames, &mut link);
    let file = dir.path().join("mixed.pcap");
    let mut w = PcapWriter::new(
        std::fs::File::create(&file).unwrap(),
        linktype::ETHERNET,
        65535,
    )
    .unwrap();
    for f in &frames {
        w.write_packet(f.ts_ns, &f.data, f.orig_len).unwrap();
    }
    drop(w);
    let totals = |records: &[FlowRecord]| {
        let mut m: BTreeMap<_, (u64, u64)> = BTreeMap::new();
        for r in records {
            let e = m.entry(r.key()).or_default();
            e.0 += r.packets;
            e.1 += r.bytes;
        }
        m
    };
    let (free, _) = run_meter(&file, &dir.path().join("a.jsonl"));
    let (bounded, stderr) =
        run_meter_with(&file, &dir.path().join("b.jsonl"), &["--max-flows", "3"]);
    assert!(!stderr.contains("evicted flows 0"), "{stderr}");
    assert!(bounded.len() > free.len());
    assert_eq!(totals(&free), totals(&bounded));
}
