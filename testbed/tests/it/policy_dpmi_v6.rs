//! DPMI with IPv6 against the real kernel: the lab's point captures on a
//! veth end carrying IPv4 and IPv6 from two senders each; consumers asking
//! for one IPv6 /80, another /80 and an IPv4 host each receive exactly
//! their packets (the kernel's cBPF program for IPv6 addresses, the point's
//! exact first match), and a filter mixing the families is refused naming
//! the field.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::dpmi_lab;

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
    wait_for("the consumers connected", DEADLINE, || {
        connected(&lab, "alice", r1) && connected(&lab, "bob", r2) && connected(&lab, "carol", r4)
    });

    lab.send6(SRC6, 5001, 200, 64);
    lab.send6(SRC6, 5002, 70, 64);
    lab.send6(OTHER_SRC6, 5002, 150, 64);
    lab.send6(OTHER_SRC6, 5003, 60, 64);
    lab.send(SRC, 5001, 100, 64);
    let want1 = expected(&[(5001, 200), (5002, 70)]);
    let want2 = expected(&[(5002, 150)]);
    let want4 = expected(&[(5001, 100)]);
    wait_for_eq("C1: its /80's UDP, each once", DEADLINE, &want1, || {
        tags6(&c1.frames.lock().unwrap())
    });
    wait_for_eq(
        "C2: the other /80's port 5002, each once",
        DEADLINE,
        &want2,
        || tags6(&c2.frames.lock().unwrap()),
    );
    wait_for_eq("C4: its IPv4 frames, each once", DEADLINE, &want4, || {
        c4.tags(|_| true)
    });

    let got1 = c1.frames.lock().unwrap().clone();
    let prefix1: u128 = "2001:db8:88:0:1::".parse::<Ipv6Addr>().unwrap().into();
    for f in &got1 {
        let s = src6(f).expect("C1 gets IPv6 frames only");
        assert_eq!(u128::from(s) >> 48, prefix1 >> 48, "C1 gets its /80 only");
        assert_eq!(f[20], 17, "C1 gets UDP only");
    }
    let got2 = c2.frames.lock().unwrap().clone();
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
    // The IPv4 consumer: exactly its IPv4 frames (above), no IPv6 frame.
    assert!(c4.frames.lock().unwrap().iter().all(|f| src6(f).is_none()));
    // The kernel program dropped the rest: the point read (after the
    // kernel filter) exactly the frames its filters match — not the other
    // /80's port 5003, nor neighbour discovery or ARP.
    let want_read = (200 + 70 + 150 + 100) as u64;
    wait_for("the point's report", DEADLINE, || {
        let (_, p) = lab.api("GET", "/api/v1/points", None, None);
        p[0]["matched"].as_u64() == Some(want_read)
    });
    let (_, p) = lab.api("GET", "/api/v1/points", None, None);
    assert_eq!(p[0]["frames"].as_u64(), Some(want_read), "{p}");
    stop.store(true, Ordering::Relaxed);
    point.join().unwrap();
}

