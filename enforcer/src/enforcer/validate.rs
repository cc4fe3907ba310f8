//! Validation of decisions before anything reaches the kernel: roles,
//! rates, burst, the flow (address families, ports, map key size); and an
//! index of flows, for the overlaps that decide whether a decision is a map
//! element or a fallback rule.

use super::*;

/// Flow specs of applied decisions, indexed for overlap checks: specs with a
/// host destination only need comparing with the same host and wide specs.
#[derive(Debug, Default)]
pub(super) struct FlowIndex {
    flows: HashMap<u64, FlowSpec>,
    by_host: HashMap<IpAddr, BTreeSet<u64>>,
    wide: BTreeSet<u64>,
}

impl FlowIndex {
    fn host(spec: &FlowSpec) -> Option<IpAddr> {
        spec.dst.filter(|p| p.is_host()).map(|p| p.addr())
    }
    pub(super) fn insert(&mut self, id: u64, spec: FlowSpec) {
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
    pub(super) fn remove(&mut self, id: u64) {
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
    pub(super) fn overlapping(
        &self,
        spec: &FlowSpec,
        skip: &dyn Fn(u64) -> bool,
    ) -> Option<(u64, &FlowSpec)> {
        self.find(spec, skip, &|_| true)
    }
    /// An applied decision other than those in `skip` whose flow is `spec`.
    pub(super) fn same(
        &self,
        spec: &FlowSpec,
        skip: &dyn Fn(u64) -> bool,
    ) -> Option<(u64, &FlowSpec)> {
        self.find(spec, skip, &|other| other == spec)
    }
    /// Every decision other than those in `skip` whose flow overlaps `spec`.
    pub(super) fn all_overlapping(&self, spec: &FlowSpec, skip: &dyn Fn(u64) -> bool) -> Vec<u64> {
        self.candidates(spec)
            .filter(|id| !skip(*id) && self.flows.get(id).is_some_and(|o| o.overlaps(spec)))
            .collect()
    }
    /// The ids whose flows may overlap `spec`: the same host and the wide
    /// specs for a host destination, else all.
    fn candidates<'a>(&'a self, spec: &FlowSpec) -> Box<dyn Iterator<Item = u64> + 'a> {
        match Self::host(spec) {
            Some(h) => Box::new(
                self.by_host
                    .get(&h)
                    .into_iter()
                    .flatten()
                    .chain(self.wide.iter())
                    .copied(),
            ),
            None => Box::new(self.flows.keys().copied()),
        }
    }
    fn find(
        &self,
        spec: &FlowSpec,
        skip: &dyn Fn(u64) -> bool,
        pred: &dyn Fn(&FlowSpec) -> bool,
    ) -> Option<(u64, &FlowSpec)> {
        self.candidates(spec).find_map(|id| {
            let other = self.flows.get(&id)?;
            (!skip(id) && other.overlaps(spec) && pred(other)).then_some((id, other))
        })
    }
}

impl<B: KernelBackend> Enforcer<B> {
    pub(super) fn validate(&self, d: &Decision) -> Result<(), EnforceError> {
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
}
