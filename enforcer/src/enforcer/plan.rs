//! A change as a value: [`Plan`] — the HTB messages and how to undo each,
//! the nftables transaction and the table's bookkeeping after it, the HTB
//! deletes — computed by a pure function of the desired decisions and of
//! what the enforcer knows is in the kernel, then run as a separate step
//! with rollback.

use super::*;

/// What one change does to the kernel, as a value: the HTB messages
/// before the nftables transaction and how to undo each, the transaction
/// with the table's bookkeeping after it, the HTB deletes after it, and the
/// group sums once done.
#[derive(Debug)]
pub(super) struct Plan {
    pub(super) tc_pre: Vec<TcOp>,
    pub(super) tc_undo: Vec<Option<TcOp>>,
    pub(super) nft: NftPlan,
    pub(super) tc_post: Vec<TcOp>,
    pub(super) group_sums: BTreeMap<u32, GroupSums>,
}

/// The nftables side of one change: the transaction, and the bookkeeping
/// of the table once the kernel took it.
#[derive(Debug)]
pub(super) struct NftPlan {
    pub(super) batch: Batch,
    pub(super) shape_counts: BTreeMap<Shape, usize>,
    pub(super) maps_present: BTreeSet<Shape>,
    pub(super) fallback: FallbackRules,
    /// Where each decision the change installs, changes or moves is
    /// classified once it is done (map element or fallback rule).
    pub(super) placements: BTreeMap<u64, Classify>,
}

impl<B: KernelBackend> Enforcer<B> {
    /// Executes a change: its plan, then the plan run against the kernel.
    /// Returns where the decisions it installed, changed or moved are
    /// classified now.
    pub(super) fn execute(
        &mut self,
        rendered: &[Rendered],
        removing: &BTreeSet<u64>,
        summary: &mut ApplySummary,
    ) -> Result<BTreeMap<u64, Classify>, EnforceError> {
        let plan = self.plan(rendered, removing, summary);
        self.run_plan(plan, !rendered.is_empty(), summary)
    }

    /// The plan of a change, from the desired decisions (`rendered`, the
    /// ids in `removing` to go) and what the enforcer knows is in the
    /// kernel — a pure function of both: nothing is sent. Counts installed,
    /// changed and unchanged decisions into `summary`.
    pub(super) fn plan(
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
                // Sorted with the decision deletes below by its lowest slot.
                Some(_) if sum.total == 0 => group_deletes.push((
                    g * render::SLOTS_PER_GROUP,
                    TcOp::DeleteClass {
                        ifindex,
                        classid: outer.classid,
                    },
                )),
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
        // HTB deletes: a group left empty is one delete of its group class
        // (which takes its qdisc and every class in it), its decisions get
        // none of their own; the others' classes one each. All in descending
        // slot order — the reverse of how a bulk install creates them: the
        // kernel unbinds each class's filter block by a walk from the newest
        // block of the host (`flow_indr_dev_setup_offload` on veth and
        // virtio-net), so the newest going first finds each near the front.
        let mut post = group_deletes;
        for id in removing {
            let a = &self.applied[id];
            if sums
                .get(&Layout::group_of(a.slot))
                .is_some_and(|s| s.total == 0)
            {
                continue; // the group's class goes, and its classes with it
            }
            if let Some(c) = a.out_class {
                post.push((
                    a.slot,
                    TcOp::DeleteClass {
                        ifindex,
                        classid: c.classid,
                    },
                ));
            }
        }
        post.sort_by_key(|(slot, _)| std::cmp::Reverse(*slot));
        let post = post.into_iter().map(|(_, op)| op).collect();
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
    ) -> Result<BTreeMap<u64, Classify>, EnforceError> {
        let Plan {
            tc_pre: pre,
            tc_undo: undo,
            nft: nft_plan,
            tc_post: post,
            group_sums: sums,
        } = plan;
        let placements = nft_plan.placements.clone();
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
        Ok(placements)
    }

