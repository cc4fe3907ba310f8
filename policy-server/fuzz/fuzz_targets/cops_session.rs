//! The PDP's connection code, stateful: two PEP connections over in-memory
//! streams share one PDP (so the PEPID registry is exercised), each opening
//! with an OPN whose PEPID, roles and direction come from the fuzzer's
//! bytes, then REQ/RPT/KA/DRQ/SSC/CC messages whose objects come from the
//! input, raw bytes, a second OPN, and decision-table changes in between.
//! Time is paused (the runtime skips ahead when idle), so timeouts cost
//! nothing. No database: the events the PDP emits are checked and dropped.
//!
//! Checked: no panic; no allocation over 256 MiB (the capping allocator
//! aborts); a PEPID is never connected twice at once, every Disconnected
//! follows its Connected, and whatever the PDP emits is within its bounds
//! (PEPID, roles, report text).
#![no_main]

#[path = "../../../schema/fuzz/fuzz_targets/cap_alloc.rs"]
mod cap_alloc;

use libfuzzer_sys::arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use qosloop_policy_server::bandwidth::Rates;
use qosloop_policy_server::engine::{device_directions, DecisionTable, Engine};
use qosloop_policy_server::pdp::{
    PdpConfig, PdpEvent, PdpShared, MAX_PEP_ID, MAX_REPORT_REASON, MAX_ROLE, MAX_ROLES,
};
use qosloop_policy_server::testing::{many_flows_policy, paper_policy};
use qosloop_schema::cops::{
    Body, ClientSi, Context, CopsCodec, Encoder, Handle, InstalledDecision, Message, PepHello,
    PepState, Reason, ReportType,
};
use qosloop_schema::{Direction, EnforcementReport, ReportOutcome};
use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

/// Two decision tables to switch between: the paper's, and 300 flows over
/// three roles (several DECs per batch).
fn tables() -> &'static [Arc<DecisionTable>; 2] {
    static T: OnceLock<[Arc<DecisionTable>; 2]> = OnceLock::new();
    T.get_or_init(|| {
        let table = |policy: qosloop_schema::PolicySet| {
            let mut engine = Engine::new(0.01);
            engine.evaluate(&policy, &Rates::default(), 1);
            let mut t = engine.table();
            t.devices = device_directions(&policy);
            Arc::new(t)
        };
        [table(paper_policy()), table(many_flows_policy(300, 3))]
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a runtime")
    })
}

fn string(u: &mut Unstructured<'_>, max: usize) -> String {
    let len = u.int_in_range(0..=max).unwrap_or(0);
    let bytes = u.bytes(len.min(u.len())).unwrap_or_default();
    String::from_utf8_lossy(bytes).into_owned()
}

fn roles(u: &mut Unstructured<'_>) -> Vec<String> {
    let n = u.int_in_range(0..=4).unwrap_or(0);
    (0..n)
        .map(|_| match u.int_in_range(0..=3).unwrap_or(0) {
            0 => "edge".to_owned(),
            1 => "edge0".to_owned(),
            2 => "edge1".to_owned(),
            _ => string(u, 80),
        })
        .collect()
}

fn pep_id(u: &mut Unstructured<'_>) -> String {
    match u.int_in_range(0..=3).unwrap_or(0) {
        0 => "pep-a".to_owned(),
        1 => "pep-b".to_owned(),
        2 => "p".repeat(u.int_in_range(250..=300).unwrap_or(255)),
        _ => string(u, 300),
    }
}

fn encode(m: Message, out: &mut bytes::BytesMut) {
    // An unencodable message (a PEPID with a NUL, say) is left out.
    let mut codec = CopsCodec::default();
    let mut one = bytes::BytesMut::new();
    if codec.encode(m, &mut one).is_ok() {
        out.extend_from_slice(&one);
    }
}

/// What a PEP sends, and the table changes to make after which message.
struct Script {
    bytes: Vec<u8>,
    /// (byte offset, table index): switch the table once the PDP has been
    /// sent this many bytes.
    switches: Vec<(usize, usize)>,
}

