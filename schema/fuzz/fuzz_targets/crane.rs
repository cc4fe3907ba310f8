//! The CRANE-style export decoder on arbitrary bytes: frames and the
//! records of DATA messages must never panic, and every frame it accepts
//! must encode back to bytes that decode to the same frame.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use qosloop_schema::crane::records::RecordLayout;
use qosloop_schema::crane::{ByteOrder, CraneCodec, Message, WireTemplate};
use qosloop_schema::Template;
use tokio_util::codec::{Decoder, Encoder};

fuzz_target!(|data: &[u8]| {
    let mut codec = CraneCodec::with_max_message(1 << 20);
    let mut buf = BytesMut::from(data);
    let mut decoded = Vec::new();
    while let Ok(Some(f)) = codec.decode(&mut buf) {
        decoded.push(f);
    }
    let templates = [Template::flow_v4(256), Template::flow_v6(257)];
    for f in &decoded {
        match &f.message {
            Message::Data(d) => {
                for t in &templates {
                    if let Ok(w) = WireTemplate::from_template(t) {
                        for order in [ByteOrder::Big, ByteOrder::Little] {
                            let _ = RecordLayout::new(&w, order).decode(&d.records, d.count);
                        }
                    }
                }
            }
            Message::TemplateData(set) => {
                // Templates from the wire drive the record decoder too.
                for t in &set.templates {
                    let _ = RecordLayout::new(t, set.byte_order).decode(data, 4);
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
