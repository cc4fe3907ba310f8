//! The in-profile contract of a decision, checked at the receiver.
//!
//! A decision meters its flow with a token bucket: packets the bucket has
//! tokens for are *in profile* and leave marked with the decision's
//! in-profile DSCP (CS6 in the paper), the rest are out of profile. The
//! contract is the bucket's own: over any window of `T` seconds, the
//! in-profile bytes are at most `rate × T + bucket`, where `bucket` is what
//! the bucket can hold ([`bucket_bytes`]). It must hold across decision
//! changes too: an enforcer that starts a fresh, full bucket at every change
//! lets one bucket of out-of-profile traffic through as premium each time.
//!
//! [`record`] timestamps, in the kernel (`SO_TIMESTAMPNS`), every packet of
//! one UDP port that arrives with one DSCP; [`check_windows`] slides a
//! window of `T` over them (every window that starts at an arrival: the
//! fullest windows start at one) and reports the largest excess over the
//! bound. The bound may change over time ([`ProfileStep`]): a rate change
//! is integrated, and the largest bucket in force during the window counts.

use crate::traffic::TrafficError;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockProtocol, SockType};
use qosloop_schema::TrafficProfile;
use serde::Serialize;
use std::io::IoSliceMut;
use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What a profile's token bucket holds, in bytes, as the enforcer sizes it
/// ([`TrafficProfile::bucket_bytes`], docs/enforcer.md): one second of the
/// profile rate plus the meter's burst. nftables sizes a byte `limit`'s
/// bucket as `unit × (rate + burst) / rate` with a unit of at least one
/// second, so a bucket is never smaller than one second of its rate.
pub fn bucket_bytes(profile: &TrafficProfile) -> u64 {
    profile.bucket_bytes()
}

/// One packet as it arrived: kernel receive time (ns since the Unix epoch)
/// and its IP length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Arrival {
    pub at_ns: u64,
    pub bytes: u32,
}

/// What [`record`] kept.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Recorded {
    pub arrivals: Vec<Arrival>,
    /// Matching packets not kept because `max_packets` was reached.
    pub over_limit: u64,
}

/// A profile in force from `from_ns` (same clock as [`Arrival::at_ns`])
/// until the next step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ProfileStep {
    pub from_ns: u64,
    pub rate_bytes_per_s: f64,
    pub bucket_bytes: f64,
}

impl ProfileStep {
    pub fn of(from_ns: u64, profile: &TrafficProfile) -> ProfileStep {
        ProfileStep {
            from_ns,
            rate_bytes_per_s: profile.rate.bytes_per_sec() as f64,
            bucket_bytes: bucket_bytes(profile) as f64,
        }
    }
}

/// The worst window of one length.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct WindowCheck {
    pub window_ms: u64,
    /// Windows examined (one per arrival).
    pub windows: usize,
    /// The window with the largest excess: where it starts, what it held,
    /// what the contract allowed, and by how much it went over (negative:
    /// headroom left in the fullest window).
    pub worst_start_ns: u64,
    pub worst_bytes: u64,
    pub worst_bound_bytes: f64,
    pub worst_excess_bytes: f64,
}

impl WindowCheck {
    /// Whether the worst window stays within the bound plus `tolerance_bytes`.
    pub fn holds(&self, tolerance_bytes: f64) -> bool {
        self.worst_excess_bytes <= tolerance_bytes
    }
}

/// Now, in ns since the Unix epoch (the clock of `SO_TIMESTAMPNS`).
pub fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The contract's bound for the window `[start, end]`: the profile rate
/// integrated over the window plus the largest bucket in force during it.
/// Before the first step nothing is in profile (bound 0).
fn bound(steps: &[ProfileStep], start: u64, end: u64) -> f64 {
    let mut integral = 0.0;
    let mut bucket: f64 = 0.0;
    for (i, s) in steps.iter().enumerate() {
        let until = steps.get(i + 1).map_or(u64::MAX, |n| n.from_ns);
        let (a, b) = (s.from_ns.max(start), until.min(end));
        if until <= start || s.from_ns > end {
            continue;
        }
        integral += s.rate_bytes_per_s * (b.saturating_sub(a)) as f64 / 1e9;
        bucket = bucket.max(s.bucket_bytes);
    }
    integral + bucket
}

