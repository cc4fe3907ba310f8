//! What IPFIX ingest keeps in SQL besides flows: exporters (rows of
//! `exporters` named `ipfix/udp/ADDR:PORT` or `ipfix/tcp/ADDR`), persisted
//! UDP templates (`templates`), and counters (`ipfix_exporter_stats`,
//! `ipfix_drops`, `ipfix_listeners`).

use super::decoder::ExporterStats;
use super::persist::TemplateChange;
use super::stats::DropReason;
use crate::db::{now_ns, Db};
use std::net::SocketAddr;

/// The `exporters.name` of a UDP exporter.
pub fn udp_exporter_name(addr: SocketAddr) -> String {
    format!("ipfix/udp/{addr}")
}

/// The `exporters.name` of a TCP exporter (one row per address; its
/// sessions come and go).
pub fn tcp_exporter_name(addr: SocketAddr) -> String {
    format!("ipfix/tcp/{}", addr.ip())
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Writes or deletes templates, in one transaction. A delete takes the row
/// only when it was not written after `seen_ns` (the last time the deleting
/// decoder saw the template): a template another receiving thread keeps
/// refreshing survives another thread's expiry of its restored copy.
pub async fn store_templates(
    db: &Db,
    changes: &[(i64, TemplateChange)],
) -> Result<(), sqlx::Error> {
    if changes.is_empty() {
        return Ok(());
    }
    match db {
        Db::Sqlite(pool) => {
            let mut tx = pool.begin().await?;
            for (exporter_id, c) in changes {
                let q = match &c.definition {
                    Some(text) => sqlx::query(
                        "INSERT INTO templates (exporter_id, session_id, template_id, config_id, definition, created_ns) \
                         VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (exporter_id, session_id, template_id) \
                         DO UPDATE SET config_id = excluded.config_id, definition = excluded.definition, created_ns = excluded.created_ns",
                    )
                    .bind(*exporter_id)
                    .bind(i64::from(c.domain))
                    .bind(i64::from(c.template_id))
                    .bind(i64::from(c.version.number()))
                    .bind(serde_json::Value::String(text.clone()).to_string())
                    .bind(i64_of(c.seen_ns)),
                    None => sqlx::query(
                        "DELETE FROM templates WHERE exporter_id = ? AND session_id = ? AND template_id = ? \
                         AND created_ns <= ?",
                    )
                    .bind(*exporter_id)
                    .bind(i64::from(c.domain))
                    .bind(i64::from(c.template_id))
                    .bind(i64_of(c.seen_ns)),
                };
                q.execute(&mut *tx).await?;
            }
            tx.commit().await?;
        }
        Db::Postgres(pool) => {
            let mut tx = pool.begin().await?;
            for (exporter_id, c) in changes {
                let q = match &c.definition {
                    Some(text) => sqlx::query(
                        "INSERT INTO templates (exporter_id, session_id, template_id, config_id, definition, created_ns) \
                         VALUES ($1, $2, $3, $4, $5::jsonb, $6) ON CONFLICT (exporter_id, session_id, template_id) \
                         DO UPDATE SET config_id = excluded.config_id, definition = excluded.definition, created_ns = excluded.created_ns",
                    )
                    .bind(*exporter_id)
                    .bind(i64::from(c.domain))
                    .bind(i32::from(c.template_id))
                    .bind(i32::from(c.version.number()))
                    .bind(serde_json::Value::String(text.clone()).to_string())
                    .bind(i64_of(c.seen_ns)),
                    None => sqlx::query(
                        "DELETE FROM templates WHERE exporter_id = $1 AND session_id = $2 AND template_id = $3 \
                         AND created_ns <= $4",
                    )
                    .bind(*exporter_id)
                    .bind(i64::from(c.domain))
                    .bind(i32::from(c.template_id))
                    .bind(i64_of(c.seen_ns)),
                };
                q.execute(&mut *tx).await?;
            }
            tx.commit().await?;
        }
    }
    Ok(())
}

/// A stored UDP template: exporter, domain, id, text form, last seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredTemplate {
    pub exporter: SocketAddr,
    pub domain: u32,
    pub template_id: u16,
    pub definition: String,
    pub seen_ns: u64,
}

