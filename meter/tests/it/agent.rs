//! The host agent against the real kernel: users the test creates send
//! through the same loopback address of a namespace the test creates; the
//! agent (run inside that namespace, attached at the cgroup v2 root) must
//! account each user's bytes, keep processes apart, and attribute
//! short-lived processes, accepted connections and deleted users.
//!
//! Generators are Debian's `/usr/bin/python3`, started as the test users
//! with `setpriv`; what they sent is known exactly (UDP: payload + 28 IP
//! bytes per datagram), so the comparison is exact, not statistical.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::agent_common;

use agent_common::*;
use std::io::BufRead;
use std::process::Command;
use std::time::Duration;

#[test]
fn two_users_through_one_address_are_accounted_apart_and_processes_too() {
    if prerequisites().is_none() {
        return;
    }
    let ns = Netns::new("u");
    let alice = User::new("qlaa");
    let bob = User::new("qlab");
    let agent = AgentRun::start(&ns, 300);
    let port = 40_001;
    // Concurrently: alice with two processes, bob with one, one address.
    let mut a1 = sender(&ns, &alice, port, 3000, 972, 1.0);
    let mut a2 = sender(&ns, &alice, port, 2000, 472, 1.0);
    let mut b1 = sender(&ns, &bob, port, 4000, 1272, 1.0);
    for g in [&mut a1, &mut a2, &mut b1] {
        g.wait_line("sent");
    }
    let (p1, p2, pb) = (a1.pid, a2.pid, b1.pid);
    for g in [a1, a2, b1] {
        g.wait();
    }
    std::thread::sleep(Duration::from_millis(400));
    let (records, log) = agent.stop();
    let want_a1 = 3000 * (972 + 28);
    let want_a2 = 2000 * (472 + 28);
    let want_b = 4000 * (1272 + 28);
    let got_alice = udp_bytes(&records, port, |r| r.user.as_deref() == Some(&alice.name));
    let got_bob = udp_bytes(&records, port, |r| r.user.as_deref() == Some(&bob.name));
    let mut by: std::collections::BTreeMap<(Option<String>, Option<String>), u64> =
        Default::default();
    for r in records.iter().filter(|r| r.dst_port == port) {
        *by.entry((r.user.clone(), r.process.clone())).or_default() += r.bytes;
    }
    assert!(
        within_one_percent(got_alice, want_a1 + want_a2),
        "alice {got_alice} want {}; {by:?}; {log}",
        want_a1 + want_a2
    );
    assert!(
        within_one_percent(got_bob, want_b),
        "bob {got_bob} want {want_b}; {by:?}"
    );
    let of = |pid: u32| {
        let suffix = format!("[{pid}]");
        udp_bytes(&records, port, |r| {
            r.process.as_deref().is_some_and(|p| p.ends_with(&suffix))
        })
    };
    assert!(
        within_one_percent(of(p1), want_a1),
        "process {p1}: {}",
        of(p1)
    );
    assert!(
        within_one_percent(of(p2), want_a2),
        "process {p2}: {}",
        of(p2)
    );
    assert!(
        within_one_percent(of(pb), want_b),
        "process {pb}: {}",
        of(pb)
    );
    assert!(log.contains("agent:"), "summary line missing: {log}");
}

#[test]
fn a_process_that_exits_right_after_sending_is_still_attributed() {
    if prerequisites().is_none() {
        return;
    }
    let ns = Netns::new("s");
    let carol = User::new("qlac");
    // No drain while the test runs (an hour's interval): the only drain is
    // the one at stop, so the process has certainly exited before the
    // agent reads anything about it.
    let agent = AgentRun::start(&ns, 3_600_000);
    let port = 40_002;
    let mut g = sender(&ns, &carol, port, 50, 100, 0.0);
    g.wait_line("sent");
    let pid = g.pid;
    g.wait();
    let (records, log) = agent.stop();
    let suffix = format!("[{pid}]");
    let got = udp_bytes(&records, port, |r| {
        r.user.as_deref() == Some(&carol.name)
            && r.process.as_deref().is_some_and(|p| p.ends_with(&suffix))
    });
    assert_eq!(got, 50 * 128, "short-lived process: {records:?}; {log}");
}

