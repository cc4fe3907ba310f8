//! A human-readable account of a policy: what `--check` prints.

use qosloop_schema::{OutOfProfileAction, PolicySet};
use std::fmt::Write as _;

/// Describes the rules, classes, links and device roles understood.
pub fn describe(p: &PolicySet) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_policy(&mut out, p);
    out
}

fn write_policy(out: &mut String, p: &PolicySet) -> std::fmt::Result {
    writeln!(
        out,
        "{} rule(s), {} service class(es), {} link(s), {} device role(s)",
        p.rules.len(),
        p.classes.len(),
        p.links.len(),
        p.devices.len()
    )?;
    for r in &p.rules {
        writeln!(out)?;
        writeln!(
            out,
            "rule {} (priority {}, {}) [{}]",
            r.name,
            r.priority,
            if r.enabled { "enabled" } else { "disabled" },
            r.dn
        )?;
        writeln!(out, "  roles: {}", r.roles.join(", "))?;
        for f in &r.flows {
            writeln!(out, "  traffic: {f}")?;
        }
        if !r.users.is_empty() {
            writeln!(out, "  users: {}", r.users.join(", "))?;
        }
        writeln!(
            out,
            "  service class: {}, out-of-profile band chosen by the load of link {}",
            r.service_class, r.link
        )?;
    }
    for c in &p.classes {
        writeln!(out)?;
        writeln!(out, "service class {} [{}]", c.name, c.dn)?;
        writeln!(
            out,
            "  profile: {} kbit/s, burst {} bytes; in profile: {}",
            c.profile.rate.0,
            c.profile.burst_bytes,
            c.in_profile_dscp
                .map_or("unmarked".to_owned(), |d| format!("marked {d}"))
        )?;
        for b in &c.out_of_profile {
            let range = match b.to {
                Some(to) => format!("[{}, {}) kbit/s", b.from.0, to.0),
                None => format!("[{}, ∞) kbit/s", b.from.0),
            };
            let action = match b.action {
                OutOfProfileAction::Accept { shape } => format!("accept{}", shaped(shape)),
                OutOfProfileAction::Remark { dscp, shape } => {
                    format!("remark to {dscp}{}", shaped(shape))
                }
                OutOfProfileAction::Drop => "drop".to_owned(),
            };
            writeln!(
                out,
                "  link load {range:<22} {:<8} out of profile: {action}",
                b.name
            )?;
        }
    }
    for l in &p.links {
        writeln!(out)?;
        writeln!(
            out,
            "link {} capacity {} kbit/s [{}]",
            l.name, l.capacity.0, l.dn
        )?;
        if l.traffic.is_empty() {
            writeln!(out, "  load: all traffic")?;
        }
        for t in &l.traffic {
            writeln!(out, "  load counts: {t}")?;
        }
    }
    for d in &p.devices {
        writeln!(out)?;
        writeln!(
            out,
            "device role {}: {} {:?}, capacity {} kbit/s [{}]",
            d.role, d.interface, d.direction, d.capacity.0, d.dn
        )?;
    }
    Ok(())
}

fn shaped(shape: Option<qosloop_schema::Kbps>) -> String {
    shape.map_or(String::new(), |s| format!(", shaped to {} kbit/s", s.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::{build_strict, ldif};

    #[test]
    fn describes_the_sample() {
        let p = build_strict(&ldif::parse(qosloop_schema::SAMPLE_POLICY_LDIF).unwrap()).unwrap();
        let text = describe(&p);
        for needle in [
            "rule policed-flow (priority 100, enabled)",
            "traffic: 10.71.1.2/32:* -> 10.71.2.2/32:4055 proto 17",
            "profile: 1000 kbit/s, burst 15000 bytes; in profile: marked cs6",
            "out of profile: accept, shaped to 875 kbit/s",
            "out of profile: remark to be, shaped to 125 kbit/s",
            "[6000, ∞) kbit/s",
            "out of profile: drop",
            "link edge-ingress capacity 10000 kbit/s",
            "device role edge: r-eth1 Egress",
        ] {
            assert!(text.contains(needle), "{needle:?} missing in\n{text}");
        }
    }
}
