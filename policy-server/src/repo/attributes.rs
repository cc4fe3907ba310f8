//! Which attributes qosloop's object classes allow (schema/ldap/qosloop.ldif:
//! its own classes and the RFC 3703 classes it uses), so that a misspelled
//! attribute is an error naming the DN and the attribute instead of an
//! optional setting silently absent (`qosloopShapRate` once turned a shaped
//! band into unshaped accept).
//!
//! An attribute is refused when
//! - its name is in qosloop's or RFC 3703's namespace (`qosloop…`, `pcim…`)
//!   and no object class of the entry allows it (unknown, or misplaced), or
//! - the entry's object classes are all qosloop's or RFC 3703's (and `top`)
//!   and none of them allows it.
//!
//! Entries of other schemas (the `organizationalUnit` containers, the
//! `dcObject` base) are not checked beyond the first rule: their classes
//! are slapd's business.

use super::ldif::Entry;
use super::model::PolicyError;

/// Attributes every pcimPolicy subclass may have (RFC 3703 §5.1).
const PCIM_POLICY: &[&str] = &["cn", "description", "pcimKeywords"];
const PCIM_RULE: &[&str] = &[
    "pcimRuleName",
    "pcimRuleEnabled",
    "pcimRuleConditionListType",
    "pcimRuleConditionList",
    "pcimRuleActionList",
    "pcimRuleValidityPeriodList",
    "pcimRuleUsage",
    "pcimRulePriority",
    "pcimRuleMandatory",
    "pcimRuleSequencedActions",
    "pcimRoles",
];

/// Object class → (allowed attributes, inherits pcimPolicy's).
const CLASSES: &[(&str, &[&str], bool)] = &[
    ("top", &[], false),
    ("pcimPolicy", &[], true),
    ("pcimGroup", &["pcimGroupName"], true),
    ("pcimGroupAuxClass", &["pcimGroupName"], true),
    ("pcimGroupInstance", &["pcimGroupName"], true),
    ("pcimRule", PCIM_RULE, true),
    ("pcimRuleAuxClass", PCIM_RULE, true),
    ("pcimRuleInstance", PCIM_RULE, true),
    (
        "pcimRuleConditionAssociation",
        &[
            "pcimConditionGroupNumber",
            "pcimConditionNegated",
            "pcimConditionName",
            "pcimConditionDN",
        ],
        true,
    ),
    (
        "pcimRuleActionAssociation",
        &["pcimActionOrder", "pcimActionName", "pcimActionDN"],
        true,
    ),
    ("pcimConditionAuxClass", &[], false),
    ("pcimActionAuxClass", &[], false),
    ("pcimPolicyInstance", &["pcimPolicyInstanceName"], true),
    (
        "qosloopFlowCondition",
        &[
            "qosloopSrcPrefix",
            "qosloopDstPrefix",
            "qosloopProtocol",
            "qosloopSrcPorts",
            "qosloopDstPorts",
            "qosloopUser",
        ],
        false,
    ),
    (
        "qosloopServiceClass",
        &[
            "qosloopClassName",
            "qosloopProfileRate",
            "qosloopProfileBurst",
            "qosloopInProfileDSCP",
        ],
        false,
    ),
    (
        "qosloopLoadBand",
        &[
            "qosloopBandName",
            "qosloopBandFrom",
            "qosloopBandAction",
            "qosloopBandTo",
            "qosloopRemarkDSCP",
            "qosloopShapeRate",
        ],
        false,
    ),
    (
        "qosloopLink",
        &["qosloopLinkName", "qosloopLinkCapacity"],
        false,
    ),
    (
        "qosloopDeviceRole",
        &[
            "qosloopRole",
            "qosloopInterface",
            "qosloopDirection",
            "qosloopDeviceCapacity",
            "qosloopUserMatch",
        ],
        false,
    ),
    ("qosloopRuleAuxClass", &["qosloopLinkDN"], false),
    (
        "qosloopPerUserRuleAuxClass",
        &["qosloopRuleUser", "qosloopRuleGroupDN", "qosloopBandBasis"],
        false,
    ),
    (
        "qosloopUserGroup",
        &["qosloopGroupName", "qosloopMemberUid"],
        false,
    ),
    (
        "qosloopUserMapping",
        &[
            "cn",
            "description",
            "qosloopMappedUser",
            "qosloopUserAddress",
        ],
        false,
    ),
    (
        "qosloopApiToken",
        &[
            "cn",
            "description",
            "qosloopTokenSHA256",
            "qosloopTokenRole",
            "qosloopTokenScope",
        ],
        false,
    ),
];

