//! The Prometheus exposition of a daemon's counters (text format 0.0.4),
//! written here rather than through a metrics crate: each daemon already
//! keeps its counters in its own stats structs, so what is needed is only
//! to render a snapshot of them at scrape time.
//!
//! - [`Exposition`] writes families (`# HELP`, `# TYPE`, then the samples)
//!   with label values escaped; a family is declared once and its samples
//!   follow it, as the format requires.
//! - [`Histogram`] is the one live instrument: lock-free buckets for the
//!   latencies no stats struct holds (commit, apply).
//! - [`LabelCap`] bounds a label's values (exporters): the first `cap`
//!   values seen keep their own series, every later one is summed into
//!   `other`, so a peer cannot grow the scrape without bound.
//! - [`serve`] is the small HTTP/1.1 responder for daemons without a web
//!   server. The strict reader the tests scrape with is in the test kit
//!   (`qosloop_testkit::metrics`), not in the daemons.
//!
//! Conventions: names `qosloop_<component>_…`, counters end in `_total`,
//! base units (seconds, bytes), no per-flow label.

pub mod serve;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

pub use serve::{MetricsServer, ServeLimits};

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What a family is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Whether `name` is a valid metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`).
pub fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Whether `name` is a valid label name (`[a-zA-Z_][a-zA-Z0-9_]*`, not
/// starting with `__`).
pub fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__")
}

/// A label value as the format writes it: `\`, `"` and line feed escaped.
pub fn escape_label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A sample value as the format writes it.
pub fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// One scrape's text, built family by family.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
    declared: HashSet<String>,
    current: Option<(String, Kind)>,
}

/// Label pairs of a sample.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

impl Exposition {
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// Declares a family; its samples follow. A name declared twice is a
    /// bug in the caller (the format forbids it): it panics in debug
    /// builds and the second declaration is skipped in release builds.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        debug_assert!(valid_metric_name(name), "bad metric name {name}");
        debug_assert!(
            kind != Kind::Counter || name.ends_with("_total"),
            "counter {name} must end in _total"
        );
        let fresh = self.declared.insert(name.to_owned());
        debug_assert!(fresh, "family {name} declared twice");
        if fresh {
            let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
            let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
        }
        self.current = Some((name.to_owned(), kind));
        self
    }

    /// A sample of the family declared last (counter or gauge).
    pub fn sample(&mut self, labels: Labels<'_>, value: f64) -> &mut Self {
        let Some((name, kind)) = self.current.clone() else {
            debug_assert!(false, "sample without a family");
            return self;
        };
        debug_assert!(kind != Kind::Histogram, "use histogram() for {name}");
        self.line(&name, labels, None, value);
        self
    }

    /// Declares a counter with a single unlabelled sample.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> &mut Self {
        self.family(name, Kind::Counter, help)
            .sample(&[], value as f64)
    }

    /// Declares a gauge with a single unlabelled sample.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) -> &mut Self {
        self.family(name, Kind::Gauge, help).sample(&[], value)
    }

    /// The samples of one histogram series of the family declared last.
    pub fn histogram(&mut self, labels: Labels<'_>, h: &HistogramSnapshot) -> &mut Self {
        let Some((name, Kind::Histogram)) = self.current.clone() else {
            debug_assert!(false, "histogram samples without a histogram family");
            return self;
        };
        let mut cumulative = 0u64;
        for (bound, n) in h.bounds.iter().zip(&h.counts) {
            cumulative += n;
            self.line(
                &format!("{name}_bucket"),
                labels,
                Some(&format_value(*bound)),
                cumulative as f64,
            );
        }
        self.line(
            &format!("{name}_bucket"),
            labels,
            Some("+Inf"),
            h.count as f64,
        );
        self.line(&format!("{name}_sum"), labels, None, h.sum);
        self.line(&format!("{name}_count"), labels, None, h.count as f64);
        self
    }

    /// `qosloop_build_info{component, version} 1`.
    pub fn build_info(&mut self, component: &str, version: &str) -> &mut Self {
        self.family(
            "qosloop_build_info",
            Kind::Gauge,
            "The running qosloop build (always 1).",
        )
        .sample(&[("component", component), ("version", version)], 1.0)
    }

    fn line(&mut self, name: &str, labels: Labels<'_>, le: Option<&str>, value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() || le.is_some() {
            self.out.push('{');
            let mut first = true;
            let all = labels.iter().copied().chain(le.map(|l| ("le", l)));
            for (k, v) in all {
                debug_assert!(valid_label_name(k), "bad label name {k}");
                if !first {
                    self.out.push(',');
                }
                first = false;
                let _ = write!(self.out, "{k}=\"{}\"", escape_label_value(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", format_value(value));
    }

    /// The text to serve.
    pub fn finish(self) -> String {
        self.out
    }
}

/// Latency buckets in seconds, 100 µs to 10 s.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0, 10.0,
];

/// A histogram updated from any thread without a lock.
#[derive(Debug)]
pub struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    /// The sum of observations, as `f64` bits.
    sum_bits: AtomicU64,
}

