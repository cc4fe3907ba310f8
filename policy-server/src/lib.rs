//! # qosloop-policy-server
//!
//! The policy-server of the qosloop loop: it computes rates, reads policies and pushes decisions to enforcers.
//!
//! Not built yet: see its issue.
