//! The collector binary's IPFIX listeners end to end, on loopback, with
//! SQLite: templates that survive a restart, a TCP session's withdrawal,
//! bad datagrams counted by reason while good ones are stored, the
//! allow-list, and the kernel's drop counter read and stored.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use qosloop_testkit::ipfix as ipfix_support;

use ipfix_support::*;
use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::time::Duration;

fn collector(
    dir: &Path,
    name: &'static str,
    db: &Path,
    listen: &[String],
    extra: &[&str],
) -> ChildGuard {
    let mut args: Vec<String> = listen
        .iter()
        .map(|l| format!("--ipfix-listen={l}"))
        .collect();
    args.push(format!("--db=sqlite://{}", db.display()));
    args.push("--ipfix-flush-ms=20".into());
    args.push("--ipfix-stats-interval-s=1".into());
    args.extend(extra.iter().map(|s| s.to_string()));
    start_collector(dir, name, &args)
}

fn count(db: &Path) -> i64 {
    let rows: Vec<(i64,)> = sqlite_query(db, "SELECT count(*) FROM flows");
    rows[0].0
}

fn drops(db: &Path, reason: &str) -> i64 {
    let rows: Vec<(i64,)> = sqlite_query(
        db,
        &format!("SELECT COALESCE(SUM(count), 0) FROM ipfix_drops WHERE reason = '{reason}'"),
    );
    rows[0].0
}

#[test]
fn templates_persist_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("flows.db");
    let port = free_udp_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let listen = [format!("udp://{addr}")];
    // The exporter keeps its address and port: the template's scope.
    let exporter = UdpSocket::bind("127.0.0.1:0").unwrap();

    let mut first = collector(dir.path(), "first", &db, &listen, &[]);
    wait_udp_bound(addr, Duration::from_secs(60));
    let m = Ipfix::default()
        .set(2, &v4_template())
        .set(256, &v4_record(1000, 3, 180))
        .message(0, 7);
    exporter.send_to(&m, addr).unwrap();
    assert_eq!(
        wait_for_value(
            &db,
            "SELECT count(*) FROM flows",
            1,
            Duration::from_secs(10)
        ),
        1
    );
    assert!(first.terminate(Duration::from_secs(20)));
    let stored: Vec<(i64, i64, String)> = sqlite_query(
        &db,
        "SELECT session_id, template_id, definition FROM templates",
    );
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!((stored[0].0, stored[0].1), (7, 256));

    // A new process: data without its template decodes at once.
    let mut second = collector(dir.path(), "second", &db, &listen, &[]);
    wait_udp_bound(addr, Duration::from_secs(60));
    let data = Ipfix::default()
        .set(256, &v4_record(1001, 5, 300))
        .message(1, 7);
    exporter.send_to(&data, addr).unwrap();
    assert_eq!(
        wait_for_value(
            &db,
            "SELECT count(*) FROM flows",
            2,
            Duration::from_secs(10)
        ),
        2
    );
    assert!(second.terminate(Duration::from_secs(20)));
    let rows: Vec<(i64, i64, i64, i64)> = sqlite_query(
        &db,
        "SELECT src_port, packets, bytes, session_id FROM flows ORDER BY id",
    );
    assert_eq!(rows, vec![(1000, 3, 180, 7), (1001, 5, 300, 7)]);
    assert_eq!(
        drops(&db, "pending_expired") + drops(&db, "pending_overflow"),
        0
    );
}

