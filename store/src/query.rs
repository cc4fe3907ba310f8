//! Queries whose text is built at run time (the console's filter and
//! grouping compiler): bound values of two kinds, and every result column
//! read as the type the caller names, on either engine.

use crate::db::Db;
use serde_json::Value as Json;

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

/// One result row, a value per column (NULL as `Json::Null`).
pub type Cells = Vec<Json>;

impl Db {
    /// Runs `sql` with `binds` (`$1`, `$2`, … in order), reading each
    /// row's columns as `cols` say.
    pub async fn fetch_cells(
        &self,
        sql: &str,
        binds: &[Bind],
        cols: &[Col],
    ) -> Result<Vec<Cells>, sqlx::Error> {
        crate::on_pool!(self, pool, D => {
            let mut q = sqlx::query::<D>(sql);
            for b in binds {
                q = match b {
                    Bind::Int(n) => q.bind(*n),
                    Bind::Text(s) => q.bind(s.clone()),
                };
            }
            let rows = q.fetch_all(pool).await?;
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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cells_are_read_as_named_with_nulls() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&format!("sqlite://{}", dir.path().join("q.db").display()))
            .await
            .unwrap();
        let rows = db
            .fetch_cells(
                "SELECT $1 + 1, $2, CAST(NULL AS TEXT), 0.5",
                &[Bind::Int(41), Bind::Text("x".into())],
                &[Col::Int, Col::Text, Col::Text, Col::Float],
            )
            .await
            .unwrap();
        assert_eq!(
            rows,
            [vec![
                Json::from(42),
                Json::from("x"),
                Json::Null,
                Json::from(0.5)
            ]]
        );
    }
}
