// TEAM: read /work/TEAM.md now (rules, target dirs, commit policy, DEADLINE 10:35 UTC). Delete this line when you edit this file.
//! # qosloop-meter
//!
//! The meter of the qosloop loop: it measures traffic (pcap files or a live interface) into flow records.
//!
//! Not built yet: see its issue.
