//! The loader: reads synced frames behind the receiving threads, hands
//! them to the storage writer, and moves the cursor after commit.

use super::frame::{self, FrameError};
use super::{segment_path, write_cursor, Journal, Pos};
use crate::store::{Batch, Sink, WriteReq};
use qosloop_store::is_transient;
use std::collections::{HashMap, VecDeque};
use std::io::{Read, Seek, SeekFrom};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Records handed to the writer and not yet committed, at most: the
/// loader's memory is bounded whatever the journal holds.
const MAX_INFLIGHT_RECORDS: usize = 1 << 18;
/// Bytes read from a segment at once (more when one frame is larger).
const READ_CHUNK: usize = 8 << 20;
/// The cursor file is written at most this often.
const CURSOR_EVERY: Duration = Duration::from_millis(100);
/// The loader stands aside for busy receivers at most this long at a time.
const YIELD_MAX: Duration = Duration::from_secs(2);
/// Its naps meanwhile.
const YIELD_NAP: Duration = Duration::from_millis(10);

/// Starts the loader task: it runs until the journal is closed and
/// everything synced is committed (or the task is aborted).
pub fn spawn_loader(
    journal: Arc<Journal>,
    sink: Sink,
    writer: mpsc::Sender<WriteReq>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut l = Loader {
            pos: journal.shared.start,
            committed: journal.shared.start,
            cursor_written: journal.shared.start,
            cursor_at: Instant::now(),
            buf: Vec::new(),
            buf_at: 0,
            inflight: VecDeque::new(),
            inflight_records: 0,
            ids: HashMap::new(),
            yielding_since: None,
            journal,
            sink,
            writer,
        };
        l.run().await;
    })
}

type Answer = oneshot::Receiver<Result<crate::store::Outcome, String>>;

struct Loader {
    journal: Arc<Journal>,
    sink: Sink,
    writer: mpsc::Sender<WriteReq>,
    /// The next frame to read.
    pos: Pos,
    /// Everything before this is committed.
    committed: Pos,
    cursor_written: Pos,
    cursor_at: Instant,
    /// Bytes of segment `pos.seg` from offset `buf_at`.
    buf: Vec<u8>,
    buf_at: u64,
    inflight: VecDeque<(Answer, Pos, usize)>,
    inflight_records: usize,
    ids: HashMap<String, i64>,
    /// Since when it has been standing aside for busy receivers.
    yielding_since: Option<Instant>,
}

impl Loader {
    async fn run(&mut self) {
        loop {
            let closed = self.journal.shared.closed.load(Ordering::Relaxed);
            if !closed && self.yield_to_receivers() {
                // Commits already handed on are still taken in.
                self.settle(false).await;
                tokio::time::sleep(YIELD_NAP).await;
                continue;
            }
            let synced = self.journal.synced();
            let progressed = if self.pos.seg < synced.seg || self.pos.off < synced.off {
                self.read_available(synced).await
            } else {
                false
            };
            self.settle(false).await;
            if !progressed {
                if closed && self.pos >= self.journal.synced() {
                    self.settle(true).await;
                    self.save_cursor(true);
                    return;
                }
                // Woken by a sync; the timeout covers a notification lost
                // while reading.
                let _ = tokio::time::timeout(
                    Duration::from_millis(50),
                    self.journal.shared.notify.notified(),
                )
                .await;
                if self.inflight.is_empty() {
                    self.save_cursor(false);
                }
            }
        }
    }

    /// True when the loader should stand aside now: a receiving thread is
    /// backlogged, it has not stood aside for [`YIELD_MAX`] already, and
    /// the journal holds less than half its bound.
    fn yield_to_receivers(&mut self) -> bool {
        let c = &self.journal.shared;
        let roomy = c.counters.disk_bytes.load(Ordering::Relaxed) < c.config.max_bytes / 2;
        if !roomy || !self.journal.receivers_busy() {
            self.yielding_since = None;
            return false;
        }
        let since = *self.yielding_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= YIELD_MAX {
            // One round of loading, then it may stand aside again.
            self.yielding_since = None;
            return false;
        }
        true
    }

