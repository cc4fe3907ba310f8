//! The latest counters of every IPFIX/NetFlow exporter, for `/metrics`.
//!
//! Each decoder's counters live with its receiving thread or TCP session;
//! every time they are written to SQL ([`super::output::Output`]) they are
//! also posted here. The board is process-wide and bounded: past
//! [`MAX_ENTRIES`] (exporter, session, version, domain) entries a new one
//! is not kept and is counted in [`ExporterBoard::overflow`].

use super::stats::Counters;
use super::wire::Version;
use super::ExporterStats;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// Entries kept at most.
pub const MAX_ENTRIES: usize = 4096;

type Key = (IpAddr, Option<u64>, Option<Version>, Option<u32>);

/// See the module doc.
#[derive(Debug, Default)]
pub struct ExporterBoard {
    entries: Mutex<HashMap<Key, Counters>>,
    overflow: AtomicU64,
}

impl ExporterBoard {
    /// Replaces the counters of each entry of `stats` (they are
    /// cumulative); a session's last counters stay after it ends.
    pub fn post(&self, stats: &[ExporterStats]) {
        let Ok(mut m) = self.entries.lock() else {
            return;
        };
        for s in stats {
            let key = (
                s.exporter.addr.ip(),
                s.exporter.session,
                s.version,
                s.domain,
            );
            if let Some(c) = m.get_mut(&key) {
                *c = s.counters.clone();
            } else if m.len() < MAX_ENTRIES {
                m.insert(key, s.counters.clone());
            } else {
                self.overflow.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Counters summed per exporter address, in address order.
    pub fn by_exporter(&self) -> Vec<(String, Counters)> {
        let Ok(m) = self.entries.lock() else {
            return Vec::new();
        };
        let mut out: std::collections::BTreeMap<IpAddr, Counters> = Default::default();
        for ((ip, ..), c) in m.iter() {
            out.entry(*ip).or_default().add(c);
        }
        out.into_iter().map(|(ip, c)| (ip.to_string(), c)).collect()
    }

    /// Entries not kept because the board was full.
    pub fn overflow(&self) -> u64 {
        self.overflow.load(Ordering::Relaxed)
    }
}

/// The process's board.
pub fn board() -> &'static ExporterBoard {
    static BOARD: OnceLock<ExporterBoard> = OnceLock::new();
    BOARD.get_or_init(ExporterBoard::default)
}
