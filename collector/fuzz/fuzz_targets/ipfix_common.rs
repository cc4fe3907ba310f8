// Each target uses part of this module.
#![allow(dead_code)]

//! What the stateless flow-protocol targets share: one message, its
//! version forced, through a UDP and a TCP decoder with small limits; the
//! decoder's bounds must hold afterwards.

use qosloop_collector::ipfix::{Decoder, Limits};
use std::net::SocketAddr;

pub fn small_limits() -> Limits {
    Limits {
        max_templates: 16,
        max_fields: 64,
        pending_sets: 8,
        pending_bytes: 16 << 10,
        pending_total_bytes: 64 << 10,
        max_exporters: 4,
        max_domains: 4,
        max_samplers: 8,
        max_totals: 64,
        ..Limits::default()
    }
}

/// Decodes `data` with its first two bytes set to `version`, as a datagram
/// from two sources and as a TCP message, then checks the bounds.
pub fn run(version: u16, data: &[u8]) {
    let mut msg = version.to_be_bytes().to_vec();
    msg.extend_from_slice(data.get(2..).unwrap_or_default());
    let limits = small_limits();
    let mut d = Decoder::new(limits.clone());
    let a: SocketAddr = "192.0.2.1:2055".parse().unwrap_or_else(|_| unreachable!());
    let b: SocketAddr = "192.0.2.2:2055".parse().unwrap_or_else(|_| unreachable!());
    let mut out = Vec::new();
    // Twice: the second time the message's templates are known.
    for from in [a, a, b] {
        if let Ok(m) = d.decode_udp(from, &msg, 1_000_000_000, &mut out) {
            assert!(m.len <= msg.len());
        }
    }
    let _ = d.decode_tcp(a, 1, &msg, 1_000_000_000, &mut out);
    d.sweep(2_000_000_000);
    for s in d.stats() {
        assert!(s.templates <= limits.max_templates);
        assert!(s.pending_sets <= limits.pending_sets);
    }
    // Every record came from bytes of the input: a record takes at least
    // one byte of a set (and a bidirectional one two records).
    assert!(out.len() <= 2 * 4 * msg.len());
    let _ = d.take_template_changes();
}
