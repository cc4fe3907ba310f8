//! Desired state, kernel state, and the difference between them.
//!
//! The [`Enforcer`] keeps what it believes is in the kernel (`applied`),
//! learnt at start by reading its own qdisc and table back (adopting what a
//! previous run left and cleaning what it cannot account for) and kept up to
//! date by every change since. A change is validated in full, rendered,
//! diffed against `applied`, and executed in three steps: HTB creates and
//! changes (undone if anything later fails), one nftables transaction, then
//! HTB deletes. A decision is therefore either applied whole or not at all.

use crate::backend::KernelBackend;
use crate::error::EnforceError;
use crate::nft::model::{Batch, Command, Element, KeyPart, Limit, Rule, Shape};
use crate::nft::{ChainState, TableState, BASE_CHAIN};
use crate::render::{self, Classify, Layout, Rendered, FALLBACK_CHAIN, MAX_SLOTS};
use crate::tc::{ClassInfo, HtbClass, QdiscInfo, TcHandle, TcOp};
use qosloop_schema::{Decision, FlowSpec, Kbps};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

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
    /// How packets reach its chain.
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

/// Flow specs of applied decisions, indexed for overlap checks: specs with a
/// host destination only need comparing with the same host and wide specs.
#[derive(Debug, Default)]
struct FlowIndex {
    flows: HashMap<u64, FlowSpec>,
    by_host: HashMap<IpAddr, BTreeSet<u64>>,
    wide: BTreeSet<u64>,
}

impl FlowIndex {
    fn host(spec: &FlowSpec) -> Option<IpAddr> {
        spec.dst.filter(|p| p.is_host()).map(|p| p.addr())
    }
    fn insert(&mut self, id: u64, spec: FlowSpec) {
        self.remove(id);
        match Self::host(&spec) {
            Some(h) => {
                self.by_host.entry(h).or_default().insert(id);
            }
            None => {
                self.wide.insert(id);
            }
        }
        self.flows.insert(id, spec);
    }
    fn remove(&mut self, id: u64) {
        if let Some(old) = self.flows.remove(&id) {
            match Self::host(&old) {
                Some(h) => {
                    if let Some(set) = self.by_host.get_mut(&h) {
                        set.remove(&id);
                    }
                }
                None => {
                    self.wide.remove(&id);
                }
            }
        }
    }
    /// An applied decision other than those in `skip` whose flow overlaps `spec`.
    fn overlapping(&self, spec: &FlowSpec, skip: &dyn Fn(u64) -> bool) -> Option<(u64, &FlowSpec)> {
        let hit = |id: &u64| {
            let other = self.flows.get(id)?;
            (!skip(*id) && other.overlaps(spec)).then_some((*id, other))
        };
        match Self::host(spec) {
            Some(h) => self
                .by_host
                .get(&h)
                .into_iter()
                .flatten()
                .chain(self.wide.iter())
                .find_map(hit),
            None => self.flows.keys().find_map(hit),
        }
    }
}

/// What one change does to the kernel, as a value: the HTB messages
/// before the nftables transaction and how to undo each, the transaction
/// with the table's bookkeeping after it, the HTB deletes after it, and the
/// group sums once done.
#[derive(Debug)]
struct Plan {
    tc_pre: Vec<TcOp>,
    tc_undo: Vec<Option<TcOp>>,
    nft: NftPlan,
    tc_post: Vec<TcOp>,
    group_sums: BTreeMap<u32, GroupSums>,
}

/// The nftables side of one change: the transaction, and the bookkeeping
/// of the table once the kernel took it.
#[derive(Debug)]
struct NftPlan {
    batch: Batch,
    shape_counts: BTreeMap<Shape, usize>,
    maps_present: BTreeSet<Shape>,
    fallback: BTreeMap<u64, Rule>,
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
    /// Rules of the fallback chain, by decision id.
    fallback: BTreeMap<u64, Rule>,
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
            fallback: BTreeMap::new(),
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

