//! The enforcer's `/metrics` (`--metrics HOST:PORT`): how long applying
//! decisions takes and how often it fails, whether a PDP session is up,
//! and the kernel's counters summarised per decision class (`accept`,
//! `remark`, `drop`: what happens out of profile) — read from the kernel
//! by [`crate::status::read`] at start, after each change and every
//! [`KERNEL_EVERY`], never per scrape (a scrape must not touch netlink).
//! Each read also gives the per-decision counters that the PEP reports to
//! the PDP (an accounting RPT, [`qosloop_schema::AccountingReport`]).

use crate::backend::KernelBackend;
use crate::enforcer::Enforcer;
use qosloop_runtime::metrics::{Exposition, Histogram, Kind};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use qosloop_schema::{
    AccountingReport, ClassCounters, DecisionCounters, DecisionKind, MAX_ACCOUNTED_CLASSES,
    MAX_ACCOUNTED_DECISIONS,
};

/// The per-decision counters of `status`, bounded.
fn accounting(status: &crate::status::Status, at_ns: u64) -> AccountingReport {
    let mut decisions: Vec<DecisionCounters> = status
        .decisions
        .iter()
        .filter_map(|d| {
            let kind = match d.kind.as_str() {
                "accept" => DecisionKind::Accept,
                "remark" => DecisionKind::Remark,
                "drop" => DecisionKind::Drop,
                _ => return None,
            };
            Some(DecisionCounters {
                decision_id: d.id,
                version: d.version,
                kind,
                in_profile_packets: d.in_profile_packets,
                in_profile_bytes: d.in_profile_bytes,
                out_of_profile_packets: d.out_of_profile_packets,
                out_of_profile_bytes: d.out_of_profile_bytes,
            })
        })
        .collect();
    decisions.sort_by_key(|d| d.decision_id);
    decisions.truncate(MAX_ACCOUNTED_DECISIONS);
    let omitted = status.decisions.len().saturating_sub(decisions.len()) as u64;
    // The HTB classes' statistics (already in handle order).
    let classes: Vec<ClassCounters> = status
        .htb_classes
        .iter()
        .take(MAX_ACCOUNTED_CLASSES)
        .map(|c| ClassCounters {
            classid: c.classid.clone(),
            parent: if c.parent == crate::tc::TC_H_ROOT {
                "root".to_owned()
            } else {
                crate::tc::TcHandle(c.parent).to_string()
            },
            bytes: c.bytes,
            packets: u64::from(c.packets),
            drops: u64::from(c.drops),
            overlimits: u64::from(c.overlimits),
            backlog_bytes: u64::from(c.backlog_bytes),
        })
        .collect();
    let classes_omitted = status.htb_classes.len().saturating_sub(classes.len()) as u64;
    AccountingReport {
        at_ns,
        decisions,
        omitted,
        classes,
        classes_omitted,
    }
}

/// How often the kernel counters are read while nothing changes.
pub const KERNEL_EVERY: Duration = Duration::from_secs(5);

/// One decision class's kernel counters, summed over its decisions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClassTotals {
    pub decisions: u64,
    pub in_profile_packets: u64,
    pub in_profile_bytes: u64,
    pub out_of_profile_packets: u64,
    pub out_of_profile_bytes: u64,
}

/// See the module doc.
#[derive(Debug)]
pub struct EnforcerMetrics {
    /// Seconds one change (a DEC, a decisions file) took in the kernel.
    pub apply_seconds: Histogram,
    /// Changes the kernel refused (a DEC applied as one change that is
    /// then retried one decision at a time counts once per refusal).
    pub apply_failures: AtomicU64,
    /// Periodic reconciliations that failed.
    pub reconcile_failures: AtomicU64,
    /// Reads of the kernel counters that failed.
    pub kernel_read_failures: AtomicU64,
    /// 1 while a PDP connection is open (from connect to session end).
    pub pdp_connected: AtomicU64,
    /// PDP sessions that ended.
    pub pdp_sessions_ended: AtomicU64,
    kernel: Mutex<BTreeMap<String, ClassTotals>>,
}

impl Default for EnforcerMetrics {
    fn default() -> Self {
        EnforcerMetrics {
            apply_seconds: Histogram::latency(),
            apply_failures: AtomicU64::new(0),
            reconcile_failures: AtomicU64::new(0),
            kernel_read_failures: AtomicU64::new(0),
            pdp_connected: AtomicU64::new(0),
            pdp_sessions_ended: AtomicU64::new(0),
            kernel: Mutex::new(BTreeMap::new()),
        }
    }
}

