//! The per-minute rollups by one dimension at a time (`flows_1m_dim`,
//! migration 0007): the groups of `flows_1m` a write touches
//! (`rollup.rs`), summed again by minute and each single dimension — and
//! by none, the minute's totals — and added to the table in the writer's
//! transaction, beside the rows and `flows_1m`; and the same sums by hour
//! (`flows_1h_dim`, migration 0011), where the console ranks the top values
//! of long ranges.
//!
//! A day of traffic from many hosts leaves `flows_1m` nearly as long as
//! the raw table (one row per minute and combination of every dimension);
//! a query that groups and filters on one dimension reads here one row per
//! minute and value of that dimension instead.
//!
//! Only the named dimension's column is set; `dim_key` is the exact text
//! of its value (`-` for NULL, `=` and the value otherwise), on which the
//! upsert merges. Rows are written in key order (dimension, value, minute)
//! so that two writers lock shared rows in the same order.

use super::rollup::{Group, Sums};
use crate::dialect::Sql;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

/// The dimensions of `flows_1m_dim`, as its `dim` column names them.
pub const ROLLUP_DIMS: [&str; 11] = [
    "total", "exporter", "src_addr", "dst_addr", "dst_port", "proto", "dscp", "vlan", "class",
    "user", "process",
];

/// The value of one dimension (the variant order is [`ROLLUP_DIMS`]'s).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum DimValue<'a> {
    Total,
    Exporter(i64),
    SrcAddr(IpAddr),
    DstAddr(IpAddr),
    DstPort(u16),
    Proto(u8),
    Dscp(Option<u8>),
    Vlan(Option<u16>),
    Class(Option<&'a str>),
    User(Option<&'a str>),
    Process(Option<&'a str>),
}

impl<'a> DimValue<'a> {
    /// The value of every dimension of `g`, in [`ROLLUP_DIMS`] order.
    fn all(g: &Group<'a>) -> [DimValue<'a>; 11] {
        [
            DimValue::Total,
            DimValue::Exporter(g.exporter_id),
            DimValue::SrcAddr(g.src_addr),
            DimValue::DstAddr(g.dst_addr),
            DimValue::DstPort(g.dst_port),
            DimValue::Proto(g.proto),
            DimValue::Dscp(g.dscp),
            DimValue::Vlan(g.vlan),
            DimValue::Class(g.class),
            DimValue::User(g.user),
            DimValue::Process(g.process),
        ]
    }

    pub fn dim(&self) -> &'static str {
        let i = match self {
            DimValue::Total => 0,
            DimValue::Exporter(_) => 1,
            DimValue::SrcAddr(_) => 2,
            DimValue::DstAddr(_) => 3,
            DimValue::DstPort(_) => 4,
            DimValue::Proto(_) => 5,
            DimValue::Dscp(_) => 6,
            DimValue::Vlan(_) => 7,
            DimValue::Class(_) => 8,
            DimValue::User(_) => 9,
            DimValue::Process(_) => 10,
        };
        ROLLUP_DIMS[i]
    }

    /// `-` for none, `=` and the value otherwise; never the backfill's `b`.
    pub fn key(&self) -> String {
        fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
            v.map_or_else(|| "-".to_owned(), |v| format!("={v}"))
        }
        match *self {
            DimValue::Total => "-".to_owned(),
            DimValue::Exporter(v) => format!("={v}"),
            DimValue::SrcAddr(a) | DimValue::DstAddr(a) => format!("={a}"),
            DimValue::DstPort(v) => format!("={v}"),
            DimValue::Proto(v) => format!("={v}"),
            DimValue::Dscp(v) => opt(v),
            DimValue::Vlan(v) => opt(v),
            DimValue::Class(v) | DimValue::User(v) | DimValue::Process(v) => opt(v),
        }
    }
}

