//! Per-user enforcement on the user's own host, against the real kernel:
//! a host namespace with two local users (created and removed by the
//! test kit's harness) sending or fetching UDP concurrently through the same
//! address and a server namespace; a per-user decision naming one user (by
//! name: the enforcer resolves the uid through the host's user database)
//! limits only that user — what it sends (`meta skuid` on the host's
//! egress, `ct mark` set on its connections), what it receives (the tagged
//! connections' inbound packets, matched on the input hook), over IPv4 and
//! IPv6; a decision that shapes queues the user's traffic instead of
//! dropping it.
//!
//! What is asserted is the contract, not the host's speed: the user's
//! traffic is limited (the enforcer dropped some of it: its sends refused,
//! its counters) and what arrives of it stays within the token bucket's
//! `rate × T + bucket` in every window, in kernel receive time; the other
//! user loses nothing (every datagram sent arrives, or was dropped by the
//! receiving socket itself because the receiver ran late, which the kernel
//! counts apart). Rates per second are printed for humans.
//!
//! This drives the enforcer directly with the decision the policy server
//! makes for the per-user sample rule; `testbed/tests/it/per_user_chain.rs`
//! runs the whole chain (agent → collector → policy server → enforcer).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_enforcer::status::DecisionStatus;
use qosloop_enforcer::{Enforcer, EnforcerConfig, LinuxBackend};
use qosloop_schema::{
    Decision, DecisionReason, FlowSpec, Kbps, OutOfProfileAction, TrafficProfile, UserRef,
};
use qosloop_testkit::harness::{
    prerequisite, require_binary, require_root, Netns, TestUser, VethPair,
};
use qosloop_testkit::inprofile::{wall_ns, ProfileStep};
use qosloop_testkit::traffic::{bound_misses, BOUND_WINDOWS};
use qosloop_testkit::user_traffic::{
    self, as_user, child_numbers, child_received, ip_bytes, kbps_from, receive, serve,
    stamp_on_arrival, Received, PAYLOAD,
};
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;
const LIMIT_KBPS: u64 = 2000;
const ALICE_KBPS: u64 = 5000;
const BOB_KBPS: u64 = 3000;
const SECS: u64 = 7;
/// How long a receiver waits at most beyond the traffic: a bound for a
/// broken run, which a slow one does not reach.
const DEADLINE: Duration = Duration::from_secs(60);

fn prerequisites() -> Option<()> {
    prerequisite(require_root(
        "creates users and programs nftables in namespaces",
    ))?;
    prerequisite(require_binary("nft", "nftables"))?;
    prerequisite(require_binary("useradd", "passwd"))?;
    prerequisite(require_binary("setpriv", "util-linux"))?;
    Some(())
}

