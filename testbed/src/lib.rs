//! # qosloop-testbed
//!
//! Where qosloop is run for real: the test harness that starts PostgreSQL,
//! slapd and network namespaces for every crate's tests ([`harness`]), and —
//! as the loop grows — topologies, traffic, the paper's experiments and the
//! benchmarks against peers. `qosloop-testbed` is its command line.

pub mod bench;
pub mod dicap;
pub mod harness;
pub mod loss;
pub mod paper;
pub mod plot;
pub mod procs;
pub mod reconfig;
pub mod selfcheck;
pub mod topology;
pub mod traffic;
pub mod user_traffic;
