//! The policy server's integration tests: PDP, repository (LDIF, slapd),
//! console and web API, with real PostgreSQL, slapd and Chromium. Tests that
//! also run the meter, the collector or the enforcer live in qosloop-testbed.
//! One binary.

// Tests: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod auth;
mod browser;
mod cli;
mod cluster_rates;
mod common;
mod console;
mod console_hours;
mod console_stitched;
mod deploy;
mod events;
mod hostile_peers;
mod kb_rate_threshold;
mod kb_static;
mod loop_sql;
mod metrics;
mod pdp;
mod repo_file;
mod repo_ldap;
mod repo_ldif_props;
mod web;
