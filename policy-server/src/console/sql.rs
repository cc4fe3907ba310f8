//! The console's one door to the database: the only place that names the
//! collector's `Db` (to be replaced by the storage crate's), the dialect
//! helper, and one runtime query runner for both dialects that reads every
//! row into typed cells.

pub use qosloop_store::{now_ns, Db};

use serde_json::Value as Json;

/// The SQL dialect of a database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

pub fn dialect(db: &Db) -> Dialect {
    match db {
        Db::Sqlite(_) => Dialect::Sqlite,
        Db::Postgres(_) => Dialect::Postgres,
    }
}

/// A bound parameter.
#[derive(Clone, Debug, PartialEq)]
pub enum Bind {
    Int(i64),
    Text(String),
}

/// The type a result column is read as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Col {
    Int,
    Float,
    Text,
}

/// One value of a result row (NULL as `Json::Null`).
pub type Row = Vec<Json>;

/// An IPv4 address held as dotted text, as an integer (SQLite stores
/// addresses as text; the caller guards against IPv6 text).
pub fn sqlite_v4_int(col: &str) -> String {
    let r1 = format!("substr({col}, instr({col}, '.') + 1)");
    let r2 = format!("substr({r1}, instr({r1}, '.') + 1)");
    let o1 = format!("CAST(substr({col}, 1, instr({col}, '.') - 1) AS INTEGER)");
    let o2 = format!("CAST(substr({r1}, 1, instr({r1}, '.') - 1) AS INTEGER)");
    let o3 = format!("CAST(substr({r2}, 1, instr({r2}, '.') - 1) AS INTEGER)");
    let o4 = format!("CAST(substr({r2}, instr({r2}, '.') + 1) AS INTEGER)");
    format!("(({o1} << 24) | ({o2} << 16) | ({o3} << 8) | {o4})")
}

/// An address column as text.
pub fn addr_text(col: &str, d: Dialect) -> String {
    match d {
        Dialect::Postgres => format!("host({col})"),
        Dialect::Sqlite => col.to_owned(),
    }
}

/// Runs `sql` with `binds`, reading each row's columns as `cols` say.
pub async fn fetch(
    db: &Db,
    sql: &str,
    binds: &[Bind],
    cols: &[Col],
) -> Result<Vec<Row>, sqlx::Error> {
    macro_rules! run {
        ($pool:expr) => {{
            let mut q = sqlx::query(sql);
            for b in binds {
                q = match b {
                    Bind::Int(n) => q.bind(*n),
                    Bind::Text(s) => q.bind(s.clone()),
                };
            }
            let rows = q.fetch_all($pool).await?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                use sqlx::Row as _;
                let mut cells = Vec::with_capacity(cols.len());
                for (i, c) in cols.iter().enumerate() {
                    cells.push(
                        match c {
                            Col::Int => row.try_get::<Option<i64>, _>(i)?.map(Json::from),
                            Col::Float => row.try_get::<Option<f64>, _>(i)?.map(Json::from),
                            Col::Text => row.try_get::<Option<String>, _>(i)?.map(Json::from),
                        }
                        .unwrap_or(Json::Null),
                    );
                }
                out.push(cells);
            }
            Ok(out)
        }};
    }
    match db {
        Db::Sqlite(p) => run!(p),
        Db::Postgres(p) => run!(p),
    }
}
