//! The collector's attacks: CRANE peers that lie about lengths, counts,
//! templates and names, or only hold connections open.

use super::common::*;
use qosloop_schema::cops;
use qosloop_schema::crane::{
    ByteOrder, CraneCodec, Data, Frame, Message, Start, TemplateSet, WireKey, WireTemplate,
    CAP_KEEPALIVE, DATA_FLAG_START,
};
use qosloop_schema::ie::{self, DataType};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Peak resident memory the collector may reach under any one attack.
const COLLECTOR_BUDGET_KB: u64 = 768 * 1024;

// ---------------------------------------------------------------------------
// CRANE

fn crane_bytes(frame: &Frame) -> Vec<u8> {
    let mut codec = CraneCodec::with_max_message(64 << 20);
    let mut buf = Default::default();
    cops::Encoder::encode(&mut codec, frame, &mut buf).unwrap();
    let bytes: &[u8] = &buf;
    bytes.to_vec()
}

fn frame(message: Message) -> Vec<u8> {
    crane_bytes(&Frame {
        session: 1,
        message,
    })
}

fn start(name: &str) -> Vec<u8> {
    frame(Message::Start(Start {
        max_version: 1,
        capabilities: CAP_KEEPALIVE,
        boot_ns: 1,
        stream_id: 7,
        exporter: name.into(),
    }))
}

fn templates(config_id: u16, templates: Vec<WireTemplate>) -> Vec<u8> {
    frame(Message::TemplateData(TemplateSet {
        config_id,
        byte_order: ByteOrder::Big,
        templates,
    }))
}

fn final_templates(config_id: u16) -> Vec<u8> {
    frame(Message::FinalTemplateData { config_id })
}

fn data(seq: u32, count: u32, records: Vec<u8>) -> Vec<u8> {
    frame(Message::Data(Data {
        template_id: 256,
        config_id: 1,
        flags: if seq == 0 { DATA_FLAG_START } else { 0 },
        seq,
        count,
        records: records.into(),
    }))
}

fn key(ie: qosloop_schema::IeId, data_type: DataType, disabled: bool) -> WireKey {
    WireKey {
        ie,
        data_type,
        disabled,
    }
}

/// What the collector answered, by message type code, until it closed the
/// connection, sent an ERROR, or `limit` passed. ERROR texts are kept.
#[derive(Debug, Default)]
struct Answers {
    kinds: Vec<u8>,
    errors: Vec<String>,
    closed: bool,
}

const CRANE_ERROR: u8 = 0x23;
const CRANE_DATA_ACK: u8 = 0x21;

/// Reads CRANE frames from `s` until an ERROR, the end, or `limit`;
/// `stop_after` ends the read early once that many frames came.
async fn crane_answers(s: &mut TcpStream, limit: Duration, stop_after: usize) -> Answers {
    let mut a = Answers::default();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match read_message(s, deadline).await {
            Read::Quiet => return a,
            Read::Closed => {
                a.closed = true;
                return a;
            }
            Read::Message(kind, body) => {
                a.kinds.push(kind);
                if kind == CRANE_ERROR {
                    // time(8) code(2) length(2) text
                    let text = body.get(12..).unwrap_or_default();
                    a.errors.push(String::from_utf8_lossy(text).into_owned());
                    return a;
                }
                if a.kinds.len() >= stop_after {
                    return a;
                }
            }
        }
    }
}

/// START + one template + FINAL from `src`, answers read.
async fn negotiated(
    dst: SocketAddr,
    src: IpAddr,
    name: &str,
    template: WireTemplate,
) -> (TcpStream, Answers) {
    let mut s = connect_from(src, dst).await.unwrap();
    let mut msg = start(name);
    msg.extend(templates(1, vec![template]));
    msg.extend(final_templates(1));
    assert!(send_bounded(&mut s, &msg).await);
    let a = crane_answers(&mut s, Duration::from_secs(5), 3).await;
    (s, a)
}

