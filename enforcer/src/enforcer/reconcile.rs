//! Reconcile: what a previous run (or someone else) left in the kernel,
//! compared with what the enforcer can account for. At start it adopts
//! every consistent decision and removes the rest; while running,
//! [`Enforcer::reconcile`] restores what was changed behind its back.

use super::*;

impl<B: KernelBackend> Enforcer<B> {
    pub(super) fn reconcile_at_start(&mut self) -> Result<StartReport, EnforceError> {
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
                            self.fallback.remove(*id);
                        }
                    }
                }
            }
            for (shape, keys) in dels {
                batch.push(Command::DeleteElements { shape, keys });
            }
            self.fallback
                .push_rewrite(&mut batch, true, !self.layout.ingress());
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
        for (id, a) in &self.applied {
            self.flows.insert(*id, a.flow.clone());
        }
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
        // A dry run's kernel always looks empty: nothing to compare.
        if !self.base_nft || self.backend.name() == "dry-run" {
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
        flush_base_chains(&mut batch, &st, !self.layout.ingress());
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
        self.fallback
            .push_rewrite(&mut batch, false, !self.layout.ingress());
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
                            flow: m.flow.clone(),
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
        // A decision whose flow overlaps another adopted one's is a
        // fallback rule, as the run that installed it made it.
        let mut index = FlowIndex::default();
        for (id, a) in adopted.iter() {
            index.insert(*id, a.flow.clone());
        }
        for (id, a) in adopted.iter_mut() {
            if matches!(a.classify, Classify::Map { .. })
                && index.overlapping(&a.flow, &|o| o == *id).is_some()
            {
                a.classify = Classify::Rule(render::fallback_match(&a.flow, netdev));
            }
        }
        // The base chain and the fallback chain are rewritten whole below;
        // flushing them first drops their references to maps and chains.
        flush_base_chains(batch, &st, !self.layout.ingress());
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
                        self.fallback.insert(*id, &a.flow, rule);
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
        self.fallback
            .push_rewrite(batch, false, !self.layout.ingress());
        for rule in render::base_rules(&self.layout, self.maps_present.iter()) {
            batch.push(Command::AddRule {
                chain: BASE_CHAIN.into(),
                rule,
            });
        }
    }
}

/// Empties the base chain, the fallback chain and (egress) the replies
/// chain, creating those two when the table lacks them (a table made before
/// the replies chain existed gets it here), so that they can be rewritten
/// whole: flushing drops their references to maps and decision chains.
fn flush_base_chains(batch: &mut Batch, st: &TableState, replies: bool) {
    batch.push(Command::FlushChain(BASE_CHAIN.into()));
    if st.fallback {
        batch.push(Command::FlushChain(FALLBACK_CHAIN.into()));
    } else {
        batch.push(Command::AddChain {
            name: FALLBACK_CHAIN.into(),
            hook: None,
        });
    }
    if !replies {
        return;
    }
    if st.replies {
        batch.push(Command::FlushChain(render::REPLIES_CHAIN.into()));
    } else {
        batch.push(Command::AddChain {
            name: render::REPLIES_CHAIN.into(),
            hook: Some(Hook::Input),
        });
    }
}
