//! Traffic for experiments: a bounded, paced UDP generator with schedules
//! (constant, steps, random rates within bands as in `seeds/004`), and a
//! sink that records, per second and per flow, what arrived — bytes, DSCP
//! mix, loss (from sequence numbers the generator writes into each
//! datagram) and one-way delay.
//!
//! Both are meant to run on threads inside namespaces
//! ([`crate::harness::Netns::spawn_in`]). The sink reads a raw socket so it
//! sees each packet's IP header (its DSCP as delivered); plain UDP sockets
//! bound on the same ports swallow the datagrams so that no ICMP errors go
//! back.

use nix::sys::socket::{self, AddressFamily, SockFlag, SockProtocol, SockType};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const MAGIC: u32 = 0x716c_6f70; // "qlop"
const IPV4_UDP_HEADERS: usize = 28;
const HEADER_LEN: usize = 4 + 2 + 8 + 8;

/// A rate held for a while.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Step {
    pub duration: Duration,
    pub pps: f64,
}

/// Packets per second over time.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub steps: Vec<Step>,
}

/// A rate band in packets per second, `[low, high]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Band {
    pub name: &'static str,
    pub low_pps: f64,
    pub high_pps: f64,
}

/// The bands of `seeds/004` §IV (256-byte packets).
pub const PAPER_BANDS: [Band; 3] = [
    Band {
        name: "low",
        low_pps: 400.0,
        high_pps: 1400.0,
    },
    Band {
        name: "medium",
        low_pps: 1500.0,
        high_pps: 2900.0,
    },
    Band {
        name: "high",
        low_pps: 3000.0,
        high_pps: 4000.0,
    },
];

impl Schedule {
    pub fn constant(pps: f64, duration: Duration) -> Schedule {
        Schedule {
            steps: vec![Step { duration, pps }],
        }
    }

    /// One step per band visit, each at a random rate within its band,
    /// drawn from a seeded generator so runs can be repeated.
    pub fn random_in_bands(visits: &[Band], step: Duration, seed: u64) -> Schedule {
        let mut rng = SplitMix(seed);
        Schedule {
            steps: visits
                .iter()
                .map(|b| Step {
                    duration: step,
                    pps: b.low_pps + rng.unit() * (b.high_pps - b.low_pps),
                })
                .collect(),
        }
    }

    pub fn total(&self) -> Duration {
        self.steps.iter().map(|s| s.duration).sum()
    }

    /// The rate at `t` from the start.
    fn pps_at(&self, t: Duration) -> f64 {
        let mut start = Duration::ZERO;
        for s in &self.steps {
            if t < start + s.duration {
                return s.pps;
            }
            start += s.duration;
        }
        0.0
    }

    /// Packets that should have been sent by `t` from the start.
    fn due(&self, t: Duration) -> u64 {
        let mut left = t;
        let mut due = 0.0;
        for s in &self.steps {
            let d = left.min(s.duration);
            due += d.as_secs_f64() * s.pps;
            left -= d;
            if left.is_zero() {
                break;
            }
        }
        due as u64
    }
}

/// A small deterministic generator (SplitMix64).
#[derive(Debug, Clone)]
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One generated flow.
#[derive(Debug, Clone)]
pub struct FlowGen {
    pub id: u16,
    pub bind: SocketAddrV4,
    pub dst: SocketAddrV4,
    /// IP packet length in bytes (IP + UDP headers included), ≥ 50.
    pub packet_len: usize,
    /// DSCP the sender marks packets with.
    pub dscp: u8,
    pub schedule: Schedule,
}

/// What a generator sent.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GenReport {
    pub flow: u16,
    pub packets: u64,
    pub bytes: u64,
    pub send_errors: u64,
    /// Packets not sent because the sender fell more than
    /// [`MAX_BACKLOG`] behind its schedule (a full link held it back): a
    /// source with a rate does not catch up later in a burst.
    pub skipped: u64,
    pub elapsed_s: f64,
}

