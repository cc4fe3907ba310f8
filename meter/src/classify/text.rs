//! What the rule-file parsers share: the error type (file, line, column,
//! what is wrong) and value syntaxes (numbers, MAC addresses, IP prefixes,
//! `\xHH` byte strings).

use std::net::IpAddr;

/// A rule file that cannot be used: where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct RuleError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl RuleError {
    pub fn at(file: &str, src: &str, offset: usize, message: impl Into<String>) -> RuleError {
        let (line, column) = line_col(src, offset);
        RuleError {
            file: file.to_owned(),
            line,
            column,
            message: message.into(),
        }
    }

    /// Turns a TOML parse error into a located rule error.
    pub fn from_toml(file: &str, src: &str, e: &toml::de::Error) -> RuleError {
        let offset = e.span().map_or(0, |s| s.start);
        RuleError::at(file, src, offset, e.message().trim().to_owned())
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let mut line = 1;
    let mut col = 1;
    for (i, ch) in src.char_indices() {
        if i >= offset {
            break;
        }
        if ch == '\n' {
            line += 1;
            col = 1;
        } else {
            col += 1;
        }
    }
    (line, col)
}

/// A decimal or `0x` hexadecimal number.
pub fn parse_number(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let r = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else {
        t.parse::<u64>()
    };
    r.map_err(|_| format!("{t:?} is not a number"))
}

/// `aa:bb:cc:dd:ee:ff` (or with `-`).
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.trim().split([':', '-']).collect();
    if parts.len() != 6 {
        return Err(format!("{s:?} is not a MAC address (six hex bytes)"));
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
    }
    Ok(mac)
}

/// `\xHH\xHH…` (every byte escaped) into bytes; `None` if `s` is not in
/// that form.
pub fn parse_escaped_bytes(s: &str) -> Option<Result<Vec<u8>, String>> {
    let t = s.trim();
    if !t.starts_with("\\x") {
        return None;
    }
    let mut out = Vec::new();
    let mut rest = t;
    while !rest.is_empty() {
        let Some(hex) = rest.strip_prefix("\\x") else {
            return Some(Err(format!("{t:?}: expected \\xHH at {rest:?}")));
        };
        let Some(pair) = hex.get(..2) else {
            return Some(Err(format!("{t:?}: \\x needs two hex digits")));
        };
        match u8::from_str_radix(pair, 16) {
            Ok(b) => out.push(b),
            Err(_) => return Some(Err(format!("{t:?}: {pair:?} is not hex"))),
        }
        rest = &hex[2..];
    }
    Some(Ok(out))
}

/// An address with an optional `/prefix` or `/mask`: (version, value, mask)
/// with IPv4 in the low 32 bits.
pub fn parse_ip_match(s: &str) -> Result<(u8, u128, u128), String> {
    let t = s.trim();
    let (addr, len) = match t.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (t, None),
    };
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IP address"))?;
    let (ver, value, bits) = match ip {
        IpAddr::V4(v4) => (4u8, u128::from(u32::from(v4)), 32u32),
        IpAddr::V6(v6) => (6u8, u128::from(v6), 128u32),
    };
    let full: u128 = if bits == 32 {
        u128::from(u32::MAX)
    } else {
        u128::MAX
    };
    let mask = match len {
        None => full,
        Some(l) if l.contains('.') || l.contains(':') => {
            let m: IpAddr = l.parse().map_err(|_| format!("{l:?} is not a mask"))?;
            match (m, ver) {
                (IpAddr::V4(m), 4) => u128::from(u32::from(m)),
                (IpAddr::V6(m), 6) => u128::from(m),
                _ => return Err(format!("mask {l:?} is of the other IP version")),
            }
        }
        Some(l) => {
            let n: u32 = l
                .parse()
                .map_err(|_| format!("{l:?} is not a prefix length"))?;
            if n > bits {
                return Err(format!("prefix length {n} exceeds {bits}"));
            }
            if n == 0 {
                0
            } else {
                (full >> (bits - n)) << (bits - n)
            }
        }
    };
    Ok((ver, value & mask, mask))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse() {
        assert_eq!(parse_number("0x0800").unwrap(), 2048);
        assert_eq!(parse_number(" 17 ").unwrap(), 17);
        assert!(parse_number("x").is_err());
        assert_eq!(parse_mac("00:11:22:aa:bb:cc").unwrap()[5], 0xcc);
        assert_eq!(
            parse_escaped_bytes("\\x08\\x00").unwrap().unwrap(),
            vec![8, 0]
        );
        assert!(parse_escaped_bytes("80").is_none());
        assert!(parse_escaped_bytes("\\x0").unwrap().is_err());
        assert_eq!(
            parse_ip_match("10.1.2.3/8").unwrap(),
            (4, 0x0a00_0000, 0xff00_0000)
        );
        assert_eq!(
            parse_ip_match("10.1.2.3/255.255.0.0").unwrap(),
            (4, 0x0a01_0000, 0xffff_0000)
        );
        assert_eq!(
            parse_ip_match("2001:db8::/32").unwrap().2 >> 96,
            0xffff_ffff
        );
        assert!(parse_ip_match("10.0.0.0/33").is_err());
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }
}
