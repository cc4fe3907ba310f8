//! What IPFIX ingest keeps in SQL besides flows: exporters (rows of
//! `exporters` named `ipfix/udp/ADDR:PORT` or `ipfix/tcp/ADDR`), persisted
//! UDP templates (`templates`), and counters (`ipfix_exporter_stats`,
//! `ipfix_drops`, `ipfix_listeners`).

use crate::db::{now_ns, Db};
use crate::dialect::{i64_of, Sql};
use crate::on_pool;
use std::net::SocketAddr;

const UDP_PREFIX: &str = "ipfix/udp/";

/// The `exporters.name` of a UDP exporter.
pub fn udp_exporter_name(addr: SocketAddr) -> String {
    format!("{UDP_PREFIX}{addr}")
}

/// The `exporters.name` of a TCP exporter (one row per address; its
/// sessions come and go).
pub fn tcp_exporter_name(addr: SocketAddr) -> String {
    format!("ipfix/tcp/{}", addr.ip())
}

/// A template of a UDP exporter to write (`definition`) or delete (`None`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateUpdate {
    pub exporter_id: i64,
    /// The observation domain (`templates.session_id`).
    pub domain: u32,
    pub template_id: u16,
    /// The protocol version number (9 or 10; `templates.config_id`).
    pub version: u16,
    /// The template's text form; `None` deletes it.
    pub definition: Option<String>,
    /// When it was defined or last refreshed (ns since the epoch).
    pub seen_ns: u64,
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

