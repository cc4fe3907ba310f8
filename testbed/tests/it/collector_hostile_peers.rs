//! Regression tests of issue 11 (the export path): peers that lie or
//! misbehave against an in-process collector on loopback. Each test sends
//! what an attacker sent and checks that the collector refuses it with the
//! right ERROR, counts it, and stays within its bounds — and, where it
//! matters, that a legitimate exporter still gets through.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::collector_common as common;

use common::legitimate_export;
use futures_util::{SinkExt, StreamExt};
use qosloop_collector::{Collector, Config};
use qosloop_schema::crane::records::RecordLayout;
use qosloop_schema::crane::{
    ByteOrder, CraneCodec, Data, ErrorCode, ErrorMsg, Frame, Message, Start, TemplateSet, WireKey,
    WireTemplate, DATA_FLAG_START,
};
use qosloop_schema::ie;
use qosloop_schema::Template;
use qosloop_store::Db;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

/// An in-process collector on a loopback port with SQLite storage.
struct Server {
    addr: SocketAddr,
    collector: Collector,
    url: String,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn server(tune: impl FnOnce(&mut Config)) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("c.db").display());
    let mut config = Config {
        listen: "127.0.0.1:0".into(),
        db: url.clone(),
        ..Config::default()
    };
    tune(&mut config);
    config.validate().unwrap();
    let listener = qosloop_collector::bind(&config).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sink = qosloop_collector::open_sink(&url).await.unwrap();
    let collector = Collector::new(sink, &config).unwrap();
    let c = collector.clone();
    let task = tokio::spawn(async move {
        c.serve(listener).await.unwrap();
    });
    Server {
        addr,
        collector,
        url,
        task,
        _dir: dir,
    }
}

type Conn = Framed<TcpStream, CraneCodec>;

async fn connect(addr: SocketAddr) -> Conn {
    Framed::new(
        TcpStream::connect(addr).await.unwrap(),
        CraneCodec::default(),
    )
}

async fn send(f: &mut Conn, message: Message) {
    f.send(Frame {
        session: 1,
        message,
    })
    .await
    .unwrap();
}

/// The next message, skipping KEEPALIVEs; `None` at the end of the stream.
async fn next(f: &mut Conn) -> Option<Message> {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), f.next())
            .await
            .expect("the collector answers within 20 s")
        {
            Some(Ok(Frame {
                message: Message::Keepalive,
                ..
            })) => continue,
            Some(Ok(fr)) => return Some(fr.message),
            Some(Err(_)) | None => return None,
        }
    }
}

/// Expects an ERROR and the end of the connection after it.
async fn expect_error(f: &mut Conn) -> ErrorMsg {
    match next(f).await {
        Some(Message::Error(e)) => {
            assert!(next(f).await.is_none(), "closed after the ERROR");
            e
        }
        other => panic!("expected an ERROR, got {other:?}"),
    }
}

fn start(name: &str, stream_id: u64) -> Message {
    Message::Start(Start {
        max_version: 1,
        capabilities: 0,
        boot_ns: 1,
        stream_id,
        exporter: name.into(),
    })
}

fn templates(templates: Vec<WireTemplate>) -> Message {
    Message::TemplateData(TemplateSet {
        config_id: 1,
        byte_order: ByteOrder::Big,
        templates,
    })
}

fn key(e: ie::InformationElement) -> WireKey {
    WireKey {
        ie: e.id,
        data_type: e.data_type,
        disabled: false,
    }
}

/// A template of one 1-byte key: the densest records there are.
fn one_byte_template(id: u16) -> WireTemplate {
    WireTemplate {
        id,
        keys: vec![key(ie::PROTOCOL_IDENTIFIER)],
    }
}

fn data(template_id: u16, seq: u32, count: u32, records: Vec<u8>) -> Message {
    Message::Data(Data {
        template_id,
        config_id: 1,
        flags: DATA_FLAG_START,
        seq,
        count,
        records: records.into(),
    })
}

