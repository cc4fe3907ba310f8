//! The enforcer against the real kernel: three namespaces tx — router — rx
//! joined by veth, the enforcer on the router's rx-facing interface, real
//! UDP traffic from a bounded paced generator in tx, a raw-socket sink in rx
//! counting bytes per DSCP. Every namespace goes with its guard.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_enforcer::{EnforceError, Enforcer, EnforcerConfig, LinuxBackend};
use qosloop_schema::{
    Decision, DecisionReason, Dscp, FlowSpec, Kbps, OutOfProfileAction, PortRange, TrafficProfile,
};
use qosloop_testkit::harness::{require_binary, require_root, Netns, VethPair};
use qosloop_testkit::traffic::{self, FlowGen, Schedule, SinkReport};
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
    qosloop_testkit::harness::prerequisite(require_root(
        "programs HTB and nftables in namespaces",
    ))?;
    qosloop_testkit::harness::prerequisite(require_binary("nft", "nftables"))?;
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
            user: None,
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
    let meter_before = limit_handle(&t, "l1");
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
    // The flow's meter is the same kernel object after five action changes:
    // its token bucket was never refilled by a change.
    assert_eq!(limit_handle(&t, "l1"), meter_before);
    t.router.run_in(|| e.cleanup()).unwrap().unwrap();
}

/// The handle of limit object `name` in the enforcer's table (`nft -a`).
fn limit_handle(t: &Topo, name: &str) -> u64 {
    let table = format!("qosloop_{}", t.out_if);
    let out = t
        .router
        .command("nft")
        .args(["-a", "list", "table", "inet", &table])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let head = format!("limit {name} {{ # handle ");
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&head)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no limit {name} in\n{text}"))
}

