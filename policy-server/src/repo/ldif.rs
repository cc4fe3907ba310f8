//! LDIF content records (RFC 2849), the subset a policy file needs: an
//! optional `version: 1`, comments, continuation lines, `::` base64 values,
//! several entries separated by blank lines. Change records (`changetype:`),
//! controls and `:<` URL values are refused with an error naming the line.
//!
//! The parser never panics: every problem is an [`LdifError`] with the line
//! it starts on and the DN of the entry it belongs to (when known).

use super::base64;
use std::fmt;

/// One directory entry: its DN and its attributes, in the order written.
/// Attribute names keep their spelling; lookups ignore case.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub dn: String,
    pub attrs: Vec<(String, Vec<String>)>,
    /// 1-based line of the `dn:` line in its LDIF (0 when read from LDAP).
    pub line: usize,
}

impl Entry {
    pub fn new(dn: impl Into<String>) -> Entry {
        Entry {
            dn: dn.into(),
            attrs: Vec::new(),
            line: 0,
        }
    }

    /// Adds a value, to the attribute of the same name when there is one.
    pub fn push(&mut self, name: &str, value: impl Into<String>) {
        match self
            .attrs
            .iter_mut()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
        {
            Some((_, values)) => values.push(value.into()),
            None => self.attrs.push((name.to_owned(), vec![value.into()])),
        }
    }

    /// Builder form of [`Entry::push`].
    pub fn with(mut self, name: &str, value: impl Into<String>) -> Entry {
        self.push(name, value);
        self
    }

    /// The values of an attribute (case-insensitive name); empty if absent.
    pub fn get(&self, name: &str) -> &[String] {
        self.attrs
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map_or(&[], |(_, v)| v.as_slice())
    }

    /// Whether the entry has `objectClass: class` (case-insensitive).
    pub fn has_class(&self, class: &str) -> bool {
        self.get("objectClass")
            .iter()
            .any(|c| c.eq_ignore_ascii_case(class))
    }

    /// The same entry with attribute names lower-cased and attributes and
    /// values sorted: two entries that LDAP considers equal compare equal.
    pub fn canonical(&self) -> Entry {
        let mut attrs: Vec<(String, Vec<String>)> = self
            .attrs
            .iter()
            .map(|(n, v)| {
                let mut v = v.clone();
                v.sort();
                (n.to_ascii_lowercase(), v)
            })
            .collect();
        attrs.sort();
        Entry {
            dn: self.dn.clone(),
            attrs,
            line: 0,
        }
    }
}

/// Why an LDIF did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct LdifError {
    /// 1-based line the problem starts on.
    pub line: usize,
    /// DN of the entry being read, when it was known.
    pub dn: Option<String>,
    pub message: String,
}

impl fmt::Display for LdifError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.dn {
            Some(dn) => write!(f, "line {} (entry {dn}): {}", self.line, self.message),
            None => write!(f, "line {}: {}", self.line, self.message),
        }
    }
}

/// A logical line: continuation lines joined, with the line it starts on.
struct Logical {
    line: usize,
    text: String,
}

/// Splits the text into records (lists of logical lines), dropping comments.
fn records(text: &str) -> Vec<Vec<Logical>> {
    let mut records = Vec::new();
    let mut current: Vec<Logical> = Vec::new();
    // Whether the previous physical line was a comment (its continuation
    // lines belong to the comment too).
    let mut in_comment = false;
    for (index, raw) in text.split('\n').enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        let number = index + 1;
        if line.is_empty() {
            in_comment = false;
            if !current.is_empty() {
                records.push(std::mem::take(&mut current));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix(' ') {
            if in_comment {
                continue;
            }
            match current.last_mut() {
                Some(last) => last.text.push_str(rest),
                // A continuation with nothing to continue: keep it so the
                // parser reports it.
                None => current.push(Logical {
                    line: number,
                    text: line.to_owned(),
                }),
            }
            continue;
        }
        if line.starts_with('#') {
            in_comment = true;
            continue;
        }
        in_comment = false;
        current.push(Logical {
            line: number,
            text: line.to_owned(),
        });
    }
    if !current.is_empty() {
        records.push(current);
    }
    records
}

fn valid_attribute_name(name: &str) -> bool {
    let mut chars = name.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphanumeric() => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | ';' | '.'))
}

/// Splits `name: value` / `name:: base64` into the name and decoded value.
fn attribute(l: &Logical, dn: Option<&str>) -> Result<(String, String), LdifError> {
    let err = |message: String| LdifError {
        line: l.line,
        dn: dn.map(str::to_owned),
        message,
    };
    if l.text.starts_with(' ') {
        return Err(err(
            "continuation line (starting with a space) with no line before it".into(),
        ));
    }
    let Some((name, rest)) = l.text.split_once(':') else {
        return Err(err(format!(
            "expected \"attribute: value\", found {:?}",
            truncate(&l.text)
        )));
    };
    if !valid_attribute_name(name) {
        return Err(err(format!("invalid attribute name {:?}", truncate(name))));
    }
    let value = if let Some(b64) = rest.strip_prefix(':') {
        let bytes = base64::decode(b64.trim())
            .map_err(|why| err(format!("base64 value of {name}: {why}")))?;
        String::from_utf8(bytes)
            .map_err(|_| err(format!("base64 value of {name} is not UTF-8 text")))?
    } else if rest.starts_with('<') {
        return Err(err(format!("URL values (\"{name}:<\") are not supported")));
    } else {
        rest.trim_start_matches(' ').to_owned()
    };
    Ok((name.to_owned(), value))
}

fn truncate(s: &str) -> String {
    s.chars().take(60).collect()
}

