//! The one place with `unsafe`: an AF_PACKET socket with a TPACKET_V3
//! memory-mapped receive ring, PACKET_FANOUT, a classic BPF socket filter
//! and PACKET_STATISTICS. Everything above this module is safe code.
//!
//! Layouts follow `<linux/if_packet.h>`; the kernel hands blocks of packets
//! to user space by setting `TP_STATUS_USER` in a block's status and takes
//! a block back when user space writes `TP_STATUS_KERNEL`.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU32, Ordering};

const SOL_PACKET: libc::c_int = 263;
const PACKET_VERSION: libc::c_int = 10;
const PACKET_RX_RING: libc::c_int = 5;
const PACKET_STATISTICS: libc::c_int = 6;
const PACKET_FANOUT: libc::c_int = 18;
const TPACKET_V3: libc::c_int = 2;
const PACKET_FANOUT_HASH: u32 = 0;
const PACKET_FANOUT_FLAG_DEFRAG: u32 = 0x8000;
const TP_STATUS_KERNEL: u32 = 0;
const TP_STATUS_USER: u32 = 1;
const TP_STATUS_VLAN_VALID: u32 = 1 << 4;
const TP_STATUS_VLAN_TPID_VALID: u32 = 1 << 6;
const ETH_P_ALL: u16 = 0x0003;

#[repr(C)]
struct TpacketReq3 {
    tp_block_size: u32,
    tp_block_nr: u32,
    tp_frame_size: u32,
    tp_frame_nr: u32,
    tp_retire_blk_tov: u32,
    tp_sizeof_priv: u32,
    tp_feature_req_word: u32,
}

#[repr(C)]
#[derive(Default)]
struct TpacketStatsV3 {
    tp_packets: u32,
    tp_drops: u32,
    tp_freeze_q_cnt: u32,
}

/// Classic BPF opcodes (<linux/bpf_common.h>, <linux/filter.h>), for the
/// programs the meter builds.
pub(crate) mod op {
    pub const LD_W_ABS: u16 = 0x20;
    pub const LD_H_ABS: u16 = 0x28;
    pub const LD_B_ABS: u16 = 0x30;
    pub const LD_H_IND: u16 = 0x48;
    pub const LD_W_LEN: u16 = 0x80;
    pub const LD_IMM: u16 = 0x00;
    pub const LD_MEM: u16 = 0x60;
    pub const LDX_MEM: u16 = 0x61;
    pub const LDX_MSH: u16 = 0xb1;
    pub const ST: u16 = 0x02;
    pub const ADD_K: u16 = 0x04;
    pub const ADD_X: u16 = 0x0c;
    pub const SUB_K: u16 = 0x14;
    pub const MUL_K: u16 = 0x24;
    pub const RSH_K: u16 = 0x74;
    pub const RSH_X: u16 = 0x7c;
    pub const JA: u16 = 0x05;
    pub const AND_K: u16 = 0x54;
    pub const JEQ_K: u16 = 0x15;
    pub const JGE_K: u16 = 0x35;
    pub const JGE_X: u16 = 0x3d;
    pub const JSET_K: u16 = 0x45;
    pub const RET_K: u16 = 0x06;
    pub const TAX: u16 = 0x07;
}

/// One classic BPF instruction (`struct sock_filter`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BpfInsn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const BpfInsn,
}

/// Ring geometry.
#[derive(Debug, Clone, Copy)]
pub struct RingConfig {
    pub block_size: u32,
    pub block_count: u32,
    /// Milliseconds after which a partly filled block is handed over.
    pub block_timeout_ms: u32,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            block_size: 1 << 20,
            block_count: 32,
            block_timeout_ms: 50,
        }
    }
}

/// A packet in the ring: its bytes are valid until the block is released.
#[derive(Debug, Clone, Copy)]
pub struct RingPacket<'a> {
    pub ts_ns: u64,
    pub data: &'a [u8],
    pub wire_len: u32,
    /// The 802.1Q tag the kernel stripped, if any: (TPID, TCI).
    pub vlan: Option<(u16, u16)>,
}

/// An AF_PACKET socket bound to one interface with a TPACKET_V3 ring.
#[derive(Debug)]
pub struct PacketRing {
    fd: OwnedFd,
    map: *mut u8,
    map_len: usize,
    config: RingConfig,
    current: u32,
}

