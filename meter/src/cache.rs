//! The flow cache: per-flow counters keyed by 5-tuple + VLAN + class, with
//! idle and active timeouts, TCP FIN/RST end, interim (delta) updates and a
//! memory bound whose evictions are exported and counted, never dropped.
//!
//! Time is whatever the caller says it is: packet timestamps when reading a
//! file (so results are deterministic), the clock for live capture.
//! Every export carries the counters accumulated since the flow's previous
//! export, so the exports of one flow sum to its totals.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};

/// An IPv4 (low 32 bits) or IPv6 address as two 64-bit halves: the same
/// value as a `u128`, but 8-byte aligned, so a cache bucket is 104 bytes
/// instead of 112 (a `u128` field would align the key to 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Addr([u64; 2]);

impl From<u128> for Addr {
    #[inline]
    fn from(a: u128) -> Addr {
        Addr([(a >> 64) as u64, a as u64])
    }
}

impl From<Addr> for u128 {
    #[inline]
    fn from(a: Addr) -> u128 {
        (u128::from(a.0[0]) << 64) | u128::from(a.0[1])
    }
}

impl Hash for Addr {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0[0]);
        state.write_u64(self.0[1]);
    }
}

/// The key of a flow in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey {
    pub src: Addr,
    pub dst: Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub ip_version: u8,
    /// VLAN id, or [`CacheKey::NO_VLAN`].
    pub vlan: u16,
    /// Class index (0 = unclassified).
    pub class: u16,
}

impl CacheKey {
    pub const NO_VLAN: u16 = 0xffff;
}

/// A fast non-cryptographic hasher for fixed-size keys (multiply-rotate,
/// the FxHash construction). The cache is not exposed to adversarial key
/// choice beyond what a `max_flows` bound already limits.
#[derive(Debug, Default, Clone, Copy)]
pub struct KeyHasher(u64);

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl Hasher for KeyHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(w));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.write_u64(u64::from(i));
    }
    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.write_u64(u64::from(i));
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(SEED);
    }
    #[inline]
    fn write_u128(&mut self, i: u128) {
        self.write_u64(i as u64);
        self.write_u64((i >> 64) as u64);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        // Fold the high bits down: hashbrown uses the top 7 bits as tags.
        self.0 ^ (self.0 >> 29)
    }
}

pub type KeyBuildHasher = BuildHasherDefault<KeyHasher>;

/// Per-flow counters since the flow's previous export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    /// First and last packet covered by this export.
    pub first_ns: u64,
    pub last_ns: u64,
    pub tcp_flags: u16,
    /// DSCP of the first packet covered by this export.
    pub dscp: u8,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    counters: Counters,
    /// When the flow entry was created (for the active timeout).
    created_ns: u64,
    /// When the last export of this flow happened (for interim updates).
    /// (`counters.last_ns` is never reset, so it is also the flow's last
    /// packet, which idle timeouts and eviction use.)
    reported_ns: u64,
}

/// Why a flow was exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExportReason {
    Idle,
    Active,
    Interim,
    TcpEnd,
    Evicted,
    Flush,
}

/// One export: a flow's key and its counters since its previous export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Export {
    pub key: CacheKey,
    pub counters: Counters,
    pub reason: ExportReason,
}

/// Timeouts and bounds of the cache (all in nanoseconds / entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    pub idle_timeout_ns: u64,
    pub active_timeout_ns: u64,
    /// 0 = no interim updates.
    pub interim_ns: u64,
    pub max_flows: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            idle_timeout_ns: 15_000_000_000,
            active_timeout_ns: 120_000_000_000,
            interim_ns: 1_000_000_000,
            max_flows: 1_000_000,
        }
    }
}

/// What the cache did, for the summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub flows_created: u64,
    pub exports: u64,
    pub evicted_flows: u64,
    pub evictions: u64,
    pub peak_flows: u64,
}

/// The flow cache.
#[derive(Debug)]
pub struct FlowCache {
    config: CacheConfig,
    flows: HashMap<CacheKey, Entry, KeyBuildHasher>,
    next_sweep_ns: u64,
    sweep_period_ns: u64,
    stats: CacheStats,
}

/// TCP FIN and RST.
const TCP_END: u16 = 0x01 | 0x04;

