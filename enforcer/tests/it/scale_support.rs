//! What the scale tests share: the tx — router — rx namespaces, decisions,
//! the enforcer's CLI run inside a namespace, and snapshots of everything a
//! namespace holds that the enforcer could change.

use qosloop_enforcer::{Enforcer, EnforcerConfig, LinuxBackend};
use qosloop_schema::{
    Decision, DecisionReason, Dscp, FlowSpec, IpPrefix, Kbps, OutOfProfileAction, PortRange,
    TrafficProfile,
};
use qosloop_testkit::harness::{require_binary, require_root, Netns, VethPair};
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

pub struct Topo {
    pub tx: Netns,
    pub router: Netns,
    pub rx: Netns,
    /// The router's interface towards rx: where the enforcer works.
    pub out_if: String,
}

/// tx (10.1.0.1) — router — rx (10.2.0.2), forwarding on.
pub fn topo() -> Topo {
    let tx = Netns::create("stx").unwrap();
    let router = Netns::create("srt").unwrap();
    let rx = Netns::create("srx").unwrap();
    VethPair::connect(&tx, "10.1.0.1/24", &router, "10.1.0.2/24").unwrap();
    let out = VethPair::connect(&router, "10.2.0.1/24", &rx, "10.2.0.2/24").unwrap();
    tx.ip(&["route", "add", "default", "via", "10.1.0.2"])
        .unwrap();
    rx.ip(&["route", "add", "default", "via", "10.2.0.1"])
        .unwrap();
    router.sysctl("net.ipv4.ip_forward", "1").unwrap();
    for ns in [&tx, &router, &rx] {
        settle(ns);
    }
    Topo {
        tx,
        router,
        rx,
        out_if: out.a_if,
    }
}

/// Root and `nft` (and `tc`), or skip (fail under `CI=true`).
pub fn prerequisites() -> Option<()> {
    qosloop_testkit::harness::prerequisite(require_root(
        "programs HTB and nftables in namespaces",
    ))?;
    qosloop_testkit::harness::prerequisite(require_binary("nft", "nftables"))?;
    qosloop_testkit::harness::prerequisite(require_binary("tc", "iproute2"))?;
    Some(())
}

pub fn config(interface: &str, capacity: Kbps) -> EnforcerConfig {
    EnforcerConfig {
        direction: qosloop_schema::Direction::Egress,
        interface: interface.to_owned(),
        roles: vec!["edge".into()],
        capacity,
        qdisc_major: 0xe5,
    }
}

pub fn start(ns: &Netns, cfg: EnforcerConfig) -> Enforcer<LinuxBackend> {
    ns.run_in(move || Enforcer::start(LinuxBackend::open().unwrap(), cfg).map(|(e, _)| e))
        .unwrap()
        .unwrap()
}

/// A decision for `flow` with a `kbps` profile (burst 15,000 bytes, in
/// profile marked CS6).
pub fn decision(id: u64, flow: FlowSpec, kbps: u64, action: OutOfProfileAction) -> Decision {
    Decision {
        id,
        version: 1,
        role: "edge".into(),
        policy_dn: "cn=gold".into(),
        flow,
        profile: TrafficProfile {
            rate: Kbps(kbps),
            burst_bytes: 15_000,
        },
        in_profile_dscp: Some(Dscp::CS6),
        out_of_profile: action,
        reason: DecisionReason {
            rate_kbps: 0.0,
            avg_rate_kbps: 0.0,
            link: "edge".into(),
            link_load_kbps: 0.0,
            band: "test".into(),
        },
        issued_ns: 0,
    }
}

/// UDP 10.1.0.1 → `dst`:`port`.
pub fn udp_flow(dst: Ipv4Addr, port: u16) -> FlowSpec {
    FlowSpec {
        src: Some("10.1.0.1".parse().unwrap()),
        dst: Some(IpPrefix::host(dst.into())),
        proto: Some(17),
        src_ports: None,
        dst_ports: Some(PortRange::single(port)),
        user: None,
    }
}

pub fn accept(kbps: u64) -> OutOfProfileAction {
    OutOfProfileAction::Accept {
        shape: Some(Kbps(kbps)),
    }
}

pub fn remark(kbps: u64) -> OutOfProfileAction {
    OutOfProfileAction::Remark {
        dscp: Dscp::BEST_EFFORT,
        shape: Some(Kbps(kbps)),
    }
}

/// `n` decisions, one host each (10.128.0.1 …), UDP port 5001, 100 kbit/s.
pub fn many(n: usize) -> Vec<Decision> {
    (0..n)
        .map(|i| {
            let host = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i as u32 + 1);
            decision(i as u64 + 1, udp_flow(host, 5001), 100, accept(50))
        })
        .collect()
}

/// How long [`settle`] waits: a bound for a namespace that never settles
/// (a broken link), which a slow host does not reach.
const SETTLE_DEADLINE: Duration = Duration::from_secs(60);