/// Parses LDIF content records into entries.
pub fn parse(text: &str) -> Result<Vec<Entry>, LdifError> {
    let mut entries = Vec::new();
    for (i, record) in records(text).into_iter().enumerate() {
        let mut lines = record.iter().peekable();
        // `version: 1` may open the file, alone or before the first entry.
        if i == 0 {
            if let Some(first) = lines.peek() {
                if first.text.to_ascii_lowercase().starts_with("version:") {
                    let (_, v) = attribute(first, None)?;
                    if v.trim() != "1" {
                        return Err(LdifError {
                            line: first.line,
                            dn: None,
                            message: format!("unsupported LDIF version {:?}", v.trim()),
                        });
                    }
                    lines.next();
                }
            }
        }
        let Some(first) = lines.next() else { continue };
        let (name, dn) = attribute(first, None)?;
        if !name.eq_ignore_ascii_case("dn") {
            return Err(LdifError {
                line: first.line,
                dn: None,
                message: format!("an entry must start with \"dn:\", found \"{name}:\""),
            });
        }
        let mut entry = Entry::new(dn.trim());
        entry.line = first.line;
        for l in lines {
            let (name, value) = attribute(l, Some(&entry.dn))?;
            if name.eq_ignore_ascii_case("changetype") || name.eq_ignore_ascii_case("control") {
                return Err(LdifError {
                    line: l.line,
                    dn: Some(entry.dn.clone()),
                    message: format!(
                        "change records (\"{name}:\") are not supported: write the entries as content records"
                    ),
                });
            }
            if name.eq_ignore_ascii_case("dn") {
                return Err(LdifError {
                    line: l.line,
                    dn: Some(entry.dn.clone()),
                    message:
                        "a second \"dn:\" in one entry (entries are separated by a blank line)"
                            .into(),
                });
            }
            entry.push(&name, value);
        }
        entries.push(entry);
    }
    Ok(entries)
}

/// Whether a value can be written as-is (RFC 2849 SAFE-STRING).
fn safe(value: &str) -> bool {
    let bytes = value.as_bytes();
    match bytes.first() {
        None => true,
        Some(b' ' | b':' | b'<') => false,
        Some(_) => {
            !value.ends_with(' ')
                && bytes
                    .iter()
                    .all(|&b| b.is_ascii() && b != 0 && b != b'\n' && b != b'\r')
        }
    }
}

/// Writes one `name: value` line folded at 76 columns.
fn write_line(out: &mut String, line: &str) {
    const WIDTH: usize = 76;
    let mut rest = line;
    let mut first = true;
    while !rest.is_empty() {
        let width = if first { WIDTH } else { WIDTH - 1 };
        let mut cut = rest.len().min(width);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        if !first {
            out.push(' ');
        }
        out.push_str(&rest[..cut]);
        out.push('\n');
        rest = &rest[cut..];
        first = false;
    }
    if line.is_empty() {
        out.push('\n');
    }
}

fn write_value(out: &mut String, name: &str, value: &str) {
    if safe(value) {
        write_line(out, &format!("{name}: {value}"));
    } else {
        write_line(
            out,
            &format!("{name}:: {}", base64::encode(value.as_bytes())),
        );
    }
}

/// Writes entries as LDIF content records that [`parse`] reads back.
pub fn write(entries: &[Entry]) -> String {
    let mut out = String::new();
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        write_value(&mut out, "dn", &e.dn);
        for (name, values) in &e.attrs {
            for v in values {
                write_value(&mut out, name, v);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuation_base64_comments_and_several_entries() {
        let text = "version: 1\n\
            # a comment\n \
            continued comment\n\
            dn: cn=a,dc=x\n\
            objectClass: top\n\
            description: one\n  two\n\
            cn:: YQ==\n\
            \n\
            \n\
            dn: cn=b,\n dc=x\r\n\
            cn: b\n";
        let e = parse(text).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].dn, "cn=a,dc=x");
        assert_eq!(e[0].line, 4);
        assert_eq!(e[0].get("DESCRIPTION"), ["one two"]);
        assert_eq!(e[0].get("cn"), ["a"]);
        assert_eq!(e[1].dn, "cn=b,dc=x");
        assert_eq!(e[1].line, 11);
    }

    #[test]
    fn errors_name_the_line_and_the_dn() {
        let err = parse("dn: cn=a\ncn: a\nbroken line\n").unwrap_err();
        assert_eq!((err.line, err.dn.as_deref()), (3, Some("cn=a")));
        let err = parse("dn: cn=a\nchangetype: add\n").unwrap_err();
        assert!(err.message.contains("change records"), "{err}");
        let err = parse("cn: a\n").unwrap_err();
        assert_eq!(err.line, 1);
        let err = parse("dn: cn=a\ncn:: !!!\n").unwrap_err();
        assert!(err.to_string().contains("line 2 (entry cn=a)"), "{err}");
        let err = parse("dn: cn=a\ncn:: //8=\n").unwrap_err();
        assert!(err.message.contains("UTF-8"), "{err}");
    }

    #[test]
    fn unsafe_values_are_written_as_base64_and_long_lines_folded() {
        let e = Entry::new("cn=ä,dc=x")
            .with("description", " leading space")
            .with("cn", "x".repeat(200));
        let text = write(std::slice::from_ref(&e));
        assert!(text.starts_with("dn:: "), "{text}");
        assert!(text.lines().all(|l| l.len() <= 76));
        assert_eq!(parse(&text).unwrap()[0].attrs, e.attrs);
    }

    #[test]
    fn the_sample_policy_parses() {
        let e = parse(qosloop_schema::SAMPLE_POLICY_LDIF).unwrap();
        assert_eq!(e.len(), 15);
        assert_eq!(e[0].dn, "dc=qosloop,dc=example");
    }
}
