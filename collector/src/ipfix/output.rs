//! Where decoded records and decoder state go: records to the collector's
//! batched storage writer (COPY on PostgreSQL), tagged with the exporter's
//! row and observation domain; template changes and counters to SQL.

use super::decoder::{Decoder, ExporterKey, ExporterStats};
use super::sink::{EncodedRecords, RecordSink};
use super::sql;
use super::wire::Version;
use crate::journal::frame::{self, FrameHead, OpenFrame};
use crate::journal::Journal;
use crate::store::{Batch, Sink, WriteReq};
use qosloop_schema::FlowRecord;
use qosloop_store::Db;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Decoded records one decoder may have handed to the writer and not seen
/// committed (about 40 MiB at ~170 B a record), per receiving thread or TCP
/// session; counted in records, not batches, so that batches of many small
/// exporters and batches of one huge message weigh what they hold.
const MAX_INFLIGHT_RECORDS: usize = 1 << 18;

/// Records of one exporter and domain waiting to be handed to the writer.
#[derive(Debug, Default)]
struct Pending {
    seq: u32,
    records: Vec<FlowRecord>,
}

/// A journal frame being filled with the records of one exporter and
/// domain.
#[derive(Debug)]
struct PendingFrame {
    buf: Vec<u8>,
    open: OpenFrame,
    records: u32,
}

/// The storage side of one decoder.
#[derive(Debug)]
pub struct Output {
    /// With a journal (UDP), records are encoded into frames as they are
    /// decoded and appended at flush; nothing here waits for SQL.
    journal: Option<Arc<Journal>>,
    frames: HashMap<(SocketAddr, u32), PendingFrame>,
    /// Emptied frame buffers, kept for their capacity.
    spare: Vec<Vec<u8>>,
    sink: Sink,
    writer: mpsc::Sender<WriteReq>,
    tcp: bool,
    ids: HashMap<SocketAddr, i64>,
    max_ids: usize,
    pending: HashMap<(SocketAddr, u32), Pending>,
    buffered: usize,
    flush_records: usize,
    /// Synthetic ids when nothing is stored (`discard:`).
    next_id: i64,
    /// Answers of batches handed to the writer and not yet committed.
    /// With the records of each.
    inflight: Vec<(
        oneshot::Receiver<Result<crate::store::Outcome, String>>,
        usize,
    )>,
    inflight_records: usize,
    /// The counters last handed out for storage.
    stored: StoredStats,
    /// The `exporters.name` under which drops not charged to an exporter
    /// (bad headers of untracked sources, refused sources) are stored, and
    /// its row once registered.
    unattributed: Option<(String, Option<i64>)>,
}

type StoredStats = HashMap<(ExporterKey, Option<Version>, Option<u32>), ExporterStats>;

/// UDP exporters that never sent a template nor a record (only headers,
/// from any number of source ports) get no `exporters` row of their own:
/// their counters are added to the unattributed row, so a sender of empty
/// messages from thousands of ports makes no rows in SQL (review finding
/// 1). Once an exporter sends a template or a record its counters move to
/// its own rows (the unattributed sum then shrinks by them).
fn fold_unproven(stats: &[ExporterStats]) -> Vec<ExporterStats> {
    let mut proven: HashMap<ExporterKey, bool> = HashMap::new();
    for s in stats {
        let p = proven.entry(s.exporter).or_default();
        *p |= s.counters.records > 0 || s.counters.templates_received > 0 || s.templates > 0;
    }
    let mut out = Vec::with_capacity(stats.len());
    let mut folded: Option<ExporterStats> = None;
    for s in stats {
        let unattributed = s.exporter.addr.ip().is_unspecified();
        if !unattributed && proven.get(&s.exporter).copied().unwrap_or(false) {
            out.push(s.clone());
            continue;
        }
        match &mut folded {
            Some(f) => {
                f.counters.add(&s.counters);
                f.pending_sets += s.pending_sets;
            }
            None => {
                folded = Some(ExporterStats {
                    exporter: ExporterKey {
                        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                        session: None,
                    },
                    version: None,
                    domain: None,
                    counters: s.counters.clone(),
                    templates: 0,
                    pending_sets: s.pending_sets,
                });
            }
        }
    }
    out.extend(folded);
    out
}

/// The rows of `stats` that differ from `stored`; `stored` becomes
/// `stats`, so that exporters gone from the decoder are forgotten here too.
fn changed_stats(stored: &mut StoredStats, stats: &[ExporterStats]) -> Vec<ExporterStats> {
    let mut next = HashMap::with_capacity(stats.len());
    let mut changed = Vec::new();
    for s in stats {
        let key = (s.exporter, s.version, s.domain);
        if stored.get(&key) != Some(s) {
            changed.push(s.clone());
        }
        next.insert(key, s.clone());
    }
    *stored = next;
    changed
}

