//! The COPS decoder on arbitrary bytes: it must never panic, and whatever
//! it accepts must encode back to bytes that decode to the same messages.
#![no_main]

mod cap_alloc;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use qosloop_schema::cops::{CopsCodec, Decoder, Encoder};

fuzz_target!(|data: &[u8]| {
    let mut codec = CopsCodec::new(64 * 1024);
    let mut buf = BytesMut::from(data);
    let mut decoded = Vec::new();
    while let Ok(Some(m)) = codec.decode(&mut buf) {
        decoded.push(m);
    }
    let mut out = BytesMut::new();
    for m in &decoded {
        if codec.encode(m, &mut out).is_err() {
            return;
        }
    }
    let mut again = Vec::new();
    while let Ok(Some(m)) = codec.decode(&mut out) {
        again.push(m);
    }
    assert_eq!(decoded, again);
});
