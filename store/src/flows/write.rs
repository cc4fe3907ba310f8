//! Writing flow records: a group of DATA messages in one transaction —
//! the de-duplication keys (`data_messages`), the rows, the per-session
//! totals, the per-minute rollups (`rollup.rs`) — committed together or not
//! at all. SQLite gets multi-row
//! INSERTs of one prepared statement; PostgreSQL gets `COPY … FROM STDIN
//! (FORMAT binary)`. The two encoders of a row are side by side here and
//! nowhere else.

use super::rollup::{bind_rollup, rollup, upsert_sql, ROWS_PER_UPSERT};
use super::rollup_dim::{self, bind_rollup_dim, by_hour, rollup_dim, upsert_dim_sql, Level};
use super::{Batch, Outcome};
use crate::cluster::{add_partials, Tally};
use crate::db::{now_ns, Db};
use crate::dialect::{i64_of, Dialect, Sql};
use crate::kb::{kb_pg, kb_sqlite, KbConfig};
use bytes::{BufMut, BytesMut};
use qosloop_schema::{flow_hash, FlowRecord};
use sqlx::Connection;
use std::net::IpAddr;

impl Db {
    /// Stores a group of messages in one transaction and says, for each in
    /// order, whether it was stored or was a duplicate of a committed key.
    /// Nothing is stored when it fails; see [`crate::is_transient`] for
    /// whether trying again may help.
    pub async fn commit_batches(&self, group: &[&Batch]) -> Result<Vec<Outcome>, sqlx::Error> {
        self.commit_batches_tallied(group, None).await
    }

    /// [`Db::commit_batches`] that also adds the stored records to the
    /// node's partial sums of `tally` (a collector cluster's node), in the
    /// same transaction: a record is in the sums iff it is stored. A
    /// cluster needs PostgreSQL; a tally on SQLite is an error.
    pub async fn commit_batches_tallied(
        &self,
        group: &[&Batch],
        tally: Option<&Tally>,
    ) -> Result<Vec<Outcome>, sqlx::Error> {
        self.commit_batches_kb(group, tally, None).await
    }

    /// [`Db::commit_batches_tallied`] that also keeps the knowledge base
    /// (`kb`, docs/kb.md) in the same transaction: the mappings agent
    /// records teach and the enrichment of records without a user before
    /// the rows, the host and user counters and their events after.
    pub async fn commit_batches_kb(
        &self,
        group: &[&Batch],
        tally: Option<&Tally>,
        kb: Option<&KbConfig>,
    ) -> Result<Vec<Outcome>, sqlx::Error> {
        self.commit_batches_kb_at(group, tally, kb, now_ns()).await
    }

    /// [`Db::commit_batches_kb`] with the writer's clock given (`now`, ns
    /// since the epoch): what the knowledge base stamps and expires by.
    pub async fn commit_batches_kb_at(
        &self,
        group: &[&Batch],
        tally: Option<&Tally>,
        kb: Option<&KbConfig>,
        now: i64,
    ) -> Result<Vec<Outcome>, sqlx::Error> {
        self.commit_batches_routed(group, None, tally, kb, now)
            .await
    }

    /// [`Db::commit_batches_kb_at`] that also writes each row's cluster
    /// bucket of its flow hash among `buckets` (`flows.bucket`, what the
    /// `stitch` analysis reads by; [`crate::flow_bucket`]). `None`: no
    /// bucket (outside a cluster).
    pub async fn commit_batches_routed(
        &self,
        group: &[&Batch],
        buckets: Option<u32>,
        tally: Option<&Tally>,
        kb: Option<&KbConfig>,
        now: i64,
    ) -> Result<Vec<Outcome>, sqlx::Error> {
        let (outcomes, events) = match self {
            Db::Sqlite(_) if tally.is_some() => {
                return Err(sqlx::Error::Configuration(
                    "a collector cluster's partial sums need PostgreSQL".into(),
                ))
            }
            Db::Sqlite(pool) => commit_sqlite(pool, group, buckets, kb, now).await?,
            Db::Postgres(pool) => commit_postgres(pool, group, buckets, tally, kb, now).await?,
        };
        if events > 0 {
            crate::kb::signal();
        }
        Ok(outcomes)
    }
}