    fn reconcile_at_start(&mut self) -> Result<StartReport, EnforceError> {
        let mut report = StartReport::default();
        let qdiscs = self.qdiscs()?;
        let ours = self.our_root(&qdiscs)?.is_some();
        let classes = if ours {
            self.backend
                .classes(self.ifindex, 0)
                .map_err(|source| EnforceError::Tc {
                    op: "RTM_GETTCLASS dump".into(),
                    source,
                })?
        } else {
            Vec::new()
        };
        let state = self
            .backend
            .read_table(&self.layout)
            .map_err(EnforceError::Nft)?;
        let mut adopted: BTreeMap<u64, Applied> = BTreeMap::new();
        let mut batch = Batch::new(self.layout.table_id());
        match state {
            None => {}
            Some(st) if !st.base_ok => {
                batch.push(Command::DeleteTable);
                report.table_reset = true;
            }
            Some(st) => {
                self.base_nft = true;
                self.reconcile_table(st, &mut adopted, &mut batch, &mut report);
            }
        }
        if !batch.is_empty() {
            self.backend.nft(&batch).map_err(EnforceError::Nft)?;
            if report.table_reset {
                self.base_nft = false;
            }
        }
        // HTB: fix the root and default classes and the steering filter,
        // keep the groups and classes of adopted decisions, delete every
        // other class under our qdisc.
        let by_slot: HashMap<u32, u64> = adopted.iter().map(|(id, a)| (a.slot, *id)).collect();
        let mut deletes = Vec::new();
        let mut group_deletes = Vec::new();
        let mut fixes = Vec::new();
        let mut found_groups: BTreeMap<u32, (HtbClass, HtbClass)> = BTreeMap::new();
        let mut in_classes: BTreeMap<u32, HtbClass> = BTreeMap::new();
        if ours {
            // A group is usable when its class holds our HTB qdisc with its
            // root and in-profile classes.
            let mut intact: BTreeSet<u32> = qdiscs
                .iter()
                .filter(|q| q.kind == "htb" && !q.is_root())
                .filter_map(|q| {
                    let g = self.layout.group_of_major(q.handle.major())?;
                    (q.parent == self.layout.group_class(g, Kbps(0)).classid.0).then_some(g)
                })
                .collect();
            let group_roots: BTreeSet<u32> = classes
                .iter()
                .filter(|c| TcHandle(c.handle).minor() == render::ROOT_MINOR)
                .filter_map(|c| self.layout.group_of_major(TcHandle(c.handle).major()))
                .collect();
            for c in &classes {
                let h = TcHandle(c.handle);
                if let Some(g) = self.layout.group_of_major(h.major()) {
                    if h.minor() == render::IN_MINOR {
                        in_classes.insert(g, class_of(c));
                    }
                }
            }
            intact.retain(|g| group_roots.contains(g) && in_classes.contains_key(g));
            let (mut root, mut default) = (false, false);
            for info in &classes {
                let class = class_of(info);
                let (major, minor) = (class.classid.major(), class.classid.minor());
                if major == self.layout.qdisc_major {
                    if minor == render::ROOT_MINOR || minor == render::DEFAULT_MINOR {
                        let want = if minor == render::ROOT_MINOR {
                            root = true;
                            self.layout.root_class()
                        } else {
                            default = true;
                            self.layout.default_class()
                        };
                        if !same_class(&class, &want) {
                            fixes.push(TcOp::ChangeClass {
                                ifindex: self.ifindex,
                                class: want,
                            });
                        }
                    } else if let Some(g) = self.layout.group_of_minor(minor) {
                        if let (true, Some(inner)) = (intact.contains(&g), in_classes.get(&g)) {
                            found_groups.insert(g, (class, *inner));
                        } else {
                            group_deletes.push(TcOp::DeleteClass {
                                ifindex: self.ifindex,
                                classid: class.classid,
                            });
                        }
                    } else {
                        deletes.push(TcOp::DeleteClass {
                            ifindex: self.ifindex,
                            classid: class.classid,
                        });
                    }
                    continue;
                }
                let Some(g) = self.layout.group_of_major(major) else {
                    continue; // not ours (it goes if the class it hangs from does)
                };
                if !intact.contains(&g) || minor == render::ROOT_MINOR || minor == render::IN_MINOR
                {
                    continue;
                }
                if let Some(a) = Layout::slot_of_class(g, minor)
                    .and_then(|s| by_slot.get(&s))
                    .and_then(|id| adopted.get_mut(id))
                {
                    a.out_class = Some(class);
                } else {
                    deletes.push(TcOp::DeleteClass {
                        ifindex: self.ifindex,
                        classid: class.classid,
                    });
                }
            }
            if !root {
                fixes.insert(
                    0,
                    TcOp::CreateClass {
                        ifindex: self.ifindex,
                        class: self.layout.root_class(),
                    },
                );
            }
            if !default {
                fixes.push(TcOp::CreateClass {
                    ifindex: self.ifindex,
                    class: self.layout.default_class(),
                });
            }
            fixes.push(self.steer_op());
            self.base_tc = true;
        }
        // A decision whose classes are gone (qdisc deleted behind our back)
        // cannot be repaired without its rates: drop it, so that the PDP's
        // resynchronisation (which no longer sees it installed) sends it again.
        let broken: Vec<u64> = adopted
            .iter()
            .filter(|(_, a)| a.out_class.is_none())
            .map(|(id, _)| *id)
            .collect();
        if !broken.is_empty() {
            let mut batch = Batch::new(self.layout.table_id());
            let mut dels: BTreeMap<Shape, Vec<Vec<KeyPart>>> = BTreeMap::new();
            for id in &broken {
                if let Some(a) = adopted.remove(id) {
                    match a.classify {
                        Classify::Map { shape, key } => {
                            dels.entry(shape.clone()).or_default().push(key);
                            if let Some(n) = self.shape_counts.get_mut(&shape) {
                                *n -= 1;
                            }
                        }
                        Classify::Rule(_) => {
                            self.fallback.remove(id);
                        }
                    }
                }
            }
            for (shape, keys) in dels {
                batch.push(Command::DeleteElements { shape, keys });
            }
            batch.push(Command::FlushChain(FALLBACK_CHAIN.into()));
            for rule in self.fallback.values() {
                batch.push(Command::AddRule {
                    chain: FALLBACK_CHAIN.into(),
                    rule: rule.clone(),
                });
            }
            for id in &broken {
                batch.push(Command::FlushChain(render::chain_name(*id)));
                batch.push(Command::DeleteChain(render::chain_name(*id)));
                batch.push(Command::DeleteLimit(render::limit_name(*id)));
                report.cleaned_chains += 1;
            }
            self.shape_counts.retain(|_, n| *n > 0);
            self.backend.nft(&batch).map_err(EnforceError::Nft)?;
        }
        // Group rates follow what stays; groups left empty go.
        let mut sums: BTreeMap<u32, GroupSums> = BTreeMap::new();
        for a in adopted.values() {
            sums.entry(Layout::group_of(a.slot)).or_default().add(a);
        }
        for (g, (class, inner)) in &found_groups {
            match sums.get(g) {
                Some(&sum) => {
                    let want = self.layout.group_class(*g, Kbps(sum.total));
                    let want_in = self.layout.group_in_class(*g, Kbps(sum.profiles));
                    for (have, want) in [(class, want), (inner, want_in)] {
                        if !same_class(have, &want) {
                            fixes.push(TcOp::ChangeClass {
                                ifindex: self.ifindex,
                                class: want,
                            });
                        }
                    }
                    self.groups.insert(*g, sum);
                }
                None => group_deletes.push(TcOp::DeleteClass {
                    ifindex: self.ifindex,
                    classid: class.classid,
                }),
            }
        }
        report.cleaned_classes = deletes.len() + group_deletes.len();
        let ops = [fixes, deletes, group_deletes].concat();
        for (op, r) in ops.iter().zip(self.backend.tc(&ops)) {
            r.map_err(|e| tc_err(op, e))?;
        }
        report.adopted = adopted.len();
        self.guaranteed += adopted.values().map(class_rates).sum::<u64>();
        self.next_slot = adopted.values().map(|a| a.slot + 1).max().unwrap_or(0);
        let used: BTreeSet<u32> = adopted.values().map(|a| a.slot).collect();
        self.free_slots = (0..self.next_slot).filter(|s| !used.contains(s)).collect();
        self.applied = adopted;
        tracing::info!(
            interface = %self.layout.interface,
            adopted = report.adopted,
            cleaned_chains = report.cleaned_chains,
            cleaned_classes = report.cleaned_classes,
            cleaned_elements = report.cleaned_elements,
            restored_elements = report.restored_elements,
            table_reset = report.table_reset,
            "reconciled kernel state at start"
        );
        Ok(report)
    }

