//! The text form of a template in the `templates` table's `definition`
//! column: `ipfix|v9 data|options SCOPE_COUNT` followed by one
//! `ID:LEN[:PEN]` per field, space-separated. It is parsed back through the
//! same checks as a template from the wire.

use super::wire::{FieldSpec, TemplateDef, Version};

/// A template to store (`definition: Some`) or delete (`None`: withdrawn
/// or expired).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateChange {
    pub exporter: std::net::SocketAddr,
    pub version: Version,
    pub domain: u32,
    pub template_id: u16,
    pub definition: Option<String>,
    /// When it was defined or last refreshed (ns since the epoch).
    pub seen_ns: u64,
}

/// Formats `def` of `version`.
pub fn to_text(version: Version, def: &TemplateDef) -> String {
    let mut s = format!(
        "{} {} {}",
        if version == Version::V9 {
            "v9"
        } else {
            "ipfix"
        },
        if def.options { "options" } else { "data" },
        def.scope_count
    );
    for f in &def.fields {
        if f.enterprise == 0 {
            s.push_str(&format!(" {}:{}", f.id, f.len));
        } else {
            s.push_str(&format!(" {}:{}:{}", f.id, f.len, f.enterprise));
        }
    }
    s
}

/// Parses a stored definition of template `id`; `max_fields` bounds it like
/// a template from the wire.
pub fn from_text(id: u16, text: &str, max_fields: usize) -> Option<(Version, TemplateDef)> {
    let mut words = text.split_ascii_whitespace();
    let version = match words.next()? {
        "v9" => Version::V9,
        "ipfix" => Version::Ipfix,
        _ => return None,
    };
    let options = match words.next()? {
        "options" => true,
        "data" => false,
        _ => return None,
    };
    let scope_count: u16 = words.next()?.parse().ok()?;
    let mut fields = Vec::new();
    for w in words {
        if fields.len() >= max_fields {
            return None;
        }
        let mut parts = w.split(':');
        let fid: u16 = parts.next()?.parse().ok()?;
        let len: u16 = parts.next()?.parse().ok()?;
        let enterprise: u32 = match parts.next() {
            Some(p) => p.parse().ok()?,
            None => 0,
        };
        if parts.next().is_some() {
            return None;
        }
        fields.push(FieldSpec {
            id: fid,
            len,
            enterprise,
        });
    }
    if id < 256 || fields.is_empty() || usize::from(scope_count) > fields.len() {
        return None;
    }
    if options == (scope_count == 0) {
        return None;
    }
    Some((
        version,
        TemplateDef {
            id,
            scope_count,
            options,
            fields,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn definitions_round_trip(
            id in 256u16..,
            options: bool,
            v9: bool,
            fields in prop::collection::vec((any::<u16>(), any::<u16>(), prop_oneof![Just(0u32), any::<u32>()]), 1..40),
        ) {
            let version = if v9 { Version::V9 } else { Version::Ipfix };
            let def = TemplateDef {
                id,
                scope_count: u16::from(options),
                options,
                fields: fields.into_iter().map(|(id, len, enterprise)| FieldSpec { id, len, enterprise }).collect(),
            };
            let text = to_text(version, &def);
            prop_assert_eq!(from_text(id, &text, 64), Some((version, def)));
        }

        #[test]
        fn junk_never_panics(text in ".{0,200}") {
            let _ = from_text(300, &text, 64);
        }
    }
}
