//! The LDAP source: a content synchronization search (RFC 4533,
//! refreshAndPersist) against slapd's syncprov, through `ldap3`.
//!
//! Each session connects, binds (anonymous, simple, or SASL EXTERNAL over
//! ldapi), and sends one search with the Sync Request control in
//! refreshAndPersist mode and no cookie. The server first sends every entry
//! (refresh stage), then a Sync Info message with refreshDone, then each
//! change as it happens (persist stage): an entry with a Sync State control
//! saying add, modify or delete, keyed by its entryUUID. The policy is
//! rebuilt after the refresh and after each change, once the server has
//! been quiet for [`LdapSource::settle`] (10 ms by default, so that the
//! entries of one edit land together): a change reaches the watch channel
//! as soon as slapd sends it — no polling.
//!
//! When the connection fails or the server ends the search, the last good
//! policy stays in force and the session is retried with exponential
//! backoff; the next refresh replaces the entry set whole, and the
//! difference is audited as adds, modifies and deletes.
//!
//! The Sync State control and Sync Info message are decoded here rather
//! than with `ldap3`'s helpers, which panic on malformed input.

use super::ldif::Entry;
use super::model::build_strict;
use super::publish::{PolicyWatch, Publisher};
use super::RepoError;
use ldap3::asn1::{parse_tag, StructureTag, TagClass, PL};
use ldap3::controls::{Control, MakeCritical, RefreshMode, SyncRequest};
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, Scope};
use qosloop_schema::PolicySet;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

const SYNC_STATE_OID: &str = "1.3.6.1.4.1.4203.1.9.1.2";
const SYNC_INFO_OID: &str = "1.3.6.1.4.1.4203.1.9.1.4";

/// How to authenticate to the directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LdapBind {
    Anonymous,
    Simple {
        dn: String,
        password: String,
    },
    /// SASL EXTERNAL: over `ldapi://`, the server maps the peer's uid/gid.
    SaslExternal,
}

/// Where the policy lives in LDAP and how to reach it.
#[derive(Clone, Debug)]
pub struct LdapSource {
    /// `ldap://HOST:PORT`, `ldaps://…` or `ldapi://%2Fpath%2Fto%2Fsocket`.
    pub url: String,
    pub base_dn: String,
    pub bind: LdapBind,
    /// Search filter of the policy subtree.
    pub filter: String,
    pub connect_timeout: Duration,
    /// After a change, how long the server must be quiet before the policy
    /// is rebuilt (at most ten times this after the first change), so that
    /// one edit of several entries is one policy change. Zero: rebuild on
    /// every change.
    pub settle: Duration,
    /// First and longest wait between reconnection attempts.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// CA (PEM) the directory's certificate must chain to, for `ldaps://`
    /// and StartTLS; `None`: the system's roots.
    pub tls_ca: Option<std::path::PathBuf>,
    /// Upgrade an `ldap://` connection with StartTLS before binding.
    pub starttls: bool,
}

impl LdapSource {
    pub fn new(url: impl Into<String>, base_dn: impl Into<String>, bind: LdapBind) -> LdapSource {
        LdapSource {
            url: url.into(),
            base_dn: base_dn.into(),
            bind,
            filter: "(objectClass=*)".into(),
            connect_timeout: Duration::from_secs(5),
            settle: Duration::from_millis(10),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            tls_ca: None,
            starttls: false,
        }
    }

    fn err(&self, message: impl Into<String>) -> RepoError {
        RepoError::Ldap {
            url: self.url.clone(),
            message: message.into(),
        }
    }
}

async fn connect(source: &LdapSource) -> Result<Ldap, RepoError> {
    let mut settings = LdapConnSettings::new()
        .set_conn_timeout(source.connect_timeout)
        .set_starttls(source.starttls);
    if let Some(ca) = &source.tls_ca {
        let cfg = qosloop_runtime::tls::client_config_with(ca, None)
            .map_err(|e| source.err(format!("TLS: {e}")))?;
        settings = settings.set_config(cfg);
    }
    let (conn, mut ldap) = LdapConnAsync::with_settings(settings, &source.url)
        .await
        .map_err(|e| source.err(format!("connecting: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = conn.drive().await {
            tracing::debug!(error = %e, "LDAP connection ended");
        }
    });
    let bound = match &source.bind {
        LdapBind::Anonymous => return Ok(ldap),
        LdapBind::Simple { dn, password } => ldap.simple_bind(dn, password).await,
        LdapBind::SaslExternal => ldap.sasl_external_bind().await,
    };
    bound
        .and_then(|r| r.success())
        .map_err(|e| source.err(format!("bind: {e}")))?;
    Ok(ldap)
}