/// START, the templates, FINAL: ready for DATA.
async fn negotiated(addr: SocketAddr, name: &str, stream_id: u64, t: Vec<WireTemplate>) -> Conn {
    let mut f = connect(addr).await;
    send(&mut f, start(name, stream_id)).await;
    assert!(matches!(next(&mut f).await, Some(Message::StartAck(_))));
    send(&mut f, templates(t)).await;
    assert!(matches!(
        next(&mut f).await,
        Some(Message::TemplateDataAck(_))
    ));
    send(&mut f, Message::FinalTemplateData { config_id: 1 }).await;
    assert!(matches!(
        next(&mut f).await,
        Some(Message::FinalTemplateDataAck { .. })
    ));
    f
}

async fn sql_count(url: &str, q: &str) -> i64 {
    let db = Db::connect(url).await.unwrap();
    let Db::Sqlite(pool) = &db else { panic!() };
    let (n,): (i64,) = sqlx::query_as(q).fetch_one(pool).await.unwrap();
    n
}

/// Item 1: a template without keys, or with every key disabled, let a DATA
/// of count 0xFFFFFFFF and no body build empty records until the collector
/// aborted. Such templates are refused when they are announced, naming the
/// template — also when it is the collector that disables the last key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_template_is_refused_before_any_data() {
    let srv = server(|c| c.disable_keys = vec!["protocolIdentifier".into()]).await;
    let mut disabled = Template::flow_v4(260);
    for k in &mut disabled.keys {
        k.enabled = false;
    }
    let cases = [
        (
            WireTemplate {
                id: 258,
                keys: vec![],
            },
            "",
        ),
        (WireTemplate::from_template(&disabled).unwrap(), ""),
        // Fixed-size keys only the collector disables.
        (one_byte_template(259), "disables protocolIdentifier"),
    ];
    for (i, (t, extra)) in cases.into_iter().enumerate() {
        let id = t.id;
        let mut f = connect(srv.addr).await;
        send(&mut f, start("keyless", 10 + i as u64)).await;
        assert!(matches!(next(&mut f).await, Some(Message::StartAck(_))));
        send(&mut f, templates(vec![t])).await;
        let e = expect_error(&mut f).await;
        assert_eq!(e.code, ErrorCode::Malformed, "{}", e.text);
        assert!(
            e.text.contains(&format!("template {id}")) && e.text.contains(extra),
            "{}",
            e.text
        );
    }
    assert_eq!(srv.collector.stats().refused.get("no_fixed_key"), Some(&3));
    legitimate_export(srv.addr, "after-keyless", 2_000).await;
}

/// Item 1, the count: a DATA whose count cannot fit in its bytes is refused
/// before anything is decoded or allocated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_count_beyond_its_bytes_is_refused() {
    let srv = server(|_| {}).await;
    let mut f = negotiated(srv.addr, "counts", 1, vec![one_byte_template(256)]).await;
    send(&mut f, data(256, 1, u32::MAX, vec![])).await;
    let e = expect_error(&mut f).await;
    assert_eq!(e.code, ErrorCode::Malformed);
    assert!(e.text.contains("record count 4294967295"), "{}", e.text);
    assert_eq!(srv.collector.stats().refused.get("record_count"), Some(&1));
}

/// Item 2: a template of one 1-byte key and a DATA of 1-byte records
/// decoded to a 168-byte record per wire byte (16 MiB → 2.8 GB). A message
/// whose decoded size exceeds the session's budget is refused before it is
/// decoded; the collector holds nothing for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dense_records_beyond_the_memory_budget_are_refused() {
    let srv = server(|_| {}).await;
    let mut f = negotiated(srv.addr, "dense", 1, vec![one_byte_template(256)]).await;
    // 2 MiB of 1-byte records: about 350 MB decoded, over the 64 MiB budget.
    let n = 2 << 20;
    send(&mut f, data(256, 1, n, vec![6; n as usize])).await;
    let e = expect_error(&mut f).await;
    assert_eq!(e.code, ErrorCode::Oversized);
    assert!(e.text.contains("budget"), "{}", e.text);
    let stats = srv.collector.stats();
    assert_eq!(stats.refused.get("over_memory_budget"), Some(&1));
    assert_eq!(stats.decoded_in_flight, 0);
    assert_eq!(sql_count(&srv.url, "SELECT count(*) FROM flows").await, 0);
    legitimate_export(srv.addr, "after-dense", 2_000).await;
}

