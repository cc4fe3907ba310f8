//! The UDP journal: decoded IPFIX / NetFlow records appended to a bounded,
//! append-only local log before SQL.
//!
//! UDP has no acknowledgement: what the collector does not keep once the
//! kernel delivered it is lost. With a journal (`ipfix_journal_dir`), the
//! receiving threads append each batch of decoded records as one
//! checksummed frame ([`frame`]) to the current segment file and go back to
//! the socket; they never wait for the database. A loader task
//! ([`loader`]) reads the frames behind them and hands them to the
//! collector's storage writer, advancing a persisted cursor only after
//! commit. When the database is slow or away the journal grows; when it
//! comes back the loader drains it.
//!
//! - **Bound.** The segment files together hold at most `max_bytes`; an
//!   append that would pass it is refused and its records counted as
//!   dropped (`journal_full`); a write error drops the batch (`journal_io`)
//!   and starts a new segment. Segments wholly committed are deleted.
//! - **Durability (fsync policy).** With `fsync` 0 every append is
//!   followed by `fdatasync` before the receiving thread continues; else a
//!   syncer thread calls `fdatasync` at most `fsync` after an append (100 ms
//!   by default), so a crash of the machine loses at most that much of what
//!   was received, a crash of the process nothing (the bytes are in the
//!   page cache). A new segment is created with the previous one synced
//!   and the directory synced. The loader reads only synced bytes: nothing
//!   reaches SQL that the journal could lose.
//! - **Crash safety.** A frame is length + CRC-32C + payload. After a crash
//!   the torn tail of the last segment fails its check and is skipped
//!   (counted); appends continue in a new segment.
//! - **Yielding.** While a receiving thread finds its socket backlogged
//!   (a full `recvmmsg` batch), the loader — and so the SQL writer it
//!   feeds — stands aside: the records are durable in the journal
//!   already, and the CPU goes to the receivers. It yields at most
//!   2 s at a time, and not at all once the journal holds half its bound.
//! - **Exactly once?** Within a run the loader retries a batch until it
//!   commits and moves on only then. The cursor file is written (and
//!   synced) at most every 100 ms after commits; a crash of the process
//!   between a commit and the cursor's write loads the batches of that
//!   window again at restart: at least once across crashes, each record
//!   once otherwise.

pub mod frame;
pub mod loader;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use loader::spawn_loader;

/// How long one sign of a backlogged socket keeps the loader aside.
pub const BUSY_FOR: Duration = Duration::from_millis(50);

/// How the journal is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalConfig {
    pub dir: PathBuf,
    /// Bytes of segment files at most.
    pub max_bytes: u64,
    /// Longest time between an append and its fsync; zero: fsync every
    /// append.
    pub fsync: Duration,
    /// A segment is closed and a new one started past this size.
    pub segment_bytes: u64,
}

impl JournalConfig {
    /// Segments of a quarter of the bound (at most 64 MiB, at least 1 MiB).
    pub fn new(dir: PathBuf, max_bytes: u64, fsync: Duration) -> JournalConfig {
        JournalConfig {
            dir,
            max_bytes,
            fsync,
            segment_bytes: (max_bytes / 4).clamp(1 << 20, 64 << 20),
        }
    }
}

/// A position in the journal: segment number and byte offset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pos {
    pub seg: u64,
    pub off: u64,
}

/// What the journal did since it was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Records appended (written, not yet necessarily synced).
    pub appended_records: u64,
    /// Records appended and synced: durable in the journal.
    pub synced_records: u64,
    /// Records the loader saw committed to SQL.
    pub loaded_records: u64,
    /// Records refused because the journal was at its bound.
    pub dropped_full: u64,
    /// Records lost to a write error.
    pub dropped_io: u64,
    /// Records the storage writer refused (not a database outage: those
    /// are retried).
    pub dropped_load: u64,
    /// Frames skipped when read back (torn tail after a crash, damage).
    pub corrupt_frames: u64,
    /// Bytes of segment files on disk now.
    pub disk_bytes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    appended: AtomicU64,
    synced: AtomicU64,
    loaded: AtomicU64,
    dropped_full: AtomicU64,
    dropped_io: AtomicU64,
    dropped_load: AtomicU64,
    corrupt: AtomicU64,
    disk_bytes: AtomicU64,
}

/// The segment being appended to.
#[derive(Debug)]
struct Appender {
    file: File,
    pos: Pos,
    dirty: bool,
    appended_at_dirty: u64,
}

