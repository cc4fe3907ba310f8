//! [`Expr`] → a SQL boolean expression over `flows`. The SQL text is made
//! of the compiler's own fragments only; every value from the filter is a
//! bound parameter (`$n`), appended to `binds`. Each comparison is
//! two-valued (a NULL column compares false, but `!=` is true), so `NOT`
//! means "every other record".

use super::{Expr, Field, Value};
use qosloop_store::{Bind, Dialect, Sql};
use std::net::IpAddr;

/// The SQL of `e`; parameters are numbered after those already in `binds`.
pub fn compile(e: &Expr, dialect: Dialect, binds: &mut Vec<Bind>) -> String {
    match e {
        Expr::And(a, b) => format!(
            "({} AND {})",
            compile(a, dialect, binds),
            compile(b, dialect, binds)
        ),
        Expr::Or(a, b) => format!(
            "({} OR {})",
            compile(a, dialect, binds),
            compile(b, dialect, binds)
        ),
        Expr::Not(a) => format!("(NOT {})", compile(a, dialect, binds)),
        Expr::Cmp(field, op, v) => leaf(*field, op.as_str(), v, dialect, binds),
        Expr::In(field, values) => {
            let parts: Vec<String> = values
                .iter()
                .map(|v| leaf(*field, "=", v, dialect, binds))
                .collect();
            format!("({})", parts.join(" OR "))
        }
    }
}

fn push(binds: &mut Vec<Bind>, b: Bind) -> String {
    binds.push(b);
    format!("${}", binds.len())
}

/// The column (or expression) a filter on `field` compares.
pub fn column(field: Field) -> &'static str {
    match field {
        Field::SrcAddr => "src_addr",
        Field::DstAddr => "dst_addr",
        Field::SrcPort => "src_port",
        Field::DstPort => "dst_port",
        Field::Proto => "proto",
        Field::Dscp => "dscp",
        Field::Vlan => "vlan",
        Field::TcpFlags => "tcp_flags",
        Field::Class => "class",
        Field::User => "\"user\"",
        Field::Process => "process",
        Field::Exporter => "exporter_id",
        Field::Packets => SCALED_PACKETS,
        Field::Bytes => SCALED_BYTES,
        Field::SamplingInterval => "sampling_interval",
        Field::StartNs => "start_ns",
        Field::EndNs => "end_ns",
    }
}

/// Counters as they were on the wire: a sampled record's raw counters
/// times its 1-in-N interval (as `store::scaled` does in Rust).
pub const SCALED_BYTES: &str =
    "(CASE WHEN sampling_interval > 1 THEN bytes * sampling_interval ELSE bytes END)";
pub const SCALED_PACKETS: &str =
    "(CASE WHEN sampling_interval > 1 THEN packets * sampling_interval ELSE packets END)";

fn leaf(field: Field, op: &str, v: &Value, dialect: Dialect, binds: &mut Vec<Bind>) -> String {
    let col = column(field);
    match (field, v) {
        (Field::Exporter, Value::Text(s)) => {
            let p = push(binds, Bind::Text(s.clone()));
            let inner = format!("exporter_id IN (SELECT id FROM exporters WHERE name = {p})");
            if op == "=" {
                format!("({inner})")
            } else {
                format!("(NOT {inner})")
            }
        }
        (_, Value::Addr(a)) => {
            let p = push(binds, Bind::Text(a.to_string()));
            match dialect {
                Dialect::Postgres => format!("({col} {op} CAST({p} AS INET))"),
                Dialect::Sqlite => format!("({col} {op} {p})"),
            }
        }
        (_, Value::Net(a, len)) => {
            let inner = net_match(col, *a, *len, dialect, binds);
            if op == "=" {
                inner
            } else {
                format!("(NOT {inner})")
            }
        }
        (_, Value::Int(n)) => {
            let p = push(binds, Bind::Int(i64::try_from(*n).unwrap_or(i64::MAX)));
            two_valued(col, op, &p)
        }
        (_, Value::Text(s)) => {
            let p = push(binds, Bind::Text(s.clone()));
            two_valued(col, op, &p)
        }
    }
}

/// `col op p`, false on NULL; `!=` is exactly `NOT =`, so a record
/// without the field (no class, no VLAN) is "not equal" to any value.
fn two_valued(col: &str, op: &str, p: &str) -> String {
    if op == "!=" {
        format!("(NOT COALESCE({col} = {p}, FALSE))")
    } else {
        format!("COALESCE({col} {op} {p}, FALSE)")
    }
}

/// The network of `a`/`len` and its last address.
pub fn network(a: IpAddr, len: u8) -> (IpAddr, IpAddr) {
    match a {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len.min(32)))
            };
            (
                IpAddr::V4((bits & mask).into()),
                IpAddr::V4((bits | !mask).into()),
            )
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len.min(128)))
            };
            (
                IpAddr::V6((bits & mask).into()),
                IpAddr::V6((bits | !mask).into()),
            )
        }
    }
}

fn net_match(col: &str, a: IpAddr, len: u8, dialect: Dialect, binds: &mut Vec<Bind>) -> String {
    let (first, last) = network(a, len);
    match (dialect, first, last) {
        (Dialect::Postgres, _, _) => {
            let p = push(binds, Bind::Text(format!("{first}/{len}")));
            format!("({col} <<= CAST({p} AS INET))")
        }
        (Dialect::Sqlite, IpAddr::V4(lo), IpAddr::V4(hi)) => {
            let lo = push(binds, Bind::Int(i64::from(u32::from(lo))));
            let hi = push(binds, Bind::Int(i64::from(u32::from(hi))));
            format!(
                "(instr({col}, ':') = 0 AND {} BETWEEN {lo} AND {hi})",
                Sql(dialect).v4_int(col)
            )
        }
        // The parser refuses IPv6 prefixes on SQLite but /128: one address.
        (Dialect::Sqlite, _, _) => {
            let p = push(binds, Bind::Text(first.to_string()));
            format!("({col} = {p})")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::filter::parse;

    #[test]
    fn values_are_bound_never_spliced() {
        let e = parse("user = \"x'); DROP TABLE flows; --\" OR dst_port IN (53, 443)").unwrap();
        let mut binds = Vec::new();
        let sql = compile(&e, Dialect::Postgres, &mut binds);
        assert!(!sql.contains("DROP"), "{sql}");
        assert_eq!(
            binds,
            vec![
                Bind::Text("x'); DROP TABLE flows; --".into()),
                Bind::Int(53),
                Bind::Int(443)
            ]
        );
        assert_eq!(sql.matches('$').count(), 3);
    }

    #[test]
    fn prefixes_bind_their_network() {
        assert_eq!(
            network("10.1.2.3".parse().unwrap(), 8),
            (
                "10.0.0.0".parse().unwrap(),
                "10.255.255.255".parse().unwrap()
            )
        );
        let mut binds = Vec::new();
        compile(
            &parse("src_addr = 10.1.2.3/16").unwrap(),
            Dialect::Sqlite,
            &mut binds,
        );
        assert_eq!(binds, vec![Bind::Int(0x0A01_0000), Bind::Int(0x0A01_FFFF)]);
    }
}
