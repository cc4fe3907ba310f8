//! `cargo bench -p qosloop-meter`: the pipeline and the pattern DFA on one
//! core, without peers (`qosloop-testbed bench meter` runs the peers too).

use qosloop_meter::bench::{
    field_rules, measure_patterns, measure_pipeline, patterns, synthetic_frames,
};
use qosloop_meter::{CacheConfig, Classifier};
use std::sync::Arc;

fn main() -> Result<(), String> {
    let packets = std::env::var("METER_BENCH_PACKETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let flows: usize = std::env::var("METER_BENCH_FLOWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let frames = synthetic_frames(packets, flows, 64);
    // The figure says "10 field rules": without them it would measure
    // something else, so a rule file that does not load ends the bench.
    let rules = field_rules().map_err(|e| format!("the 10 field rules did not load: {e}"))?;
    if rules.rules().len() != 10 {
        return Err(format!(
            "expected 10 field rules, got {}",
            rules.rules().len()
        ));
    }
    let classifier = Arc::new(Classifier::new(Some(rules), None, None));
    let cache = CacheConfig {
        interim_ns: 0,
        ..CacheConfig::default()
    };
    let m = measure_pipeline(&frames, classifier, cache);
    println!(
        "pipeline (decode + 10 field rules + cache), 64-byte packets, {flows} flows: {:.2} Mpkt/s",
        m.packets_per_second() / 1e6
    );
    for anchored in [true, false] {
        {
            let rules = patterns(100, anchored)
                .map_err(|e| format!("the 100 patterns did not load: {e}"))?;
            let big = synthetic_frames(packets / 10, 100_000, 1500);
            let (m, _) = measure_patterns(&big, &rules, anchored);
            println!(
                "100 patterns ({}) over 1500-byte frames: {:.2} GB/s",
                if anchored {
                    "anchored at IP"
                } else {
                    "unanchored"
                },
                m.bytes_per_second() / 1e9
            );
            let (m, _) = measure_patterns(&frames, &rules, anchored);
            println!(
                "100 patterns ({}) over 64-byte frames: {:.2} GB/s",
                if anchored {
                    "anchored at IP"
                } else {
                    "unanchored"
                },
                m.bytes_per_second() / 1e9
            );
        }
    }
    Ok(())
}
