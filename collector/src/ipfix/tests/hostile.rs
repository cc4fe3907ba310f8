//! Regression tests for the attacker review of the IPFIX ingest: each
//! names the finding it pins.

use super::*;

/// Finding 4: a data template of one 1-byte non-flow field turned every
/// byte of a message into a record of 0.0.0.0.
#[test]
fn a_template_without_address_or_counter_is_refused() {
    let mut d = Decoder::new(Limits::default());
    let m = Msg::default()
        .set(2, &template(256, &[(4, 1)]))
        .set(256, &[6u8; 60_000])
        .ipfix(0, 1);
    let out = decode(&mut d, &m);
    assert!(out.is_empty(), "{} records from nothing", out.len());
    let c = domain_counters(&d);
    assert_eq!(c.dropped(DropReason::NoFlowFields), 1);
    // Restored from storage: refused the same way.
    assert!(!d.restore_template(from(), 1, 257, "ipfix data 0 4:1", T0));
}

/// Finding 4: one message produces at most `max_records_per_message`
/// records, however small its template's records are.
#[test]
fn one_message_yields_at_most_the_record_cap() {
    let mut d = Decoder::new(Limits::default());
    let mut data = Vec::new();
    for i in 0..12_000u32 {
        data.extend_from_slice(&(0x0a00_0000 | i).to_be_bytes());
        data.push(1);
    }
    let m = Msg::default()
        .set(2, &template(256, &[(8, 4), (2, 1)]))
        .set(256, &data)
        .ipfix(0, 1);
    let out = decode(&mut d, &m);
    assert_eq!(out.len(), Limits::default().max_records_per_message);
    assert_eq!(domain_counters(&d).dropped(DropReason::TooManyRecords), 1);
}

/// Finding 3: empty data sets for an unknown template were held at no
/// cost, so the byte budget never limited them.
#[test]
fn held_sets_are_charged_their_bookkeeping() {
    let limits = Limits {
        pending_total_bytes: 100 * crate::ipfix::PENDING_SET_OVERHEAD,
        ..Limits::default()
    };
    let mut d = Decoder::new(limits);
    let mut m = Msg::default();
    for _ in 0..1000 {
        m = m.set(300, &[]);
    }
    decode(&mut d, &m.ipfix(0, 1));
    let held: usize = d.stats().iter().map(|s| s.pending_sets).sum();
    assert!(held <= 100, "{held} empty sets held");
    assert!(domain_counters(&d).dropped(DropReason::PendingOverflow) >= 900);
}

fn totals_record(src: u32) -> Vec<u8> {
    let mut r = src.to_be_bytes().to_vec();
    r.extend_from_slice(&[10, 0, 0, 2]);
    r.extend_from_slice(&100u32.to_be_bytes());
    r
}

/// Finding 3: flows tracked for their totals were bounded per domain only;
/// now also over the whole decoder.
#[test]
fn totals_are_bounded_over_all_domains() {
    let limits = Limits {
        max_totals: 1000,
        max_totals_total: 100,
        ..Limits::default()
    };
    let mut d = Decoder::new(limits);
    for domain in 1..=2u32 {
        let data: Vec<u8> = (0..80u32)
            .flat_map(|i| totals_record(0x0a01_0000 | domain << 8 | i))
            .collect();
        let m = Msg::default()
            .set(2, &template(256, &[(8, 4), (12, 4), (86, 4)]))
            .set(256, &data)
            .ipfix(0, domain);
        assert_eq!(decode(&mut d, &m).len(), 80);
    }
    assert_eq!(domain_counters(&d).totals_untracked, 60);
}

/// Finding 3: template fields are bounded over the whole decoder, not only
/// per domain.
#[test]
fn template_fields_are_bounded_over_all_domains() {
    let limits = Limits {
        max_template_fields_total: 10,
        ..Limits::default()
    };
    let mut d = Decoder::new(limits);
    for domain in 1..=3u32 {
        let m = Msg::default()
            .set(2, &template(256, &[(8, 4), (12, 4), (1, 4), (2, 4)]))
            .ipfix(0, domain);
        decode(&mut d, &m);
    }
    let templates: usize = d.stats().iter().map(|s| s.templates).sum();
    assert_eq!(templates, 2);
    assert_eq!(domain_counters(&d).dropped(DropReason::TooManyTemplates), 1);
}

