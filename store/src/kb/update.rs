//! The knowledge base's share of a flow write, inside the writer's
//! transaction: before the rows, the mappings agent records teach and the
//! enrichment of records without a user; after them, the host and user
//! counters and the events they cause. Also the sweep and the event insert
//! shared with [`Db::kb_publish`](crate::Db::kb_publish).
//!
//! The SQL is written once in [`kb_dialect!`] and instantiated for each
//! engine's transaction type (`kb_sqlite`, `kb_pg`). Rows are locked in
//! key order (addresses, users sorted) so that writers touching the same
//! keys do not deadlock; event inserts come last, under a transaction
//! advisory lock on PostgreSQL, so event ids follow commit order.

use super::KbConfig;
use crate::dialect::i64_of;
use crate::flows::Batch;
use qosloop_schema::FlowRecord;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

/// The advisory lock that serialises event inserts on PostgreSQL.
const EVENTS_LOCK: i64 = 7_347_308;

/// Addresses per `IN (…)` lookup, rows per multi-row upsert.
const CHUNK: usize = 200;

/// Which counters of its user a record adds to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    /// The user's address is the source (or the side cannot be told).
    Out,
    /// The user's address is the destination.
    In,
}

/// An event to insert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NewEvent {
    pub kind: &'static str,
    pub user: Option<String>,
    pub addr: Option<String>,
    pub value: Option<i64>,
    pub detail: Option<String>,
}

/// What the part before the rows decided.
#[derive(Debug, Default)]
pub(crate) struct Prepared {
    /// The batches with users filled in, when any record got one.
    pub enriched: Option<Vec<Batch>>,
    /// Per batch, per record: the side of its user.
    pub sides: Vec<Vec<Side>>,
}

/// Wakes this process's listeners (every process has the channel; on
/// SQLite it is the only wake-up, on PostgreSQL NOTIFY reaches the rest).
pub(crate) fn signal() {
    let _ = super::listen::local().send(());
}

fn scaled(v: u64, r: &FlowRecord) -> i64 {
    i64_of(qosloop_schema::bandwidth::scale(v, r.sampling_interval))
}

/// Counters: bytes in, bytes out, packets in, packets out.
type Counts = [i64; 4];

fn add(c: &mut Counts, side: Side, bytes: i64, packets: i64) {
    let (b, p) = match side {
        Side::In => (0, 2),
        Side::Out => (1, 3),
    };
    c[b] = c[b].saturating_add(bytes);
    c[p] = c[p].saturating_add(packets);
}

/// The agent records' local sides: a record with `user` and `process`
/// (a host agent's) whose source or destination is its exporter's own
/// address (the address it connected from). Returns the mappings learned
/// and the sides of every record's user.
fn agent_sides(
    batches: &[&Batch],
    exporter_addr: &HashMap<i64, IpAddr>,
) -> (BTreeSet<(String, String)>, Vec<Vec<Side>>) {
    let mut learned = BTreeSet::new();
    let mut sides = Vec::with_capacity(batches.len());
    for b in batches {
        let local = exporter_addr.get(&b.exporter_id);
        let mut s = Vec::with_capacity(b.records.len());
        for r in &b.records {
            let side = match (local, r.user.as_deref(), r.process.is_some()) {
                (Some(a), Some(user), true) if *a == r.src_addr => {
                    learned.insert((r.src_addr.to_string(), user.to_owned()));
                    Side::Out
                }
                (Some(a), Some(user), true) if *a == r.dst_addr => {
                    learned.insert((r.dst_addr.to_string(), user.to_owned()));
                    Side::In
                }
                _ => Side::Out,
            };
            s.push(side);
        }
        sides.push(s);
    }
    (learned, sides)
}

/// The records without a user whose source (else destination) address
/// has a live mapping get its user; `None` when none does.
fn enrich(
    batches: &[&Batch],
    users: &HashMap<String, String>,
    sides: &mut [Vec<Side>],
) -> Option<Vec<Batch>> {
    if users.is_empty() {
        return None;
    }
    let mut changed = false;
    let out = batches
        .iter()
        .zip(sides.iter_mut())
        .map(|(b, s)| Batch {
            exporter_id: b.exporter_id,
            session_id: b.session_id,
            seq: b.seq,
            dedup: b.dedup,
            records: b
                .records
                .iter()
                .zip(s.iter_mut())
                .map(|(r, side)| {
                    let mut r = r.clone();
                    if r.user.is_none() {
                        if let Some(u) = users.get(&r.src_addr.to_string()) {
                            r.user = Some(u.clone());
                            *side = Side::Out;
                            changed = true;
                        } else if let Some(u) = users.get(&r.dst_addr.to_string()) {
                            r.user = Some(u.clone());
                            *side = Side::In;
                            changed = true;
                        }
                    }
                    r
                })
                .collect(),
        })
        .collect();
    changed.then_some(out)
}

