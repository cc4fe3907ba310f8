//! The exporter's integration tests against fake and unhelpful collectors: one binary.

// Tests: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod ipfix_transport;
mod unhelpful_collector;