/// Every persisted UDP template, at most `limit`; rows that do not parse
/// are skipped (the decoder checks the definitions again).
pub async fn load_templates(db: &Db, limit: usize) -> Result<Vec<StoredTemplate>, sqlx::Error> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows: Vec<(String, i64, i64, String, i64)> = match db {
        Db::Sqlite(pool) => {
            sqlx::query_as(
                "SELECT e.name, t.session_id, t.template_id, t.definition, t.created_ns FROM templates t \
                 JOIN exporters e ON e.id = t.exporter_id WHERE e.name LIKE 'ipfix/udp/%' \
                 ORDER BY t.created_ns DESC LIMIT ?",
            )
            .bind(limit)
            .fetch_all(pool)
            .await?
        }
        Db::Postgres(pool) => {
            let rows: Vec<(String, i64, i32, String, i64)> = sqlx::query_as(
                "SELECT e.name, t.session_id, t.template_id, t.definition::text, t.created_ns FROM templates t \
                 JOIN exporters e ON e.id = t.exporter_id WHERE e.name LIKE 'ipfix/udp/%' \
                 ORDER BY t.created_ns DESC LIMIT $1",
            )
            .bind(limit)
            .fetch_all(pool)
            .await?;
            rows.into_iter()
                .map(|(a, b, c, d, e)| (a, b, i64::from(c), d, e))
                .collect()
        }
    };
    Ok(rows
        .into_iter()
        .filter_map(|(name, domain, id, json, seen)| {
            Some(StoredTemplate {
                exporter: name.strip_prefix("ipfix/udp/")?.parse().ok()?,
                domain: u32::try_from(domain).ok()?,
                template_id: u16::try_from(id).ok()?,
                definition: serde_json::from_str::<String>(&json).ok()?,
                seen_ns: u64::try_from(seen).ok()?,
            })
        })
        .collect())
}

/// Writes the counters of exporters and domains (absolute values), in one
/// transaction.
pub async fn store_stats(db: &Db, rows: &[(i64, ExporterStats)]) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    match db {
        Db::Sqlite(pool) => {
            let mut tx = pool.begin().await?;
            for (id, s) in rows {
                stats_row(Tx::Sqlite(&mut tx), *id, s).await?;
            }
            tx.commit().await?;
        }
        Db::Postgres(pool) => {
            let mut tx = pool.begin().await?;
            for (id, s) in rows {
                stats_row(Tx::Postgres(&mut tx), *id, s).await?;
            }
            tx.commit().await?;
        }
    }
    Ok(())
}

enum Tx<'a, 'c> {
    Sqlite(&'a mut sqlx::Transaction<'c, sqlx::Sqlite>),
    Postgres(&'a mut sqlx::Transaction<'c, sqlx::Postgres>),
}

async fn stats_row(db: Tx<'_, '_>, exporter_id: i64, s: &ExporterStats) -> Result<(), sqlx::Error> {
    let now = now_ns();
    let version = i64::from(s.version.map_or(0, |v| v.number()));
    let domain = s.domain.map_or(-1, i64::from);
    let c = &s.counters;
    let dropped: u64 = c.drops.iter().sum();
    let values = [
        i64_of(c.messages),
        i64_of(c.records),
        i64_of(c.sequence_gaps),
        i64_of(c.reordered),
        s.templates as i64,
        i64_of(c.templates_received),
        i64_of(c.totals_untracked),
        s.pending_sets as i64,
        i64_of(dropped),
    ];
    const COLS: &str =
        "messages, records, sequence_gaps, reordered, templates, templates_received, \
        totals_untracked, pending_sets, dropped";
    const SET: &str = "messages = excluded.messages, records = excluded.records, \
        sequence_gaps = excluded.sequence_gaps, reordered = excluded.reordered, templates = excluded.templates, \
        templates_received = excluded.templates_received, totals_untracked = excluded.totals_untracked, \
        pending_sets = excluded.pending_sets, dropped = excluded.dropped, updated_ns = excluded.updated_ns";
    // The unattributed row's counts can shrink (an exporter's counts move to
    // its own row once it proves itself): every reason is written, zeros
    // too, so that no stale count stays behind. Other rows only grow.
    let drops: Vec<(DropReason, u64)> = if s.exporter.addr.ip().is_unspecified() {
        DropReason::ALL
            .iter()
            .map(|r| (*r, c.dropped(*r)))
            .collect()
    } else {
        c.nonzero_drops().collect()
    };
    match db {
        Tx::Sqlite(pool) => {
            let sql = format!(
                "INSERT INTO ipfix_exporter_stats (exporter_id, version, domain, {COLS}, updated_ns) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (exporter_id, version, domain) DO UPDATE SET {SET}"
            );
            let mut q = sqlx::query(&sql)
                .bind(exporter_id)
                .bind(version)
                .bind(domain);
            for v in values {
                q = q.bind(v);
            }
            q.bind(now).execute(&mut **pool).await?;
            for (reason, n) in drops {
                sqlx::query(
                    "INSERT INTO ipfix_drops (exporter_id, version, domain, reason, count, updated_ns) \
                     VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (exporter_id, version, domain, reason) \
                     DO UPDATE SET count = excluded.count, updated_ns = excluded.updated_ns",
                )
                .bind(exporter_id)
                .bind(version)
                .bind(domain)
                .bind(reason.as_str())
                .bind(i64_of(n))
                .bind(now)
                .execute(&mut **pool)
                .await?;
            }
        }
        Tx::Postgres(pool) => {
            let sql = format!(
                "INSERT INTO ipfix_exporter_stats (exporter_id, version, domain, {COLS}, updated_ns) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
                 ON CONFLICT (exporter_id, version, domain) DO UPDATE SET {SET}"
            );
            let mut q = sqlx::query(&sql)
                .bind(exporter_id)
                .bind(version as i32)
                .bind(domain);
            for v in values {
                q = q.bind(v);
            }
            q.bind(now).execute(&mut **pool).await?;
            for (reason, n) in drops {
                sqlx::query(
                    "INSERT INTO ipfix_drops (exporter_id, version, domain, reason, count, updated_ns) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (exporter_id, version, domain, reason) \
                     DO UPDATE SET count = excluded.count, updated_ns = excluded.updated_ns",
                )
                .bind(exporter_id)
                .bind(version as i32)
                .bind(domain)
                .bind(reason.as_str())
                .bind(i64_of(n))
                .bind(now)
                .execute(&mut **pool)
                .await?;
            }
        }
    }
    Ok(())
}