    /// Reads and hands on the frames up to `synced`; true if it moved.
    async fn read_available(&mut self, synced: Pos) -> bool {
        let sealed = self.pos.seg < synced.seg;
        let limit = if sealed { u64::MAX } else { synced.off };
        let before = self.pos;
        match self.fill(limit) {
            Ok(()) if sealed && self.buf.len() as u64 + self.buf_at <= self.pos.off => {
                // The end of a sealed segment.
                self.next_segment();
                return true;
            }
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // A segment that was never created (a failed roll): next.
                self.next_segment();
                return true;
            }
            Err(e) => {
                tracing::error!(error = %e, segment = self.pos.seg, "journal: reading failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                return false;
            }
        }
        loop {
            let start = (self.pos.off - self.buf_at) as usize;
            let avail = &self.buf[start..];
            if avail.is_empty() {
                // The next fill reads on (or finds the segment's end).
                break;
            }
            match frame::split_frame(avail) {
                Ok((payload, len)) => {
                    let decoded = frame::decode_payload(payload);
                    self.pos.off += len as u64;
                    match decoded {
                        Ok((head, records)) => self.hand_on(head, records).await,
                        Err(e) => self.skip_segment(e, sealed),
                    }
                }
                Err(FrameError::Incomplete) if !sealed => {
                    // Synced bytes always end on a frame; more comes.
                    break;
                }
                Err(FrameError::Incomplete) if self.buf.len() >= READ_CHUNK => {
                    // A frame longer than the chunk: read it whole.
                    break;
                }
                Err(e) => {
                    self.skip_segment(e, sealed);
                    break;
                }
            }
            if self.inflight_records >= MAX_INFLIGHT_RECORDS {
                self.settle_one().await;
            }
        }
        self.pos != before
    }

    /// Makes `buf` hold the segment from `pos.off` up to `limit` (a chunk).
    fn fill(&mut self, limit: u64) -> std::io::Result<()> {
        let have_from = self.buf_at;
        let have_to = self.buf_at + self.buf.len() as u64;
        let want_to = limit.min(self.pos.off + READ_CHUNK as u64);
        if self.pos.off >= have_from && want_to <= have_to && !self.buf.is_empty() {
            return Ok(());
        }
        let path = segment_path(&self.journal.shared.config.dir, self.pos.seg);
        let mut f = std::fs::File::open(path)?;
        f.seek(SeekFrom::Start(self.pos.off))?;
        let want = if limit == u64::MAX {
            // A sealed segment: the chunk, or the frame in front if longer.
            let frame_len = self.frame_len_at(&mut f)?;
            READ_CHUNK.max(frame_len)
        } else {
            (limit - self.pos.off) as usize
        };
        f.seek(SeekFrom::Start(self.pos.off))?;
        self.buf.clear();
        f.take(want as u64).read_to_end(&mut self.buf)?;
        self.buf_at = self.pos.off;
        Ok(())
    }

    fn frame_len_at(&self, f: &mut std::fs::File) -> std::io::Result<usize> {
        let mut h = [0u8; frame::FRAME_HEADER];
        match f.read_exact(&mut h) {
            Ok(()) => {
                let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
                Ok(frame::FRAME_HEADER + len.min(frame::MAX_FRAME))
            }
            Err(_) => Ok(0),
        }
    }

    fn next_segment(&mut self) {
        self.pos = Pos {
            seg: self.pos.seg + 1,
            off: frame::SEGMENT_MAGIC.len() as u64,
        };
        self.buf.clear();
        self.buf_at = self.pos.off;
    }

    /// A frame that cannot be trusted: the rest of its segment is skipped
    /// once the segment is sealed (the active segment is not damaged by
    /// appends; a bad frame in it waits for the roll a write error makes).
    fn skip_segment(&mut self, e: FrameError, sealed: bool) {
        self.journal
            .shared
            .counters
            .corrupt
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(segment = self.pos.seg, offset = self.pos.off, error = %e,
            "journal: damaged or torn frame; the rest of the segment is skipped");
        if sealed {
            self.next_segment();
        } else {
            // Nothing after it in this segment can be read either.
            self.pos.off = u64::MAX / 2;
            self.buf.clear();
        }
    }

