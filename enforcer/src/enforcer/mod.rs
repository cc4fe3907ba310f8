//! Desired state, kernel state, and the difference between them.
//!
//! The [`Enforcer`] keeps what it believes is in the kernel (`applied`),
//! learnt at start by reading its own qdisc and table back (adopting what a
//! previous run left and cleaning what it cannot account for) and kept up to
//! date by every change since. A change is validated in full, rendered,
//! diffed against `applied`, and executed in three steps: HTB creates and
//! changes (undone if anything later fails), one nftables transaction, then
//! HTB deletes. A decision is therefore either applied whole or not at all.
//!
//! This module owns the enforcer's state and its public operations; the
//! jobs live beside it: [`validate`] (decisions and flow overlaps),
//! [`plan`] (a change as a value, then run with rollback), [`reconcile`]
//! (adopting and repairing what is in the kernel).

use crate::backend::KernelBackend;
use crate::error::EnforceError;
use crate::nft::model::{Batch, Command, Element, Hook, KeyPart, Limit, Listing, Rule, Shape};
use crate::nft::{ChainState, TableState, BASE_CHAIN};
use crate::render::{self, Classify, Layout, Rendered, FALLBACK_CHAIN, MAX_SLOTS};
use crate::tc::{ClassInfo, HtbClass, QdiscInfo, TcHandle, TcOp};
use qosloop_schema::{Decision, FlowSpec, Kbps};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

mod fallback;
mod plan;
mod reconcile;
mod validate;

use fallback::FallbackRules;
use validate::FlowIndex;

/// What the enforcer manages: one interface, in the roles it announces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnforcerConfig {
    pub interface: String,
    /// Decisions for other roles are refused; empty accepts any role.
    pub roles: Vec<String>,
    /// Rate of the HTB root: the interface's usable capacity.
    pub capacity: Kbps,
    /// Major of the enforcer's root qdisc handle (`e5:` by default).
    pub qdisc_major: u16,
    /// Egress (default) or ingress (through an IFB device) of the interface.
    pub direction: qosloop_schema::Direction,
}

/// The qdisc handle major the enforcer uses unless told otherwise.
pub const DEFAULT_QDISC_MAJOR: u16 = 0xe5;

/// One decision as it stands in the kernel.
#[derive(Clone, Debug)]
struct Applied {
    slot: u32,
    version: u64,
    fingerprint: u64,
    /// Its flow.
    flow: FlowSpec,
    /// How packets reach its chain: its map element, or (its flow names no
    /// field, or overlaps another decision's) its fallback rule.
    classify: Classify,
    /// Its meter (a named limit object).
    limit: Limit,
    /// Profile rate: its share of the group's in-profile class.
    profile: Kbps,
    out_class: Option<HtbClass>,
    /// `None` for an entry adopted from a previous run and not yet confirmed.
    decision: Option<Decision>,
}

/// What one apply did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ApplySummary {
    pub installed: usize,
    pub changed: usize,
    pub unchanged: usize,
    pub removed: usize,
    pub tc_messages: usize,
    pub nft_transactions: usize,
    #[serde(skip)]
    pub elapsed: Duration,
}

/// What reconcile found at start.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StartReport {
    pub adopted: usize,
    pub cleaned_chains: usize,
    pub cleaned_classes: usize,
    /// Map elements that jumped to no adopted decision (or to the wrong one).
    pub cleaned_elements: usize,
    /// Map elements of adopted decisions that were missing, added again.
    pub restored_elements: usize,
    pub table_reset: bool,
}

