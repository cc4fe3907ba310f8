//! # qosloop-policy-server
//!
//! The brain of the loop (`seeds/004` §IV, DESIGN.md §5–6). It owns:
//!
//! - the bandwidth manager ([`bandwidth`], [`store`]): every interval it
//!   reads the flow records stored since the last poll, computes per policed
//!   flow and per link the rate and its EWMA, and stores them (`rates`);
//! - the decision engine ([`engine`]): `seeds/004` Fig. 8 with hysteresis,
//!   every change stored with its reason (`decisions`);
//! - the PDP ([`pdp`]): COPS (RFC 2748, codec in `qosloop_schema::cops`) on
//!   3288/tcp; enforcers open, synchronise, get their roles' decisions and
//!   report (`enforcers`, `enforcement_reports`);
//! - the daemon that ties them together ([`server`]), its configuration
//!   ([`config`]), its web API and live page ([`web`]) and the console API
//!   under `/api/v1` ([`console`]), who may use them ([`auth`]: bearer
//!   tokens, admin for every state change, scopes, CORS), and `/metrics`
//!   ([`metrics`]);
//! - the static user ↔ address mappings of the repository written to the
//!   knowledge base ([`kb_static`]), and the knowledge base's rate
//!   threshold events ([`rate_thresholds`]).
//!
//! It does not own the policy repository's parsing (LDAP/LDIF → `PolicySet`,
//! module `repo`), the kernel, or the flow records' ingest.

pub mod auth;
pub mod bandwidth;
pub mod cluster_rates;
pub mod config;
pub mod console;
pub mod dpmi;
pub mod engine;
pub mod kb_static;
pub mod metrics;
pub mod pdp;
pub mod rate_thresholds;
pub mod repo;
pub mod server;
pub mod store;
pub mod subjects;
pub mod testing;
pub mod web;
/// The window arithmetic, shared with the collector cluster.
pub use qosloop_schema::bandwidth::window;

pub use bandwidth::{BandwidthManager, Rates, SubjectRate};
pub use config::{Config, ConfigError};
pub use engine::{DecisionTable, Engine};
pub use pdp::{Pdp, PdpConfig, PdpEvent};
pub use server::{Server, ServerHandle};
pub use store::{FlowCursor, Store, StoreError};