/// Counters of one listening socket (all threads of it together).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListenerStats {
    pub datagrams: u64,
    pub bytes: u64,
    /// The kernel's count of datagrams dropped on the socket's full
    /// receive queue (SO_RXQ_OVFL).
    pub kernel_drops: u64,
    pub rcvbuf: u64,
    pub not_allowed: u64,
    pub too_many_exporters: u64,
}

pub async fn store_listener(db: &Db, listen: &str, s: &ListenerStats) -> Result<(), sqlx::Error> {
    let now = now_ns();
    let vals = [
        i64_of(s.datagrams),
        i64_of(s.bytes),
        i64_of(s.kernel_drops),
        i64_of(s.rcvbuf),
        i64_of(s.not_allowed),
        i64_of(s.too_many_exporters),
        now,
    ];
    const SET: &str = "datagrams = excluded.datagrams, bytes = excluded.bytes, kernel_drops = excluded.kernel_drops, \
        rcvbuf = excluded.rcvbuf, not_allowed = excluded.not_allowed, \
        too_many_exporters = excluded.too_many_exporters, updated_ns = excluded.updated_ns";
    const COLS: &str =
        "listen, datagrams, bytes, kernel_drops, rcvbuf, not_allowed, too_many_exporters, updated_ns";
    match db {
        Db::Sqlite(pool) => {
            let sql = format!(
                "INSERT INTO ipfix_listeners ({COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (listen) DO UPDATE SET {SET}"
            );
            let mut q = sqlx::query(&sql).bind(listen);
            for v in vals {
                q = q.bind(v);
            }
            q.execute(pool).await?;
        }
        Db::Postgres(pool) => {
            let sql = format!(
                "INSERT INTO ipfix_listeners ({COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (listen) DO UPDATE SET {SET}"
            );
            let mut q = sqlx::query(&sql).bind(listen);
            for v in vals {
                q = q.bind(v);
            }
            q.execute(pool).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipfix::Version;

    fn change(definition: Option<&str>, seen_ns: u64) -> TemplateChange {
        TemplateChange {
            exporter: "192.0.2.1:2055".parse().unwrap(),
            version: Version::Ipfix,
            domain: 1,
            template_id: 256,
            definition: definition.map(str::to_string),
            seen_ns,
        }
    }

    /// Review finding 8: a receiving thread expiring its restored copy of a
    /// template deleted the row another thread kept refreshing. A delete
    /// now takes the row only when nobody stored it after the deleter last
    /// saw it.
    #[tokio::test]
    async fn an_expiry_does_not_delete_a_template_stored_since() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&format!("sqlite://{}", dir.path().join("t.db").display()))
            .await
            .unwrap();
        db.migrate().await.unwrap();
        let ex = db
            .register_exporter("ipfix/udp/192.0.2.1:2055", "192.0.2.1:2055", 0)
            .await
            .unwrap();
        let def = "ipfix data 0 8:4 1:4";
        store_templates(&db, &[(ex, change(Some(def), 100))])
            .await
            .unwrap();
        // The owner refreshes it at 200; a thread that last saw it at 100
        // expires it.
        store_templates(&db, &[(ex, change(Some(def), 200))])
            .await
            .unwrap();
        store_templates(&db, &[(ex, change(None, 100))])
            .await
            .unwrap();
        assert_eq!(load_templates(&db, 10).await.unwrap().len(), 1);
        // The owner's own expiry (last seen 200) deletes it.
        store_templates(&db, &[(ex, change(None, 200))])
            .await
            .unwrap();
        assert!(load_templates(&db, 10).await.unwrap().is_empty());
    }
}
