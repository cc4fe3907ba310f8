//! The rules of the fallback chain, kept in the order the chain holds
//! them: by [`render::FallbackOrder`] of their decision's flow (the more
//! specific flow first), then by decision id.

use super::*;

/// The fallback chain's rules by decision, in chain order.
#[derive(Clone, Debug, Default)]
pub(super) struct FallbackRules {
    keys: BTreeMap<u64, render::FallbackOrder>,
    rules: BTreeMap<(render::FallbackOrder, u64), Rule>,
}

impl FallbackRules {
    /// Puts decision `id`'s rule (for `flow`) in its place, replacing any.
    pub(super) fn insert(&mut self, id: u64, flow: &FlowSpec, rule: Rule) {
        self.remove(id);
        let key = render::fallback_order(flow);
        self.keys.insert(id, key);
        self.rules.insert((key, id), rule);
    }
    /// Takes decision `id`'s rule out; false when it had none.
    pub(super) fn remove(&mut self, id: u64) -> bool {
        match self.keys.remove(&id) {
            Some(key) => self.rules.remove(&(key, id)).is_some(),
            None => false,
        }
    }
    /// The rules in chain order.
    pub(super) fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.values()
    }
    /// The decision ids in chain order.
    #[cfg(test)]
    pub(super) fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.rules.keys().map(|(_, id)| *id)
    }
    pub(super) fn clear(&mut self) {
        self.keys.clear();
        self.rules.clear();
    }
}
