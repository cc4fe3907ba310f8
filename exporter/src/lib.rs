//! # qosloop-exporter
//!
//! The export client of qosloop's CRANE-style protocol (DESIGN.md §4): it
//! negotiates a session and templates with a collector, sends records in
//! sequenced data messages, keeps the unacknowledged ones until the
//! collector has committed them, fails over between collectors by priority
//! and spools to disk while none answers. The meter feeds it in-process.
//!
//! Not built yet: see the issue "Reliable export".
