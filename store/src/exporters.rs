//! `exporters`, `sessions` and `templates`: who exports, their sessions
//! (streams kept across reconnects) and the templates they negotiated.

use crate::db::{now_ns, Db};
use crate::dialect::{i64_of, Sql};
use crate::on_pool;

impl Db {
    /// Records an exporter (by its unique name) and returns its id. The
    /// row's address and boot time are overwritten: the caller holds the
    /// name (the collector refuses a START naming an exporter that has a
    /// live session from another connection before it gets here).
    pub async fn register_exporter(
        &self,
        name: &str,
        address: &str,
        boot_ns: u64,
    ) -> Result<i64, sqlx::Error> {
        let now = now_ns();
        let q = "INSERT INTO exporters (name, address, boot_ns, first_seen_ns, last_seen_ns) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (name) DO UPDATE SET address = excluded.address, boot_ns = excluded.boot_ns, \
                 last_seen_ns = excluded.last_seen_ns RETURNING id";
        let (id,): (i64,) = on_pool!(self, pool, D => sqlx::query_as(q)
            .bind(name)
            .bind(address)
            .bind(i64_of(boot_ns))
            .bind(now)
            .bind(now)
            .fetch_one(pool)
            .await)?;
        Ok(id)
    }

    /// Records a session (a stream; kept across reconnects).
    pub async fn open_session(
        &self,
        exporter_id: i64,
        session_id: i64,
        byte_order: &str,
    ) -> Result<(), sqlx::Error> {
        let q = "INSERT INTO sessions (exporter_id, session_id, started_ns, byte_order) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (exporter_id, session_id) DO UPDATE SET byte_order = excluded.byte_order, stopped_ns = NULL";
        on_pool!(self, pool, D => sqlx::query(q)
            .bind(exporter_id)
            .bind(session_id)
            .bind(now_ns())
            .bind(byte_order)
            .execute(pool)
            .await
            .map(|_| ()))
    }

    /// Marks a session stopped.
    pub async fn stop_session(&self, exporter_id: i64, session_id: i64) -> Result<(), sqlx::Error> {
        let q = "UPDATE sessions SET stopped_ns = $1 WHERE exporter_id = $2 AND session_id = $3";
        on_pool!(self, pool, D => sqlx::query(q)
            .bind(now_ns())
            .bind(exporter_id)
            .bind(session_id)
            .execute(pool)
            .await
            .map(|_| ()))
    }

    /// Records a negotiated template (its JSON form).
    pub async fn store_template(
        &self,
        exporter_id: i64,
        session_id: i64,
        template_id: u16,
        config_id: u16,
        definition: &str,
    ) -> Result<(), sqlx::Error> {
        let q = format!(
            "INSERT INTO templates (exporter_id, session_id, template_id, config_id, definition, created_ns) \
             VALUES ($1, $2, $3, $4, {}, $6) ON CONFLICT (exporter_id, session_id, template_id) \
             DO UPDATE SET config_id = excluded.config_id, definition = excluded.definition",
            Sql::of(self).json_param(5)
        );
        on_pool!(self, pool, D => sqlx::query(&q)
            .bind(exporter_id)
            .bind(session_id)
            .bind(i64::from(template_id))
            .bind(i64::from(config_id))
            .bind(definition)
            .bind(now_ns())
            .execute(pool)
            .await
            .map(|_| ()))
    }

    /// The `(session_id, template_id, definition JSON)` of an exporter's
    /// templates, in that order.
    pub async fn templates(
        &self,
        exporter_id: i64,
    ) -> Result<Vec<(i64, i64, String)>, sqlx::Error> {
        let q = format!(
            "SELECT session_id, CAST(template_id AS BIGINT), {} FROM templates WHERE exporter_id = $1 \
             ORDER BY session_id, template_id",
            Sql::of(self).json_text("definition")
        );
        on_pool!(self, pool, D => sqlx::query_as(&q).bind(exporter_id).fetch_all(pool).await)
    }
}
