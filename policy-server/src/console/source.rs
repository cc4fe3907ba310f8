//! Where a grouped query reads: the raw `flows` rows, or the per-minute
//! rollups the flow writer keeps beside them (`flows_1m`, migration 0006,
//! written in the rows' own transaction by the store's flow writer).
//!
//! The rollup answers exactly what the raw rows answer when it holds every
//! column the query looks at and the query's time boundaries fall on
//! minutes: the range starts and ends on a minute, a time-series step is a
//! whole number of minutes, every dimension and every filter field is a
//! rollup column (not `src_port`, `tcp_flags`, the per-record counters or
//! times, nor `rule`, whose flow specs may name a source port). Then
//! [`Source::choose`] picks it; `source=raw` forces the raw rows, and
//! `source=rollup` refuses a query the rollup cannot answer. The answer
//! says which was read.
//!
//! The rollup is read through a derived table named `flows` with the raw
//! table's column names (a minute's start as `end_ns`, the scaled sums as
//! `bytes`/`packets` with no sampling interval), so the filter compiler and
//! the dimension SQL serve both unchanged; only the flow count differs
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
}

/// What the caller asked for (`source=`).
pub const SOURCE_NAMES: [&str; 3] = ["auto", "raw", "rollup"];

/// The filter fields the rollup holds.
fn rollup_field(f: Field) -> bool {
    matches!(
        f,
        Field::SrcAddr
            | Field::DstAddr
            | Field::DstPort
            | Field::Proto
            | Field::Dscp
            | Field::Vlan
            | Field::Class
            | Field::User
            | Field::Process
            | Field::Exporter
    )
}

fn rollup_dim(d: Dim) -> bool {
    !matches!(d, Dim::SrcPort | Dim::Rule)
}

fn fields_ok(e: &Expr) -> bool {
    match e {
        Expr::And(a, b) | Expr::Or(a, b) => fields_ok(a) && fields_ok(b),
        Expr::Not(a) => fields_ok(a),
        Expr::Cmp(f, _, _) | Expr::In(f, _) => rollup_field(*f),
    }
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Raw => "raw",
            Source::Rollup1m => "rollup_1m",
        }
    }

    /// Why the rollup cannot answer this query (`None`: it can).
    fn why_not(sel: &Selection, dims: &[Dim], step_ns: Option<i64>) -> Option<String> {
        if sel.from % MINUTE_NS != 0 || sel.to % MINUTE_NS != 0 {
            return Some("the range does not start and end on a minute".into());
        }
        if step_ns.is_some_and(|s| s % MINUTE_NS != 0) {
            return Some("the step is not a whole number of minutes".into());
        }
        if let Some(d) = dims.iter().find(|d| !rollup_dim(**d)) {
            return Some(format!("the rollup has no dimension {}", d.name()));
        }
        if sel.filter.as_ref().is_some_and(|f| !fields_ok(f)) {
            return Some("the filter names a field the rollup does not keep".into());
        }
        None
    }

    /// The source for `asked` (one of [`SOURCE_NAMES`]).
    pub fn choose(
        asked: &str,
        sel: &Selection,
        dims: &[Dim],
        step_ns: Option<i64>,
    ) -> Result<Source, ApiError> {
        let why = Source::why_not(sel, dims, step_ns);
        match (asked, why) {
            ("raw", _) => Ok(Source::Raw),
            ("rollup", Some(why)) => Err(ApiError::bad(
                "source",
                format!("the per-minute rollup cannot answer this query: {why}"),
            )),
            (_, None) => Ok(Source::Rollup1m),
            (_, Some(_)) => Ok(Source::Raw),
        }
    }

    /// The FROM item, named `flows`.
    pub fn table_sql(self) -> &'static str {
        match self {
            Source::Raw => "flows",
            Source::Rollup1m => {
                "(SELECT minute_ns AS end_ns, exporter_id, src_addr, dst_addr, dst_port, proto, \
                 dscp, vlan, class, \"user\", process, bytes, packets, \
                 CAST(NULL AS BIGINT) AS sampling_interval, flows AS flow_count FROM flows_1m) AS flows"
            }
        }
    }

    /// The number of raw records summed.
    pub fn count_sql(self) -> &'static str {
        match self {
            Source::Raw => "COUNT(*)",
            Source::Rollup1m => "SUM(flow_count)",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::filter::parse;

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
}