/// Posts a request of `user` with `extra` keys (delivery, anonymise).
fn request_with(
    lab: &Lab,
    user: &str,
    filter: serde_json::Value,
    consumer: std::net::SocketAddr,
    extra: serde_json::Value,
) -> i64 {
    let mut body = json!({"points": ["mp1"], "filter": filter, "consumer": consumer.to_string(),
                          "stop_s": now_s() + 300.0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, v) = lab.api("POST", "/api/v1/requests", Some(user), Some(body));
    assert_eq!(status, 201, "{v}");
    v["id"].as_i64().unwrap()
}

/// IPv6 flow records and anonymised IPv6 frames against the real kernel:
/// a flows consumer of one /80's UDP receives records whose totals are
/// exactly its datagrams (per flow, packets and bytes; nothing of the
/// other /80 or of IPv4); an anonymised consumer of the other sender
/// receives exactly its datagrams, each with the same scrambled source
/// and destination, sharing exactly as many leading bits as the real ones.
#[test]
fn an_ipv6_flows_consumer_gets_exactly_its_records_and_an_anonymised_one_scrambled_frames() {
    need!(require_root("creates network namespaces"));
    let lab = Lab::with_ipv6();
    let stop = Arc::new(AtomicBool::new(false));
    let point = lab.point(4, 4096, 128, stop.clone());
    let (flows_addr, lines) = line_consumer(&lab);
    let anon = Consumer::start(&lab, false, false);
    let rf = request_with(
        &lab,
        "alice",
        json!({"ip_src": "2001:db8:88:0:1::/80", "ip_proto": "17"}),
        flows_addr,
        json!({"delivery": "flows"}),
    );
    let ra = request_with(
        &lab,
        "bob",
        json!({"ip_src": OTHER_SRC6}),
        anon.addr,
        json!({"anonymise": true}),
    );
    wait_for("the consumers connected", DEADLINE, || {
        connected(&lab, "alice", rf) && connected(&lab, "bob", ra)
    });

    lab.send6(SRC6, 5001, 120, 64);
    lab.send6(SRC6, 5002, 80, 64);
    lab.send6(OTHER_SRC6, 5003, 90, 64);
    lab.send(SRC, 5001, 50, 64);
    // Ethernet 14 + IPv6 40 + UDP 8 + 64 bytes of payload.
    let frame_bytes = 14 + 40 + 8 + 64;
    let totals = || {
        let mut by_port: BTreeMap<(String, String, u64, u64), (u64, u64)> = BTreeMap::new();
        for l in lines.lock().unwrap().iter() {
            let key = (
                l["src_addr"].as_str().unwrap().to_owned(),
                l["dst_addr"].as_str().unwrap().to_owned(),
                l["proto"].as_u64().unwrap(),
                l["dst_port"].as_u64().unwrap(),
            );
            let e = by_port.entry(key).or_default();
            e.0 += l["packets"].as_u64().unwrap();
            e.1 += l["bytes"].as_u64().unwrap();
        }
        by_port
    };
    let src6_text: String = SRC6.parse::<Ipv6Addr>().unwrap().to_string();
    let mp6: String = MP6.parse::<Ipv6Addr>().unwrap().to_string();
    let want: BTreeMap<_, _> = [
        (
            (src6_text.clone(), mp6.clone(), 17, 5001),
            (120, 120 * frame_bytes),
        ),
        (
            (src6_text.clone(), mp6.clone(), 17, 5002),
            (80, 80 * frame_bytes),
        ),
    ]
    .into_iter()
    .collect();
    // Flow lines come once a second: wait for the totals, exactly.
    wait_for_eq("the flows consumer's records", DEADLINE, &want, totals);
    wait_for_eq(
        "anonymised: exactly its datagrams",
        DEADLINE,
        &expected(&[(5003, 90)]),
        || tags6(&anon.frames.lock().unwrap()),
    );

    let got = anon.frames.lock().unwrap().clone();
    let (real_src, real_dst): (u128, u128) = (
        OTHER_SRC6.parse::<Ipv6Addr>().unwrap().into(),
        MP6.parse::<Ipv6Addr>().unwrap().into(),
    );
    let srcs: std::collections::BTreeSet<u128> =
        got.iter().map(|f| src6(f).unwrap().into()).collect();
    let dsts: std::collections::BTreeSet<u128> = got
        .iter()
        .map(|f| u128::from(Ipv6Addr::from(<[u8; 16]>::try_from(&f[38..54]).unwrap())))
        .collect();
    assert_eq!((srcs.len(), dsts.len()), (1, 1), "one image per address");
    let (x, y) = (*srcs.first().unwrap(), *dsts.first().unwrap());
    assert!(
        x != real_src && y != real_dst,
        "addresses were not scrambled"
    );
    assert_eq!(
        (x ^ y).leading_zeros(),
        (real_src ^ real_dst).leading_zeros(),
        "the shared prefix of source and destination is kept"
    );
    stop.store(true, Ordering::Relaxed);
    point.join().unwrap();
}
