//! Where SQLite and PostgreSQL differ, spelled once.
//!
//! Every query of this crate is written once, in the SQL both engines take:
//! numbered placeholders `$1, $2, …` (PostgreSQL's own; sqlx's SQLite
//! driver binds `$N` by number too, so there is no `?` form to keep in
//! step), `INSERT … ON CONFLICT … DO NOTHING / DO UPDATE` for insert-ignore
//! and upsert (SQLite ≥ 3.24), `CAST(column AS BIGINT)` wherever an integer
//! column is read (PostgreSQL's `INTEGER`/`SMALLINT` columns do not decode
//! as `i64`), and 64-bit integers bound everywhere (PostgreSQL casts them to
//! narrower columns on assignment). What still differs is here:
//!
//! - [`on_pool!`](crate::on_pool): one generic body run with the pool and
//!   the sqlx database type of whichever engine a [`Db`] holds — the only
//!   `match` on the two pools outside this crate's bulk paths;
//! - [`Sql`]: the fragments that have no common spelling (`jsonb` and
//!   `inet` columns, the scalar maximum);
//! - [`Db::fetch_cells`](crate::Db::fetch_cells): queries whose text is
//!   built at run time, bound and read the same way on either engine;
//! - [`is_transient`]: which errors a restart of either engine explains.
//!
//! The flow writer's bulk paths (a prepared multi-row `INSERT` on SQLite,
//! binary `COPY` on PostgreSQL) are two implementations by design, side by
//! side in `flows/write.rs`.

use crate::Db;
pub use qosloop_schema::sql::Dialect;

/// Runs `$body` with `$pool` bound to the pool and `$D` to the sqlx
/// database type (`sqlx::Sqlite` or `sqlx::Postgres`) of whichever engine
/// `$db` (a `&Db`) is; the body is compiled once per engine.
///
/// ```no_run
/// # async fn flows(db: &qosloop_store::Db) -> Result<i64, sqlx::Error> {
/// let (n,): (i64,) = qosloop_store::on_pool!(db, pool, D => {
///     sqlx::query_as::<D, (i64,)>("SELECT count(*) FROM flows").fetch_one(pool).await
/// })?;
/// # Ok(n)
/// # }
/// ```
#[macro_export]
macro_rules! on_pool {
    ($db:expr, $pool:ident, $D:ident => $body:expr) => {
        match $db {
            $crate::Db::Sqlite($pool) => {
                #[allow(dead_code)]
                type $D = $crate::sqlx::Sqlite;
                $body
            }
            $crate::Db::Postgres($pool) => {
                #[allow(dead_code)]
                type $D = $crate::sqlx::Postgres;
                $body
            }
        }
    };
}

/// The SQL fragments that have no spelling common to both engines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sql(pub Dialect);

impl Sql {
    /// The fragments of `db`'s engine.
    pub fn of(db: &Db) -> Sql {
        Sql(db.dialect())
    }

    /// Placeholder `n` of a value stored into a `jsonb` column (`TEXT`
    /// holding JSON on SQLite).
    pub fn json_param(self, n: usize) -> String {
        match self.0 {
            Dialect::Sqlite => format!("${n}"),
            Dialect::Postgres => format!("${n}::jsonb"),
        }
    }

    /// A `jsonb` column read as its JSON text.
    pub fn json_text(self, column: &str) -> String {
        match self.0 {
            Dialect::Sqlite => column.to_owned(),
            Dialect::Postgres => format!("{column}::text"),
        }
    }

    /// An `inet` column read as the address alone (`TEXT` on SQLite).
    pub fn inet_text(self, column: &str) -> String {
        match self.0 {
            Dialect::Sqlite => column.to_owned(),
            Dialect::Postgres => format!("host({column})"),
        }
    }

    /// Placeholder `n` of an address (its `Display` text) stored into an
    /// `inet` column.
    pub fn inet_param(self, n: usize) -> String {
        match self.0 {
            Dialect::Sqlite => format!("${n}"),
            Dialect::Postgres => format!("${n}::inet"),
        }
    }

    /// An IPv4 address column as its 32-bit number (SQLite holds the
    /// dotted text: the caller rules out IPv6 text, `instr(col, ':') = 0`).
    pub fn v4_int(self, col: &str) -> String {
        match self.0 {
            Dialect::Postgres => format!("({col} - CAST('0.0.0.0' AS INET))"),
            Dialect::Sqlite => {
                let r1 = format!("substr({col}, instr({col}, '.') + 1)");
                let r2 = format!("substr({r1}, instr({r1}, '.') + 1)");
                let o1 = format!("CAST(substr({col}, 1, instr({col}, '.') - 1) AS INTEGER)");
                let o2 = format!("CAST(substr({r1}, 1, instr({r1}, '.') - 1) AS INTEGER)");
                let o3 = format!("CAST(substr({r2}, 1, instr({r2}, '.') - 1) AS INTEGER)");
                let o4 = format!("CAST(substr({r2}, instr({r2}, '.') + 1) AS INTEGER)");
                format!("(({o1} << 24) | ({o2} << 16) | ({o3} << 8) | {o4})")
            }
        }
    }

    /// The scalar maximum of two values (`MAX(a, b)` on SQLite).
    pub fn greatest(self) -> &'static str {
        match self.0 {
            Dialect::Sqlite => "MAX",
            Dialect::Postgres => "GREATEST",
        }
    }
}

/// Errors a database restart, a lost connection or lock contention explain:
/// the same work may be tried again and succeed.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            // PostgreSQL: connection exceptions, operator intervention
            // (shutdown, starting up), resources, serialisation. SQLite:
            // BUSY (5) and LOCKED (6) with their extended codes.
            code.starts_with("08")
                || code.starts_with("57P")
                || code.starts_with("53")
                || code == "40001"
                || code == "40P01"
                || code
                    .parse::<i32>()
                    .is_ok_and(|c| c & 0xff == 5 || c & 0xff == 6)
        }
        _ => false,
    }
}

/// Whether `e` is a statement that waited too long on another session's
/// lock (PostgreSQL: `statement_timeout` or `lock_timeout` ended it): worth
/// retrying, after [`crate::Db::end_frozen_copies`], a bounded number of
/// times.
pub fn is_lock_wait(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => matches!(db.code().as_deref(), Some("57014" | "55P03")),
        _ => false,
    }
}

/// A `u64` counter as a signed 64-bit column, saturating.
pub(crate) fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments_per_engine() {
        let (lite, pg) = (Sql(Dialect::Sqlite), Sql(Dialect::Postgres));
        assert_eq!(lite.json_param(5), "$5");
        assert_eq!(pg.json_param(5), "$5::jsonb");
        assert_eq!(pg.json_text("t.body"), "t.body::text");
        assert_eq!(lite.inet_text("src_addr"), "src_addr");
        assert_eq!(pg.inet_text("src_addr"), "host(src_addr)");
        assert_eq!(pg.inet_param(1), "$1::inet");
        assert_eq!((lite.greatest(), pg.greatest()), ("MAX", "GREATEST"));
        assert_eq!(i64_of(u64::MAX), i64::MAX);
        assert!(pg.v4_int("a").contains("INET"));
        assert!(lite.v4_int("a").starts_with("((CAST(substr(a"));
    }
}