/// Item 2, the waiting side: messages that fit in the session's budget only
/// one at a time are all stored — the session waits for its own
/// acknowledgements instead of failing or holding more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_over_its_budget_waits_for_its_acks() {
    let srv = server(|c| c.decoded_bytes_per_session = 1 << 20).await;
    let mut f = negotiated(srv.addr, "budgeted", 1, vec![one_byte_template(256)]).await;
    // 4,000 records of 1 byte: about 690 KB decoded, so two never fit at once.
    let per = 4_000u32;
    let layout = RecordLayout::checked(&one_byte_template(256), ByteOrder::Big).unwrap();
    assert!(2 * RecordLayout::decoded_size(per, per as usize) > 1 << 20);
    assert!(layout.check_count(per as usize, per).is_ok());
    for seq in 1..=8u32 {
        f.send(Frame {
            session: 1,
            message: Message::Data(Data {
                template_id: 256,
                config_id: 1,
                flags: if seq == 1 { DATA_FLAG_START } else { 0 },
                seq,
                count: per,
                records: vec![17; per as usize].into(),
            }),
        })
        .await
        .unwrap();
    }
    for seq in 1..=8u32 {
        match next(&mut f).await {
            Some(Message::DataAck(a)) => assert_eq!(a.seq, seq),
            other => panic!("expected DATA_ACK {seq}, got {other:?}"),
        }
    }
    assert_eq!(
        sql_count(&srv.url, "SELECT count(*) FROM flows").await,
        8 * i64::from(per)
    );
}

/// Item 4: a client that sends KEEPALIVE before START was held forever.
/// START must come within the handshake timeout, FINAL_TMPL_DATA within the
/// templates timeout; KEEPALIVE extends neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_do_not_hold_a_session_without_start_or_templates() {
    let srv = server(|c| {
        c.handshake_timeout_ms = 300;
        c.templates_timeout_ms = 300;
    })
    .await;
    // A keepalive every 100 ms or so, at most 100 of them: the collector
    // must end the connection long before.
    async fn keepalives_until_error(f: &mut Conn) -> ErrorMsg {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            send(f, Message::Keepalive).await;
            match tokio::time::timeout(Duration::from_millis(100), f.next()).await {
                Ok(Some(Ok(Frame {
                    message: Message::Keepalive,
                    ..
                })))
                | Err(_) => continue,
                Ok(Some(Ok(Frame {
                    message: Message::Error(e),
                    ..
                }))) => return e,
                other => panic!("unexpected {other:?}"),
            }
        }
        panic!("still served after 100 keepalives");
    }
    let mut f = connect(srv.addr).await;
    let e = keepalives_until_error(&mut f).await;
    assert_eq!(e.code, ErrorCode::Limit);
    assert!(e.text.contains("no START"), "{}", e.text);

    let mut f = connect(srv.addr).await;
    send(&mut f, start("slow-templates", 1)).await;
    assert!(matches!(next(&mut f).await, Some(Message::StartAck(_))));
    let e = keepalives_until_error(&mut f).await;
    assert_eq!(e.code, ErrorCode::Limit);
    assert!(e.text.contains("FINAL_TMPL_DATA"), "{}", e.text);

    let refused = srv.collector.stats().refused;
    assert_eq!(refused.get("handshake_timeout"), Some(&1));
    assert_eq!(refused.get("templates_timeout"), Some(&1));
}

