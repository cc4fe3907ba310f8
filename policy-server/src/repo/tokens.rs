//! The HTTP API's bearer tokens held in the policy repository: entries of
//! object class `qosloopApiToken` (schema/ldap/qosloop.ldif), read with the
//! policy and again on every change, and published beside it for
//! [`crate::auth`].
//!
//! ```text
//! dn: cn=grafana,ou=tokens,dc=qosloop,dc=example
//! objectClass: qosloopApiToken
//! cn: grafana
//! qosloopTokenRole: read
//! qosloopTokenSHA256: <64 hex digits: printf %s TOKEN | sha256sum>
//! qosloopTokenScope: dst_addr = 203.0.113.0/24     (optional, read only)
//! ```
//!
//! An invalid entry is an error naming its DN and attribute (audited like
//! any policy entry) and is left out: unlike a policy object it does not
//! keep its last good version, so an edit that breaks a token revokes it
//! rather than leaving the old hash working.

use super::ldif::Entry;
use super::model::PolicyError;
use crate::auth::Role;
use qosloop_runtime::digest::parse_sha256_hex;

/// The object class of a token entry.
pub const TOKEN_CLASS: &str = "qosloopApiToken";

/// One valid token entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectoryToken {
    /// Where it came from (logs, the audit trail).
    pub dn: String,
    /// Its holder (`cn`; logs, never secret).
    pub name: String,
    pub role: Role,
    /// SHA-256 of the token.
    pub digest: [u8; 32],
    /// A filter expression added to every query of this token.
    pub scope: Option<String>,
}

fn one<'a>(e: &'a Entry, attribute: &str) -> Result<&'a str, PolicyError> {
    match e.get(attribute) {
        [v] if !v.trim().is_empty() => Ok(v.trim()),
        [] => Err(error(e, attribute, "missing")),
        [_] => Err(error(e, attribute, "empty")),
        _ => Err(error(e, attribute, "given more than once")),
    }
}

fn error(e: &Entry, attribute: &str, message: impl Into<String>) -> PolicyError {
    PolicyError {
        dn: e.dn.clone(),
        attribute: Some(attribute.to_owned()),
        message: message.into(),
    }
}

fn token(e: &Entry) -> Result<DirectoryToken, PolicyError> {
    let name = one(e, "cn")?.to_owned();
    let role = match one(e, "qosloopTokenRole")?.to_ascii_lowercase().as_str() {
        "read" => Role::Read,
        "admin" => Role::Admin,
        other => {
            return Err(error(
                e,
                "qosloopTokenRole",
                format!("{other:?}: read or admin"),
            ))
        }
    };
    let digest = parse_sha256_hex(one(e, "qosloopTokenSHA256")?)
        .ok_or_else(|| error(e, "qosloopTokenSHA256", "must be 64 hex digits"))?;
    let scope = match e.get("qosloopTokenScope") {
        [] => None,
        _ => Some(one(e, "qosloopTokenScope")?.to_owned()),
    };
    if let Some(scope) = &scope {
        if role == Role::Admin {
            return Err(error(
                e,
                "qosloopTokenScope",
                "an admin token cannot be scoped (it can change what every scope sees)",
            ));
        }
        crate::console::filter::parse(scope)
            .map_err(|why| error(e, "qosloopTokenScope", why.to_string()))?;
    }
    Ok(DirectoryToken {
        dn: e.dn.clone(),
        name,
        role,
        digest,
        scope,
    })
}

/// The valid token entries among `entries`, and the errors of the others.
/// Two entries with one hash are both refused (which of them a client
/// holds cannot be told).
pub(crate) fn tokens(entries: &[Entry]) -> (Vec<DirectoryToken>, Vec<PolicyError>) {
    let mut valid: Vec<DirectoryToken> = Vec::new();
    let mut errors = Vec::new();
    for e in entries.iter().filter(|e| e.has_class(TOKEN_CLASS)) {
        match token(e) {
            Ok(t) => valid.push(t),
            Err(err) => errors.push(err),
        }
    }
    let shared: Vec<[u8; 32]> = valid
        .iter()
        .enumerate()
        .filter(|(i, t)| valid[..*i].iter().any(|o| o.digest == t.digest))
        .map(|(_, t)| t.digest)
        .collect();
    valid.retain(|t| {
        let keep = !shared.contains(&t.digest);
        if !keep {
            errors.push(PolicyError {
                dn: t.dn.clone(),
                attribute: Some("qosloopTokenSHA256".into()),
                message: "the hash of another token entry: both refused".into(),
            });
        }
        keep
    });
    valid.sort_by(|a, b| a.dn.cmp(&b.dn));
    (valid, errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qosloop_runtime::digest::{hex, sha256};

    fn entry(cn: &str, role: &str, token: &str) -> Entry {
        Entry::new(format!("cn={cn},ou=tokens,dc=x"))
            .with("objectClass", "qosloopApiToken")
            .with("cn", cn)
            .with("qosloopTokenRole", role)
            .with("qosloopTokenSHA256", hex(&sha256(token.as_bytes())))
    }

    #[test]
    fn valid_entries_become_tokens_and_bad_ones_errors_naming_the_attribute() {
        let entries = [
            entry("grafana", "read", "a"),
            entry("ops", "Admin", "b"),
            entry("customer", "read", "c").with("qosloopTokenScope", "dst_addr = 10.9.0.0/16"),
            entry("typo", "reader", "d"),
            entry("short", "read", "e").with("qosloopTokenSHA256", "abc"),
            entry("boss", "admin", "f").with("qosloopTokenScope", "proto = udp"),
            entry("badscope", "read", "g").with("qosloopTokenScope", "dst_port = = 1"),
            Entry::new("cn=nocn,dc=x")
                .with("objectClass", "qosloopApiToken")
                .with("qosloopTokenRole", "read")
                .with("qosloopTokenSHA256", hex(&sha256(b"h"))),
            Entry::new("ou=tokens,dc=x").with("objectClass", "organizationalUnit"),
        ];
        let (valid, errors) = tokens(&entries);
        let names: Vec<_> = valid.iter().map(|t| (t.name.as_str(), t.role)).collect();
        assert_eq!(
            names,
            [
                ("customer", Role::Read),
                ("grafana", Role::Read),
                ("ops", Role::Admin)
            ]
        );
        assert_eq!(valid[0].digest, sha256(b"c"));
        let mut bad: Vec<_> = errors
            .iter()
            .map(|e| (e.dn.as_str(), e.attribute.as_deref().unwrap_or("")))
            .collect();
        bad.sort();
        assert_eq!(
            bad,
            [
                ("cn=badscope,ou=tokens,dc=x", "qosloopTokenScope"),
                ("cn=boss,ou=tokens,dc=x", "qosloopTokenScope"),
                ("cn=nocn,dc=x", "cn"),
                ("cn=short,ou=tokens,dc=x", "qosloopTokenSHA256"),
                ("cn=typo,ou=tokens,dc=x", "qosloopTokenRole"),
            ]
        );
    }

    #[test]
    fn two_entries_with_one_hash_are_both_refused() {
        let (valid, errors) = tokens(&[entry("a", "read", "same"), entry("b", "admin", "same")]);
        assert!(valid.is_empty());
        assert_eq!(errors.len(), 2);
    }
}
