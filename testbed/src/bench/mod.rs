//! Benchmarks against peers, each measured side by side with the peer in the
//! same run and reported as ratios (`qosloop-testbed bench …`).

pub mod agent;
pub mod api;
pub mod cluster;
pub mod enforce;
pub mod export;
pub mod ipfix;
pub mod ipfix_ladder;
pub mod kb;
pub mod meter;
