//! Decoder tests over messages built byte by byte: the cases of RFC 7011
//! and RFC 3954 the collector must handle, and the bad input of issue 13.

use super::*;
use proptest::prelude::*;
use qosloop_schema::FlowRecord;
use std::net::SocketAddr;

const T0: u64 = 1_700_000_000 * 1_000_000_000;

fn from() -> SocketAddr {
    "192.0.2.1:40000".parse().unwrap()
}

/// Builds IPFIX and v9 messages.
#[derive(Default)]
struct Msg {
    sets: Vec<u8>,
}

impl Msg {
    fn set(mut self, id: u16, body: &[u8]) -> Self {
        self.sets.extend_from_slice(&id.to_be_bytes());
        self.sets
            .extend_from_slice(&((body.len() + 4) as u16).to_be_bytes());
        self.sets.extend_from_slice(body);
        self
    }
    fn ipfix(&self, seq: u32, domain: u32) -> Vec<u8> {
        let mut m = vec![0, 10];
        m.extend_from_slice(&((self.sets.len() + 16) as u16).to_be_bytes());
        m.extend_from_slice(&1_700_000_000u32.to_be_bytes());
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(&domain.to_be_bytes());
        m.extend_from_slice(&self.sets);
        m
    }
    fn v9(&self, seq: u32, source: u32, uptime_ms: u32) -> Vec<u8> {
        let mut m = vec![0, 9, 0, 1];
        m.extend_from_slice(&uptime_ms.to_be_bytes());
        m.extend_from_slice(&1_700_000_000u32.to_be_bytes());
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(&source.to_be_bytes());
        m.extend_from_slice(&self.sets);
        m
    }
}

/// A template record: id and (element, length) pairs.
fn template(id: u16, fields: &[(u16, u16)]) -> Vec<u8> {
    let mut b = id.to_be_bytes().to_vec();
    b.extend_from_slice(&(fields.len() as u16).to_be_bytes());
    for (f, l) in fields {
        b.extend_from_slice(&f.to_be_bytes());
        b.extend_from_slice(&l.to_be_bytes());
    }
    b
}

const V4_FIELDS: &[(u16, u16)] = &[
    (8, 4),
    (12, 4),
    (7, 2),
    (11, 2),
    (4, 1),
    (2, 4),
    (1, 8),
    (152, 8),
    (153, 8),
];

fn v4_record(src: [u8; 4], sport: u16, packets: u32, bytes: u64) -> Vec<u8> {
    let mut r = src.to_vec();
    r.extend_from_slice(&[10, 0, 0, 2]);
    r.extend_from_slice(&sport.to_be_bytes());
    r.extend_from_slice(&80u16.to_be_bytes());
    r.push(6);
    r.extend_from_slice(&packets.to_be_bytes());
    r.extend_from_slice(&bytes.to_be_bytes());
    r.extend_from_slice(&1_700_000_000_000u64.to_be_bytes());
    r.extend_from_slice(&1_700_000_000_500u64.to_be_bytes());
    r
}

fn decode(d: &mut Decoder, m: &[u8]) -> Vec<FlowRecord> {
    let mut out = Vec::new();
    let _ = d.decode_udp(from(), m, T0, &mut out);
    out
}

fn domain_counters(d: &Decoder) -> Counters {
    let mut c = Counters::default();
    for s in d.stats() {
        c.add(&s.counters);
    }
    c
}

#[test]
fn ipfix_template_then_data() {
    let mut d = Decoder::new(Limits::default());
    let m = Msg::default()
        .set(2, &template(256, V4_FIELDS))
        .set(
            256,
            &[
                v4_record([10, 0, 0, 1], 1000, 3, 180),
                v4_record([10, 0, 0, 3], 1001, 1, 60),
            ]
            .concat(),
        )
        .ipfix(0, 7);
    let mut out = Vec::new();
    let msg = d.decode_udp(from(), &m, T0, &mut out).unwrap();
    assert_eq!(
        (msg.records, msg.domain, msg.version),
        (2, 7, Version::Ipfix)
    );
    let r = &out[0];
    assert_eq!(r.src_addr.to_string(), "10.0.0.1");
    assert_eq!(
        (r.src_port, r.dst_port, r.proto, r.packets, r.bytes),
        (1000, 80, 6, 3, 180)
    );
    assert_eq!(r.start_ns, 1_700_000_000_000 * 1_000_000);
    assert_eq!(r.end_ns, 1_700_000_000_500 * 1_000_000);
    let changes = d.take_template_changes();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].template_id, 256);
}

#[test]
fn data_before_its_template_waits_and_is_decoded_when_it_comes() {
    let mut d = Decoder::new(Limits::default());
    let data = Msg::default()
        .set(256, &v4_record([10, 0, 0, 1], 1000, 3, 180))
        .ipfix(0, 1);
    assert!(decode(&mut d, &data).is_empty());
    let tmpl = Msg::default().set(2, &template(256, V4_FIELDS)).ipfix(1, 1);
    let out = decode(&mut d, &tmpl);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].packets, 3);
    // A template of another domain does not release it.
    let mut d = Decoder::new(Limits::default());
    decode(&mut d, &data);
    let other = Msg::default().set(2, &template(256, V4_FIELDS)).ipfix(0, 2);
    assert!(decode(&mut d, &other).is_empty());
}

