//! ctnetlink, read by the agent's fallback: dumps of the conntrack table
//! and its DESTROY events, parsed into [`Conn`] (tuple, mark, per-direction
//! counters). Lengths come from the kernel and are checked before use.

use nix::sys::socket::{
    bind, recv, send, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NFNLGRP_CONNTRACK_DESTROY: u32 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_MARK: u16 = 8;
const CTA_COUNTERS_ORIG: u16 = 9;
const CTA_COUNTERS_REPLY: u16 = 10;
const CTA_ID: u16 = 12;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_COUNTERS_PACKETS: u16 = 1;
const CTA_COUNTERS_BYTES: u16 = 2;

/// At most this many conntrack entries per dump (a bound on what the
/// kernel's answer can make the agent hold).
pub const MAX_CONNS: usize = 1 << 20;

/// One direction of a conntrack entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
}

/// A conntrack entry as ctnetlink gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conn {
    pub id: u32,
    pub orig: Tuple,
    pub reply: Option<Tuple>,
    pub mark: u32,
    /// Packets and bytes of the original and the reply direction.
    pub orig_counts: (u64, u64),
    pub reply_counts: (u64, u64),
}

fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return None;
        }
        let payload = &b[4..len];
        let next = (len.div_ceil(4) * 4).min(b.len());
        b = &b[next..];
        Some((kind, payload))
    })
}

fn be_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

fn be_u32(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

fn addr(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
        _ => None,
    }
}

