//! Router enforcement by mapping, the whole loop against the real kernel:
//! a router namespace between a host and a server; the policy server (with
//! its PostgreSQL, started by the harness) runs a per-user rule for alice
//! on role `router`, whose device role matches users by address
//! (`qosloopUserMatch: address`); the enforcer daemon on the router's
//! server-side interface is its PEP over COPS. Alice's address is mapped
//! in the knowledge base (a static mapping, as the directory's
//! `qosloopUserMapping` entries are written): her traffic is limited at the
//! router while the host's other address is not; then the mapping moves to
//! the other address and the limit follows it.
//!
//! "Limited" is the contract, not a rate on this host's clock: the
//! decision's meter counts every packet of the mapped address and none of
//! the other's, drops some, and what arrives of the mapped address stays
//! within `2 Mbit/s × T + bucket` in every window of kernel receive time;
//! everything the other address sent arrives.
//!
//! The policy server runs in a thread inside the router namespace (its PDP
//! on the router's loopback, where the enforcer dials it) and reaches
//! PostgreSQL over its Unix socket (not namespaced).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_policy_server::repo::parse_policy_ldif;
use qosloop_policy_server::server::{LoopConfig, RatesFrom};
use qosloop_policy_server::{PdpConfig, Server};
use qosloop_schema::{Kbps, TrafficProfile};
use qosloop_testbed::harness::{
    prerequisite, require_binary, require_root, Netns, Postgres, VethPair,
};
use qosloop_testbed::need;
use qosloop_testbed::traffic::{self, FlowGen, Schedule, SinkReport, StopWhen, BOUND_WINDOWS};
use qosloop_testkit::inprofile::{wall_ns, ProfileStep};
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PORT: u16 = 5401;
const PACKET_LEN: usize = 1000;
const LIMIT_KBPS: u64 = 2000;
const OFFERED_KBPS: u64 = 4000;
const SECS: u64 = 6;
/// How long the test waits for what must happen (rules installed, every
/// packet metered, every forwarded packet received): a bound for a broken
/// run, which a slow one does not reach.
const DEADLINE: Duration = Duration::from_secs(60);
const FIRST: &str = "10.94.1.2";
const SECOND: &str = "10.94.1.3";
const SERVER: &str = "10.94.2.2";

fn policy_ldif(interface: &str) -> String {
    format!(
        "dn: cn=cap-2m,ou=classes,dc=q
objectClass: pcimPolicyInstance
objectClass: qosloopServiceClass
cn: cap-2m
qosloopClassName: cap-2m
qosloopProfileRate: {LIMIT_KBPS}
qosloopProfileBurst: 25000

dn: cn=above,cn=cap-2m,ou=classes,dc=q
objectClass: pcimPolicyInstance
objectClass: qosloopLoadBand
cn: above
qosloopBandName: above
qosloopBandFrom: 0
qosloopBandAction: drop

dn: cn=uplink,ou=links,dc=q
objectClass: pcimPolicyInstance
objectClass: qosloopLink
cn: uplink
qosloopLinkName: uplink
qosloopLinkCapacity: 100000

dn: cn=router,ou=devices,dc=q
objectClass: pcimPolicyInstance
objectClass: qosloopDeviceRole
cn: router
qosloopRole: router
qosloopInterface: {interface}
qosloopDirection: egress
qosloopDeviceCapacity: 100000
qosloopUserMatch: address

dn: cn=alice,ou=rules,dc=q
objectClass: pcimRuleInstance
objectClass: qosloopRuleAuxClass
objectClass: qosloopPerUserRuleAuxClass
cn: alice
pcimRulePriority: 20
pcimRoles: router
qosloopLinkDN: cn=uplink,ou=links,dc=q
qosloopRuleUser: alice

dn: cn=service,cn=alice,ou=rules,dc=q
objectClass: pcimRuleActionAssociation
cn: service
pcimActionOrder: 1
pcimActionDN: cn=cap-2m,ou=classes,dc=q
"
    )
}

fn loop_config() -> LoopConfig {
    LoopConfig {
        rates_from: RatesFrom::Records,
        interval: Duration::from_millis(200),
        ewma_weight: 0.5,
        hysteresis: 0.05,
        min_hold: Duration::ZERO,
        confirm: Duration::ZERO,
        gap_hold: Duration::ZERO,
        rate_lag: Duration::from_millis(300),
        gap_timeout: Duration::from_secs(2),
    }
}

/// The decision's profile (the class `cap-2m` of the policy).
fn profile() -> TrafficProfile {
    TrafficProfile {
        rate: Kbps(LIMIT_KBPS),
        burst_bytes: 25_000,
    }
}

