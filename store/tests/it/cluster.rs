//! The collector cluster's tables on a real PostgreSQL: joining and the
//! refusal of another routing configuration, leases on the database's
//! clock, epochs by rendezvous hashing, fencing of the owners' writes, the
//! partial sums added with the records, the published policy.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_schema::bandwidth::{Classifier, SubjectKind};
use qosloop_schema::{BusinessRule, FlowRecord, FlowSpec, Kbps, Link, PolicySet};
use qosloop_store::{Batch, ClusterError, Db, OwnerRate, RoutingConfig, Tally};
use qosloop_testkit::harness::Postgres;
use qosloop_testkit::need;
use std::sync::Arc;
use std::time::Duration;

fn policy() -> PolicySet {
    PolicySet {
        rules: vec![BusinessRule {
            dn: "cn=r".into(),
            name: "r".into(),
            priority: 1,
            enabled: true,
            roles: vec![],
            flows: vec![FlowSpec {
                proto: Some(17),
                ..Default::default()
            }],
            users: vec![],
            per_user: false,
            band_basis: Default::default(),
            service_class: "gold".into(),
            link: "l".into(),
        }],
        links: vec![Link {
            dn: "cn=l".into(),
            name: "l".into(),
            capacity: Kbps(1000),
            traffic: vec![],
        }],
        ..Default::default()
    }
}

