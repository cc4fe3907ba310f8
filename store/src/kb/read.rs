//! The knowledge base's typed reads, and the writes that are not part of
//! a flow write: thresholds, static mappings, events published by other
//! components (decisions), the sweep.

use super::update::{kb_pg, kb_sqlite, signal, NewEvent};
use super::{KbConfig, KbEvent, KbHost, KbMapping, KbUser, Sweep};
use crate::Db;
use sqlx::Connection;
use std::collections::BTreeSet;

type HostRow = (String, i64, i64, i64, i64, i64, i64);
type UserRow = (String, i64, i64, i64, i64, i64, i64, i64, Option<i64>, i64);
type MappingRow = (String, String, String, i64, i64, i64, Option<i64>);
type EventRow = (
    i64,
    i64,
    String,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<String>,
);

impl Db {
    /// Hosts, most recently seen first (at most `limit`).
    pub async fn kb_hosts(&self, limit: i64) -> Result<Vec<KbHost>, sqlx::Error> {
        let q = "SELECT addr, bytes_in, bytes_out, packets_in, packets_out, first_seen_ns, last_seen_ns \
                 FROM kb_hosts ORDER BY last_seen_ns DESC, addr LIMIT $1";
        let rows: Vec<HostRow> =
            crate::on_pool!(self, pool, D => sqlx::query_as(q).bind(limit).fetch_all(pool).await)?;
        Ok(rows
            .into_iter()
            .map(|r| KbHost {
                addr: r.0,
                bytes_in: r.1,
                bytes_out: r.2,
                packets_in: r.3,
                packets_out: r.4,
                first_seen_ns: r.5,
                last_seen_ns: r.6,
            })
            .collect())
    }

    /// Users, by name (at most `limit`).
    pub async fn kb_users(&self, limit: i64) -> Result<Vec<KbUser>, sqlx::Error> {
        let q = "SELECT \"user\", bytes_in, bytes_out, packets_in, packets_out, first_seen_ns, last_seen_ns, \
                 CAST(online AS BIGINT), online_since_ns, session_bytes FROM kb_users ORDER BY \"user\" LIMIT $1";
        let rows: Vec<UserRow> =
            crate::on_pool!(self, pool, D => sqlx::query_as(q).bind(limit).fetch_all(pool).await)?;
        Ok(rows
            .into_iter()
            .map(|r| KbUser {
                user: r.0,
                bytes_in: r.1,
                bytes_out: r.2,
                packets_in: r.3,
                packets_out: r.4,
                first_seen_ns: r.5,
                last_seen_ns: r.6,
                online: r.7 == 1,
                online_since_ns: r.8,
                session_bytes: r.9,
            })
            .collect())
    }

    /// The mappings live at `now` (persistent ones and volatile ones not
    /// expired yet, even before the sweep removes them), by address.
    pub async fn kb_mappings(&self, now: i64, limit: i64) -> Result<Vec<KbMapping>, sqlx::Error> {
        let q = "SELECT addr, \"user\", source, CAST(persistent AS BIGINT), first_seen_ns, last_seen_ns, expires_ns \
                 FROM kb_mappings WHERE persistent = 1 OR expires_ns > $1 \
                 ORDER BY addr, \"user\", source LIMIT $2";
        let rows: Vec<MappingRow> = crate::on_pool!(self, pool, D => sqlx::query_as(q)
            .bind(now)
            .bind(limit)
            .fetch_all(pool)
            .await)?;
        Ok(rows
            .into_iter()
            .map(|r| KbMapping {
                addr: r.0,
                user: r.1,
                source: r.2,
                persistent: r.3 == 1,
                first_seen_ns: r.4,
                last_seen_ns: r.5,
                expires_ns: r.6,
            })
            .collect())
    }

