//! The enforcer against the real kernel: three namespaces tx — router — rx
//! joined by veth, the enforcer on the router's rx-facing interface, real
//! UDP traffic from a bounded paced generator in tx, a raw-socket sink in rx
//! counting bytes per DSCP. Every namespace goes with its guard.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_enforcer::{EnforceError, Enforcer, EnforcerConfig, LinuxBackend};
use qosloop_schema::{
    Decision, DecisionReason, Dscp, FlowSpec, Kbps, OutOfProfileAction, PortRange, TrafficProfile,
};
use qosloop_testbed::harness::{require_binary, require_root, Netns, VethPair};
use qosloop_testbed::traffic::{self, FlowGen, Schedule, SinkReport};
use std::net::SocketAddrV4;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

const PORT: u16 = 5001;
const PACKET_LEN: usize = 1000;
const AF11: u8 = 10;

struct Topo {
    tx: Netns,
    router: Netns,
    rx: Netns,
    /// The router's interface towards rx: where the enforcer works.
    out_if: String,
    /// rx's interface (ingress enforcement at the receiving host).
    in_if: String,
}

fn topo() -> Topo {
    let tx = Netns::create("etx").unwrap();
    let router = Netns::create("ert").unwrap();
    let rx = Netns::create("erx").unwrap();
    VethPair::connect(&tx, "10.1.0.1/24", &router, "10.1.0.2/24").unwrap();
    let out = VethPair::connect(&router, "10.2.0.1/24", &rx, "10.2.0.2/24").unwrap();
    tx.ip(&["route", "add", "default", "via", "10.1.0.2"])
        .unwrap();
    rx.ip(&["route", "add", "default", "via", "10.2.0.1"])
        .unwrap();
    router.sysctl("net.ipv4.ip_forward", "1").unwrap();
    Topo {
        tx,
        router,
        rx,
        out_if: out.a_if,
        in_if: out.b_if,
    }
}

fn prerequisites() -> Option<()> {
    qosloop_testbed::harness::prerequisite(require_root(
        "programs HTB and nftables in namespaces",
    ))?;
    qosloop_testbed::harness::prerequisite(require_binary("nft", "nftables"))?;
    Some(())
}

fn decision(id: u64, action: OutOfProfileAction) -> Decision {
    Decision {
        id,
        version: 1,
        role: "edge".into(),
        policy_dn: "cn=gold".into(),
        flow: FlowSpec {
            src: Some("10.1.0.1".parse().unwrap()),
            dst: Some("10.2.0.2".parse().unwrap()),
            proto: Some(17),
            src_ports: None,
            dst_ports: Some(PortRange::single(PORT + id as u16 - 1)),
        },
        profile: TrafficProfile {
            rate: Kbps(1000),
            burst_bytes: 15_000,
        },
        in_profile_dscp: Some(Dscp::CS6),
        out_of_profile: action,
        reason: DecisionReason {
            rate_kbps: 2000.0,
            avg_rate_kbps: 2000.0,
            link: "edge".into(),
            link_load_kbps: 0.0,
            band: "test".into(),
        },
        issued_ns: 0,
    }
}

fn config(t: &Topo) -> EnforcerConfig {
    EnforcerConfig {
        direction: qosloop_schema::Direction::Egress,
        interface: t.out_if.clone(),
        roles: vec!["edge".into()],
        capacity: Kbps(10_000),
        qdisc_major: 0xe5,
    }
}

fn start(t: &Topo) -> Enforcer<LinuxBackend> {
    let cfg = config(t);
    t.router
        .run_in(move || Enforcer::start(LinuxBackend::open().unwrap(), cfg).map(|(e, _)| e))
        .unwrap()
        .unwrap()
}