/// Average kbit/s of flow `id` over its steady seconds (the first two and
/// the last left out: the token bucket starts full): a figure for humans.
fn steady_kbps(report: &SinkReport, id: u16) -> f64 {
    let Some(flow) = report.flows.get(&id) else {
        return 0.0;
    };
    let secs: Vec<_> = flow.seconds.values().collect();
    let steady = secs.get(2..secs.len().saturating_sub(1)).unwrap_or(&[]);
    steady.iter().map(|s| s.kbps()).sum::<f64>() / steady.len().max(1) as f64
}

/// The router's decisions' counters, summed: (in profile, out of profile)
/// packets, as `qosloop-enforcer status` reads them from the kernel.
fn meter_counts(router: &Netns, uplink: &str) -> (u64, u64) {
    let out = router
        .command(&enforcer_bin())
        .args(["--interface", uplink, "--capacity", "100mbit"])
        .args(["--roles", "router", "status", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let decisions = status["decisions"].as_array().unwrap();
    let sum = |key: &str| {
        decisions
            .iter()
            .map(|d| d[key].as_u64().unwrap())
            .sum::<u64>()
    };
    (sum("in_profile_packets"), sum("out_of_profile_packets"))
}

fn enforcer_bin() -> String {
    qosloop_testkit::component("qosloop-enforcer")
        .unwrap()
        .display()
        .to_string()
}

/// One traffic run: what each address sent, what the decision's meter
/// counted of it, what arrived.
struct Run {
    sent: [u64; 2],
    /// In and out of profile, counted during the run.
    metered: (u64, u64),
    got: SinkReport,
    start_ns: u64,
}

/// Two flows at once from the host's two addresses (ids 1 and 2), each
/// offering [`OFFERED_KBPS`]; `limited` (1 or 2) is the mapped one. Waits
/// until the meter has counted every packet of the mapped flow, then until
/// the server has received every packet the meter passed and every packet
/// of the other flow.
fn send_both(host: &Netns, router: &Netns, server: &Netns, uplink: &str, limited: u16) -> Run {
    let before = meter_counts(router, uplink);
    let until = StopWhen::new();
    let sink_until = until.clone();
    let limit = Duration::from_secs(SECS) + DEADLINE;
    let start_ns = wall_ns();
    let sink = server
        .spawn_in(move || traffic::sink_timestamped(&[PORT], &sink_until, limit))
        .unwrap();
    assert!(until.wait_ready(DEADLINE), "the sink did not start");
    let gen = |id: u16, from: &str| {
        let flow = FlowGen {
            id,
            bind: SocketAddrV4::new(from.parse().unwrap(), 6400 + id),
            dst: SocketAddrV4::new(SERVER.parse().unwrap(), PORT),
            packet_len: PACKET_LEN,
            dscp: 0,
            schedule: Schedule::constant(
                (OFFERED_KBPS * 125) as f64 / PACKET_LEN as f64,
                Duration::from_secs(SECS),
            ),
        };
        let never = traffic::stop_flag();
        host.spawn_in(move || traffic::generate(&flow, &never))
            .unwrap()
    };
    let a = gen(1, FIRST);
    let b = gen(2, SECOND);
    let sent = [
        a.join().unwrap().unwrap().unwrap().packets,
        b.join().unwrap().unwrap().unwrap().packets,
    ];
    let mapped_sent = sent[usize::from(limited - 1)];
    let other_sent = sent[usize::from(2 - limited)];
    let end = Instant::now() + DEADLINE;
    let metered = loop {
        let now = meter_counts(router, uplink);
        let counted = (
            now.0.saturating_sub(before.0),
            now.1.saturating_sub(before.1),
        );
        if counted.0 + counted.1 >= mapped_sent || Instant::now() >= end {
            break counted;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let other = 3 - limited;
    until.set(move |r| {
        let packets = |id: u16| r.flows.get(&id).map_or(0, |f| f.packets);
        packets(limited) >= metered.0 && packets(other) >= other_sent
    });
    let got = sink.join().unwrap().unwrap().unwrap();
    Run {
        sent,
        metered,
        got,
        start_ns,
    }
}

fn ruleset(router: &Netns) -> String {
    let out = router
        .command("nft")
        .args(["list", "ruleset"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits (bounded, so a broken build fails instead of hanging) until the
/// router's ruleset names `present` and not `absent`; returns how long.
fn wait_rules(router: &Netns, present: &str, absent: &str) -> Duration {
    let t0 = Instant::now();
    loop {
        let r = ruleset(router);
        if r.contains(present) && !r.contains(absent) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < DEADLINE,
            "the router's rules never named {present} without {absent}:\n{r}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Checks one traffic run: the flow from `limited` (id) metered and held
/// to the profile, the other one untouched.
fn check(label: &str, limited: u16, run: &Run) {
    let other = 3 - limited;
    let (mapped_sent, other_sent) = (
        run.sent[usize::from(limited - 1)],
        run.sent[usize::from(other - 1)],
    );
    let flow = |id: u16| run.got.flows.get(&id).cloned().unwrap_or_default();
    let (lim, free) = (flow(limited), flow(other));
    let (in_p, out_p) = run.metered;
    eprintln!(
        "{label}: the mapped address sent {mapped_sent} packets, metered {in_p} in and {out_p} \
         out of profile, received {} ({:.0} kbit/s, limit {LIMIT_KBPS}); the other sent \
         {other_sent}, received {} ({:.0} kbit/s)",
        lim.packets,
        steady_kbps(&run.got, limited),
        free.packets,
        steady_kbps(&run.got, other)
    );
    // The meter saw every packet of the mapped address, and only those.
    assert_eq!(
        in_p + out_p,
        mapped_sent,
        "{label}: the decision metered {} packets, the mapped address sent {mapped_sent} \
         (and the other {other_sent})",
        in_p + out_p
    );
    assert!(
        out_p > 0,
        "{label}: nothing of the mapped address was dropped"
    );
    assert_eq!(
        lim.packets, in_p,
        "{label}: every packet the meter passed arrives"
    );
    let bound = [ProfileStep::of(run.start_ns, &profile())];
    let misses = traffic::bound_misses(
        &format!("{label}: the mapped address"),
        &lim.all_arrivals(),
        &bound,
        &BOUND_WINDOWS,
        PACKET_LEN as f64,
    );
    assert!(misses.is_empty(), "{}", misses.join("\n"));
    // The unmapped address is not limited: all of it arrives.
    assert_eq!(
        free.packets, other_sent,
        "{label}: the unmapped address sent {other_sent}, received {}",
        free.packets
    );
}

#[test]
fn the_router_limits_the_users_current_address_and_follows_the_mapping() {
    if prerequisite(require_root("programs HTB and nftables in namespaces")).is_none()
        || prerequisite(require_binary("nft", "nftables")).is_none()
    {
        return;
    }
    need!(Postgres::available());
    let pg = Postgres::start().unwrap();
    // The server in the router namespace reaches PostgreSQL through its
    // Unix socket in the harness's directory.
    let socket_url = format!(
        "postgres://postgres@localhost:{}/postgres?host={}",
        pg.port(),
        pg.dir().display()
    );

    let host = Netns::create("rbh").unwrap();
    let router = Netns::create("rbr").unwrap();
    let server = Netns::create("rbs").unwrap();
    let h = VethPair::connect(&host, &format!("{FIRST}/24"), &router, "10.94.1.1/24").unwrap();
    let s = VethPair::connect(&router, "10.94.2.1/24", &server, &format!("{SERVER}/24")).unwrap();
    host.ip(&["addr", "add", &format!("{SECOND}/24"), "dev", &h.a_if])
        .unwrap();
    host.ip(&["route", "add", "default", "via", "10.94.1.1"])
        .unwrap();
    server
        .ip(&["route", "add", "default", "via", "10.94.2.1"])
        .unwrap();
    router.sysctl("net.ipv4.ip_forward", "1").unwrap();
    let uplink = s.a_if.clone();

    // The policy server, inside the router namespace.
    let policy = parse_policy_ldif(&policy_ldif(&uplink)).unwrap();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let url = socket_url.clone();
    let pdp = router
        .spawn_in(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let (_policy_tx, policy_rx) = tokio::sync::watch::channel(Arc::new(policy));
                let server = Server::start(
                    &url,
                    "127.0.0.1:0".parse().unwrap(),
                    PdpConfig::default(),
                    loop_config(),
                    policy_rx,
                )
                .await
                .unwrap();
                addr_tx.send(server.pdp_addr).unwrap();
                let _ = stop_rx.await;
                server.stop().await;
            })
        })
        .unwrap();
    let pdp_addr = addr_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the policy server did not start");
    let mut daemon = router
        .command(&enforcer_bin())
        .args(["--interface", &uplink, "--capacity", "100mbit"])
        .args(["--roles", "router", "--pdp", &pdp_addr.to_string()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();

    // The test's own handle on the same database (TCP, root namespace).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = rt.block_on(qosloop_store::Db::connect(&pg.url())).unwrap();
    let map = |addr: &str| {
        rt.block_on(db.kb_sync_static("ldap", &[(addr.to_owned(), "alice".to_owned())], 1))
            .unwrap();
    };

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        map(FIRST);
        let took = wait_rules(&router, FIRST, SECOND);
        eprintln!("mapping {FIRST} -> alice: the router's rules named it after {took:?}");
        let run = send_both(&host, &router, &server, &uplink, 1);
        check("alice at the first address", 1, &run);

        map(SECOND);
        let took = wait_rules(&router, SECOND, FIRST);
        eprintln!("mapping moved to {SECOND}: the router's rules followed after {took:?}");
        let run = send_both(&host, &router, &server, &uplink, 2);
        check("alice at the second address", 2, &run);
    }));

    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = daemon.wait();
    let _ = router
        .command(&enforcer_bin())
        .args(["--interface", &uplink, "--cleanup"])
        .output();
    let _ = stop_tx.send(());
    let _ = pdp.join();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
