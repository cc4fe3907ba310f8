//! The filter language of the flow explorer: comparisons over a flow
//! record's fields, `IN` lists, prefix (CIDR) match, `AND`/`OR`/`NOT`,
//! parentheses. Text → [`lexer`] → [`parser`] → [`Expr`]; [`Expr`] →
//! text again through its `Display` ([`print`]) and → SQL through
//! [`compile`], where every value the user wrote becomes a bound parameter.
//!
//! ```text
//! expr    := and ("OR" and)*
//! and     := unary ("AND" unary)*
//! unary   := "NOT" unary | "(" expr ")" | cmp
//! cmp     := FIELD OP value | FIELD ["NOT"] "IN" "(" value ("," value)* ")"
//! OP      := "=" | "!=" | "<" | "<=" | ">" | ">="
//! value   := NUMBER | ADDRESS | ADDRESS "/" LEN | "quoted" | 'quoted' | WORD
//! ```
//!
//! Keywords are case-insensitive. An address compared with `=`/`!=`/`IN`
//! to a prefix matches when the prefix contains it. `proto` takes a number
//! or a name (`tcp`, `udp`, `icmp`, `icmpv6`, `gre`, `esp`, `sctp`).

pub mod compile;
pub mod lexer;
pub mod parser;
pub mod print;

pub use compile::compile;
pub use lexer::Op;
pub use parser::{parse, parse_for};

use std::net::IpAddr;

/// A malformed filter: what is wrong and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("filter: {message} at offset {offset} (`{token}`)")]
pub struct FilterError {
    /// Byte offset of the offending token in the filter.
    pub offset: usize,
    /// The offending token as written (empty at the end of the input).
    pub token: String,
    pub message: String,
}

impl FilterError {
    pub fn new(offset: usize, token: &str, message: impl Into<String>) -> FilterError {
        FilterError {
            offset,
            token: token.to_owned(),
            message: message.into(),
        }
    }
}

/// What kind of value a field holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Addr,
    /// An unsigned integer at most the bound.
    Int(u64),
    Text,
}

/// A field of a flow record the filter can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Field {
    SrcAddr,
    DstAddr,
    SrcPort,
    DstPort,
    Proto,
    Dscp,
    Vlan,
    TcpFlags,
    Class,
    User,
    Process,
    Exporter,
    Packets,
    Bytes,
    SamplingInterval,
    StartNs,
    EndNs,
}

impl Field {
    pub const ALL: [Field; 17] = [
        Field::SrcAddr,
        Field::DstAddr,
        Field::SrcPort,
        Field::DstPort,
        Field::Proto,
        Field::Dscp,
        Field::Vlan,
        Field::TcpFlags,
        Field::Class,
        Field::User,
        Field::Process,
        Field::Exporter,
        Field::Packets,
        Field::Bytes,
        Field::SamplingInterval,
        Field::StartNs,
        Field::EndNs,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Field::SrcAddr => "src_addr",
            Field::DstAddr => "dst_addr",
            Field::SrcPort => "src_port",
            Field::DstPort => "dst_port",
            Field::Proto => "proto",
            Field::Dscp => "dscp",
            Field::Vlan => "vlan",
            Field::TcpFlags => "tcp_flags",
            Field::Class => "class",
            Field::User => "user",
            Field::Process => "process",
            Field::Exporter => "exporter",
            Field::Packets => "packets",
            Field::Bytes => "bytes",
            Field::SamplingInterval => "sampling_interval",
            Field::StartNs => "start_ns",
            Field::EndNs => "end_ns",
        }
    }

    pub fn from_name(s: &str) -> Option<Field> {
        Field::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(s))
    }

    pub fn kind(self) -> Kind {
        match self {
            Field::SrcAddr | Field::DstAddr => Kind::Addr,
            Field::SrcPort | Field::DstPort => Kind::Int(65535),
            Field::Proto => Kind::Int(255),
            Field::Dscp => Kind::Int(63),
            Field::Vlan => Kind::Int(4095),
            Field::TcpFlags => Kind::Int(65535),
            Field::SamplingInterval => Kind::Int(u64::from(u32::MAX)),
            Field::Packets | Field::Bytes | Field::StartNs | Field::EndNs => {
                Kind::Int(i64::MAX as u64)
            }
            Field::Class | Field::User | Field::Process | Field::Exporter => Kind::Text,
        }
    }
}

