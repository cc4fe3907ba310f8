//! Per-user enforcement on the user's own host, against the real kernel:
//! a host namespace with two local users (created and removed by the test)
//! sending UDP concurrently from the same address to a receiver namespace;
//! a per-user decision naming one user (by name: the enforcer resolves the
//! uid through the host's user database) limits only that user's sockets
//! (`meta skuid` on the host's egress, `ct mark` set on their connections).
//!
//! This drives the enforcer directly with the decision the policy server
//! makes for the per-user sample rule (`qosloop-policy-server`'s engine
//! test `per_user_rules_decide_for_each_user_from_its_own_rate` covers
//! that step): the agent → collector → policy server links are not run
//! here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_enforcer::{Enforcer, EnforcerConfig, LinuxBackend};
use qosloop_schema::{
    Decision, DecisionReason, FlowSpec, Kbps, OutOfProfileAction, TrafficProfile, UserRef,
};
use qosloop_testbed::harness::{prerequisite, require_binary, require_root, Netns, VethPair};
use qosloop_testbed::traffic::{self, FlowGen, Schedule, SinkReport};
use std::net::SocketAddrV4;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

const PORT: u16 = 5301;
const PACKET_LEN: usize = 1000;
const LIMIT_KBPS: u64 = 2000;
const ALICE_KBPS: u64 = 5000;
const BOB_KBPS: u64 = 3000;
const SECS: u64 = 7;

/// A local user without a home; removed on drop, also when the test fails.
struct User {
    name: String,
    uid: u32,
}

impl User {
    fn new(prefix: &str) -> User {
        let name = format!("{prefix}{}", std::process::id() % 100_000);
        let _ = Command::new("userdel").args(["-f", &name]).output();
        let out = Command::new("useradd")
            .args(["-M", "-N", "-s", "/usr/sbin/nologin", &name])
            .output()
            .unwrap();
        assert!(out.status.success(), "useradd {name}: {out:?}");
        let uid = nix::unistd::User::from_name(&name)
            .unwrap()
            .expect("user just created")
            .uid
            .as_raw();
        User { name, uid }
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = Command::new("userdel").args(["-f", &self.name]).output();
    }
}

fn prerequisites() -> Option<()> {
    prerequisite(require_root(
        "creates users and programs nftables in namespaces",
    ))?;
    prerequisite(require_binary("nft", "nftables"))?;
    prerequisite(require_binary("useradd", "passwd"))?;
    prerequisite(require_binary("setpriv", "util-linux"))?;
    Some(())
}

/// The decision the engine makes for a per-user rule "above 2 Mbit/s,
/// drop", naming the user but not its uid.
fn per_user_decision(user: &str) -> Decision {
    Decision {
        id: 7,
        version: 1,
        role: "host".into(),
        policy_dn: "cn=alice,ou=rules,dc=qosloop,dc=example".into(),
        flow: FlowSpec {
            user: Some(UserRef::named(user)),
            ..FlowSpec::default()
        },
        profile: TrafficProfile {
            rate: Kbps(LIMIT_KBPS),
            burst_bytes: 25_000,
        },
        in_profile_dscp: None,
        out_of_profile: OutOfProfileAction::Drop,
        reason: DecisionReason {
            rate_kbps: ALICE_KBPS as f64,
            avg_rate_kbps: ALICE_KBPS as f64,
            link: "host-uplink".into(),
            link_load_kbps: ALICE_KBPS as f64,
            band: "twice".into(),
        },
        issued_ns: 0,
    }
}

/// A paced UDP flow sent as `uid`: this test binary run again in `ns`
/// under `setpriv` as that user (its `sender_child` test is the sender),
/// so the socket belongs to the user as if the user's own program sent it.
fn send_as(ns: &Netns, uid: u32, id: u16, sport: u16, kbps: u64) -> std::process::Child {
    let exe = std::env::current_exe().unwrap();
    Command::new("ip")
        .args(["netns", "exec", ns.name(), "setpriv"])
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups")
        .arg(exe)
        .args(["--exact", "sender_child", "--nocapture", "--test-threads=1"])
        .env(SEND_ENV, format!("{id},{sport},{kbps}"))
        .stdout(std::process::Stdio::piped())
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

const SEND_ENV: &str = "QOSLOOP_PER_USER_SEND";

/// The sender of [`send_as`]: does nothing unless started by it.
#[test]
fn sender_child() {
    let Ok(spec) = std::env::var(SEND_ENV) else {
        return;
    };
    let v: Vec<u64> = spec.split(',').map(|x| x.parse().unwrap()).collect();
    let [id, sport, kbps] = v[..] else {
        panic!("{SEND_ENV}={spec}")
    };
    let flow = FlowGen {
        id: id as u16,
        bind: SocketAddrV4::new("10.93.0.1".parse().unwrap(), sport as u16),
        dst: SocketAddrV4::new("10.93.0.2".parse().unwrap(), PORT),
        packet_len: PACKET_LEN,
        dscp: 0,
        schedule: Schedule::constant(
            (kbps * 125) as f64 / PACKET_LEN as f64,
            Duration::from_secs(SECS),
        ),
    };
    let report = traffic::generate(&flow, &traffic::stop_flag()).unwrap();
    println!("SENT {} {}", report.packets, report.send_errors);
}

/// The `SENT packets send_errors` line of a finished sender (a packet the
/// output path drops fails its `send` with EPERM).
fn sent(child: std::process::Child) -> (u64, u64) {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "sender failed: {text}");
    let line = text
        .lines()
        .find_map(|l| l.split_once("SENT ").map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("no SENT line: {text}"));
    let mut w = line.split_whitespace().map(|x| x.parse::<u64>().unwrap());
    (w.next().unwrap(), w.next().unwrap())
}

