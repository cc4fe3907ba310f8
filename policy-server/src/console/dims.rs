//! Dimensions the engine groups by, and metrics it sums, as SQL.

use super::filter::compile::{SCALED_BYTES, SCALED_PACKETS};
use super::params::ApiError;
use super::sql::{addr_text, sqlite_v4_int, Bind, Dialect};

/// What records are grouped by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dim {
    SrcAddr,
    DstAddr,
    SrcPrefix,
    DstPrefix,
    SrcPort,
    DstPort,
    Proto,
    Dscp,
    Vlan,
    Class,
    User,
    Process,
    Exporter,
}

pub const DIM_NAMES: [&str; 13] = [
    "src_addr",
    "dst_addr",
    "src_prefix",
    "dst_prefix",
    "src_port",
    "dst_port",
    "proto",
    "dscp",
    "vlan",
    "class",
    "user",
    "process",
    "exporter",
];

impl Dim {
    pub fn parse(param: &str, s: &str) -> Result<Dim, ApiError> {
        Ok(match s {
            "src_addr" => Dim::SrcAddr,
            "dst_addr" => Dim::DstAddr,
            "src_prefix" => Dim::SrcPrefix,
            "dst_prefix" => Dim::DstPrefix,
            "src_port" => Dim::SrcPort,
            "dst_port" => Dim::DstPort,
            "proto" => Dim::Proto,
            "dscp" => Dim::Dscp,
            "vlan" => Dim::Vlan,
            "class" => Dim::Class,
            "user" => Dim::User,
            "process" => Dim::Process,
            "exporter" => Dim::Exporter,
            _ => {
                return Err(ApiError::bad(
                    param,
                    format!("unknown dimension {s:?} (known: {})", DIM_NAMES.join(", ")),
                ))
            }
        })
    }

    /// A comma-separated list of `min..=max` distinct dimensions.
    pub fn list(param: &str, s: &str, min: usize, max: usize) -> Result<Vec<Dim>, ApiError> {
        let dims = s
            .split(',')
            .map(|d| Dim::parse(param, d.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        if dims.len() < min || dims.len() > max {
            return Err(ApiError::bad(
                param,
                format!("give {min} to {max} dimensions"),
            ));
        }
        for (i, d) in dims.iter().enumerate() {
            if dims[..i].contains(d) {
                return Err(ApiError::bad(param, "a dimension is given twice"));
            }
        }
        Ok(dims)
    }

    pub fn name(self) -> &'static str {
        DIM_NAMES[self as usize]
    }

    /// The group key as text (NULL when the record has none).
    pub fn sql(self, d: Dialect, prefix: Prefix, binds: &mut Vec<Bind>) -> String {
        let int = |c: &str| format!("CAST({c} AS TEXT)");
        match self {
            Dim::SrcAddr => addr_text("src_addr", d),
            Dim::DstAddr => addr_text("dst_addr", d),
            Dim::SrcPrefix => prefix_sql("src_addr", d, prefix, binds),
            Dim::DstPrefix => prefix_sql("dst_addr", d, prefix, binds),
            Dim::SrcPort => int("src_port"),
            Dim::DstPort => int("dst_port"),
            Dim::Proto => int("proto"),
            Dim::Dscp => int("dscp"),
            Dim::Vlan => int("vlan"),
            Dim::Class => "class".into(),
            Dim::User => "\"user\"".into(),
            Dim::Process => "process".into(),
            Dim::Exporter => {
                "(SELECT e.name FROM exporters e WHERE e.id = flows.exporter_id)".into()
            }
        }
    }
}

/// Prefix lengths of the `*_prefix` dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    pub v4: u8,
    pub v6: u8,
}

fn push(binds: &mut Vec<Bind>, b: Bind) -> String {
    binds.push(b);
    format!("${}", binds.len())
}

fn prefix_sql(col: &str, d: Dialect, prefix: Prefix, binds: &mut Vec<Bind>) -> String {
    match d {
        Dialect::Postgres => {
            let v4 = push(binds, Bind::Int(i64::from(prefix.v4)));
            let v6 = push(binds, Bind::Int(i64::from(prefix.v6)));
            format!(
                "CAST(network(set_masklen({col}, CASE WHEN family({col}) = 4 \
                 THEN CAST({v4} AS INTEGER) ELSE CAST({v6} AS INTEGER) END)) AS TEXT)"
            )
        }
        // SQLite keeps text: IPv4 prefixes are computed, IPv6 addresses
        // stay whole (/128).
        Dialect::Sqlite => {
            let mask = if prefix.v4 == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix.v4.min(32)))
            };
            let m = push(binds, Bind::Int(i64::from(mask)));
            let len = push(binds, Bind::Int(i64::from(prefix.v4)));
            let n = format!("({} & {m})", sqlite_v4_int(col));
            format!(
                "CASE WHEN instr({col}, ':') = 0 THEN \
                 (({n} >> 24) & 255) || '.' || (({n} >> 16) & 255) || '.' || (({n} >> 8) & 255) \
                 || '.' || ({n} & 255) || '/' || {len} ELSE {col} || '/128' END"
            )
        }
    }
}

/// What is summed, and whether it is shown as a rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    Bytes,
    Packets,
    Flows,
    /// Bits per second (bytes × 8 over the time).
    Bps,
    /// Packets per second.
    Pps,
}

pub const METRIC_NAMES: [&str; 5] = ["bytes", "packets", "flows", "bps", "pps"];

impl Metric {
    pub fn parse(s: &str) -> Metric {
        match s {
            "packets" => Metric::Packets,
            "flows" => Metric::Flows,
            "bps" => Metric::Bps,
            "pps" => Metric::Pps,
            _ => Metric::Bytes,
        }
    }

    /// The aggregate, as a 64-bit integer.
    pub fn sql(self) -> String {
        match self {
            Metric::Bytes | Metric::Bps => format!("CAST(SUM({SCALED_BYTES}) AS BIGINT)"),
            Metric::Packets | Metric::Pps => format!("CAST(SUM({SCALED_PACKETS}) AS BIGINT)"),
            Metric::Flows => "CAST(COUNT(*) AS BIGINT)".into(),
        }
    }

    /// The value shown for a sum over `seconds`.
    pub fn value(self, sum: i64, seconds: f64) -> serde_json::Value {
        match self {
            Metric::Bytes | Metric::Packets | Metric::Flows => sum.into(),
            Metric::Bps => (sum as f64 * 8.0 / seconds).into(),
            Metric::Pps => (sum as f64 / seconds).into(),
        }
    }
}
