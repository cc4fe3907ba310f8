//! The collector's own integration tests (the binary alone against real peers
//! and files); tests that also run the exporter or another daemon live in
//! qosloop-testbed. One binary.

// Tests: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod deploy;
mod ipfix_softflowd;
mod journal_crash;