    async fn exporter_id(&mut self, name: &str, addr: &str) -> i64 {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        let db = match &self.sink {
            Sink::Db(db) => db.clone(),
            Sink::Discard => {
                let id = self.ids.len() as i64 + 1;
                self.ids.insert(name.to_owned(), id);
                return id;
            }
        };
        let mut delay = Duration::from_millis(50);
        loop {
            match db.register_exporter(name, addr, 0).await {
                Ok(id) => {
                    if self.ids.len() >= 65_536 {
                        self.ids.clear();
                    }
                    self.ids.insert(name.to_owned(), id);
                    return id;
                }
                Err(e) => {
                    let transient = is_transient(&e);
                    tracing::warn!(error = %e, exporter = name, transient,
                        "journal: storage unavailable; the journal holds the records");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    async fn hand_on(&mut self, head: frame::FrameHead, records: Vec<qosloop_schema::FlowRecord>) {
        let n = records.len();
        if n == 0 {
            return;
        }
        let exporter_id = self.exporter_id(&head.name, &head.addr).await;
        let (done, answer) = oneshot::channel();
        let req = WriteReq {
            batch: Batch {
                exporter_id,
                session_id: i64::from(head.domain),
                seq: head.seq,
                records,
                dedup: false,
            },
            done,
            memory: None,
        };
        if self.writer.send(req).await.is_err() {
            tracing::error!("journal: the storage writer has stopped");
            return;
        }
        self.inflight.push_back((answer, self.pos, n));
        self.inflight_records += n;
    }

    async fn settle_one(&mut self) {
        let Some((answer, end, n)) = self.inflight.pop_front() else {
            return;
        };
        let result = answer.await.ok();
        self.account(result, end, n);
    }

    fn account(
        &mut self,
        result: Option<Result<crate::store::Outcome, String>>,
        end: Pos,
        n: usize,
    ) {
        self.inflight_records -= n;
        let c = &self.journal.shared.counters;
        match result {
            Some(Ok(_)) => {
                c.loaded.fetch_add(n as u64, Ordering::Relaxed);
            }
            Some(Err(e)) => {
                tracing::error!(error = %e, records = n, "journal: the writer refused a batch (dropped, journal_load)");
                c.dropped_load.fetch_add(n as u64, Ordering::Relaxed);
            }
            None => {
                c.dropped_load.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        self.committed = end;
    }

    /// Takes the answers in (all with `wait`, else those already there),
    /// in order; moves the cursor.
    async fn settle(&mut self, wait: bool) {
        while let Some((answer, _, _)) = self.inflight.front_mut() {
            let result = if wait {
                answer.await.ok()
            } else {
                match answer.try_recv() {
                    Err(oneshot::error::TryRecvError::Empty) => break,
                    Err(oneshot::error::TryRecvError::Closed) => None,
                    Ok(r) => Some(r),
                }
            };
            if let Some((_, end, n)) = self.inflight.pop_front() {
                self.account(result, end, n);
            }
        }
        if self.pos > self.committed && self.inflight.is_empty() {
            // Skipped or empty frames need no commit.
            self.committed = self.pos;
        }
        self.save_cursor(false);
    }

    /// Persists the cursor (throttled unless `now`) and deletes segments
    /// wholly before it.
    fn save_cursor(&mut self, now: bool) {
        let c = self.committed;
        if c == self.cursor_written || (!now && self.cursor_at.elapsed() < CURSOR_EVERY) {
            return;
        }
        let dir = &self.journal.shared.config.dir;
        // Past the end of an abandoned segment: stored as its next one.
        let c = if c.off >= u64::MAX / 4 {
            Pos {
                seg: c.seg + 1,
                off: frame::SEGMENT_MAGIC.len() as u64,
            }
        } else {
            c
        };
        if let Err(e) = write_cursor(dir, c) {
            tracing::error!(error = %e, "journal: writing the cursor failed");
            return;
        }
        self.cursor_at = Instant::now();
        for seg in self.cursor_written.seg..c.seg {
            let path = segment_path(dir, seg);
            if let Ok(meta) = std::fs::metadata(&path) {
                if std::fs::remove_file(&path).is_ok() {
                    self.journal
                        .shared
                        .counters
                        .disk_bytes
                        .fetch_sub(meta.len(), Ordering::Relaxed);
                }
            }
        }
        self.cursor_written = c;
    }
}
