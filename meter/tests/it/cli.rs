//! The command line: exit codes, one-line errors, classification through
//! every rule kind (the Fig. 4 file as printed included), sampling.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use qosloop_testkit::frames as support;

use qosloop_meter::pcap::linktype;
use qosloop_meter::PcapWriter;
use qosloop_schema::FlowRecord;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::*;

fn meter(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qosloop-meter"))
        .args(args)
        .output()
        .unwrap()
}

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
        .display()
        .to_string()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// TCP 172.20.1.2:2000 -> 172.20.3.3:80 (x3), UDP 172.20.1.2:6055 ->
/// 172.20.3.3:4055 (x2), TCP 10.0.0.9:2000 -> 10.0.0.8:80 (x1),
/// UDP 10.0.1.2 -> 10.0.2.2:5001 (x4).
fn classified_pcap(dir: &Path) -> PathBuf {
    let path = dir.join("c.pcap");
    let mut w = PcapWriter::new(
        std::fs::File::create(&path).unwrap(),
        linktype::ETHERNET,
        65535,
    )
    .unwrap();
    let mut t = 1_700_000_000_000_000_000u64;
    let (h1, h3) = (ip("172.20.1.2"), ip("172.20.3.3"));
    let mut put = |frame: Vec<u8>, n: usize| {
        for _ in 0..n {
            t += 1_000_000;
            w.write_packet(t, &frame, frame.len() as u32).unwrap();
        }
    };
    put(
        ethernet(
            &[],
            0x0800,
            &ipv4(h1, h3, 6, 1, 0, &[], &tcp(2000, 80, 1, 0, 0x10, 0)),
        ),
        3,
    );
    put(
        ethernet(
            &[],
            0x0800,
            &ipv4(h1, h3, 17, 1, 0, &[], &udp(6055, 4055, 4)),
        ),
        2,
    );
    put(
        ethernet(
            &[],
            0x0800,
            &ipv4(
                ip("10.0.0.9"),
                ip("10.0.0.8"),
                6,
                1,
                0,
                &[],
                &tcp(2000, 80, 1, 0, 0x10, 0),
            ),
        ),
        1,
    );
    put(
        ethernet(
            &[],
            0x0800,
            &ipv4(
                ip("10.0.1.2"),
                ip("10.0.2.2"),
                17,
                1,
                0,
                &[],
                &udp(4000, 5001, 100),
            ),
        ),
        4,
    );
    path
}

fn records(path: &Path) -> Vec<FlowRecord> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| FlowRecord::from_json_line(l).unwrap())
        .collect()
}

fn class_of(recs: &[FlowRecord], dst_port: u16, src: &str) -> Option<String> {
    recs.iter()
        .find(|r| r.dst_port == dst_port && r.src_addr == ip(src))
        .and_then(|r| r.class.clone())
}

