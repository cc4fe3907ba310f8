//! Storage of DATA messages: one writer task per collector groups the
//! messages of every session into one transaction, commits, and only then
//! answers each message's sender. What a transaction does (de-duplication
//! by `data_messages(exporter_id, session_id, seq)`, the rows, the session
//! totals) is `qosloop_store`'s [`Db::commit_batches`]; this module decides
//! the grouping and the retries: errors that a restart of the database
//! explains are retried with the same batch until it commits; nothing is
//! acknowledged before.

use qosloop_store::{is_lock_wait, is_transient, Db, KbConfig, Tally, FROZEN_COPY_AFTER};
pub use qosloop_store::{Batch, Outcome};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Mutex, OwnedSemaphorePermit};

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

/// A cluster node's tally (its partial sums under the published policy),
/// set by the node's policy follower and read by every commit; empty
/// outside a cluster and before a policy is published.
pub type TallyCell = Arc<std::sync::RwLock<Option<Arc<Tally>>>>;

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
    spawn_writer_tallied(sink, queue, group_records, writers, TallyCell::default())
}

/// [`spawn_writer`] for a cluster node: each transaction also adds its
/// records to the node's partial sums of `tally`'s current policy.
pub fn spawn_writer_tallied(
    sink: Sink,
    queue: usize,
    group_records: usize,
    writers: usize,
    tally: TallyCell,
) -> (mpsc::Sender<WriteReq>, Vec<tokio::task::JoinHandle<()>>) {
    spawn_writer_with(
        sink,
        queue,
        group_records,
        writers,
        tally,
        WriterOptions::default(),
    )
}

/// What a writer may do beyond [`spawn_writer_tallied`].
#[derive(Debug, Default)]
pub struct WriterOptions {
    /// Keep the knowledge base (docs/kb.md) in every transaction.
    pub kb: Option<KbConfig>,
    /// Take nothing off the queue until this turns `true` (the collector
    /// started while the database was unreachable: requests wait in the
    /// bounded queue, their senders are held and nothing is acknowledged,
    /// until the schema is migrated).
    pub ready: Option<tokio::sync::watch::Receiver<bool>>,
    /// A cluster node's bucket count: each row gets its flow hash's bucket
    /// (`flows.bucket`, what the `stitch` analysis reads by).
    pub flow_buckets: Option<u32>,
}

/// [`spawn_writer_tallied`] with [`WriterOptions`].
pub fn spawn_writer_with(
    sink: Sink,
    queue: usize,
    group_records: usize,
    writers: usize,
    tally: TallyCell,
    options: WriterOptions,
) -> (mpsc::Sender<WriteReq>, Vec<tokio::task::JoinHandle<()>>) {
    let (tx, rx) = mpsc::channel(queue.max(1));
    let rx = Arc::new(Mutex::new(rx));
    let writers = match sink {
        Sink::Db(Db::Postgres(_)) => writers.max(1),
        _ => 1,
    };
    let tasks = (0..writers)
        .map(|_| {
            let (sink, rx, tally) = (sink.clone(), rx.clone(), tally.clone());
            let (kb, ready, buckets) = (options.kb, options.ready.clone(), options.flow_buckets);
            tokio::spawn(async move {
                if let Some(mut ready) = ready {
                    if ready.wait_for(|r| *r).await.is_err() {
                        return;
                    }
                }
                writer(sink, rx, group_records.max(1), tally, kb, buckets).await
            })
        })
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

/// Counters of the storage writers, process-wide (every collector of a
/// process, in tests, adds to them): read by `/metrics`.
#[derive(Debug)]
pub struct WriterStats {
    /// Seconds from taking a group off the queue to its commit (retries
    /// included).
    pub commit_seconds: qosloop_runtime::metrics::Histogram,
    /// Messages (batches) committed, and of them duplicates not stored again.
    pub messages_committed: AtomicU64,
    pub messages_duplicate: AtomicU64,
    /// Records of the messages stored.
    pub records_committed: AtomicU64,
    /// Messages whose storing failed (the session gets an error).
    pub messages_failed: AtomicU64,
    /// Commits that waited too long on another writer's lock and were
    /// tried again (see [`LOCK_WAIT_ATTEMPTS`]).
    pub lock_waits: AtomicU64,
}

/// Attempts in all at a group whose statements keep waiting on another
/// writer's lock past the statement timeout (10 s each); the sessions get
/// the error after that, and their exporters send the messages again.
pub const LOCK_WAIT_ATTEMPTS: u32 = 6;

/// The process's [`WriterStats`].
pub fn writer_stats() -> &'static WriterStats {
    static STATS: std::sync::OnceLock<WriterStats> = std::sync::OnceLock::new();
    STATS.get_or_init(|| WriterStats {
        commit_seconds: qosloop_runtime::metrics::Histogram::latency(),
        messages_committed: AtomicU64::new(0),
        messages_duplicate: AtomicU64::new(0),
        records_committed: AtomicU64::new(0),
        messages_failed: AtomicU64::new(0),
        lock_waits: AtomicU64::new(0),
    })
}

