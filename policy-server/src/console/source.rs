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
//! A day of one dimension is still one row per minute and value; the
//! hourly level `flows_1h_dim` (migration 0011, kept by the same writer)
//! holds it in one row per hour and value. When the range holds at least
//! one whole hour, `auto` and `rollup` read a one-dimension query as
//! `rollup_1h_dim`: the whole hours from `flows_1h_dim`, the minutes at the
//! range's edges from `flows_1m_dim` — exact, as the hours are whole. A
//! time series whose step is not a whole number of hours reads its steps
//! from the minutes ([`Source::for_step`]) and ranks its top values on the
//! hours. `source=rollup_1h_dim` forces it (a range with no whole hour then
//! reads the minutes and says `rollup_1m_dim`).
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
use qosloop_store::{HOUR_NS, MINUTE_NS};

/// The table a grouped query reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Raw,
    Rollup1m,
    /// `flows_1m_dim` rows of one dimension (a name of `ROLLUP_DIMS`).
    RollupDim(&'static str),
    /// The same dimension's `flows_1h_dim` rows of the hours in
    /// `[first, last)` (whole hours of the range, at least one) and its
    /// `flows_1m_dim` rows outside them.
    RollupDimHours {
        dim: &'static str,
        first: i64,
        last: i64,
    },
}

