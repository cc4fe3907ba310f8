//! Live capture: one TPACKET_V3 ring per thread, all in one PACKET_FANOUT
//! group (hashing by flow, so each flow stays on one thread and its
//! pipeline), an optional classic BPF filter, kernel drops read with
//! PACKET_STATISTICS and reported. Records from every thread reach the one
//! sink through a channel.

use crate::afpacket::op::RET_K;
use crate::afpacket::{if_index, PacketRing, RingConfig};
pub use crate::afpacket::{BpfInsn, FilterHandle};
use crate::classify::Classifier;
use crate::pcap::{linktype, PacketRef};
use crate::pipeline::{Pipeline, PipelineConfig, Stats};
use crate::sink::{RecordSink, SinkError};
use qosloop_schema::FlowRecord;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often live capture hands its records on (to the exporter): the
/// bandwidth manager waits for them, so this bounds how fresh rates are.
const LIVE_FLUSH: Duration = Duration::from_millis(100);

/// What can stop live capture.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("interface {interface}: {source}")]
    Open {
        interface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("capture: {0}")]
    Capture(#[source] std::io::Error),
    #[error(transparent)]
    Sink(#[from] SinkError),
}

/// Parses a classic BPF program in `tcpdump -ddd` form: the instruction
/// count, then one `code jt jf k` line per instruction (decimal). Commas
/// may stand for line breaks, so a program fits on a command line.
pub fn parse_bpf(text: &str) -> Result<Vec<BpfInsn>, String> {
    let mut lines = text
        .split(['\n', ','])
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let count: usize = lines
        .next()
        .and_then(|l| l.parse().ok())
        .ok_or("BPF program: first line must be the instruction count (tcpdump -ddd form)")?;
    if count == 0 || count > 4096 {
        return Err(format!(
            "BPF program: {count} instructions is not within 1-4096"
        ));
    }
    let mut prog = Vec::with_capacity(count);
    for (i, line) in lines.enumerate() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let parsed = if f.len() == 4 {
            match (
                f[0].parse(),
                f[1].parse(),
                f[2].parse(),
                f[3].parse::<u64>(),
            ) {
                (Ok(code), Ok(jt), Ok(jf), Ok(k)) => Some(BpfInsn {
                    code,
                    jt,
                    jf,
                    k: k as u32,
                }),
                _ => None,
            }
        } else {
            None
        };
        prog.push(parsed.ok_or_else(|| {
            format!(
                "BPF program: instruction {}: {line:?} is not \"code jt jf k\"",
                i + 1
            )
        })?);
    }
    if prog.len() != count {
        return Err(format!(
            "BPF program: {} instructions given, first line says {count}",
            prog.len()
        ));
    }
    Ok(prog)
}

/// The socket filter to install: the user's program with its accepting
/// returns clamped to `caplen` (so the kernel copies only headers), or a
/// one-instruction "accept caplen bytes" program.
pub fn effective_filter(user: Option<&[BpfInsn]>, caplen: usize) -> Option<Vec<BpfInsn>> {
    let cap = u32::try_from(caplen).unwrap_or(u32::MAX);
    match (user, caplen) {
        (None, 0) => None,
        (None, _) => Some(vec![BpfInsn {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: cap,
        }]),
        (Some(p), c) => Some(
            p.iter()
                .map(|i| {
                    let mut i = *i;
                    if c > 0 && i.code == RET_K && i.k > cap {
                        i.k = cap;
                    }
                    i
                })
                .collect(),
        ),
    }
}

/// Sees what each capture thread does, for callers that count or shape
/// capture beyond the pipeline (DiCAP nodes, experiments).
pub trait CaptureHook: Send + Sync + std::fmt::Debug {
    /// A frame handed to user space, before the pipeline sees it.
    fn packet(&self, frame: &[u8]);
    /// PACKET_STATISTICS since the last call: packets the filter accepted
    /// (drops included) and packets dropped because the ring was full.
    fn kernel_stats(&self, packets: u64, drops: u64);
    /// Frames that reached user space but were not analysed (left in the
    /// ring when capture stopped).
    fn discarded(&self, packets: u64);
}

/// Rings opened on an interface, ready to run (they may be opened inside a
/// network namespace and run from anywhere).
#[derive(Debug)]
pub struct LiveCapture {
    interface: String,
    rings: Vec<PacketRing>,
    hook: Option<Arc<dyn CaptureHook>>,
    live: Option<Arc<LiveStats>>,
}

/// The counters of each capture thread while it runs (published every
/// second), for `/metrics`.
#[derive(Debug, Default)]
pub struct LiveStats {
    slots: std::sync::Mutex<Vec<Stats>>,
}

