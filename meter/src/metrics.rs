//! The meter's `/metrics` (`--metrics HOST:PORT`, live capture): the
//! capture threads' [`Stats`] as they publish them each second
//! ([`LiveStats`]) and the acknowledged export's counters
//! ([`qosloop_exporter::Stats`]), rendered at scrape time. No label is
//! per flow; the export target is one label value per `--export`.

use crate::decode::DecodeError;
use crate::live::LiveStats;
use crate::pipeline::Stats;
use qosloop_runtime::metrics::{Exposition, Kind};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Everything the meter's `/metrics` reads.
#[derive(Debug, Clone, Default)]
pub struct MeterMetrics {
    pub capture: Arc<LiveStats>,
    pub exports: Vec<(String, Arc<qosloop_exporter::Stats>)>,
}

impl MeterMetrics {
    pub fn render(&self) -> String {
        let mut e = Exposition::new();
        e.build_info("meter", env!("CARGO_PKG_VERSION"));
        capture(&mut e, &self.capture.total());
        e.family(
            "qosloop_meter_export_records_total",
            Kind::Counter,
            "Flow records handed to the export, per target.",
        );
        let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
        for (t, s) in &self.exports {
            e.sample(&[("target", t)], n(&s.records));
        }
        e.family(
            "qosloop_meter_export_acknowledged_records_total",
            Kind::Counter,
            "Flow records a collector acknowledged (committed), per target.",
        );
        for (t, s) in &self.exports {
            e.sample(&[("target", t)], n(&s.acked_records));
        }
        e.family(
            "qosloop_meter_export_spooled_records_total",
            Kind::Counter,
            "Flow records written to the disk spool, per target.",
        );
        for (t, s) in &self.exports {
            e.sample(&[("target", t)], n(&s.spooled_records));
        }
        e.family(
            "qosloop_meter_export_dropped_records_total",
            Kind::Counter,
            "Flow records dropped (spool full or failed), per target.",
        );
        for (t, s) in &self.exports {
            e.sample(&[("target", t)], n(&s.dropped_records));
        }
        e.family(
            "qosloop_meter_export_failovers_total",
            Kind::Counter,
            "Collector failovers, per target and cause.",
        );
        for (t, s) in &self.exports {
            let timeouts = n(&s.ack_timeouts);
            e.sample(&[("target", t), ("cause", "ack_timeout")], timeouts);
            e.sample(
                &[("target", t), ("cause", "connection")],
                (n(&s.failovers) - timeouts).max(0.0),
            );
        }
        e.finish()
    }
}

fn capture(e: &mut Exposition, s: &Stats) {
    e.counter(
        "qosloop_meter_packets_total",
        "Packets seen (before decoding).",
        s.packets,
    );
    e.counter(
        "qosloop_meter_wire_bytes_total",
        "Bytes of the packets seen, link layer included.",
        s.wire_bytes,
    );
    e.counter(
        "qosloop_meter_metered_packets_total",
        "Packets counted into flows.",
        s.counted_packets,
    );
    e.counter(
        "qosloop_meter_metered_bytes_total",
        "IP bytes counted into flows.",
        s.counted_bytes,
    );
    e.counter(
        "qosloop_meter_capture_drops_total",
        "Packets the kernel dropped before the meter saw them.",
        s.capture_drops,
    );
    e.counter(
        "qosloop_meter_sampled_out_packets_total",
        "Packets not selected by sampling.",
        s.sampled_out,
    );
    e.family(
        "qosloop_meter_decode_errors_total",
        Kind::Counter,
        "Undecodable packets, by reason.",
    );
    for r in DecodeError::ALL {
        e.sample(&[("reason", r.reason())], s.decode_errors[r.index()] as f64);
    }
    e.counter(
        "qosloop_meter_flows_total",
        "Flows created in the flow cache.",
        s.cache.flows_created,
    );
    e.counter(
        "qosloop_meter_flow_records_total",
        "Flow records produced (final and interim).",
        s.records,
    );
    e.counter(
        "qosloop_meter_evicted_flows_total",
        "Flows exported early because the cache was full.",
        s.cache.evicted_flows,
    );
    e.gauge(
        "qosloop_meter_peak_flows",
        "Most flows held in the cache at once.",
        s.cache.peak_flows as f64,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_meter_renders_a_valid_exposition() {
        let m = MeterMetrics::default();
        let text = m.render();
        let scrape = qosloop_testkit::metrics::parse(&text).unwrap();
        assert_eq!(scrape.value("qosloop_meter_packets_total", &[]), Some(0.0));
        assert_eq!(
            scrape.value(
                "qosloop_meter_decode_errors_total",
                &[("reason", "truncated_link")]
            ),
            Some(0.0)
        );
    }
}
