//! The store's integration tests against real SQLite and PostgreSQL: one
//! binary, one module per concern.

// Tests: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cluster;
mod dpmi;
mod frozen;
mod kb;
mod retention;
mod rollup;
mod stitch;
mod tables;
