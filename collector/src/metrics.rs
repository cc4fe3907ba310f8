//! The collector's `/metrics` (`--metrics HOST:PORT`): the counters its
//! parts already keep — export sessions ([`crate::CollectorStats`]), the
//! storage writer ([`crate::store::WriterStats`]), the IPFIX/NetFlow
//! listeners and exporters ([`crate::ipfix`]) — rendered at scrape time.
//! Exporter labels are capped ([`MAX_EXPORTER_LABELS`]); the rest are
//! summed under `exporter="other"`.

use crate::ipfix::{board, UdpStatsHandle};
use crate::store::{writer_stats, WriteReq};
use qosloop_runtime::metrics::{Exposition, Kind, LabelCap};
use qosloop_schema::guard::ConnLimiter;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Exporters with a series of their own.
pub const MAX_EXPORTER_LABELS: usize = 100;

/// Everything the collector's `/metrics` reads.
#[derive(Debug, Clone)]
pub struct CollectorMetrics {
    pub(crate) counters: Arc<crate::session::Counters>,
    pub(crate) limiter: ConnLimiter,
    pub(crate) writer: mpsc::Sender<WriteReq>,
    pub(crate) udp: UdpStatsHandle,
    /// IPFIX exporters (addresses) and CRANE exporters (names), capped
    /// separately.
    pub(crate) exporters: Arc<LabelCap>,
    pub(crate) crane_exporters: Arc<LabelCap>,
}

impl CollectorMetrics {
    /// Adds the IPFIX listeners' counters.
    pub fn with_ingest(mut self, ingest: &crate::ipfix::Ingest) -> CollectorMetrics {
        self.udp = ingest.udp_stats_handle();
        self
    }

