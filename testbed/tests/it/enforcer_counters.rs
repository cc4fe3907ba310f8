//! The kernel counters an enforcer reports reach the policy server: the
//! real binaries in a network namespace the test creates (the policy server
//! with the sample policy and SQLite, the enforcer programming HTB and
//! nftables on a veth), bounded UDP traffic of the sample rule's flow, and
//! then the counters `GET /api/v1/enforcers` serves (read from SQL, written
//! from the enforcer's accounting RPT) must equal what `nft -j list
//! ruleset` shows for each decision, within one report interval; and the
//! HTB class statistics it serves beside them must equal what `tc -s class
//! show` shows for every class of the interface once the traffic stopped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_testbed::harness::{
    require_binary, require_root, spawn_logged, tail_of, Kid, Netns, VethPair,
};
use qosloop_testbed::need;
use qosloop_testbed::procs::component_dir;
use qosloop_testkit::http::Request;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

fn spawn(ns: &Netns, bin: &Path, args: &[&str], log: &Path) -> Kid {
    spawn_logged(ns.command(bin.to_str().unwrap()).args(args), log).unwrap()
}

/// `(in packets, in bytes, out packets, out bytes)` by decision id.
type Counters = BTreeMap<u64, [u64; 4]>;

/// The decisions' counters as the kernel shows them: in each decision
/// chain, the rule commented `in id=N …` (in profile) and the one
/// commented `out` (the meter's out-of-profile rule).
fn kernel_counters(ns: &Netns) -> Counters {
    let out = ns
        .command("nft")
        .args(["-j", "list", "ruleset"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut by_chain: BTreeMap<String, (Option<u64>, [u64; 4])> = BTreeMap::new();
    for item in v["nftables"].as_array().unwrap() {
        let Some(rule) = item.get("rule") else {
            continue;
        };
        let comment = rule["comment"].as_str().unwrap_or("");
        let counter = rule["expr"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|e| e.get("counter"));
        let Some(counter) = counter else { continue };
        let (p, b) = (
            counter["packets"].as_u64().unwrap(),
            counter["bytes"].as_u64().unwrap(),
        );
        let chain = format!("{} {}", rule["table"], rule["chain"]);
        let entry = by_chain.entry(chain).or_default();
        if let Some(rest) = comment.strip_prefix("in id=") {
            entry.0 = rest
                .split_whitespace()
                .next()
                .and_then(|id| id.parse().ok());
            entry.1[0] = p;
            entry.1[1] = b;
        } else if comment == "out" {
            entry.1[2] = p;
            entry.1[3] = b;
        }
    }
    by_chain
        .into_values()
        .filter_map(|(id, c)| Some((id?, c)))
        .collect()
}

/// `[bytes, packets, drops, overlimits, backlog]` and the parent by class id.
type Classes = BTreeMap<String, (String, [u64; 5])>;

/// The HTB classes of `dev` as `tc -s class show` prints them. Its text,
/// not `-j`: iproute2 6.1 (Debian 12) prints classes as text even with
/// `-j`. Per class: `class htb MAJ:MIN root|parent MAJ:MIN …`, then
/// ` Sent B bytes P pkt (dropped D, overlimits O requeues R)`, then
/// ` backlog Nb Qp requeues R` (a backlog of 1 KiB or more is printed
/// rounded, which fails here: the test reads it once traffic stopped).
fn kernel_classes(ns: &Netns, dev: &str) -> Classes {
    let out = ns
        .command("tc")
        .args(["-s", "class", "show", "dev", dev])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let num = |w: &str, line: &str| -> u64 {
        w.trim_start_matches('(')
            .trim_end_matches([',', ')'])
            .parse()
            .unwrap_or_else(|_| panic!("{w:?} in {line:?} is not a number"))
    };
    let mut classes = Classes::new();
    // The class being read (None: not an HTB class) and what of it was seen.
    let mut at: Option<(String, u8)> = None;
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["class", kind, handle, rest @ ..] => {
                if let Some((h, seen)) = &at {
                    assert_eq!(*seen, 2, "{h}: no Sent or backlog line in\n{text}");
                }
                at = None;
                if *kind == "htb" {
                    let parent = match rest {
                        ["root", ..] => "root",
                        ["parent", p, ..] => p,
                        _ => panic!("{line:?}: no parent"),
                    };
                    classes.insert(handle.to_string(), (parent.to_owned(), [0; 5]));
                    at = Some((handle.to_string(), 0));
                }
            }
            ["Sent", b, "bytes", p, "pkt", "(dropped", d, "overlimits", o, ..] => {
                if let Some((h, seen)) = &mut at {
                    let s = &mut classes.get_mut(h).unwrap().1;
                    (s[0], s[1], s[2], s[3]) =
                        (num(b, line), num(p, line), num(d, line), num(o, line));
                    *seen += 1;
                }
            }
            ["backlog", b, ..] => {
                if let Some((h, seen)) = &mut at {
                    let bytes = b.strip_suffix('b').unwrap_or(b);
                    classes.get_mut(h).unwrap().1[4] = num(bytes, line);
                    *seen += 1;
                }
            }
            _ => {}
        }
    }
    if let Some((h, seen)) = &at {
        assert_eq!(*seen, 2, "{h}: no Sent or backlog line in\n{text}");
    }
    classes
}

