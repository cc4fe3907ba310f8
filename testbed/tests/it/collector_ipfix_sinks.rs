//! The exporter's IPFIX encoder feeding the collector's decoder: both of the
//! decoder's sinks (a vector of records, the journal's record encoding) get
//! the same records from the same messages.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use qosloop_collector::ipfix::{EncodedRecords, RecordSink};
use qosloop_collector::journal::frame;
use qosloop_schema::FlowRecord;
use std::net::{IpAddr, Ipv6Addr};

fn rec(i: u16) -> FlowRecord {
    FlowRecord {
        src_port: i,
        class: (i % 2 == 0).then(|| format!("c{i}")),
        dst_addr: if i % 3 == 0 {
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        } else {
            FlowRecord::default().dst_addr
        },
        ..FlowRecord::default()
    }
}

/// The decoder fed the same messages (the meter's own IPFIX encoder,
/// templates and data, IPv4 and IPv6, strings) writes into the
/// encoding exactly what encoding its vector of records gives.
#[test]
fn the_decoder_writes_the_same_bytes_into_either_sink() {
    use qosloop_collector::ipfix::{Decoder, Limits};
    let from = std::net::SocketAddr::from(([192, 0, 2, 1], 2055));
    let mut enc = qosloop_exporter::ipfix::Encoder::new(7, 1392, false).unwrap();
    let mut messages = Vec::new();
    for i in 0..500u16 {
        let mut r = rec(i);
        r.packets = u64::from(i) + 1;
        r.bytes = 40 * (u64::from(i) + 1);
        r.start_ns = 1_704_067_200_000_000_000 + u64::from(i) * 1_000_000;
        r.end_ns = r.start_ns + 5_000_000;
        r.dscp = Some((i % 64) as u8);
        r.src_addr = match r.dst_addr {
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i)),
            IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::new(10, 0, (i >> 8) as u8, i as u8)),
        };
        if let Some(m) = enc.push(&r, 1_704_067_300) {
            messages.push(m);
        }
    }
    messages.extend(enc.finish(1_704_067_300));
    let (mut a, mut b) = (
        Decoder::new(Limits::default()),
        Decoder::new(Limits::default()),
    );
    let (mut vec, mut encoded) = (Vec::new(), EncodedRecords::default());
    let mut n = 0;
    for m in &messages {
        vec.clear();
        encoded.clear();
        let ra = a.decode_udp(from, m, 1_704_067_300_000_000_000, &mut vec);
        let rb = b.decode_udp(from, m, 1_704_067_300_000_000_000, &mut encoded);
        assert_eq!(ra, rb);
        let mut want = Vec::new();
        frame::push_records(&mut want, &vec);
        assert_eq!((encoded.len(), encoded.bytes()), (vec.len(), &want[..]));
        n += vec.len();
    }
    assert_eq!(n, 500);
}
