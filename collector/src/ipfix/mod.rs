//! IPFIX (RFC 7011), NetFlow v9 (RFC 3954) and NetFlow v5 ingest.
//!
//! The decoding core is pure and synchronous: [`Decoder`] takes the bytes
//! of one message, who sent it and when it arrived, and appends
//! `qosloop_schema::FlowRecord`s to a vector the caller owns, keeping
//! everything an exporter's templates imply (template and options template
//! state, data waiting for its template, sequence numbers, samplers, system
//! init times, totals of flows reported with total counters) per exporter
//! and observation domain, every piece of it bounded by [`Limits`]. Nothing
//! a peer sends is trusted: every length and count is checked against the
//! bytes present before use, and every refusal is counted by its
//! [`DropReason`] on the exporter (and domain) that caused it.
//!
//! Scoping (RFC 7011 §8): over UDP an exporter is its source address and
//! port, over TCP one connection ([`ExporterKey`]); templates belong to an
//! exporter's observation domain (v9: source id; v5: engine type and id).
//! Over UDP templates expire when not refreshed for
//! [`Limits::template_expiry_ns`] and a new definition of an id replaces
//! the old; over TCP withdrawals are honoured and templates die with the
//! session ([`Decoder::close_session`]).
//!
//! The pure core:
//! - `wire`: headers, sets and template records.
//! - `plan`: a template compiled into a field plan, and the record fields.
//! - `domain`: per-domain state and the mapping of fields to a flow record.
//! - `decoder`: limits, budgets and the exporter table.
//! - `walk`: the walk over one message's sets.
//! - `persist`: the stored text form of a template.
//! - `stats`: counters and drop reasons.
//! - `sink`: where records go: a vector, or the journal's encoding.
//!
//! Around it, the service ([`Ingest`]):
//! - `settings`: the `ipfix_*` configuration, checked.
//! - `udp`: sockets (SO_REUSEPORT, SO_RCVBUF, SO_RXQ_OVFL) and the
//!   receiving threads (recvmmsg), one decoder each.
//! - `tcp`: IPFIX over TCP/TLS, one decoder per session; `tcp_stats`: the
//!   counters of an address's sessions summed.
//! - `output`: batches to the storage writer, templates and counters to SQL.
//! - `sql`: the ingest's tables.
//!
//! Example (what the benchmarks and the fuzz targets do):
//!
//! ```
//! use qosloop_collector::ipfix::{Decoder, DropReason, Limits};
//! let mut decoder = Decoder::new(Limits::default());
//! let mut records = Vec::new();
//! let from = std::net::SocketAddr::from(([192, 0, 2, 1], 2055));
//! // Not a flow protocol: dropped, and counted on that exporter.
//! let r = decoder.decode_udp(from, &[0, 7, 0, 0], 1_700_000_000_000_000_000, &mut records);
//! assert_eq!(r, Err(DropReason::UnknownVersion));
//! assert!(records.is_empty());
//! ```

pub mod board;
mod decoder;
mod domain;
mod output;
mod persist;
mod plan;
mod service;
mod settings;
mod sink;
mod sql;
mod stats;
mod tcp;
mod tcp_stats;
mod udp;
mod walk;
mod wire;

pub use decoder::{
    ipfix_message_len, Decoder, ExporterKey, ExporterStats, Limits, Message, PENDING_SET_OVERHEAD,
};
pub use persist::TemplateChange;
pub use service::{Ingest, UdpStatsHandle};
pub use settings::{IngestSettings, ListenSpec, Transport};
pub use sink::{EncodedRecords, RecordSink};
pub use sql::{ListenerStats, StoredTemplate};
pub use stats::{Counters, DropReason};
pub use wire::Version;

#[cfg(test)]
mod tests;