// SAFETY: the mapping is owned by this value alone and only touched through
// `&mut self`; moving it to another thread is sound.
unsafe impl Send for PacketRing {}

fn check(ret: libc::c_int, what: &str) -> io::Result<()> {
    if ret < 0 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(())
    }
}

fn setsockopt<T>(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
    what: &str,
) -> io::Result<()> {
    // SAFETY: `value` points to a live `T` of the size given.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    check(ret, what)
}

/// Attaches (or atomically replaces) the socket's classic BPF filter.
fn attach_filter(fd: &OwnedFd, prog: &[BpfInsn]) -> io::Result<()> {
    let fprog = SockFprog {
        len: u16::try_from(prog.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "BPF program too long"))?,
        filter: prog.as_ptr(),
    };
    setsockopt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_ATTACH_FILTER,
        &fprog,
        "SO_ATTACH_FILTER",
    )
    .map_err(|e| {
        if e.kind() == io::ErrorKind::OutOfMemory {
            io::Error::new(
                e.kind(),
                format!("{e} (the kernel refused the filter's socket memory: net.core.optmem_max)"),
            )
        } else {
            e
        }
    })
}

/// A second descriptor of a ring's socket, to swap its filter from another
/// thread while the ring runs: the kernel replaces the filter in one step,
/// so every packet meets either the old or the new program.
#[derive(Debug)]
pub struct FilterHandle {
    fd: OwnedFd,
}

impl FilterHandle {
    pub fn attach(&self, prog: &[BpfInsn]) -> io::Result<()> {
        attach_filter(&self.fd, prog)
    }
}

/// The index of an interface by name.
pub fn if_index(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name has a NUL"))?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface named {name:?}"),
        ));
    }
    Ok(idx)
}