/// Sends one flow at `kbps` (IP bytes) for `secs` while a sink in rx
/// records; `during` runs (in the router namespace) while traffic flows.
fn traffic<R: Send>(
    t: &Topo,
    kbps: u64,
    secs: u64,
    during: impl FnOnce() -> R + Send,
) -> (traffic::GenReport, SinkReport, R) {
    let stop = traffic::stop_flag();
    let sink_stop = stop.clone();
    let sink =
        t.rx.spawn_in(move || traffic::sink(&[PORT], &sink_stop, Duration::from_secs(secs + 10)))
            .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let flow = FlowGen {
        id: 1,
        bind: "10.1.0.1:6001".parse::<SocketAddrV4>().unwrap(),
        dst: SocketAddrV4::new("10.2.0.2".parse().unwrap(), PORT),
        packet_len: PACKET_LEN,
        dscp: AF11,
        schedule: Schedule::constant(
            (kbps * 125) as f64 / PACKET_LEN as f64,
            Duration::from_secs(secs),
        ),
    };
    let gen_stop = traffic::stop_flag();
    let gen =
        t.tx.spawn_in(move || traffic::generate(&flow, &gen_stop))
            .unwrap();
    let during = t.router.run_in(during).unwrap();
    let sent = gen.join().unwrap().unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let got = sink.join().unwrap().unwrap().unwrap();
    (sent, got, during)
}

/// Average kbit/s per DSCP over the steady seconds of the flow. Left out:
/// the last second and the first two — nftables' token bucket starts full and
/// holds one second of the profile rate plus the burst (the kernel sizes it
/// `unit × (rate + burst) / rate`), so for about a second everything is in
/// profile.
fn steady_kbps(report: &SinkReport) -> (f64, std::collections::BTreeMap<u8, f64>) {
    let flow = &report.flows[&1];
    let secs: Vec<_> = flow.seconds.iter().collect();
    assert!(secs.len() >= 5, "too few seconds of traffic: {secs:?}");
    let steady = &secs[2..secs.len() - 1];
    let mut by_dscp = std::collections::BTreeMap::new();
    let mut total = 0.0;
    for (_, s) in steady {
        total += s.kbps();
        for (d, b) in &s.bytes_by_dscp {
            *by_dscp.entry(*d).or_insert(0.0) += *b as f64 * 8.0 / 1000.0;
        }
    }
    let n = steady.len() as f64;
    by_dscp.values_mut().for_each(|v| *v /= n);
    (total / n, by_dscp)
}

fn within(measured: f64, want: f64, tolerance: f64) -> bool {
    (measured - want).abs() <= want * tolerance
}

/// Installs `action` for the flow, sends 2000 kbit/s for 6 s, returns
/// (kbit/s by DSCP in steady state, out-of-profile bytes sent, received report).
fn run_fig10(
    action: OutOfProfileAction,
) -> Option<(std::collections::BTreeMap<u8, f64>, SinkReport, u64)> {
    prerequisites()?;
    let t = topo();
    let mut e = start(&t);
    t.router
        .run_in(|| e.install(decision(1, action)))
        .unwrap()
        .unwrap();
    let (sent, got, status) = traffic(&t, 2000, 6, || {
        std::thread::sleep(Duration::from_secs(6));
        let layout = e.layout().clone();
        qosloop_enforcer::status::read(e.backend(), &layout).unwrap()
    });
    let d = &status.decisions[0];
    assert!(
        d.in_profile_packets > 0 && d.out_of_profile_packets > 0,
        "{d:?}"
    );
    assert!(sent.packets > 0);
    let (total, by_dscp) = steady_kbps(&got);
    eprintln!(
        "{action:?}: sent {} packets, steady state {total:.0} kbit/s, by DSCP {by_dscp:.0?}",
        sent.packets
    );
    t.router.run_in(|| e.cleanup()).unwrap().unwrap();
    Some((by_dscp, got, d.out_of_profile_bytes))
}

/// Accept shaped to 875 kbit/s on a 2000 kbit/s flow with a 1000 kbit/s
/// profile: 1000 kbit/s arrive CS6, 875 keep AF11 (within 10%).
fn assert_accepted_875(by_dscp: &std::collections::BTreeMap<u8, f64>) {
    let cs6 = by_dscp.get(&48).copied().unwrap_or(0.0);
    let kept = by_dscp.get(&AF11).copied().unwrap_or(0.0);
    assert!(
        within(cs6, 1000.0, 0.10),
        "in-profile CS6 {cs6:.0} kbit/s, by DSCP {by_dscp:?}"
    );
    assert!(
        within(kept, 875.0, 0.10),
        "out-of-profile (AF11 kept) {kept:.0} kbit/s, by DSCP {by_dscp:?}"
    );
}

