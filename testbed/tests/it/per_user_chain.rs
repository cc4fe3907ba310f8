//! Per-user policy end to end, every link real: in a host namespace the
//! test creates, the host agent (`qosloop-meter --agent`) exports records
//! carrying the user to `qosloop-collector` (SQLite); `qosloop-policy-server`
//! in records mode reads them with a per-user policy from slapd (the
//! harness's) and makes alice's decision from her own rate; the decision
//! reaches `qosloop-enforcer` on the host over COPS; alice's download from a
//! server namespace is then held to her limit, bob's is not, and the
//! decision is what `GET /api/decisions` shows.
//!
//! The component binaries must be built first (`cargo build -p
//! qosloop-meter -p qosloop-collector -p qosloop-policy-server -p
//! qosloop-enforcer`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_testbed::harness::{
    require_binary, require_root, spawn_logged, tail_of, Netns, Slapd, TestUser, VethPair,
};
use qosloop_testbed::need;
use qosloop_testbed::procs::{component_dir, wait_for_port, Proc};
use qosloop_testbed::user_traffic::{self, as_user, child_numbers, kbps_from, serve};
use serde_json::Value;
use std::io::{Read, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BASE: &str = "dc=qosloop,dc=example";
const LIMIT_KBPS: u64 = 2000;
const ALICE_KBPS: u64 = 5000;
const BOB_KBPS: u64 = 3000;
/// How long the servers send: the decision follows the records within a
/// few seconds, and the steady seconds after it are measured.
const SECS: u64 = 22;
const HTTP: u16 = 8080;

/// "User ALICE: 2 Mbit/s; from 1 Mbit/s of her own rate on, drop above
/// the profile." Below 1 Mbit/s the band accepts: the limit comes only once
/// her records say she is above it (and, limited to 2 Mbit/s, she stays
/// above it: no feedback to the band below).
fn policy(alice: &str) -> String {
    format!(
        "dn: {BASE}
objectClass: dcObject
objectClass: organization
dc: qosloop
o: qosloop

dn: ou=rules,{BASE}
objectClass: organizationalUnit
ou: rules

dn: ou=classes,{BASE}
objectClass: organizationalUnit
ou: classes

dn: ou=links,{BASE}
objectClass: organizationalUnit
ou: links

dn: ou=devices,{BASE}
objectClass: organizationalUnit
ou: devices

dn: cn=user-2m,ou=classes,{BASE}
objectClass: pcimPolicyInstance
objectClass: qosloopServiceClass
cn: user-2m
qosloopClassName: user-2m
qosloopProfileRate: {LIMIT_KBPS}
qosloopProfileBurst: 25000

dn: cn=under,cn=user-2m,ou=classes,{BASE}
objectClass: pcimPolicyInstance
objectClass: qosloopLoadBand
cn: under
qosloopBandName: under
qosloopBandFrom: 0
qosloopBandTo: 1000
qosloopBandAction: accept

dn: cn=over,cn=user-2m,ou=classes,{BASE}
objectClass: pcimPolicyInstance
objectClass: qosloopLoadBand
cn: over
qosloopBandName: over
qosloopBandFrom: 1000
qosloopBandAction: drop

dn: cn=host-uplink,ou=links,{BASE}
objectClass: pcimPolicyInstance
objectClass: qosloopLink
cn: host-uplink
qosloopLinkName: host-uplink
qosloopLinkCapacity: 100000

dn: cn=host,ou=devices,{BASE}
objectClass: pcimPolicyInstance
objectClass: qosloopDeviceRole
cn: host
qosloopRole: host
qosloopInterface: eth0
qosloopDirection: egress
qosloopDeviceCapacity: 100000

dn: cn=alice,ou=rules,{BASE}
objectClass: pcimRuleInstance
objectClass: qosloopRuleAuxClass
objectClass: qosloopPerUserRuleAuxClass
cn: alice
pcimRuleName: alice
pcimRulePriority: 20
pcimRoles: host
qosloopLinkDN: cn=host-uplink,ou=links,{BASE}
qosloopRuleUser: {alice}
qosloopBandBasis: user

dn: cn=service,cn=alice,ou=rules,{BASE}
objectClass: pcimRuleActionAssociation
cn: service
pcimActionOrder: 1
pcimActionDN: cn=user-2m,ou=classes,{BASE}
"
    )
}

/// `GET PATH` of the policy server's API from inside the namespace.
fn api(ns: &Netns, path: &str) -> Option<Value> {
    let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let body = ns
        .run_in(move || {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", HTTP)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            s.write_all(request.as_bytes()).ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            Some(out.split_once("\r\n\r\n")?.1.to_owned())
        })
        .ok()??;
    serde_json::from_str(&body).ok()
}

/// The current decision for `user`, as the API shows it.
fn decision_for(ns: &Netns, user: &str) -> Option<Value> {
    let v = api(ns, "/api/decisions")?;
    v["current"]
        .as_array()?
        .iter()
        .find(|d| d["flow"]["user"]["name"] == user)
        .cloned()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The users' side of [`as_user`]: does nothing unless started by it.
#[test]
fn user_child() {
    user_traffic::play_role().unwrap();
}

#[test]
fn agent_records_drive_a_per_user_limit_on_the_host() {
    need!(require_root("creates users, namespaces, eBPF programs"));
    need!(require_binary("nft", "nftables"));
    need!(require_binary("setpriv", "util-linux"));
    need!(require_binary("nsenter", "util-linux"));
    need!(require_binary("useradd", "passwd"));
    need!(Slapd::available());
    need!(component_dir().map(|_| ()).map_err(|e| e.to_string()));
    let bin = component_dir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let alice = TestUser::create("alice").unwrap();
    let bob = TestUser::create("bob").unwrap();
    let host = Netns::create("pch").unwrap();
    let rx = Netns::create("pcr").unwrap();
    let link = VethPair::connect(&host, "10.94.0.1/24", &rx, "10.94.0.2/24").unwrap();
    let slapd = Slapd::start(BASE).unwrap();
    slapd.add_ldif(&policy(&alice.name)).unwrap();

    let s = |v: &str| v.to_owned();
    let db = format!("sqlite://{}", d.join("qosloop.db").display());
    let log = |name: &str| d.join(format!("{name}.log"));
    let logs = || {
        ["collector", "policy-server", "enforcer", "agent"]
            .iter()
            .map(|n| format!("{n}:\n{}", tail_of(&log(n), 15)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut collector = Proc::spawn(
        &host,
        &bin.join("qosloop-collector"),
        &[s("--listen"), s("127.0.0.1:4740"), s("--db"), db.clone()],
        log("collector"),
    )
    .unwrap();
    wait_for_port(
        &host,
        "127.0.0.1:4740".parse().unwrap(),
        Duration::from_secs(20),
    )
    .and_then(|_| collector.check_alive())
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    // One migration at a time on the SQLite file: the collector's first.
    let end = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(log("collector"))
        .unwrap_or_default()
        .contains("storage ready")
    {
        assert!(Instant::now() < end, "collector storage\n{}", logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut server = Proc::spawn(
        &host,
        &bin.join("qosloop-policy-server"),
        &[
            s("--db"),
            db.clone(),
            s("--ldap"),
            slapd.ldapi_url(),
            s("--ldap-base"),
            s(BASE),
            s("--pdp-listen"),
            s("127.0.0.1:3288"),
            s("--http"),
            format!("127.0.0.1:{HTTP}"),
            s("--rates-from"),
            s("records"),
        ],
        log("policy-server"),
    )
    .unwrap();
    wait_for_port(
        &host,
        "127.0.0.1:3288".parse().unwrap(),
        Duration::from_secs(20),
    )
    .and_then(|_| server.check_alive())
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    let mut enforcer = Proc::spawn(
        &host,
        &bin.join("qosloop-enforcer"),
        &[
            s("--pdp"),
            s("127.0.0.1:3288"),
            s("--interface"),
            link.a_if.clone(),
            s("--roles"),
            s("host"),
            s("--capacity"),
            s("100mbit"),
        ],
        log("enforcer"),
    )
    .unwrap();
    // The agent joins only the namespace's network (`nsenter --net`):
    // `ip netns exec` would mount a sysfs of its own, without the cgroup v2
    // hierarchy its programs attach to (it would fall back to nftables).
    let agent = spawn_logged(
        std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", host.name()))
            .arg(bin.join("qosloop-meter"))
            .args(["--agent", "--interim-ms", "500", "--export"])
            .arg("crane://127.0.0.1:4740")
            .arg("--export-spool")
            .arg(d.join("spool")),
        &log("agent"),
    )
    .unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(log("agent"))
        .unwrap_or_default()
        .contains("programs attached")
    {
        assert!(Instant::now() < end, "agent did not attach\n{}", logs());
        std::thread::sleep(Duration::from_millis(100));
    }

    // Both users fetch from the server namespace at once.
    let s_a = serve(&rx, "10.94.0.2:5401".parse().unwrap(), ALICE_KBPS, SECS);
    let s_b = serve(&rx, "10.94.0.2:5402".parse().unwrap(), BOB_KBPS, SECS);
    std::thread::sleep(Duration::from_millis(200));
    let fetch = |user: &TestUser, port: u16| {
        let role = format!("fetch 10.94.0.1:{} 10.94.0.2:{port} {SECS}", port + 1000);
        as_user(&host, user.uid, "user_child", &role).unwrap()
    };
    let (a, b) = (fetch(&alice, 5401), fetch(&bob, 5402));

    // Alice's records reach the policy server: her decision moves to the
    // band that drops, and the API shows it.
    let end = Instant::now() + Duration::from_secs(SECS - 8);
    let (decided_ms, decision) = loop {
        if let Some(dec) = decision_for(&host, &alice.name) {
            if dec["reason"]["band"] == "over" {
                break (now_ms(), dec);
            }
        }
        assert!(
            Instant::now() < end,
            "no drop decision for alice: {:?}\n{}",
            api(&host, "/api/decisions"),
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("alice's decision: {decision}");
    assert_eq!(decision["out_of_profile"]["action"], "drop", "{decision}");
    assert_eq!(decision["role"], "host", "{decision}");
    let avg = decision["reason"]["avg_rate_kbps"].as_f64().unwrap();
    assert!(avg >= 1000.0, "alice's rate from records: {avg}");
    assert!(
        decision_for(&host, &bob.name).is_none(),
        "bob has no rule: no decision"
    );

    let got_a = child_numbers(a, "RECEIVED").unwrap();
    let got_b = child_numbers(b, "RECEIVED").unwrap();
    s_a.join().unwrap().unwrap();
    s_b.join().unwrap().unwrap();
    // Alice: the seconds from two seconds after the decision was seen
    // (COPS and the kernel take well under that).
    let (first_a, secs_a) = (got_a[0], &got_a[1..]);
    let from = (decided_ms.saturating_sub(first_a) / 1000 + 2) as usize;
    let ka = kbps_from(secs_a, from)
        .unwrap_or_else(|| panic!("too few seconds after the decision: {from} of {secs_a:?}"));
    let kb = kbps_from(&got_b[1..], 2).unwrap();
    eprintln!(
        "alice offered {ALICE_KBPS} kbit/s, received {ka:.0} kbit/s from second {from} \
         (limit {LIMIT_KBPS}; per second {secs_a:?}); bob offered {BOB_KBPS}, received {kb:.0}"
    );
    assert!(
        (ka - LIMIT_KBPS as f64).abs() <= LIMIT_KBPS as f64 * 0.10,
        "alice: {ka:.0} kbit/s, limit {LIMIT_KBPS}\n{}",
        logs()
    );
    assert!(
        (kb - BOB_KBPS as f64).abs() <= BOB_KBPS as f64 * 0.10,
        "bob: {kb:.0} kbit/s, offered {BOB_KBPS}"
    );
    let replies = host
        .command("nft")
        .args([
            "list",
            "chain",
            "inet",
            &format!("qosloop_{}", link.a_if),
            "replies",
        ])
        .output()
        .unwrap();
    let replies = String::from_utf8_lossy(&replies.stdout);
    assert!(replies.contains("ct mark 0x71"), "{replies}");

    // SIGTERM: the agent detaches its programs and flushes.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    for p in [&mut enforcer, &mut server, &mut collector] {
        p.check_alive().unwrap();
        p.stop(Duration::from_secs(5));
    }
}
