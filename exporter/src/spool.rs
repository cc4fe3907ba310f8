//! The spool: DATA messages that no collector has taken yet, oldest first,
//! bounded in bytes. On disk it is a directory of append-only segment files,
//! each with a 12-byte header (`QLSPOOL1`, format version, record byte
//! order, reserved) followed by entries `Len(4) Seq(4) TemplateID(2)
//! Flags(1) reserved(1) Count(4) Records(Len-12)`, big-endian. Segments are
//! deleted once read; with no directory the spool is held in memory under
//! the same bound.

use crate::engine::Msg;
use bytes::Bytes;
use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"QLSPOOL1";
const HEADER_LEN: usize = 12;
const ENTRY_HEADER: usize = 16;
const SEGMENT_BYTES: u64 = 8 * 1024 * 1024;

/// A spool failure (disk full, unreadable segment).
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("spool segment {path} is corrupt: {detail}")]
    Corrupt { path: String, detail: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[derive(Debug)]
struct Writer {
    file: File,
    id: u64,
    written: u64,
}

#[derive(Debug)]
struct Reader {
    file: BufReader<File>,
    id: u64,
}

/// Messages waiting for a collector, bounded by `max_bytes`.
#[derive(Debug)]
pub struct Spool {
    dir: Option<PathBuf>,
    byte_order: u8,
    max_bytes: u64,
    bytes: u64,
    count: usize,
    memory: VecDeque<Msg>,
    segments: VecDeque<u64>,
    next_id: u64,
    writer: Option<Writer>,
    reader: Option<Reader>,
}

impl Spool {
    /// A spool in `dir` (created; one directory per stream, so segments
    /// of an earlier run are never mixed in) or, without one, in memory.
    pub fn new(
        dir: Option<PathBuf>,
        max_bytes: u64,
        big_endian: bool,
    ) -> Result<Spool, SpoolError> {
        if let Some(d) = &dir {
            fs::create_dir_all(d).map_err(io_err(d))?;
        }
        Ok(Spool {
            dir,
            byte_order: u8::from(big_endian),
            max_bytes,
            bytes: 0,
            count: 0,
            memory: VecDeque::new(),
            segments: VecDeque::new(),
            next_id: 0,
            writer: None,
            reader: None,
        })
    }

    /// The spool an earlier run left in `dir`, to be drained: its segments
    /// in order, counted. A torn last entry (a crash mid-write) is cut off.
    /// Returns the spool, whether its records are big-endian, and how many
    /// records its messages hold.
    pub fn reopen(dir: &Path, max_bytes: u64) -> Result<(Spool, bool, u64), SpoolError> {
        let mut ids: Vec<u64> = fs::read_dir(dir)
            .map_err(io_err(dir))?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name();
                let name = name.to_str()?;
                name.strip_suffix(".spool")?.parse().ok()
            })
            .collect();
        ids.sort_unstable();
        let mut spool = Spool::new(Some(dir.to_owned()), max_bytes, false)?;
        let mut order = None;
        let mut records = 0u64;
        for id in ids {
            let path = spool.segment_path(id).unwrap_or_default();
            let mut file = File::open(&path).map_err(io_err(&path))?;
            let size = file.metadata().map_err(io_err(&path))?.len();
            let mut header = [0u8; HEADER_LEN];
            if file.read_exact(&mut header).is_err() || &header[..8] != MAGIC {
                return Err(SpoolError::Corrupt {
                    path: path.display().to_string(),
                    detail: "bad segment header".into(),
                });
            }
            if *order.get_or_insert(header[9]) != header[9] {
                return Err(SpoolError::Corrupt {
                    path: path.display().to_string(),
                    detail: "segments of different byte orders".into(),
                });
            }
            let mut file = BufReader::new(file);
            let mut at = HEADER_LEN as u64;
            let mut head = [0u8; 16];
            while at + 16 <= size && file.read_exact(&mut head).is_ok() {
                let n = u64::from(u32::from_be_bytes([head[0], head[1], head[2], head[3]]));
                if !(12..=64 * 1024 * 1024).contains(&n) || at + 4 + n > size {
                    break;
                }
                records += u64::from(u32::from_be_bytes([head[12], head[13], head[14], head[15]]));
                file.seek_relative(n as i64 - 12).map_err(io_err(&path))?;
                at += 4 + n;
                spool.count += 1;
                spool.bytes += 4 + n;
            }
            if at < size {
                tracing::warn!(path = %path.display(), kept = at, size, "spool segment ends in a torn entry; cut off");
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(at))
                    .map_err(io_err(&path))?;
            }
            spool.segments.push_back(id);
            spool.next_id = id + 1;
        }
        spool.byte_order = order.unwrap_or(0);
        spool.max_bytes = spool.max_bytes.max(spool.bytes);
        let big = spool.byte_order == 1;
        Ok((spool, big, records))
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    pub fn len(&self) -> usize {
        self.count
    }
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    fn segment_path(&self, id: u64) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(format!("{id:012}.spool")))
    }

    /// Appends `msg`; `Ok(false)` when the bound leaves no room (the caller
    /// counts the drop).
    pub fn push(&mut self, msg: Msg) -> Result<bool, SpoolError> {
        let size = (ENTRY_HEADER + msg.records.len()) as u64;
        if self.bytes + size > self.max_bytes {
            return Ok(false);
        }
        if self.dir.is_none() {
            self.memory.push_back(msg);
        } else {
            self.append(&msg)?;
        }
        self.bytes += size;
        self.count += 1;
        Ok(true)
    }

    fn append(&mut self, msg: &Msg) -> Result<(), SpoolError> {
        let rotate = self
            .writer
            .as_ref()
            .is_none_or(|w| w.written >= SEGMENT_BYTES);
        if rotate {
            let id = self.next_id;
            self.next_id += 1;
            let path = self.segment_path(id).unwrap_or_default();
            let mut file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&path)
                .map_err(io_err(&path))?;
            let mut header = [0u8; HEADER_LEN];
            header[..8].copy_from_slice(MAGIC);
            header[8] = 1;
            header[9] = self.byte_order;
            file.write_all(&header).map_err(io_err(&path))?;
            self.segments.push_back(id);
            self.writer = Some(Writer {
                file,
                id,
                written: HEADER_LEN as u64,
            });
        }
        let Some(w) = self.writer.as_mut() else {
            return Ok(());
        };
        let mut entry = Vec::with_capacity(ENTRY_HEADER + msg.records.len());
        entry.extend_from_slice(&((12 + msg.records.len()) as u32).to_be_bytes());
        entry.extend_from_slice(&msg.seq.to_be_bytes());
        entry.extend_from_slice(&msg.template_id.to_be_bytes());
        entry.push(u8::from(msg.duplicate));
        entry.push(0);
        entry.extend_from_slice(&msg.count.to_be_bytes());
        entry.extend_from_slice(&msg.records);
        let path = self
            .dir
            .as_ref()
            .map(|d| d.join(format!("{:012}.spool", w.id)))
            .unwrap_or_default();
        // One write per entry, so a reader never sees half an entry.
        w.file.write_all(&entry).map_err(io_err(&path))?;
        w.written += entry.len() as u64;
        Ok(())
    }

    /// Takes the oldest message.
    pub fn pop(&mut self) -> Result<Option<Msg>, SpoolError> {
        if self.count == 0 {
            return Ok(None);
        }
        let msg = if self.dir.is_none() {
            self.memory.pop_front()
        } else {
            Some(self.read_next()?)
        };
        if let Some(m) = &msg {
            self.bytes = self
                .bytes
                .saturating_sub((ENTRY_HEADER + m.records.len()) as u64);
            self.count -= 1;
        }
        if self.count == 0 {
            self.reset()?;
        }
        Ok(msg)
    }

    fn read_next(&mut self) -> Result<Msg, SpoolError> {
        loop {
            if self.reader.is_none() {
                let Some(&id) = self.segments.front() else {
                    return Err(SpoolError::Corrupt {
                        path: self
                            .dir
                            .as_ref()
                            .map(|d| d.display().to_string())
                            .unwrap_or_default(),
                        detail: format!("{} message(s) counted but no segment left", self.count),
                    });
                };
                let path = self.segment_path(id).unwrap_or_default();
                let mut file = BufReader::new(File::open(&path).map_err(io_err(&path))?);
                let mut header = [0u8; HEADER_LEN];
                file.read_exact(&mut header).map_err(io_err(&path))?;
                if &header[..8] != MAGIC {
                    return Err(SpoolError::Corrupt {
                        path: path.display().to_string(),
                        detail: "bad magic".into(),
                    });
                }
                self.reader = Some(Reader { file, id });
            }
            let Some(r) = self.reader.as_mut() else {
                continue;
            };
            let path = self
                .dir
                .as_ref()
                .map(|d| d.join(format!("{:012}.spool", r.id)))
                .unwrap_or_default();
            let mut len = [0u8; 4];
            match r.file.read_exact(&mut len) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    // This segment is used up; the writer has moved on.
                    let id = r.id;
                    self.reader = None;
                    self.segments.pop_front();
                    if self.writer.as_ref().is_some_and(|w| w.id == id) {
                        self.writer = None;
                    }
                    fs::remove_file(&path).map_err(io_err(&path))?;
                    continue;
                }
                Err(e) => return Err(io_err(&path)(e)),
            }
            let len = u32::from_be_bytes(len) as usize;
            if !(12..=64 * 1024 * 1024).contains(&len) {
                return Err(SpoolError::Corrupt {
                    path: path.display().to_string(),
                    detail: format!("entry length {len}"),
                });
            }
            let mut body = vec![0u8; len];
            r.file.read_exact(&mut body).map_err(io_err(&path))?;
            let seq = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            let template_id = u16::from_be_bytes([body[4], body[5]]);
            let duplicate = body[6] & 1 == 1;
            let count = u32::from_be_bytes([body[8], body[9], body[10], body[11]]);
            let records = Bytes::from(body).slice(12..);
            return Ok(Msg {
                seq,
                template_id,
                count,
                records,
                duplicate,
            });
        }
    }

    /// Deletes every segment: called when the spool becomes empty.
    fn reset(&mut self) -> Result<(), SpoolError> {
        self.reader = None;
        self.writer = None;
        self.memory.clear();
        while let Some(id) = self.segments.pop_front() {
            if let Some(p) = self.segment_path(id) {
                match fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(&p)(e)),
                }
            }
        }
        self.bytes = 0;
        Ok(())
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        // An empty spool leaves no directory behind; a non-empty one stays
        // for the operator.
        if let (Some(d), 0) = (&self.dir, self.count) {
            let _ = fs::remove_dir(d);
        }
    }
}

