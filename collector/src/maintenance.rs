//! The collector's share of keeping `flows` bounded: at start and every
//! `maintenance_interval_s`, PostgreSQL partitions for today and the days
//! ahead, and retention of `retention_days`. Every collector runs it; the
//! work itself is safe with several at once (see `qosloop_store`'s
//! retention: one advisory lock, idempotent), so no node is special.
//! Also the knowledge base's sweep (expiry, logoffs) when it is kept.

use crate::config::Config;
use qosloop_store::{now_ns, Db, Maintenance, Retention};
use std::time::Duration;

/// The retention the configuration asks for.
pub fn retention(config: &Config) -> Retention {
    Retention {
        days: config.retention_days,
        ahead_days: config.partitions_ahead_days,
        ..Retention::default()
    }
}

/// This process as `flow_maintenance.node`: host and process id.
pub fn node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    format!("{host}/{}", std::process::id())
}

/// One run now; logged.
pub async fn run_once(
    db: &Db,
    node: &str,
    retention: Retention,
) -> Result<Maintenance, sqlx::Error> {
    let m = db.maintain_flows(node, retention, now_ns()).await?;
    if m.partitions_created > 0 || m.partitions_dropped > 0 || m.rows_deleted > 0 {
        tracing::info!(created = m.partitions_created, dropped = m.partitions_dropped,
            rows_deleted = m.rows_deleted, before_ns = ?m.before_ns, "flows maintained");
    }
    Ok(m)
}

/// Runs [`run_once`] now and every `interval` until the task is dropped;
/// a failure (the database away) is logged and tried again next time.
pub async fn run(db: Db, config: &Config) {
    let retention = retention(config);
    let node = node_name();
    let mut tick = tokio::time::interval(Duration::from_secs(config.maintenance_interval_s));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = run_once(&db, &node, retention).await {
            tracing::warn!(error = %e, "flows maintenance failed; trying again next interval");
        }
    }
}

/// Sweeps the knowledge base every `every` (expired mappings and hosts,
/// idle users logged off) until the task is dropped; a failure is logged
/// and tried again next time. Every collector runs it; a user logs off
/// once however many sweep.
pub async fn kb_sweeps(db: Db, kb: qosloop_store::KbConfig, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match db.kb_sweep(&kb, now_ns()).await {
            Ok(s) if s.logoffs + s.mappings_expired + s.hosts_expired > 0 => {
                tracing::debug!(
                    logoffs = s.logoffs,
                    mappings_expired = s.mappings_expired,
                    hosts_expired = s.hosts_expired,
                    "knowledge base swept"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "knowledge-base sweep failed; trying again"),
        }
    }
}