#[test]
fn a_tcp_session_honours_withdrawal() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("flows.db");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = collector(dir.path(), "tcp", &db, &[format!("tcp://{addr}")], &[]);
    let mut stream = None;
    for _ in 0..200 {
        if let Ok(s) = TcpStream::connect(addr) {
            stream = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut s = stream.expect("the collector's IPFIX TCP port");
    let msgs = [
        Ipfix::default()
            .set(2, &v4_template())
            .set(256, &v4_record(1, 1, 40))
            .message(0, 1),
        // Withdrawn, then data for it: not stored, counted.
        Ipfix::default()
            .set(2, &[1, 0, 0, 0])
            .set(256, &v4_record(2, 1, 40))
            .message(1, 1),
        // Defined again: decoded again.
        Ipfix::default()
            .set(2, &v4_template())
            .set(256, &v4_record(3, 1, 40))
            .message(1, 1),
    ];
    for m in &msgs {
        s.write_all(m).unwrap();
    }
    s.flush().unwrap();
    drop(s);
    assert_eq!(
        wait_for_value(
            &db,
            "SELECT COALESCE(SUM(count), 0) FROM ipfix_drops WHERE reason = 'template_withdrawn'",
            1,
            Duration::from_secs(10)
        ),
        1
    );
    assert!(c.terminate(Duration::from_secs(20)));
    let ports: Vec<(i64,)> = sqlite_query(&db, "SELECT src_port FROM flows ORDER BY id");
    assert_eq!(ports, vec![(1,), (3,)]);
    // TCP templates are the session's: none persisted.
    let t: Vec<(i64,)> = sqlite_query(&db, "SELECT count(*) FROM templates");
    assert_eq!(t[0].0, 0);
}

#[test]
fn bad_datagrams_are_counted_and_good_ones_stored() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("flows.db");
    let port = free_udp_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = collector(dir.path(), "bad", &db, &[format!("udp://{addr}")], &[]);
    wait_udp_bound(addr, Duration::from_secs(60));
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut long = Ipfix::default().set(2, &v4_template()).message(0, 1);
    long[3] = 0xff; // message length past the datagram
    let bad: Vec<Vec<u8>> = vec![
        vec![0, 7, 0, 0, 0, 0], // unknown version
        long,                   // bad message length
        Ipfix::default()
            .set(2, &[1, 0, 0, 60, 0, 8, 0, 4])
            .message(0, 1), // field count overruns the set
        Ipfix::default()
            .set(3, &[1, 1, 0, 1, 0, 0, 0, 34, 0, 4])
            .message(0, 1), // options without scope
        [&[0u8, 5, 0, 30][..], &[0; 20]].concat(), // v5 count past the datagram
    ];
    for b in &bad {
        tx.send_to(b, addr).unwrap();
    }
    let good = Ipfix::default()
        .set(2, &v4_template())
        .set(256, &[v4_record(1, 1, 40), v4_record(2, 2, 80)].concat())
        .message(0, 1);
    tx.send_to(&good, addr).unwrap();
    assert_eq!(
        wait_for_value(
            &db,
            "SELECT count(*) FROM flows",
            2,
            Duration::from_secs(10)
        ),
        2
    );
    // (The readiness probe's empty datagrams count as short headers.)
    assert_eq!(
        wait_for_value(
            &db,
            "SELECT count(*) FROM ipfix_drops WHERE reason <> 'short_header' AND count > 0",
            5,
            Duration::from_secs(10)
        ),
        5
    );
    for reason in [
        "unknown_version",
        "bad_message_length",
        "field_count_overrun",
        "options_without_scope",
        "bad_record_count",
    ] {
        assert_eq!(drops(&db, reason), 1, "{reason}");
    }
    assert!(
        c.terminate(Duration::from_secs(20)),
        "the collector survived and stops cleanly"
    );
    assert_eq!(count(&db), 2);
}

#[test]
fn exporters_off_the_allow_list_are_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("flows.db");
    let port = free_udp_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = collector(
        dir.path(),
        "allow",
        &db,
        &[format!("udp://{addr}")],
        &["--ipfix-allow=127.0.0.1"],
    );
    wait_udp_bound(addr, Duration::from_secs(60));
    let m = Ipfix::default()
        .set(2, &v4_template())
        .set(256, &v4_record(1, 1, 40))
        .message(0, 1);
    UdpSocket::bind("127.0.0.2:0")
        .unwrap()
        .send_to(&m, addr)
        .unwrap();
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .send_to(&m, addr)
        .unwrap();
    assert_eq!(
        wait_for_value(
            &db,
            "SELECT count(*) FROM flows",
            1,
            Duration::from_secs(10)
        ),
        1
    );
    assert_eq!(
        wait_for_value(
            &db,
            "SELECT COALESCE(SUM(not_allowed), 0) FROM ipfix_listeners",
            1,
            Duration::from_secs(10)
        ),
        1
    );
    assert!(c.terminate(Duration::from_secs(20)));
    let src: Vec<(String,)> = sqlite_query(
        &db,
        "SELECT e.address FROM flows f JOIN exporters e ON e.id = f.exporter_id",
    );
    assert!(src[0].0.starts_with("127.0.0.1:"), "{src:?}");
}