#[test]
fn pending_buffer_overflow_and_age_are_counted() {
    let limits = Limits {
        pending_sets: 2,
        pending_age_ns: 1_000,
        ..Limits::default()
    };
    let mut d = Decoder::new(limits);
    for seq in 0..5 {
        let m = Msg::default()
            .set(300, &v4_record([10, 0, 0, 1], 1, 1, 1))
            .ipfix(seq, 1);
        decode(&mut d, &m);
    }
    assert_eq!(domain_counters(&d).dropped(DropReason::PendingOverflow), 3);
    d.sweep(T0 + 2_000);
    assert_eq!(domain_counters(&d).dropped(DropReason::PendingExpired), 2);
    // Nothing left to release.
    let t = Msg::default().set(2, &template(300, V4_FIELDS)).ipfix(5, 1);
    assert!(decode(&mut d, &t).is_empty());
}

#[test]
fn redefinition_replaces_and_udp_templates_expire() {
    let limits = Limits {
        template_expiry_ns: 10,
        ..Limits::default()
    };
    let mut d = Decoder::new(limits);
    let t1 = Msg::default().set(2, &template(256, V4_FIELDS)).ipfix(0, 1);
    decode(&mut d, &t1);
    // Redefined as (sourceIPv4Address, packetDeltaCount) only.
    let t2 = Msg::default()
        .set(2, &template(256, &[(8, 4), (2, 4)]))
        .set(256, &[10, 9, 9, 9, 0, 0, 0, 42])
        .ipfix(0, 1);
    let out = decode(&mut d, &t2);
    assert_eq!(out.len(), 1);
    assert_eq!(
        (out[0].src_addr.to_string().as_str(), out[0].packets),
        ("10.9.9.9", 42)
    );
    // Past the expiry the template is gone: data waits again.
    let data = Msg::default()
        .set(256, &[10, 9, 9, 9, 0, 0, 0, 1])
        .ipfix(1, 1);
    let mut out = Vec::new();
    d.decode_udp(from(), &data, T0 + 100, &mut out).unwrap();
    assert!(out.is_empty());
    let gone = d.take_template_changes();
    assert!(gone
        .iter()
        .any(|c| c.template_id == 256 && c.definition.is_none()));
}

#[test]
fn tcp_withdrawal_is_honoured_and_templates_die_with_the_session() {
    let mut d = Decoder::new(Limits::default());
    let mut out = Vec::new();
    let t = Msg::default()
        .set(2, &template(256, &[(8, 4), (2, 4)]))
        .set(2, &template(257, &[(8, 4), (1, 4)]))
        .ipfix(0, 1);
    d.decode_tcp(from(), 1, &t, T0, &mut out).unwrap();
    let w = Msg::default()
        .set(2, &[1, 0, 0, 0])
        .set(257, &[1, 1, 1, 1, 0, 0, 0, 5])
        .ipfix(0, 1);
    d.decode_tcp(from(), 1, &w, T0, &mut out).unwrap();
    assert_eq!(out.len(), 1, "257 still decodes");
    let data = Msg::default()
        .set(256, &[1, 1, 1, 1, 0, 0, 0, 5])
        .ipfix(1, 1);
    d.decode_tcp(from(), 1, &data, T0, &mut out).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(
        domain_counters(&d).dropped(DropReason::TemplateWithdrawn),
        1
    );
    // Withdraw all (set id 2, template id 2).
    let all = Msg::default()
        .set(2, &[0, 2, 0, 0])
        .set(257, &[1, 1, 1, 1, 0, 0, 0, 5])
        .ipfix(2, 1);
    d.decode_tcp(from(), 1, &all, T0, &mut out).unwrap();
    assert_eq!(out.len(), 1);
    // The session ends: another session of the same address knows nothing.
    d.decode_tcp(from(), 1, &t, T0, &mut out).unwrap();
    d.close_session(from(), 1);
    let data = Msg::default()
        .set(257, &[1, 1, 1, 1, 0, 0, 0, 5])
        .ipfix(0, 1);
    d.decode_tcp(from(), 2, &data, T0, &mut out).unwrap();
    assert_eq!(out.len(), 1);
    // Over UDP a withdrawal is refused and counted.
    let mut u = Decoder::new(Limits::default());
    decode(&mut u, &t);
    decode(&mut u, &Msg::default().set(2, &[1, 0, 0, 0]).ipfix(1, 1));
    assert_eq!(
        domain_counters(&u).dropped(DropReason::WithdrawalOverUdp),
        1
    );
}

