//! The DPMI tables (`dpmi_points`, `dpmi_requests`, `dpmi_filters`,
//! `dpmi_deliveries`): what the controller of the policy server keeps.
//! Filters and lists are JSON text; the controller gives them meaning.

use crate::db::Db;
use crate::on_pool;
use serde::Serialize;

/// A row of `dpmi_points`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PointRow {
    pub name: String,
    pub interface: String,
    pub max_filters: i64,
    pub max_caplen: i64,
    pub registered_ns: i64,
    pub seen_ns: i64,
    pub installed_version: Option<String>,
    pub install_error: Option<String>,
    pub frames: i64,
    pub matched: i64,
    pub kernel_drops: i64,
}

/// What a point reports of itself after each poll.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PointStatus<'a> {
    pub installed_version: Option<&'a str>,
    pub install_error: Option<&'a str>,
    pub frames: i64,
    pub matched: i64,
    pub kernel_drops: i64,
}

/// A row of `dpmi_requests` (`points` and `filter` as JSON text).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RequestRow {
    pub id: i64,
    pub owner: String,
    pub points: String,
    pub filter: String,
    pub consumer: String,
    pub delivery: String,
    pub caplen: i64,
    pub anonymise: bool,
    pub start_ns: i64,
    pub stop_ns: i64,
    pub created_ns: i64,
    pub ended_ns: Option<i64>,
}

/// A row of `dpmi_filters`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FilterRow {
    pub position: i64,
    pub version: String,
    pub filter: String,
    pub consumers: String,
    pub requests: String,
    pub widened: bool,
    pub computed_ns: i64,
}

/// A row of `dpmi_deliveries`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DeliveryRow {
    pub point: String,
    pub consumer: String,
    pub delivered: i64,
    pub bytes: i64,
    pub dropped_full: i64,
    pub dropped_disconnected: i64,
    pub connected: bool,
    pub error: Option<String>,
    pub updated_ns: i64,
}

type RequestTuple = (
    i64,
    String,
    String,
    String,
    String,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    Option<i64>,
);

const REQUEST_COLUMNS: &str = "id, owner, points, filter, consumer, delivery, caplen, anonymise, \
                               start_ns, stop_ns, created_ns, ended_ns";

fn request(t: RequestTuple) -> RequestRow {
    RequestRow {
        id: t.0,
        owner: t.1,
        points: t.2,
        filter: t.3,
        consumer: t.4,
        delivery: t.5,
        caplen: t.6,
        anonymise: t.7 != 0,
        start_ns: t.8,
        stop_ns: t.9,
        created_ns: t.10,
        ended_ns: t.11,
    }
}

impl Db {
    /// Registers a point, or updates what it says of itself.
    pub async fn upsert_dpmi_point(&self, p: &PointRow) -> Result<(), sqlx::Error> {
        let q = "INSERT INTO dpmi_points (name, interface, max_filters, max_caplen, registered_ns, seen_ns) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO UPDATE SET \
                 interface = excluded.interface, max_filters = excluded.max_filters, \
                 max_caplen = excluded.max_caplen, seen_ns = excluded.seen_ns, \
                 installed_version = NULL, install_error = NULL";
        on_pool!(self, pool, D => sqlx::query(q)
            .bind(&p.name)
            .bind(&p.interface)
            .bind(p.max_filters)
            .bind(p.max_caplen)
            .bind(p.registered_ns)
            .bind(p.seen_ns)
            .execute(pool)
            .await
            .map(|_| ()))
    }

    /// Every registered point, by name.
    pub async fn dpmi_points(&self) -> Result<Vec<PointRow>, sqlx::Error> {
        let q = "SELECT name, interface, max_filters, max_caplen, registered_ns, seen_ns, \
                 installed_version, install_error, frames, matched, kernel_drops FROM dpmi_points ORDER BY name";
        type Row = (
            String,
            String,
            i64,
            i64,
            i64,
            i64,
            Option<String>,
            Option<String>,
            i64,
            i64,
            i64,
        );
        let rows: Vec<Row> = on_pool!(self, pool, D => sqlx::query_as(q).fetch_all(pool).await)?;
        Ok(rows
            .into_iter()
            .map(|r| PointRow {
                name: r.0,
                interface: r.1,
                max_filters: r.2,
                max_caplen: r.3,
                registered_ns: r.4,
                seen_ns: r.5,
                installed_version: r.6,
                install_error: r.7,
                frames: r.8,
                matched: r.9,
                kernel_drops: r.10,
            })
            .collect())
    }

