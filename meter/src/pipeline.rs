//! One metering pipeline: CAPLEN cut → decode → sample → classify →
//! fragment tracking → flow cache → records into a sink. A file run has
//! one; live capture has one per fanout thread.

use crate::cache::{CacheConfig, CacheKey, CacheStats, Export, FlowCache};
use crate::classify::{Classifier, PacketView, Scratch};
use crate::decode::{decode, DecodeError, Decoded, PROTO_TCP};
use crate::pcap::PacketRef;
use crate::sampling::{Sampler, Sampling};
use crate::sink::{RecordSink, SinkError};
use qosloop_schema::FlowRecord;
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

/// How long a first fragment's ports are remembered for later fragments.
const FRAGMENT_TTL_NS: u64 = 30_000_000_000;
/// How many fragmented datagrams are tracked at once.
const MAX_FRAGMENTS: usize = 65_536;
/// Cache updates are applied in batches of this many packets: the hash
/// lookups of a batch run back to back, so the processor overlaps their
/// cache misses (with 100k flows nearly every lookup misses). Order within
/// the batch is kept, so results are the same as one by one.
const BATCH: usize = 32;

#[derive(Debug, Clone, Copy)]
struct Update {
    key: CacheKey,
    ts_ns: u64,
    bytes: u32,
    tcp_flags: u16,
    dscp: u8,
}

/// Counters of a run (or of one pipeline; [`Stats::merge`] adds them up).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets seen (before decoding).
    pub packets: u64,
    /// Their bytes on the wire (link layer included).
    pub wire_bytes: u64,
    /// Packets counted into flows.
    pub counted_packets: u64,
    /// IP bytes counted into flows.
    pub counted_bytes: u64,
    /// Undecodable packets, by [`DecodeError::index`].
    pub decode_errors: [u64; DecodeError::ALL.len()],
    /// Packets not selected by sampling.
    pub sampled_out: u64,
    /// Later fragments matched to their first fragment's flow.
    pub fragments_matched: u64,
    /// Later fragments whose first fragment was not seen: counted in a
    /// flow with ports 0.
    pub fragments_unmatched: u64,
    /// Records sent to the sink.
    pub records: u64,
    /// Packets the kernel dropped before the meter saw them (live).
    pub capture_drops: u64,
    pub cache: CacheStats,
}

impl Stats {
    pub fn decode_error_total(&self) -> u64 {
        self.decode_errors.iter().sum()
    }