/// State shared by the appenders, the syncer and the loader.
#[derive(Debug)]
struct Shared {
    config: JournalConfig,
    counters: Counters,
    /// Everything before this position is synced (segments before `seg`
    /// wholly).
    synced: Mutex<Pos>,
    notify: tokio::sync::Notify,
    closed: AtomicBool,
    /// Where the loader resumes (from the cursor file at open).
    start: Pos,
    /// Logged once per episode of a full journal.
    full_logged: AtomicBool,
    /// When a receiving thread last found its socket backlogged: ms since
    /// `epoch`, plus one (0: never). The loader stands aside meanwhile.
    busy_at_ms: AtomicU64,
    epoch: Instant,
}

/// An open journal; clone the `Arc` for every receiving thread.
#[derive(Debug)]
pub struct Journal {
    appender: Mutex<Appender>,
    shared: Arc<Shared>,
    syncer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Why the journal could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("journal {dir}: {what}: {source}")]
pub struct JournalError {
    dir: String,
    what: &'static str,
    #[source]
    source: std::io::Error,
}

fn segment_path(dir: &Path, seg: u64) -> PathBuf {
    dir.join(format!("{seg:016}.seg"))
}

const CURSOR: &str = "cursor";

/// The segment numbers in `dir`, oldest first, with their sizes.
fn segments(dir: &Path) -> std::io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        out.push((n, e.metadata()?.len()));
    }
    out.sort_unstable();
    Ok(out)
}

/// The cursor file: segment, offset, CRC-32C of the 16 bytes. A damaged
/// one reads as absent (everything left is loaded again).
fn read_cursor(dir: &Path) -> Option<Pos> {
    let b = fs::read(dir.join(CURSOR)).ok()?;
    if b.len() != 20 || frame::crc32c(&b[..16]) != u32::from_le_bytes([b[16], b[17], b[18], b[19]])
    {
        return None;
    }
    let mut seg = [0u8; 8];
    let mut off = [0u8; 8];
    seg.copy_from_slice(&b[..8]);
    off.copy_from_slice(&b[8..16]);
    Some(Pos {
        seg: u64::from_le_bytes(seg),
        off: u64::from_le_bytes(off),
    })
}