    /// Records what a point last said of its filter list.
    pub async fn set_dpmi_point_status(
        &self,
        name: &str,
        status: &PointStatus<'_>,
        seen_ns: i64,
    ) -> Result<(), sqlx::Error> {
        let q = "UPDATE dpmi_points SET installed_version = $2, install_error = $3, seen_ns = $4, \
                 frames = $5, matched = $6, kernel_drops = $7 WHERE name = $1";
        on_pool!(self, pool, D => sqlx::query(q)
            .bind(name)
            .bind(status.installed_version)
            .bind(status.install_error)
            .bind(seen_ns)
            .bind(status.frames)
            .bind(status.matched)
            .bind(status.kernel_drops)
            .execute(pool)
            .await
            .map(|_| ()))
    }

    /// Stores a new request (its `id` is ignored); returns its id.
    pub async fn insert_dpmi_request(&self, r: &RequestRow) -> Result<i64, sqlx::Error> {
        let q = "INSERT INTO dpmi_requests (owner, points, filter, consumer, delivery, caplen, anonymise, \
                 start_ns, stop_ns, created_ns) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id";
        let (id,): (i64,) = on_pool!(self, pool, D => sqlx::query_as(q)
            .bind(&r.owner)
            .bind(&r.points)
            .bind(&r.filter)
            .bind(&r.consumer)
            .bind(&r.delivery)
            .bind(r.caplen)
            .bind(i64::from(r.anonymise))
            .bind(r.start_ns)
            .bind(r.stop_ns)
            .bind(r.created_ns)
            .fetch_one(pool)
            .await)?;
        Ok(id)
    }

    /// Requests not ended and not past their stop at `now_ns` (active or
    /// still to start), oldest first.
    pub async fn dpmi_requests_live(&self, now_ns: i64) -> Result<Vec<RequestRow>, sqlx::Error> {
        let q = format!(
            "SELECT {REQUEST_COLUMNS} FROM dpmi_requests WHERE ended_ns IS NULL AND stop_ns > $1 ORDER BY id"
        );
        let rows: Vec<RequestTuple> =
            on_pool!(self, pool, D => sqlx::query_as(&q).bind(now_ns).fetch_all(pool).await)?;
        Ok(rows.into_iter().map(request).collect())
    }

    /// The last `limit` requests of `owner`, newest first.
    pub async fn dpmi_requests_of(
        &self,
        owner: &str,
        limit: i64,
    ) -> Result<Vec<RequestRow>, sqlx::Error> {
        let q = format!(
            "SELECT {REQUEST_COLUMNS} FROM dpmi_requests WHERE owner = $1 ORDER BY id DESC LIMIT $2"
        );
        let rows: Vec<RequestTuple> = on_pool!(self, pool, D => sqlx::query_as(&q)
            .bind(owner)
            .bind(limit)
            .fetch_all(pool)
            .await)?;
        Ok(rows.into_iter().map(request).collect())
    }

    /// One request by id.
    pub async fn dpmi_request(&self, id: i64) -> Result<Option<RequestRow>, sqlx::Error> {
        let q = format!("SELECT {REQUEST_COLUMNS} FROM dpmi_requests WHERE id = $1");
        let row: Option<RequestTuple> =
            on_pool!(self, pool, D => sqlx::query_as(&q).bind(id).fetch_optional(pool).await)?;
        Ok(row.map(request))
    }

    /// Ends a request at `now_ns` (no effect on one already ended).
    pub async fn end_dpmi_request(&self, id: i64, now_ns: i64) -> Result<bool, sqlx::Error> {
        let q = "UPDATE dpmi_requests SET ended_ns = $2 WHERE id = $1 AND ended_ns IS NULL";
        on_pool!(self, pool, D => sqlx::query(q)
            .bind(id)
            .bind(now_ns)
            .execute(pool)
            .await
            .map(|r| r.rows_affected() == 1))
    }

