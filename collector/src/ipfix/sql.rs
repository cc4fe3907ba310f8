//! What IPFIX ingest keeps in SQL besides flows, in the collector's own
//! types: the decoder's template changes and counters become the rows of
//! `qosloop_store` (which holds the SQL).

use super::decoder::ExporterStats;
use super::persist::TemplateChange;
use super::stats::DropReason;
pub use qosloop_store::{tcp_exporter_name, udp_exporter_name, ListenerStats, StoredTemplate};
use qosloop_store::{Db, ExporterCounters, TemplateUpdate};

/// Writes or deletes templates, in one transaction (see
/// [`Db::store_ipfix_templates`] for when a delete takes a row).
pub async fn store_templates(
    db: &Db,
    changes: &[(i64, TemplateChange)],
) -> Result<(), sqlx::Error> {
    let rows: Vec<TemplateUpdate> = changes
        .iter()
        .map(|(exporter_id, c)| TemplateUpdate {
            exporter_id: *exporter_id,
            domain: c.domain,
            template_id: c.template_id,
            version: c.version.number(),
            definition: c.definition.clone(),
            seen_ns: c.seen_ns,
        })
        .collect();
    db.store_ipfix_templates(&rows).await
}

/// Every persisted UDP template, at most `limit`.
pub async fn load_templates(db: &Db, limit: usize) -> Result<Vec<StoredTemplate>, sqlx::Error> {
    db.load_ipfix_templates(limit).await
}

/// Writes the counters of exporters and domains (absolute values), in one
/// transaction.
pub async fn store_stats(db: &Db, rows: &[(i64, ExporterStats)]) -> Result<(), sqlx::Error> {
    let rows: Vec<ExporterCounters> = rows.iter().map(|(id, s)| counters(*id, s)).collect();
    db.store_ipfix_stats(&rows).await
}

pub async fn store_listener(db: &Db, listen: &str, s: &ListenerStats) -> Result<(), sqlx::Error> {
    db.store_ipfix_listener(listen, s).await
}

fn counters(exporter_id: i64, s: &ExporterStats) -> ExporterCounters {
    let c = &s.counters;
    // The unattributed row's counts can shrink (an exporter's counts move to
    // its own row once it proves itself): every reason is written, zeros
    // too, so that no stale count stays behind. Other rows only grow.
    let drops: Vec<(&'static str, u64)> = if s.exporter.addr.ip().is_unspecified() {
        DropReason::ALL
            .iter()
            .map(|r| (r.as_str(), c.dropped(*r)))
            .collect()
    } else {
        c.nonzero_drops().map(|(r, n)| (r.as_str(), n)).collect()
    };
    ExporterCounters {
        exporter_id,
        version: s.version.map_or(0, |v| v.number()),
        domain: s.domain,
        messages: c.messages,
        records: c.records,
        sequence_gaps: c.sequence_gaps,
        reordered: c.reordered,
        templates: s.templates as u64,
        templates_received: c.templates_received,
        totals_untracked: c.totals_untracked,
        pending_sets: s.pending_sets as u64,
        dropped: c.drops.iter().sum(),
        drops,
    }
}
