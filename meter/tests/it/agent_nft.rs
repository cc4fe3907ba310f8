//! The host agent's fallback against the real kernel: with eBPF refused
//! (here: `--agent-cgroup` names a directory that is not cgroup v2, so the
//! probe fails), `--agent-mode auto` says so and accounts through its own
//! nftables table (`meta skuid` → `ct mark`) and conntrack's counters read
//! over ctnetlink; `--agent-mode nft` does the same on a host where eBPF
//! works (chosen, not fallen back to). Two users the test creates send
//! concurrently through 127.0.0.1 of a namespace the test creates; each
//! user's bytes must match what their generator sent within 1 % (the
//! datagrams are known exactly: payload + 28 IP bytes), one user's two
//! processes apart (sock_diag tells them: they live until the agent has
//! stopped), and the table
//! and the sysctl are gone/restored after the agent stops.
//!
//! A full conntrack table: `nf_conntrack_max` is host-wide on this kernel
//! (read-only inside a namespace), but the count it limits is per
//! namespace, so the test fills its own namespace's table to the host's
//! maximum with assured entries created over ctnetlink (which the kernel
//! never evicts early) and checks that the packets conntrack then drops
//! are counted by reason in the agent's log and summary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::agent_common;
use qosloop_testkit::frames as support;

use agent_common::*;
use std::process::Command;
use std::time::{Duration, Instant};

/// The bound on waits for the agent: generous, so that only a broken
/// agent fails, not a busy machine.
const DEADLINE: Duration = Duration::from_secs(60);

/// UDP sender: prints its pid, sends `count` datagrams of `size` bytes to
/// 127.0.0.1:`port`, prints "sent", then lives on until it gets SIGUSR1
/// ([`release`]): its socket is there for every drain until the test says.
const LINGERING_SENDER: &str = r#"
import os, signal, socket, sys, time
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
port, count, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
print(os.getpid(), flush=True)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(count):
    s.sendto(b"x" * size, ("127.0.0.1", port))
    if i % 64 == 63:
        time.sleep(0.001)
print("sent", flush=True)
signal.sigwait({signal.SIGUSR1})
"#;

fn lingering_sender(ns: &Netns, user: &User, port: u16, count: u32, size: u32) -> Gen {
    let args = [port.to_string(), count.to_string(), size.to_string()];
    Gen::start(ns, user, LINGERING_SENDER, &args)
}

/// Lets a [`lingering_sender`] exit, and checks it did so cleanly.
fn release(g: Gen) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(g.pid as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .unwrap();
    g.wait();
}

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
    let not_cgroup = tempfile::tempdir().unwrap();
    let (ns, log) = two_users(
        "n",
        &[
            "--agent-mode".into(),
            "auto".into(),
            "--agent-cgroup".into(),
            not_cgroup.path().display().to_string(),
        ],
    );
    assert!(
        log.contains("falling back to nftables"),
        "the fallback was not said: {log}"
    );
    drop(ns);
}

#[test]
fn agent_mode_nft_is_used_where_ebpf_works_too() {
    if prerequisites().is_none() || support::need_binary("nft", "nftables").is_none() {
        return;
    }
    // The default cgroup v2 root: the eBPF programs would load here.
    let (_ns, log) = two_users("m", &["--agent-mode".into(), "nft".into()]);
    assert!(
        !log.contains("falling back") && !log.contains("programs attached"),
        "--agent-mode nft probed or attached eBPF: {log}"
    );
}

