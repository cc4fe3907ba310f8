//! The console API (`/api/v1`) over real HTTP on SQLite and PostgreSQL:
//! answers checked against sums computed independently in the test from
//! the records it stored, cursor pagination, CSV, bad input, and the live
//! responses validated against the OpenAPI document by schemathesis.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;
use qosloop_policy_server::console::ConsoleLimits;
use qosloop_policy_server::web::{WebConfig, WebHandle};
use qosloop_schema::{FlowRecord, FlowSpec, PolicySet};
use qosloop_store::{Batch, Db};
use qosloop_testkit::harness::Postgres;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;

const T0: i64 = 1_800_000_000_000_000_000;
const SPAN: i64 = 600_000_000_000;

/// One stored record, as the test knows it.
#[derive(Clone, Debug)]
struct Rec {
    src: String,
    dst: String,
    sport: i64,
    dport: i64,
    proto: i64,
    packets: i64,
    bytes: i64,
    end_ns: i64,
    class: Option<String>,
    sampling: Option<i64>,
}

impl Rec {
    fn scaled_bytes(&self) -> i64 {
        self.bytes * self.sampling.filter(|s| *s > 1).unwrap_or(1)
    }
    fn scaled_packets(&self) -> i64 {
        self.packets * self.sampling.filter(|s| *s > 1).unwrap_or(1)
    }
}

/// Deterministic, varied records: IPv4 and IPv6, TCP and UDP, sampled
/// and not, with and without a class.
fn records() -> Vec<Rec> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n) as i64
    };
    (0..400)
        .map(|i| {
            let v6 = i % 10 == 0;
            Rec {
                src: if v6 {
                    format!("2001:db8::{:x}", 1 + next(5))
                } else {
                    format!("10.{}.{}.{}", next(2), next(4), 1 + next(6))
                },
                dst: if v6 {
                    "2001:db8:1::1".into()
                } else {
                    format!("192.0.2.{}", 1 + next(3))
                },
                sport: 1024 + next(50),
                dport: [53, 80, 443, 5001, 8080][next(5) as usize],
                proto: if next(3) == 0 { 17 } else { 6 },
                packets: 1 + next(100),
                bytes: 64 + next(100_000),
                end_ns: T0 + next(SPAN as u64),
                class: match next(3) {
                    0 => None,
                    1 => Some("voice".into()),
                    _ => Some("bulk".into()),
                },
                sampling: if next(4) == 0 {
                    Some(1 + next(8))
                } else {
                    None
                },
            }
        })
        .collect()
}

/// Stores `recs` through the store's flow writer (rows and per-minute
/// rollups in one transaction), from the exporter `meter-a`.
async fn fill(db: &Db, recs: &[Rec]) {
    let exporter_id = db
        .register_exporter("meter-a", "127.0.0.1", 1)
        .await
        .unwrap();
    let records = recs
        .iter()
        .map(|r| FlowRecord {
            src_addr: r.src.parse().unwrap(),
            dst_addr: r.dst.parse().unwrap(),
            src_port: r.sport as u16,
            dst_port: r.dport as u16,
            proto: r.proto as u8,
            packets: r.packets as u64,
            bytes: r.bytes as u64,
            start_ns: (r.end_ns - 1000) as u64,
            end_ns: r.end_ns as u64,
            class: r.class.clone(),
            sampling_interval: r.sampling.map(|s| s as u32),
            ..FlowRecord::default()
        })
        .collect();
    let batch = Batch {
        exporter_id,
        session_id: 1,
        seq: 1,
        records,
        dedup: false,
    };
    // With buckets, and stitched (standalone: no fence), so that
    // `/api/v1/stitched` has rows to answer with.
    db.commit_batches_routed(&[&batch], Some(8), None, None, 1)
        .await
        .unwrap();
    stitch_all(db, 8).await;
}

