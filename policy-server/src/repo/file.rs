//! The LDIF file source: the embedded default repository, so that qosloop
//! runs without an LDAP server. The file is watched by checking its
//! metadata (modification time, size, inode) every poll interval and read
//! once it has stopped changing; a new version that does not parse is
//! rejected whole, one that would drop rules wholesale is refused, one
//! with invalid entries is applied leniently (invalid objects keep their
//! last good version).

use super::ldif::{self, Entry};
use super::model::build_strict;
use super::publish::{AuditChange, PolicyWatch, Publisher};
use super::RepoError;
use qosloop_schema::PolicySet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default interval between two looks at the file.
pub const DEFAULT_POLL: Duration = Duration::from_millis(250);

fn read_entries(path: &Path) -> Result<Vec<Entry>, RepoError> {
    let text = std::fs::read_to_string(path).map_err(|source| RepoError::Io {
        path: path.display().to_string(),
        source,
    })?;
    ldif::parse(&text).map_err(|source| RepoError::Ldif {
        path: path.display().to_string(),
        source,
    })
}

/// Reads and validates a policy file; any invalid entry is an error naming
/// its DN and attribute (what `--check` needs).
pub fn load_ldif_file(path: impl AsRef<Path>) -> Result<PolicySet, RepoError> {
    let entries = read_entries(path.as_ref())?;
    Ok(build_strict(&entries)?)
}

/// Parses and validates policy LDIF text (e.g. the embedded sample).
pub fn parse_policy_ldif(text: &str) -> Result<PolicySet, RepoError> {
    let entries = ldif::parse(text).map_err(|source| RepoError::Ldif {
        path: "<text>".into(),
        source,
    })?;
    Ok(build_strict(&entries)?)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Fingerprint {
    modified: Option<std::time::SystemTime>,
    len: u64,
    inode: u64,
}

fn fingerprint(path: &Path) -> Option<Fingerprint> {
    let m = std::fs::metadata(path).ok()?;
    Some(Fingerprint {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

/// Loads `path` (strictly: a file with an invalid entry is an error) and
/// watches it, checking every `poll`.
///
/// A changed file is read only once it is stable: the same size,
/// modification time and inode at two looks `poll` apart, and again after
/// reading — an editor or `cp` still writing is waited for, not read
/// half-way. A version that does not parse is rejected whole; one that
/// would drop rules wholesale is refused ([`super::publish`]); one with
/// invalid entries is applied leniently (invalid objects keep their last
/// good version). Must be called within a Tokio runtime.
pub fn watch_ldif_file(path: impl Into<PathBuf>, poll: Duration) -> Result<PolicyWatch, RepoError> {
    let path = path.into();
    let mut seen = fingerprint(&path);
    let entries = read_entries(&path)?;
    build_strict(&entries)?;
    let (mut publisher, mut policy, audit) =
        Publisher::new(path.display().to_string(), PolicySet::default());
    publisher.replace_all(entries);
    policy.borrow_and_update();
    let status = publisher.status();
    let tokens = publisher.tokens();
    let mappings = publisher.mappings();
    let task = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(poll);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A changed fingerprint waiting to be seen again unchanged.
        let mut settling: Option<Option<Fingerprint>> = None;
        loop {
            ticker.tick().await;
            if publisher.closed() {
                return;
            }
            let now = fingerprint(&path);
            if now == seen {
                settling = None;
                continue;
            }
            if settling != Some(now) {
                // Changed since the last look: look again next tick.
                settling = Some(now);
                continue;
            }
            settling = None;
            if now.is_none() {
                seen = now;
                publisher.emit(
                    &path.display().to_string(),
                    AuditChange::Reject,
                    Some("the policy file disappeared; keeping the last good policy".into()),
                );
                continue;
            }
            let read = read_entries(&path);
            if fingerprint(&path) != now {
                // Written to while being read: wait for it to settle.
                continue;
            }
            seen = now;
            match read {
                Ok(entries) => publisher.replace_all(entries),
                Err(RepoError::Ldif { source, .. }) => {
                    let dn = source
                        .dn
                        .clone()
                        .unwrap_or_else(|| path.display().to_string());
                    publisher.emit(
                        &dn,
                        AuditChange::Reject,
                        Some(format!(
                            "{}: {source}; keeping the last good policy",
                            path.display()
                        )),
                    );
                }
                Err(e) => {
                    let p = path.display().to_string();
                    publisher.emit(
                        &p,
                        AuditChange::Reject,
                        Some(format!("{e}; keeping the last good policy")),
                    );
                }
            }
        }
    });
    Ok(PolicyWatch {
        policy,
        audit,
        status,
        tokens,
        mappings,
        task,
    })
}
