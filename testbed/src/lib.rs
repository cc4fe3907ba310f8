//! # qosloop-testbed
//!
//! Where qosloop is run for real, all daemons together: topologies, the
//! paper's experiments, the benchmarks against peers, and (in `tests/`) every
//! test that runs or links more than one daemon. The services and traffic
//! tools it runs on come from `qosloop-testkit` (re-exported here as
//! [`harness`], [`traffic`], [`user_traffic`]). `qosloop-testbed` is its
//! command line.

pub mod bench;
pub mod dicap;
pub mod loss;
pub mod paper;
pub mod plot;
pub mod procs;
pub mod reconfig;
pub mod selfcheck;
pub mod topology;

// The test kit's services and traffic tools, used by the experiments and
// benchmarks as by the tests.
pub use qosloop_testkit::{harness, need, traffic, user_traffic};