/// How far behind its schedule a generator may fall before it skips.
pub const MAX_BACKLOG: Duration = Duration::from_millis(200);

/// Why traffic could not be generated or received.
#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: nix::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TrafficError {
    let what = what.into();
    move |source| TrafficError::Io { what, source }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Sends `flow` until its schedule ends or `stop` is set; bounded by the
/// schedule's duration and the packets it implies.
pub fn generate(flow: &FlowGen, stop: &AtomicBool) -> Result<GenReport, TrafficError> {
    if flow.packet_len < IPV4_UDP_HEADERS + HEADER_LEN || flow.packet_len > 1500 {
        return Err(TrafficError::Invalid(format!(
            "flow {}: packet length {} outside {}..=1500",
            flow.id,
            flow.packet_len,
            IPV4_UDP_HEADERS + HEADER_LEN
        )));
    }
    let sock = UdpSocket::bind(flow.bind).map_err(io(format!("binding {}", flow.bind)))?;
    set_tos(&sock, flow.dscp << 2)?;
    let mut payload = vec![0u8; flow.packet_len - IPV4_UDP_HEADERS];
    payload[..4].copy_from_slice(&MAGIC.to_be_bytes());
    payload[4..6].copy_from_slice(&flow.id.to_be_bytes());
    let total = flow.schedule.total();
    let limit = flow.schedule.due(total) + 1;
    let start = Instant::now();
    let mut report = GenReport {
        flow: flow.id,
        ..GenReport::default()
    };
    let mut seq: u64 = 0;
    while seq < limit && !stop.load(Ordering::Relaxed) {
        let elapsed = start.elapsed();
        if elapsed >= total {
            break;
        }
        let mut due = flow.schedule.due(elapsed).saturating_sub(report.skipped);
        let max_behind =
            (flow.schedule.pps_at(elapsed) * MAX_BACKLOG.as_secs_f64()).max(1.0) as u64;
        if due > seq + max_behind {
            report.skipped += due - seq - max_behind;
            due = seq + max_behind;
        }
        if seq >= due {
            // Sleep until about the next packet is due, in slices short
            // enough to follow rate changes and the stop flag.
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        while seq < due && seq < limit {
            payload[6..14].copy_from_slice(&seq.to_be_bytes());
            payload[14..22].copy_from_slice(&now_ns().to_be_bytes());
            match sock.send_to(&payload, flow.dst) {
                Ok(_) => {
                    report.packets += 1;
                    report.bytes += flow.packet_len as u64;
                }
                Err(_) => report.send_errors += 1,
            }
            seq += 1;
        }
    }
    report.elapsed_s = start.elapsed().as_secs_f64();
    Ok(report)
}

fn set_tos(sock: &UdpSocket, tos: u8) -> Result<(), TrafficError> {
    socket::setsockopt(sock, socket::sockopt::IpTos, &i32::from(tos)).map_err(|source| {
        TrafficError::Sys {
            what: "setting IP_TOS".into(),
            source,
        }
    })
}

/// What one flow delivered in one second.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FlowSecond {
    pub packets: u64,
    pub bytes: u64,
    /// Bytes by DSCP as delivered.
    pub bytes_by_dscp: BTreeMap<u8, u64>,
    pub max_delay_us: u64,
}

impl FlowSecond {
    pub fn kbps(&self) -> f64 {
        self.bytes as f64 * 8.0 / 1000.0
    }
    pub fn kbps_with_dscp(&self, dscp: u8) -> f64 {
        self.bytes_by_dscp.get(&dscp).copied().unwrap_or(0) as f64 * 8.0 / 1000.0
    }
}

/// Everything a sink saw of one flow.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FlowReceived {
    pub flow: u16,
    pub packets: u64,
    pub bytes: u64,
    /// Highest sequence number seen + 1: what the sender had sent by then.
    pub sent_by_last: u64,
    /// Seconds since the sink started → what arrived in that second.
    pub seconds: BTreeMap<u64, FlowSecond>,
}

