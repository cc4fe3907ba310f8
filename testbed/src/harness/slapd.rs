// TEAM: read /work/TEAM.md now (rules, target dirs, commit policy, DEADLINE 10:35 UTC). Delete this line when you edit this file.
//! An ephemeral slapd (filled in by the LDAP work).

/// A running slapd; stopped and deleted on drop.
#[derive(Debug)]
pub struct Slapd {}
