//! `policy_audit`: the changes of the policy repository the policy server
//! saw (add, modify, delete, reject).

use crate::db::Db;
use crate::on_pool;

impl Db {
    /// Records a change of the policy repository (`policy_audit`).
    pub async fn insert_audit(
        &self,
        at_ns: u64,
        source: &str,
        dn: &str,
        change: &str,
        detail: Option<&str>,
    ) -> Result<(), sqlx::Error> {
        let q = "INSERT INTO policy_audit (at_ns, source, dn, change, detail) VALUES ($1, $2, $3, $4, $5)";
        on_pool!(self, pool, D => sqlx::query(q)
            .bind(i64::try_from(at_ns).unwrap_or(i64::MAX))
            .bind(source)
            .bind(dn)
            .bind(change)
            .bind(detail)
            .execute(pool)
            .await
            .map(|_| ()))
    }
}
