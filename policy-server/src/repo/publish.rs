//! What both sources (LDIF file, LDAP) share: the current entries, the
//! policy built from them, the watch channel it is published on, and the
//! audit trail of what changed.

use super::dn;
use super::ldif::Entry;
use super::model::{build, PolicyError};
use qosloop_schema::PolicySet;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// Room in the audit channel; events beyond it are counted and dropped.
const AUDIT_CAPACITY: usize = 4096;

/// The kind of change an audit event records (the `change` column of the
/// `policy_audit` table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuditChange {
    Add,
    Modify,
    Delete,
    /// An entry (or file) that was not accepted; `detail` says why.
    Reject,
}

impl AuditChange {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditChange::Add => "add",
            AuditChange::Modify => "modify",
            AuditChange::Delete => "delete",
            AuditChange::Reject => "reject",
        }
    }
}

impl std::fmt::Display for AuditChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One change to the policy repository, as the server stores it in
/// `policy_audit`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEvent {
    /// Nanoseconds since the Unix epoch.
    pub at_ns: u64,
    /// The file path or LDAP URL the change came from.
    pub source: String,
    pub dn: String,
    pub change: AuditChange,
    pub detail: Option<String>,
}

/// A live policy: the newest valid policy on `policy`, changes on `audit`.
/// Dropping it stops watching.
#[derive(Debug)]
pub struct PolicyWatch {
    pub policy: watch::Receiver<Arc<PolicySet>>,
    pub audit: mpsc::Receiver<AuditEvent>,
    pub(crate) task: JoinHandle<()>,
}

impl PolicyWatch {
    /// The policy in force now.
    pub fn current(&self) -> Arc<PolicySet> {
        self.policy.borrow().clone()
    }

    /// Stops watching (also done on drop).
    pub fn stop(self) {}
}

impl Drop for PolicyWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Holds the entries and publishes the policy built from them.
#[derive(Debug)]
pub(crate) struct Publisher {
    source: String,
    policy: watch::Sender<Arc<PolicySet>>,
    audit: mpsc::Sender<AuditEvent>,
    /// Normalized DN → canonical entry.
    entries: BTreeMap<String, Entry>,
    /// Errors already reported, so that one bad entry is reported once.
    reported: BTreeSet<PolicyError>,
    audit_dropped: u64,
}

impl Publisher {
    /// A publisher with `initial` in force, and the receiving ends.
    pub(crate) fn new(
        source: String,
        initial: PolicySet,
    ) -> (
        Publisher,
        watch::Receiver<Arc<PolicySet>>,
        mpsc::Receiver<AuditEvent>,
    ) {
        let (policy, policy_rx) = watch::channel(Arc::new(initial));
        let (audit, audit_rx) = mpsc::channel(AUDIT_CAPACITY);
        (
            Publisher {
                source,
                policy,
                audit,
                entries: BTreeMap::new(),
                reported: BTreeSet::new(),
                audit_dropped: 0,
            },
            policy_rx,
            audit_rx,
        )
    }

    pub(crate) fn source(&self) -> &str {
        &self.source
    }

    pub(crate) fn current(&self) -> Arc<PolicySet> {
        self.policy.borrow().clone()
    }

    pub(crate) fn emit(&mut self, dn: &str, change: AuditChange, detail: Option<String>) {
        let event = AuditEvent {
            at_ns: now_ns(),
            source: self.source.clone(),
            dn: dn.to_owned(),
            change,
            detail,
        };
        match change {
            AuditChange::Reject => tracing::warn!(
                source = %self.source, dn, detail = event.detail.as_deref().unwrap_or(""),
                "policy entry rejected"
            ),
            _ => tracing::info!(source = %self.source, dn, %change, "policy entry changed"),
        }
        if self.audit.try_send(event).is_err() {
            self.audit_dropped += 1;
            tracing::warn!(
                source = %self.source,
                dropped = self.audit_dropped,
                "audit channel full or closed: audit event dropped"
            );
        }
    }

    /// Replaces the whole entry set: audits what differs, rebuilds and
    /// publishes when the policy changed.
    pub(crate) fn replace_all(&mut self, entries: impl IntoIterator<Item = Entry>) {
        let mut next: BTreeMap<String, Entry> = BTreeMap::new();
        for e in entries {
            next.insert(dn::normalize(&e.dn), e.canonical());
        }
        let mut changes = Vec::new();
        for (key, e) in &next {
            match self.entries.get(key) {
                None => changes.push((e.dn.clone(), AuditChange::Add)),
                Some(old) if old.attrs != e.attrs || old.dn != e.dn => {
                    changes.push((e.dn.clone(), AuditChange::Modify))
                }
                Some(_) => {}
            }
        }
        for (key, old) in &self.entries {
            if !next.contains_key(key) {
                changes.push((old.dn.clone(), AuditChange::Delete));
            }
        }
        self.entries = next;
        for (dn, change) in changes {
            self.emit(&dn, change, None);
        }
        self.rebuild();
    }

    fn rebuild(&mut self) {
        let entries: Vec<Entry> = self.entries.values().cloned().collect();
        let current = self.current();
        let built = build(&entries, &current);
        let errors: BTreeSet<PolicyError> = built.errors.into_iter().collect();
        for e in errors
            .difference(&self.reported)
            .cloned()
            .collect::<Vec<_>>()
        {
            let detail = match &e.attribute {
                Some(a) => format!("{a}: {}", e.message),
                None => e.message.clone(),
            };
            self.emit(&e.dn, AuditChange::Reject, Some(detail));
        }
        self.reported = errors;
        if *current != built.policy {
            tracing::info!(
                source = %self.source,
                rules = built.policy.rules.len(),
                classes = built.policy.classes.len(),
                links = built.policy.links.len(),
                devices = built.policy.devices.len(),
                "new policy in force"
            );
            self.policy.send_replace(Arc::new(built.policy));
        }
    }

    /// Whether anyone still listens for policies.
    pub(crate) fn closed(&self) -> bool {
        self.policy.is_closed()
    }
}