impl FlowReceived {
    /// Packets missing among those sent up to the last one received.
    pub fn lost(&self) -> u64 {
        self.sent_by_last.saturating_sub(self.packets)
    }
}

/// A sink's results.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SinkReport {
    pub flows: BTreeMap<u16, FlowReceived>,
    /// Packets on the ports that did not carry a generator header.
    pub foreign: u64,
    pub started_ns: u64,
}

/// Receives on `ports` (all addresses of the namespace) until `stop` is set
/// or `limit` has passed; per-second bins count from the sink's start.
pub fn sink(ports: &[u16], stop: &AtomicBool, limit: Duration) -> Result<SinkReport, TrafficError> {
    sink_from(ports, stop, limit, Instant::now())
}

/// [`sink`] with per-second bins counted from `epoch` (e.g. the moment the
/// generators start), so that bins line up with a schedule.
pub fn sink_from(
    ports: &[u16],
    stop: &AtomicBool,
    limit: Duration,
    epoch: Instant,
) -> Result<SinkReport, TrafficError> {
    let swallow: Vec<UdpSocket> = ports
        .iter()
        .map(|p| {
            let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, *p))
                .map_err(io(format!("binding UDP port {p}")))?;
            s.set_nonblocking(true).map_err(io("non-blocking"))?;
            Ok(s)
        })
        .collect::<Result<_, TrafficError>>()?;
    let raw = socket::socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Udp,
    )
    .map_err(|source| TrafficError::Sys {
        what: "opening a raw socket (needs root)".into(),
        source,
    })?;
    let timeout = nix::sys::time::TimeVal::new(0, 100_000);
    socket::setsockopt(&raw, socket::sockopt::ReceiveTimeout, &timeout).map_err(|source| {
        TrafficError::Sys {
            what: "setting a receive timeout".into(),
            source,
        }
    })?;
    socket::setsockopt(&raw, socket::sockopt::RcvBuf, &(4 << 20)).map_err(|source| {
        TrafficError::Sys {
            what: "sizing the receive buffer".into(),
            source,
        }
    })?;
    let start = Instant::now();
    let mut report = SinkReport {
        started_ns: now_ns(),
        ..SinkReport::default()
    };
    let mut buf = vec![0u8; 65_536];
    let mut drain = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) && start.elapsed() < limit {
        for s in &swallow {
            while s.recv(&mut drain).is_ok() {}
        }
        let n = match socket::recv(
            std::os::fd::AsRawFd::as_raw_fd(&raw),
            &mut buf,
            socket::MsgFlags::empty(),
        ) {
            Ok(n) => n,
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => continue,
            Err(source) => {
                return Err(TrafficError::Sys {
                    what: "receiving".into(),
                    source,
                })
            }
        };
        let second = epoch.elapsed().as_secs();
        account(&buf[..n], ports, second, &mut report);
    }
    Ok(report)
}

/// Accounts one raw IPv4 packet.
fn account(pkt: &[u8], ports: &[u16], second: u64, report: &mut SinkReport) {
    if pkt.len() < 20 || pkt[0] >> 4 != 4 {
        return;
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    let tos = pkt[1];
    let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    if pkt.len() < ihl + 8 {
        return;
    }
    let dport = u16::from_be_bytes([pkt[ihl + 2], pkt[ihl + 3]]);
    if !ports.contains(&dport) {
        return;
    }
    let payload = &pkt[ihl + 8..];
    if payload.len() < HEADER_LEN || payload[..4] != MAGIC.to_be_bytes() {
        report.foreign += 1;
        return;
    }
    let id = u16::from_be_bytes([payload[4], payload[5]]);
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&payload[6..14]);
    let mut sent = [0u8; 8];
    sent.copy_from_slice(&payload[14..22]);
    let delay_us = now_ns().saturating_sub(u64::from_be_bytes(sent)) / 1000;
    let flow = report.flows.entry(id).or_insert_with(|| FlowReceived {
        flow: id,
        ..FlowReceived::default()
    });
    flow.packets += 1;
    flow.bytes += total as u64;
    flow.sent_by_last = flow.sent_by_last.max(u64::from_be_bytes(seq) + 1);
    let s = flow.seconds.entry(second).or_default();
    s.packets += 1;
    s.bytes += total as u64;
    *s.bytes_by_dscp.entry(tos >> 2).or_default() += total as u64;
    s.max_delay_us = s.max_delay_us.max(delay_us);
}