fn script(u: &mut Unstructured<'_>) -> Script {
    let mut out = bytes::BytesMut::new();
    let mut switches = Vec::new();
    let hello = PepHello {
        roles: roles(u),
        interface: None,
        direction: match u.int_in_range(0..=2).unwrap_or(0) {
            0 => None,
            1 => Some(Direction::Egress),
            _ => Some(Direction::Ingress),
        },
        software: string(u, 16),
    };
    encode(Message::opn(&pep_id(u), &hello), &mut out);
    let handle = Handle::from_u32(u.arbitrary().unwrap_or(1));
    for _ in 0..u.int_in_range(0..=24).unwrap_or(0) {
        if u.is_empty() {
            break;
        }
        match u.int_in_range(0..=11).unwrap_or(0) {
            0 => {
                let n = u.int_in_range(0..=64).unwrap_or(0);
                let installed = (0..n)
                    .map(|_| InstalledDecision {
                        id: u.arbitrary().unwrap_or(0),
                        version: u.int_in_range(0..=3).unwrap_or(0),
                    })
                    .collect();
                let state = PepState {
                    roles: roles(u),
                    installed,
                };
                encode(Message::req(handle.clone(), &state), &mut out);
            }
            1 => {
                let outcome = match u.int_in_range(0..=2).unwrap_or(0) {
                    0 => ReportOutcome::Installed,
                    1 => ReportOutcome::Removed,
                    _ => ReportOutcome::Failed {
                        reason: string(u, 2000),
                    },
                };
                let r = EnforcementReport {
                    decision_id: u.arbitrary().unwrap_or(0),
                    version: u.arbitrary().unwrap_or(0),
                    outcome,
                    reconfig_ns: u.arbitrary().unwrap_or(0),
                    at_ns: u.arbitrary().unwrap_or(0),
                };
                encode(Message::rpt(handle.clone(), &r), &mut out);
            }
            2 => encode(Message::ka(), &mut out),
            3 => encode(Message::drq(handle.clone()), &mut out),
            4 => encode(Message::ssc(), &mut out),
            5 => encode(
                Message::cc(qosloop_schema::cops::ErrorCode::ClientFailure),
                &mut out,
            ),
            6 => {
                // Raw bytes: any framing at all.
                let n = u.int_in_range(0..=256).unwrap_or(0);
                out.extend_from_slice(u.bytes(n.min(u.len())).unwrap_or_default());
            }
            7 => {
                // REQ with a ClientSI of the fuzzer's bytes.
                let n = u.int_in_range(0..=512).unwrap_or(0);
                let data = u.bytes(n.min(u.len())).unwrap_or_default().to_vec();
                encode(
                    Message::new(Body::Req {
                        handle: handle.clone(),
                        context: Context::configuration(),
                        in_interface: None,
                        out_interface: None,
                        client_si: vec![ClientSi::signaled(data)],
                    }),
                    &mut out,
                );
            }
            8 => {
                let n = u.int_in_range(0..=512).unwrap_or(0);
                let data = u.bytes(n.min(u.len())).unwrap_or_default().to_vec();
                let report_type = if bool::arbitrary(u).unwrap_or(false) {
                    ReportType::Failure
                } else {
                    ReportType::Success
                };
                encode(
                    Message::new(Body::Rpt {
                        handle: handle.clone(),
                        report_type,
                        client_si: Some(ClientSi::signaled(data)),
                    }),
                    &mut out,
                );
            }
            9 => switches.push((out.len(), u.int_in_range(0..=1).unwrap_or(0))),
            10 => encode(Message::opn(&pep_id(u), &PepHello::default()), &mut out),
            _ => encode(
                Message::new(Body::Drq {
                    handle: Handle(u.bytes(4.min(u.len())).unwrap_or_default().to_vec()),
                    reason: Reason {
                        code: u.arbitrary().unwrap_or(0),
                        sub_code: 0,
                    },
                }),
                &mut out,
            ),
        }
    }
    Script {
        bytes: out.to_vec(),
        switches,
    }
}

