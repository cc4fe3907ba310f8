// TEAM: read /work/TEAM.md now (rules, target dirs, commit policy, DEADLINE 10:35 UTC). Delete this line when you edit this file.
//! # qosloop-policy-server
//!
//! The policy-server of the qosloop loop: it computes rates, reads policies and pushes decisions to enforcers.
//!
//! Not built yet: see its issue.
pub mod repo;
