//! The storage connection: one handle over SQLite or PostgreSQL, chosen by
//! URL.

use crate::Dialect;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What went wrong talking to the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("unsupported database URL {0:?}: use sqlite://FILE or postgres://…")]
    Url(String),
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("migration {version} ({name}) failed: {source}")]
    Migration {
        version: u32,
        name: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// A pool of connections to qosloop's database.
#[derive(Clone, Debug)]
pub enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// The URL with any password replaced, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

impl DbError {
    /// Whether a restart of the database explains it (unreachable,
    /// starting up, shutting down): worth retrying.
    pub fn is_transient(&self) -> bool {
        match self {
            DbError::Url(_) => false,
            DbError::Connect { source, .. }
            | DbError::Migration { source, .. }
            | DbError::Sql(source) => crate::is_transient(source),
        }
    }
}

/// The `application_name` of qosloop's PostgreSQL sessions: what
/// [`Db::end_frozen_copies`] may end is only ever one of these.
pub const APPLICATION_NAME: &str = "qosloop";

/// How long a qosloop session may sit in a COPY waiting for its client's
/// data before another writer takes that client for frozen
/// ([`Db::end_frozen_copies`]): a live collector streams a batch in
/// milliseconds.
pub const FROZEN_COPY_AFTER: Duration = Duration::from_secs(5);

/// PostgreSQL's connect options from `url`, with the session timeouts.
fn pg_options(url: &str) -> Result<PgConnectOptions, sqlx::Error> {
    // A collector that hangs (stopped, its host gone without a reset)
    // must not hold its locks for ever: another collector's insert of the
    // same (exporter, session, seq) would wait on them. The server ends
    // such a transaction after 1 s idle, and a statement that waits (on a
    // lock) after 10 s. A COPY whose client stopped sending mid-stream is
    // neither: the server waits for the client without end, and the
    // writers blocked on it end it ([`Db::end_frozen_copies`]).
    Ok(PgConnectOptions::from_str(url)?
        .application_name(APPLICATION_NAME)
        .options([
            ("idle_in_transaction_session_timeout", "1s"),
            ("statement_timeout", "10s"),
        ]))
}

fn pg_pool_options() -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
}

impl Db {
    /// Connects to `sqlite://FILE` (created when missing, WAL mode) or
    /// `postgres://…`.
    pub async fn connect(url: &str) -> Result<Db, DbError> {
        let err = |source| DbError::Connect {
            url: redact(url),
            source,
        };
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            let opts = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))
                .map_err(err)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(10));
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                .connect_with(opts)
                .await
                .map_err(err)?;
            Ok(Db::Sqlite(pool))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = pg_pool_options()
                .connect_with(pg_options(url).map_err(err)?)
                .await
                .map_err(err)?;
            Ok(Db::Postgres(pool))
        } else {
            Err(DbError::Url(redact(url)))
        }
    }

    /// A PostgreSQL handle that connects on first use: nothing is sent
    /// now, so it exists while the server is unreachable (see
    /// [`Db::probe`]). Other URLs: [`DbError::Url`].
    pub fn connect_lazy(url: &str) -> Result<Db, DbError> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(DbError::Url(redact(url)));
        }
        let opts = pg_options(url).map_err(|source| DbError::Connect {
            url: redact(url),
            source,
        })?;
        Ok(Db::Postgres(pg_pool_options().connect_lazy_with(opts)))
    }

    /// Ends the transactions of qosloop sessions frozen inside a COPY: the
    /// server has waited more than `silent_for` for the client's next data
    /// (a collector stopped, or its host hung, mid-batch). Such a
    /// transaction holds the keys of the messages it was storing, so the
    /// writer that took those messages over waits on it for ever (a
    /// statement timeout cannot end a COPY waiting for its client). Its
    /// batch was not committed, hence never acknowledged: its exporter
    /// sends it again, and the de-duplication keys keep it once. Returns
    /// the backends ended; nothing on SQLite.
    pub async fn end_frozen_copies(&self, silent_for: Duration) -> Result<Vec<i32>, DbError> {
        let Db::Postgres(pool) = self else {
            return Ok(Vec::new());
        };
        // MATERIALIZED: pg_terminate_backend only on the rows chosen.
        let ended: Vec<(i32,)> = sqlx::query_as(
            "WITH frozen AS MATERIALIZED ( \
                 SELECT pid FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid() \
                   AND backend_type = 'client backend' AND application_name = $1 \
                   AND state = 'active' AND wait_event = 'ClientRead' \
                   AND query LIKE 'COPY %' \
                   AND state_change < now() - make_interval(secs => $2)) \
             SELECT pid FROM frozen WHERE pg_terminate_backend(pid)",
        )
        .bind(APPLICATION_NAME)
        .bind(silent_for.as_secs_f64())
        .fetch_all(pool)
        .await?;
        Ok(ended.into_iter().map(|(pid,)| pid).collect())
    }

    /// One connection attempt outside the pool, failing at once when the
    /// server is unreachable (the pool's own acquire waits up to its
    /// timeout, retrying).
    pub async fn probe(&self) -> Result<(), DbError> {
        match self {
            Db::Sqlite(pool) => {
                sqlx::query("SELECT 1").execute(pool).await?;
            }
            Db::Postgres(pool) => {
                use sqlx::Connection;
                let opts = pool.connect_options();
                let conn = sqlx::PgConnection::connect_with(&opts).await?;
                conn.close().await?;
            }
        }
        Ok(())
    }

    pub fn dialect(&self) -> Dialect {
        match self {
            Db::Sqlite(_) => Dialect::Sqlite,
            Db::Postgres(_) => Dialect::Postgres,
        }
    }

    /// The names of the tables in the schema qosloop uses.
    pub async fn tables(&self) -> Result<Vec<String>, DbError> {
        let rows: Vec<(String,)> = match self {
            Db::Sqlite(pool) => {
                sqlx::query_as("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
                    .fetch_all(pool)
                    .await?
            }
            Db::Postgres(pool) => {
                sqlx::query_as(
                    "SELECT c.relname::TEXT FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') \
                     AND NOT c.relispartition ORDER BY 1",
                )
                .fetch_all(pool)
                .await?
            }
        };
        Ok(rows.into_iter().map(|(n,)| n).collect())
    }

    pub async fn close(&self) {
        match self {
            Db::Sqlite(p) => p.close().await,
            Db::Postgres(p) => p.close().await,
        }
    }
}

/// Nanoseconds since the Unix epoch, as stored in `*_ns` columns.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://q:secret@127.0.0.1:5432/db"),
            "postgres://q:***@127.0.0.1:5432/db"
        );
        assert_eq!(redact("postgres://q@host/db"), "postgres://q@host/db");
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
    }

    #[tokio::test]
    async fn unknown_url_scheme_is_a_clear_error() {
        let e = Db::connect("mysql://x").await.unwrap_err();
        assert!(
            e.to_string().contains("sqlite://FILE or postgres://"),
            "{e}"
        );
    }
}
