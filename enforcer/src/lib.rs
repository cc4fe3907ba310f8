//! # qosloop-enforcer
//!
//! The policy enforcement point of the qosloop loop: it turns decisions
//! (`qosloop_schema::Decision`) into kernel objects on one interface and
//! keeps them there.
//!
//! It owns exactly two things per managed interface and never touches
//! anything else: an HTB root qdisc with its own handle (`e5:` unless
//! configured) and the nftables table `inet qosloop_<interface>`. Per
//! decision it renders an out-of-profile HTB class (in-profile classes are
//! shared per group), a named `limit` object — the flow's meter, kept across
//! decision changes — and one chain that marks in-profile packets, accepts /
//! re-marks / drops out-of-profile ones and steers both into their classes
//! with `meta priority set`; packets reach the chain through an element of
//! a verdict map keyed on the flow, so classification costs the same with
//! one decision or fifty thousand (see [`render`] for the
//! exact layout).
//!
//! nftables statements are typed ([`nft::model`]): one encoder into
//! nf_tables netlink ([`nft::encode`], sent by [`nfnl`]), `Display` for the
//! `nft -f` text of `--dry-run` and the `nft list table` listing, and an
//! in-memory table ([`nft::fake`]) that executes them for unit tests. A
//! change is a plan (the difference between desired and applied state, with
//! its undo) computed without touching the kernel, then run: a shape-rate
//! change is one `RTM_NEWTCLASS` message and never touches nftables;
//! nftables changes are one atomic transaction per change; a change that the
//! kernel refuses is undone, so a decision is applied whole or not at all.
//! HTB is programmed over rtnetlink with hand-encoded messages
//! ([`tc`]); every netlink receive has a timeout.
//!
//! Everything that touches the kernel sits behind [`KernelBackend`]: the real
//! [`LinuxBackend`], a [`DryRunBackend`] that prints the operations, and the
//! in-memory [`FakeKernel`] of the unit tests.

mod backend;
mod bpf;
pub mod cli;
mod config;
mod enforcer;
mod error;
pub mod metrics;
mod netlink;
pub mod nfnl;
pub mod nft;
mod pep;
pub mod probe;
pub mod render;
mod rtnl;
pub mod status;
mod sys;
pub mod tc;

pub use backend::{DryRunBackend, FakeKernel, FakeTable, KernelBackend, LinuxBackend};
pub use config::{Config, ConfigError};
pub use enforcer::{
    cleanup, ApplySummary, Enforcer, EnforcerConfig, StartReport, DEFAULT_QDISC_MAJOR,
};
pub use error::EnforceError;
pub use nft::{ChainState, TableState};
pub use render::{bucket_bytes, meter_burst_bytes};
