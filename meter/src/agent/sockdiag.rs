//! Owners of sockets the owner program did not see — sockets that existed
//! before the agent started and sockets a server accepted (the kernel
//! clones those without `sock_create`): `sock_diag` gives cookie → inode
//! and uid, `/proc/*/fd` gives inode → pid.

use nix::sys::socket::{
    bind, recv, send, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};
use std::collections::{HashMap, HashSet};
use std::os::fd::AsRawFd;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// At most this many sockets per dump: a bound on what the kernel's answer
/// can make the agent hold.
const MAX_SOCKETS: usize = 1 << 20;

/// What `sock_diag` says about one socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiagSocket {
    pub inode: u32,
    pub uid: u32,
    /// TCP state (10: listening).
    pub state: u8,
    pub local_port: u16,
    /// 6 (TCP) or 17 (UDP).
    pub protocol: u8,
}

/// `TCP_LISTEN`.
pub const LISTEN: u8 = 10;

/// The request: `nlmsghdr` + `inet_diag_req_v2` for every state.
fn request(family: u8, protocol: u8, seq: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(72);
    m.extend_from_slice(&72u32.to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[family, protocol, 0, 0]);
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // all states
    m.resize(72, 0);
    m
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Parses one datagram of the dump into `out`; `Ok(true)` at the end of
/// the dump. Lengths come from the kernel and are checked before use.
pub fn parse_dump(
    buf: &[u8],
    protocol: u8,
    out: &mut HashMap<u64, DiagSocket>,
) -> Result<bool, String> {
    let mut at = 0usize;
    while at + 16 <= buf.len() {
        let len = u32_at(buf, at).unwrap_or(0) as usize;
        let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
        if len < 16 || at + len > buf.len() {
            return Err(format!(
                "sock_diag: message length {len} at offset {at} out of bounds"
            ));
        }
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = u32_at(buf, at + 16).map(|e| -(e as i32)).unwrap_or(0);
                return Err(format!(
                    "sock_diag: {}",
                    std::io::Error::from_raw_os_error(errno)
                ));
            }
            SOCK_DIAG_BY_FAMILY => {
                let msg = &buf[at + 16..at + len];
                if msg.len() >= 72 && out.len() < MAX_SOCKETS {
                    let cookie = u64::from(u32_at(msg, 44).unwrap_or(0))
                        | (u64::from(u32_at(msg, 48).unwrap_or(0)) << 32);
                    out.insert(
                        cookie,
                        DiagSocket {
                            uid: u32_at(msg, 64).unwrap_or(0),
                            inode: u32_at(msg, 68).unwrap_or(0),
                            state: msg[1],
                            local_port: u16::from_be_bytes([msg[4], msg[5]]),
                            protocol,
                        },
                    );
                }
            }
            _ => {}
        }
        at += len.div_ceil(4) * 4;
    }
    Ok(false)
}

/// Every TCP and UDP socket of this network namespace, IPv4 and IPv6, by
/// cookie.
pub fn dump() -> Result<HashMap<u64, DiagSocket>, String> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .map_err(|e| format!("sock_diag socket: {e}"))?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(|e| format!("sock_diag bind: {e}"))?;
    let mut out = HashMap::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut seq = 0u32;
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        for protocol in [libc::IPPROTO_TCP as u8, libc::IPPROTO_UDP as u8] {
            seq += 1;
            send(
                fd.as_raw_fd(),
                &request(family, protocol, seq),
                MsgFlags::empty(),
            )
            .map_err(|e| format!("sock_diag send: {e}"))?;
            // Bounded: each datagram holds at least one socket or ends the dump.
            for _ in 0..MAX_SOCKETS {
                let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())
                    .map_err(|e| format!("sock_diag recv: {e}"))?;
                if n == 0 || parse_dump(&buf[..n], protocol, &mut out)? {
                    break;
                }
            }
        }
    }
    Ok(out)
}

/// inode → pid for the socket inodes in `wanted`, by reading the
/// descriptors of every process once (`/proc/PID/fd/*` → `socket:[INODE]`).
/// Processes that vanish meanwhile are skipped.
pub fn pids_of_inodes(wanted: &HashSet<u32>) -> HashMap<u32, u32> {
    let mut found = HashMap::new();
    if wanted.is_empty() {
        return found;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let t = target.to_string_lossy();
            if let Some(inode) = t
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
                .and_then(|s| s.parse::<u32>().ok())
            {
                if wanted.contains(&inode) {
                    found.entry(inode).or_insert(pid);
                }
            }
        }
        if found.len() == wanted.len() {
            break;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn message(cookie: u64, uid: u32, inode: u32) -> Vec<u8> {
        let mut m = vec![0u8; 16 + 72];
        m[0..4].copy_from_slice(&88u32.to_ne_bytes());
        m[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        m[16 + 1] = 1;
        m[16 + 4..16 + 6].copy_from_slice(&8080u16.to_be_bytes());
        m[16 + 44..16 + 48].copy_from_slice(&(cookie as u32).to_ne_bytes());
        m[16 + 48..16 + 52].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        m[16 + 64..16 + 68].copy_from_slice(&uid.to_ne_bytes());
        m[16 + 68..16 + 72].copy_from_slice(&inode.to_ne_bytes());
        m
    }

    #[test]
    fn a_dump_datagram_parses_and_ends_at_done() {
        let mut buf = message(0x1_0000_0002, 1000, 555);
        let mut done = vec![0u8; 20];
        done[0..4].copy_from_slice(&20u32.to_ne_bytes());
        done[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        buf.extend_from_slice(&done);
        let mut out = HashMap::new();
        assert!(parse_dump(&buf, 6, &mut out).unwrap());
        assert_eq!(
            out[&0x1_0000_0002],
            DiagSocket {
                inode: 555,
                uid: 1000,
                state: 1,
                local_port: 8080,
                protocol: 6,
            }
        );
    }

    #[test]
    fn a_length_beyond_the_datagram_is_an_error_not_a_panic() {
        let mut buf = message(1, 0, 0);
        buf[0..4].copy_from_slice(&4000u32.to_ne_bytes());
        let err = parse_dump(&buf, 6, &mut HashMap::new()).unwrap_err();
        assert!(err.contains("out of bounds"), "{err}");
        buf[0..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(parse_dump(&buf, 6, &mut HashMap::new()).is_err());
    }

    #[test]
    fn this_process_socket_is_found_by_inode() {
        use std::os::unix::fs::MetadataExt;
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let fd_path = format!("/proc/self/fd/{}", sock.as_raw_fd());
        let inode = std::fs::metadata(&fd_path).unwrap().ino() as u32;
        let found = pids_of_inodes(&HashSet::from([inode]));
        assert_eq!(found.get(&inode), Some(&std::process::id()));
    }
}