/// A pcap of `flows` one-packet UDP flows (Ethernet, IPv4).
fn write_pcap(path: &Path, flows: u32) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for v in [0xa1b2_c3d4u32.to_le_bytes().to_vec(), vec![2, 0, 4, 0]] {
        f.write_all(&v).unwrap();
    }
    for v in [0u32, 0, 65535, 1] {
        f.write_all(&v.to_le_bytes()).unwrap();
    }
    for i in 0..flows {
        let mut pkt = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
        let mut ip = vec![0x45, 0, 0, 46, 0, 0, 0x40, 0, 64, 17, 0, 0];
        ip.extend_from_slice(&[10, 9, (i >> 8) as u8, i as u8]);
        ip.extend_from_slice(&[192, 0, 2, 9]);
        let mut sum: u32 = ip
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        pkt.extend_from_slice(&ip);
        pkt.extend_from_slice(&(1024 + i as u16).to_be_bytes());
        pkt.extend_from_slice(&[0, 9, 0, 26, 0, 0]);
        pkt.extend_from_slice(&[0u8; 18]);
        let ts_us = u64::from(i) * 100;
        f.write_all(&(1_700_000_000 + (ts_us / 1_000_000) as u32).to_le_bytes())
            .unwrap();
        f.write_all(&((ts_us % 1_000_000) as u32).to_le_bytes())
            .unwrap();
        f.write_all(&(pkt.len() as u32).to_le_bytes()).unwrap();
        f.write_all(&(pkt.len() as u32).to_le_bytes()).unwrap();
        f.write_all(&pkt).unwrap();
    }
    f.flush().unwrap();
}

/// The collector under test, with a SQLite database in its bench's
/// directory. The daemon is killed before the bench is let go.
struct Collector {
    daemon: Daemon,
    addr: SocketAddr,
    runs: u32,
    bench: Bench,
}

impl Collector {
    /// The collector on a free loopback port, or `None` when the test is
    /// skipped.
    async fn launch() -> Option<Collector> {
        let bench = bench().await?;
        let dir = bench.dir.path();
        let addr = loopback_addr();
        let args = collector_args(addr.to_string(), &sqlite_url(dir), &[]);
        let log = dir.join("collector.log");
        let mut daemon = Daemon::start(&bench.bin, "qosloop-collector", &args, log);
        wait_listening(&mut daemon, addr).await;
        write_pcap(&dir.join("legit.pcap"), 300);
        Some(Collector {
            daemon,
            addr,
            runs: 0,
            bench,
        })
    }

    /// The real meter exports a 300-flow capture from 127.0.0.1; panics
    /// unless every record was acknowledged.
    async fn legitimate_export(&mut self, when: &str) {
        self.runs += 1;
        let dir = self.bench.dir.path();
        let run = tokio::process::Command::new(self.bench.bin.join("qosloop-meter"))
            .arg("--pcap")
            .arg(dir.join("legit.pcap"))
            .arg("--export")
            .arg(format!("crane://{}", self.addr))
            .arg("--export-spool")
            .arg(dir.join(format!("spool{}", self.runs)))
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .unwrap_or_else(|_| panic!("the legitimate meter did not end {when} (120 s)"))
            .unwrap();
        let text = output_text(&out);
        assert!(
            out.status.success() && text.contains("all acknowledged"),
            "the legitimate exporter did not get its records stored {when} ({}):\n{text}\ncollector:\n{}",
            out.status,
            self.daemon.tail()
        );
    }

    /// The one value of the one row `q` selects from the collector's database.
    async fn sql_one<T>(&self, q: &str) -> T
    where
        T: Send + Unpin + sqlx::Type<sqlx::Sqlite> + for<'r> sqlx::Decode<'r, sqlx::Sqlite>,
    {
        let pool = sqlx::SqlitePool::connect(&sqlite_url(self.bench.dir.path()))
            .await
            .unwrap();
        let (v,): (T,) = sqlx::query_as(q).fetch_one(&pool).await.unwrap();
        pool.close().await;
        v
    }

    /// Alive and within its memory budget.
    fn assert_bounded(&mut self, after: &str) {
        self.daemon.assert_bounded(COLLECTOR_BUDGET_KB, after);
    }

    /// Alive, within budget, and a legitimate export goes through.
    async fn assert_healthy(&mut self, after: &str) {
        self.assert_bounded(after);
        self.legitimate_export(after).await;
        self.daemon.assert_alive(after);
    }
}

// ---------------------------------------------------------------------------
// Attacks