/// A histogram's counts at one instant (counts per bucket, not cumulative).
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    /// Buckets with these upper bounds (sorted ascending; `+Inf` implied).
    pub fn new(bounds: &[f64]) -> Histogram {
        let mut bounds = bounds.to_vec();
        bounds.retain(|b| b.is_finite());
        bounds.sort_by(f64::total_cmp);
        bounds.dedup();
        Histogram {
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            bounds,
            count: AtomicU64::new(0),
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// [`LATENCY_BUCKETS`].
    pub fn latency() -> Histogram {
        Histogram::new(&LATENCY_BUCKETS)
    }

    pub fn observe(&self, v: f64) {
        if v.is_nan() {
            return;
        }
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        let _ = self
            .sum_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn observe_duration(&self, d: std::time::Duration) {
        self.observe(d.as_secs_f64());
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        // Count read last: a concurrent observation may show in a bucket
        // and not yet in the count, never the reverse beyond one sample;
        // the count is raised to the buckets' sum so +Inf stays cumulative.
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let sum = f64::from_bits(self.sum_bits.load(Ordering::Relaxed));
        let count = self.count.load(Ordering::Relaxed).max(counts.iter().sum());
        HistogramSnapshot {
            bounds: self.bounds.clone(),
            counts,
            count,
            sum,
        }
    }
}

/// The label value for everything beyond a [`LabelCap`].
pub const OTHER: &str = "other";

/// Bounds the values one label takes: the first `cap` values seen keep
/// their own series for the life of the process (so a counter never moves
/// from one series to another), the rest are summed under [`OTHER`].
#[derive(Debug)]
pub struct LabelCap {
    cap: usize,
    admitted: Mutex<HashSet<String>>,
}

impl LabelCap {
    pub fn new(cap: usize) -> LabelCap {
        LabelCap {
            cap,
            admitted: Mutex::new(HashSet::new()),
        }
    }

    /// The label value `value` is exposed under.
    pub fn label(&self, value: &str) -> String {
        let Ok(mut admitted) = self.admitted.lock() else {
            return OTHER.to_owned();
        };
        if value != OTHER && (admitted.contains(value) || admitted.len() < self.cap) {
            admitted.insert(value.to_owned());
            value.to_owned()
        } else {
            OTHER.to_owned()
        }
    }

    /// Sums `items` by their capped label, in label order. Items are
    /// admitted in the order given: pass them sorted for a stable choice.
    pub fn fold<T, I>(&self, items: I, mut add: impl FnMut(&mut T, &T)) -> BTreeMap<String, T>
    where
        T: Default,
        I: IntoIterator<Item = (String, T)>,
    {
        let mut out: BTreeMap<String, T> = BTreeMap::new();
        for (name, v) in items {
            add(out.entry(self.label(&name)).or_default(), &v);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_and_read_back() {
        let mut e = Exposition::new();
        e.family("qosloop_test_things_total", Kind::Counter, "Things.\nMore")
            .sample(&[("peer", "a\"b\\c\nd")], 3.0);
        let text = e.finish();
        assert!(text.contains("# HELP qosloop_test_things_total Things.\\nMore\n"));
        assert!(text.contains("qosloop_test_things_total{peer=\"a\\\"b\\\\c\\nd\"} 3\n"));
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_the_count() {
        let h = Histogram::new(&[0.01, 0.1, 1.0]);
        for v in [0.005, 0.05, 0.05, 5.0] {
            h.observe(v);
        }
        let mut e = Exposition::new();
        e.family("qosloop_test_seconds", Kind::Histogram, "Latency.")
            .histogram(&[], &h.snapshot());
        let text = e.finish();
        for line in [
            "qosloop_test_seconds_bucket{le=\"0.01\"} 1\n",
            "qosloop_test_seconds_bucket{le=\"0.1\"} 3\n",
            "qosloop_test_seconds_bucket{le=\"1\"} 3\n",
            "qosloop_test_seconds_bucket{le=\"+Inf\"} 4\n",
            "qosloop_test_seconds_count 4\n",
        ] {
            assert!(text.contains(line), "{line} not in {text}");
        }
        let sum = text
            .lines()
            .find_map(|l| l.strip_prefix("qosloop_test_seconds_sum "))
            .unwrap();
        assert!((sum.parse::<f64>().unwrap() - 5.105).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn label_cap_keeps_the_first_values_and_sums_the_rest() {
        let cap = LabelCap::new(2);
        let items = ["a", "b", "c", "d"].map(|n| (n.to_owned(), 1u64));
        let folded = cap.fold(items, |a, b| *a += b);
        assert_eq!(folded.len(), 3);
        assert_eq!(folded["a"], 1);
        assert_eq!(folded[OTHER], 2);
        // Admitted values stay admitted; a new one still goes to other.
        assert_eq!(cap.label("b"), "b");
        assert_eq!(cap.label("e"), OTHER);
        // A peer naming itself "other" does not take a slot.
        assert_eq!(LabelCap::new(5).label(OTHER), OTHER);
    }

    #[test]
    fn values_are_written_as_the_format_expects() {
        assert_eq!(format_value(3.0), "3");
        assert_eq!(format_value(0.25), "0.25");
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(f64::NAN), "NaN");
        assert!(valid_metric_name("qosloop_meter_packets_total"));
        assert!(!valid_metric_name("9x"));
        assert!(!valid_label_name("__name"));
    }
}