/// A stop flag shared by generators and sinks.
pub fn stop_flag() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

/// `SocketAddr` → `SocketAddrV4`, or an error naming it.
pub fn v4(addr: SocketAddr) -> Result<SocketAddrV4, TrafficError> {
    match addr {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(a) => Err(TrafficError::Invalid(format!(
            "{a}: the generator speaks IPv4"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_count_due_packets() {
        let s = Schedule {
            steps: vec![
                Step {
                    duration: Duration::from_secs(2),
                    pps: 100.0,
                },
                Step {
                    duration: Duration::from_secs(1),
                    pps: 1000.0,
                },
            ],
        };
        assert_eq!(s.due(Duration::from_secs(1)), 100);
        assert_eq!(s.due(Duration::from_secs(2)), 200);
        assert_eq!(s.due(Duration::from_millis(2500)), 700);
        assert_eq!(s.due(Duration::from_secs(10)), 1200);
        assert_eq!(s.total(), Duration::from_secs(3));
        assert_eq!(s.pps_at(Duration::from_millis(1999)), 100.0);
        assert_eq!(s.pps_at(Duration::from_secs(2)), 1000.0);
        assert_eq!(s.pps_at(Duration::from_secs(3)), 0.0);
    }

    #[test]
    fn random_bands_stay_inside_and_repeat_with_the_seed() {
        let visits = [
            PAPER_BANDS[0],
            PAPER_BANDS[1],
            PAPER_BANDS[2],
            PAPER_BANDS[0],
        ];
        let a = Schedule::random_in_bands(&visits, Duration::from_secs(20), 7);
        let b = Schedule::random_in_bands(&visits, Duration::from_secs(20), 7);
        assert_eq!(a, b);
        for (s, band) in a.steps.iter().zip(visits) {
            assert!(
                s.pps >= band.low_pps && s.pps <= band.high_pps,
                "{s:?} outside {band:?}"
            );
        }
        // 256-byte packets: every band's bits/s lie within the paper's thresholds.
        let kbps = |pps: f64| pps * 256.0 * 8.0 / 1000.0;
        assert!(kbps(PAPER_BANDS[0].high_pps) < 3000.0);
        assert!(kbps(PAPER_BANDS[1].low_pps) >= 3000.0 && kbps(PAPER_BANDS[1].high_pps) < 6000.0);
        assert!(kbps(PAPER_BANDS[2].low_pps) >= 6000.0);
    }

    #[test]
    fn the_sink_parses_what_the_generator_writes() {
        let mut pkt = vec![0u8; 256];
        pkt[0] = 0x45;
        pkt[1] = 48 << 2;
        pkt[2..4].copy_from_slice(&256u16.to_be_bytes());
        pkt[22..24].copy_from_slice(&4055u16.to_be_bytes());
        pkt[28..32].copy_from_slice(&MAGIC.to_be_bytes());
        pkt[32..34].copy_from_slice(&7u16.to_be_bytes());
        pkt[34..42].copy_from_slice(&9u64.to_be_bytes());
        let mut r = SinkReport::default();
        account(&pkt, &[4055], 3, &mut r);
        account(&pkt[..20], &[4055], 3, &mut r);
        let f = &r.flows[&7];
        assert_eq!(
            (f.packets, f.bytes, f.sent_by_last, f.lost()),
            (1, 256, 10, 9)
        );
        assert_eq!(f.seconds[&3].bytes_by_dscp[&48], 256);
        account(&pkt, &[9999], 3, &mut r);
        assert_eq!(r.flows[&7].packets, 1, "other ports are not counted");
    }
}