#[test]
fn v9_uptime_times_icmp_and_options_sampling() {
    let mut d = Decoder::new(Limits::default());
    // Options template 300: scope system (1, 4 bytes); samplingInterval 34.
    let opt = [&[1u8, 44, 0, 4, 0, 4, 0, 1, 0, 4, 0, 34, 0, 4][..], &[0, 0]].concat();
    let t = template(
        256,
        &[
            (8, 4),
            (12, 4),
            (4, 1),
            (32, 2),
            (2, 4),
            (1, 4),
            (22, 4),
            (21, 4),
            (5, 1),
        ],
    );
    let mut rec = vec![10, 0, 0, 1, 10, 0, 0, 2, 1, 8, 0, 0, 0, 0, 2, 0, 0, 0, 168];
    rec.extend_from_slice(&4_000u32.to_be_bytes());
    rec.extend_from_slice(&9_000u32.to_be_bytes());
    rec.push(0xb8); // ToS of DSCP 46
    let m = Msg::default()
        .set(0, &t)
        .set(1, &opt)
        .set(300, &[0, 0, 0, 0, 0, 0, 0, 100])
        .set(256, &rec)
        .v9(0, 5, 10_000);
    let out = decode(&mut d, &m);
    assert_eq!(out.len(), 1);
    let r = &out[0];
    assert_eq!((r.proto, r.src_port, r.dst_port), (1, 0, 8 * 256));
    assert_eq!((r.packets, r.bytes, r.dscp), (2, 168, Some(46)));
    assert_eq!(r.sampling_interval, Some(100));
    // Boot at 1_700_000_000 s - 10 s.
    assert_eq!(r.start_ns, (1_700_000_000_000 - 10_000 + 4_000) * 1_000_000);
    assert_eq!(r.end_ns, (1_700_000_000_000 - 10_000 + 9_000) * 1_000_000);
}

#[test]
fn ipfix_uptime_times_need_system_init_time_and_samplers_are_keyed() {
    let mut d = Decoder::new(Limits::default());
    // Options 400: scope meteringProcessId 143; 160, 302, 305, 306.
    let mut opt = vec![1, 144, 0, 5, 0, 1];
    for (f, l) in [(143u16, 4u16), (160, 8), (302, 4), (305, 4), (306, 4)] {
        opt.extend_from_slice(&f.to_be_bytes());
        opt.extend_from_slice(&l.to_be_bytes());
    }
    let mut odata = vec![0, 0, 0, 1];
    odata.extend_from_slice(&1_600_000_000_000u64.to_be_bytes());
    odata.extend_from_slice(&[0, 0, 0, 9, 0, 0, 0, 1, 0, 0, 0, 9]);
    let t = template(256, &[(8, 4), (22, 4), (21, 4), (302, 4), (2, 4)]);
    let mut rec = vec![10, 0, 0, 1];
    rec.extend_from_slice(&1_000u32.to_be_bytes());
    rec.extend_from_slice(&2_000u32.to_be_bytes());
    rec.extend_from_slice(&[0, 0, 0, 9, 0, 0, 0, 4]);
    let m = Msg::default()
        .set(3, &opt)
        .set(400, &odata)
        .set(2, &t)
        .set(256, &rec)
        .ipfix(0, 1);
    let out = decode(&mut d, &m);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].start_ns, 1_600_000_001_000 * 1_000_000);
    assert_eq!(out[0].end_ns, 1_600_000_002_000 * 1_000_000);
    assert_eq!(out[0].sampling_interval, Some(10));
}

#[test]
fn v5_records_with_header_sampling() {
    let mut d = Decoder::new(Limits::default());
    let mut m = vec![0, 5, 0, 1];
    m.extend_from_slice(&10_000u32.to_be_bytes());
    m.extend_from_slice(&1_700_000_000u32.to_be_bytes());
    m.extend_from_slice(&0u32.to_be_bytes());
    m.extend_from_slice(&77u32.to_be_bytes());
    m.extend_from_slice(&[1, 2]); // engine type 1, id 2
    m.extend_from_slice(&(0x4000u16 | 64).to_be_bytes());
    let mut r = vec![10, 0, 0, 1, 10, 0, 0, 2, 0, 0, 0, 0, 0, 1, 0, 2];
    r.extend_from_slice(&5u32.to_be_bytes());
    r.extend_from_slice(&500u32.to_be_bytes());
    r.extend_from_slice(&1_000u32.to_be_bytes());
    r.extend_from_slice(&2_000u32.to_be_bytes());
    r.extend_from_slice(&[0, 53, 0, 53, 0, 0x12, 17, 0]);
    r.extend_from_slice(&[0; 8]);
    assert_eq!(r.len(), 48);
    m.extend_from_slice(&r);
    let mut out = Vec::new();
    let msg = d.decode_udp(from(), &m, T0, &mut out).unwrap();
    assert_eq!((msg.domain, msg.sequence), (0x0102, 77));
    assert_eq!((out[0].packets, out[0].bytes, out[0].proto), (5, 500, 17));
    assert_eq!(out[0].sampling_interval, Some(64));
    assert_eq!(
        out[0].start_ns,
        (1_700_000_000_000 - 10_000 + 1_000) * 1_000_000
    );
    // A count past the datagram is refused.
    m[3] = 2;
    assert_eq!(
        d.decode_udp(from(), &m, T0, &mut out),
        Err(DropReason::BadRecordCount)
    );
}

