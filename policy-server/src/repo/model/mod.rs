//! From directory entries to a validated [`PolicySet`].
//!
//! Entries are recognised by their object classes (docs/policy.md):
//! `qosloopServiceClass` with `qosloopLoadBand` children, `qosloopLink`
//! with `qosloopFlowCondition` children, `qosloopDeviceRole`, and RFC 3703
//! rules (`pcimRuleInstance` / `pcimRuleAuxClass`) whose condition and
//! action associations are their children or are listed in
//! `pcimRuleConditionList` / `pcimRuleActionList`. Other entries
//! (containers, the base) are ignored.
//!
//! Every problem is a [`PolicyError`] naming the DN and, where one is to
//! blame, the attribute. [`build`] is the lenient form a running server
//! uses: an object (class, link, device role, rule) that fails validation
//! is rejected and its last good version (from the previous policy) kept,
//! while every other object is updated. [`build_strict`] fails on any
//! problem, for `--check`.

use super::dn;
use super::ldif::Entry;
use qosloop_schema::{
    BandBasis, BusinessRule, DeviceRole, Direction, Dscp, FlowSpec, IpPrefix, Kbps, Link, LoadBand,
    OutOfProfileAction, PolicySet, PortRange, ServiceClass, TrafficProfile, UserMatch,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

mod classes;
mod rules;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_per_user;

use classes::{device, flow_condition, link, reject_duplicate_names, service_class};
pub use rules::intersect;
pub(crate) use rules::valid_user;
use rules::{reject_conflicts, rule};

/// One invalid entry: its DN, the attribute at fault (when one is), why.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, thiserror::Error)]
pub struct PolicyError {
    pub dn: String,
    pub attribute: Option<String>,
    pub message: String,
}

impl PolicyError {
    fn new(dn: &str, attribute: Option<&str>, message: impl Into<String>) -> PolicyError {
        PolicyError {
            dn: dn.to_owned(),
            attribute: attribute.map(str::to_owned),
            message: message.into(),
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.attribute {
            Some(a) => write!(f, "{}: {a}: {}", self.dn, self.message),
            None => write!(f, "{}: {}", self.dn, self.message),
        }
    }
}

/// All problems of a policy, for [`build_strict`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [] => f.write_str("no errors"),
            [one] => write!(f, "invalid policy entry {one}"),
            [first, rest @ ..] => write!(
                f,
                "invalid policy entry {first} (and {} more: {})",
                rest.len(),
                rest.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        }
    }
}

/// What [`build`] made: the policy and what it had to reject.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Build {
    pub policy: PolicySet,
    pub errors: Vec<PolicyError>,
}

/// Builds the policy; any problem is an error.
pub fn build_strict(entries: &[Entry]) -> Result<PolicySet, PolicyErrors> {
    let b = build(entries, &PolicySet::default());
    if b.errors.is_empty() {
        Ok(b.policy)
    } else {
        Err(PolicyErrors(b.errors))
    }
}