/// Waits until every link of `ns` has its carrier and no address is still
/// tentative (IPv6 duplicate address detection), so that two snapshots
/// differ only by what a test changed; panics, showing both, if that has
/// not happened after [`SETTLE_DEADLINE`].
pub fn settle(ns: &Netns) {
    let end = Instant::now() + SETTLE_DEADLINE;
    loop {
        let links = stdout(ns.command("ip").args(["-o", "link", "show"]));
        let addrs = stdout(ns.command("ip").args(["-o", "addr", "show"]));
        if !links.contains("NO-CARRIER") && !addrs.contains("tentative") {
            return;
        }
        assert!(
            Instant::now() < end,
            "{} has not settled after {SETTLE_DEADLINE:?} (a link without carrier or a \
             tentative address):\n{links}{addrs}",
            ns.name()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stdout(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Everything in `ns` the enforcer could touch: qdiscs, classes and filters
/// of every interface, the whole nftables ruleset, links, addresses, routes.
pub fn snapshot(ns: &Netns) -> String {
    let links = stdout(ns.command("ip").args(["-o", "link", "show"]));
    let mut out = format!(
        "== links\n{links}== addresses\n{}== routes\n{}== qdiscs\n{}== nft\n{}",
        stdout(ns.command("ip").args(["-o", "addr", "show"])),
        stdout(ns.command("ip").args(["route", "show", "table", "all"])),
        stdout(ns.command("tc").args(["qdisc", "show"])),
        stdout(ns.command("nft").args(["list", "ruleset"])),
    );
    for l in links.lines() {
        let Some(name) = l
            .split(": ")
            .nth(1)
            .map(|n| n.split('@').next().unwrap_or(n))
        else {
            continue;
        };
        for what in ["class", "filter"] {
            out.push_str(&format!(
                "== {what} {name}\n{}",
                stdout(ns.command("tc").args([what, "show", "dev", name]))
            ));
        }
    }
    out
}

/// The decision ids of the fallback chain's rules, in chain order.
pub fn fallback_ids(listing: &str) -> Vec<u64> {
    listing
        .lines()
        .skip_while(|l| l.trim() != "chain fallback {")
        .skip(1)
        .take_while(|l| l.trim() != "}")
        .filter_map(|l| {
            l.split("comment \"id=")
                .nth(1)?
                .split('"')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// The two nftables parts of what `--dry-run apply` prints: the
/// transaction (`nft -f` text) and the table as `nft list table` will show
/// it after the change.
pub fn dry_run_nft(stdout: &str) -> (String, String) {
    let (mut script, mut listing) = (String::new(), String::new());
    let mut into: Option<&mut String> = None;
    for line in stdout.lines() {
        if line == "nftables transaction:" {
            into = Some(&mut script);
        } else if line.starts_with("nftables table after this change") {
            into = Some(&mut listing);
        } else if line.starts_with("netlink: ") || line.starts_with("{\"") {
            into = None;
        } else if let Some(out) = into.as_deref_mut() {
            out.push_str(line);
            out.push('\n');
        }
    }
    (script, listing)
}

/// `nft list table inet qosloop_IF` with handles and counter values taken out.
pub fn listing(ns: &Netns, interface: &str) -> String {
    let out = ns
        .command("nft")
        .args(["list", "table", "inet", &format!("qosloop_{interface}")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    normalize(&String::from_utf8_lossy(&out.stdout))
}

/// Handles and counter/quota values out: what differs between two equal
/// tables that have seen different traffic.
pub fn normalize(listing: &str) -> String {
    let numeric = |w: Option<&&str>| w.is_some_and(|w| w.bytes().all(|b| b.is_ascii_digit()));
    let mut out = String::new();
    for line in listing.lines() {
        let line = line.find("# handle ").map_or(line, |i| &line[..i]);
        let tokens: Vec<&str> = line.split_whitespace().collect();
        let mut words: Vec<&str> = Vec::new();
        let mut i = 0;
        while i < tokens.len() {
            if tokens[i] == "packets" && numeric(tokens.get(i + 1)) {
                i += 2;
                if tokens.get(i) == Some(&"bytes") && numeric(tokens.get(i + 1)) {
                    i += 2;
                }
                continue;
            }
            words.push(tokens[i]);
            i += 1;
        }
        if !words.is_empty() {
            out.push_str(&words.join(" "));
            out.push('\n');
        }
    }
    out
}

/// The enforcer's CLI inside `ns`, for `interface` with a 10 Mbit/s capacity.
pub fn enforcer_cmd(ns: &Netns, interface: &str, args: &[&str]) -> Command {
    let mut cmd = ns.command(env!("CARGO_BIN_EXE_qosloop-enforcer"));
    cmd.args([
        "--interface",
        interface,
        "--capacity",
        "10mbit",
        "--roles",
        "edge",
    ])
    .args(args);
    cmd
}

pub fn write_decisions(dir: &std::path::Path, name: &str, ds: &[Decision]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_string_pretty(ds).unwrap()).unwrap();
    p
}

#[test]
fn normalize_drops_handles_and_counter_values_only() {
    assert_eq!(
        normalize(
            "\tchain d1 { # handle 3\n\t\tcounter packets 12 bytes 3400 accept # handle 7\n\t\tip daddr 10.0.0.1 counter packets 0 bytes 0 jump d1 comment \"id=1\"\n"
        ),
        "chain d1 {\ncounter accept\nip daddr 10.0.0.1 counter jump d1 comment \"id=1\"\n"
    );
}