/// Slides a window of `window` over `arrivals` (sorted by time) and
/// returns the one that exceeds `steps`' bound the most.
pub fn check_windows(arrivals: &[Arrival], window: Duration, steps: &[ProfileStep]) -> WindowCheck {
    let t = window.as_nanos() as u64;
    let mut check = WindowCheck {
        window_ms: window.as_millis() as u64,
        windows: arrivals.len(),
        worst_start_ns: 0,
        worst_bytes: 0,
        worst_bound_bytes: 0.0,
        worst_excess_bytes: f64::NEG_INFINITY,
    };
    let mut end = 0;
    let mut bytes: u64 = 0;
    for (i, a) in arrivals.iter().enumerate() {
        if i > 0 {
            bytes -= u64::from(arrivals[i - 1].bytes);
        }
        end = end.max(i);
        while end < arrivals.len() && arrivals[end].at_ns <= a.at_ns + t {
            bytes += u64::from(arrivals[end].bytes);
            end += 1;
        }
        let limit = bound(steps, a.at_ns, a.at_ns + t);
        let excess = bytes as f64 - limit;
        if excess > check.worst_excess_bytes {
            check.worst_start_ns = a.at_ns;
            check.worst_bytes = bytes;
            check.worst_bound_bytes = limit;
            check.worst_excess_bytes = excess;
        }
    }
    if arrivals.is_empty() {
        // Nothing arrived: nothing to exceed (`windows` says so).
        check.worst_excess_bytes = 0.0;
    }
    check
}

/// The worst window of one length among those that start within one
/// window length of a decision change.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AroundChange {
    pub change_ns: u64,
    pub window: WindowCheck,
    /// The fullest window's in-profile bytes above `rate × T` alone: the
    /// spike a refilled bucket shows (at most one bucket when it holds).
    pub above_rate_bytes: f64,
}

/// The in-profile contract over a whole run: every sliding window of each
/// length, and the windows around each decision change.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Contract {
    pub packets: usize,
    pub bucket_bytes: f64,
    /// Slack for where a window's edge falls: one packet.
    pub tolerance_bytes: f64,
    pub windows: Vec<WindowCheck>,
    pub around_changes: Vec<AroundChange>,
    /// For a flow offered above its profile throughout (its bucket empty
    /// at every change): the most a change may add above `rate × T` — the
    /// meter's burst. A change that refills the bucket shows a spike of a
    /// whole bucket (Fig. 10 before named limits). `None`: not checked.
    pub change_spike_limit_bytes: Option<f64>,
    /// The first install: its bucket starts full, it is not a change.
    pub first_install_ns: Option<u64>,
}

impl Contract {
    /// The largest excess over the bound of any window (negative: headroom).
    pub fn largest_excess_bytes(&self) -> f64 {
        self.windows
            .iter()
            .map(|w| w.worst_excess_bytes)
            .fold(f64::NEG_INFINITY, f64::max)
    }

