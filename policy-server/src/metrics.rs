//! The policy server's `/metrics` (on the HTTP port and on `--metrics
//! HOST:PORT`): the counters the daemon already keeps (PDP, HTTP, the
//! decision loop, access control), rendered at scrape time.

use crate::auth::AuthStats;
use crate::bandwidth::Rates;
use crate::engine::DecisionTable;
use crate::pdp::PdpStats;
use qosloop_runtime::metrics::{Exposition, Kind};
use qosloop_schema::guard::ConnLimiter;
use qosloop_schema::DecisionKind;
use qosloop_store::now_ns;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The verdicts, in the order `/metrics` shows them.
const VERDICTS: [(DecisionKind, &str); 3] = [
    (DecisionKind::Accept, "accept"),
    (DecisionKind::Remark, "remark"),
    (DecisionKind::Drop, "drop"),
];

/// `kind`'s index in [`VERDICTS`].
fn slot(kind: DecisionKind) -> usize {
    match kind {
        DecisionKind::Accept => 0,
        DecisionKind::Remark => 1,
        DecisionKind::Drop => 2,
    }
}

/// Counters of the decision loop (kept by [`crate::server`]).
#[derive(Debug, Default)]
pub struct LoopStats {
    /// Decisions issued (new or changed), by verdict in [`VERDICTS`] order.
    pub issued: [AtomicU64; 3],
    /// Decisions withdrawn.
    pub removed: AtomicU64,
    /// Flow records read by the bandwidth manager.
    pub records_read: AtomicU64,
    /// Rows skipped as malformed.
    pub records_malformed: AtomicU64,
    /// Flow ids stepped over after the gap timeout.
    pub gaps_skipped: AtomicU64,
    /// Reads of new flow records that failed.
    pub read_failures: AtomicU64,
}

impl LoopStats {
    /// Counts the decisions of one evaluation.
    pub fn count_decisions<'a>(
        &self,
        installed: impl Iterator<Item = &'a qosloop_schema::Decision>,
        removed: usize,
    ) {
        for d in installed {
            self.issued[slot(d.kind())].fetch_add(1, Ordering::Relaxed);
        }
        self.removed.fetch_add(removed as u64, Ordering::Relaxed);
    }
}

/// Counters of the web server's connections.
#[derive(Debug, Default)]
pub struct HttpStats {
    /// Connections closed for a header or idle timeout.
    pub timeouts: AtomicU64,
    /// Connections ended by another error (malformed request, reset).
    pub errors: AtomicU64,
    /// TLS handshakes that failed or timed out (TLS configured).
    pub tls_failures: AtomicU64,
}

/// Everything `/metrics` reads.
#[derive(Clone, Debug)]
pub struct MetricsSource {
    pub decisions: watch::Receiver<Arc<DecisionTable>>,
    pub rates: watch::Receiver<Arc<Rates>>,
    pub pdp_stats: Arc<PdpStats>,
    pub pdp_limiter: ConnLimiter,
    pub loop_stats: Arc<LoopStats>,
    /// How far behind the poll the closed window ends (`rate_lag_ms`).
    pub rate_lag: Duration,
    /// The web server's, when it runs.
    pub http: Option<(ConnLimiter, Arc<HttpStats>, Arc<AuthStats>)>,
}