/// `groups` (a write's `flows_1m` groups) summed by minute and each single
/// dimension, in key order.
pub(crate) fn rollup_dim<'a>(groups: &[(Group<'a>, Sums)]) -> Vec<((DimValue<'a>, i64), Sums)> {
    let mut out: BTreeMap<(DimValue, i64), Sums> = BTreeMap::new();
    for (g, s) in groups {
        for v in DimValue::all(g) {
            let t = out.entry((v, g.minute_ns)).or_default();
            t.bytes = t.bytes.saturating_add(s.bytes);
            t.packets = t.packets.saturating_add(s.packets);
            t.flows += s.flows;
        }
    }
    out.into_iter().collect()
}

/// `rows` (of [`rollup_dim`], by minute) summed by hour, in key order:
/// the rows of `flows_1h_dim` (migration 0011).
pub(crate) fn by_hour<'a>(
    rows: &[((DimValue<'a>, i64), Sums)],
) -> Vec<((DimValue<'a>, i64), Sums)> {
    let mut out: BTreeMap<(DimValue, i64), Sums> = BTreeMap::new();
    for ((v, minute), s) in rows {
        let t = out
            .entry((*v, minute - minute.rem_euclid(HOUR_NS)))
            .or_default();
        t.bytes = t.bytes.saturating_add(s.bytes);
        t.packets = t.packets.saturating_add(s.packets);
        t.flows += s.flows;
    }
    out.into_iter().collect()
}

/// One hour in ns: the step of `flows_1h_dim`.
pub const HOUR_NS: i64 = 3_600_000_000_000;

/// The level a rollup-by-dimension upsert writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Level {
    /// `flows_1m_dim`, keyed by `minute_ns`.
    Minute,
    /// `flows_1h_dim`, keyed by `hour_ns`.
    Hour,
}

impl Level {
    fn table(self) -> &'static str {
        match self {
            Level::Minute => "flows_1m_dim",
            Level::Hour => "flows_1h_dim",
        }
    }

    fn time(self) -> &'static str {
        match self {
            Level::Minute => "minute_ns",
            Level::Hour => "hour_ns",
        }
    }
}

/// Bound values per row.
pub(crate) const COLUMNS: usize = 16;

/// Rows per upsert statement (16 × 1000 parameters, under SQLite's limit).
pub(crate) const ROWS_PER_UPSERT: usize = 1000;

/// The upsert of `rows` rows (anonymous placeholders on SQLite, as
/// `rollup.rs` explains).
pub(crate) fn upsert_dim_sql(sql: Sql, rows: usize, level: Level) -> String {
    let (table, time) = (level.table(), level.time());
    let mut s = format!(
        "INSERT INTO {table} (dim, {time}, dim_key, exporter_id, src_addr, dst_addr, \
         dst_port, proto, dscp, vlan, class, \"user\", process, bytes, packets, flows) VALUES "
    );
    for i in 0..rows {
        if i > 0 {
            s.push(',');
        }
        if sql.0 == crate::Dialect::Sqlite {
            s.push_str("(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)");
            continue;
        }
        let n = i * COLUMNS;
        let _ = write!(
            s,
            "(${}, ${}, ${}, ${}, {}, {}",
            n + 1,
            n + 2,
            n + 3,
            n + 4,
            sql.inet_param(n + 5),
            sql.inet_param(n + 6)
        );
        for k in 7..=COLUMNS {
            let _ = write!(s, ", ${}", n + k);
        }
        s.push(')');
    }
    let _ = write!(
        s,
        " ON CONFLICT (dim, {time}, dim_key) DO UPDATE SET \
         bytes = {table}.bytes + excluded.bytes, \
         packets = {table}.packets + excluded.packets, \
         flows = {table}.flows + excluded.flows"
    );
    s
}

/// Adds `chunk`'s rows, in order, to a query of [`upsert_dim_sql`];
/// `addr` gives an address's bound text.
macro_rules! bind_rollup_dim {
    ($q:expr, $chunk:expr, $addr:expr) => {{
        use $crate::flows::rollup_dim::DimValue as V;
        let mut q = $q;
        for ((v, minute), s) in $chunk {
            let (mut exp, mut src, mut dst, mut port, mut proto) = (None, None, None, None, None);
            let (mut dscp, mut vlan, mut class, mut user, mut process) =
                (None, None, None, None, None);
            match *v {
                V::Total => {}
                V::Exporter(e) => exp = Some(e),
                V::SrcAddr(a) => src = Some($addr(a)),
                V::DstAddr(a) => dst = Some($addr(a)),
                V::DstPort(p) => port = Some(i64::from(p)),
                V::Proto(p) => proto = Some(i64::from(p)),
                V::Dscp(d) => dscp = d.map(i64::from),
                V::Vlan(d) => vlan = d.map(i64::from),
                V::Class(t) => class = t,
                V::User(t) => user = t,
                V::Process(t) => process = t,
            }
            q = q
                .bind(v.dim())
                .bind(*minute)
                .bind(v.key())
                .bind(exp)
                .bind(src)
                .bind(dst)
                .bind(port)
                .bind(proto)
                .bind(dscp)
                .bind(vlan)
                .bind(class)
                .bind(user)
                .bind(process)
                .bind(s.bytes)
                .bind(s.packets)
                .bind(s.flows);
        }
        q
    }};
}
pub(crate) use bind_rollup_dim;

#[cfg(test)]
mod tests {
    use super::*;

    fn group(src: [u8; 4], minute: i64, class: Option<&str>) -> Group<'_> {
        Group {
            minute_ns: minute,
            exporter_id: 1,
            src_addr: IpAddr::from(src),
            dst_addr: IpAddr::from([10, 9, 9, 9]),
            dst_port: 443,
            proto: 6,
            dscp: None,
            vlan: Some(7),
            class,
            user: None,
            process: None,
        }
    }

    #[test]
    fn groups_sum_by_each_dimension_and_minute() {
        let s = |b, f| Sums {
            bytes: b,
            packets: 1,
            flows: f,
        };
        let groups = [
            (group([10, 0, 0, 1], 0, Some("web")), s(10, 1)),
            (group([10, 0, 0, 2], 0, Some("web")), s(5, 2)),
            (group([10, 0, 0, 2], 60, None), s(1, 1)),
        ];
        let r = rollup_dim(&groups);
        let find = |dim: &str, minute: i64, key: &str| {
            r.iter()
                .find(|((v, m), _)| v.dim() == dim && *m == minute && v.key() == key)
                .map(|(_, s)| (s.bytes, s.flows))
        };
        assert_eq!(find("total", 0, "-"), Some((15, 3)));
        assert_eq!(find("total", 60, "-"), Some((1, 1)));
        assert_eq!(find("src_addr", 0, "=10.0.0.2"), Some((5, 2)));
        assert_eq!(find("class", 0, "=web"), Some((15, 3)));
        assert_eq!(find("class", 60, "-"), Some((1, 1)));
        assert_eq!(find("dscp", 0, "-"), Some((15, 3)));
        assert_eq!(find("vlan", 60, "=7"), Some((1, 1)));
        // 11 dimensions; src_addr has 2 values in minute 0.
        assert_eq!(r.iter().filter(|((_, m), _)| *m == 0).count(), 12);
        // By hour: minutes 0 and 60 (ns) are in hour 0.
        let h = by_hour(&r);
        let hour = |dim: &str, key: &str| {
            h.iter()
                .find(|((v, t), _)| v.dim() == dim && *t == 0 && v.key() == key)
                .map(|(_, s)| (s.bytes, s.flows))
        };
        assert_eq!(hour("total", "-"), Some((16, 4)));
        assert_eq!(hour("src_addr", "=10.0.0.2"), Some((6, 3)));
        assert_eq!(hour("class", "-"), Some((1, 1)));
        // 11 dimensions; in the hour, src_addr and class have 2 values each.
        assert_eq!(h.len(), 13);
        let later = [(group([10, 0, 0, 1], HOUR_NS + 60, None), s(7, 1))];
        assert_eq!(by_hour(&rollup_dim(&later))[0].0 .1, HOUR_NS);
        let keys: Vec<_> = r.iter().map(|((v, m), _)| (v.dim(), *m, v.key())).collect();
        let mut sorted = keys.clone();
        sorted.dedup();
        assert_eq!(sorted.len(), keys.len());
    }

    #[test]
    fn the_upsert_numbers_every_value() {
        let s = upsert_dim_sql(Sql(crate::Dialect::Postgres), 2, Level::Minute);
        assert!(s.contains("($17, $18, $19, $20, $21::inet, $22::inet, $23"));
        assert!(s.contains("$32)"));
        let lite = upsert_dim_sql(Sql(crate::Dialect::Sqlite), 2, Level::Minute);
        assert_eq!(lite.matches('?').count(), 2 * COLUMNS);
        let hour = upsert_dim_sql(Sql(crate::Dialect::Sqlite), 1, Level::Hour);
        assert!(
            hour.starts_with("INSERT INTO flows_1h_dim (dim, hour_ns,"),
            "{hour}"
        );
        assert!(
            hour.contains("ON CONFLICT (dim, hour_ns, dim_key)"),
            "{hour}"
        );
        assert!(
            hour.contains("flows_1h_dim.bytes + excluded.bytes"),
            "{hour}"
        );
    }
}