    /// Non-zero decode errors by name.
    pub fn decode_errors_by_reason(&self) -> Vec<(&'static str, u64)> {
        DecodeError::ALL
            .iter()
            .map(|e| (e.reason(), self.decode_errors[e.index()]))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    pub fn merge(&mut self, o: &Stats) {
        self.packets += o.packets;
        self.wire_bytes += o.wire_bytes;
        self.counted_packets += o.counted_packets;
        self.counted_bytes += o.counted_bytes;
        for (a, b) in self.decode_errors.iter_mut().zip(o.decode_errors) {
            *a += b;
        }
        self.sampled_out += o.sampled_out;
        self.fragments_matched += o.fragments_matched;
        self.fragments_unmatched += o.fragments_unmatched;
        self.records += o.records;
        self.capture_drops += o.capture_drops;
        self.cache.flows_created += o.cache.flows_created;
        self.cache.exports += o.cache.exports;
        self.cache.evicted_flows += o.cache.evicted_flows;
        self.cache.evictions += o.cache.evictions;
        self.cache.peak_flows += o.cache.peak_flows;
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "packets {} ({} bytes on the wire), counted {} packets / {} IP bytes, flows {}, records {}, \
             evicted flows {}, capture drops {}, sampled out {}, fragments matched {} unmatched {}, decode errors {}",
            self.packets,
            self.wire_bytes,
            self.counted_packets,
            self.counted_bytes,
            self.cache.flows_created,
            self.records,
            self.cache.evicted_flows,
            self.capture_drops,
            self.sampled_out,
            self.fragments_matched,
            self.fragments_unmatched,
            self.decode_error_total()
        )?;
        let reasons = self.decode_errors_by_reason();
        if !reasons.is_empty() {
            let parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{r} {n}")).collect();
            write!(f, " ({})", parts.join(", "))?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FragKey {
    src: u128,
    dst: u128,
    id: u32,
    proto: u8,
    ip_version: u8,
}

#[derive(Debug, Clone, Copy)]
struct FragEntry {
    src_port: u16,
    dst_port: u16,
    class: u16,
    seen_ns: u64,
}

/// Options of a pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PipelineConfig {
    pub cache: CacheConfig,
    /// Bytes of each frame kept for classification (0 = all).
    pub caplen: usize,
    pub sampling: Sampling,
}

/// One metering pipeline.
#[derive(Debug)]
pub struct Pipeline {
    classifier: Arc<Classifier>,
    scratch: Scratch,
    sampler: Sampler,
    sampling_interval: Option<u32>,
    cache: FlowCache,
    frags: HashMap<FragKey, FragEntry, crate::cache::KeyBuildHasher>,
    next_frag_sweep_ns: u64,
    caplen: usize,
    exports: Vec<Export>,
    pending: Vec<Update>,
    stats: Stats,
}

fn ip(version: u8, a: u128) -> IpAddr {
    if version == 6 {
        IpAddr::V6(Ipv6Addr::from(a))
    } else {
        IpAddr::V4(Ipv4Addr::from(a as u32))
    }
}

impl Pipeline {
    pub fn new(config: PipelineConfig, classifier: Arc<Classifier>) -> Pipeline {
        Pipeline {
            scratch: classifier.scratch(),
            classifier,
            sampler: Sampler::new(config.sampling),
            sampling_interval: config.sampling.interval(),
            cache: FlowCache::new(config.cache),
            frags: HashMap::default(),
            next_frag_sweep_ns: 0,
            caplen: config.caplen,
            exports: Vec::new(),
            pending: Vec::with_capacity(BATCH),
            stats: Stats::default(),
        }
    }

    /// Counters so far (cache counters included).
    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.cache = self.cache.stats();
        s
    }

    /// Flows in the cache now.
    pub fn active_flows(&self) -> usize {
        self.cache.len()
    }

    /// Accounts one packet captured on `interface`.
    #[inline]
    pub fn packet(
        &mut self,
        pkt: &PacketRef<'_>,
        interface: &str,
        sink: &mut dyn RecordSink,
    ) -> Result<(), SinkError> {
        self.stats.packets += 1;
        self.stats.wire_bytes += u64::from(pkt.orig_len);
        if self.cache.sweep_due(pkt.ts_ns) {
            self.apply_pending();
            self.cache.advance(pkt.ts_ns, &mut self.exports);
        }
        let frame = if self.caplen > 0 && pkt.data.len() > self.caplen {
            &pkt.data[..self.caplen]
        } else {
            pkt.data
        };
        match decode(pkt.linktype, frame, pkt.orig_len) {
            Ok(d) => self.decoded(pkt.ts_ns, &d, frame, interface),
            Err(e) => self.stats.decode_errors[e.index()] += 1,
        }
        self.drain(sink)
    }

    #[inline]
    fn decoded(&mut self, ts_ns: u64, d: &Decoded, frame: &[u8], interface: &str) {
        if !self.sampler.select(ts_ns, d, frame) {
            self.stats.sampled_out += 1;
            return;
        }
        let (mut src_port, mut dst_port) = (d.src_port, d.dst_port);
        let mut class = if d.has_ports {
            let view = PacketView {
                interface,
                frame,
                decoded: d,
            };
            self.classifier.classify(&view, &mut self.scratch)
        } else {
            0
        };
        if let Some(f) = d.fragment {
            let key = FragKey {
                src: d.src,
                dst: d.dst,
                id: f.id,
                proto: d.proto,
                ip_version: d.ip_version,
            };
            if f.offset == 0 {
                if self.frags.len() < MAX_FRAGMENTS {
                    self.frags.insert(
                        key,
                        FragEntry {
                            src_port,
                            dst_port,
                            class,
                            seen_ns: ts_ns,
                        },
                    );
                }
            } else if let Some(e) = self.frags.get_mut(&key) {
                e.seen_ns = ts_ns;
                (src_port, dst_port, class) = (e.src_port, e.dst_port, e.class);
                self.stats.fragments_matched += 1;
            } else {
                self.stats.fragments_unmatched += 1;
            }
            self.sweep_fragments(ts_ns);
        }
        let key = CacheKey {
            src: d.src.into(),
            dst: d.dst.into(),
            src_port,
            dst_port,
            proto: d.proto,
            ip_version: d.ip_version,
            vlan: d.vlan_id().unwrap_or(CacheKey::NO_VLAN),
            class,
        };
        let flags = if d.proto == PROTO_TCP { d.tcp_flags } else { 0 };
        self.stats.counted_packets += 1;
        self.stats.counted_bytes += u64::from(d.ip_len);
        self.pending.push(Update {
            key,
            ts_ns,
            bytes: d.ip_len,
            tcp_flags: flags,
            dscp: d.dscp,
        });
        if self.pending.len() >= BATCH {
            self.apply_pending();
        }
    }

    /// Applies the batched cache updates.
    #[inline]
    fn apply_pending(&mut self) {
        for u in self.pending.drain(..) {
            self.cache.update(
                u.key,
                u.ts_ns,
                u.bytes,
                u.tcp_flags,
                u.dscp,
                &mut self.exports,
            );
        }
    }

    fn sweep_fragments(&mut self, now_ns: u64) {
        if now_ns < self.next_frag_sweep_ns {
            return;
        }
        self.frags
            .retain(|_, e| now_ns.saturating_sub(e.seen_ns) < FRAGMENT_TTL_NS);
        self.next_frag_sweep_ns = now_ns + 1_000_000_000;
    }

    /// Advances time without a packet (live capture's clock).
    pub fn tick(&mut self, now_ns: u64, sink: &mut dyn RecordSink) -> Result<(), SinkError> {
        self.apply_pending();
        self.cache.advance(now_ns, &mut self.exports);
        self.drain(sink)
    }

    /// Exports every flow and returns the counters.
    pub fn finish(&mut self, sink: &mut dyn RecordSink) -> Result<Stats, SinkError> {
        self.apply_pending();
        self.cache.flush(&mut self.exports);
        self.drain(sink)?;
        Ok(self.stats())
    }

    #[inline]
    fn drain(&mut self, sink: &mut dyn RecordSink) -> Result<(), SinkError> {
        if self.exports.is_empty() {
            return Ok(());
        }
        let mut exports = std::mem::take(&mut self.exports);
        for e in exports.drain(..) {
            let record = self.record(&e);
            self.stats.records += 1;
            sink.push(&record)?;
        }
        self.exports = exports;
        Ok(())
    }

    fn record(&self, e: &Export) -> FlowRecord {
        let k = &e.key;
        let c = &e.counters;
        FlowRecord {
            src_addr: ip(k.ip_version, k.src.into()),
            dst_addr: ip(k.ip_version, k.dst.into()),
            src_port: k.src_port,
            dst_port: k.dst_port,
            proto: k.proto,
            packets: c.packets,
            bytes: c.bytes,
            start_ns: c.first_ns,
            end_ns: c.last_ns,
            vlan: (k.vlan != CacheKey::NO_VLAN).then_some(k.vlan),
            dscp: Some(c.dscp),
            tcp_flags: (k.proto == PROTO_TCP).then_some(c.tcp_flags),
            class: self.scratch.labels.name(k.class).map(str::to_owned),
            sampling_interval: self.sampling_interval,
            ..FlowRecord::default()
        }
    }
}
