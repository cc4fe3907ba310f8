//! eBPF maps: typed sizes over the raw commands of `sys`.

use crate::sys::{self, MapOp};
use crate::BpfError;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

/// Map types used in this workspace (`enum bpf_map_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapType {
    Hash = 1,
    Array = 2,
    PercpuHash = 5,
    PercpuArray = 6,
}

impl MapType {
    fn per_cpu(self) -> bool {
        matches!(self, MapType::PercpuHash | MapType::PercpuArray)
    }
}

/// The number of possible CPUs (`/sys/devices/system/cpu/possible`, e.g.
/// `0-1`): a per-CPU map's user-space value holds one slot per possible CPU.
pub fn possible_cpus() -> std::io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    parse_cpu_list(text.trim()).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("/sys/devices/system/cpu/possible: cannot parse {text:?}"),
        )
    })
}

fn parse_cpu_list(s: &str) -> Option<usize> {
    let mut highest = 0usize;
    for part in s.split(',') {
        let last = match part.split_once('-') {
            Some((_, b)) => b.trim().parse::<usize>().ok()?,
            None => part.trim().parse::<usize>().ok()?,
        };
        highest = highest.max(last);
    }
    Some(highest + 1)
}

/// One map: its descriptor and sizes.
#[derive(Debug)]
pub struct Map {
    fd: OwnedFd,
    map_type: MapType,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
    cpus: usize,
}

impl Map {
    /// Creates a map. `value_size` is the size of one value (one CPU's
    /// slot for per-CPU maps).
    pub fn create(
        map_type: MapType,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        name: &str,
    ) -> Result<Map, BpfError> {
        let fd = sys::map_create(map_type as u32, key_size, value_size, max_entries, 0, name)?;
        Map::wrap(fd, map_type, key_size, value_size, max_entries)
    }

    fn wrap(
        fd: OwnedFd,
        map_type: MapType,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    ) -> Result<Map, BpfError> {
        let cpus = if map_type.per_cpu() {
            possible_cpus().map_err(|source| BpfError::io("possible CPUs", source))?
        } else {
            1
        };
        Ok(Map {
            fd,
            map_type,
            key_size: key_size as usize,
            value_size: value_size as usize,
            max_entries,
            cpus,
        })
    }

