//! Where a grouped query reads: the raw `flows` rows, or one of the
//! per-minute rollups the flow writer keeps beside them in the rows' own
//! transaction — `flows_1m` (migration 0006: one row per minute and
//! combination of every dimension the console groups on) and
//! `flows_1m_dim` (migration 0007: one row per minute and value of a single
//! dimension, and the minute's totals).
//!
//! A rollup answers exactly what the raw rows answer when it holds every
//! column the query looks at and the query's time boundaries fall on
//! minutes: the range starts and ends on a minute, a time-series step is a
//! whole number of minutes, every dimension and every filter field is a
//! rollup column (not `src_port`, `tcp_flags`, the per-record counters or
//! times, nor `rule`, whose flow specs may name a source port). Then
//! [`Source::choose`] picks the narrowest that can: `flows_1m_dim` when the
//! dimensions and the filter together name at most one rollup dimension (a
//! prefix dimension reads its address), else `flows_1m`. With many hosts a
//! day of `flows_1m` is nearly as long as the raw table, while a single
//! dimension holds one row per minute and value. `source=raw` forces the
//! raw rows, `source=rollup` the narrowest rollup (refusing a query no
//! rollup can answer), `source=rollup_1m`/`rollup_1m_dim` that rollup. The
//! answer says which was read.
//!
//! A rollup is read through a derived table named `flows` with the raw
//! table's column names (a minute's start as `end_ns`, the scaled sums as
//! `bytes`/`packets` with no sampling interval), so the filter compiler and
//! the dimension SQL serve all three unchanged; only the flow count differs
//! (`SUM(flow_count)` for `COUNT(*)`).

use super::dims::Dim;
use super::engine::Selection;
use super::filter::{Expr, Field};
use super::params::ApiError;
use qosloop_store::MINUTE_NS;

/// The table a grouped query reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Raw,
    Rollup1m,
    /// `flows_1m_dim` rows of one dimension (a name of `ROLLUP_DIMS`).
    RollupDim(&'static str),
}

/// What the caller asked for (`source=`).
pub const SOURCE_NAMES: [&str; 5] = ["auto", "raw", "rollup", "rollup_1m", "rollup_1m_dim"];

/// The `flows_1m_dim` dimension holding a filter field (`None`: no rollup
/// holds it).
fn field_dim(f: Field) -> Option<&'static str> {
    Some(match f {
        Field::SrcAddr => "src_addr",
        Field::DstAddr => "dst_addr",
        Field::DstPort => "dst_port",
        Field::Proto => "proto",
        Field::Dscp => "dscp",
        Field::Vlan => "vlan",
        Field::Class => "class",
        Field::User => "user",
        Field::Process => "process",
        Field::Exporter => "exporter",
        _ => return None,
    })
}

/// The `flows_1m_dim` dimension a grouping dimension reads.
fn dim_dim(d: Dim) -> Option<&'static str> {
    Some(match d {
        Dim::SrcAddr | Dim::SrcPrefix => "src_addr",
        Dim::DstAddr | Dim::DstPrefix => "dst_addr",
        Dim::DstPort => "dst_port",
        Dim::Proto => "proto",
        Dim::Dscp => "dscp",
        Dim::Vlan => "vlan",
        Dim::Class => "class",
        Dim::User => "user",
        Dim::Process => "process",
        Dim::Exporter => "exporter",
        Dim::SrcPort | Dim::Rule => return None,
    })
}