#[test]
fn accept_shapes_out_of_profile_to_875_and_marks_in_profile_cs6() {
    let Some((by_dscp, _, _)) = run_fig10(OutOfProfileAction::Accept {
        shape: Some(Kbps(875)),
    }) else {
        return;
    };
    assert_accepted_875(&by_dscp);
}

#[test]
fn remark_sends_out_of_profile_best_effort_shaped_to_125() {
    let Some((by_dscp, _, _)) = run_fig10(OutOfProfileAction::Remark {
        dscp: Dscp::BEST_EFFORT,
        shape: Some(Kbps(125)),
    }) else {
        return;
    };
    let cs6 = by_dscp.get(&48).copied().unwrap_or(0.0);
    let be = by_dscp.get(&0).copied().unwrap_or(0.0);
    assert!(
        within(cs6, 1000.0, 0.10),
        "in-profile CS6 {cs6:.0} kbit/s, by DSCP {by_dscp:?}"
    );
    assert!(
        within(be, 125.0, 0.10),
        "re-marked BE {be:.0} kbit/s, by DSCP {by_dscp:?}"
    );
    assert_eq!(
        by_dscp.get(&AF11).copied().unwrap_or(0.0),
        0.0,
        "nothing keeps its DSCP: {by_dscp:?}"
    );
}

#[test]
fn drop_delivers_at_most_one_percent_of_out_of_profile() {
    let Some((by_dscp, got, dropped_bytes)) = run_fig10(OutOfProfileAction::Drop) else {
        return;
    };
    let cs6 = by_dscp.get(&48).copied().unwrap_or(0.0);
    assert!(
        within(cs6, 1000.0, 0.10),
        "in-profile CS6 {cs6:.0} kbit/s, by DSCP {by_dscp:?}"
    );
    let delivered_out: u64 = got.flows[&1]
        .seconds
        .values()
        .map(|s| {
            s.bytes_by_dscp
                .iter()
                .filter(|(d, _)| **d != 48)
                .map(|(_, b)| *b)
                .sum::<u64>()
        })
        .sum();
    assert!(dropped_bytes > 0);
    assert!(
        delivered_out * 100 <= dropped_bytes + delivered_out,
        "delivered {delivered_out} B of out-of-profile traffic, dropped {dropped_bytes} B"
    );
}

#[test]
fn decision_changes_under_traffic_lose_no_in_profile_packets() {
    if prerequisites().is_none() {
        return;
    }
    let t = topo();
    let mut e = start(&t);
    t.router
        .run_in(|| {
            e.install(decision(
                1,
                OutOfProfileAction::Accept {
                    shape: Some(Kbps(875)),
                },
            ))
        })
        .unwrap()
        .unwrap();
    // 800 kbit/s: all of it is within the 1000 kbit/s profile.
    let actions = [
        OutOfProfileAction::Remark {
            dscp: Dscp::BEST_EFFORT,
            shape: Some(Kbps(125)),
        },
        OutOfProfileAction::Drop,
        OutOfProfileAction::Accept {
            shape: Some(Kbps(500)),
        },
        OutOfProfileAction::Accept {
            shape: Some(Kbps(875)),
        },
        OutOfProfileAction::Remark {
            dscp: Dscp::BEST_EFFORT,
            shape: Some(Kbps(250)),
        },
    ];
    let (sent, got, changes) = traffic(&t, 800, 4, || {
        let mut n = 0;
        for (v, a) in actions.iter().enumerate() {
            std::thread::sleep(Duration::from_millis(600));
            let mut d = decision(1, *a);
            d.version = v as u64 + 2;
            e.install(d).unwrap();
            n += 1;
        }
        n
    });
    assert_eq!(changes, actions.len());
    let flow = &got.flows[&1];
    assert_eq!(
        flow.packets, sent.packets,
        "sent {} received {}",
        sent.packets, flow.packets
    );
    let not_cs6: u64 = flow
        .seconds
        .values()
        .flat_map(|s| s.bytes_by_dscp.iter())
        .filter(|(d, _)| **d != 48)
        .map(|(_, b)| *b)
        .sum();
    assert_eq!(not_cs6, 0, "every packet was in profile and marked CS6");
    t.router.run_in(|| e.cleanup()).unwrap().unwrap();
}

