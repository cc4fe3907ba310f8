//! Exporter and collector in one process over loopback, SQLite storage:
//! the protocol path end to end, quickly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_collector::{Config, Sink};
use qosloop_exporter::{Exporter, ExporterConfig};
use qosloop_schema::FlowRecord;
use qosloop_store::Db;
use std::time::Duration;

fn record(i: u64) -> FlowRecord {
    FlowRecord {
        src_addr: if i % 7 == 0 {
            format!("2001:db8::{:x}", i % 65535).parse().unwrap()
        } else {
            format!("10.0.{}.{}", (i >> 8) % 256, i % 256)
                .parse()
                .unwrap()
        },
        dst_addr: "192.0.2.9".parse().unwrap(),
        src_port: (i % 60000) as u16,
        dst_port: 80,
        proto: 6,
        packets: 1 + i % 3,
        bytes: 40 + i % 1400,
        start_ns: 1_700_000_000_000_000_000 + i,
        end_ns: 1_700_000_000_000_000_000 + i + 10,
        class: (i % 5 == 0).then(|| "web".to_owned()),
        ..FlowRecord::default()
    }
}

async fn totals(db: &Db) -> (i64, i64) {
    let Db::Sqlite(pool) = db else { panic!() };
    sqlx::query_as("SELECT count(*), COALESCE(sum(bytes), 0) FROM flows")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_arrive_once_in_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("c.db").display());
    let config = Config {
        listen: "127.0.0.1:0".into(),
        db: url.clone(),
        disable_keys: vec!["userName".into()],
        ..Config::default()
    };
    let listener = qosloop_collector::bind(&config).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sink = qosloop_collector::open_sink(&url).await.unwrap();
    let server =
        tokio::spawn(async move { qosloop_collector::serve(listener, sink, &config).await });

    let mut cfg = ExporterConfig::new(vec![addr.to_string()]);
    cfg.batch_records = 500;
    let mut ex = Exporter::start(cfg).unwrap();
    let n = 20_000u64;
    let mut sum = 0;
    for i in 0..n {
        let r = record(i);
        sum += r.bytes;
        ex.send(&r).await.unwrap();
    }
    let report = tokio::time::timeout(Duration::from_secs(60), ex.finish())
        .await
        .unwrap()
        .unwrap();
    assert!(report.complete(), "{report:?}");
    let db = Db::connect(&url).await.unwrap();
    assert_eq!(totals(&db).await, (n as i64, sum as i64));
    let Db::Sqlite(pool) = &db else { panic!() };
    let (v6,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM flows WHERE src_addr LIKE '2001:db8::%'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(v6, (0..n).filter(|i| i % 7 == 0).count() as i64);
    let (templates, sessions): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM templates), (SELECT count(*) FROM sessions WHERE stopped_ns IS NOT NULL)")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!((templates, sessions), (2, 1));
    server.abort();
    let _ = Sink::Discard;
}

mod bad_input {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use qosloop_schema::crane::{
        ByteOrder, CraneCodec, Data, ErrorCode, Frame, Message, Start, TemplateSet, WireTemplate,
        DATA_FLAG_START,
    };
    use qosloop_schema::Template;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    use tokio_util::codec::Framed;

