//! `qosloop-enforcer status`: what is in the kernel, read from the kernel —
//! the decisions rendered on an interface with their nftables counters
//! (in profile, out of profile: accepted, re-marked or dropped) and HTB
//! class statistics.

use crate::backend::KernelBackend;
use crate::render::{Layout, DEFAULT_MINOR, IN_MINOR, ROOT_MINOR};
use crate::tc::{ClassInfo, TcHandle};
use serde::Serialize;
use std::fmt::Write as _;

/// One decision as found in the kernel.
#[derive(Clone, Debug, Serialize)]
pub struct DecisionStatus {
    pub id: u64,
    pub version: u64,
    /// accept, remark or drop (what happens out of profile).
    pub kind: String,
    pub slot: u32,
    /// The profile rate, kbit/s.
    pub profile_kbps: u64,
    pub in_profile_packets: u64,
    pub in_profile_bytes: u64,
    /// Packets over the profile: accepted, re-marked or dropped per `kind`.
    pub out_of_profile_packets: u64,
    pub out_of_profile_bytes: u64,
    /// The in-profile class (shared by the decisions of its group).
    pub in_class: Option<ClassInfo>,
    pub out_class: Option<ClassInfo>,
}

/// The enforcer's objects on one interface.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub interface: String,
    pub table: String,
    pub table_present: bool,
    pub qdisc: Option<String>,
    pub root_class: Option<ClassInfo>,
    pub default_class: Option<ClassInfo>,
    /// Group classes on the root qdisc (each holds up to 256 decisions).
    pub groups: Vec<ClassInfo>,
    pub decisions: Vec<DecisionStatus>,
    /// Objects that reconcile would clean (no decision accounts for them).
    pub orphan_classes: Vec<String>,
    /// Every HTB class of the enforcer's tree as read (the accounting
    /// report's class statistics), by handle.
    #[serde(skip)]
    pub htb_classes: Vec<ClassInfo>,
    /// Set by the daemon: e.g. `fail-static since …` when no PDP answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daemon: Option<serde_json::Value>,
}

/// Reads the enforcer's objects on `layout`'s interface.
pub fn read<B: KernelBackend>(backend: &mut B, layout: &Layout) -> Result<Status, String> {
    if backend.ifindex(&layout.interface).is_none() {
        return Err(format!("unknown interface {:?}", layout.interface));
    }
    // The HTB tree: on the interface, or on its IFB device for ingress (no
    // IFB: nothing installed yet, every object reads as absent).
    let ifindex = backend.ifindex(&layout.shaping_interface()).unwrap_or(0);
    let qdisc = backend
        .qdiscs(ifindex)
        .map_err(|e| format!("reading qdiscs: {e}"))?
        .into_iter()
        .find(|q| q.is_root() && q.handle.major() == layout.qdisc_major && q.kind == "htb");
    let mut classes = if qdisc.is_some() {
        backend
            .classes(ifindex, 0)
            .map_err(|e| format!("reading classes: {e}"))?
    } else {
        Vec::new()
    };
    let mut htb_classes: Vec<ClassInfo> = classes
        .iter()
        .filter(|c| {
            let major = TcHandle(c.handle).major();
            major == layout.qdisc_major || layout.group_of_major(major).is_some()
        })
        .cloned()
        .collect();
    htb_classes.sort_by_key(|c| c.handle);
    let table = layout.nft_table();
    let state = backend.read_table(layout)?;
    fn take(classes: &mut Vec<ClassInfo>, h: TcHandle) -> Option<ClassInfo> {
        classes
            .iter()
            .position(|c| c.handle == h.0)
            .map(|i| classes.swap_remove(i))
    }
    let root_class = take(&mut classes, layout.handle(ROOT_MINOR));
    let default_class = take(&mut classes, layout.handle(DEFAULT_MINOR));
    let mut decisions = Vec::new();
    for (id, c) in state.iter().flat_map(|s| s.chains.iter()) {
        let Some(meta) = &c.meta else { continue };
        let out_id = layout.slot_classid(meta.slot);
        // In-profile traffic goes to the group's shared class.
        let in_id = layout
            .group_in_class(Layout::group_of(meta.slot), meta.profile)
            .classid;
        let in_class = classes.iter().find(|c| c.handle == in_id.0).cloned();
        decisions.push(DecisionStatus {
            id: *id,
            version: meta.version,
            kind: meta.kind.clone(),
            slot: meta.slot,
            profile_kbps: meta.profile.0,
            in_profile_packets: c.in_packets,
            in_profile_bytes: c.in_bytes,
            out_of_profile_packets: c.out_packets,
            out_of_profile_bytes: c.out_bytes,
            in_class,
            out_class: take(&mut classes, out_id),
        });
    }
    // Group classes and the root classes of group qdiscs are structure.
    let (mut groups, mut classes): (Vec<ClassInfo>, Vec<ClassInfo>) =
        classes.into_iter().partition(|c| {
            let h = TcHandle(c.handle);
            (h.major() == layout.qdisc_major && layout.group_of_minor(h.minor()).is_some())
                || (layout.group_of_major(h.major()).is_some()
                    && (h.minor() == ROOT_MINOR || h.minor() == IN_MINOR))
        });
    groups.retain(|c| TcHandle(c.handle).major() == layout.qdisc_major);
    groups.sort_by_key(|c| c.handle);
    classes.retain(|c| {
        let major = TcHandle(c.handle).major();
        major == layout.qdisc_major || layout.group_of_major(major).is_some()
    });
    classes.sort_by_key(|c| c.handle);
    Ok(Status {
        interface: layout.interface.clone(),
        table: table.clone(),
        table_present: state.is_some(),
        qdisc: qdisc.map(|q| format!("{} htb", q.handle)),
        root_class,
        default_class,
        groups,
        decisions,
        orphan_classes: classes.into_iter().map(|c| c.classid).collect(),
        htb_classes,
        daemon: None,
    })
}

impl Status {
    /// A human-readable rendering.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "interface {}: qdisc {}, table {} {}",
            self.interface,
            self.qdisc.as_deref().unwrap_or("(none)"),
            self.table,
            if self.table_present {
                "present"
            } else {
                "absent"
            }
        );
        if let Some(d) = &self.daemon {
            let _ = writeln!(s, "daemon: {d}");
        }
        let class = |c: &Option<ClassInfo>| {
            c.as_ref().map_or("-".to_owned(), |c| {
                format!(
                    "{} rate {}kbit ceil {}kbit sent {}B/{}p dropped {}",
                    c.classid, c.rate_kbps, c.ceil_kbps, c.bytes, c.packets, c.drops
                )
            })
        };
        let _ = writeln!(s, "  root    {}", class(&self.root_class));
        let _ = writeln!(s, "  default {}", class(&self.default_class));
        for g in &self.groups {
            let _ = writeln!(s, "  group   {}", class(&Some(g.clone())));
        }
        for d in &self.decisions {
            let _ = writeln!(
                s,
                "  decision {} v{} {}: in profile {}p/{}B, out of profile {}p/{}B",
                d.id,
                d.version,
                d.kind,
                d.in_profile_packets,
                d.in_profile_bytes,
                d.out_of_profile_packets,
                d.out_of_profile_bytes
            );
            let _ = writeln!(s, "    in  {}", class(&d.in_class));
            let _ = writeln!(s, "    out {}", class(&d.out_class));
        }
        if !self.orphan_classes.is_empty() {
            let _ = writeln!(s, "  orphan classes: {}", self.orphan_classes.join(" "));
        }
        s
    }
}