    /// Compares the table with what the enforcer applied and restores what
    /// was changed behind its back: map elements deleted (added again) or
    /// added (deleted), the base and fallback chains (rewritten whole), a
    /// decision chain flushed or deleted, or its limit object deleted
    /// (rewritten from the decision, when this run applied it). Says what
    /// it found in the report and the log. HTB is not re-read here.
    pub fn reconcile(&mut self) -> Result<StartReport, EnforceError> {
        let mut report = StartReport::default();
        if !self.base_nft {
            return Ok(report);
        }
        let st = self
            .backend
            .read_table(&self.layout)
            .map_err(EnforceError::Nft)?;
        let Some(st) = st.filter(|s| s.base_ok) else {
            return Err(EnforceError::Nft(format!(
                "table {} or its base chain was deleted behind the enforcer's back; \
                 restart the enforcer to rebuild it",
                self.layout.table_id()
            )));
        };
        let mut batch = Batch::new(self.layout.table_id());
        batch.push(Command::FlushChain(BASE_CHAIN.into()));
        if st.fallback {
            batch.push(Command::FlushChain(FALLBACK_CHAIN.into()));
        } else {
            batch.push(Command::AddChain {
                name: FALLBACK_CHAIN.into(),
                hook: None,
            });
        }
        // Decision chains and limits.
        let mut chain_cmds = Vec::new();
        for (id, a) in &self.applied {
            let intact = st.chains.get(id).is_some_and(|c| c.meta.is_some())
                && st.limits.contains(&a.limit.name);
            if intact {
                continue;
            }
            let Some(d) = &a.decision else {
                tracing::warn!(id, "decision chain changed behind the enforcer's back; adopted at start, so it cannot be rewritten until the PDP sends it again");
                continue;
            };
            let r = render::render(&self.layout, d, a.slot, self.ifindex).map_err(|e| {
                EnforceError::Invalid {
                    id: *id,
                    reason: e.to_string(),
                }
            })?;
            if st.chains.contains_key(id) {
                chain_cmds.push(Command::FlushChain(r.chain()));
            } else {
                chain_cmds.push(Command::AddChain {
                    name: r.chain(),
                    hook: None,
                });
            }
            if !st.limits.contains(&r.limit.name) {
                chain_cmds.push(Command::AddLimit(r.limit.clone()));
            }
            chain_cmds.extend(r.rules.iter().map(|rule| Command::AddRule {
                chain: r.chain(),
                rule: rule.clone(),
            }));
            report.cleaned_chains += 1;
        }
        // Maps: the ones in use must exist, with exactly their elements.
        let mut want: BTreeMap<Shape, BTreeMap<Vec<KeyPart>, String>> = BTreeMap::new();
        for (id, a) in &self.applied {
            if let Classify::Map { shape, key } = &a.classify {
                want.entry(shape.clone())
                    .or_default()
                    .insert(key.clone(), render::chain_name(*id));
            }
        }
        for shape in want.keys() {
            if !st.maps.contains_key(&shape.map_name()) {
                batch.push(Command::AddMap(shape.clone()));
            }
        }
        batch.commands.extend(chain_cmds);
        for (shape, elems) in &want {
            let have: BTreeMap<Vec<KeyPart>, String> = st
                .maps
                .get(&shape.map_name())
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            let stray: Vec<Vec<KeyPart>> = have
                .iter()
                .filter(|(k, c)| elems.get(*k) != Some(*c))
                .map(|(k, _)| k.clone())
                .collect();
            let missing: Vec<Element> = elems
                .iter()
                .filter(|(k, c)| have.get(*k) != Some(*c))
                .map(|(k, c)| Element {
                    key: k.clone(),
                    chain: c.clone(),
                })
                .collect();
            if !stray.is_empty() {
                report.cleaned_elements += stray.len();
                batch.push(Command::DeleteElements {
                    shape: shape.clone(),
                    keys: stray,
                });
            }
            if !missing.is_empty() {
                report.restored_elements += missing.len();
                batch.push(Command::AddElements {
                    shape: shape.clone(),
                    elements: missing,
                });
            }
        }
        for rule in self.fallback.values() {
            batch.push(Command::AddRule {
                chain: FALLBACK_CHAIN.into(),
                rule: rule.clone(),
            });
        }
        let maps: BTreeSet<Shape> = want.keys().cloned().collect();
        for rule in render::base_rules(&self.layout, maps.iter()) {
            batch.push(Command::AddRule {
                chain: BASE_CHAIN.into(),
                rule,
            });
        }
        self.backend.nft(&batch).map_err(EnforceError::Nft)?;
        self.maps_present.extend(maps);
        if report != StartReport::default() {
            tracing::warn!(
                interface = %self.layout.interface,
                restored_elements = report.restored_elements,
                cleaned_elements = report.cleaned_elements,
                rewritten_chains = report.cleaned_chains,
                "the table was changed behind the enforcer's back; restored"
            );
        }
        Ok(report)
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

    fn validate(&self, d: &Decision) -> Result<(), EnforceError> {
        let invalid = |reason: String| EnforceError::Invalid { id: d.id, reason };
        if !self.roles.is_empty() && !self.roles.contains(&d.role) {
            return Err(invalid(format!(
                "role {:?} is not one of this enforcer's roles ({})",
                d.role,
                self.roles.join(",")
            )));
        }
        let cap = self.layout.capacity;
        if d.profile.rate.0 == 0 {
            return Err(invalid("profile rate is 0".into()));
        }
        if d.profile.rate > cap {
            return Err(invalid(format!(
                "profile rate {} is above the capacity {cap} of {}",
                d.profile.rate, self.layout.interface
            )));
        }
        if let Some(s) = d.out_of_profile.shape() {
            if s.0 == 0 {
                return Err(invalid("out-of-profile shape rate is 0".into()));
            }
            if s > cap {
                return Err(invalid(format!(
                    "shape rate {s} is above the capacity {cap} of {}",
                    self.layout.interface
                )));
            }
        }
        if d.profile.burst_bytes > u64::from(u32::MAX) {
            return Err(invalid(format!(
                "burst {} bytes is too large",
                d.profile.burst_bytes
            )));
        }
        render::classify(&d.flow, self.layout.ingress()).map_err(|e| invalid(e.to_string()))?;
        Ok(())
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
        let mut batch = FlowIndex::default();
        for d in &upserts {
            self.validate(d)?;
            let skip = |id: u64| id == d.id || removing.contains(&id) || upsert_ids.contains(&id);
            let clash = self
                .flows
                .overlapping(&d.flow, &skip)
                .or_else(|| batch.overlapping(&d.flow, &|id| id == d.id));
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
        if let Err(e) = result {
            self.free_slots.extend(taken);
            tracing::warn!(error = %e, "change refused; kernel state left as it was");
            return Err(e);
        }
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
                    classify: r.classify,
                    limit: r.limit,
                    profile: r.profile,
                    out_class: Some(r.out_class),
                    decision: Some(d),
                },
            );
        }
        summary.removed = removing.len();
        summary.elapsed = started.elapsed();
        Ok(summary)
    }

    /// Executes a change: its plan, then the plan run against the kernel.
    fn execute(
        &mut self,
        rendered: &[Rendered],
        removing: &BTreeSet<u64>,
        summary: &mut ApplySummary,
    ) -> Result<(), EnforceError> {
        let plan = self.plan(rendered, removing, summary);
        self.run_plan(plan, !rendered.is_empty(), summary)
    }

    /// The plan of a change, from the desired decisions (`rendered`, the
    /// ids in `removing` to go) and what the enforcer knows is in the
    /// kernel — a pure function of both: nothing is sent. Counts installed,
    /// changed and unchanged decisions into `summary`.
    fn plan(
        &self,
        rendered: &[Rendered],
        removing: &BTreeSet<u64>,
        summary: &mut ApplySummary,
    ) -> Plan {
        let ifindex = self.ifindex;
        let mut pre = Vec::new();
        let mut undo = Vec::new();
        if !self.base_tc && !rendered.is_empty() {
            pre.push(TcOp::CreateQdisc {
                ifindex,
                handle: self.layout.handle(0),
                parent: TcHandle(0),
                default_minor: render::DEFAULT_MINOR,
            });
            undo.push(Some(TcOp::DeleteQdisc {
                ifindex,
                handle: self.layout.handle(0),
            }));
            for class in [self.layout.root_class(), self.layout.default_class()] {
                pre.push(TcOp::CreateClass { ifindex, class });
                undo.push(None); // goes with the qdisc
            }
            pre.push(self.steer_op());
            undo.push(None);
        }
        // Groups: the sums of every group this change touches.
        let mut sums: BTreeMap<u32, GroupSums> = BTreeMap::new();
        let slots = rendered
            .iter()
            .map(|r| r.slot)
            .chain(removing.iter().map(|id| self.applied[id].slot));
        for slot in slots {
            let g = Layout::group_of(slot);
            sums.entry(g)
                .or_insert_with(|| self.groups.get(&g).copied().unwrap_or_default());
        }
        for id in removing {
            let a = &self.applied[id];
            if let Some(sum) = sums.get_mut(&Layout::group_of(a.slot)) {
                sum.sub(a);
            }
        }
        for r in rendered {
            if let Some(sum) = sums.get_mut(&Layout::group_of(r.slot)) {
                if let Some(a) = self.applied.get(&r.id) {
                    sum.sub(a);
                }
                sum.total += r.profile.0 + r.out_class.rate.0;
                sum.profiles += r.profile.0;
            }
        }
        let mut group_deletes = Vec::new();
        for (&g, &sum) in &sums {
            let outer = self.layout.group_class(g, Kbps(sum.total));
            let inner = self.layout.group_in_class(g, Kbps(sum.profiles));
            match self.groups.get(&g) {
                Some(_) if sum.total == 0 => group_deletes.push(TcOp::DeleteClass {
                    ifindex,
                    classid: outer.classid,
                }),
                Some(have) => {
                    let was = (
                        self.layout.group_class(g, Kbps(have.total)),
                        self.layout.group_in_class(g, Kbps(have.profiles)),
                    );
                    for (want, had) in [(outer, was.0), (inner, was.1)] {
                        if !same_class(&had, &want) {
                            pre.push(TcOp::ChangeClass {
                                ifindex,
                                class: want,
                            });
                            undo.push(Some(TcOp::ChangeClass {
                                ifindex,
                                class: had,
                            }));
                        }
                    }
                }
                None if sum.total == 0 => {}
                None => {
                    pre.push(TcOp::CreateClass {
                        ifindex,
                        class: outer,
                    });
                    // Deleting the class takes its qdisc and classes with it.
                    undo.push(Some(TcOp::DeleteClass {
                        ifindex,
                        classid: outer.classid,
                    }));
                    pre.push(TcOp::CreateQdisc {
                        ifindex,
                        handle: TcHandle::new(self.layout.group_major(g), 0),
                        parent: outer.classid,
                        default_minor: 0,
                    });
                    undo.push(None);
                    for class in [self.layout.group_root(g), inner] {
                        pre.push(TcOp::CreateClass { ifindex, class });
                        undo.push(None);
                    }
                }
            }
        }
        for r in rendered {
            let old = self.applied.get(&r.id);
            {
                let want = r.out_class;
                match old.and_then(|a| a.out_class) {
                    None => {
                        pre.push(TcOp::CreateClass {
                            ifindex,
                            class: want,
                        });
                        undo.push(Some(TcOp::DeleteClass {
                            ifindex,
                            classid: want.classid,
                        }));
                    }
                    Some(h) if !same_class(&h, &want) => {
                        pre.push(TcOp::ChangeClass {
                            ifindex,
                            class: want,
                        });
                        undo.push(Some(TcOp::ChangeClass { ifindex, class: h }));
                    }
                    Some(_) => {}
                }
            }
            match old {
                None => summary.installed += 1,
                Some(a)
                    if a.fingerprint != r.fingerprint
                        || a.profile != r.profile
                        || a.out_class.map(|c| (c.rate, c.ceil))
                            != Some((r.out_class.rate, r.out_class.ceil)) =>
                {
                    summary.changed += 1
                }
                Some(_) => summary.unchanged += 1,
            }
        }
        let nft_plan = self.plan_nft(rendered, removing);
        let mut post = Vec::new();
        for id in removing {
            let a = &self.applied[id];
            if sums
                .get(&Layout::group_of(a.slot))
                .is_some_and(|s| s.total == 0)
            {
                continue; // the group's class goes, and its classes with it
            }
            if let Some(c) = a.out_class {
                post.push(TcOp::DeleteClass {
                    ifindex,
                    classid: c.classid,
                });
            }
        }
        post.extend(group_deletes);
        Plan {
            tc_pre: pre,
            tc_undo: undo,
            nft: nft_plan,
            tc_post: post,
            group_sums: sums,
        }
    }

    /// Runs `plan`: HTB creates and changes (undone in reverse if anything
    /// later is refused), the nftables transaction (atomic), then HTB
    /// deletes. When the plan creates the table, the transaction goes to
    /// the kernel at the same time as the HTB messages (the two take
    /// different locks), and a refusal of either undoes both.
    fn run_plan(
        &mut self,
        plan: Plan,
        installs: bool,
        summary: &mut ApplySummary,
    ) -> Result<(), EnforceError> {
        let Plan {
            tc_pre: pre,
            tc_undo: undo,
            nft: nft_plan,
            tc_post: post,
            group_sums: sums,
        } = plan;
        let creates_table = nft_plan
            .batch
            .commands
            .first()
            .is_some_and(|c| matches!(c, Command::AddTable));

        // HTB creates and changes; on a refusal, undo what went through.
        let tc_started = Instant::now();
        let (results, early_nft) = if creates_table {
            let (r, n) = self.backend.tc_and_nft(&pre, &nft_plan.batch);
            (r, Some(n))
        } else {
            (self.backend.tc(&pre), None)
        };
        let tc_elapsed = tc_started.elapsed();
        summary.tc_messages += pre.len();
        if let Some(pos) = results.iter().position(Result::is_err) {
            let failed = results.into_iter().nth(pos).and_then(Result::err);
            self.undo(&pre, &undo, pos);
            if let Some(Ok(())) = early_nft {
                // The table went in beside the refused HTB messages: it goes again.
                let mut batch = Batch::new(self.layout.table_id());
                batch.push(Command::DeleteTable);
                if let Err(e) = self.backend.nft(&batch) {
                    tracing::error!(error = %e, "rollback of the new table failed");
                }
            }
            let source = failed.unwrap_or(crate::tc::KernelError {
                errno: libc::EIO,
                message: None,
            });
            return Err(tc_err(&pre[pos], source));
        }
        if installs {
            self.base_tc = true;
        }
        let nft_started = Instant::now();
        if !nft_plan.batch.is_empty() {
            summary.nft_transactions += 1;
            let result = match early_nft {
                Some(r) => r,
                None => self.backend.nft(&nft_plan.batch),
            };
            tracing::debug!(
                tc_messages = pre.len(),
                tc_us = tc_elapsed.as_micros() as u64,
                nft_commands = nft_plan.batch.commands.len(),
                nft_us = nft_started.elapsed().as_micros() as u64,
                "change sent to the kernel"
            );
            if let Err(e) = result {
                self.undo(&pre, &undo, pre.len());
                if pre
                    .first()
                    .is_some_and(|op| matches!(op, TcOp::CreateQdisc { .. }))
                {
                    self.base_tc = false;
                }
                return Err(EnforceError::Nft(e));
            }
            if installs {
                self.base_nft = true;
            }
            self.shape_counts = nft_plan.shape_counts;
            self.maps_present = nft_plan.maps_present;
            self.fallback = nft_plan.fallback;
        }
        for (g, sum) in sums {
            if sum.total == 0 {
                self.groups.remove(&g);
            } else {
                self.groups.insert(g, sum);
            }
        }
        // Deletes last: nothing is steered into these classes any more.
        for (op, r) in post.iter().zip(self.backend.tc(&post)) {
            if let Err(e) = r {
                tracing::warn!(op = %op, error = %e, "could not delete a class; reconcile at next start removes it");
            }
        }
        summary.tc_messages += post.len();
        Ok(())
    }

    /// The nftables transaction of a change, and the table's bookkeeping
    /// after it (committed only once the kernel took the transaction).
    ///
    /// Order inside the batch (one transaction, so packets never see a
    /// half-made change): the table, base and fallback chains when new; the
    /// maps of new shapes; each new decision's limit object, chain and
    /// rules, each changed decision's chain rewritten (its limit object kept
    /// unless the profile changed: the bucket keeps its state across an
    /// action change); map elements deleted, then added; the fallback chain
    /// rewritten if one of its decisions changed; the base chain rewritten
    /// if the set of maps changed; removed decisions' chains and limits;
    /// maps no decision uses any more.
    fn plan_nft(&self, rendered: &[Rendered], removing: &BTreeSet<u64>) -> NftPlan {
        let netdev = self.layout.ingress();
        let mut batch = Batch::new(self.layout.table_id());
        let creating = !self.base_nft && !rendered.is_empty();
        if creating {
            batch.push(Command::AddTable);
            batch.push(Command::AddChain {
                name: BASE_CHAIN.into(),
                hook: Some(self.layout.hook()),
            });
            batch.push(Command::AddChain {
                name: FALLBACK_CHAIN.into(),
                hook: None,
            });
        }
        let mut counts = self.shape_counts.clone();
        let mut fallback = self.fallback.clone();
        let mut fallback_changed = false;
        let mut adds: BTreeMap<Shape, Vec<Element>> = BTreeMap::new();
        let mut dels: BTreeMap<Shape, Vec<Vec<KeyPart>>> = BTreeMap::new();
        let mut objects = Vec::new();
        let mut drop_classify =
            |c: &Classify,
             id: u64,
             counts: &mut BTreeMap<Shape, usize>,
             fallback: &mut BTreeMap<u64, Rule>| match c {
                Classify::Map { shape, key } => {
                    dels.entry(shape.clone()).or_default().push(key.clone());
                    if let Some(n) = counts.get_mut(shape) {
                        *n = n.saturating_sub(1);
                    }
                }
                Classify::Rule(_) => {
                    fallback.remove(&id);
                    fallback_changed = true;
                }
            };
        let mut removals = Vec::new();
        for id in removing {
            let a = &self.applied[id];
            drop_classify(&a.classify, *id, &mut counts, &mut fallback);
            let chain = render::chain_name(*id);
            removals.push(Command::FlushChain(chain.clone()));
            removals.push(Command::DeleteChain(chain));
            removals.push(Command::DeleteLimit(a.limit.name.clone()));
        }
        let mut new_classify = Vec::new();
        for r in rendered {
            let chain = r.chain();
            let rules = r.rules.iter().map(|rule| Command::AddRule {
                chain: chain.clone(),
                rule: rule.clone(),
            });
            match self.applied.get(&r.id) {
                None => {
                    objects.push(Command::AddLimit(r.limit.clone()));
                    objects.push(Command::AddChain {
                        name: chain.clone(),
                        hook: None,
                    });
                    objects.extend(rules);
                    new_classify.push(r);
                }
                Some(a) if a.fingerprint != r.fingerprint => {
                    objects.push(Command::FlushChain(chain.clone()));
                    if a.limit != r.limit {
                        objects.push(Command::DeleteLimit(a.limit.name.clone()));
                        objects.push(Command::AddLimit(r.limit.clone()));
                    }
                    objects.extend(rules);
                    if a.classify != r.classify {
                        drop_classify(&a.classify, r.id, &mut counts, &mut fallback);
                        new_classify.push(r);
                    }
                }
                Some(_) => {}
            }
        }
        for r in new_classify {
            match &r.classify {
                Classify::Map { shape, key } => {
                    adds.entry(shape.clone()).or_default().push(Element {
                        key: key.clone(),
                        chain: r.chain(),
                    });
                    *counts.entry(shape.clone()).or_default() += 1;
                }
                Classify::Rule(_) => {
                    if let Some(rule) = r.classify.rule(r.id) {
                        fallback.insert(r.id, rule);
                    }
                    fallback_changed = true;
                }
            }
        }
        counts.retain(|_, n| *n > 0);
        let maps: BTreeSet<Shape> = counts.keys().cloned().collect();
        for shape in maps.difference(&self.maps_present) {
            batch.push(Command::AddMap(shape.clone()));
        }
        batch.commands.extend(objects);
        for (shape, keys) in dels {
            batch.push(Command::DeleteElements { shape, keys });
        }
        for (shape, elements) in adds {
            batch.push(Command::AddElements { shape, elements });
        }
        if fallback_changed {
            batch.push(Command::FlushChain(FALLBACK_CHAIN.into()));
            for rule in fallback.values() {
                batch.push(Command::AddRule {
                    chain: FALLBACK_CHAIN.into(),
                    rule: rule.clone(),
                });
            }
        }
        if creating || maps != self.maps_present {
            if !creating {
                batch.push(Command::FlushChain(BASE_CHAIN.into()));
            }
            for rule in render::base_rules(&self.layout, maps.iter()) {
                batch.push(Command::AddRule {
                    chain: BASE_CHAIN.into(),
                    rule,
                });
            }
        }
        batch.commands.extend(removals);
        for shape in self.maps_present.difference(&maps) {
            batch.push(Command::DeleteMap(shape.clone()));
        }
        let _ = netdev;
        NftPlan {
            batch,
            shape_counts: counts,
            maps_present: maps,
            fallback,
        }
    }

    /// Reconcile of an existing table (its base chain on the right hook):
    /// adopts every decision chain whose metadata, slot and limit object are
    /// consistent, and plans into `batch` the removal of everything else
    /// (stray chains, limits and maps, elements jumping to no adopted
    /// decision or to the wrong one), the elements of adopted decisions that
    /// went missing, and the base and fallback chains rewritten whole.
    fn reconcile_table(
        &mut self,
        st: TableState,
        adopted: &mut BTreeMap<u64, Applied>,
        batch: &mut Batch,
        report: &mut StartReport,
    ) {
        let netdev = self.layout.ingress();
        let mut slots_seen = BTreeSet::new();
        let mut dead_chains = Vec::new();
        for (id, ChainState { meta, .. }) in &st.chains {
            let usable = meta
                .as_ref()
                .filter(|m| {
                    m.slot < MAX_SLOTS
                        && st.limits.contains(&render::limit_name(*id))
                        && slots_seen.insert(m.slot)
                })
                .and_then(|m| Some((m, render::classify(&m.flow, netdev).ok()?)));
            match usable {
                Some((m, classify)) => {
                    let profile = qosloop_schema::TrafficProfile {
                        rate: m.profile,
                        burst_bytes: m.burst_bytes,
                    };
                    adopted.insert(
                        *id,
                        Applied {
                            slot: m.slot,
                            version: m.version,
                            fingerprint: m.fingerprint,
                            classify,
                            limit: Limit {
                                name: render::limit_name(*id),
                                bytes_per_sec: m.profile.bytes_per_sec(),
                                burst_bytes: render::meter_burst_bytes(&profile),
                            },
                            profile: m.profile,
                            out_class: None,
                            decision: None,
                        },
                    );
                }
                None => dead_chains.push(render::chain_name(*id)),
            }
        }
        // The base chain and the fallback chain are rewritten whole below;
        // flushing them first drops their references to maps and chains.
        batch.push(Command::FlushChain(BASE_CHAIN.into()));
        if st.fallback {
            batch.push(Command::FlushChain(FALLBACK_CHAIN.into()));
        } else {
            batch.push(Command::AddChain {
                name: FALLBACK_CHAIN.into(),
                hook: None,
            });
        }
        // Elements: keep those that are exactly an adopted decision's.
        let mut found = BTreeSet::new();
        let mut stray_maps = Vec::new();
        for (name, elems) in &st.maps {
            let Some(shape) = Shape::from_map_name(name) else {
                stray_maps.push(name.clone());
                continue;
            };
            let mut keys = Vec::new();
            for (key, target) in elems {
                let owner = target
                    .strip_prefix('d')
                    .and_then(|s| s.parse::<u64>().ok())
                    .filter(|id| {
                        adopted.get(id).is_some_and(|a| {
                            a.classify
                                == Classify::Map {
                                    shape: shape.clone(),
                                    key: key.clone(),
                                }
                        })
                    });
                match owner {
                    Some(id) if found.insert(id) => {}
                    _ => keys.push(key.clone()),
                }
            }
            if !keys.is_empty() {
                report.cleaned_elements += keys.len();
                batch.push(Command::DeleteElements {
                    shape: shape.clone(),
                    keys,
                });
            }
            self.maps_present.insert(shape);
        }
        for chain in dead_chains.iter().chain(&st.stray_chains) {
            batch.push(Command::FlushChain(chain.clone()));
            batch.push(Command::DeleteChain(chain.clone()));
            report.cleaned_chains += 1;
        }
        for l in &st.limits {
            let ours = l
                .strip_prefix('l')
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|id| adopted.contains_key(&id));
            if !ours {
                batch.push(Command::DeleteLimit(l.clone()));
            }
        }
        for name in stray_maps {
            // Not a shape of ours: delete it by a shape-less command text.
            tracing::warn!(map = %name, "a map qosloop did not create is in its table; deleting the table's stray map is left to --cleanup");
        }
        // What adopted decisions need: their maps, elements, fallback rules.
        let mut adds: BTreeMap<Shape, Vec<Element>> = BTreeMap::new();
        for (id, a) in adopted.iter() {
            match &a.classify {
                Classify::Map { shape, .. } => {
                    *self.shape_counts.entry(shape.clone()).or_default() += 1;
                    if !found.contains(id) {
                        if let Some((shape, e)) = a.classify.element(&render::chain_name(*id)) {
                            adds.entry(shape).or_default().push(e);
                        }
                    }
                }
                Classify::Rule(_) => {
                    if let Some(rule) = a.classify.rule(*id) {
                        self.fallback.insert(*id, rule);
                    }
                }
            }
        }
        for shape in self.shape_counts.keys() {
            if self.maps_present.insert(shape.clone()) {
                batch.push(Command::AddMap(shape.clone()));
            }
        }
        for (shape, elements) in adds {
            report.restored_elements += elements.len();
            tracing::warn!(map = %shape.map_name(), missing = elements.len(), "map elements of adopted decisions were missing (changed behind the enforcer's back); adding them again");
            batch.push(Command::AddElements { shape, elements });
        }
        for rule in self.fallback.values() {
            batch.push(Command::AddRule {
                chain: FALLBACK_CHAIN.into(),
                rule: rule.clone(),
            });
        }
        for rule in render::base_rules(&self.layout, self.maps_present.iter()) {
            batch.push(Command::AddRule {
                chain: BASE_CHAIN.into(),
                rule,
            });
        }
    }

    /// Undoes `pre[..done]` in reverse (best effort, logged).
    fn undo(&mut self, pre: &[TcOp], undo: &[Option<TcOp>], done: usize) {
        let ops: Vec<TcOp> = (0..done).rev().filter_map(|i| undo[i].clone()).collect();
        let qdisc_undone = ops.iter().any(|op| matches!(op, TcOp::DeleteQdisc { .. }));
        // Deleting the qdisc deletes its classes: skip the class deletes then.
        let ops: Vec<TcOp> = if qdisc_undone {
            ops.into_iter()
                .filter(|op| matches!(op, TcOp::DeleteQdisc { .. }))
                .collect()
        } else {
            ops
        };
        for (op, r) in ops.iter().zip(self.backend.tc(&ops)) {
            if let Err(e) = r {
                tracing::error!(op = %op, error = %e, "rollback step failed");
            }
        }
        let _ = pre;
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
mod tests {
    use super::*;
    use crate::backend::FakeKernel;
    use qosloop_schema::{DecisionReason, Dscp, OutOfProfileAction, TrafficProfile};

    fn cfg() -> EnforcerConfig {
        EnforcerConfig {
            direction: qosloop_schema::Direction::Egress,
            interface: "eth1".into(),
            roles: vec!["edge".into()],
            capacity: Kbps(10_000),
            qdisc_major: DEFAULT_QDISC_MAJOR,
        }
    }

    fn decision(id: u64, port: u16, action: OutOfProfileAction) -> Decision {
        Decision {
            id,
            version: 1,
            role: "edge".into(),
            policy_dn: "cn=gold".into(),
            flow: FlowSpec {
                src: Some("10.1.0.1".parse().unwrap()),
                dst: Some("10.2.0.2".parse().unwrap()),
                proto: Some(17),
                src_ports: None,
                dst_ports: Some(qosloop_schema::PortRange::single(port)),
            },
            profile: TrafficProfile {
                rate: Kbps(1000),
                burst_bytes: 15_000,
            },
            in_profile_dscp: Some(Dscp::CS6),
            out_of_profile: action,
            reason: DecisionReason {
                rate_kbps: 0.0,
                avg_rate_kbps: 0.0,
                link: "l".into(),
                link_load_kbps: 0.0,
                band: "low".into(),
            },
            issued_ns: 0,
        }
    }

    fn accept(kbps: u64) -> OutOfProfileAction {
        OutOfProfileAction::Accept {
            shape: Some(Kbps(kbps)),
        }
    }

    fn start(k: FakeKernel) -> Enforcer<FakeKernel> {
        Enforcer::start(k, cfg()).unwrap().0
    }

    #[test]
    fn install_builds_qdisc_classes_and_table() {
        let mut e = start(FakeKernel::with_interface("eth1", 3));
        let s = e.install(decision(1, 5001, accept(875))).unwrap();
        // qdisc, root, default, steering filter, group class + qdisc + root, in, out.
        assert_eq!((s.installed, s.tc_messages, s.nft_transactions), (1, 9, 1));
        let k = e.backend();
        assert!(k.root_qdisc.is_some());
        assert_eq!(k.steer, Some((0xe500, 255, 0x100)));
        assert_eq!(k.classes.len(), 6);
        let group = k.classes[&TcHandle::new(0xe5, 0x100).0];
        assert_eq!(group.rate, Kbps(1000 + 8));
        assert_eq!(
            k.child_qdiscs[&group.classid.0].handle,
            TcHandle::new(0xe500, 0)
        );
        let t = k.table.as_ref().unwrap();
        // Guard, one map lookup, the jump to the fallback chain.
        assert_eq!(t.chains["postrouting"].rules.len(), 3);
        assert_eq!(t.chains["d1"].rules.len(), 2);
        assert_eq!(t.maps["v4_proto_saddr_daddr_dport"].1.len(), 1);
        assert!(t.limits.contains_key("l1"));
    }

    #[test]
    fn shape_change_is_one_class_message_and_no_nft() {
        let mut e = start(FakeKernel::with_interface("eth1", 3));
        e.install(decision(1, 5001, accept(875))).unwrap();
        let nft_before = e.backend().nft_transactions;
        let mut d = decision(1, 5001, accept(500));
        d.version = 2;
        let s = e.install(d).unwrap();
        assert_eq!((s.changed, s.tc_messages, s.nft_transactions), (1, 1, 0));
        assert_eq!(e.backend().nft_transactions, nft_before);
        let out = e.backend().classes[&TcHandle::new(0xe500, 0x100).0];
        assert_eq!((out.rate, out.ceil), (Kbps(8), Kbps(500)));
    }

    #[test]
    fn action_change_rewrites_only_its_chain() {
        let mut e = start(FakeKernel::with_interface("eth1", 3));
        e.install(decision(1, 5001, accept(875))).unwrap();
        let s = e
            .install(decision(
                1,
                5001,
                OutOfProfileAction::Remark {
                    dscp: Dscp::BEST_EFFORT,
                    shape: Some(Kbps(125)),
                },
            ))
            .unwrap();
        assert_eq!((s.changed, s.tc_messages, s.nft_transactions), (1, 1, 1));
        let t = e.backend().table.clone().unwrap();
        assert!(t.chains["d1"].rules[0].to_string().contains("dscp set cs0"));
        // The meter survives the action change: the same limit object.
        assert_eq!(t.limits.len(), 1);
        let same = e
            .install(decision(
                1,
                5001,
                OutOfProfileAction::Remark {
                    dscp: Dscp::BEST_EFFORT,
                    shape: Some(Kbps(125)),
                },
            ))
            .unwrap();
        assert_eq!(
            (same.unchanged, same.tc_messages, same.nft_transactions),
            (1, 0, 0)
        );
    }

    #[test]
    fn bad_decisions_are_refused_and_leave_state_intact() {
        let mut e = start(FakeKernel::with_interface("eth1", 3));
        e.install(decision(1, 5001, accept(875))).unwrap();
        let snapshot = (e.backend().classes.clone(), e.backend().table.clone());
        let mut zero = decision(2, 5002, accept(875));
        zero.profile.rate = Kbps(0);
        assert!(e
            .install(zero)
            .unwrap_err()
            .to_string()
            .contains("profile rate is 0"));
        let too_fast = decision(2, 5002, accept(20_000));
        assert!(e
            .install(too_fast)
            .unwrap_err()
            .to_string()
            .contains("above the capacity"));
        let mut role = decision(2, 5002, accept(875));
        role.role = "core".into();
        assert!(e.install(role).unwrap_err().to_string().contains("role"));
        let clash = decision(2, 5001, accept(875));
        assert!(matches!(
            e.install(clash),
            Err(EnforceError::Conflict { other: 1, .. })
        ));
        let mut mixed = decision(2, 5002, accept(875));
        mixed.flow.dst = Some("2001:db8::1".parse().unwrap());
        assert!(e
            .install(mixed)
            .unwrap_err()
            .to_string()
            .contains("address families"));
        let many: Vec<Decision> = (10..20)
            .map(|i| decision(i, 6000 + i as u16, accept(875)))
            .collect();
        assert!(matches!(
            e.apply(many, vec![]),
            Err(EnforceError::Oversubscribed { .. })
        ));
        assert_eq!(
            (e.backend().classes.clone(), e.backend().table.clone()),
            snapshot
        );
        assert!(e.install(decision(2, 5002, accept(875))).is_ok());
    }

    #[test]
    fn kernel_refusals_roll_back() {
        let mut e = start(FakeKernel::with_interface("eth1", 3));
        e.install(decision(1, 5001, accept(875))).unwrap();
        let snapshot = (e.backend().classes.clone(), e.backend().table.clone());
        // nftables refuses: the classes created for decision 2 go again.
        e.backend().fail_next_nft = Some("nftables refused the transaction: boom".into());
        let err = e.install(decision(2, 5002, accept(875))).unwrap_err();
        assert!(err.to_string().contains("boom"));
        assert_eq!(
            (e.backend().classes.clone(), e.backend().table.clone()),
            snapshot
        );
        // HTB refuses the second class: the first one is deleted again.
        e.backend().fail_class = Some(TcHandle::new(0xe500, 0x101));
        let err = e.install(decision(2, 5002, accept(875))).unwrap_err();
        assert!(err.to_string().contains("e500:101"), "{err}");
        assert_eq!(
            (e.backend().classes.clone(), e.backend().table.clone()),
            snapshot
        );
        // A refused rate change is undone too.
        e.backend().fail_next_nft = Some("no".into());
        assert!(e
            .install(decision(1, 5001, OutOfProfileAction::Drop))
            .is_err());
        assert_eq!(
            (e.backend().classes.clone(), e.backend().table.clone()),
            snapshot
        );
        // First install failing removes the qdisc it created.
        let mut fresh = start(FakeKernel::with_interface("eth1", 3));
        fresh.backend().fail_next_nft = Some("no".into());
        assert!(fresh.install(decision(1, 5001, accept(875))).is_err());
        assert!(fresh.backend().root_qdisc.is_none() && fresh.backend().classes.is_empty());
        assert!(fresh.install(decision(1, 5001, accept(875))).is_ok());
    }

    #[test]
    fn remove_and_restart_reconcile_without_duplicates_or_orphans() {
        let mut e = start(FakeKernel::with_interface("eth1", 3));
        for i in 1..=3 {
            e.install(decision(i, 5000 + i as u16, accept(875)))
                .unwrap();
        }
        e.remove(2).unwrap();
        // root, default, group class, its qdisc's root and in-profile class, 2 out classes.
        assert_eq!(e.backend().classes.len(), 5 + 2);
        assert!(!e
            .backend()
            .table
            .as_ref()
            .unwrap()
            .chains
            .contains_key("d2"));
        // "Crash": a new enforcer over the same kernel adopts 1 and 3.
        let mut kernel = std::mem::take(e.backend());
        // Leave an orphan class and a duplicate jump behind, as a crash might.
        kernel.classes.insert(
            TcHandle::new(0xe500, 0x1ff).0,
            HtbClass {
                classid: TcHandle::new(0xe500, 0x1ff),
                parent: TcHandle::new(0xe500, 1),
                rate: Kbps(8),
                ceil: Kbps(8),
                prio: 2,
            },
        );
        // ... and a map element deleted behind the enforcer's back, and a
        // stray element jumping to decision 3's chain under another key.
        let t = kernel.table.as_mut().unwrap();
        let (_, elems) = t.maps.get_mut("v4_proto_saddr_daddr_dport").unwrap();
        let key1 = elems.iter().find(|(_, c)| *c == "d1").unwrap().0.clone();
        elems.remove(&key1);
        let mut stray = key1.clone();
        stray[3] = crate::nft::model::KeyPart::Port(9999);
        elems.insert(stray, "d3".into());
        let (mut e, report) = Enforcer::start(kernel, cfg()).unwrap();
        assert_eq!(report.adopted, 2);
        assert_eq!(report.cleaned_classes, 1);
        assert_eq!((report.restored_elements, report.cleaned_elements), (1, 1));
        let t = e.backend().table.clone().unwrap();
        let elems = &t.maps["v4_proto_saddr_daddr_dport"].1;
        assert_eq!(elems.get(&key1).map(String::as_str), Some("d1"));
        assert_eq!(elems.len(), 2);
        // The PDP resynchronises with 1 (unchanged) and 4 (new): 3 goes.
        let s = e
            .sync(vec![
                decision(1, 5001, accept(875)),
                decision(4, 5004, accept(875)),
            ])
            .unwrap();
        assert_eq!((s.unchanged, s.installed, s.removed), (1, 1, 1));
        let k = e.backend();
        assert_eq!(k.classes.len(), 5 + 2);
        let t = k.table.as_ref().unwrap();
        assert_eq!(t.maps["v4_proto_saddr_daddr_dport"].1.len(), 2);
        assert_eq!(t.limits.len(), 2);
        assert_eq!(
            t.chains.keys().cloned().collect::<Vec<_>>(),
            vec![
                "d1".to_owned(),
                "d4".to_owned(),
                "fallback".to_owned(),
                "postrouting".to_owned()
            ]
        );
        e.cleanup().unwrap();
        assert!(e.backend().table.is_none() && e.backend().root_qdisc.is_none());
    }

    #[test]
    fn decisions_whose_classes_vanished_are_dropped_at_start() {
        let mut e = start(FakeKernel::with_interface("eth1", 3));
        e.install(decision(1, 5001, accept(875))).unwrap();
        e.install(decision(2, 5002, accept(875))).unwrap();
        let mut kernel = std::mem::take(e.backend());
        kernel.classes.remove(&TcHandle::new(0xe500, 0x100).0);
        let (mut e, report) = Enforcer::start(kernel, cfg()).unwrap();
        assert_eq!((report.adopted, report.cleaned_chains), (1, 1));
        assert_eq!(e.installed(), vec![(2, 1)]);
        let k = e.backend();
        assert_eq!(k.classes.len(), 5 + 1);
        assert!(!k.table.as_ref().unwrap().chains.contains_key("d1"));
        // The group's rates follow what stayed.
        assert_eq!(k.classes[&TcHandle::new(0xe5, 0x100).0].rate, Kbps(1008));
        assert_eq!(k.classes[&TcHandle::new(0xe500, 2).0].rate, Kbps(1000));
    }

    #[test]
    fn groups_hold_256_decisions_are_created_on_demand_and_go_when_empty() {
        let big = EnforcerConfig {
            capacity: Kbps(10_000_000),
            ..cfg()
        };
        let (mut e, _) =
            Enforcer::start(FakeKernel::with_interface("eth1", 3), big.clone()).unwrap();
        let all: Vec<Decision> = (1..=600)
            .map(|i| decision(i, 1000 + i as u16, accept(875)))
            .collect();
        let s = e.apply(all, vec![]).unwrap();
        assert_eq!(s.installed, 600);
        let k = e.backend();
        assert_eq!(k.child_qdiscs.len(), 3);
        // Group bytes: 0, 2, 3 (e501: shares the kernel's leaf-qdisc hash bucket).
        let rates = |k: &FakeKernel, g: usize| {
            let byte = [0u16, 2, 3][g];
            let outer = k.classes.get(&TcHandle::new(0xe5, 0x100 + byte).0)?;
            let inner = k.classes.get(&TcHandle::new(0xe500 | byte, 2).0)?;
            Some((outer.rate, inner.rate))
        };
        assert_eq!(rates(k, 0), Some((Kbps(256 * 1008), Kbps(256 * 1000))));
        assert_eq!(rates(k, 2), Some((Kbps(88 * 1008), Kbps(88 * 1000))));
        // Slot 259 (decision 260) is the fourth of group 1: e502:103.
        assert!(k.classes.contains_key(&TcHandle::new(0xe502, 0x103).0));
        // Emptying group 1 deletes its class (and qdisc) only: one message.
        let s = e.apply(vec![], (257..=512).collect()).unwrap();
        assert_eq!((s.removed, s.tc_messages), (256, 1));
        let k = e.backend();
        assert_eq!(rates(k, 1), None);
        assert_eq!(k.child_qdiscs.len(), 2);
        assert_eq!(k.classes.len(), 2 + 2 * 3 + 344);
        // A profile change moves both sums of its group, and nothing else.
        let mut d = decision(1, 1001, accept(875));
        d.profile.rate = Kbps(2000);
        let s = e.install(d).unwrap();
        assert_eq!((s.changed, s.tc_messages, s.nft_transactions), (1, 2, 1));
        assert_eq!(
            rates(e.backend(), 0),
            Some((Kbps(256 * 1008 + 1000), Kbps(256 * 1000 + 1000)))
        );
        // A restart adopts all 344, keeps both groups, cleans nothing.
        let kernel = std::mem::take(e.backend());
        let (mut e, report) = Enforcer::start(kernel, big).unwrap();
        assert_eq!((report.adopted, report.cleaned_classes), (344, 0));
        // A new decision takes the first free slot, in group 1, which comes back.
        e.install(decision(900, 9000, accept(875))).unwrap();
        assert_eq!(rates(e.backend(), 1), Some((Kbps(1008), Kbps(1000))));
    }

    #[test]
    fn flow_change_replaces_the_jump() {
        let mut e = start(FakeKernel::with_interface("eth1", 3));
        e.install(decision(1, 5001, accept(875))).unwrap();
        e.install(decision(1, 5009, accept(875))).unwrap();
        let t = e.backend().table.as_ref().unwrap();
        let elems = &t.maps["v4_proto_saddr_daddr_dport"].1;
        assert_eq!(elems.len(), 1);
        let key = elems.keys().next().unwrap();
        assert_eq!(key[3], crate::nft::model::KeyPart::Port(5009));
        // A flow that is no map key goes to the fallback chain, and the
        // empty map goes with its lookup.
        let mut wide = decision(1, 5009, accept(875));
        wide.flow.dst = Some("10.2.0.0/24".parse().unwrap());
        e.install(wide).unwrap();
        let t = e.backend().table.as_ref().unwrap();
        assert!(t.maps.is_empty());
        assert_eq!(t.chains["postrouting"].rules.len(), 2);
        assert_eq!(
            t.chains["fallback"].rules[0].to_string(),
            "ip saddr 10.1.0.1 ip daddr 10.2.0.0/24 udp dport 5009 jump d1 comment \"id=1\""
        );
    }

    #[test]
    fn unknown_interface_and_foreign_qdisc_are_errors() {
        let err = Enforcer::start(FakeKernel::default(), cfg()).unwrap_err();
        assert_eq!(err, EnforceError::UnknownInterface("eth1".into()));
        let mut k = FakeKernel::with_interface("eth1", 3);
        k.root_qdisc = Some(crate::tc::QdiscInfo {
            ifindex: 3,
            handle: TcHandle::new(1, 0),
            parent: u32::MAX,
            kind: "tbf".into(),
        });
        assert!(matches!(
            Enforcer::start(k, cfg()),
            Err(EnforceError::ForeignQdisc { .. })
        ));
        let mut bad = cfg();
        bad.interface = "eth 1;".into();
        assert!(matches!(
            Enforcer::start(FakeKernel::default(), bad),
            Err(EnforceError::UnusableInterfaceName(_))
        ));
    }

    /// The nftables commands of a plan, as `nft -f` text.
    fn plan_text(
        e: &Enforcer<FakeKernel>,
        upsert: Option<Decision>,
        remove: &[u64],
    ) -> Vec<String> {
        let rendered: Vec<Rendered> = upsert
            .iter()
            .map(|d| {
                let slot = e.applied.get(&d.id).map_or(9, |a| a.slot);
                render::render(e.layout(), d, slot, e.ifindex()).unwrap()
            })
            .collect();
        let removing: BTreeSet<u64> = remove.iter().copied().collect();
        let plan = e.plan(&rendered, &removing, &mut ApplySummary::default());
        let t = &plan.nft.batch.table;
        plan.nft.batch.commands.iter().map(|c| c.text(t)).collect()
    }

    #[test]
    fn plans_change_only_what_differs_and_keep_the_meter() {
        let mut e = start(FakeKernel::with_interface("eth1", 3));
        e.install(decision(1, 5001, accept(875))).unwrap();
        e.install(decision(2, 5002, accept(875))).unwrap();
        // Action change: the chain's rules, not its limit object.
        let remark = OutOfProfileAction::Remark {
            dscp: Dscp::BEST_EFFORT,
            shape: Some(Kbps(125)),
        };
        let p = plan_text(&e, Some(decision(1, 5001, remark)), &[]);
        assert_eq!(p.len(), 3, "{p:#?}");
        assert_eq!(p[0], "flush chain inet qosloop_eth1 d1");
        assert!(p[1].starts_with("add rule inet qosloop_eth1 d1 limit name \"l1\" counter packets 0 bytes 0 ip dscp set cs0"));
        // Profile change: the limit object is replaced (a new bucket for a new profile).
        let mut faster = decision(1, 5001, accept(875));
        faster.profile.rate = Kbps(2000);
        let p = plan_text(&e, Some(faster), &[]);
        assert!(
            p.contains(&"delete limit inet qosloop_eth1 l1".to_owned()),
            "{p:#?}"
        );
        assert!(p.contains(
            &"add limit inet qosloop_eth1 l1 { rate over 250000 bytes/second burst 15000 bytes; }"
                .to_owned()
        ));
        // Flow change: one element out, one in; the chain untouched but its meta comment.
        let p = plan_text(&e, Some(decision(1, 5009, accept(875))), &[]);
        assert!(p.iter().any(|c| c == "delete element inet qosloop_eth1 v4_proto_saddr_daddr_dport { udp . 10.1.0.1 . 10.2.0.2 . 5001 }"), "{p:#?}");
        assert!(p.iter().any(|c| c == "add element inet qosloop_eth1 v4_proto_saddr_daddr_dport { udp . 10.1.0.1 . 10.2.0.2 . 5009 : jump d1 }"), "{p:#?}");
        // Removal: element, chain, limit; the map stays for decision 2.
        let p = plan_text(&e, None, &[1]);
        assert_eq!(
            p,
            vec![
                "delete element inet qosloop_eth1 v4_proto_saddr_daddr_dport { udp . 10.1.0.1 . 10.2.0.2 . 5001 }",
                "flush chain inet qosloop_eth1 d1",
                "delete chain inet qosloop_eth1 d1",
                "delete limit inet qosloop_eth1 l1",
            ]
        );
        // Removing both: the map goes too, after the base chain stops looking it up.
        let p = plan_text(&e, None, &[1, 2]);
        assert_eq!(
            p.last().unwrap(),
            "delete map inet qosloop_eth1 v4_proto_saddr_daddr_dport"
        );
        assert!(p.contains(&"flush chain inet qosloop_eth1 postrouting".to_owned()));
        // Planning sent nothing.
        let before = e.backend().nft_transactions;
        let _ = plan_text(&e, None, &[1, 2]);
        assert_eq!(e.backend().nft_transactions, before);
    }

    #[test]
    fn the_fake_refuses_what_the_kernel_refuses() {
        use crate::nft::model::{Batch, Command, Stmt};
        let mut e = start(FakeKernel::with_interface("eth1", 3));
        e.install(decision(1, 5001, accept(875))).unwrap();
        let table = e.layout().table_id();
        let run = |e: &mut Enforcer<FakeKernel>, cmds: Vec<Command>| {
            let mut b = Batch::new(table.clone());
            b.commands = cmds;
            e.backend().nft(&b)
        };
        let before = e.backend().table.clone();
        let jump = |c: &str| Command::AddRule {
            chain: "fallback".into(),
            rule: Rule {
                stmts: vec![Stmt::Jump(c.into())],
                comment: None,
            },
        };
        for (cmds, why) in [
            (vec![jump("d99")], "jump d99"),
            (
                vec![Command::AddChain {
                    name: "d1".into(),
                    hook: None,
                }],
                "File exists",
            ),
            (vec![Command::DeleteChain("d1".into())], "not empty"),
            (
                vec![
                    Command::FlushChain("d1".into()),
                    Command::DeleteChain("d1".into()),
                ],
                "in use",
            ),
            (vec![Command::DeleteLimit("l1".into())], "busy"),
            (
                vec![Command::AddElements {
                    shape: crate::nft::model::Shape {
                        family: crate::nft::model::IpFamily::V4,
                        fields: vec![crate::nft::model::Field::Daddr],
                    },
                    elements: vec![],
                }],
                "v4_daddr: No such file",
            ),
            (
                vec![Command::AddLimit(e.applied[&1].limit.clone())],
                "File exists",
            ),
        ] {
            let err = run(&mut e, cmds).unwrap_err();
            assert!(err.contains(why), "{err} (wanted {why})");
            assert_eq!(e.backend().table, before, "a refused batch changes nothing");
        }
    }

    #[test]
    fn reconcile_restores_a_table_changed_behind_its_back() {
        let mut e = start(FakeKernel::with_interface("eth1", 3));
        e.install(decision(1, 5001, accept(875))).unwrap();
        e.install(decision(2, 5002, accept(875))).unwrap();
        let good = e.backend().table.clone();
        assert_eq!(e.reconcile().unwrap(), StartReport::default());
        // Someone deletes an element, adds one, and flushes a chain.
        let t = e.backend().table.as_mut().unwrap();
        let (_, elems) = t.maps.get_mut("v4_proto_saddr_daddr_dport").unwrap();
        let k1 = elems.iter().find(|(_, c)| *c == "d1").unwrap().0.clone();
        elems.remove(&k1);
        let mut other = k1.clone();
        other[3] = crate::nft::model::KeyPart::Port(7);
        elems.insert(other, "d2".into());
        t.chains.get_mut("d2").unwrap().rules.clear();
        t.chains.get_mut("postrouting").unwrap().rules.clear();
        let r = e.reconcile().unwrap();
        assert_eq!(
            (r.restored_elements, r.cleaned_elements, r.cleaned_chains),
            (1, 1, 1)
        );
        assert_eq!(e.backend().table, good);
    }

    #[test]
    fn overlap_index_finds_wide_and_host_specs() {
        let mut idx = FlowIndex::default();
        let host = FlowSpec {
            dst: Some("10.0.0.1".parse().unwrap()),
            ..FlowSpec::default()
        };
        let wide = FlowSpec {
            dst: Some("10.0.0.0/24".parse().unwrap()),
            ..FlowSpec::default()
        };
        idx.insert(1, host.clone());
        assert_eq!(idx.overlapping(&wide, &|_| false).map(|x| x.0), Some(1));
        idx.remove(1);
        idx.insert(2, wide);
        assert_eq!(idx.overlapping(&host, &|_| false).map(|x| x.0), Some(2));
        assert!(idx.overlapping(&host, &|id| id == 2).is_none());
    }
}
