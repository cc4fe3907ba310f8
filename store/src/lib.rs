//! # qosloop-store
//!
//! qosloop's storage layer: everything that reads or writes the SQL
//! database, for every process that does (the collector, the policy
//! server, the testbed).
//!
//! - [`Db`]: one handle over SQLite (embedded) or PostgreSQL, chosen by
//!   URL; [`Db::migrate`] brings either to the schema whose SQL is the
//!   contract in `qosloop_schema::sql` (`schema/sql/`).
//! - The dialect differences, once ([`dialect`](crate::Sql)): queries are
//!   written in the SQL both engines take, [`on_pool!`] runs one generic
//!   body on either pool, [`Sql`] spells the few fragments that differ.
//! - Typed reads and writes per table, as methods of [`Db`]: `flows` (the
//!   one mapping between a row and a [`qosloop_schema::FlowRecord`], the
//!   collector's batched write, the readers), `exporters`, `sessions`,
//!   `templates` and `data_messages`, `rates`, `decisions`, `enforcers`
//!   and `enforcement_reports`, `policy_audit`, the DPMI tables (`dpmi_*`), and the IPFIX counters
//!   (`ipfix_exporter_stats`, `ipfix_drops`, `ipfix_listeners`), and the
//!   collector cluster's tables (membership, ownership log, partial sums,
//!   fenced rate writes, the published policy; `docs/cluster.md`), and
//!   the cluster's `stitch` analysis (per-bucket cursors over `flows` by
//!   `(bucket, id)`, DiCAP's merge and both directions of a flow into
//!   `stitched_flows`, fenced like the rates).
//! - The real-time knowledge base (`kb_*`, `docs/kb.md`): host and user
//!   counters kept by the flow writer ([`Db::commit_batches_kb`]), user ↔
//!   address mappings (learned from agents, static from LDAP) with TTLs,
//!   enrichment of records without a user, events with their wake-ups
//!   ([`KbListener`]: LISTEN/NOTIFY, an in-process channel).
//! - `flows` bounded in time ([`Db::maintain_flows`]): daily partitions
//!   made ahead and dropped whole on PostgreSQL, chunked deletes on
//!   SQLite, safe with several collectors running it at once.
//!
//! It does not decide what to store or when: batching, retries and
//! acknowledgements are the collector's, rates and cursors the policy
//! server's. Errors are `sqlx::Error` as the engine gave them (with
//! [`is_transient`] saying whether trying again may help), and [`DbError`]
//! for connecting and migrating.

mod audit;
mod cluster;
mod db;
mod decisions;
mod dialect;
mod dpmi;
mod enforcers;
mod exporters;
mod flows;
mod ipfix;
mod kb;
mod migrate;
mod query;
mod rates;
mod retention;
mod stitch;

/// The sqlx the pools of [`Db`] belong to, for code that runs its own
/// queries (tests, the testbed's summaries) through [`on_pool!`].
pub use sqlx;

pub use cluster::{
    bucket_of, flow_bucket, rendezvous_owner, AnalysisKey, ClusterError, Epoch, Member, OwnerRate,
    Pruned, RoutingConfig, SubjectState, Tally,
};
pub use db::{now_ns, redact, Db, DbError, APPLICATION_NAME, FROZEN_COPY_AFTER};
pub use dialect::{is_lock_wait, is_transient, Dialect, Sql};
pub use dpmi::{DeliveryRow, FilterRow, PointRow, PointStatus, RequestRow};
pub use enforcers::EnforcerRow;
pub use flows::{Batch, FlowRow, Outcome, HOUR_NS, MINUTE_NS, ROLLUP_DIMS};
pub use ipfix::{
    tcp_exporter_name, udp_exporter_name, ExporterCounters, ListenerStats, StoredTemplate,
    TemplateUpdate,
};
pub use kb::{KbConfig, KbEvent, KbHost, KbListener, KbMapping, KbUser, Sweep, KB_CHANNEL};
pub use query::{Bind, Cells, Col};
pub use rates::RateRow;
pub use retention::{Maintenance, Retention, DAY_NS};
pub use stitch::{stitch, Biflow, Fence, Horizon, StitchStep, StitchedQuery, StitchedRow};