    async fn error_code(framed: &mut Framed<TcpStream, CraneCodec>) -> ErrorCode {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), framed.next())
                .await
                .unwrap()
            {
                Some(Ok(Frame {
                    message: Message::Error(e),
                    ..
                })) => {
                    assert!(framed.next().await.is_none(), "closed after the error");
                    return e.code;
                }
                Some(Ok(_)) => continue,
                other => panic!("expected an ERROR, got {other:?}"),
            }
        }
    }

    /// A session negotiated under the name "bad-input". The name of a
    /// connection just dropped stays held until the collector has seen the
    /// close, and START is refused (ERROR `Identity`) until then: like a
    /// real exporter, try again (bounded: 100 × 50 ms).
    async fn negotiated(
        addr: std::net::SocketAddr,
        stream_id: u64,
    ) -> Framed<TcpStream, CraneCodec> {
        let send = |message| Frame {
            session: 1,
            message,
        };
        let mut attempts = 0;
        let mut f = loop {
            let mut f = Framed::new(
                TcpStream::connect(addr).await.unwrap(),
                CraneCodec::default(),
            );
            f.send(send(Message::Start(Start {
                max_version: 1,
                capabilities: 0,
                boot_ns: 1,
                stream_id,
                exporter: "bad-input".into(),
            })))
            .await
            .unwrap();
            match f.next().await.unwrap().unwrap().message {
                Message::StartAck(_) => break f,
                Message::Error(e) if e.code == ErrorCode::Identity && attempts < 100 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => panic!("expected START_ACK, got {other:?}"),
            }
        };
        f.send(send(Message::TemplateData(TemplateSet {
            config_id: 1,
            byte_order: ByteOrder::Big,
            templates: vec![WireTemplate::from_template(&Template::flow_v4(256)).unwrap()],
        })))
        .await
        .unwrap();
        f.next().await.unwrap().unwrap();
        f.send(send(Message::FinalTemplateData { config_id: 1 }))
            .await
            .unwrap();
        f.next().await.unwrap().unwrap();
        f
    }

    fn data(template_id: u16, seq: u32, flags: u8, count: u32, records: Vec<u8>) -> Frame {
        Frame {
            session: 1,
            message: Message::Data(Data {
                template_id,
                config_id: 1,
                flags,
                seq,
                count,
                records: records.into(),
            }),
        }
    }

    /// STATUS_REQ after an acknowledged DATA reports its seq and records;
    /// a re-sent message (same seq, new connection) is acknowledged and not
    /// stored again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn status_and_resend_dedup() {
        use qosloop_schema::crane::records::RecordLayout;
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("c.db").display());
        let config = Config {
            listen: "127.0.0.1:0".into(),
            db: url.clone(),
            ..Config::default()
        };
        let listener = qosloop_collector::bind(&config).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sink = qosloop_collector::open_sink(&url).await.unwrap();
        let server =
            tokio::spawn(async move { qosloop_collector::serve(listener, sink, &config).await });
        let layout = RecordLayout::new(
            &WireTemplate::from_template(&Template::flow_v4(256)).unwrap(),
            ByteOrder::Big,
        );
        let mut bytes = bytes::BytesMut::new();
        layout.encode(&record(1), &mut bytes).unwrap();
        layout.encode(&record(2), &mut bytes).unwrap();
        for attempt in 0..2 {
            let mut f = negotiated(addr, 2001).await;
            let flags = DATA_FLAG_START
                | if attempt == 1 {
                    qosloop_schema::crane::DATA_FLAG_DUPLICATE
                } else {
                    0
                };
            f.send(data(256, 7, flags, 2, bytes.to_vec()))
                .await
                .unwrap();
            match f.next().await.unwrap().unwrap().message {
                Message::DataAck(a) => assert_eq!(a.seq, 7),
                other => panic!("expected DATA_ACK, got {other:?}"),
            }
            f.send(Frame {
                session: 1,
                message: Message::StatusReq,
            })
            .await
            .unwrap();
            match f.next().await.unwrap().unwrap().message {
                Message::StatusRsp(s) => {
                    assert_eq!(s.last_acked_seq, 7);
                    assert_eq!(s.committed_records, if attempt == 0 { 2 } else { 0 });
                }
                other => panic!("expected STATUS_RSP, got {other:?}"),
            }
        }
        let db = Db::connect(&url).await.unwrap();
        assert_eq!(totals(&db).await.0, 2, "stored once");
        server.abort();
    }

    /// Malformed, truncated, unknown-template, gapped and wrong-version
    /// input each end their own session with an ERROR; a good exporter
    /// running at the same time loses nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_sessions_get_errors_and_others_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("c.db").display());
        let config = Config {
            listen: "127.0.0.1:0".into(),
            db: url.clone(),
            ..Config::default()
        };
        let listener = qosloop_collector::bind(&config).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sink = qosloop_collector::open_sink(&url).await.unwrap();
        let server =
            tokio::spawn(async move { qosloop_collector::serve(listener, sink, &config).await });

        let good = tokio::spawn(async move {
            let mut ex = Exporter::start(ExporterConfig::new(vec![addr.to_string()])).unwrap();
            let mut sum = 0;
            for i in 0..30_000 {
                let r = record(i);
                sum += r.bytes;
                ex.send(&r).await.unwrap();
            }
            (ex.finish().await.unwrap(), sum)
        });

        // Wrong version.
        let mut raw = TcpStream::connect(addr).await.unwrap();
        raw.write_all(&[9, 1, 1, 0, 0, 0, 0, 8]).await.unwrap();
        let mut f = Framed::new(raw, CraneCodec::default());
        assert_eq!(error_code(&mut f).await, ErrorCode::Version);

        // Oversized length.
        let mut raw = TcpStream::connect(addr).await.unwrap();
        raw.write_all(&[1, 1, 1, 0, 0xff, 0xff, 0xff, 0xff])
            .await
            .unwrap();
        let mut f = Framed::new(raw, CraneCodec::default());
        assert_eq!(error_code(&mut f).await, ErrorCode::Oversized);

        // DATA before any START.
        let mut f = Framed::new(
            TcpStream::connect(addr).await.unwrap(),
            CraneCodec::default(),
        );
        f.send(data(256, 1, DATA_FLAG_START, 0, vec![]))
            .await
            .unwrap();
        assert_eq!(error_code(&mut f).await, ErrorCode::State);

        // Unknown template.
        let mut f = negotiated(addr, 1001).await;
        f.send(data(999, 1, DATA_FLAG_START, 0, vec![]))
            .await
            .unwrap();
        assert_eq!(error_code(&mut f).await, ErrorCode::UnknownTemplate);

        // Records truncated (count says 2, bytes hold less than one).
        let mut f = negotiated(addr, 1002).await;
        f.send(data(256, 1, DATA_FLAG_START, 2, vec![1, 2, 3]))
            .await
            .unwrap();
        assert_eq!(error_code(&mut f).await, ErrorCode::Malformed);

        // A sequence gap without the S flag.
        let mut f = negotiated(addr, 1003).await;
        f.send(data(256, 1, DATA_FLAG_START, 0, vec![]))
            .await
            .unwrap();
        f.send(data(256, 5, 0, 0, vec![])).await.unwrap();
        assert_eq!(error_code(&mut f).await, ErrorCode::Sequence);

        let (report, sum) = good.await.unwrap();
        assert!(report.complete(), "{report:?}");
        let db = Db::connect(&url).await.unwrap();
        assert_eq!(totals(&db).await, (30_000, sum as i64));
        server.abort();
    }
}

