//! Dimensions the engine groups by, and metrics it sums, as SQL.

use super::filter::compile::{compile, network};
use super::filter::compile::{SCALED_BYTES, SCALED_PACKETS};
use super::filter::{Expr, Field, Op, Value};
use super::params::ApiError;
use qosloop_schema::{BusinessRule, FlowSpec, PolicySet};
use qosloop_store::{Bind, Dialect, Sql};
use std::sync::Arc;

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
    /// The policy rule (its DN) that polices the record: the enabled rule
    /// of highest priority that selects it, as the bandwidth manager
    /// chooses.
    Rule,
}

pub const DIM_NAMES: [&str; 14] = [
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
    "rule",
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
            "rule" => Dim::Rule,
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
    pub fn sql(self, d: Dialect, g: &Grouping, binds: &mut Vec<Bind>) -> String {
        let prefix = g.prefix;
        let int = |c: &str| format!("CAST({c} AS TEXT)");
        match self {
            Dim::SrcAddr => Sql(d).inet_text("src_addr"),
            Dim::DstAddr => Sql(d).inet_text("dst_addr"),
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
            Dim::Rule => rule_sql(&g.policy, d, binds),
        }
    }
}

/// How records are grouped: prefix lengths, and the policy for `rule`.
#[derive(Clone, Debug)]
pub struct Grouping {
    pub prefix: Prefix,
    pub policy: Arc<PolicySet>,
}

/// The rules that can select records, highest priority first (the first
/// of equals wins, as in the bandwidth manager).
fn ranked(policy: &PolicySet) -> Vec<&BusinessRule> {
    let mut rules: Vec<&BusinessRule> = policy
        .rules
        .iter()
        .filter(|r| r.enabled && !(r.flows.is_empty() && r.users.is_empty()))
        .collect();
    rules.sort_by_key(|r| std::cmp::Reverse(r.priority));
    rules
}

/// A flow spec as a filter: every field it names (none: every record).
fn spec_expr(spec: &FlowSpec) -> Option<Expr> {
    let mut parts = Vec::new();
    for (field, p) in [(Field::SrcAddr, spec.src), (Field::DstAddr, spec.dst)] {
        if let Some(p) = p {
            let (net, _) = network(p.addr(), p.prefix_len());
            parts.push(Expr::Cmp(field, Op::Eq, Value::Net(net, p.prefix_len())));
        }
    }
    if let Some(proto) = spec.proto {
        parts.push(Expr::Cmp(
            Field::Proto,
            Op::Eq,
            Value::Int(u64::from(proto)),
        ));
    }
    for (field, r) in [
        (Field::SrcPort, spec.src_ports),
        (Field::DstPort, spec.dst_ports),
    ] {
        if let Some(r) = r {
            parts.push(Expr::Cmp(field, Op::Ge, Value::Int(u64::from(r.first))));
            parts.push(Expr::Cmp(field, Op::Le, Value::Int(u64::from(r.last))));
        }
    }
    parts
        .into_iter()
        .reduce(|a, b| Expr::And(Box::new(a), Box::new(b)))
}

/// `CASE WHEN <rule selects> THEN dn … END`: the same choice as
/// `bandwidth::rule_selects` and the highest priority, in SQL. On SQLite
/// an IPv6 prefix shorter than /128 matches only its first address (text
/// addresses); PostgreSQL matches it exactly.
fn rule_sql(policy: &PolicySet, d: Dialect, binds: &mut Vec<Bind>) -> String {
    let mut arms = Vec::new();
    for rule in ranked(policy) {
        let specs: Vec<String> = rule
            .flows
            .iter()
            .map(|s| match spec_expr(s) {
                Some(e) => compile(&e, d, binds),
                None => "TRUE".to_owned(),
            })
            .collect();
        let mut cond = Vec::new();
        if !specs.is_empty() {
            cond.push(format!("({})", specs.join(" OR ")));
        }
        if !rule.users.is_empty() {
            let users = Expr::In(
                Field::User,
                rule.users.iter().cloned().map(Value::Text).collect(),
            );
            cond.push(compile(&users, d, binds));
        }
        binds.push(Bind::Text(rule.dn.clone()));
        arms.push(format!(
            "WHEN {} THEN CAST(${} AS TEXT)",
            cond.join(" AND "),
            binds.len()
        ));
    }
    if arms.is_empty() {
        "CAST(NULL AS TEXT)".to_owned()
    } else {
        format!("CASE {} END", arms.join(" "))
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
            let n = format!("({} & {m})", Sql(d).v4_int(col));
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

    /// The aggregate over `src`, as a 64-bit integer.
    pub fn sql(self, src: super::source::Source) -> String {
        match self {
            Metric::Bytes | Metric::Bps => format!("CAST(SUM({SCALED_BYTES}) AS BIGINT)"),
            Metric::Packets | Metric::Pps => format!("CAST(SUM({SCALED_PACKETS}) AS BIGINT)"),
            Metric::Flows => format!("CAST({} AS BIGINT)", src.count_sql()),
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