    /// One line per window length whose worst window breaks the contract,
    /// times in seconds from `epoch_ns`.
    pub fn misses(&self, epoch_ns: u64) -> Vec<String> {
        let at = |ns: u64| (ns as f64 - epoch_ns as f64) / 1e9;
        let spikes = self.change_spike_limit_bytes.into_iter().flat_map(|limit| {
            self.around_changes
                .iter()
                .filter(move |a| {
                    Some(a.change_ns) != self.first_install_ns
                        && a.window.windows > 0
                        && a.above_rate_bytes > limit + self.tolerance_bytes
                })
                .map(move |a| {
                    format!(
                        "in-profile (CS6) output around the decision change at {:.2} s: {:.0} B above rate × T in a {} ms window from {:.2} s, more than the meter's burst {limit:.0} B (the bucket was refilled)",
                        at(a.change_ns),
                        a.above_rate_bytes,
                        a.window.window_ms,
                        at(a.window.worst_start_ns)
                    )
                })
        });
        self.windows
            .iter()
            .filter(|w| !w.holds(self.tolerance_bytes))
            .map(|w| {
                format!(
                    "in-profile (CS6) output over {} ms windows: {} B from {:.2} s, bound rate × T + bucket = {:.0} B: over by {:.0} B",
                    w.window_ms,
                    w.worst_bytes,
                    (w.worst_start_ns as f64 - epoch_ns as f64) / 1e9,
                    w.worst_bound_bytes,
                    w.worst_excess_bytes
                )
            })
            .chain(spikes)
            .collect()
    }
}

/// Checks `arrivals` against `steps` over every window of each length in
/// `windows`, and separately around each of `changes_ns`.
pub fn contract(
    arrivals: &[Arrival],
    steps: &[ProfileStep],
    changes_ns: &[u64],
    windows: &[Duration],
    tolerance_bytes: f64,
) -> Contract {
    let mut around_changes = Vec::new();
    for &c in changes_ns {
        for w in windows {
            let t = w.as_nanos() as u64;
            let (from, to) = (c.saturating_sub(t), c + 2 * t);
            let lo = arrivals.partition_point(|a| a.at_ns < from);
            let hi = arrivals.partition_point(|a| a.at_ns <= to);
            let window = check_windows(&arrivals[lo..hi], *w, steps);
            let rate_part = window.worst_bound_bytes - max_bucket(steps, window.worst_start_ns, t);
            around_changes.push(AroundChange {
                change_ns: c,
                window,
                above_rate_bytes: window.worst_bytes as f64 - rate_part,
            });
        }
    }
    Contract {
        packets: arrivals.len(),
        bucket_bytes: steps.iter().map(|s| s.bucket_bytes).fold(0.0, f64::max),
        tolerance_bytes,
        windows: windows
            .iter()
            .map(|w| check_windows(arrivals, *w, steps))
            .collect(),
        around_changes,
        change_spike_limit_bytes: None,
        first_install_ns: changes_ns.first().copied(),
    }
}

/// The largest bucket in force during the window of `t` ns from `start`.
fn max_bucket(steps: &[ProfileStep], start: u64, t: u64) -> f64 {
    bound(steps, start, start + t) - bound(&rate_only(steps), start, start + t)
}

fn rate_only(steps: &[ProfileStep]) -> Vec<ProfileStep> {
    steps
        .iter()
        .map(|s| ProfileStep {
            bucket_bytes: 0.0,
            ..*s
        })
        .collect()
}