impl Output {
    pub fn new(
        sink: Sink,
        writer: mpsc::Sender<WriteReq>,
        tcp: bool,
        flush_records: usize,
        max_ids: usize,
    ) -> Output {
        Output {
            journal: None,
            frames: HashMap::new(),
            spare: Vec::new(),
            sink,
            writer,
            tcp,
            ids: HashMap::new(),
            max_ids,
            pending: HashMap::new(),
            buffered: 0,
            flush_records,
            next_id: 1,
            inflight: Vec::new(),
            inflight_records: 0,
            stored: HashMap::new(),
            unattributed: None,
        }
    }

    /// Records go to `journal` (appended at each flush) instead of the
    /// writer.
    pub fn set_journal(&mut self, journal: Arc<Journal>) {
        self.journal = Some(journal);
    }

    /// Adds the records one message produced; true when a flush is due.
    pub fn add(
        &mut self,
        from: SocketAddr,
        domain: u32,
        seq: u32,
        records: &mut Vec<FlowRecord>,
    ) -> bool {
        if records.is_empty() {
            return self.buffered >= self.flush_records;
        }
        self.buffered += records.len();
        if self.journal.is_some() {
            // Encoded at once; `records` keeps its capacity for the next
            // datagram.
            let f = self.frame(from, domain, seq);
            frame::push_records(&mut f.buf, records);
            frame::set_seq(&mut f.buf, f.open, seq);
            f.records += records.len() as u32;
            records.clear();
            return self.buffered >= self.flush_records;
        }
        let p = self.pending.entry((from, domain)).or_default();
        p.seq = seq;
        // Moves the records (the batch grows by doubling); the decoder's
        // vector keeps its capacity for the next datagram.
        p.records.append(records);
        self.buffered >= self.flush_records
    }

    /// Adds the records one message produced, already in the journal's
    /// encoding (the UDP path with a journal); true when a flush is due.
    /// `records` is emptied (its capacity kept).
    pub fn add_encoded(
        &mut self,
        from: SocketAddr,
        domain: u32,
        seq: u32,
        records: &mut EncodedRecords,
    ) -> bool {
        let n = records.len();
        if n == 0 {
            return self.buffered >= self.flush_records;
        }
        debug_assert!(self.journal.is_some(), "encoded records without a journal");
        self.buffered += n;
        let f = self.frame(from, domain, seq);
        f.buf.extend_from_slice(records.bytes());
        frame::set_seq(&mut f.buf, f.open, seq);
        f.records += n as u32;
        records.clear();
        self.buffered >= self.flush_records
    }

    /// The open journal frame of `from` and `domain`, begun when absent.
    fn frame(&mut self, from: SocketAddr, domain: u32, seq: u32) -> &mut PendingFrame {
        let spare = &mut self.spare;
        self.frames.entry((from, domain)).or_insert_with(|| {
            let mut buf = spare.pop().unwrap_or_default();
            let head = FrameHead {
                name: sql::udp_exporter_name(from),
                addr: from.to_string(),
                domain,
                seq,
            };
            let open = frame::begin_frame(&mut buf, &head);
            PendingFrame {
                buf,
                open,
                records: 0,
            }
        })
    }

    /// The `exporters.id` of `addr`, registered on first use.
    pub async fn exporter_id(&mut self, addr: SocketAddr) -> Result<i64, sqlx::Error> {
        // A TCP exporter is one row per address, whatever its port.
        let key = if self.tcp {
            SocketAddr::new(addr.ip(), 0)
        } else {
            addr
        };
        if let Some(id) = self.ids.get(&key) {
            return Ok(*id);
        }
        if self.ids.len() >= self.max_ids {
            self.ids.clear();
        }
        let id = match &self.sink {
            Sink::Db(db) => {
                let name = if self.tcp {
                    sql::tcp_exporter_name(addr)
                } else {
                    sql::udp_exporter_name(addr)
                };
                db.register_exporter(&name, &addr.to_string(), 0).await?
            }
            Sink::Discard => {
                self.next_id += 1;
                self.next_id
            }
        };
        self.ids.insert(key, id);
        Ok(id)
    }

