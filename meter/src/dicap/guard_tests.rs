//! The coordinator's guards over loopback TCP: extra nodes, extra
//! connections, oversized frames and peers outside the allowed prefixes
//! are refused with a reason and counted; with a shared secret, nodes
//! that cannot prove it are refused (counted by reason) and real nodes
//! with it install their share.

#![allow(clippy::unwrap_used)]

use super::coordinator::{in_prefix, run_coordinator_with, CoordinatorLimits, CoordinatorSummary};
use super::proto::{read_frame, write_frame, ToCoordinator, ToNode, MAX_NODE_FRAME};
use super::share::ShareMode;
use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn hello(addr: std::net::SocketAddr, name: &str) -> (TcpStream, ToNode) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write_frame(
        &mut s,
        &ToCoordinator::Hello {
            node: name.into(),
            mask: None,
        },
    )
    .unwrap();
    let answer = read_frame::<ToNode>(&mut s).unwrap();
    (s, answer)
}

fn run(limits: CoordinatorLimits, body: impl FnOnce(std::net::SocketAddr)) -> CoordinatorSummary {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let h = std::thread::spawn(move || {
        run_coordinator_with(listener, ShareMode::Flow, None, &limits, s).unwrap()
    });
    body(addr);
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap()
}

/// Extra nodes, extra connections, oversized frames and peers outside
/// the allowed prefixes are refused with a reason and counted.
#[test]
fn extra_nodes_connections_and_frames_are_refused_and_counted() {
    let limits = CoordinatorLimits {
        max_nodes: 2,
        max_connections: 4,
        allow: Vec::new(),
        secret: None,
    };
    let summary = run(limits, |addr| {
        let (_a, first) = hello(addr, "a");
        assert!(matches!(first, ToNode::Assign { .. }), "{first:?}");
        let (_b, second) = hello(addr, "b");
        assert!(matches!(second, ToNode::Assign { .. }), "{second:?}");
        let (_c, third) = hello(addr, "c");
        match third {
            ToNode::Refused { reason } => {
                assert!(reason.contains("already has 2 nodes"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        // A frame over the node limit is refused before it is read.
        let mut big = TcpStream::connect(addr).unwrap();
        big.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        big.write_all(&(MAX_NODE_FRAME + 1).to_be_bytes()).unwrap();
        match read_frame::<ToNode>(&mut big).unwrap() {
            ToNode::Refused { reason } => assert!(reason.contains("exceeds"), "{reason}"),
            other => panic!("{other:?}"),
        }
        // Two silent peers fill the four connections (a, b and the
        // two); the next is refused at once.
        let _silent: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(200));
        let mut extra = TcpStream::connect(addr).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        match read_frame::<ToNode>(&mut extra).unwrap() {
            ToNode::Refused { reason } => {
                assert!(reason.contains("too many connections"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    });
    assert_eq!(summary.refusals.get("too_many_nodes"), Some(&1));
    assert_eq!(summary.refusals.get("oversized_frame"), Some(&1));
    assert_eq!(summary.refusals.get("too_many_connections"), Some(&1));
}

#[test]
fn peers_outside_the_allowed_prefixes_are_refused() {
    let limits = CoordinatorLimits {
        allow: vec![("10.0.0.0".parse().unwrap(), 8)],
        ..CoordinatorLimits::default()
    };
    let summary = run(limits, |addr| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        match read_frame::<ToNode>(&mut s).unwrap() {
            ToNode::Refused { reason } => {
                assert!(
                    reason.contains("127.0.0.1 is not in --dicap-allow"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
    });
    assert_eq!(summary.refusals.get("not_allowed"), Some(&1));
    assert!(in_prefix(
        "10.1.2.3".parse().unwrap(),
        "10.0.0.0".parse().unwrap(),
        8
    ));
    assert!(in_prefix(
        "::ffff:10.1.2.3".parse().unwrap(),
        "10.0.0.0".parse().unwrap(),
        8
    ));
    assert!(!in_prefix(
        "2001:db8::1".parse().unwrap(),
        "2001:db9::".parse().unwrap(),
        32
    ));
    assert!(in_prefix(
        "2001:db8::1".parse().unwrap(),
        "2001:db8::".parse().unwrap(),
        32
    ));
}

/// Says hello and answers the challenge with `answer(nonce)`; what the
/// coordinator says next.
fn hello_answering(
    addr: std::net::SocketAddr,
    name: &str,
    answer: impl FnOnce(&[u8]) -> Option<ToCoordinator>,
) -> ToNode {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let hello = ToCoordinator::Hello {
        node: name.into(),
        mask: None,
    };
    write_frame(&mut s, &hello).unwrap();
    let ToNode::Challenge { nonce } = read_frame::<ToNode>(&mut s).unwrap() else {
        panic!("no challenge after the hello")
    };
    let nonce = super::proto::unhex(&nonce).unwrap();
    assert_eq!(nonce.len(), 32);
    if let Some(a) = answer(&nonce) {
        write_frame(&mut s, &a).unwrap();
    }
    read_frame::<ToNode>(&mut s).unwrap()
}

/// With `--dicap-secret` a node proves the secret by a MAC of a fresh
/// nonce: the right MAC is assigned a share; a wrong secret, a MAC of
/// another name, a replayed MAC and no answer are refused, saying why,
/// and counted by reason; a real node with the secret installs, one
/// without stops saying the coordinator wants a secret.
#[test]
fn a_coordinator_with_a_secret_refuses_nodes_that_cannot_prove_it() {
    use super::proto::Secret;
    use super::{run_node, NodeConfig, NodeCounters, NodeError};
    let secret = Secret::new(b"a secret of the cluster, 40 bytes long!!");
    let other = Secret::new(b"another secret, also long enough");
    let limits = CoordinatorLimits {
        secret: Some(secret.clone()),
        ..CoordinatorLimits::default()
    };
    let mac = |s: &Secret, nonce: &[u8], name: &str| ToCoordinator::Auth {
        mac: qosloop_runtime::digest::hex(&s.mac(nonce, name)),
    };
    let summary = run(limits, |addr| {
        let ok = hello_answering(addr, "a", |n| Some(mac(&secret, n, "a")));
        assert!(matches!(ok, ToNode::Assign { .. }), "{ok:?}");
        let refused = |answer: ToNode, why: &str| match answer {
            ToNode::Refused { reason } => assert!(reason.contains(why), "{reason}"),
            other => panic!("not refused: {other:?}"),
        };
        refused(
            hello_answering(addr, "b", |n| Some(mac(&other, n, "b"))),
            "wrong shared secret",
        );
        refused(
            hello_answering(addr, "c", |n| Some(mac(&secret, n, "someone-else"))),
            "wrong shared secret",
        );
        // A MAC recorded for one nonce does not answer the next.
        let mut seen = Vec::new();
        let _ = hello_answering(addr, "d", |n| {
            seen = n.to_vec();
            Some(mac(&secret, n, "d"))
        });
        refused(
            hello_answering(addr, "e", |_| Some(mac(&secret, &seen, "e"))),
            "wrong shared secret",
        );
        // Heartbeats then silence: refused when the 2 s run out.
        refused(
            hello_answering(addr, "f", |_| {
                Some(ToCoordinator::Heartbeat {
                    sent_ns: 0,
                    analysed: 0,
                })
            }),
            "did not answer the challenge",
        );

        // Real nodes: with the secret it installs its share; without it
        // stops, saying why.
        let run_one = |secret: Option<Secret>, name: &str| {
            let counters = Arc::new(NodeCounters::new(Duration::ZERO));
            let stop = Arc::new(AtomicBool::new(false));
            let cfg = NodeConfig {
                coordinator: addr,
                name: name.into(),
                caplen: 0,
                secret,
            };
            let (c, st) = (counters.clone(), stop.clone());
            let h = std::thread::spawn(move || run_node(&cfg, &[], &c, &st));
            let t = std::time::Instant::now();
            while counters.stats().mask == 0
                && !h.is_finished()
                && t.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            let mask = counters.stats().mask;
            stop.store(true, Ordering::Relaxed);
            (mask, h.join().unwrap())
        };
        let (mask, r) = run_one(Some(secret.clone()), "real");
        assert_ne!(mask, 0, "the node with the secret got no share");
        r.unwrap();
        let (mask, r) = run_one(None, "stranger");
        assert_eq!(mask, 0);
        match r {
            Err(e @ NodeError::Refused { .. }) => {
                assert!(e.to_string().contains("--dicap-secret"), "{e}")
            }
            other => panic!("a node without the secret: {other:?}"),
        }
    });
    assert_eq!(
        summary.refusals.get("bad_secret"),
        Some(&3),
        "{:?}",
        summary.refusals
    );
    assert_eq!(
        summary.refusals.get("no_secret"),
        Some(&2),
        "{:?}",
        summary.refusals
    );
}

#[test]
fn secret_files_are_16_to_4096_bytes_and_never_printed() {
    use super::proto::Secret;
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    std::fs::write(&good, "  sixteen-bytes-or-more\n").unwrap();
    let s = Secret::from_file(&good).unwrap();
    assert_eq!(s, Secret::new(b"sixteen-bytes-or-more"));
    assert_eq!(format!("{s:?}"), "Secret(..)");
    let short = dir.path().join("short");
    std::fs::write(&short, "short").unwrap();
    assert!(Secret::from_file(&short).unwrap_err().contains("16-4096"));
    assert!(Secret::from_file(&dir.path().join("none")).is_err());
    // The HMAC itself: RFC 4231 test cases 2 and 6 (a key over a block).
    let hex = qosloop_runtime::digest::hex;
    assert_eq!(
        hex(&super::proto::hmac_sha256(
            b"Jefe",
            b"what do ya want for nothing?"
        )),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    assert_eq!(
        hex(&super::proto::hmac_sha256(
            &[0xaa; 131],
            b"Test Using Larger Than Block-Size Key - Hash Key First"
        )),
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
    );
    // The MAC binds a label, the nonce and the name: a change of any
    // changes it.
    let m = s.mac(b"n", "a");
    assert_ne!(m, s.mac(b"n", "b"));
    assert_ne!(m, s.mac(b"m", "a"));
    assert_ne!(m, Secret::new(b"sixteen-bytes-or-morf").mac(b"n", "a"));
}