fn kernel_objects(t: &Topo) -> (String, String, String) {
    let run = |prog: &str, args: &[&str]| {
        let out = t.router.command(prog).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    (
        run("tc", &["qdisc", "show", "dev", &t.out_if]),
        run("tc", &["class", "show", "dev", &t.out_if]),
        run("nft", &["list", "ruleset"]),
    )
}

#[test]
fn refused_decisions_leave_the_kernel_as_it_was() {
    if prerequisites().is_none() {
        return;
    }
    let t = topo();
    let mut e = start(&t);
    t.router
        .run_in(|| e.install(decision(1, OutOfProfileAction::Drop)))
        .unwrap()
        .unwrap();
    // Something else takes the class the next decision would use: the kernel refuses.
    t.router
        .command("tc")
        .args([
            "class", "add", "dev", &t.out_if, "parent", "e500:1", "classid", "e500:101", "htb",
            "rate", "1mbit",
        ])
        .status()
        .unwrap();
    let before = kernel_objects(&t);
    let err = t
        .router
        .run_in(|| {
            e.install(decision(
                2,
                OutOfProfileAction::Accept {
                    shape: Some(Kbps(875)),
                },
            ))
        })
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, EnforceError::Tc { .. }), "{err}");
    assert!(
        err.to_string().contains("e500:101") && err.to_string().contains("exists"),
        "{err}"
    );
    assert_eq!(kernel_objects(&t), before);
    let mut too_fast = decision(2, OutOfProfileAction::Drop);
    too_fast.profile.rate = Kbps(20_000);
    let err = t
        .router
        .run_in(|| e.install(too_fast))
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("above the capacity"), "{err}");
    let clash = FlowSpec {
        dst: Some("10.2.0.0/24".parse().unwrap()),
        ..FlowSpec::default()
    };
    let mut wide = decision(3, OutOfProfileAction::Drop);
    wide.flow = clash;
    let err = t.router.run_in(|| e.install(wide)).unwrap().unwrap_err();
    assert!(
        matches!(err, EnforceError::Conflict { other: 1, .. }),
        "{err}"
    );
    assert_eq!(kernel_objects(&t), before);
    // And it keeps working once the intruder is gone.
    t.router
        .command("tc")
        .args(["class", "del", "dev", &t.out_if, "classid", "e500:101"])
        .status()
        .unwrap();
    let mut ok = decision(4, OutOfProfileAction::Drop);
    ok.flow.dst_ports = Some(PortRange::single(7000));
    t.router.run_in(|| e.install(ok)).unwrap().unwrap();
    t.router.run_in(|| e.cleanup()).unwrap().unwrap();
    let unknown = config(&t);
    let err = t
        .router
        .run_in(move || {
            let mut c = unknown;
            c.interface = "nosuch0".into();
            Enforcer::start(LinuxBackend::open().unwrap(), c).map(|_| ())
        })
        .unwrap()
        .unwrap_err();
    assert_eq!(err, EnforceError::UnknownInterface("nosuch0".into()));
}

fn write_decisions(dir: &std::path::Path, name: &str, ds: &[Decision]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_string_pretty(ds).unwrap()).unwrap();
    p
}

fn enforcer_cmd(t: &Topo, args: &[&str]) -> Command {
    let mut cmd = t.router.command(env!("CARGO_BIN_EXE_qosloop-enforcer"));
    cmd.args([
        "--interface",
        &t.out_if,
        "--capacity",
        "10mbit",
        "--roles",
        "edge",
    ])
    .args(args);
    cmd
}