#[test]
fn the_kernels_drop_counter_is_read_and_stored() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("flows.db");
    let port = free_udp_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // The smallest buffer the kernel grants, and a stopped collector: the
    // queue overflows for sure.
    let mut c = collector(
        dir.path(),
        "drops",
        &db,
        &[format!("udp://{addr}")],
        &["--ipfix-rcvbuf=1"],
    );
    wait_udp_bound(addr, Duration::from_secs(60));
    // The first datagram creates the listener's row.
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let m = Ipfix::default()
        .set(2, &v4_template())
        .set(256, &v4_record(1, 1, 40))
        .message(0, 1);
    tx.send_to(&m, addr).unwrap();
    assert_eq!(
        wait_for_value(
            &db,
            "SELECT count(*) FROM flows",
            1,
            Duration::from_secs(10)
        ),
        1
    );
    let pid = nix::unistd::Pid::from_raw(c.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    for seq in 1..=400u32 {
        let m = Ipfix::default()
            .set(256, &v4_record(2, 1, 40))
            .message(seq, 1);
        tx.send_to(&m, addr).unwrap();
    }
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    // One more datagram after the overflow carries the counter.
    std::thread::sleep(Duration::from_millis(200));
    tx.send_to(
        &Ipfix::default()
            .set(256, &v4_record(3, 1, 40))
            .message(401, 1),
        addr,
    )
    .unwrap();
    assert_eq!(
        wait_for_value(
            &db,
            "SELECT count(*) FROM flows WHERE src_port = 3",
            1,
            Duration::from_secs(10)
        ),
        1
    );
    // Stopping writes the final counters.
    assert!(c.terminate(Duration::from_secs(20)));
    let rows: Vec<(i64,)> = sqlite_query(
        &db,
        "SELECT COALESCE(SUM(kernel_drops), 0) FROM ipfix_listeners",
    );
    let kernel = rows[0].0;
    let stored = count(&db);
    // Every datagram was either stored or counted by the kernel (the
    // decoder's own gap counter sees the same loss).
    let gaps: Vec<(i64,)> = sqlite_query(
        &db,
        "SELECT COALESCE(SUM(sequence_gaps), 0) FROM ipfix_exporter_stats",
    );
    assert!(kernel > 0, "no kernel drop counted ({stored} stored)");
    assert_eq!(
        stored + kernel,
        402,
        "stored {stored}, kernel drops {kernel}"
    );
    assert_eq!(gaps[0].0, kernel, "sequence gaps = kernel drops");
}

