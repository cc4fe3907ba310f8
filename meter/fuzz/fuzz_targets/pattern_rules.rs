//! PatternRules rule files: any text parses or yields one located error.
#![no_main]

#[path = "../../../schema/fuzz/fuzz_targets/cap_alloc.rs"]
mod cap_alloc;

use libfuzzer_sys::fuzz_target;
use qosloop_meter::PatternRules;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = PatternRules::parse("fuzz", text);
    }
});