fn hash_of(r: &FlowRecord) -> i64 {
    i64::from(flow_hash(
        r.src_addr, r.dst_addr, r.src_port, r.dst_port, r.proto,
    ))
}

/// The row's `bucket` column: its flow hash's bucket, in a cluster.
fn bucket_col(r: &FlowRecord, buckets: Option<u32>) -> Option<i32> {
    buckets.map(|n| crate::flow_bucket(hash_of(r), n) as i32)
}

/// Rows of one multi-row INSERT (21 parameters each: 21,000 per statement,
/// under SQLite's limit of 32,766).
const SQLITE_ROWS_PER_INSERT: usize = 1000;

const SQLITE_FLOW_COLUMNS: usize = 21;

/// The INSERT of `rows` flows, one `(?, …)` per row.
fn sqlite_insert_sql(rows: usize) -> String {
    let mut sql = String::with_capacity(300 + rows * (SQLITE_FLOW_COLUMNS * 2 + 3));
    sql.push_str(
        "INSERT INTO flows (exporter_id, session_id, seq, src_addr, dst_addr, src_port, dst_port, proto, \
         packets, bytes, start_ns, end_ns, vlan, dscp, tcp_flags, class, \"user\", process, sampling_interval, flow_hash, bucket) VALUES ",
    );
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str("(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)");
    }
    sql
}

/// The statement of a full chunk, built once (and so prepared once: sqlx
/// caches prepared statements by their text).
fn sqlite_full_insert() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| sqlite_insert_sql(SQLITE_ROWS_PER_INSERT))
}

/// An address as SQLite stores it (the `Display` form), IPv4 formatted
/// without `fmt` (a third of the writer's formatting time).
fn addr_text(a: IpAddr) -> String {
    match a {
        IpAddr::V4(v4) => {
            let mut s = String::with_capacity(15);
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                if o >= 100 {
                    s.push(char::from(b'0' + o / 100));
                }
                if o >= 10 {
                    s.push(char::from(b'0' + o / 10 % 10));
                }
                s.push(char::from(b'0' + o % 10));
            }
            s
        }
        IpAddr::V6(_) => a.to_string(),
    }
}

/// The bound values of one chunk of rows.
fn sqlite_chunk_args(
    rows: &[(&Batch, &FlowRecord)],
    buckets: Option<u32>,
) -> Result<sqlx::sqlite::SqliteArguments<'static>, sqlx::Error> {
    use sqlx::Arguments;
    let mut args = sqlx::sqlite::SqliteArguments::default();
    args.reserve(rows.len() * SQLITE_FLOW_COLUMNS, 0);
    let put = |r: Result<(), sqlx::error::BoxDynError>| r.map_err(sqlx::Error::Encode);
    for (b, r) in rows {
        put(args.add(b.exporter_id))?;
        put(args.add(b.session_id))?;
        put(args.add(i64::from(b.seq)))?;
        put(args.add(addr_text(r.src_addr)))?;
        put(args.add(addr_text(r.dst_addr)))?;
        put(args.add(i64::from(r.src_port)))?;
        put(args.add(i64::from(r.dst_port)))?;
        put(args.add(i64::from(r.proto)))?;
        put(args.add(i64_of(r.packets)))?;
        put(args.add(i64_of(r.bytes)))?;
        put(args.add(i64_of(r.start_ns)))?;
        put(args.add(i64_of(r.end_ns)))?;
        put(args.add(r.vlan.map(i64::from)))?;
        put(args.add(r.dscp.map(i64::from)))?;
        put(args.add(r.tcp_flags.map(i64::from)))?;
        put(args.add(r.class.clone()))?;
        put(args.add(r.user.clone()))?;
        put(args.add(r.process.clone()))?;
        put(args.add(r.sampling_interval.map(i64::from)))?;
        put(args.add(hash_of(r)))?;
        put(args.add(bucket_col(r, buckets)))?;
    }
    Ok(args)
}