/// Average kbit/s of flow `id` over its steady seconds (the first two and
/// the last left out: the token bucket starts full).
fn steady_kbps(report: &SinkReport, id: u16) -> f64 {
    let flow = &report.flows[&id];
    let secs: Vec<_> = flow.seconds.iter().collect();
    assert!(secs.len() >= 5, "too few seconds of flow {id}: {secs:?}");
    let steady = &secs[2..secs.len() - 1];
    steady.iter().map(|(_, s)| s.kbps()).sum::<f64>() / steady.len() as f64
}

fn within(measured: f64, want: f64, tolerance: f64) -> bool {
    (measured - want).abs() <= want * tolerance
}

#[test]
fn a_per_user_decision_limits_only_its_user() {
    if prerequisites().is_none() {
        return;
    }
    let alice = User::new("qpua");
    let bob = User::new("qpub");
    let host = Netns::create("puh").unwrap();
    let rx = Netns::create("pur").unwrap();
    let link = VethPair::connect(&host, "10.93.0.1/24", &rx, "10.93.0.2/24").unwrap();
    let cfg = EnforcerConfig {
        direction: qosloop_schema::Direction::Egress,
        interface: link.a_if.clone(),
        roles: vec!["host".into()],
        capacity: Kbps(100_000),
        qdisc_major: 0xe5,
    };
    let mut enforcer = host
        .run_in(move || Enforcer::start(LinuxBackend::open().unwrap(), cfg).map(|(e, _)| e))
        .unwrap()
        .unwrap();
    let d = per_user_decision(&alice.name);
    host.run_in(|| enforcer.install(d)).unwrap().unwrap();
    let out = host
        .command("nft")
        .args([
            "list",
            "chain",
            "inet",
            &format!("qosloop_{}", link.a_if),
            "fallback",
        ])
        .output()
        .unwrap();
    let ruleset = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        ruleset.contains(&format!("meta skuid {}", alice.uid))
            || ruleset.contains(&format!("meta skuid \"{}\"", alice.name))
            || ruleset.contains(&format!("meta skuid {}", alice.name)),
        "{ruleset}"
    );
    assert!(ruleset.contains("ct mark set"), "{ruleset}");

    let stop = traffic::stop_flag();
    let sink_stop = stop.clone();
    let sink = rx
        .spawn_in(move || traffic::sink(&[PORT], &sink_stop, Duration::from_secs(SECS + 10)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let a = send_as(&host, alice.uid, 1, 6301, ALICE_KBPS);
    let b = send_as(&host, bob.uid, 2, 6302, BOB_KBPS);
    let (sent_a, refused_a) = sent(a);
    let (sent_b, refused_b) = sent(b);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let got = sink.join().unwrap().unwrap().unwrap();
    let (ka, kb) = (steady_kbps(&got, 1), steady_kbps(&got, 2));
    eprintln!(
        "alice (uid {}) offered {ALICE_KBPS} kbit/s ({} packets), received {ka:.0} kbit/s (limit {LIMIT_KBPS}); \
         bob (uid {}) offered {BOB_KBPS} kbit/s ({} packets), received {kb:.0} kbit/s",
        alice.uid, sent_a, bob.uid, sent_b
    );
    eprintln!("sends refused by the output path: alice {refused_a}, bob {refused_b}");
    // The drops are alice's socket's own (the enforcer's rule on her
    // uid), none of bob's.
    assert!(
        refused_a > 0,
        "alice's out-of-profile packets were not dropped"
    );
    assert_eq!(refused_b, 0, "bob's packets were dropped");
    assert!(
        within(ka, LIMIT_KBPS as f64, 0.10),
        "alice: {ka:.0} kbit/s, limit {LIMIT_KBPS}"
    );
    // Bob's offered rate is what his sender managed to send (on a loaded
    // machine a paced sender in a debug build can fall behind its
    // schedule; it then skips rather than bursts): all of it arrives.
    let offered_b = (sent_b * PACKET_LEN as u64 * 8) as f64 / 1000.0 / SECS as f64;
    let got_b = got.flows[&2].packets;
    eprintln!(
        "bob: offered {offered_b:.0} kbit/s on average, {got_b} of {sent_b} packets received"
    );
    assert!(
        within(got_b as f64, sent_b as f64, 0.10),
        "bob: {got_b} of {sent_b} packets received"
    );
    if within(offered_b, BOB_KBPS as f64, 0.05) {
        assert!(
            within(kb, BOB_KBPS as f64, 0.10),
            "bob: {kb:.0} kbit/s, offered {BOB_KBPS}"
        );
    }
    host.run_in(|| enforcer.cleanup()).unwrap().unwrap();
}