#[test]
fn enterprise_fields_and_variable_lengths() {
    let mut d = Decoder::new(Limits::default());
    // 8 (4), PEN 9 id 1 (var), qosloop class (var), process (var), userName(var), 2 (4)
    let mut t = vec![1, 0, 0, 6, 0, 8, 0, 4];
    t.extend_from_slice(&[0x80, 1, 0xff, 0xff, 0, 0, 0, 9]);
    t.extend_from_slice(&[0x80, 3, 0xff, 0xff, 0, 0, 0x7e, 0xd9]);
    t.extend_from_slice(&[0x80, 2, 0xff, 0xff, 0, 0, 0x7e, 0xd9]);
    t.extend_from_slice(&[1, 115, 0xff, 0xff]);
    t.extend_from_slice(&[0, 2, 0, 4]);
    let mut rec = vec![10, 0, 0, 1];
    rec.extend_from_slice(&[255, 0, 3, 1, 2, 3]); // 3-byte length prefix
    rec.extend_from_slice(&[3, b'w', b'e', b'b']);
    rec.extend_from_slice(&[4, b'c', b'u', b'r', b'l']);
    rec.extend_from_slice(&[0]);
    rec.extend_from_slice(&[0, 0, 0, 7]);
    let m = Msg::default().set(2, &t).set(256, &rec).ipfix(0, 1);
    let out = decode(&mut d, &m);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].class.as_deref(), Some("web"));
    assert_eq!(out[0].process.as_deref(), Some("curl"));
    assert_eq!(out[0].user, None);
    assert_eq!(out[0].packets, 7);
    // A variable-length field longer than the set.
    let mut bad = rec.clone();
    bad[4] = 200;
    let m = Msg::default().set(256, &bad).ipfix(1, 1);
    assert!(decode(&mut d, &m).is_empty());
    assert_eq!(domain_counters(&d).dropped(DropReason::VarLenOverrun), 1);
}

#[test]
fn sequence_gaps_are_counted_per_domain() {
    let mut d = Decoder::new(Limits::default());
    let t = Msg::default()
        .set(2, &template(256, &[(8, 4), (2, 4)]))
        .ipfix(0, 1);
    decode(&mut d, &t);
    let data = |seq| {
        Msg::default()
            .set(256, &[1, 1, 1, 1, 0, 0, 0, 1])
            .ipfix(seq, 1)
    };
    decode(&mut d, &data(0));
    decode(&mut d, &data(1));
    decode(&mut d, &data(5)); // 2, 3, 4 lost
    decode(
        &mut d,
        &Msg::default()
            .set(256, &[1, 1, 1, 1, 0, 0, 0, 1])
            .ipfix(7, 2),
    );
    let c = domain_counters(&d);
    assert_eq!(c.sequence_gaps, 3);
    decode(&mut d, &data(3)); // late
    assert_eq!(domain_counters(&d).sequence_gaps, 2);
}

#[test]
fn bad_headers_unknown_versions_and_allow_list() {
    let mut d = Decoder::new(Limits::default());
    let mut out = Vec::new();
    assert_eq!(
        d.decode_udp(from(), &[0], T0, &mut out),
        Err(DropReason::ShortHeader)
    );
    assert_eq!(
        d.decode_udp(from(), &[0, 7, 0, 0], T0, &mut out),
        Err(DropReason::UnknownVersion)
    );
    let mut m = Msg::default().ipfix(0, 1);
    m[3] = 200;
    assert_eq!(
        d.decode_udp(from(), &m, T0, &mut out),
        Err(DropReason::BadMessageLength)
    );
    let c = domain_counters(&d);
    assert_eq!(
        (
            c.dropped(DropReason::ShortHeader),
            c.dropped(DropReason::UnknownVersion),
            c.dropped(DropReason::BadMessageLength)
        ),
        (1, 1, 1)
    );
    let mut d = Decoder::new(Limits {
        allow: Some(["192.0.2.9".parse().unwrap()].into_iter().collect()),
        ..Limits::default()
    });
    let m = Msg::default().ipfix(0, 1);
    assert_eq!(
        d.decode_udp(from(), &m, T0, &mut out),
        Err(DropReason::NotAllowed)
    );
    assert_eq!(domain_counters(&d).dropped(DropReason::NotAllowed), 1);
}

