//! Regression tests for the attacker review of the IPFIX ingest: each
//! names the finding it pins.

use super::*;

/// Finding 4: a data template of one 1-byte non-flow field turned every
/// byte of a message into a record of 0.0.0.0.
#[test]
fn a_template_without_address_or_counter_is_refused() {
    let mut d = Decoder::new(Limits::default());
    let m = Msg::default()
        .set(2, &template(256, &[(4, 1)]))
        .set(256, &[6u8; 60_000])
        .ipfix(0, 1);
    let out = decode(&mut d, &m);
    assert!(out.is_empty(), "{} records from nothing", out.len());
    let c = domain_counters(&d);
    assert_eq!(c.dropped(DropReason::NoFlowFields), 1);
    // Restored from storage: refused the same way.
    assert!(!d.restore_template(from(), 1, 257, "ipfix data 0 4:1", T0));
}

/// Finding 4: one message produces at most `max_records_per_message`
/// records, however small its template's records are.
#[test]
fn one_message_yields_at_most_the_record_cap() {
    let mut d = Decoder::new(Limits::default());
    let mut data = Vec::new();
    for i in 0..12_000u32 {
        data.extend_from_slice(&(0x0a00_0000 | i).to_be_bytes());
        data.push(1);
    }
    let m = Msg::default()
        .set(2, &template(256, &[(8, 4), (2, 1)]))
        .set(256, &data)
        .ipfix(0, 1);
    let out = decode(&mut d, &m);
    assert_eq!(out.len(), Limits::default().max_records_per_message);
    assert_eq!(domain_counters(&d).dropped(DropReason::TooManyRecords), 1);
}
