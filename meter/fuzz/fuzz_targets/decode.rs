//! The decoder must never panic: any bytes, any link type, then the whole
//! pipeline (classification included) over the same frame.
#![no_main]

#[path = "../../../schema/fuzz/fuzz_targets/cap_alloc.rs"]
mod cap_alloc;

use libfuzzer_sys::fuzz_target;
use qosloop_meter::decode::decode;
use qosloop_meter::pcap::PacketRef;
use qosloop_meter::{Classifier, CountSink, Pipeline, PipelineConfig};
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, frame)) = data.split_first() else { return };
    let link = [1u32, 101, 113, 228, 229, 276][usize::from(sel) % 6];
    let _ = decode(link, frame, frame.len() as u32);
    let mut p = Pipeline::new(PipelineConfig::default(), Arc::new(Classifier::default()));
    let pkt = PacketRef { ts_ns: 1, data: frame, orig_len: frame.len() as u32, linktype: link, interface: 0 };
    let mut sink = CountSink::default();
    let _ = p.packet(&pkt, "fuzz0", &mut sink);
    let _ = p.finish(&mut sink);
});