/// Reads the policy once (a plain search) and validates it strictly, for
/// `--ldap URL --check`.
pub async fn load_ldap(source: &LdapSource) -> Result<PolicySet, RepoError> {
    let mut ldap = connect(source).await?;
    let (entries, _) = ldap
        .search(&source.base_dn, Scope::Subtree, &source.filter, vec!["*"])
        .await
        .and_then(|r| r.success())
        .map_err(|e| source.err(format!("search under {}: {e}", source.base_dn)))?;
    let entries: Vec<Entry> = entries
        .into_iter()
        .filter_map(|re| search_entry(&re.0))
        .collect();
    let _ = ldap.unbind().await;
    Ok(build_strict(&entries)?)
}

/// Connects, waits (up to `initial_timeout`) for the first complete
/// refresh, and keeps the policy in sync from then on. Must be called
/// within a Tokio runtime.
pub async fn watch_ldap(
    source: LdapSource,
    initial_timeout: Duration,
) -> Result<PolicyWatch, RepoError> {
    let (publisher, mut policy, audit) = Publisher::new(source.url.clone(), PolicySet::default());
    let (ready_tx, ready_rx) = oneshot::channel();
    let url = source.url.clone();
    let last_error = Arc::new(Mutex::new(None));
    let status = publisher.status();
    let tokens = publisher.tokens();
    let mappings = publisher.mappings();
    let task = tokio::spawn(run(source, publisher, ready_tx, last_error.clone()));
    let mut watch = PolicyWatch {
        policy: policy.clone(),
        audit,
        status,
        tokens,
        mappings,
        task,
    };
    match tokio::time::timeout(initial_timeout, ready_rx).await {
        Ok(Ok(())) => {
            policy.borrow_and_update();
            watch.policy = policy;
            Ok(watch)
        }
        Ok(Err(_)) => Err(RepoError::Ldap {
            url,
            message: "the synchronization task ended before the first refresh".into(),
        }),
        Err(_) => {
            drop(watch);
            let last = last_error.lock().ok().and_then(|e| e.clone());
            Err(RepoError::Ldap {
                url,
                message: format!(
                    "no complete policy within {initial_timeout:?}{}",
                    last.map_or(String::new(), |e| format!(" (last error: {e})"))
                ),
            })
        }
    }
}

