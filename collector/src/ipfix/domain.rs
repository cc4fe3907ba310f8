//! The state of one exporter's observation domain (v9: source id; v5:
//! engine): its templates, the data waiting for a template, its sequence
//! numbers, its samplers and system init time, and the last totals of
//! flows reported with total counters. Everything here is bounded by
//! [`Limits`](super::Limits).

use super::plan::{Fields, Plan};
use super::sink::RecordSink;
use super::stats::{Counters, DropReason};
use super::wire::{TemplateDef, Version};
use qosloop_schema::FlowRecord;
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};

/// A template in force, compiled.
#[derive(Clone, Debug)]
pub struct Template {
    pub def: TemplateDef,
    pub plan: std::sync::Arc<Plan>,
    /// When it was last defined or refreshed (ns since the epoch).
    pub last_seen_ns: u64,
    /// When it was last handed out for persistence.
    pub persisted_ns: u64,
}

/// What a data set needs from its message to become flow records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsgCtx {
    pub version: Version,
    pub export_secs: u32,
    pub export_nsecs: u32,
    pub sys_uptime_ms: u32,
}

impl MsgCtx {
    fn export_ns(&self) -> u64 {
        u64::from(self.export_secs) * 1_000_000_000 + u64::from(self.export_nsecs)
    }
}

/// A data set that arrived before its template.
#[derive(Debug)]
pub struct PendingSet {
    pub template_id: u16,
    pub ctx: MsgCtx,
    pub received_ns: u64,
    pub body: Box<[u8]>,
}

impl PendingSet {
    /// What it is charged against the pending budgets: its bytes and its
    /// bookkeeping.
    pub fn cost(&self) -> usize {
        self.body.len() + super::decoder::PENDING_SET_OVERHEAD
    }
}

/// Key of a flow whose counters are totals: its 5-tuple and VLAN.
type TotalsKey = (IpAddr, IpAddr, u16, u16, u8, Option<u16>);

/// One observation domain's state.
#[derive(Debug, Default)]
pub struct Domain {
    pub templates: HashMap<u16, Template>,
    pub pending: VecDeque<PendingSet>,
    pub pending_bytes: usize,
    /// The sequence number the next message should carry.
    pub expected_seq: Option<u32>,
    /// 1-in-N by samplerId / selectorId, from options records.
    pub samplers: HashMap<u64, u32>,
    /// The rate of an options record that names no sampler.
    pub default_sampling: Option<u32>,
    pub system_init_ms: Option<u64>,
    /// Last totals (octets, packets) and when they came, per flow.
    totals: HashMap<TotalsKey, (u64, u64, u64)>,
    pub counters: Counters,
    pub last_seen_ns: u64,
    /// When a sampling rate change was last logged (at most once a minute
    /// per domain).
    pub rate_logged_ns: u64,
}

/// Records of one message in sequence terms (IPFIX and v5 count records,
/// v9 counts messages).
const REORDER_WINDOW: u32 = 1 << 20;
/// A jump forward beyond this is an exporter restart, not a loss.
const RESYNC_JUMP: u32 = 1 << 24;

impl Domain {
    /// Checks `seq` against what was expected; `units` is what this message
    /// advances the sequence by, `None` when unknown (data of an unknown
    /// template: the next message then resynchronises).
    pub fn track_sequence(&mut self, seq: u32, units: Option<u32>) {
        let Some(expected) = self.expected_seq else {
            self.expected_seq = units.map(|u| seq.wrapping_add(u));
            return;
        };
        let ahead = seq.wrapping_sub(expected);
        let behind = expected.wrapping_sub(seq);
        if ahead == 0 {
            self.expected_seq = units.map(|u| seq.wrapping_add(u));
        } else if ahead < RESYNC_JUMP {
            self.counters.sequence_gaps += u64::from(ahead);
            self.expected_seq = units.map(|u| seq.wrapping_add(u));
        } else if behind <= REORDER_WINDOW {
            // A late message: it fills part of a gap counted before; the
            // expectation stays where the newest message put it.
            self.counters.reordered += 1;
            self.counters.sequence_gaps = self
                .counters
                .sequence_gaps
                .saturating_sub(u64::from(units.unwrap_or(0)));
        } else {
            self.expected_seq = units.map(|u| seq.wrapping_add(u));
        }
    }

