//! The knowledge base kept by the flow writer, on SQLite and on a real
//! PostgreSQL: host and user counters equal the sums of the records
//! written (sampling scaled), agent records teach volatile mappings that
//! expire by TTL while static ones stay until removed, records without a
//! user are stored with a mapping's user, and events come in order (logon,
//! threshold, logoff) with a wake-up for listeners.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_schema::FlowRecord;
use qosloop_store::{Batch, Db, KbConfig, KbEvent};
use qosloop_testkit::harness::Postgres;
use qosloop_testkit::need;
use std::time::Duration;

const S: i64 = 1_000_000_000;

#[tokio::test]
async fn knowledge_base_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    knowledge_base(&format!("sqlite://{}", dir.path().join("kb.db").display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knowledge_base_on_postgres() {
    need!(Postgres::available());
    let pg = Postgres::start().unwrap();
    knowledge_base(&pg.url()).await;
}

fn rec(
    src: &str,
    dst: &str,
    bytes: u64,
    user: Option<&str>,
    process: Option<&str>,
    sampling: Option<u32>,
) -> FlowRecord {
    FlowRecord {
        src_addr: src.parse().unwrap(),
        dst_addr: dst.parse().unwrap(),
        src_port: 40_000,
        dst_port: 443,
        proto: 6,
        packets: 1 + bytes / 1000,
        bytes,
        start_ns: 1,
        end_ns: 2,
        user: user.map(str::to_owned),
        process: process.map(str::to_owned),
        sampling_interval: sampling,
        ..FlowRecord::default()
    }
}

fn kinds(events: &[KbEvent]) -> Vec<(String, Option<String>)> {
    events
        .iter()
        .map(|e| (e.kind.clone(), e.user.clone()))
        .collect()
}

async fn knowledge_base(url: &str) {
    let db = Db::connect(url).await.unwrap();
    db.migrate().await.unwrap();
    let cfg = KbConfig {
        mapping_ttl_ns: 30 * S,
        host_ttl_ns: 100 * S,
        idle_ns: 10 * S,
        events_keep_ns: 1_000 * S,
    };
    // The agent on 10.0.0.5 (its exporter connects from there); a router
    // meter elsewhere.
    let agent = db
        .register_exporter("agent", "10.0.0.5:41000", 1)
        .await
        .unwrap();
    let router = db
        .register_exporter("router", "192.0.2.254:41000", 1)
        .await
        .unwrap();
    for ex in [agent, router] {
        db.open_session(ex, 1, "little").await.unwrap();
    }
    db.kb_set_threshold("*", 1_000_000).await.unwrap();
    db.kb_set_threshold("alice", 5_000).await.unwrap();
    db.kb_sync_static("ldap", &[("10.0.0.9".into(), "carol".into())], 1_000 * S)
        .await
        .unwrap();
    let mut listener = db.kb_listener().await.unwrap();
    let start = db.kb_last_event_id().await.unwrap();
    assert_eq!(start, 0);

    let mut seq = 0u32;
    let mut write = |ex: i64, records: Vec<FlowRecord>| {
        seq += 1;
        Batch {
            exporter_id: ex,
            session_id: 1,
            seq,
            records,
            dedup: true,
        }
    };
    // t = 1000 s: alice's agent records (egress and ingress of one socket),
    // an agent record whose sides are not the agent's (no mapping), and a
    // router record from carol's static address, sampled 1 in 10.
    let now = 1_000 * S;
    let b1 = write(
        agent,
        vec![
            rec(
                "10.0.0.5",
                "198.51.100.1",
                3_000,
                Some("alice"),
                Some("curl"),
                None,
            ),
            rec(
                "198.51.100.1",
                "10.0.0.5",
                1_500,
                Some("alice"),
                Some("curl"),
                None,
            ),
            rec(
                "10.9.9.9",
                "198.51.100.1",
                100,
                Some("dave"),
                Some("x"),
                None,
            ),
        ],
    );
    let b2 = write(
        router,
        vec![rec("10.0.0.9", "198.51.100.2", 200, None, None, Some(10))],
    );
    commit(&db, &[&b1, &b2], &cfg, now).await;
    // Woken by the commit (an in-process signal, and NOTIFY on PostgreSQL).
    assert!(listener.wait(Duration::from_secs(5)).await.unwrap());

    let users = db.kb_users(100).await.unwrap();
    let alice = users.iter().find(|u| u.user == "alice").unwrap();
    assert_eq!(
        (
            alice.bytes_out,
            alice.bytes_in,
            alice.packets_out,
            alice.packets_in
        ),
        (3_000, 1_500, 4, 2)
    );
    assert!(alice.online);
    assert_eq!(alice.session_bytes, 4_500);
    let carol = users.iter().find(|u| u.user == "carol").unwrap();
    assert_eq!(
        (carol.bytes_out, carol.bytes_in),
        (2_000, 0),
        "enriched, scaled ×10"
    );
    let dave = users.iter().find(|u| u.user == "dave").unwrap();
    assert_eq!(dave.bytes_out, 100);

    let hosts = db.kb_hosts(100).await.unwrap();
    let host = |a: &str| hosts.iter().find(|h| h.addr == a).unwrap().clone();
    let h = host("198.51.100.1");
    assert_eq!(
        (h.bytes_in, h.bytes_out, h.packets_in, h.packets_out),
        (3_100, 1_500, 5, 2)
    );
    assert_eq!(
        (host("10.0.0.5").bytes_out, host("10.0.0.5").bytes_in),
        (3_000, 1_500)
    );
    assert_eq!(host("198.51.100.2").bytes_in, 2_000);
    assert_eq!(host("10.0.0.5").last_seen_ns, now);

    let maps = db.kb_mappings(now, 100).await.unwrap();
    let pairs: Vec<(&str, &str, &str, bool)> = maps
        .iter()
        .map(|m| {
            (
                m.addr.as_str(),
                m.user.as_str(),
                m.source.as_str(),
                m.persistent,
            )
        })
        .collect();
    assert_eq!(
        pairs,
        [
            ("10.0.0.5", "alice", "agent", false),
            ("10.0.0.9", "carol", "ldap", true)
        ],
        "dave's record named neither side as the agent's: nothing learned"
    );
    assert_eq!(maps[0].expires_ns, Some(now + 30 * S));

    // t = 1005 s: a router record from alice's address without a user is
    // stored as alice's; it takes her over her threshold (5,000 bytes).
    let now = 1_005 * S;
    let b3 = write(
        router,
        vec![
            rec("198.51.100.7", "10.0.0.5", 700, None, None, None),
            rec("198.51.100.7", "198.51.100.8", 50, None, None, None),
        ],
    );
    commit(&db, &[&b3], &cfg, now).await;
    let stored = db.recent_flows(2).await.unwrap();
    let users_of: Vec<Option<String>> = stored
        .iter()
        .map(|r| r.record.as_ref().unwrap().user.clone())
        .collect();
    assert_eq!(
        users_of,
        [None, Some("alice".to_owned())],
        "the destination's mapping"
    );
    let alice = db
        .kb_users(100)
        .await
        .unwrap()
        .into_iter()
        .find(|u| u.user == "alice")
        .unwrap();
    assert_eq!((alice.bytes_in, alice.session_bytes), (2_200, 5_200));

    // t = 1020 s: idle for 15 s > 10 s: carol and dave (no volatile
    // mapping) log off; alice's agent mapping lives until 1030 s.
    let s = db.kb_sweep(&cfg, 1_020 * S).await.unwrap();
    assert_eq!((s.logoffs, s.mappings_expired), (2, 0));
    assert_eq!(db.kb_mappings(1_020 * S, 100).await.unwrap().len(), 2);
    // t = 1031 s: her mapping has expired; she logs off; the static one
    // stays.
    let s = db.kb_sweep(&cfg, 1_031 * S).await.unwrap();
    assert_eq!((s.logoffs, s.mappings_expired), (1, 1));
    let left = db.kb_mappings(1_031 * S, 100).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].source, "ldap");
    // A router record from alice's old address now stays without a user.
    let b4 = write(
        router,
        vec![rec("10.0.0.5", "198.51.100.1", 10, None, None, None)],
    );
    commit(&db, &[&b4], &cfg, 1_032 * S).await;
    assert_eq!(
        db.recent_flows(1).await.unwrap()[0]
            .record
            .as_ref()
            .unwrap()
            .user,
        None
    );

    let events = db.kb_events_after(start, 100).await.unwrap();
    assert_eq!(
        kinds(&events),
        [
            ("logon".into(), Some("alice".into())),
            ("logon".into(), Some("carol".into())),
            ("logon".into(), Some("dave".into())),
            ("threshold".into(), Some("alice".into())),
            ("logoff".into(), Some("carol".into())),
            ("logoff".into(), Some("dave".into())),
            ("logoff".into(), Some("alice".into())),
        ]
    );
    assert!(events.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(events[3].value, Some(5_000));
    // A logoff says when the last traffic was.
    assert_eq!(events[6].value, Some(1_005 * S));

    // A new session starts its bytes again: alice logs on anew and her
    // threshold fires again only when the new session reaches it.
    let b5 = write(
        agent,
        vec![rec(
            "10.0.0.5",
            "198.51.100.1",
            4_000,
            Some("alice"),
            Some("curl"),
            None,
        )],
    );
    commit(&db, &[&b5], &cfg, 1_040 * S).await;
    let more = db.kb_events_after(events[6].id, 100).await.unwrap();
    assert_eq!(kinds(&more), [("logon".into(), Some("alice".into()))]);

    // Hosts are volatile: none seen for 100 s survives.
    let s = db.kb_sweep(&cfg, 1_141 * S).await.unwrap();
    assert_eq!(
        s.hosts_expired as usize,
        hosts.len() + 2,
        "every host, 198.51.100.7/.8 too"
    );
    assert!(db.kb_hosts(100).await.unwrap().is_empty());
    // Users are persistent.
    assert_eq!(db.kb_users(100).await.unwrap().len(), 3);

    // Removing the LDAP entry removes its mapping.
    assert_eq!(
        db.kb_sync_static("ldap", &[], 1_200 * S).await.unwrap(),
        (0, 1)
    );
    assert!(db.kb_mappings(1_200 * S, 100).await.unwrap().is_empty());
    // A decision event goes through the same table, after the others.
    db.kb_publish("decision", None, Some("install edge/1"), 1_201 * S)
        .await
        .unwrap();
    let last = db.kb_events_after(more[0].id, 100).await.unwrap();
    assert_eq!(kinds(&last).last().unwrap().0, "decision");
    db.close().await;
}

/// One write with the knowledge base kept, at `now` (the writer stamps
/// with its clock: the test shifts the KB's view by expiring relative to
/// `now`, so it writes through the same entry point with a fixed clock).
async fn commit(db: &Db, group: &[&Batch], cfg: &KbConfig, now: i64) {
    db.commit_batches_kb_at(group, None, Some(cfg), now)
        .await
        .unwrap();
}
