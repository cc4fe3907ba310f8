//! Tokens of the filter language, each with its byte offset in the input
//! so that an error can point at it.

use super::FilterError;

/// One token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tok {
    /// A bare word: a field name, a keyword (`AND`, `OR`, `NOT`, `IN`), a
    /// number, an address or prefix, a protocol name.
    Word(String),
    /// A quoted string, unescaped.
    Str(String),
    LParen,
    RParen,
    Comma,
    Op(Op),
}

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Ne => "!=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
        }
    }
}

/// A token and where it starts (bytes into the input).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spanned {
    pub tok: Tok,
    pub offset: usize,
    /// The token as written.
    pub text: String,
}

/// The longest filter accepted, in bytes.
pub const MAX_FILTER_LEN: usize = 4096;

fn word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '/' | '-')
}

/// Splits `input` into tokens.
pub fn lex(input: &str) -> Result<Vec<Spanned>, FilterError> {
    if input.len() > MAX_FILTER_LEN {
        return Err(FilterError::new(
            MAX_FILTER_LEN,
            "",
            format!("filter longer than {MAX_FILTER_LEN} bytes"),
        ));
    }
    let mut out = Vec::new();
    let mut chars = input.char_indices().peekable();
    while let Some(&(at, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let single = match c {
            '(' => Some(Tok::LParen),
            ')' => Some(Tok::RParen),
            ',' => Some(Tok::Comma),
            _ => None,
        };
        if let Some(tok) = single {
            chars.next();
            out.push(Spanned {
                tok,
                offset: at,
                text: c.to_string(),
            });
            continue;
        }
        if matches!(c, '=' | '!' | '<' | '>') {
            chars.next();
            let next_eq = chars.peek().map(|&(_, n)| n == '=').unwrap_or(false);
            let (op, text) = match (c, next_eq) {
                ('=', _) => (Op::Eq, "="),
                ('!', true) => (Op::Ne, "!="),
                ('<', true) => (Op::Le, "<="),
                ('>', true) => (Op::Ge, ">="),
                ('<', false) => (Op::Lt, "<"),
                ('>', false) => (Op::Gt, ">"),
                _ => return Err(FilterError::new(at, "!", "expected != ")),
            };
            if text.len() == 2 {
                chars.next();
            }
            out.push(Spanned {
                tok: Tok::Op(op),
                offset: at,
                text: text.to_owned(),
            });
            continue;
        }
        if c == '"' || c == '\'' {
            chars.next();
            let mut value = String::new();
            let mut closed = false;
            while let Some((_, ch)) = chars.next() {
                if ch == c {
                    closed = true;
                    break;
                }
                if ch == '\\' {
                    match chars.next() {
                        Some((_, e)) => value.push(e),
                        None => break,
                    }
                } else {
                    value.push(ch);
                }
            }
            let end = chars.peek().map(|&(i, _)| i).unwrap_or(input.len());
            if !closed {
                return Err(FilterError::new(at, &input[at..end], "unterminated string"));
            }
            out.push(Spanned {
                tok: Tok::Str(value),
                offset: at,
                text: input[at..end].to_owned(),
            });
            continue;
        }
        if word_char(c) {
            let mut end = at;
            while let Some(&(i, ch)) = chars.peek() {
                if !word_char(ch) {
                    break;
                }
                end = i + ch.len_utf8();
                chars.next();
            }
            out.push(Spanned {
                tok: Tok::Word(input[at..end].to_owned()),
                offset: at,
                text: input[at..end].to_owned(),
            });
            continue;
        }
        return Err(FilterError::new(at, &c.to_string(), "unexpected character"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_carry_their_offsets() {
        let t = lex("src_port>=1024 AND class = \"a \\\"b\"").unwrap();
        let offsets: Vec<usize> = t.iter().map(|s| s.offset).collect();
        assert_eq!(offsets, vec![0, 8, 10, 15, 19, 25, 27]);
        assert_eq!(t[1].tok, Tok::Op(Op::Ge));
        assert_eq!(t[6].tok, Tok::Str("a \"b".into()));
    }

    #[test]
    fn bad_characters_and_open_strings_are_pointed_at() {
        let e = lex("proto = 6 ; drop").unwrap_err();
        assert_eq!((e.offset, e.token.as_str()), (10, ";"));
        let e = lex("user = 'bob").unwrap_err();
        assert_eq!(e.offset, 7);
        assert!(e.message.contains("unterminated"));
    }
}
