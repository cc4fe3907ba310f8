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
    OutOfProfileAction, PolicySet, PortRange, ServiceClass, TrafficProfile,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

mod rules;
#[cfg(test)]
mod tests_per_user;

pub use rules::intersect;
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

fn service_class(e: &Entry, dir: &Directory<'_>) -> Result<ServiceClass, Vec<PolicyError>> {
    let r = Reader(e);
    let mut errs = Errors(dir.problems(e).to_vec());
    let name = errs.take(r.required("qosloopClassName").map(str::to_owned));
    let rate = errs.take(r.required_kbps("qosloopProfileRate").and_then(|k| {
        if k.0 == 0 {
            Err(r.err("qosloopProfileRate", "must be above 0"))
        } else {
            Ok(k)
        }
    }));
    let burst = errs.take(r.required_integer("qosloopProfileBurst").and_then(|b| {
        if b == 0 {
            Err(r.err("qosloopProfileBurst", "must be above 0"))
        } else {
            Ok(b)
        }
    }));
    let in_profile_dscp = errs.take(r.dscp("qosloopInProfileDSCP"));
    let mut bands: Vec<(&Entry, LoadBand)> = Vec::new();
    for child in dir.children_of(e) {
        if child.has_class("qosloopLoadBand") {
            errs.0.extend_from_slice(dir.problems(child));
            if let Some(b) = errs.take(band(child)) {
                bands.push((child, b));
            }
        }
    }
    if errs.0.is_empty() {
        check_bands(e, &mut bands, &mut errs);
    }
    match (name, rate, burst, in_profile_dscp, errs.0.is_empty()) {
        (Some(name), Some(rate), Some(burst_bytes), Some(in_profile_dscp), true) => {
            Ok(ServiceClass {
                dn: e.dn.clone(),
                name,
                profile: TrafficProfile { rate, burst_bytes },
                in_profile_dscp,
                out_of_profile: bands.into_iter().map(|(_, b)| b).collect(),
            })
        }
        _ => Err(errs.0),
    }
}

/// Bands must cover `[0, ∞)` without gaps or overlaps.
fn check_bands(class: &Entry, bands: &mut [(&Entry, LoadBand)], errs: &mut Errors) {
    bands.sort_by_key(|(_, b)| (b.from, b.to.map_or(u64::MAX, |k| k.0)));
    let Some((first, b0)) = bands.first() else {
        errs.0.push(PolicyError::new(
            &class.dn,
            None,
            "the service class has no qosloopLoadBand children: out-of-profile traffic would have no treatment",
        ));
        return;
    };
    if b0.from.0 != 0 {
        errs.0.push(PolicyError::new(
            &first.dn,
            Some("qosloopBandFrom"),
            format!(
                "the lowest band starts at {} kbit/s: loads below it have no band (gap)",
                b0.from.0
            ),
        ));
    }
    for pair in bands.windows(2) {
        let ((lower_entry, lower), (upper_entry, upper)) = (&pair[0], &pair[1]);
        match lower.to {
            None => errs.0.push(PolicyError::new(
                &upper_entry.dn,
                Some("qosloopBandFrom"),
                format!(
                    "overlaps band {} ({}), which is unbounded above {} kbit/s",
                    lower.name, lower_entry.dn, lower.from.0
                ),
            )),
            Some(to) if upper.from < to => errs.0.push(PolicyError::new(
                &upper_entry.dn,
                Some("qosloopBandFrom"),
                format!(
                    "starts at {} kbit/s, inside band {} ({}) which ends at {} kbit/s (overlap)",
                    upper.from.0, lower.name, lower_entry.dn, to.0
                ),
            )),
            Some(to) if upper.from > to => errs.0.push(PolicyError::new(
                &upper_entry.dn,
                Some("qosloopBandFrom"),
                format!(
                    "starts at {} kbit/s but band {} ({}) ends at {} kbit/s: loads in between have no band (gap)",
                    upper.from.0, lower.name, lower_entry.dn, to.0
                ),
            )),
            Some(_) => {}
        }
    }
    if let Some((last_entry, last)) = bands.last() {
        if let Some(to) = last.to {
            errs.0.push(PolicyError::new(
                &last_entry.dn,
                Some("qosloopBandTo"),
                format!(
                    "the highest band ends at {} kbit/s: loads above it have no band (gap); leave qosloopBandTo out for an unbounded band",
                    to.0
                ),
            ));
        }
    }
}

