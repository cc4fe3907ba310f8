//! The enforcer's table read back (`nft -j -a list table`, at start and for
//! `status`): decision chains with their metadata and counters, map
//! elements with the chains they jump to, limit objects, and whatever else
//! is in the table (which reconcile removes). Changes never read the table:
//! they delete by name and by map key.

use super::model::{Field, IpFamily, KeyPart, Shape};
use crate::render::{
    parse_meta_comment, ChainMeta, Layout, FALLBACK_CHAIN, IN6_COMMENT, OUT6_COMMENT, REPLIES_CHAIN,
};
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

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
    /// The base chain exists on the right hook.
    pub base_ok: bool,
    /// The fallback chain exists.
    pub fallback: bool,
    /// The replies chain (input hook, egress tables) exists.
    pub replies: bool,
    /// Decision chains by decision id.
    pub chains: BTreeMap<u64, ChainState>,
    /// Map elements by map name: key and the chain it jumps to.
    pub maps: BTreeMap<String, Vec<(Vec<KeyPart>, String)>>,
    /// Names of the limit objects.
    pub limits: BTreeSet<String>,
    /// Chains that are none of the above.
    pub stray_chains: Vec<String>,
}

fn key_part(field: Field, shape: &Shape, v: &Value) -> Option<KeyPart> {
    let family = shape.family;
    let addr = |v: &Value| {
        v.as_str()
            .and_then(|s| s.parse::<std::net::IpAddr>().ok())
            .filter(|a| IpFamily::of(*a) == family)
    };
    let port = |v: &Value| v.as_u64().and_then(|n| u16::try_from(n).ok());
    match field {
        Field::L4proto if shape.interval => match v.get("range").and_then(Value::as_array) {
            Some(r) => {
                let p = |v: &Value| v.as_u64().and_then(|n| u8::try_from(n).ok());
                Some(KeyPart::Protos(p(r.first()?)?, p(r.get(1)?)?))
            }
            None => match key_part(
                field,
                &Shape {
                    interval: false,
                    ..shape.clone()
                },
                v,
            )? {
                KeyPart::Proto(p) => Some(KeyPart::Protos(p, p)),
                _ => None,
            },
        },
        Field::L4proto => match v {
            Value::Number(n) => n
                .as_u64()
                .and_then(|n| u8::try_from(n).ok())
                .map(KeyPart::Proto),
            Value::String(s) => (0..=255u8)
                .find(|p| super::model::proto_name(*p) == *s)
                .map(KeyPart::Proto),
            _ => None,
        },
        Field::Sport | Field::Dport if !shape.interval => port(v).map(KeyPart::Port),
        Field::Sport | Field::Dport => match v.get("range").and_then(Value::as_array) {
            Some(r) => Some(KeyPart::Ports(port(r.first()?)?, port(r.get(1)?)?)),
            None => port(v).map(|p| KeyPart::Ports(p, p)),
        },
        Field::Saddr | Field::Daddr if !shape.interval => addr(v).map(KeyPart::Addr),
        Field::Saddr | Field::Daddr => match v.get("prefix") {
            Some(p) => {
                let a = addr(p.get("addr")?)?;
                let len = u8::try_from(p.get("len")?.as_u64()?).ok()?;
                qosloop_schema::IpPrefix::new(a, len)
                    .ok()
                    .map(KeyPart::Prefix)
            }
            None => addr(v).map(|a| KeyPart::Prefix(qosloop_schema::IpPrefix::host(a))),
        },
    }
}