/// No leak at a change: a 2000 kbit/s flow against a 1000 kbit/s profile,
/// its out-of-profile action changed four times while it runs. The meter
/// is the same limit object throughout, so no change refills its bucket:
/// after the first seconds (the bucket starts full: one second of the
/// profile plus the burst) every whole second carries the profile rate in
/// profile (CS6), not the ~2000 kbit/s a refilled bucket let through after
/// each change before.
#[test]
fn decision_changes_do_not_refill_the_meter() {
    if prerequisites().is_none() {
        return;
    }
    let t = topo();
    let mut e = start(&t);
    let accept = OutOfProfileAction::Accept {
        shape: Some(Kbps(875)),
    };
    let remark = OutOfProfileAction::Remark {
        dscp: Dscp::BEST_EFFORT,
        shape: Some(Kbps(875)),
    };
    t.router
        .run_in(|| e.install(decision(1, accept)))
        .unwrap()
        .unwrap();
    let (_, got, changes) = traffic(&t, 2000, 8, || {
        std::thread::sleep(Duration::from_millis(2500));
        let mut n = 0;
        for (v, a) in [remark, accept, remark, accept].iter().enumerate() {
            let mut d = decision(1, *a);
            d.version = v as u64 + 2;
            e.install(d).unwrap();
            n += 1;
            std::thread::sleep(Duration::from_millis(1100));
        }
        n
    });
    assert_eq!(changes, 4);
    let flow = &got.flows[&1];
    let secs: Vec<_> = flow.seconds.values().collect();
    assert!(secs.len() >= 7, "too few seconds: {}", secs.len());
    // Whole seconds after the start-up bucket, the last one left out.
    for (k, s) in secs.iter().enumerate().take(secs.len() - 1).skip(2) {
        let cs6 = s.kbps_with_dscp(48);
        assert!(
            cs6 <= 1000.0 * 1.1,
            "second {k}: {cs6:.0} kbit/s in profile for a 1000 kbit/s profile"
        );
        assert!(
            cs6 >= 1000.0 * 0.8,
            "second {k}: {cs6:.0} kbit/s in profile"
        );
    }
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
    // Decision 1's flow again under another id (an overlap is fine: it
    // becomes an ordered fallback rule; the same flow twice is not).
    let mut twin = decision(3, OutOfProfileAction::Drop);
    twin.flow = decision(1, OutOfProfileAction::Drop).flow;
    let err = t.router.run_in(|| e.install(twin)).unwrap().unwrap_err();
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

/// What the enforcer says its table will be (`--dry-run` prints it) is what
/// `nft list table` shows after the change, counters aside: decisions of
/// several map shapes (five-tuple, IPv4 and IPv6 destination only),
/// several elements per map, a fallback rule, then a change and a removal.
#[test]
fn listing_equals_nft_list_after_apply() {
    let Some(()) = prerequisites() else { return };
    let t = topo();
    let mut e = start(&t);
    let mut ds = Vec::new();
    for id in 1..=4u64 {
        ds.push(decision(id, OutOfProfileAction::Drop));
    }
    for (id, dst) in [(5u64, "10.2.0.7"), (6, "10.2.0.3"), (7, "10.2.0.5")] {
        let mut d = decision(id, OutOfProfileAction::Drop);
        d.flow = FlowSpec {
            dst: Some(dst.parse().unwrap()),
            ..FlowSpec::default()
        };
        ds.push(d);
    }
    let mut v6 = decision(8, OutOfProfileAction::Drop);
    v6.flow = FlowSpec {
        dst: Some("2001:db8::9".parse().unwrap()),
        ..FlowSpec::default()
    };
    ds.push(v6);
    let mut wide = decision(10, OutOfProfileAction::Drop);
    wide.flow.dst = Some("10.3.0.0/24".parse().unwrap());
    ds.push(wide);
    for (id, dst) in [(11u64, "10.9.0.0/24"), (12, "2001:db8:1::/48")] {
        let mut d = decision(id, OutOfProfileAction::Drop);
        d.flow = FlowSpec {
            dst: Some(dst.parse().unwrap()),
            ..FlowSpec::default()
        };
        ds.push(d);
    }
    let table = format!("qosloop_{}", t.out_if);
    let listed = |t: &Topo| {
        let out = t
            .router
            .command("nft")
            .args(["list", "table", "inet", &table])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // Counters as the model prints them.
        let mut norm = String::new();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("counter packets ") {
            norm.push_str(&rest[..at]);
            norm.push_str("counter packets 0 bytes 0");
            let after = &rest[at..];
            let end = after.find(" bytes ").unwrap() + " bytes ".len();
            let digits = after[end..].find(|c: char| !c.is_ascii_digit()).unwrap();
            rest = &after[end + digits..];
        }
        norm.push_str(rest);
        norm
    };
    for d in &mut ds {
        d.profile.rate = Kbps(500);
    }
    t.router.run_in(|| e.sync(ds.clone())).unwrap().unwrap();
    assert_eq!(listed(&t), e.listing().to_string());
    // A restart reads all of it back (exact and interval map elements, v4
    // and v6, the fallback rule) and finds nothing to clean or restore.
    let cfg = config(&t);
    let report = t
        .router
        .run_in(move || Enforcer::start(LinuxBackend::open().unwrap(), cfg).map(|(_, r)| r))
        .unwrap()
        .unwrap();
    assert_eq!(report.adopted, ds.len());
    assert_eq!(
        (
            report.cleaned_chains,
            report.cleaned_elements,
            report.restored_elements
        ),
        (0, 0, 0)
    );
    assert_eq!(listed(&t), e.listing().to_string());
    // An action change and a removal: still the same.
    let mut changed = ds.clone();
    changed[1].out_of_profile = OutOfProfileAction::Accept {
        shape: Some(Kbps(500)),
    };
    changed.remove(2);
    t.router.run_in(|| e.sync(changed)).unwrap().unwrap();
    assert_eq!(listed(&t), e.listing().to_string());
    t.router.run_in(|| e.cleanup()).unwrap().unwrap();
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