#[test]
fn bad_sets_and_templates_are_counted() {
    let mut d = Decoder::new(Limits::default());
    // A set length past the message.
    let mut m = Msg::default().set(256, &[0; 8]).ipfix(0, 1);
    m[19] = 40;
    decode(&mut d, &m);
    // A field count overrunning the set; a zero-length field record; an
    // IPv4 address of 3 bytes; an options template without scope; a
    // template id under 256.
    let m = Msg::default()
        .set(2, &[1, 0, 0, 50, 0, 8, 0, 4])
        .set(2, &template(257, &[(999, 0)]))
        .set(2, &template(258, &[(8, 3)]))
        .set(3, &[1, 3, 0, 1, 0, 0, 0, 2, 0, 4])
        .set(2, &template(7, &[(8, 4)]))
        .ipfix(0, 1);
    decode(&mut d, &m);
    let c = domain_counters(&d);
    for (reason, n) in [
        (DropReason::BadSetLength, 1),
        (DropReason::FieldCountOverrun, 1),
        (DropReason::ZeroLengthRecord, 1),
        (DropReason::BadFieldLength, 1),
        (DropReason::OptionsWithoutScope, 1),
        (DropReason::BadTemplateId, 1),
    ] {
        assert_eq!(c.dropped(reason), n, "{reason}");
    }
    assert!(d.stats().iter().all(|s| s.templates == 0));
}

#[test]
fn limits_bound_templates_and_exporters() {
    let mut d = Decoder::new(Limits {
        max_templates: 2,
        max_exporters: 1,
        ..Limits::default()
    });
    let m = Msg::default()
        .set(
            2,
            &[
                template(256, &[(8, 4)]),
                template(257, &[(8, 4)]),
                template(258, &[(8, 4)]),
            ]
            .concat(),
        )
        .ipfix(0, 1);
    decode(&mut d, &m);
    assert_eq!(domain_counters(&d).dropped(DropReason::TooManyTemplates), 1);
    let mut out = Vec::new();
    let other: SocketAddr = "192.0.2.2:1".parse().unwrap();
    assert_eq!(
        d.decode_udp(other, &m, T0, &mut out),
        Err(DropReason::TooManyExporters)
    );
}

#[test]
fn garbage_senders_cannot_keep_exporters_out() {
    let mut d = Decoder::new(Limits {
        max_exporters: 2,
        ..Limits::default()
    });
    let mut out = Vec::new();
    // Two sources of garbage fill the table.
    for i in 1..=2u8 {
        let g: SocketAddr = format!("198.51.100.{i}:9").parse().unwrap();
        let _ = d.decode_udp(g, &[0, 7, 0, 0], T0 + u64::from(i), &mut out);
    }
    // A real exporter still gets in (the oldest garbage source goes) and
    // keeps its templates when more garbage arrives.
    let m = Msg::default()
        .set(2, &template(256, V4_FIELDS))
        .set(256, &v4_record([10, 0, 0, 1], 1, 1, 1))
        .ipfix(0, 1);
    assert!(d.decode_udp(from(), &m, T0 + 10, &mut out).is_ok());
    for i in 3..=6u8 {
        let g: SocketAddr = format!("198.51.100.{i}:9").parse().unwrap();
        let _ = d.decode_udp(g, &[0, 7, 0, 0], T0 + 10 + u64::from(i), &mut out);
    }
    let data = Msg::default()
        .set(256, &v4_record([10, 0, 0, 1], 2, 1, 1))
        .ipfix(1, 1);
    out.clear();
    d.decode_udp(from(), &data, T0 + 20, &mut out).unwrap();
    assert_eq!(out.len(), 1, "its template survived");
    // Every garbage datagram is still counted somewhere.
    assert_eq!(domain_counters(&d).dropped(DropReason::UnknownVersion), 6);
}

#[test]
fn restored_templates_decode_at_once() {
    let mut d = Decoder::new(Limits::default());
    let t = Msg::default().set(2, &template(256, V4_FIELDS)).ipfix(0, 3);
    decode(&mut d, &t);
    let change = d.take_template_changes().pop().unwrap();
    let mut fresh = Decoder::new(Limits::default());
    assert!(fresh.restore_template(
        change.exporter,
        change.domain,
        change.template_id,
        change.definition.as_deref().unwrap(),
        T0
    ));
    let data = Msg::default()
        .set(256, &v4_record([10, 0, 0, 1], 1, 2, 3))
        .ipfix(0, 3);
    assert_eq!(decode(&mut fresh, &data).len(), 1);
}

