//! The enforcer's nftables table: scripts of nft statements (applied as one
//! nf_tables netlink batch by `nfnl`, printed by the dry run), and the table
//! read back (`nft -j -a list table`).

use crate::render::{chain_name, parse_meta_comment, ChainMeta, Layout};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Name of the base chain (hook postrouting: forwarded and local traffic).
pub const BASE_CHAIN: &str = "postrouting";

/// One decision chain as found in the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ChainState {
    #[serde(skip)]
    pub meta: Option<ChainMeta>,
    pub in_packets: u64,
    pub in_bytes: u64,
    pub out_packets: u64,
    pub out_bytes: u64,
}

/// The enforcer's table as found in the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableState {
    /// The base chain exists with its interface guard as its first rule.
    pub base_ok: bool,
    /// Decision chains by decision id.
    pub chains: BTreeMap<u64, ChainState>,
    /// Handles of base-chain jump rules by decision id (several = duplicates).
    pub jumps: BTreeMap<u64, Vec<u64>>,
    /// Chains that are not decision chains nor the base chain.
    pub stray_chains: Vec<String>,
    /// Base-chain rules that are neither the guard nor a decision jump.
    pub stray_rules: Vec<u64>,
}

/// Statements creating the table and its base chain with its guard rule.
/// `table` is `FAMILY NAME` ([`Layout::nft_table`]) here and below.
pub fn create_table(out: &mut String, layout: &Layout) {
    let table = layout.nft_table();
    let _ = writeln!(out, "add table {table}");
    let _ = writeln!(
        out,
        "add chain {table} {BASE_CHAIN} {}",
        layout.base_chain_spec()
    );
    let _ = writeln!(out, "add rule {table} {BASE_CHAIN} {}", layout.guard_rule());
}

pub fn add_decision(out: &mut String, table: &str, id: u64, flow_match: &str, rules: &[String]) {
    let chain = chain_name(id);
    let _ = writeln!(out, "add chain {table} {chain}");
    for r in rules {
        let _ = writeln!(out, "add rule {table} {chain} {r}");
    }
    add_jump(out, table, id, flow_match);
}

pub fn add_jump(out: &mut String, table: &str, id: u64, flow_match: &str) {
    let chain = chain_name(id);
    let _ = writeln!(
        out,
        "add rule {table} {BASE_CHAIN} {flow_match} jump {chain} comment \"id={id}\""
    );
}

pub fn rewrite_chain(out: &mut String, table: &str, id: u64, rules: &[String]) {
    let chain = chain_name(id);
    let _ = writeln!(out, "flush chain {table} {chain}");
    for r in rules {
        let _ = writeln!(out, "add rule {table} {chain} {r}");
    }
}

pub fn delete_rule(out: &mut String, table: &str, handle: u64) {
    let _ = writeln!(out, "delete rule {table} {BASE_CHAIN} handle {handle}");
}

pub fn delete_chain(out: &mut String, table: &str, chain: &str) {
    let _ = writeln!(out, "flush chain {table} {chain}");
    let _ = writeln!(out, "delete chain {table} {chain}");
}

pub fn delete_table(out: &mut String, table: &str) {
    let _ = writeln!(out, "delete table {table}");
}

/// Reads the output of `nft -j -a list table FAMILY NAME` for `layout`.
pub fn parse_table(json: &str, layout: &Layout) -> Result<TableState, String> {
    let table = layout.table();
    let table = table.as_str();
    let hook = if layout.ingress() {
        "ingress"
    } else {
        "postrouting"
    };
    let v: Value = serde_json::from_str(json).map_err(|e| format!("nft JSON: {e}"))?;
    let items = v
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or("nft JSON: no \"nftables\" array")?;
    let mut st = TableState::default();
    let mut base_seen = false;
    let mut first_base_rule = true;
    for item in items {
        if let Some(c) = item.get("chain") {
            if c.get("table").and_then(Value::as_str) != Some(table) {
                continue;
            }
            let name = c.get("name").and_then(Value::as_str).unwrap_or_default();
            if name == BASE_CHAIN {
                base_seen = c.get("hook").and_then(Value::as_str) == Some(hook);
            } else if let Some(id) = name.strip_prefix('d').and_then(|s| s.parse::<u64>().ok()) {
                st.chains.entry(id).or_default();
            } else {
                st.stray_chains.push(name.to_owned());
            }
        } else if let Some(r) = item.get("rule") {
            if r.get("table").and_then(Value::as_str) != Some(table) {
                continue;
            }
            let chain = r.get("chain").and_then(Value::as_str).unwrap_or_default();
            let handle = r.get("handle").and_then(Value::as_u64).unwrap_or(0);
            let comment = r.get("comment").and_then(Value::as_str).unwrap_or_default();
            let (packets, bytes) = counter_of(r);
            if chain == BASE_CHAIN {
                let is_guard = first_base_rule && comment == "guard" && guards(r, layout);
                first_base_rule = false;
                if is_guard {
                    st.base_ok = base_seen;
                } else if let Some(id) = comment.strip_prefix("id=").and_then(|s| s.parse().ok()) {
                    st.jumps.entry(id).or_default().push(handle);
                } else {
                    st.stray_rules.push(handle);
                }
            } else if let Some(id) = chain.strip_prefix('d').and_then(|s| s.parse::<u64>().ok()) {
                let c = st.chains.entry(id).or_default();
                if comment == "out" {
                    c.out_packets = packets;
                    c.out_bytes = bytes;
                } else if let Some(meta) = parse_meta_comment(comment) {
                    c.in_packets = packets;
                    c.in_bytes = bytes;
                    c.meta = (meta.id == id).then_some(meta);
                }
            }
        }
    }
    Ok(st)
}

