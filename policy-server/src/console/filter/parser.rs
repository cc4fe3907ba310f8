//! Recursive descent over the tokens of [`super::lexer`].

use super::lexer::{lex, Op, Spanned, Tok};
use super::{Expr, Field, FilterError, Kind, Value};
use std::net::IpAddr;

/// The most values in one `IN` list and the deepest nesting accepted.
pub const MAX_IN_VALUES: usize = 1000;
pub const MAX_DEPTH: usize = 64;

/// Parses a filter with every feature allowed.
pub fn parse(input: &str) -> Result<Expr, FilterError> {
    parse_for(input, true)
}

/// Parses a filter; `v6_prefixes` false refuses IPv6 prefixes shorter
/// than /128 (the SQLite store keeps addresses as text and can match
/// IPv4 prefixes only).
pub fn parse_for(input: &str, v6_prefixes: bool) -> Result<Expr, FilterError> {
    let toks = lex(input)?;
    let mut p = Parser {
        toks,
        at: 0,
        end: input.len(),
        v6_prefixes,
        depth: 0,
    };
    if p.toks.is_empty() {
        return Err(FilterError::new(0, "", "empty filter"));
    }
    let e = p.or()?;
    if let Some(t) = p.peek() {
        return Err(err(t, "expected AND, OR or the end of the filter"));
    }
    Ok(e)
}

struct Parser {
    toks: Vec<Spanned>,
    at: usize,
    end: usize,
    v6_prefixes: bool,
    depth: usize,
}

fn err(t: &Spanned, message: impl Into<String>) -> FilterError {
    FilterError::new(t.offset, &t.text, message)
}

fn is_kw(t: &Spanned, kw: &str) -> bool {
    matches!(&t.tok, Tok::Word(w) if w.eq_ignore_ascii_case(kw))
}

impl Parser {
    fn peek(&self) -> Option<&Spanned> {
        self.toks.get(self.at)
    }

    fn next(&mut self, what: &str) -> Result<Spanned, FilterError> {
        match self.toks.get(self.at) {
            Some(t) => {
                self.at += 1;
                Ok(t.clone())
            }
            None => Err(FilterError::new(
                self.end,
                "",
                format!("expected {what}, found the end of the filter"),
            )),
        }
    }

    fn eat_kw(&mut self, kw: &str) -> bool {
        if self.peek().is_some_and(|t| is_kw(t, kw)) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn or(&mut self) -> Result<Expr, FilterError> {
        let mut e = self.and()?;
        while self.eat_kw("OR") {
            e = Expr::Or(Box::new(e), Box::new(self.and()?));
        }
        Ok(e)
    }

    fn and(&mut self) -> Result<Expr, FilterError> {
        let mut e = self.unary()?;
        while self.eat_kw("AND") {
            e = Expr::And(Box::new(e), Box::new(self.unary()?));
        }
        Ok(e)
    }

    fn unary(&mut self) -> Result<Expr, FilterError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            let t = self.next("an expression")?;
            return Err(err(&t, format!("nested deeper than {MAX_DEPTH}")));
        }
        let e = self.unary_inner();
        self.depth -= 1;
        e
    }

    fn unary_inner(&mut self) -> Result<Expr, FilterError> {
        if self.eat_kw("NOT") {
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        let t = self.next("a field, NOT or (")?;
        match &t.tok {
            Tok::LParen => {
                let e = self.or()?;
                let close = self.next(")")?;
                if close.tok != Tok::RParen {
                    return Err(err(&close, "expected )"));
                }
                Ok(e)
            }
            Tok::Word(w) => {
                let field = Field::from_name(w).ok_or_else(|| {
                    err(
                        &t,
                        format!(
                            "unknown field (known: {})",
                            Field::ALL.map(Field::name).join(", ")
                        ),
                    )
                })?;
                self.comparison(field)
            }
            _ => Err(err(&t, "expected a field, NOT or (")),
        }
    }

    fn comparison(&mut self, field: Field) -> Result<Expr, FilterError> {
        let negated = self.eat_kw("NOT");
        if negated || self.peek().is_some_and(|t| is_kw(t, "IN")) {
            let kw = self.next("IN")?;
            if !is_kw(&kw, "IN") {
                return Err(err(&kw, "expected IN after NOT"));
            }
            let open = self.next("(")?;
            if open.tok != Tok::LParen {
                return Err(err(&open, "expected ( after IN"));
            }
            let mut values = Vec::new();
            loop {
                let v = self.next("a value")?;
                if values.len() == MAX_IN_VALUES {
                    return Err(err(&v, format!("more than {MAX_IN_VALUES} values in IN")));
                }
                values.push(self.value(field, &v)?);
                let sep = self.next(", or )")?;
                match sep.tok {
                    Tok::Comma => continue,
                    Tok::RParen => break,
                    _ => return Err(err(&sep, "expected , or )")),
                }
            }
            let e = Expr::In(field, values);
            return Ok(if negated { Expr::Not(Box::new(e)) } else { e });
        }
        let op_tok = self.next("an operator")?;
        let Tok::Op(op) = op_tok.tok else {
            return Err(err(&op_tok, "expected an operator (= != < <= > >=) or IN"));
        };
        if !matches!(field.kind(), Kind::Int(_)) && !matches!(op, Op::Eq | Op::Ne) {
            return Err(err(
                &op_tok,
                format!("{} takes = != or IN only", field.name()),
            ));
        }
        let v = self.next("a value")?;
        let value = self.value(field, &v)?;
        Ok(Expr::Cmp(field, op, value))
    }

    fn value(&self, field: Field, t: &Spanned) -> Result<Value, FilterError> {
        match (field.kind(), &t.tok) {
            (Kind::Text, Tok::Str(s)) => Ok(Value::Text(s.clone())),
            (Kind::Text, Tok::Word(w)) => Ok(Value::Text(w.clone())),
            (Kind::Int(max), Tok::Word(w)) => {
                let n = match w.parse::<u64>() {
                    Ok(n) => n,
                    Err(_) if field == Field::Proto => proto_number(w)
                        .ok_or_else(|| err(t, "expected a protocol number or name"))?,
                    Err(_) => return Err(err(t, "expected a number")),
                };
                if n > max {
                    return Err(err(t, format!("{} is at most {max}", field.name())));
                }
                Ok(Value::Int(n))
            }
            (Kind::Addr, Tok::Word(w)) => self.address(t, w),
            (Kind::Addr | Kind::Int(_), _) => {
                Err(err(t, format!("expected a value for {}", field.name())))
            }
            (Kind::Text, _) => Err(err(t, "expected a string")),
        }
    }

    fn address(&self, t: &Spanned, w: &str) -> Result<Value, FilterError> {
        let (addr, len) = match w.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (w, None),
        };
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| err(t, "expected an IP address or prefix"))?;
        let Some(len) = len else {
            return Ok(Value::Addr(ip));
        };
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| err(t, format!("prefix length must be 0..={max}")))?;
        if ip.is_ipv6() && len < 128 && !self.v6_prefixes {
            return Err(err(
                t,
                "IPv6 prefixes need the PostgreSQL store (SQLite matches IPv4 prefixes only)",
            ));
        }
        Ok(Value::Net(ip, len))
    }
}

