//! Benchmark workloads, shared by `cargo bench -p qosloop-meter` and
//! `qosloop-testbed bench meter` (which adds the peers): a synthetic capture
//! of small packets over many concurrent flows, the pipeline replayed from
//! memory, and the multi-pattern DFA over packet bytes.

use crate::cache::CacheConfig;
use crate::classify::{Classifier, FieldRules, PatternRules, RuleError};
use crate::pcap::{linktype, CaptureReader, PcapWriter};
use crate::pipeline::{Pipeline, PipelineConfig};
use crate::sink::CountSink;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Frames of a synthetic capture, held in memory.
#[derive(Debug, Default)]
pub struct Frames {
    pub ts_ns: Vec<u64>,
    pub data: Vec<Vec<u8>>,
}

impl Frames {
    pub fn len(&self) -> usize {
        self.data.len()
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    pub fn bytes(&self) -> u64 {
        self.data.iter().map(|d| d.len() as u64).sum()
    }
}

/// `packets` Ethernet/IPv4/UDP frames of `frame_len` bytes (≥ 42) over
/// `flows` concurrent flows, round robin, 200 ns apart.
pub fn synthetic_frames(packets: usize, flows: usize, frame_len: usize) -> Frames {
    let frame_len = frame_len.max(42);
    let mut out = Frames::default();
    let t0 = 1_700_000_000_000_000_000u64;
    for i in 0..packets {
        let flow = (i % flows.max(1)) as u32;
        let mut f = Vec::with_capacity(frame_len);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00]);
        let ip_len = (frame_len - 14) as u16;
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&ip_len.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0]);
        // Source 10.x.y.z from the flow index, destination fixed.
        f.extend_from_slice(&(0x0a00_0000 | (flow >> 4)).to_be_bytes());
        f.extend_from_slice(&[172, 20, 3, 3]);
        f.extend_from_slice(&(1024 + (flow & 0xf) as u16).to_be_bytes());
        f.extend_from_slice(&4055u16.to_be_bytes());
        f.extend_from_slice(&(ip_len - 20).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.resize(frame_len, 0x5a);
        out.ts_ns.push(t0 + i as u64 * 200);
        out.data.push(f);
    }
    out
}

/// The frames as a pcap file image.
pub fn to_pcap(frames: &Frames) -> Vec<u8> {
    let mut w = match PcapWriter::new(
        Vec::with_capacity(frames.bytes() as usize + 16 * frames.len() + 24),
        linktype::ETHERNET,
        65535,
    ) {
        Ok(w) => w,
        Err(_) => return Vec::new(),
    };
    for (ts, d) in frames.ts_ns.iter().zip(&frames.data) {
        // Writing to a Vec cannot fail.
        let _ = w.write_packet(*ts, d, d.len() as u32);
    }
    w.into_inner()
}

/// Ten field/mask rules of the kind an operator writes; the benchmark
/// traffic matches the last one, so every rule is evaluated.
pub fn field_rules() -> Result<FieldRules, RuleError> {
    let mut src = String::new();
    for i in 0..9 {
        src.push_str(&format!(
            "[[filter]]\nid = {i}\nclass = \"c{i}\"\nip_proto = 6\nip_dst = \"192.168.{i}.0/24\"\ndst_port = \"{}-{}\"\n\n",
            1000 + i * 10,
            1009 + i * 10
        ));
    }
    src.push_str("[[filter]]\nid = 9\nclass = \"udp-lab\"\nip_proto = 17\nip_src = \"10.0.0.0/8\"\ndst_port = 4055\n");
    FieldRules::parse("bench-fields.toml", &src)
}

/// `n` byte patterns: `anchored` ones in the style of `seeds/004` Fig. 5
/// (an IPv4 source and a destination port at fixed offsets from the IP
/// header), or unanchored payload signatures searched over the whole frame.
pub fn patterns(n: usize, anchored: bool) -> Result<PatternRules, RuleError> {
    let mut src = String::from("mode = \"priority\"\n");
    if anchored {
        src.push_str("start = \"ip\"\nanchored = true\n");
    } else {
        src.push_str("start = \"frame\"\n");
    }
    for i in 0..n {
        let re = if anchored {
            format!(
                "(?s).{{9}}\\x11.{{2}}\\x0a\\x00\\x{:02x}\\x{:02x}.{{4}}.{{2}}\\x0f\\xd7",
                (i >> 8) & 0xff,
                i & 0xff
            )
        } else {
            format!("GET /api/v{i}/[a-z]+ HTTP|sig{i:03}[0-9]{{4}}")
        };
        src.push_str(&format!("[[pattern]]\nclass = \"p{i}\"\nregex = '{re}'\n"));
    }
    PatternRules::parse("bench-patterns.toml", &src)
}

/// CPU time this thread has run, from `/proc/thread-self/schedstat`
/// (nanoseconds on a CPU). On a shared machine the wall time includes the
/// time other processes had the core; this does not.
pub fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(Duration::ZERO, Duration::from_nanos)
}

/// Result of one measured run.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    pub packets: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    /// CPU time of the measuring thread.
    pub cpu: Duration,
    pub flows: u64,
    pub records: u64,
}

