//! RFC 3703 rules: a `pcimRuleInstance`'s condition and action
//! associations (children or `pcimRule…List` references) assembled into a
//! [`BusinessRule`], DNF/CNF conditions multiplied out into flow specs
//! (bounded by [`MAX_SPECS`]), and rules whose flows overlap at the same
//! priority rejected.

use super::*;

/// The packets both specs match, or `None` when they share none.
pub fn intersect(a: &FlowSpec, b: &FlowSpec) -> Option<FlowSpec> {
    fn prefix(a: Option<IpPrefix>, b: Option<IpPrefix>) -> Option<Option<IpPrefix>> {
        match (a, b) {
            (Some(a), Some(b)) => {
                if a.prefix_len() <= b.prefix_len() && a.contains(b.addr()) {
                    Some(Some(b))
                } else if b.prefix_len() <= a.prefix_len() && b.contains(a.addr()) {
                    Some(Some(a))
                } else {
                    None
                }
            }
            (x, None) | (None, x) => Some(x),
        }
    }
    fn ports(a: Option<PortRange>, b: Option<PortRange>) -> Option<Option<PortRange>> {
        match (a, b) {
            (Some(a), Some(b)) => {
                let (first, last) = (a.first.max(b.first), a.last.min(b.last));
                (first <= last).then_some(Some(PortRange { first, last }))
            }
            (x, None) | (None, x) => Some(x),
        }
    }
    let proto = match (a.proto, b.proto) {
        (Some(x), Some(y)) if x != y => return None,
        (x, y) => x.or(y),
    };
    Some(FlowSpec {
        src: prefix(a.src, b.src)?,
        dst: prefix(a.dst, b.dst)?,
        proto,
        src_ports: ports(a.src_ports, b.src_ports)?,
        dst_ports: ports(a.dst_ports, b.dst_ports)?,
        user: match (&a.user, &b.user) {
            (Some(x), Some(y)) if x != y => return None,
            (x, y) => x.clone().or_else(|| y.clone()),
        },
    })
}

/// Most users one per-user rule may name (directly and through groups).
const MAX_USERS: usize = 4096;

/// A user name as records carry it: 1–256 bytes, no control character.
pub(crate) fn valid_user(u: &str) -> Result<(), String> {
    if u.is_empty() || u.len() > 256 {
        return Err(format!("{} bytes: a user name has 1..=256", u.len()));
    }
    if u.chars().any(char::is_control) {
        return Err(format!("{u:?} contains a control character"));
    }
    Ok(())
}

/// The users of a per-user rule (`qosloopPerUserRuleAuxClass`): its
/// `qosloopRuleUser` values and the members of its `qosloopRuleGroupDN`
/// groups (a `qosloopUserGroup`'s `qosloopMemberUid`, or a `posixGroup`'s
/// `memberUid`), added to `users`; returns the band basis.
fn per_user_members(
    e: &Entry,
    dir: &Directory<'_>,
    users: &mut BTreeSet<String>,
    errs: &mut Errors,
) -> Option<BandBasis> {
    let r = Reader(e);
    let basis = errs.take(r.single("qosloopBandBasis").and_then(|v| {
        match v.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("link") => Ok(BandBasis::Link),
            Some("user") => Ok(BandBasis::User),
            Some(other) => Err(r.err(
                "qosloopBandBasis",
                format!("{other:?} is not link (the link load) or user (the user's own rate)"),
            )),
        }
    }));
    for u in e.get("qosloopRuleUser") {
        let u = u.trim();
        match valid_user(u) {
            Ok(()) => {
                users.insert(u.to_owned());
            }
            Err(why) => errs.0.push(r.err("qosloopRuleUser", why)),
        }
    }
    for g in e.get("qosloopRuleGroupDN") {
        let g = g.trim();
        let members_attr = match dir.get(g) {
            None => {
                errs.0.push(r.err(
                    "qosloopRuleGroupDN",
                    format!("{g} does not exist (dangling DN)"),
                ));
                continue;
            }
            Some(ge) if ge.has_class("qosloopUserGroup") => (ge, "qosloopMemberUid"),
            Some(ge) if ge.has_class("posixGroup") => (ge, "memberUid"),
            Some(_) => {
                errs.0.push(r.err(
                    "qosloopRuleGroupDN",
                    format!("{g} is not a group (qosloopUserGroup or posixGroup)"),
                ));
                continue;
            }
        };
        let (ge, attr) = members_attr;
        errs.0.extend_from_slice(dir.problems(ge));
        if ge.has_class("qosloopUserGroup") {
            errs.take(Reader(ge).required("qosloopGroupName"));
        }
        for m in ge.get(attr) {
            let m = m.trim();
            match valid_user(m) {
                Ok(()) => {
                    users.insert(m.to_owned());
                }
                Err(why) => errs.0.push(Reader(ge).err(attr, why)),
            }
        }
    }
    if users.is_empty() {
        errs.0.push(r.err(
            "qosloopRuleUser",
            "a per-user rule names no user: give qosloopRuleUser, qosloopRuleGroupDN (with members) or qosloopUser on a condition",
        ));
    }
    if users.len() > MAX_USERS {
        errs.0.push(r.err(
            "qosloopRuleGroupDN",
            format!("names {} users; at most {MAX_USERS}", users.len()),
        ));
    }
    basis
}