    /// Opens a map pinned at `path`; the caller states the layout it
    /// expects, which is checked against the kernel's (a map pinned by an
    /// older layout is refused, not misread).
    pub fn from_pinned(
        path: &Path,
        map_type: MapType,
        key_size: u32,
        value_size: u32,
    ) -> Result<Map, BpfError> {
        let fd = sys::obj_get(path)?;
        // struct bpf_map_info: type, id, key_size, value_size, max_entries.
        let mut info = [0u8; 80];
        sys::obj_info(fd.as_fd(), &mut info)?;
        let word =
            |at: usize| u32::from_ne_bytes([info[at], info[at + 1], info[at + 2], info[at + 3]]);
        if word(0) != map_type as u32 || word(8) != key_size || word(12) != value_size {
            return Err(BpfError::io(
                "BPF_OBJ_GET",
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{} holds a map of type {} key {} value {}, expected type {} key {key_size} value {value_size}",
                        path.display(),
                        word(0),
                        word(8),
                        word(12),
                        map_type as u32
                    ),
                ),
            ));
        }
        Map::wrap(fd, map_type, key_size, value_size, word(16))
    }

    /// Pins the map at `path` in a bpffs.
    pub fn pin(&self, path: &Path) -> Result<(), BpfError> {
        sys::obj_pin(self.fd.as_fd(), path)
    }

    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    pub fn key_size(&self) -> usize {
        self.key_size
    }

    pub fn max_entries(&self) -> u32 {
        self.max_entries
    }

    /// Bytes of one user-space value: one slot (rounded up to 8 bytes) per
    /// possible CPU for per-CPU maps.
    pub fn user_value_size(&self) -> usize {
        if self.map_type.per_cpu() {
            self.value_size.div_ceil(8) * 8 * self.cpus
        } else {
            self.value_size
        }
    }

    /// The size of one CPU's slot in a user-space value.
    pub fn slot_size(&self) -> usize {
        if self.map_type.per_cpu() {
            self.value_size.div_ceil(8) * 8
        } else {
            self.value_size
        }
    }

    fn check(&self, key: &[u8], value: Option<usize>) -> Result<(), BpfError> {
        let bad = key.len() != self.key_size || value.is_some_and(|v| v != self.user_value_size());
        if bad {
            return Err(BpfError::io(
                "map access",
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "key of {} bytes / value of {:?} bytes for a map of {} / {}",
                        key.len(),
                        value,
                        self.key_size,
                        self.user_value_size()
                    ),
                ),
            ));
        }
        Ok(())
    }

    /// The value of `key`, or `None` when it is absent.
    pub fn lookup(&self, key: &[u8]) -> Result<Option<Vec<u8>>, BpfError> {
        self.check(key, None)?;
        let mut value = vec![0u8; self.user_value_size()];
        match sys::map_elem(
            self.fd.as_fd(),
            MapOp::Lookup,
            Some(key),
            Some(&mut value),
            0,
        ) {
            Ok(()) => Ok(Some(value)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sets `key` to `value` (`BPF_ANY`).
    pub fn update(&self, key: &[u8], value: &[u8]) -> Result<(), BpfError> {
        self.check(key, Some(value.len()))?;
        let mut v = value.to_vec();
        sys::map_elem(self.fd.as_fd(), MapOp::Update, Some(key), Some(&mut v), 0)
    }

    /// Removes `key`; `false` when it was absent.
    pub fn delete(&self, key: &[u8]) -> Result<bool, BpfError> {
        self.check(key, None)?;
        match sys::map_elem(self.fd.as_fd(), MapOp::Delete, Some(key), None, 0) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The key after `key` (the first key for `None`); `None` at the end.
    pub fn next_key(&self, key: Option<&[u8]>) -> Result<Option<Vec<u8>>, BpfError> {
        if let Some(k) = key {
            self.check(k, None)?;
        }
        let mut next = vec![0u8; self.key_size];
        match sys::map_elem(self.fd.as_fd(), MapOp::NextKey, key, Some(&mut next), 0) {
            Ok(()) => Ok(Some(next)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every key (a snapshot: entries added meanwhile may be missed).
    pub fn keys(&self) -> Result<Vec<Vec<u8>>, BpfError> {
        let mut out = Vec::new();
        let mut cur = self.next_key(None)?;
        while let Some(k) = cur {
            cur = self.next_key(Some(&k))?;
            out.push(k);
            if out.len() > self.max_entries as usize {
                break; // keys changing under us: a bounded walk
            }
        }
        Ok(out)
    }

    /// Removes every entry and hands each (key, value) to `each`, in
    /// batches of `batch` (`BPF_MAP_LOOKUP_AND_DELETE_BATCH`; hash maps).
    /// An entry is read and removed in one step: what a program adds to it
    /// afterwards creates a new entry, so nothing is counted twice or lost
    /// between read and delete. Returns how many entries came.
    pub fn drain(&self, batch: u32, each: impl FnMut(&[u8], &[u8])) -> Result<usize, BpfError> {
        self.batches(true, batch, each)
    }

    /// Hands every entry to `each`, leaving them in the map, in batches of
    /// `batch` (`BPF_MAP_LOOKUP_BATCH`; hash maps). Only consistent while
    /// nothing else writes the map. Returns how many entries came.
    pub fn read_all(&self, batch: u32, each: impl FnMut(&[u8], &[u8])) -> Result<usize, BpfError> {
        self.batches(false, batch, each)
    }

    fn batches(
        &self,
        delete: bool,
        batch: u32,
        mut each: impl FnMut(&[u8], &[u8]),
    ) -> Result<usize, BpfError> {
        let batch = batch.max(1);
        let mut keys = vec![0u8; self.key_size * batch as usize];
        let mut values = vec![0u8; self.user_value_size() * batch as usize];
        let mut cursor = [0u8; 8];
        let mut started = false;
        let mut total = 0usize;
        loop {
            let prev = cursor;
            let (n, done) = sys::map_batch(
                delete,
                self.fd.as_fd(),
                started.then_some(&prev),
                &mut cursor,
                &mut keys,
                &mut values,
                batch,
            )?;
            started = true;
            for i in 0..n as usize {
                each(
                    &keys[i * self.key_size..(i + 1) * self.key_size],
                    &values[i * self.user_value_size()..(i + 1) * self.user_value_size()],
                );
            }
            total += n as usize;
            if done || total > 4 * self.max_entries as usize {
                return Ok(total);
            }
        }
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("0-1"), Some(2));
        assert_eq!(parse_cpu_list("0-3,8-11"), Some(12));
        assert_eq!(parse_cpu_list("x"), None);
    }
}