/// Writes the cursor: a new file synced, renamed over the old one.
fn write_cursor(dir: &Path, pos: Pos) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(20);
    b.extend_from_slice(&pos.seg.to_le_bytes());
    b.extend_from_slice(&pos.off.to_le_bytes());
    let crc = frame::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    let tmp = dir.join("cursor.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(&b)?;
    f.sync_data()?;
    fs::rename(&tmp, dir.join(CURSOR))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn create_segment(dir: &Path, seg: u64) -> std::io::Result<File> {
    let mut f = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(segment_path(dir, seg))?;
    f.write_all(frame::SEGMENT_MAGIC)?;
    Ok(f)
}

impl Journal {
    /// Opens (creating) the journal in `config.dir`: what earlier runs left
    /// is kept for the loader, appends go to a new segment. Starts the
    /// syncer thread.
    pub fn open(config: JournalConfig) -> Result<Arc<Journal>, JournalError> {
        let dir = config.dir.clone();
        let err = |what| {
            let dir = dir.display().to_string();
            move |source| JournalError { dir, what, source }
        };
        fs::create_dir_all(&dir).map_err(err("creating the directory"))?;
        let cursor = read_cursor(&dir);
        let mut segs = segments(&dir).map_err(err("listing segments"))?;
        // Segments wholly before the cursor were committed: gone.
        if let Some(c) = cursor {
            for (n, _) in segs.iter().filter(|(n, _)| *n < c.seg) {
                fs::remove_file(segment_path(&dir, *n))
                    .map_err(err("removing a loaded segment"))?;
            }
            segs.retain(|(n, _)| *n >= c.seg);
        }
        let next = segs.last().map_or(1, |(n, _)| n + 1);
        let start = match (cursor, segs.first()) {
            (Some(c), Some((first, _))) if c.seg == *first => c,
            (_, Some((first, _))) => Pos {
                seg: *first,
                off: frame::SEGMENT_MAGIC.len() as u64,
            },
            (_, None) => Pos {
                seg: next,
                off: frame::SEGMENT_MAGIC.len() as u64,
            },
        };
        let file = create_segment(&dir, next).map_err(err("creating a segment"))?;
        sync_dir(&dir).map_err(err("syncing the directory"))?;
        let header = frame::SEGMENT_MAGIC.len() as u64;
        let disk: u64 = segs.iter().map(|(_, len)| len).sum::<u64>() + header;
        let shared = Arc::new(Shared {
            counters: Counters {
                disk_bytes: AtomicU64::new(disk),
                ..Counters::default()
            },
            synced: Mutex::new(Pos {
                seg: next,
                off: header,
            }),
            notify: tokio::sync::Notify::new(),
            closed: AtomicBool::new(false),
            start,
            full_logged: AtomicBool::new(false),
            busy_at_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            config,
        });
        if !segs.is_empty() {
            tracing::info!(dir = %dir.display(), segments = segs.len(), bytes = disk - header,
                from = ?start, "journal: records of an earlier run left to load");
        }
        let journal = Arc::new(Journal {
            appender: Mutex::new(Appender {
                file,
                pos: Pos {
                    seg: next,
                    off: header,
                },
                dirty: false,
                appended_at_dirty: 0,
            }),
            shared,
            syncer: Mutex::new(None),
        });
        {
            let j = journal.clone();
            let t = std::thread::Builder::new()
                .name("journal-sync".into())
                .spawn(move || j.sync_loop())
                .map_err(err("starting the syncer"))?;
            if let Ok(mut s) = journal.syncer.lock() {
                *s = Some(t);
            }
        }
        Ok(journal)
    }

    pub fn config(&self) -> &JournalConfig {
        &self.shared.config
    }

    /// Appends one encoded frame holding `records` records; false when it
    /// was dropped (counted by reason).
    pub fn append(&self, frame: &[u8], records: u64) -> bool {
        let c = &self.shared.counters;
        let Ok(mut a) = self.appender.lock() else {
            c.dropped_io.fetch_add(records, Ordering::Relaxed);
            return false;
        };
        let len = frame.len() as u64;
        if c.disk_bytes.load(Ordering::Relaxed) + len > self.shared.config.max_bytes {
            c.dropped_full.fetch_add(records, Ordering::Relaxed);
            if !self.shared.full_logged.swap(true, Ordering::Relaxed) {
                tracing::warn!(dir = %self.shared.config.dir.display(),
                    max_bytes = self.shared.config.max_bytes,
                    "journal full (storage behind or away): new records are dropped and counted (journal_full)");
            }
            return false;
        }
        let header = frame::SEGMENT_MAGIC.len() as u64;
        if a.pos.off > header && a.pos.off + len > self.shared.config.segment_bytes {
            if let Err(e) = self.roll(&mut a) {
                tracing::error!(error = %e, "journal: starting a new segment failed");
                c.dropped_io.fetch_add(records, Ordering::Relaxed);
                return false;
            }
        }
        if let Err(e) = a.file.write_all(frame) {
            tracing::error!(error = %e, "journal: append failed; the batch is dropped (journal_io)");
            c.dropped_io.fetch_add(records, Ordering::Relaxed);
            // What was written of it may be torn: continue in a new segment
            // (the loader skips the rest of this one).
            let _ = self.roll(&mut a);
            return false;
        }
        a.pos.off += len;
        c.disk_bytes.fetch_add(len, Ordering::Relaxed);
        let appended = c.appended.fetch_add(records, Ordering::Relaxed) + records;
        if self.shared.config.fsync.is_zero() {
            if let Err(e) = a.file.sync_data() {
                tracing::error!(error = %e, "journal: fsync failed");
                return true;
            }
            let pos = a.pos;
            drop(a);
            self.publish(pos, appended);
        } else {
            a.dirty = true;
            a.appended_at_dirty = appended;
        }
        true
    }

    /// Syncs the current segment and starts the next.
    fn roll(&self, a: &mut Appender) -> std::io::Result<()> {
        a.file.sync_data()?;
        let appended = self.shared.counters.appended.load(Ordering::Relaxed);
        let seg = a.pos.seg + 1;
        let file = create_segment(&self.shared.config.dir, seg)?;
        sync_dir(&self.shared.config.dir)?;
        a.file = file;
        let header = frame::SEGMENT_MAGIC.len() as u64;
        a.pos = Pos { seg, off: header };
        a.dirty = false;
        self.shared
            .counters
            .disk_bytes
            .fetch_add(header, Ordering::Relaxed);
        self.publish(a.pos, appended);
        Ok(())
    }

    fn publish(&self, pos: Pos, appended: u64) {
        if let Ok(mut s) = self.shared.synced.lock() {
            if pos > *s {
                *s = pos;
            }
        }
        self.shared
            .counters
            .synced
            .fetch_max(appended, Ordering::Relaxed);
        self.shared.notify.notify_one();
    }

    /// Syncs what was appended and not synced yet.
    pub fn sync(&self) {
        let (file, pos, appended) = {
            let Ok(mut a) = self.appender.lock() else {
                return;
            };
            if !a.dirty {
                return;
            }
            a.dirty = false;
            let Ok(f) = a.file.try_clone() else { return };
            (f, a.pos, a.appended_at_dirty)
        };
        match file.sync_data() {
            Ok(()) => self.publish(pos, appended),
            Err(e) => tracing::error!(error = %e, "journal: fsync failed"),
        }
    }

    fn sync_loop(&self) {
        // With fsync on every append there is nothing to sync here; the
        // status is still kept.
        let every = match self.shared.config.fsync {
            d if d.is_zero() => Duration::from_millis(100),
            d => d,
        };
        let mut written = JournalStats::default();
        while !self.shared.closed.load(Ordering::Relaxed) {
            std::thread::sleep(every);
            self.sync();
            // The status follows every change (at most once a sync).
            let now = self.stats();
            if now != written {
                self.write_status();
                written = now;
            }
        }
    }

    /// Writes `DIR/status`: the counters as `name value` lines, for
    /// operators and the testbed's benchmark (not synced; replaced whole).
    pub fn write_status(&self) {
        let s = self.stats();
        let text = format!(
            "appended_records {}\nsynced_records {}\nloaded_records {}\ndropped_full {}\n\
             dropped_io {}\ndropped_load {}\ncorrupt_frames {}\ndisk_bytes {}\n",
            s.appended_records,
            s.synced_records,
            s.loaded_records,
            s.dropped_full,
            s.dropped_io,
            s.dropped_load,
            s.corrupt_frames,
            s.disk_bytes
        );
        let dir = &self.shared.config.dir;
        let tmp = dir.join("status.tmp");
        if fs::write(&tmp, text).is_ok() {
            let _ = fs::rename(&tmp, dir.join("status"));
        }
    }

    pub fn stats(&self) -> JournalStats {
        let c = &self.shared.counters;
        JournalStats {
            appended_records: c.appended.load(Ordering::Relaxed),
            synced_records: c.synced.load(Ordering::Relaxed),
            loaded_records: c.loaded.load(Ordering::Relaxed),
            dropped_full: c.dropped_full.load(Ordering::Relaxed),
            dropped_io: c.dropped_io.load(Ordering::Relaxed),
            dropped_load: c.dropped_load.load(Ordering::Relaxed),
            corrupt_frames: c.corrupt.load(Ordering::Relaxed),
            disk_bytes: c.disk_bytes.load(Ordering::Relaxed),
        }
    }

    /// Syncs and stops the syncer; appends after this are still written
    /// (and synced by the next `sync`).
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::Relaxed);
        let t = self.syncer.lock().ok().and_then(|mut s| s.take());
        if let Some(t) = t {
            let _ = t.join();
        }
        self.sync();
        self.write_status();
        self.shared.notify.notify_one();
    }

    /// A receiving thread found more datagrams waiting than one batch
    /// takes: for the next [`BUSY_FOR`] the loader yields to the receivers
    /// (see [`loader`]).
    pub fn note_busy(&self) {
        let ms = self.shared.epoch.elapsed().as_millis() as u64 + 1;
        self.shared.busy_at_ms.store(ms, Ordering::Relaxed);
    }

    /// True within [`BUSY_FOR`] of the last [`Journal::note_busy`].
    pub fn receivers_busy(&self) -> bool {
        let at = self.shared.busy_at_ms.load(Ordering::Relaxed);
        let now = self.shared.epoch.elapsed().as_millis() as u64 + 1;
        at != 0 && now.saturating_sub(at) < BUSY_FOR.as_millis() as u64
    }

    fn synced(&self) -> Pos {
        self.shared.synced.lock().map(|s| *s).unwrap_or_default()
    }
}

/// Reads `DIR/status` of a journal (the testbed's benchmark watches a
/// collector process through it): `(name, value)` pairs.
pub fn read_status(dir: &Path) -> Vec<(String, u64)> {
    fs::read_to_string(dir.join("status"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_owned(), v.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests;
