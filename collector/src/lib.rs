//! # qosloop-collector
//!
//! The collector node: it accepts records from exporters (qosloop's
//! CRANE-style protocol, `docs/protocol.md`), stores them in SQL — SQLite
//! embedded or PostgreSQL — and acknowledges only what is committed,
//! de-duplicating re-sent messages by (exporter, stream, seq). The database
//! handle, the migrations and the SQL of every table are `qosloop-store`'s;
//! the schema and the wire codec live in `qosloop-schema`.
//! It also takes IPFIX, NetFlow v9 and v5 from standard exporters over UDP
//! and TCP ([`ipfix`]) into the same `flows` table through the same writer.
//! Its counters are served for Prometheus by [`metrics`] (`--metrics`).

pub mod cluster;
mod cluster_stitch;
mod config;
pub mod ipfix;
pub mod journal;
pub mod maintenance;
pub mod metrics;
mod server;
mod session;
mod store;

pub use config::{Config, ConfigError, MAX_EXPORTER_NAME};
pub use server::{
    bind, open_sink, prepare_storage, serve, tls_acceptor, Collector, CollectorStats, ServerError,
};
pub use store::{
    spawn_writer, spawn_writer_tallied, spawn_writer_with, Batch, Outcome, Sink, TallyCell,
    WriteReq, WriterOptions,
};
