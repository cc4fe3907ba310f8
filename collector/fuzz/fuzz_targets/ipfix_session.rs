//! The collector's IPFIX/NetFlow v9 decoder, stateful: the fuzzer's bytes
//! choose messages made of template sets (ids, elements among those the
//! decoder maps and any other, lengths among the meaningful ones, variable
//! or any, enterprise elements), options templates (scope counts
//! included), withdrawals, and data sets for those templates — so that
//! data meets the templates it was written for, the ones withdrawn, the
//! ones redefined, and none. Messages go to a UDP and a TCP decoder with
//! small limits while time advances; no panic, no unbounded allocation
//! (`cap_alloc.rs`), and the limits hold after every message.
#![no_main]

#[path = "../../../schema/fuzz/fuzz_targets/cap_alloc.rs"]
mod cap_alloc;
mod ipfix_common;

use libfuzzer_sys::fuzz_target;
use qosloop_collector::ipfix::Decoder;
use std::net::SocketAddr;

/// Reads the input front to back; past its end every read is zero.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a.to_vec()
    }
    fn done(&self) -> bool {
        self.0.is_empty()
    }
}

/// Elements the decoder gives meaning to, and a few it does not.
const ELEMENTS: &[u16] = &[
    1, 2, 4, 5, 6, 7, 8, 11, 12, 21, 22, 23, 24, 27, 28, 32, 34, 48, 50, 58, 85, 86, 139, 143, 150,
    151, 152, 153, 154, 155, 156, 157, 158, 159, 160, 176, 177, 195, 231, 232, 243, 298, 299, 302,
    305, 306, 371, 999,
];
const LENGTHS: &[u16] = &[0, 1, 2, 3, 4, 8, 9, 16, 0xFFFF];

fn field(input: &mut Input, ipfix: bool, out: &mut Vec<u8>) {
    let pick = input.u8();
    let id = if pick < 200 {
        ELEMENTS[usize::from(pick) % ELEMENTS.len()]
    } else {
        input.u16() & 0x7fff
    };
    let len = match input.u8() {
        l if l < 200 => LENGTHS[usize::from(l) % LENGTHS.len()],
        _ => input.u16(),
    };
    let enterprise = ipfix && input.u8() % 4 == 0;
    out.extend_from_slice(&(if enterprise { id | 0x8000 } else { id }).to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    if enterprise {
        let pen: u32 = if input.u8() % 2 == 0 {
            32473
        } else {
            input.u32()
        };
        out.extend_from_slice(&pen.to_be_bytes());
    }
}

fn set(out: &mut Vec<u8>, id: u16, body: &[u8]) {
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&((body.len() + 4).min(0xFFFF) as u16).to_be_bytes());
    out.extend_from_slice(body);
}

/// One message's sets from the input.
fn sets(input: &mut Input, ipfix: bool) -> Vec<u8> {
    let mut body = Vec::new();
    for _ in 0..(1 + input.u8() % 6) {
        let kind = input.u8() % 6;
        let tid = 256 + u16::from(input.u8() % 8);
        match kind {
            0 | 1 => {
                let options = kind == 1;
                let fields = input.u8() % 12;
                let mut t = tid.to_be_bytes().to_vec();
                if options && !ipfix {
                    // v9: scope and option lengths in bytes.
                    let scope = input.u8() % 3;
                    t.extend_from_slice(&(u16::from(scope) * 4).to_be_bytes());
                    t.extend_from_slice(&(u16::from(fields) * 4).to_be_bytes());
                    for _ in 0..(scope + fields) {
                        field(input, false, &mut t);
                    }
                } else {
                    t.extend_from_slice(&u16::from(fields).to_be_bytes());
                    if options {
                        t.extend_from_slice(&u16::from(input.u8() % 3).to_be_bytes());
                    }
                    for _ in 0..fields {
                        field(input, ipfix, &mut t);
                    }
                }
                let id = match (ipfix, options) {
                    (true, false) => 2,
                    (true, true) => 3,
                    (false, false) => 0,
                    (false, true) => 1,
                };
                set(&mut body, id, &t);
            }
            2 | 3 => {
                let len = usize::from(input.u8()) * 2;
                let data = input.bytes(len);
                set(&mut body, tid, &data);
            }
            4 => {
                // Withdraw one, or all (template id = set id).
                let all = input.u8() % 2 == 0;
                let sid = if input.u8() % 2 == 0 { 2 } else { 3 };
                let id = if all { sid } else { tid };
                let mut w = id.to_be_bytes().to_vec();
                w.extend_from_slice(&[0, 0]);
                set(&mut body, sid, &w);
            }
            _ => {
                let n = usize::from(input.u8());
                let raw = input.bytes(n);
                body.extend_from_slice(&raw);
            }
        }
    }
    body
}

fn message(input: &mut Input) -> Vec<u8> {
    let ipfix = input.u8() % 3 != 0;
    let seq = input.u32();
    let domain = u32::from(input.u8() % 3);
    let body = sets(input, ipfix);
    let mut m = Vec::new();
    if ipfix {
        m.extend_from_slice(&10u16.to_be_bytes());
        m.extend_from_slice(&((body.len() + 16).min(0xFFFF) as u16).to_be_bytes());
        m.extend_from_slice(&1_700_000_000u32.to_be_bytes());
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(&domain.to_be_bytes());
    } else {
        m.extend_from_slice(&9u16.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m.extend_from_slice(&input.u32().to_be_bytes());
        m.extend_from_slice(&1_700_000_000u32.to_be_bytes());
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(&domain.to_be_bytes());
    }
    m.extend_from_slice(&body);
    m
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let limits = ipfix_common::small_limits();
    let mut udp = Decoder::new(limits.clone());
    let mut tcp = Decoder::new(limits.clone());
    let from: SocketAddr = "192.0.2.1:2055".parse().unwrap_or_else(|_| unreachable!());
    let mut now = 1_000_000_000u64;
    let mut out = Vec::new();
    let mut messages = 0;
    while !input.done() && messages < 64 {
        messages += 1;
        let m = message(&mut input);
        let _ = udp.decode_udp(from, &m, now, &mut out);
        if m.starts_with(&[0, 10]) {
            let _ = tcp.decode_tcp(from, 1, &m, now, &mut out);
        }
        // Time moves by 0 to ~4 minutes: templates and held data expire.
        now += u64::from(input.u8()) * 1_000_000_000;
        udp.sweep(now);
        tcp.sweep(now);
        for s in udp.stats().into_iter().chain(tcp.stats()) {
            assert!(s.templates <= limits.max_templates, "{s:?}");
            assert!(s.pending_sets <= limits.pending_sets, "{s:?}");
        }
        out.clear();
        let _ = udp.take_template_changes();
    }
    tcp.close_session(from, 1);
});