/// The profile of the per-user rule: 2 Mbit/s.
fn profile() -> TrafficProfile {
    TrafficProfile {
        rate: Kbps(LIMIT_KBPS),
        burst_bytes: 25_000,
    }
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
        profile: profile(),
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
    /// Just before the decision was installed (ns since the Unix epoch):
    /// no bound applies before it.
    installed_ns: u64,
    /// One bed at a time (dropped last): two beds would share the users'
    /// names' uids and the machine's two cores.
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
        let installed_ns = wall_ns();
        host.run_in(|| enforcer.install(d)).unwrap().unwrap();
        Bed {
            _serial: serial,
            alice,
            bob,
            host,
            rx,
            link,
            enforcer,
            installed_ns,
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

    /// Alice's decision as the kernel holds it (counters, classes).
    fn decision(&mut self) -> DecisionStatus {
        let e = &mut self.enforcer;
        let layout = e.layout().clone();
        let status = self
            .host
            .run_in(|| qosloop_enforcer::status::read(e.backend(), &layout))
            .unwrap()
            .unwrap();
        status
            .decisions
            .into_iter()
            .find(|d| d.id == 7)
            .expect("alice's decision installed")
    }

    fn finish(mut self) {
        let e = &mut self.enforcer;
        self.host.run_in(|| e.cleanup()).unwrap().unwrap();
    }
}

/// Average kbit/s over the steady seconds (the first two and the last
/// left out: the token bucket starts full, the last second is partial): a
/// figure for humans, 0 when there are too few.
fn steady_kbps(seconds: &[u64]) -> f64 {
    kbps_from(seconds, 2).unwrap_or(0.0)
}

/// The users' side of [`as_user`]: does nothing unless started by it.
#[test]
fn user_child() {
    user_traffic::play_role().unwrap();
}

/// [`user_child`] by its full name in the test binary.
const USER_CHILD: &str = concat!(module_path!(), "::user_child");

fn as_user_in(ns: &Netns, uid: u32, role: &str) -> std::process::Child {
    // The test's path without the crate's name: what libtest calls it.
    let test = USER_CHILD.split_once("::").map_or(USER_CHILD, |(_, t)| t);
    as_user(ns, uid, test, role).unwrap()
}

/// One user's traffic: what was sent (and refused by the sender's own
/// output path), what arrived.
#[derive(Debug)]
struct Leg {
    sent: u64,
    refused: u64,
    got: Received,
}

impl Leg {
    fn kbps(&self) -> f64 {
        steady_kbps(&self.got.seconds)
    }
}

/// Alice and bob each fetch from their own server port (alice offered
/// `ALICE_KBPS`, bob `BOB_KBPS`).
fn downloads(bed: &Bed, v6: bool) -> (Leg, Leg) {
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
    let (got_a, got_b) = (child_received(a).unwrap(), child_received(b).unwrap());
    let (sent_a, sent_b) = (s_a.join().unwrap().unwrap(), s_b.join().unwrap().unwrap());
    let alice = Leg {
        sent: sent_a.0,
        refused: sent_a.1,
        got: got_a,
    };
    let bob = Leg {
        sent: sent_b.0,
        refused: sent_b.1,
        got: got_b,
    };
    eprintln!(
        "{} downloads: alice offered {ALICE_KBPS} kbit/s ({} packets), received {} ({:.0} kbit/s, \
         limit {LIMIT_KBPS}; per second {:?}); bob offered {BOB_KBPS} kbit/s ({} packets), \
         received {} and {} dropped by his socket ({:.0} kbit/s)",
        if v6 { "IPv6" } else { "IPv4" },
        alice.sent,
        alice.got.packets(),
        alice.kbps(),
        alice.got.seconds,
        bob.sent,
        bob.got.packets(),
        bob.got.socket_drops,
        bob.kbps()
    );
    (alice, bob)
}

/// Alice and bob each send to their own port of the server (alice
/// offered `ALICE_KBPS`, bob `BOB_KBPS`).
fn uploads(bed: &Bed, v6: bool) -> (Leg, Leg) {
    let (host, server) = if v6 {
        ("[fd93::1]", "[fd93::2]")
    } else {
        ("10.93.0.1", "10.93.0.2")
    };
    // Each receiver listens, its datagrams stamped on arrival, before
    // anyone sends.
    let recv = |port: u16| {
        let bind: SocketAddr = format!("{server}:{port}").parse().unwrap();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let handle = bed
            .rx
            .spawn_in(move || {
                let sock = UdpSocket::bind(bind).unwrap();
                stamp_on_arrival(&sock).unwrap();
                ready_tx.send(()).unwrap();
                receive(&sock, Duration::from_secs(SECS) + DEADLINE)
            })
            .unwrap();
        ready.recv_timeout(DEADLINE).expect("a receiver listening");
        handle
    };
    let (r_a, r_b) = (recv(5301), recv(5302));
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
    let alice = Leg {
        sent: sa[0],
        refused: sa[1],
        got: r_a.join().unwrap().unwrap(),
    };
    let bob = Leg {
        sent: sb[0],
        refused: sb[1],
        got: r_b.join().unwrap().unwrap(),
    };
    eprintln!(
        "{} uploads: alice sent {} packets ({} refused), received {} ({:.0} kbit/s; per second \
         {:?}); bob sent {} ({} refused), received {} ({:.0} kbit/s)",
        if v6 { "IPv6" } else { "IPv4" },
        alice.sent,
        alice.refused,
        alice.got.packets(),
        alice.kbps(),
        alice.got.seconds,
        bob.sent,
        bob.refused,
        bob.got.packets(),
        bob.kbps()
    );
    (alice, bob)
}

/// Nothing of `who`'s stream was lost on the way: every datagram sent
/// arrived, or was dropped by the receiving socket itself (it ran late: a
/// matter of the host, counted by the kernel apart).
fn assert_nothing_lost(who: &str, leg: &Leg) {
    assert_eq!(
        leg.got.packets() + leg.got.socket_drops,
        leg.sent,
        "{who}: sent {}, received {} and {} dropped by the receiving socket (end marker: {:?})",
        leg.sent,
        leg.got.packets(),
        leg.got.socket_drops,
        leg.got.announced
    );
}

/// What arrived of alice's stream stays within `rate_kbps × T + bucket`
/// in every window (kernel receive time) from the install on, give or
/// take `slack_packets` packets.
fn assert_alice_within(
    bed: &Bed,
    what: &str,
    leg: &Leg,
    rate_kbps: u64,
    bucket: f64,
    slack_packets: u32,
    v6: bool,
) {
    let steps = [ProfileStep {
        from_ns: bed.installed_ns,
        rate_bytes_per_s: Kbps(rate_kbps).bytes_per_sec() as f64,
        bucket_bytes: bucket,
    }];
    let packet = ip_bytes(PAYLOAD, v6) as f64;
    let misses = bound_misses(
        what,
        &leg.got.arrivals,
        &steps,
        &BOUND_WINDOWS,
        f64::from(slack_packets) * packet,
    );
    assert!(misses.is_empty(), "{}", misses.join("\n"));
}

/// Alice's bytes in profile: the decision's bucket (one second of the
/// profile plus the meter's burst), one packet for a window's edge.
fn assert_alice_in_profile(bed: &Bed, what: &str, leg: &Leg, v6: bool) {
    assert!(leg.got.packets() > 0, "{what}: nothing of alice's arrived");
    let bucket = profile().bucket_bytes() as f64;
    assert_alice_within(bed, what, leg, LIMIT_KBPS, bucket, 1, v6);
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
    let (alice, bob) = uploads(&bed, false);
    // The drops are alice's socket's own (the enforcer's rule on her
    // uid), none of bob's.
    assert!(
        alice.refused > 0,
        "alice's out-of-profile packets were not dropped"
    );
    assert_eq!(bob.refused, 0, "bob's packets were dropped");
    // What the enforcer let through arrives, within the profile.
    assert_nothing_lost("alice (what was not refused)", &alice);
    assert_alice_in_profile(&bed, "alice's uploads", &alice, false);
    assert_nothing_lost("bob", &bob);
    bed.finish();
}

#[test]
fn a_per_user_decision_limits_what_its_user_receives() {
    if prerequisites().is_none() {
        return;
    }
    let mut bed = Bed::new("pur", OutOfProfileAction::Drop);
    let replies = bed.chain("replies");
    assert!(replies.contains("hook input"), "{replies}");
    assert!(replies.contains("ct mark 0x71"), "{replies}");
    let (alice, bob) = downloads(&bed, false);
    let d = bed.decision();
    assert!(
        d.out_of_profile_packets > 0,
        "nothing alice received was dropped: {d:?}"
    );
    assert_alice_in_profile(&bed, "alice's downloads", &alice, false);
    assert_nothing_lost("bob", &bob);
    bed.finish();
}

#[test]
fn per_user_rules_hold_for_ipv6() {
    if prerequisites().is_none() {
        return;
    }
    let mut bed = Bed::new("pu6", OutOfProfileAction::Drop);
    // One rule for both families: no `meta nfproto`.
    let fallback = bed.chain("fallback");
    assert!(!fallback.contains("nfproto"), "{fallback}");
    let (alice, bob) = uploads(&bed, true);
    assert!(alice.refused > 0, "alice's IPv6 packets were not dropped");
    assert_eq!(bob.refused, 0, "bob's IPv6 packets were dropped");
    assert_nothing_lost("alice over IPv6 (what was not refused)", &alice);
    assert_alice_in_profile(&bed, "alice's IPv6 uploads", &alice, true);
    assert_nothing_lost("bob over IPv6", &bob);
    let dropped_before = bed.decision().out_of_profile_packets;
    let (alice, bob) = downloads(&bed, true);
    let d = bed.decision();
    assert!(
        d.out_of_profile_packets > dropped_before,
        "nothing alice received over IPv6 was dropped: {d:?}"
    );
    assert_alice_in_profile(&bed, "alice's IPv6 downloads", &alice, true);
    assert_nothing_lost("bob over IPv6", &bob);
    bed.finish();
}

/// The counter of the rule of `chain` (a listing) that carries `comment`.
fn rule_counter(chain: &str, comment: &str) -> Option<u64> {
    let line = chain
        .lines()
        .find(|l| l.contains(&format!("comment \"{comment}\"")))?;
    line.split("counter packets ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[test]
fn a_shaping_per_user_decision_queues_rather_than_drops() {
    if prerequisites().is_none() {
        return;
    }
    // In profile 2 Mbit/s; out of profile accepted into an HTB class of
    // 1 Mbit/s on the host's egress: alice's sends are queued, none
    // refused (her socket waits for the queue instead; the rule that
    // polices what she receives does not see what she sends), and all of
    // them arrive, within 3 Mbit/s × T plus the bucket and the class's
    // burst.
    const SHAPE_KBPS: u64 = 1000;
    let mut bed = Bed::new(
        "pup",
        OutOfProfileAction::Accept {
            shape: Some(Kbps(SHAPE_KBPS)),
        },
    );
    let (alice, bob) = uploads(&bed, false);
    assert_eq!(alice.refused, 0, "alice's packets were dropped, not shaped");
    assert_eq!(bob.refused, 0, "bob's packets were dropped");
    assert_nothing_lost("alice (queued, not dropped)", &alice);
    assert_nothing_lost("bob", &bob);
    // The class's ceil burst as the enforcer sizes it (tc's default: rate
    // / HZ + 1600 B); HTB may overdraw by one packet.
    let class_burst = (Kbps(SHAPE_KBPS).bytes_per_sec() / 1000 + 1600) as f64;
    assert_alice_within(
        &bed,
        "alice's shaped uploads",
        &alice,
        LIMIT_KBPS + SHAPE_KBPS,
        profile().bucket_bytes() as f64 + class_burst,
        2,
        false,
    );
    // The out-of-profile packets went through the shaping class.
    let d = bed.decision();
    let class = d.out_class.as_ref().expect("an out-of-profile class");
    assert!(
        d.out_of_profile_packets > 0 && class.packets > 0,
        "nothing went through the shaping class: {d:?}"
    );
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
    // profile + shape instead (that limit's bucket: one second of its rate
    // plus the meter's burst).
    let chain = bed.chain("d7");
    assert!(
        chain.contains("iif != 0 limit rate over 375000 bytes/second"),
        "{chain}"
    );
    let (alice, bob) = downloads(&bed, false);
    let chain = bed.chain("d7");
    let policed = rule_counter(&chain, "replies");
    assert!(
        policed.is_some_and(|n| n > 0),
        "nothing alice received was policed: {chain}"
    );
    assert!(alice.got.packets() > 0, "nothing of alice's arrived");
    let police = TrafficProfile {
        rate: Kbps(LIMIT_KBPS + SHAPE_KBPS),
        burst_bytes: profile().burst_bytes,
    };
    let police_bucket =
        (police.rate.bytes_per_sec() + u64::from(profile().meter_burst_bytes())) as f64;
    assert_alice_within(
        &bed,
        "alice's policed downloads",
        &alice,
        LIMIT_KBPS + SHAPE_KBPS,
        police_bucket,
        1,
        false,
    );
    assert_nothing_lost("bob", &bob);
    bed.finish();
}
