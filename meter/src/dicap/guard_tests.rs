//! The coordinator's guards over loopback TCP: extra nodes, extra
//! connections, oversized frames and peers outside the allowed prefixes
//! are refused with a reason and counted.

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
