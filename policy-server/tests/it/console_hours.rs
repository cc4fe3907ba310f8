//! The hourly level of the rollups by one dimension (`flows_1h_dim`,
//! migration 0011) and the stacked series that ranks on it and reads only
//! its top values' minutes: over records spread across five hours and a
//! range that starts and ends inside hours, every answer equals the raw
//! rows' (`source=raw`), `flows_1m`'s and `flows_1m_dim`'s — on SQLite and
//! PostgreSQL, also after the migrations' backfills (rows keyed `b=…`) with
//! more records written after them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_policy_server::console::events::EventBus;
use qosloop_policy_server::console::{router, Console, ConsoleLimits};
use qosloop_policy_server::DecisionTable;
use qosloop_schema::sql::migrations;
use qosloop_schema::{FlowRecord, PolicySet};
use qosloop_store::{on_pool, Batch, Db, HOUR_NS, MINUTE_NS};
use qosloop_testkit::harness::Postgres;
use qosloop_testkit::http::Request;
use serde_json::Value;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tokio::sync::watch;

/// An hour boundary.
const T0: i64 = 1_800_000_000_000_000_000;

/// Records over five hours from `T0`: skewed sources (some IPv6), a few
/// classes (some none), sampled and not.
fn records(seed: u64, n: u64) -> Vec<FlowRecord> {
    let mut state = 0x2545_f491_4f6c_dd1d ^ seed;
    let mut next = move |m: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % m
    };
    (0..n)
        .map(|_| {
            let spread = next(30) + 1;
            let host = next(spread);
            let end = T0 as u64 + next(5 * HOUR_NS as u64);
            FlowRecord {
                src_addr: if host % 7 == 6 {
                    format!("2001:db8::{:x}", host + 1).parse().unwrap()
                } else {
                    IpAddr::from([10, (host % 3) as u8, 0, host as u8 + 1])
                },
                dst_addr: IpAddr::from([192, 0, 2, 1 + next(4) as u8]),
                src_port: 1024 + next(100) as u16,
                dst_port: [53, 80, 443][next(3) as usize],
                proto: if next(3) == 0 { 17 } else { 6 },
                packets: 1 + next(50),
                bytes: 64 + next(50_000),
                start_ns: end - 1000,
                end_ns: end,
                class: [None, Some("voice"), Some("bulk"), Some("web")][next(4) as usize]
                    .map(str::to_owned),
                sampling_interval: (next(4) == 0).then(|| 1 + next(8) as u32),
                ..FlowRecord::default()
            }
        })
        .collect()
}

async fn write(db: &Db, exporter_id: i64, seq: u32, records: Vec<FlowRecord>) {
    let batch = Batch {
        exporter_id,
        session_id: 1,
        seq,
        records,
        dedup: false,
    };
    db.commit_batches(&[&batch]).await.unwrap();
}