/// Most flow specs one rule may expand to (CNF is multiplied out).
const MAX_SPECS: usize = 1024;

pub(super) fn rule(
    e: &Entry,
    dir: &Directory<'_>,
    classes: &HashMap<&str, &str>,
    links: &HashMap<&str, &str>,
) -> Result<BusinessRule, Vec<PolicyError>> {
    let r = Reader(e);
    let mut errs = Errors(dir.problems(e).to_vec());
    let name = errs
        .take(r.single("pcimRuleName"))
        .flatten()
        .map(str::to_owned)
        .or_else(|| dn::rdn_value(&e.dn))
        .unwrap_or_else(|| e.dn.clone());
    let enabled = errs.take(r.integer("pcimRuleEnabled").and_then(|v| match v {
        None | Some(1) | Some(3) => Ok(true),
        Some(2) => Ok(false),
        Some(other) => Err(r.err(
            "pcimRuleEnabled",
            format!("{other} is not 1 (enabled), 2 (disabled) or 3 (enabled for debug)"),
        )),
    }));
    let priority = errs.take(r.integer("pcimRulePriority").and_then(|p| {
        u32::try_from(p.unwrap_or(0)).map_err(|_| r.err("pcimRulePriority", "is above 4294967295"))
    }));
    let cnf = errs.take(
        r.integer("pcimRuleConditionListType")
            .and_then(|v| match v {
                None | Some(1) => Ok(false),
                Some(2) => Ok(true),
                Some(other) => Err(r.err(
                    "pcimRuleConditionListType",
                    format!("{other} is not 1 (DNF) or 2 (CNF)"),
                )),
            }),
    );
    let roles: Vec<String> = e
        .get("pcimRoles")
        .iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    if roles.is_empty() {
        errs.0.push(r.err(
            "pcimRoles",
            "is required: a rule is rendered only for the enforcer roles it names",
        ));
    }
    let link = errs.take(r.required("qosloopLinkDN").and_then(|target| {
        links
            .get(dn::normalize(target).as_str())
            .map(|n| (*n).to_owned())
            .ok_or_else(|| {
                r.err(
                    "qosloopLinkDN",
                    format!("{target} is not a valid qosloopLink entry (dangling DN)"),
                )
            })
    }));

    // Conditions: children that are associations, plus those listed.
    let conditions = associations(
        e,
        dir,
        "pcimRuleConditionAssociation",
        "pcimRuleConditionList",
        &mut errs,
    );
    let mut groups: BTreeMap<u64, Vec<FlowSpec>> = BTreeMap::new();
    let mut users = BTreeSet::new();
    for assoc in &conditions {
        errs.0.extend_from_slice(dir.problems(assoc));
        let a = Reader(assoc);
        let Some(group) = errs.take(a.required_integer("pcimConditionGroupNumber")) else {
            continue;
        };
        match errs.take(a.boolean("pcimConditionNegated")) {
            Some(Some(false)) => {}
            Some(Some(true)) => {
                errs.0.push(a.err(
                    "pcimConditionNegated",
                    "negated conditions are not supported: write the complement as conditions",
                ));
                continue;
            }
            Some(None) => {
                errs.0.push(a.err("pcimConditionNegated", "is required"));
                continue;
            }
            None => continue,
        }
        let condition = match errs.take(a.single("pcimConditionDN")) {
            None => continue,
            Some(Some(target)) => match dir.get(target) {
                Some(c) if c.has_class("qosloopFlowCondition") => c,
                Some(_) => {
                    errs.0.push(a.err(
                        "pcimConditionDN",
                        format!("{target} is not a qosloopFlowCondition"),
                    ));
                    continue;
                }
                None => {
                    errs.0.push(a.err(
                        "pcimConditionDN",
                        format!("{target} does not exist (dangling DN)"),
                    ));
                    continue;
                }
            },
            Some(None) if assoc.has_class("qosloopFlowCondition") => *assoc,
            Some(None) => {
                errs.0.push(a.err(
                    "pcimConditionDN",
                    "the association names no condition: give pcimConditionDN or add objectClass qosloopFlowCondition",
                ));
                continue;
            }
        };
        if !std::ptr::eq(condition, *assoc) {
            errs.0.extend_from_slice(dir.problems(condition));
        }
        if let Some((spec, u)) = errs.take(flow_condition(condition)) {
            groups.entry(group).or_default().push(spec);
            users.extend(u);
        }
    }
    let per_user = e.has_class("qosloopPerUserRuleAuxClass");
    let band_basis = if per_user {
        per_user_members(e, dir, &mut users, &mut errs)
    } else {
        Some(BandBasis::Link)
    };
    if conditions.is_empty() && !per_user {
        errs.0.push(r.err(
            "pcimRuleConditionList",
            "the rule has no condition association: it would select nothing",
        ));
    }
    let flows = if errs.0.is_empty() && !groups.is_empty() {
        match combine(groups, cnf == Some(true)) {
            Ok(f) => f,
            Err(why) => {
                errs.0.push(r.err("pcimRuleConditionListType", why));
                Vec::new()
            }
        }
    } else {
        Vec::new()
    };

    // Actions: exactly one service class.
    let actions = associations(
        e,
        dir,
        "pcimRuleActionAssociation",
        "pcimRuleActionList",
        &mut errs,
    );
    let mut service: Vec<String> = Vec::new();
    for assoc in &actions {
        errs.0.extend_from_slice(dir.problems(assoc));
        let a = Reader(assoc);
        errs.take(a.required_integer("pcimActionOrder"));
        let class_dn = match errs.take(a.single("pcimActionDN")) {
            None => continue,
            Some(Some(target)) => {
                if dir.get(target).is_none() {
                    errs.0.push(a.err(
                        "pcimActionDN",
                        format!("{target} does not exist (dangling DN)"),
                    ));
                    continue;
                }
                target.to_owned()
            }
            Some(None) if assoc.has_class("qosloopServiceClass") => assoc.dn.clone(),
            Some(None) => {
                errs.0.push(a.err(
                    "pcimActionDN",
                    "the association names no action: give pcimActionDN (a qosloopServiceClass)",
                ));
                continue;
            }
        };
        match classes.get(dn::normalize(&class_dn).as_str()) {
            Some(name) => service.push((*name).to_owned()),
            None if dir
                .get(&class_dn)
                .is_some_and(|c| c.has_class("qosloopServiceClass")) =>
            {
                errs.0.push(a.err(
                    "pcimActionDN",
                    format!("{class_dn} is an invalid service class (see its own error)"),
                ))
            }
            None => errs.0.push(a.err(
                "pcimActionDN",
                format!("{class_dn} is not a qosloopServiceClass"),
            )),
        }
    }
    let service_class = match service.as_slice() {
        [one] => Some(one.clone()),
        [] => {
            if errs.0.is_empty() {
                errs.0.push(r.err(
                    "pcimRuleActionList",
                    "the rule has no action association naming its service class",
                ));
            }
            None
        }
        many => {
            errs.0.push(r.err(
                "pcimRuleActionList",
                format!(
                    "the rule names {} service classes ({}); it needs exactly one",
                    many.len(),
                    many.join(", ")
                ),
            ));
            None
        }
    };

    match (
        enabled,
        priority,
        link,
        service_class,
        band_basis,
        errs.0.is_empty(),
    ) {
        (
            Some(enabled),
            Some(priority),
            Some(link),
            Some(service_class),
            Some(band_basis),
            true,
        ) => Ok(BusinessRule {
            dn: e.dn.clone(),
            name,
            priority,
            enabled,
            roles,
            flows,
            users: users.into_iter().collect(),
            per_user,
            band_basis,
            service_class,
            link,
        }),
        _ => Err(errs.0),
    }
}

