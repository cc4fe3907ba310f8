//! Per-packet cost: how many packets per second the enforced router
//! forwards, with a given table behind its egress.
//!
//! Three namespaces: `src` (10.61.1.1) — `router` — `sink` (10.61.2.2). A
//! sender in `src` floods 64-byte frames (an 18-byte UDP payload: 46 bytes
//! of IP, 60 with the Ethernet header, 64 on a wire with its FCS) with
//! `sendmmsg` to 10.61.200.1, which the router routes to the sink and the
//! sink drops at once (a blackhole route). The
//! sink's veth counts what arrived. On veth everything a packet costs —
//! the sender's stack, the router's forwarding, nftables, HTB, the sink's
//! receive — is paid on the sending CPU, so the delivered rate is the
//! inverse of the per-packet cost of the whole path; only the table
//! behind the router's egress differs between measurements.
//!
//! The flood matches no decision: it pays the classification (a map
//! lookup, or every rule of a linear chain) and goes to the default class.

use crate::harness::{Netns, VethPair};
use anyhow::Context as _;
use nix::sys::socket::{self, MsgFlags, MultiHeaders, SockaddrIn};
use serde::Serialize;
use std::io::IoSlice;
use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::time::{Duration, Instant};

/// UDP payload of a 64-byte Ethernet frame (FCS included).
const PAYLOAD: usize = 18;
/// Messages per `sendmmsg`.
const BATCH: usize = 64;

/// The namespaces of the forwarding measurement.
pub struct Path {
    pub src: Netns,
    pub router: Netns,
    pub sink: Netns,
    /// The router's interface towards the sink: where the enforcer works.
    pub router_out: String,
    sink_if: String,
}

impl Path {
    pub fn create() -> anyhow::Result<Path> {
        let src = Netns::create("fwd-src")?;
        let router = Netns::create("fwd-rt")?;
        let sink = Netns::create("fwd-sink")?;
        VethPair::connect(&src, "10.61.1.1/24", &router, "10.61.1.2/24")?;
        let out = VethPair::connect(&router, "10.61.2.1/24", &sink, "10.61.2.2/24")?;
        src.ip(&["route", "add", "default", "via", "10.61.1.2"])?;
        router.ip(&["route", "add", "10.61.200.0/24", "via", "10.61.2.2"])?;
        router.sysctl("net.ipv4.ip_forward", "1")?;
        // The sink drops the flood silently: a blackhole route (without
        // forwarding it would answer with ICMP host unreachable).
        sink.sysctl("net.ipv4.ip_forward", "1")?;
        sink.ip(&["route", "add", "blackhole", "10.61.200.0/24"])?;
        Ok(Path {
            src,
            router,
            sink,
            router_out: out.a_if,
            sink_if: out.b_if,
        })
    }

    fn delivered(&self) -> anyhow::Result<u64> {
        let out = self
            .sink
            .ip(&["-s", "-j", "link", "show", "dev", &self.sink_if])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("ip -j link")?;
        v[0]["stats64"]["rx"]["packets"]
            .as_u64()
            .context("no rx packet count in `ip -s -j link`")
    }

    /// Floods for `duration` (at most `max_packets`), `trials` times;
    /// returns the delivered packets per second of each trial.
    pub fn rates(
        &self,
        duration: Duration,
        trials: usize,
        max_packets: u64,
    ) -> anyhow::Result<Vec<f64>> {
        let mut rates = Vec::with_capacity(trials);
        for _ in 0..trials {
            let before = self.delivered()?;
            let sent = self.src.run_in(move || flood(duration, max_packets))??;
            std::thread::sleep(Duration::from_millis(100));
            let got = self.delivered()? - before;
            anyhow::ensure!(
                sent.packets > 0,
                "the flood sent nothing ({} errors)",
                sent.errors
            );
            rates.push(got as f64 / sent.elapsed.as_secs_f64());
        }
        Ok(rates)
    }
}

/// What one flood sent.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Flood {
    pub packets: u64,
    pub errors: u64,
    #[serde(skip)]
    pub elapsed: Duration,
}

/// Sends 64-byte frames to 10.61.200.1:9 from this namespace, `BATCH` per
/// system call, until `duration` has passed or `max_packets` are sent.
pub fn flood(duration: Duration, max_packets: u64) -> anyhow::Result<Flood> {
    let sock = UdpSocket::bind("10.61.1.1:0").context("binding the flood's socket")?;
    let dst: SocketAddrV4 = "10.61.200.1:9".parse()?;
    let payload = [0x5au8; PAYLOAD];
    let iovs: Vec<[IoSlice<'_>; 1]> = (0..BATCH).map(|_| [IoSlice::new(&payload)]).collect();
    let addrs = vec![Some(SockaddrIn::from(dst)); BATCH];
    let mut headers = MultiHeaders::<SockaddrIn>::preallocate(BATCH, None);
    let mut out = Flood {
        packets: 0,
        errors: 0,
        elapsed: Duration::ZERO,
    };
    let start = Instant::now();
    while out.packets < max_packets && start.elapsed() < duration {
        match socket::sendmmsg(
            sock.as_raw_fd(),
            &mut headers,
            &iovs,
            &addrs,
            [],
            MsgFlags::empty(),
        ) {
            Ok(sent) => out.packets += sent.count() as u64,
            Err(_) => out.errors += 1,
        }
    }
    out.elapsed = start.elapsed();
    Ok(out)
}

/// The old layout, for the record: `rules` jump rules in one base chain
/// (one per flow, none matching the flood), each to a chain of its own
/// with the two rules of a decision, in a table `inet qosloop_linear`
/// loaded with `nft -f`.
pub fn linear_table(interface: &str, rules: usize) -> String {
    let mut s = format!(
        "table inet qosloop_linear {{\n\tchain postrouting {{\n\t\ttype filter hook postrouting priority filter; policy accept;\n\t\toifname != \"{interface}\" accept\n"
    );
    for i in 0..rules {
        let host = std::net::Ipv4Addr::from(
            u32::from(std::net::Ipv4Addr::new(10, 128, 0, 0)) + i as u32 + 1,
        );
        s.push_str(&format!(
            "\t\tip saddr 10.61.1.1 ip daddr {host} udp dport 5001 jump d{i}\n"
        ));
    }
    s.push_str("\t}\n");
    for i in 0..rules {
        s.push_str(&format!(
            "\tchain d{i} {{\n\t\tlimit rate over 12500 bytes/second burst 15000 bytes counter meta priority set e500:100 accept\n\t\tcounter ip dscp set cs6 meta priority set e500:2 accept\n\t}}\n"
        ));
    }
    s.push_str("}\n");
    s
}

/// Median of a sample (0 when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_linear_table_has_one_jump_and_one_chain_per_rule() {
        let t = linear_table("v0", 3);
        assert_eq!(t.matches(" jump d").count(), 3);
        assert_eq!(t.matches("\tchain d").count(), 3);
        assert!(t.contains("ip daddr 10.128.0.3 udp dport 5001 jump d2"));
        assert!(t.contains("oifname != \"v0\" accept"));
    }

    #[test]
    fn median_of_odd_and_even_samples() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0]), 4.0);
        assert_eq!(median(&[]), 0.0);
    }
}
