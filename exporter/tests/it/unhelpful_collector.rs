//! The exporter against collectors that answer but do not help: one that
//! negotiates and keeps the session alive but never acknowledges DATA
//! (issue 11 item 9: the meter reconnected to it forever), one whose
//! negotiation keeps no flow key or no counter (item 8: "all acknowledged"
//! while the database held all-zero rows), one that answers the templates
//! with an ERROR. Each fake collector is a TCP listener on loopback written
//! here with `qosloop_schema::crane`; every loop in it is bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures_util::{SinkExt, StreamExt};
use qosloop_exporter::{Exporter, ExporterConfig, Report};
use qosloop_schema::crane::{
    CraneCodec, DataAck, ErrorCode, ErrorMsg, Frame, Message, StartAck, TemplateSet, VERSION,
};
use qosloop_schema::{ie, FlowRecord};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::codec::Framed;

/// How the fake collector answers TMPL_DATA.
#[derive(Clone, Copy)]
enum Templates {
    /// Acknowledges them as offered.
    Accept,
    /// Disables the keys of these elements.
    Disable(&'static [ie::IeId]),
    /// Answers with an ERROR of this code.
    Refuse(ErrorCode),
    /// Acknowledges them, and acknowledges DATA too: a good collector.
    Helpful,
}

/// A fake collector: acknowledges START, TMPL_DATA (per `templates`) and
/// FINAL_TMPL_DATA, then sends KEEPALIVE every 100 ms and never
/// acknowledges DATA. Counts connections and DATA messages received.
struct Fake {
    addr: String,
    connections: Arc<AtomicUsize>,
    data: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// At most this many connections are served, each for at most 200
/// keepalives (20 s): the fake cannot run away.
const MAX_CONNECTIONS: usize = 50;
const MAX_KEEPALIVES: usize = 200;

async fn fake(templates: Templates) -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let connections = Arc::new(AtomicUsize::new(0));
    let data = Arc::new(AtomicUsize::new(0));
    let (c, d) = (connections.clone(), data.clone());
    let task = tokio::spawn(async move {
        for _ in 0..MAX_CONNECTIONS {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(session(stream, templates, d.clone()));
        }
    });
    Fake {
        addr,
        connections,
        data,
        task,
    }
}

async fn session(stream: tokio::net::TcpStream, templates: Templates, data: Arc<AtomicUsize>) {
    let mut framed = Framed::new(stream, CraneCodec::default());
    let reply = |message| Frame {
        session: 1,
        message,
    };
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    let mut keepalives = 0;
    // Keepalives start once the templates are final (a real collector
    // does not interleave them with the handshake).
    let mut negotiated = false;
    while keepalives < MAX_KEEPALIVES {
        tokio::select! {
            frame = framed.next() => {
                let Some(Ok(frame)) = frame else { return };
                let answer = match frame.message {
                    Message::Start(s) => Some(Message::StartAck(StartAck {
                        version: VERSION,
                        capabilities: s.capabilities,
                        boot_ns: s.boot_ns,
                        keepalive_s: 1,
                    })),
                    Message::TemplateData(set) => Some(match templates {
                        Templates::Accept | Templates::Helpful => Message::TemplateDataAck(set),
                        Templates::Disable(ids) => {
                            let mut set: TemplateSet = set;
                            for t in &mut set.templates {
                                for k in &mut t.keys {
                                    k.disabled |= ids.contains(&k.ie);
                                }
                            }
                            Message::TemplateDataAck(set)
                        }
                        Templates::Refuse(code) => Message::Error(ErrorMsg {
                            time_ns: 0,
                            code,
                            text: "template 256 keeps no enabled fixed-size key".into(),
                        }),
                    }),
                    Message::FinalTemplateData { config_id } => {
                        negotiated = true;
                        Some(Message::FinalTemplateDataAck { config_id })
                    }
                    Message::Data(d) => {
                        data.fetch_add(1, Ordering::SeqCst);
                        matches!(templates, Templates::Helpful).then_some(Message::DataAck(DataAck {
                            seq: d.seq,
                            config_id: d.config_id,
                        }))
                    }
                    Message::Stop => Some(Message::StopAck),
                    _ => None,
                };
                if let Some(m) = answer {
                    if framed.send(reply(m)).await.is_err() {
                        return;
                    }
                }
            }
            _ = ticker.tick(), if negotiated => {
                keepalives += 1;
                if framed.send(reply(Message::Keepalive)).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn record(i: u64) -> FlowRecord {
    FlowRecord {
        src_addr: std::net::Ipv4Addr::from(0x0a00_0000 + i as u32).into(),
        dst_addr: "192.0.2.9".parse().unwrap(),
        src_port: 1000 + i as u16,
        dst_port: 443,
        proto: 6,
        packets: 1,
        bytes: 100,
        start_ns: 1_700_000_000_000_000_000 + i * 1000,
        end_ns: 1_700_000_000_000_000_000 + i * 1000 + 500,
        ..FlowRecord::default()
    }
}

const RECORDS: u64 = 25;

/// Sends `RECORDS` records in batches of 10 and finishes. The outer
/// timeout only bounds the test (a finish that never returns is the bug);
/// nothing is asserted about how long it took.
async fn export_to(addr: &str, spool: &std::path::Path) -> (Report, Arc<qosloop_exporter::Stats>) {
    export_to_all(&[addr], spool, Duration::ZERO).await
}

/// The same to several collectors, waiting `linger` between the last
/// record and finish (so that fail-back probes run).
async fn export_to_all(
    addrs: &[&str],
    spool: &std::path::Path,
    linger: Duration,
) -> (Report, Arc<qosloop_exporter::Stats>) {
    let mut cfg = ExporterConfig::new(addrs.iter().map(|a| (*a).to_owned()).collect());
    cfg.name = "unhelpful-collector-test".into();
    cfg.batch_records = 10;
    cfg.ack_timeout = Duration::from_millis(600);
    cfg.finish_timeout = Duration::from_secs(3);
    cfg.spool_dir = Some(spool.to_owned());
    let mut ex = Exporter::start(cfg).unwrap();
    let stats = ex.stats().clone();
    for i in 0..RECORDS {
        ex.send(&record(i)).await.unwrap();
    }
    ex.flush().await.unwrap();
    tokio::time::sleep(linger).await;
    let report = tokio::time::timeout(Duration::from_secs(60), ex.finish())
        .await
        .expect("the exporter never finished")
        .unwrap();
    (report, stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_acknowledges_data_is_failed_over_and_the_export_ends() {
    let collector = fake(Templates::Accept).await;
    let dir = tempfile::tempdir().unwrap();
    let (report, _) = export_to(&collector.addr, dir.path()).await;
    assert!(
        collector.data.load(Ordering::SeqCst) > 0,
        "the fake received DATA"
    );
    assert!(report.ack_timeouts >= 1, "{report:?}");
    assert_eq!(report.records, RECORDS);
    assert_eq!(report.acked_records, 0, "{report:?}");
    assert_eq!(report.dropped_records, 0, "{report:?}");
    assert_eq!(report.unacked_records, RECORDS, "{report:?}");
    assert!(report.spool_messages > 0, "records are spooled: {report:?}");
    assert!(!report.complete());
    assert!(report.refused.is_none());
    // Not reconnected in a loop: once per ack timeout at most.
    let connections = collector.connections.load(Ordering::SeqCst);
    assert!(connections <= 4, "{connections} connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_disables_every_flow_key_is_refused_not_acknowledged() {
    let every_key: &'static [ie::IeId] = &[
        ie::SOURCE_IPV4_ADDRESS.id,
        ie::DESTINATION_IPV4_ADDRESS.id,
        ie::SOURCE_IPV6_ADDRESS.id,
        ie::DESTINATION_IPV6_ADDRESS.id,
        ie::SOURCE_TRANSPORT_PORT.id,
        ie::DESTINATION_TRANSPORT_PORT.id,
        ie::PROTOCOL_IDENTIFIER.id,
    ];
    let collector = fake(Templates::Disable(every_key)).await;
    let dir = tempfile::tempdir().unwrap();
    let (report, stats) = export_to(&collector.addr, dir.path()).await;
    let why = report.refused.clone().expect("refused");
    assert!(why.contains(&collector.addr), "{why}");
    assert!(why.contains("flow key"), "{why}");
    assert_eq!(stats.refused(), Some(why));
    assert_eq!(report.acked_records, 0, "{report:?}");
    assert_eq!(report.unacked_records, RECORDS, "{report:?}");
    assert_eq!(collector.data.load(Ordering::SeqCst), 0, "no DATA sent");
    assert_eq!(
        collector.connections.load(Ordering::SeqCst),
        1,
        "not tried again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_disables_both_counters_is_refused() {
    let counters: &'static [ie::IeId] = &[ie::PACKET_DELTA_COUNT.id, ie::OCTET_DELTA_COUNT.id];
    let collector = fake(Templates::Disable(counters)).await;
    let dir = tempfile::tempdir().unwrap();
    let (report, _) = export_to(&collector.addr, dir.path()).await;
    let why = report.refused.expect("refused");
    assert!(why.contains("counter"), "{why}");
    assert_eq!(report.acked_records, 0);
    assert_eq!(collector.data.load(Ordering::SeqCst), 0, "no DATA sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_one_counter_still_exports() {
    // Packets kept, bytes disabled: records still say something. The fake
    // never acknowledges, so the export ends by the ack timeout, but DATA
    // is sent and nothing is refused.
    let collector = fake(Templates::Disable(&[ie::OCTET_DELTA_COUNT.id])).await;
    let dir = tempfile::tempdir().unwrap();
    let (report, _) = export_to(&collector.addr, dir.path()).await;
    assert!(report.refused.is_none(), "{report:?}");
    assert!(collector.data.load(Ordering::SeqCst) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_in_answer_to_the_templates_is_a_refusal() {
    let collector = fake(Templates::Refuse(ErrorCode::ConfigMismatch)).await;
    let dir = tempfile::tempdir().unwrap();
    let (report, _) = export_to(&collector.addr, dir.path()).await;
    let why = report.refused.expect("refused");
    assert!(why.contains("keeps no enabled fixed-size key"), "{why}");
    assert_eq!(report.unacked_records, RECORDS);
    assert_eq!(collector.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_error_in_answer_to_the_templates_is_retried_not_a_refusal() {
    // The collector's database is down: its state, not our templates.
    let collector = fake(Templates::Refuse(ErrorCode::Storage)).await;
    let dir = tempfile::tempdir().unwrap();
    let (report, _) = export_to(&collector.addr, dir.path()).await;
    assert!(report.refused.is_none(), "{report:?}");
    assert_eq!(report.unacked_records, RECORDS);
    assert!(report.spool_messages > 0, "{report:?}");
    assert!(
        collector.connections.load(Ordering::SeqCst) > 1,
        "tried again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_first_collector_is_passed_over_and_never_probed_for_fail_back() {
    let refusing = fake(Templates::Refuse(ErrorCode::ConfigMismatch)).await;
    let good = fake(Templates::Helpful).await;
    let dir = tempfile::tempdir().unwrap();
    // 2 s on the second collector: four fail-back probe rounds.
    let (report, _) = export_to_all(
        &[&refusing.addr, &good.addr],
        dir.path(),
        Duration::from_secs(2),
    )
    .await;
    assert!(report.complete(), "{report:?}");
    assert!(
        report.refused.is_none(),
        "one collector still works: {report:?}"
    );
    // Fail-back probes (a TCP connect every 500 ms) would reach the refusing
    // collector again and bounce the session off the good one.
    assert_eq!(refusing.connections.load(Ordering::SeqCst), 1);
    assert_eq!(good.connections.load(Ordering::SeqCst), 1);
}
