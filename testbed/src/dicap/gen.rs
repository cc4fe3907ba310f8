//! The experiment's traffic: UDP flows between two addresses that exist
//! nowhere (sent with IP_TRANSPARENT from the source namespace), round
//! robin over the flows, paced to a rate, bounded in count and time.
//! Each flow is connected, so the kernel numbers its IPv4 ids in sequence
//! (what per-packet shares hash). With `both_directions`, every second
//! packet goes the other way along the same flow.

use super::net::{FLOW_A, FLOW_B};
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
use std::net::{SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// IPv4 + UDP + Ethernet headers.
pub const FRAME_OVERHEAD: usize = 14 + 20 + 8;

/// What to send.
#[derive(Debug, Clone)]
pub struct Load {
    pub flows: u16,
    pub frame_bytes: usize,
    pub pps: f64,
    pub packets: u64,
    pub both_directions: bool,
    /// Hard stop, whatever was sent.
    pub limit: Duration,
}

/// What was sent.
#[derive(Debug, Clone, Default)]
pub struct Sent {
    pub packets: u64,
    /// Frame bytes (link layer included) of the packets sent.
    pub bytes: u64,
    pub failed: u64,
    pub elapsed: Duration,
}

fn socket_from(local: SocketAddrV4, peer: SocketAddrV4) -> anyhow::Result<UdpSocket> {
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::setsockopt(&fd, sockopt::IpTransparent, &true)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(local),
    )?;
    let s = UdpSocket::from(fd);
    s.connect(peer)?;
    Ok(s)
}

/// Sends `load`; run it inside the source namespace.
pub fn send(load: &Load, stop: &AtomicBool) -> anyhow::Result<Sent> {
    let mut socks = Vec::new();
    for i in 0..load.flows {
        let a = SocketAddrV4::new(FLOW_A, 40_000 + i);
        let b = SocketAddrV4::new(FLOW_B, 9_000 + i);
        socks.push(socket_from(a, b)?);
        if load.both_directions {
            socks.push(socket_from(b, a)?);
        }
    }
    let payload = vec![0x5au8; load.frame_bytes.saturating_sub(FRAME_OVERHEAD).max(1)];
    let frame = (payload.len() + FRAME_OVERHEAD) as u64;
    let start = Instant::now();
    let mut sent = Sent::default();
    let gap = Duration::from_secs_f64(1.0 / load.pps.max(1.0));
    let mut i = 0usize;
    while sent.packets + sent.failed < load.packets
        && start.elapsed() < load.limit
        && !stop.load(Ordering::Relaxed)
    {
        // Batches of up to 64 between checks of the clock.
        let due =
            ((start.elapsed().as_secs_f64() / gap.as_secs_f64()) as u64 + 1).min(load.packets);
        let done = sent.packets + sent.failed;
        if done >= due {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        for _ in 0..(due - done).min(64) {
            match socks[i % socks.len()].send(&payload) {
                Ok(_) => {
                    sent.packets += 1;
                    sent.bytes += frame;
                }
                Err(_) => sent.failed += 1,
            }
            i += 1;
        }
    }
    sent.elapsed = start.elapsed();
    Ok(sent)
}
