//! Static user ↔ address mappings held in the policy repository: entries
//! of object class `qosloopUserMapping` (schema/ldap/qosloop.ldif), read
//! with the policy and again on every change, and published beside it for
//! the knowledge base ([`crate::kb_static`] writes them to `kb_mappings`
//! as source `ldap`, docs/kb.md).
//!
//! ```text
//! dn: cn=alice-desk,ou=mappings,dc=qosloop,dc=example
//! objectClass: qosloopUserMapping
//! cn: alice-desk
//! qosloopMappedUser: alice
//! qosloopUserAddress: 10.0.0.7
//! qosloopUserAddress: 2001:db8::7
//! ```
//!
//! An invalid entry is an error naming its DN and attribute (audited, and
//! `--check` fails) and binds nothing: like a token, it does not keep its
//! last good version, so a broken edit unbinds rather than leaving a stale
//! address bound to the user.

use super::ldif::Entry;
use super::model::{valid_user, PolicyError};
use std::collections::BTreeSet;
use std::net::IpAddr;

/// The object class of a mapping entry.
pub const MAPPING_CLASS: &str = "qosloopUserMapping";

/// Most addresses one entry may bind.
pub const MAX_ADDRESSES_PER_ENTRY: usize = 1024;

/// Most mappings the repository may hold in all (bounds what one reload
/// writes to the database).
pub const MAX_MAPPINGS: usize = 65_536;

/// One static binding: an address and the user it belongs to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StaticMapping {
    pub addr: IpAddr,
    pub user: String,
}

fn error(e: &Entry, attribute: &str, message: impl Into<String>) -> PolicyError {
    PolicyError {
        dn: e.dn.clone(),
        attribute: Some(attribute.to_owned()),
        message: message.into(),
    }
}

fn mapping(e: &Entry) -> Result<Vec<StaticMapping>, PolicyError> {
    let user = match e.get("qosloopMappedUser") {
        [one] => one.trim(),
        [] => return Err(error(e, "qosloopMappedUser", "is required")),
        many => {
            return Err(error(
                e,
                "qosloopMappedUser",
                format!("is single-valued but has {} values", many.len()),
            ))
        }
    };
    valid_user(user).map_err(|why| error(e, "qosloopMappedUser", why))?;
    let given = e.get("qosloopUserAddress");
    if given.is_empty() {
        return Err(error(e, "qosloopUserAddress", "is required"));
    }
    if given.len() > MAX_ADDRESSES_PER_ENTRY {
        return Err(error(
            e,
            "qosloopUserAddress",
            format!(
                "{} values: at most {MAX_ADDRESSES_PER_ENTRY} per entry",
                given.len()
            ),
        ));
    }
    given
        .iter()
        .map(|v| {
            let v = v.trim();
            v.parse::<IpAddr>()
                .map(|addr| StaticMapping {
                    addr,
                    user: user.to_owned(),
                })
                .map_err(|_| {
                    error(
                        e,
                        "qosloopUserAddress",
                        format!("{v:?}: expected an IPv4 or IPv6 address (no prefix length)"),
                    )
                })
        })
        .collect()
}

/// The mappings of the valid `qosloopUserMapping` entries among `entries`
/// (sorted, each once), and the errors of the others.
pub(crate) fn mappings(entries: &[Entry]) -> (Vec<StaticMapping>, Vec<PolicyError>) {
    let mut valid: BTreeSet<StaticMapping> = BTreeSet::new();
    let mut errors = Vec::new();
    for e in entries.iter().filter(|e| e.has_class(MAPPING_CLASS)) {
        match mapping(e) {
            Ok(m) if valid.len() + m.len() > MAX_MAPPINGS => errors.push(error(
                e,
                "qosloopUserAddress",
                format!(
                    "more than {MAX_MAPPINGS} mappings in the repository: this entry is left out"
                ),
            )),
            Ok(m) => valid.extend(m),
            Err(err) => errors.push(err),
        }
    }
    (valid.into_iter().collect(), errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::ldif;

    fn entry(cn: &str, user: &str, addrs: &[&str]) -> Entry {
        let mut e = Entry::new(format!("cn={cn},ou=mappings,dc=x"))
            .with("objectClass", MAPPING_CLASS)
            .with("cn", cn)
            .with("qosloopMappedUser", user);
        for a in addrs {
            e = e.with("qosloopUserAddress", *a);
        }
        e
    }

    #[test]
    fn valid_entries_bind_each_address_and_bad_ones_name_the_attribute() {
        let entries = [
            entry("a", "alice", &["10.0.0.7", " 2001:db8::7 "]),
            entry("b", "bob", &["10.0.0.8", "10.0.0.0/24"]),
            entry("c", "", &["10.0.0.9"]),
            entry("d", "dave", &[]),
            entry("e", "alice", &["10.0.0.7"]),
        ];
        let (valid, errors) = mappings(&entries);
        let pairs: Vec<(String, &str)> = valid
            .iter()
            .map(|m| (m.addr.to_string(), m.user.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("10.0.0.7".to_string(), "alice"),
                ("2001:db8::7".to_string(), "alice"),
            ]
        );
        let named: Vec<(&str, &str)> = errors
            .iter()
            .map(|e| (e.dn.as_str(), e.attribute.as_deref().unwrap()))
            .collect();
        assert_eq!(
            named,
            [
                ("cn=b,ou=mappings,dc=x", "qosloopUserAddress"),
                ("cn=c,ou=mappings,dc=x", "qosloopMappedUser"),
                ("cn=d,ou=mappings,dc=x", "qosloopUserAddress"),
            ]
        );
        assert!(
            errors[0].message.contains("10.0.0.0/24"),
            "{}",
            errors[0].message
        );
    }

    #[test]
    fn the_per_user_sample_maps_alice_and_bob() {
        let entries = ldif::parse(qosloop_schema::SAMPLE_PER_USER_LDIF).unwrap();
        let (valid, errors) = mappings(&entries);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(valid
            .iter()
            .any(|m| m.user == "alice" && m.addr.to_string() == "192.0.2.10"));
        assert!(valid.iter().any(|m| m.user == "bob"));
    }

    #[test]
    fn check_fails_on_an_invalid_mapping_naming_dn_and_attribute() {
        let mut entries = ldif::parse(qosloop_schema::SAMPLE_PER_USER_LDIF).unwrap();
        assert!(crate::repo::build_strict(&entries).is_ok());
        entries.push(entry("x", "eve", &["not-an-address"]));
        entries.push(entry("y", "eve", &["10.0.0.1"]).with("qosloopUserAdress", "10.0.0.2"));
        let errors = crate::repo::build_strict(&entries).unwrap_err().0;
        let named: Vec<(&str, &str)> = errors
            .iter()
            .map(|e| (e.dn.as_str(), e.attribute.as_deref().unwrap_or("")))
            .collect();
        assert_eq!(
            named,
            [
                ("cn=x,ou=mappings,dc=x", "qosloopUserAddress"),
                ("cn=y,ou=mappings,dc=x", "qosloopUserAdress"),
            ]
        );
    }
}