/// Records, until `stop` is set or `limit` has passed, every IPv4 UDP
/// packet to `port` that arrives carrying `dscp`, with its kernel receive
/// time; keeps at most `max_packets` (counting the rest). Needs root (a raw
/// socket); the UDP port itself must be bound by someone else (a sink) so
/// that no ICMP errors go back.
pub fn record(
    port: u16,
    dscp: u8,
    stop: &AtomicBool,
    limit: Duration,
    max_packets: usize,
) -> Result<Recorded, TrafficError> {
    let sys = |what: &str| {
        let what = what.to_owned();
        move |source| TrafficError::Sys { what, source }
    };
    let raw = socket::socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Udp,
    )
    .map_err(sys("opening a raw socket (needs root)"))?;
    socket::setsockopt(
        &raw,
        socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(0, 100_000),
    )
    .map_err(sys("setting a receive timeout"))?;
    socket::setsockopt(&raw, socket::sockopt::RcvBuf, &(4 << 20))
        .map_err(sys("sizing the receive buffer"))?;
    socket::setsockopt(&raw, socket::sockopt::ReceiveTimestampns, &true)
        .map_err(sys("asking for receive timestamps"))?;
    let start = Instant::now();
    let mut out = Recorded::default();
    let mut buf = vec![0u8; 65_536];
    let mut cmsg = nix::cmsg_space!(nix::sys::time::TimeSpec);
    while !stop.load(Ordering::Relaxed) && start.elapsed() < limit {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let (n, at_ns) = match socket::recvmsg::<()>(
            raw.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            socket::MsgFlags::empty(),
        ) {
            Ok(msg) => {
                let at = msg
                    .cmsgs()
                    .ok()
                    .into_iter()
                    .flatten()
                    .find_map(|c| match c {
                        socket::ControlMessageOwned::ScmTimestampns(ts) => {
                            Some(ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64)
                        }
                        _ => None,
                    });
                (msg.bytes, at.unwrap_or_else(wall_ns))
            }
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(sys("receiving")(e)),
        };
        if let Some(bytes) = matching(&buf[..n], port, dscp) {
            if out.arrivals.len() < max_packets {
                out.arrivals.push(Arrival { at_ns, bytes });
            } else {
                out.over_limit += 1;
            }
        }
    }
    out.arrivals.sort_by_key(|a| a.at_ns);
    Ok(out)
}

