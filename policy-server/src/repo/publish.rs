//! What both sources (LDIF file, LDAP) share: the current entries, the
//! policy built from them, the watch channel it is published on, the
//! audit trail of what changed, and the status the web API shows.
//!
//! A new version that would drop rules wholesale — leave none of the rules
//! in force, or fewer than half of them — is refused as a whole: the last
//! good policy stays, the refusal is logged at WARN, audited and shown in
//! [`PolicyStatus`]. A policy file emptied by a careless copy, or read
//! while a slow editor was still writing it, must not remove every
//! decision. A deliberate drop is marked in the policy itself: any entry
//! with `pcimKeywords: qosloop-allow-drop` ([`ALLOW_DROP_KEYWORD`]; RFC
//! 3703's keyword attribute, allowed on every pcim entry, e.g. the rules
//! container with `objectClass: pcimGroupAuxClass`).

use super::dn;
use super::ldif::Entry;
use super::mappings::{mappings, StaticMapping};
use super::model::{build, Build, PolicyError};
use super::tokens::{tokens, DirectoryToken};
use qosloop_schema::PolicySet;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// Room in the audit channel; events beyond it are counted and dropped.
const AUDIT_CAPACITY: usize = 4096;

/// The `pcimKeywords` value that lets a new version drop rules wholesale.
pub const ALLOW_DROP_KEYWORD: &str = "qosloop-allow-drop";

/// What the repository says about itself (`GET /api/policy-status`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PolicyStatus {
    /// The file path or LDAP URL.
    pub source: String,
    /// Rules of the policy in force.
    pub rules_in_force: usize,
    /// When the policy in force was published (ns since the Unix epoch).
    pub applied_ns: u64,
    /// Problems in the entries last accepted (each rejected object keeps
    /// its last good version; the audit trail names them).
    pub entry_errors: usize,
    /// Set while the newest version seen was refused as a whole.
    pub refused: Option<Refusal>,
}

/// A version refused as a whole; the last good policy stays in force.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Refusal {
    pub at_ns: u64,
    pub reason: String,
    /// Rules the refused version would have put in force.
    pub rules_offered: usize,
}