/// Adds the rollup dimensions `e` reads to `out`; false if a field is in
/// no rollup.
fn filter_dims(e: &Expr, out: &mut Vec<&'static str>) -> bool {
    match e {
        Expr::And(a, b) | Expr::Or(a, b) => filter_dims(a, out) && filter_dims(b, out),
        Expr::Not(a) => filter_dims(a, out),
        Expr::Cmp(f, _, _) | Expr::In(f, _) => match field_dim(*f) {
            Some(d) => {
                out.push(d);
                true
            }
            None => false,
        },
    }
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Raw => "raw",
            Source::Rollup1m => "rollup_1m",
            Source::RollupDim(_) => "rollup_1m_dim",
        }
    }

    /// The narrowest rollup that answers this query, or why none can.
    fn narrowest(sel: &Selection, dims: &[Dim], step_ns: Option<i64>) -> Result<Source, String> {
        if sel.from % MINUTE_NS != 0 || sel.to % MINUTE_NS != 0 {
            return Err("the range does not start and end on a minute".into());
        }
        if step_ns.is_some_and(|s| s % MINUTE_NS != 0) {
            return Err("the step is not a whole number of minutes".into());
        }
        let mut used = Vec::new();
        for d in dims {
            match dim_dim(*d) {
                Some(n) => used.push(n),
                None => return Err(format!("the rollups have no dimension {}", d.name())),
            }
        }
        if let Some(f) = &sel.filter {
            if !filter_dims(f, &mut used) {
                return Err("the filter names a field the rollups do not keep".into());
            }
        }
        used.sort_unstable();
        used.dedup();
        Ok(match used[..] {
            [] => Source::RollupDim("total"),
            [one] => Source::RollupDim(one),
            _ => Source::Rollup1m,
        })
    }

    /// The source for `asked` (one of [`SOURCE_NAMES`]).
    pub fn choose(
        asked: &str,
        sel: &Selection,
        dims: &[Dim],
        step_ns: Option<i64>,
    ) -> Result<Source, ApiError> {
        let refuse = |why: String| {
            Err(ApiError::bad(
                "source",
                format!("the per-minute rollups cannot answer this query: {why}"),
            ))
        };
        match (asked, Source::narrowest(sel, dims, step_ns)) {
            ("raw", _) => Ok(Source::Raw),
            ("rollup" | "rollup_1m" | "rollup_1m_dim", Err(why)) => refuse(why),
            ("rollup_1m", Ok(_)) => Ok(Source::Rollup1m),
            ("rollup_1m_dim", Ok(Source::Rollup1m)) => refuse(
                "it groups or filters on more than one dimension (rollup_1m_dim holds one)".into(),
            ),
            (_, Ok(s)) => Ok(s),
            (_, Err(_)) => Ok(Source::Raw),
        }
    }

    /// The FROM item, named `flows`.
    pub fn table_sql(self) -> String {
        let cols =
            "exporter_id, src_addr, dst_addr, dst_port, proto, dscp, vlan, class, \"user\", \
                    process, bytes, packets, CAST(NULL AS BIGINT) AS sampling_interval, \
                    flows AS flow_count";
        match self {
            Source::Raw => "flows".into(),
            Source::Rollup1m => {
                format!("(SELECT minute_ns AS end_ns, {cols} FROM flows_1m) AS flows")
            }
            // `dim` is one of the store's fixed names, never input.
            Source::RollupDim(dim) => format!(
                "(SELECT minute_ns AS end_ns, {cols} FROM flows_1m_dim WHERE dim = '{dim}') AS flows"
            ),
        }
    }

    /// The number of raw records summed.
    pub fn count_sql(self) -> &'static str {
        match self {
            Source::Raw => "COUNT(*)",
            Source::Rollup1m | Source::RollupDim(_) => "SUM(flow_count)",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::filter::parse;
    use qosloop_store::ROLLUP_DIMS;

    fn sel(from: i64, to: i64, filter: Option<&str>) -> Selection {
        Selection {
            from,
            to,
            filter: filter.map(|f| parse(f).unwrap()),
            source: Source::Raw,
        }
    }

    #[test]
    fn the_rollup_answers_only_what_it_holds_on_minute_boundaries() {
        let m = MINUTE_NS;
        let pick =
            |s: &Selection, dims: &[Dim], step| Source::choose("auto", s, dims, step).unwrap();
        let aligned = sel(
            10 * m,
            70 * m,
            Some("proto = tcp AND src_addr = 10.0.0.0/8"),
        );
        assert_eq!(pick(&aligned, &[Dim::SrcAddr], None), Source::Rollup1m);
        assert_eq!(pick(&aligned, &[Dim::Class], Some(5 * m)), Source::Rollup1m);
        assert_eq!(pick(&aligned, &[Dim::SrcPort], None), Source::Raw);
        assert_eq!(pick(&aligned, &[Dim::Rule], None), Source::Raw);
        assert_eq!(
            pick(&aligned, &[Dim::Class], Some(90_000_000_000)),
            Source::Raw
        );
        assert_eq!(
            pick(&sel(10 * m + 1, 70 * m, None), &[Dim::Proto], None),
            Source::Raw
        );
        assert_eq!(
            pick(&sel(10 * m, 70 * m - 1, None), &[Dim::Proto], None),
            Source::Raw
        );
        for f in [
            "bytes > 100",
            "NOT src_port = 53",
            "tcp_flags = 2",
            "proto = 6 OR start_ns > 5",
        ] {
            assert_eq!(
                pick(&sel(0, m, Some(f)), &[Dim::Proto], None),
                Source::Raw,
                "{f}"
            );
        }
        assert_eq!(
            Source::choose("raw", &aligned, &[Dim::Proto], None).unwrap(),
            Source::Raw
        );
        let e = Source::choose("rollup", &sel(0, m, Some("bytes > 1")), &[], None).unwrap_err();
        assert!(format!("{e:?}").contains("source"), "{e:?}");
    }

    #[test]
    fn one_dimension_reads_the_rollup_by_that_dimension() {
        let m = MINUTE_NS;
        let pick = |asked, f: Option<&str>, dims: &[Dim], step| {
            Source::choose(asked, &sel(0, 1440 * m, f), dims, step)
        };
        let auto = |f, dims: &[Dim]| pick("auto", f, dims, Some(m)).unwrap();
        assert_eq!(auto(None, &[Dim::SrcAddr]), Source::RollupDim("src_addr"));
        assert_eq!(auto(None, &[Dim::SrcPrefix]), Source::RollupDim("src_addr"));
        assert_eq!(auto(None, &[]), Source::RollupDim("total"));
        assert_eq!(
            auto(Some("dst_addr = 10.0.0.0/8"), &[Dim::DstPrefix]),
            Source::RollupDim("dst_addr")
        );
        assert_eq!(
            auto(Some("exporter = a OR exporter = b"), &[Dim::Exporter]),
            Source::RollupDim("exporter")
        );
        assert_eq!(auto(Some("class = web"), &[Dim::SrcAddr]), Source::Rollup1m);
        assert_eq!(auto(None, &[Dim::SrcAddr, Dim::DstPort]), Source::Rollup1m);
        assert_eq!(
            pick("rollup_1m", None, &[Dim::Proto], None).unwrap(),
            Source::Rollup1m
        );
        assert!(pick("rollup_1m_dim", None, &[Dim::Proto, Dim::Class], None).is_err());
        assert!(pick("rollup_1m_dim", Some("src_port = 1"), &[], None).is_err());
        for d in [
            Dim::SrcAddr,
            Dim::DstPrefix,
            Dim::DstPort,
            Dim::Proto,
            Dim::Dscp,
            Dim::Vlan,
            Dim::Class,
            Dim::User,
            Dim::Process,
            Dim::Exporter,
        ] {
            let Source::RollupDim(name) = auto(None, &[d]) else {
                panic!("{d:?}");
            };
            assert!(ROLLUP_DIMS.contains(&name), "{name}");
            assert!(Source::RollupDim(name)
                .table_sql()
                .contains(&format!("dim = '{name}'")));
        }
    }
}
