//! Hostile peers against the real daemons (issue 11). Each test starts a
//! daemon binary of the workspace as a real process under a 2 GiB
//! address-space cap and 1,024 descriptors (`prlimit --as --nofile`), on
//! loopback, and replays one attack of the issue from 127.0.0.2 and up,
//! bounded in count and time. Then it checks that the daemon is still up and
//! answering, that its peak resident memory (VmHWM) stayed under a stated
//! budget, that a legitimate peer on 127.0.0.1 — the real `qosloop-meter`
//! exporting a capture, the real `qosloop-enforcer` in dry-run mode, an HTTP
//! client — gets its work done during and after the attack, and that the
//! daemon logged the refusal.
//!
//! Every process is killed and every socket closed when its handle drops,
//! also when an assertion fails half-way. The daemons run one at a time
//! (memory figures of one attack at a time, and a 2-core machine): under
//! cargo-nextest, which runs each test in a process of its own, by the
//! `hostile` test group (.config/nextest.toml); within one process (plain
//! `cargo test`) by the lock the tests hold.
//!
//! `QOSLOOP_HOSTILE_BIN_DIR` points the suite at other builds of the
//! binaries (to replay the attacks against an older commit).
//!
//! The collector's attacks are in `hostile/collector.rs`, the policy
//! server's in `hostile/policy_server.rs`, what they share (the daemon
//! process, the lock, the attackers' sockets) in `hostile/common.rs`; the
//! listener-address checks, which start both daemons, are below.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "hostile/common.rs"]
mod common;

#[path = "hostile/collector.rs"]
mod collector;

#[path = "hostile/policy_server.rs"]
mod policy_server;

use common::*;
use std::net::SocketAddr;

// ---------------------------------------------------------------------------
// Who can reach a port

/// Issue 11, item 5: the PDP listened on 0.0.0.0 by default, and any
/// listener could be opened beyond loopback without TLS. Now that is a
/// configuration error (exit 64, naming the address and the flag) unless
/// the listener has mutual TLS or the operator says
/// `--allow-insecure-remote`, which is logged at WARN.
#[test]
fn listeners_beyond_loopback_need_mutual_tls_or_the_explicit_opt_in() {
    let Some(bin) = qosloop_testbed::harness::prerequisite(bin_dir()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite_url(dir.path());
    let any = |p: u16| format!("0.0.0.0:{p}");
    let loopback = |p: u16| format!("127.0.0.1:{p}");
    let port = || qosloop_testbed::harness::free_port().unwrap();
    for (name, args) in [
        ("qosloop-collector", collector_args(any(port()), &db, &[])),
        (
            "qosloop-policy-server",
            policy_server_args(&db, any(port()), loopback(port()), &[]),
        ),
        (
            "qosloop-policy-server",
            policy_server_args(&db, loopback(port()), any(port()), &[]),
        ),
    ] {
        let (code, out) = run_to_end(&bin.join(name), &args);
        assert_eq!(code, Some(64), "{name} {args:?} started:\n{out}");
        assert!(
            out.contains("0.0.0.0") && out.contains("--allow-insecure-remote"),
            "{name}'s refusal names neither the address nor the flag:\n{out}"
        );
    }
    // With the opt-in they start, and say so at WARN.
    let opt_in = ["--allow-insecure-remote"];
    let c = collector_args(any(port()), &db, &opt_in);
    let addr: SocketAddr = c[1].replace("0.0.0.0", "127.0.0.1").parse().unwrap();
    let mut d = Daemon::start(&bin, "qosloop-collector", &c, dir.path().join("c.log"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(wait_listening(&mut d, addr));
    d.assert_logged(
        &["WARN", "beyond loopback without mutual TLS"],
        "the opt-in",
    );
    drop(d);
    let (pdp, http) = (port(), port());
    let args = policy_server_args(&db, any(pdp), any(http), &opt_in);
    let mut d = Daemon::start(
        &bin,
        "qosloop-policy-server",
        &args,
        dir.path().join("ps.log"),
    );
    rt.block_on(wait_listening(&mut d, loopback(http).parse().unwrap()));
    rt.block_on(wait_listening(&mut d, loopback(pdp).parse().unwrap()));
    d.assert_logged(
        &["WARN", "beyond loopback without mutual TLS"],
        "the opt-in",
    );
}