/// The counters of one exporter and domain, as absolute values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExporterCounters {
    pub exporter_id: i64,
    /// The protocol version number; 0 when not known yet.
    pub version: u16,
    /// The observation domain; `None` for the exporter's own totals.
    pub domain: Option<u32>,
    pub messages: u64,
    pub records: u64,
    pub sequence_gaps: u64,
    pub reordered: u64,
    pub templates: u64,
    pub templates_received: u64,
    pub totals_untracked: u64,
    pub pending_sets: u64,
    pub dropped: u64,
    /// Drops by reason (`ipfix_drops`): the reasons given are written,
    /// zeros included; the others are left as they are.
    pub drops: Vec<(&'static str, u64)>,
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

impl Db {
    /// Writes or deletes templates, in one transaction. A delete takes the
    /// row only when it was not written after `seen_ns` (the last time the
    /// deleting decoder saw the template): a template another receiving
    /// thread keeps refreshing survives another thread's expiry of its
    /// restored copy.
    pub async fn store_ipfix_templates(
        &self,
        changes: &[TemplateUpdate],
    ) -> Result<(), sqlx::Error> {
        if changes.is_empty() {
            return Ok(());
        }
        let upsert = format!(
            "INSERT INTO templates (exporter_id, session_id, template_id, config_id, definition, created_ns) \
             VALUES ($1, $2, $3, $4, {}, $6) ON CONFLICT (exporter_id, session_id, template_id) \
             DO UPDATE SET config_id = excluded.config_id, definition = excluded.definition, created_ns = excluded.created_ns",
            Sql::of(self).json_param(5)
        );
        let delete = "DELETE FROM templates WHERE exporter_id = $1 AND session_id = $2 AND template_id = $3 \
                      AND created_ns <= $4";
        on_pool!(self, pool, D => {
            let mut tx = pool.begin().await?;
            for c in changes {
                let q = match &c.definition {
                    Some(text) => sqlx::query(&upsert)
                        .bind(c.exporter_id)
                        .bind(i64::from(c.domain))
                        .bind(i64::from(c.template_id))
                        .bind(i64::from(c.version))
                        .bind(serde_json::Value::String(text.clone()).to_string())
                        .bind(i64_of(c.seen_ns)),
                    None => sqlx::query(delete)
                        .bind(c.exporter_id)
                        .bind(i64::from(c.domain))
                        .bind(i64::from(c.template_id))
                        .bind(i64_of(c.seen_ns)),
                };
                q.execute(&mut *tx).await?;
            }
            tx.commit().await
        })
    }

    /// Every persisted UDP template, at most `limit`, newest first; rows
    /// that do not parse are skipped (the decoder checks the definitions
    /// again).
    pub async fn load_ipfix_templates(
        &self,
        limit: usize,
    ) -> Result<Vec<StoredTemplate>, sqlx::Error> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let q = format!(
            "SELECT e.name, t.session_id, CAST(t.template_id AS BIGINT), {}, t.created_ns FROM templates t \
             JOIN exporters e ON e.id = t.exporter_id WHERE e.name LIKE '{UDP_PREFIX}%' \
             ORDER BY t.created_ns DESC LIMIT $1",
            Sql::of(self).json_text("t.definition")
        );
        let rows: Vec<(String, i64, i64, String, i64)> =
            on_pool!(self, pool, D => sqlx::query_as(&q).bind(limit).fetch_all(pool).await)?;
        Ok(rows
            .into_iter()
            .filter_map(|(name, domain, id, json, seen)| {
                Some(StoredTemplate {
                    exporter: name.strip_prefix(UDP_PREFIX)?.parse().ok()?,
                    domain: u32::try_from(domain).ok()?,
                    template_id: u16::try_from(id).ok()?,
                    definition: serde_json::from_str::<String>(&json).ok()?,
                    seen_ns: u64::try_from(seen).ok()?,
                })
            })
            .collect())
    }

    /// Writes the counters of exporters and domains, in one transaction.
    pub async fn store_ipfix_stats(&self, rows: &[ExporterCounters]) -> Result<(), sqlx::Error> {
        if rows.is_empty() {
            return Ok(());
        }
        const COLS: &str =
            "messages, records, sequence_gaps, reordered, templates, templates_received, \
            totals_untracked, pending_sets, dropped";
        const SET: &str = "messages = excluded.messages, records = excluded.records, \
            sequence_gaps = excluded.sequence_gaps, reordered = excluded.reordered, templates = excluded.templates, \
            templates_received = excluded.templates_received, totals_untracked = excluded.totals_untracked, \
            pending_sets = excluded.pending_sets, dropped = excluded.dropped, updated_ns = excluded.updated_ns";
        let stats = format!(
            "INSERT INTO ipfix_exporter_stats (exporter_id, version, domain, {COLS}, updated_ns) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
             ON CONFLICT (exporter_id, version, domain) DO UPDATE SET {SET}"
        );
        let drops = "INSERT INTO ipfix_drops (exporter_id, version, domain, reason, count, updated_ns) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (exporter_id, version, domain, reason) \
                     DO UPDATE SET count = excluded.count, updated_ns = excluded.updated_ns";
        on_pool!(self, pool, D => {
            let mut tx = pool.begin().await?;
            for s in rows {
                let now = now_ns();
                let version = i64::from(s.version);
                let domain = s.domain.map_or(-1, i64::from);
                let values = [
                    s.messages,
                    s.records,
                    s.sequence_gaps,
                    s.reordered,
                    s.templates,
                    s.templates_received,
                    s.totals_untracked,
                    s.pending_sets,
                    s.dropped,
                ];
                let mut q = sqlx::query(&stats)
                    .bind(s.exporter_id)
                    .bind(version)
                    .bind(domain);
                for v in values {
                    q = q.bind(i64_of(v));
                }
                q.bind(now).execute(&mut *tx).await?;
                for (reason, n) in &s.drops {
                    sqlx::query(drops)
                        .bind(s.exporter_id)
                        .bind(version)
                        .bind(domain)
                        .bind(*reason)
                        .bind(i64_of(*n))
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            tx.commit().await
        })
    }

    /// Writes the counters of one listening socket.
    pub async fn store_ipfix_listener(
        &self,
        listen: &str,
        s: &ListenerStats,
    ) -> Result<(), sqlx::Error> {
        const SET: &str = "datagrams = excluded.datagrams, bytes = excluded.bytes, kernel_drops = excluded.kernel_drops, \
            rcvbuf = excluded.rcvbuf, not_allowed = excluded.not_allowed, \
            too_many_exporters = excluded.too_many_exporters, updated_ns = excluded.updated_ns";
        let q = format!(
            "INSERT INTO ipfix_listeners (listen, datagrams, bytes, kernel_drops, rcvbuf, not_allowed, \
             too_many_exporters, updated_ns) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (listen) DO UPDATE SET {SET}"
        );
        let vals = [
            i64_of(s.datagrams),
            i64_of(s.bytes),
            i64_of(s.kernel_drops),
            i64_of(s.rcvbuf),
            i64_of(s.not_allowed),
            i64_of(s.too_many_exporters),
            now_ns(),
        ];
        on_pool!(self, pool, D => {
            let mut q = sqlx::query(&q).bind(listen);
            for v in vals {
                q = q.bind(v);
            }
            q.execute(pool).await.map(|_| ())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(exporter_id: i64, definition: Option<&str>, seen_ns: u64) -> TemplateUpdate {
        TemplateUpdate {
            exporter_id,
            domain: 1,
            template_id: 256,
            version: 10,
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
        db.store_ipfix_templates(&[change(ex, Some(def), 100)])
            .await
            .unwrap();
        // The owner refreshes it at 200; a thread that last saw it at 100
        // expires it.
        db.store_ipfix_templates(&[change(ex, Some(def), 200)])
            .await
            .unwrap();
        db.store_ipfix_templates(&[change(ex, None, 100)])
            .await
            .unwrap();
        assert_eq!(db.load_ipfix_templates(10).await.unwrap().len(), 1);
        // The owner's own expiry (last seen 200) deletes it.
        db.store_ipfix_templates(&[change(ex, None, 200)])
            .await
            .unwrap();
        assert!(db.load_ipfix_templates(10).await.unwrap().is_empty());
    }
}
