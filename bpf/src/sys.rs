//! The `bpf(2)` system call. Each function builds one `union bpf_attr`
//! from borrowed buffers and calls the kernel while they are alive; it is
//! the only module with `unsafe`.
#![allow(unsafe_code)]

use crate::BpfError;
use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

const MAP_CREATE: i64 = 0;
const MAP_LOOKUP_ELEM: i64 = 1;
const MAP_UPDATE_ELEM: i64 = 2;
const MAP_DELETE_ELEM: i64 = 3;
const MAP_GET_NEXT_KEY: i64 = 4;
const PROG_LOAD: i64 = 5;
const OBJ_PIN: i64 = 6;
const OBJ_GET: i64 = 7;
const PROG_ATTACH: i64 = 8;
const PROG_DETACH: i64 = 9;
const OBJ_GET_INFO_BY_FD: i64 = 15;
const MAP_LOOKUP_BATCH: i64 = 24;
const MAP_LOOKUP_AND_DELETE_BATCH: i64 = 25;
const LINK_CREATE: i64 = 28;
const ENABLE_STATS: i64 = 32;

fn ptr<T>(p: *const T) -> [u8; 8] {
    (p as u64).to_ne_bytes()
}

fn put(attr: &mut [u8], at: usize, bytes: &[u8]) {
    attr[at..at + bytes.len()].copy_from_slice(bytes);
}

/// Calls `bpf(cmd, attr, size)`.
///
/// SAFETY contract (kept by every caller in this module): each pointer
/// written into `attr` points into a buffer that outlives the call and is
/// as large as the length the same `attr` gives the kernel for it.
fn call(cmd: i64, attr: &mut [u8], name: &'static str) -> Result<i64, BpfError> {
    // SAFETY: see the contract above; `attr` itself is valid for its length.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(BpfError::last(name))
    } else {
        Ok(rc)
    }
}

fn call_fd(cmd: i64, attr: &mut [u8], name: &'static str) -> Result<OwnedFd, BpfError> {
    let raw = call(cmd, attr, name)?;
    // SAFETY: a successful command of this kind returns a fresh descriptor
    // that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
}

pub(crate) fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
    name: &str,
) -> Result<OwnedFd, BpfError> {
    let mut attr = [0u8; 72];
    put(&mut attr, 0, &map_type.to_ne_bytes());
    put(&mut attr, 4, &key_size.to_ne_bytes());
    put(&mut attr, 8, &value_size.to_ne_bytes());
    put(&mut attr, 12, &max_entries.to_ne_bytes());
    put(&mut attr, 16, &flags.to_ne_bytes());
    let name = name.as_bytes();
    put(&mut attr, 28, &name[..name.len().min(15)]);
    call_fd(MAP_CREATE, &mut attr, "BPF_MAP_CREATE")
}