/// The HTB classes one enforcer row serves.
fn served_classes(row: &Value) -> Classes {
    row["htb_classes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    let n = |k: &str| c[k].as_u64().unwrap();
                    (
                        c["classid"].as_str().unwrap().to_owned(),
                        (
                            c["parent"].as_str().unwrap().to_owned(),
                            [
                                n("bytes"),
                                n("packets"),
                                n("drops"),
                                n("overlimits"),
                                n("backlog_bytes"),
                            ],
                        ),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `GET /api/v1/enforcers` from inside the namespace.
fn enforcers(ns: &Netns, port: u16) -> Option<Value> {
    let answer = ns
        .run_in(move || {
            Request::get("/api/v1/enforcers")
                .timeout(Duration::from_secs(5))
                .send(([127, 0, 0, 1], port).into())
        })
        .ok()?
        .ok()?;
    serde_json::from_slice(&answer.body).ok()
}

/// The counters one enforcer row serves, by decision id.
fn served(row: &Value) -> Counters {
    row["kernel_counters"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|d| {
                    let n = |k: &str| d[k].as_u64().unwrap();
                    (
                        n("decision_id"),
                        [
                            n("in_profile_packets"),
                            n("in_profile_bytes"),
                            n("out_of_profile_packets"),
                            n("out_of_profile_bytes"),
                        ],
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_counters_served_are_the_kernels_within_one_report() {
    need!(require_root("programs HTB and nftables in namespaces"));
    need!(require_binary("nft", "nftables"));
    need!(require_binary("tc", "iproute2"));
    need!(require_binary("bash", "bash"));
    need!(component_dir().map(|_| ()).map_err(|e| e.to_string()));
    let bin = component_dir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The sample policy's rule: 10.71.1.2 → 10.71.2.2, UDP to 4055, role edge.
    let tx = Netns::create("kctx").unwrap();
    let rx = Netns::create("kcrx").unwrap();
    let veth = VethPair::connect(&tx, "10.71.1.2/16", &rx, "10.71.2.2/16").unwrap();
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schema/ldap/sample-policy.ldif");
    let http = 8080;
    let _server = spawn(
        &tx,
        &bin.join("qosloop-policy-server"),
        &[
            "--db",
            &format!("sqlite://{}", d.join("loop.db").display()),
            "--policies",
            policies.to_str().unwrap(),
            "--pdp-listen",
            "127.0.0.1:3288",
            "--http",
            &format!("127.0.0.1:{http}"),
        ],
        &d.join("policy-server.log"),
    );
    let _enforcer = spawn(
        &tx,
        &bin.join("qosloop-enforcer"),
        &[
            "--interface",
            &veth.a_if,
            "--roles",
            "edge",
            "--capacity",
            "10mbit",
            "--pdp",
            "127.0.0.1:3288",
        ],
        &d.join("enforcer.log"),
    );
    let logs = || {
        format!(
            "policy server:\n{}\nenforcer:\n{}",
            tail_of(&d.join("policy-server.log"), 20),
            tail_of(&d.join("enforcer.log"), 20)
        )
    };

    // The decision is in the kernel and its first accounting report is in.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = enforcers(&tx, http);
        let row = rows.as_ref().and_then(|v| v["rows"].get(0));
        if row.is_some_and(|r| r["counted_decisions"].as_u64() == Some(1)) {
            break;
        }
        assert!(
            Instant::now() < end,
            "no accounting report: {rows:?}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let before = kernel_counters(&tx);
    assert_eq!(before.len(), 1, "one decision in the kernel: {before:?}");
    let classes_before = kernel_classes(&tx, &veth.a_if);

    // 300 datagrams of the rule's flow, 5 ms apart: bounded in count and time.
    let sent = tx
        .command("bash")
        .args([
            "-c",
            "for i in $(seq 300); do printf 'qosloop counters %04d' $i > /dev/udp/10.71.2.2/4055; sleep 0.005; done",
        ])
        .output()
        .unwrap();
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let kernel = kernel_counters(&tx);
    let (id, k) = kernel.iter().next().map(|(id, k)| (*id, *k)).unwrap();
    let b = before[&id];
    assert_eq!(
        (k[0] - b[0]) + (k[2] - b[2]),
        300,
        "every datagram passes the decision's meter once: {b:?} then {k:?}"
    );

    // Within one report interval (5 s; waited for at most 60 s) the
    // counters served equal the kernel's, decision by decision.
    let end = Instant::now() + Duration::from_secs(60);
    let row = loop {
        let rows = enforcers(&tx, http);
        let row = rows.as_ref().and_then(|v| v["rows"].get(0).cloned());
        if let Some(row) = row {
            if served(&row) == kernel {
                break row;
            }
            assert!(
                Instant::now() < end,
                "served {:?}, the kernel shows {kernel:?}\n{}",
                served(&row),
                logs()
            );
        }
        assert!(Instant::now() < end, "no answer\n{}", logs());
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(
        kernel_counters(&tx),
        kernel,
        "the kernel counted more traffic"
    );
    // The row's sums are the decision's, and the report says nothing was left out.
    assert_eq!(row["in_profile_packets"].as_u64(), Some(k[0]));
    assert_eq!(row["out_of_profile_bytes"].as_u64(), Some(k[3]));
    assert_eq!(row["counters_omitted"].as_u64(), Some(0));
    assert!(row["counters_at_ns"].as_u64().unwrap() > 0);
    assert_eq!(row["kernel_counters"][0]["kind"], "accept", "{row}");

    // The HTB classes: every class of the interface, as tc shows it now,
    // within one report interval (read again each time: the kernel may
    // send something of its own on the link meanwhile).
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let kernel = kernel_classes(&tx, &veth.a_if);
        // The datagrams went through the tree: some class counted them all.
        let grew = |(id, (_, s)): (&String, &(String, [u64; 5]))| {
            let was = classes_before.get(id).map_or(0, |(_, b)| b[1]);
            s[1] >= was + 300
        };
        assert!(
            kernel.len() >= 2 && kernel.iter().any(grew),
            "the HTB tree and its traffic: {classes_before:?} then {kernel:?}"
        );
        let rows = enforcers(&tx, http);
        let served = rows
            .as_ref()
            .and_then(|v| v["rows"].get(0))
            .map(served_classes)
            .unwrap_or_default();
        if served == kernel {
            let row = &rows.as_ref().unwrap()["rows"][0];
            assert_eq!(row["classes_omitted"].as_u64(), Some(0), "{row}");
            break;
        }
        assert!(
            Instant::now() < end,
            "served {served:?}, tc shows {kernel:?}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}