    /// Events with an id above `after`, oldest first (at most `limit`).
    pub async fn kb_events_after(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<Vec<KbEvent>, sqlx::Error> {
        let q = "SELECT id, at_ns, kind, \"user\", addr, value, detail FROM kb_events \
                 WHERE id > $1 ORDER BY id LIMIT $2";
        let rows: Vec<EventRow> = crate::on_pool!(self, pool, D => sqlx::query_as(q)
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await)?;
        Ok(rows
            .into_iter()
            .map(|r| KbEvent {
                id: r.0,
                at_ns: r.1,
                kind: r.2,
                user: r.3,
                addr: r.4,
                value: r.5,
                detail: r.6,
            })
            .collect())
    }

    /// The highest event id so far (0 for none): where a new subscriber
    /// starts.
    pub async fn kb_last_event_id(&self) -> Result<i64, sqlx::Error> {
        let q = "SELECT CAST(COALESCE(MAX(id), 0) AS BIGINT) FROM kb_events";
        let (id,): (i64,) =
            crate::on_pool!(self, pool, D => sqlx::query_as(q).fetch_one(pool).await)?;
        Ok(id)
    }

    /// Sets the byte threshold of `user` (`*`: every user without one of
    /// its own), on the bytes a user moves between logon and logoff.
    pub async fn kb_set_threshold(&self, user: &str, bytes: i64) -> Result<(), sqlx::Error> {
        let q = "INSERT INTO kb_thresholds (\"user\", bytes) VALUES ($1, $2) \
                 ON CONFLICT (\"user\") DO UPDATE SET bytes = excluded.bytes";
        crate::on_pool!(self, pool, D => sqlx::query(q).bind(user).bind(bytes).execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// Replaces the persistent mappings of `source` (e.g. `ldap`) by
    /// `pairs` (address text, user): new ones are added, ones no longer
    /// named removed. Returns (added, removed).
    pub async fn kb_sync_static(
        &self,
        source: &str,
        pairs: &[(String, String)],
        now: i64,
    ) -> Result<(u64, u64), sqlx::Error> {
        let want: BTreeSet<(String, String)> = pairs.iter().cloned().collect();
        crate::on_pool!(self, pool, D => {
            let mut conn = pool.acquire().await?;
            let mut tx = conn.begin().await?;
            let have: Vec<(String, String)> = sqlx::query_as(
                "SELECT addr, \"user\" FROM kb_mappings WHERE source = $1 AND persistent = 1",
            )
            .bind(source)
            .fetch_all(&mut *tx)
            .await?;
            let have: BTreeSet<(String, String)> = have.into_iter().collect();
            let (mut added, mut removed) = (0, 0);
            for (addr, user) in have.difference(&want) {
                removed += sqlx::query(
                    "DELETE FROM kb_mappings WHERE addr = $1 AND \"user\" = $2 AND source = $3",
                )
                .bind(addr)
                .bind(user)
                .bind(source)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            }
            for (addr, user) in want.difference(&have) {
                added += sqlx::query(
                    "INSERT INTO kb_mappings (addr, \"user\", source, persistent, first_seen_ns, last_seen_ns, expires_ns) \
                     VALUES ($1, $2, $3, 1, $4, $4, NULL) ON CONFLICT (addr, \"user\", source) \
                     DO UPDATE SET persistent = 1, expires_ns = NULL",
                )
                .bind(addr)
                .bind(user)
                .bind(source)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>((added, removed))
        })
    }

    /// Publishes an event another component causes (the policy server's
    /// `decision`), in commit order with the writers'.
    pub async fn kb_publish(
        &self,
        kind: &'static str,
        user: Option<&str>,
        detail: Option<&str>,
        now: i64,
    ) -> Result<(), sqlx::Error> {
        self.kb_publish_value(kind, user, None, detail, now).await
    }

    /// [`Db::kb_publish`] with the event's `value` (the policy server's
    /// rate `threshold`: the threshold in kbit/s).
    pub async fn kb_publish_value(
        &self,
        kind: &'static str,
        user: Option<&str>,
        value: Option<i64>,
        detail: Option<&str>,
        now: i64,
    ) -> Result<(), sqlx::Error> {
        let e = [NewEvent {
            kind,
            user: user.map(str::to_owned),
            addr: None,
            value,
            detail: detail.map(str::to_owned),
        }];
        match self {
            Db::Sqlite(pool) => {
                let mut conn = pool.acquire().await?;
                let mut tx = conn.begin().await?;
                kb_sqlite::insert_events(&mut tx, &e, now).await?;
                tx.commit().await?;
            }
            Db::Postgres(pool) => {
                let mut conn = pool.acquire().await?;
                let mut tx = conn.begin().await?;
                kb_pg::insert_events(&mut tx, &e, now).await?;
                tx.commit().await?;
            }
        }
        signal();
        Ok(())
    }

    /// One sweep at `now`: volatile mappings past their TTL and hosts not
    /// seen for the host TTL are removed, old events deleted, and every
    /// online user idle for [`KbConfig::idle_ns`] without a live volatile
    /// mapping logs off (a `logoff` event each). Safe with several
    /// collectors sweeping at once (each user logs off once).
    pub async fn kb_sweep(&self, cfg: &KbConfig, now: i64) -> Result<Sweep, sqlx::Error> {
        let (s, events) = match self {
            Db::Sqlite(pool) => {
                let mut conn = pool.acquire().await?;
                let mut tx = conn.begin().await?;
                let r = kb_sqlite::sweep(&mut tx, cfg, now).await?;
                tx.commit().await?;
                r
            }
            Db::Postgres(pool) => {
                let mut conn = pool.acquire().await?;
                let mut tx = conn.begin().await?;
                let r = kb_pg::sweep(&mut tx, cfg, now).await?;
                tx.commit().await?;
                r
            }
        };
        if events > 0 {
            signal();
        }
        Ok(s)
    }
}