impl MetricsSource {
    /// The exposition text.
    pub fn render(&self) -> String {
        let mut e = Exposition::new();
        e.build_info("policy-server", env!("CARGO_PKG_VERSION"));
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let l = &self.loop_stats;
        e.family(
            "qosloop_policy_decisions_issued_total",
            Kind::Counter,
            "Decisions issued (new or changed) by verdict; remove counts withdrawn decisions.",
        );
        for (i, (_, verdict)) in VERDICTS.iter().enumerate() {
            e.sample(&[("verdict", verdict)], n(&l.issued[i]) as f64);
        }
        e.sample(&[("verdict", "remove")], n(&l.removed) as f64);
        let table = self.decisions.borrow().clone();
        let mut in_force = [0u64; 3];
        for d in table.all() {
            in_force[slot(d.kind())] += 1;
        }
        e.family(
            "qosloop_policy_decisions",
            Kind::Gauge,
            "Decisions in force by verdict.",
        );
        for ((_, verdict), count) in VERDICTS.iter().zip(in_force) {
            e.sample(&[("verdict", verdict)], count as f64);
        }
        e.counter(
            "qosloop_policy_flow_records_read_total",
            "Flow records read by the bandwidth manager.",
            n(&l.records_read),
        );
        e.counter(
            "qosloop_policy_flow_records_malformed_total",
            "Stored rows skipped because they do not form a flow record.",
            n(&l.records_malformed),
        );
        e.counter(
            "qosloop_policy_flow_id_gaps_skipped_total",
            "Flow ids stepped over after the gap timeout.",
            n(&l.gaps_skipped),
        );
        e.counter(
            "qosloop_policy_flow_read_failures_total",
            "Reads of new flow records that failed (retried next interval).",
            n(&l.read_failures),
        );
        let rates = self.rates.borrow().clone();
        let age = if rates.at_ns > 0 {
            (now_ns() - rates.at_ns).max(0) as f64 / 1e9
        } else {
            f64::NAN
        };
        e.gauge(
            "qosloop_policy_rates_age_seconds",
            "Time since the last rate computation (NaN before the first).",
            age,
        );
        e.gauge(
            "qosloop_policy_rate_window_lag_seconds",
            "How far behind each poll the rate window it closes ends.",
            self.rate_lag.as_secs_f64(),
        );
        e.gauge(
            "qosloop_policy_rate_interval_seconds",
            "Length of the last rate window.",
            rates.interval_ns as f64 / 1e9,
        );
        let pdp = self.pdp_stats.snapshot(&self.pdp_limiter.stats());
        e.counter(
            "qosloop_policy_pdp_sessions_total",
            "Enforcer sessions opened (OPN accepted).",
            pdp.connections,
        );
        e.gauge(
            "qosloop_policy_pdp_connections",
            "PDP connections open.",
            pdp.connections_open as f64,
        );
        e.family(
            "qosloop_policy_pdp_refused_total",
            Kind::Counter,
            "PDP connections refused, by reason.",
        );
        for (reason, v) in [
            ("bad_identity", pdp.refused_bad_identity),
            ("certificate_mismatch", pdp.refused_certificate_mismatch),
            ("pep_id_in_use", pdp.refused_pep_id_in_use),
            ("tls", pdp.refused_tls),
            ("limit_per_peer", pdp.refused_limit_per_peer),
            ("limit_total", pdp.refused_limit_total),
        ] {
            e.sample(&[("reason", reason)], v as f64);
        }
        e.family(
            "qosloop_policy_pdp_session_timeouts_total",
            Kind::Counter,
            "PDP sessions closed for a timeout, by kind.",
        )
        .sample(&[("kind", "idle")], pdp.idle_timeouts as f64)
        .sample(&[("kind", "write")], pdp.write_timeouts as f64);
        e.counter(
            "qosloop_policy_pdp_decisions_sent_total",
            "Decisions sent to enforcers (COPS DEC entries).",
            pdp.decisions_sent,
        );
        e.counter(
            "qosloop_policy_pdp_reports_total",
            "Enforcement reports received.",
            pdp.reports,
        );
        e.family(
            "qosloop_policy_pdp_reports_dropped_total",
            Kind::Counter,
            "Enforcement reports or events lost, by reason.",
        )
        .sample(
            &[("reason", "queue_full")],
            pdp.reports_dropped_queue_full as f64,
        )
        .sample(
            &[("reason", "store_failed")],
            pdp.events_store_failed as f64,
        );
        if let Some((limiter, http, auth)) = &self.http {
            let c = limiter.stats();
            e.gauge(
                "qosloop_policy_http_connections",
                "HTTP connections open.",
                c.open as f64,
            );
            e.family(
                "qosloop_policy_http_connections_refused_total",
                Kind::Counter,
                "HTTP connections refused or ended early, by reason.",
            );
            for (reason, v) in [
                ("limit_per_peer", c.refused_per_peer),
                ("limit_total", c.refused_total),
                ("timeout", n(&http.timeouts)),
                ("error", n(&http.errors)),
                ("tls", n(&http.tls_failures)),
            ] {
                e.sample(&[("reason", reason)], v as f64);
            }
            e.family(
                "qosloop_policy_http_auth_failures_total",
                Kind::Counter,
                "HTTP API requests refused by access control, by reason.",
            );
            for (reason, v) in auth.by_reason() {
                e.sample(&[("reason", reason)], v as f64);
            }
        }
        e.finish()
    }
}
