//! The CRANE-style export decoder on arbitrary bytes: frames and the
//! records of DATA messages must never panic nor allocate without bound,
//! and every frame it accepts must encode back to bytes that decode to the
//! same frame.
//!
//! The first four bytes are a record count (big-endian) that the templates
//! of the input decode the rest of the input with; DATA messages are decoded
//! with their own counts against the fixed templates and every template the
//! input announced before them — the combination (a keyless template, then
//! DATA with a count of 0xFFFFFFFF) that a fixed count of 4 never reached
//! (issue 11, item 1). Memory blow-ups are crashes: see `cap_alloc.rs`.
#![no_main]

mod cap_alloc;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use qosloop_schema::crane::records::RecordLayout;
use qosloop_schema::crane::{ByteOrder, CraneCodec, Message, WireTemplate};
use qosloop_schema::Template;
use tokio_util::codec::{Decoder, Encoder};

/// Templates kept from the input (the collector bounds them too).
const MAX_TEMPLATES: usize = 16;

fuzz_target!(|input: &[u8]| {
    let Some((count, data)) = input.split_first_chunk::<4>() else {
        return;
    };
    let count = u32::from_be_bytes(*count);
    let mut codec = CraneCodec::with_max_message(1 << 20);
    let mut buf = BytesMut::from(data);
    let mut decoded = Vec::new();
    while let Ok(Some(f)) = codec.decode(&mut buf) {
        decoded.push(f);
    }
    let mut layouts: Vec<RecordLayout> = Vec::new();
    for t in [Template::flow_v4(256), Template::flow_v6(257)] {
        if let Ok(w) = WireTemplate::from_template(&t) {
            for order in [ByteOrder::Big, ByteOrder::Little] {
                layouts.push(RecordLayout::new(&w, order));
            }
        }
    }
    for f in &decoded {
        match &f.message {
            Message::Data(d) => {
                for l in &layouts {
                    let _ = l.decode(&d.records, d.count);
                }
            }
            Message::TemplateData(set) => {
                // Templates from the wire drive the record decoder, with the
                // count from the input, as announced (unchecked) and as the
                // collector takes them (checked).
                for t in &set.templates {
                    let raw = RecordLayout::new(t, set.byte_order);
                    let _ = raw.decode(data, count);
                    if let Ok(l) = RecordLayout::checked(t, set.byte_order) {
                        let _ = l.decode(data, count);
                        if layouts.len() < MAX_TEMPLATES {
                            layouts.push(l);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let mut out = BytesMut::new();
    for f in &decoded {
        if codec.encode(f, &mut out).is_err() {
            return;
        }
    }
    let mut again = Vec::new();
    while let Ok(Some(f)) = codec.decode(&mut out) {
        again.push(f);
    }
    assert_eq!(decoded, again);
});