/// A message of arbitrary sets after a valid header.
fn arb_message() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![Just(5u16), Just(9u16), Just(10u16), any::<u16>()],
        prop::collection::vec(
            (
                prop_oneof![0u16..4, 256u16..260],
                prop::collection::vec(any::<u8>(), 0..64),
            ),
            0..6,
        ),
        any::<bool>(),
    )
        .prop_map(|(version, sets, fix_len)| {
            let mut body = Vec::new();
            for (id, b) in sets {
                body.extend_from_slice(&id.to_be_bytes());
                body.extend_from_slice(&((b.len() + 4) as u16).to_be_bytes());
                body.extend_from_slice(&b);
            }
            let mut m = version.to_be_bytes().to_vec();
            let len = if fix_len { body.len() + 16 } else { body.len() };
            m.extend_from_slice(&(len as u16).to_be_bytes());
            m.extend_from_slice(&[0; 12]);
            if version == 9 {
                m.extend_from_slice(&[0; 4]);
            }
            m.extend_from_slice(&body);
            m
        })
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let mut d = Decoder::new(Limits::default());
        let mut out = Vec::new();
        let _ = d.decode_udp(from(), &bytes, T0, &mut out);
        let _ = d.decode_tcp(from(), 1, &bytes, T0, &mut out);
        d.sweep(T0 + 1);
    }

    #[test]
    fn arbitrary_sets_never_panic_and_stay_bounded(msgs in prop::collection::vec(arb_message(), 1..12)) {
        let limits = Limits { pending_sets: 4, pending_bytes: 256, max_templates: 8, ..Limits::default() };
        let mut d = Decoder::new(limits);
        let mut out = Vec::new();
        for m in &msgs {
            let _ = d.decode_udp(from(), m, T0, &mut out);
        }
        for s in d.stats() {
            prop_assert!(s.pending_sets <= 4);
            prop_assert!(s.templates <= 8);
        }
    }

    #[test]
    fn every_truncation_of_a_valid_message_is_safe(cut in 0usize..200) {
        let m = Msg::default()
            .set(2, &template(256, V4_FIELDS))
            .set(256, &v4_record([10, 0, 0, 1], 1, 2, 3))
            .ipfix(0, 1);
        let cut = cut.min(m.len());
        let mut d = Decoder::new(Limits::default());
        let mut out = Vec::new();
        let r = d.decode_udp(from(), &m[..cut], T0, &mut out);
        if cut < m.len() {
            prop_assert!(r.is_err() || out.is_empty());
        }
    }

    #[test]
    fn records_round_trip_through_a_template(
        packets: u32, bytes: u64, sport: u16, a: u8, b: u8,
    ) {
        let m = Msg::default()
            .set(2, &template(256, V4_FIELDS))
            .set(256, &v4_record([10, a, b, 1], sport, packets, bytes))
            .ipfix(0, 1);
        let mut d = Decoder::new(Limits::default());
        let out = decode(&mut d, &m);
        prop_assert_eq!(out.len(), 1);
        prop_assert_eq!(out[0].packets, u64::from(packets));
        prop_assert_eq!(out[0].bytes, bytes);
        prop_assert_eq!(out[0].src_port, sport);
        prop_assert_eq!(out[0].src_addr.to_string(), format!("10.{a}.{b}.1"));
    }
}

/// One proptest per bad-input case of issue 13: each is refused, counted
/// under its reason, allocates nothing in proportion to the lying number,
/// and leaves the decoder working.
mod bad_input {
    use super::*;

    fn still_decodes(d: &mut Decoder, seq: u32) {
        let m = Msg::default()
            .set(2, &template(300, V4_FIELDS))
            .set(300, &v4_record([10, 0, 0, 9], 9, 1, 1))
            .ipfix(seq, 1);
        assert_eq!(decode(d, &m).len(), 1, "the decoder still works");
    }

