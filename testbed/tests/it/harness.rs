//! The test harness against the real thing: PostgreSQL started from
//! Debian's binaries, the kernel's network namespaces.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_schema::sql::{migrations, Dialect};
use qosloop_store::Db;
use qosloop_testbed::harness::{require_binary, require_root, Netns, Postgres, VethPair};
use qosloop_testbed::need;
use std::net::UdpSocket;
use std::time::Duration;

#[tokio::test]
async fn migrations_apply_on_postgres_and_a_second_run_changes_nothing() {
    need!(Postgres::available());
    let pg = tokio::task::spawn_blocking(Postgres::start)
        .await
        .unwrap()
        .unwrap();
    let db = Db::connect(&pg.url()).await.unwrap();
    assert_eq!(
        db.migrate().await.unwrap(),
        migrations(Dialect::Postgres).len()
    );
    let tables = db.tables().await.unwrap();
    assert_eq!(db.migrate().await.unwrap(), 0);
    assert_eq!(db.tables().await.unwrap(), tables);
    for t in [
        "flows",
        "exporters",
        "sessions",
        "templates",
        "data_messages",
        "rates",
        "decisions",
        "enforcers",
        "enforcement_reports",
        "policy_audit",
        "cluster_members",
    ] {
        assert!(
            tables.iter().any(|x| x == t),
            "missing table {t} in {tables:?}"
        );
    }
    let versions = db.applied_versions().await.unwrap();
    assert_eq!(versions.len(), migrations(Dialect::Postgres).len());
    db.close().await;
}

#[tokio::test]
async fn postgres_flows_are_partitioned_by_day_and_retention_drops_partitions() {
    need!(Postgres::available());
    let pg = tokio::task::spawn_blocking(Postgres::start)
        .await
        .unwrap()
        .unwrap();
    let db = Db::connect(&pg.url()).await.unwrap();
    db.migrate().await.unwrap();
    let Db::Postgres(pool) = &db else {
        unreachable!()
    };
    let day: i64 = 86_400_000_000_000;
    let t0 = 20_000 * day + 5;
    // A row lands in the default partition, then moves into the day's own.
    sqlx::query(
        "INSERT INTO flows (exporter_id, session_id, seq, src_addr, dst_addr, src_port, dst_port, proto, packets, bytes, start_ns, end_ns) \
         VALUES (1, 1, 1, '10.0.0.1', '10.0.0.2', 1, 2, 17, 1, 100, $1, $1)",
    )
    .bind(t0)
    .execute(pool)
    .await
    .unwrap();
    let made: (i32,) = sqlx::query_as("SELECT qosloop_ensure_flow_partitions($1, $2)")
        .bind(t0)
        .bind(20_002 * day)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(made.0, 2);
    let in_default: (i64,) = sqlx::query_as("SELECT count(*) FROM flows_default")
        .fetch_one(pool)
        .await
        .unwrap();
    let in_day: (i64,) = sqlx::query_as("SELECT count(*) FROM flows_d20000")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!((in_default.0, in_day.0), (0, 1));
    let again: (i32,) = sqlx::query_as("SELECT qosloop_ensure_flow_partitions($1, $2)")
        .bind(t0)
        .bind(20_002 * day)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(again.0, 0, "partitions are created once");
    let dropped: (i32,) = sqlx::query_as("SELECT qosloop_drop_flow_partitions($1)")
        .bind(20_001 * day)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(dropped.0, 1, "only the day that ended is dropped");
    let left: (i64,) = sqlx::query_as("SELECT count(*) FROM flows")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(left.0, 0);
    db.close().await;
}

#[tokio::test]
async fn postgres_survives_a_restart_on_the_same_url() {
    need!(Postgres::available());
    let mut pg = tokio::task::spawn_blocking(Postgres::start)
        .await
        .unwrap()
        .unwrap();
    let url = pg.url();
    let db = Db::connect(&url).await.unwrap();
    db.migrate().await.unwrap();
    db.close().await;
    let pg2 = tokio::task::spawn_blocking(move || {
        pg.restart().unwrap();
        pg
    })
    .await
    .unwrap();
    let db = Db::connect(&pg2.url()).await.unwrap();
    assert_eq!(
        db.migrate().await.unwrap(),
        0,
        "the schema outlived the restart"
    );
    db.close().await;
}

#[test]
fn a_namespace_pair_passes_a_packet_and_is_deleted() {
    need!(require_root("creates network namespaces"));
    need!(require_binary("ip", "iproute2"));
    let names;
    {
        let a = Netns::create("a").unwrap();
        let b = Netns::create("b").unwrap();
        names = (a.name().to_owned(), b.name().to_owned());
        VethPair::connect(&a, "10.199.0.1/30", &b, "10.199.0.2/30").unwrap();
        let receiver = b
            .run_in(|| {
                let s = UdpSocket::bind("10.199.0.2:4055").unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                s
            })
            .unwrap();
        a.run_in(|| {
            let s = UdpSocket::bind("10.199.0.1:0").unwrap();
            // A handful of sends covers ARP resolution on the fresh link.
            for _ in 0..3 {
                s.send_to(b"qosloop", "10.199.0.2:4055").unwrap();
            }
        })
        .unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = receiver.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"qosloop");
        assert_eq!(from.ip().to_string(), "10.199.0.1");
    }
    let list = String::from_utf8(
        std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        !list.contains(&names.0) && !list.contains(&names.1),
        "namespaces left behind: {list}"
    );
}

#[test]
fn a_taken_namespace_name_is_a_clear_error() {
    need!(require_root("creates network namespaces"));
    let a = Netns::create("dup").unwrap();
    let err = Netns::create_named(a.name()).unwrap_err().to_string();
    assert!(err.contains(a.name()), "{err}");
}
