//! Storage of DATA messages: one writer task per collector groups the
//! messages of every session into one transaction, commits, and only then
//! answers each message's sender. De-duplication by
//! `data_messages(exporter_id, session_id, seq)` happens in that transaction.
//! SQLite gets multi-row INSERTs; PostgreSQL gets `COPY … FROM STDIN
//! (FORMAT binary)`. Errors that a restart of the database explains are
//! retried with the same batch until it commits; nothing is acknowledged
//! before.

use crate::db::{now_ns, Db};
use bytes::{BufMut, BytesMut};
use qosloop_schema::{flow_hash, FlowRecord};
use sqlx::Connection;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Mutex, OwnedSemaphorePermit};

/// One DATA message to store.
#[derive(Debug)]
pub struct Batch {
    pub exporter_id: i64,
    pub session_id: i64,
    pub seq: u32,
    pub records: Vec<FlowRecord>,
    /// De-duplicate by `(exporter_id, session_id, seq)` (CRANE re-sends).
    /// IPFIX/NetFlow batches are not: their sequence numbers restart with
    /// the exporter and say nothing about re-sends.
    pub dedup: bool,
}

/// What became of a stored message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Stored,
    /// Its key was already committed: nothing stored again.
    Duplicate,
}

/// A batch and where to report its fate.
#[derive(Debug)]
pub struct WriteReq {
    pub batch: Batch,
    pub done: oneshot::Sender<Result<Outcome, String>>,
    /// The share of the collector's decoded-memory budget the batch holds;
    /// given back when the writer drops the request, with the records.
    pub memory: Option<OwnedSemaphorePermit>,
}

/// Where messages go: a database, or nowhere (benchmarks of the protocol).
#[derive(Clone, Debug)]
pub enum Sink {
    Db(Db),
    Discard,
}

/// Starts the writer tasks; send [`WriteReq`]s to the returned channel.
/// `queue` bounds the messages waiting (backpressure onto the sessions),
/// `group_records` the records committed in one transaction, `writers` the
/// transactions in flight at once (PostgreSQL only; SQLite has one writer).
/// Each session acknowledges in its own order whatever writer commits first.
pub fn spawn_writer(
    sink: Sink,
    queue: usize,
    group_records: usize,
    writers: usize,
) -> (mpsc::Sender<WriteReq>, Vec<tokio::task::JoinHandle<()>>) {
    let (tx, rx) = mpsc::channel(queue.max(1));
    let rx = Arc::new(Mutex::new(rx));
    let writers = match sink {
        Sink::Db(Db::Postgres(_)) => writers.max(1),
        _ => 1,
    };
    let tasks = (0..writers)
        .map(|_| tokio::spawn(writer(sink.clone(), rx.clone(), group_records.max(1))))
        .collect();
    (tx, tasks)
}

/// Takes the next group of requests: waits for one, then adds what is
/// already queued up to `group_records` records.
async fn next_group(
    rx: &Mutex<mpsc::Receiver<WriteReq>>,
    group_records: usize,
) -> Option<Vec<WriteReq>> {
    let mut rx = rx.lock().await;
    let first = rx.recv().await?;
    let mut records = first.batch.records.len();
    let mut group = vec![first];
    while records < group_records {
        match rx.try_recv() {
            Ok(req) => {
                records += req.batch.records.len();
                group.push(req);
            }
            Err(_) => break,
        }
    }
    Some(group)
}

async fn writer(sink: Sink, rx: Arc<Mutex<mpsc::Receiver<WriteReq>>>, group_records: usize) {
    while let Some(group) = next_group(&rx, group_records).await {
        let result = commit_with_retry(&sink, &group).await;
        match result {
            Ok(outcomes) => {
                for (req, outcome) in group.into_iter().zip(outcomes) {
                    let WriteReq {
                        batch,
                        done,
                        memory,
                    } = req;
                    let _ = done.send(Ok(outcome));
                    // The records are gone: their share of the budget is free.
                    drop(batch);
                    drop(memory);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, messages = group.len(), "storing failed; sessions get an error");
                for req in group {
                    let WriteReq {
                        batch,
                        done,
                        memory,
                    } = req;
                    let _ = done.send(Err(e.clone()));
                    drop(batch);
                    drop(memory);
                }
            }
        }
    }
}

