//! eBPF programs: load (with the verifier's log on refusal), attach to a
//! cgroup, run-time statistics.

use crate::sys;
use crate::BpfError;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// Program types used in this workspace (`enum bpf_prog_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgType {
    SocketFilter = 1,
    SchedCls = 3,
    CgroupSkb = 8,
    CgroupSock = 9,
}

/// Attach points (`enum bpf_attach_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachType {
    CgroupInetIngress = 0,
    CgroupInetEgress = 1,
    CgroupInetSockCreate = 2,
    CgroupInet4PostBind = 12,
    CgroupInet6PostBind = 13,
}

/// `BPF_F_ALLOW_MULTI`: several programs on one cgroup hook, each run
/// (systemd keeps its own on the root).
pub const ATTACH_ALLOW_MULTI: u32 = 1 << 1;

/// A loaded program.
#[derive(Debug)]
pub struct Program {
    fd: OwnedFd,
    name: String,
}

/// What the kernel says about a program; `run_time_ns` and `run_cnt` grow
/// only while run-time statistics are on ([`enable_run_time_stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProgInfo {
    pub id: u32,
    pub run_time_ns: u64,
    pub run_cnt: u64,
    /// Instructions after the verifier's rewrites (inlined helpers,
    /// context accesses): what the JIT compiled.
    pub xlated_insns: u32,
    /// Bytes of machine code (0 without the JIT).
    pub jited_bytes: u32,
}

impl Program {
    /// Loads `insns` (as [`crate::Asm::finish`] gives them). Programs that
    /// need it (cgroup sock hooks) name their attach point at load time.
    pub fn load(
        prog_type: ProgType,
        expected_attach: Option<AttachType>,
        insns: &[u8],
        name: &str,
    ) -> Result<Program, BpfError> {
        let fd = sys::prog_load(&sys::LoadAttr {
            prog_type: prog_type as u32,
            expected_attach_type: expected_attach.map_or(0, |a| a as u32),
            insns,
            name,
        })?;
        Ok(Program {
            fd,
            name: name.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Attaches to the cgroup open at `cgroup` (a directory descriptor of
    /// the cgroup v2 hierarchy) with `flags` (e.g. [`ATTACH_ALLOW_MULTI`]).
    /// The attachment outlives this process until [`Program::detach`].
    pub fn attach(
        &self,
        cgroup: BorrowedFd<'_>,
        attach: AttachType,
        flags: u32,
    ) -> Result<(), BpfError> {
        sys::prog_attach(cgroup, self.fd.as_fd(), attach as u32, flags)
    }

    /// Undoes [`Program::attach`].
    pub fn detach(&self, cgroup: BorrowedFd<'_>, attach: AttachType) -> Result<(), BpfError> {
        sys::prog_detach(cgroup, self.fd.as_fd(), attach as u32)
    }

    /// Attaches through a link (`BPF_LINK_CREATE`), which coexists with
    /// `BPF_F_ALLOW_MULTI` attachments and is undone when the returned link
    /// closes — also when the process dies, so a crashed agent leaves no
    /// program behind.
    pub fn link(&self, cgroup: BorrowedFd<'_>, attach: AttachType) -> Result<CgroupLink, BpfError> {
        let fd = sys::link_create(self.fd.as_fd(), cgroup, attach as u32)?;
        Ok(CgroupLink { fd })
    }

    /// Id and run-time statistics.
    pub fn info(&self) -> Result<ProgInfo, BpfError> {
        let mut info = [0u8; 224];
        sys::obj_info(self.fd.as_fd(), &mut info)?;
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&info[at..at + 8]);
            u64::from_ne_bytes(b)
        };
        Ok(ProgInfo {
            id: u32::from_ne_bytes([info[4], info[5], info[6], info[7]]),
            run_time_ns: u64_at(192),
            run_cnt: u64_at(200),
            xlated_insns: u32::from_ne_bytes([info[20], info[21], info[22], info[23]]) / 8,
            jited_bytes: u32::from_ne_bytes([info[16], info[17], info[18], info[19]]),
        })
    }

    /// The instructions as the verifier rewrote them (8 bytes each, the
    /// kernel's layout; map addresses blanked unless the caller may see
    /// kernel pointers).
    pub fn xlated(&self) -> Result<Vec<u8>, BpfError> {
        let len = self.info()?.xlated_insns as usize * 8;
        let mut insns = vec![0u8; len];
        let mut info = [0u8; 224];
        info[20..24].copy_from_slice(&(len as u32).to_ne_bytes());
        info[32..40].copy_from_slice(&(insns.as_mut_ptr() as u64).to_ne_bytes());
        sys::obj_info(self.fd.as_fd(), &mut info)?;
        let got = u32::from_ne_bytes([info[20], info[21], info[22], info[23]]) as usize;
        insns.truncate(got.min(len));
        Ok(insns)
    }
}

/// A program attached to a cgroup through a link; dropping it detaches,
/// unless the link is pinned (then removing the pin and every descriptor
/// detaches it).
#[derive(Debug)]
pub struct CgroupLink {
    fd: OwnedFd,
}

impl CgroupLink {
    /// Pins the link at `path` in a bpffs: the program stays attached after
    /// this process exits (or is killed) until the pin is removed.
    pub fn pin(&self, path: &std::path::Path) -> Result<(), BpfError> {
        sys::obj_pin(self.fd.as_fd(), path)
    }

    /// Opens a link pinned at `path` (by [`CgroupLink::pin`]).
    pub fn from_pinned(path: &std::path::Path) -> Result<CgroupLink, BpfError> {
        Ok(CgroupLink {
            fd: sys::obj_get(path)?,
        })
    }
}

/// Turns on the kernel's per-program run time and run count
/// (`BPF_ENABLE_STATS`, `BPF_STATS_RUN_TIME`) for as long as the returned
/// descriptor is open.
pub fn enable_run_time_stats() -> Result<OwnedFd, BpfError> {
    sys::enable_stats()
}

impl From<Program> for OwnedFd {
    fn from(p: Program) -> OwnedFd {
        p.fd
    }
}

impl Program {
    /// Attaches this socket-filter program to `sock` (`SO_ATTACH_BPF`).
    pub fn attach_to_socket(&self, sock: BorrowedFd<'_>) -> std::io::Result<()> {
        sys::attach_socket_filter(sock, self.fd.as_fd())
    }
}
