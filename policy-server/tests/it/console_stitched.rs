//! `GET /api/v1/stitched`: the cluster's `stitch` output served read-only,
//! JSON and CSV, with the console's time range, limit and bad-parameter
//! conventions, on SQLite (the rows written by the analysis' store step).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;
use qosloop_policy_server::web::{WebConfig, WebHandle};
use qosloop_schema::FlowRecord;
use qosloop_store::Batch;
use serde_json::Value;

const SEC: u64 = 1_000_000_000;
const T0: u64 = 1_800_000_000 * SEC;

fn part(fwd: bool, packets: u64, start: u64) -> FlowRecord {
    let (a, b) = ("10.0.0.1".parse().unwrap(), "192.0.2.9".parse().unwrap());
    let (src, dst, sp, dp) = if fwd {
        (a, b, 4000, 443)
    } else {
        (b, a, 443, 4000)
    };
    FlowRecord {
        src_addr: src,
        dst_addr: dst,
        src_port: sp,
        dst_port: dp,
        proto: 6,
        packets,
        bytes: packets * 1000,
        start_ns: start,
        end_ns: start + SEC / 10,
        ..FlowRecord::default()
    }
}

async fn serve(url: &str) -> (qosloop_policy_server::ServerHandle, WebHandle) {
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
    (server, web)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stitched_flows_answer_json_and_csv_with_the_console_conventions() {
    let dir = tempfile::tempdir().unwrap();
    let (server, web) = serve(&db_url(&dir)).await;
    let db = server.store.db();
    let ex = db.register_exporter("cap", "127.0.0.1", 1).await.unwrap();
    // Two capture nodes' parts of a -> b, one of b -> a; a UDP flow later.
    let mut udp = part(true, 1, T0 + 5 * SEC);
    udp.proto = 17;
    let batch = Batch {
        exporter_id: ex,
        session_id: 1,
        seq: 1,
        records: vec![
            part(true, 2, T0),
            part(true, 3, T0 + 1000),
            part(false, 4, T0 + 2000),
            udp,
        ],
        dedup: false,
    };
    db.commit_batches_routed(&[&batch], Some(8), None, None, 1)
        .await
        .unwrap();
    stitch_all(db, 8).await;
    let a = web.local_addr;
    let range = format!("from={T0}&to={}", T0 + 10 * SEC);

    let (status, ctype, body) = get(a, &format!("/api/v1/stitched?{range}"), "*/*").await;
    assert_eq!(status, 200, "{body}");
    assert!(ctype.starts_with("application/json"), "{ctype}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{body}");
    // Most recently seen first: the UDP flow, then the stitched TCP flow.
    let tcp = &rows[1];
    assert_eq!(
        (
            tcp["a_addr"].as_str(),
            tcp["a_port"].as_i64(),
            tcp["b_port"].as_i64()
        ),
        (Some("10.0.0.1"), Some(4000), Some(443))
    );
    assert_eq!(
        (tcp["packets_ab"].as_i64(), tcp["parts_ab"].as_i64()),
        (Some(5), Some(2))
    );
    assert_eq!(
        (tcp["bytes_ba"].as_i64(), tcp["parts_ba"].as_i64()),
        (Some(4000), Some(1))
    );
    assert_eq!(rows[0]["proto"].as_i64(), Some(17));

    // Narrowed by protocol (number or name), by address, by the range, a page.
    for (q, n) in [
        ("&proto=tcp", 1),
        ("&proto=17", 1),
        ("&addr=192.0.2.9", 2),
        ("&addr=192.0.2.10", 0),
        ("&limit=1", 1),
    ] {
        let (s, _, body) = get(a, &format!("/api/v1/stitched?{range}{q}"), "*/*").await;
        assert_eq!(s, 200, "{q}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["rows"].as_array().unwrap().len(), n, "{q}: {body}");
    }
    let later = format!("from={}&to={}", T0 + 2 * SEC, T0 + 10 * SEC);
    let (_, _, body) = get(a, &format!("/api/v1/stitched?{later}"), "*/*").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["rows"].as_array().unwrap().len(), 1, "{body}");

    // CSV: a header of the columns, one line per row.
    let (s, ctype, csv) = get(a, &format!("/api/v1/stitched?{range}&format=csv"), "*/*").await;
    assert_eq!(s, 200);
    assert!(ctype.starts_with("text/csv"), "{ctype}");
    let lines: Vec<&str> = csv.trim_end().split("\r\n").collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(
        lines[0].starts_with("cluster,slot,interval_ns,a_addr"),
        "{csv}"
    );

    // Bad parameters are refused, named.
    for (q, param) in [
        ("from=now", "to"),
        (&format!("{range}&addr=nope") as &str, "addr"),
        (&format!("{range}&proto=999"), "proto"),
        (&format!("{range}&limit=0"), "limit"),
        (&format!("{range}&filter=proto%20tcp"), "filter"),
    ] {
        let (s, _, body) = get(a, &format!("/api/v1/stitched?{q}"), "*/*").await;
        assert_eq!(s, 400, "{q}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["parameter"].as_str(), Some(param), "{q}: {body}");
    }
    server.stop().await;
    web.task.await.unwrap();
}