    proptest! {
        #[test]
        fn message_length_past_the_datagram(extra in 1u16..2000, cut in 0usize..16) {
            let mut m = Msg::default().set(2, &template(256, V4_FIELDS)).ipfix(0, 1);
            let len = (m.len() as u16).saturating_add(extra);
            m[2..4].copy_from_slice(&len.to_be_bytes());
            let keep = m.len() - cut.min(m.len() - 16);
            let mut d = Decoder::new(Limits::default());
            let mut out = Vec::new();
            prop_assert_eq!(d.decode_udp(from(), &m[..keep], T0, &mut out), Err(DropReason::BadMessageLength));
            prop_assert_eq!(domain_counters(&d).dropped(DropReason::BadMessageLength), 1);
            still_decodes(&mut d, 0);
        }

        #[test]
        fn set_length_past_the_message(declared in 0u16..4, over in 1u16..60000) {
            // A set length under 4, or past what is left.
            let mut m = Msg::default().set(256, &[0; 8]).ipfix(0, 1);
            let len = if declared < 4 { declared } else { 12 + over };
            m[18..20].copy_from_slice(&len.to_be_bytes());
            let mut d = Decoder::new(Limits::default());
            prop_assert!(decode(&mut d, &m).is_empty());
            prop_assert_eq!(domain_counters(&d).dropped(DropReason::BadSetLength), 1);
            still_decodes(&mut d, 0);
        }

        #[test]
        fn field_count_overrunning_the_set(count in 2u16..) {
            // One field specifier present, `count` announced.
            let mut t = vec![1, 0];
            t.extend_from_slice(&count.to_be_bytes());
            t.extend_from_slice(&[0, 8, 0, 4]);
            let m = Msg::default().set(2, &t).ipfix(0, 1);
            let mut d = Decoder::new(Limits::default());
            decode(&mut d, &m);
            let c = domain_counters(&d);
            prop_assert_eq!(
                c.dropped(DropReason::FieldCountOverrun) + c.dropped(DropReason::TooManyFields),
                1
            );
            prop_assert!(d.stats().iter().all(|s| s.templates == 0));
        }

        #[test]
        fn oversized_and_zero_length_fields(element in prop::sample::select(vec![1u16, 2, 4, 7, 8, 11, 12, 27, 152]), len in 9u16..0xFFFF) {
            // A counter, port, address or time longer than its type.
            let m = Msg::default().set(2, &template(256, &[(element, len)])).ipfix(0, 1);
            let mut d = Decoder::new(Limits::default());
            decode(&mut d, &m);
            prop_assert_eq!(domain_counters(&d).dropped(DropReason::BadFieldLength), 1);
            // Every field 0 long: a record of no bytes.
            let z = Msg::default().set(2, &template(257, &[(999, 0), (998, 0)])).ipfix(0, 1);
            decode(&mut d, &z);
            prop_assert_eq!(domain_counters(&d).dropped(DropReason::ZeroLengthRecord), 1);
            still_decodes(&mut d, 0);
        }

        #[test]
        fn variable_length_longer_than_the_set(len in 1usize..=0xFFFF, three_byte: bool) {
            let t = template(256, &[(8, 4), (371, super::wire::VARLEN)]);
            let mut rec = vec![10, 0, 0, 1];
            if three_byte || len >= 255 {
                rec.push(255);
                rec.extend_from_slice(&(len as u16).to_be_bytes());
            } else {
                rec.push(len as u8);
            }
            // Fewer bytes than announced follow.
            rec.extend(std::iter::repeat_n(b'a', len.saturating_sub(1).min(64)));
            let m = Msg::default().set(2, &t).set(256, &rec).ipfix(0, 1);
            let mut d = Decoder::new(Limits::default());
            let out = decode(&mut d, &m);
            let c = domain_counters(&d);
            prop_assert!(out.is_empty());
            prop_assert_eq!(c.dropped(DropReason::VarLenOverrun), 1);
            still_decodes(&mut d, 1);
        }

        #[test]
        fn options_templates_without_scope(fields in 1u16..20) {
            let mut t = vec![1, 0];
            t.extend_from_slice(&fields.to_be_bytes());
            t.extend_from_slice(&[0, 0]);
            for _ in 0..fields {
                t.extend_from_slice(&[0, 34, 0, 4]);
            }
            let m = Msg::default().set(3, &t).ipfix(0, 1);
            let mut d = Decoder::new(Limits::default());
            decode(&mut d, &m);
            prop_assert_eq!(domain_counters(&d).dropped(DropReason::OptionsWithoutScope), 1);
            prop_assert!(d.stats().iter().all(|s| s.templates == 0));
        }

        #[test]
        fn a_template_withdrawn_mid_stream(before in 0usize..6, after in 1usize..6) {
            let mut d = Decoder::new(Limits::default());
            let mut out = Vec::new();
            let t = Msg::default().set(2, &template(256, &[(8, 4), (2, 4)])).ipfix(0, 1);
            d.decode_tcp(from(), 1, &t, T0, &mut out).unwrap();
            let data = Msg::default().set(256, &[1, 1, 1, 1, 0, 0, 0, 1]).ipfix(0, 1);
            for _ in 0..before {
                d.decode_tcp(from(), 1, &data, T0, &mut out).unwrap();
            }
            let w = Msg::default().set(2, &[1, 0, 0, 0]).ipfix(0, 1);
            d.decode_tcp(from(), 1, &w, T0, &mut out).unwrap();
            for _ in 0..after {
                d.decode_tcp(from(), 1, &data, T0, &mut out).unwrap();
            }
            prop_assert_eq!(out.len(), before);
            prop_assert_eq!(domain_counters(&d).dropped(DropReason::TemplateWithdrawn), after as u64);
        }

        #[test]
        fn unknown_versions(version in any::<u16>().prop_filter("not 5, 9, 10", |v| ![5, 9, 10].contains(v)), rest in prop::collection::vec(any::<u8>(), 0..100)) {
            let mut m = version.to_be_bytes().to_vec();
            m.extend_from_slice(&rest);
            let mut d = Decoder::new(Limits::default());
            let mut out = Vec::new();
            prop_assert_eq!(d.decode_udp(from(), &m, T0, &mut out), Err(DropReason::UnknownVersion));
            prop_assert_eq!(domain_counters(&d).dropped(DropReason::UnknownVersion), 1);
        }

        #[test]
        fn sequence_gaps_are_counted_exactly(start: u32, gaps in prop::collection::vec(0u32..1000, 1..20)) {
            let mut d = Decoder::new(Limits::default());
            let t = Msg::default().set(2, &template(256, &[(8, 4), (2, 4)])).ipfix(start, 1);
            decode(&mut d, &t);
            let mut seq = start;
            let mut lost = 0u64;
            for g in &gaps {
                seq = seq.wrapping_add(*g);
                lost += u64::from(*g);
                let m = Msg::default().set(256, &[1, 1, 1, 1, 0, 0, 0, 1]).ipfix(seq, 1);
                decode(&mut d, &m);
                seq = seq.wrapping_add(1);
            }
            prop_assert_eq!(domain_counters(&d).sequence_gaps, lost);
        }

        #[test]
        fn exporters_off_the_allow_list(last: u8) {
            let allowed: std::net::IpAddr = "192.0.2.1".parse().unwrap();
            let mut d = Decoder::new(Limits { allow: Some([allowed].into_iter().collect()), ..Limits::default() });
            let other: SocketAddr = format!("198.51.100.{last}:9").parse().unwrap();
            let m = Msg::default().set(2, &template(256, V4_FIELDS)).ipfix(0, 1);
            let mut out = Vec::new();
            prop_assert_eq!(d.decode_udp(other, &m, T0, &mut out), Err(DropReason::NotAllowed));
            // No state is created for it.
            prop_assert!(d.stats().iter().all(|s| s.exporter.addr.ip().is_unspecified()));
            still_decodes(&mut d, 0);
        }
    }
}