    /// Applies one options data record: system init time and sampler rates.
    /// Returns the new rate and its sampler when a rate changed.
    pub fn apply_options(&mut self, f: &Fields, max_samplers: usize) -> Option<(Option<u64>, u32)> {
        if let Some(t) = f.system_init_ms {
            self.system_init_ms = Some(t);
        }
        if f.sampling_out_of_range() {
            self.counters.drop(DropReason::BadSamplingRate);
            return None;
        }
        if let Some(n) = f.own_sampling().or(
            // An explicit 1-in-1 resets a sampler to "every packet".
            f.sampling_interval.filter(|&n| n <= 1).map(|_| 1),
        ) {
            let key = f.sampler_key();
            let old = match key {
                Some(key) => {
                    if self.samplers.len() < max_samplers || self.samplers.contains_key(&key) {
                        self.samplers.insert(key, n)
                    } else {
                        return None;
                    }
                }
                None => self.default_sampling.replace(n),
            };
            if old != Some(n) {
                return Some((key, n));
            }
        }
        None
    }

    /// Turns one data record's fields into flow records (two for a
    /// bidirectional NSEL-style record with responder counters).
    pub fn build<S: RecordSink>(
        &mut self,
        f: Fields,
        ctx: &MsgCtx,
        v5_sampling: Option<u32>,
        max_totals: usize,
        now_ns: u64,
        out: &mut S,
    ) {
        let (start_ns, end_ns) = self.times(&f, ctx);
        if f.sampling_out_of_range() {
            self.counters.drop(DropReason::BadSamplingRate);
        }
        let sampling = f
            .own_sampling()
            .or_else(|| f.sampler_key().and_then(|k| self.samplers.get(&k).copied()))
            .or(self.default_sampling)
            .or(v5_sampling)
            .filter(|&n| n > 1);
        let src = f.src.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let dst = f.dst.unwrap_or(match src {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        });
        let icmp = f.proto == 1 || f.proto == 58;
        let (src_port, dst_port) = if icmp {
            let tc = f.icmp_type_code.or_else(|| {
                f.icmp_type
                    .map(|t| u16::from(t) << 8 | u16::from(f.icmp_code.unwrap_or(0)))
            });
            match tc {
                Some(tc) => (0, tc),
                None => (f.src_port, f.dst_port),
            }
        } else {
            (f.src_port, f.dst_port)
        };
        let dscp = f.dscp.or(f.tos.map(|t| t >> 2));
        let (bytes, packets) =
            self.counters_of(&f, src, dst, src_port, dst_port, max_totals, now_ns);
        let user_id = f.user_id;
        let user = f.user.or_else(|| user_id.map(|u| u.to_string()));
        let responder = match (f.responder_octets, f.responder_packets) {
            (None, None) => None,
            (o, p) if f.octet_delta.is_none() && f.packet_delta.is_none() => {
                Some((o.unwrap_or(0), p.unwrap_or(0)))
            }
            _ => None,
        };
        let record = FlowRecord {
            src_addr: src,
            dst_addr: dst,
            src_port,
            dst_port,
            proto: f.proto,
            packets,
            bytes,
            start_ns,
            end_ns,
            vlan: f.vlan,
            dscp,
            tcp_flags: f.tcp_flags,
            class: f.class,
            user,
            process: f.process,
            sampling_interval: sampling,
        };
        if let Some((r_bytes, r_packets)) = responder {
            if r_bytes > 0 || r_packets > 0 {
                let reverse = FlowRecord {
                    src_addr: dst,
                    dst_addr: src,
                    src_port: if icmp { 0 } else { dst_port },
                    dst_port: if icmp { dst_port } else { src_port },
                    packets: r_packets,
                    bytes: r_bytes,
                    tcp_flags: None,
                    ..record.clone()
                };
                out.push(record);
                out.push(reverse);
                return;
            }
        }
        out.push(record);
    }