async fn writer(
    sink: Sink,
    rx: Arc<Mutex<mpsc::Receiver<WriteReq>>>,
    group_records: usize,
    tally: TallyCell,
    kb: Option<KbConfig>,
    buckets: Option<u32>,
) {
    let stats = writer_stats();
    while let Some(group) = next_group(&rx, group_records).await {
        let current = tally.read().unwrap_or_else(|e| e.into_inner()).clone();
        let started = std::time::Instant::now();
        let result =
            commit_with_retry(&sink, &group, buckets, current.as_deref(), kb.as_ref()).await;
        stats.commit_seconds.observe_duration(started.elapsed());
        let bump = |c: &AtomicU64, n: u64| {
            c.fetch_add(n, Ordering::Relaxed);
        };
        match result {
            Ok(outcomes) => {
                for (req, outcome) in group.into_iter().zip(outcomes) {
                    let WriteReq {
                        batch,
                        done,
                        memory,
                    } = req;
                    bump(&stats.messages_committed, 1);
                    match outcome {
                        Outcome::Stored => {
                            bump(&stats.records_committed, batch.records.len() as u64)
                        }
                        Outcome::Duplicate => bump(&stats.messages_duplicate, 1),
                    }
                    let _ = done.send(Ok(outcome));
                    // The records are gone: their share of the budget is free.
                    drop(batch);
                    drop(memory);
                }
            }
            Err(e) => {
                bump(&stats.messages_failed, group.len() as u64);
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

async fn commit_with_retry(
    sink: &Sink,
    group: &[WriteReq],
    buckets: Option<u32>,
    tally: Option<&Tally>,
    kb: Option<&KbConfig>,
) -> Result<Vec<Outcome>, String> {
    let db = match sink {
        Sink::Discard => return Ok(vec![Outcome::Stored; group.len()]),
        Sink::Db(db) => db,
    };
    let mut delay = Duration::from_millis(50);
    let mut attempt = 0u32;
    let batches: Vec<&Batch> = group.iter().map(|req| &req.batch).collect();
    loop {
        attempt += 1;
        let result = db
            .commit_batches_routed(&batches, buckets, tally, kb, qosloop_store::now_ns())
            .await;
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
            Err(e) if is_lock_wait(&e) && attempt < LOCK_WAIT_ATTEMPTS => {
                // Another writer holds what this batch needs: a collector
                // that took these messages before us and froze mid-COPY
                // holds them until it is ended.
                match db.end_frozen_copies(FROZEN_COPY_AFTER).await {
                    Ok(ended) if !ended.is_empty() => tracing::warn!(
                        backends = ?ended,
                        "ended the transactions of writers frozen inside a COPY; retrying the batch"
                    ),
                    Ok(_) => {
                        tracing::warn!(error = %e, attempt, "the batch waited on another writer's lock; retrying it")
                    }
                    Err(re) => {
                        tracing::warn!(error = %e, reap_error = %re, attempt, "the batch waited on another writer's lock; retrying it")
                    }
                }
                writer_stats().lock_waits.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Err(e) => return Err(format!("storing records: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qosloop_schema::FlowRecord;

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