    /// The nftables transaction of a change, and the table's bookkeeping
    /// after it (committed only once the kernel took the transaction).
    ///
    /// Order inside the batch (one transaction, so packets never see a
    /// half-made change): the table, base, fallback and replies chains when
    /// new; the
    /// maps of new shapes; each new decision's limit object, chain and
    /// rules, each changed decision's chain rewritten (its limit object kept
    /// unless the profile changed: the bucket keeps its state across an
    /// action change); map elements deleted, then added (also those of
    /// decisions moving between a map and the fallback chain as overlaps
    /// come and go); the fallback chain (and the replies chain with it)
    /// rewritten, in its order, if one of
    /// its decisions changed, came or went; the base chain rewritten
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
            if !netdev {
                batch.push(Command::AddChain {
                    name: render::REPLIES_CHAIN.into(),
                    hook: Some(Hook::Input),
                });
            }
        }
        let mut counts = self.shape_counts.clone();
        let mut fallback = self.fallback.clone();
        let mut fallback_changed = false;
        let mut adds: BTreeMap<Shape, Vec<Element>> = BTreeMap::new();
        let mut dels: BTreeMap<Shape, Vec<Vec<KeyPart>>> = BTreeMap::new();
        let mut objects = Vec::new();
        let mut removals = Vec::new();
        for id in removing {
            let a = &self.applied[id];
            let chain = render::chain_name(*id);
            removals.push(Command::FlushChain(chain.clone()));
            removals.push(Command::DeleteChain(chain));
            removals.push(Command::DeleteLimit(a.limit.name.clone()));
        }
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
                }
                Some(a) if a.fingerprint != r.fingerprint => {
                    objects.push(Command::FlushChain(chain.clone()));
                    if a.limit != r.limit {
                        objects.push(Command::DeleteLimit(a.limit.name.clone()));
                        objects.push(Command::AddLimit(r.limit.clone()));
                    }
                    objects.extend(rules);
                }
                Some(_) => {}
            }
        }
        // Classification: every decision whose place may change — removed,
        // installed or changed, or overlapping one of those flows (old or
        // new) — from its old place to its new one.
        let placements = self.placements(rendered, removing);
        let mut moved = BTreeSet::new();
        for id in removing {
            moved.insert(*id);
        }
        for (id, new) in &placements {
            if self.applied.get(id).map(|a| &a.classify) != Some(new) {
                moved.insert(*id);
            }
        }
        for id in &moved {
            let Some(a) = self.applied.get(id) else {
                continue;
            };
            match &a.classify {
                Classify::Map { shape, key } => {
                    dels.entry(shape.clone()).or_default().push(key.clone());
                    if let Some(n) = counts.get_mut(shape) {
                        *n = n.saturating_sub(1);
                    }
                }
                Classify::Rule(_) => {
                    fallback.remove(*id);
                    fallback_changed = true;
                }
            }
        }
        let new_flows: HashMap<u64, &FlowSpec> = rendered.iter().map(|r| (r.id, &r.flow)).collect();
        let flow_of = |id: u64| {
            new_flows
                .get(&id)
                .copied()
                .or_else(|| self.applied.get(&id).map(|a| &a.flow))
        };
        for id in &moved {
            let Some(new) = placements.get(id) else {
                continue; // removed
            };
            match new {
                Classify::Map { shape, key } => {
                    adds.entry(shape.clone()).or_default().push(Element {
                        key: key.clone(),
                        chain: render::chain_name(*id),
                    });
                    *counts.entry(shape.clone()).or_default() += 1;
                }
                Classify::Rule(_) => {
                    if let (Some(rule), Some(flow)) = (new.rule(*id), flow_of(*id)) {
                        fallback.insert(*id, flow, rule);
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
            fallback.push_rewrite(&mut batch, true, !netdev);
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
        NftPlan {
            batch,
            shape_counts: counts,
            maps_present: maps,
            fallback,
            placements,
        }
    }

    /// Where each decision a change may move is classified after it: the
    /// installed and changed ones, and every decision whose flow overlaps
    /// one of their flows (new or old) or a removed decision's. A decision
    /// is a map element when its flow names a field and overlaps no other
    /// decision's after the change; else a fallback rule.
    pub(super) fn placements(
        &self,
        rendered: &[Rendered],
        removing: &BTreeSet<u64>,
    ) -> BTreeMap<u64, Classify> {
        let netdev = self.layout.ingress();
        let ids: BTreeSet<u64> = rendered.iter().map(|r| r.id).collect();
        let mut batch = FlowIndex::default();
        for r in rendered {
            batch.insert(r.id, r.flow.clone());
        }
        let gone = |id: u64| removing.contains(&id) || ids.contains(&id);
        let mut affected: BTreeSet<u64> = BTreeSet::new();
        let mut touch = |spec: &FlowSpec| {
            affected.extend(self.flows.all_overlapping(spec, &gone));
        };
        for r in rendered {
            touch(&r.flow);
            if let Some(a) = self.applied.get(&r.id) {
                touch(&a.flow);
            }
        }
        for id in removing {
            touch(&self.applied[id].flow);
        }
        let overlapped = |id: u64, spec: &FlowSpec| {
            self.flows
                .overlapping(spec, &|o| o == id || gone(o))
                .is_some()
                || batch.overlapping(spec, &|o| o == id).is_some()
        };
        let place = |id: u64, spec: &FlowSpec, natural: &Classify| match natural {
            Classify::Map { .. } if overlapped(id, spec) => {
                Classify::Rule(render::fallback_match(spec, netdev))
            }
            _ => natural.clone(),
        };
        let mut out = BTreeMap::new();
        for r in rendered {
            out.insert(r.id, place(r.id, &r.flow, &r.classify));
        }
        for id in affected {
            let Some(a) = self.applied.get(&id) else {
                continue;
            };
            let natural = match render::classify(&a.flow, netdev) {
                Ok(c) => c,
                Err(_) => a.classify.clone(),
            };
            out.insert(id, place(id, &a.flow, &natural));
        }
        out
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
}
