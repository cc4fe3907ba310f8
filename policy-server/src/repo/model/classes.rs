//! Tier 2 and 3 entries: service classes with their load bands (covering
//! `[0, ∞)` without gaps or overlaps), links with the flow conditions that
//! count towards their load, device roles, and unique names among each.

use super::*;

pub(super) fn service_class(
    e: &Entry,
    dir: &Directory<'_>,
) -> Result<ServiceClass, Vec<PolicyError>> {
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
pub(super) fn flow_condition(e: &Entry) -> Result<(FlowSpec, Vec<String>), PolicyError> {
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

pub(super) fn link(e: &Entry, dir: &Directory<'_>) -> Result<Link, Vec<PolicyError>> {
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

pub(super) fn device(e: &Entry) -> Result<DeviceRole, PolicyError> {
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
    let user_match = match r.single("qosloopUserMatch")?.map(str::to_ascii_lowercase) {
        None => UserMatch::Uid,
        Some(m) if m == "uid" => UserMatch::Uid,
        Some(m) if m == "address" => UserMatch::Address,
        Some(other) => {
            return Err(r.err(
                "qosloopUserMatch",
                format!("{other:?}: uid (the user's sockets, on its host) or address (its current addresses)"),
            ))
        }
    };
    Ok(DeviceRole {
        dn: e.dn.clone(),
        role,
        interface,
        direction,
        capacity,
        user_match,
    })
}

pub(super) fn reject_duplicate_names<T>(
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
