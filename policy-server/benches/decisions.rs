//! `cargo bench -p qosloop-policy-server --bench decisions`
//!
//! 1. Decision engine throughput: evaluations of 10k and 100k policed flows,
//!    when every decision changes (the load crosses a threshold) and when
//!    none does (steady state), in decisions per second.
//! 2. Bandwidth manager: flow records attributed per second with 100k rules.
//! 3. Reaction: from the commit of flow records that push a link over a
//!    threshold in SQL (SQLite) to the DEC arriving at an enforcer over TCP,
//!    for poll intervals of 100 ms and 1 s (goal: < 50 ms + the interval).
//!    EWMA weight 1 and rate lag 0 here (the records are written to SQL as
//!    they happen, with a 1 ms span, so there is no export delay to wait
//!    for), so that the figure is the pipeline's, not the smoothing's (with
//!    weight w a step needs more intervals to cross) nor the lag's
//!    (`rate_lag_ms`, default 1.2 s, which waits for the meters' interim
//!    exports and adds to the figure one for one).
//!
//! Environment: BENCH_REACTION_ROUNDS (default 20).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures_util::{SinkExt, StreamExt};
use qosloop_policy_server::bandwidth::{BandwidthManager, Rates, SubjectRate};
use qosloop_policy_server::server::{LoopConfig, Server};
use qosloop_policy_server::testing::{many_flows_policy, paper_policy};
use qosloop_policy_server::{Engine, PdpConfig};
use qosloop_schema::cops::payload::QosloopDecision;
use qosloop_schema::cops::{Body, CopsCodec, DecOutcome, Handle, Message, PepHello, PepState};
use qosloop_schema::{DecisionKind, FlowRecord, PolicySet};
use qosloop_store::Db;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

fn rates_for(policy: &PolicySet, load: f64) -> Rates {
    Rates {
        at_ns: 0,
        interval_ns: 1_000_000_000,
        flows: policy
            .rules
            .iter()
            .map(|r| SubjectRate {
                key: r.dn.clone(),
                name: r.name.clone(),
                rate_kbps: 1500.0,
                avg_rate_kbps: 1500.0,
                records: 1,
            })
            .collect(),
        links: policy
            .links
            .iter()
            .map(|l| SubjectRate {
                key: l.name.clone(),
                name: l.name.clone(),
                rate_kbps: load,
                avg_rate_kbps: load,
                records: 1,
            })
            .collect(),
        users: Vec::new(),
    }
}

fn engine_throughput(n: usize) {
    let policy = many_flows_policy(n, 4);
    let loads = [1000.0, 4500.0, 7500.0];
    let rates: Vec<Rates> = loads.iter().map(|&l| rates_for(&policy, l)).collect();
    let mut engine = Engine::new(0.05);
    engine.evaluate(&policy, &rates[0], 1);
    let rounds = if n >= 100_000 { 6 } else { 30 };
    let start = Instant::now();
    let mut changed = 0;
    for i in 0..rounds {
        changed += engine
            .evaluate(&policy, &rates[(i + 1) % 3], i as u64)
            .installed
            .len();
        // The PDP's view is rebuilt on every change.
        std::hint::black_box(engine.table());
    }
    let t = start.elapsed().as_secs_f64();
    assert_eq!(changed, rounds * n);
    println!(
        "engine, {n:>6} flows, every decision changes (+ table rebuild): {:>10.0} decisions/s ({:.1} ms per evaluation)",
        (rounds * n) as f64 / t,
        t * 1e3 / rounds as f64
    );
    let steady = rates_for(&policy, 7400.0);
    engine.evaluate(&policy, &steady, 0);
    let start = Instant::now();
    for i in 0..rounds {
        assert!(engine.evaluate(&policy, &steady, i as u64).is_empty());
    }
    let t = start.elapsed().as_secs_f64();
    println!(
        "engine, {n:>6} flows, steady state (no change):             {:>10.0} decisions/s ({:.1} ms per evaluation)",
        (rounds * n) as f64 / t,
        t * 1e3 / rounds as f64
    );
}

fn bandwidth_throughput() {
    let n = 100_000;
    let policy = many_flows_policy(n, 4);
    let records: Vec<FlowRecord> = (0..1_000_000usize)
        .map(|i| {
            let f = i % (2 * n); // half match a rule, half do not
            FlowRecord {
                src_addr: format!(
                    "10.{}.{}.{}",
                    64 + (f >> 16) % 64,
                    (f >> 8) & 0xff,
                    f & 0xff
                )
                .parse()
                .unwrap(),
                dst_addr: "10.71.2.2".parse().unwrap(),
                src_port: 6055,
                dst_port: 4055,
                proto: 17,
                bytes: 1000,
                ..FlowRecord::default()
            }
        })
        .collect();
    let mut bm = BandwidthManager::new(&policy, 0.5);
    let start = Instant::now();
    for r in &records {
        bm.add(r);
    }
    let rates = bm.close_interval(1, 1_000_000_000);
    let t = start.elapsed().as_secs_f64();
    std::hint::black_box(rates);
    println!(
        "bandwidth manager, {n} rules + 1 link: {:.2} M records/s attributed",
        records.len() as f64 / t / 1e6
    );
}

