//! pcap/pcapng files: any bytes yield packets or one error, never a panic.
#![no_main]

#[path = "../../../schema/fuzz/fuzz_targets/cap_alloc.rs"]
mod cap_alloc;

use libfuzzer_sys::fuzz_target;
use qosloop_meter::CaptureReader;

fuzz_target!(|data: &[u8]| {
    if let Ok(mut r) = CaptureReader::new(data, "fuzz.pcap") {
        while let Ok(Some(_)) = r.next_packet() {}
    }
});