/// Why `next` may not replace `current`, if it drops rules wholesale and
/// the entries do not carry [`ALLOW_DROP_KEYWORD`].
fn wholesale_drop(current: &PolicySet, next: &PolicySet, entries: &[Entry]) -> Option<String> {
    let (old, new) = (current.rules.len(), next.rules.len());
    if old == 0 || (new > 0 && new * 2 >= old) {
        return None;
    }
    let allowed = entries.iter().find(|e| {
        e.get("pcimKeywords")
            .iter()
            .any(|k| k.trim().eq_ignore_ascii_case(ALLOW_DROP_KEYWORD))
    });
    if let Some(e) = allowed {
        tracing::warn!(
            dn = %e.dn, rules_before = old, rules_after = new,
            "rules dropped wholesale, as the policy allows (pcimKeywords: {ALLOW_DROP_KEYWORD})"
        );
        return None;
    }
    Some(format!(
        "the new version would leave {new} of the {old} rules in force; refused, keeping the last good policy \
         (an emptied or half-written file?). To drop them on purpose, add pcimKeywords: {ALLOW_DROP_KEYWORD} \
         to an entry of the policy"
    ))
}

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
    /// What the repository says about itself: rules in force, the last
    /// refused version (`GET /api/policy-status`).
    pub status: watch::Receiver<PolicyStatus>,
    /// The API tokens of the repository's `qosloopApiToken` entries, the
    /// valid ones, current with every change ([`crate::auth`]).
    pub tokens: watch::Receiver<Arc<Vec<DirectoryToken>>>,
    /// The static user ↔ address mappings of the repository's
    /// `qosloopUserMapping` entries (the valid ones, sorted), current with
    /// every accepted version ([`crate::kb_static`]).
    pub mappings: watch::Receiver<Arc<Vec<StaticMapping>>>,
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
    status: watch::Sender<PolicyStatus>,
    tokens: watch::Sender<Arc<Vec<DirectoryToken>>>,
    mappings: watch::Sender<Arc<Vec<StaticMapping>>>,
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
        let (status, _) = watch::channel(PolicyStatus {
            source: source.clone(),
            rules_in_force: initial.rules.len(),
            ..PolicyStatus::default()
        });
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
                status,
                tokens: watch::channel(Arc::new(Vec::new())).0,
                mappings: watch::channel(Arc::new(Vec::new())).0,
            },
            policy_rx,
            audit_rx,
        )
    }

    /// A receiver of the repository's status.
    pub(crate) fn status(&self) -> watch::Receiver<PolicyStatus> {
        self.status.subscribe()
    }

    /// A receiver of the repository's API tokens.
    pub(crate) fn tokens(&self) -> watch::Receiver<Arc<Vec<DirectoryToken>>> {
        self.tokens.subscribe()
    }

    /// A receiver of the repository's static user mappings.
    pub(crate) fn mappings(&self) -> watch::Receiver<Arc<Vec<StaticMapping>>> {
        self.mappings.subscribe()
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

    /// Replaces the whole entry set: builds the policy from it and, unless
    /// it drops rules wholesale, audits what differs and publishes it when
    /// it changed. A DN given twice is an error of that object (built from
    /// the entries as given, not de-duplicated).
    pub(crate) fn replace_all(&mut self, entries: impl IntoIterator<Item = Entry>) {
        // As given (names as spelled, LDIF lines): errors quote them.
        let given: Vec<Entry> = entries.into_iter().collect();
        let current = self.current();
        let mut built = build(&given, &current);
        // Tokens follow every version, also one whose rules are refused:
        // a removed or broken token entry stops working at once.
        let (valid, mut token_errors) = tokens(&given);
        built.errors.append(&mut token_errors);
        self.tokens.send_if_modified(|t| {
            let changed = **t != valid;
            if changed {
                tracing::info!(source = %self.source, tokens = valid.len(), "API tokens of the repository in force");
                *t = Arc::new(valid);
            }
            changed
        });
        if let Some(reason) = wholesale_drop(&current, &built.policy, &given) {
            self.refuse(reason, built.policy.rules.len());
            return;
        }
        // Mappings follow accepted versions only: an emptied file that is
        // refused does not unbind every user either. (Their errors are
        // already among `built.errors`.)
        let (bound, _) = mappings(&given);
        self.mappings.send_if_modified(|m| {
            let changed = **m != bound;
            if changed {
                tracing::info!(source = %self.source, mappings = bound.len(), "static user mappings of the repository");
                *m = Arc::new(bound);
            }
            changed
        });
        let mut next: BTreeMap<String, Entry> = BTreeMap::new();
        for e in given {
            next.entry(dn::normalize(&e.dn))
                .or_insert_with(|| e.canonical());
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
        self.publish(built, &current);
    }

    /// Keeps the policy in force and says why the new version was refused.
    fn refuse(&mut self, reason: String, rules_offered: usize) {
        // The status first: whoever reads the audit event sees it already.
        self.status.send_modify(|s| {
            s.refused = Some(Refusal {
                at_ns: now_ns(),
                reason: reason.clone(),
                rules_offered,
            });
        });
        let source = self.source.clone();
        self.emit(&source, AuditChange::Reject, Some(reason));
    }

    fn publish(&mut self, built: Build, current: &PolicySet) {
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
        let entry_errors = errors.len();
        self.reported = errors;
        let changed = *current != built.policy;
        let rules = built.policy.rules.len();
        // The status first: whoever sees the new policy sees it already.
        self.status.send_modify(|s| {
            s.refused = None;
            s.entry_errors = entry_errors;
            s.rules_in_force = rules;
            if changed || s.applied_ns == 0 {
                s.applied_ns = now_ns();
            }
        });
        if changed {
            tracing::info!(
                source = %self.source,
                rules,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(n: usize) -> PolicySet {
        let sample =
            crate::repo::parse_policy_ldif(qosloop_schema::SAMPLE_POLICY_LDIF).unwrap_or_default();
        let mut p = sample.clone();
        p.rules = (0..n)
            .flat_map(|i| {
                sample.rules.iter().map(move |r| {
                    let mut r = r.clone();
                    r.dn = format!("cn=r{i}");
                    r
                })
            })
            .collect();
        p
    }

    #[test]
    fn dropping_all_or_more_than_half_of_the_rules_is_refused_unless_marked() {
        let none: &[Entry] = &[];
        assert!(wholesale_drop(&rules(1), &rules(0), none).is_some());
        assert!(wholesale_drop(&rules(3), &rules(1), none).is_some());
        assert!(wholesale_drop(&rules(2), &rules(1), none).is_none(), "half");
        assert!(wholesale_drop(&rules(4), &rules(2), none).is_none());
        assert!(wholesale_drop(&rules(0), &rules(0), none).is_none());
        assert!(wholesale_drop(&rules(1), &rules(5), none).is_none());
        let marked = [Entry::new("ou=rules,dc=x")
            .with("objectClass", "pcimGroupAuxClass")
            .with("pcimKeywords", "Qosloop-Allow-Drop")];
        assert!(wholesale_drop(&rules(3), &rules(0), &marked).is_none());
    }
}