async fn commit_with_retry(sink: &Sink, group: &[WriteReq]) -> Result<Vec<Outcome>, String> {
    let db = match sink {
        Sink::Discard => return Ok(vec![Outcome::Stored; group.len()]),
        Sink::Db(db) => db,
    };
    let mut delay = Duration::from_millis(50);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let result = match db {
            Db::Sqlite(pool) => commit_sqlite(pool, group).await,
            Db::Postgres(pool) => commit_postgres(pool, group).await,
        };
        match result {
            Ok(o) => {
                if attempt > 1 {
                    tracing::info!(attempt, "storage is back; batch committed");
                }
                return Ok(o);
            }
            Err(e) if is_transient(&e) => {
                tracing::warn!(error = %e, attempt, retry_in_ms = delay.as_millis() as u64, "storage unavailable; retrying the batch");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Err(e) => return Err(format!("storing records: {e}")),
        }
    }
}

/// Errors a database restart, a lost connection or lock contention explain.
fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            // PostgreSQL: connection exceptions, operator intervention
            // (shutdown, starting up), resources, serialisation. SQLite:
            // BUSY (5) and LOCKED (6) with their extended codes.
            code.starts_with("08")
                || code.starts_with("57P")
                || code.starts_with("53")
                || code == "40001"
                || code == "40P01"
                || code
                    .parse::<i32>()
                    .is_ok_and(|c| c & 0xff == 5 || c & 0xff == 6)
        }
        _ => false,
    }
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn hash_of(r: &FlowRecord) -> i64 {
    i64::from(flow_hash(
        r.src_addr, r.dst_addr, r.src_port, r.dst_port, r.proto,
    ))
}

/// Rows of one multi-row INSERT (20 parameters each: 20,000 per statement,
/// under SQLite's limit of 32,766).
const SQLITE_ROWS_PER_INSERT: usize = 1000;

const SQLITE_FLOW_COLUMNS: usize = 20;

/// The INSERT of `rows` flows, one `(?, …)` per row.
fn sqlite_insert_sql(rows: usize) -> String {
    let mut sql = String::with_capacity(300 + rows * (SQLITE_FLOW_COLUMNS * 2 + 3));
    sql.push_str(
        "INSERT INTO flows (exporter_id, session_id, seq, src_addr, dst_addr, src_port, dst_port, proto, \
         packets, bytes, start_ns, end_ns, vlan, dscp, tcp_flags, class, \"user\", process, sampling_interval, flow_hash) VALUES ",
    );
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str("(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)");
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
    group: &[WriteReq],
) -> Result<Vec<Outcome>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    let now = now_ns();
    let mut outcomes = Vec::with_capacity(group.len());
    let mut stored: Vec<&Batch> = Vec::with_capacity(group.len());
    for req in group {
        let b = &req.batch;
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
        stored.push(b);
        outcomes.push(Outcome::Stored);
    }
    let rows: Vec<(&Batch, &FlowRecord)> = stored
        .iter()
        .flat_map(|b| b.records.iter().map(move |r| (*b, r)))
        .collect();
    let mut chunks = rows.chunks(SQLITE_ROWS_PER_INSERT);
    let mut next = chunks.next().map(|c| (c.len(), sqlite_chunk_args(c)));
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
        next = chunks.next().map(|c| (c.len(), sqlite_chunk_args(c)));
        match done {
            Some(r) => r?,
            None => insert.await?,
        };
    }
    let mut sessions = Vec::new();
    for b in &stored {
        note_session(&mut sessions, b);
    }
    for (exporter_id, session_id, last_seq, records) in sessions {
        sqlx::query(
            "UPDATE sessions SET last_seq = MAX(COALESCE(last_seq, 0), ?), records = records + ? \
             WHERE exporter_id = ? AND session_id = ?",
        )
        .bind(last_seq)
        .bind(records)
        .bind(exporter_id)
        .bind(session_id)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(outcomes)
}