/// One transaction for the whole group: the de-duplication keys, then the
/// rows of every stored batch in chunks of [`SQLITE_ROWS_PER_INSERT`] across
/// batches (so chunks are full and share one prepared statement), then the
/// per-session totals. The values of the next chunk are built while the
/// database thread inserts the current one.
async fn commit_sqlite(
    pool: &sqlx::SqlitePool,
    group: &[&Batch],
    buckets: Option<u32>,
    kb: Option<&KbConfig>,
    now: i64,
) -> Result<(Vec<Outcome>, usize), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    let mut outcomes = Vec::with_capacity(group.len());
    let mut stored: Vec<&Batch> = Vec::with_capacity(group.len());
    for b in group {
        let inserted = if !b.dedup {
            1
        } else {
            sqlx::query(
            "INSERT OR IGNORE INTO data_messages (exporter_id, session_id, seq, records, committed_ns) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(b.exporter_id)
        .bind(b.session_id)
        .bind(i64::from(b.seq))
        .bind(b.records.len() as i64)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
        };
        if inserted == 0 {
            outcomes.push(Outcome::Duplicate);
            continue;
        }
        stored.push(*b);
        outcomes.push(Outcome::Stored);
    }
    let prepared = match kb {
        Some(cfg) => Some(kb_sqlite::prepare(&mut tx, cfg, &stored, now).await?),
        None => None,
    };
    if let Some(enriched) = prepared.as_ref().and_then(|p| p.enriched.as_ref()) {
        stored = enriched.iter().collect();
    }
    let rows: Vec<(&Batch, &FlowRecord)> = stored
        .iter()
        .flat_map(|b| b.records.iter().map(move |r| (*b, r)))
        .collect();
    let mut chunks = rows.chunks(SQLITE_ROWS_PER_INSERT);
    let mut next = chunks
        .next()
        .map(|c| (c.len(), sqlite_chunk_args(c, buckets)));
    while let Some((len, args)) = next.take() {
        let args = args?;
        let tail;
        let sql = if len == SQLITE_ROWS_PER_INSERT {
            sqlite_full_insert()
        } else {
            tail = sqlite_insert_sql(len);
            &tail
        };
        let mut insert = std::pin::pin!(sqlx::query_with(sql, args).execute(&mut *tx));
        // One poll hands the statement to the database thread; the next
        // chunk is built meanwhile.
        let done = tokio::select! {
            biased;
            r = &mut insert => Some(r),
            _ = std::future::ready(()) => None,
        };
        next = chunks
            .next()
            .map(|c| (c.len(), sqlite_chunk_args(c, buckets)));
        match done {
            Some(r) => r?,
            None => insert.await?,
        };
    }
    let groups = rollup(&stored);
    for chunk in groups.chunks(ROWS_PER_UPSERT) {
        let sql = upsert_sql(Sql(Dialect::Sqlite), chunk.len());
        bind_rollup!(sqlx::query(&sql), chunk, addr_text)
            .execute(&mut *tx)
            .await?;
    }
    let by_minute = rollup_dim(&groups);
    let by_hour = by_hour(&by_minute);
    for (level, rows) in [(Level::Minute, &by_minute), (Level::Hour, &by_hour)] {
        for chunk in rows.chunks(rollup_dim::ROWS_PER_UPSERT) {
            let sql = upsert_dim_sql(Sql(Dialect::Sqlite), chunk.len(), level);
            bind_rollup_dim!(sqlx::query(&sql), chunk, addr_text)
                .execute(&mut *tx)
                .await?;
        }
    }
    let mut sessions = Vec::new();
    for b in &stored {
        note_session(&mut sessions, b);
    }
    let events = match &prepared {
        Some(p) => kb_sqlite::apply(&mut tx, &stored, &p.sides, now).await?,
        None => 0,
    };
    for (exporter_id, session_id, last_seq, records) in sessions {
        sqlx::query(&session_totals_sql(Sql(Dialect::Sqlite)))
            .bind(last_seq)
            .bind(records)
            .bind(exporter_id)
            .bind(session_id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok((outcomes, events))
}

async fn commit_postgres(
    pool: &sqlx::PgPool,
    group: &[&Batch],
    buckets: Option<u32>,
    tally: Option<&Tally>,
    kb: Option<&KbConfig>,
    now: i64,
) -> Result<(Vec<Outcome>, usize), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    let mut outcomes = Vec::with_capacity(group.len());
    let mut copy = BytesMut::with_capacity(64 * 1024);
    copy.put_slice(b"PGCOPY\n\xff\r\n\0");
    copy.put_i32(0);
    copy.put_i32(0);
    let mut rows = 0usize;
    let mut sessions = Vec::new();
    let mut stored: Vec<&Batch> = Vec::with_capacity(group.len());
    for b in group {
        let inserted = if !b.dedup {
            1
        } else {
            sqlx::query(
                "INSERT INTO data_messages (exporter_id, session_id, seq, records, committed_ns) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            )
            .bind(b.exporter_id)
            .bind(b.session_id)
            .bind(i64::from(b.seq))
            .bind(b.records.len() as i32)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected()
        };
        if inserted == 0 {
            outcomes.push(Outcome::Duplicate);
            continue;
        }
        note_session(&mut sessions, b);
        stored.push(*b);
        outcomes.push(Outcome::Stored);
    }
    let prepared = match kb {
        Some(cfg) => Some(kb_pg::prepare(&mut tx, cfg, &stored, now).await?),
        None => None,
    };
    if let Some(enriched) = prepared.as_ref().and_then(|p| p.enriched.as_ref()) {
        stored = enriched.iter().collect();
    }
    for b in &stored {
        for r in &b.records {
            copy_row(&mut copy, b, r, buckets);
        }
        rows += b.records.len();
    }
    if rows > 0 {
        copy.put_i16(-1);
        let mut sink = tx
            .copy_in_raw(
                "COPY flows (exporter_id, session_id, seq, src_addr, dst_addr, src_port, dst_port, proto, \
                 packets, bytes, start_ns, end_ns, vlan, dscp, tcp_flags, class, \"user\", process, \
                 sampling_interval, flow_hash, bucket) FROM STDIN (FORMAT binary)",
            )
            .await?;
        sink.send(copy.freeze()).await?;
        sink.finish().await?;
    }
    if let Some(t) = tally {
        let partials = t.partials(stored.iter().flat_map(|b| b.records.iter()));
        add_partials(&mut tx, t, &partials).await?;
    }
    let groups = rollup(&stored);
    for chunk in groups.chunks(ROWS_PER_UPSERT) {
        let sql = upsert_sql(Sql(Dialect::Postgres), chunk.len());
        bind_rollup!(sqlx::query(&sql), chunk, |a: IpAddr| a.to_string())
            .execute(&mut *tx)
            .await?;
    }
    let by_minute = rollup_dim(&groups);
    let by_hour = by_hour(&by_minute);
    for (level, rows) in [(Level::Minute, &by_minute), (Level::Hour, &by_hour)] {
        for chunk in rows.chunks(rollup_dim::ROWS_PER_UPSERT) {
            let sql = upsert_dim_sql(Sql(Dialect::Postgres), chunk.len(), level);
            bind_rollup_dim!(sqlx::query(&sql), chunk, |a: IpAddr| a.to_string())
                .execute(&mut *tx)
                .await?;
        }
    }
    let events = match &prepared {
        Some(p) => kb_pg::apply(&mut tx, &stored, &p.sides, now).await?,
        None => 0,
    };
    // Last, so that the row lock on `sessions` is held only until the
    // commit right after: concurrent writers overlap their COPYs.
    for (exporter_id, session_id, last_seq, records) in sessions {
        sqlx::query(&session_totals_sql(Sql(Dialect::Postgres)))
            .bind(last_seq)
            .bind(records)
            .bind(exporter_id)
            .bind(session_id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok((outcomes, events))
}

/// The statement that adds a transaction's totals to its session's row.
fn session_totals_sql(sql: Sql) -> String {
    format!(
        "UPDATE sessions SET last_seq = {}(COALESCE(last_seq, 0), $1), records = records + $2 \
         WHERE exporter_id = $3 AND session_id = $4",
        sql.greatest()
    )
}

/// Adds a stored message to the per-session totals of a transaction:
/// `(exporter_id, session_id, highest seq, records)`.
fn note_session(sessions: &mut Vec<(i64, i64, i64, i64)>, b: &Batch) {
    let seq = i64::from(b.seq);
    let n = b.records.len() as i64;
    match sessions
        .iter_mut()
        .find(|s| s.0 == b.exporter_id && s.1 == b.session_id)
    {
        Some(s) => {
            s.2 = s.2.max(seq);
            s.3 += n;
        }
        None => sessions.push((b.exporter_id, b.session_id, seq, n)),
    }
}

/// One tuple of PostgreSQL's binary COPY format.
fn copy_row(out: &mut BytesMut, b: &Batch, r: &FlowRecord, buckets: Option<u32>) {
    out.put_i16(21);
    put_i64(out, b.exporter_id);
    put_i64(out, b.session_id);
    put_i64(out, i64::from(b.seq));
    put_inet(out, r.src_addr);
    put_inet(out, r.dst_addr);
    put_i32(out, i32::from(r.src_port));
    put_i32(out, i32::from(r.dst_port));
    put_i16(out, i16::from(r.proto));
    put_i64(out, i64_of(r.packets));
    put_i64(out, i64_of(r.bytes));
    put_i64(out, i64_of(r.start_ns));
    put_i64(out, i64_of(r.end_ns));
    put_opt_i32(out, r.vlan.map(i32::from));
    match r.dscp {
        Some(d) => put_i16(out, i16::from(d)),
        None => out.put_i32(-1),
    }
    put_opt_i32(out, r.tcp_flags.map(i32::from));
    put_opt_text(out, r.class.as_deref());
    put_opt_text(out, r.user.as_deref());
    put_opt_text(out, r.process.as_deref());
    put_opt_i32(
        out,
        r.sampling_interval
            .map(|v| i32::try_from(v).unwrap_or(i32::MAX)),
    );
    put_i64(out, hash_of(r));
    put_opt_i32(out, bucket_col(r, buckets));
}

fn put_i64(out: &mut BytesMut, v: i64) {
    out.put_i32(8);
    out.put_i64(v);
}
fn put_i32(out: &mut BytesMut, v: i32) {
    out.put_i32(4);
    out.put_i32(v);
}
fn put_i16(out: &mut BytesMut, v: i16) {
    out.put_i32(2);
    out.put_i16(v);
}
fn put_opt_i32(out: &mut BytesMut, v: Option<i32>) {
    match v {
        Some(v) => put_i32(out, v),
        None => out.put_i32(-1),
    }
}
fn put_opt_text(out: &mut BytesMut, v: Option<&str>) {
    match v {
        Some(s) => {
            out.put_i32(s.len() as i32);
            out.put_slice(s.as_bytes());
        }
        None => out.put_i32(-1),
    }
}

/// `inet` in binary: family (PGSQL_AF_INET = 2, PGSQL_AF_INET6 = 3), prefix
/// bits, is_cidr = 0, address length, address bytes.
fn put_inet(out: &mut BytesMut, addr: IpAddr) {
    match addr {
        IpAddr::V4(a) => {
            out.put_i32(8);
            out.put_slice(&[2, 32, 0, 4]);
            out.put_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            out.put_i32(20);
            out.put_slice(&[3, 128, 0, 16]);
            out.put_slice(&a.octets());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inet_binary_layout() {
        let mut b = BytesMut::new();
        put_inet(&mut b, "192.0.2.1".parse().unwrap());
        assert_eq!(&b[..], &[0, 0, 0, 8, 2, 32, 0, 4, 192, 0, 2, 1]);
        let mut b6 = BytesMut::new();
        put_inet(&mut b6, "2001:db8::1".parse().unwrap());
        assert_eq!(&b6[..8], &[0, 0, 0, 20, 3, 128, 0, 16]);
        assert_eq!(b6.len(), 24);
    }

    #[test]
    fn addresses_are_stored_in_their_display_form() {
        for a in [
            "0.0.0.0",
            "10.0.2.187",
            "255.255.255.255",
            "192.168.100.9",
            "2001:db8::1",
        ] {
            let ip: IpAddr = a.parse().unwrap();
            assert_eq!(addr_text(ip), a);
        }
    }

    /// The SQLite writer's chunks run across batches: every row lands with
    /// its own batch's keys, duplicates within one group are skipped, and
    /// the session totals add up.
    #[tokio::test]
    async fn sqlite_chunks_span_batches() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&format!("sqlite://{}", dir.path().join("c.db").display()))
            .await
            .unwrap();
        db.migrate().await.unwrap();
        let ex = db.register_exporter("m1", "127.0.0.1:1", 1).await.unwrap();
        db.open_session(ex, 9, "little").await.unwrap();
        let batch = |seq: u32, dedup: bool, base: u64| {
            let records = (0..700u64)
                .map(|i| FlowRecord {
                    src_addr: IpAddr::from([10, 0, (i >> 8) as u8, i as u8]),
                    dst_addr: "2001:db8::2".parse().unwrap(),
                    bytes: base + i,
                    packets: 1,
                    user: (i == 3).then(|| "bob".to_string()),
                    ..FlowRecord::default()
                })
                .collect();
            Batch {
                exporter_id: ex,
                session_id: 9,
                seq,
                records,
                dedup,
            }
        };
        let group = [
            batch(5, true, 0),
            batch(5, true, 0),
            batch(6, false, 10_000),
        ];
        let Db::Sqlite(pool) = &db else { panic!() };
        let (outcomes, _) = commit_sqlite(
            pool,
            &group.iter().collect::<Vec<_>>(),
            Some(4),
            None,
            now_ns(),
        )
        .await
        .unwrap();
        assert_eq!(
            outcomes,
            [Outcome::Stored, Outcome::Duplicate, Outcome::Stored]
        );
        let (n, sum): (i64, i64) = sqlx::query_as("SELECT count(*), sum(bytes) FROM flows")
            .fetch_one(pool)
            .await
            .unwrap();
        let expect: u64 = (0..700).sum::<u64>() * 2 + 700 * 10_000;
        assert_eq!((n, sum), (1400, expect as i64));
        // Every row has its flow hash's bucket (of 4), across the chunks.
        let wrong: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM flows WHERE bucket IS NULL OR bucket < 0 OR bucket >= 4",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(wrong, 0);
        let ids: Vec<(i64, i64)> = sqlx::query_as("SELECT flow_hash, bucket FROM flows")
            .fetch_all(pool)
            .await
            .unwrap();
        for (h, b) in ids {
            assert_eq!(b, i64::from(crate::flow_bucket(h, 4)));
        }
        let rows: Vec<(i64, String, String, i64, Option<String>)> = sqlx::query_as(
            "SELECT seq, src_addr, dst_addr, bytes, \"user\" FROM flows WHERE bytes IN (3, 10699) ORDER BY bytes",
        )
        .fetch_all(pool)
        .await
        .unwrap();
        assert_eq!(
            rows,
            [
                (
                    5,
                    "10.0.0.3".into(),
                    "2001:db8::2".into(),
                    3,
                    Some("bob".into())
                ),
                (6, "10.0.2.187".into(), "2001:db8::2".into(), 10_699, None),
            ]
        );
        let (last, records): (i64, i64) = sqlx::query_as("SELECT last_seq, records FROM sessions")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!((last, records), (6, 1400));
    }
}