fn band(e: &Entry) -> Result<LoadBand, PolicyError> {
    let r = Reader(e);
    let name = r.required("qosloopBandName")?.to_owned();
    let from = r.required_kbps("qosloopBandFrom")?;
    let to = r.kbps("qosloopBandTo")?;
    if let Some(to) = to {
        if to <= from {
            return Err(r.err(
                "qosloopBandTo",
                format!(
                    "{} kbit/s is not above qosloopBandFrom ({} kbit/s)",
                    to.0, from.0
                ),
            ));
        }
    }
    let shape = r.kbps("qosloopShapeRate")?;
    let remark = r.dscp("qosloopRemarkDSCP")?;
    let action_text = r.required("qosloopBandAction")?;
    let action = match action_text.to_ascii_lowercase().as_str() {
        "accept" => OutOfProfileAction::Accept { shape },
        "remark" => OutOfProfileAction::Remark {
            dscp: remark.ok_or_else(|| {
                r.err(
                    "qosloopRemarkDSCP",
                    "is required when qosloopBandAction is remark",
                )
            })?,
            shape,
        },
        "drop" => OutOfProfileAction::Drop,
        other => {
            return Err(r.err(
                "qosloopBandAction",
                format!("unknown action {other:?} (use accept, remark or drop)"),
            ))
        }
    };
    if remark.is_some() && !matches!(action, OutOfProfileAction::Remark { .. }) {
        return Err(r.err(
            "qosloopRemarkDSCP",
            format!("only applies to remark, not {action_text}"),
        ));
    }
    if shape.is_some() && action == OutOfProfileAction::Drop {
        return Err(r.err("qosloopShapeRate", "dropped traffic cannot be shaped"));
    }
    Ok(LoadBand {
        name,
        from,
        to,
        action,
    })
}

/// A `qosloopFlowCondition`: the flow spec and the users it names.
fn flow_condition(e: &Entry) -> Result<(FlowSpec, Vec<String>), PolicyError> {
    let r = Reader(e);
    let proto = match r.integer("qosloopProtocol")? {
        Some(p) => Some(
            u8::try_from(p).map_err(|_| r.err("qosloopProtocol", format!("{p} is not 0..=255")))?,
        ),
        None => None,
    };
    let spec = FlowSpec {
        src: r.parse("qosloopSrcPrefix", |v| v.parse::<IpPrefix>())?,
        dst: r.parse("qosloopDstPrefix", |v| v.parse::<IpPrefix>())?,
        proto,
        src_ports: r.parse("qosloopSrcPorts", |v| v.parse::<PortRange>())?,
        dst_ports: r.parse("qosloopDstPorts", |v| v.parse::<PortRange>())?,
        user: None,
    };
    let users = e
        .get("qosloopUser")
        .iter()
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect();
    Ok((spec, users))
}

fn link(e: &Entry, dir: &Directory<'_>) -> Result<Link, Vec<PolicyError>> {
    let r = Reader(e);
    let mut errs = Errors(dir.problems(e).to_vec());
    let name = errs.take(r.required("qosloopLinkName").map(str::to_owned));
    let capacity = errs.take(r.required_kbps("qosloopLinkCapacity").and_then(|k| {
        if k.0 == 0 {
            Err(r.err("qosloopLinkCapacity", "must be above 0"))
        } else {
            Ok(k)
        }
    }));
    let mut traffic = Vec::new();
    for child in dir.children_of(e) {
        if child.has_class("qosloopFlowCondition") {
            errs.0.extend_from_slice(dir.problems(child));
            if let Some((spec, users)) = errs.take(flow_condition(child)) {
                if !users.is_empty() {
                    errs.0.push(PolicyError::new(
                        &child.dn,
                        Some("qosloopUser"),
                        "link traffic is selected by addresses and ports, not by users",
                    ));
                }
                traffic.push(spec);
            }
        }
    }
    match (name, capacity, errs.0.is_empty()) {
        (Some(name), Some(capacity), true) => Ok(Link {
            dn: e.dn.clone(),
            name,
            capacity,
            traffic,
        }),
        _ => Err(errs.0),
    }
}