/// Spool directories of earlier runs under `parent` that still hold
/// segments: `(directory, segment files)`.
pub fn leftovers(parent: &Path) -> Vec<(PathBuf, usize)> {
    let Ok(entries) = fs::read_dir(parent) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            let n = fs::read_dir(e.path())
                .ok()?
                .flatten()
                .filter(|f| f.path().extension().is_some_and(|x| x == "spool"))
                .count();
            (n > 0).then(|| (e.path(), n))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u32, n: usize) -> Msg {
        Msg {
            seq,
            template_id: 256,
            count: 1,
            records: Bytes::from(vec![seq as u8; n]),
            duplicate: seq % 2 == 0,
        }
    }

    fn round_trip(dir: Option<PathBuf>) {
        let mut s = Spool::new(dir.clone(), 10_000, false).unwrap();
        for seq in 0..50 {
            assert!(s.push(msg(seq, 100)).unwrap());
        }
        // 50 × 116 = 5800 bytes; 40 more do not all fit.
        let mut dropped = 0;
        for seq in 50..90 {
            if !s.push(msg(seq, 100)).unwrap() {
                dropped += 1;
            }
        }
        assert!(dropped > 0);
        let kept = 90 - dropped;
        for seq in 0..kept as u32 {
            let m = s.pop().unwrap().unwrap();
            assert_eq!(m, msg(seq, 100), "in order, intact");
            if seq == 10 {
                // Interleaved appends land after what is there.
                assert!(s.push(msg(1000, 10)).unwrap());
            }
        }
        assert_eq!(s.pop().unwrap().unwrap().seq, 1000);
        assert!(s.pop().unwrap().is_none());
        assert_eq!(s.bytes(), 0);
        if let Some(d) = dir {
            assert_eq!(
                fs::read_dir(d).unwrap().count(),
                0,
                "segments deleted once drained"
            );
        }
    }

    #[test]
    fn disk_spool_keeps_order_and_bound() {
        let dir = tempfile::tempdir().unwrap();
        round_trip(Some(dir.path().join("spool")));
    }

    #[test]
    fn memory_spool_keeps_order_and_bound() {
        round_trip(None);
    }

    #[test]
    fn an_earlier_runs_spool_reopens_in_order_and_a_torn_entry_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("stream-7");
        {
            let mut s = Spool::new(Some(d.clone()), 1 << 30, true).unwrap();
            // Big enough to rotate into a second segment.
            for seq in 0..9 {
                assert!(s.push(msg(seq, 1 << 20)).unwrap());
            }
            std::mem::forget(s); // a crash: nothing tidied up
        }
        let segments = || {
            let mut v: Vec<_> = fs::read_dir(&d)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .collect();
            v.sort();
            v
        };
        assert_eq!(segments().len(), 2);
        // Tear the last entry of the last segment.
        let last = segments().pop().unwrap();
        let len = fs::metadata(&last).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&last)
            .unwrap()
            .set_len(len - 10)
            .unwrap();
        let (mut s, big, records) = Spool::reopen(&d, 1 << 20).unwrap();
        assert!(big);
        assert_eq!((s.len(), records), (8, 8));
        for seq in 0..8 {
            assert_eq!(s.pop().unwrap().unwrap(), msg(seq, 1 << 20));
        }
        assert!(s.pop().unwrap().is_none());
        assert!(segments().is_empty());
        // Garbage is an error naming the file, not a panic.
        fs::write(d.join("000000000003.spool"), b"not a spool").unwrap();
        let err = Spool::reopen(&d, 1 << 20).unwrap_err().to_string();
        assert!(err.contains("000000000003.spool"), "{err}");
    }
}
