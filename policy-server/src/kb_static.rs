//! Keeps the knowledge base's static user ↔ address mappings (source
//! `ldap` in `kb_mappings`, docs/kb.md) equal to the policy repository's
//! `qosloopUserMapping` entries: written once the repository is loaded and
//! again after every accepted change, so an entry added binds its
//! addresses and an entry removed (or made invalid) unbinds them.

use crate::repo::StaticMapping;
use qosloop_store::Db;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The `source` of the mappings this module owns in `kb_mappings`.
pub const SOURCE: &str = "ldap";

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Writes `mappings` as the whole set of static mappings. Returns (added,
/// removed).
pub async fn sync_once(db: &Db, mappings: &[StaticMapping]) -> Result<(u64, u64), sqlx::Error> {
    let pairs: Vec<(String, String)> = mappings
        .iter()
        .map(|m| (m.addr.to_string(), m.user.clone()))
        .collect();
    db.kb_sync_static(SOURCE, &pairs, now_ns()).await
}

/// Follows `mappings` until its sender goes (the repository watch is
/// dropped): syncs the current set, then every new one. A failed write is
/// retried (backoff 100 ms doubling to 5 s) with the newest set, so a
/// database that is down for a while catches up with the last version.
pub async fn follow(db: Db, mut mappings: watch::Receiver<Arc<Vec<StaticMapping>>>) {
    loop {
        let set = mappings.borrow_and_update().clone();
        let mut backoff = Duration::from_millis(100);
        loop {
            match sync_once(&db, &set).await {
                Ok((added, removed)) => {
                    if added + removed > 0 {
                        tracing::info!(
                            mappings = set.len(),
                            added,
                            removed,
                            "static user mappings written to the knowledge base"
                        );
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "writing the static user mappings failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    if mappings.has_changed().unwrap_or(false) {
                        // A newer set supersedes this one.
                        break;
                    }
                }
            }
        }
        if mappings.changed().await.is_err() {
            return;
        }
    }
}