#[test]
fn nsel_responder_counters_make_a_reverse_record() {
    let mut d = Decoder::new(Limits::default());
    let t = template(
        256,
        &[
            (8, 4),
            (12, 4),
            (7, 2),
            (11, 2),
            (4, 1),
            (231, 4),
            (232, 4),
            (298, 4),
            (299, 4),
        ],
    );
    let mut r = vec![10, 0, 0, 1, 10, 0, 0, 2, 0x9c, 0x40, 0, 80, 6];
    for v in [1000u32, 5000, 10, 8] {
        r.extend_from_slice(&v.to_be_bytes());
    }
    let out = decode(&mut d, &Msg::default().set(2, &t).set(256, &r).ipfix(0, 1));
    assert_eq!(out.len(), 2);
    assert_eq!(
        (out[0].bytes, out[0].packets, out[0].src_port),
        (1000, 10, 40000)
    );
    assert_eq!((out[1].bytes, out[1].packets), (5000, 8));
    assert_eq!(out[1].src_addr.to_string(), "10.0.0.2");
    assert_eq!((out[1].src_port, out[1].dst_port), (80, 40000));
}

#[test]
fn icmpv6_type_code_micro_and_nano_times() {
    let mut d = Decoder::new(Limits::default());
    let t = template(
        256,
        &[
            (27, 16),
            (28, 16),
            (4, 1),
            (139, 2),
            (154, 8),
            (157, 8),
            (2, 1),
        ],
    );
    let mut r = Vec::new();
    r.extend_from_slice(
        &"2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    r.extend_from_slice(
        &"2001:db8::2"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    r.push(58);
    r.extend_from_slice(&[128, 0]);
    // NTP seconds of 2023-11-14T22:13:20Z, and a quarter second.
    let ntp = 1_700_000_000u32 + 2_208_988_800;
    r.extend_from_slice(&ntp.to_be_bytes());
    r.extend_from_slice(&0u32.to_be_bytes());
    r.extend_from_slice(&ntp.to_be_bytes());
    r.extend_from_slice(&0x4000_0000u32.to_be_bytes());
    r.push(2);
    let out = decode(&mut d, &Msg::default().set(2, &t).set(256, &r).ipfix(0, 1));
    assert_eq!(out.len(), 1);
    assert_eq!(
        (out[0].proto, out[0].src_port, out[0].dst_port),
        (58, 0, 128 * 256)
    );
    assert_eq!(out[0].start_ns, 1_700_000_000 * 1_000_000_000);
    assert_eq!(out[0].end_ns, 1_700_000_000 * 1_000_000_000 + 250_000_000);
    assert_eq!(out[0].packets, 2, "reduced-size packetDeltaCount of 1 byte");
}

#[test]
fn v9_uptime_wraps_modulo_2_pow_32() {
    let mut d = Decoder::new(Limits::default());
    let t = template(256, &[(8, 4), (22, 4), (21, 4), (2, 4)]);
    let mut r = vec![10, 0, 0, 1];
    // Switched 1 s before the 32-bit uptime wrapped; the header's uptime is
    // 500 ms after the wrap: the flow is 1.5 s and 0.5 s old.
    r.extend_from_slice(&(u32::MAX - 999).to_be_bytes());
    r.extend_from_slice(&0u32.to_be_bytes());
    r.extend_from_slice(&1u32.to_be_bytes());
    let out = decode(
        &mut d,
        &Msg::default().set(0, &t).set(256, &r).v9(0, 1, 500),
    );
    assert_eq!(out.len(), 1);
    let export = 1_700_000_000u64 * 1_000_000_000;
    assert_eq!(out[0].start_ns, export - 1_500_000_000);
    assert_eq!(out[0].end_ns, export - 500_000_000);
}

/// Regression tests of the attacker review's findings.
mod hostile;
