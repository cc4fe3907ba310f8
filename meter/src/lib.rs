//! # qosloop-meter
//!
//! The meter of the qosloop loop: it measures traffic (pcap files or a live interface) into flow records.
//!
//! Not built yet: see its issue.