/// Association entries of a rule: its children of `class`, and the DNs
/// listed in `list_attr` (which must exist and be of `class`).
fn associations<'a>(
    e: &Entry,
    dir: &Directory<'a>,
    class: &str,
    list_attr: &str,
    errs: &mut Errors,
) -> Vec<&'a Entry> {
    let mut out: Vec<&Entry> = dir
        .children_of(e)
        .iter()
        .copied()
        .filter(|c| c.has_class(class))
        .collect();
    for target in e.get(list_attr) {
        match dir.get(target) {
            Some(a) if a.has_class(class) => {
                if !out.iter().any(|o| std::ptr::eq(*o, a)) {
                    out.push(a);
                }
            }
            Some(_) => errs.0.push(PolicyError::new(
                &e.dn,
                Some(list_attr),
                format!("{target} is not a {class}"),
            )),
            None => errs.0.push(PolicyError::new(
                &e.dn,
                Some(list_attr),
                format!("{target} does not exist (dangling DN)"),
            )),
        }
    }
    out
}

/// DNF: each group is an AND (intersection) and the rule matches any group.
/// CNF: each group is an OR and the rule matches when every group does —
/// multiplied out into DNF.
pub(super) fn combine(
    groups: BTreeMap<u64, Vec<FlowSpec>>,
    cnf: bool,
) -> Result<Vec<FlowSpec>, String> {
    let mut flows: Vec<FlowSpec> = Vec::new();
    if cnf {
        let mut product = vec![FlowSpec::default()];
        for (_, alternatives) in groups {
            let mut next = Vec::new();
            for p in &product {
                for alt in &alternatives {
                    if let Some(i) = intersect(p, alt) {
                        if !next.contains(&i) {
                            next.push(i);
                        }
                    }
                }
            }
            if next.len() > MAX_SPECS {
                return Err(format!(
                    "the CNF conditions multiply out to more than {MAX_SPECS} flow specs"
                ));
            }
            product = next;
        }
        flows = product;
    } else {
        for (group, specs) in groups {
            let mut acc = Some(FlowSpec::default());
            for s in &specs {
                acc = acc.and_then(|a| intersect(&a, s));
            }
            match acc {
                Some(spec) if !flows.contains(&spec) => flows.push(spec),
                Some(_) => {}
                None => {
                    return Err(format!(
                        "the conditions of group {group} (DNF: all must hold) can never match the same packet"
                    ))
                }
            }
        }
    }
    if flows.is_empty() {
        return Err("the conditions can never match a packet".into());
    }
    Ok(flows)
}