    /// Hands every waiting record to the writer (waiting for room: a slow
    /// database fills the socket's receive buffer, where the kernel counts
    /// what it drops).
    pub async fn flush(&mut self) -> Result<(), sqlx::Error> {
        if self.buffered == 0 {
            return Ok(());
        }
        if let Some(journal) = &self.journal {
            for (_, mut f) in self.frames.drain() {
                frame::finish_frame(&mut f.buf, f.open, f.records);
                journal.append(&f.buf, u64::from(f.records));
                f.buf.clear();
                if self.spare.len() < 64 {
                    self.spare.push(f.buf);
                }
            }
            self.buffered = 0;
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        self.buffered = 0;
        for ((from, domain), p) in pending {
            if p.records.is_empty() {
                continue;
            }
            let exporter_id = self.exporter_id(from).await?;
            let n = p.records.len();
            let (done, answer) = oneshot::channel();
            let req = WriteReq {
                batch: Batch {
                    exporter_id,
                    session_id: i64::from(domain),
                    seq: p.seq,
                    records: p.records,
                    dedup: false,
                },
                done,
                memory: None,
            };
            if self.writer.send(req).await.is_err() {
                tracing::error!("the storage writer has stopped; IPFIX records are lost");
            }
            self.inflight.push((answer, n));
            self.inflight_records += n;
            // Decoded records waiting for storage are bounded: past this
            // many the receiver waits for the oldest to commit (and the
            // kernel's queue, counted, takes up the slack).
            while self.inflight_records > MAX_INFLIGHT_RECORDS && !self.inflight.is_empty() {
                let (oldest, n) = self.inflight.remove(0);
                self.inflight_records -= n;
                let _ = oldest.await;
            }
        }
        // Answers already in are dropped (the writer logs failures).
        let mut done = 0;
        self.inflight.retain_mut(|(a, n)| {
            let waiting = matches!(a.try_recv(), Err(oneshot::error::TryRecvError::Empty));
            if !waiting {
                done += *n;
            }
            waiting
        });
        self.inflight_records -= done;
        Ok(())
    }

    /// Waits until every batch handed to the writer is committed (or has
    /// failed); at shutdown.
    pub async fn drain(&mut self) {
        for (a, _) in self.inflight.drain(..) {
            let _ = a.await;
        }
        self.inflight_records = 0;
    }

    /// Writes the decoder's template changes (UDP) to `templates`, in one
    /// transaction (the decoder keeps one change per template id).
    pub async fn persist_templates(&mut self, decoder: &mut Decoder) -> Result<(), sqlx::Error> {
        let changes = decoder.take_template_changes();
        let Sink::Db(db) = self.sink.clone() else {
            return Ok(());
        };
        let mut rows = Vec::with_capacity(changes.len());
        for c in changes {
            rows.push((self.exporter_id(c.exporter).await?, c));
        }
        sql::store_templates(&db, &rows).await
    }

    /// The counters that changed since the last call, with their exporter
    /// rows (registered on first use): what [`sql::store_stats`] writes.
    pub async fn changed_stats(
        &mut self,
        stats: &[ExporterStats],
    ) -> Result<Vec<(i64, ExporterStats)>, sqlx::Error> {
        let folded;
        let stats = if self.tcp {
            stats
        } else {
            folded = fold_unproven(stats);
            &folded[..]
        };
        super::board::board().post(stats);
        let changed = changed_stats(&mut self.stored, stats);
        let mut rows = Vec::with_capacity(changed.len());
        let Some(db) = self.db().cloned() else {
            return Ok(rows);
        };
        for s in changed {
            if !s.exporter.addr.ip().is_unspecified() {
                rows.push((self.exporter_id(s.exporter.addr).await?, s));
                continue;
            }
            let Some((name, id)) = &mut self.unattributed else {
                continue;
            };
            let id = match id {
                Some(id) => *id,
                None => *id.insert(db.register_exporter(name, name, 0).await?),
            };
            rows.push((id, s));
        }
        Ok(rows)
    }

    /// Writes the counters that changed since the last call to SQL, in one
    /// transaction.
    pub async fn store_stats(&mut self, stats: &[ExporterStats]) -> Result<(), sqlx::Error> {
        let rows = self.changed_stats(stats).await?;
        match self.db() {
            Some(db) => sql::store_stats(db, &rows).await,
            None => Ok(()),
        }
    }

    /// Stores the drops not charged to an exporter as those of the
    /// pseudo-exporter `name` (one per receiving thread).
    pub fn set_unattributed_name(&mut self, name: String) {
        self.unattributed = Some((name, None));
    }

    pub fn db(&self) -> Option<&Db> {
        match &self.sink {
            Sink::Db(db) => Some(db),
            Sink::Discard => None,
        }
    }
}

/// Persisted UDP templates by exporter, waiting to be installed in the
/// decoder of the thread that first hears from that exporter (the kernel,
/// not the collector, decides which thread that is). Installed lazily, a
/// restored template takes no exporter slot in the other threads, and their
/// sweeps never expire (and delete) a copy they never used.
#[derive(Debug, Default)]
pub struct Restorable {
    by_exporter: HashMap<SocketAddr, Vec<sql::StoredTemplate>>,
}

impl Restorable {
    /// Loads the persisted templates (at most as many as `decoder`'s limits
    /// could hold).
    pub async fn load(db: &Db, decoder: &Decoder) -> Result<Restorable, sqlx::Error> {
        let limit = decoder
            .limits()
            .max_exporters
            .saturating_mul(decoder.limits().max_templates)
            .min(1 << 20);
        let mut by_exporter: HashMap<SocketAddr, Vec<sql::StoredTemplate>> = HashMap::new();
        for t in sql::load_templates(db, limit).await? {
            by_exporter.entry(t.exporter).or_default().push(t);
        }
        Ok(Restorable { by_exporter })
    }