impl LiveStats {
    fn publish(&self, slot: usize, stats: Stats) {
        if let Ok(mut v) = self.slots.lock() {
            if v.len() <= slot {
                v.resize(slot + 1, Stats::default());
            }
            v[slot] = stats;
        }
    }

    /// Every thread's counters added up, as of their last publication.
    pub fn total(&self) -> Stats {
        let mut t = Stats::default();
        if let Ok(v) = self.slots.lock() {
            for s in v.iter() {
                t.merge(s);
            }
        }
        t
    }
}

impl LiveCapture {
    /// Opens `threads` rings on `interface` in one fanout group.
    pub fn open(
        interface: &str,
        threads: usize,
        filter: Option<&[BpfInsn]>,
        caplen: usize,
    ) -> Result<LiveCapture, LiveError> {
        let open_err = |source| LiveError::Open {
            interface: interface.to_owned(),
            source,
        };
        let ifindex = if_index(interface).map_err(open_err)?;
        let filter = effective_filter(filter, caplen);
        // Distinct per process so that two meters do not share a group.
        let group = (std::process::id() & 0xffff) as u16;
        let fanout = (threads > 1).then_some(group);
        let mut rings = Vec::with_capacity(threads);
        for _ in 0..threads {
            rings.push(
                PacketRing::open(ifindex, RingConfig::default(), filter.as_deref(), fanout)
                    .map_err(open_err)?,
            );
        }
        Ok(LiveCapture {
            interface: interface.to_owned(),
            rings,
            hook: None,
            live: None,
        })
    }

    /// Handles that swap the filter of every ring.
    pub fn filter_handles(&self) -> Result<Vec<FilterHandle>, LiveError> {
        self.rings
            .iter()
            .map(|r| {
                r.filter_handle().map_err(|source| LiveError::Open {
                    interface: self.interface.clone(),
                    source,
                })
            })
            .collect()
    }

    /// Publishes the running counters to `live` every second.
    pub fn set_live_stats(&mut self, live: Arc<LiveStats>) {
        self.live = Some(live);
    }

    /// Calls `hook` for every frame and statistics read.
    pub fn set_hook(&mut self, hook: Arc<dyn CaptureHook>) {
        self.hook = Some(hook);
    }