impl Measured {
    pub fn packets_per_second(&self) -> f64 {
        self.packets as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    pub fn bytes_per_second(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    /// Packets per second of CPU time.
    pub fn packets_per_cpu_second(&self) -> f64 {
        self.packets as f64 / self.cpu.as_secs_f64().max(1e-9)
    }
    /// Bytes per second of CPU time.
    pub fn bytes_per_cpu_second(&self) -> f64 {
        self.bytes as f64 / self.cpu.as_secs_f64().max(1e-9)
    }
}

/// Decode + classify (field rules) + flow-cache update over frames in
/// memory, on this thread.
pub fn measure_pipeline(
    frames: &Frames,
    classifier: Arc<Classifier>,
    cache: CacheConfig,
) -> Measured {
    let mut pipeline = Pipeline::new(
        PipelineConfig {
            cache,
            caplen: 0,
            sampling: crate::sampling::Sampling::Off,
        },
        classifier,
    );
    let mut sink = CountSink::default();
    let started = Instant::now();
    let cpu0 = thread_cpu();
    for (ts, d) in frames.ts_ns.iter().zip(&frames.data) {
        let pkt = crate::pcap::PacketRef {
            ts_ns: *ts,
            data: d,
            orig_len: d.len() as u32,
            linktype: linktype::ETHERNET,
            interface: 0,
        };
        let _ = pipeline.packet(&pkt, "", &mut sink);
    }
    let elapsed = started.elapsed();
    let cpu = thread_cpu().saturating_sub(cpu0);
    let stats = pipeline.finish(&mut sink).unwrap_or_default();
    Measured {
        packets: frames.len() as u64,
        bytes: frames.bytes(),
        elapsed,
        cpu,
        flows: stats.cache.flows_created,
        records: sink.0,
    }
}

/// The same, but reading the capture from a pcap image in memory (reader
/// included).
pub fn measure_pcap_replay(
    pcap: &[u8],
    classifier: Arc<Classifier>,
    cache: CacheConfig,
) -> Measured {
    let mut pipeline = Pipeline::new(
        PipelineConfig {
            cache,
            caplen: 0,
            sampling: crate::sampling::Sampling::Off,
        },
        classifier,
    );
    let mut sink = CountSink::default();
    let started = Instant::now();
    let cpu0 = thread_cpu();
    let (mut packets, mut bytes) = (0u64, 0u64);
    if let Ok(mut r) = CaptureReader::new(pcap, "memory") {
        while let Ok(Some(p)) = r.next_packet() {
            packets += 1;
            bytes += p.data.len() as u64;
            let _ = pipeline.packet(&p, "", &mut sink);
        }
    }
    let elapsed = started.elapsed();
    let cpu = thread_cpu().saturating_sub(cpu0);
    let stats = pipeline.finish(&mut sink).unwrap_or_default();
    Measured {
        packets,
        bytes,
        elapsed,
        cpu,
        flows: stats.cache.flows_created,
        records: sink.0,
    }
}

/// The multi-pattern DFA alone over every frame's bytes.
pub fn measure_patterns(frames: &Frames, rules: &PatternRules, from_ip: bool) -> (Measured, u64) {
    let mut set = regex_automata::PatternSet::new(rules.len());
    let mut matched = 0u64;
    let started = Instant::now();
    let cpu0 = thread_cpu();
    let mut bytes = 0u64;
    for d in &frames.data {
        let hay = if from_ip { &d[14..] } else { &d[..] };
        bytes += d.len() as u64;
        rules.matches_into(hay, &mut set);
        matched += u64::from(!set.is_empty());
    }
    (
        Measured {
            packets: frames.len() as u64,
            bytes,
            elapsed: started.elapsed(),
            cpu: thread_cpu().saturating_sub(cpu0),
            flows: 0,
            records: 0,
        },
        matched,
    )
}

/// Resident memory of this process, in bytes (Linux).
pub fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

/// Resident memory the flow cache takes for `flows` flows (measured by
/// filling a cache and reading the process's resident size before/after).
pub fn cache_memory(flows: usize) -> u64 {
    let before = resident_bytes();
    let mut cache = crate::cache::FlowCache::new(CacheConfig {
        max_flows: flows + 1,
        ..CacheConfig::default()
    });
    let mut out = Vec::new();
    for i in 0..flows {
        let key = crate::cache::CacheKey {
            src: (0x0a00_0000 + i as u128).into(),
            dst: 0xac14_0303u128.into(),
            src_port: 1024,
            dst_port: 4055,
            proto: 17,
            ip_version: 4,
            vlan: crate::cache::CacheKey::NO_VLAN,
            class: 0,
        };
        cache.update(key, 1, 64, 0, 0, &mut out);
    }
    let after = resident_bytes();
    drop(cache);
    after.saturating_sub(before)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bench prints "10 field rules": they must load, all ten.
    #[test]
    fn the_bench_rules_load() {
        let rules = field_rules().map_err(|e| e.to_string());
        assert_eq!(rules.map(|r| r.rules().len()), Ok(10));
    }
}
