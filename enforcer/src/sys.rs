//! The only place that calls into libc: a raw `NETLINK_ROUTE` socket and
//! interface-name lookup (`bpf(2)` is `qosloop-bpf`'s). Everything above
//! works on byte buffers.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A bound `AF_NETLINK` socket of one protocol, in the network namespace of
/// the thread that opened it.
#[derive(Debug)]
pub struct NetlinkSocket {
    fd: OwnedFd,
}

const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;

impl NetlinkSocket {
    /// Opens and binds a socket of `protocol` (e.g. `libc::NETLINK_ROUTE`),
    /// asking for extended acks (the kernel's error text) and capped acks
    /// (errors do not echo the whole request).
    pub fn open(protocol: libc::c_int) -> io::Result<NetlinkSocket> {
        // SAFETY: plain syscall with constant arguments; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor we own and nothing else holds.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let sock = NetlinkSocket { fd };
        sock.set_int(SOL_NETLINK, NETLINK_EXT_ACK, 1)?;
        sock.set_int(SOL_NETLINK, NETLINK_CAP_ACK, 1)?;
        // Room for the acks of a pipelined batch; failure only limits batching.
        let _ = sock.set_int(libc::SOL_SOCKET, libc::SO_RCVBUF, 4 << 20);
        // SAFETY: sockaddr_nl is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `addr` is a valid sockaddr_nl and its size is passed.
        let rc = unsafe {
            libc::bind(
                sock.fd.as_raw_fd(),
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sock)
    }

    pub fn set_int(
        &self,
        level: libc::c_int,
        name: libc::c_int,
        value: libc::c_int,
    ) -> io::Result<()> {
        // SAFETY: `value` lives across the call and its size is passed.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                std::ptr::addr_of!(value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Bounds every `recv` to `timeout` (`SO_RCVTIMEO`): a kernel that does
    /// not answer gives `WouldBlock` instead of a hang.
    pub fn set_recv_timeout(&self, timeout: std::time::Duration) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
        };
        // SAFETY: `tv` lives across the call and its size is passed.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::addr_of!(tv).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Sends one datagram holding one or more netlink messages to the kernel.
    pub fn send(&self, buf: &[u8]) -> io::Result<()> {
        // SAFETY: `buf` is valid for `buf.len()` bytes during the call.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != buf.len() {
            return Err(io::Error::other("short netlink send"));
        }
        Ok(())
    }

    /// Receives one datagram into `buf`; returns its length (a longer
    /// datagram is truncated: netlink replies here are far below 64 KiB).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if err.kind() == io::ErrorKind::WouldBlock {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no netlink answer within the receive timeout",
                    ));
                }
                return Err(err);
            }
            return Ok(n as usize);
        }
    }
}

/// The index of interface `name` in this thread's network namespace.
pub fn if_index(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string for the call's duration.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// Loads `insns` (eBPF instructions, 8 bytes each) as a `sched_cls` program
/// and returns its descriptor; a refusal carries the verifier's log.
pub fn bpf_load_sched_cls(insns: &[u8]) -> io::Result<OwnedFd> {
    qosloop_bpf::Program::load(
        qosloop_bpf::ProgType::SchedCls,
        None,
        insns,
        "qosloop_steer",
    )
    .map(OwnedFd::from)
    .map_err(|e| io::Error::new(e.source.kind(), e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_that_does_not_answer_ends_the_receive() {
        let sock = NetlinkSocket::open(libc::NETLINK_ROUTE).unwrap();
        sock.set_recv_timeout(std::time::Duration::from_millis(50))
            .unwrap();
        let mut buf = [0u8; 64];
        // Nothing was asked, nothing comes: an error, not a hang.
        let err = sock.recv(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
