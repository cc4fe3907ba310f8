//! The real-time knowledge base (migration 0008, docs/kb.md): per-host and
//! per-user counters, user ↔ address mappings, thresholds and the events
//! that subscribers follow — kept by the collectors' flow writer in the
//! same transaction as the rows (`update.rs`), aged by [`Db::kb_sweep`],
//! read by the typed readers here.
//!
//! - Hosts are volatile: a host not seen for [`KbConfig::host_ttl_ns`] is
//!   removed. Users are persistent; a user is *online* from its first
//!   traffic until it has been idle for [`KbConfig::idle_ns`] and holds no
//!   live volatile mapping.
//! - Mappings learned from host-agent records (records with `user` and
//!   `process`) are volatile ([`KbConfig::mapping_ttl_ns`], refreshed by
//!   every record); static ones from the policy's LDAP entries are
//!   persistent until the entry goes ([`Db::kb_sync_static`]).
//! - A record without `user` whose source address (else destination
//!   address) has a live mapping is stored with that mapping's user.
//! - Events (`logon`, `logoff`, `threshold`, `decision`) are rows of
//!   `kb_events` whose ids follow commit order (their inserts are
//!   serialised by a transaction advisory lock on PostgreSQL); a commit
//!   that adds any wakes subscribers: `NOTIFY qosloop_kb` on PostgreSQL, an
//!   in-process channel in every process ([`KbListener`]).

mod listen;
mod read;
mod update;

pub use listen::KbListener;
pub(crate) use update::{kb_pg, kb_sqlite, signal};

use serde::Serialize;

/// How the knowledge base is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KbConfig {
    /// Life of a mapping learned from an agent record after its last
    /// record.
    pub mapping_ttl_ns: i64,
    /// Life of a host's counters after its last record.
    pub host_ttl_ns: i64,
    /// A user without traffic for this long (and no live volatile mapping)
    /// logs off.
    pub idle_ns: i64,
    /// Events older than this are deleted by the sweep.
    pub events_keep_ns: i64,
}

impl Default for KbConfig {
    fn default() -> Self {
        KbConfig {
            mapping_ttl_ns: 300 * 1_000_000_000,
            host_ttl_ns: 3_600 * 1_000_000_000,
            idle_ns: 60 * 1_000_000_000,
            events_keep_ns: 3_600 * 1_000_000_000,
        }
    }
}

/// The channel of `NOTIFY` on PostgreSQL.
pub const KB_CHANNEL: &str = "qosloop_kb";

/// A host's counters: `in` is what it received (destination), `out` what
/// it sent (source); scaled by the sampling interval.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KbHost {
    pub addr: String,
    pub bytes_in: i64,
    pub bytes_out: i64,
    pub packets_in: i64,
    pub packets_out: i64,
    pub first_seen_ns: i64,
    pub last_seen_ns: i64,
}

/// A user's counters and presence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KbUser {
    pub user: String,
    pub bytes_in: i64,
    pub bytes_out: i64,
    pub packets_in: i64,
    pub packets_out: i64,
    pub first_seen_ns: i64,
    pub last_seen_ns: i64,
    pub online: bool,
    pub online_since_ns: Option<i64>,
    /// Bytes since the last logon: what a threshold applies to.
    pub session_bytes: i64,
}

/// A user ↔ address mapping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KbMapping {
    pub addr: String,
    pub user: String,
    /// `agent` or `ldap`.
    pub source: String,
    pub persistent: bool,
    pub first_seen_ns: i64,
    pub last_seen_ns: i64,
    /// `None` for persistent mappings.
    pub expires_ns: Option<i64>,
}

/// One event, in id (commit) order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KbEvent {
    pub id: i64,
    pub at_ns: i64,
    /// `logon`, `logoff`, `threshold` or `decision`.
    pub kind: String,
    pub user: Option<String>,
    pub addr: Option<String>,
    /// `threshold`: the threshold (bytes; kbit/s for a rate threshold,
    /// whose detail starts with `rate`); `logoff`: the last traffic's
    /// time (ns).
    pub value: Option<i64>,
    /// What caused it (`traffic`, `idle`, a decision's summary…).
    pub detail: Option<String>,
}

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    pub mappings_expired: u64,
    pub hosts_expired: u64,
    pub logoffs: u64,
    pub events_deleted: u64,
}
