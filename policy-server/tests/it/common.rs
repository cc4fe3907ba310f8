//! A fake enforcer (PEP) speaking COPS over real TCP, and helpers to run a
//! server and write synthetic flow records.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::large_enum_variant
)]

use futures_util::{SinkExt, StreamExt};
use qosloop_policy_server::server::{LoopConfig, Server, ServerHandle};
use qosloop_policy_server::testing::paper_policy;
use qosloop_policy_server::PdpConfig;
use qosloop_schema::cops::payload::QosloopDecision;
use qosloop_schema::cops::{
    Body, CopsCodec, DecOutcome, Handle, InstalledDecision, Message, PepHello, PepState,
};
use qosloop_schema::{Decision, EnforcementReport, PolicySet, ReportOutcome};
use qosloop_store::Db;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_util::codec::Framed;

pub const WAIT: Duration = Duration::from_secs(10);

pub struct FakePep {
    pub wire: Framed<TcpStream, CopsCodec>,
    pub handle: Handle,
}

/// What a DEC said, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Got {
    Install(Decision),
    Remove(u64),
    Nothing,
}

pub fn decode_dec(m: &Message) -> Vec<Got> {
    let Body::Dec {
        outcome: DecOutcome::Decisions(entries),
        ..
    } = &m.body
    else {
        panic!("expected a DEC with decisions, got {m:?}");
    };
    entries
        .iter()
        .map(|e| match e.qosloop().unwrap() {
            QosloopDecision::Install(d) => Got::Install(*d),
            QosloopDecision::Remove(r) => Got::Remove(r.id),
            QosloopDecision::Nothing => Got::Nothing,
        })
        .collect()
}

impl FakePep {
    /// Connects, opens, synchronises with `installed` and returns the
    /// decisions of the solicited DEC(s).
    pub async fn connect(
        addr: SocketAddr,
        name: &str,
        roles: &[&str],
        installed: &[(u64, u64)],
    ) -> (FakePep, Vec<Got>) {
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut wire = Framed::new(stream, CopsCodec::default());
        let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
        let hello = PepHello {
            roles: roles.clone(),
            interface: None,
            direction: None,
            software: "fake-pep".into(),
        };
        wire.send(Message::opn(name, &hello)).await.unwrap();
        let mut pep = FakePep {
            wire,
            handle: Handle::from_u32(7),
        };
        let cat = pep.next().await;
        assert!(matches!(cat.body, Body::Cat { .. }), "{cat:?}");
        let ssq = pep.next().await;
        assert!(matches!(ssq.body, Body::Ssq { .. }), "{ssq:?}");
        let state = PepState {
            roles,
            installed: installed
                .iter()
                .map(|&(id, version)| InstalledDecision { id, version })
                .collect(),
        };
        pep.wire
            .send(Message::req(pep.handle.clone(), &state))
            .await
            .unwrap();
        pep.wire.send(Message::ssc()).await.unwrap();
        let mut got = Vec::new();
        loop {
            let dec = pep.next().await;
            assert!(dec.solicited, "the answer to REQ is solicited: {dec:?}");
            got.extend(decode_dec(&dec));
            // Solicited DECs come back to back; stop when no more is queued.
            if !pep.solicited_follows().await {
                break;
            }
        }
        (pep, got)
    }

    async fn solicited_follows(&mut self) -> bool {
        match tokio::time::timeout(Duration::from_millis(100), self.wire.next()).await {
            Ok(Some(Ok(m))) if m.solicited && matches!(m.body, Body::Dec { .. }) => {
                panic!("unexpected split solicited DEC in this test: {m:?}")
            }
            Ok(Some(Ok(m))) => panic!("unexpected message after the solicited DEC: {m:?}"),
            _ => false,
        }
    }

    pub async fn next(&mut self) -> Message {
        tokio::time::timeout(WAIT, self.wire.next())
            .await
            .expect("a message within the wait")
            .expect("connection open")
            .expect("a well-formed message")
    }

    /// The next DEC, answering KAs on the way.
    pub async fn next_dec(&mut self) -> Vec<Got> {
        loop {
            let m = self.next().await;
            if matches!(m.body, Body::Dec { .. }) {
                return decode_dec(&m);
            }
        }
    }

    pub async fn report(&mut self, d: &Decision) {
        let r = EnforcementReport {
            decision_id: d.id,
            version: d.version,
            outcome: ReportOutcome::Installed,
            reconfig_ns: 6_000,
            at_ns: 1,
        };
        self.wire
            .send(Message::rpt(self.handle.clone(), &r))
            .await
            .unwrap();
    }
}