    /// Start and end in ns since the epoch.
    fn times(&self, f: &Fields, ctx: &MsgCtx) -> (u64, u64) {
        let export_ns = ctx.export_ns();
        let from_uptime = |ms: Option<u64>| -> Option<u64> {
            let ms = ms?;
            match ctx.version {
                // sysUpTime and first/last switched are 32-bit ms counters
                // that wrap (every 49.7 days): the age of a time is the
                // header's uptime minus it, modulo 2^32.
                // A time a little after the header's uptime (some exporters
                // stamp the header first) would wrap to 49.7 days ago: a
                // difference over 2^31 ms is a time in the future, age 0.
                Version::V5 | Version::V9 => {
                    let diff = ctx.sys_uptime_ms.wrapping_sub(ms as u32);
                    let age_ms = if diff > 1 << 31 { 0 } else { u64::from(diff) };
                    Some(export_ns.saturating_sub(age_ms * 1_000_000))
                }
                Version::Ipfix => {
                    let init = f.system_init_ms.or(self.system_init_ms)?;
                    Some(init.saturating_add(ms).saturating_mul(1_000_000))
                }
            }
        };
        let from_delta = |us: Option<u64>| -> Option<u64> {
            Some(export_ns.saturating_sub(us?.saturating_mul(1000)))
        };
        let start = f
            .start_ns
            .or_else(|| from_uptime(f.start_uptime_ms))
            .or_else(|| from_delta(f.start_delta_us));
        let end = f
            .end_ns
            .or_else(|| from_uptime(f.end_uptime_ms))
            .or_else(|| from_delta(f.end_delta_us));
        match (start, end) {
            (Some(s), Some(e)) => (s, e),
            (Some(s), None) => (s, s),
            (None, Some(e)) => (e, e),
            // No time at all (or uptime-relative ones with no init time
            // known yet): the export time stands for both.
            (None, None) => (export_ns, export_ns),
        }
    }

    /// Octets and packets as deltas. Delta elements win (1/2, then the
    /// post-/initiator ones 23/24 and 231/298); totals (85/86) become
    /// deltas against the flow's previous total from this domain.
    #[allow(clippy::too_many_arguments)]
    fn counters_of(
        &mut self,
        f: &Fields,
        src: IpAddr,
        dst: IpAddr,
        src_port: u16,
        dst_port: u16,
        max_totals: usize,
        now_ns: u64,
    ) -> (u64, u64) {
        let delta_bytes = f.octet_delta.or(f.post_octet_delta).or(f.initiator_octets);
        let delta_packets = f
            .packet_delta
            .or(f.post_packet_delta)
            .or(f.initiator_packets);
        if f.octet_total.is_none() && f.packet_total.is_none() {
            return (delta_bytes.unwrap_or(0), delta_packets.unwrap_or(0));
        }
        if delta_bytes.is_some() && delta_packets.is_some() {
            return (delta_bytes.unwrap_or(0), delta_packets.unwrap_or(0));
        }
        let total_bytes = f.octet_total.unwrap_or(0);
        let total_packets = f.packet_total.unwrap_or(0);
        let key = (src, dst, src_port, dst_port, f.proto, f.vlan);
        let (prev_bytes, prev_packets) = match self.totals.get_mut(&key) {
            Some(entry) => {
                let prev = (entry.0, entry.1);
                *entry = (total_bytes, total_packets, now_ns);
                prev
            }
            None => {
                if self.totals.len() < max_totals {
                    self.totals
                        .insert(key, (total_bytes, total_packets, now_ns));
                } else {
                    self.counters.totals_untracked += 1;
                }
                (0, 0)
            }
        };
        // A total under the previous one is a new flow with the same key
        // (or a reset exporter): its whole total is the delta.
        let d = |total: u64, prev: u64| if total >= prev { total - prev } else { total };
        (
            delta_bytes.unwrap_or_else(|| d(total_bytes, prev_bytes)),
            delta_packets.unwrap_or_else(|| d(total_packets, prev_packets)),
        )
    }

    /// Drops templates (UDP only: `expiry_ns` is `None` over TCP), pending
    /// sets and flow totals past their age; returns the ids of expired
    /// templates with when they were last seen, and the pending bytes
    /// freed.
    pub fn sweep(
        &mut self,
        now_ns: u64,
        expiry_ns: Option<u64>,
        pending_age_ns: u64,
        totals_idle_ns: u64,
    ) -> (Vec<(u16, u64)>, usize) {
        let mut expired = Vec::new();
        if let Some(expiry) = expiry_ns {
            self.templates.retain(|id, t| {
                let keep = now_ns.saturating_sub(t.last_seen_ns) <= expiry;
                if !keep {
                    expired.push((*id, t.last_seen_ns));
                }
                keep
            });
        }
        let mut freed = 0;
        while let Some(front) = self.pending.front() {
            if now_ns.saturating_sub(front.received_ns) <= pending_age_ns {
                break;
            }
            if let Some(p) = self.pending.pop_front() {
                self.pending_bytes -= p.cost();
                freed += p.cost();
                self.counters.drop(DropReason::PendingExpired);
            }
        }
        self.totals
            .retain(|_, v| now_ns.saturating_sub(v.2) <= totals_idle_ns);
        (expired, freed)
    }