    /// Templates waiting.
    pub fn len(&self) -> usize {
        self.by_exporter.values().map(Vec::len).sum()
    }

    /// Installs the waiting templates of `from`, once; returns how many
    /// were taken.
    pub fn install(&mut self, from: SocketAddr, decoder: &mut Decoder) -> usize {
        if self.by_exporter.is_empty() {
            return 0;
        }
        let Some(stored) = self.by_exporter.remove(&from) else {
            return 0;
        };
        stored
            .iter()
            .filter(|t| {
                decoder.restore_template(
                    t.exporter,
                    t.domain,
                    t.template_id,
                    &t.definition,
                    t.seen_ns,
                )
            })
            .count()
    }

    /// Forgets what is still waiting (once it would have expired anyway).
    pub fn clear(&mut self) {
        self.by_exporter = HashMap::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipfix::Counters;

    fn row(port: u16, messages: u64) -> ExporterStats {
        ExporterStats {
            exporter: ExporterKey {
                addr: SocketAddr::from(([192, 0, 2, 1], port)),
                session: None,
            },
            version: Some(Version::V9),
            domain: Some(1),
            counters: Counters {
                messages,
                ..Counters::default()
            },
            templates: 0,
            pending_sets: 0,
        }
    }

    /// Review finding 2: every exporter's counters were written at every
    /// interval; only what changed is written now.
    #[test]
    fn only_changed_counters_are_written() {
        let mut stored = StoredStats::new();
        let all: Vec<_> = (0..1000).map(|p| row(p, 1)).collect();
        assert_eq!(changed_stats(&mut stored, &all).len(), 1000);
        assert!(changed_stats(&mut stored, &all).is_empty());
        let mut next = all.clone();
        next[7] = row(7, 2);
        let changed = changed_stats(&mut stored, &next);
        assert_eq!(changed, vec![row(7, 2)]);
        // Exporters gone from the decoder are forgotten.
        assert_eq!(changed_stats(&mut stored, &next[..1]).len(), 0);
        assert_eq!(stored.len(), 1);
    }

    /// Review finding 1: senders of valid but empty headers from many
    /// ports make no exporter rows; their counters are in the unattributed
    /// row. An exporter that sent a record has its own rows.
    #[test]
    fn exporters_without_templates_or_records_are_folded() {
        let mut stats: Vec<_> = (0..500).map(|p| row(p, 1)).collect();
        let mut real = row(2055, 10);
        real.counters.records = 300;
        stats.push(real.clone());
        let folded = fold_unproven(&stats);
        assert_eq!(folded.len(), 2);
        assert_eq!(folded[0], real);
        assert!(folded[1].exporter.addr.ip().is_unspecified());
        assert_eq!(folded[1].counters.messages, 500);
    }

    /// Review finding 8: every UDP thread installed every stored template,
    /// taking slots for exporters it never hears from and expiring (and
    /// deleting) copies it never used. Now only the thread that hears from
    /// an exporter installs its templates.
    #[test]
    fn stored_templates_go_to_the_thread_that_hears_their_exporter() {
        let exporter: SocketAddr = "192.0.2.1:2055".parse().unwrap();
        let stored = sql::StoredTemplate {
            exporter,
            domain: 1,
            template_id: 256,
            definition: "ipfix data 0 8:4 12:4 1:4".into(),
            seen_ns: 1_000,
        };
        let stash = || Restorable {
            by_exporter: [(exporter, vec![stored.clone()])].into_iter().collect(),
        };
        let (mut hears, mut other) = (stash(), stash());
        let mut d1 = Decoder::new(crate::ipfix::Limits::default());
        let mut d2 = Decoder::new(crate::ipfix::Limits::default());
        assert_eq!(other.install("192.0.2.9:1".parse().unwrap(), &mut d2), 0);
        assert_eq!(hears.install(exporter, &mut d1), 1);
        assert_eq!(hears.install(exporter, &mut d1), 0, "once");
        assert!(d2.stats().is_empty(), "no slot in the other thread");
        d2.sweep(u64::MAX / 2);
        assert!(d2.take_template_changes().is_empty(), "nothing to delete");
        assert_eq!(d1.stats().iter().map(|s| s.templates).sum::<usize>(), 1);
    }
}
