//! The IPFIX (RFC 7011) decoder of the collector on arbitrary bytes (version forced
//! to 10): no panic, no allocation a length or count from the input
//! drives past its bounds (memory blow-ups are crashes, see
//! `cap_alloc.rs`), and the decoder's limits hold afterwards.
#![no_main]

#[path = "../../../schema/fuzz/fuzz_targets/cap_alloc.rs"]
mod cap_alloc;
mod ipfix_common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ipfix_common::run(10, data);
});