impl FlowCache {
    pub fn new(config: CacheConfig) -> FlowCache {
        let mut period = config.idle_timeout_ns.min(config.active_timeout_ns) / 2;
        if config.interim_ns > 0 {
            period = period.min(config.interim_ns / 2);
        }
        let period = period.clamp(1_000_000, 1_000_000_000);
        FlowCache {
            config,
            flows: HashMap::with_capacity_and_hasher(
                config.max_flows.min(1 << 16),
                KeyBuildHasher::default(),
            ),
            next_sweep_ns: 0,
            sweep_period_ns: period,
            stats: CacheStats::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    pub fn config(&self) -> CacheConfig {
        self.config
    }

    /// Accounts one packet at time `now_ns` (its timestamp). Exports caused
    /// by it (TCP end, eviction) are appended to `out`.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        key: CacheKey,
        ts_ns: u64,
        bytes: u32,
        tcp_flags: u16,
        dscp: u8,
        out: &mut Vec<Export>,
    ) {
        if let Some(e) = self.flows.get_mut(&key) {
            let c = &mut e.counters;
            if c.packets == 0 {
                c.first_ns = ts_ns;
                c.dscp = dscp;
            }
            c.packets += 1;
            c.bytes += u64::from(bytes);
            c.last_ns = c.last_ns.max(ts_ns);
            c.tcp_flags |= tcp_flags;
        } else {
            if self.flows.len() >= self.config.max_flows {
                self.evict(out);
            }
            self.flows.insert(
                key,
                Entry {
                    counters: Counters {
                        packets: 1,
                        bytes: u64::from(bytes),
                        first_ns: ts_ns,
                        last_ns: ts_ns,
                        tcp_flags,
                        dscp,
                    },
                    created_ns: ts_ns,
                    reported_ns: ts_ns,
                },
            );
            self.stats.flows_created += 1;
            self.stats.peak_flows = self.stats.peak_flows.max(self.flows.len() as u64);
        }
        if tcp_flags & TCP_END != 0 && key.proto == crate::decode::PROTO_TCP {
            if let Some(e) = self.flows.remove(&key) {
                self.export(key, e.counters, ExportReason::TcpEnd, out);
            }
        }
    }

    fn export(
        &mut self,
        key: CacheKey,
        counters: Counters,
        reason: ExportReason,
        out: &mut Vec<Export>,
    ) {
        if counters.packets == 0 {
            return;
        }
        self.stats.exports += 1;
        out.push(Export {
            key,
            counters,
            reason,
        });
    }

    /// Makes room: exports and removes the sixteenth of the flows that were
    /// quiet longest.
    fn evict(&mut self, out: &mut Vec<Export>) {
        let want = (self.flows.len() / 16).max(1);
        let mut seen: Vec<u64> = self.flows.values().map(|e| e.counters.last_ns).collect();
        let (_, threshold, _) = seen.select_nth_unstable(want - 1);
        let threshold = *threshold;
        let mut victims: Vec<CacheKey> = self
            .flows
            .iter()
            .filter(|(_, e)| e.counters.last_ns <= threshold)
            .map(|(k, _)| *k)
            .collect();
        victims.truncate(want.max(1));
        self.stats.evictions += 1;
        for key in victims {
            if let Some(e) = self.flows.remove(&key) {
                self.stats.evicted_flows += 1;
                self.export(key, e.counters, ExportReason::Evicted, out);
            }
        }
    }

    /// True when [`FlowCache::advance`] to `now_ns` would sweep.
    #[inline]
    pub fn sweep_due(&self, now_ns: u64) -> bool {
        now_ns >= self.next_sweep_ns
    }

    /// Advances time to `now_ns`; every sweep period this expires idle and
    /// active flows and emits interim updates into `out`.
    #[inline]
    pub fn advance(&mut self, now_ns: u64, out: &mut Vec<Export>) {
        if now_ns < self.next_sweep_ns {
            return;
        }
        if self.next_sweep_ns != 0 {
            self.sweep(now_ns, out);
        }
        self.next_sweep_ns = now_ns + self.sweep_period_ns;
    }

    /// Expires and reports what is due at `now_ns`.
    pub fn sweep(&mut self, now_ns: u64, out: &mut Vec<Export>) {
        let cfg = self.config;
        let mut ended: Vec<(CacheKey, ExportReason)> = Vec::new();
        let mut exports = 0u64;
        for (key, e) in self.flows.iter_mut() {
            if now_ns.saturating_sub(e.counters.last_ns) >= cfg.idle_timeout_ns {
                ended.push((*key, ExportReason::Idle));
            } else if now_ns.saturating_sub(e.created_ns) >= cfg.active_timeout_ns {
                ended.push((*key, ExportReason::Active));
            } else if cfg.interim_ns > 0
                && e.counters.packets > 0
                && now_ns.saturating_sub(e.reported_ns) >= cfg.interim_ns
            {
                out.push(Export {
                    key: *key,
                    counters: e.counters,
                    reason: ExportReason::Interim,
                });
                exports += 1;
                e.counters.packets = 0;
                e.counters.bytes = 0;
                e.counters.tcp_flags = 0;
                e.reported_ns = now_ns;
            }
        }
        self.stats.exports += exports;
        for (key, reason) in ended {
            if let Some(e) = self.flows.remove(&key) {
                self.export(key, e.counters, reason, out);
            }
        }
    }

    /// Exports every flow (end of input or shutdown).
    pub fn flush(&mut self, out: &mut Vec<Export>) {
        let mut all: Vec<(CacheKey, Entry)> = self.flows.drain().collect();
        // A stable order makes file runs reproducible byte for byte.
        all.sort_unstable_by_key(|(k, e)| (e.counters.first_ns, *k));
        for (key, e) in all {
            self.export(key, e.counters, ExportReason::Flush, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16, proto: u8) -> CacheKey {
        CacheKey {
            src: Addr::from(1u128),
            dst: Addr::from(2u128),
            src_port: port,
            dst_port: 80,
            proto,
            ip_version: 4,
            vlan: CacheKey::NO_VLAN,
            class: 0,
        }
    }

    const S: u64 = 1_000_000_000;

    fn cfg() -> CacheConfig {
        CacheConfig {
            idle_timeout_ns: 5 * S,
            active_timeout_ns: 60 * S,
            interim_ns: 0,
            max_flows: 1000,
        }
    }

    fn sum(out: &[Export], k: CacheKey) -> (u64, u64) {
        out.iter().filter(|e| e.key == k).fold((0, 0), |(p, b), e| {
            (p + e.counters.packets, b + e.counters.bytes)
        })
    }

    #[test]
    fn a_bucket_is_104_bytes() {
        assert_eq!(std::mem::size_of::<(CacheKey, Entry)>(), 104);
        let a = 0x2001_0db8_0000_0000_0000_0000_0000_0001u128;
        assert_eq!(u128::from(Addr::from(a)), a);
        assert!(Addr::from(1u128) < Addr::from(1u128 << 64));
    }

    #[test]
    fn idle_flow_expires() {
        let mut c = FlowCache::new(cfg());
        let mut out = Vec::new();
        c.advance(S, &mut out);
        c.update(key(1, 17), S, 100, 0, 0, &mut out);
        c.update(key(1, 17), 2 * S, 100, 0, 0, &mut out);
        c.advance(6 * S, &mut out);
        assert!(out.is_empty(), "4 s idle is below 5 s");
        c.advance(8 * S, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].reason, ExportReason::Idle);
        assert_eq!((out[0].counters.packets, out[0].counters.bytes), (2, 200));
        assert_eq!(
            (out[0].counters.first_ns, out[0].counters.last_ns),
            (S, 2 * S)
        );
        assert!(c.is_empty());
    }

    #[test]
    fn interim_updates_are_deltas_that_sum_to_totals() {
        let mut c = FlowCache::new(CacheConfig {
            interim_ns: S,
            ..cfg()
        });
        let mut out = Vec::new();
        let mut t = S;
        for _ in 0..100 {
            c.advance(t, &mut out);
            c.update(key(1, 17), t, 10, 0, 0, &mut out);
            t += S / 10;
        }
        c.flush(&mut out);
        assert!(
            out.len() >= 9,
            "interim records every second: {}",
            out.len()
        );
        assert!(out.iter().any(|e| e.reason == ExportReason::Interim));
        assert_eq!(sum(&out, key(1, 17)), (100, 1000));
        for w in out.windows(2) {
            assert!(
                w[0].counters.last_ns < w[1].counters.first_ns,
                "deltas do not overlap"
            );
        }
    }

    #[test]
    fn tcp_fin_or_rst_ends_the_flow() {
        let mut c = FlowCache::new(cfg());
        let mut out = Vec::new();
        c.update(key(1, 6), S, 60, 0x02, 0, &mut out);
        c.update(key(1, 6), S, 60, 0x10, 0, &mut out);
        assert!(out.is_empty());
        c.update(key(1, 6), S, 60, 0x11, 0, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].counters.tcp_flags, 0x13);
        assert_eq!(out[0].reason, ExportReason::TcpEnd);
        // UDP has no FIN: a byte that looks like one is ignored.
        c.update(key(2, 17), S, 60, 0x01, 0, &mut out);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn full_cache_evicts_and_exports_the_quietest() {
        let mut c = FlowCache::new(CacheConfig {
            max_flows: 32,
            ..cfg()
        });
        let mut out = Vec::new();
        for p in 0..100u16 {
            c.update(key(p, 17), S + u64::from(p), 1, 0, 0, &mut out);
        }
        assert!(c.len() <= 32);
        let stats = c.stats();
        assert!(stats.evicted_flows > 0);
        assert_eq!(out.len() as u64, stats.evicted_flows);
        assert!(out.iter().all(|e| e.reason == ExportReason::Evicted));
        // The first flows were the quietest: they went first.
        assert_eq!(out[0].key.src_port.min(out[1].key.src_port), 0);
        c.flush(&mut out);
        assert_eq!(out.len(), 100, "nothing is lost");
    }

    #[test]
    fn active_timeout_splits_long_flows() {
        let mut c = FlowCache::new(CacheConfig {
            active_timeout_ns: 10 * S,
            ..cfg()
        });
        let mut out = Vec::new();
        for i in 0..30 {
            let t = S + i * S;
            c.advance(t, &mut out);
            c.update(key(1, 17), t, 1, 0, 0, &mut out);
        }
        c.flush(&mut out);
        assert!(out.iter().any(|e| e.reason == ExportReason::Active));
        assert_eq!(sum(&out, key(1, 17)), (30, 30));
    }
}