/// Issue 11, item 1: a template with no key (or only disabled keys), then
/// DATA with a record count of 0xFFFFFFFF and an empty body. The decoder
/// built an empty record per count without consuming a byte until the
/// allocation failed and the collector aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_survives_keyless_template_with_huge_record_count() {
    let Some(mut c) = Collector::launch().await else {
        return;
    };
    let keyless = WireTemplate {
        id: 256,
        keys: vec![],
    };
    let all_disabled = WireTemplate {
        id: 256,
        keys: vec![
            key(ie::PROTOCOL_IDENTIFIER.id, DataType::Unsigned8, true),
            key(ie::OCTET_DELTA_COUNT.id, DataType::Unsigned64, true),
        ],
    };
    for (n, t) in [keyless, all_disabled].into_iter().enumerate() {
        let (mut s, first) = negotiated(c.addr, attacker(2), &format!("hostile-{n}"), t).await;
        if !first.closed && first.errors.is_empty() {
            // The template got through: send the DATA.
            send_bounded(&mut s, &data(0, u32::MAX, vec![])).await;
            let a = crane_answers(&mut s, Duration::from_secs(5), 1).await;
            assert!(
                !a.kinds.contains(&CRANE_DATA_ACK),
                "0xFFFFFFFF empty records were acknowledged: {a:?}"
            );
        }
        // Give an abort the time to happen.
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.daemon
            .assert_alive("after a keyless template and 0xFFFFFFFF records");
    }
    c.daemon
        .assert_logged(&["127.0.0.2"], "the refused session");
    c.assert_healthy("after the keyless-template attack").await;
}

/// Issue 11, item 2: one 1-byte key and a 16 MiB DATA of 1-byte records
/// (a 168-byte record per wire byte: 2.8 GB), then four 4 MiB messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_bounds_memory_of_one_byte_records() {
    let Some(mut c) = Collector::launch().await else {
        return;
    };
    let tiny = || WireTemplate {
        id: 256,
        keys: vec![key(ie::PROTOCOL_IDENTIFIER.id, DataType::Unsigned8, false)],
    };
    // One message as large as the collector accepts: 16 MiB with its
    // 8-byte header and 16-byte DATA header.
    let big = 16 * 1024 * 1024 - 8 - 16;
    let (mut s, _) = negotiated(c.addr, attacker(2), "hostile-big", tiny()).await;
    send_bounded(&mut s, &data(0, big as u32, vec![6u8; big])).await;
    let a = crane_answers(&mut s, Duration::from_secs(20), 1).await;
    eprintln!("16 MiB of 1-byte records: {a:?}");
    drop(s);
    c.assert_bounded("after 16 MiB of 1-byte records");

    let four = 4 * 1024 * 1024;
    let (mut s, _) = negotiated(c.addr, attacker(3), "hostile-four", tiny()).await;
    for seq in 0..4u32 {
        if !send_bounded(&mut s, &data(seq, four as u32, vec![17u8; four])).await {
            break;
        }
    }
    let a = crane_answers(&mut s, Duration::from_secs(30), 4).await;
    eprintln!("four 4 MiB messages of 1-byte records: {a:?}");
    drop(s);
    c.daemon
        .assert_alive("after four 4 MiB messages of 1-byte records");
    c.assert_healthy("after the 1-byte-record attack").await;
}

/// Issue 11, item 3: 8-byte headers announcing 16 MiB made the collector
/// reserve 16 MiB per connection; 114 of them aborted it under the cap.
/// Here 120 connections from four addresses (30 each, under the per-address
/// limit) hold such a header while a legitimate exporter works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_does_not_reserve_what_a_header_announces() {
    let Some(mut c) = Collector::launch().await else {
        return;
    };
    let mut header = [1u8, 0x20, 1, 0, 0, 0, 0, 0];
    header[4..].copy_from_slice(&(16u32 * 1024 * 1024).to_be_bytes());
    let mut socks = open_many(120, 2, 4, c.addr).await;
    let mut sent = 0;
    for s in socks.iter_mut() {
        if send_bounded(s, &header).await {
            sent += 1;
        }
    }
    eprintln!("{sent} of {} connections sent a 16 MiB header", socks.len());
    assert!(sent >= 114, "only {sent} headers sent");
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.assert_bounded("with 120 headers announcing 16 MiB");
    c.legitimate_export("while 120 connections announce 16 MiB")
        .await;
    drop(socks);
    c.assert_healthy("after the announced-length attack").await;
}

