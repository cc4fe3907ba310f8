//! Decode-only rate of `ipfix::Decoder` on one core: N IPFIX messages of
//! 30 records (the template of softflowd's IPv4 flows, plus a ms
//! timestamp pair), decoded in process, no storage. A quick figure for
//! development; `qosloop-testbed bench ipfix` is the benchmark of record.
//!
//!   cargo run --release -p qosloop-collector --example ipfix_decode_rate [RECORDS]

use qosloop_collector::ipfix::{Decoder, Limits};
use std::net::SocketAddr;
use std::time::Instant;

fn main() {
    let records: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000_000);
    let per_msg = 30usize;
    let fields: [(u16, u16); 12] = [
        (8, 4),
        (12, 4),
        (7, 2),
        (11, 2),
        (4, 1),
        (6, 1),
        (5, 1),
        (2, 8),
        (1, 8),
        (152, 8),
        (153, 8),
        (10, 4),
    ];
    let rec_len: usize = fields.iter().map(|f| usize::from(f.1)).sum();
    let mut template = vec![0, 2, 0, 0, 1, 0, 0, fields.len() as u8];
    for (id, len) in fields {
        template.extend_from_slice(&id.to_be_bytes());
        template.extend_from_slice(&len.to_be_bytes());
    }
    let tlen = template.len() as u16;
    template[2..4].copy_from_slice(&tlen.to_be_bytes());
    let message = |seq: u32, with_template: bool| -> Vec<u8> {
        let mut body = Vec::new();
        if with_template {
            body.extend_from_slice(&template);
        }
        body.extend_from_slice(&256u16.to_be_bytes());
        body.extend_from_slice(&((4 + per_msg * rec_len) as u16).to_be_bytes());
        for i in 0..per_msg {
            let n = seq as usize + i;
            body.extend_from_slice(&[10, 0, (n >> 8) as u8, n as u8, 10, 1, 0, 1]);
            body.extend_from_slice(&(n as u16).to_be_bytes());
            body.extend_from_slice(&443u16.to_be_bytes());
            body.extend_from_slice(&[6, 0x18, 0]);
            body.extend_from_slice(&3u64.to_be_bytes());
            body.extend_from_slice(&(180 + n as u64).to_be_bytes());
            body.extend_from_slice(&1_700_000_000_000u64.to_be_bytes());
            body.extend_from_slice(&1_700_000_000_100u64.to_be_bytes());
            body.extend_from_slice(&1u32.to_be_bytes());
        }
        let mut m = vec![0, 10];
        m.extend_from_slice(&((16 + body.len()) as u16).to_be_bytes());
        m.extend_from_slice(&1_700_000_000u32.to_be_bytes());
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&body);
        m
    };
    // 1,000 distinct messages, replayed with their sequence numbers.
    let msgs: Vec<Vec<u8>> = (0..1000u32)
        .map(|i| message(i * per_msg as u32, i == 0))
        .collect();
    let from = SocketAddr::from(([192, 0, 2, 1], 2055));
    let mut decoder = Decoder::new(Limits::default());
    let mut out = Vec::with_capacity(4096);
    let n_msgs = records / per_msg;
    let start = Instant::now();
    let mut decoded = 0usize;
    for i in 0..n_msgs {
        let m = &msgs[i % msgs.len()];
        if decoder.decode_udp(from, m, 1, &mut out).is_ok() {
            decoded += out.len();
        }
        out.clear();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{decoded} records in {secs:.3} s: {:.2} M records/s ({} B per record, {} records per message)",
        decoded as f64 / secs / 1e6,
        rec_len,
        per_msg
    );
}
