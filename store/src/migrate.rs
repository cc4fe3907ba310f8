//! The migrations that bring a database to qosloop's schema: the SQL text
//! is the contract in `qosloop_schema::sql` (`schema/sql/`); applying it —
//! each migration once, in order, recorded in `schema_migrations`, under an
//! advisory lock on PostgreSQL so that several processes may start
//! together — is done here.

use crate::db::{now_ns, Db, DbError};
use qosloop_schema::sql::{self, Dialect, MIGRATIONS_TABLE};
use sqlx::Connection;

impl Db {
    /// Applies the migrations not applied yet, each in its own transaction;
    /// returns how many it applied. Running it again applies none.
    pub async fn migrate(&self) -> Result<usize, DbError> {
        let mut applied = 0;
        match self {
            Db::Sqlite(pool) => {
                sqlx::raw_sql(MIGRATIONS_TABLE).execute(pool).await?;
                for m in sql::migrations(Dialect::Sqlite) {
                    let mut conn = pool.acquire().await?;
                    let mut tx = conn.begin().await?;
                    let done: Option<(i64,)> =
                        sqlx::query_as("SELECT version FROM schema_migrations WHERE version = $1")
                            .bind(i64::from(m.version))
                            .fetch_optional(&mut *tx)
                            .await?;
                    if done.is_some() {
                        continue;
                    }
                    sqlx::raw_sql(m.sql)
                        .execute(&mut *tx)
                        .await
                        .map_err(|source| DbError::Migration {
                            version: m.version,
                            name: m.name,
                            source,
                        })?;
                    sqlx::query("INSERT INTO schema_migrations (version, name, applied_at_ns) VALUES ($1, $2, $3)")
                        .bind(i64::from(m.version))
                        .bind(m.name)
                        .bind(now_ns())
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    applied += 1;
                }
            }
            Db::Postgres(pool) => {
                let mut conn = pool.acquire().await?;
                // One migrator at a time across every process on this database.
                sqlx::query("SELECT pg_advisory_lock(7347301)")
                    .execute(&mut *conn)
                    .await?;
                let result = async {
                    sqlx::raw_sql(MIGRATIONS_TABLE).execute(&mut *conn).await?;
                    for m in sql::migrations(Dialect::Postgres) {
                        let mut tx = conn.begin().await?;
                        let done: Option<(i32,)> =
                            sqlx::query_as("SELECT version FROM schema_migrations WHERE version = $1")
                                .bind(m.version as i32)
                                .fetch_optional(&mut *tx)
                                .await?;
                        if done.is_some() {
                            continue;
                        }
                        sqlx::raw_sql(m.sql)
                            .execute(&mut *tx)
                            .await
                            .map_err(|source| DbError::Migration {
                                version: m.version,
                                name: m.name,
                                source,
                            })?;
                        sqlx::query("INSERT INTO schema_migrations (version, name, applied_at_ns) VALUES ($1, $2, $3)")
                            .bind(m.version as i32)
                            .bind(m.name)
                            .bind(now_ns())
                            .execute(&mut *tx)
                            .await?;
                        tx.commit().await?;
                        applied += 1;
                    }
                    Ok::<_, DbError>(())
                }
                .await;
                sqlx::query("SELECT pg_advisory_unlock(7347301)")
                    .execute(&mut *conn)
                    .await?;
                result?;
            }
        }
        Ok(applied)
    }

    /// The versions recorded as applied, oldest first.
    pub async fn applied_versions(&self) -> Result<Vec<u32>, DbError> {
        let q = "SELECT CAST(version AS BIGINT) FROM schema_migrations ORDER BY version";
        let rows: Vec<(i64,)> =
            crate::on_pool!(self, pool, D => sqlx::query_as(q).fetch_all(pool).await)?;
        Ok(rows.into_iter().map(|(v,)| v as u32).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sqlite_migrations_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("q.db").display());
        let db = Db::connect(&url).await.unwrap();
        let first = db.migrate().await.unwrap();
        assert_eq!(first, sql::migrations(Dialect::Sqlite).len());
        let tables = db.tables().await.unwrap();
        let second = db.migrate().await.unwrap();
        assert_eq!(second, 0, "a second run applies nothing");
        assert_eq!(db.tables().await.unwrap(), tables, "and changes nothing");
        for t in [
            "flows",
            "exporters",
            "sessions",
            "templates",
            "rates",
            "decisions",
            "enforcers",
            "policy_audit",
        ] {
            assert!(tables.iter().any(|x| x == t), "missing table {t}");
        }
    }
}