pub fn loop_config(interval_ms: u64) -> LoopConfig {
    LoopConfig {
        rates_from: qosloop_policy_server::server::RatesFrom::Records,
        interval: Duration::from_millis(interval_ms),
        ewma_weight: 0.5,
        hysteresis: 0.05,
        min_hold: Duration::ZERO,
        confirm: Duration::ZERO,
        gap_hold: Duration::ZERO,
        rate_lag: Duration::from_millis(300),
        gap_timeout: Duration::from_secs(2),
    }
}

/// Port 0 on 127.0.0.1: the server under test picks a free port.
pub fn any_loopback_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// The SQLite database of a test, in its temporary directory.
pub fn db_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}", dir.path().join("q.db").display())
}

/// A server with short PDP timers (KA 30 s, OPN within 300 ms).
pub async fn start(
    db_url: &str,
    listen: SocketAddr,
    policy: PolicySet,
    interval_ms: u64,
) -> (ServerHandle, watch::Sender<Arc<PolicySet>>) {
    let pdp = PdpConfig {
        ka_timer_secs: 30,
        open_timeout: Duration::from_millis(300),
        ..PdpConfig::default()
    };
    start_with_pdp(db_url, listen, policy, pdp, interval_ms).await
}

/// A server whose PDP is configured by `pdp`.
pub async fn start_with_pdp(
    db_url: &str,
    listen: SocketAddr,
    policy: PolicySet,
    pdp: PdpConfig,
    interval_ms: u64,
) -> (ServerHandle, watch::Sender<Arc<PolicySet>>) {
    let (tx, rx) = watch::channel(Arc::new(policy));
    let h = Server::start(db_url, listen, pdp, loop_config(interval_ms), rx)
        .await
        .unwrap();
    (h, tx)
}

/// The usual server of a test: the paper's policy, SQLite in `dir`, the
/// PDP on a free loopback port, a 100 ms loop.
pub async fn start_paper(dir: &tempfile::TempDir) -> (ServerHandle, watch::Sender<Arc<PolicySet>>) {
    start(&db_url(dir), any_loopback_port(), paper_policy(), 100).await
}

/// A TCP connection to `addr` from the loopback address `source`
/// ("127.0.0.2"): a peer of its own for the per-address limits.
pub async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Inserts one flow record as a collector would.
pub async fn insert_flow(db: &Db, src: &str, dst: &str, dport: u16, bytes: u64, seq: i64) {
    let now = qosloop_store::now_ns() as u64;
    let record = qosloop_schema::FlowRecord {
        src_addr: src.parse().unwrap(),
        dst_addr: dst.parse().unwrap(),
        src_port: 6055,
        dst_port: dport,
        proto: 17,
        packets: (bytes / 256).max(1),
        bytes,
        start_ns: now - 100_000_000,
        end_ns: now,
        ..Default::default()
    };
    // Stored the way the collector stores it.
    let batch = qosloop_store::Batch {
        exporter_id: 1,
        session_id: 1,
        seq: u32::try_from(seq).unwrap(),
        records: vec![record],
        dedup: false,
    };
    db.commit_batches(&[&batch]).await.unwrap();
}

/// GET `path`: status code, content type, body.
pub async fn get(addr: SocketAddr, path: &str, accept: &str) -> (u16, String, String) {
    let answer = qosloop_testkit::http::Request::get(path)
        .header("Accept", accept)
        .timeout(WAIT)
        .send_async(addr)
        .await
        .unwrap();
    let ctype = answer.header("content-type").unwrap_or("").to_owned();
    (answer.status, ctype, answer.text().into_owned())
}

/// Runs the `stitch` analysis (standalone, no fence) over every bucket of
/// `buckets` until each cursor reached the newest flow.
pub async fn stitch_all(db: &Db, buckets: u32) {
    let mut horizon = qosloop_store::Horizon::default();
    let max = db.max_flow_id().await.unwrap();
    let mut h = horizon.advance(db, WAIT).await.unwrap();
    for _ in 0..100 {
        if h >= max {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        h = horizon.advance(db, WAIT).await.unwrap();
    }
    assert!(h >= max, "the flow id horizon {h} did not reach {max}");
    for b in 0..buckets {
        while db
            .stitch_step(None, b, h, 1_000_000_000, buckets, 10_000)
            .await
            .unwrap()
            .after_id
            < h
        {}
    }
}
