//! # qosloop-enforcer
//!
//! The enforcer of the qosloop loop: it applies decisions in the Linux kernel (HTB, nftables).
//!
//! Not built yet: see its issue.