    pub fn render(&self) -> String {
        let mut e = Exposition::new();
        e.build_info("collector", env!("CARGO_PKG_VERSION"));
        // Export (CRANE) sessions.
        let c = self.limiter.stats();
        e.gauge(
            "qosloop_collector_export_connections",
            "Export connections open.",
            c.open as f64,
        );
        e.family(
            "qosloop_collector_export_refused_total",
            Kind::Counter,
            "Export connections refused or sessions ended, by reason.",
        );
        e.sample(&[("reason", "limit_per_peer")], c.refused_per_peer as f64);
        e.sample(&[("reason", "limit_total")], c.refused_total as f64);
        for (reason, n) in self.counters.snapshot() {
            e.sample(&[("reason", reason)], n as f64);
        }
        e.gauge(
            "qosloop_collector_export_decoded_bytes",
            "Decoded records waiting for storage, bytes.",
            self.counters.decoded_in_flight() as f64,
        );
        e.gauge(
            "qosloop_collector_export_receiving_bytes",
            "Bytes reserved for large messages being received.",
            self.counters.receiving() as f64,
        );
        // Per exporter (CRANE), capped like the IPFIX exporters.
        let crane = self
            .crane_exporters
            .fold(self.counters.by_exporter(), |a, b| a.add(b));
        e.family(
            "qosloop_collector_export_messages_total",
            Kind::Counter,
            "DATA messages committed per exporter, by outcome.",
        );
        for (x, c) in &crane {
            e.sample(
                &[("exporter", x), ("outcome", "stored")],
                (c.messages - c.duplicates) as f64,
            );
            e.sample(
                &[("exporter", x), ("outcome", "duplicate")],
                c.duplicates as f64,
            );
        }
        e.family(
            "qosloop_collector_export_records_total",
            Kind::Counter,
            "Flow records stored per exporter.",
        );
        for (x, c) in &crane {
            e.sample(&[("exporter", x)], c.records as f64);
        }
        // The storage writer.
        let w = writer_stats();
        let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
        e.family(
            "qosloop_collector_commit_seconds",
            Kind::Histogram,
            "Time to commit one group of messages, retries included.",
        )
        .histogram(&[], &w.commit_seconds.snapshot());
        e.gauge(
            "qosloop_collector_write_queue_messages",
            "Messages waiting for the storage writer (backlog).",
            (self.writer.max_capacity() - self.writer.capacity()) as f64,
        );
        e.gauge(
            "qosloop_collector_write_queue_capacity_messages",
            "Messages the writer's queue holds at most.",
            self.writer.max_capacity() as f64,
        );
        e.family(
            "qosloop_collector_messages_committed_total",
            Kind::Counter,
            "Messages committed, by outcome.",
        )
        .sample(
            &[("outcome", "stored")],
            n(&w.messages_committed) - n(&w.messages_duplicate),
        )
        .sample(&[("outcome", "duplicate")], n(&w.messages_duplicate));
        e.counter(
            "qosloop_collector_records_committed_total",
            "Flow records stored.",
            w.records_committed.load(Ordering::Relaxed),
        );
        e.counter(
            "qosloop_collector_messages_failed_total",
            "Messages whose storing failed.",
            w.messages_failed.load(Ordering::Relaxed),
        );
        e.counter(
            "qosloop_collector_commit_lock_waits_total",
            "Commits tried again after waiting too long on another writer's lock.",
            w.lock_waits.load(Ordering::Relaxed),
        );
        // IPFIX / NetFlow listeners.
        let udp = self.udp.snapshot();
        e.family(
            "qosloop_collector_ipfix_datagrams_total",
            Kind::Counter,
            "Datagrams received per UDP listener.",
        );
        for (l, s) in &udp {
            e.sample(&[("listener", l)], s.datagrams as f64);
        }
        e.family(
            "qosloop_collector_ipfix_received_bytes_total",
            Kind::Counter,
            "Bytes received per UDP listener.",
        );
        for (l, s) in &udp {
            e.sample(&[("listener", l)], s.bytes as f64);
        }
        e.family(
            "qosloop_collector_ipfix_listener_drops_total",
            Kind::Counter,
            "Datagrams dropped before decoding per UDP listener, by reason.",
        );
        for (l, s) in &udp {
            e.sample(
                &[("listener", l), ("reason", "kernel")],
                s.kernel_drops as f64,
            );
            e.sample(
                &[("listener", l), ("reason", "not_allowed")],
                s.not_allowed as f64,
            );
            e.sample(
                &[("listener", l), ("reason", "too_many_exporters")],
                s.too_many_exporters as f64,
            );
        }
        // Per exporter, capped.
        let exporters = self
            .exporters
            .fold(board::board().by_exporter(), |a, b| a.add(b));
        e.family(
            "qosloop_collector_ipfix_messages_total",
            Kind::Counter,
            "IPFIX/NetFlow messages parsed per exporter.",
        );
        for (x, c) in &exporters {
            e.sample(&[("exporter", x)], c.messages as f64);
        }
        e.family(
            "qosloop_collector_ipfix_records_total",
            Kind::Counter,
            "Flow records decoded per exporter.",
        );
        for (x, c) in &exporters {
            e.sample(&[("exporter", x)], c.records as f64);
        }
        e.family(
            "qosloop_collector_ipfix_sequence_gaps_total",
            Kind::Counter,
            "Records (or v9 messages) the sequence numbers say were lost, per exporter.",
        );
        for (x, c) in &exporters {
            e.sample(&[("exporter", x)], c.sequence_gaps as f64);
        }
        e.family(
            "qosloop_collector_ipfix_drops_total",
            Kind::Counter,
            "Messages, sets, templates or records not decoded, per exporter and reason.",
        );
        for (x, c) in &exporters {
            // Only reasons that occurred: 23 reasons per exporter would
            // mostly be zeros.
            for (r, n) in c.nonzero_drops() {
                e.sample(&[("exporter", x), ("reason", r.as_str())], n as f64);
            }
        }
        e.counter(
            "qosloop_collector_ipfix_exporter_entries_untracked_total",
            "Exporter counter entries not kept for metrics (board full).",
            board::board().overflow(),
        );
        e.finish()
    }
}