async fn commit_postgres(
    pool: &sqlx::PgPool,
    group: &[WriteReq],
) -> Result<Vec<Outcome>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    let now = now_ns();
    let mut outcomes = Vec::with_capacity(group.len());
    let mut copy = BytesMut::with_capacity(64 * 1024);
    copy.put_slice(b"PGCOPY\n\xff\r\n\0");
    copy.put_i32(0);
    copy.put_i32(0);
    let mut rows = 0usize;
    let mut sessions = Vec::new();
    for req in group {
        let b = &req.batch;
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
        for r in &b.records {
            copy_row(&mut copy, b, r);
        }
        rows += b.records.len();
        note_session(&mut sessions, b);
        outcomes.push(Outcome::Stored);
    }
    if rows > 0 {
        copy.put_i16(-1);
        let mut sink = tx
            .copy_in_raw(
                "COPY flows (exporter_id, session_id, seq, src_addr, dst_addr, src_port, dst_port, proto, \
                 packets, bytes, start_ns, end_ns, vlan, dscp, tcp_flags, class, \"user\", process, \
                 sampling_interval, flow_hash) FROM STDIN (FORMAT binary)",
            )
            .await?;
        sink.send(copy.freeze()).await?;
        sink.finish().await?;
    }
    // Last, so that the row lock on `sessions` is held only until the
    // commit right after: concurrent writers overlap their COPYs.
    for (exporter_id, session_id, last_seq, records) in sessions {
        sqlx::query(
            "UPDATE sessions SET last_seq = GREATEST(COALESCE(last_seq, 0), $1), records = records + $2 \
             WHERE exporter_id = $3 AND session_id = $4",
        )
        .bind(last_seq)
        .bind(records)
        .bind(exporter_id)
        .bind(session_id)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(outcomes)
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
fn copy_row(out: &mut BytesMut, b: &Batch, r: &FlowRecord) {
    out.put_i16(20);
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

impl Db {
    /// Records an exporter (by its unique name) and returns its id. The
    /// row's address and boot time are overwritten: the caller holds the
    /// name (the collector refuses a START naming an exporter that has a
    /// live session from another connection before it gets here).
    pub async fn register_exporter(
        &self,
        name: &str,
        address: &str,
        boot_ns: u64,
    ) -> Result<i64, sqlx::Error> {
        let now = now_ns();
        let boot = i64_of(boot_ns);
        let (id,): (i64,) = match self {
            Db::Sqlite(pool) => {
                sqlx::query_as(
                    "INSERT INTO exporters (name, address, boot_ns, first_seen_ns, last_seen_ns) VALUES (?, ?, ?, ?, ?) \
                     ON CONFLICT (name) DO UPDATE SET address = excluded.address, boot_ns = excluded.boot_ns, \
                     last_seen_ns = excluded.last_seen_ns RETURNING id",
                )
                .bind(name)
                .bind(address)
                .bind(boot)
                .bind(now)
                .bind(now)
                .fetch_one(pool)
                .await?
            }
            Db::Postgres(pool) => {
                sqlx::query_as(
                    "INSERT INTO exporters (name, address, boot_ns, first_seen_ns, last_seen_ns) VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (name) DO UPDATE SET address = excluded.address, boot_ns = excluded.boot_ns, \
                     last_seen_ns = excluded.last_seen_ns RETURNING id",
                )
                .bind(name)
                .bind(address)
                .bind(boot)
                .bind(now)
                .bind(now)
                .fetch_one(pool)
                .await?
            }
        };
        Ok(id)
    }

    /// Records a session (a stream; kept across reconnects).
    pub async fn open_session(
        &self,
        exporter_id: i64,
        session_id: i64,
        byte_order: &str,
    ) -> Result<(), sqlx::Error> {
        let now = now_ns();
        match self {
            Db::Sqlite(pool) => {
                sqlx::query(
                    "INSERT INTO sessions (exporter_id, session_id, started_ns, byte_order) VALUES (?, ?, ?, ?) \
                     ON CONFLICT (exporter_id, session_id) DO UPDATE SET byte_order = excluded.byte_order, stopped_ns = NULL",
                )
                .bind(exporter_id)
                .bind(session_id)
                .bind(now)
                .bind(byte_order)
                .execute(pool)
                .await?;
            }
            Db::Postgres(pool) => {
                sqlx::query(
                    "INSERT INTO sessions (exporter_id, session_id, started_ns, byte_order) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (exporter_id, session_id) DO UPDATE SET byte_order = excluded.byte_order, stopped_ns = NULL",
                )
                .bind(exporter_id)
                .bind(session_id)
                .bind(now)
                .bind(byte_order)
                .execute(pool)
                .await?;
            }
        }
        Ok(())
    }

    /// Marks a session stopped.
    pub async fn stop_session(&self, exporter_id: i64, session_id: i64) -> Result<(), sqlx::Error> {
        let now = now_ns();
        match self {
            Db::Sqlite(pool) => {
                sqlx::query(
                    "UPDATE sessions SET stopped_ns = ? WHERE exporter_id = ? AND session_id = ?",
                )
                .bind(now)
                .bind(exporter_id)
                .bind(session_id)
                .execute(pool)
                .await?;
            }
            Db::Postgres(pool) => {
                sqlx::query("UPDATE sessions SET stopped_ns = $1 WHERE exporter_id = $2 AND session_id = $3")
                    .bind(now)
                    .bind(exporter_id)
                    .bind(session_id)
                    .execute(pool)
                    .await?;
            }
        }
        Ok(())
    }

    /// Records a negotiated template (its JSON form).
    pub async fn store_template(
        &self,
        exporter_id: i64,
        session_id: i64,
        template_id: u16,
        config_id: u16,
        definition: &str,
    ) -> Result<(), sqlx::Error> {
        let now = now_ns();
        match self {
            Db::Sqlite(pool) => {
                sqlx::query(
                    "INSERT INTO templates (exporter_id, session_id, template_id, config_id, definition, created_ns) \
                     VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (exporter_id, session_id, template_id) \
                     DO UPDATE SET config_id = excluded.config_id, definition = excluded.definition",
                )
                .bind(exporter_id)
                .bind(session_id)
                .bind(i64::from(template_id))
                .bind(i64::from(config_id))
                .bind(definition)
                .bind(now)
                .execute(pool)
                .await?;
            }
            Db::Postgres(pool) => {
                sqlx::query(
                    "INSERT INTO templates (exporter_id, session_id, template_id, config_id, definition, created_ns) \
                     VALUES ($1, $2, $3, $4, $5::jsonb, $6) ON CONFLICT (exporter_id, session_id, template_id) \
                     DO UPDATE SET config_id = excluded.config_id, definition = excluded.definition",
                )
                .bind(exporter_id)
                .bind(session_id)
                .bind(i32::from(template_id))
                .bind(i32::from(config_id))
                .bind(definition)
                .bind(now)
                .execute(pool)
                .await?;
            }
        }
        Ok(())
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
            let (done, _wait) = oneshot::channel();
            WriteReq {
                batch: Batch {
                    exporter_id: ex,
                    session_id: 9,
                    seq,
                    records,
                    dedup,
                },
                done,
                memory: None,
            }
        };
        let group = vec![
            batch(5, true, 0),
            batch(5, true, 0),
            batch(6, false, 10_000),
        ];
        let Db::Sqlite(pool) = &db else { panic!() };
        let outcomes = commit_sqlite(pool, &group).await.unwrap();
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

    #[tokio::test]
    async fn sqlite_stores_once_per_key() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&format!("sqlite://{}", dir.path().join("s.db").display()))
            .await
            .unwrap();
        db.migrate().await.unwrap();
        let ex = db.register_exporter("m1", "127.0.0.1:1", 1).await.unwrap();
        db.open_session(ex, 9, "little").await.unwrap();
        let (tx, _task) = spawn_writer(Sink::Db(db.clone()), 8, 1000, 1);
        let rec = FlowRecord {
            src_addr: "10.0.0.1".parse().unwrap(),
            dst_addr: "10.0.0.2".parse().unwrap(),
            bytes: 100,
            packets: 1,
            class: Some("web".into()),
            ..FlowRecord::default()
        };
        let mut outcomes = Vec::new();
        for _ in 0..2 {
            let (done, wait) = oneshot::channel();
            tx.send(WriteReq {
                batch: Batch {
                    exporter_id: ex,
                    session_id: 9,
                    seq: 1,
                    records: vec![rec.clone(); 3],
                    dedup: true,
                },
                done,
                memory: None,
            })
            .await
            .unwrap();
            outcomes.push(wait.await.unwrap().unwrap());
        }
        assert_eq!(outcomes, [Outcome::Stored, Outcome::Duplicate]);
        let Db::Sqlite(pool) = &db else { panic!() };
        let (n, sum): (i64, i64) = sqlx::query_as("SELECT count(*), sum(bytes) FROM flows")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!((n, sum), (3, 300));
        let (last,): (i64,) = sqlx::query_as("SELECT last_seq FROM sessions")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(last, 1);
    }
}