/// Builds the policy from what is valid; an invalid object keeps its
/// version from `previous` when it had one there.
pub fn build(entries: &[Entry], previous: &PolicySet) -> Build {
    let dir = Directory::new(entries);
    // Every entry's own problems are errors, also those of entries that
    // belong to no object (a container); objects with such an entry among
    // theirs are rejected below.
    let mut errors: Vec<PolicyError> = dir.all_problems().cloned().collect();
    // Static user mappings bind nothing when invalid; their errors count
    // like any entry's (`--check` fails on them).
    errors.extend(super::mappings::mappings(entries).1);

    // Tier 2 and 3 first: rules refer to classes and links.
    let mut classes: BTreeMap<String, ServiceClass> = BTreeMap::new();
    for e in dir.with_class("qosloopServiceClass") {
        let key = dn::normalize(&e.dn);
        match service_class(e, &dir) {
            Ok(c) => {
                classes.insert(key, c);
            }
            Err(mut errs) => {
                errors.append(&mut errs);
                if let Some(old) = previous
                    .classes
                    .iter()
                    .find(|c| dn::normalize(&c.dn) == key)
                {
                    classes.insert(key, old.clone());
                }
            }
        }
    }
    reject_duplicate_names(&mut classes, |c| &c.name, "qosloopClassName", &mut errors);

    let mut links: BTreeMap<String, Link> = BTreeMap::new();
    for e in dir.with_class("qosloopLink") {
        let key = dn::normalize(&e.dn);
        match link(e, &dir) {
            Ok(l) => {
                links.insert(key, l);
            }
            Err(mut errs) => {
                errors.append(&mut errs);
                if let Some(old) = previous.links.iter().find(|l| dn::normalize(&l.dn) == key) {
                    links.insert(key, old.clone());
                }
            }
        }
    }
    reject_duplicate_names(&mut links, |l| &l.name, "qosloopLinkName", &mut errors);

    let mut devices: BTreeMap<String, DeviceRole> = BTreeMap::new();
    for e in dir.with_class("qosloopDeviceRole") {
        let key = dn::normalize(&e.dn);
        let checked = match dir.problems(e).first() {
            Some(problem) => Err(problem.clone()),
            None => device(e),
        };
        match checked {
            Ok(d) => {
                devices.insert(key, d);
            }
            Err(err) => {
                errors.push(err);
                if let Some(old) = previous
                    .devices
                    .iter()
                    .find(|d| dn::normalize(&d.dn) == key)
                {
                    devices.insert(key, old.clone());
                }
            }
        }
    }
    reject_duplicate_names(&mut devices, |d| &d.role, "qosloopRole", &mut errors);

    let class_names: HashMap<&str, &str> = classes
        .iter()
        .map(|(k, c)| (k.as_str(), c.name.as_str()))
        .collect();
    let link_names: HashMap<&str, &str> = links
        .iter()
        .map(|(k, l)| (k.as_str(), l.name.as_str()))
        .collect();
    let mut rules: BTreeMap<String, BusinessRule> = BTreeMap::new();
    for e in dir.rules() {
        let key = dn::normalize(&e.dn);
        match rule(e, &dir, &class_names, &link_names) {
            Ok(r) => {
                rules.insert(key, r);
            }
            Err(mut errs) => {
                errors.append(&mut errs);
                let old = previous.rules.iter().find(|r| dn::normalize(&r.dn) == key);
                // The old version only stands if what it refers to still does.
                if let Some(old) = old.filter(|r| {
                    classes.values().any(|c| c.name == r.service_class)
                        && links.values().any(|l| l.name == r.link)
                }) {
                    rules.insert(key, old.clone());
                }
            }
        }
    }
    reject_conflicts(&mut rules, previous, &mut errors);

    let mut rules: Vec<BusinessRule> = rules.into_values().collect();
    rules.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then_with(|| dn::normalize(&a.dn).cmp(&dn::normalize(&b.dn)))
    });
    errors.sort();
    errors.dedup();
    Build {
        policy: PolicySet {
            rules,
            classes: classes.into_values().collect(),
            links: links.into_values().collect(),
            devices: devices.into_values().collect(),
        },
        errors,
    }
}

/// The entries indexed by normalized DN and by parent, with the problems
/// found in each entry on its own (attributes its object classes do not
/// allow, a DN given twice).
struct Directory<'a> {
    by_dn: HashMap<String, &'a Entry>,
    children: HashMap<String, Vec<&'a Entry>>,
    sorted: Vec<&'a Entry>,
    problems: HashMap<String, Vec<PolicyError>>,
}

