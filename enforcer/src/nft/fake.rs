//! An in-memory nf_tables table that executes the typed model and refuses
//! what the kernel refuses — a duplicate name, a jump to a missing chain,
//! an element for a missing map or with a key of the wrong shape, deleting
//! a chain that is not empty or still jumped to, a limit or map still in
//! use — so that a mismatch between the planner and the kernel shows up in
//! unit tests. A batch applies whole or not at all.

use super::model::{Batch, Command, Hook, KeyPart, Limit, Rule, Shape, Stmt};
use super::read::{ChainState, TableState, BASE_CHAIN};
use crate::render::{parse_meta_comment, FALLBACK_CHAIN, REPLIES_CHAIN};
use std::collections::BTreeMap;

/// One chain: its hook (base chain) and rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeChain {
    pub hook: Option<Hook>,
    pub rules: Vec<Rule>,
}

/// The fake's nftables table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeTable {
    pub chains: BTreeMap<String, FakeChain>,
    pub maps: BTreeMap<String, (Shape, BTreeMap<Vec<KeyPart>, String>)>,
    pub limits: BTreeMap<String, Limit>,
}

fn refs_chain(rule: &Rule, chain: &str) -> bool {
    rule.stmts
        .iter()
        .any(|s| matches!(s, Stmt::Jump(c) if c == chain))
}

impl FakeTable {
    fn all_rules(&self) -> impl Iterator<Item = &Rule> {
        self.chains.values().flat_map(|c| c.rules.iter())
    }

    fn check_rule(&self, rule: &Rule) -> Result<(), String> {
        for s in &rule.stmts {
            match s {
                Stmt::Jump(c) if !self.chains.contains_key(c) => {
                    return Err(format!(
                        "jump {c}: No such file or directory (no chain {c})"
                    ))
                }
                Stmt::LimitRef(l) if !self.limits.contains_key(l) => {
                    return Err(format!("limit name {l}: No such file or directory"))
                }
                Stmt::Lookup(shape) if !self.maps.contains_key(&shape.map_name()) => {
                    return Err(format!("@{}: No such file or directory", shape.map_name()))
                }
                _ => {}
            }
        }
        if rule.comment.as_ref().is_some_and(|c| c.len() > 254) {
            return Err("comment too long".into());
        }
        Ok(())
    }

