//! Router enforcement by mapping, the whole loop against the real kernel:
//! a router namespace between a host and a server; the policy server (with
//! its PostgreSQL, started by the harness) runs a per-user rule for alice
//! on role `router`, whose device role matches users by address
//! (`qosloopUserMatch: address`); the enforcer daemon on the router's
//! server-side interface is its PEP over COPS. Alice's address is mapped
//! in the knowledge base (a static mapping, as the directory's
//! `qosloopUserMapping` entries are written): her traffic is limited at the
//! router (±10 % of 2 Mbit/s) while the host's other address is not; then
//! the mapping moves to the other address and the limit follows it.
//!
//! The policy server runs in a thread inside the router namespace (its PDP
//! on the router's loopback, where the enforcer dials it) and reaches
//! PostgreSQL over its Unix socket (not namespaced).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_policy_server::repo::parse_policy_ldif;
use qosloop_policy_server::server::{LoopConfig, RatesFrom};
use qosloop_policy_server::{PdpConfig, Server};
use qosloop_testbed::harness::{
    prerequisite, require_binary, require_root, Netns, Postgres, VethPair,
};
use qosloop_testbed::need;
use qosloop_testbed::traffic::{self, FlowGen, Schedule, SinkReport};
use std::net::SocketAddrV4;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PORT: u16 = 5401;
const PACKET_LEN: usize = 1000;
const LIMIT_KBPS: u64 = 2000;
const OFFERED_KBPS: u64 = 4000;
const SECS: u64 = 6;
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

/// Average kbit/s of flow `id` over its steady seconds (the first two and
/// the last left out: the token bucket starts full).
fn steady_kbps(report: &SinkReport, id: u16) -> f64 {
    let flow = report
        .flows
        .get(&id)
        .unwrap_or_else(|| panic!("flow {id} never arrived"));
    let secs: Vec<_> = flow.seconds.iter().collect();
    assert!(secs.len() >= 5, "too few seconds of flow {id}: {secs:?}");
    let steady = &secs[2..secs.len() - 1];
    steady.iter().map(|(_, s)| s.kbps()).sum::<f64>() / steady.len() as f64
}

fn within(measured: f64, want: f64, tolerance: f64) -> bool {
    (measured - want).abs() <= want * tolerance
}

/// Two flows at once from the host's two addresses (ids 1 and 2), each
/// offering [`OFFERED_KBPS`]; returns their steady received rates and the
/// packets each sent.
fn send_both(host: &Netns, server: &Netns) -> ((f64, u64), (f64, u64)) {
    let stop = traffic::stop_flag();
    let sink_stop = stop.clone();
    let sink = server
        .spawn_in(move || traffic::sink(&[PORT], &sink_stop, Duration::from_secs(SECS + 10)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
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
    let sent_a = a.join().unwrap().unwrap().unwrap().packets;
    let sent_b = b.join().unwrap().unwrap().unwrap().packets;
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let got = sink.join().unwrap().unwrap().unwrap();
    (
        (steady_kbps(&got, 1), sent_a),
        (steady_kbps(&got, 2), sent_b),
    )
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
            t0.elapsed() < Duration::from_secs(30),
            "the router's rules never named {present} without {absent}:\n{r}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Checks one traffic run: the flow from `limited` (id) at the limit, the
/// other one unaffected.
fn check(label: &str, limited: u16, (a, b): ((f64, u64), (f64, u64))) {
    let (lim, free) = if limited == 1 { (a, b) } else { (b, a) };
    let offered_free = (free.1 * PACKET_LEN as u64 * 8) as f64 / 1000.0 / SECS as f64;
    eprintln!(
        "{label}: mapped address received {:.0} kbit/s (limit {LIMIT_KBPS}, {} packets sent); \
         the other {:.0} kbit/s (offered {offered_free:.0} on average)",
        lim.0, lim.1, free.0
    );
    assert!(
        within(lim.0, LIMIT_KBPS as f64, 0.10),
        "{label}: the mapped address got {:.0} kbit/s, limit {LIMIT_KBPS}",
        lim.0
    );
    // The unmapped address is not limited: well above the limit, and all
    // of what its sender managed to send (a paced sender in a debug build
    // on a loaded machine may fall behind its schedule).
    assert!(
        free.0 > LIMIT_KBPS as f64 * 1.3,
        "{label}: the unmapped address was limited too: {:.0} kbit/s",
        free.0
    );
    if within(offered_free, OFFERED_KBPS as f64, 0.05) {
        assert!(
            within(free.0, OFFERED_KBPS as f64, 0.10),
            "{label}: the unmapped address got {:.0} kbit/s of {OFFERED_KBPS}",
            free.0
        );
    }
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
        .command(
            &qosloop_testkit::component("qosloop-enforcer")
                .unwrap()
                .display()
                .to_string(),
        )
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
        check("alice at the first address", 1, send_both(&host, &server));

        map(SECOND);
        let took = wait_rules(&router, SECOND, FIRST);
        eprintln!("mapping moved to {SECOND}: the router's rules followed after {took:?}");
        check("alice at the second address", 2, send_both(&host, &server));
    }));

    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = daemon.wait();
    let _ = router
        .command(
            &qosloop_testkit::component("qosloop-enforcer")
                .unwrap()
                .display()
                .to_string(),
        )
        .args(["--interface", &uplink, "--cleanup"])
        .output();
    let _ = stop_tx.send(());
    let _ = pdp.join();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
