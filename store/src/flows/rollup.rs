//! The per-minute rollups of `flows` (`flows_1m`, migration 0006): the
//! rows of a write, summed by minute of `end_ns` and the dimensions the
//! console groups on, and added to the table in the writer's transaction —
//! so a reader sees the rows and their rollup together or neither.
//!
//! Counters are scaled by the sampling interval as the console's SQL does
//! (`bytes × interval` when the interval is above 1), `flows` counts raw
//! rows. The upsert merges on `dims_key`, an exact encoding of the
//! dimension columns; groups are written in key order so that two writers
//! touching the same groups lock them in the same order.

use super::Batch;
use crate::dialect::{i64_of, Sql};
use qosloop_schema::FlowRecord;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

/// One minute, in ns.
pub const MINUTE_NS: i64 = 60_000_000_000;

/// The dimension values of one rollup row; its texts borrow from the
/// records (nothing is copied per record).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Group<'a> {
    pub minute_ns: i64,
    pub exporter_id: i64,
    pub src_addr: IpAddr,
    pub dst_addr: IpAddr,
    pub dst_port: u16,
    pub proto: u8,
    pub dscp: Option<u8>,
    pub vlan: Option<u16>,
    pub class: Option<&'a str>,
    pub user: Option<&'a str>,
    pub process: Option<&'a str>,
}

/// Scaled bytes, scaled packets, raw rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Sums {
    pub bytes: i64,
    pub packets: i64,
    pub flows: i64,
}

fn scaled(v: u64, interval: Option<u32>) -> i64 {
    i64_of(qosloop_schema::bandwidth::scale(v, interval))
}

impl<'a> Group<'a> {
    fn of(exporter_id: i64, r: &'a FlowRecord) -> Group<'a> {
        let end = i64_of(r.end_ns);
        Group {
            minute_ns: end - end.rem_euclid(MINUTE_NS),
            exporter_id,
            src_addr: r.src_addr,
            dst_addr: r.dst_addr,
            dst_port: r.dst_port,
            proto: r.proto,
            dscp: r.dscp,
            vlan: r.vlan,
            class: r.class.as_deref(),
            user: r.user.as_deref(),
            process: r.process.as_deref(),
        }
    }

    /// The exact text of the dimension columns: `-` for NULL, texts
    /// length-prefixed (so no value can imitate a separator). It starts
    /// with a digit, never with the backfill's `b`.
    pub fn dims_key(&self) -> String {
        let mut k = format!(
            "{}|{}|{}|{}|{}",
            self.exporter_id, self.src_addr, self.dst_addr, self.dst_port, self.proto
        );
        let num = |k: &mut String, v: Option<u32>| match v {
            Some(v) => {
                let _ = write!(k, "|{v}");
            }
            None => k.push_str("|-"),
        };
        num(&mut k, self.dscp.map(u32::from));
        num(&mut k, self.vlan.map(u32::from));
        for t in [&self.class, &self.user, &self.process] {
            match t {
                Some(s) => {
                    let _ = write!(k, "|{}:{s}", s.len());
                }
                None => k.push_str("|-"),
            }
        }
        k
    }
}

/// The rollup of the records of `batches`, in key order.
pub(crate) fn rollup<'a>(batches: &[&'a Batch]) -> Vec<(Group<'a>, Sums)> {
    let mut groups: BTreeMap<Group, Sums> = BTreeMap::new();
    for b in batches {
        for r in &b.records {
            let s = groups.entry(Group::of(b.exporter_id, r)).or_default();
            s.bytes = s.bytes.saturating_add(scaled(r.bytes, r.sampling_interval));
            s.packets = s
                .packets
                .saturating_add(scaled(r.packets, r.sampling_interval));
            s.flows += 1;
        }
    }
    groups.into_iter().collect()
}

/// Bound values per rollup row.
pub(crate) const COLUMNS: usize = 15;

/// Rows per upsert statement (15 × 1000 parameters, under SQLite's limit).
pub(crate) const ROWS_PER_UPSERT: usize = 1000;