async fn json(addr: SocketAddr, path: &str) -> Value {
    let (status, _, body) = get(addr, path, "application/json").await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn in_v4_16(addr: &str, net: [u8; 2]) -> bool {
    addr.parse::<std::net::Ipv4Addr>()
        .map(|a| a.octets()[..2] == net)
        .unwrap_or(false)
}

/// Rules over the records of [`records`]: overlapping, of different
/// priorities, one disabled.
fn console_policy() -> PolicySet {
    use qosloop_policy_server::testing::{paper_policy, policed_rule};
    let mut p = paper_policy();
    let rule = |name: &str, priority: u32, spec: FlowSpec, enabled: bool| {
        let mut r = policed_rule(name, "10.0.0.1", 1, "edge");
        r.priority = priority;
        r.flows = vec![spec];
        r.enabled = enabled;
        r
    };
    p.rules = vec![
        rule(
            "udp-from-10-1",
            100,
            FlowSpec {
                src: "10.1.0.0/16".parse().ok(),
                proto: Some(17),
                ..FlowSpec::default()
            },
            true,
        ),
        rule(
            "web",
            200,
            FlowSpec {
                dst: "192.0.2.0/30".parse().ok(),
                dst_ports: "443".parse().ok(),
                user: None,
                ..FlowSpec::default()
            },
            true,
        ),
        rule(
            "all-of-10",
            50,
            FlowSpec {
                src: "10.0.0.0/8".parse().ok(),
                ..FlowSpec::default()
            },
            true,
        ),
        rule("off", 999, FlowSpec::default(), false),
    ];
    p
}

async fn serve(
    url: &str,
    limits: ConsoleLimits,
) -> (qosloop_policy_server::ServerHandle, WebHandle) {
    let (server, policy_tx) = start(url, any_loopback_port(), console_policy(), 100).await;
    let web = qosloop_policy_server::web::serve(
        any_loopback_port(),
        &server,
        policy_tx.subscribe(),
        WebConfig {
            console: limits,
            ..WebConfig::default()
        },
    )
    .await
    .unwrap();
    (server, web)
}

/// Every check of the explorer against one database.
async fn explorer_answers_match_independent_sums(url: &str) {
    let (server, web) = serve(url, ConsoleLimits::default()).await;
    let recs = records();
    fill(server.store.db(), &recs).await;
    let a = web.local_addr;
    let range = format!("from={T0}&to={}", T0 + SPAN);

    // Top-N with a filter: UDP or TCP from 10.1.0.0/16, by dst_port, bytes.
    let filter = "src_addr = 10.1.0.0/16 AND (proto = udp OR class = \"voice\")";
    let keep = |r: &&Rec| {
        in_v4_16(&r.src, [10, 1]) && (r.proto == 17 || r.class.as_deref() == Some("voice"))
    };
    let mut want: BTreeMap<i64, i64> = BTreeMap::new();
    for r in recs.iter().filter(keep) {
        *want.entry(r.dport).or_default() += r.scaled_bytes();
    }
    let total: i64 = want.values().sum();
    let mut ranked: Vec<(i64, i64)> = want.into_iter().collect();
    ranked.sort_by_key(|(k, v)| (-v, k.to_string()));
    let got = json(
        a,
        &format!(
            "/api/v1/top?{range}&dims=dst_port&metric=bytes&limit=3&filter={}",
            enc(filter)
        ),
    )
    .await;
    let rows: Vec<(i64, i64)> = got["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["keys"][0].as_str().unwrap().parse().unwrap(),
                r["value"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(rows, ranked[..3].to_vec());
    assert_eq!(got["total"].as_i64().unwrap(), total);
    assert_eq!(
        got["other"].as_i64().unwrap(),
        ranked[3..].iter().map(|x| x.1).sum::<i64>()
    );

    // The same as bits per second over the range.
    let got = json(
        a,
        &format!(
            "/api/v1/top?{range}&dims=dst_port&metric=bps&limit=1&filter={}",
            enc(filter)
        ),
    )
    .await;
    let bps = got["total"].as_f64().unwrap();
    assert!((bps - total as f64 * 8.0 / 600.0).abs() < 1e-6, "{bps}");

    // Two dimensions, flows counted, by /24 prefix and class (NULL class kept).
    let got = json(
        a,
        &format!(
            "/api/v1/top?{range}&dims=src_prefix,class&metric=flows&limit=100&filter=proto+%3D+6"
        ),
    )
    .await;
    let mut want: BTreeMap<(String, Option<String>), i64> = BTreeMap::new();
    for r in recs.iter().filter(|r| r.proto == 6) {
        let prefix = match r.src.parse::<std::net::Ipv4Addr>() {
            Ok(v4) => {
                let o = v4.octets();
                format!("{}.{}.{}.0/24", o[0], o[1], o[2])
            }
            Err(_) if url.starts_with("postgres") => "2001:db8::/64".into(),
            Err(_) => format!("{}/128", r.src),
        };
        *want.entry((prefix, r.class.clone())).or_default() += 1;
    }
    let mut seen = BTreeMap::new();
    for r in got["rows"].as_array().unwrap() {
        let k = (
            r["keys"][0].as_str().unwrap().to_owned(),
            r["keys"][1].as_str().map(str::to_owned),
        );
        seen.insert(k, r["value"].as_i64().unwrap());
    }
    assert_eq!(seen, want);
    assert_eq!(got["other"].as_i64(), Some(0));

    // By policy rule: the enabled rule of highest priority selecting each
    // record, computed here with the bandwidth manager's own test.
    let policy = console_policy();
    let mut want: BTreeMap<Option<String>, i64> = BTreeMap::new();
    for r in &recs {
        let rec = FlowRecord {
            src_addr: r.src.parse().unwrap(),
            dst_addr: r.dst.parse().unwrap(),
            src_port: r.sport as u16,
            dst_port: r.dport as u16,
            proto: r.proto as u8,
            ..FlowRecord::default()
        };
        let mut best: Option<&qosloop_schema::BusinessRule> = None;
        for rule in &policy.rules {
            if qosloop_policy_server::bandwidth::rule_selects(rule, &rec)
                && best.is_none_or(|b| rule.priority > b.priority)
            {
                best = Some(rule);
            }
        }
        *want.entry(best.map(|b| b.dn.clone())).or_default() += r.scaled_bytes();
    }
    let got = json(
        a,
        &format!("/api/v1/top?{range}&dims=rule&metric=bytes&limit=10"),
    )
    .await;
    let got: BTreeMap<Option<String>, i64> = got["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["keys"][0].as_str().map(str::to_owned),
                r["value"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(want.len(), 4, "three rules and no rule: {want:?}");

    // Flow list: every page by -bytes, cursor to cursor, is the filtered set in order.
    let filter = "NOT dst_port IN (53, 80) AND class != \"bulk\"";
    let mut want: Vec<&Rec> = recs
        .iter()
        .filter(|r| ![53, 80].contains(&r.dport) && r.class.as_deref() != Some("bulk"))
        .collect();
    want.sort_by_key(|r| -r.scaled_bytes());
    let mut got_bytes = Vec::new();
    let mut cursor = String::new();
    for _ in 0..100 {
        let page = json(
            a,
            &format!(
                "/api/v1/flows?{range}&sort=-bytes&limit=7&filter={}{cursor}",
                enc(filter)
            ),
        )
        .await;
        for r in page["rows"].as_array().unwrap() {
            got_bytes.push(r["bytes"].as_i64().unwrap());
            assert!(r["class"].as_str() != Some("bulk"));
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={}", enc(c)),
            None => break,
        }
    }
    assert_eq!(
        got_bytes,
        want.iter().map(|r| r.scaled_bytes()).collect::<Vec<_>>()
    );

    // Time series at 60 s, packets, stacked by proto: each step's sums.
    let got = json(
        a,
        &format!("/api/v1/timeseries?{range}&step=60s&stack=proto&metric=packets"),
    )
    .await;
    assert_eq!(
        got["start_ns"].as_i64(),
        Some(T0 - T0.rem_euclid(60_000_000_000))
    );
    let start = got["start_ns"].as_i64().unwrap();
    for s in got["series"].as_array().unwrap() {
        let proto: i64 = s["key"].as_str().unwrap().parse().unwrap();
        for (i, v) in s["values"].as_array().unwrap().iter().enumerate() {
            let lo = start + i as i64 * 60_000_000_000;
            let want: i64 = recs
                .iter()
                .filter(|r| r.proto == proto && r.end_ns >= lo && r.end_ns < lo + 60_000_000_000)
                .map(Rec::scaled_packets)
                .sum();
            assert_eq!(v.as_i64().unwrap(), want, "proto {proto} step {i}");
        }
    }

    // Sankey proto → dst_port: paths and total.
    let got = json(
        a,
        &format!("/api/v1/sankey?{range}&dims=proto,dst_port&metric=bytes&limit=4"),
    )
    .await;
    let all: i64 = recs.iter().map(Rec::scaled_bytes).sum();
    assert_eq!(got["total"].as_i64(), Some(all));
    let paths: i64 = got["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["value"].as_i64().unwrap())
        .sum();
    assert_eq!(paths + got["other"].as_i64().unwrap(), all);
    assert!(got["links"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l["source"].as_str().unwrap().starts_with("proto=")));

    // CSV from a query endpoint, by parameter and by Accept.
    let (status, ctype, body) = get(
        a,
        &format!("/api/v1/top?{range}&dims=proto&metric=flows&format=csv"),
        "*/*",
    )
    .await;
    assert_eq!((status, ctype.as_str()), (200, "text/csv; charset=utf-8"));
    let udp = recs.iter().filter(|r| r.proto == 17).count();
    assert!(
        body.starts_with("proto,value\r\n") && body.contains(&format!("17,{udp}\r\n")),
        "{body}"
    );
    let (_, ctype, body) = get(a, "/api/v1/exporters", "text/csv").await;
    assert!(
        ctype.starts_with("text/csv") && body.contains("meter-a"),
        "{body}"
    );

    // Bad input: 400 naming the parameter, or the filter token and offset.
    for (path, parameter) in [
        (format!("/api/v1/flows?{range}&limt=5"), "limt"),
        (format!("/api/v1/flows?from={}&to={T0}", T0 + 1), "from"),
        (format!("/api/v1/flows?from={T0}"), "to"),
        ("/api/v1/flows?from=now-400d&to=now".to_string(), "from"),
        (format!("/api/v1/flows?{range}&limit=1000000"), "limit"),
        (format!("/api/v1/flows?{range}&cursor=x"), "cursor"),
        (format!("/api/v1/top?{range}&dims=src_addr,bogus"), "dims"),
        (format!("/api/v1/timeseries?{range}&step=1ms"), "step"),
        (
            format!("/api/v1/timeseries?{range}&step=9223372036s"),
            "step",
        ),
        (format!("/api/v1/flows?{range}&format=xml"), "format"),
    ] {
        let (status, _, body) = get(a, &path, "*/*").await;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (status, v["parameter"].as_str()),
            (400, Some(parameter)),
            "{path}: {body}"
        );
    }
    let (status, _, body) = get(
        a,
        &format!(
            "/api/v1/flows?{range}&filter={}",
            enc("proto = 6 AND sport = 5")
        ),
        "*/*",
    )
    .await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status, 400);
    assert_eq!(
        (v["offset"].as_u64(), v["token"].as_str()),
        (Some(14), Some("sport")),
        "{body}"
    );

    rollups_answer_as_the_raw_rows(a).await;

    // The old routes still answer.
    let (status, _, _) = get(a, "/api/flows", "*/*").await;
    assert_eq!(status, 200);
    server.stop().await;
    web.task.await.unwrap();
}

/// Grouped queries the per-minute rollups can answer give the same answer
/// from them as from the raw rows: from `flows_1m` (every dimension) and,
/// for those that group and filter on one dimension, from `flows_1m_dim`;
/// `auto` picks the narrowest rollup that can answer, and says which.
async fn rollups_answer_as_the_raw_rows(a: SocketAddr) {
    let range = format!("from={T0}&to={}", T0 + SPAN);
    let filter = enc("src_addr = 10.1.0.0/16 AND dst_port IN (80, 443) AND NOT class = \"bulk\"");
    let (wide, one) = ("rollup_1m", "rollup_1m_dim");
    let queries = [
        (
            format!("/api/v1/top?{range}&dims=src_addr&metric=bytes&limit=5"),
            one,
        ),
        (
            format!("/api/v1/top?{range}&dims=dst_prefix,proto&metric=flows&limit=4"),
            wide,
        ),
        (
            format!("/api/v1/top?{range}&dims=class&metric=bps&filter={filter}"),
            wide,
        ),
        (
            format!("/api/v1/top?{range}&dims=exporter&metric=pps&filter=exporter%20%3D%20meter-a"),
            one,
        ),
        (
            format!("/api/v1/top?{range}&dims=class&metric=flows&filter=NOT%20class%20%3D%20bulk"),
            one,
        ),
        (
            format!("/api/v1/timeseries?{range}&step=1m&stack=dst_port&metric=packets&limit=3"),
            one,
        ),
        (
            format!("/api/v1/timeseries?{range}&step=1m&stack=src_prefix&metric=bytes&limit=2"),
            one,
        ),
        (
            format!("/api/v1/timeseries?{range}&step=2m&metric=flows"),
            one,
        ),
        (
            format!("/api/v1/timeseries?{range}&step=1m&stack=class&metric=bytes&limit=10"),
            one,
        ),
        (
            format!("/api/v1/timeseries?{range}&step=2m&metric=flows&filter={filter}"),
            wide,
        ),
        (
            format!("/api/v1/sankey?{range}&dims=src_prefix,dst_port,proto&metric=bytes&limit=8"),
            wide,
        ),
        (
            format!("/api/v1/sankey?{range}&dims=src_prefix,src_addr&metric=packets&limit=8"),
            one,
        ),
    ];
    for (q, narrowest) in &queries {
        let mut raw = json(a, &format!("{q}&source=raw")).await;
        let mut rollup = json(a, &format!("{q}&source=rollup_1m")).await;
        let mut auto = json(a, q).await;
        assert_eq!(
            (
                raw["source"].as_str(),
                rollup["source"].as_str(),
                auto["source"].as_str()
            ),
            (Some("raw"), Some(wide), Some(*narrowest)),
            "{q}"
        );
        let narrow = json(a, &format!("{q}&source=rollup")).await;
        assert_eq!(narrow["source"].as_str(), Some(*narrowest), "{q}");
        for v in [&mut raw, &mut rollup, &mut auto] {
            v.as_object_mut().unwrap().remove("source");
        }
        assert_eq!(raw, rollup, "{q}");
        assert_eq!(raw, auto, "{q}");
        let nonempty = raw.get("rows").or(raw.get("series")).or(raw.get("paths"));
        assert!(
            nonempty
                .and_then(|v| v.as_array())
                .is_some_and(|v| !v.is_empty()),
            "{q}: {raw}"
        );
        if *narrowest == wide {
            let (status, _, body) = get(a, &format!("{q}&source={one}"), "*/*").await;
            assert_eq!(status, 400, "{q}: {body}");
        }
    }
    // What the rollup does not hold is read from the raw rows.
    for q in [
        format!("/api/v1/top?from={}&to={}&dims=proto", T0 + 1, T0 + SPAN),
        format!("/api/v1/top?{range}&dims=src_port"),
        format!("/api/v1/top?{range}&dims=proto&filter=bytes%20%3E%20100"),
        format!("/api/v1/timeseries?{range}&step=90s&stack=proto"),
    ] {
        assert_eq!(json(a, &q).await["source"], "raw", "{q}");
        let (status, _, body) = get(a, &format!("{q}&source=rollup"), "*/*").await;
        assert_eq!(status, 400, "{q}: {body}");
        assert!(body.contains("source"), "{body}");
    }
}

#[tokio::test]
async fn explorer_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    explorer_answers_match_independent_sums(&db_url(&dir)).await;
}

#[tokio::test]
async fn explorer_on_postgres() {
    qosloop_testkit::need!(Postgres::available());
    let pg = tokio::task::spawn_blocking(Postgres::start)
        .await
        .unwrap()
        .unwrap();
    explorer_answers_match_independent_sums(&pg.url()).await;
}

#[tokio::test]
async fn a_query_over_more_records_than_the_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let limits = ConsoleLimits {
        max_scan_rows: 50,
        ..ConsoleLimits::default()
    };
    let (server, web) = serve(&db_url(&dir), limits).await;
    fill(server.store.db(), &records()).await;
    let range = format!("from={T0}&to={}", T0 + SPAN);
    let (status, _, body) = get(
        web.local_addr,
        &format!("/api/v1/top?{range}&dims=proto&source=raw"),
        "*/*",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("configured limit of 50"), "{body}");
    // A narrower selection under the limit is answered.
    let narrow = format!("from={T0}&to={}", T0 + SPAN / 20);
    let (status, _, body) = get(
        web.local_addr,
        &format!("/api/v1/top?{narrow}&dims=proto&source=raw"),
        "*/*",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // The limit counts the rows of the table read: the rollup by protocol
    // holds the whole range in fewer.
    let (status, _, body) = get(
        web.local_addr,
        &format!("/api/v1/top?{range}&dims=proto"),
        "*/*",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("rollup_1m_dim"), "{body}");
    server.stop().await;
    web.task.await.unwrap();
}

/// schemathesis (PyPI, installed by scripts/setup.sh) drives every
/// operation of the OpenAPI document and checks the live responses
/// against it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_responses_conform_to_the_openapi_document() {
    let st = qosloop_testkit::need!(qosloop_testkit::harness::require_binary(
        "schemathesis",
        "python3-pip (then: pip install schemathesis==4.32.5, see scripts/setup.sh)"
    ));
    let dir = tempfile::tempdir().unwrap();
    let (server, web) = serve(&db_url(&dir), ConsoleLimits::default()).await;
    fill(server.store.db(), &records()).await;
    // An enforcer with kernel counters, so that its row's schema is checked.
    store_counters(&server.store).await;
    let url = format!("http://{}/api/v1/openapi.json", web.local_addr);
    let out = tokio::process::Command::new(st)
        .args(["run", &url, "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--max-examples", "25", "--mode", "positive", "--phases", "examples,coverage,fuzzing",
            "--generation-deterministic",
            // A stream that does not end while the server runs: tests/events.rs.
            "--exclude-path", "/api/v1/events", "--exclude-path", "/api/v1/kb/events"])
        .env("NO_COLOR", "1")
        // Its example cache stays in the test's directory.
        .current_dir(dir.path())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    // It ran every operation (and did not, say, fail to load the document).
    assert!(text.contains("Tested: 17"), "{text}");
    eprintln!("{text}");
    server.stop().await;
    web.task.await.unwrap();
}

/// An enforcer `pep-k` whose last accounting report held two decisions.
async fn store_counters(
    store: &qosloop_policy_server::store::Store,
) -> qosloop_schema::AccountingReport {
    use qosloop_schema::{AccountingReport, DecisionCounters, DecisionKind};
    store
        .upsert_enforcer("pep-k", &["edge".into()], "127.0.0.1:40000", "connected")
        .await
        .unwrap();
    let counters = |id, kind, n: u64| DecisionCounters {
        decision_id: id,
        version: 2,
        kind,
        in_profile_packets: n,
        in_profile_bytes: n * 100,
        out_of_profile_packets: n / 2,
        out_of_profile_bytes: n * 50,
    };
    // An earlier report is replaced whole, not added to.
    let class = |id: &str, n: u64| qosloop_schema::ClassCounters {
        classid: id.into(),
        parent: "e5:1".into(),
        bytes: n * 100,
        packets: n,
        drops: n / 10,
        overlimits: n / 5,
        backlog_bytes: n % 7,
    };
    let old = AccountingReport {
        at_ns: 1,
        decisions: vec![counters(9, DecisionKind::Drop, 1)],
        omitted: 0,
        classes: vec![class("e5:9", 1)],
        classes_omitted: 0,
    };
    store.replace_counters("pep-k", &old).await.unwrap();
    let report = AccountingReport {
        at_ns: 1_700_000_000_000_000_000,
        decisions: vec![
            counters(7, DecisionKind::Accept, 40),
            counters(3, DecisionKind::Remark, 10),
        ],
        omitted: 5,
        classes: vec![class("e5:1", 90), class("e5:a", 7)],
        classes_omitted: 2,
    };
    store.replace_counters("pep-k", &report).await.unwrap();
    report
}

#[tokio::test]
async fn enforcers_serve_the_kernel_counters_last_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (server, web) = serve(&db_url(&dir), ConsoleLimits::default()).await;
    let report = store_counters(&server.store).await;
    let (code, _, body) = get(web.local_addr, "/api/v1/enforcers", "application/json").await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let row = &v["rows"][0];
    assert_eq!(row["name"], "pep-k");
    assert_eq!(row["counters_at_ns"], 1_700_000_000_000_000_000u64);
    assert_eq!(row["counters_omitted"], 5);
    assert_eq!(row["counted_decisions"], 2);
    let sum = |f: fn(&qosloop_schema::DecisionCounters) -> u64| {
        report.decisions.iter().map(f).sum::<u64>()
    };
    assert_eq!(row["in_profile_packets"], sum(|d| d.in_profile_packets));
    assert_eq!(row["in_profile_bytes"], sum(|d| d.in_profile_bytes));
    assert_eq!(
        row["out_of_profile_packets"],
        sum(|d| d.out_of_profile_packets)
    );
    assert_eq!(row["out_of_profile_bytes"], sum(|d| d.out_of_profile_bytes));
    let per: Vec<(u64, String, u64)> = row["kernel_counters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["decision_id"].as_u64().unwrap(),
                d["kind"].as_str().unwrap().to_owned(),
                d["in_profile_bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        per,
        [(3, "remark".into(), 1000), (7, "accept".into(), 4000)]
    );
    // The HTB classes of the last report only, every field as sent.
    let classes: Vec<qosloop_schema::ClassCounters> =
        serde_json::from_value(row["htb_classes"].clone()).unwrap();
    assert_eq!(classes, report.classes);
    assert_eq!(row["classes_omitted"], 2);
    // CSV: the sums.
    let (code, ctype, csv) = get(web.local_addr, "/api/v1/enforcers?format=csv", "*/*").await;
    assert_eq!(code, 200);
    assert!(ctype.starts_with("text/csv"), "{ctype}");
    let mut lines = csv.lines();
    let head: Vec<&str> = lines.next().unwrap().split(',').collect();
    let cells: Vec<&str> = lines.next().unwrap().split(',').collect();
    let cell = |name: &str| cells[head.iter().position(|h| *h == name).unwrap()];
    assert_eq!(cell("in_profile_packets"), "50");
    assert_eq!(cell("counted_decisions"), "2");
    server.stop().await;
    web.task.await.unwrap();
}
