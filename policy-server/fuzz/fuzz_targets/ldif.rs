//! The LDIF parser and the policy builder on arbitrary input: no panic, and
//! whatever parses writes back and re-parses to the same entries.
#![no_main]

#[path = "../../../schema/fuzz/fuzz_targets/cap_alloc.rs"]
mod cap_alloc;

use libfuzzer_sys::fuzz_target;
use qosloop_policy_server::repo::{build, parse_ldif, write_ldif};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(entries) = parse_ldif(text) else {
        return;
    };
    // Fresh, then as a reload over its own result (the lenient path that
    // keeps last good versions; duplicate DNs and unknown attributes).
    let first = build(&entries, &Default::default());
    let _ = build(&entries, &first.policy);
    let again = match parse_ldif(&write_ldif(&entries)) {
        Ok(e) => e,
        Err(e) => panic!("written LDIF does not parse: {e}"),
    };
    assert_eq!(again.len(), entries.len());
    for (a, b) in again.iter().zip(&entries) {
        assert_eq!((&a.dn, &a.attrs), (&b.dn, &b.attrs));
    }
});