/// Finding 3: domains are bounded over the whole decoder; and the budgets
/// of a listener are split between its decoders.
#[test]
fn domains_are_bounded_over_all_exporters_and_budgets_are_shared() {
    let limits = Limits {
        max_domains_total: 3,
        ..Limits::default()
    };
    let mut d = Decoder::new(limits.clone());
    let mut refused = 0;
    for port in 0..2u16 {
        for domain in 0..2u32 {
            let m = Msg::default().ipfix(0, domain);
            let at = SocketAddr::new(from().ip(), 1000 + port);
            if d.decode_udp(at, &m, T0, &mut Vec::new()).is_err() {
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 1);
    let shared = Limits::default().share(4);
    assert_eq!(
        shared.max_template_fields_total,
        Limits::default().max_template_fields_total / 4
    );
    assert_eq!(
        shared.pending_total_bytes,
        Limits::default().pending_total_bytes / 4
    );
}

/// Finding 1: 4-byte junk from thousands of source ports created an
/// exporter (and SQL rows) each, before any header was checked.
#[test]
fn junk_creates_no_exporter_state() {
    let mut d = Decoder::new(Limits {
        max_exporters: 64,
        ..Limits::default()
    });
    for port in 0..4096u16 {
        let at = SocketAddr::new(from().ip(), port);
        assert!(d
            .decode_udp(at, &[0, 7, 0, 0], T0, &mut Vec::new())
            .is_err());
    }
    let stats = d.stats();
    assert_eq!(stats.len(), 1, "only the unattributed row");
    assert!(stats[0].exporter.addr.ip().is_unspecified());
    assert_eq!(stats[0].counters.dropped(DropReason::UnknownVersion), 4096);
}

/// Finding 1: valid but empty headers from many ports of one address hold
/// at most `max_exporters_per_addr` slots, and never a slot of an exporter
/// with templates; other addresses still get in.
#[test]
fn one_address_cannot_fill_the_exporter_table() {
    let limits = Limits {
        max_exporters: 40,
        max_exporters_per_addr: 8,
        ..Limits::default()
    };
    let mut d = Decoder::new(limits);
    let attacker: std::net::IpAddr = "198.51.100.7".parse().unwrap();
    // A real exporter from the same address, with a template.
    let real = SocketAddr::new(attacker, 2055);
    let t = Msg::default().set(2, &template(256, V4_FIELDS)).ipfix(0, 1);
    d.decode_udp(real, &t, T0, &mut Vec::new()).unwrap();
    for port in 0..4096u16 {
        let at = SocketAddr::new(attacker, 10_000 + port);
        let m = Msg::default().ipfix(0, 1);
        let _ = d.decode_udp(at, &m, T0 + u64::from(port), &mut Vec::new());
    }
    let tracked: std::collections::HashSet<_> = d.stats().iter().map(|s| s.exporter).collect();
    let of_attacker = tracked.iter().filter(|k| k.addr.ip() == attacker).count();
    assert!(of_attacker <= 8, "{of_attacker} exporters of one address");
    let data = Msg::default()
        .set(256, &v4_record([10, 0, 0, 1], 2, 1, 1))
        .ipfix(1, 1);
    let mut out = Vec::new();
    d.decode_udp(real, &data, T0 + 5000, &mut out).unwrap();
    assert_eq!(out.len(), 1, "the real exporter kept its template");
    let m = Msg::default().ipfix(0, 1);
    assert!(d.decode_udp(from(), &m, T0 + 5000, &mut Vec::new()).is_ok());
}

/// Finding 2: one datagram of thousands of alternating redefinitions of one
/// id made thousands of template writes; they are coalesced to one.
#[test]
fn redefinitions_of_one_id_are_one_change() {
    let mut d = Decoder::new(Limits::default());
    let mut body = Vec::new();
    for i in 0..8000u32 {
        let element = if i % 2 == 0 { 8 } else { 12 };
        body.extend_from_slice(&template(256, &[(element, 4)]));
    }
    decode(&mut d, &Msg::default().set(2, &body).ipfix(0, 1));
    assert_eq!(domain_counters(&d).templates_received, 8000);
    let changes = d.take_template_changes();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].definition.as_deref(), Some("ipfix data 0 12:4"));
}

/// Finding 9: an exporter forgotten by the sweep while it still held data
/// (pending age above the template expiry) kept its bytes charged to the
/// decoder-wide budget for ever.
#[test]
fn a_forgotten_exporter_gives_its_held_bytes_back() {
    let s = 1_000_000_000;
    let limits = Limits {
        pending_total_bytes: 200,
        pending_age_ns: 10_000 * s,
        template_expiry_ns: 10 * s,
        ..Limits::default()
    };
    let mut d = Decoder::new(limits);
    let m = Msg::default().set(300, &[0; 100]).ipfix(0, 1);
    let a: SocketAddr = "192.0.2.10:9".parse().unwrap();
    d.decode_udp(a, &m, T0, &mut Vec::new()).unwrap();
    d.sweep(T0 + 20 * s);
    assert!(d.stats().iter().all(|r| r.exporter.addr != a), "forgotten");
    d.decode_udp(from(), &m, T0 + 21 * s, &mut Vec::new())
        .unwrap();
    let held: usize = d.stats().iter().map(|r| r.pending_sets).sum();
    assert_eq!(held, 1);
    assert_eq!(domain_counters(&d).dropped(DropReason::PendingOverflow), 0);
}

