//! # qosloop-runtime
//!
//! What every qosloop daemon needs from its process and its host, kept out
//! of the contracts crate (`qosloop-schema`, which reads no file) and out
//! of the daemons themselves so that each does it the same way:
//!
//! - [`tls`]: rustls client and server configurations built from PEM files
//!   (export: mutual authentication; COPS: server authentication with
//!   optional client certificates), and the name a peer's certificate gives
//!   it;
//! - [`telemetry`]: the `tracing` subscriber on standard error, as text or
//!   JSON lines;
//! - [`metrics`]: the Prometheus exposition of the daemons' counters (text
//!   format 0.0.4), the `--metrics HOST:PORT` responder and a strict
//!   reader for tests;
//! - [`digest`]: SHA-256 and a constant-time comparison, for the API's
//!   hashed bearer tokens.
//!
//! It owns no protocol and no storage: wire codecs live in `qosloop-schema`,
//! the database in `qosloop-store`.

pub mod digest;
pub mod metrics;
pub mod telemetry;
pub mod tls;