/// The same on PostgreSQL: records through COPY, templates (JSONB) written
/// and loaded by a restarted collector, counters stored.
#[test]
fn postgres_stores_records_templates_and_counters() {
    use qosloop_testbed::harness::Postgres;
    use qosloop_testbed::need;
    need!(Postgres::available());
    let pg = Postgres::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_udp_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let args = |_: ()| -> Vec<String> {
        vec![
            format!("--ipfix-listen=udp://{addr}"),
            format!("--db={}", pg.url()),
            "--ipfix-flush-ms=20".into(),
            "--ipfix-stats-interval-s=1".into(),
        ]
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let query = |sql: &str| -> i64 {
        rt.block_on(async {
            let pool = sqlx::PgPool::connect(&pg.url()).await.unwrap();
            let (v,): (i64,) = sqlx::query_as(sql).fetch_one(&pool).await.unwrap();
            pool.close().await;
            v
        })
    };
    let exporter = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut first = start_collector(dir.path(), "pg-first", &args(()));
    wait_udp_bound(addr, Duration::from_secs(30));
    let m = Ipfix::default()
        .set(2, &v4_template())
        .set(256, &[v4_record(1, 3, 180), v4_record(2, 4, 240)].concat())
        .message(0, 9);
    exporter.send_to(&m, addr).unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(60);
    while query("SELECT count(*) FROM flows") < 2 && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(first.terminate(Duration::from_secs(20)));
    assert_eq!(
        query("SELECT count(*) FROM templates WHERE session_id = 9 AND template_id = 256"),
        1
    );
    assert_eq!(
        query("SELECT COALESCE(SUM(records), 0)::bigint FROM ipfix_exporter_stats"),
        2
    );
    let mut second = start_collector(dir.path(), "pg-second", &args(()));
    wait_udp_bound(addr, Duration::from_secs(30));
    exporter
        .send_to(
            &Ipfix::default()
                .set(256, &v4_record(3, 5, 300))
                .message(2, 9),
            addr,
        )
        .unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(60);
    while query("SELECT count(*) FROM flows") < 3 && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(second.terminate(Duration::from_secs(20)));
    assert_eq!(query("SELECT count(*) FROM flows"), 3);
    assert_eq!(
        query("SELECT SUM(bytes)::bigint FROM flows WHERE session_id = 9"),
        720
    );
    assert_eq!(
        query("SELECT count(*) FROM flows WHERE host(src_addr) = '10.0.0.1'"),
        3
    );
    assert!(query("SELECT COALESCE(SUM(datagrams), 0)::bigint FROM ipfix_listeners") >= 1);
}

#[test]
fn bad_ipfix_configuration_exits_64_naming_the_key() {
    for (args, key) in [
        (vec!["--ipfix-listen=udp:127.0.0.1:4739"], "ipfix_listen"),
        (vec!["--ipfix-listen=udp://0.0.0.0:4739"], "ipfix_listen"),
        (
            vec![
                "--ipfix-listen=udp://127.0.0.1:4739",
                "--ipfix-allow=exporter-1",
            ],
            "ipfix_allow",
        ),
        (
            vec![
                "--ipfix-listen=udp://127.0.0.1:4739",
                "--ipfix-template-expiry-s=10",
            ],
            "ipfix_template_expiry_s",
        ),
    ] {
        let out = std::process::Command::new(collector_bin())
            .args(&args)
            .arg("--db=sqlite://unused.db")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains(&format!("{key}:")), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
}

/// IPFIX over TLS (`tls://`), with the collector's mutual-TLS files: an
/// exporter with a certificate of the CA gets its records stored; one
/// speaking plain TCP to the same port gets nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipfix_over_mutual_tls() {
    use qosloop_testbed::harness::require_binary;
    use qosloop_testbed::need;
    use tokio::io::AsyncWriteExt;
    need!(require_binary("openssl", "openssl"));
    let dir = tempfile::tempdir().unwrap();
    qosloop_testbed::harness::test_pki(dir.path()).unwrap();
    let db = dir.path().join("flows.db");
    let url = format!("sqlite://{}", db.display());
    let config = qosloop_collector::Config {
        listen: String::new(),
        db: url.clone(),
        ipfix_listen: vec!["tls://127.0.0.1:0".into()],
        ipfix_flush_ms: 20,
        tls_cert: Some(dir.path().join("server.pem")),
        tls_key: Some(dir.path().join("server.key")),
        tls_client_ca: Some(dir.path().join("ca.pem")),
        ..qosloop_collector::Config::default()
    };
    config.validate().unwrap();
    let sink = qosloop_collector::open_sink(&url).await.unwrap();
    let collector = qosloop_collector::Collector::new(sink.clone(), &config).unwrap();
    let ingest = qosloop_collector::ipfix::Ingest::start(&config, sink, collector.writer())
        .await
        .unwrap();
    let addr = ingest.bound[0].1;
    let message = Ipfix::default()
        .set(2, &v4_template())
        .set(256, &v4_record(7, 2, 120))
        .message(0, 1);

    // Plain TCP to the TLS port: the handshake fails, nothing is stored.
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = plain.write_all(&message).await;
    let _ = plain.shutdown().await;
    drop(plain);

    let files = qosloop_exporter::TlsFiles {
        ca: dir.path().join("ca.pem"),
        cert: dir.path().join("client.pem"),
        key: dir.path().join("client.key"),
    };
    let connector =
        tokio_rustls::TlsConnector::from(qosloop_runtime::tls::client_config(&files).unwrap());
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = qosloop_runtime::tls::server_name(&addr.to_string()).unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(&message).await.unwrap();
    tls.shutdown().await.unwrap();
    drop(tls);

    let db2 = db.clone();
    let stored = tokio::task::spawn_blocking(move || {
        wait_for_value(
            &db2,
            "SELECT count(*) FROM flows",
            1,
            Duration::from_secs(10),
        )
    })
    .await
    .unwrap();
    ingest.stop().await;
    assert_eq!(stored, 1);
    let rows: Vec<(i64, i64)> =
        tokio::task::spawn_blocking(move || sqlite_query(&db, "SELECT src_port, bytes FROM flows"))
            .await
            .unwrap();
    assert_eq!(rows, vec![(7, 120)]);
}