/// Finding 10: on a dual-stack socket an allowed IPv4 exporter arrives as
/// an IPv4-mapped IPv6 address and was refused.
#[test]
fn the_allow_list_matches_ipv4_mapped_sources() {
    let limits = Limits {
        allow: Some([from().ip()].into_iter().collect()),
        ..Limits::default()
    };
    let mut d = Decoder::new(limits);
    let mapped: SocketAddr = "[::ffff:192.0.2.1]:40000".parse().unwrap();
    let m = Msg::default().ipfix(0, 1);
    assert!(d.decode_udp(mapped, &m, T0, &mut Vec::new()).is_ok());
    let other: SocketAddr = "[::ffff:192.0.2.2]:40000".parse().unwrap();
    assert_eq!(
        d.decode_udp(other, &m, T0, &mut Vec::new()),
        Err(DropReason::NotAllowed)
    );
}

/// Finding 10: over TCP a template id redefined with another layout and no
/// withdrawal was silently replaced; RFC 7011 §8.1 says reset the session.
#[test]
fn a_tcp_redefinition_without_withdrawal_ends_the_session() {
    let mut d = Decoder::new(Limits::default());
    let mut out = Vec::new();
    let t = Msg::default().set(2, &template(256, V4_FIELDS)).ipfix(0, 1);
    d.decode_tcp(from(), 1, &t, T0, &mut out).unwrap();
    // The same definition again is fine.
    d.decode_tcp(from(), 1, &t, T0, &mut out).unwrap();
    let other = Msg::default()
        .set(2, &template(256, &[(8, 4), (2, 4)]))
        .ipfix(0, 1);
    assert_eq!(
        d.decode_tcp(from(), 1, &other, T0, &mut out),
        Err(DropReason::TemplateRedefined)
    );
    // After a withdrawal the id may be redefined.
    let mut d = Decoder::new(Limits::default());
    d.decode_tcp(from(), 1, &t, T0, &mut out).unwrap();
    let w = Msg::default().set(2, &[1, 0, 0, 0]).ipfix(0, 1);
    d.decode_tcp(from(), 1, &w, T0, &mut out).unwrap();
    d.decode_tcp(from(), 1, &other, T0, &mut out).unwrap();
}

/// Finding 10: zero padding after records of variable-length fields only
/// was read as more (empty) records, which the sequence numbers then
/// counted.
#[test]
fn padding_after_variable_length_records_is_not_records() {
    let mut d = Decoder::new(Limits::default());
    // Options template 256: one scope field, variable length.
    let opt = [1, 0, 0, 1, 0, 1, 0, 149, 0xff, 0xff];
    // One record (length 1, one byte) and two bytes of padding.
    let m = Msg::default()
        .set(3, &opt)
        .set(256, &[1, 7, 0, 0])
        .ipfix(0, 1);
    decode(&mut d, &m);
    decode(&mut d, &Msg::default().ipfix(1, 1));
    let c = domain_counters(&d);
    assert_eq!((c.sequence_gaps, c.reordered), (0, 0));
}

/// Finding 3 (budgets) with finding 1 (churn): sources that come and go
/// from new ports give their domains back when evicted, so they cannot
/// use up the decoder-wide domain budget between two sweeps.
#[test]
fn evicted_exporters_give_their_domains_back_at_once() {
    let limits = Limits {
        max_exporters: 4,
        max_domains_total: 8,
        ..Limits::default()
    };
    let mut d = Decoder::new(limits);
    for port in 0..100u16 {
        let at = SocketAddr::new(format!("198.51.100.{}", port % 50).parse().unwrap(), port);
        let m = Msg::default().ipfix(0, 1);
        let _ = d.decode_udp(at, &m, T0 + u64::from(port), &mut Vec::new());
    }
    // No sweep ran: a real exporter's new domain still gets in.
    let m = Msg::default().set(2, &template(256, V4_FIELDS)).ipfix(0, 7);
    assert!(d.decode_udp(from(), &m, T0 + 1000, &mut Vec::new()).is_ok());
}
