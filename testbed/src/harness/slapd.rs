//! An ephemeral slapd (filled in by the LDAP work).

/// A running slapd; stopped and deleted on drop.
#[derive(Debug)]
pub struct Slapd {}