async fn run(
    source: LdapSource,
    mut publisher: Publisher,
    ready: oneshot::Sender<()>,
    last_error: Arc<Mutex<Option<String>>>,
) {
    let mut ready = Some(ready);
    let mut backoff = source.backoff_min;
    loop {
        let mut refreshed = false;
        let outcome = session(&source, &mut publisher, &mut ready, &mut refreshed).await;
        if publisher.closed() {
            return;
        }
        let why = match outcome {
            Ok(()) => "the server ended the synchronization search".to_owned(),
            Err(e) => e.to_string(),
        };
        if let Ok(mut slot) = last_error.lock() {
            *slot = Some(why.clone());
        }
        if refreshed {
            backoff = source.backoff_min;
        }
        tracing::warn!(
            source = %publisher.source(),
            error = %why,
            retry_in = ?backoff,
            "LDAP policy source unavailable; keeping the last good policy"
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(source.backoff_max);
    }
}

/// One connection: refresh, then persist until the connection ends.
async fn session(
    source: &LdapSource,
    publisher: &mut Publisher,
    ready: &mut Option<oneshot::Sender<()>>,
    refreshed: &mut bool,
) -> Result<(), RepoError> {
    let mut ldap = connect(source).await?;
    let request = SyncRequest {
        mode: RefreshMode::RefreshAndPersist,
        cookie: None,
        reload_hint: false,
    };
    let mut stream = ldap
        .with_controls(request.critical())
        .streaming_search(&source.base_dn, Scope::Subtree, &source.filter, vec!["*"])
        .await
        .map_err(|e| source.err(format!("sync search under {}: {e}", source.base_dn)))?;
    // entryUUID → entry, as the server currently holds it.
    let mut entries: BTreeMap<Vec<u8>, Entry> = BTreeMap::new();
    let mut refreshing = true;
    // Persist-stage changes not yet applied, and since when.
    let mut pending: Option<Instant> = None;
    loop {
        let next = match pending {
            // Changes wait until the server has been quiet for `settle` (at
            // most ten times that), so that the entries of one edit (a rule
            // and its associations) become one policy change.
            Some(first) => {
                let quiet = (first + source.settle * 10)
                    .saturating_duration_since(Instant::now())
                    .min(source.settle);
                match tokio::time::timeout(quiet, stream.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        publisher.replace_all(entries.values().cloned());
                        pending = None;
                        continue;
                    }
                }
            }
            None => stream.next().await,
        };
        let item = match next {
            Ok(Some(item)) => item,
            Ok(None) => break,
            Err(e) => {
                let _ = stream.finish().await;
                return Err(source.err(format!("sync search: {e}")));
            }
        };
        let changed = if item.is_intermediate() {
            match sync_info(&item.0) {
                Some(SyncInfo::RefreshDone) if refreshing => {
                    refreshing = false;
                    *refreshed = true;
                    publisher.replace_all(entries.values().cloned());
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(());
                    }
                    false
                }
                Some(SyncInfo::Deleted(uuids)) => {
                    let before = entries.len();
                    entries.retain(|uuid, _| !uuids.contains(uuid));
                    entries.len() != before
                }
                _ => false,
            }
        } else if item.is_ref() {
            false
        } else {
            match sync_state(&item.1) {
                None => {
                    tracing::debug!("search entry without a Sync State control ignored");
                    false
                }
                Some(change) if change.state == State::Delete => {
                    entries.remove(&change.uuid).is_some()
                }
                Some(change) => match search_entry(&item.0) {
                    Some(entry) => {
                        entries.insert(change.uuid, entry);
                        true
                    }
                    None => {
                        tracing::warn!("malformed search entry from the server ignored");
                        false
                    }
                },
            }
        };
        if changed && !refreshing {
            if source.settle.is_zero() {
                publisher.replace_all(entries.values().cloned());
            } else {
                pending.get_or_insert_with(Instant::now);
            }
        }
    }
    if pending.is_some() {
        publisher.replace_all(entries.values().cloned());
    }
    let result = stream.finish().await;
    if refreshing {
        return Err(source.err(format!(
            "sync search under {} ended before the refresh completed: {}",
            source.base_dn, result
        )));
    }
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Present,
    Add,
    Modify,
    Delete,
}

#[derive(Debug)]
struct SyncStateControl {
    state: State,
    uuid: Vec<u8>,
}

fn children(tag: &StructureTag) -> Option<&[StructureTag]> {
    match &tag.payload {
        PL::C(c) => Some(c),
        PL::P(_) => None,
    }
}

fn bytes(tag: &StructureTag) -> Option<&[u8]> {
    match &tag.payload {
        PL::P(b) => Some(b),
        PL::C(_) => None,
    }
}

/// `syncStateValue ::= SEQUENCE { state ENUMERATED, entryUUID syncUUID,
/// cookie syncCookie OPTIONAL }`.
fn sync_state(controls: &[Control]) -> Option<SyncStateControl> {
    let raw = controls.iter().find(|c| c.1.ctype == SYNC_STATE_OID)?;
    let value = raw.1.val.as_deref()?;
    let (_, seq) = parse_tag(value).ok()?;
    let parts = children(&seq)?;
    let state = match bytes(parts.first()?)? {
        [0] => State::Present,
        [1] => State::Add,
        [2] => State::Modify,
        [3] => State::Delete,
        _ => return None,
    };
    let uuid = bytes(parts.get(1)?)?.to_vec();
    Some(SyncStateControl { state, uuid })
}

#[derive(Debug, PartialEq, Eq)]
enum SyncInfo {
    RefreshDone,
    RefreshInProgress,
    Deleted(BTreeSet<Vec<u8>>),
    Other,
}

