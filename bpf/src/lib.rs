//! # qosloop-bpf
//!
//! The raw `bpf(2)` layer shared by the enforcer (its cls_bpf steering
//! program) and the meter's host agent (cgroup socket accounting). No
//! clang, no libbpf, no BTF: programs are assembled by hand with [`Asm`]
//! (eBPF instructions with labelled jumps) and loaded with the verifier's
//! log kept for the error.
//!
//! What it owns:
//! - instruction encoding ([`Insn`], [`Asm`], the register and helper numbers
//!   the programs of this workspace use);
//! - maps ([`Map`]): create, lookup, update, delete, next key, batched
//!   lookup-and-delete, per-CPU values;
//! - programs ([`Program`]): load with verifier log, cgroup attach with
//!   `BPF_F_ALLOW_MULTI` and detach, cgroup links (detached when the last
//!   descriptor closes), run-time statistics (`BPF_ENABLE_STATS`);
//! - pinning in a bpffs ([`Map::pin`], [`Map::from_pinned`]).
//!
//! What it does not: decide what a program does (the enforcer and the meter
//! write their own), or mount bpffs.
//!
//! The only `unsafe` is the syscall itself and adopting the descriptors it
//! returns, in the private `sys` module.

mod insn;
mod map;
mod prog;
mod sys;

pub use insn::{helper, reg, Alu, Asm, AsmError, Cond, Insn, Size};
pub use map::{possible_cpus, Map, MapType};
pub use prog::{
    enable_run_time_stats, AttachType, CgroupLink, ProgInfo, ProgType, Program, ATTACH_ALLOW_MULTI,
};

/// A refused `bpf(2)` command: which command, the errno, and the verifier's
/// log for a refused program.
#[derive(Debug, thiserror::Error)]
#[error("bpf({command}): {source}{}", if .log.is_empty() { String::new() } else { format!(": {}", .log) })]
pub struct BpfError {
    pub command: &'static str,
    #[source]
    pub source: std::io::Error,
    /// The verifier's log (BPF_PROG_LOAD only), trimmed.
    pub log: String,
}

impl BpfError {
    pub(crate) fn last(command: &'static str) -> BpfError {
        BpfError::io(command, std::io::Error::last_os_error())
    }

    /// An error found before or without a system call (no errno, no log).
    pub(crate) fn io(command: &'static str, source: std::io::Error) -> BpfError {
        BpfError {
            command,
            source,
            log: String::new(),
        }
    }

    /// The errno, for callers that tell "not found" from "map full".
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

/// Returns once every program run that began before the call has returned.
/// Programs run inside RCU read-side sections, and this waits for an RCU
/// grace period (`membarrier(MEMBARRIER_CMD_GLOBAL)`). A run in process
/// context can be preempted for longer than any fixed sleep on a busy host,
/// so a map that programs stopped choosing (an epoch flipped) is only
/// frozen once this returns. Fails where the kernel refuses the command
/// (`nohz_full` CPUs); the caller then has no such guarantee.
pub fn wait_for_running_programs() -> Result<(), BpfError> {
    sys::membarrier_global()
}

/// Now on the clock of `bpf_ktime_get_ns` (`CLOCK_MONOTONIC`, ns), to turn
/// times programs record into wall-clock times.
pub fn ktime_ns() -> u64 {
    sys::monotonic_ns()
}