/// The policy enforcement point's kernel side on one interface.
#[derive(Debug)]
pub struct Enforcer<B: KernelBackend> {
    backend: B,
    layout: Layout,
    roles: Vec<String>,
    ifindex: u32,
    applied: BTreeMap<u64, Applied>,
    free_slots: BTreeSet<u32>,
    next_slot: u32,
    /// Qdisc, root and default class are in place.
    base_tc: bool,
    /// Table and base chain are in place.
    base_nft: bool,
    /// Decisions per map shape in the kernel.
    shape_counts: BTreeMap<Shape, usize>,
    /// Maps in the kernel (each looked up by the base chain).
    maps_present: BTreeSet<Shape>,
    /// Rules of the fallback chain, in chain order.
    fallback: FallbackRules,
    flows: FlowIndex,
    /// Sum of guaranteed class rates of applied decisions.
    guaranteed: u64,
    /// Groups in the kernel, with the sums their two classes carry.
    groups: BTreeMap<u32, GroupSums>,
}

/// What a group's classes guarantee: `total` (its class on the root qdisc)
/// and `profiles` (its shared in-profile class), kbit/s.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct GroupSums {
    total: u64,
    profiles: u64,
}

impl GroupSums {
    fn add(&mut self, a: &Applied) {
        self.total += class_rates(a);
        self.profiles += a.profile.0;
    }
    fn sub(&mut self, a: &Applied) {
        self.total -= class_rates(a);
        self.profiles -= a.profile.0;
    }
}

fn tc_err(op: &TcOp, source: crate::tc::KernelError) -> EnforceError {
    EnforceError::Tc {
        op: op.to_string(),
        source,
    }
}

fn class_of(info: &ClassInfo) -> HtbClass {
    HtbClass {
        classid: TcHandle(info.handle),
        parent: TcHandle(info.parent),
        rate: Kbps(info.rate_kbps),
        ceil: Kbps(info.ceil_kbps),
        prio: info.prio,
    }
}

/// What an applied decision's classes guarantee together (kbit/s).
fn class_rates(a: &Applied) -> u64 {
    a.profile.0 + a.out_class.map_or(0, |c| c.rate.0)
}

fn same_class(a: &HtbClass, b: &HtbClass) -> bool {
    a.classid == b.classid && a.rate == b.rate && a.ceil == b.ceil && a.prio == b.prio
}