/// What the caller asked for (`source=`).
pub const SOURCE_NAMES: [&str; 6] = [
    "auto",
    "raw",
    "rollup",
    "rollup_1m",
    "rollup_1m_dim",
    "rollup_1h_dim",
];

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
            Source::RollupDimHours { .. } => "rollup_1h_dim",
        }
    }

    /// `dim` by hour over the whole hours of `sel`'s range, or by minute
    /// when it holds none.
    fn hours(dim: &'static str, sel: &Selection) -> Source {
        let first = sel.from.saturating_add(HOUR_NS - 1).div_euclid(HOUR_NS) * HOUR_NS;
        let last = sel.to.div_euclid(HOUR_NS) * HOUR_NS;
        if last - first >= HOUR_NS {
            Source::RollupDimHours { dim, first, last }
        } else {
            Source::RollupDim(dim)
        }
    }

    /// What a time series at `step_ns` reads its steps from: the hours
    /// only when the step is a whole number of hours (steps then start on
    /// hours), else the minutes of the same dimension.
    pub fn for_step(self, step_ns: i64) -> Source {
        match self {
            Source::RollupDimHours { dim, .. } if step_ns % HOUR_NS != 0 => Source::RollupDim(dim),
            s => s,
        }
    }

    /// The same level over another dimension (`None`: not a rollup by
    /// one dimension).
    pub fn with_dim(self, other: &'static str) -> Option<Source> {
        match self {
            Source::RollupDim(_) => Some(Source::RollupDim(other)),
            Source::RollupDimHours { first, last, .. } => Some(Source::RollupDimHours {
                dim: other,
                first,
                last,
            }),
            Source::Raw | Source::Rollup1m => None,
        }
    }

    /// The rollup dimension read (`None` for the raw rows and `flows_1m`).
    pub fn dim(self) -> Option<&'static str> {
        match self {
            Source::RollupDim(d) | Source::RollupDimHours { dim: d, .. } => Some(d),
            Source::Raw | Source::Rollup1m => None,
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
            ("rollup" | "rollup_1m" | "rollup_1m_dim" | "rollup_1h_dim", Err(why)) => refuse(why),
            ("rollup_1m", Ok(_)) => Ok(Source::Rollup1m),
            ("rollup_1m_dim" | "rollup_1h_dim", Ok(Source::Rollup1m)) => refuse(format!(
                "it groups or filters on more than one dimension ({asked} holds one)"
            )),
            ("rollup_1m_dim", Ok(s)) => Ok(s),
            (_, Ok(Source::RollupDim(dim))) => Ok(Source::hours(dim, sel)),
            (_, Ok(s)) => Ok(s),
            (_, Err(_)) => Ok(Source::Raw),
        }
    }

    /// The FROM item, named `flows`.
    pub fn table_sql(self) -> String {
        self.table_sql_where("TRUE")
    }

    /// The FROM item, named `flows`, of the rollup rows that also meet
    /// `cond` (SQL over the rollup table's own columns, such as `dim_key`;
    /// only for the rollups by one dimension, ignored otherwise).
    pub fn table_sql_where(self, cond: &str) -> String {
        let cols =
            "exporter_id, src_addr, dst_addr, dst_port, proto, dscp, vlan, class, \"user\", \
                    process, bytes, packets, CAST(NULL AS BIGINT) AS sampling_interval, \
                    flows AS flow_count";
        // `dim` is one of the store's fixed names and the bounds are
        // computed numbers, never input.
        let minutes = |dim: &str, range: &str| {
            format!(
                "SELECT minute_ns AS end_ns, dim_key, {cols} FROM flows_1m_dim \
                 WHERE dim = '{dim}'{range} AND {cond}"
            )
        };
        match self {
            Source::Raw => "flows".into(),
            Source::Rollup1m => {
                format!("(SELECT minute_ns AS end_ns, {cols} FROM flows_1m) AS flows")
            }
            Source::RollupDim(dim) => format!("({}) AS flows", minutes(dim, "")),
            // The minutes of the hour before `first` and of the hour from
            // `last`: the caller's range cuts them to its edges.
            Source::RollupDimHours { dim, first, last } => format!(
                "({} UNION ALL SELECT hour_ns AS end_ns, dim_key, {cols} FROM flows_1h_dim \
                 WHERE dim = '{dim}' AND hour_ns >= {first} AND hour_ns < {last} AND {cond} \
                 UNION ALL {}) AS flows",
                minutes(
                    dim,
                    &format!(
                        " AND minute_ns >= {} AND minute_ns < {first}",
                        first - HOUR_NS
                    )
                ),
                minutes(
                    dim,
                    &format!(
                        " AND minute_ns >= {last} AND minute_ns < {}",
                        last.saturating_add(HOUR_NS)
                    )
                ),
            ),
        }
    }

    /// The number of raw records summed.
    pub fn count_sql(self) -> &'static str {
        match self {
            Source::Raw => "COUNT(*)",
            Source::Rollup1m | Source::RollupDim(_) | Source::RollupDimHours { .. } => {
                "SUM(flow_count)"
            }
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
        let day = |dim| Source::RollupDimHours {
            dim,
            first: 0,
            last: 1440 * m,
        };
        assert_eq!(auto(None, &[Dim::SrcAddr]), day("src_addr"));
        assert_eq!(auto(None, &[Dim::SrcPrefix]), day("src_addr"));
        assert_eq!(auto(None, &[]), day("total"));
        assert_eq!(
            auto(Some("dst_addr = 10.0.0.0/8"), &[Dim::DstPrefix]),
            day("dst_addr")
        );
        assert_eq!(
            auto(Some("exporter = a OR exporter = b"), &[Dim::Exporter]),
            day("exporter")
        );
        assert_eq!(
            pick("rollup_1m_dim", None, &[Dim::Proto], None).unwrap(),
            Source::RollupDim("proto")
        );
        assert_eq!(
            pick("rollup_1h_dim", None, &[Dim::Proto], None).unwrap(),
            day("proto")
        );
        // A series by minute steps reads the minutes; by hours, the hours.
        assert_eq!(day("proto").for_step(m), Source::RollupDim("proto"));
        assert_eq!(day("proto").for_step(120 * m), day("proto"));
        assert_eq!(day("proto").with_dim("total"), Some(day("total")));
        // Whole hours only: minutes at the edges, none when no whole hour.
        let edges =
            Source::choose("auto", &sel(17 * m, 185 * m, None), &[Dim::Proto], None).unwrap();
        assert_eq!(
            edges,
            Source::RollupDimHours {
                dim: "proto",
                first: 60 * m,
                last: 180 * m
            }
        );
        let sql = edges.table_sql();
        assert!(
            sql.contains("minute_ns >= 0 AND minute_ns < 3600000000000"),
            "{sql}"
        );
        assert!(
            sql.contains("hour_ns >= 3600000000000 AND hour_ns < 10800000000000"),
            "{sql}"
        );
        assert!(
            sql.contains("minute_ns >= 10800000000000 AND minute_ns < 14400000000000"),
            "{sql}"
        );
        assert_eq!(
            Source::choose("auto", &sel(17 * m, 100 * m, None), &[Dim::Proto], None).unwrap(),
            Source::RollupDim("proto")
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
            let Some(name) = auto(None, &[d]).dim() else {
                panic!("{d:?}");
            };
            assert!(ROLLUP_DIMS.contains(&name), "{name}");
            assert!(Source::RollupDim(name)
                .table_sql()
                .contains(&format!("dim = '{name}'")));
            assert_eq!(
                day(name)
                    .table_sql()
                    .matches(&format!("dim = '{name}'"))
                    .count(),
                3
            );
        }
    }
}