    /// Captures until `stop` is set, then exports every flow and finishes
    /// the sink. Kernel drops are read every second and summed.
    pub fn run(
        self,
        config: PipelineConfig,
        classifier: Arc<Classifier>,
        sink: &mut dyn RecordSink,
        stop: Arc<AtomicBool>,
    ) -> Result<Stats, LiveError> {
        let (tx, rx) = mpsc::sync_channel::<FlowRecord>(65_536);
        let mut workers = Vec::new();
        for (slot, ring) in self.rings.into_iter().enumerate() {
            let live = self.live.clone().map(|l| (l, slot));
            let tx = tx.clone();
            let stop = stop.clone();
            let classifier = classifier.clone();
            let interface = self.interface.clone();
            let hook = self.hook.clone();
            workers.push(std::thread::spawn(move || {
                worker(ring, &interface, config, classifier, tx, &stop, hook, live)
            }));
        }
        drop(tx);
        // Records are handed on at least every 100 ms, and every half
        // interim interval when that is shorter (a tuned loop's lag then
        // need not wait for the flush).
        let flush_every = match config.cache.interim_ns {
            0 => LIVE_FLUSH,
            n => LIVE_FLUSH.min(Duration::from_nanos(n / 2).max(Duration::from_millis(10))),
        };
        let mut last_flush = Instant::now();
        let mut sink_err = None;
        loop {
            match rx.recv_timeout(flush_every / 2) {
                Ok(r) => {
                    if sink_err.is_none() {
                        if let Err(e) = sink.push(&r) {
                            sink_err = Some(e);
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if last_flush.elapsed() >= flush_every {
                if let Err(e) = sink.flush() {
                    sink_err.get_or_insert(e);
                    stop.store(true, Ordering::Relaxed);
                }
                last_flush = Instant::now();
            }
        }
        let mut total = Stats::default();
        let mut first_err = None;
        for w in workers {
            match w.join() {
                Ok(Ok(s)) => total.merge(&s),
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(LiveError::Capture(std::io::Error::other(
                        "a capture thread panicked",
                    )));
                }
            }
        }
        if let Some(e) = sink_err {
            return Err(e.into());
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        Ok(total)
    }
}

/// Forwards a pipeline's records to the collecting thread.
struct ForwardSink(mpsc::SyncSender<FlowRecord>);

impl RecordSink for ForwardSink {
    fn push(&mut self, record: &FlowRecord) -> Result<(), SinkError> {
        self.0
            .send(record.clone())
            .map_err(|_| SinkError::Failed("record collector has stopped".into()))
    }
    fn describe(&self) -> String {
        "capture-thread".into()
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

// The capture's parts, each a separate concern (ring, output, control).
#[allow(clippy::too_many_arguments)]
fn worker(
    mut ring: PacketRing,
    interface: &str,
    config: PipelineConfig,
    classifier: Arc<Classifier>,
    tx: mpsc::SyncSender<FlowRecord>,
    stop: &AtomicBool,
    hook: Option<Arc<dyn CaptureHook>>,
    live: Option<(Arc<LiveStats>, usize)>,
) -> Result<Stats, LiveError> {
    let mut pipeline = Pipeline::new(config, classifier);
    let mut sink = ForwardSink(tx);
    let mut drops = 0u64;
    let mut last_stats = Instant::now();
    let mut tagged = Vec::with_capacity(2048);
    let mut sink_err: Option<SinkError> = None;
    while !stop.load(Ordering::Relaxed) {
        ring.next_block(100, |p| {
            if let Some(h) = &hook {
                h.packet(p.data);
            }
            let data = match p.vlan {
                // The kernel strips the outer tag: put it back so the
                // decoder and the byte patterns see the frame as sent.
                Some((tpid, tci)) if p.data.len() >= 12 => {
                    tagged.clear();
                    tagged.extend_from_slice(&p.data[..12]);
                    tagged.extend_from_slice(&tpid.to_be_bytes());
                    tagged.extend_from_slice(&tci.to_be_bytes());
                    tagged.extend_from_slice(&p.data[12..]);
                    &tagged[..]
                }
                _ => p.data,
            };
            let extra = if p.vlan.is_some() { 4 } else { 0 };
            let pkt = PacketRef {
                ts_ns: p.ts_ns,
                data,
                orig_len: p.wire_len + extra,
                linktype: linktype::ETHERNET,
                interface: 0,
            };
            if let Err(e) = pipeline.packet(&pkt, interface, &mut sink) {
                sink_err.get_or_insert(e);
            }
        })
        .map_err(LiveError::Capture)?;
        if let Some(e) = sink_err.take() {
            return Err(e.into());
        }
        pipeline.tick(now_ns(), &mut sink)?;
        if last_stats.elapsed() >= Duration::from_secs(1) {
            let (p, d) = ring.statistics().map_err(LiveError::Capture)?;
            if let Some(h) = &hook {
                h.kernel_stats(p, d);
            }
            drops += d;
            last_stats = Instant::now();
            if let Some((live, slot)) = &live {
                let mut now = pipeline.stats();
                now.capture_drops = drops;
                live.publish(*slot, now);
            }
        }
    }
    // Drain what the kernel still holds, then read the final drop count.
    let mut discarded = 0;
    loop {
        let n = ring.next_block(0, |_| {}).map_err(LiveError::Capture)?;
        if n == 0 {
            break;
        }
        discarded += n as u64;
    }
    let (p, d) = ring.statistics().map_err(LiveError::Capture)?;
    if let Some(h) = &hook {
        h.kernel_stats(p, d);
        h.discarded(discarded);
    }
    drops += d;
    let mut stats = pipeline.finish(&mut sink)?;
    stats.capture_drops = drops;
    if let Some((live, slot)) = &live {
        live.publish(*slot, stats.clone());
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpf_text_parses() {
        let p = parse_bpf("2\n6 0 0 65535\n6 0 0 0\n").unwrap();
        assert_eq!(
            p[0],
            BpfInsn {
                code: 6,
                jt: 0,
                jf: 0,
                k: 65535
            }
        );
        assert_eq!(parse_bpf("2,6 0 0 65535,6 0 0 0").unwrap(), p);
        assert!(parse_bpf("3\n6 0 0 1\n")
            .unwrap_err()
            .contains("first line says 3"));
        assert!(parse_bpf("1\nx y z\n")
            .unwrap_err()
            .contains("instruction 1"));
        assert!(parse_bpf("").is_err());
    }

    #[test]
    fn caplen_clamps_accepting_returns() {
        let p = parse_bpf("2\n6 0 0 262144\n6 0 0 0\n").unwrap();
        let f = effective_filter(Some(&p), 96).unwrap();
        assert_eq!((f[0].k, f[1].k), (96, 0));
        assert_eq!(effective_filter(None, 64).unwrap()[0].k, 64);
        assert!(effective_filter(None, 0).is_none());
    }
}