impl<'a> Directory<'a> {
    fn new(entries: &'a [Entry]) -> Directory<'a> {
        let mut sorted: Vec<&Entry> = entries.iter().collect();
        sorted.sort_by_cached_key(|e| dn::normalize(&e.dn));
        let mut by_dn = HashMap::new();
        let mut children: HashMap<String, Vec<&Entry>> = HashMap::new();
        let mut problems: HashMap<String, Vec<PolicyError>> = HashMap::new();
        let mut copies: HashMap<String, Vec<&Entry>> = HashMap::new();
        for e in &sorted {
            let key = dn::normalize(&e.dn);
            copies.entry(key.clone()).or_default().push(*e);
            let errors = super::attributes::check(e);
            if !errors.is_empty() {
                problems.entry(key.clone()).or_default().extend(errors);
            }
            if by_dn.insert(key, *e).is_none() {
                children.entry(dn::parent(&e.dn)).or_default().push(*e);
            }
        }
        for (key, same) in copies.into_iter().filter(|(_, v)| v.len() > 1) {
            let lines: Vec<String> = same
                .iter()
                .filter(|e| e.line > 0)
                .map(|e| e.line.to_string())
                .collect();
            let at = if lines.is_empty() {
                String::new()
            } else {
                format!(" (lines {})", lines.join(", "))
            };
            problems.entry(key).or_default().push(PolicyError::new(
                &same[0].dn,
                None,
                format!(
                    "duplicate DN: the entry is given {} times{at}; which one holds is ambiguous",
                    same.len()
                ),
            ));
        }
        Directory {
            by_dn,
            children,
            sorted,
            problems,
        }
    }

    /// The problems of `e` on its own (empty when none).
    fn problems(&self, e: &Entry) -> &[PolicyError] {
        self.problems
            .get(&dn::normalize(&e.dn))
            .map_or(&[], Vec::as_slice)
    }

    /// Every entry's own problems.
    fn all_problems(&self) -> impl Iterator<Item = &PolicyError> {
        self.problems.values().flatten()
    }

    /// Entries of `class`, each DN once (a duplicate DN's first copy, which
    /// is rejected for being duplicate).
    fn with_class(&self, class: &'a str) -> impl Iterator<Item = &'a Entry> + '_ {
        self.unique().filter(move |e| e.has_class(class))
    }

    fn unique(&self) -> impl Iterator<Item = &'a Entry> + '_ {
        self.sorted.iter().copied().filter(|e| {
            self.by_dn
                .get(&dn::normalize(&e.dn))
                .is_some_and(|first| std::ptr::eq(*first, *e))
        })
    }

    fn rules(&self) -> impl Iterator<Item = &'a Entry> + '_ {
        self.unique().filter(|e| {
            e.has_class("pcimRuleInstance")
                || e.has_class("pcimRuleAuxClass")
                || e.has_class("pcimRule")
        })
    }

    fn get(&self, dn: &str) -> Option<&'a Entry> {
        self.by_dn.get(&dn::normalize(dn)).copied()
    }

    fn children_of(&self, e: &Entry) -> &[&'a Entry] {
        self.children
            .get(&dn::normalize(&e.dn))
            .map_or(&[], Vec::as_slice)
    }
}

/// Typed access to one entry's attributes, with errors naming DN and
/// attribute.
struct Reader<'a>(&'a Entry);

impl<'a> Reader<'a> {
    fn err(&self, attr: &str, message: impl Into<String>) -> PolicyError {
        PolicyError::new(&self.0.dn, Some(attr), message)
    }

    fn single(&self, attr: &str) -> Result<Option<&'a str>, PolicyError> {
        match self.0.get(attr) {
            [] => Ok(None),
            [one] => Ok(Some(one.trim())),
            many => Err(self.err(
                attr,
                format!("is single-valued but has {} values", many.len()),
            )),
        }
    }

    fn required(&self, attr: &str) -> Result<&'a str, PolicyError> {
        match self.single(attr)? {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(self.err(attr, "is required")),
        }
    }

    fn parse<T, E: fmt::Display>(
        &self,
        attr: &str,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Result<Option<T>, PolicyError> {
        self.single(attr)?
            .map(|v| parse(v).map_err(|e| self.err(attr, format!("{v:?}: {e}"))))
            .transpose()
    }

    fn integer(&self, attr: &str) -> Result<Option<u64>, PolicyError> {
        self.parse(attr, |v| {
            v.parse::<u64>()
                .map_err(|_| "expected a non-negative integer")
        })
    }

    fn kbps(&self, attr: &str) -> Result<Option<Kbps>, PolicyError> {
        self.parse(attr, |v| v.parse::<Kbps>())
    }

    fn dscp(&self, attr: &str) -> Result<Option<Dscp>, PolicyError> {
        self.parse(attr, |v| v.parse::<Dscp>())
    }

    fn boolean(&self, attr: &str) -> Result<Option<bool>, PolicyError> {
        self.parse(attr, |v| match v {
            "TRUE" => Ok(true),
            "FALSE" => Ok(false),
            _ => Err("expected TRUE or FALSE"),
        })
    }

    fn required_kbps(&self, attr: &str) -> Result<Kbps, PolicyError> {
        self.kbps(attr)?
            .ok_or_else(|| self.err(attr, "is required"))
    }

    fn required_integer(&self, attr: &str) -> Result<u64, PolicyError> {
        self.integer(attr)?
            .ok_or_else(|| self.err(attr, "is required"))
    }
}

/// Collects the first error of each fallible step.
#[derive(Default)]
struct Errors(Vec<PolicyError>);

impl Errors {
    fn take<T>(&mut self, r: Result<T, PolicyError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.0.push(e);
                None
            }
        }
    }
}