/// A value in a comparison.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Addr(IpAddr),
    /// A prefix: the address as written and the prefix length.
    Net(IpAddr, u8),
    Int(u64),
    Text(String),
}

/// A parsed filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Cmp(Field, Op, Value),
    In(Field, Vec<Value>),
}

#[cfg(test)]
mod props {
    use super::compile::compile;
    use super::*;
    use proptest::prelude::*;
    use qosloop_store::Dialect;

    fn value_for(field: Field) -> BoxedStrategy<Value> {
        match field.kind() {
            Kind::Int(max) => (0..=max).prop_map(Value::Int).boxed(),
            Kind::Text => any::<String>().prop_map(Value::Text).boxed(),
            Kind::Addr => prop_oneof![
                any::<[u8; 4]>().prop_map(|o| Value::Addr(IpAddr::from(o))),
                any::<[u8; 16]>().prop_map(|o| Value::Addr(IpAddr::from(o))),
                (any::<[u8; 4]>(), 0u8..=32).prop_map(|(o, l)| Value::Net(IpAddr::from(o), l)),
                (any::<[u8; 16]>(), 0u8..=128).prop_map(|(o, l)| Value::Net(IpAddr::from(o), l)),
            ]
            .boxed(),
        }
    }

    fn leaf() -> impl Strategy<Value = Expr> {
        (0..Field::ALL.len(), any::<prop::sample::Index>(), 1usize..4).prop_flat_map(
            |(i, op, n)| {
                let field = Field::ALL[i];
                let ops: &[Op] = match field.kind() {
                    Kind::Int(_) => &[Op::Eq, Op::Ne, Op::Lt, Op::Le, Op::Gt, Op::Ge],
                    _ => &[Op::Eq, Op::Ne],
                };
                let op = ops[op.index(ops.len())];
                prop_oneof![
                    value_for(field).prop_map(move |v| Expr::Cmp(field, op, v)),
                    prop::collection::vec(value_for(field), n)
                        .prop_map(move |vs| Expr::In(field, vs)),
                ]
            },
        )
    }

    fn expr() -> impl Strategy<Value = Expr> {
        leaf().prop_recursive(5, 40, 2, |inner| {
            prop_oneof![
                (inner.clone(), inner.clone())
                    .prop_map(|(a, b)| Expr::And(Box::new(a), Box::new(b))),
                (inner.clone(), inner.clone())
                    .prop_map(|(a, b)| Expr::Or(Box::new(a), Box::new(b))),
                inner.prop_map(|a| Expr::Not(Box::new(a))),
            ]
        })
    }

    /// The SQL text with every `$n` removed: only the compiler's fragments.
    fn skeleton(sql: &str) -> String {
        let mut out = String::new();
        let mut chars = sql.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '$' {
                while chars.peek().is_some_and(|d| d.is_ascii_digit()) {
                    chars.next();
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    proptest! {
        #[test]
        fn printing_then_parsing_gives_the_same_filter(e in expr()) {
            let text = e.to_string();
            prop_assert_eq!(parse(&text), Ok(e), "{}", text);
        }

        #[test]
        fn no_input_reaches_the_sql_text(input in ".{0,200}", quote in "[\"';\\-\\\\]{1,6}") {
            // Whatever parses, every value is bound: the SQL without its
            // placeholders holds only the compiler's own vocabulary.
            for text in [input.clone(), format!("user = \"{}\" OR class = '{}'", quote, input)] {
                let Ok(e) = parse(&text) else { continue };
                for d in [Dialect::Sqlite, Dialect::Postgres] {
                    let mut binds = Vec::new();
                    let sql = compile(&e, d, &mut binds);
                    let bare = skeleton(&sql);
                    prop_assert!(!bare.contains(';') && !bare.contains("--"), "{}", sql);
                    prop_assert!(bare.chars().all(|c| c.is_ascii_alphanumeric() || " ()_=<>!,.':\"|&".contains(c)), "{}", sql);
                    // Quoted literals in the SQL are the compiler's: '.' and ':'.
                    let literals: Vec<&str> = bare.split('\'').skip(1).step_by(2).collect();
                    prop_assert!(literals.iter().all(|l| *l == "." || *l == ":"), "{}", sql);
                    prop_assert_eq!(sql.matches('$').count(), binds.len());
                }
            }
        }
    }
}