    /// Flows tracked for their total counters.
    pub fn totals_len(&self) -> usize {
        self.totals.len()
    }

    /// Takes out the pending sets of `template_id`, oldest first.
    pub fn take_pending(&mut self, template_id: u16) -> Vec<PendingSet> {
        if !self.pending.iter().any(|p| p.template_id == template_id) {
            return Vec::new();
        }
        let (take, keep): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| p.template_id == template_id);
        self.pending = keep;
        let taken: usize = take.iter().map(PendingSet::cost).sum();
        self.pending_bytes -= taken;
        take.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_gaps_wrap_and_reordering_gives_back() {
        let mut d = Domain::default();
        d.track_sequence(u32::MAX - 1, Some(1));
        d.track_sequence(u32::MAX, Some(2)); // expected next: 1 (wrapped)
        assert_eq!(d.counters.sequence_gaps, 0);
        d.track_sequence(4, Some(1)); // 1..4 missing: 3 lost
        assert_eq!(d.counters.sequence_gaps, 3);
        d.track_sequence(1, Some(2)); // late: 1 and 2 were not lost
        assert_eq!((d.counters.sequence_gaps, d.counters.reordered), (1, 1));
        d.track_sequence(5, Some(1));
        assert_eq!(d.counters.sequence_gaps, 1);
        // A restart far away resynchronises without a huge gap.
        d.track_sequence(0x8000_0000, Some(1));
        d.track_sequence(0x8000_0001, Some(1));
        assert_eq!(d.counters.sequence_gaps, 1);
    }

    #[test]
    fn totals_become_deltas_per_flow() {
        let mut d = Domain::default();
        let ctx = MsgCtx {
            version: Version::Ipfix,
            export_secs: 100,
            export_nsecs: 0,
            sys_uptime_ms: 0,
        };
        let mut out = Vec::new();
        for total in [10u64, 25, 5] {
            let f = Fields {
                src: Some("10.0.0.1".parse().unwrap()),
                dst: Some("10.0.0.2".parse().unwrap()),
                proto: 17,
                octet_total: Some(total * 100),
                packet_total: Some(total),
                ..Fields::default()
            };
            d.build(f, &ctx, None, 16, 1, &mut out);
        }
        let packets: Vec<_> = out.iter().map(|r| r.packets).collect();
        assert_eq!(packets, vec![10, 15, 5]);
        assert_eq!(out[1].bytes, 1500);
    }

    #[test]
    fn uptime_times_use_the_v9_header() {
        let d = Domain::default();
        let ctx = MsgCtx {
            version: Version::V9,
            export_secs: 1_000,
            export_nsecs: 0,
            sys_uptime_ms: 10_000,
        };
        let f = Fields {
            start_uptime_ms: Some(4_000),
            end_uptime_ms: Some(9_500),
            ..Fields::default()
        };
        // Boot at 990 s: start 994 s, end 999.5 s.
        assert_eq!(d.times(&f, &ctx), (994_000_000_000, 999_500_000_000));
    }

    /// Review finding 6: a rate change is reported (to be logged), a repeat
    /// of the same rate and an absurd rate are not applied as changes.
    #[test]
    fn sampling_changes_are_reported_and_absurd_rates_refused() {
        let mut d = Domain::default();
        let rate = |n: u64| Fields {
            sampling_interval: Some(n),
            ..Fields::default()
        };
        assert_eq!(d.apply_options(&rate(100), 8), Some((None, 100)));
        assert_eq!(d.apply_options(&rate(100), 8), None);
        assert_eq!(d.apply_options(&rate(0xFFFF_FFFF), 8), None);
        assert_eq!(d.default_sampling, Some(100));
        assert_eq!(d.counters.dropped(DropReason::BadSamplingRate), 1);
    }

    /// Review finding 10: a last-switched time 20 ms after the header's
    /// uptime became 49.7 days ago.
    #[test]
    fn v9_times_slightly_after_the_header_uptime_are_now() {
        let d = Domain::default();
        let ctx = MsgCtx {
            version: Version::V9,
            export_secs: 1_000,
            export_nsecs: 0,
            sys_uptime_ms: 10_000,
        };
        let f = Fields {
            start_uptime_ms: Some(9_000),
            end_uptime_ms: Some(10_020),
            ..Fields::default()
        };
        assert_eq!(d.times(&f, &ctx), (999_000_000_000, 1_000_000_000_000));
    }
}