#[test]
fn kill_9_then_restart_reconciles_and_cleanup_restores_the_namespace() {
    if prerequisites().is_none() {
        return;
    }
    let t = topo();
    let pristine = kernel_objects(&t);
    let dir = tempfile::tempdir().unwrap();
    let ds: Vec<Decision> = (1..=3)
        .map(|i| {
            decision(
                i,
                OutOfProfileAction::Accept {
                    shape: Some(Kbps(875)),
                },
            )
        })
        .collect();
    let ds: Vec<Decision> = ds
        .into_iter()
        .map(|mut d| {
            d.profile.rate = Kbps(500);
            d.out_of_profile = OutOfProfileAction::Accept {
                shape: Some(Kbps(400)),
            };
            d
        })
        .collect();
    let file = write_decisions(dir.path(), "d.json", &ds);
    let mut daemon = enforcer_cmd(&t, &["--decisions", file.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let installed = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        kernel_objects(&t).2.matches("jump d").count() == 3
    });
    daemon.kill().unwrap(); // SIGKILL
    daemon.wait().unwrap();
    assert!(installed, "the daemon did not install its decisions");
    let after_crash = kernel_objects(&t);
    // Restart with the same decisions: all adopted, nothing touched.
    let out = enforcer_cmd(&t, &["apply", "--decisions", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["start"]["adopted"], 3);
    assert_eq!(summary["apply"]["unchanged"], 3);
    assert_eq!(summary["apply"]["tc_messages"], 0);
    assert_eq!(kernel_objects(&t).1, after_crash.1);
    assert_eq!(kernel_objects(&t).2.matches("jump d").count(), 3);
    // Restart with one decision gone and one changed: no duplicates, no orphans.
    let mut changed = ds[..2].to_vec();
    changed[1].out_of_profile = OutOfProfileAction::Drop;
    let file2 = write_decisions(dir.path(), "d2.json", &changed);
    let out = enforcer_cmd(&t, &["apply", "--decisions", file2.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, classes, rules) = kernel_objects(&t);
    assert_eq!(rules.matches("jump d").count(), 2, "{rules}");
    assert_eq!(rules.matches("chain d").count(), 2, "{rules}");
    // root, default, group e5:100 and its qdisc's root e500:1 and in-profile
    // class e500:2, one out-of-profile class per decision.
    assert_eq!(classes.lines().count(), 5 + 2, "{classes}");
    assert!(rules.contains("counter packets 0 bytes 0 drop"), "{rules}");
    let status = enforcer_cmd(&t, &["status", "--json"]).output().unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["decisions"].as_array().unwrap().len(), 2);
    assert_eq!(status["orphan_classes"].as_array().unwrap().len(), 0);
    // --cleanup leaves the namespace as it was.
    let out = enforcer_cmd(&t, &["--cleanup"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(kernel_objects(&t), pristine);
}

#[test]
fn cli_bad_input_exit_codes() {
    if prerequisites().is_none() {
        return;
    }
    let t = topo();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "interface = 3\n").unwrap();
    let out = enforcer_cmd(&t, &["--config", bad.to_str().unwrap(), "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let junk = dir.path().join("d.json");
    std::fs::write(&junk, "[{\"id\": }]").unwrap();
    let out = enforcer_cmd(&t, &["apply", "--decisions", junk.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("d.json"));
    let mut cmd = t.router.command(env!("CARGO_BIN_EXE_qosloop-enforcer"));
    let out = cmd
        .args(["--interface", "nosuch0", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nosuch0"));
}

/// The nf_tables batches the enforcer compiles itself, listed by `nft`,
/// read exactly like the same statements applied by `nft -f`: every form the
/// enforcer writes (base chain with guard, IPv4/IPv6 flows with prefixes on
/// and off byte boundaries, port ranges, the three actions, DSCP marking of
/// both families, priority steering, comments), then flush/delete forms.
#[test]
fn native_batches_list_exactly_like_nft_f() {
    let Some(()) = prerequisites() else { return };
    let ns = Netns::create("enl").unwrap();
    ns.ip(&[
        "link", "add", "name", "nla", "type", "veth", "peer", "name", "nlb",
    ])
    .unwrap();
    let script = |t: &str| {
        format!(
            "add table inet {t}
add chain inet {t} postrouting {{ type filter hook postrouting priority filter; policy accept; }}
add rule inet {t} postrouting oifname != \"nla\" accept comment \"guard\"
add chain inet {t} d42
add rule inet {t} d42 limit rate over 125000 bytes/second burst 15000 bytes counter ip dscp set 0 meta priority set e5:107 accept comment \"out\"
add rule inet {t} d42 counter ip dscp set 48 meta priority set e5:106 accept comment \"in id=42 v=1 slot=3 kind=remark fp=00000000000000ff\"
add rule inet {t} postrouting ip saddr 10.1.0.1 ip daddr 10.2.0.0/16 udp dport 5001 jump d42 comment \"id=42\"
add chain inet {t} d43
add rule inet {t} d43 limit rate over 109375 bytes/second counter drop comment \"out\"
add rule inet {t} d43 counter ip6 dscp set 46 meta priority set e5:108 accept comment \"in\"
add rule inet {t} postrouting ip6 saddr 2001:db8::1 ip6 daddr 2001:db8:8000::/33 tcp sport 1024-2048 tcp dport 80 jump d43 comment \"id=43\"
add rule inet {t} postrouting ip saddr 10.0.0.0/20 sctp dport 80 jump d43
add rule inet {t} postrouting meta nfproto ipv4 meta l4proto 17 jump d43
add chain inet {t} d44
add rule inet {t} d44 limit rate over 109375 bytes/second counter meta priority set e5:10b accept comment \"out\"
add rule inet {t} d44 counter meta priority set e5:10a accept
add rule inet {t} postrouting meta nfproto ipv6 jump d44
"
        )
    };
    let list_fam = |family: &str, t: &str| {
        let out = ns
            .command("nft")
            .args(["list", "table", family, t])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).replace(t, "T")
    };
    let list = |t: &str| list_fam("inet", t);
    let nft_f = |s: &str| {
        let mut child = ns
            .command("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success());
    };
    let native = |s: String| {
        ns.run_in(move || qosloop_enforcer::nfnl::Nftnl::open().unwrap().apply(&s))
            .unwrap()
    };
    native(script("qosloop_native")).unwrap();
    nft_f(&script("qosloop_nft"));
    let listed = list("qosloop_native");
    assert_eq!(listed, list("qosloop_nft"));
    assert!(
        listed.contains("ip6 daddr 2001:db8:8000::/33 tcp sport 1024-2048"),
        "{listed}"
    );
    assert!(
        listed.contains("ip dscp set cs6 meta priority set e5:106 accept"),
        "{listed}"
    );

    // Changing forms: flush and refill a chain, delete a rule by handle.
    let change = |t: &str| {
        format!(
            "flush chain inet {t} d42
add rule inet {t} d42 limit rate over 125000 bytes/second burst 15000 bytes counter drop comment \"out\"
add rule inet {t} d42 counter ip dscp set 48 meta priority set e5:106 accept comment \"in id=42 v=2\"
"
        )
    };
    native(change("qosloop_native")).unwrap();
    nft_f(&change("qosloop_nft"));
    assert_eq!(list("qosloop_native"), list("qosloop_nft"));

    // A refused batch changes nothing and names the statement.
    let before = list("qosloop_native");
    let err = native(
        "add chain inet qosloop_native d45
add rule inet qosloop_native d45 counter accept
add rule inet qosloop_native postrouting ip daddr 10.9.0.1 jump d99
"
        .to_owned(),
    )
    .unwrap_err();
    assert!(
        err.contains("jump d99") && err.contains("No such file"),
        "{err}"
    );
    assert_eq!(list("qosloop_native"), before);
    // Also when the refused statement is in the middle: the kernel goes on
    // through the batch, answers the last statement, and commits nothing.
    let err = native(
        "add chain inet qosloop_native d46
add rule inet qosloop_native postrouting ip daddr 10.9.0.2 jump d98
add rule inet qosloop_native d46 counter accept
"
        .to_owned(),
    )
    .unwrap_err();
    assert!(err.contains("jump d98"), "{err}");
    assert_eq!(list("qosloop_native"), before);

    for t in ["qosloop_native", "qosloop_nft"] {
        native(format!("delete table inet {t}")).unwrap();
    }

    // The ingress forms: a netdev table on the ingress hook of nla, the
    // guard against packets an IFB hands back, `meta protocol` dependencies
    // and `fwd to` the IFB device.
    ns.ip(&["link", "add", "name", "nlq", "type", "ifb"])
        .unwrap();
    let ingress = |t: &str| {
        format!(
            "add table netdev {t}
add chain netdev {t} postrouting {{ type filter hook ingress device \"nla\" priority filter; policy accept; }}
add rule netdev {t} postrouting meta priority != 0 accept comment \"guard\"
add chain netdev {t} d7
add rule netdev {t} d7 limit rate over 125000 bytes/second burst 15000 bytes counter ip dscp set 0 meta priority set e500:100 fwd to \"nlq\" comment \"out\"
add rule netdev {t} d7 counter ip6 dscp set 48 meta priority set e500:2 fwd to \"nlq\" comment \"in\"
add rule netdev {t} postrouting ip saddr 10.1.0.1 udp dport 5001 jump d7 comment \"id=7\"
add rule netdev {t} postrouting ip6 daddr 2001:db8::/33 jump d7
add rule netdev {t} postrouting meta protocol ip meta l4proto 17 jump d7
"
        )
    };
    native(ingress("qosloop_native")).unwrap();
    nft_f(&ingress("qosloop_nft"));
    let (a, b) = (
        list_fam("netdev", "qosloop_native"),
        list_fam("netdev", "qosloop_nft"),
    );
    assert_eq!(a, b);
    assert!(a.contains("fwd to \"nlq\""), "{a}");
    for t in ["qosloop_native", "qosloop_nft"] {
        native(format!("delete table netdev {t}")).unwrap();
    }
    let out = ns
        .command("nft")
        .args(["list", "ruleset"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "");
}

/// Ingress: the enforcer on the receiving host's interface, direction
/// ingress. Packets are metered, marked and steered in a `netdev` table on
/// the interface's ingress hook, forwarded to the enforcer's IFB device and
/// shaped there, then handed back to the host. Accept shaped to 875 kbit/s:
/// what the host's socket receives matches egress enforcement (in profile
/// 1000 kbit/s CS6, out of profile 875 kbit/s AF11); `cleanup` removes the
/// table and the IFB device.
#[test]
fn ingress_through_an_ifb_meters_marks_and_shapes_like_egress() {
    let Some(()) = prerequisites() else { return };
    let t = topo();
    let cfg = EnforcerConfig {
        direction: qosloop_schema::Direction::Ingress,
        interface: t.in_if.clone(),
        ..config(&t)
    };
    let mut e =
        t.rx.run_in(move || Enforcer::start(LinuxBackend::open().unwrap(), cfg).map(|(e, _)| e))
            .unwrap()
            .unwrap();
    let ifb = e.layout().ifb();
    t.rx.run_in(|| {
        e.install(decision(
            1,
            OutOfProfileAction::Accept {
                shape: Some(Kbps(875)),
            },
        ))
    })
    .unwrap()
    .unwrap();
    let (sent, got, ()) = traffic(&t, 2000, 6, || std::thread::sleep(Duration::from_secs(6)));
    assert!(sent.packets > 0);
    let (total, by_dscp) = steady_kbps(&got);
    eprintln!("ingress accept: steady state {total:.0} kbit/s, by DSCP {by_dscp:.0?}");
    assert_accepted_875(&by_dscp);
    let classes =
        t.rx.command("tc")
            .args(["-s", "class", "show", "dev", &ifb])
            .output()
            .unwrap();
    let classes = String::from_utf8_lossy(&classes.stdout).into_owned();
    assert!(classes.contains("e500:100"), "{classes}");
    t.rx.run_in(|| e.cleanup()).unwrap().unwrap();
    let links = t.rx.ip(&["link", "show"]).unwrap();
    assert!(!links.contains(&ifb), "{links}");
    let out =
        t.rx.command("nft")
            .args(["list", "ruleset"])
            .output()
            .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "");
}
