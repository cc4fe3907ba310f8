//! The rules of the fallback chain, kept in the order the chain holds
//! them: by [`render::FallbackOrder`] of their decision's flow (the more
//! specific flow first), then by decision id; and the rules of the
//! `replies` chain (egress tables) derived from them.

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
    /// The `replies` chain's rules: one per per-user decision, in the
    /// fallback chain's order.
    pub(super) fn reply_rules(&self) -> impl Iterator<Item = Rule> + '_ {
        self.rules().filter_map(render::reply_rule)
    }
    /// Rewrites the fallback chain whole (flushed first when `flush`), and
    /// the replies chain with it when the table has one (`replies`: egress).
    pub(super) fn push_rewrite(&self, batch: &mut Batch, flush: bool, replies: bool) {
        if flush {
            batch.push(Command::FlushChain(FALLBACK_CHAIN.into()));
            if replies {
                batch.push(Command::FlushChain(render::REPLIES_CHAIN.into()));
            }
        }
        for rule in self.rules() {
            batch.push(Command::AddRule {
                chain: FALLBACK_CHAIN.into(),
                rule: rule.clone(),
            });
        }
        if replies {
            for rule in self.reply_rules() {
                batch.push(Command::AddRule {
                    chain: render::REPLIES_CHAIN.into(),
                    rule,
                });
            }
        }
    }
    pub(super) fn clear(&mut self) {
        self.keys.clear();
        self.rules.clear();
    }
}