/// The IP length of an IPv4 UDP packet to `port` carrying `dscp`.
fn matching(pkt: &[u8], port: u16, dscp: u8) -> Option<u32> {
    if pkt.len() < 20 || pkt[0] >> 4 != 4 || pkt[1] >> 2 != dscp {
        return None;
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    let dport = pkt.get(ihl + 2..ihl + 4)?;
    (u16::from_be_bytes([dport[0], dport[1]]) == port)
        .then(|| u32::from(u16::from_be_bytes([pkt[2], pkt[3]])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use qosloop_schema::Kbps;

    const MS: u64 = 1_000_000;

    fn every(start_ms: u64, gap_ms: u64, n: u64, bytes: u32) -> Vec<Arrival> {
        (0..n)
            .map(|i| Arrival {
                at_ns: (start_ms + i * gap_ms) * MS,
                bytes,
            })
            .collect()
    }

    fn profile() -> TrafficProfile {
        TrafficProfile {
            rate: Kbps(1000),
            burst_bytes: 15_000,
        }
    }

    #[test]
    fn the_bucket_is_one_second_of_rate_plus_the_burst() {
        assert_eq!(bucket_bytes(&profile()), 125_000 + 15_000);
    }

    #[test]
    fn a_flow_at_its_rate_after_one_bucket_holds_the_contract() {
        // One full bucket at once, then exactly the rate: 1000 B every 8 ms.
        let mut a = vec![Arrival {
            at_ns: 0,
            bytes: 140_000,
        }];
        a.extend(every(8, 8, 1000, 1000));
        let steps = [ProfileStep::of(0, &profile())];
        for w in [250, 1000] {
            let c = check_windows(&a, Duration::from_millis(w), &steps);
            assert!(c.holds(0.0), "{c:?}");
            assert_eq!(c.windows, 1001);
        }
    }

    #[test]
    fn a_refilled_bucket_at_each_change_is_an_excess() {
        // Two buckets within one second (a change refilled it): 280 kB + rate.
        let a = vec![
            Arrival {
                at_ns: 0,
                bytes: 140_000,
            },
            Arrival {
                at_ns: 500 * MS,
                bytes: 140_000,
            },
        ];
        let steps = [ProfileStep::of(0, &profile())];
        let c = check_windows(&a, Duration::from_secs(1), &steps);
        // Bound over [0, 1 s]: 125,000 + 140,000.
        assert_eq!(c.worst_bytes, 280_000);
        assert_eq!(c.worst_bound_bytes, 265_000.0);
        assert_eq!(c.worst_excess_bytes, 15_000.0);
        assert!(!c.holds(1000.0));
        assert_eq!(c.worst_start_ns, 0);
    }

    #[test]
    fn nothing_is_in_profile_before_the_first_step_and_rates_integrate() {
        let a = every(0, 1, 1, 100);
        let steps = [ProfileStep::of(10 * MS, &profile())];
        let c = check_windows(&a, Duration::from_millis(5), &steps);
        assert_eq!(c.worst_bound_bytes, 0.0);
        assert!(!c.holds(0.0));
        // Half a second at 125,000 B/s, half at 250,000 B/s, largest bucket.
        let faster = TrafficProfile {
            rate: Kbps(2000),
            burst_bytes: 15_000,
        };
        let steps = [
            ProfileStep::of(0, &profile()),
            ProfileStep::of(500 * MS, &faster),
        ];
        assert_eq!(
            bound(&steps, 0, 1000 * MS),
            62_500.0 + 125_000.0 + 265_000.0
        );
        assert_eq!(bound(&steps, 0, 400 * MS), 50_000.0 + 140_000.0);
    }

    #[test]
    fn a_run_reports_its_largest_excess_and_the_spike_at_each_change() {
        // At the rate throughout, one extra bucket at 2 s (a refill).
        let mut a = every(0, 8, 500, 1000);
        a.push(Arrival {
            at_ns: 2000 * MS,
            bytes: 140_000,
        });
        a.sort_by_key(|a| a.at_ns);
        let steps = [ProfileStep::of(0, &profile())];
        let windows = [Duration::from_millis(250), Duration::from_secs(1)];
        let c = contract(&a, &steps, &[2000 * MS], &windows, 1000.0);
        assert_eq!(c.packets, 501);
        assert_eq!(c.windows.len(), 2);
        // The refill stays within one bucket: rate × T + bucket holds.
        assert!(c.misses(0).is_empty(), "{:?}", c.misses(0));
        assert!(c.largest_excess_bytes() <= 1000.0);
        assert_eq!(c.around_changes.len(), 2);
        let one_s = c.around_changes[1];
        assert_eq!(one_s.window.window_ms, 1000);
        // 140,000 B above the rate's 125 packets a second.
        assert!(
            (one_s.above_rate_bytes - 140_000.0).abs() <= 1000.0,
            "{one_s:?}"
        );
        // A flow above its profile throughout has an empty bucket at a
        // change: a refill is a spike of a whole bucket, more than a burst.
        let mut spiky = c.clone();
        spiky.change_spike_limit_bytes = Some(15_000.0);
        spiky.first_install_ns = Some(0);
        let m = spiky.misses(0);
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(m[0].contains("change at 2.00 s"), "{}", m[0]);
        spiky.first_install_ns = Some(2000 * MS);
        assert!(spiky.misses(0).is_empty());
        // Two refills in a second break it, and say so.
        a.push(Arrival {
            at_ns: 2500 * MS,
            bytes: 140_000,
        });
        a.sort_by_key(|a| a.at_ns);
        let c = contract(&a, &steps, &[2000 * MS, 2500 * MS], &windows, 1000.0);
        let m = c.misses(0);
        assert_eq!(m.len(), 1, "{m:?}");
        assert!(m[0].contains("over 1000 ms windows"), "{}", m[0]);
        assert!(c.largest_excess_bytes() > 100_000.0);
    }

    #[test]
    fn only_the_port_and_dscp_asked_for_count() {
        let mut pkt = vec![0u8; 64];
        pkt[0] = 0x45;
        pkt[1] = 48 << 2;
        pkt[2..4].copy_from_slice(&64u16.to_be_bytes());
        pkt[22..24].copy_from_slice(&4055u16.to_be_bytes());
        assert_eq!(matching(&pkt, 4055, 48), Some(64));
        assert_eq!(matching(&pkt, 4056, 48), None);
        assert_eq!(matching(&pkt, 4055, 0), None);
        assert_eq!(matching(&pkt[..21], 4055, 48), None);
    }
}
