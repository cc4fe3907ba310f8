//! The enforcer's integration tests against the real kernel in namespaces the
//! tests create: one binary.

// Tests: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli;
mod deploy;
mod kernel;
mod metrics;
mod nft_model;
mod overlap;
mod pep;
mod per_user;
mod scale;
mod scale_support;