/// IANA numbers of the protocol names the filter knows.
pub fn proto_number(name: &str) -> Option<u64> {
    Some(match name.to_ascii_lowercase().as_str() {
        "icmp" => 1,
        "tcp" => 6,
        "udp" => 17,
        "gre" => 47,
        "esp" => 50,
        "icmpv6" => 58,
        "sctp" => 132,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_is_not_then_and_then_or() {
        let e = parse("proto = tcp OR NOT dst_port = 53 AND class IN (a, 'b c')").unwrap();
        let want = Expr::Or(
            Box::new(Expr::Cmp(Field::Proto, Op::Eq, Value::Int(6))),
            Box::new(Expr::And(
                Box::new(Expr::Not(Box::new(Expr::Cmp(
                    Field::DstPort,
                    Op::Eq,
                    Value::Int(53),
                )))),
                Box::new(Expr::In(
                    Field::Class,
                    vec![Value::Text("a".into()), Value::Text("b c".into())],
                )),
            )),
        );
        assert_eq!(e, want);
    }

    #[test]
    fn errors_name_the_offending_token_and_its_offset() {
        let cases = [
            ("srcport = 1", 0, "srcport", "unknown field"),
            ("src_port = 70000", 11, "70000", "at most 65535"),
            ("src_addr = 10.0.0.0/33", 11, "10.0.0.0/33", "prefix length"),
            ("src_addr < 10.0.0.1", 9, "<", "= != or IN"),
            ("(proto = 6", 10, "", "expected )"),
            ("proto = 6 6", 10, "6", "expected AND"),
            ("class IN (a b)", 12, "b", "expected , or )"),
            ("proto = banana", 8, "banana", "protocol"),
            ("", 0, "", "empty"),
        ];
        for (input, offset, token, message) in cases {
            let e = parse(input).unwrap_err();
            assert_eq!(
                (e.offset, e.token.as_str()),
                (offset, token),
                "{input}: {e}"
            );
            assert!(e.message.contains(message), "{input}: {e}");
        }
    }

    #[test]
    fn sqlite_refuses_ipv6_prefixes_but_not_ipv4_ones() {
        assert!(parse_for("src_addr = 10.0.0.0/8", false).is_ok());
        let e = parse_for("proto = 6 AND dst_addr = 2001:db8::/32", false).unwrap_err();
        assert_eq!(e.offset, 25);
        assert!(parse("dst_addr = 2001:db8::/32").is_ok());
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = "(".repeat(100) + "proto = 6" + &")".repeat(100);
        assert!(parse(&deep).unwrap_err().message.contains("nested"));
    }
}