fn tuple(b: &[u8]) -> Option<Tuple> {
    let (mut src, mut dst, mut proto, mut sp, mut dp) = (None, None, 0u8, 0u16, 0u16);
    for (k, v) in attrs(b) {
        match k {
            CTA_TUPLE_IP => {
                for (k, v) in attrs(v) {
                    match k {
                        1 | 3 => src = addr(v),
                        2 | 4 => dst = addr(v),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (k, v) in attrs(v) {
                    match (k, v) {
                        (CTA_PROTO_NUM, [p, ..]) => proto = *p,
                        (CTA_PROTO_SRC_PORT, [a, b, ..]) => sp = u16::from_be_bytes([*a, *b]),
                        (CTA_PROTO_DST_PORT, [a, b, ..]) => dp = u16::from_be_bytes([*a, *b]),
                        // ICMP type and code (v4: 5, 6; v6: 8, 9) as the
                        // destination port, like the eBPF path.
                        (5 | 8, [t, ..]) => dp = (dp & 0xff) | (u16::from(*t) << 8),
                        (6 | 9, [c, ..]) => dp = (dp & 0xff00) | u16::from(*c),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(Tuple {
        src: src?,
        dst: dst?,
        src_port: sp,
        dst_port: dp,
        proto,
    })
}

fn counters(b: &[u8]) -> (u64, u64) {
    let (mut p, mut by) = (0, 0);
    for (k, v) in attrs(b) {
        match k {
            CTA_COUNTERS_PACKETS => p = be_u64(v).unwrap_or(0),
            CTA_COUNTERS_BYTES => by = be_u64(v).unwrap_or(0),
            _ => {}
        }
    }
    (p, by)
}

/// One ctnetlink conntrack message body (after `nlmsghdr` and `nfgenmsg`).
pub fn parse_conn(body: &[u8]) -> Option<Conn> {
    let (mut orig, mut reply, mut mark, mut id) = (None, None, 0, 0);
    let (mut oc, mut rc) = ((0, 0), (0, 0));
    for (k, v) in attrs(body) {
        match k {
            CTA_TUPLE_ORIG => orig = tuple(v),
            CTA_TUPLE_REPLY => reply = tuple(v),
            CTA_MARK => mark = be_u32(v).unwrap_or(0),
            CTA_ID => id = be_u32(v).unwrap_or(0),
            CTA_COUNTERS_ORIG => oc = counters(v),
            CTA_COUNTERS_REPLY => rc = counters(v),
            _ => {}
        }
    }
    Some(Conn {
        id,
        orig: orig?,
        reply,
        mark,
        orig_counts: oc,
        reply_counts: rc,
    })
}

/// What one datagram of ctnetlink held.
#[derive(Debug, Default)]
pub struct Parsed {
    pub conns: Vec<Conn>,
    /// NLMSG_DONE seen (end of a dump).
    pub done: bool,
    /// Messages that were not conntrack entries we could read.
    pub bad: u64,
}

/// Parses one datagram: conntrack entries (dump answers and events).
pub fn parse(buf: &[u8]) -> Result<Parsed, String> {
    let mut out = Parsed::default();
    let mut at = 0usize;
    while at + 16 <= buf.len() {
        let len = u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
        let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
        if len < 16 || at + len > buf.len() {
            return Err(format!(
                "ctnetlink: message length {len} at offset {at} out of bounds"
            ));
        }
        match kind {
            NLMSG_DONE => {
                out.done = true;
                return Ok(out);
            }
            NLMSG_ERROR => {
                let e = buf
                    .get(at + 16..at + 20)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .unwrap_or(0);
                if e != 0 {
                    return Err(format!(
                        "ctnetlink: {}",
                        std::io::Error::from_raw_os_error(-e)
                    ));
                }
            }
            k if k >> 8 == NFNL_SUBSYS_CTNETLINK
                && matches!(k & 0xff, IPCTNL_MSG_CT_NEW | IPCTNL_MSG_CT_DELETE) =>
            {
                // nfgenmsg: 4 bytes.
                match buf.get(at + 20..at + len).and_then(parse_conn) {
                    Some(c) if out.conns.len() < MAX_CONNS => out.conns.push(c),
                    _ => out.bad += 1,
                }
            }
            _ => {}
        }
        at += len.div_ceil(4) * 4;
    }
    Ok(out)
}

fn netfilter_socket(groups: u32) -> Result<OwnedFd, String> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .map_err(|e| format!("ctnetlink socket: {e}"))?;
    let _ = setsockopt(&fd, sockopt::RcvBuf, &(4 << 20));
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups))
        .map_err(|e| format!("ctnetlink bind: {e}"))?;
    Ok(fd)
}

/// Every conntrack entry of this network namespace (both families).
pub fn dump() -> Result<Vec<Conn>, String> {
    let fd = netfilter_socket(0)?;
    let mut m = Vec::with_capacity(20);
    m.extend_from_slice(&20u32.to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET).to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]); // AF_UNSPEC: every family
    send(fd.as_raw_fd(), &m, MsgFlags::empty()).map_err(|e| format!("ctnetlink send: {e}"))?;
    let mut all = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    // Bounded: every datagram holds an entry or ends the dump.
    for _ in 0..MAX_CONNS {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())
            .map_err(|e| format!("ctnetlink recv: {e}"))?;
        let p = parse(&buf[..n])?;
        if all.len() + p.conns.len() <= MAX_CONNS {
            all.extend(p.conns);
        }
        if n == 0 || p.done {
            break;
        }
    }
    Ok(all)
}

/// The DESTROY event stream (final counters of each entry that ends).
#[derive(Debug)]
pub struct Events {
    fd: OwnedFd,
    buf: Vec<u8>,
    /// Times the kernel dropped events (ENOBUFS): entries that ended
    /// meanwhile keep only what the last dump saw.
    pub overruns: u64,
}

impl Events {
    pub fn subscribe() -> Result<Events, String> {
        Ok(Events {
            fd: netfilter_socket(1 << (NFNLGRP_CONNTRACK_DESTROY - 1))?,
            buf: vec![0u8; 1 << 16],
            overruns: 0,
        })
    }

    /// The events waiting now (does not block).
    pub fn take(&mut self) -> Vec<Conn> {
        let mut out = Vec::new();
        for _ in 0..4096 {
            match recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::MSG_DONTWAIT) {
                Ok(0) => break,
                Ok(n) => match parse(&self.buf[..n]) {
                    Ok(p) => out.extend(p.conns),
                    Err(e) => tracing::warn!(error = %e, "agent: a bad ctnetlink event"),
                },
                Err(nix::errno::Errno::ENOBUFS) => self.overruns += 1,
                Err(_) => break,
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn nla(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(payload);
        v.resize(v.len().div_ceil(4) * 4, 0);
        v
    }

    fn nested(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        nla(kind | 0x8000, &parts.concat())
    }

    #[test]
    fn a_conntrack_message_parses_with_tuple_mark_and_counters() {
        let orig = nested(
            CTA_TUPLE_ORIG,
            &[
                nested(
                    CTA_TUPLE_IP,
                    &[nla(1, &[127, 0, 0, 1]), nla(2, &[127, 0, 0, 2])],
                ),
                nested(
                    CTA_TUPLE_PROTO,
                    &[
                        nla(CTA_PROTO_NUM, &[17]),
                        nla(CTA_PROTO_SRC_PORT, &5000u16.to_be_bytes()),
                        nla(CTA_PROTO_DST_PORT, &53u16.to_be_bytes()),
                    ],
                ),
            ],
        );
        let counts = nested(
            CTA_COUNTERS_ORIG,
            &[
                nla(CTA_COUNTERS_PACKETS, &3u64.to_be_bytes()),
                nla(CTA_COUNTERS_BYTES, &384u64.to_be_bytes()),
            ],
        );
        let body = [
            orig,
            counts,
            nla(CTA_MARK, &0x8000_03e8u32.to_be_bytes()),
            nla(CTA_ID, &7u32.to_be_bytes()),
        ]
        .concat();
        let mut msg = Vec::new();
        msg.extend_from_slice(&((20 + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&(NFNL_SUBSYS_CTNETLINK << 8).to_ne_bytes());
        msg.extend_from_slice(&[0u8; 10]);
        msg.extend_from_slice(&[2, 0, 0, 0]);
        msg.extend_from_slice(&body);
        let p = parse(&msg).unwrap();
        assert_eq!(p.conns.len(), 1);
        let c = p.conns[0];
        assert_eq!(c.id, 7);
        assert_eq!(c.mark, 0x8000_03e8);
        assert_eq!(c.orig_counts, (3, 384));
        assert_eq!(c.orig.dst_port, 53);
        assert_eq!(c.orig.proto, 17);
        assert_eq!(c.orig.dst.to_string(), "127.0.0.2");
        // Truncated: an error, not a panic.
        assert!(parse(&msg[..msg.len() - 8]).is_err());
    }
}