fn rate(bucket: u32, prev: Option<i64>, end: i64) -> OwnerRate {
    OwnerRate {
        kind: SubjectKind::Flow,
        subject: "cn=r".into(),
        name: "r".into(),
        bucket,
        previous_end_ns: prev,
        window_end_ns: end,
        interval_ns: 1_000_000_000,
        rate_kbps: 8.0,
        avg_rate_kbps: 8.0,
        records: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_ownership_fencing_and_partials_on_postgres() {
    need!(Postgres::available());
    let pg = Postgres::start().unwrap();
    let db = Db::connect(&pg.url()).await.unwrap();
    db.migrate().await.unwrap();
    let routing = RoutingConfig::default();
    let lease = Duration::from_millis(600);
    db.cluster_join("c", "a", "127.0.0.1:1", &routing, lease)
        .await
        .unwrap();
    db.cluster_join("c", "b", "127.0.0.1:2", &routing, lease)
        .await
        .unwrap();

    // Another routing configuration is refused, naming the difference.
    let mut other = routing.clone();
    other.buckets = 32;
    let e = db
        .cluster_join("c", "x", "127.0.0.1:3", &other, lease)
        .await
        .unwrap_err();
    assert!(
        matches!(e, ClusterError::Refused { .. })
            && e.to_string().contains("buckets: cluster 64, this node 32"),
        "{e}"
    );
    assert!(db
        .cluster_members("c")
        .await
        .unwrap()
        .iter()
        .all(|m| m.node != "x"));

    // Epoch 1 over {a, b}; calling again changes nothing.
    let e1 = db.cluster_rebalance("c", routing.buckets).await.unwrap();
    assert_eq!(
        (e1.epoch, e1.members.clone()),
        (1, vec!["a".to_owned(), "b".to_owned()])
    );
    assert_eq!(e1.owners.len(), 64);
    assert_eq!(db.cluster_rebalance("c", 64).await.unwrap(), e1);
    let bucket = qosloop_store::bucket_of("flow", "cn=r", 64);
    let owner = e1.owners[bucket as usize].clone();
    let other_node = if owner == "a" { "b" } else { "a" };

    // Only the owner writes; a window is written once.
    let e = db
        .write_owner_rates("c", other_node, 1, &[rate(bucket, None, 1_000)])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("does not own bucket"), "{e}");
    assert_eq!(
        db.write_owner_rates("c", &owner, 1, &[rate(bucket, None, 1_000)])
            .await
            .unwrap(),
        1
    );
    let e = db
        .write_owner_rates("c", &owner, 1, &[rate(bucket, None, 1_000)])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("moved on"), "{e}");
    db.write_owner_rates("c", &owner, 1, &[rate(bucket, Some(1_000), 2_000)])
        .await
        .unwrap();

    // The owner's lease lapses (no renewal): its writes are fenced at once,
    // on the database's clock, before anyone rebalances.
    let keep = async {
        for _ in 0..8 {
            db.cluster_renew("c", other_node, "127.0.0.1:9", lease)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    };
    keep.await;
    let e = db
        .write_owner_rates("c", &owner, 1, &[rate(bucket, Some(2_000), 3_000)])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no valid lease"), "{e}");
    let e2 = db.cluster_rebalance("c", 64).await.unwrap();
    assert_eq!(
        (e2.epoch, e2.members.clone()),
        (2, vec![other_node.to_owned()])
    );
    assert!(e2.owners.iter().all(|o| o == other_node));
    // The old owner comes back: it is fenced in the old epoch, and the new
    // owner continues the persisted state.
    assert!(!db
        .cluster_renew("c", &owner, "127.0.0.1:1", lease)
        .await
        .unwrap());
    let e = db
        .write_owner_rates("c", &owner, 1, &[rate(bucket, Some(2_000), 3_000)])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not the newest"), "{e}");
    let states = db.rate_states("c").await.unwrap();
    assert_eq!(
        states[&(SubjectKind::Flow, "cn=r".to_owned())].window_end_ns,
        2_000
    );
    let e3 = db.cluster_rebalance("c", 64).await.unwrap();
    assert_eq!(e3.epoch, 3);
    let new_owner = e3.owners[bucket as usize].clone();
    db.write_owner_rates("c", &new_owner, 3, &[rate(bucket, Some(2_000), 3_000)])
        .await
        .unwrap();
    // A clean leave moves the buckets at the next rebalance.
    db.cluster_leave("c", "a").await.unwrap();
    let e4 = db.cluster_rebalance("c", 64).await.unwrap();
    assert_eq!(e4.members, vec!["b".to_owned()]);

    // Partial sums are added in the transaction of the records, once.
    let ex = db.register_exporter("m", "127.0.0.1:5", 1).await.unwrap();
    db.open_session(ex, 1, "little").await.unwrap();
    let tally = Tally {
        cluster: "c".into(),
        node: "b".into(),
        width_ns: 1_000_000_000,
        classifier: Arc::new(Classifier::new(&policy())),
    };
    let rec = FlowRecord {
        src_addr: "10.0.0.1".parse().unwrap(),
        dst_addr: "10.0.0.2".parse().unwrap(),
        proto: 17,
        bytes: 1000,
        packets: 1,
        start_ns: 10_000_000_000,
        end_ns: 10_500_000_000,
        ..Default::default()
    };
    let batch = Batch {
        exporter_id: ex,
        session_id: 1,
        seq: 1,
        records: vec![rec.clone(); 4],
        dedup: true,
    };
    db.commit_batches_tallied(&[&batch], Some(&tally))
        .await
        .unwrap();
    db.commit_batches_tallied(&[&batch], Some(&tally))
        .await
        .unwrap();
    let sums = db.combined_partials("c", 0, 100).await.unwrap();
    assert_eq!(
        sums,
        vec![
            (SubjectKind::Flow, "cn=r".to_owned(), 10, 4000.0, 4),
            (SubjectKind::Link, "l".to_owned(), 10, 4000.0, 4)
        ],
        "the re-sent message is neither stored nor summed again"
    );

    // The published policy's version moves only when it changes.
    let body = serde_json::to_string(&policy()).unwrap();
    let v1 = db.publish_policy(&body).await.unwrap();
    assert_eq!(db.publish_policy(&body).await.unwrap(), v1);
    let v2 = db.publish_policy("{}").await.unwrap();
    assert_eq!(v2, v1 + 1);
    assert_eq!(
        db.published_policy().await.unwrap(),
        Some((v2, "{}".to_owned()))
    );
    db.close().await;
}

/// Rows of `rate_partials` for a subject, by slot.
async fn partial_slots(db: &Db, kind: &str, subject: &str) -> Vec<i64> {
    let Db::Postgres(pool) = db else {
        unreachable!("the cluster runs on PostgreSQL")
    };
    let rows: Vec<(i64,)> = qosloop_store::sqlx::query_as(
        "SELECT slot FROM rate_partials WHERE kind = $1 AND subject = $2 ORDER BY slot, node",
    )
    .bind(kind)
    .bind(subject)
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().map(|(s,)| s).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumed_partials_are_pruned_in_batches_on_postgres() {
    need!(Postgres::available());
    let pg = Postgres::start().unwrap();
    let db = Db::connect(&pg.url()).await.unwrap();
    db.migrate().await.unwrap();
    let routing = RoutingConfig::default();
    let lease = Duration::from_secs(30);
    db.cluster_join("c", "a", "127.0.0.1:1", &routing, lease)
        .await
        .unwrap();
    let e1 = db.cluster_rebalance("c", 64).await.unwrap();
    let bucket = qosloop_store::bucket_of("flow", "cn=r", 64);
    let ex = db.register_exporter("m", "127.0.0.1:5", 1).await.unwrap();
    db.open_session(ex, 1, "little").await.unwrap();
    // Two receiving nodes' partial sums of slots 10..=19 (one record of
    // 1000 bytes inside each slot), for the rule and its link.
    for (node, seq) in [("a", 1), ("b", 2)] {
        let tally = Tally {
            cluster: "c".into(),
            node: node.into(),
            width_ns: 1_000_000_000,
            classifier: Arc::new(Classifier::new(&policy())),
        };
        let records = (10..20u64)
            .map(|s| FlowRecord {
                src_addr: "10.0.0.1".parse().unwrap(),
                dst_addr: "10.0.0.2".parse().unwrap(),
                proto: 17,
                bytes: 1000,
                packets: 1,
                start_ns: s * 1_000_000_000 + 100_000_000,
                end_ns: s * 1_000_000_000 + 900_000_000,
                ..Default::default()
            })
            .collect();
        let batch = Batch {
            exporter_id: ex,
            session_id: 1,
            seq,
            records,
            dedup: true,
        };
        db.commit_batches_tallied(&[&batch], Some(&tally))
            .await
            .unwrap();
    }
    let all: Vec<i64> = (10..20).flat_map(|s| [s, s]).collect();
    assert_eq!(partial_slots(&db, "flow", "cn=r").await, all);
    let later = db.combined_partials("c", 15, 19).await.unwrap();

    // Nothing consumed yet: nothing pruned (the horizon is far).
    let far = Duration::from_secs(100 * 365 * 86_400);
    let p = db
        .prune_rate_partials("c", 1_000_000_000, far, 3, 100)
        .await
        .unwrap();
    assert_eq!((p.rows, p.ran), (0, true));

    // The owner computed windows 10..=14: those slots of the rule (both
    // nodes' rows) are consumed and go, in batches of 3 rows.
    let mut prev = None;
    let rows: Vec<OwnerRate> = (10..15)
        .map(|s| {
            let end = (s + 1) * 1_000_000_000;
            let r = rate(bucket, prev, end);
            prev = Some(end);
            r
        })
        .collect();
    db.write_owner_rates("c", "a", e1.epoch, &rows[..1])
        .await
        .unwrap();
    // After the first window only slot 10's two rows are consumed.
    let p = db
        .prune_rate_partials("c", 1_000_000_000, far, 3, 1)
        .await
        .unwrap();
    assert_eq!(p.rows, 2);
    db.write_owner_rates("c", "a", e1.epoch, &rows[1..])
        .await
        .unwrap();
    let p = db
        .prune_rate_partials("c", 1_000_000_000, far, 3, 1)
        .await
        .unwrap();
    assert_eq!(p.rows, 3, "one batch of at most 3 rows");
    let p = db
        .prune_rate_partials("c", 1_000_000_000, far, 3, 100)
        .await
        .unwrap();
    assert_eq!(p.rows, 5, "the rest of slots 11..=14, in more batches");
    let kept: Vec<i64> = (15..20).flat_map(|s| [s, s]).collect();
    assert_eq!(partial_slots(&db, "flow", "cn=r").await, kept);
    assert_eq!(
        partial_slots(&db, "link", "l").await,
        all,
        "the link has no owner state and is inside the horizon"
    );
    // The windows still to compute read the same sums as before.
    let now = db.combined_partials("c", 15, 19).await.unwrap();
    assert_eq!(now, later);

    // Past the horizon, rows of subjects nobody measures go; the rule's
    // unconsumed rows stay whatever their age.
    let p = db
        .prune_rate_partials("c", 1_000_000_000, Duration::from_secs(60), 1000, 10)
        .await
        .unwrap();
    assert_eq!(p.rows, 20);
    assert!(partial_slots(&db, "link", "l").await.is_empty());
    assert_eq!(partial_slots(&db, "flow", "cn=r").await, kept);

    // Another node pruning at the same moment skips the run.
    let Db::Postgres(pool) = &db else {
        unreachable!()
    };
    let mut holder = pool.begin().await.unwrap();
    qosloop_store::sqlx::query("SELECT pg_advisory_xact_lock(7347303)")
        .execute(&mut *holder)
        .await
        .unwrap();
    let p = db
        .prune_rate_partials("c", 1_000_000_000, far, 3, 100)
        .await
        .unwrap();
    assert_eq!((p.rows, p.ran), (0, false));
    holder.rollback().await.unwrap();
    db.close().await;
}

/// Per-user subjects (migration 0012): a per-user rule's records are
/// summed per user (kind `user`, key `user@rule DN`), not for the rule;
/// the owner's state and `rates` row of a user subject are written under
/// fencing like a rule's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_subjects_are_summed_and_written_on_postgres() {
    need!(Postgres::available());
    let pg = Postgres::start().unwrap();
    let db = Db::connect(&pg.url()).await.unwrap();
    db.migrate().await.unwrap();
    let mut policy = policy();
    policy.rules[0].per_user = true;
    policy.rules[0].users = vec!["alice".into(), "bob".into()];
    let routing = RoutingConfig::default();
    db.cluster_join("c", "a", "127.0.0.1:1", &routing, Duration::from_secs(30))
        .await
        .unwrap();
    let e1 = db.cluster_rebalance("c", routing.buckets).await.unwrap();
    let ex = db.register_exporter("m", "127.0.0.1:5", 1).await.unwrap();
    db.open_session(ex, 1, "little").await.unwrap();
    let tally = Tally {
        cluster: "c".into(),
        node: "a".into(),
        width_ns: 1_000_000_000,
        classifier: Arc::new(Classifier::new(&policy)),
    };
    let rec = |user: Option<&str>, bytes| FlowRecord {
        src_addr: "10.0.0.1".parse().unwrap(),
        dst_addr: "10.0.0.2".parse().unwrap(),
        proto: 17,
        bytes,
        packets: 1,
        start_ns: 10_000_000_000,
        end_ns: 10_500_000_000,
        user: user.map(str::to_owned),
        ..Default::default()
    };
    let batch = Batch {
        exporter_id: ex,
        session_id: 1,
        seq: 1,
        records: vec![
            rec(Some("alice"), 1000),
            rec(Some("alice"), 500),
            rec(Some("bob"), 300),
            rec(Some("carol"), 7),
            rec(None, 11),
        ],
        dedup: true,
    };
    db.commit_batches_tallied(&[&batch], Some(&tally))
        .await
        .unwrap();
    let mut sums = db.combined_partials("c", 0, 100).await.unwrap();
    sums.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    assert_eq!(
        sums,
        vec![
            (SubjectKind::Link, "l".to_owned(), 10, 1818.0, 5),
            (SubjectKind::User, "alice@cn=r".to_owned(), 10, 1500.0, 2),
            (SubjectKind::User, "bob@cn=r".to_owned(), 10, 300.0, 1),
        ],
        "each user of the per-user rule summed apart, the rule itself not a subject"
    );

    let key = qosloop_schema::bandwidth::user_subject("cn=r", "alice");
    let bucket = qosloop_store::bucket_of("user", &key, routing.buckets);
    let row = OwnerRate {
        kind: SubjectKind::User,
        subject: key.clone(),
        name: key.clone(),
        bucket,
        previous_end_ns: None,
        window_end_ns: 11_000_000_000,
        interval_ns: 1_000_000_000,
        rate_kbps: 12.0,
        avg_rate_kbps: 12.0,
        records: 2,
    };
    db.write_owner_rates("c", "a", e1.epoch, std::slice::from_ref(&row))
        .await
        .unwrap();
    let states = db.rate_states("c").await.unwrap();
    assert_eq!(
        states[&(SubjectKind::User, key.clone())].window_end_ns,
        11_000_000_000
    );
    let rows = db.owner_rates_after(0, 10).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].1.subject.as_str(), rows[0].1.name.as_str()),
        ("user", "alice@cn=r")
    );
    assert_eq!(rows[0].1.avg_rate_kbps, 12.0);
    db.close().await;
}