/// Host and user counters of a write.
fn tally(
    batches: &[&Batch],
    sides: &[Vec<Side>],
) -> (BTreeMap<String, Counts>, BTreeMap<String, Counts>) {
    let mut hosts: BTreeMap<String, Counts> = BTreeMap::new();
    let mut users: BTreeMap<String, Counts> = BTreeMap::new();
    for (b, s) in batches.iter().zip(sides) {
        for (i, r) in b.records.iter().enumerate() {
            let (bytes, packets) = (scaled(r.bytes, r), scaled(r.packets, r));
            add(
                hosts.entry(r.src_addr.to_string()).or_default(),
                Side::Out,
                bytes,
                packets,
            );
            add(
                hosts.entry(r.dst_addr.to_string()).or_default(),
                Side::In,
                bytes,
                packets,
            );
            if let Some(u) = &r.user {
                let side = s.get(i).copied().unwrap_or(Side::Out);
                add(users.entry(u.clone()).or_default(), side, bytes, packets);
            }
        }
    }
    (hosts, users)
}

/// `$from, $from+1, …` for `n` values.
fn params(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn hosts_upsert_sql(rows: usize) -> String {
    let values = (0..rows)
        .map(|i| {
            let b = 2 + i * 5;
            format!(
                "(${b}, ${}, ${}, ${}, ${}, $1, $1)",
                b + 1,
                b + 2,
                b + 3,
                b + 4
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO kb_hosts (addr, bytes_in, bytes_out, packets_in, packets_out, first_seen_ns, last_seen_ns) \
         VALUES {values} ON CONFLICT (addr) DO UPDATE SET \
         bytes_in = kb_hosts.bytes_in + excluded.bytes_in, bytes_out = kb_hosts.bytes_out + excluded.bytes_out, \
         packets_in = kb_hosts.packets_in + excluded.packets_in, packets_out = kb_hosts.packets_out + excluded.packets_out, \
         last_seen_ns = excluded.last_seen_ns"
    )
}

fn mappings_upsert_sql(rows: usize) -> String {
    let values = (0..rows)
        .map(|i| {
            let b = 3 + i * 2;
            format!("(${b}, ${}, 'agent', 0, $1, $1, $2)", b + 1)
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO kb_mappings (addr, \"user\", source, persistent, first_seen_ns, last_seen_ns, expires_ns) \
         VALUES {values} ON CONFLICT (addr, \"user\", source) DO UPDATE SET \
         last_seen_ns = excluded.last_seen_ns, expires_ns = excluded.expires_ns"
    )
}

fn users_insert_sql(rows: usize) -> String {
    let values = (0..rows)
        .map(|i| format!("(${}, 0, 0, 0, 0, $1, $1, 0, NULL, 0)", 2 + i))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO kb_users (\"user\", bytes_in, bytes_out, packets_in, packets_out, first_seen_ns, \
         last_seen_ns, online, online_since_ns, session_bytes) VALUES {values} ON CONFLICT (\"user\") DO NOTHING"
    )
}

const USER_UPDATE: &str =
    "UPDATE kb_users SET bytes_in = bytes_in + $1, bytes_out = bytes_out + $2, \
     packets_in = packets_in + $3, packets_out = packets_out + $4, last_seen_ns = $5, online = 1, \
     online_since_ns = CASE WHEN online = 1 THEN online_since_ns ELSE $5 END, session_bytes = $6 \
     WHERE \"user\" = $7";

/// The events a user's update causes: `logon` when it was offline, a
/// `threshold` when its session bytes reach the threshold in this write.
fn user_events(
    user: &str,
    online: bool,
    session_before: i64,
    session_after: i64,
    threshold: Option<i64>,
    out: &mut Vec<NewEvent>,
) {
    if !online {
        out.push(NewEvent {
            kind: "logon",
            user: Some(user.to_owned()),
            addr: None,
            value: None,
            detail: Some("traffic".into()),
        });
    }
    if let Some(t) = threshold {
        if session_before < t && session_after >= t {
            out.push(NewEvent {
                kind: "threshold",
                user: Some(user.to_owned()),
                addr: None,
                value: Some(t),
                detail: Some(format!("{session_after} bytes since logon")),
            });
        }
    }
}

/// The per-engine SQL, written once.
macro_rules! kb_dialect {
    ($name:ident, $D:ty, $pg:expr) => {
        pub(crate) mod $name {
            use super::*;
            use sqlx::Row;

            type Tx<'t> = sqlx::Transaction<'t, $D>;
            const PG: bool = $pg;

            /// The exporters' own addresses (the `address` column holds
            /// `ip:port`, or a bare address).
            async fn exporter_addrs(
                tx: &mut Tx<'_>,
                batches: &[&Batch],
            ) -> Result<HashMap<i64, IpAddr>, sqlx::Error> {
                let ids: BTreeSet<i64> = batches
                    .iter()
                    .filter(|b| b.records.iter().any(|r| r.user.is_some() && r.process.is_some()))
                    .map(|b| b.exporter_id)
                    .collect();
                let mut out = HashMap::new();
                for id in ids {
                    let row: Option<(Option<String>,)> =
                        sqlx::query_as("SELECT address FROM exporters WHERE id = $1")
                            .bind(id)
                            .fetch_optional(&mut **tx)
                            .await?;
                    let addr = row.and_then(|(a,)| a).and_then(|a| {
                        a.parse::<std::net::SocketAddr>()
                            .map(|s| s.ip())
                            .or_else(|_| a.parse::<IpAddr>())
                            .ok()
                    });
                    if let Some(a) = addr {
                        out.insert(id, a);
                    }
                }
                Ok(out)
            }

            /// Before the rows: learns the agents' mappings, enriches.
            pub(crate) async fn prepare(
                tx: &mut Tx<'_>,
                cfg: &KbConfig,
                batches: &[&Batch],
                now: i64,
            ) -> Result<Prepared, sqlx::Error> {
                let exporters = exporter_addrs(tx, batches).await?;
                let (learned, mut sides) = agent_sides(batches, &exporters);
                let learned: Vec<_> = learned.into_iter().collect();
                for chunk in learned.chunks(CHUNK) {
                    let sql = mappings_upsert_sql(chunk.len());
                    let mut q = sqlx::query(&sql)
                        .bind(now)
                        .bind(now.saturating_add(cfg.mapping_ttl_ns));
                    for (addr, user) in chunk {
                        q = q.bind(addr.as_str()).bind(user.as_str());
                    }
                    q.execute(&mut **tx).await?;
                }
                let wanted: BTreeSet<String> = batches
                    .iter()
                    .flat_map(|b| b.records.iter())
                    .filter(|r| r.user.is_none())
                    .flat_map(|r| [r.src_addr.to_string(), r.dst_addr.to_string()])
                    .collect();
                let wanted: Vec<String> = wanted.into_iter().collect();
                let mut users = HashMap::new();
                for chunk in wanted.chunks(CHUNK) {
                    let sql = format!(
                        "SELECT addr, \"user\" FROM kb_mappings WHERE addr IN ({}) \
                         AND (persistent = 1 OR expires_ns > $1) ORDER BY last_seen_ns, \"user\"",
                        params(2, chunk.len())
                    );
                    let mut q = sqlx::query(&sql).bind(now);
                    for a in chunk {
                        q = q.bind(a.as_str());
                    }
                    for row in q.fetch_all(&mut **tx).await? {
                        // The most recently seen mapping wins.
                        users.insert(row.try_get::<String, _>(0)?, row.try_get::<String, _>(1)?);
                    }
                }
                let enriched = enrich(batches, &users, &mut sides);
                Ok(Prepared { enriched, sides })
            }

            /// After the rows: counters, presence, thresholds, events.
            /// Returns the number of events.
            pub(crate) async fn apply(
                tx: &mut Tx<'_>,
                batches: &[&Batch],
                sides: &[Vec<Side>],
                now: i64,
            ) -> Result<usize, sqlx::Error> {
                let (hosts, users) = tally(batches, sides);
                let hosts: Vec<_> = hosts.into_iter().collect();
                for chunk in hosts.chunks(CHUNK) {
                    let sql = hosts_upsert_sql(chunk.len());
                    let mut q = sqlx::query(&sql).bind(now);
                    for (addr, c) in chunk {
                        q = q.bind(addr.as_str()).bind(c[0]).bind(c[1]).bind(c[2]).bind(c[3]);
                    }
                    q.execute(&mut **tx).await?;
                }
                if users.is_empty() {
                    return Ok(0);
                }
                let names: Vec<&String> = users.keys().collect();
                let mut state: HashMap<String, (bool, i64)> = HashMap::new();
                let mut thresholds: HashMap<String, i64> = HashMap::new();
                for chunk in names.chunks(CHUNK) {
                    let sql = users_insert_sql(chunk.len());
                    let mut q = sqlx::query(&sql).bind(now);
                    for u in chunk {
                        q = q.bind(u.as_str());
                    }
                    q.execute(&mut **tx).await?;
                    let sql = format!(
                        "SELECT \"user\", CAST(online AS BIGINT), session_bytes FROM kb_users \
                         WHERE \"user\" IN ({}) ORDER BY \"user\"{}",
                        params(1, chunk.len()),
                        if PG { " FOR UPDATE" } else { "" }
                    );
                    let mut q = sqlx::query(&sql);
                    for u in chunk {
                        q = q.bind(u.as_str());
                    }
                    for row in q.fetch_all(&mut **tx).await? {
                        let online: i64 = row.try_get(1)?;
                        state.insert(row.try_get(0)?, (online == 1, row.try_get(2)?));
                    }
                    let sql = format!(
                        "SELECT \"user\", bytes FROM kb_thresholds WHERE \"user\" IN ('*', {})",
                        params(1, chunk.len())
                    );
                    let mut q = sqlx::query(&sql);
                    for u in chunk {
                        q = q.bind(u.as_str());
                    }
                    for row in q.fetch_all(&mut **tx).await? {
                        thresholds.insert(row.try_get(0)?, row.try_get(1)?);
                    }
                }
                let mut events = Vec::new();
                for (user, c) in &users {
                    let (online, session) = state.get(user).copied().unwrap_or((false, 0));
                    let before = if online { session } else { 0 };
                    let after = before.saturating_add(c[0]).saturating_add(c[1]);
                    let threshold = thresholds.get(user).or_else(|| thresholds.get("*")).copied();
                    user_events(user, online, before, after, threshold, &mut events);
                    sqlx::query(USER_UPDATE)
                        .bind(c[0])
                        .bind(c[1])
                        .bind(c[2])
                        .bind(c[3])
                        .bind(now)
                        .bind(after)
                        .bind(user.as_str())
                        .execute(&mut **tx)
                        .await?;
                }
                insert_events(tx, &events, now).await?;
                Ok(events.len())
            }

            /// Inserts events (last in a transaction: the advisory lock
            /// is held until its commit) and, on PostgreSQL, NOTIFYs.
            pub(crate) async fn insert_events(
                tx: &mut Tx<'_>,
                events: &[NewEvent],
                now: i64,
            ) -> Result<(), sqlx::Error> {
                if events.is_empty() {
                    return Ok(());
                }
                if PG {
                    sqlx::query("SELECT pg_advisory_xact_lock($1)")
                        .bind(EVENTS_LOCK)
                        .execute(&mut **tx)
                        .await?;
                }
                for e in events {
                    sqlx::query(
                        "INSERT INTO kb_events (at_ns, kind, \"user\", addr, value, detail) \
                         VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(now)
                    .bind(e.kind)
                    .bind(e.user.as_deref())
                    .bind(e.addr.as_deref())
                    .bind(e.value)
                    .bind(e.detail.as_deref())
                    .execute(&mut **tx)
                    .await?;
                }
                if PG {
                    sqlx::query("SELECT pg_notify($1, '')")
                        .bind(super::super::KB_CHANNEL)
                        .execute(&mut **tx)
                        .await?;
                }
                Ok(())
            }

            /// Expiry and logoffs; see [`crate::Db::kb_sweep`].
            pub(crate) async fn sweep(
                tx: &mut Tx<'_>,
                cfg: &KbConfig,
                now: i64,
            ) -> Result<(super::super::Sweep, usize), sqlx::Error> {
                let mut s = super::super::Sweep::default();
                s.mappings_expired = sqlx::query(
                    "DELETE FROM kb_mappings WHERE persistent = 0 AND expires_ns <= $1",
                )
                .bind(now)
                .execute(&mut **tx)
                .await?
                .rows_affected();
                s.hosts_expired = sqlx::query("DELETE FROM kb_hosts WHERE last_seen_ns < $1")
                    .bind(now.saturating_sub(cfg.host_ttl_ns))
                    .execute(&mut **tx)
                    .await?
                    .rows_affected();
                s.events_deleted = sqlx::query("DELETE FROM kb_events WHERE at_ns < $1")
                    .bind(now.saturating_sub(cfg.events_keep_ns))
                    .execute(&mut **tx)
                    .await?
                    .rows_affected();
                let rows = sqlx::query(
                    "UPDATE kb_users SET online = 0 WHERE online = 1 AND last_seen_ns < $1 \
                     AND NOT EXISTS (SELECT 1 FROM kb_mappings m WHERE m.\"user\" = kb_users.\"user\" \
                     AND m.persistent = 0 AND m.expires_ns > $2) RETURNING \"user\", last_seen_ns",
                )
                .bind(now.saturating_sub(cfg.idle_ns))
                .bind(now)
                .fetch_all(&mut **tx)
                .await?;
                let mut off: Vec<(String, i64)> = rows
                    .iter()
                    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                    .collect::<Result<_, sqlx::Error>>()?;
                off.sort();
                s.logoffs = off.len() as u64;
                let events: Vec<NewEvent> = off
                    .into_iter()
                    .map(|(user, last)| NewEvent {
                        kind: "logoff",
                        user: Some(user),
                        addr: None,
                        value: Some(last),
                        detail: Some("idle".into()),
                    })
                    .collect();
                insert_events(tx, &events, now).await?;
                Ok((s, events.len()))
            }
        }
    };
}

kb_dialect!(kb_sqlite, sqlx::Sqlite, false);
kb_dialect!(kb_pg, sqlx::Postgres, true);

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(src: &str, dst: &str, user: Option<&str>, process: Option<&str>) -> FlowRecord {
        FlowRecord {
            src_addr: src.parse().unwrap(),
            dst_addr: dst.parse().unwrap(),
            bytes: 100,
            packets: 2,
            user: user.map(str::to_owned),
            process: process.map(str::to_owned),
            ..FlowRecord::default()
        }
    }

    fn batch(records: Vec<FlowRecord>) -> Batch {
        Batch {
            exporter_id: 1,
            session_id: 1,
            seq: 1,
            records,
            dedup: false,
        }
    }

    #[test]
    fn the_agent_side_is_the_exporters_own_address() {
        let b = batch(vec![
            rec("10.0.0.5", "192.0.2.1", Some("alice"), Some("curl")),
            rec("192.0.2.1", "10.0.0.5", Some("alice"), Some("curl")),
            // Not an agent record (no process): no mapping.
            rec("10.0.0.7", "192.0.2.1", Some("bob"), None),
            // Neither side is the exporter's: no mapping.
            rec("10.0.0.8", "192.0.2.1", Some("carol"), Some("x")),
        ]);
        let addrs = HashMap::from([(1, "10.0.0.5".parse().unwrap())]);
        let (learned, sides) = agent_sides(&[&b], &addrs);
        assert_eq!(
            learned.into_iter().collect::<Vec<_>>(),
            [("10.0.0.5".to_owned(), "alice".to_owned())]
        );
        assert_eq!(sides[0], [Side::Out, Side::In, Side::Out, Side::Out]);
    }

    #[test]
    fn enrichment_uses_the_source_then_the_destination() {
        let b = batch(vec![
            rec("10.0.0.5", "10.0.0.6", None, None),
            rec("192.0.2.1", "10.0.0.6", None, None),
            rec("192.0.2.1", "192.0.2.2", None, None),
            rec("10.0.0.5", "10.0.0.6", Some("meter"), None),
        ]);
        let users = HashMap::from([
            ("10.0.0.5".to_owned(), "alice".to_owned()),
            ("10.0.0.6".to_owned(), "bob".to_owned()),
        ]);
        let mut sides = vec![vec![Side::Out; 4]];
        let out = enrich(&[&b], &users, &mut sides).unwrap();
        let got: Vec<Option<&str>> = out[0].records.iter().map(|r| r.user.as_deref()).collect();
        assert_eq!(got, [Some("alice"), Some("bob"), None, Some("meter")]);
        assert_eq!(sides[0], [Side::Out, Side::In, Side::Out, Side::Out]);
        let (hosts, users) = tally(&[&out[0]], &sides);
        assert_eq!(users["alice"], [0, 100, 0, 2]);
        assert_eq!(users["bob"], [100, 0, 2, 0]);
        assert_eq!(users["meter"], [0, 100, 0, 2]);
        assert_eq!(hosts["10.0.0.6"], [300, 0, 6, 0]);
        assert_eq!(hosts["192.0.2.1"], [0, 200, 0, 4]);
    }

    #[test]
    fn a_threshold_fires_once_when_reached() {
        let mut ev = Vec::new();
        user_events("a", true, 10, 99, Some(100), &mut ev);
        assert!(ev.is_empty());
        user_events("a", true, 99, 100, Some(100), &mut ev);
        user_events("a", true, 100, 500, Some(100), &mut ev);
        assert_eq!(ev.len(), 1);
        assert_eq!((ev[0].kind, ev[0].value), ("threshold", Some(100)));
        let mut ev = Vec::new();
        user_events("b", false, 0, 1_000, Some(100), &mut ev);
        let kinds: Vec<_> = ev.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, ["logon", "threshold"]);
    }
}
