//! Bytes placed on the time axis, so that a rate is measured over the time
//! the traffic happened, not over when its records became visible.
//!
//! A flow record covers `[start_ns, end_ns]` of capture time (an interim
//! record: the packets since the flow's previous record). Its bytes are
//! spread evenly over that span into fixed-width buckets; the rate of a
//! window is the bytes of the buckets it covers (pro rata at its edges)
//! divided by its length. Counting by visibility instead makes the rate
//! beat between the exporter's cadence and the poll interval (four interim
//! records in one poll, five in the next: ±25%), which is larger than the
//! margins of the paper's load bands.
//!
//! A window is closed once: what arrives later for time already closed is
//! counted as late (and reported), never added to a later window.

use std::collections::BTreeMap;

/// Buckets one record may spread over.
const MAX_BUCKETS: i64 = 10_000;

/// Bytes over time in buckets of `width_ns`.
#[derive(Clone, Debug)]
pub struct TimeBuckets {
    width_ns: i64,
    buckets: BTreeMap<i64, f64>,
    /// Time before this has been closed.
    closed_ns: i64,
    late_bytes: u64,
}

impl TimeBuckets {
    pub fn new(width_ns: i64) -> TimeBuckets {
        TimeBuckets {
            width_ns: width_ns.max(1),
            buckets: BTreeMap::new(),
            closed_ns: i64::MIN,
            late_bytes: 0,
        }
    }

    /// Places `bytes` evenly over `[start_ns, end_ns]`.
    pub fn add(&mut self, start_ns: i64, end_ns: i64, bytes: u64) {
        let (start, end) = if end_ns < start_ns {
            (end_ns, start_ns)
        } else {
            (start_ns, end_ns)
        };
        if end == start {
            if start < self.closed_ns {
                self.late_bytes = self.late_bytes.saturating_add(bytes);
            } else {
                *self
                    .buckets
                    .entry(start.div_euclid(self.width_ns))
                    .or_default() += bytes as f64;
            }
            return;
        }
        let span = end.saturating_sub(start) as f64;
        let per_ns = bytes as f64 / span;
        let mut late = 0.0;
        // A record spanning more than MAX_BUCKETS buckets (a long flow
        // without interim updates, or a bogus timestamp) keeps only its
        // recent part; the rest is counted as late.
        let max_span = self.width_ns.saturating_mul(MAX_BUCKETS);
        let start = if end.saturating_sub(start) > max_span {
            late += (end - max_span).saturating_sub(start) as f64 * per_ns;
            end - max_span
        } else {
            start
        };
        let mut b = start.div_euclid(self.width_ns);
        loop {
            let b0 = b.saturating_mul(self.width_ns);
            let b1 = b0.saturating_add(self.width_ns);
            let lo = start.max(b0);
            let hi = end.min(b1);
            if hi > lo {
                let late_ns = hi.min(self.closed_ns).saturating_sub(lo).max(0);
                late += late_ns as f64 * per_ns;
                let live_ns = hi - lo - late_ns;
                if live_ns > 0 {
                    *self.buckets.entry(b).or_default() += live_ns as f64 * per_ns;
                }
            }
            if b1 >= end || b1 == i64::MAX {
                break;
            }
            b += 1;
        }
        self.late_bytes = self.late_bytes.saturating_add(late.round() as u64);
    }

    /// The bytes in `[from_ns, to_ns)` (buckets cut by the edges count pro
    /// rata); closes everything before `to_ns`.
    pub fn take(&mut self, from_ns: i64, to_ns: i64) -> f64 {
        let mut sum = 0.0;
        let first = from_ns.div_euclid(self.width_ns);
        let last = to_ns.saturating_sub(1).div_euclid(self.width_ns);
        for (&b, &bytes) in self.buckets.range(first..=last) {
            let b0 = b.saturating_mul(self.width_ns);
            let b1 = b0.saturating_add(self.width_ns);
            let overlap = (to_ns.min(b1) - from_ns.max(b0)).max(0) as f64;
            sum += bytes * overlap / self.width_ns as f64;
        }
        // A bucket cut by `to_ns` stays whole: the next window starts at
        // `to_ns` and takes only its share after the cut.
        let cut = to_ns.div_euclid(self.width_ns);
        self.buckets = self.buckets.split_off(&cut);
        self.closed_ns = self.closed_ns.max(to_ns);
        sum
    }

    /// The buckets holding bytes, `(index, bytes)`, oldest first: bucket
    /// `i` covers `[i · width, (i + 1) · width)`.
    pub fn buckets(&self) -> impl Iterator<Item = (i64, f64)> + '_ {
        self.buckets.iter().map(|(&b, &v)| (b, v))
    }

    /// Bytes that arrived for time already closed.
    pub fn late_bytes(&self) -> u64 {
        self.late_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: i64 = 1_000_000;

    #[test]
    fn interim_records_give_an_exact_rate_whatever_their_phase() {
        // 1000 kbit/s = 125 bytes per ms, exported every 250 ms starting at
        // an offset that does not line up with the windows.
        let mut t = TimeBuckets::new(50 * MS);
        let mut start = 37 * MS;
        while start < 5_000 * MS {
            t.add(start, start + 250 * MS, 125 * 250);
            start += 250 * MS;
        }
        for k in 1..4 {
            let bytes = t.take(k * 1000 * MS, (k + 1) * 1000 * MS);
            assert!((bytes - 125_000.0).abs() < 1.0, "window {k}: {bytes}");
        }
    }

    #[test]
    fn late_bytes_are_counted_not_added_to_a_later_window() {
        let mut t = TimeBuckets::new(100 * MS);
        t.add(0, 1000 * MS, 1000);
        assert!((t.take(0, 1000 * MS) - 1000.0).abs() < 1e-6);
        t.add(500 * MS, 1500 * MS, 1000);
        assert_eq!(t.late_bytes(), 500);
        assert!((t.take(1000 * MS, 2000 * MS) - 500.0).abs() < 1e-6);
        t.add(1800 * MS, 1800 * MS, 7);
        assert_eq!(t.late_bytes(), 507);
    }

    #[test]
    fn absurd_spans_neither_hang_nor_overflow() {
        let mut t = TimeBuckets::new(50 * MS);
        t.add(0, i64::MAX, u64::MAX);
        t.add(i64::MIN, i64::MAX, 10);
        assert!(t.take(0, 1000 * MS) >= 0.0);
        assert!(t.late_bytes() > 0);
    }

    #[test]
    fn a_window_edge_inside_a_bucket_splits_it() {
        let mut t = TimeBuckets::new(100 * MS);
        t.add(0, 200 * MS, 200);
        assert!((t.take(0, 150 * MS) - 150.0).abs() < 1e-6);
        assert!((t.take(150 * MS, 200 * MS) - 50.0).abs() < 1e-6);
        assert_eq!(t.late_bytes(), 0);
    }
}
