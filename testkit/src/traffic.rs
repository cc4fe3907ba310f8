//! Traffic for experiments: a bounded, paced UDP generator with schedules
//! (constant, steps, random rates within bands as in `seeds/004`), and a
//! sink that records, per second and per flow, what arrived — bytes, DSCP
//! mix, loss (from sequence numbers the generator writes into each
//! datagram) and one-way delay — and, for tests, every packet's kernel
//! receive time ([`sink_timestamped`]).
//!
//! Both are meant to run on threads inside namespaces
//! ([`crate::harness::Netns::spawn_in`]). The sink reads a raw socket so it
//! sees each packet's IP header (its DSCP as delivered); plain UDP sockets
//! bound on the same ports swallow the datagrams so that no ICMP errors go
//! back. When told to stop it still reads what its socket holds. A test's
//! sink ([`sink_timestamped`]) stops when what it has received satisfies
//! the test ([`StopWhen`]: e.g. every packet the kernel's counters say was
//! forwarded), not after a fixed time, so that a busy host slows a test
//! down but cannot make it miss packets.

use crate::inprofile::{self, Arrival, ProfileStep};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockProtocol, SockType};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::IoSliceMut;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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
    /// Packets by DSCP as delivered.
    pub packets_by_dscp: BTreeMap<u8, u64>,
    /// Every packet's kernel receive time (`SO_TIMESTAMPNS`) and IP length,
    /// by DSCP as delivered, in order of arrival: kept by
    /// [`sink_timestamped`] only.
    #[serde(skip)]
    pub arrivals: BTreeMap<u8, Vec<Arrival>>,
}

impl FlowReceived {
    /// Packets missing among those sent up to the last one received.
    pub fn lost(&self) -> u64 {
        self.sent_by_last.saturating_sub(self.packets)
    }

    /// Packets that arrived carrying `dscp`.
    pub fn packets_with_dscp(&self, dscp: u8) -> u64 {
        self.packets_by_dscp.get(&dscp).copied().unwrap_or(0)
    }

    /// The kernel-timestamped arrivals carrying `dscp` ([`sink_timestamped`]).
    pub fn arrivals_with_dscp(&self, dscp: u8) -> &[Arrival] {
        self.arrivals.get(&dscp).map_or(&[], Vec::as_slice)
    }

    /// Every kernel-timestamped arrival, whatever its DSCP, in time order.
    pub fn all_arrivals(&self) -> Vec<Arrival> {
        let mut all: Vec<Arrival> = self.arrivals.values().flatten().copied().collect();
        all.sort_by_key(|a| a.at_ns);
        all
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
    run_sink(
        ports,
        &|_| stop.load(Ordering::Relaxed),
        limit,
        Instant::now(),
        None,
    )
}

/// [`sink`] with per-second bins counted from `epoch` (e.g. the moment the
/// generators start), so that bins line up with a schedule.
pub fn sink_from(
    ports: &[u16],
    stop: &AtomicBool,
    limit: Duration,
    epoch: Instant,
) -> Result<SinkReport, TrafficError> {
    run_sink(ports, &|_| stop.load(Ordering::Relaxed), limit, epoch, None)
}

/// A sink that keeps every packet's kernel receive time
/// ([`FlowReceived::arrivals`]), for bounds in kernel time — a token
/// bucket's `rate × T + bucket` over every window — which a busy host
/// cannot move, unlike the moment the sink's thread gets to read a packet.
/// It receives until `until` holds for what it has (then reads what its
/// socket still holds) or `limit` has passed.
pub fn sink_timestamped(
    ports: &[u16],
    until: &StopWhen,
    limit: Duration,
) -> Result<SinkReport, TrafficError> {
    let ready = || until.ready.store(true, Ordering::Release);
    run_sink(
        ports,
        &|r| until.holds(r),
        limit,
        Instant::now(),
        Some(&ready),
    )
}

/// When a [`sink_timestamped`] stops: a condition on what it has received,
/// set by the test once it knows what must arrive (from the kernel's
/// counters: a sender's count, a meter's, a class's) — never before, so a
/// sink started before the traffic keeps receiving until then.
/// It also says when the sink is ready: listening, with packets stamped on
/// arrival ([`StopWhen::wait_ready`]).
#[derive(Clone, Default)]
pub struct StopWhen {
    done: Arc<Mutex<Option<Condition>>>,
    ready: Arc<AtomicBool>,
}

type Condition = Box<dyn Fn(&SinkReport) -> bool + Send>;

impl StopWhen {
    pub fn new() -> StopWhen {
        StopWhen::default()
    }

