//! Property tests of the LDIF parser and the policy builder: they never
//! panic, whatever the input, and written entries read back as they were.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use qosloop_policy_server::repo::{build, parse_ldif, write_ldif, Entry};
use qosloop_schema::{PolicySet, SAMPLE_POLICY_LDIF};

/// Attribute names that the parser treats specially are left out.
fn attribute_name() -> impl Strategy<Value = String> {
    "[a-zA-Z][a-zA-Z0-9-]{0,12}".prop_filter("reserved", |n| {
        !["dn", "changetype", "control", "version"]
            .iter()
            .any(|r| n.eq_ignore_ascii_case(r))
    })
}

/// Any text, including leading/trailing spaces, colons, `<`, newlines,
/// non-ASCII.
fn value() -> impl Strategy<Value = String> {
    prop_oneof!["[ -~]{0,90}", "\\PC{0,40}", "[ :<]?[a-z\r\n é€]{0,20}[ ]?",]
}

fn dn() -> impl Strategy<Value = String> {
    (
        "[a-z]{1,8}",
        "[a-zA-Z0-9 .-]{0,20}[a-zA-Z0-9]",
        "[a-z]{1,8}",
    )
        .prop_map(|(a, b, c)| format!("cn={b},ou={a},dc={c}"))
}

fn entry() -> impl Strategy<Value = Entry> {
    (
        dn(),
        proptest::collection::vec(
            (attribute_name(), proptest::collection::vec(value(), 1..4)),
            0..6,
        ),
    )
        .prop_map(|(dn, attrs)| {
            let mut e = Entry::new(dn);
            for (name, values) in attrs {
                for v in values {
                    e.push(&name, v);
                }
            }
            e
        })
}

/// Lines that look like LDIF, to reach deeper than random bytes do.
fn ldif_like() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        Just("dn: cn=a,dc=x".to_owned()),
        Just(String::new()),
        Just("version: 1".to_owned()),
        Just("# comment".to_owned()),
        Just(" continued".to_owned()),
        Just("changetype: modify".to_owned()),
        "[a-zA-Z]{1,8}:{1,2} ?[ -~]{0,20}",
        "[a-zA-Z]{1,8}:: [A-Za-z0-9+/=]{0,12}",
        "\\PC{0,20}",
    ];
    proptest::collection::vec(line, 0..30).prop_map(|l| l.join("\n"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_parser_never_panics_on_arbitrary_text(text in "\\PC{0,400}") {
        let _ = parse_ldif(&text);
    }

    #[test]
    fn the_parser_never_panics_on_ldif_like_text(text in ldif_like()) {
        if let Ok(entries) = parse_ldif(&text) {
            let _ = build(&entries, &PolicySet::default());
        }
    }

    #[test]
    fn written_entries_read_back(entries in proptest::collection::vec(entry(), 0..5)) {
        let text = write_ldif(&entries);
        let back = parse_ldif(&text).unwrap();
        prop_assert_eq!(back.len(), entries.len());
        for (b, e) in back.iter().zip(&entries) {
            prop_assert_eq!(&b.dn, &e.dn);
            prop_assert_eq!(&b.attrs, &e.attrs);
        }
    }

    /// Mutating the sample policy's values never panics the builder, and
    /// whatever it accepts keeps the invariants the engine relies on.
    #[test]
    fn the_builder_never_panics_on_mutated_policies(
        picks in proptest::collection::vec((any::<prop::sample::Index>(), value()), 1..6)
    ) {
        let mut entries = parse_ldif(SAMPLE_POLICY_LDIF).unwrap();
        for (index, v) in picks {
            let e = index.get_mut(&mut entries);
            if e.attrs.is_empty() {
                continue;
            }
            let i = index.index(e.attrs.len());
            e.attrs[i].1 = vec![v];
        }
        let b = build(&entries, &PolicySet::default());
        for class in &b.policy.classes {
            prop_assert_eq!(class.out_of_profile[0].from.0, 0);
            prop_assert!(class.out_of_profile.last().unwrap().to.is_none());
            for pair in class.out_of_profile.windows(2) {
                prop_assert_eq!(pair[0].to, Some(pair[1].from));
            }
        }
        for rule in &b.policy.rules {
            prop_assert!(b.policy.classes.iter().any(|c| c.name == rule.service_class));
            prop_assert!(b.policy.links.iter().any(|l| l.name == rule.link));
            prop_assert!(!rule.flows.is_empty());
        }
    }
}