/// Sends `script` over `io` (switching tables on the way) while reading
/// and dropping what the PDP says; closes its sending half at the end.
async fn pep(io: tokio::io::DuplexStream, script: Script, tables: &watch::Sender<Arc<DecisionTable>>) {
    let (mut rx, mut tx) = tokio::io::split(io);
    let read = async {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = rx.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    let write = async {
        let mut at = 0;
        for (until, table) in &script.switches {
            let until = (*until).min(script.bytes.len());
            if until > at && tx.write_all(&script.bytes[at..until]).await.is_err() {
                return;
            }
            at = at.max(until);
            tables.send_replace(tables_at(*table));
            tokio::task::yield_now().await;
        }
        let _ = tx.write_all(&script.bytes[at..]).await;
        let _ = tx.shutdown().await;
    };
    tokio::join!(read, write);
}

fn tables_at(i: usize) -> Arc<DecisionTable> {
    tables()[i % 2].clone()
}

/// Checks what the PDP emits, until it is gone.
async fn check_events(mut events: mpsc::Receiver<PdpEvent>) {
    let mut connected: HashSet<String> = HashSet::new();
    while let Some(e) = events.recv().await {
        match e {
            PdpEvent::Connected { name, roles, .. } => {
                assert!(!name.is_empty() && name.len() <= MAX_PEP_ID, "{name:?}");
                assert!(roles.len() <= MAX_ROLES && roles.iter().all(|r| r.len() <= MAX_ROLE));
                assert!(connected.insert(name.clone()), "{name:?} connected twice at once");
            }
            PdpEvent::Disconnected { name, .. } => {
                assert!(connected.remove(&name), "{name:?} disconnected without connecting");
            }
            PdpEvent::Report { name, report } => {
                assert!(connected.contains(&name), "a report from {name:?}, not connected");
                if let ReportOutcome::Failed { reason } = &report.outcome {
                    assert!(reason.len() <= MAX_REPORT_REASON + '…'.len_utf8());
                }
            }
            PdpEvent::Counters { name, report } => {
                assert!(connected.contains(&name), "counters from {name:?}, not connected");
                assert!(report.decisions.len() <= qosloop_schema::MAX_ACCOUNTED_DECISIONS);
            }
        }
    }
    assert!(connected.is_empty(), "still connected at the end: {connected:?}");
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let identity = match u.int_in_range(0..=2).unwrap_or(0) {
        0 => None,
        1 => Some("pep-a".to_owned()),
        _ => Some(string(&mut u, 40)),
    };
    let config = PdpConfig {
        ka_timer_secs: u.int_in_range(0..=3).unwrap_or(0),
        dec_batch: u.int_in_range(1..=300).unwrap_or(256),
        max_message: u.int_in_range(8..=(1 << 20)).unwrap_or(1 << 20),
        max_open_message: u.int_in_range(8..=(32 << 10)).unwrap_or(16 << 10),
        idle_timeout: Duration::from_secs(30),
        open_timeout: Duration::from_secs(1),
        write_timeout: Duration::from_secs(1),
        report_queue_wait: Duration::from_millis(100),
        ..PdpConfig::default()
    };
    let events_room = u.int_in_range(1..=8).unwrap_or(4);
    let first = script(&mut u);
    let second = script(&mut u);
    runtime().block_on(async move {
        let (tables_tx, tables_rx) = watch::channel(tables_at(0));
        let (events_tx, events_rx) = mpsc::channel(events_room);
        let (_shutdown_tx, shutdown_rx) = watch::channel(false);
        let shared = PdpShared::new(config, tables_rx, events_tx, shutdown_rx);
        let (pdp_a, pep_a) = tokio::io::duplex(4096);
        let (pdp_b, pep_b) = tokio::io::duplex(4096);
        let peer = "127.0.0.1:4000".parse().expect("an address");
        let pdp = async move {
            tokio::join!(
                shared.serve_connection(Box::new(pdp_a), peer, identity.clone()),
                shared.serve_connection(Box::new(pdp_b), peer, identity),
            );
            drop(shared);
        };
        tokio::join!(
            pdp,
            pep(pep_a, first, &tables_tx),
            pep(pep_b, second, &tables_tx),
            check_events(events_rx),
        );
    });
});