/// Two users send through the fallback started with `extra`; checks each
/// user's bytes and one user's two processes within 1 %, the table gone
/// and `nf_conntrack_acct` restored. Returns the agent's log.
fn two_users(tag: &str, extra: &[String]) -> (Netns, String) {
    let ns = Netns::new(tag);
    let hana = User::new(&format!("qlh{tag}"));
    let ivan = User::new(&format!("qli{tag}"));
    let acct_before = in_ns(&ns, &["sysctl", "-n", "net.netfilter.nf_conntrack_acct"]);
    // No drain while the test runs (an hour's interval): the only one is
    // at stop, while every sender still lives, so sock_diag sees each
    // socket that sent (a drain racing a socket's first datagram would
    // find the connection before its socket).
    let agent = AgentRun::start_with(&ns, 3_600_000, extra);
    assert!(
        in_ns(&ns, &["nft", "list", "tables"]).contains("qosloop_agent"),
        "the fallback's table is missing"
    );
    let port = 40_007;
    // The senders live until the agent has stopped: its drain finds their
    // sockets through sock_diag.
    let mut h = lingering_sender(&ns, &hana, port, 3000, 972);
    let mut i1 = lingering_sender(&ns, &ivan, port, 2000, 472);
    let mut i2 = lingering_sender(&ns, &ivan, port, 1000, 1272);
    for g in [&mut h, &mut i1, &mut i2] {
        g.wait_line("sent");
    }
    let (pi1, pi2) = (i1.pid, i2.pid);
    let (records, log) = agent.stop();
    for g in [h, i1, i2] {
        release(g);
    }
    assert!(
        log.contains("nftables") && log.contains("(ctnetlink) started"),
        "the fallback did not say it started: {log}"
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
    (ns, log)
}

/// Fills the conntrack table of the namespace it runs in over ctnetlink:
/// assured UDP entries (status seen-reply, assured and confirmed, as the
/// kernel wants it at creation; never evicted early), 600 s timeout, in
/// batches, until the kernel refuses one (ENOMEM: the table is full) or
/// `limit` were created (an acknowledgement missing for 10 s fails it).
/// Prints how many went in and the refusal.
const FILL: &str = r#"
import socket, struct, sys
limit = int(sys.argv[1])
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind((0, 0))
s.settimeout(10)
def nla(t, p):
    l = 4 + len(p)
    return struct.pack("=HH", l, t) + p + b"\0" * ((4 - l % 4) % 4)
def tup(src, dst, sp, dp):
    ip = nla(0x8001, nla(1, src) + nla(2, dst))
    pr = nla(0x8002, nla(1, b"\x11") + nla(2, struct.pack(">H", sp)) + nla(3, struct.pack(">H", dp)))
    return ip + pr
made, seq, refused = 0, 0, None
while made < limit and refused is None:
    batch = min(256, limit - made)
    out = b""
    for i in range(made, made + batch):
        a = bytes([10, 100 + (i >> 16), (i >> 8) & 255, i & 255])
        b = bytes([10, 99, 0, 1])
        body = struct.pack("=BBH", 2, 0, 0)
        body += nla(0x8001, tup(a, b, 1000, 2000)) + nla(0x8002, tup(b, a, 2000, 1000))
        body += nla(3, struct.pack(">I", 14)) + nla(7, struct.pack(">I", 600))
        seq += 1
        out += struct.pack("=IHHII", 16 + len(body), 0x100, 0x1 | 0x4 | 0x200 | 0x400, seq, 0) + body
    s.send(out)
    acks = 0
    while acks < batch:
        data = s.recv(1 << 20)
        at = 0
        while at + 16 <= len(data):
            l, t = struct.unpack_from("=IH", data, at)
            if t == 2:
                acks += 1
                err = struct.unpack_from("=i", data, at + 16)[0]
                if err == 0:
                    made += 1
                elif refused is None:
                    refused = -err
            at += (l + 3) & ~3
print("made", made, "refused", refused, flush=True)
"#;

/// Sends one datagram to each of `n` ports of 127.0.0.1 (each a new
/// connection for conntrack); prints how many the kernel refused.
const NEW_FLOWS: &str = r#"
import os, socket, sys
n = int(sys.argv[1])
print(os.getpid(), flush=True)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
refused = 0
for i in range(n):
    try:
        s.sendto(b"f" * 100, ("127.0.0.1", 42000 + i))
    except OSError:
        refused += 1
print("refused", refused, flush=True)
print("sent", flush=True)
"#;

/// The summary's "conntrack: N packets dropped (table full)".
fn conntrack_dropped(log: &str) -> Option<u64> {
    let at = log.rfind("conntrack: ")?;
    log[at + 11..].split_whitespace().next()?.parse().ok()
}

#[test]
fn a_full_conntrack_table_is_counted_by_reason_not_silent() {
    if prerequisites().is_none() || support::need_binary("nft", "nftables").is_none() {
        return;
    }
    let max: u64 = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Each entry is a few hundred bytes of kernel memory, freed with the
    // namespace.
    if max > 2_000_000 {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "nf_conntrack_max {max} is too large to fill in a test"
        );
        eprintln!("skipped: nf_conntrack_max {max} is too large to fill in a test");
        return;
    }
    let ns = Netns::new("ct");
    let user = User::new("qlact");
    let agent = AgentRun::start_with(&ns, 1000, &["--agent-mode".into(), "nft".into()]);
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, "python3", "-c", FILL])
        .arg(max.to_string())
        .output()
        .unwrap();
    let filled = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "filling the table: {filled} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let count: u64 = in_ns(&ns, &["cat", "/proc/sys/net/netfilter/nf_conntrack_count"])
        .trim()
        .parse()
        .unwrap();
    assert!(
        count >= max,
        "the table is not full: {count} of {max} entries ({filled})"
    );
    let n = 200u32;
    let mut g = Gen::start(&ns, &user, NEW_FLOWS, &[n.to_string()]);
    let refused: u32 = g.wait_line_prefix("refused ").trim().parse().unwrap();
    g.wait_line("sent");
    g.wait();
    assert_eq!(
        refused,
        n,
        "with the table full the kernel still let new connections through ({filled}); {}",
        agent.log()
    );
    // A drain sees the drops and says so while running.
    let deadline = Instant::now() + DEADLINE;
    while !agent.log().contains("conntrack table full") {
        assert!(
            Instant::now() < deadline,
            "the drops were not said within {DEADLINE:?}: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, log) = agent.stop();
    let dropped = conntrack_dropped(&log)
        .unwrap_or_else(|| panic!("no conntrack drops in the summary: {log}"));
    assert!(
        dropped >= u64::from(n),
        "{dropped} drops counted for {n} refused packets: {log}"
    );
}
