//! The console API over a database filled by a real run: the meter reads
//! a generated capture and exports CRANE to the collector, which stores
//! the records (SQLite and PostgreSQL). The API's answers are checked
//! against plain SQL over the same table, written here independently.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::policy_common as common;
use qosloop_testkit::frames as support;

use common::*;
use qosloop_meter::pcap::linktype;
use qosloop_meter::{run_file, PcapWriter, Progress};
use qosloop_policy_server::web::WebConfig;
use qosloop_store::Db;
use qosloop_testbed::harness::Postgres;
use serde_json::Value;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use support::{ethernet, ipv4, ipv6, tcp, udp};

/// Capture start (ns) and how long it lasts.
const T0: u64 = 1_800_000_000_000_000_000;
const SPAN: u64 = 120_000_000_000;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// UDP and TCP flows from 40 IPv4 and 5 IPv6 hosts to a few services,
/// of different sizes, spread over two minutes.
fn write_capture(dir: &Path) -> PathBuf {
    let path = dir.join("traffic.pcap");
    let mut w = PcapWriter::new(
        std::fs::File::create(&path).unwrap(),
        linktype::ETHERNET,
        65535,
    )
    .unwrap();
    let mut packets: Vec<(u64, Vec<u8>)> = Vec::new();
    for h in 0..40u16 {
        let src = ip(&format!("10.{}.{}.{}", 1 + h % 2, h % 5, 1 + h));
        let dport = [53u16, 443, 5001, 8080][(h % 4) as usize];
        let n = 1 + (h as usize * 7) % 13;
        for p in 0..n {
            let at = T0 + (h as u64 * 2_900_000_000) + p as u64 * 10_000_000;
            let l4 = if h % 3 == 0 {
                ipv4(
                    src,
                    ip("192.0.2.10"),
                    6,
                    p as u16,
                    0x4000,
                    &[],
                    &tcp(20000 + h, dport, p as u32, 0, 0x18, 100 + h as usize * 9),
                )
            } else {
                ipv4(
                    src,
                    ip("192.0.2.20"),
                    17,
                    p as u16,
                    0,
                    &[],
                    &udp(20000 + h, dport, 60 + h as usize * 11),
                )
            };
            packets.push((at, ethernet(&[], 0x0800, &l4)));
        }
    }
    for h in 0..5u16 {
        for p in 0..3u64 {
            let at = T0 + 1_000_000_000 + h as u64 * 20_000_000_000 + p * 1_000_000;
            let l3 = ipv6(
                ip(&format!("2001:db8::{}", 1 + h)),
                ip("2001:db8:1::1"),
                17,
                false,
                &udp(5000 + h, 443, 200),
            );
            packets.push((at, ethernet(&[], 0x86dd, &l3)));
        }
    }
    packets.sort_by_key(|(t, _)| *t);
    for (t, f) in &packets {
        w.write_packet(*t, f, f.len() as u32).unwrap();
    }
    path
}

/// Runs the collector (in-process) on `url` and the meter over a capture
/// exporting to it; returns how many records the meter exported.
async fn meter_to_collector(url: &str, dir: &Path) -> usize {
    let config = qosloop_collector::Config {
        listen: "127.0.0.1:0".into(),
        db: url.to_owned(),
        ..qosloop_collector::Config::default()
    };
    let listener = qosloop_collector::bind(&config).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sink = qosloop_collector::open_sink(url).await.unwrap();
    let collector =
        tokio::spawn(async move { qosloop_collector::serve(listener, sink, &config).await });
    let pcap = write_capture(dir);
    let rules = dir.join("fields.toml");
    std::fs::write(
        &rules,
        "[[filter]]\nid = 0\nclass = \"web\"\nip_proto = 6\ndst_port = 443\n",
    )
    .unwrap();
    let meter = qosloop_meter::Config {
        pcap: Some(pcap.clone()),
        field_rules: vec![rules],
        export: vec![format!("crane://{addr}")],
        export_spool: Some(dir.join("spool")),
        ..qosloop_meter::Config::default()
    };
    let summary = tokio::task::spawn_blocking(move || {
        let validated = meter.validate().unwrap();
        let mut sink = meter.open_sinks().unwrap();
        run_file(
            &pcap,
            validated.pipeline,
            Arc::new(validated.classifier),
            &mut *sink,
            Progress::Never,
        )
        .unwrap()
    })
    .await
    .unwrap();
    collector.abort();
    let _ = collector.await;
    summary.stats.records as usize
}

async fn api(addr: SocketAddr, path: &str) -> Value {
    let (status, _, body) = get(addr, path, "*/*").await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Rows of (key, sum) from plain SQL, the same text on both dialects.
async fn sql_pairs(db: &Db, sql: &str) -> Vec<(String, i64)> {
    match db {
        Db::Sqlite(p) => sqlx::query_as(sql).fetch_all(p).await.unwrap(),
        Db::Postgres(p) => sqlx::query_as(sql).fetch_all(p).await.unwrap(),
    }
}

fn pairs(v: &Value) -> Vec<(String, i64)> {
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["keys"][0].as_str().unwrap().to_owned(),
                r["value"].as_i64().unwrap(),
            )
        })
        .collect()
}