    /// Waits until the sink listens with packets stamped on arrival (at
    /// most `deadline`: `false` when it does not, e.g. it failed — its
    /// result says why).
    pub fn wait_ready(&self, deadline: Duration) -> bool {
        let end = Instant::now() + deadline;
        while !self.ready.load(Ordering::Acquire) {
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// The sink stops once `done` holds for what it has received.
    pub fn set(&self, done: impl Fn(&SinkReport) -> bool + Send + 'static) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(done));
    }

    /// The sink stops now (what it has is what the test wants).
    pub fn now(&self) {
        self.set(|_| true);
    }

    fn holds(&self, report: &SinkReport) -> bool {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|done| done(report))
    }
}

impl std::fmt::Debug for StopWhen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StopWhen")
    }
}

/// Packets of flow `flow` that arrived with `dscp` (0 when none did).
pub fn packets_with_dscp(report: &SinkReport, flow: u16, dscp: u8) -> u64 {
    report
        .flows
        .get(&flow)
        .map_or(0, |f| f.packets_with_dscp(dscp))
}

/// The windows a test checks a token bucket's bound over: a short one
/// catches a burst, the longer ones a rate (a bucket of one second of the
/// rate hides a doubled rate from windows of a second or less).
pub const BOUND_WINDOWS: [Duration; 3] = [
    Duration::from_millis(250),
    Duration::from_secs(1),
    Duration::from_secs(4),
];

/// Where kernel-timestamped `arrivals` break the bound `steps` — at most
/// `rate × T + bucket` bytes in every window of `T` of each length in
/// `windows` ([`inprofile::check_windows`]) — by more than
/// `tolerance_bytes`: one line per window length that does, naming
/// `what`. Every worst window is printed for humans.
pub fn bound_misses(
    what: &str,
    arrivals: &[Arrival],
    steps: &[ProfileStep],
    windows: &[Duration],
    tolerance_bytes: f64,
) -> Vec<String> {
    let epoch = steps.first().map_or(0, |s| s.from_ns);
    let at = |ns: u64| (ns as f64 - epoch as f64) / 1e9;
    windows
        .iter()
        .filter_map(|w| {
            let c = inprofile::check_windows(arrivals, *w, steps);
            let line = format!(
                "{what}: {} packets; fullest {} ms window from {:.2} s: {} B, bound rate × T + bucket {:.0} B, excess {:+.0} B",
                arrivals.len(),
                c.window_ms,
                at(c.worst_start_ns),
                c.worst_bytes,
                c.worst_bound_bytes,
                c.worst_excess_bytes
            );
            eprintln!("{line}");
            (!c.holds(tolerance_bytes)).then_some(line)
        })
        .collect()
}

/// The raw socket's receive buffer: what it holds while the sink's thread
/// waits for a core (root may set it beyond `net.core.rmem_max`).
const SINK_RCVBUF: usize = 32 << 20;

fn run_sink(
    ports: &[u16],
    stop: &dyn Fn(&SinkReport) -> bool,
    limit: Duration,
    epoch: Instant,
    // Keep arrivals, and say when ready to.
    timestamped: Option<&dyn Fn()>,
) -> Result<SinkReport, TrafficError> {
    let keep_arrivals = timestamped.is_some();
    let sys = |what: &str| {
        let what = what.to_owned();
        move |source| TrafficError::Sys { what, source }
    };
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
    .map_err(sys("opening a raw socket (needs root)"))?;
    let timeout = nix::sys::time::TimeVal::new(0, 100_000);
    socket::setsockopt(&raw, socket::sockopt::ReceiveTimeout, &timeout)
        .map_err(sys("setting a receive timeout"))?;
    socket::setsockopt(&raw, socket::sockopt::RcvBufForce, &SINK_RCVBUF)
        .or_else(|_| socket::setsockopt(&raw, socket::sockopt::RcvBuf, &SINK_RCVBUF))
        .map_err(sys("sizing the receive buffer"))?;
    socket::setsockopt(&raw, socket::sockopt::ReceiveTimestampns, &true)
        .map_err(sys("asking for receive timestamps"))?;
    if let Some(ready) = timestamped {
        wait_for_kernel_timestamps()?;
        ready();
    }
    let start = Instant::now();
    let mut report = SinkReport {
        started_ns: now_ns(),
        ..SinkReport::default()
    };
    let mut buf = vec![0u8; 65_536];
    let mut drain = [0u8; 2048];
    let mut cmsg = nix::cmsg_space!(nix::sys::time::TimeSpec);
    // Once stopped, what the socket still holds is read without waiting.
    let mut draining = false;
    loop {
        if !draining && (stop(&report) || start.elapsed() >= limit) {
            draining = true;
        }
        for s in &swallow {
            while s.recv(&mut drain).is_ok() {}
        }
        let flags = if draining {
            socket::MsgFlags::MSG_DONTWAIT
        } else {
            socket::MsgFlags::empty()
        };
        let mut iov = [IoSliceMut::new(&mut buf)];
        let (n, at_ns) =
            match socket::recvmsg::<()>(raw.as_raw_fd(), &mut iov, Some(&mut cmsg), flags) {
                Ok(msg) => (msg.bytes, kernel_time(&msg).unwrap_or_else(now_ns)),
                Err(nix::errno::Errno::EAGAIN) if draining => break,
                Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => continue,
                Err(source) => return Err(sys("receiving")(source)),
            };
        let second = epoch.elapsed().as_secs();
        let seen = Seen {
            second,
            at_ns,
            keep_arrival: keep_arrivals,
        };
        account(&buf[..n], ports, seen, &mut report);
    }
    Ok(report)
}