/// The upsert of `rows` rollup rows. SQLite gets anonymous `?`
/// placeholders: it looks each named one (`$n`) up among those before it
/// while preparing, quadratic in a statement of 15,000.
pub(crate) fn upsert_sql(sql: Sql, rows: usize) -> String {
    let mut s = String::from(
        "INSERT INTO flows_1m (minute_ns, dims_key, exporter_id, src_addr, dst_addr, dst_port, proto, \
         dscp, vlan, class, \"user\", process, bytes, packets, flows) VALUES ",
    );
    for i in 0..rows {
        if i > 0 {
            s.push(',');
        }
        if sql.0 == crate::Dialect::Sqlite {
            s.push_str("(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)");
            continue;
        }
        let n = i * COLUMNS;
        let _ = write!(
            s,
            "(${}, ${}, ${}, {}, {}",
            n + 1,
            n + 2,
            n + 3,
            sql.inet_param(n + 4),
            sql.inet_param(n + 5)
        );
        for k in 6..=COLUMNS {
            let _ = write!(s, ", ${}", n + k);
        }
        s.push(')');
    }
    s.push_str(
        " ON CONFLICT (minute_ns, dims_key) DO UPDATE SET bytes = flows_1m.bytes + excluded.bytes, \
         packets = flows_1m.packets + excluded.packets, flows = flows_1m.flows + excluded.flows",
    );
    s
}

/// Adds `chunk`'s rows, in order, to a query of [`upsert_sql`]; `addr`
/// gives an address's bound text.
macro_rules! bind_rollup {
    ($q:expr, $chunk:expr, $addr:expr) => {{
        let mut q = $q;
        for (g, s) in $chunk {
            q = q
                .bind(g.minute_ns)
                .bind(g.dims_key())
                .bind(g.exporter_id)
                .bind($addr(g.src_addr))
                .bind($addr(g.dst_addr))
                .bind(i64::from(g.dst_port))
                .bind(i64::from(g.proto))
                .bind(g.dscp.map(i64::from))
                .bind(g.vlan.map(i64::from))
                .bind(g.class)
                .bind(g.user)
                .bind(g.process)
                .bind(s.bytes)
                .bind(s.packets)
                .bind(s.flows);
        }
        q
    }};
}
pub(crate) use bind_rollup;

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(src: [u8; 4], end_ns: u64, bytes: u64, sampling: Option<u32>) -> FlowRecord {
        FlowRecord {
            src_addr: IpAddr::from(src),
            dst_addr: IpAddr::from([10, 9, 9, 9]),
            src_port: 40_000 + bytes as u16,
            dst_port: 443,
            proto: 6,
            packets: 2,
            bytes,
            end_ns,
            sampling_interval: sampling,
            ..FlowRecord::default()
        }
    }

    #[test]
    fn records_sum_by_minute_and_dimensions_but_not_by_source_port() {
        let m = MINUTE_NS as u64;
        let b = Batch {
            exporter_id: 1,
            session_id: 1,
            seq: 1,
            records: vec![
                rec([10, 0, 0, 1], 5 * m + 1, 100, None),
                rec([10, 0, 0, 1], 6 * m - 1, 50, Some(10)),
                rec([10, 0, 0, 1], 6 * m, 7, Some(1)),
                rec([10, 0, 0, 2], 5 * m, 1, None),
            ],
            dedup: false,
        };
        let r = rollup(&[&b]);
        let got: Vec<(i64, String, Sums)> = r
            .iter()
            .map(|(g, s)| (g.minute_ns / MINUTE_NS, g.src_addr.to_string(), *s))
            .collect();
        let sums = |bytes, packets, flows| Sums {
            bytes,
            packets,
            flows,
        };
        assert_eq!(
            got,
            [
                (5, "10.0.0.1".into(), sums(600, 22, 2)),
                (5, "10.0.0.2".into(), sums(1, 2, 1)),
                (6, "10.0.0.1".into(), sums(7, 2, 1)),
            ]
        );
    }

    #[test]
    fn dims_keys_are_exact() {
        let r = rec([10, 0, 0, 1], 0, 1, None);
        let base = Group::of(3, &r);
        let mut a = base.clone();
        a.class = Some("a|-");
        let mut b = base.clone();
        b.class = Some("a");
        b.user = Some("-");
        let mut c = base.clone();
        c.class = Some("");
        assert_eq!(base.dims_key(), "3|10.0.0.1|10.9.9.9|443|6|-|-|-|-|-");
        let keys = [base.dims_key(), a.dims_key(), b.dims_key(), c.dims_key()];
        for (i, k) in keys.iter().enumerate() {
            assert!(!k.starts_with('b'));
            assert!(!keys[..i].contains(k), "{k} twice");
        }
    }

    #[test]
    fn the_upsert_numbers_every_value() {
        let s = upsert_sql(Sql(crate::Dialect::Postgres), 2);
        assert!(s.contains("($16, $17, $18, $19::inet, $20::inet, $21"));
        assert!(s.ends_with("flows = flows_1m.flows + excluded.flows"));
        assert!(s.contains("$30)"));
        let lite = upsert_sql(Sql(crate::Dialect::Sqlite), 2);
        assert_eq!(lite.matches('?').count(), 2 * COLUMNS);
    }
}
