//! # qosloop-collector
//!
//! The collector node: it accepts records from exporters (qosloop's
//! CRANE-style protocol; IPFIX and NetFlow from standard exporters), stores
//! them in SQL — SQLite embedded or PostgreSQL — and acknowledges only what
//! is committed. It owns the database connection and the migrations that
//! bring a database to qosloop's schema; the schema itself lives in
//! `qosloop-schema`.

mod db;

pub use db::{now_ns, redact, Db, DbError};