fn device(e: &Entry) -> Result<DeviceRole, PolicyError> {
    let r = Reader(e);
    let role = r.required("qosloopRole")?.to_owned();
    let interface = r.required("qosloopInterface")?.to_owned();
    // Linux interface names: at most 15 bytes, no '/', no whitespace.
    if interface.len() > 15 || interface.contains('/') || interface.chars().any(char::is_whitespace)
    {
        return Err(r.err(
            "qosloopInterface",
            format!("{interface:?} is not a Linux interface name (at most 15 characters, no '/' or spaces)"),
        ));
    }
    let direction = match r
        .required("qosloopDirection")?
        .to_ascii_lowercase()
        .as_str()
    {
        "egress" => Direction::Egress,
        "ingress" => Direction::Ingress,
        other => {
            return Err(r.err(
                "qosloopDirection",
                format!("unknown direction {other:?} (use egress or ingress)"),
            ))
        }
    };
    let capacity = r.required_kbps("qosloopDeviceCapacity")?;
    if capacity.0 == 0 {
        return Err(r.err("qosloopDeviceCapacity", "must be above 0"));
    }
    Ok(DeviceRole {
        dn: e.dn.clone(),
        role,
        interface,
        direction,
        capacity,
    })
}

fn reject_duplicate_names<T>(
    objects: &mut BTreeMap<String, T>,
    name: impl Fn(&T) -> &String,
    attr: &str,
    errors: &mut Vec<PolicyError>,
) {
    let mut seen: HashMap<String, String> = HashMap::new();
    let mut dropped = Vec::new();
    for (key, o) in objects.iter() {
        let n = name(o).to_lowercase();
        match seen.get(&n) {
            Some(first) => {
                errors.push(PolicyError::new(
                    key,
                    Some(attr),
                    format!("{:?} is already the name of {first}", name(o)),
                ));
                dropped.push(key.clone());
            }
            None => {
                seen.insert(n, key.clone());
            }
        }
    }
    for key in dropped {
        objects.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::rules::combine;
    use super::*;
    use crate::repo::ldif;
    use qosloop_schema::{DecisionKind, SAMPLE_POLICY_LDIF};

    fn sample() -> Vec<Entry> {
        ldif::parse(SAMPLE_POLICY_LDIF).unwrap()
    }

    fn with_entry(mut entries: Vec<Entry>, text: &str) -> Vec<Entry> {
        entries.extend(ldif::parse(text).unwrap());
        entries
    }

    fn replace(entries: &mut [Entry], dn: &str, attr: &str, value: Option<&str>) {
        let e = entries.iter_mut().find(|e| e.dn.starts_with(dn)).unwrap();
        e.attrs.retain(|(n, _)| !n.eq_ignore_ascii_case(attr));
        if let Some(v) = value {
            e.push(attr, v);
        }
    }

    #[test]
    fn the_sample_policy_is_the_reference_experiment() {
        let p = build_strict(&sample()).unwrap();
        assert_eq!(p.rules.len(), 1);
        let r = &p.rules[0];
        assert_eq!(
            (r.name.as_str(), r.priority, r.enabled),
            ("policed-flow", 100, true)
        );
        assert_eq!(r.roles, ["edge"]);
        assert_eq!(r.service_class, "gold");
        assert_eq!(r.link, "edge-ingress");
        assert_eq!(r.flows.len(), 1);
        assert_eq!(
            r.flows[0].to_string(),
            "10.71.1.2/32:* -> 10.71.2.2/32:4055 proto 17"
        );
        let c = &p.classes[0];
        assert_eq!(c.profile.rate, Kbps(1000));
        assert_eq!(c.profile.burst_bytes, 15_000);
        assert_eq!(c.in_profile_dscp, Some(Dscp::CS6));
        let kinds: Vec<_> = [0, 2999, 3000, 5999, 6000, 100_000]
            .iter()
            .map(|&l| c.band_for(Kbps(l)).map(|b| b.action.kind()))
            .collect();
        use DecisionKind::*;
        assert_eq!(
            kinds,
            [Accept, Accept, Remark, Remark, Drop, Drop].map(Some)
        );
        assert_eq!(c.out_of_profile[0].action.shape(), Some(Kbps(875)));
        assert_eq!(
            c.out_of_profile[1].action,
            OutOfProfileAction::Remark {
                dscp: Dscp::BEST_EFFORT,
                shape: Some(Kbps(125))
            }
        );
        assert_eq!(p.links[0].capacity, Kbps(10_000));
        assert_eq!(
            p.links[0].traffic[0].to_string(),
            "*:* -> 10.71.2.0/24:5000-5999 proto 17"
        );
        assert_eq!(p.devices[0].role, "edge");
        assert_eq!(p.devices[0].direction, Direction::Egress);
    }

    /// The error of the entry whose DN starts with `dn`; errors of other
    /// entries may only be the consequence (a rule whose class is invalid).
    fn error_of(entries: &[Entry], dn: &str) -> PolicyError {
        let errs = build_strict(entries).unwrap_err().0;
        let (mine, others): (Vec<_>, Vec<_>) = errs.into_iter().partition(|e| e.dn.starts_with(dn));
        assert_eq!(mine.len(), 1, "{mine:?}");
        for o in &others {
            assert!(o.message.contains("invalid"), "unrelated error {o}");
        }
        mine[0].clone()
    }

    fn only_error(entries: &[Entry]) -> PolicyError {
        let errs = build_strict(entries).unwrap_err().0;
        assert_eq!(errs.len(), 1, "{errs:?}");
        errs[0].clone()
    }

    #[test]
    fn wrong_types_name_the_dn_and_attribute() {
        let mut e = sample();
        replace(&mut e, "cn=gold", "qosloopProfileRate", Some("fast"));
        let err = error_of(&e, "cn=gold");
        assert_eq!(err.dn, "cn=gold,ou=classes,dc=qosloop,dc=example");
        assert_eq!(err.attribute.as_deref(), Some("qosloopProfileRate"));

        let mut e = sample();
        replace(&mut e, "cn=five-tuple", "qosloopProtocol", Some("300"));
        let err = only_error(&e);
        assert!(err.dn.starts_with("cn=five-tuple"));
        assert_eq!(err.attribute.as_deref(), Some("qosloopProtocol"));

        let mut e = sample();
        replace(
            &mut e,
            "cn=five-tuple",
            "qosloopDstPrefix",
            Some("10.71.2.300"),
        );
        assert_eq!(
            only_error(&e).attribute.as_deref(),
            Some("qosloopDstPrefix")
        );

        let mut e = sample();
        replace(&mut e, "cn=medium", "qosloopBandAction", Some("police"));
        let err = error_of(&e, "cn=medium");
        assert!(err.dn.starts_with("cn=medium"));
        assert!(err.message.contains("unknown action"), "{err}");
    }

    #[test]
    fn dangling_dns_are_errors() {
        let mut e = sample();
        replace(
            &mut e,
            "cn=service",
            "pcimActionDN",
            Some("cn=silver,ou=classes,dc=qosloop,dc=example"),
        );
        let err = only_error(&e);
        assert!(err.dn.starts_with("cn=service"));
        assert_eq!(err.attribute.as_deref(), Some("pcimActionDN"));
        assert!(err.message.contains("dangling"), "{err}");

        let mut e = sample();
        replace(
            &mut e,
            "cn=policed-flow",
            "qosloopLinkDN",
            Some("cn=nowhere"),
        );
        assert_eq!(only_error(&e).attribute.as_deref(), Some("qosloopLinkDN"));
    }

    #[test]
    fn band_gaps_and_overlaps_are_errors() {
        let mut e = sample();
        replace(&mut e, "cn=medium", "qosloopBandFrom", Some("3500"));
        let err = error_of(&e, "cn=medium");
        assert!(err.dn.starts_with("cn=medium"));
        assert!(err.message.contains("gap"), "{err}");

        let mut e = sample();
        replace(&mut e, "cn=medium", "qosloopBandTo", Some("6500"));
        let err = error_of(&e, "cn=high");
        assert!(err.dn.starts_with("cn=high"));
        assert!(err.message.contains("overlap"), "{err}");

        let mut e = sample();
        replace(&mut e, "cn=high", "qosloopBandTo", Some("9000"));
        assert_eq!(
            error_of(&e, "cn=high").attribute.as_deref(),
            Some("qosloopBandTo")
        );

        let mut e = sample();
        replace(&mut e, "cn=low", "qosloopBandFrom", Some("100"));
        assert!(error_of(&e, "cn=low").message.contains("gap"));
    }

    const SECOND_RULE: &str = "dn: cn=other,ou=rules,dc=qosloop,dc=example\n\
        objectClass: pcimRuleInstance\n\
        objectClass: qosloopRuleAuxClass\n\
        cn: other\n\
        pcimRulePriority: 100\n\
        pcimRoles: edge\n\
        qosloopLinkDN: cn=edge-ingress,ou=links,dc=qosloop,dc=example\n\
        pcimRuleConditionList: cn=udp-to-receiver,ou=rules,dc=qosloop,dc=example\n\
        \n\
        dn: cn=udp-to-receiver,ou=rules,dc=qosloop,dc=example\n\
        objectClass: pcimRuleConditionAssociation\n\
        objectClass: qosloopFlowCondition\n\
        cn: udp-to-receiver\n\
        pcimConditionGroupNumber: 1\n\
        pcimConditionNegated: FALSE\n\
        qosloopDstPrefix: 10.71.2.0/24\n\
        qosloopProtocol: 17\n\
        \n\
        dn: cn=service,cn=other,ou=rules,dc=qosloop,dc=example\n\
        objectClass: pcimRuleActionAssociation\n\
        cn: service\n\
        pcimActionOrder: 1\n\
        pcimActionDN: cn=gold,ou=classes,dc=qosloop,dc=example\n";

    #[test]
    fn overlapping_rules_of_equal_priority_conflict() {
        let e = with_entry(sample(), SECOND_RULE);
        let err = only_error(&e);
        assert_eq!(err.attribute.as_deref(), Some("pcimRulePriority"));
        let (other, policed) = (
            "cn=other,ou=rules,dc=qosloop,dc=example",
            "cn=policed-flow,ou=rules,dc=qosloop,dc=example",
        );
        assert!(
            (err.dn == other && err.message.contains(policed))
                || (err.dn == policed && err.message.contains(other)),
            "{err}"
        );
        // The rule in force stays, even when the newcomer sorts first.
        let prev = build_strict(&sample()).unwrap();
        let b = build(&e, &prev);
        assert_eq!(b.policy, prev);
        assert_eq!(b.errors[0].dn, other);
        // Another priority resolves it.
        let e = with_entry(
            sample(),
            &SECOND_RULE.replace("pcimRulePriority: 100", "pcimRulePriority: 10"),
        );
        let p = build_strict(&e).unwrap();
        assert_eq!(
            p.rules.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["policed-flow", "other"]
        );
    }

    #[test]
    fn an_invalid_object_keeps_its_last_good_version_and_the_rest_update() {
        let prev = build_strict(&sample()).unwrap();
        let mut e = sample();
        replace(&mut e, "cn=gold", "qosloopProfileRate", Some("-5"));
        replace(
            &mut e,
            "cn=edge-ingress",
            "qosloopLinkCapacity",
            Some("20000"),
        );
        let b = build(&e, &prev);
        assert_eq!(b.errors.len(), 1);
        assert_eq!(b.policy.classes, prev.classes);
        assert_eq!(b.policy.links[0].capacity, Kbps(20_000));
        assert_eq!(b.policy.rules, prev.rules);
        // A new invalid rule is rejected; the others stay.
        let e = with_entry(sample(), &SECOND_RULE.replace("pcimRoles: edge\n", ""));
        let b = build(&e, &prev);
        assert_eq!(b.policy, prev);
        assert_eq!(b.errors[0].attribute.as_deref(), Some("pcimRoles"));
    }

    #[test]
    fn dnf_groups_intersect_and_cnf_multiplies_out() {
        let a: FlowSpec = FlowSpec {
            dst: Some("10.0.0.0/8".parse().unwrap()),
            ..FlowSpec::default()
        };
        let b = FlowSpec {
            dst: Some("10.1.0.0/16".parse().unwrap()),
            proto: Some(6),
            ..FlowSpec::default()
        };
        let c = FlowSpec {
            proto: Some(17),
            ..FlowSpec::default()
        };
        let mut g = BTreeMap::new();
        g.insert(1, vec![a.clone(), b.clone()]);
        assert_eq!(combine(g.clone(), false).unwrap(), vec![b.clone()]);
        g.insert(2, vec![c.clone()]);
        assert_eq!(combine(g.clone(), false).unwrap().len(), 2);
        // CNF: (a or b) and (c) = a∩c (b∩c is empty).
        let cnf = combine(g, true).unwrap();
        assert_eq!(cnf, vec![intersect(&a, &c).unwrap()]);
        let mut g = BTreeMap::new();
        g.insert(1, vec![b, c]);
        assert!(combine(g, false).is_err());
    }

    /// Issue 11 item 7: `qosloopShapRate` (misspelled) was ignored and the
    /// band became unshaped accept.
    #[test]
    fn a_misspelled_optional_attribute_is_an_error_naming_dn_and_attribute() {
        let mut e = sample();
        let shaped = "cn=low,cn=gold";
        replace(&mut e, shaped, "qosloopShapeRate", None);
        replace(&mut e, shaped, "qosloopShapRate", Some("875"));
        let errs = build_strict(&e).unwrap_err().0;
        let err = errs
            .iter()
            .find(|x| x.dn.starts_with(shaped))
            .unwrap_or_else(|| panic!("{errs:?}"));
        assert_eq!(err.attribute.as_deref(), Some("qosloopShapRate"));
        assert!(err.message.contains("unknown attribute"), "{err}");
        // Running: the class keeps its last good version (shaped), the
        // misspelling is reported.
        let prev = build_strict(&sample()).unwrap();
        let b = build(&e, &prev);
        assert_eq!(b.policy.classes, prev.classes);
        assert!(b
            .errors
            .iter()
            .any(|x| x.attribute.as_deref() == Some("qosloopShapRate")));
    }

    #[test]
    fn an_attribute_of_another_class_is_an_error() {
        let mut e = sample();
        replace(&mut e, "cn=policed-flow", "qosloopShapeRate", Some("100"));
        let err = only_error(&e);
        assert!(err.dn.starts_with("cn=policed-flow"), "{err}");
        assert_eq!(err.attribute.as_deref(), Some("qosloopShapeRate"));
        assert!(err.message.contains("not allowed"), "{err}");
    }

    /// Issue 11 item 7: a DN given twice was accepted (the last copy won).
    #[test]
    fn a_duplicate_dn_is_an_error_naming_the_dn() {
        let text = format!(
            "{SAMPLE_POLICY_LDIF}\ndn: cn=edge-ingress,ou=links,dc=qosloop,dc=example\n\
             objectClass: pcimPolicyInstance\nobjectClass: qosloopLink\n\
             cn: edge-ingress\nqosloopLinkName: edge-ingress\nqosloopLinkCapacity: 99\n"
        );
        let e = ldif::parse(&text).unwrap();
        let errs = build_strict(&e).unwrap_err().0;
        let dup = errs
            .iter()
            .find(|x| x.message.contains("duplicate DN"))
            .unwrap_or_else(|| panic!("{errs:?}"));
        assert_eq!(dup.dn, "cn=edge-ingress,ou=links,dc=qosloop,dc=example");
        assert!(dup.message.contains("2 times"), "{dup}");
        // Running: the link keeps its last good version.
        let prev = build_strict(&sample()).unwrap();
        assert_eq!(build(&e, &prev).policy.links, prev.links);
    }

    #[test]
    fn negated_conditions_are_refused() {
        let mut e = sample();
        replace(
            &mut e,
            "cn=five-tuple",
            "pcimConditionNegated",
            Some("TRUE"),
        );
        assert_eq!(
            only_error(&e).attribute.as_deref(),
            Some("pcimConditionNegated")
        );
    }
}