#[test]
fn help_lists_the_contract_flags() {
    let o = meter(&["--help"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--pcap",
        "--records-out",
        "--config",
        "--flow-keys",
        "--log-format",
        "--interface",
    ] {
        assert!(text.contains(flag), "{flag} missing from --help");
    }
}

#[test]
fn every_rule_kind_classifies() {
    let dir = tempfile::tempdir().unwrap();
    let pcap = classified_pcap(dir.path());
    let out = dir.path().join("r.jsonl");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--pcap",
            pcap.to_str().unwrap(),
            "--records-out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = meter(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (
            records(&out),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    // Fig. 4 as printed: typographic quotes accepted with a warning.
    let (r, stderr) = run(&["--flow-keys", &example("flowkeys-fig4.xml")]);
    assert_eq!(class_of(&r, 80, "172.20.1.2").as_deref(), Some("FLOW1"));
    assert_eq!(class_of(&r, 80, "10.0.0.9").as_deref(), Some("DEFAULT"));
    assert_eq!(class_of(&r, 4055, "172.20.1.2"), None);
    assert!(stderr.contains("typographic quote"), "{stderr}");
    // Fig. 5 intent as byte patterns.
    let (r, _) = run(&["--patterns", &example("patterns-fig5.toml")]);
    assert_eq!(
        class_of(&r, 80, "172.20.1.2").as_deref(),
        Some("fig5-tcp-2000-80")
    );
    assert_eq!(
        class_of(&r, 4055, "172.20.1.2").as_deref(),
        Some("fig5-udp-6055-4055")
    );
    assert_eq!(class_of(&r, 80, "10.0.0.9"), None);
    // Field rules, then all kinds together: field rules are evaluated first.
    let (r, _) = run(&["--field-rules", &example("fields.toml")]);
    assert_eq!(class_of(&r, 5001, "10.0.1.2").as_deref(), Some("policed"));
    assert_eq!(class_of(&r, 80, "10.0.0.9").as_deref(), Some("web"));
    let (r, _) = run(&[
        "--field-rules",
        &example("fields.toml"),
        "--flow-keys",
        &example("flowkeys-fig4.xml"),
        "--patterns",
        &example("patterns-fig5.toml"),
    ]);
    assert_eq!(class_of(&r, 80, "172.20.1.2").as_deref(), Some("lab-hosts"));
    assert_eq!(class_of(&r, 5001, "10.0.1.2").as_deref(), Some("policed"));
    // Sampling: 1 in 2, and the rate travels with the records.
    let (r, _) = run(&["--sampling", "count:2"]);
    assert_eq!(r.iter().map(|r| r.packets).sum::<u64>(), 5);
    assert!(r.iter().all(|r| r.sampling_interval == Some(2)));
    let (r, _) = run(&[]);
    assert!(r.iter().all(|r| r.sampling_interval.is_none()));
    assert_eq!(r.iter().map(|r| r.packets).sum::<u64>(), 10);
}

#[test]
fn bad_configuration_exits_64_with_one_located_line() {
    let dir = tempfile::tempdir().unwrap();
    let pcap = classified_pcap(dir.path());
    let out = dir.path().join("r.jsonl");
    let bad_re = dir.path().join("bad.toml");
    std::fs::write(&bad_re, "[[pattern]]\nclass = \"x\"\nregex = '\\x0(('\n").unwrap();
    let bad_xml = dir.path().join("bad.xml");
    std::fs::write(&bad_xml, "<FLOWDATA>\n<FLOW FLOWNAME=\"a\">\n<FLOWKEY NAME=\"IPProto\" VALUE=\"tcp\"/>\n</FLOW>\n</FLOWDATA>\n").unwrap();
    let bad_cfg = dir.path().join("bad-config.toml");
    std::fs::write(&bad_cfg, "pcap = \"x\"\nmax_flow = 3\n").unwrap();
    let base = [
        "--pcap",
        pcap.to_str().unwrap(),
        "--records-out",
        out.to_str().unwrap(),
    ];
    for (extra, expect) in [
        (vec!["--patterns", bad_re.to_str().unwrap()], "bad.toml:3:9"),
        (vec!["--flow-keys", bad_xml.to_str().unwrap()], "bad.xml:3:"),
        (
            vec!["--field-rules", "/nonexistent/rules.toml"],
            "/nonexistent/rules.toml",
        ),
        (vec!["--sampling", "often"], "sampling"),
        (
            vec!["--config", bad_cfg.to_str().unwrap()],
            "bad-config.toml:2:1",
        ),
    ] {
        let mut args: Vec<&str> = base.to_vec();
        args.extend(extra);
        let o = meter(&args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(expect), "{expect:?} not in {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
}

#[test]
fn corrupt_capture_names_the_packet_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let pcap = classified_pcap(dir.path());
    let mut bytes = std::fs::read(&pcap).unwrap();
    bytes.truncate(bytes.len() - 7);
    let cut = dir.path().join("cut.pcap");
    std::fs::write(&cut, &bytes).unwrap();
    let out = dir.path().join("r.jsonl");
    let o = meter(&[
        "--pcap",
        cut.to_str().unwrap(),
        "--records-out",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cut.pcap: packet 10: file ends inside the packet data"),
        "{stderr}"
    );
    let junk = dir.path().join("junk.pcap");
    std::fs::write(&junk, b"this is not a capture").unwrap();
    let o = meter(&[
        "--pcap",
        junk.to_str().unwrap(),
        "--records-out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a pcap or pcapng file"));
}

#[test]
fn json_logs_and_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let pcap = classified_pcap(dir.path());
    let out = dir.path().join("r.jsonl");
    let cfg = dir.path().join("meter.toml");
    std::fs::write(
        &cfg,
        format!(
            "pcap = {:?}\nrecords_out = {:?}\nflow_keys = [{:?}]\nlog_format = \"json\"\ninterim_ms = 0\n",
            pcap.to_str().unwrap(),
            out.to_str().unwrap(),
            example("flowkeys-fig4.xml")
        ),
    )
    .unwrap();
    let o = meter(&["--config", cfg.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let warn = stderr.lines().find(|l| l.contains("typographic")).unwrap();
    let v: serde_json::Value = serde_json::from_str(warn).unwrap();
    assert_eq!(v["level"], "WARN");
    assert_eq!(records(&out).len(), 4);
}

#[test]
fn interface_field_matches_pcapng_interface_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("named.pcapng");
    let mut w = qosloop_meter::PcapngWriter::with_interface_name(
        std::fs::File::create(&path).unwrap(),
        linktype::ETHERNET,
        65535,
        "eth7",
    )
    .unwrap();
    let frame = ethernet(
        &[],
        0x0800,
        &ipv4(ip("10.0.0.1"), ip("10.0.0.2"), 17, 1, 0, &[], &udp(1, 2, 3)),
    );
    w.write_packet(1_700_000_000_000_000_000, &frame, frame.len() as u32)
        .unwrap();
    drop(w);
    let rules = dir.path().join("if.toml");
    std::fs::write(
        &rules,
        "[[filter]]\nid = 0\nclass = \"on-eth7\"\ninterface = \"eth7\"\n",
    )
    .unwrap();
    let out = dir.path().join("r.jsonl");
    let o = meter(&[
        "--pcap",
        path.to_str().unwrap(),
        "--field-rules",
        rules.to_str().unwrap(),
        "--records-out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(records(&out)[0].class.as_deref(), Some("on-eth7"));
}

#[test]
fn progress_bar_only_when_asked_or_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let pcap = classified_pcap(dir.path());
    let out = dir.path().join("r.jsonl");
    let base = [
        "--pcap",
        pcap.to_str().unwrap(),
        "--records-out",
        out.to_str().unwrap(),
    ];
    let o = meter(&[&base[..], &["--progress", "always"]].concat());
    assert!(String::from_utf8_lossy(&o.stderr).contains("100.0%"));
    // Standard error is a pipe here: `auto` draws nothing.
    let o = meter(&base);
    assert!(!String::from_utf8_lossy(&o.stderr).contains('%'));
    let o = meter(&[&base[..], &["--progress", "sometimes"]].concat());
    assert_eq!(o.status.code(), Some(64));
}