impl EnforcerMetrics {
    /// Counts the outcome of one change.
    pub fn applied<T, E>(&self, result: &Result<T, E>, elapsed: impl Fn(&T) -> Duration) {
        match result {
            Ok(s) => self.apply_seconds.observe_duration(elapsed(s)),
            Err(_) => {
                self.apply_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Reads the kernel's counters of `enforcer`'s interface; returns them
    /// per decision (the first [`MAX_ACCOUNTED_DECISIONS`] by id) for the
    /// PDP, or `None` when the kernel could not be read.
    pub fn refresh_kernel<B: KernelBackend>(
        &self,
        enforcer: &mut Enforcer<B>,
    ) -> Option<AccountingReport> {
        let layout = enforcer.layout().clone();
        let at_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        match crate::status::read(enforcer.backend(), &layout) {
            Ok(status) => {
                let mut by_kind: BTreeMap<String, ClassTotals> = ["accept", "remark", "drop"]
                    .iter()
                    .map(|k| ((*k).to_owned(), ClassTotals::default()))
                    .collect();
                for d in &status.decisions {
                    let t = by_kind.entry(d.kind.clone()).or_default();
                    t.decisions += 1;
                    t.in_profile_packets += d.in_profile_packets;
                    t.in_profile_bytes += d.in_profile_bytes;
                    t.out_of_profile_packets += d.out_of_profile_packets;
                    t.out_of_profile_bytes += d.out_of_profile_bytes;
                }
                if let Ok(mut k) = self.kernel.lock() {
                    *k = by_kind;
                }
                Some(accounting(&status, at_ns))
            }
            Err(e) => {
                self.kernel_read_failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "reading kernel counters for metrics failed");
                None
            }
        }
    }

    /// The classes' totals as last read.
    pub fn kernel(&self) -> BTreeMap<String, ClassTotals> {
        self.kernel.lock().map(|k| k.clone()).unwrap_or_default()
    }

    pub fn render(&self) -> String {
        let mut e = Exposition::new();
        e.build_info("enforcer", env!("CARGO_PKG_VERSION"));
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        e.family(
            "qosloop_enforcer_apply_seconds",
            Kind::Histogram,
            "Time one change (a DEC or a decisions file) took in the kernel.",
        )
        .histogram(&[], &self.apply_seconds.snapshot());
        e.counter(
            "qosloop_enforcer_apply_failures_total",
            "Changes the kernel refused.",
            n(&self.apply_failures),
        );
        e.counter(
            "qosloop_enforcer_reconcile_failures_total",
            "Periodic reconciliations that failed.",
            n(&self.reconcile_failures),
        );
        e.counter(
            "qosloop_enforcer_kernel_read_failures_total",
            "Reads of the kernel counters that failed.",
            n(&self.kernel_read_failures),
        );
        e.gauge(
            "qosloop_enforcer_pdp_connected",
            "1 while a PDP connection is open.",
            n(&self.pdp_connected) as f64,
        );
        e.counter(
            "qosloop_enforcer_pdp_sessions_ended_total",
            "PDP sessions that ended.",
            n(&self.pdp_sessions_ended),
        );
        let kernel = self.kernel();
        e.family(
            "qosloop_enforcer_decisions",
            Kind::Gauge,
            "Decisions in the kernel by class (what happens out of profile).",
        );
        for (class, t) in &kernel {
            e.sample(&[("class", class)], t.decisions as f64);
        }
        for (name, help, get) in [
            (
                "qosloop_enforcer_kernel_packets_total",
                "Packets the kernel counted for the decisions of a class, in or out of profile.",
                (|t: &ClassTotals, p: bool| {
                    if p {
                        t.in_profile_packets
                    } else {
                        t.out_of_profile_packets
                    }
                }) as fn(&ClassTotals, bool) -> u64,
            ),
            (
                "qosloop_enforcer_kernel_bytes_total",
                "Bytes the kernel counted for the decisions of a class, in or out of profile.",
                |t: &ClassTotals, p: bool| {
                    if p {
                        t.in_profile_bytes
                    } else {
                        t.out_of_profile_bytes
                    }
                },
            ),
        ] {
            e.family(name, Kind::Counter, help);
            for (class, t) in &kernel {
                e.sample(&[("class", class), ("profile", "in")], get(t, true) as f64);
                e.sample(
                    &[("class", class), ("profile", "out")],
                    get(t, false) as f64,
                );
            }
        }
        e.finish()
    }
}
