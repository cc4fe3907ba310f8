//! # qosloop-meter
//!
//! The first stage of the qosloop loop: it turns packets — from pcap and
//! pcapng files or from a live interface (AF_PACKET, TPACKET_V3 ring,
//! PACKET_FANOUT across threads) — into flow records.
//!
//! A packet goes through one [`Pipeline`]: the optional header-only cut
//! (CAPLEN), [`decode`](decode::decode) (Ethernet, 802.1Q/QinQ, IPv4 with
//! options and fragments, IPv6 with extension headers, TCP, UDP, ICMP,
//! ICMPv6), optional [sampling](Sampling), the [`Classifier`]s (field/mask
//! rules, the flow-key XML of `seeds/004` Fig. 4, byte patterns in one
//! multi-pattern DFA), fragment tracking (later fragments go to their first
//! fragment's flow) and the [`FlowCache`] (idle/active timeouts, FIN/RST,
//! interim delta records, a memory bound that exports what it evicts).
//! Records leave through a [`RecordSink`]: JSON Lines for `--records-out`,
//! an in-process channel, or the export client (crate `qosloop-exporter`).
//!
//! Undecodable packets are counted by reason, never silently dropped; a
//! corrupt file or rule file is one error naming file and position.
//!
//! The meter does not export over the network itself, store records or
//! decide anything: those are the exporter's, collector's and policy
//! server's.

mod afpacket;
pub mod agent;
pub mod bench;
mod cache;
pub mod classify;
mod config;
pub mod decode;
pub mod dicap;
pub mod dpmi;
pub mod export_sink;
pub mod ipfix_sink;
mod live;
pub mod metrics;
pub mod pcap;
mod pipeline;
mod run;
mod sampling;
mod sink;

pub use cache::{Addr, CacheConfig, CacheKey, CacheStats, Export, ExportReason, FlowCache};
pub use classify::{Classifier, FieldRules, FlowKeyDefs, MatchMode, PatternRules, RuleError};
pub use config::{Config, ConfigError, Validated};
pub use live::{
    effective_filter, parse_bpf, BpfInsn, CaptureHook, FilterHandle, LiveCapture, LiveError,
    LiveStats,
};
pub use pcap::{CaptureError, CaptureReader, PacketRef, PcapWriter, PcapngWriter};
pub use pipeline::{Pipeline, PipelineConfig, Stats};
pub use run::{run_file, Progress, RunError, Summary};
pub use sampling::{Sampler, Sampling};
pub use sink::{ChannelSink, CountSink, JsonlSink, MultiSink, RecordSink, SinkError, VecSink};