fn guards(rule: &Value, layout: &Layout) -> bool {
    let text = rule.get("expr").map(Value::to_string).unwrap_or_default();
    if layout.ingress() {
        text.contains("\"priority\"") && text.contains("\"!=\"")
    } else {
        text.contains("\"oifname\"") && text.contains(&format!("\"{}\"", layout.interface))
    }
}

fn counter_of(rule: &Value) -> (u64, u64) {
    rule.get("expr")
        .and_then(Value::as_array)
        .and_then(|exprs| exprs.iter().find_map(|e| e.get("counter")))
        .map(|c| {
            (
                c.get("packets").and_then(Value::as_u64).unwrap_or(0),
                c.get("bytes").and_then(Value::as_u64).unwrap_or(0),
            )
        })
        .unwrap_or((0, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
 {"table": {"family": "inet", "name": "qosloop_qa", "handle": 1}},
 {"chain": {"family": "inet", "table": "qosloop_qa", "name": "postrouting", "handle": 1, "type": "filter", "hook": "postrouting", "prio": 0, "policy": "accept"}},
 {"chain": {"family": "inet", "table": "qosloop_qa", "name": "d42", "handle": 3}},
 {"chain": {"family": "inet", "table": "qosloop_qa", "name": "junk", "handle": 9}},
 {"rule": {"family": "inet", "table": "qosloop_qa", "chain": "postrouting", "handle": 2, "comment": "guard", "expr": [{"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "qa"}}, {"accept": null}]}},
 {"rule": {"family": "inet", "table": "qosloop_qa", "chain": "postrouting", "handle": 6, "comment": "id=42", "expr": [{"jump": {"target": "d42"}}]}},
 {"rule": {"family": "inet", "table": "qosloop_qa", "chain": "postrouting", "handle": 8, "comment": "id=42", "expr": [{"jump": {"target": "d42"}}]}},
 {"rule": {"family": "inet", "table": "qosloop_qa", "chain": "postrouting", "handle": 10, "expr": [{"accept": null}]}},
 {"rule": {"family": "inet", "table": "qosloop_qa", "chain": "d42", "handle": 4, "comment": "out", "expr": [{"counter": {"packets": 5, "bytes": 500}}]}},
 {"rule": {"family": "inet", "table": "qosloop_qa", "chain": "d42", "handle": 5, "comment": "in id=42 v=3 slot=0 kind=drop fp=00000000000000ff p=1000", "expr": [{"counter": {"packets": 7, "bytes": 700}}]}}]}"#;

    #[test]
    fn reads_back_its_table() {
        let layout = |interface: &str| Layout {
            interface: interface.into(),
            direction: qosloop_schema::Direction::Egress,
            qdisc_major: 0xe5,
            capacity: qosloop_schema::Kbps(1000),
        };
        let st = parse_table(LISTING, &layout("qa")).unwrap();
        assert!(st.base_ok);
        assert_eq!(st.jumps[&42], vec![6, 8]);
        assert_eq!(st.stray_chains, vec!["junk".to_owned()]);
        assert_eq!(st.stray_rules, vec![10]);
        let c = &st.chains[&42];
        assert_eq!((c.in_packets, c.out_bytes), (7, 500));
        let m = c.meta.as_ref().unwrap();
        assert_eq!((m.version, m.slot, m.fingerprint), (3, 0, 0xff));
        // Another interface's layout: another table name, nothing of it here.
        assert!(!parse_table(LISTING, &layout("other")).unwrap().base_ok);
        assert!(parse_table("{", &layout("qa")).is_err());
        assert!(parse_table("{}", &layout("qa")).is_err());
    }
}