mod tls {
    use super::*;
    use qosloop_exporter::TlsFiles;
    use qosloop_testbed::harness::require_binary;
    use qosloop_testbed::need;
    use std::path::Path;

    fn make_pki(dir: &Path) {
        qosloop_testbed::harness::test_pki(dir).unwrap();
    }

    /// Mutual TLS: an exporter with a certificate from the CA gets every
    /// record stored under the certificate's name; one naming another
    /// exporter than its certificate (issue 11, item 5) or speaking plain
    /// TCP gets nothing acknowledged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mutual_tls_export() {
        need!(require_binary("openssl", "openssl"));
        let dir = tempfile::tempdir().unwrap();
        make_pki(dir.path());
        let url = format!("sqlite://{}", dir.path().join("c.db").display());
        let config = Config {
            listen: "127.0.0.1:0".into(),
            db: url.clone(),
            tls_cert: Some(dir.path().join("server.pem")),
            tls_key: Some(dir.path().join("server.key")),
            tls_client_ca: Some(dir.path().join("ca.pem")),
            ..Config::default()
        };
        config.validate().unwrap();
        let listener = qosloop_collector::bind(&config).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sink = qosloop_collector::open_sink(&url).await.unwrap();
        let collector = qosloop_collector::Collector::new(sink, &config).unwrap();
        let c = collector.clone();
        let server = tokio::spawn(async move { c.serve(listener).await });

        let files = TlsFiles {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("client.pem"),
            key: dir.path().join("client.key"),
        };
        // The certificate says "qosloop client"; a START naming another
        // exporter is refused.
        let mut impostor = ExporterConfig::new(vec![addr.to_string()]);
        impostor.tls = Some(files.clone());
        impostor.name = "m1".into();
        impostor.finish_timeout = Duration::from_secs(2);
        let mut ex = Exporter::start(impostor).unwrap();
        for i in 0..100 {
            ex.send(&record(i)).await.unwrap();
        }
        let report = ex.finish().await.unwrap();
        assert_eq!(report.acked_records, 0, "{report:?}");
        assert!(
            collector
                .stats()
                .refused
                .get("certificate_name_mismatch")
                .is_some_and(|&n| n >= 1),
            "{:?}",
            collector.stats()
        );

        let mut cfg = ExporterConfig::new(vec![addr.to_string()]);
        cfg.tls = Some(files);
        cfg.name = "qosloop client".into();
        let mut ex = Exporter::start(cfg).unwrap();
        let mut sum = 0;
        for i in 0..10_000 {
            let r = record(i);
            sum += r.bytes;
            ex.send(&r).await.unwrap();
        }
        let report = ex.finish().await.unwrap();
        assert!(report.complete(), "{report:?}");

        let mut plain = ExporterConfig::new(vec![addr.to_string()]);
        plain.finish_timeout = Duration::from_secs(2);
        let mut ex = Exporter::start(plain).unwrap();
        for i in 0..100 {
            ex.send(&record(i)).await.unwrap();
        }
        let report = ex.finish().await.unwrap();
        assert_eq!(report.acked_records, 0, "plain TCP is refused: {report:?}");

        let db = Db::connect(&url).await.unwrap();
        assert_eq!(totals(&db).await, (10_000, sum as i64));
        let Db::Sqlite(pool) = &db else { panic!() };
        let names: Vec<(String,)> = sqlx::query_as("SELECT name FROM exporters")
            .fetch_all(pool)
            .await
            .unwrap();
        assert_eq!(names, [("qosloop client".to_owned(),)]);
        server.abort();
    }
}
