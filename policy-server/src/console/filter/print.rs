//! An [`Expr`] back to filter text, with only the parentheses needed:
//! `parse(&e.to_string()) == Ok(e)` (a property test checks it).

use super::{Expr, Value};
use std::fmt;

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Addr(a) => write!(f, "{a}"),
            Value::Net(a, len) => write!(f, "{a}/{len}"),
            Value::Int(n) => write!(f, "{n}"),
            Value::Text(s) => {
                f.write_str("\"")?;
                for c in s.chars() {
                    if c == '"' || c == '\\' {
                        f.write_str("\\")?;
                    }
                    write!(f, "{c}")?;
                }
                f.write_str("\"")
            }
        }
    }
}

fn operand(f: &mut fmt::Formatter<'_>, e: &Expr, parens: bool) -> fmt::Result {
    if parens {
        write!(f, "({e})")
    } else {
        write!(f, "{e}")
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Left-associative: a right operand of the same operator, and
            // an OR under an AND, need parentheses.
            Expr::Or(a, b) => {
                operand(f, a, false)?;
                f.write_str(" OR ")?;
                operand(f, b, matches!(**b, Expr::Or(..)))
            }
            Expr::And(a, b) => {
                operand(f, a, matches!(**a, Expr::Or(..)))?;
                f.write_str(" AND ")?;
                operand(f, b, matches!(**b, Expr::Or(..) | Expr::And(..)))
            }
            Expr::Not(e) => {
                f.write_str("NOT ")?;
                operand(f, e, matches!(**e, Expr::Or(..) | Expr::And(..)))
            }
            Expr::Cmp(field, op, v) => write!(f, "{} {} {v}", field.name(), op.as_str()),
            Expr::In(field, values) => {
                write!(f, "{} IN (", field.name())?;
                for (i, v) in values.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_str(")")
            }
        }
    }
}