fn class(name: &str) -> Option<(&'static [&'static str], bool)> {
    CLASSES
        .iter()
        .find(|(c, _, _)| c.eq_ignore_ascii_case(name))
        .map(|(_, attrs, policy)| (*attrs, *policy))
}

fn ours(attribute: &str) -> bool {
    let lower = attribute.to_ascii_lowercase();
    lower.starts_with("qosloop") || lower.starts_with("pcim")
}

/// Whether any class of the schema allows `attribute`.
fn in_schema(attribute: &str) -> bool {
    CLASSES
        .iter()
        .flat_map(|(_, attrs, _)| attrs.iter())
        .chain(PCIM_POLICY)
        .any(|a| a.eq_ignore_ascii_case(attribute))
}

/// The attributes of `e` that its object classes do not allow.
pub(crate) fn check(e: &Entry) -> Vec<PolicyError> {
    let classes = e.get("objectClass");
    let mut allowed: Vec<&str> = vec!["objectClass"];
    let mut foreign = false;
    for c in classes {
        match class(c.trim()) {
            Some((attrs, policy)) => {
                allowed.extend_from_slice(attrs);
                if policy {
                    allowed.extend_from_slice(PCIM_POLICY);
                }
            }
            None => foreign = true,
        }
    }
    let mut errors = Vec::new();
    for (name, _) in &e.attrs {
        if allowed.iter().any(|a| a.eq_ignore_ascii_case(name)) {
            continue;
        }
        let message = if ours(name) && !in_schema(name) {
            "unknown attribute: not in qosloop's schema (schema/ldap/qosloop.ldif); misspelled?"
                .to_owned()
        } else if ours(name) || !foreign {
            format!(
                "not allowed by the entry's object classes ({})",
                classes
                    .iter()
                    .map(|c| c.trim())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            continue;
        };
        errors.push(PolicyError {
            dn: e.dn.clone(),
            attribute: Some(name.clone()),
            message,
        });
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn band() -> Entry {
        Entry::new("cn=medium,cn=gold,ou=classes,dc=qosloop,dc=example")
            .with("objectClass", "pcimPolicyInstance")
            .with("objectClass", "qosloopLoadBand")
            .with("cn", "medium")
            .with("qosloopBandName", "medium")
            .with("qosloopBandFrom", "3000")
            .with("qosloopBandAction", "accept")
    }

    #[test]
    fn a_misspelled_attribute_names_the_dn_and_attribute() {
        assert!(check(&band()).is_empty());
        let errs = check(&band().with("qosloopShapRate", "875"));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].attribute.as_deref(), Some("qosloopShapRate"));
        assert!(errs[0].dn.starts_with("cn=medium"));
        assert!(errs[0].message.contains("misspelled"), "{}", errs[0]);
    }

    #[test]
    fn a_misplaced_or_foreign_attribute_is_refused_on_qosloop_entries() {
        // An attribute of another qosloop class.
        let errs = check(&band().with("qosloopLinkCapacity", "10"));
        assert_eq!(errs[0].attribute.as_deref(), Some("qosloopLinkCapacity"));
        assert!(errs[0].message.contains("not allowed"), "{}", errs[0]);
        // A name from no schema on an entry of qosloop's classes only.
        let errs = check(&band().with("shapeRate", "10"));
        assert_eq!(errs[0].attribute.as_deref(), Some("shapeRate"));
        // Case does not matter.
        assert!(check(&band().with("QOSLOOPSHAPERATE", "875")).is_empty());
    }

    #[test]
    fn containers_of_other_schemas_keep_their_attributes() {
        let ou = Entry::new("ou=rules,dc=qosloop,dc=example")
            .with("objectClass", "organizationalUnit")
            .with("ou", "rules")
            .with("telephoneNumber", "1");
        assert!(check(&ou).is_empty());
        let errs = check(&ou.with("qosloopShapeRate", "1"));
        assert_eq!(errs[0].attribute.as_deref(), Some("qosloopShapeRate"));
    }
}
