//! Every typed read and write of `qosloop-store`, on both engines: SQLite in
//! a temporary directory, and a real PostgreSQL started by the test kit's
//! harness. The same assertions run on each, so a query one dialect takes
//! and the other refuses (or reads differently) fails here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_schema::{
    Decision, DecisionReason, EnforcementReport, FlowRecord, FlowSpec, Kbps, OutOfProfileAction,
    ReportOutcome, TrafficProfile,
};
use qosloop_store::{
    on_pool, Batch, Db, ExporterCounters, ListenerStats, Outcome, RateRow, TemplateUpdate,
};
use qosloop_testkit::harness::Postgres;
use qosloop_testkit::need;
use std::net::IpAddr;

#[tokio::test]
async fn every_table_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("s.db").display());
    every_table(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_table_on_postgres() {
    need!(Postgres::available());
    let pg = Postgres::start().unwrap();
    every_table(&pg.url()).await;
}

async fn every_table(url: &str) {
    let db = Db::connect(url).await.unwrap();
    let applied = db.migrate().await.unwrap();
    assert!(applied > 0);
    assert_eq!(db.migrate().await.unwrap(), 0, "a second run applies none");
    let versions = db.applied_versions().await.unwrap();
    assert_eq!(versions.len(), applied);
    assert!(versions.windows(2).all(|w| w[0] < w[1]));
    exporters(&db).await;
    flows(&db).await;
    ipfix(&db).await;
    rates(&db).await;
    user_kind_migration(&db).await;
    decisions(&db).await;
    enforcers(&db).await;
    db.close().await;
}

async fn exec(db: &Db, q: &str) -> Result<(), sqlx::Error> {
    on_pool!(db, p, D => sqlx::raw_sql(q).execute(p).await.map(|_| ()))
}

/// Migration 0012 (the `user` subject kind) keeps the rows of the tables
/// it widens — applied again here over rows, as on a database that had
/// them (PostgreSQL alters the checks, SQLite rebuilds the tables) — and
/// the checks still refuse an unknown kind.
async fn user_kind_migration(db: &Db) {
    let rows = [
        "INSERT INTO rate_partials (cluster, kind, subject, slot, node, bytes, records) \
         VALUES ('c', 'link', 'l', 3, 'n', 10.5, 2)",
        "INSERT INTO rate_state (cluster, kind, subject, window_end_ns, avg_rate_kbps, epoch, node) \
         VALUES ('c', 'flow', 'cn=r', 7, 1.5, 1, 'n')",
        "INSERT INTO rates (at_ns, interval_ns, subject, name, rate_kbps, avg_rate_kbps, records, node, epoch, computed_ns) \
         VALUES (99, 1, 'link', 'mig', 1.0, 2.0, 3, 'n', 4, 5)",
    ];
    for q in rows {
        exec(db, q).await.unwrap();
    }
    let before = scalar(db, "SELECT count(*) FROM rates").await;
    exec(db, "DELETE FROM schema_migrations WHERE version = 12")
        .await
        .unwrap();
    assert_eq!(db.migrate().await.unwrap(), 1, "0012 applied again");
    assert_eq!(scalar(db, "SELECT count(*) FROM rates").await, before);
    assert_eq!(
        scalar(
            db,
            "SELECT count(*) FROM rates WHERE name = 'mig' AND node = 'n' AND epoch = 4 AND computed_ns = 5"
        )
        .await,
        1
    );
    assert_eq!(
        scalar(
            db,
            "SELECT count(*) FROM rate_partials WHERE bytes = 10.5 AND records = 2"
        )
        .await,
        1
    );
    assert_eq!(
        scalar(
            db,
            "SELECT count(*) FROM rate_state WHERE window_end_ns = 7"
        )
        .await,
        1
    );
    exec(
        db,
        "INSERT INTO rate_partials (cluster, kind, subject, slot, node, bytes, records) \
         VALUES ('c', 'user', 'alice@cn=r', 3, 'n', 1.0, 1)",
    )
    .await
    .unwrap();
    exec(
        db,
        "INSERT INTO rate_state (cluster, kind, subject, window_end_ns, avg_rate_kbps, epoch, node) \
         VALUES ('c', 'user', 'alice@cn=r', 7, 1.0, 1, 'n')",
    )
    .await
    .unwrap();
    for q in [
        "INSERT INTO rate_partials (cluster, kind, subject, slot, node, bytes, records) \
         VALUES ('c', 'bogus', 's', 3, 'n', 1.0, 1)",
        "INSERT INTO rates (at_ns, interval_ns, subject, name, rate_kbps, avg_rate_kbps) \
         VALUES (1, 1, 'bogus', 's', 1.0, 1.0)",
    ] {
        assert!(exec(db, q).await.is_err(), "accepted: {q}");
    }
}

async fn scalar(db: &Db, q: &str) -> i64 {
    on_pool!(db, p, D => sqlx::query_scalar::<D, i64>(q).fetch_one(p).await).unwrap()
}

async fn exporters(db: &Db) {
    let a = db.register_exporter("m1", "127.0.0.1:1", 5).await.unwrap();
    let again = db.register_exporter("m1", "127.0.0.1:2", 6).await.unwrap();
    assert_eq!(a, again, "one row per name");
    let b = db.register_exporter("m2", "127.0.0.1:3", 0).await.unwrap();
    assert_ne!(a, b);
    db.open_session(a, 7, "little").await.unwrap();
    db.store_template(a, 7, 256, 1, r#"{"fields":[1,2]}"#)
        .await
        .unwrap();
    db.store_template(a, 7, 256, 2, r#"{"fields":[3]}"#)
        .await
        .unwrap();
    let templates = db.templates(a).await.unwrap();
    assert_eq!(templates.len(), 1, "a template id is replaced");
    let (session, id, json) = &templates[0];
    assert_eq!((*session, *id), (7, 256));
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(v, serde_json::json!({"fields": [3]}));
    db.stop_session(a, 7).await.unwrap();
    let stopped = scalar(
        db,
        "SELECT count(*) FROM sessions WHERE stopped_ns IS NOT NULL",
    )
    .await;
    assert_eq!(stopped, 1);
    db.open_session(a, 7, "big").await.unwrap();
    let stopped = scalar(
        db,
        "SELECT count(*) FROM sessions WHERE stopped_ns IS NOT NULL",
    )
    .await;
    assert_eq!(stopped, 0, "reopening clears stopped_ns");
}

/// Records that use every column, optional ones set and unset, both
/// address families.
fn records(n: u64, base: u64) -> Vec<FlowRecord> {
    (0..n)
        .map(|i| FlowRecord {
            src_addr: if i % 2 == 0 {
                IpAddr::from([10, 1, (i >> 8) as u8, i as u8])
            } else {
                "2001:db8::7".parse().unwrap()
            },
            dst_addr: IpAddr::from([192, 0, 2, 9]),
            src_port: 40_000 + i as u16,
            dst_port: 443,
            proto: 6,
            packets: 1 + i,
            bytes: base + i,
            start_ns: 1_700_000_000_000_000_000 + i,
            end_ns: 1_700_000_000_500_000_000 + i,
            vlan: (i % 3 == 0).then_some(100),
            dscp: (i % 4 == 0).then_some(46),
            tcp_flags: (i % 5 == 0).then_some(0x18),
            class: (i % 2 == 0).then(|| "web".to_string()),
            user: (i == 1).then(|| "bob".to_string()),
            process: (i == 2).then(|| "curl".to_string()),
            sampling_interval: (i % 7 == 0).then_some(100),
        })
        .collect()
}

async fn flows(db: &Db) {
    let ex = db.register_exporter("f1", "127.0.0.1:9", 1).await.unwrap();
    db.open_session(ex, 3, "little").await.unwrap();
    let first = db.max_flow_id().await.unwrap();
    let batch = |seq: u32, dedup: bool, base: u64| Batch {
        exporter_id: ex,
        session_id: 3,
        seq,
        records: records(1500, base),
        dedup,
    };
    let (b1, b1_again, b2) = (
        batch(1, true, 0),
        batch(1, true, 0),
        batch(2, false, 1 << 20),
    );
    let outcomes = db.commit_batches(&[&b1, &b1_again, &b2]).await.unwrap();
    assert_eq!(
        outcomes,
        [Outcome::Stored, Outcome::Duplicate, Outcome::Stored]
    );
    // A re-sent key in a later transaction is a duplicate too.
    let outcomes = db.commit_batches(&[&batch(1, true, 0)]).await.unwrap();
    assert_eq!(outcomes, [Outcome::Duplicate]);

    // Read back in pages, in id order: every record exactly as written.
    let mut read = Vec::new();
    let mut from = first + 1;
    loop {
        let page = db.flows_from(from, 700).await.unwrap();
        let Some(last) = page.last() else { break };
        from = last.id + 1;
        assert!(page.windows(2).all(|w| w[0].id < w[1].id));
        read.extend(page.into_iter().map(|r| r.record.expect("a valid row")));
    }
    let written: Vec<FlowRecord> = b1.records.iter().chain(&b2.records).cloned().collect();
    assert_eq!(read.len(), written.len());
    assert_eq!(read, written);
    assert_eq!(db.max_flow_id().await.unwrap(), from - 1);

    let recent = db.recent_flows(2).await.unwrap();
    assert_eq!(recent.len(), 2);
    assert!(recent[0].id > recent[1].id, "newest first");
    assert_eq!(recent[0].record.as_ref(), b2.records.last());

    let totals = scalar(
        db,
        "SELECT records FROM sessions WHERE exporter_id = (SELECT id FROM exporters WHERE name = 'f1')",
    )
    .await;
    assert_eq!(totals, 3000);
    let last_seq = scalar(
        db,
        "SELECT last_seq FROM sessions WHERE exporter_id = (SELECT id FROM exporters WHERE name = 'f1')",
    )
    .await;
    assert_eq!(last_seq, 2);
    let hashed = scalar(db, "SELECT count(*) FROM flows WHERE flow_hash IS NOT NULL").await;
    assert_eq!(hashed, 3000, "every row carries its flow hash");
}

async fn ipfix(db: &Db) {
    let name = qosloop_store::udp_exporter_name("192.0.2.1:2055".parse().unwrap());
    let ex = db
        .register_exporter(&name, "192.0.2.1:2055", 0)
        .await
        .unwrap();
    let update = |definition: Option<&str>, seen_ns| TemplateUpdate {
        exporter_id: ex,
        domain: 1,
        template_id: 300,
        version: 10,
        definition: definition.map(str::to_string),
        seen_ns,
    };
    db.store_ipfix_templates(&[update(Some("ipfix data 0 8:4 12:4"), 100)])
        .await
        .unwrap();
    let loaded = db.load_ipfix_templates(10).await.unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(
        (
            loaded[0].exporter,
            loaded[0].domain,
            loaded[0].template_id,
            loaded[0].definition.as_str(),
            loaded[0].seen_ns
        ),
        (
            "192.0.2.1:2055".parse().unwrap(),
            1,
            300,
            "ipfix data 0 8:4 12:4",
            100
        )
    );
    // An expiry older than the last write keeps the row; a newer one drops it.
    db.store_ipfix_templates(&[update(None, 50)]).await.unwrap();
    assert_eq!(db.load_ipfix_templates(10).await.unwrap().len(), 1);
    db.store_ipfix_templates(&[update(None, 100)])
        .await
        .unwrap();
    assert!(db.load_ipfix_templates(10).await.unwrap().is_empty());

    let mut counters = ExporterCounters {
        exporter_id: ex,
        version: 10,
        domain: Some(1),
        messages: 5,
        records: 50,
        dropped: 2,
        drops: vec![("bad_length", 2)],
        ..ExporterCounters::default()
    };
    db.store_ipfix_stats(std::slice::from_ref(&counters))
        .await
        .unwrap();
    counters.messages = 9;
    counters.drops = vec![("bad_length", 3), ("no_template", 0)];
    db.store_ipfix_stats(&[counters]).await.unwrap();
    assert_eq!(
        scalar(db, "SELECT messages FROM ipfix_exporter_stats").await,
        9,
        "counters are replaced, not added"
    );
    assert_eq!(
        scalar(
            db,
            "SELECT count FROM ipfix_drops WHERE reason = 'bad_length'"
        )
        .await,
        3
    );
    assert_eq!(scalar(db, "SELECT count(*) FROM ipfix_drops").await, 2);

    let listener = ListenerStats {
        datagrams: 10,
        bytes: 1000,
        kernel_drops: 1,
        ..ListenerStats::default()
    };
    db.store_ipfix_listener("0.0.0.0:2055", &listener)
        .await
        .unwrap();
    db.store_ipfix_listener(
        "0.0.0.0:2055",
        &ListenerStats {
            datagrams: 12,
            ..listener
        },
    )
    .await
    .unwrap();
    assert_eq!(
        scalar(db, "SELECT datagrams FROM ipfix_listeners").await,
        12
    );
}

async fn rates(db: &Db) {
    let row = |at_ns, subject: &str, name: &str, avg| RateRow {
        at_ns,
        interval_ns: 1_000_000_000,
        subject: subject.into(),
        name: name.into(),
        rate_kbps: avg * 2.0,
        avg_rate_kbps: avg,
        records: 4,
    };
    let rows: Vec<RateRow> = (0..2500)
        .map(|i| row(i, "flow", &format!("f{}", i % 3), i as f64))
        .chain([row(10, "link", "l1", 5.0)])
        // A user of a per-user rule (migration 0012 allows the kind).
        .chain([row(11, "user", "alice@cn=r", 7.0)])
        .collect();
    db.insert_rates(&rows).await.unwrap();
    let recent = db.recent_rates(2).await.unwrap();
    assert_eq!(recent, [rows[2501].clone(), rows[2500].clone()]);
    let mut averages = db.latest_averages(0).await.unwrap();
    averages.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(
        averages,
        [
            ("user".into(), "alice@cn=r".into(), 7.0),
            ("flow".into(), "f0".into(), 2499.0),
            ("flow".into(), "f1".into(), 2497.0),
            ("flow".into(), "f2".into(), 2498.0),
            ("link".into(), "l1".into(), 5.0),
        ]
    );
    assert!(db.latest_averages(1_000_000).await.unwrap().is_empty());
}

fn decision(id: u64, version: u64, action: OutOfProfileAction) -> Decision {
    Decision {
        id,
        version,
        role: "edge".into(),
        policy_dn: "cn=gold,ou=policies".into(),
        flow: FlowSpec {
            src: None,
            dst: None,
            proto: Some(17),
            src_ports: None,
            dst_ports: None,
            user: None,
        },
        profile: TrafficProfile {
            rate: Kbps(1000),
            burst_bytes: 15_000,
        },
        in_profile_dscp: None,
        out_of_profile: action,
        reason: DecisionReason {
            rate_kbps: 1200.0,
            avg_rate_kbps: 1100.5,
            link: "l1".into(),
            link_load_kbps: 9000.0,
            band: "high".into(),
        },
        issued_ns: 1_700_000_000_000_000_000 + version,
    }
}

async fn decisions(db: &Db) {
    let keep = decision(1, 2, OutOfProfileAction::Drop);
    let old = decision(1, 1, OutOfProfileAction::Accept { shape: None });
    let gone = decision(2, 1, OutOfProfileAction::Drop);
    db.insert_decisions(&[&old, &gone], &[]).await.unwrap();
    db.insert_decisions(&[&keep], &[&gone]).await.unwrap();
    assert_eq!(
        db.latest_decisions().await.unwrap(),
        std::slice::from_ref(&keep)
    );
    let recent = db.recent_decisions(10).await.unwrap();
    let kinds: Vec<&str> = recent.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(kinds, ["remove", "drop", "drop", "accept"]);
    let body: Decision = serde_json::from_str(&recent[1].3).unwrap();
    assert_eq!(body, keep);
}

async fn enforcers(db: &Db) {
    let roles = ["edge".to_string(), "core".to_string()];
    db.upsert_enforcer("pep-1", &roles, "127.0.0.1:1", "connected")
        .await
        .unwrap();
    db.upsert_enforcer("pep-2", &roles[..1], "127.0.0.1:2", "closed")
        .await
        .unwrap();
    let rows = db.enforcers().await.unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (
            rows[0].name.as_str(),
            rows[0].roles.as_str(),
            rows[0].state.as_str()
        ),
        ("pep-1", "edge,core", "connected")
    );
    let report = |decision_id, outcome| EnforcementReport {
        decision_id,
        version: 2,
        outcome,
        reconfig_ns: 1234,
        at_ns: 99,
    };
    db.insert_report("pep-1", &report(1, ReportOutcome::Installed))
        .await
        .unwrap();
    db.insert_report(
        "pep-1",
        &report(
            3,
            ReportOutcome::Failed {
                reason: "no such device".into(),
            },
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        db.reports("pep-1").await.unwrap(),
        [(1, 2, "installed".into()), (3, 2, "failed".into())]
    );
    // Only the disconnected one goes.
    assert_eq!(db.prune_enforcers(0, i64::MAX).await.unwrap(), 1);
    let names: Vec<String> = db
        .enforcers()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, ["pep-1"]);

    db.insert_audit(5, "ldap", "cn=gold,ou=policies", "modify", Some("rate"))
        .await
        .unwrap();
    db.insert_audit(6, "ldap", "cn=x", "reject", None)
        .await
        .unwrap();
    assert_eq!(scalar(db, "SELECT count(*) FROM policy_audit").await, 2);
}