    /// The filter list stored for `point`, in order.
    pub async fn dpmi_filters(&self, point: &str) -> Result<Vec<FilterRow>, sqlx::Error> {
        let q = "SELECT position, version, filter, consumers, requests, widened, computed_ns \
                 FROM dpmi_filters WHERE point = $1 ORDER BY position";
        type Row = (i64, String, String, String, String, i64, i64);
        let rows: Vec<Row> =
            on_pool!(self, pool, D => sqlx::query_as(q).bind(point).fetch_all(pool).await)?;
        Ok(rows
            .into_iter()
            .map(|r| FilterRow {
                position: r.0,
                version: r.1,
                filter: r.2,
                consumers: r.3,
                requests: r.4,
                widened: r.5 != 0,
                computed_ns: r.6,
            })
            .collect())
    }

    /// Replaces the filter list of `point` with `rows`, in one transaction.
    pub async fn replace_dpmi_filters(
        &self,
        point: &str,
        rows: &[FilterRow],
    ) -> Result<(), sqlx::Error> {
        on_pool!(self, pool, D => {
            let mut tx = pool.begin().await?;
            sqlx::query::<D>("DELETE FROM dpmi_filters WHERE point = $1")
                .bind(point)
                .execute(&mut *tx)
                .await?;
            for r in rows {
                sqlx::query::<D>(
                    "INSERT INTO dpmi_filters (point, position, version, filter, consumers, requests, widened, computed_ns) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(point)
                .bind(r.position)
                .bind(&r.version)
                .bind(&r.filter)
                .bind(&r.consumers)
                .bind(&r.requests)
                .bind(i64::from(r.widened))
                .bind(r.computed_ns)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await
        })
    }

    /// Stores what a point reported of its consumers.
    pub async fn upsert_dpmi_deliveries(&self, rows: &[DeliveryRow]) -> Result<(), sqlx::Error> {
        let q = "INSERT INTO dpmi_deliveries (point, consumer, delivered, bytes, dropped_full, \
                 dropped_disconnected, connected, error, updated_ns) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (point, consumer) DO UPDATE SET delivered = excluded.delivered, \
                 bytes = excluded.bytes, dropped_full = excluded.dropped_full, \
                 dropped_disconnected = excluded.dropped_disconnected, connected = excluded.connected, \
                 error = excluded.error, updated_ns = excluded.updated_ns";
        for r in rows {
            on_pool!(self, pool, D => sqlx::query(q)
                .bind(&r.point)
                .bind(&r.consumer)
                .bind(r.delivered)
                .bind(r.bytes)
                .bind(r.dropped_full)
                .bind(r.dropped_disconnected)
                .bind(i64::from(r.connected))
                .bind(&r.error)
                .bind(r.updated_ns)
                .execute(pool)
                .await
                .map(|_| ()))?;
        }
        Ok(())
    }

    /// What the points delivered to `consumer`, by point.
    pub async fn dpmi_deliveries(&self, consumer: &str) -> Result<Vec<DeliveryRow>, sqlx::Error> {
        let q = "SELECT point, consumer, delivered, bytes, dropped_full, dropped_disconnected, connected, \
                 error, updated_ns FROM dpmi_deliveries WHERE consumer = $1 ORDER BY point";
        type Row = (String, String, i64, i64, i64, i64, i64, Option<String>, i64);
        let rows: Vec<Row> =
            on_pool!(self, pool, D => sqlx::query_as(q).bind(consumer).fetch_all(pool).await)?;
        Ok(rows
            .into_iter()
            .map(|r| DeliveryRow {
                point: r.0,
                consumer: r.1,
                delivered: r.2,
                bytes: r.3,
                dropped_full: r.4,
                dropped_disconnected: r.5,
                connected: r.6 != 0,
                error: r.7,
                updated_ns: r.8,
            })
            .collect())
    }
}
