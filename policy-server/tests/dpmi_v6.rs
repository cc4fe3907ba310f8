//! DPMI with IPv6 against the real kernel: the lab's point captures on a
//! veth end carrying IPv4 and IPv6 from two senders each; consumers asking
//! for one IPv6 /80, another /80 and an IPv4 host each receive exactly
//! their packets (the kernel's cBPF program for IPv6 addresses, the point's
//! exact first match), and a filter mixing the families is refused naming
//! the field.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod dpmi_lab;

use dpmi_lab::*;
use qosloop_meter::dpmi::refilter::Refilter;
use qosloop_schema::dpmi::Filter;
use qosloop_testbed::harness::require_root;
use qosloop_testbed::need;
use serde_json::json;
use std::collections::BTreeMap;
use std::net::Ipv6Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The IPv6 source of a frame, if it is one.
fn src6(f: &[u8]) -> Option<Ipv6Addr> {
    (f.len() >= 54 && f[12..14] == [0x86, 0xdd])
        .then(|| Ipv6Addr::from(<[u8; 16]>::try_from(&f[22..38]).unwrap()))
}

/// The tags of the test's IPv6 UDP datagrams among `frames`.
fn tags6(frames: &[Vec<u8>]) -> BTreeMap<u64, u32> {
    let mut out = BTreeMap::new();
    for f in frames {
        if src6(f).is_some() && f[20] == 17 && f.len() >= 14 + 40 + 8 + 8 {
            let t = u64::from_be_bytes(f[62..70].try_into().unwrap());
            *out.entry(t).or_insert(0) += 1;
        }
    }
    out
}

#[test]
fn a_consumer_of_one_ipv6_prefix_receives_exactly_its_packets() {
    need!(require_root("creates network namespaces"));
    let lab = Lab::with_ipv6();
    let stop = Arc::new(AtomicBool::new(false));
    let point = lab.point(3, 4096, 128, stop.clone());

    // Mixing the families in one filter: 400 naming the field.
    let (status, v) = lab.api(
        "POST",
        "/api/v1/requests",
        Some("alice"),
        Some(
            json!({"points": ["mp1"], "filter": {"ip_src": SRC, "ip_dst": MP6},
                    "consumer": "127.0.0.1:9", "stop_s": now_s() + 60.0}),
        ),
    );
    assert_eq!(
        (status, v["field"].clone()),
        (400, json!("filter.ip_dst")),
        "{v}"
    );

    let (c1, c2, c4) = (
        Consumer::start(&lab, false, false),
        Consumer::start(&lab, false, false),
        Consumer::start(&lab, false, false),
    );
    let f1 = json!({"ip_src": "2001:db8:88:0:1::/80", "ip_proto": "17"});
    let f2 = json!({"ip_src": "2001:db8:88:0:2::/ffff:ffff:ffff:ffff:ffff::", "dst_port": "5002"});
    let f4 = json!({"ip_src": SRC, "ip_proto": "17"});
    let r1 = request(&lab, "alice", f1.clone(), c1.addr, 300.0);
    let r2 = request(&lab, "bob", f2.clone(), c2.addr, 300.0);
    let r4 = request(&lab, "carol", f4, c4.addr, 300.0);
    let list = filters(&lab);
    assert_eq!(list["filters"].as_array().unwrap().len(), 3, "{list}");
    wait_for("the consumers connected", Duration::from_secs(10), || {
        connected(&lab, "alice", r1) && connected(&lab, "bob", r2) && connected(&lab, "carol", r4)
    });

    lab.send6(SRC6, 5001, 200, 64);
    lab.send6(SRC6, 5002, 70, 64);
    lab.send6(OTHER_SRC6, 5002, 150, 64);
    lab.send6(OTHER_SRC6, 5003, 60, 64);
    lab.send(SRC, 5001, 100, 64);
    let want1 = expected(&[(5001, 200), (5002, 70)]);
    let want2_len = 150;
    let want4 = expected(&[(5001, 100)]);
    wait_for(
        "the frames at the consumers",
        Duration::from_secs(10),
        || {
            tags6(&c1.frames.lock().unwrap()).len() >= want1.len()
                && tags6(&c2.frames.lock().unwrap()).len() >= want2_len
                && c4.tags(|_| true).len() >= want4.len()
        },
    );
    std::thread::sleep(Duration::from_millis(300));

    let got1 = c1.frames.lock().unwrap().clone();
    assert_eq!(tags6(&got1), want1, "C1: its /80's UDP, each once");
    let prefix1: u128 = "2001:db8:88:0:1::".parse::<Ipv6Addr>().unwrap().into();
    for f in &got1 {
        let s = src6(f).expect("C1 gets IPv6 frames only");
        assert_eq!(u128::from(s) >> 48, prefix1 >> 48, "C1 gets its /80 only");
        assert_eq!(f[20], 17, "C1 gets UDP only");
    }
    let got2 = c2.frames.lock().unwrap().clone();
    let want2 = expected(&[(5002, 150)]);
    assert_eq!(
        tags6(&got2),
        want2,
        "C2: the other /80's port 5002, each once"
    );
    assert!(got2
        .iter()
        .all(|f| src6(f) == Some(OTHER_SRC6.parse().unwrap())));
    // No widening at this capacity: the consumers need not re-filter, and
    // re-filtering keeps everything.
    let mut refilter = Refilter::new(Filter::from_json(&f1).unwrap(), lab.veth.b_if.clone());
    assert!(got1.iter().all(|f| refilter.keep(f)));
    let (_, shown) = lab.api(
        "GET",
        &format!("/api/v1/requests/{r1}"),
        Some("alice"),
        None,
    );
    assert_eq!(shown["refilter"], json!(false), "{shown}");
    // The IPv4 consumer: exactly its IPv4 frames, no IPv6 frame.
    assert_eq!(c4.tags(|_| true), want4);
    assert!(c4.frames.lock().unwrap().iter().all(|f| src6(f).is_none()));
    // The kernel program dropped the rest: the point read (after the
    // kernel filter) exactly the frames its filters match — not the other
    // /80's port 5003, nor neighbour discovery or ARP.
    let want_read = (200 + 70 + 150 + 100) as u64;
    wait_for("the point's report", Duration::from_secs(10), || {
        let (_, p) = lab.api("GET", "/api/v1/points", None, None);
        p[0]["matched"].as_u64() == Some(want_read)
    });
    let (_, p) = lab.api("GET", "/api/v1/points", None, None);
    assert_eq!(p[0]["frames"].as_u64(), Some(want_read), "{p}");
    stop.store(true, Ordering::Relaxed);
    point.join().unwrap();
}
