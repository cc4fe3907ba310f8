//! The meter's integration tests: the binary and library against real captures,
//! peers (tshark, softflowd, nfcapd) and the kernel. One binary, one module per
//! concern.

// Tests: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent;
mod agent_common;
mod agent_limits;
mod agent_nft;
mod cli;
mod deploy;
mod export;
mod ipfix_interop;
mod live;
mod metrics;
mod tshark;