impl<B: KernelBackend> Enforcer<B> {
    /// Finds the interface, reads what a previous run left in the kernel,
    /// adopts what is consistent and removes what is not (only objects in
    /// the enforcer's own table and qdisc).
    pub fn start(
        mut backend: B,
        config: EnforcerConfig,
    ) -> Result<(Self, StartReport), EnforceError> {
        let iface = &config.interface;
        if iface.is_empty()
            || !iface
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic())
            || !iface
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        {
            return Err(EnforceError::UnusableInterfaceName(iface.clone()));
        }
        let mut ifindex = backend
            .ifindex(iface)
            .ok_or_else(|| EnforceError::UnknownInterface(iface.clone()))?;
        let layout = Layout {
            interface: iface.clone(),
            direction: config.direction,
            qdisc_major: config.qdisc_major,
            capacity: config.capacity,
        };
        if layout.ingress() {
            // The HTB tree lives on the enforcer's IFB device.
            ifindex = backend
                .ensure_ifb(&layout.ifb())
                .map_err(EnforceError::Nft)?;
        }
        if config.capacity.0 == 0 {
            return Err(EnforceError::Invalid {
                id: 0,
                reason: "interface capacity must be above 0".into(),
            });
        }
        let mut e = Enforcer {
            backend,
            layout,
            roles: config.roles,
            ifindex,
            applied: BTreeMap::new(),
            free_slots: BTreeSet::new(),
            next_slot: 0,
            base_tc: false,
            base_nft: false,
            shape_counts: BTreeMap::new(),
            maps_present: BTreeSet::new(),
            fallback: FallbackRules::default(),
            flows: FlowIndex::default(),
            guaranteed: 0,
            groups: BTreeMap::new(),
        };
        let report = e.reconcile_at_start()?;
        Ok((e, report))
    }

    pub fn backend(&mut self) -> &mut B {
        &mut self.backend
    }
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Decisions applied by this run (adopted, unconfirmed ones excluded).
    pub fn decisions(&self) -> impl Iterator<Item = &Decision> {
        self.applied.values().filter_map(|a| a.decision.as_ref())
    }

    /// `(id, version)` of every decision in the kernel, adopted ones included.
    pub fn installed(&self) -> Vec<(u64, u64)> {
        self.applied
            .iter()
            .map(|(id, a)| (*id, a.version))
            .collect()
    }

    /// Ids of decisions in the kernel, including adopted ones.
    pub fn applied_ids(&self) -> Vec<u64> {
        self.applied.keys().copied().collect()
    }

    fn qdiscs(&mut self) -> Result<Vec<QdiscInfo>, EnforceError> {
        self.backend
            .qdiscs(self.ifindex)
            .map_err(|source| EnforceError::Tc {
                op: "RTM_GETQDISC dump".into(),
                source,
            })
    }

    /// The steering filter on the root qdisc (created or replaced).
    fn steer_op(&self) -> TcOp {
        TcOp::Steer {
            ifindex: self.ifindex,
            qdisc: self.layout.handle(0),
            first_major: self.layout.group_major(0),
            groups: 0xff, // every low byte; unused ones have no class
            first_minor: render::FIRST_GROUP_MINOR,
        }
    }

    fn our_root(&mut self, qdiscs: &[QdiscInfo]) -> Result<Option<bool>, EnforceError> {
        match qdiscs.iter().find(|q| q.is_root()).cloned() {
            None => Ok(None),
            Some(q) if q.handle.0 == 0 => Ok(None),
            Some(q) if q.handle.major() == self.layout.qdisc_major && q.kind == "htb" => {
                Ok(Some(true))
            }
            Some(q) => Err(EnforceError::ForeignQdisc {
                interface: self.layout.interface.clone(),
                kind: q.kind,
                handle: q.handle.to_string(),
            }),
        }
    }

    /// The enforcer's table as `nft list table` shows it once what this
    /// run applied is in the kernel (counters at zero): limits by decision
    /// id, maps by shape, then the base chain, the fallback chain, the
    /// replies chain (egress) and the decision chains by id — the kernel's creation order when decisions
    /// were installed in id order from an empty table. Decisions adopted
    /// from a previous run (not sent again since) have no rules to show and
    /// are left out.
    pub fn listing(&self) -> Listing {
        let mut limits = Vec::new();
        let mut chains = vec![
            (
                BASE_CHAIN.to_owned(),
                Some(self.layout.hook()),
                render::base_rules(&self.layout, self.maps_present.iter()),
            ),
            (
                FALLBACK_CHAIN.to_owned(),
                None,
                self.fallback.rules().cloned().collect(),
            ),
        ];
        if !self.layout.ingress() {
            chains.push((
                render::REPLIES_CHAIN.to_owned(),
                Some(Hook::Input),
                self.fallback.reply_rules().collect(),
            ));
        }
        let mut maps: BTreeMap<Shape, Vec<Element>> = self
            .maps_present
            .iter()
            .map(|s| (s.clone(), Vec::new()))
            .collect();
        for (id, a) in &self.applied {
            let Some(d) = &a.decision else { continue };
            let Ok(r) = render::render(&self.layout, d, a.slot, self.ifindex) else {
                continue;
            };
            limits.push(r.limit.clone());
            if let Some((shape, e)) = a.classify.element(&r.chain()) {
                maps.entry(shape).or_default().push(e);
            }
            chains.push((render::chain_name(*id), None, r.rules));
        }
        Listing {
            table: self.layout.table_id(),
            limits,
            maps: maps.into_iter().collect(),
            chains,
        }
    }

    /// Installs or replaces one decision.
    pub fn install(&mut self, d: Decision) -> Result<ApplySummary, EnforceError> {
        self.apply(vec![d], Vec::new())
    }

    /// Removes one decision; removing an unknown id is a no-op.
    pub fn remove(&mut self, id: u64) -> Result<ApplySummary, EnforceError> {
        self.apply(Vec::new(), vec![id])
    }

    /// Makes the kernel hold exactly `desired` (a full resynchronisation).
    pub fn sync(&mut self, desired: Vec<Decision>) -> Result<ApplySummary, EnforceError> {
        let keep: BTreeSet<u64> = desired.iter().map(|d| d.id).collect();
        let removes = self
            .applied
            .keys()
            .filter(|id| !keep.contains(id))
            .copied()
            .collect();
        self.apply(desired, removes)
    }

    fn take_slot(&mut self) -> Option<u32> {
        if let Some(s) = self.free_slots.pop_first() {
            return Some(s);
        }
        (self.next_slot < MAX_SLOTS).then(|| {
            self.next_slot += 1;
            self.next_slot - 1
        })
    }

    /// Installs/replaces `upserts` and removes `removes` as one change: all
    /// of it reaches the kernel or none of it does.
    pub fn apply(
        &mut self,
        upserts: Vec<Decision>,
        removes: Vec<u64>,
    ) -> Result<ApplySummary, EnforceError> {
        let started = Instant::now();
        let mut summary = ApplySummary::default();
        let upserts = upserts
            .into_iter()
            .map(resolve_user)
            .collect::<Result<Vec<_>, _>>()?;
        // 1. Validate everything before touching anything.
        let removing: BTreeSet<u64> = removes
            .iter()
            .copied()
            .filter(|id| self.applied.contains_key(id))
            .collect();
        let upsert_ids: BTreeSet<u64> = upserts.iter().map(|d| d.id).collect();
        if upsert_ids.len() != upserts.len() {
            let mut seen = BTreeSet::new();
            let dup = upserts
                .iter()
                .find(|d| !seen.insert(d.id))
                .map_or(0, |d| d.id);
            return Err(EnforceError::Invalid {
                id: dup,
                reason: "given twice in one change".into(),
            });
        }
        // Overlapping flows are fine (they become ordered fallback rules);
        // the same flow twice is not: the second could never match.
        let mut batch = FlowIndex::default();
        for d in &upserts {
            self.validate(d)?;
            let skip = |id: u64| id == d.id || removing.contains(&id) || upsert_ids.contains(&id);
            let clash = self
                .flows
                .same(&d.flow, &skip)
                .or_else(|| batch.same(&d.flow, &|id| id == d.id));
            if let Some((other, other_flow)) = clash {
                return Err(EnforceError::Conflict {
                    id: d.id,
                    flow: d.flow.to_string(),
                    other,
                    other_flow: other_flow.to_string(),
                });
            }
            batch.insert(d.id, d.flow.clone());
        }
        // 2. Slots and rendering (slots taken here are returned on failure).
        let mut taken = Vec::new();
        let mut rendered = Vec::with_capacity(upserts.len());
        let mut guaranteed = self.guaranteed;
        let result = (|| {
            for id in &removing {
                let a = &self.applied[id];
                guaranteed -= class_rates(a);
            }
            for d in &upserts {
                let slot = match self.applied.get(&d.id) {
                    Some(a) => a.slot,
                    None => {
                        let s = self.take_slot().ok_or_else(|| EnforceError::Invalid {
                            id: d.id,
                            reason: format!(
                                "no free slot: at most {MAX_SLOTS} decisions per interface"
                            ),
                        })?;
                        taken.push(s);
                        s
                    }
                };
                let r = render::render(&self.layout, d, slot, self.ifindex).map_err(|e| {
                    EnforceError::Invalid {
                        id: d.id,
                        reason: e.to_string(),
                    }
                })?;
                if let Some(a) = self.applied.get(&d.id) {
                    guaranteed -= class_rates(a);
                }
                guaranteed += r.profile.0 + r.out_class.rate.0;
                let default = self.layout.default_rate();
                if guaranteed + default.0 > self.layout.capacity.0 {
                    return Err(EnforceError::Oversubscribed {
                        id: d.id,
                        total: Kbps(guaranteed + default.0),
                        capacity: self.layout.capacity,
                        default,
                    });
                }
                rendered.push(r);
            }
            self.execute(&rendered, &removing, &mut summary)
        })();
        let placements = match result {
            Ok(p) => p,
            Err(e) => {
                self.free_slots.extend(taken);
                tracing::warn!(error = %e, "change refused; kernel state left as it was");
                return Err(e);
            }
        };
        // 3. Commit the new state.
        self.guaranteed = guaranteed;
        for id in &removing {
            if let Some(a) = self.applied.remove(id) {
                self.free_slots.insert(a.slot);
            }
            self.flows.remove(*id);
        }
        for (d, r) in upserts.into_iter().zip(rendered) {
            self.flows.insert(d.id, d.flow.clone());
            self.applied.insert(
                d.id,
                Applied {
                    slot: r.slot,
                    version: r.version,
                    fingerprint: r.fingerprint,
                    flow: r.flow,
                    classify: r.classify,
                    limit: r.limit,
                    profile: r.profile,
                    out_class: Some(r.out_class),
                    decision: Some(d),
                },
            );
        }
        // Where the change put each decision it moved or installed.
        for (id, classify) in placements {
            if let Some(a) = self.applied.get_mut(&id) {
                a.classify = classify;
            }
        }
        summary.removed = removing.len();
        summary.elapsed = started.elapsed();
        Ok(summary)
    }

    /// Removes the enforcer's table and qdisc from the interface.
    pub fn cleanup(&mut self) -> Result<(), EnforceError> {
        cleanup(&mut self.backend, &self.layout, self.ifindex)?;
        self.applied.clear();
        self.flows = FlowIndex::default();
        self.free_slots.clear();
        self.next_slot = 0;
        self.guaranteed = 0;
        self.groups.clear();
        self.base_tc = false;
        self.base_nft = false;
        self.shape_counts.clear();
        self.maps_present.clear();
        self.fallback.clear();
        Ok(())
    }
}

