//! The enforcer at scale and under change (issue 12), against the real
//! kernel in namespaces each test creates (and removes, also on failure):
//!
//! - a decision change under traffic keeps the in-profile output within the
//!   token bucket's contract (`rate × T + bucket` in every sliding window of
//!   250 ms and 1 s, measured at the receiver by DSCP);
//! - 50,000 decisions installed, listed by `status`, removed: nothing left;
//! - the plan `--dry-run` prints is what `nft list table` shows after apply;
//! - a classifier entry deleted behind the enforcer's back is found and
//!   restored by reconcile, which says what it found;
//! - bad input (the same flow twice, keys that cannot be built, an unknown
//!   interface) is refused whole: the namespace stays byte-identical;
//!   overlapping flows are accepted as ordered fallback rules.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::scale_support as support;

use qosloop_enforcer::{EnforceError, Enforcer, LinuxBackend};
use qosloop_schema::{Decision, FlowSpec, Kbps, PortRange};
use qosloop_testkit::inprofile::{self, ProfileStep};
use qosloop_testkit::traffic::{self, FlowGen, Schedule};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::*;

const PORT: u16 = 5001;
const PACKET_LEN: usize = 1000;
const AF11: u8 = 10;
const CS6: u8 = 48;

/// One change made under traffic: when the enforcer was asked, when it
/// answered, and the decision after it.
struct Change {
    asked_ns: u64,
    done_ns: u64,
    decision: Decision,
}

/// The profile in force over time: a step at each change, taken at the
/// moment most favourable to the enforcer (a faster profile from when it
/// was asked, a slower one from when it answered).
fn profile_steps(first: &Decision, first_ns: u64, changes: &[Change]) -> Vec<ProfileStep> {
    let mut steps = vec![ProfileStep::of(first_ns, &first.profile)];
    let mut rate = first.profile.rate;
    for c in changes {
        let at = if c.decision.profile.rate > rate {
            c.asked_ns
        } else {
            c.done_ns
        };
        steps.push(ProfileStep::of(at, &c.decision.profile));
        rate = c.decision.profile.rate;
    }
    steps
}

/// Issue 12 §1, "no leak at a change". A 6 Mbit/s UDP flow (AF11) against
/// a 1000 kbit/s profile; after a second, the decision changes every 300 ms
/// — its action (accept ↔ remark) and its shape rate (2000 ↔ 1000 kbit/s).
/// An enforcer that starts a fresh, full bucket at a change lets a bucket of
/// out-of-profile traffic through as CS6 each time: three buckets in a
/// second instead of one. The receiver timestamps every CS6 packet in the
/// kernel; every window of 250 ms and 1 s must hold at most the profile
/// rate × T plus one bucket (`qosloop_enforcer::bucket_bytes`), give or
/// take one packet for where a window's edge falls.
#[test]
fn a_decision_change_under_traffic_keeps_in_profile_output_within_the_bucket() {
    let plan = [
        (remark(1000), 1000),
        (accept(2000), 1000),
        (accept(1000), 1000),
        (remark(1000), 1000),
        (remark(2000), 1000),
        (accept(2000), 1000),
        (remark(1000), 1000),
        (accept(1000), 1000),
        (accept(2000), 1000),
        (remark(2000), 1000),
        (remark(1000), 1000),
        (accept(2000), 1000),
    ];
    let Some(broken) = changes_under_traffic(&plan) else {
        return;
    };
    assert!(
        broken.is_empty(),
        "in-profile output above rate × T + bucket across {} changes:\n{}",
        plan.len(),
        broken.join("\n")
    );
}

/// The same with the profile rate changing too (1000 ↔ 1500 kbit/s). The
/// contract is the same: a faster profile is integrated from the moment it
/// is asked for, and the larger bucket counts.
#[test]
#[ignore = "needs a meter that keeps its tokens across a profile-rate change: \
            nf_tables limit objects have no update, a new rate is a new, full bucket"]
