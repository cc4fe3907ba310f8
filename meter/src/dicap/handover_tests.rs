//! Coordinator restarts, node reconnection and make-before-break joins,
//! over loopback TCP (nodes without capture sockets: a share is "installed"
//! when the node says so).

#![allow(clippy::unwrap_used)]

use super::coordinator::{run_coordinator_with, CoordinatorLimits, CoordinatorSummary, Event};
use super::node::{run_node, NodeConfig, NodeCounters};
use super::proto::{read_frame, write_frame, ToCoordinator, ToNode};
use super::share::ShareMode;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

struct Running {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<CoordinatorSummary>,
}

fn start(addr: &str) -> Running {
    let listener = TcpListener::bind(addr).unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let handle = std::thread::spawn(move || {
        run_coordinator_with(
            listener,
            ShareMode::Flow,
            None,
            &CoordinatorLimits::default(),
            s,
        )
        .unwrap()
    });
    Running { addr, stop, handle }
}

impl Running {
    fn end(self) -> CoordinatorSummary {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

fn join(addr: SocketAddr, name: &str, mask: Option<u64>) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    write_frame(
        &mut s,
        &ToCoordinator::Hello {
            node: name.into(),
            mask,
        },
    )
    .unwrap();
    s
}

/// The next message within `wait`, or `None`.
fn next(s: &mut TcpStream, wait: Duration) -> Option<ToNode> {
    s.set_read_timeout(Some(wait)).unwrap();
    read_frame::<ToNode>(s).ok()
}

fn assigned(s: &mut TcpStream) -> (u64, u64) {
    match next(s, Duration::from_secs(5)) {
        Some(ToNode::Assign { epoch, mask, .. }) => (epoch, mask),
        other => panic!("expected an assignment, got {other:?}"),
    }
}

fn confirm(s: &mut TcpStream, epoch: u64, mask: u64, at_ns: u64) {
    write_frame(
        s,
        &ToCoordinator::Installed {
            epoch,
            mask,
            installed_ns: at_ns,
        },
    )
    .unwrap();
}

fn beat(s: &mut TcpStream) {
    write_frame(
        s,
        &ToCoordinator::Heartbeat {
            sent_ns: 1,
            analysed: 0,
        },
    )
    .unwrap();
}

/// A joining node takes its buckets before the old owner lets them go:
/// the old owner hears nothing until the joiner confirmed, and the
/// duplicate window is the time between the two installs.
#[test]
fn a_join_installs_the_new_share_before_the_old_owner_drops_it() {
    let c = start("127.0.0.1:0");
    let mut a = join(c.addr, "a", None);
    let (e1, all) = assigned(&mut a);
    assert_eq!(all, u64::MAX);
    confirm(&mut a, e1, all, 1_000);
    let mut b = join(c.addr, "b", None);
    let (e2, mask_b) = assigned(&mut b);
    assert_eq!(mask_b.count_ones(), 32);
    // a keeps everything while b has not installed.
    beat(&mut a);
    beat(&mut b);
    assert_eq!(next(&mut a, Duration::from_millis(300)), None);
    beat(&mut a);
    beat(&mut b);
    confirm(&mut b, e2, mask_b, 2_000_000);
    let (e3, mask_a) = assigned(&mut a);
    assert_eq!(
        (e3, mask_a),
        (e2, !mask_b),
        "a gives up exactly b's buckets"
    );
    confirm(&mut a, e3, mask_a, 5_000_000);
    std::thread::sleep(Duration::from_millis(100));
    let summary = c.end();
    let handover = summary
        .events
        .iter()
        .find_map(|e| match e {
            Event::Handover {
                moved,
                duplicate_from_ns,
                duplicate_to_ns,
                duplicate_ms,
                ..
            } => Some((*moved, *duplicate_from_ns, *duplicate_to_ns, *duplicate_ms)),
            _ => None,
        })
        .expect("a handover event");
    assert_eq!(handover, (32, 2_000_000, 5_000_000, 3.0));
}

/// Nodes coming back to a restarted coordinator with their shares keep
/// them: nothing is sent, nothing moves, no bucket is held twice or by
/// nobody.
#[test]
fn a_restarted_coordinator_adopts_the_shares_nodes_come_back_with() {
    let c = start("127.0.0.1:0");
    let low = u64::from(u32::MAX);
    let mut a = join(c.addr, "a", Some(low));
    let mut b = join(c.addr, "b", Some(!low));
    // Through the grace and the rebalance after it: nothing to change.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(3_200) {
        beat(&mut a);
        beat(&mut b);
        assert_eq!(next(&mut a, Duration::from_millis(100)), None);
        assert_eq!(next(&mut b, Duration::from_millis(100)), None);
    }
    let summary = c.end();
    // The first assignment is the rebalance after the grace (the later
    // ones come from the nodes' connections closing at the end).
    let last = summary
        .events
        .iter()
        .find_map(|e| match e {
            Event::Assigned { masks, .. } => Some(masks.clone()),
            _ => None,
        })
        .expect("the rebalance after the grace");
    assert_eq!(last.get("a"), Some(&low));
    assert_eq!(last.get("b"), Some(&!low));
}

/// A node whose coordinator goes away keeps its share, reconnects with
/// backoff to the one that comes back on the same address, and is adopted
/// with its share.
#[test]
fn a_node_reconnects_to_a_restarted_coordinator_keeping_its_share() {
    let first = start("127.0.0.1:0");
    let addr = first.addr;
    let counters = Arc::new(NodeCounters::new(Duration::ZERO));
    let stop = Arc::new(AtomicBool::new(false));
    let node = {
        let (counters, stop) = (counters.clone(), stop.clone());
        std::thread::spawn(move || {
            let cfg = NodeConfig {
                coordinator: addr,
                name: "n1".into(),
                caplen: 0,
                secret: None,
            };
            run_node(&cfg, &[], &counters, &stop)
        })
    };
    let wait = |what: &str, ok: &dyn Fn() -> bool| {
        let t = Instant::now();
        while !ok() {
            assert!(t.elapsed() < Duration::from_secs(10), "waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait("the first share", &|| counters.stats().mask == u64::MAX);
    let summary = first.end();
    assert!(summary
        .events
        .iter()
        .any(|e| matches!(e, Event::Joined { node, .. } if node == "n1")));
    // No coordinator: the share stays.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(counters.stats().mask, u64::MAX);
    let second = start(&addr.to_string());
    wait("the reconnection", &|| counters.stats().reconnects == 1);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(counters.stats().mask, u64::MAX);
    stop.store(true, Ordering::Relaxed);
    node.join().unwrap().unwrap();
    let summary = second.end();
    assert!(summary
        .events
        .iter()
        .any(|e| matches!(e, Event::Joined { node, .. } if node == "n1")));
    assert!(!summary
        .events
        .iter()
        .any(|e| matches!(e, Event::Refused { .. })));
}