/// Removes the table and qdisc the enforcer owns on `layout`'s interface, if
/// present; touches nothing else.
pub fn cleanup<B: KernelBackend>(
    backend: &mut B,
    layout: &Layout,
    ifindex: u32,
) -> Result<(), EnforceError> {
    if backend
        .read_table(layout)
        .map_err(EnforceError::Nft)?
        .is_some()
    {
        let mut batch = Batch::new(layout.table_id());
        batch.push(Command::DeleteTable);
        backend.nft(&batch).map_err(EnforceError::Nft)?;
    }
    if layout.ingress() {
        // The IFB device takes its qdiscs with it.
        return backend
            .delete_link(&layout.ifb())
            .map_err(EnforceError::Nft);
    }
    let qdiscs = backend.qdiscs(ifindex).map_err(|source| EnforceError::Tc {
        op: "RTM_GETQDISC dump".into(),
        source,
    })?;
    let ours = qdiscs
        .iter()
        .any(|q| q.is_root() && q.kind == "htb" && q.handle.major() == layout.qdisc_major);
    if ours {
        let op = TcOp::DeleteQdisc {
            ifindex,
            handle: layout.handle(0),
        };
        for r in backend.tc(std::slice::from_ref(&op)) {
            r.map_err(|e| tc_err(&op, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_fallback;
#[cfg(test)]
mod tests_user;

/// Gives a per-user decision the uid of its user on this host: the uid it
/// carries, else the name looked up in the host's user database (NSS),
/// else the host agent's form for a uid without a name (`uid 1234`).
pub(crate) fn resolve_user(mut d: Decision) -> Result<Decision, EnforceError> {
    let Some(u) = d.flow.user.as_mut() else {
        return Ok(d);
    };
    if u.uid.is_some() {
        return Ok(d);
    }
    let found = match nix::unistd::User::from_name(&u.name) {
        Ok(Some(user)) => Some(user.uid.as_raw()),
        _ => u.name.strip_prefix("uid ").and_then(|n| n.parse().ok()),
    };
    match found {
        Some(uid) => {
            u.uid = Some(uid);
            Ok(d)
        }
        None => Err(EnforceError::Invalid {
            id: d.id,
            reason: format!("user {:?} is not known on this host", u.name),
        }),
    }
}