async fn serve(db: &Db) -> SocketAddr {
    let (dtx, decisions) = watch::channel(Arc::new(DecisionTable::default()));
    let (ptx, policy) = watch::channel(Arc::new(PolicySet::default()));
    std::mem::forget((dtx, ptx));
    let app = router(Console {
        db: db.clone(),
        decisions,
        policy,
        policy_status: None,
        limits: ConsoleLimits::default(),
        events: EventBus::new(4, 4),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

async fn json(addr: SocketAddr, path: &str) -> Value {
    let answer = Request::get(path)
        .timeout(std::time::Duration::from_secs(60))
        .send_async(addr)
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{path}: {answer:?}");
    serde_json::from_slice(&answer.body).unwrap()
}

/// Every query, from every source that can answer it, gives the raw
/// rows' answer; `auto` reads the hours.
async fn all_sources_agree(a: SocketAddr) {
    // 0:17 to 4:43 past T0: three whole hours, minutes at both edges.
    let (from, to) = (T0 + 17 * MINUTE_NS, T0 + 4 * HOUR_NS + 43 * MINUTE_NS);
    let range = format!("from={from}&to={to}");
    let queries = [
        format!("/api/v1/timeseries?{range}&step=1m&stack=src_addr&metric=bytes&limit=5"),
        format!("/api/v1/timeseries?{range}&step=1m&stack=class&metric=packets&limit=2"),
        format!("/api/v1/timeseries?{range}&step=5m&stack=dst_port&metric=flows&limit=10"),
        format!("/api/v1/timeseries?{range}&step=1m&stack=src_prefix&metric=bytes&limit=3"),
        format!("/api/v1/timeseries?{range}&step=1h&stack=src_addr&metric=bytes&limit=4"),
        format!("/api/v1/timeseries?{range}&step=2m&metric=flows"),
        format!("/api/v1/timeseries?{range}&step=1m&stack=proto&metric=bytes&limit=1&filter=proto%20%3D%2017"),
        format!("/api/v1/top?{range}&dims=src_addr&metric=bytes&limit=7"),
        format!("/api/v1/top?{range}&dims=class&metric=flows"),
        format!("/api/v1/sankey?{range}&dims=src_prefix,src_addr&metric=packets&limit=6"),
    ];
    let mut keyed_other = false;
    for q in &queries {
        let mut raw = json(a, &format!("{q}&source=raw")).await;
        let mut answers = Vec::new();
        for (source, says) in [
            ("auto", "rollup_1h_dim"),
            ("rollup", "rollup_1h_dim"),
            ("rollup_1h_dim", "rollup_1h_dim"),
            ("rollup_1m_dim", "rollup_1m_dim"),
            ("rollup_1m", "rollup_1m"),
        ] {
            let mut v = json(a, &format!("{q}&source={source}")).await;
            assert_eq!(v["source"], says, "{q} source={source}");
            v.as_object_mut().unwrap().remove("source");
            answers.push((source, v));
        }
        assert_eq!(raw["source"], "raw");
        raw.as_object_mut().unwrap().remove("source");
        for (source, v) in answers {
            assert_eq!(v, raw, "{q} source={source}");
        }
        let parts = raw.get("series").or(raw.get("rows")).or(raw.get("paths"));
        let parts = parts.and_then(Value::as_array).unwrap();
        assert!(!parts.is_empty(), "{q}: {raw}");
        keyed_other |= q.contains("stack=src_addr") && parts.iter().any(|s| s["other"] == true);
    }
    assert!(keyed_other, "no stacked series had an Other");
    // A range with no whole hour reads the minutes.
    let short = format!(
        "/api/v1/timeseries?from={}&to={}&step=1m&stack=src_addr",
        T0 + 5 * MINUTE_NS,
        T0 + 50 * MINUTE_NS
    );
    assert_eq!(json(a, &short).await["source"], "rollup_1m_dim");
}

async fn hours_answer_as_the_raw_rows(url: &str) {
    let db = Db::connect(url).await.unwrap();
    db.migrate().await.unwrap();
    let exporter = db
        .register_exporter("meter-a", "127.0.0.1:1", 1)
        .await
        .unwrap();
    db.open_session(exporter, 1, "big").await.unwrap();
    for seq in 0..3 {
        write(&db, exporter, seq, records(u64::from(seq), 1500)).await;
    }
    let a = serve(&db).await;
    all_sources_agree(a).await;

    // The backfills of migrations 0007 and 0011 (keys `b=…`), then more
    // records written beside them (keys `=…`): a value has both keys.
    for (table, name) in [
        ("flows_1m_dim", "flow_rollups_by_dim"),
        ("flows_1h_dim", "flow_rollups_by_hour"),
    ] {
        let q = format!("DELETE FROM {table}");
        on_pool!(&db, p, D => sqlx::query::<D>(&q).execute(p).await.map(|_| ())).unwrap();
        let m = migrations(db.dialect())
            .iter()
            .find(|m| m.name == name)
            .unwrap();
        on_pool!(&db, p, D => sqlx::raw_sql(m.sql).execute(p).await.map(|_| ())).unwrap();
    }
    write(&db, exporter, 10, records(10, 1000)).await;
    all_sources_agree(a).await;
    db.close().await;
}

#[tokio::test]
async fn hours_answer_as_the_raw_rows_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    hours_answer_as_the_raw_rows(&format!("sqlite://{}", dir.path().join("h.db").display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hours_answer_as_the_raw_rows_on_postgres() {
    qosloop_testkit::need!(Postgres::available());
    let pg = tokio::task::spawn_blocking(Postgres::start)
        .await
        .unwrap()
        .unwrap();
    hours_answer_as_the_raw_rows(&pg.url()).await;
}
