//! Validation of decisions before anything reaches the kernel: roles,
//! rates, burst, the flow (address families, ports, map key size) and
//! overlaps with every other decision, through an index of flows.

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
