//! Just enough of DNs (RFC 4514) to compare them and find an entry's parent:
//! split at unescaped commas, trim spaces around RDN parts, ignore case
//! (every naming attribute qosloop uses — cn, ou, dc — matches without case).

/// Splits at unescaped `sep`, honouring backslash escapes and quotes.
fn split_unescaped(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    let mut quoted = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// The comparable form of a DN: `cn=Gold , ou=Classes` → `cn=gold,ou=classes`.
pub fn normalize(dn: &str) -> String {
    if dn.trim().is_empty() {
        return String::new();
    }
    split_unescaped(dn, ',')
        .into_iter()
        .map(|rdn| {
            split_unescaped(rdn, '+')
                .into_iter()
                .map(|ava| match ava.split_once('=') {
                    Some((t, v)) => format!("{}={}", t.trim(), v.trim()),
                    None => ava.trim().to_owned(),
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect::<Vec<_>>()
        .join(",")
        .to_lowercase()
}

/// The normalized DN of the parent entry; empty for a one-RDN DN.
pub fn parent(dn: &str) -> String {
    let n = normalize(dn);
    let parts = split_unescaped(&n, ',');
    parts[1..].join(",")
}

/// The value of the first RDN (`cn=gold,ou=x` → `gold`), as written.
pub fn rdn_value(dn: &str) -> Option<String> {
    let first = split_unescaped(dn, ',').into_iter().next()?;
    let (_, v) = first.split_once('=')?;
    let v = v.trim();
    (!v.is_empty()).then(|| v.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_and_finds_parents() {
        assert_eq!(
            normalize("CN=Gold , ou=Classes,dc=X"),
            "cn=gold,ou=classes,dc=x"
        );
        assert_eq!(parent("cn=low,cn=gold,ou=c"), "cn=gold,ou=c");
        assert_eq!(parent("cn=a\\,b,ou=c"), "ou=c");
        assert_eq!(parent("dc=x"), "");
        assert_eq!(
            rdn_value("cn=policed-flow,ou=rules"),
            Some("policed-flow".into())
        );
        assert_eq!(normalize(""), "");
    }
}
