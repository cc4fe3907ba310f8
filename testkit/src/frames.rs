//! Packet frames for tests (Ethernet with VLAN tags, IPv4 and IPv6, UDP,
//! TCP, ICMP), and prerequisite checks in the `Option` form some tests use
//! (the [`crate::harness`] semantics: fail under CI=true, skip elsewhere).

#![allow(dead_code, clippy::unwrap_used)]

use std::net::IpAddr;
use std::path::PathBuf;

/// `None` after printing why the test skips; panics under CI=true (a
/// missing prerequisite must not pass silently).
#[track_caller]
pub fn skip(why: &str) -> Option<()> {
    crate::harness::skip(why);
    None
}

/// `Some(path)` of a binary, or [`skip`]'s `None`.
#[track_caller]
pub fn need_binary(name: &str, package: &str) -> Option<PathBuf> {
    crate::harness::prerequisite(crate::harness::require_binary(name, package))
}

/// `Some(())` as root, else [`skip`]'s `None`, saying what root is for.
#[track_caller]
pub fn need_root(what: &str) -> Option<()> {
    crate::harness::prerequisite(crate::harness::require_root(what))
}

/// Runs `ip ARGS`, which must succeed.
pub fn ip(args: &[&str]) {
    let o = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

pub const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
pub const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

/// An Ethernet frame with the given VLAN ids (outer first) around `l3`.
pub fn ethernet(vlans: &[u16], ether_type: u16, l3: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + 4 * vlans.len() + l3.len());
    f.extend_from_slice(&MAC_B);
    f.extend_from_slice(&MAC_A);
    for (i, v) in vlans.iter().enumerate() {
        let tpid: u16 = if i == 0 && vlans.len() > 1 {
            0x88a8
        } else {
            0x8100
        };
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&v.to_be_bytes());
    }
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(l3);
    f
}

fn v4(a: IpAddr) -> [u8; 4] {
    match a {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(_) => [0; 4],
    }
}

fn v6(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
    }
}

/// An IPv4 packet; `options` are 4-byte words appended to the header,
/// `frag` is the flags+offset field.
pub fn ipv4(
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    id: u16,
    frag: u16,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let ihl = 20 + options.len();
    let total = (ihl + payload.len()) as u16;
    let mut p = vec![0x40 | (ihl / 4) as u8, 0x28, 0, 0];
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&frag.to_be_bytes());
    p.extend_from_slice(&[64, proto, 0, 0]);
    p.extend_from_slice(&v4(src));
    p.extend_from_slice(&v4(dst));
    p.extend_from_slice(options);
    // Header checksum, so that tshark sees a sane packet.
    let mut sum = 0u32;
    for c in p.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// An IPv6 packet; `hop_by_hop` adds an 8-byte hop-by-hop options header.
pub fn ipv6(src: IpAddr, dst: IpAddr, proto: u8, hop_by_hop: bool, payload: &[u8]) -> Vec<u8> {
    let mut ext = Vec::new();
    let next = if hop_by_hop {
        ext.extend_from_slice(&[proto, 0, 1, 4, 0, 0, 0, 0]);
        0
    } else {
        proto
    };
    let plen = (ext.len() + payload.len()) as u16;
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&plen.to_be_bytes());
    p.extend_from_slice(&[next, 64]);
    p.extend_from_slice(&v6(src));
    p.extend_from_slice(&v6(dst));
    p.extend_from_slice(&ext);
    p.extend_from_slice(payload);
    p
}

pub fn udp(sport: u16, dport: u16, data_len: usize) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + data_len);
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + data_len) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]); // no checksum (IPv4); tshark does not verify by default
    u.extend(std::iter::repeat_n(0x61, data_len));
    u
}

pub fn tcp(sport: u16, dport: u16, seq: u32, ack: u32, flags: u8, data_len: usize) -> Vec<u8> {
    let mut t = Vec::with_capacity(20 + data_len);
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&ack.to_be_bytes());
    t.extend_from_slice(&[0x50, flags]);
    t.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
    t.extend(std::iter::repeat_n(0x62, data_len));
    t
}

pub fn icmp_echo(id: u16, seq: u16, data_len: usize) -> Vec<u8> {
    let mut i = vec![8, 0, 0, 0];
    i.extend_from_slice(&id.to_be_bytes());
    i.extend_from_slice(&seq.to_be_bytes());
    i.extend(std::iter::repeat_n(0x63, data_len));
    i
}
