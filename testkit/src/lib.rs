//! # qosloop-testkit
//!
//! What qosloop's tests share, and nothing that belongs to a daemon: the
//! real services they start ([`harness`]: PostgreSQL and slapd in temporary
//! directories, network namespaces and veth pairs, test users, the test
//! PKI, prerequisite checks and [`need!`]), the daemons' binaries found as
//! cargo built them ([`component`]), traffic sources and sinks for kernel
//! tests ([`traffic`], [`user_traffic`], [`inprofile`]), packet and capture
//! builders ([`frames`]), the IPFIX test messages and SQLite readers of
//! the ingest tests ([`ipfix`]), the one HTTP client of the tests
//! ([`http`]), and the strict reader of the daemons' `/metrics`
//! ([`metrics`]).
//!
//! It depends on `qosloop-schema` and `qosloop-runtime` only: every daemon crate dev-depends on
//! it, and tests that run more than one daemon live in `qosloop-testbed`,
//! so the dependency graph (dev-dependencies included) points one way.

pub mod frames;
pub mod harness;
pub mod http;
pub mod inprofile;
pub mod ipfix;
pub mod metrics;
pub mod traffic;
pub mod user_traffic;

use std::path::{Path, PathBuf};

/// The path of a workspace binary (`qosloop-collector`, …) as cargo built
/// it: next to the running executable, or one level up from a test binary
/// in `deps/`. Cargo builds a package's binaries before its integration
/// tests; a test of another package needs the workspace built
/// (`cargo nextest run --workspace` or `cargo build --workspace`).
pub fn component(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current executable: {e}"))?;
    let dirs = [exe.parent(), exe.parent().and_then(Path::parent)];
    dirs.iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "{name} not found next to {}: build the workspace's binaries first (cargo build --workspace)",
                exe.display()
            )
        })
}