/// The Sync Info intermediate response: `[0] newcookie`, `[1]
/// refreshDelete`, `[2] refreshPresent` (with refreshDone, default TRUE),
/// `[3] syncIdSet` (with refreshDeletes, default FALSE, and a set of UUIDs).
fn sync_info(tag: &StructureTag) -> Option<SyncInfo> {
    let parts = children(tag)?;
    let oid = parts.iter().find(|p| p.id == 0).and_then(bytes)?;
    if oid != SYNC_INFO_OID.as_bytes() {
        return Some(SyncInfo::Other);
    }
    let value = parts.iter().find(|p| p.id == 1).and_then(bytes)?;
    let (_, info) = parse_tag(value).ok()?;
    if info.class != TagClass::Context {
        return None;
    }
    let boolean = |fields: &[StructureTag]| {
        fields
            .iter()
            .find(|f| f.class == TagClass::Universal && f.id == 1)
            .and_then(bytes)
            .map(|b| b.first().is_some_and(|&v| v != 0))
    };
    match info.id {
        0 => Some(SyncInfo::Other),
        1 | 2 => {
            let fields = children(&info).unwrap_or(&[]);
            if boolean(fields).unwrap_or(true) {
                Some(SyncInfo::RefreshDone)
            } else {
                Some(SyncInfo::RefreshInProgress)
            }
        }
        3 => {
            let fields = children(&info)?;
            if !boolean(fields).unwrap_or(false) {
                return Some(SyncInfo::Other);
            }
            let set = fields
                .iter()
                .find(|f| f.class == TagClass::Universal && f.id == 17)
                .and_then(children)?;
            Some(SyncInfo::Deleted(
                set.iter().filter_map(bytes).map(<[u8]>::to_vec).collect(),
            ))
        }
        _ => None,
    }
}

/// `SearchResultEntry ::= [APPLICATION 4] SEQUENCE { objectName LDAPDN,
/// attributes PartialAttributeList }`; values that are not UTF-8 are
/// skipped (no policy attribute is binary).
fn search_entry(tag: &StructureTag) -> Option<Entry> {
    if tag.class != TagClass::Application || tag.id != 4 {
        return None;
    }
    let parts = children(tag)?;
    let dn = String::from_utf8(bytes(parts.first()?)?.to_vec()).ok()?;
    let mut entry = Entry::new(dn);
    for attr in parts.get(1).and_then(children).unwrap_or(&[]) {
        let Some(fields) = children(attr) else {
            continue;
        };
        let Some(name) = fields
            .first()
            .and_then(bytes)
            .and_then(|b| std::str::from_utf8(b).ok())
        else {
            continue;
        };
        for v in fields.get(1).and_then(children).unwrap_or(&[]) {
            if let Some(text) = bytes(v).and_then(|b| std::str::from_utf8(b).ok()) {
                entry.push(name, text);
            }
        }
    }
    Some(entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ldap3::controls::RawControl;

    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag, body.len() as u8];
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn decodes_sync_state_controls() {
        let value = tlv(
            0x30,
            &[tlv(0x0a, &[2]), tlv(0x04, b"0123456789abcdef")].concat(),
        );
        let controls = vec![Control(
            None,
            RawControl {
                ctype: SYNC_STATE_OID.into(),
                crit: false,
                val: Some(value),
            },
        )];
        let s = sync_state(&controls).unwrap();
        assert_eq!(s.state, State::Modify);
        assert_eq!(s.uuid, b"0123456789abcdef");
        // Malformed values are ignored, not a panic.
        for bad in [vec![], vec![0x30], tlv(0x30, &tlv(0x0a, &[9]))] {
            let mut controls = controls.clone();
            controls[0].1.val = Some(bad);
            assert!(sync_state(&controls).is_none());
        }
    }

    #[test]
    fn decodes_sync_info_refresh_done() {
        let msg = |value: Vec<u8>| {
            let body = [tlv(0x80, SYNC_INFO_OID.as_bytes()), tlv(0x81, &value)].concat();
            parse_tag(&tlv(0x79, &body)).unwrap().1
        };
        // refreshPresent with no fields: refreshDone defaults to TRUE.
        assert_eq!(sync_info(&msg(tlv(0xa2, &[]))), Some(SyncInfo::RefreshDone));
        assert_eq!(
            sync_info(&msg(tlv(0xa1, &tlv(0x01, &[0])))),
            Some(SyncInfo::RefreshInProgress)
        );
        let ids = [
            tlv(0x01, &[0xff]),
            tlv(0x31, &[tlv(0x04, b"aaaaaaaaaaaaaaaa")].concat()),
        ]
        .concat();
        assert_eq!(
            sync_info(&msg(tlv(0xa3, &ids))),
            Some(SyncInfo::Deleted([b"aaaaaaaaaaaaaaaa".to_vec()].into()))
        );
        assert_eq!(sync_info(&msg(vec![0xa3])), None);
    }
}