async fn insert_burst(db: &Db, kbps_over_interval: u64, interval: Duration, seq: &mut i64) {
    let bytes = kbps_over_interval * 1000 / 8 * interval.as_millis() as u64 / 1000;
    let now = qosloop_store::now_ns() as u64;
    *seq += 1;
    let record = FlowRecord {
        src_addr: [10, 71, 1, 3].into(),
        dst_addr: [10, 71, 2, 2].into(),
        src_port: 6055,
        dst_port: 5001,
        proto: 17,
        packets: bytes / 256,
        bytes,
        // A 1 ms span: all of it in the window the next poll closes.
        start_ns: now - 1_000_000,
        end_ns: now,
        ..FlowRecord::default()
    };
    let batch = qosloop_store::Batch {
        exporter_id: 1,
        session_id: 1,
        seq: u32::try_from(*seq).unwrap_or(u32::MAX),
        records: vec![record],
        dedup: false,
    };
    db.commit_batches(&[&batch]).await.unwrap();
}

async fn next_kind(wire: &mut Framed<TcpStream, CopsCodec>) -> DecisionKind {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), wire.next())
            .await
            .expect("a DEC within 10 s")
            .unwrap()
            .unwrap();
        if let Body::Dec {
            outcome: DecOutcome::Decisions(entries),
            ..
        } = &m.body
        {
            for e in entries {
                if let QosloopDecision::Install(d) = e.qosloop().unwrap() {
                    return d.kind();
                }
            }
        }
    }
}

async fn reaction(interval_ms: u64, rounds: usize) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("q.db").display());
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(paper_policy()));
    let interval = Duration::from_millis(interval_ms);
    let server = Server::start(
        &url,
        "127.0.0.1:0".parse().unwrap(),
        PdpConfig::default(),
        LoopConfig {
            rates_from: qosloop_policy_server::server::RatesFrom::Records,
            interval,
            ewma_weight: 1.0,
            hysteresis: 0.05,
            min_hold: Duration::ZERO,
            confirm: Duration::ZERO,
            gap_hold: Duration::ZERO,
            // Records are written as they happen: no export delay to wait for.
            rate_lag: Duration::ZERO,
            gap_timeout: Duration::from_secs(2),
        },
        rx,
    )
    .await
    .unwrap();
    let db = server.store.db().clone();
    let mut wire = Framed::new(
        TcpStream::connect(server.pdp_addr).await.unwrap(),
        CopsCodec::default(),
    );
    let hello = PepHello {
        roles: vec!["edge".into()],
        ..PepHello::default()
    };
    wire.send(Message::opn("bench", &hello)).await.unwrap();
    wire.send(Message::req(Handle::from_u32(1), &PepState::default()))
        .await
        .unwrap();
    assert_eq!(next_kind(&mut wire).await, DecisionKind::Accept);
    let mut seq = 0;
    let mut samples = Vec::new();
    for _ in 0..rounds {
        // Land at a random phase of the poll interval.
        tokio::time::sleep(Duration::from_millis(fastrand_ms(interval_ms))).await;
        insert_burst(&db, 9000, interval, &mut seq).await;
        let committed = Instant::now();
        // The first change away from accept: drop, or remark when a
        // 20 ms time bucket straddles two windows and splits the burst.
        assert_ne!(next_kind(&mut wire).await, DecisionKind::Accept);
        samples.push(committed.elapsed());
        // No records next intervals: back to accept.
        while next_kind(&mut wire).await != DecisionKind::Accept {}
    }
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let median = samples[samples.len() / 2];
    let max = samples[samples.len() - 1];
    println!(
        "reaction, poll {interval_ms} ms, {rounds} rounds: median {:.1} ms, max {:.1} ms; max − interval = {:.1} ms (goal < 50 ms)",
        ms(median),
        ms(max),
        ms(max) - interval_ms as f64
    );
    server.stop().await;
}

/// A pseudo-random delay in [0, bound) ms without a dependency.
fn fastrand_ms(bound: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    u64::from(nanos) % bound.max(1)
}

fn main() {
    // `cargo test --benches` runs this with --bench absent: keep it quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    engine_throughput(10_000);
    if !quick {
        engine_throughput(100_000);
        bandwidth_throughput();
    }
    let rounds = std::env::var("BENCH_REACTION_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 2 } else { 20 });
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(reaction(100, rounds));
    if !quick {
        rt.block_on(reaction(1000, rounds.min(6)));
    }
}