fn elements(shape: &Shape, map: &Value) -> Vec<(Vec<KeyPart>, String)> {
    let mut out = Vec::new();
    for e in map
        .get("elem")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some([key, data]) = e.as_array().map(Vec::as_slice) else {
            continue;
        };
        let parts: Vec<&Value> = match key.get("concat").and_then(Value::as_array) {
            Some(list) => list.iter().collect(),
            None => vec![key],
        };
        if parts.len() != shape.fields.len() {
            continue;
        }
        let key: Option<Vec<KeyPart>> = shape
            .fields
            .iter()
            .zip(parts)
            .map(|(f, v)| key_part(*f, shape, v))
            .collect();
        let target = data
            .get("jump")
            .and_then(|j| j.get("target"))
            .and_then(Value::as_str);
        if let (Some(key), Some(target)) = (key, target) {
            out.push((key, target.to_owned()));
        }
    }
    out
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
    for item in items {
        let in_table = |o: &Value| o.get("table").and_then(Value::as_str) == Some(table);
        if let Some(c) = item.get("chain").filter(|c| in_table(c)) {
            let name = c.get("name").and_then(Value::as_str).unwrap_or_default();
            if name == BASE_CHAIN {
                st.base_ok = c.get("hook").and_then(Value::as_str) == Some(hook);
            } else if name == FALLBACK_CHAIN {
                st.fallback = true;
            } else if name == REPLIES_CHAIN && !layout.ingress() {
                st.replies = true;
            } else if let Some(id) = name.strip_prefix('d').and_then(|s| s.parse::<u64>().ok()) {
                st.chains.entry(id).or_default();
            } else {
                st.stray_chains.push(name.to_owned());
            }
        } else if let Some(m) = item.get("map").filter(|m| in_table(m)) {
            let name = m.get("name").and_then(Value::as_str).unwrap_or_default();
            let elems = Shape::from_map_name(name)
                .map(|shape| elements(&shape, m))
                .unwrap_or_default();
            st.maps.insert(name.to_owned(), elems);
        } else if let Some(l) = item.get("limit").filter(|l| in_table(l)) {
            let name = l.get("name").and_then(Value::as_str).unwrap_or_default();
            st.limits.insert(name.to_owned());
        } else if let Some(r) = item.get("rule").filter(|r| in_table(r)) {
            let chain = r.get("chain").and_then(Value::as_str).unwrap_or_default();
            let comment = r.get("comment").and_then(Value::as_str).unwrap_or_default();
            let (packets, bytes) = counter_of(r);
            if let Some(id) = chain.strip_prefix('d').and_then(|s| s.parse::<u64>().ok()) {
                let c = st.chains.entry(id).or_default();
                if comment == "out" || comment == OUT6_COMMENT {
                    c.out_packets += packets;
                    c.out_bytes += bytes;
                } else if comment == IN6_COMMENT {
                    c.in_packets += packets;
                    c.in_bytes += bytes;
                } else if let Some(meta) = parse_meta_comment(comment) {
                    c.in_packets += packets;
                    c.in_bytes += bytes;
                    c.meta = (meta.id == id).then_some(meta);
                }
            }
        }
    }
    Ok(st)
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
 {"limit": {"family": "inet", "name": "l42", "table": "qosloop_qa", "handle": 3, "rate": 125000, "per": "second", "inv": true, "rate_unit": "bytes", "burst": 15000, "burst_unit": "bytes"}},
 {"map": {"family": "inet", "name": "v4_proto_saddr_daddr_dport", "table": "qosloop_qa", "type": ["inet_proto", "ipv4_addr", "ipv4_addr", "inet_service"], "handle": 4, "map": "verdict", "elem": [[{"concat": ["udp", "10.1.0.1", "10.2.0.2", 5001]}, {"jump": {"target": "d42"}}], [{"concat": ["nope", "10.1.0.1", "10.2.0.2", 5001]}, {"jump": {"target": "d42"}}]]}},
 {"map": {"family": "inet", "name": "v4_daddr", "table": "qosloop_qa", "type": "ipv4_addr", "handle": 5, "map": "verdict", "elem": [["10.9.0.1", {"jump": {"target": "d7"}}]]}},
 {"chain": {"family": "inet", "table": "qosloop_qa", "name": "postrouting", "handle": 1, "type": "filter", "hook": "postrouting", "prio": 0, "policy": "accept"}},
 {"chain": {"family": "inet", "table": "qosloop_qa", "name": "fallback", "handle": 2}},
 {"chain": {"family": "inet", "table": "qosloop_qa", "name": "d42", "handle": 3}},
 {"chain": {"family": "inet", "table": "qosloop_qa", "name": "junk", "handle": 9}},
 {"rule": {"family": "inet", "table": "qosloop_qa", "chain": "d42", "handle": 4, "comment": "out", "expr": [{"limit": "l42"}, {"counter": {"packets": 5, "bytes": 500}}]}},
 {"rule": {"family": "inet", "table": "qosloop_qa", "chain": "d42", "handle": 5, "comment": "in id=42 v=3 slot=0 kind=drop fp=00000000000000ff p=1000 b=15000 f=17,10.1.0.1/32,10.2.0.2/32,-,5001", "expr": [{"counter": {"packets": 7, "bytes": 700}}]}}]}"#;

    #[test]
    fn reads_back_its_table() {
        let layout = |interface: &str| Layout {
            interface: interface.into(),
            direction: qosloop_schema::Direction::Egress,
            qdisc_major: 0xe5,
            capacity: qosloop_schema::Kbps(1000),
        };
        let st = parse_table(LISTING, &layout("qa")).unwrap();
        assert!(st.base_ok && st.fallback);
        assert_eq!(st.stray_chains, vec!["junk".to_owned()]);
        assert!(st.limits.contains("l42"));
        // The element with an unreadable key is skipped.
        let elems = &st.maps["v4_proto_saddr_daddr_dport"];
        assert_eq!(elems.len(), 1);
        assert_eq!(elems[0].1, "d42");
        assert_eq!(elems[0].0[0], KeyPart::Proto(17));
        assert_eq!(elems[0].0[3], KeyPart::Port(5001));
        assert_eq!(st.maps["v4_daddr"][0].1, "d7");
        let c = &st.chains[&42];
        assert_eq!((c.in_packets, c.out_bytes), (7, 500));
        let m = c.meta.as_ref().unwrap();
        assert_eq!(
            (m.version, m.slot, m.fingerprint, m.burst_bytes),
            (3, 0, 0xff, 15_000)
        );
        assert_eq!(
            m.flow.dst_ports,
            Some(qosloop_schema::PortRange::single(5001))
        );
        // Another interface's layout: another table name, nothing of it here.
        assert!(!parse_table(LISTING, &layout("other")).unwrap().base_ok);
        assert!(parse_table("{", &layout("qa")).is_err());
        assert!(parse_table("{}", &layout("qa")).is_err());
    }
}