fn a_profile_rate_change_under_traffic_keeps_in_profile_output_within_the_bucket() {
    let plan = [
        (remark(1000), 1000),
        (accept(2000), 1500),
        (accept(2000), 1000),
        (remark(1000), 1500),
        (accept(2000), 1500),
        (accept(2000), 1000),
        (remark(1000), 1000),
        (remark(1000), 1500),
        (accept(2000), 1500),
        (accept(2000), 1000),
        (remark(1000), 1000),
        (accept(2000), 1500),
    ];
    let Some(broken) = changes_under_traffic(&plan) else {
        return;
    };
    assert!(
        broken.is_empty(),
        "in-profile output above rate × T + bucket across {} changes:\n{}",
        plan.len(),
        broken.join("\n")
    );
}

/// Sends 6 Mbit/s through a decision with a 1000 kbit/s profile and makes
/// the changes of `plan` (action, profile kbit/s) 300 ms apart after the
/// first second; returns one line per window length whose worst window
/// breaks the contract (`None`: prerequisites missing, skipped).
fn changes_under_traffic(
    plan: &[(qosloop_schema::OutOfProfileAction, u64)],
) -> Option<Vec<String>> {
    prerequisites()?;
    let t = topo();
    let mut e = start(&t.router, config(&t.out_if, Kbps(10_000)));
    let first = decision(
        1,
        udp_flow(Ipv4Addr::new(10, 2, 0, 2), PORT),
        1000,
        accept(2000),
    );
    let first_ns = inprofile::wall_ns();
    let d = first.clone();
    t.router.run_in(|| e.install(d)).unwrap().unwrap();

    let secs = 6;
    let stop = traffic::stop_flag();
    let (sink_stop, rec_stop) = (stop.clone(), stop.clone());
    let limit = Duration::from_secs(secs + 10);
    let sink =
        t.rx.spawn_in(move || traffic::sink(&[PORT], &sink_stop, limit))
            .unwrap();
    let recorder =
        t.rx.spawn_in(move || inprofile::record(PORT, CS6, &rec_stop, limit, 1_000_000))
            .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let flow = FlowGen {
        id: 1,
        bind: "10.1.0.1:6001".parse().unwrap(),
        dst: SocketAddrV4::new(Ipv4Addr::new(10, 2, 0, 2), PORT),
        packet_len: PACKET_LEN,
        dscp: AF11,
        schedule: Schedule::constant(
            6000.0 * 125.0 / PACKET_LEN as f64,
            Duration::from_secs(secs),
        ),
    };
    let gen_stop = traffic::stop_flag();
    let gen =
        t.tx.spawn_in(move || traffic::generate(&flow, &gen_stop))
            .unwrap();
    let changes: Vec<Change> = t
        .router
        .run_in(|| {
            std::thread::sleep(Duration::from_secs(1));
            let mut out = Vec::new();
            for (v, (action, kbps)) in plan.iter().enumerate() {
                std::thread::sleep(Duration::from_millis(300));
                let mut d = first.clone();
                d.version = v as u64 + 2;
                d.out_of_profile = *action;
                d.profile.rate = Kbps(*kbps);
                let asked_ns = inprofile::wall_ns();
                e.install(d.clone()).unwrap();
                out.push(Change {
                    asked_ns,
                    done_ns: inprofile::wall_ns(),
                    decision: d,
                });
            }
            out
        })
        .unwrap();
    let sent = gen.join().unwrap().unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let got = sink.join().unwrap().unwrap().unwrap();
    let cs6 = recorder.join().unwrap().unwrap().unwrap();
    t.router.run_in(|| e.cleanup()).unwrap().unwrap();

    // The run did what it should have: traffic above the profile, some of
    // it out of profile, some in profile, nothing unrecorded.
    assert!(sent.packets > 0 && cs6.over_limit == 0, "{sent:?}");
    let flow = &got.flows[&1];
    let out_of_profile: u64 = flow
        .seconds
        .values()
        .flat_map(|s| s.bytes_by_dscp.iter())
        .filter(|(d, _)| **d != CS6)
        .map(|(_, b)| *b)
        .sum();
    assert!(out_of_profile > 0, "nothing arrived out of profile");
    let steps = profile_steps(&first, first_ns, &changes);
    let arrivals = &cs6.arrivals;
    assert!(!arrivals.is_empty(), "nothing arrived in profile (CS6)");
    // How much of what the profile allowed arrived in profile: a figure
    // (what the sender offered on a busy host bounds it, not the enforcer).
    let (a, b) = (arrivals[0].at_ns, arrivals[arrivals.len() - 1].at_ns);
    let in_bytes: u64 = arrivals.iter().map(|a| u64::from(a.bytes)).sum();
    let profile_bytes: f64 = steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let until = steps.get(i + 1).map_or(b, |n| n.from_ns).min(b);
            s.rate_bytes_per_s * until.saturating_sub(s.from_ns.max(a)) as f64 / 1e9
        })
        .sum();
    eprintln!(
        "{in_bytes} B arrived in profile where the profile allowed {profile_bytes:.0} B ({:.0} %)",
        100.0 * in_bytes as f64 / profile_bytes.max(1.0)
    );

    let mut broken = Vec::new();
    for window in [Duration::from_millis(250), Duration::from_secs(1)] {
        let c = inprofile::check_windows(arrivals, window, &steps);
        let rel_ms = |ns: u64| (ns as f64 - first_ns as f64) / 1e6;
        let near = changes
            .iter()
            .map(|ch| rel_ms(ch.asked_ns))
            .min_by(|x, y| {
                (x - rel_ms(c.worst_start_ns))
                    .abs()
                    .total_cmp(&(y - rel_ms(c.worst_start_ns)).abs())
            })
            .unwrap_or(0.0);
        let line = format!(
            "{} ms windows: worst at {:.0} ms after install (change at {near:.0} ms): {} B in profile, \
             bound {:.0} B, excess {:+.0} B",
            c.window_ms,
            rel_ms(c.worst_start_ns),
            c.worst_bytes,
            c.worst_bound_bytes,
            c.worst_excess_bytes
        );
        eprintln!("{line}");
        if !c.holds(PACKET_LEN as f64) {
            broken.push(line);
        }
    }
    Some(broken)
}