/// Lookup, update, delete and next-key: `key` and `value` must have the
/// map's key and (user-space) value sizes, checked by the caller.
pub(crate) fn map_elem(
    fd: BorrowedFd<'_>,
    op: MapOp,
    key: Option<&[u8]>,
    value: Option<&mut [u8]>,
    flags: u64,
) -> Result<(), BpfError> {
    let (cmd, name) = match op {
        MapOp::Lookup => (MAP_LOOKUP_ELEM, "BPF_MAP_LOOKUP_ELEM"),
        MapOp::Update => (MAP_UPDATE_ELEM, "BPF_MAP_UPDATE_ELEM"),
        MapOp::Delete => (MAP_DELETE_ELEM, "BPF_MAP_DELETE_ELEM"),
        MapOp::NextKey => (MAP_GET_NEXT_KEY, "BPF_MAP_GET_NEXT_KEY"),
    };
    let mut attr = [0u8; 32];
    put(&mut attr, 0, &(fd.as_raw_fd() as u32).to_ne_bytes());
    if let Some(k) = key {
        put(&mut attr, 8, &ptr(k.as_ptr()));
    }
    if let Some(v) = value {
        put(&mut attr, 16, &ptr(v.as_mut_ptr()));
    }
    put(&mut attr, 24, &flags.to_ne_bytes());
    call(cmd, &mut attr, name).map(|_| ())
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum MapOp {
    Lookup,
    Update,
    Delete,
    NextKey,
}

/// `BPF_MAP_LOOKUP_AND_DELETE_BATCH` when `delete`, else
/// `BPF_MAP_LOOKUP_BATCH` (the entries stay): up to `keys.len() / key_size`
/// entries; returns how many came and whether the map is exhausted.
/// `in_batch`/`out_batch` are the kernel's opaque cursor (8 bytes for hash
/// maps).
pub(crate) fn map_batch(
    delete: bool,
    fd: BorrowedFd<'_>,
    in_batch: Option<&[u8; 8]>,
    out_batch: &mut [u8; 8],
    keys: &mut [u8],
    values: &mut [u8],
    count: u32,
) -> Result<(u32, bool), BpfError> {
    let (cmd, name) = if delete {
        (
            MAP_LOOKUP_AND_DELETE_BATCH,
            "BPF_MAP_LOOKUP_AND_DELETE_BATCH",
        )
    } else {
        (MAP_LOOKUP_BATCH, "BPF_MAP_LOOKUP_BATCH")
    };
    let mut attr = [0u8; 56];
    if let Some(b) = in_batch {
        put(&mut attr, 0, &ptr(b.as_ptr()));
    }
    put(&mut attr, 8, &ptr(out_batch.as_mut_ptr()));
    put(&mut attr, 16, &ptr(keys.as_mut_ptr()));
    put(&mut attr, 24, &ptr(values.as_mut_ptr()));
    put(&mut attr, 32, &count.to_ne_bytes());
    put(&mut attr, 36, &(fd.as_raw_fd() as u32).to_ne_bytes());
    match call(cmd, &mut attr, name) {
        Ok(_) => Ok((read_u32(&attr, 32), false)),
        // ENOENT: the last batch (possibly empty); the count says how many.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok((read_u32(&attr, 32), true)),
        Err(e) => Err(e),
    }
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) struct LoadAttr<'a> {
    pub prog_type: u32,
    pub expected_attach_type: u32,
    pub insns: &'a [u8],
    pub name: &'a str,
}

pub(crate) fn prog_load(a: &LoadAttr<'_>) -> Result<OwnedFd, BpfError> {
    let license = b"GPL\0";
    let mut log = vec![0u8; 1 << 16];
    let mut attr = [0u8; 128];
    put(&mut attr, 0, &a.prog_type.to_ne_bytes());
    put(&mut attr, 4, &((a.insns.len() / 8) as u32).to_ne_bytes());
    put(&mut attr, 8, &ptr(a.insns.as_ptr()));
    put(&mut attr, 16, &ptr(license.as_ptr()));
    // log_level 0 first: a log buffer that fills up makes the load fail.
    put(&mut attr, 48, &a.name.as_bytes()[..a.name.len().min(15)]);
    put(&mut attr, 68, &a.expected_attach_type.to_ne_bytes());
    match call_fd(PROG_LOAD, &mut attr, "BPF_PROG_LOAD") {
        Ok(fd) => Ok(fd),
        Err(first) => {
            // Again with the verifier's log, for the error.
            put(&mut attr, 24, &1u32.to_ne_bytes());
            put(&mut attr, 28, &(log.len() as u32).to_ne_bytes());
            put(&mut attr, 32, &ptr(log.as_mut_ptr()));
            match call_fd(PROG_LOAD, &mut attr, "BPF_PROG_LOAD") {
                Ok(fd) => Ok(fd),
                Err(mut e) => {
                    let text = log.split(|&c| c == 0).next().unwrap_or(&[]);
                    let text = String::from_utf8_lossy(text);
                    // The end of the log says why.
                    let lines: Vec<&str> = text.trim().lines().collect();
                    let tail = lines[lines.len().saturating_sub(12)..].join(" | ");
                    e.log = tail;
                    if e.log.is_empty() {
                        return Err(first);
                    }
                    Err(e)
                }
            }
        }
    }
}

pub(crate) fn obj_pin(fd: BorrowedFd<'_>, path: &std::path::Path) -> Result<(), BpfError> {
    let c = cpath(path, "BPF_OBJ_PIN")?;
    let mut attr = [0u8; 16];
    put(&mut attr, 0, &ptr(c.as_ptr()));
    put(&mut attr, 8, &(fd.as_raw_fd() as u32).to_ne_bytes());
    call(OBJ_PIN, &mut attr, "BPF_OBJ_PIN").map(|_| ())
}