async fn answers_match_plain_sql(url: &str, dir: &Path) {
    let exported = meter_to_collector(url, dir).await;
    assert!(exported >= 45, "{exported} records");
    let (server, policy_tx) = start(
        url,
        any_loopback_port(),
        qosloop_policy_server::testing::paper_policy(),
        100,
    )
    .await;
    let web = qosloop_policy_server::web::serve(
        any_loopback_port(),
        &server,
        policy_tx.subscribe(),
        WebConfig::default(),
    )
    .await
    .unwrap();
    let db = server.store.db();
    let a = web.local_addr;
    let (from, to) = (T0 - 1_000_000_000, T0 + SPAN + 10_000_000_000);
    let range = format!("from={from}&to={to}");
    let in_range = format!("end_ns >= {from} AND end_ns < {to}");

    let stored: Vec<(String, i64)> = sql_pairs(
        db,
        &format!("SELECT 'all', CAST(COUNT(*) AS BIGINT) FROM flows WHERE {in_range}"),
    )
    .await;
    assert_eq!(
        stored[0].1 as usize, exported,
        "every exported record is stored"
    );

    // Top 3 destination ports by bytes of UDP, the rest as Other.
    let want = sql_pairs(db, &format!(
        "SELECT CAST(dst_port AS TEXT), CAST(SUM(bytes) AS BIGINT) FROM flows WHERE {in_range} AND proto = 17 \
         GROUP BY dst_port ORDER BY 2 DESC, 1 LIMIT 3")).await;
    let all_udp = sql_pairs(
        db,
        &format!(
            "SELECT 'x', CAST(SUM(bytes) AS BIGINT) FROM flows WHERE {in_range} AND proto = 17"
        ),
    )
    .await[0]
        .1;
    let got = api(
        a,
        &format!("/api/v1/top?{range}&dims=dst_port&metric=bytes&limit=3&filter=proto%20%3D%20udp"),
    )
    .await;
    assert_eq!(pairs(&got), want);
    assert_eq!(got["total"].as_i64(), Some(all_udp));
    assert_eq!(
        got["other"].as_i64(),
        Some(all_udp - want.iter().map(|x| x.1).sum::<i64>())
    );

    // Talkers in 10.2.0.0/16 by packets: an IPv4 prefix filter.
    let want = sql_pairs(
        db,
        &format!(
        "SELECT CAST(src_addr AS TEXT), CAST(SUM(packets) AS BIGINT) FROM flows WHERE {in_range} \
         AND CAST(src_addr AS TEXT) LIKE '10.2.%' GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 100"),
    )
    .await;
    let want: Vec<(String, i64)> = want
        .into_iter()
        .map(|(k, v)| (k.trim_end_matches("/32").to_owned(), v))
        .collect();
    let got = api(a, &format!("/api/v1/top?{range}&dims=src_addr&metric=packets&limit=100&filter=src_addr%20%3D%2010.2.0.0%2F16")).await;
    assert_eq!(pairs(&got), want);
    assert!(!want.is_empty());

    // The class the meter's rules gave: flows of class web.
    let want = sql_pairs(
        db,
        &format!(
            "SELECT 'web', CAST(COUNT(*) AS BIGINT) FROM flows WHERE {in_range} AND class = 'web'"
        ),
    )
    .await;
    assert!(want[0].1 > 0, "the meter classified some flows as web");
    let got = api(
        a,
        &format!("/api/v1/top?{range}&dims=class&metric=flows&filter=class%20%3D%20web"),
    )
    .await;
    assert_eq!(pairs(&got), want);

    // The flow list, all pages, equals the table's rows in (end_ns, id) order.
    let want = sql_pairs(db, &format!(
        "SELECT CAST(dst_port AS TEXT), CAST(bytes AS BIGINT) FROM flows WHERE {in_range} ORDER BY end_ns, id")).await;
    let mut got = Vec::new();
    let mut cursor = String::new();
    for _ in 0..50 {
        let page = api(
            a,
            &format!("/api/v1/flows?{range}&sort=end_ns&limit=9{cursor}"),
        )
        .await;
        for r in page["rows"].as_array().unwrap() {
            got.push((r["dst_port"].to_string(), r["bytes"].as_i64().unwrap()));
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(got, want);

    // A 10 s time series of bits per second, stacked by protocol.
    let want = sql_pairs(
        db,
        &format!(
        "SELECT CAST(proto AS TEXT) || '@' || CAST((end_ns / 10000000000) * 10000000000 AS TEXT), \
         CAST(SUM(bytes) AS BIGINT) FROM flows WHERE {in_range} GROUP BY 1 ORDER BY 1"),
    )
    .await;
    let got = api(
        a,
        &format!("/api/v1/timeseries?{range}&step=10s&stack=proto&metric=bps"),
    )
    .await;
    let start = got["start_ns"].as_i64().unwrap();
    let mut seen = Vec::new();
    for s in got["series"].as_array().unwrap() {
        for (i, v) in s["values"].as_array().unwrap().iter().enumerate() {
            let bps = v.as_f64().unwrap();
            if bps > 0.0 {
                let t = start + i as i64 * 10_000_000_000;
                seen.push((
                    format!("{}@{t}", s["key"].as_str().unwrap()),
                    (bps * 10.0 / 8.0).round() as i64,
                ));
            }
        }
    }
    seen.sort();
    assert_eq!(seen, want);

    // The exporter the collector registered, with its session.
    let ex = api(a, "/api/v1/exporters").await;
    assert_eq!(ex["rows"].as_array().unwrap().len(), 1, "{ex}");
    assert_eq!(
        ex["rows"][0]["session_records"].as_i64(),
        Some(exported as i64),
        "{ex}"
    );

    server.stop().await;
    web.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meter_to_collector_then_api_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("q.db").display());
    answers_match_plain_sql(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meter_to_collector_then_api_on_postgres() {
    qosloop_testbed::need!(Postgres::available());
    let pg = tokio::task::spawn_blocking(Postgres::start)
        .await
        .unwrap()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    answers_match_plain_sql(&pg.url(), dir.path()).await;
}