fn overlapping_specs<'r>(
    a: &'r BusinessRule,
    b: &'r BusinessRule,
) -> Option<(&'r FlowSpec, &'r FlowSpec)> {
    let users_overlap =
        a.users.is_empty() || b.users.is_empty() || a.users.iter().any(|u| b.users.contains(u));
    let roles_overlap = a
        .roles
        .iter()
        .any(|r| b.roles.iter().any(|s| s.eq_ignore_ascii_case(r)));
    if !users_overlap || !roles_overlap {
        return None;
    }
    a.flows
        .iter()
        .flat_map(|x| b.flows.iter().map(move |y| (x, y)))
        .find(|(x, y)| x.overlaps(y))
}

/// Enabled rules of equal priority for a common role whose traffic
/// overlaps are a conflict: the engine could not tell which applies. The
/// rule that was already in force stays; the other is rejected.
pub(super) fn reject_conflicts(
    rules: &mut BTreeMap<String, BusinessRule>,
    previous: &PolicySet,
    errors: &mut Vec<PolicyError>,
) {
    let was_in_force = |r: &BusinessRule| previous.rules.iter().any(|p| p == r);
    loop {
        let enabled: Vec<&BusinessRule> = rules.values().filter(|r| r.enabled).collect();
        let mut conflict = None;
        'outer: for (i, a) in enabled.iter().enumerate() {
            for b in &enabled[i + 1..] {
                if a.priority != b.priority {
                    continue;
                }
                if let Some((x, y)) = overlapping_specs(a, b) {
                    // Reject the newcomer; between two newcomers, the later DN.
                    let (keep, drop) = if was_in_force(b) && !was_in_force(a) {
                        (b, a)
                    } else {
                        (a, b)
                    };
                    conflict = Some((
                        dn::normalize(&drop.dn),
                        PolicyError::new(
                            &drop.dn,
                            Some("pcimRulePriority"),
                            format!(
                                "conflicts with {}: both have priority {} and their traffic overlaps ({x} and {y}); give one a higher priority",
                                keep.dn, keep.priority
                            ),
                        ),
                    ));
                    break 'outer;
                }
            }
        }
        match conflict {
            Some((key, err)) => {
                rules.remove(&key);
                errors.push(err);
            }
            None => break,
        }
    }
}