impl PacketRing {
    /// Opens the socket, sets up the ring, attaches `filter`, binds to
    /// `ifindex` and joins fanout group `fanout` (if any).
    pub fn open(
        ifindex: u32,
        config: RingConfig,
        filter: Option<&[BpfInsn]>,
        fanout: Option<u16>,
    ) -> io::Result<PacketRing> {
        // SAFETY: plain syscall; the fd is owned right after.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::c_int::from(ETH_P_ALL.to_be()),
            )
        };
        check(raw, "socket(AF_PACKET)")?;
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // Filter first, so that no unfiltered packet reaches the ring.
        if let Some(prog) = filter {
            attach_filter(&fd, prog)?;
        }
        setsockopt(
            &fd,
            SOL_PACKET,
            PACKET_VERSION,
            &TPACKET_V3,
            "PACKET_VERSION",
        )?;
        let req = TpacketReq3 {
            tp_block_size: config.block_size,
            tp_block_nr: config.block_count,
            tp_frame_size: 2048,
            tp_frame_nr: config.block_size / 2048 * config.block_count,
            tp_retire_blk_tov: config.block_timeout_ms,
            tp_sizeof_priv: 0,
            tp_feature_req_word: 0,
        };
        setsockopt(&fd, SOL_PACKET, PACKET_RX_RING, &req, "PACKET_RX_RING")?;
        let map_len = config.block_size as usize * config.block_count as usize;
        // SAFETY: maps the ring the kernel just allocated for this socket.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("mmap of the packet ring: {e}"),
            ));
        }
        let ring = PacketRing {
            fd,
            map: map.cast(),
            map_len,
            config,
            current: 0,
        };
        // SAFETY: zeroed sockaddr_ll is a valid value; fields set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_ALL.to_be();
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: `addr` is a live sockaddr_ll of the size given.
        let ret = unsafe {
            libc::bind(
                ring.fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        check(ret, "bind to the interface")?;
        if let Some(group) = fanout {
            let arg: u32 =
                u32::from(group) | ((PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_DEFRAG) << 16);
            setsockopt(&ring.fd, SOL_PACKET, PACKET_FANOUT, &arg, "PACKET_FANOUT")?;
        }
        Ok(ring)
    }

    /// A handle that swaps this socket's filter.
    pub fn filter_handle(&self) -> io::Result<FilterHandle> {
        Ok(FilterHandle {
            fd: self.fd.try_clone()?,
        })
    }

    /// Packets received and dropped by the kernel since the last call
    /// (reading resets the kernel's counters).
    pub fn statistics(&self) -> io::Result<(u64, u64)> {
        let mut stats = TpacketStatsV3::default();
        let mut len = std::mem::size_of::<TpacketStatsV3>() as libc::socklen_t;
        // SAFETY: `stats` is writable for `len` bytes.
        let ret = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                SOL_PACKET,
                PACKET_STATISTICS,
                (&mut stats as *mut TpacketStatsV3).cast(),
                &mut len,
            )
        };
        check(ret, "PACKET_STATISTICS")?;
        Ok((u64::from(stats.tp_packets), u64::from(stats.tp_drops)))
    }

    fn block(&self, i: u32) -> *mut u8 {
        // SAFETY: i < block_count, so the offset stays inside the mapping.
        unsafe { self.map.add(i as usize * self.config.block_size as usize) }
    }

    fn block_status(&self, block: *mut u8) -> &AtomicU32 {
        // SAFETY: block_status is a 4-byte aligned u32 at offset 8 of the
        // block descriptor, shared with the kernel: accessed atomically.
        unsafe { &*(block.add(8).cast::<AtomicU32>()) }
    }

    /// Waits up to `timeout_ms` for the next block and hands each of its
    /// packets to `f`; returns the number of packets seen.
    pub fn next_block(
        &mut self,
        timeout_ms: i32,
        mut f: impl FnMut(RingPacket<'_>),
    ) -> io::Result<usize> {
        let block = self.block(self.current);
        if self.block_status(block).load(Ordering::Acquire) & TP_STATUS_USER == 0 {
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN | libc::POLLERR,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let ret = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
            if ret < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    return Ok(0);
                }
                return Err(e);
            }
            if self.block_status(block).load(Ordering::Acquire) & TP_STATUS_USER == 0 {
                return Ok(0);
            }
        }
        let bs = self.config.block_size as usize;
        // SAFETY: the kernel has handed this block to user space
        // (TP_STATUS_USER); it will not write to it until released. Every
        // offset read from it is checked against the block size.
        let count = unsafe {
            let num_pkts = std::ptr::read(block.add(12).cast::<u32>());
            let mut off = std::ptr::read(block.add(16).cast::<u32>()) as usize;
            let mut seen = 0;
            for _ in 0..num_pkts {
                if off + 48 > bs {
                    break;
                }
                let hdr = block.add(off);
                let next = std::ptr::read(hdr.cast::<u32>()) as usize;
                let sec = std::ptr::read(hdr.add(4).cast::<u32>());
                let nsec = std::ptr::read(hdr.add(8).cast::<u32>());
                let snaplen = std::ptr::read(hdr.add(12).cast::<u32>()) as usize;
                let len = std::ptr::read(hdr.add(16).cast::<u32>());
                let status = std::ptr::read(hdr.add(20).cast::<u32>());
                let mac = usize::from(std::ptr::read(hdr.add(24).cast::<u16>()));
                let vlan_tci = std::ptr::read(hdr.add(32).cast::<u32>());
                let vlan_tpid = std::ptr::read(hdr.add(36).cast::<u16>());
                if off + mac + snaplen <= bs {
                    let data = std::slice::from_raw_parts(hdr.add(mac), snaplen);
                    let vlan = (status & TP_STATUS_VLAN_VALID != 0).then(|| {
                        let tpid = if status & TP_STATUS_VLAN_TPID_VALID != 0 {
                            vlan_tpid
                        } else {
                            0x8100
                        };
                        (tpid, vlan_tci as u16)
                    });
                    f(RingPacket {
                        ts_ns: u64::from(sec) * 1_000_000_000 + u64::from(nsec),
                        data,
                        wire_len: len,
                        vlan,
                    });
                    seen += 1;
                }
                if next == 0 {
                    break;
                }
                off += next;
            }
            seen
        };
        fence(Ordering::Release);
        self.block_status(block)
            .store(TP_STATUS_KERNEL, Ordering::Release);
        self.current = (self.current + 1) % self.config.block_count;
        Ok(count)
    }
}

impl Drop for PacketRing {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `open`.
        unsafe {
            libc::munmap(self.map.cast(), self.map_len);
        }
    }
}
