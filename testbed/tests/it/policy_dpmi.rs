//! DPMI against the real kernel: a measurement point (the meter's
//! `run_point`, capturing on a veth end in a namespace) polls the policy
//! server's controller (its `/api/v1` routes over SQLite) and delivers to
//! consumers listening in the same namespace, while a second namespace
//! sends UDP over the veth. Checked: two overlapping requests over the
//! point's capacity share one widened filter and each consumer has exactly
//! its frames after re-filtering; ending a request removes its filter; a
//! slow and a vanished consumer lose frames counted for them alone; a
//! filter list the kernel refuses leaves the old one running and says why;
//! invalid requests are refused naming the field.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::dpmi_lab;

use dpmi_lab::*;
use qosloop_meter::dpmi::refilter::Refilter;
use qosloop_schema::dpmi::Filter;
use qosloop_testbed::harness::require_root;
use qosloop_testbed::need;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
#[test]
fn overlapping_requests_over_capacity_share_a_widened_filter_and_each_consumer_gets_exactly_its_frames(
) {
    need!(require_root("creates network namespaces"));
    let lab = Lab::new();
    let stop = Arc::new(AtomicBool::new(false));
    let point = lab.point(1, 4096, 128, stop.clone());
    let (c1, c2) = (
        Consumer::start(&lab, false, false),
        Consumer::start(&lab, false, false),
    );
    // R1 ⊂ R2 (seeds/003 §3): R1 one port of SRC's UDP, R2 all of it.
    let r1_filter = json!({"ip_src": SRC, "ip_proto": "17", "dst_port": "5001"});
    let r2_filter = json!({"ip_src": SRC, "ip_proto": "17"});
    let r1 = request(&lab, "alice", r1_filter.clone(), c1.addr, 300.0);
    let r2 = request(&lab, "bob", r2_filter.clone(), c2.addr, 300.0);
    let list = filters(&lab);
    assert_eq!(list["filters"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(
        Filter::from_json(&list["filters"][0]["filter"]).unwrap(),
        Filter::from_json(&r2_filter).unwrap(),
        "widened to R2"
    );
    wait_for("both consumers connected", DEADLINE, || {
        connected(&lab, "alice", r1) && connected(&lab, "bob", r2)
    });
    let (_, shown) = lab.api(
        "GET",
        &format!("/api/v1/requests/{r1}"),
        Some("alice"),
        None,
    );
    assert_eq!(shown["refilter"], json!(true), "{shown}");
    assert_eq!(shown["state"], json!("active"));
    // Delivery counters are the owner's alone.
    assert_eq!(
        lab.api("GET", &format!("/api/v1/requests/{r1}"), Some("bob"), None)
            .0,
        404
    );

    lab.send(SRC, 5001, 200, 64);
    lab.send(SRC, 5002, 150, 64);
    lab.send(OTHER_SRC, 5001, 100, 64);
    let want1 = expected(&[(5001, 200)]);
    let want2 = expected(&[(5001, 200), (5002, 150)]);
    // C1 gets the widened stream (R2's frames) and keeps exactly R1's.
    wait_for_eq(
        "C1 before re-filtering: the widened filter, each frame once",
        DEADLINE,
        &want2,
        || c1.tags(|_| true),
    );
    wait_for_eq("C2: its frames, each once", DEADLINE, &want2, || {
        c2.tags(|_| true)
    });
    let mut refilter = Refilter::new(
        Filter::from_json(&r1_filter).unwrap(),
        lab.veth.b_if.clone(),
    );
    assert_eq!(
        c1.tags(|f| refilter.keep(f)),
        want1,
        "C1 after re-filtering"
    );
    for c in [&c1, &c2] {
        assert!(
            c.frames.lock().unwrap().iter().all(|f| f.len() <= 128),
            "headers only"
        );
    }

    // R1 ends: the filter is R2's own, C2 alone, nobody re-filters.
    assert_eq!(
        lab.api(
            "DELETE",
            &format!("/api/v1/requests/{r1}"),
            Some("alice"),
            None
        )
        .0,
        200
    );
    let list = filters(&lab);
    assert_eq!(list["filters"].as_array().unwrap().len(), 1);
    assert_eq!(list["consumers"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["consumers"][0]["address"], json!(c2.addr.to_string()));
    assert_eq!(list["consumers"][0]["refilter"], json!(false));
    let before = c1.frames.lock().unwrap().len();
    wait_for("the point to install the list without C1", DEADLINE, || {
        let (_, p) = lab.api("GET", "/api/v1/points", None, None);
        p[0]["installed_version"] == list["version"]
    });
    lab.send(SRC, 5003, 50, 64);
    let want2 = expected(&[(5001, 200), (5002, 150), (5003, 50)]);
    wait_for_eq("C2's new frames", DEADLINE, &want2, || c2.tags(|_| true));
    assert_eq!(
        c1.frames.lock().unwrap().len(),
        before,
        "C1 gets nothing after its request ended"
    );
    // A request reaching its stop leaves no filter: R2 ends by hand, and
    // bob's R3, due to stop two seconds after it is made, expires. (R2
    // lived long enough for the steps above however slowly they ran.)
    assert_eq!(
        lab.api(
            "DELETE",
            &format!("/api/v1/requests/{r2}"),
            Some("bob"),
            None
        )
        .0,
        200
    );
    let r3_filter = json!({"ip_src": SRC, "ip_proto": "17", "dst_port": "5004"});
    let r3 = request(&lab, "bob", r3_filter, c2.addr, 2.0);
    assert_eq!(
        filters(&lab)["filters"].as_array().map(Vec::len),
        Some(1),
        "R3's filter"
    );
    wait_for("R3's window to end", DEADLINE, || {
        filters(&lab)["filters"]
            .as_array()
            .is_some_and(Vec::is_empty)
    });
    let (_, shown) = lab.api("GET", &format!("/api/v1/requests/{r3}"), Some("bob"), None);
    assert_eq!(shown["state"], json!("expired"));
    stop.store(true, Ordering::Relaxed);
    point.join().unwrap();
}

#[test]
fn slow_and_vanished_consumers_lose_only_their_own_frames() {
    need!(require_root("creates network namespaces"));
    let lab = Lab::new();
    let stop = Arc::new(AtomicBool::new(false));
    // The operator allows full frames at this point.
    let point = lab.point(4, 1024, 1500, stop.clone());
    let fast = Consumer::start(&lab, false, false);
    let slow = Consumer::start(&lab, true, false);
    let gone = Consumer::start(&lab, false, true);
    let filter = json!({"ip_src": SRC, "ip_proto": "17"});
    let mut ids = Vec::new();
    for (user, c) in [("fast", &fast), ("slow", &slow), ("gone", &gone)] {
        let (status, v) = lab.api(
            "POST",
            "/api/v1/requests",
            Some(user),
            Some(
                json!({"points": ["mp1"], "filter": filter, "consumer": c.addr.to_string(),
                        "caplen": 1500, "stop_s": now_s() + 300.0}),
            ),
        );
        assert_eq!(status, 201, "{v}");
        ids.push(v["id"].as_i64().unwrap());
    }
    assert_eq!(
        filters(&lab)["filters"].as_array().unwrap().len(),
        1,
        "one shared filter"
    );
    wait_for("fast and slow connected", DEADLINE, || {
        connected(&lab, "fast", ids[0]) && connected(&lab, "slow", ids[1])
    });
    // 20,000 frames of 1,400 bytes (28 MB): far more than the stalled
    // consumer's socket buffers (at most 10 MB on loopback) and queue hold.
    // Paced by the fast consumer (a batch of 500, half its queue, once the
    // frames before it arrived): what is checked is that the stalled and
    // the vanished consumers do not hold the fast one up, not how fast the
    // sender is.
    lab.send_paced(SRC, 6000, SLOW_FRAMES, 1400, 500, || {
        fast.frames.lock().unwrap().len()
    });
    let want = expected(&[(6000, SLOW_FRAMES)]);
    let delivery = |user: &str, id: i64| {
        let (_, v) = lab.api("GET", &format!("/api/v1/requests/{id}"), Some(user), None);
        v["deliveries"][0].clone()
    };
    let start = Instant::now();
    while fast.tags(|_| true).len() < want.len() && start.elapsed() < DEADLINE {
        std::thread::sleep(Duration::from_millis(50));
    }
    let got = fast.tags(|_| true);
    assert!(
        got == want,
        "the fast consumer has {} of {} frames; its counters: {}; the point: {}",
        got.len(),
        want.len(),
        delivery("fast", ids[0]),
        lab.api("GET", "/api/v1/points", None, None).1
    );
    wait_for("the point's report of the slow consumer", DEADLINE, || {
        delivery("slow", ids[1])["dropped_full"]
            .as_i64()
            .unwrap_or(0)
            > 0
    });
    let fast_d = delivery("fast", ids[0]);
    assert_eq!(fast_d["dropped_full"], json!(0), "{fast_d}");
    assert_eq!(fast_d["dropped_disconnected"], json!(0), "{fast_d}");
    wait_for("the vanished consumer's drops", DEADLINE, || {
        delivery("gone", ids[2])["dropped_disconnected"]
            .as_i64()
            .unwrap_or(0)
            > 0
    });
    // Only its owner sees a consumer's counters.
    assert_eq!(
        lab.api(
            "GET",
            &format!("/api/v1/requests/{}", ids[1]),
            Some("fast"),
            None
        )
        .0,
        404
    );
    stop.store(true, Ordering::Relaxed);
    point.join().unwrap();
}

#[test]
fn a_filter_list_the_kernel_refuses_keeps_the_old_one_and_says_why() {
    need!(require_root("creates network namespaces"));
    let lab = Lab::new();
    let stop = Arc::new(AtomicBool::new(false));
    let point = lab.point(8, 4096, 128, stop.clone());
    let c = Consumer::start(&lab, false, false);
    request(
        &lab,
        "alice",
        json!({"ip_src": SRC, "ip_proto": "17", "dst_port": "7000"}),
        c.addr,
        300.0,
    );
    wait_for("the first list installed", DEADLINE, || {
        let (_, p) = lab.api("GET", "/api/v1/points", None, None);
        p[0]["installed_version"] == filters(&lab)["version"]
    });
    // Too little socket memory for the next program next to the current.
    lab.mp.sysctl("net.core.optmem_max", "600").unwrap();
    for port in 7001..7006 {
        let f = json!({"ip_src": SRC, "ip_proto": "17", "dst_port": port.to_string(),
                       "ether_type": "0x0800", "ip_dst": MP});
        request(&lab, "alice", f, c.addr, 300.0);
    }
    let mut error = String::new();
    wait_for("the install error", DEADLINE, || {
        let (_, p) = lab.api("GET", "/api/v1/points", None, None);
        error = p[0]["install_error"].as_str().unwrap_or("").to_owned();
        !error.is_empty()
    });
    assert!(
        error.contains("SO_ATTACH_FILTER") && error.contains("optmem_max"),
        "{error}"
    );
    // The old list still runs: port 7000 arrives, 7001 does not. 7001
    // goes first: frames reach the consumer in the order captured, so once
    // 7000's are in, a 7001 frame let through would be there too.
    lab.send(SRC, 7001, 20, 64);
    lab.send(SRC, 7000, 20, 64);
    let port_of = |tag: &u64| (tag >> 32) & 0xffff;
    wait_for("port 7000's frames", DEADLINE, || {
        c.tags(|_| true)
            .keys()
            .filter(|t| port_of(t) == 7000)
            .count()
            >= 20
    });
    assert_eq!(c.tags(|_| true), expected(&[(7000, 20)]));
    stop.store(true, Ordering::Relaxed);
    point.join().unwrap();
}

#[test]
fn invalid_requests_are_refused_naming_the_field() {
    need!(require_root("creates network namespaces"));
    let lab = Lab::new();
    let stop = Arc::new(AtomicBool::new(false));
    let point = lab.point(2, 4096, 128, stop.clone());
    let now = now_s();
    let base = json!({"points": ["mp1"], "filter": {"ip_proto": "6"}, "consumer": "127.0.0.1:9",
                      "start_s": now, "stop_s": now + 60.0});
    let field = |change: &dyn Fn(&mut Value), user: Option<&str>| {
        let mut b = base.clone();
        change(&mut b);
        let (status, v) = lab.api("POST", "/api/v1/requests", user, Some(b));
        (status, v["field"].as_str().unwrap_or("").to_owned())
    };
    let alice = Some("alice");
    assert_eq!(
        field(
            &|b| b["filter"]["ip_src"] = json!("10.0.0.1/255.0.0.0"),
            alice
        ),
        (400, "filter.ip_src".into())
    );
    assert_eq!(
        field(&|b| b["filter"]["ip_tos"] = json!("1"), alice),
        (400, "filter.ip_tos".into())
    );
    assert_eq!(
        field(&|b| b["priority"] = json!(1), alice),
        (400, "priority".into())
    );
    assert_eq!(
        field(&|b| b["points"] = json!(["mp1", "nowhere"]), alice),
        (400, "points[1]".into())
    );
    assert_eq!(
        field(&|b| b["stop_s"] = json!(now - 10.0), alice),
        (400, "stop_s".into())
    );
    assert_eq!(
        field(&|b| b["caplen"] = json!(9000), alice),
        (400, "caplen".into())
    );
    assert_eq!(field(&|_| {}, None), (401, "x-qosloop-user".into()));
    assert_eq!(field(&|_| {}, alice).0, 201);
    // The same frames to the same consumer in an overlapping window.
    assert_eq!(
        field(&|b| b["start_s"] = json!(now + 30.0), alice),
        (400, "start_s".into())
    );
    // Another user's consumer.
    assert_eq!(
        field(&|b| b["filter"] = json!({}), Some("bob")),
        (400, "consumer".into())
    );
    stop.store(true, Ordering::Relaxed);
    point.join().unwrap();
}

#[test]
fn flow_records_and_anonymised_headers_each_exactly_their_request() {
    need!(require_root("creates network namespaces"));
    let lab = Lab::new();
    let stop = Arc::new(AtomicBool::new(false));
    let point = lab.point(1, 4096, 128, stop.clone());
    let (flows_addr, lines) = line_consumer(&lab);
    let anon = Consumer::start(&lab, false, false);
    let (status, v) = lab.api(
        "POST",
        "/api/v1/requests",
        Some("a"),
        Some(json!({"points": ["mp1"], "filter": {"ip_src": SRC, "ip_proto": "17"},
                    "consumer": flows_addr.to_string(), "delivery": "flows", "stop_s": now_s() + 300.0})),
    );
    assert_eq!(status, 201, "{v}");
    let flows_id = v["id"].as_i64().unwrap();
    // Over capacity with the first: widened, but an anonymised consumer is
    // re-filtered by the point (it could not match scrambled addresses).
    let (status, v) = lab.api(
        "POST",
        "/api/v1/requests",
        Some("b"),
        Some(json!({"points": ["mp1"], "filter": {"ip_src": SRC, "ip_proto": "17", "dst_port": "6201"},
                    "consumer": anon.addr.to_string(), "anonymise": true, "stop_s": now_s() + 300.0})),
    );
    assert_eq!(status, 201, "{v}");
    let anon_id = v["id"].as_i64().unwrap();
    let list = filters(&lab);
    assert_eq!(list["filters"].as_array().unwrap().len(), 1, "{list}");
    wait_for("both consumers connected", DEADLINE, || {
        connected(&lab, "a", flows_id) && connected(&lab, "b", anon_id)
    });
    let (_, shown) = lab.api(
        "GET",
        &format!("/api/v1/requests/{anon_id}"),
        Some("b"),
        None,
    );
    assert_eq!(shown["refilter"], json!(false), "{shown}");
    lab.send(SRC, 6200, 30, 64);
    lab.send(SRC, 6201, 20, 64);
    let per_port = || {
        let mut t: BTreeMap<u64, u64> = BTreeMap::new();
        for l in lines.lock().unwrap().iter() {
            *t.entry(l["dst_port"].as_u64().unwrap()).or_default() +=
                l["packets"].as_u64().unwrap();
        }
        t
    };
    // Flow lines come once a second: wait for the totals, exactly.
    wait_for_eq(
        "the flow records",
        DEADLINE,
        &BTreeMap::from([(6200, 30), (6201, 20)]),
        per_port,
    );
    assert!(lines
        .lock()
        .unwrap()
        .iter()
        .all(|l| l["src_addr"] == json!(SRC)));
    // 6200 went first: a frame of it let through would be in before
    // 6201's last one.
    wait_for_eq(
        "the anonymised frames",
        DEADLINE,
        &expected(&[(6201, 20)]),
        || anon.tags(|_| true),
    );
    let frames = anon.frames.lock().unwrap().clone();
    let src: Vec<[u8; 4]> = frames
        .iter()
        .map(|f| f[26..30].try_into().unwrap())
        .collect();
    assert!(src.iter().all(|s| *s == src[0]), "one address, one image");
    assert_ne!(src[0], SRC.parse::<std::net::Ipv4Addr>().unwrap().octets());
    let dst: [u8; 4] = frames[0][30..34].try_into().unwrap();
    // SRC and MP share 30 bits (10.88.0.1, 10.88.0.2): so do their images.
    let shared = (u32::from_be_bytes(src[0]) ^ u32::from_be_bytes(dst)).leading_zeros();
    assert_eq!(shared, 30);
    stop.store(true, Ordering::Relaxed);
    point.join().unwrap();
}