/// TCP server: listens, prints its pid and port, accepts one connection,
/// sends `count` KiB, prints "sent", lingers so the agent can look it up.
const SERVER: &str = r#"
import os, socket, sys, time
count = int(sys.argv[1])
l = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
l.bind(("127.0.0.1", 0)); l.listen(1)
print(os.getpid(), flush=True)
print(l.getsockname()[1], flush=True)
c, _ = l.accept()
for _ in range(count):
    c.sendall(b"y" * 1024)
c.shutdown(socket.SHUT_WR)
print("sent", flush=True)
time.sleep(1.5)
"#;

#[test]
fn a_servers_accepted_connection_is_attributed_to_the_server() {
    if prerequisites().is_none() {
        return;
    }
    let ns = Netns::new("a");
    let dave = User::new("qlad");
    let agent = AgentRun::start(&ns, 300);
    let mut server = Gen::start(&ns, &dave, SERVER, &["256".into()]);
    let mut line = String::new();
    server.out.read_line(&mut line).unwrap();
    let port: u16 = line.trim().parse().unwrap();
    // The client is root, in the same namespace.
    let client = Command::new("nsenter")
        .arg(ns.path())
        .args([
            PYTHON,
            "-c",
            "import socket,sys\nc=socket.create_connection(('127.0.0.1',int(sys.argv[1])))\nn=0\nwhile True:\n d=c.recv(65536)\n if not d: break\n n+=len(d)\nprint(n)",
            &port.to_string(),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&client.stdout).trim(), "262144");
    server.wait_line("sent");
    let pid = server.pid;
    server.wait();
    let (records, log) = agent.stop();
    // On loopback each packet is seen twice: leaving the server's socket
    // and arriving at the client's (root). Both ends must be named.
    let suffix = format!("[{pid}]");
    let mut server_bytes = 0;
    for r in records
        .iter()
        .filter(|r| r.proto == 6 && r.src_port == port)
    {
        let by_server = r.process.as_deref().is_some_and(|p| p.ends_with(&suffix));
        if by_server {
            assert_eq!(r.user.as_deref(), Some(dave.name.as_str()), "{r:?}");
            server_bytes += r.bytes;
        } else {
            assert_eq!(r.user.as_deref(), Some("root"), "{r:?}; {log}");
            assert_ne!(r.process.as_deref(), Some("unknown process"), "{r:?}");
        }
    }
    // 256 KiB of payload plus the headers of at least 256/64 segments.
    assert!(
        server_bytes > 262_144,
        "accepted connection's bytes attributed to the server {pid}: {server_bytes}; {records:?}; {log}"
    );
}

#[test]
fn a_user_deleted_while_their_socket_lives_is_still_accounted() {
    if prerequisites().is_none() {
        return;
    }
    let ns = Netns::new("d");
    let erin = User::new("qlae");
    let agent = AgentRun::start(&ns, 300);
    let port = 40_004;
    // The user is deleted while the socket is open and sending.
    let mut g = Gen::start(
        &ns,
        &erin,
        r#"
import os, socket, sys, time
print(os.getpid(), flush=True)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(100): s.sendto(b"z" * 200, ("127.0.0.1", int(sys.argv[1])))
print("half", flush=True)
sys.stdin.readline()
for _ in range(100): s.sendto(b"z" * 200, ("127.0.0.1", int(sys.argv[1])))
print("sent", flush=True)
"#,
        &[port.to_string()],
    );
    g.wait_line("half");
    erin.delete();
    assert!(
        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(erin.uid))
            .unwrap()
            .is_none()
    );
    // stdin is null: the readline returns at once, the rest is sent now.
    g.wait_line("sent");
    g.wait();
    std::thread::sleep(Duration::from_millis(400));
    let (records, log) = agent.stop();
    let numeric = format!("uid {}", erin.uid);
    let got = udp_bytes(
        &records,
        port,
        |r| matches!(r.user.as_deref(), Some(u) if u == erin.name || u == numeric),
    );
    assert_eq!(got, 200 * 228, "deleted user's bytes: {records:?}; {log}");
}