/// Item 5: a START with the name of an exporter that has a live session
/// overwrote that exporter's address and boot time. It is refused now; the
/// row keeps the live session's address; once that session ends the name
/// is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_with_a_live_exporters_name_is_refused() {
    let srv = server(|_| {}).await;
    let real = negotiated(
        srv.addr,
        "m1",
        1,
        vec![WireTemplate::from_template(&Template::flow_v4(256)).unwrap()],
    )
    .await;
    let real_addr = real.get_ref().local_addr().unwrap().to_string();

    let mut forger = connect(srv.addr).await;
    send(&mut forger, start("m1", 2)).await;
    let e = expect_error(&mut forger).await;
    assert_eq!(e.code, ErrorCode::Identity);
    assert!(e.text.contains("live session"), "{}", e.text);
    let db = Db::connect(&srv.url).await.unwrap();
    let Db::Sqlite(pool) = &db else { panic!() };
    let (address,): (String,) = sqlx::query_as("SELECT address FROM exporters WHERE name = 'm1'")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(address, real_addr, "the live exporter's row is untouched");
    assert_eq!(
        srv.collector.stats().refused.get("exporter_name_in_use"),
        Some(&1)
    );

    drop(real);
    // The name is free once the collector has seen the end of the session.
    let mut freed = false;
    for _ in 0..50 {
        let mut f = connect(srv.addr).await;
        send(&mut f, start("m1", 3)).await;
        if matches!(next(&mut f).await, Some(Message::StartAck(_))) {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(freed, "the name was never released");
}

/// Item 6: one TMPL_DATA of 65,535 templates added as many rows; names,
/// templates, keys and TMPL_DATA messages are bounded now, each refusal
/// counted by reason, and nothing of a refused set is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_driven_growth_is_bounded() {
    let srv = server(|_| {}).await;
    // 1,000 templates fit in one READ_CHUNK; the 65,535 (262 KB)
    // do not, and are refused before they are read (below).
    let flood: Vec<WireTemplate> = (0..1_000u16)
        .map(|i| one_byte_template(i.wrapping_add(256)))
        .collect();
    let wide = WireTemplate {
        id: 256,
        keys: std::iter::repeat_n(key(ie::PROTOCOL_IDENTIFIER), 65).collect(),
    };
    for (i, (t, reason)) in [
        (flood, "too_many_templates"),
        (vec![wide], "too_many_template_keys"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut f = connect(srv.addr).await;
        send(&mut f, start("growth", i as u64)).await;
        assert!(matches!(next(&mut f).await, Some(Message::StartAck(_))));
        send(&mut f, templates(t)).await;
        let e = expect_error(&mut f).await;
        assert_eq!(e.code, ErrorCode::Limit, "{reason}: {}", e.text);
        assert_eq!(srv.collector.stats().refused.get(reason), Some(&1));
    }
    let mut f = connect(srv.addr).await;
    send(&mut f, start("growth", 9)).await;
    assert!(matches!(next(&mut f).await, Some(Message::StartAck(_))));
    let all: Vec<WireTemplate> = (0..65_535u16)
        .map(|i| one_byte_template(i.wrapping_add(256)))
        .collect();
    // The collector may close while the 262 KB are still being written.
    let _ = f
        .send(Frame {
            session: 1,
            message: templates(all),
        })
        .await;
    if let Some(Message::Error(e)) = next(&mut f).await {
        assert_eq!(e.code, ErrorCode::Oversized, "{}", e.text);
    }
    assert_eq!(
        srv.collector.stats().refused.get("large_before_data"),
        Some(&1)
    );
    assert_eq!(
        sql_count(&srv.url, "SELECT count(*) FROM templates").await,
        0
    );

    // TMPL_DATA messages per session.
    let mut f = connect(srv.addr).await;
    send(&mut f, start("growth", 9)).await;
    assert!(matches!(next(&mut f).await, Some(Message::StartAck(_))));
    let mut refused = None;
    for _ in 0..100 {
        send(&mut f, templates(vec![one_byte_template(256)])).await;
        match next(&mut f).await {
            Some(Message::TemplateDataAck(_)) => continue,
            Some(Message::Error(e)) => {
                refused = Some(e);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let e = refused.expect("TMPL_DATA messages are bounded");
    assert_eq!(e.code, ErrorCode::Limit);
    assert!(e.text.contains("TMPL_DATA messages"), "{}", e.text);

    // Exporter names: length and control characters.
    for (name, what) in [("x".repeat(256), "256 bytes"), ("a\nb".to_owned(), "a\\nb")] {
        let mut f = connect(srv.addr).await;
        send(&mut f, start(&name, 1)).await;
        let e = expect_error(&mut f).await;
        assert_eq!(e.code, ErrorCode::Identity);
        assert!(e.text.contains(what), "{}", e.text);
    }
    assert_eq!(
        srv.collector.stats().refused.get("bad_exporter_name"),
        Some(&2)
    );
    // A name of 255 printable bytes is fine.
    let t = vec![WireTemplate::from_template(&Template::flow_v4(256)).unwrap()];
    let _ok = negotiated(srv.addr, &"y".repeat(255), 1, t).await;
}

/// Messages larger than 64 KiB are let into memory only once their length
/// is reserved from `large_message_bytes_total`: connections that send
/// large messages slowly cannot together hold more than that (without it,
/// 256 connections could each buffer 16 MiB). Here the budget holds one
/// 1 MiB message; the second waits, unread, and goes on once the first is
/// in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_large_messages_wait_for_the_receiving_budget() {
    use tokio::io::AsyncWriteExt;
    let srv = server(|c| {
        c.max_message = 1 << 20;
        c.large_message_bytes_total = 1 << 20;
    })
    .await;
    let eight = WireTemplate {
        id: 256,
        keys: vec![key(ie::OCTET_DELTA_COUNT)],
    };
    // One DATA of exactly 1 MiB: 8-byte records after 24 bytes of headers.
    let frame = |count: u32| {
        let mut b = bytes::BytesMut::new();
        tokio_util::codec::Encoder::encode(
            &mut CraneCodec::default(),
            Frame {
                session: 1,
                message: data(256, 1, count, vec![7; count as usize * 8]),
            },
            &mut b,
        )
        .unwrap();
        b.to_vec()
    };
    let count = ((1u32 << 20) - 24) / 8;
    let big = frame(count);
    assert_eq!(big.len(), 1 << 20);
    let mut a = negotiated(srv.addr, "large-a", 1, vec![eight.clone()]).await;
    let mut b = negotiated(srv.addr, "large-b", 1, vec![eight]).await;

    // A sends half its message and pauses: it holds the whole budget.
    a.get_mut().write_all(&big[..512 << 10]).await.unwrap();
    let mut held = false;
    for _ in 0..100 {
        if srv.collector.stats().receiving == 1 << 20 {
            held = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(held, "{:?}", srv.collector.stats());
    // B sends all of its message: it waits for room, unread.
    let b_bytes = big.clone();
    let mut b_stream = b.into_inner();
    let b_send = tokio::spawn(async move {
        b_stream.write_all(&b_bytes).await.unwrap();
        b_stream
    });
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(srv.collector.stats().receiving <= 1 << 20);
    }
    // A finishes: its message is stored, then B's.
    a.get_mut().write_all(&big[512 << 10..]).await.unwrap();
    match next(&mut a).await {
        Some(Message::DataAck(ack)) => assert_eq!(ack.seq, 1),
        other => panic!("expected DATA_ACK for A, got {other:?}"),
    }
    b = Framed::new(b_send.await.unwrap(), CraneCodec::default());
    match next(&mut b).await {
        Some(Message::DataAck(ack)) => assert_eq!(ack.seq, 1),
        other => panic!("expected DATA_ACK for B, got {other:?}"),
    }
    assert_eq!(
        sql_count(&srv.url, "SELECT count(*) FROM flows").await,
        2 * i64::from(count)
    );
    assert_eq!(srv.collector.stats().receiving, 0);
}

/// A connection that had not even sent START could announce a large
/// message and hold the shared receiving budget until the handshake
/// timeout: sixteen such connections held all 256 MiB, and a real
/// exporter's large messages waited behind them. Before the templates are
/// final a message over READ_CHUNK is refused at once (Oversized), and
/// nothing of the budget is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_message_before_the_templates_is_refused_holding_no_budget() {
    use tokio::io::AsyncWriteExt;
    let srv = server(|_| {}).await;
    let mut f = Framed::new(
        TcpStream::connect(srv.addr).await.unwrap(),
        CraneCodec::default(),
    );
    // A DATA header announcing 1 MiB, and nothing more.
    let mut header = vec![1u8, 0x20, 1, 0];
    header.extend_from_slice(&(1u32 << 20).to_be_bytes());
    f.get_mut().write_all(&header).await.unwrap();
    let e = expect_error(&mut f).await;
    assert_eq!(e.code, ErrorCode::Oversized, "{}", e.text);
    assert!(
        e.text.contains("before the templates are final"),
        "{}",
        e.text
    );
    assert_eq!(srv.collector.stats().receiving, 0);
}