/// Waits until the kernel stamps packets as they arrive. Receive
/// timestamps are switched on host-wide when the first socket asks for
/// them, a moment later (a static key flipped from a work queue); until
/// then a packet is stamped when it is read — late, and many at once, when
/// the reader waited for a core. A probe sent to itself over loopback
/// tells: stamped before the probe's reader slept, not after. Call it once
/// the receiving socket has asked for timestamps (it keeps them on).
pub fn wait_for_kernel_timestamps() -> Result<(), TrafficError> {
    let probe = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
        .map_err(io("binding a timestamp probe on 127.0.0.1"))?;
    socket::setsockopt(&probe, socket::sockopt::ReceiveTimestampns, &true).map_err(|source| {
        TrafficError::Sys {
            what: "asking for receive timestamps".into(),
            source,
        }
    })?;
    probe
        .set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(io("probe timeout"))?;
    let to = probe.local_addr().map_err(io("probe address"))?;
    let end = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 16];
    let mut cmsg = nix::cmsg_space!(nix::sys::time::TimeSpec);
    while Instant::now() < end {
        probe.send_to(b"probe", to).map_err(io("sending a probe"))?;
        std::thread::sleep(Duration::from_millis(5));
        let slept = now_ns();
        let mut iov = [IoSliceMut::new(&mut buf)];
        if let Ok(msg) = socket::recvmsg::<()>(
            probe.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            socket::MsgFlags::empty(),
        ) {
            if kernel_time(&msg).is_some_and(|at| at < slept) {
                return Ok(());
            }
        }
    }
    Err(TrafficError::Invalid(
        "the kernel did not start stamping packets on arrival within 60 s".into(),
    ))
}

/// The kernel receive time a message carries (`SO_TIMESTAMPNS`), ns since
/// the Unix epoch.
pub(crate) fn kernel_time(msg: &socket::RecvMsg<'_, '_, ()>) -> Option<u64> {
    msg.cmsgs().ok()?.find_map(|c| match c {
        socket::ControlMessageOwned::ScmTimestampns(ts) => {
            Some(ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64)
        }
        _ => None,
    })
}

/// When a packet was read: the sink's second, the kernel's receive time,
/// and whether to keep it as an [`Arrival`].
#[derive(Debug, Clone, Copy)]
struct Seen {
    second: u64,
    at_ns: u64,
    keep_arrival: bool,
}

/// Accounts one raw IPv4 packet.
fn account(pkt: &[u8], ports: &[u16], seen: Seen, report: &mut SinkReport) {
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
    let dscp = tos >> 2;
    flow.packets += 1;
    flow.bytes += total as u64;
    flow.sent_by_last = flow.sent_by_last.max(u64::from_be_bytes(seq) + 1);
    *flow.packets_by_dscp.entry(dscp).or_default() += 1;
    if seen.keep_arrival {
        flow.arrivals.entry(dscp).or_default().push(Arrival {
            at_ns: seen.at_ns,
            bytes: total as u32,
        });
    }
    let s = flow.seconds.entry(seen.second).or_default();
    s.packets += 1;
    s.bytes += total as u64;
    *s.bytes_by_dscp.entry(dscp).or_default() += total as u64;
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
        let seen = Seen {
            second: 3,
            at_ns: 42,
            keep_arrival: true,
        };
        account(&pkt, &[4055], seen, &mut r);
        account(&pkt[..20], &[4055], seen, &mut r);
        let f = &r.flows[&7];
        assert_eq!(
            (f.packets, f.bytes, f.sent_by_last, f.lost()),
            (1, 256, 10, 9)
        );
        assert_eq!(f.seconds[&3].bytes_by_dscp[&48], 256);
        assert_eq!((f.packets_with_dscp(48), f.packets_with_dscp(0)), (1, 0));
        assert_eq!(
            f.arrivals_with_dscp(48),
            &[Arrival {
                at_ns: 42,
                bytes: 256
            }]
        );
        account(&pkt, &[9999], seen, &mut r);
        assert_eq!(r.flows[&7].packets, 1, "other ports are not counted");
        let untimed = Seen {
            keep_arrival: false,
            ..seen
        };
        account(&pkt, &[4055], untimed, &mut r);
        assert_eq!(r.flows[&7].packets, 2);
        assert_eq!(r.flows[&7].all_arrivals().len(), 1, "kept when asked only");
    }
}