/// 50,000 decisions from empty, read back by `qosloop-enforcer status`,
/// removed again; `--cleanup` then leaves the namespace exactly as it was
/// (links, addresses, routes, every qdisc, class and filter, the ruleset).
#[test]
fn fifty_thousand_decisions_are_installed_listed_and_removed_leaving_nothing() {
    let Some(()) = prerequisites() else { return };
    let ns = qosloop_testkit::harness::Netns::create("s50k").unwrap();
    let peer = qosloop_testkit::harness::Netns::create("s50p").unwrap();
    let link =
        qosloop_testkit::harness::VethPair::connect(&ns, "10.9.0.1/24", &peer, "10.9.0.2/24")
            .unwrap();
    settle(&ns);
    let pristine = snapshot(&ns);
    let mut e = start(&ns, config(&link.a_if, Kbps(10_000_000)));
    let decisions = many(50_000);
    let summary = ns.run_in(|| e.sync(decisions)).unwrap().unwrap();
    assert_eq!(summary.installed, 50_000, "{summary:?}");

    let status = |ns: &qosloop_testkit::harness::Netns| {
        let out = enforcer_cmd(ns, &link.a_if, &["status", "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let listed = status(&ns);
    let ids: std::collections::BTreeSet<u64> = listed["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 50_000);
    assert_eq!(ids.iter().next_back(), Some(&50_000));
    assert_eq!(listed["orphan_classes"].as_array().unwrap().len(), 0);

    let summary = ns.run_in(|| e.sync(Vec::new())).unwrap().unwrap();
    assert_eq!(summary.removed, 50_000, "{summary:?}");
    let listed = status(&ns);
    assert_eq!(listed["decisions"].as_array().unwrap().len(), 0);
    assert_eq!(listed["groups"].as_array().unwrap().len(), 0, "{listed}");
    assert_eq!(listed["orphan_classes"].as_array().unwrap().len(), 0);
    let classes = ns
        .command("tc")
        .args(["class", "show", "dev", &link.a_if])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&classes.stdout).lines().count(),
        2,
        "only the root and default classes stay while the enforcer runs"
    );
    let out = enforcer_cmd(&ns, &link.a_if, &["--cleanup"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(snapshot(&ns), pristine);
}

/// Decisions of every form the enforcer renders: IPv4 hosts and prefixes,
/// port ranges, IPv6, the three actions, a protocol without ports.
fn assorted() -> Vec<Decision> {
    let mut ds = Vec::new();
    for i in 0..40u64 {
        let action = match i % 3 {
            0 => accept(500),
            1 => remark(125),
            _ => qosloop_schema::OutOfProfileAction::Drop,
        };
        ds.push(decision(
            i + 1,
            udp_flow(Ipv4Addr::new(10, 2, 1, i as u8 + 1), PORT),
            100,
            action,
        ));
    }
    let mut prefix = decision(100, FlowSpec::default(), 200, remark(100));
    prefix.flow = FlowSpec {
        src: Some("10.1.0.0/20".parse().unwrap()),
        dst: Some("10.3.0.0/16".parse().unwrap()),
        proto: Some(6),
        src_ports: Some(PortRange {
            first: 1024,
            last: 2048,
        }),
        dst_ports: Some(PortRange::single(80)),
        user: None,
    };
    ds.push(prefix);
    let mut v6 = decision(101, FlowSpec::default(), 300, accept(200));
    v6.flow = FlowSpec {
        src: Some("2001:db8::1".parse().unwrap()),
        dst: Some("2001:db8:8000::/33".parse().unwrap()),
        proto: Some(17),
        src_ports: None,
        dst_ports: Some(PortRange {
            first: 4000,
            last: 4100,
        }),
        user: None,
    };
    ds.push(v6);
    let mut proto_only = decision(
        102,
        FlowSpec::default(),
        100,
        qosloop_schema::OutOfProfileAction::Drop,
    );
    proto_only.flow = FlowSpec {
        src: None,
        dst: Some("10.4.0.0/24".parse().unwrap()),
        proto: Some(132),
        src_ports: None,
        dst_ports: None,
        user: None,
    };
    ds.push(proto_only);
    // An overlapping pair: a subscriber's /24 and a flow inside it, both
    // fallback rules (the flow first).
    let mut subscriber = decision(103, FlowSpec::default(), 100, remark(50));
    subscriber.flow.dst = Some("10.6.0.0/24".parse().unwrap());
    ds.push(subscriber);
    ds.push(decision(
        104,
        udp_flow(Ipv4Addr::new(10, 6, 0, 2), PORT),
        100,
        qosloop_schema::OutOfProfileAction::Drop,
    ));
    ds
}

/// Issue 12 §3: the plan `--dry-run` prints is the table the kernel holds
/// after a real apply. The table it prints (as `nft list table` will show
/// it) must equal the kernel's listing, and its printed nftables statements,
/// loaded with `nft -f` into a second namespace (with an interface of the
/// same name), must list the same — but for handles and counters.
#[test]
fn the_dry_run_plan_is_what_nft_lists_after_apply() {
    let Some(()) = prerequisites() else { return };
    let t = topo();
    let dir = tempfile::tempdir().unwrap();
    let file = write_decisions(dir.path(), "d.json", &assorted());
    let file = file.to_str().unwrap();
    let dry = enforcer_cmd(
        &t.router,
        &t.out_if,
        &["--dry-run", "apply", "--decisions", file],
    )
    .output()
    .unwrap();
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let (script, printed_listing) = dry_run_nft(&String::from_utf8_lossy(&dry.stdout));
    assert!(
        !script.is_empty(),
        "--dry-run printed no nftables statements"
    );
    assert!(!printed_listing.is_empty(), "--dry-run printed no table");
    // The dry run changed nothing.
    let out = t
        .router
        .command("nft")
        .args(["list", "ruleset"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "");

    let applied = enforcer_cmd(&t.router, &t.out_if, &["apply", "--decisions", file])
        .output()
        .unwrap();
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let kernel = listing(&t.router, &t.out_if);
    assert_eq!(
        normalize(&printed_listing),
        kernel,
        "the table --dry-run printed (left) and the applied one (right) differ"
    );

    let scratch = qosloop_testkit::harness::Netns::create("sdry").unwrap();
    scratch
        .ip(&[
            "link", "add", "name", &t.out_if, "type", "veth", "peer", "name", "sdrypeer",
        ])
        .unwrap();
    let mut nft = scratch
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        nft.stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
    }
    let loaded = nft.wait_with_output().unwrap();
    assert!(
        loaded.status.success(),
        "nft -f refused the printed plan: {}\n{script}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    let printed = listing(&scratch, &t.out_if);
    assert_eq!(
        printed, kernel,
        "dry-run plan (left) and applied table (right) differ"
    );
    assert!(kernel.contains("comment \"in id=101"), "{kernel}");
    let out = enforcer_cmd(&t.router, &t.out_if, &["--cleanup"])
        .output()
        .unwrap();
    assert!(out.status.success());
}

/// Deletes, with `nft`, what classifies decision `id` into its chain `dID`:
/// its element in a verdict map, or its rule (comment `id=ID`). Returns what
/// was deleted.
fn delete_classifier(ns: &qosloop_testkit::harness::Netns, interface: &str, id: u64) -> String {
    let table = format!("qosloop_{interface}");
    let out = ns
        .command("nft")
        .args(["-j", "-a", "list", "table", "inet", &table])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let objects = json["nftables"].as_array().unwrap();
    let chain = format!("d{id}");
    // A key part as `nft` reads it: a value, `ADDR/LEN` or `LOW-HIGH`.
    fn scalar(v: &serde_json::Value) -> String {
        match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Object(o) if o.contains_key("prefix") => format!(
                "{}/{}",
                scalar(&o["prefix"]["addr"]),
                scalar(&o["prefix"]["len"])
            ),
            serde_json::Value::Object(o) if o.contains_key("range") => {
                format!("{}-{}", scalar(&o["range"][0]), scalar(&o["range"][1]))
            }
            other => other.to_string(),
        }
    }
    let element = objects.iter().filter_map(|o| o.get("map")).find_map(|m| {
        m["elem"].as_array()?.iter().find_map(|e| {
            let (key, verdict) = (&e[0], &e[1]);
            (verdict["jump"]["target"].as_str() == Some(chain.as_str())).then(|| {
                let key = match key.get("concat").and_then(|c| c.as_array()) {
                    Some(parts) => parts.iter().map(scalar).collect::<Vec<_>>().join(" . "),
                    None => scalar(key),
                };
                (m["name"].as_str().unwrap_or_default().to_owned(), key)
            })
        })
    });
    let (args, what): (Vec<String>, String) = match element {
        Some((map, key)) => (
            [
                "delete",
                "element",
                "inet",
                &table,
                &map,
                &format!("{{ {key} }}"),
            ]
            .map(str::to_owned)
            .to_vec(),
            format!("element {{ {key} }} of map {map}"),
        ),
        None => {
            let comment = format!("id={id}");
            let rule = objects
                .iter()
                .filter_map(|o| o.get("rule"))
                .find(|r| r["comment"].as_str() == Some(comment.as_str()))
                .unwrap_or_else(|| panic!("nothing classifies decision {id}: {json}"));
            let handle = rule["handle"].as_u64().unwrap().to_string();
            let base = rule["chain"].as_str().unwrap().to_owned();
            (
                ["delete", "rule", "inet", &table, &base, "handle", &handle]
                    .map(str::to_owned)
                    .to_vec(),
                format!("rule {base} handle {handle} ({comment})"),
            )
        }
    };
    let del = ns.command("nft").args(&args).output().unwrap();
    assert!(
        del.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&del.stderr)
    );
    what
}

/// Issue 12, bad input: a table changed behind the enforcer's back. The
/// entries that classify two decisions (an exact key, a prefix) are deleted
/// with `nft`; a restart
/// (`apply` reconciles first) finds it, says so in its start report, and
/// restores the table to what it was.
#[test]
fn a_classifier_deleted_behind_the_enforcers_back_is_found_and_restored() {
    let Some(()) = prerequisites() else { return };
    let t = topo();
    let dir = tempfile::tempdir().unwrap();
    let ds: Vec<Decision> = (1..=3)
        .map(|i| {
            decision(
                i,
                udp_flow(Ipv4Addr::new(10, 2, 0, 2), PORT + i as u16),
                500,
                accept(400),
            )
        })
        .collect();
    // And one whose key is a prefix (an interval, or a fallback rule).
    let mut ds = ds;
    let mut wide = decision(4, FlowSpec::default(), 500, accept(400));
    wide.flow.dst = Some("10.3.0.0/24".parse().unwrap());
    wide.flow.proto = Some(17);
    ds.push(wide);
    let file = write_decisions(dir.path(), "d.json", &ds);
    let file = file.to_str().unwrap();
    let apply = || {
        let out = enforcer_cmd(&t.router, &t.out_if, &["apply", "--decisions", file])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    apply();
    let sorted = |s: String| {
        let mut l: Vec<String> = s.lines().map(str::to_owned).collect();
        l.sort();
        l
    };
    let before = sorted(listing(&t.router, &t.out_if));
    let deleted = format!(
        "{} and {}",
        delete_classifier(&t.router, &t.out_if, 2),
        delete_classifier(&t.router, &t.out_if, 4)
    );
    assert_ne!(
        sorted(listing(&t.router, &t.out_if)),
        before,
        "{deleted} was not deleted"
    );

    let report = apply();
    let start = report["start"].as_object().unwrap();
    let found: Vec<String> = start
        .iter()
        .filter(|(k, v)| {
            *k != "adopted"
                && (v.as_u64().is_some_and(|n| n > 0)
                    || v.as_bool() == Some(true)
                    || v.as_array().is_some_and(|a| !a.is_empty()))
        })
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    assert!(
        !found.is_empty(),
        "reconcile did not say what it found after {deleted} was deleted: {report}"
    );
    eprintln!(
        "deleted {deleted}; reconcile reported {found:?}; apply {}",
        report["apply"]
    );
    assert_eq!(sorted(listing(&t.router, &t.out_if)), before);
    // And nothing is left to fix: a second restart adopts all three as they are.
    let again = apply();
    assert_eq!(again["start"]["adopted"], 4, "{again}");
    assert_eq!(again["apply"]["tc_messages"], 0, "{again}");
    let out = enforcer_cmd(&t.router, &t.out_if, &["--cleanup"])
        .output()
        .unwrap();
    assert!(out.status.success());
}

/// Issue 12, bad input: a change is refused whole and leaves the namespace
/// byte-identical — decisions whose flows overlap (each other in one batch,
/// or one already installed), flows no key can be built for (mixed address
/// families, ports without a port protocol), and an unknown interface.
#[test]
fn bad_input_is_refused_whole_and_changes_nothing() {
    let Some(()) = prerequisites() else { return };
    let t = topo();
    let mut e = start(&t.router, config(&t.out_if, Kbps(10_000_000)));
    let installed = decision(
        1,
        udp_flow(Ipv4Addr::new(10, 2, 0, 2), PORT),
        500,
        accept(400),
    );
    t.router
        .run_in(|| e.install(installed.clone()))
        .unwrap()
        .unwrap();
    let before = snapshot(&t.router);

    // A big batch of good decisions with one bad one at the end.
    let batch = |bad: Decision| {
        let mut ds = vec![installed.clone()];
        ds.extend(many(2_000).into_iter().map(|mut d| {
            d.id += 10;
            d
        }));
        ds.push(bad);
        ds
    };
    let mut overlap_installed = decision(9_000, FlowSpec::default(), 100, accept(50));
    overlap_installed.flow.dst = Some("10.2.0.0/24".parse().unwrap());
    let mut overlap_batch = decision(9_001, FlowSpec::default(), 100, accept(50));
    overlap_batch.flow.dst = Some("10.128.0.0/16".parse().unwrap());
    let mut mixed = decision(
        9_002,
        udp_flow(Ipv4Addr::new(10, 5, 0, 1), PORT),
        100,
        accept(50),
    );
    mixed.flow.src = Some("2001:db8::1".parse().unwrap());
    let mut portless = decision(
        9_003,
        udp_flow(Ipv4Addr::new(10, 5, 0, 2), PORT),
        100,
        accept(50),
    );
    portless.flow.proto = Some(1);
    let mut protoless = decision(
        9_004,
        udp_flow(Ipv4Addr::new(10, 5, 0, 3), PORT),
        100,
        accept(50),
    );
    protoless.flow.proto = None;

    for (bad, what) in [(mixed, "famil"), (portless, "port"), (protoless, "port")] {
        let id = bad.id;
        let err = t.router.run_in(|| e.sync(batch(bad))).unwrap().unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&format!("decision {id}")), "{text}");
        assert!(text.contains(what), "decision {id}: {text}");
        assert_eq!(
            snapshot(&t.router),
            before,
            "decision {id} ({text}) changed the namespace"
        );
        assert_eq!(e.installed(), vec![(1, 1)]);
    }

    // Overlaps are not bad input: the overlapping decisions become fallback
    // rules, the more specific flow first. Against the installed decision
    // (a /24 over its 5-tuple): the two, the 5-tuple first.
    t.router
        .run_in(|| e.sync(batch(overlap_installed)))
        .unwrap()
        .unwrap();
    assert_eq!(fallback_ids(&listing(&t.router, &t.out_if)), vec![1, 9_000]);
    // Inside the batch (a /16 over its 2,000 hosts): the hosts, by id, then
    // the /16; decision 1 (no overlap any more) is a map element again.
    t.router
        .run_in(|| e.sync(batch(overlap_batch)))
        .unwrap()
        .unwrap();
    let table = listing(&t.router, &t.out_if);
    let want: Vec<u64> = (11..2_011).chain([9_001]).collect();
    assert_eq!(fallback_ids(&table), want);
    assert!(table.contains("10.2.0.2 . 5001 : jump d1"), "{table}");
    // And back to decision 1 alone: the namespace as it was (but for the
    // order `tc class show` lists the re-created group's classes in).
    t.router
        .run_in(|| e.sync(vec![installed.clone()]))
        .unwrap()
        .unwrap();
    let sorted = |s: String| {
        let mut l: Vec<String> = s.lines().map(str::to_owned).collect();
        l.sort();
        l
    };
    assert_eq!(sorted(snapshot(&t.router)), sorted(before.clone()));

    // The same through the CLI: exit 1, the first refused decision named.
    let dir = tempfile::tempdir().unwrap();
    let mut two = many(2);
    two[1].flow = two[0].flow.clone();
    two[1].id = 77;
    let file = write_decisions(dir.path(), "clash.json", &two);
    let out = enforcer_cmd(
        &t.router,
        &t.out_if,
        &["apply", "--decisions", file.to_str().unwrap()],
    )
    .output()
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("77") && err.contains("already the flow of decision"),
        "{err}"
    );

    // An unknown interface: refused before anything is created.
    let before = snapshot(&t.router);
    let cfg = config("nosuch0", Kbps(10_000));
    let err = t
        .router
        .run_in(move || Enforcer::start(LinuxBackend::open().unwrap(), cfg).map(|_| ()))
        .unwrap()
        .unwrap_err();
    assert_eq!(err, EnforceError::UnknownInterface("nosuch0".into()));
    let out = enforcer_cmd(
        &t.router,
        "nosuch0",
        &["apply", "--decisions", file.to_str().unwrap()],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nosuch0"));
    assert_eq!(snapshot(&t.router), before);
    let out = enforcer_cmd(&t.router, &t.out_if, &["--cleanup"])
        .output()
        .unwrap();
    assert!(out.status.success());
}
