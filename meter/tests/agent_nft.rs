//! The host agent's fallback against the real kernel: with eBPF refused
//! (here: `--agent-cgroup` names a directory that is not cgroup v2, so the
//! probe fails), `--agent-mode auto` says so and accounts through its own
//! nftables table (`meta skuid` → `ct mark`) and conntrack's counters read
//! over ctnetlink. Two users the test creates send concurrently through
//! 127.0.0.1 of a namespace the test creates; each user's bytes must match
//! what their generator sent within 1 % (the datagrams are known exactly:
//! payload + 28 IP bytes), one user's two processes apart (sock_diag tells
//! them while they live), and the table and the sysctl are gone/restored
//! after the agent stops.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent_common;
mod support;

use agent_common::*;
use std::process::Command;
use std::time::Duration;

fn in_ns(ns: &Netns, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn without_ebpf_two_users_are_accounted_through_nftables_and_conntrack() {
    if prerequisites().is_none() || support::need_binary("nft", "nftables").is_none() {
        return;
    }
    let ns = Netns::new("n");
    let hana = User::new("qlah");
    let ivan = User::new("qlai");
    let not_cgroup = tempfile::tempdir().unwrap();
    let acct_before = in_ns(&ns, &["sysctl", "-n", "net.netfilter.nf_conntrack_acct"]);
    let agent = AgentRun::start_with(
        &ns,
        300,
        &[
            "--agent-mode".into(),
            "auto".into(),
            "--agent-cgroup".into(),
            not_cgroup.path().display().to_string(),
        ],
    );
    assert!(
        in_ns(&ns, &["nft", "list", "tables"]).contains("qosloop_agent"),
        "the fallback's table is missing"
    );
    let port = 40_007;
    let mut h = sender(&ns, &hana, port, 3000, 972, 1.0);
    let mut i1 = sender(&ns, &ivan, port, 2000, 472, 1.0);
    let mut i2 = sender(&ns, &ivan, port, 1000, 1272, 1.0);
    for g in [&mut h, &mut i1, &mut i2] {
        g.wait_line("sent");
    }
    let (pi1, pi2) = (i1.pid, i2.pid);
    for g in [h, i1, i2] {
        g.wait();
    }
    std::thread::sleep(Duration::from_millis(400));
    let (records, log) = agent.stop();
    assert!(
        log.contains("falling back to nftables"),
        "the fallback was not said: {log}"
    );
    let want_h = 3000 * (972 + 28);
    let want_i = 2000 * (472 + 28) + 1000 * (1272 + 28);
    let got_h = udp_bytes(&records, port, |r| r.user.as_deref() == Some(&hana.name));
    let got_i = udp_bytes(&records, port, |r| r.user.as_deref() == Some(&ivan.name));
    assert!(
        within_one_percent(got_h, want_h),
        "hana {got_h} want {want_h}; {log}"
    );
    assert!(
        within_one_percent(got_i, want_i),
        "ivan {got_i} want {want_i}; {log}"
    );
    // sock_diag could tell the processes while they lingered: ivan's two
    // are apart.
    for (pid, want) in [(pi1, 2000 * (472 + 28)), (pi2, 1000 * (1272 + 28))] {
        let suffix = format!("[{pid}]");
        let got = udp_bytes(&records, port, |r| {
            r.process.as_deref().is_some_and(|p| p.ends_with(&suffix))
        });
        assert!(
            within_one_percent(got, want),
            "process {pid}: {got} want {want}; {log}"
        );
    }
    assert!(
        !in_ns(&ns, &["nft", "list", "tables"]).contains("qosloop_agent"),
        "the fallback's table was left behind"
    );
    assert_eq!(
        in_ns(&ns, &["sysctl", "-n", "net.netfilter.nf_conntrack_acct"]),
        acct_before,
        "nf_conntrack_acct not restored"
    );
}