/// Issue 11, item 4: 1,100 idle connections (the collector has 1,024
/// descriptors) and exporters that send KEEPALIVE before START, which were
/// held forever. The connection limits refuse what is over them, the
/// accept loop survives running out of descriptors, the legitimate
/// exporter still gets in, and a peer that never starts is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_limits_idle_connections_and_closes_keepalive_before_start() {
    let Some(mut c) = Collector::launch().await else {
        return;
    };
    // From four addresses: the per-address limit refuses most.
    let mut idle = open_many(attack_sockets(1100, 1), 2, 4, c.addr).await;
    eprintln!("{} idle connections open", idle.len());
    // Four that keep the collector busy with KEEPALIVE and never START.
    let mut keepers = Vec::new();
    for _ in 0..4 {
        if let Ok(s) = connect_from(attacker(9), c.addr).await {
            keepers.push(s);
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.daemon.assert_alive("with 1,100 idle connections");
    c.legitimate_export("while 1,100 idle connections are open")
        .await;
    // KEEPALIVE every 500 ms for up to 60 s: the collector must close them.
    let deadline = Instant::now() + Duration::from_secs(60);
    let ka = frame(Message::Keepalive);
    let mut open = keepers.len();
    while open > 0 && Instant::now() < deadline {
        open = 0;
        for s in keepers.iter_mut() {
            let _ = s.write_all(&ka).await;
            let mut b = [0u8; 64];
            match tokio::time::timeout(Duration::from_millis(100), s.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {}
                _ => open += 1,
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        open,
        0,
        "{open} of {} peers sending KEEPALIVE before START are still held after 60 s",
        keepers.len()
    );
    let refused = closed_count(&mut idle).await;
    eprintln!(
        "{refused} of {} idle connections closed by the collector",
        idle.len()
    );
    assert!(
        refused > 0,
        "no idle connection over the limits was refused"
    );
    // Peer-repeatable lines are throttled (one a second): the kinds are
    // logged, not every peer.
    c.daemon
        .assert_logged(&["no START within"], "a peer that never sent START");
    c.daemon.assert_logged(
        &["connection refused", "refused_per_peer="],
        "the connections over the per-address limit",
    );
    drop(idle);
    c.assert_healthy("after the idle-connection attack").await;
}

/// Issue 11, item 5: a START with the name of an exporter that is
/// connected overwrote its address and boot time. Now it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_refuses_a_forged_start_with_a_live_exporters_name() {
    let Some(mut c) = Collector::launch().await else {
        return;
    };
    let t = WireTemplate::from_template(&qosloop_schema::Template::flow_v4(256)).unwrap();
    let (mut real, a) = negotiated(c.addr, attacker(1), "edge-meter", t.clone()).await;
    assert!(a.errors.is_empty() && !a.closed, "{a:?}");
    let (mut forged, a) = negotiated(c.addr, attacker(2), "edge-meter", t).await;
    eprintln!("forged START answered: {a:?}");
    assert!(
        a.closed || !a.errors.is_empty(),
        "a second START with a connected exporter's name was accepted: {a:?}"
    );
    let address: String = c
        .sql_one("SELECT address FROM exporters WHERE name = 'edge-meter'")
        .await;
    assert!(
        address.starts_with("127.0.0.1:"),
        "the forged START overwrote the exporter's address: {address}"
    );
    // The real exporter's session is still served.
    assert!(send_bounded(&mut real, &frame(Message::Keepalive)).await);
    let a = crane_answers(&mut real, Duration::from_secs(5), 1).await;
    assert!(a.errors.is_empty() && !a.closed, "{a:?}");
    let _ = forged.shutdown().await;
    c.daemon
        .assert_logged(&["127.0.0.2", "edge-meter"], "the refused name");
    c.assert_healthy("after the forged START").await;
}

/// Issue 11, item 6: one TMPL_DATA of 65,535 templates added 65,535
/// template rows (262 KB with keyless templates; 1.3 MB with one key each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_bounds_templates_per_exporter() {
    let Some(mut c) = Collector::launch().await else {
        return;
    };
    for (n, keys) in [
        vec![],
        vec![key(ie::PROTOCOL_IDENTIFIER.id, DataType::Unsigned8, false)],
    ]
    .into_iter()
    .enumerate()
    {
        let set: Vec<WireTemplate> = (0..=u16::MAX - 1)
            .map(|id| WireTemplate {
                id,
                keys: keys.clone(),
            })
            .collect();
        let mut s = connect_from(attacker(2 + n as u8), c.addr).await.unwrap();
        let mut msg = start(&format!("hostile-templates-{n}"));
        msg.extend(templates(1, set));
        eprintln!("TMPL_DATA of 65,535 templates: {} bytes", msg.len());
        send_bounded(&mut s, &msg).await;
        let a = crane_answers(&mut s, Duration::from_secs(20), 2).await;
        eprintln!("answers: {:?}", a.kinds);
        c.daemon.assert_alive("after 65,535 templates");
    }
    let rows: i64 = c.sql_one("SELECT count(*) FROM templates").await;
    eprintln!("{rows} template rows");
    assert!(
        rows <= 1024,
        "{rows} template rows from two peers' TMPL_DATA"
    );
    c.daemon
        .assert_logged(&["127.0.0.2"], "the refused templates");
    c.assert_healthy("after the template flood").await;
}