pub(crate) fn obj_get(path: &std::path::Path) -> Result<OwnedFd, BpfError> {
    let c = cpath(path, "BPF_OBJ_GET")?;
    let mut attr = [0u8; 16];
    put(&mut attr, 0, &ptr(c.as_ptr()));
    call_fd(OBJ_GET, &mut attr, "BPF_OBJ_GET")
}

fn cpath(path: &std::path::Path, command: &'static str) -> Result<CString, BpfError> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        BpfError::io(
            command,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"),
        )
    })
}

pub(crate) fn prog_attach(
    target: BorrowedFd<'_>,
    prog: BorrowedFd<'_>,
    attach_type: u32,
    flags: u32,
) -> Result<(), BpfError> {
    let mut attr = [0u8; 20];
    put(&mut attr, 0, &(target.as_raw_fd() as u32).to_ne_bytes());
    put(&mut attr, 4, &(prog.as_raw_fd() as u32).to_ne_bytes());
    put(&mut attr, 8, &attach_type.to_ne_bytes());
    put(&mut attr, 12, &flags.to_ne_bytes());
    call(PROG_ATTACH, &mut attr, "BPF_PROG_ATTACH").map(|_| ())
}

pub(crate) fn prog_detach(
    target: BorrowedFd<'_>,
    prog: BorrowedFd<'_>,
    attach_type: u32,
) -> Result<(), BpfError> {
    let mut attr = [0u8; 20];
    put(&mut attr, 0, &(target.as_raw_fd() as u32).to_ne_bytes());
    put(&mut attr, 4, &(prog.as_raw_fd() as u32).to_ne_bytes());
    put(&mut attr, 8, &attach_type.to_ne_bytes());
    call(PROG_DETACH, &mut attr, "BPF_PROG_DETACH").map(|_| ())
}

pub(crate) fn link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
) -> Result<OwnedFd, BpfError> {
    let mut attr = [0u8; 64];
    put(&mut attr, 0, &(prog.as_raw_fd() as u32).to_ne_bytes());
    put(&mut attr, 4, &(target.as_raw_fd() as u32).to_ne_bytes());
    put(&mut attr, 8, &attach_type.to_ne_bytes());
    call_fd(LINK_CREATE, &mut attr, "BPF_LINK_CREATE")
}

/// `BPF_ENABLE_STATS(BPF_STATS_RUN_TIME)`: statistics run while the
/// returned descriptor is open.
pub(crate) fn enable_stats() -> Result<OwnedFd, BpfError> {
    let mut attr = [0u8; 8];
    call_fd(ENABLE_STATS, &mut attr, "BPF_ENABLE_STATS")
}

/// `BPF_OBJ_GET_INFO_BY_FD` into `info` (the kernel fills what it knows).
pub(crate) fn obj_info(fd: BorrowedFd<'_>, info: &mut [u8]) -> Result<(), BpfError> {
    let mut attr = [0u8; 16];
    put(&mut attr, 0, &(fd.as_raw_fd() as u32).to_ne_bytes());
    put(&mut attr, 4, &(info.len() as u32).to_ne_bytes());
    put(&mut attr, 8, &ptr(info.as_mut_ptr()));
    call(OBJ_GET_INFO_BY_FD, &mut attr, "BPF_OBJ_GET_INFO_BY_FD").map(|_| ())
}

/// `membarrier(MEMBARRIER_CMD_GLOBAL)`: the kernel runs `synchronize_rcu()`
/// (on more than one online CPU), so every RCU read-side section that began
/// before the call, a program run among them, has ended when it returns.
/// Refused (`EINVAL`) on kernels with `nohz_full` CPUs.
pub(crate) fn membarrier_global() -> Result<(), BpfError> {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes integer arguments only (command, flags, cpu).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            MEMBARRIER_CMD_GLOBAL,
            0 as libc::c_long,
            0 as libc::c_long,
        )
    };
    if rc < 0 {
        Err(BpfError::last("membarrier(MEMBARRIER_CMD_GLOBAL)"))
    } else {
        Ok(())
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `setsockopt(SO_ATTACH_BPF)`: runs `prog` (a socket filter) on every
/// packet `sock` receives.
pub(crate) fn attach_socket_filter(
    sock: BorrowedFd<'_>,
    prog: BorrowedFd<'_>,
) -> std::io::Result<()> {
    let fd: libc::c_int = prog.as_raw_fd();
    // SAFETY: `fd` lives across the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_BPF,
            std::ptr::addr_of!(fd).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}