    /// Executes one command, or says why the kernel would refuse it.
    pub fn run(&mut self, cmd: &Command) -> Result<(), String> {
        match cmd {
            Command::AddTable | Command::DeleteTable => {
                return Err("table commands go to FakeNft".into())
            }
            Command::AddChain { name, hook } => {
                if self.chains.contains_key(name) {
                    return Err(format!("chain {name}: File exists"));
                }
                self.chains.insert(
                    name.clone(),
                    FakeChain {
                        hook: hook.clone(),
                        rules: Vec::new(),
                    },
                );
            }
            Command::FlushChain(name) => {
                self.chains
                    .get_mut(name)
                    .ok_or(format!("chain {name}: No such file or directory"))?
                    .rules
                    .clear();
            }
            Command::DeleteChain(name) => {
                let c = self
                    .chains
                    .get(name)
                    .ok_or(format!("chain {name}: No such file or directory"))?;
                if !c.rules.is_empty() {
                    return Err(format!("chain {name}: Device or resource busy (not empty)"));
                }
                let jumped = self.all_rules().any(|r| refs_chain(r, name))
                    || self
                        .maps
                        .values()
                        .any(|(_, e)| e.values().any(|c| c == name));
                if jumped {
                    return Err(format!("chain {name}: Device or resource busy (in use)"));
                }
                self.chains.remove(name);
            }
            Command::AddRule { chain, rule } => {
                self.check_rule(rule)?;
                self.chains
                    .get_mut(chain)
                    .ok_or(format!("chain {chain}: No such file or directory"))?
                    .rules
                    .push(rule.clone());
            }
            Command::AddMap(shape) => {
                let name = shape.map_name();
                if self.maps.contains_key(&name) {
                    return Err(format!("map {name}: File exists"));
                }
                if shape.fields.is_empty() || shape.key_len() > super::model::MAX_KEY_LEN {
                    return Err(format!("map {name}: Invalid argument (key length)"));
                }
                self.maps.insert(name, (shape.clone(), BTreeMap::new()));
            }
            Command::DeleteMap(shape) => {
                let name = shape.map_name();
                if !self.maps.contains_key(&name) {
                    return Err(format!("map {name}: No such file or directory"));
                }
                if self.all_rules().any(|r| {
                    r.stmts
                        .iter()
                        .any(|s| matches!(s, Stmt::Lookup(l) if l == shape))
                }) {
                    return Err(format!("map {name}: Device or resource busy"));
                }
                self.maps.remove(&name);
            }
            Command::AddElements { shape, elements } => {
                let name = shape.map_name();
                let chains: Vec<bool> = elements
                    .iter()
                    .map(|e| self.chains.contains_key(&e.chain))
                    .collect();
                let (have, map) = self
                    .maps
                    .get_mut(&name)
                    .ok_or(format!("map {name}: No such file or directory"))?;
                for (e, chain_ok) in elements.iter().zip(chains) {
                    let mut key = Vec::new();
                    if have != shape || e.key.len() != shape.fields.len() {
                        return Err(format!("element for map {name}: Invalid argument"));
                    }
                    for k in &e.key {
                        k.put(&mut key);
                    }
                    if key.len() != shape.key_len() {
                        return Err(format!("element for map {name}: Invalid argument (key)"));
                    }
                    if !chain_ok {
                        return Err(format!("jump {}: No such file or directory", e.chain));
                    }
                    if map.insert(e.key.clone(), e.chain.clone()).is_some() {
                        return Err(format!("element in map {name}: File exists"));
                    }
                }
            }
            Command::DeleteElements { shape, keys } => {
                let name = shape.map_name();
                let (_, map) = self
                    .maps
                    .get_mut(&name)
                    .ok_or(format!("map {name}: No such file or directory"))?;
                for k in keys {
                    map.remove(k)
                        .ok_or(format!("element in map {name}: No such file or directory"))?;
                }
            }
            Command::AddLimit(l) => {
                if self.limits.contains_key(&l.name) {
                    return Err(format!("limit {}: File exists", l.name));
                }
                if l.bytes_per_sec == 0 {
                    return Err(format!("limit {}: Invalid argument", l.name));
                }
                self.limits.insert(l.name.clone(), l.clone());
            }
            Command::DeleteLimit(name) => {
                if !self.limits.contains_key(name) {
                    return Err(format!("limit {name}: No such file or directory"));
                }
                if self.all_rules().any(|r| {
                    r.stmts
                        .iter()
                        .any(|s| matches!(s, Stmt::LimitRef(l) if l == name))
                }) {
                    return Err(format!("limit {name}: Device or resource busy"));
                }
                self.limits.remove(name);
            }
        }
        Ok(())
    }

    /// The table as the enforcer reads it back.
    pub fn state(&self, hook: &Hook) -> TableState {
        let mut st = TableState::default();
        for (name, c) in &self.chains {
            if name == BASE_CHAIN {
                st.base_ok = c.hook.as_ref() == Some(hook);
            } else if name == FALLBACK_CHAIN {
                st.fallback = true;
            } else if name == REPLIES_CHAIN && *hook == Hook::Postrouting {
                st.replies = true;
            } else if let Some(id) = name.strip_prefix('d').and_then(|s| s.parse::<u64>().ok()) {
                let meta = c
                    .rules
                    .iter()
                    .find_map(|r| r.comment.as_deref().and_then(parse_meta_comment))
                    .filter(|m| m.id == id);
                st.chains.insert(
                    id,
                    ChainState {
                        meta,
                        ..ChainState::default()
                    },
                );
            } else {
                st.stray_chains.push(name.clone());
            }
        }
        for (name, (_, elems)) in &self.maps {
            st.maps.insert(
                name.clone(),
                elems.iter().map(|(k, c)| (k.clone(), c.clone())).collect(),
            );
        }
        st.limits = self.limits.keys().cloned().collect();
        st
    }
}

/// The fake kernel's nftables: at most one table (the enforcer's).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeNft {
    pub table: Option<FakeTable>,
}

impl FakeNft {
    /// Applies `batch` whole, or changes nothing and names the refused command.
    pub fn apply(&mut self, batch: &Batch) -> Result<(), String> {
        let mut table = self.table.clone();
        for cmd in &batch.commands {
            let refused = |e: String| {
                format!(
                    "nftables refused the transaction: `{}`: {e}",
                    super::encode::short(&cmd.text(&batch.table))
                )
            };
            match cmd {
                Command::AddTable => {
                    table.get_or_insert_with(FakeTable::default);
                }
                Command::DeleteTable => {
                    table
                        .take()
                        .ok_or_else(|| refused("No such file or directory".into()))?;
                }
                other => table
                    .as_mut()
                    .ok_or_else(|| refused("No such file or directory (no table)".into()))?
                    .run(other)
                    .map_err(refused)?,
            }
        }
        self.table = table;
        Ok(())
    }
}
