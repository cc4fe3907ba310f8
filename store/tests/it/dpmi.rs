//! The DPMI tables' typed reads and writes on both engines (SQLite in a
//! temporary directory, PostgreSQL from the test kit's harness).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_store::{Db, DeliveryRow, FilterRow, PointRow, PointStatus, RequestRow};
use qosloop_testkit::harness::Postgres;
use qosloop_testkit::need;

#[tokio::test]
async fn dpmi_tables_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("s.db").display());
    dpmi_tables(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpmi_tables_on_postgres() {
    need!(Postgres::available());
    let pg = Postgres::start().unwrap();
    dpmi_tables(&pg.url()).await;
}

async fn dpmi_tables(url: &str) {
    let db = Db::connect(url).await.unwrap();
    db.migrate().await.unwrap();
    let point = PointRow {
        name: "mp1".into(),
        interface: "eth0".into(),
        max_filters: 2,
        max_caplen: 128,
        registered_ns: 1,
        seen_ns: 1,
        installed_version: None,
        install_error: None,
        frames: 0,
        matched: 0,
        kernel_drops: 0,
    };
    db.upsert_dpmi_point(&point).await.unwrap();
    let status = PointStatus {
        installed_version: Some("v1"),
        install_error: Some("too big"),
        frames: 10,
        matched: 7,
        kernel_drops: 2,
    };
    db.set_dpmi_point_status("mp1", &status, 5).await.unwrap();
    let points = db.dpmi_points().await.unwrap();
    assert_eq!(points.len(), 1);
    assert_eq!(points[0].install_error.as_deref(), Some("too big"));
    assert_eq!(points[0].seen_ns, 5);
    assert_eq!(
        (points[0].frames, points[0].matched, points[0].kernel_drops),
        (10, 7, 2)
    );

    let mut r = RequestRow {
        id: 0,
        owner: "alice".into(),
        points: r#"["mp1"]"#.into(),
        filter: r#"{"ip_proto":"0x06"}"#.into(),
        consumer: "127.0.0.1:9".into(),
        delivery: "packets".into(),
        caplen: 96,
        anonymise: true,
        start_ns: 10,
        stop_ns: 100,
        created_ns: 5,
        ended_ns: None,
    };
    let id1 = db.insert_dpmi_request(&r).await.unwrap();
    r.owner = "bob".into();
    r.anonymise = false;
    let id2 = db.insert_dpmi_request(&r).await.unwrap();
    assert!(id2 > id1);
    let live = db.dpmi_requests_live(50).await.unwrap();
    assert_eq!(
        live.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![id1, id2]
    );
    assert!(live[0].anonymise && !live[1].anonymise);
    assert!(db.dpmi_requests_live(100).await.unwrap().is_empty());
    assert!(db.end_dpmi_request(id1, 20).await.unwrap());
    assert!(!db.end_dpmi_request(id1, 21).await.unwrap());
    assert_eq!(
        db.dpmi_request(id1).await.unwrap().unwrap().ended_ns,
        Some(20)
    );
    assert_eq!(db.dpmi_requests_live(50).await.unwrap().len(), 1);
    let mine = db.dpmi_requests_of("bob", 10).await.unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].id, id2);

    let row = |position| FilterRow {
        position,
        version: "v2".into(),
        filter: "{}".into(),
        consumers: "[]".into(),
        requests: format!("[{id2}]"),
        widened: position == 1,
        computed_ns: 7,
    };
    db.replace_dpmi_filters("mp1", &[row(0), row(1)])
        .await
        .unwrap();
    db.replace_dpmi_filters("mp1", &[row(0), row(1)])
        .await
        .unwrap();
    let filters = db.dpmi_filters("mp1").await.unwrap();
    assert_eq!(filters, vec![row(0), row(1)]);
    db.replace_dpmi_filters("mp1", &[]).await.unwrap();
    assert!(db.dpmi_filters("mp1").await.unwrap().is_empty());

    let mut d = DeliveryRow {
        point: "mp1".into(),
        consumer: "127.0.0.1:9".into(),
        delivered: 3,
        bytes: 300,
        dropped_full: 1,
        dropped_disconnected: 2,
        connected: true,
        error: None,
        updated_ns: 9,
    };
    db.upsert_dpmi_deliveries(std::slice::from_ref(&d))
        .await
        .unwrap();
    d.delivered = 4;
    d.error = Some("reset".into());
    db.upsert_dpmi_deliveries(std::slice::from_ref(&d))
        .await
        .unwrap();
    assert_eq!(db.dpmi_deliveries("127.0.0.1:9").await.unwrap(), vec![d]);
    assert!(db.dpmi_deliveries("other:1").await.unwrap().is_empty());
    db.close().await;
}
