//! Per-user enforcement on the user's own host, against the real kernel:
//! a host namespace with two local users (created and removed by the
//! testbed harness) sending or fetching UDP concurrently through the same
//! address and a server namespace; a per-user decision naming one user (by
//! name: the enforcer resolves the uid through the host's user database)
//! limits only that user — what it sends (`meta skuid` on the host's
//! egress, `ct mark` set on its connections), what it receives (the tagged
//! connections' inbound packets, matched on the input hook), over IPv4 and
//! IPv6; a decision that shapes queues the user's traffic instead of
//! dropping it.
//!
//! This drives the enforcer directly with the decision the policy server
//! makes for the per-user sample rule; `testbed/tests/per_user_chain.rs`
//! runs the whole chain (agent → collector → policy server → enforcer).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_enforcer::{Enforcer, EnforcerConfig, LinuxBackend};
use qosloop_schema::{
    Decision, DecisionReason, FlowSpec, Kbps, OutOfProfileAction, TrafficProfile, UserRef,
};
use qosloop_testkit::harness::{
    prerequisite, require_binary, require_root, Netns, TestUser, VethPair,
};
use qosloop_testkit::user_traffic::{self, as_user, child_numbers, kbps_from, receive, serve};
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;
const LIMIT_KBPS: u64 = 2000;
const ALICE_KBPS: u64 = 5000;
const BOB_KBPS: u64 = 3000;
const SECS: u64 = 7;

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
/// drop" (or another action), naming the user but not its uid.
fn per_user_decision(user: &str, action: OutOfProfileAction) -> Decision {
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
        out_of_profile: action,
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

/// Two users, the host and server namespaces joined by a veth pair
/// (10.93.0.1 / 10.93.0.2 and fd93::1 / fd93::2), and the enforcer on the
/// host's side with `action` installed for alice.
struct Bed {
    alice: TestUser,
    bob: TestUser,
    host: Netns,
    rx: Netns,
    link: VethPair,
    enforcer: Enforcer<LinuxBackend>,
    /// One bed at a time (dropped last): rates are measured, and two beds
    /// would share the machine's two cores.
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Bed {
    fn new(tag: &str, action: OutOfProfileAction) -> Bed {
        static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let alice = TestUser::create("alice").unwrap();
        let bob = TestUser::create("bob").unwrap();
        let host = Netns::create(&format!("{tag}h")).unwrap();
        let rx = Netns::create(&format!("{tag}r")).unwrap();
        let link = VethPair::connect(&host, "10.93.0.1/24", &rx, "10.93.0.2/24").unwrap();
        host.ip(&["addr", "add", "fd93::1/64", "dev", &link.a_if, "nodad"])
            .unwrap();
        rx.ip(&["addr", "add", "fd93::2/64", "dev", &link.b_if, "nodad"])
            .unwrap();
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
        let d = per_user_decision(&alice.name, action);
        host.run_in(|| enforcer.install(d)).unwrap().unwrap();
        Bed {
            _serial: serial,
            alice,
            bob,
            host,
            rx,
            link,
            enforcer,
        }
    }

    fn chain(&self, chain: &str) -> String {
        let out = self
            .host
            .command("nft")
            .args([
                "list",
                "chain",
                "inet",
                &format!("qosloop_{}", self.link.a_if),
                chain,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn finish(mut self) {
        let e = &mut self.enforcer;
        self.host.run_in(|| e.cleanup()).unwrap().unwrap();
    }
}

/// Average kbit/s over the steady seconds (the first two and the last
/// left out: the token bucket starts full, the last second is partial).
fn steady_kbps(seconds: &[u64]) -> f64 {
    kbps_from(seconds, 2).unwrap_or_else(|| panic!("too few seconds: {seconds:?}"))
}

fn within(measured: f64, want: f64, tolerance: f64) -> bool {
    (measured - want).abs() <= want * tolerance
}

/// The users' side of [`as_user`]: does nothing unless started by it.
#[test]
fn user_child() {
    user_traffic::play_role().unwrap();
}

fn as_user_in(ns: &Netns, uid: u32, role: &str) -> std::process::Child {
    as_user(ns, uid, "user_child", role).unwrap()
}

/// Alice and bob each fetch from their own server port (alice offered
/// `ALICE_KBPS`, bob `BOB_KBPS`): their received kbit/s, steady part.
fn downloads(bed: &Bed, v6: bool) -> (f64, f64) {
    let (host, server) = if v6 {
        ("[fd93::1]", "[fd93::2]")
    } else {
        ("10.93.0.1", "10.93.0.2")
    };
    let s_a = serve(
        &bed.rx,
        format!("{server}:5401").parse().unwrap(),
        ALICE_KBPS,
        SECS,
    );
    let s_b = serve(
        &bed.rx,
        format!("{server}:5402").parse().unwrap(),
        BOB_KBPS,
        SECS,
    );
    std::thread::sleep(Duration::from_millis(200));
    let a = as_user_in(
        &bed.host,
        bed.alice.uid,
        &format!("fetch {host}:6401 {server}:5401 {SECS}"),
    );
    let b = as_user_in(
        &bed.host,
        bed.bob.uid,
        &format!("fetch {host}:6402 {server}:5402 {SECS}"),
    );
    let seconds = |c| child_numbers(c, "RECEIVED").unwrap()[1..].to_vec();
    let (got_a, got_b) = (seconds(a), seconds(b));
    let (sent_a, sent_b) = (s_a.join().unwrap().unwrap(), s_b.join().unwrap().unwrap());
    let (ka, kb) = (steady_kbps(&got_a), steady_kbps(&got_b));
    eprintln!(
        "{} downloads: alice offered {ALICE_KBPS} kbit/s ({} packets), received {ka:.0} kbit/s \
         (limit {LIMIT_KBPS}; per second {got_a:?}); bob offered {BOB_KBPS} kbit/s ({} packets), \
         received {kb:.0} kbit/s",
        if v6 { "IPv6" } else { "IPv4" },
        sent_a.0,
        sent_b.0
    );
    (ka, kb)
}

/// Alice and bob each send to their own port of the server (alice
/// offered `ALICE_KBPS`, bob `BOB_KBPS`): received kbit/s (steady part)
/// and the sends refused, per user.
fn uploads(bed: &Bed, v6: bool) -> ((f64, u64), (f64, u64)) {
    let (host, server) = if v6 {
        ("[fd93::1]", "[fd93::2]")
    } else {
        ("10.93.0.1", "10.93.0.2")
    };
    let recv = |port: u16| {
        let bind: SocketAddr = format!("{server}:{port}").parse().unwrap();
        bed.rx
            .spawn_in(move || {
                receive(
                    &UdpSocket::bind(bind).unwrap(),
                    Duration::from_secs(SECS + 10),
                )
                .seconds
            })
            .unwrap()
    };
    let (r_a, r_b) = (recv(5301), recv(5302));
    std::thread::sleep(Duration::from_millis(200));
    let a = as_user_in(
        &bed.host,
        bed.alice.uid,
        &format!("send {host}:6301 {server}:5301 {ALICE_KBPS} {SECS}"),
    );
    let b = as_user_in(
        &bed.host,
        bed.bob.uid,
        &format!("send {host}:6302 {server}:5302 {BOB_KBPS} {SECS}"),
    );
    let (sa, sb) = (
        child_numbers(a, "SENT").unwrap(),
        child_numbers(b, "SENT").unwrap(),
    );
    let (got_a, got_b) = (r_a.join().unwrap().unwrap(), r_b.join().unwrap().unwrap());
    let (ka, kb) = (steady_kbps(&got_a), steady_kbps(&got_b));
    eprintln!(
        "{} uploads: alice sent {} packets ({} refused), received {ka:.0} kbit/s (per second \
         {got_a:?}); bob sent {} ({} refused), received {kb:.0} kbit/s",
        if v6 { "IPv6" } else { "IPv4" },
        sa[0],
        sa[1],
        sb[0],
        sb[1]
    );
    ((ka, sa[1]), (kb, sb[1]))
}

/// Bob's rate: what he was offered arrives (on a loaded machine a paced
/// sender in a debug build can fall behind its schedule; the bound is then
/// loose, never tight).
fn assert_bob_unaffected(kb: f64) {
    assert!(
        kb >= BOB_KBPS as f64 * 0.9 && kb <= BOB_KBPS as f64 * 1.1,
        "bob: {kb:.0} kbit/s, offered {BOB_KBPS}"
    );
}

#[test]
fn a_per_user_decision_limits_what_its_user_sends() {
    if prerequisites().is_none() {
        return;
    }
    let bed = Bed::new("pus", OutOfProfileAction::Drop);
    let fallback = bed.chain("fallback");
    assert!(
        fallback.contains(&format!("meta skuid {}", bed.alice.uid))
            || fallback.contains(&format!("meta skuid \"{}\"", bed.alice.name))
            || fallback.contains(&format!("meta skuid {}", bed.alice.name)),
        "{fallback}"
    );
    assert!(fallback.contains("ct mark set"), "{fallback}");
    let ((ka, refused_a), (kb, refused_b)) = uploads(&bed, false);
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
    assert_bob_unaffected(kb);
    bed.finish();
}

#[test]
fn a_per_user_decision_limits_what_its_user_receives() {
    if prerequisites().is_none() {
        return;
    }
    let bed = Bed::new("pur", OutOfProfileAction::Drop);
    let replies = bed.chain("replies");
    assert!(replies.contains("hook input"), "{replies}");
    assert!(replies.contains("ct mark 0x71"), "{replies}");
    let (ka, kb) = downloads(&bed, false);
    assert!(
        within(ka, LIMIT_KBPS as f64, 0.10),
        "alice downloads {ka:.0} kbit/s, limit {LIMIT_KBPS}"
    );
    assert_bob_unaffected(kb);
    bed.finish();
}

#[test]
fn per_user_rules_hold_for_ipv6() {
    if prerequisites().is_none() {
        return;
    }
    let bed = Bed::new("pu6", OutOfProfileAction::Drop);
    // One rule for both families: no `meta nfproto`.
    let fallback = bed.chain("fallback");
    assert!(!fallback.contains("nfproto"), "{fallback}");
    let ((ka, refused_a), (kb, refused_b)) = uploads(&bed, true);
    assert!(refused_a > 0, "alice's IPv6 packets were not dropped");
    assert_eq!(refused_b, 0, "bob's IPv6 packets were dropped");
    assert!(
        within(ka, LIMIT_KBPS as f64, 0.10),
        "alice sends {ka:.0} kbit/s over IPv6, limit {LIMIT_KBPS}"
    );
    assert_bob_unaffected(kb);
    let (ka, kb) = downloads(&bed, true);
    assert!(
        within(ka, LIMIT_KBPS as f64, 0.10),
        "alice receives {ka:.0} kbit/s over IPv6, limit {LIMIT_KBPS}"
    );
    assert_bob_unaffected(kb);
    bed.finish();
}

#[test]
fn a_shaping_per_user_decision_queues_rather_than_drops() {
    if prerequisites().is_none() {
        return;
    }
    // In profile 2 Mbit/s; out of profile accepted into an HTB class of
    // 1 Mbit/s on the host's egress: alice gets 3 Mbit/s, none of her
    // sends refused (her socket waits for the queue instead; the rule that
    // polices what she receives does not see what she sends).
    const SHAPE_KBPS: u64 = 1000;
    let bed = Bed::new(
        "pup",
        OutOfProfileAction::Accept {
            shape: Some(Kbps(SHAPE_KBPS)),
        },
    );
    let ((ka, refused_a), (kb, refused_b)) = uploads(&bed, false);
    assert_eq!(refused_a, 0, "alice's packets were dropped, not shaped");
    assert_eq!(refused_b, 0, "bob's packets were dropped");
    let want = (LIMIT_KBPS + SHAPE_KBPS) as f64;
    assert!(
        within(ka, want, 0.10),
        "alice: {ka:.0} kbit/s, profile {LIMIT_KBPS} + shape {SHAPE_KBPS}"
    );
    assert_bob_unaffected(kb);
    // The out-of-profile packets went through the shaping class.
    let tc = bed
        .host
        .command("tc")
        .args(["-s", "class", "show", "dev", &bed.link.a_if])
        .output()
        .unwrap();
    let tc = String::from_utf8_lossy(&tc.stdout).into_owned();
    eprintln!("{tc}");
    assert!(tc.contains("ceil 1Mbit"), "{tc}");
    // What alice receives has no queue on the input hook: it is policed at
    // profile + shape instead.
    let chain = bed.chain("d7");
    assert!(
        chain.contains("iif != 0 limit rate over 375000 bytes/second"),
        "{chain}"
    );
    let (ka, kb) = downloads(&bed, false);
    assert!(
        within(ka, want, 0.10),
        "alice receives {ka:.0} kbit/s, profile {LIMIT_KBPS} + shape {SHAPE_KBPS}"
    );
    assert_bob_unaffected(kb);
    bed.finish();
}
