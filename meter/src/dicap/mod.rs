//! DiCAP (`seeds/000` §IV): several capture nodes receive a copy of the
//! same traffic and each analyses only its share, so that together they
//! analyse every packet exactly once.
//!
//! - [`share`]: the share as a classic BPF socket filter over a hash of
//!   header fields (per flow, symmetric; or per packet, by IPv4 id), and
//!   the same hash in Rust.
//! - [`assign`]: which node owns which of the 64 buckets (pure).
//! - [`proto`]: the framed JSON protocol between nodes and coordinator.
//! - [`coordinator`]: assigns shares, detects lost nodes (closed connection
//!   or missed heartbeats) and failed installs, reassigns (make before
//!   break on a join), and measures the uncovered and duplicate windows.
//! - [`node`]: a node's control loop (reconnecting, keeping its share) and
//!   counters.
//! - [`merge`]: per-packet shares split flows; the merge that makes their
//!   totals exact again (`qosloop_schema::merge`, re-exported here; the
//!   collector cluster's `stitch` analysis calls it).

pub mod assign;
pub mod cli;
pub mod coordinator;
pub mod node;
pub mod proto;
pub mod share;

#[cfg(test)]
mod guard_tests;
#[cfg(test)]
mod handover_tests;

pub use coordinator::{
    run_coordinator, run_coordinator_with, CoordinatorLimits, CoordinatorSummary, Event,
};
pub use node::{reject_all, run_node, NodeConfig, NodeCounters, NodeError, NodeStats};
/// The pure merge of per-packet parts lives with the contracts
/// (`qosloop_schema::merge`): the collector's `stitch` analysis calls it too.
pub use qosloop_schema::merge::{self, merge};
pub use share::{bucket_of, share_program, ShareMode, BUCKETS};
