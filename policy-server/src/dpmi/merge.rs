//! Merging the active requests of one measurement point into the ordered
//! filter list it runs (`seeds/003` §3), as a pure function.
//!
//! A frame goes through the first filter it matches and is sent once to
//! each consumer of that filter. Filter `G_j` is given to every request
//! `R` whose frames can reach it first: `R ∩ G_j` is not empty and no
//! earlier filter holds all of `R ∩ G_j`. So each consumer gets every
//! frame its requests cover (the first filter a covered frame matches
//! lists it) and none twice (a frame goes through one filter).
//!
//! Within capacity the filters are the distinct request filters, the
//! narrowest first. Over capacity the two filters whose cover is narrowest
//! are replaced by it, until the list fits: `tcp host A.a` + `net A`
//! becomes `net A`. A consumer that receives a filter wider than each of
//! its requests must re-filter (`refilter`).
//!
//! An IPv4 and an IPv6 filter are never replaced by their cover: when only
//! such pairs are left the list stays over capacity (at most one filter
//! per family, so a capacity of 1 holds two when both families are asked).

use qosloop_schema::dpmi::Filter;
use std::collections::{BTreeMap, BTreeSet};

/// An active request as the merge sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Active {
    pub id: i64,
    pub filter: Filter,
    pub consumer: String,
}

/// One filter of the merged list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Merged {
    pub filter: Filter,
    /// The requests whose frames can reach this filter first.
    pub requests: Vec<i64>,
    /// Their consumers, each once.
    pub consumers: Vec<String>,
    /// Wider than some request it serves.
    pub widened: bool,
}

/// The merged list of one point.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub filters: Vec<Merged>,
    /// Consumers that receive frames outside their requests.
    pub refilter: BTreeSet<String>,
}

/// Merges `requests` into at most `capacity` filters (at least one).
pub fn merge(requests: &[Active], capacity: usize) -> Plan {
    let capacity = capacity.max(1);
    let mut set: BTreeSet<Filter> = requests.iter().map(|r| r.filter.clone()).collect();
    while set.len() > capacity {
        let list: Vec<&Filter> = set.iter().collect();
        let mut best: Option<(u32, usize, usize)> = None;
        for i in 0..list.len() {
            for j in i + 1..list.len() {
                // IPv4 and IPv6 filters are never merged into one.
                if let (Some(a), Some(b)) = (list[i].family(), list[j].family()) {
                    if a != b {
                        continue;
                    }
                }
                let bits = list[i].cover(list[j]).mask_bits();
                if best.is_none_or(|(b, _, _)| bits > b) {
                    best = Some((bits, i, j));
                }
            }
        }
        let Some((_, i, j)) = best else { break };
        let (a, b) = (list[i].clone(), list[j].clone());
        set.remove(&a);
        set.remove(&b);
        set.insert(a.cover(&b));
    }
    let mut order: Vec<Filter> = set.into_iter().collect();
    // Narrowest first; ties in the set's (deterministic) order.
    order.sort_by_key(|f| std::cmp::Reverse(f.mask_bits()));
    let mut plan = Plan::default();
    let mut by_consumer: BTreeMap<&str, Vec<&Filter>> = BTreeMap::new();
    for r in requests {
        by_consumer.entry(&r.consumer).or_default().push(&r.filter);
    }
    for (j, g) in order.iter().enumerate() {
        let mut ids = Vec::new();
        let mut consumers = BTreeSet::new();
        for r in requests {
            let Some(i) = r.filter.intersect(g) else {
                continue;
            };
            if order[..j].iter().any(|earlier| earlier.contains(&i)) {
                continue;
            }
            ids.push(r.id);
            consumers.insert(r.consumer.clone());
        }
        if ids.is_empty() {
            continue;
        }
        let mut widened = false;
        for c in &consumers {
            let own = by_consumer
                .get(c.as_str())
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            if !own.iter().any(|f| f.contains(g)) {
                widened = true;
                plan.refilter.insert(c.clone());
            }
        }
        plan.filters.push(Merged {
            filter: g.clone(),
            requests: ids,
            consumers: consumers.into_iter().collect(),
            widened,
        });
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use qosloop_schema::dpmi::FrameFields;
    use serde_json::json;

    fn f(v: serde_json::Value) -> Filter {
        Filter::from_json(&v).unwrap()
    }

    fn seed_example() -> Vec<Active> {
        vec![
            Active {
                id: 1,
                filter: f(json!({"ip_proto": "6", "ip_src": "10.1.0.5"})),
                consumer: "c1:1".into(),
            },
            Active {
                id: 2,
                filter: f(json!({"ip_src": "10.1.0.0/24"})),
                consumer: "c2:1".into(),
            },
        ]
    }

    #[test]
    fn low_load_keeps_both_filters_the_narrow_one_to_both() {
        let plan = merge(&seed_example(), 2);
        assert_eq!(plan.filters.len(), 2);
        assert_eq!(plan.filters[0].filter, seed_example()[0].filter);
        assert_eq!(plan.filters[0].consumers, vec!["c1:1", "c2:1"]);
        assert_eq!(plan.filters[1].consumers, vec!["c2:1"]);
        assert!(plan.refilter.is_empty());
    }

    #[test]
    fn over_capacity_widens_to_the_network() {
        let plan = merge(&seed_example(), 1);
        assert_eq!(plan.filters.len(), 1);
        assert_eq!(plan.filters[0].filter, seed_example()[1].filter);
        assert_eq!(plan.filters[0].consumers, vec!["c1:1", "c2:1"]);
        assert!(plan.filters[0].widened);
        assert_eq!(plan.refilter.iter().collect::<Vec<_>>(), vec!["c1:1"]);
    }

    #[test]
    fn identical_requests_share_one_filter() {
        let mut r = seed_example();
        r[1].filter = r[0].filter.clone();
        let plan = merge(&r, 4);
        assert_eq!(plan.filters.len(), 1);
        assert_eq!(plan.filters[0].requests, vec![1, 2]);
    }

    #[test]
    fn ipv6_prefixes_widen_to_their_common_prefix_never_with_ipv4() {
        let r = |id, v, c: &str| Active {
            id,
            filter: f(v),
            consumer: c.into(),
        };
        let reqs = vec![
            r(1, json!({"ip_src": "2001:db8:1::/48"}), "c1:1"),
            r(
                2,
                json!({"ip_src": "2001:db8:2::/48", "ip_proto": "17"}),
                "c2:1",
            ),
            r(3, json!({"ip_src": "10.1.0.0/16"}), "c3:1"),
        ];
        let plan = merge(&reqs, 2);
        let got: Vec<_> = plan.filters.iter().map(|m| m.filter.clone()).collect();
        assert_eq!(
            got,
            vec![
                f(json!({"ip_src": "2001:db8::/46"})),
                f(json!({"ip_src": "10.1.0.0/16"}))
            ]
        );
        assert_eq!(plan.filters[0].consumers, vec!["c1:1", "c2:1"]);
        assert_eq!(plan.filters[1].consumers, vec!["c3:1"]);
        // Capacity 1 cannot hold both families in one filter: two stay.
        let plan = merge(&reqs, 1);
        assert_eq!(plan.filters.len(), 2);
        assert!(plan.filters.iter().all(|m| m.filter.family().is_some()));
    }

    fn frame6(proto: u8, b3: u8, b4: u8, sport: u16, dport: u16) -> FrameFields {
        FrameFields {
            ether_type: 0x86dd,
            ip6: Some((
                0x2001_0db8_0001_0000_0000_0000_0000_0000 | u128::from(b3) << 8 | u128::from(b4),
                1,
            )),
            ip6_proto: Some(proto),
            ports: Some((sport, dport)),
            ..FrameFields::default()
        }
    }

    fn frame(proto: u8, src: [u8; 4], sport: u16, dport: u16) -> FrameFields {
        FrameFields {
            ether_type: 0x0800,
            ip: Some((proto, u32::from_be_bytes(src), 0x0a02_0001)),
            ports: Some((sport, dport)),
            ..FrameFields::default()
        }
    }

    fn field(choice: u8, v: u8) -> serde_json::Value {
        match choice % 6 {
            0 => json!({"ip_proto": if v % 2 == 0 { "6" } else { "17" }}),
            1 => json!({"ip_src": format!("10.1.{}.0/{}", v % 4, 16 + (v % 3) * 4)}),
            2 => json!({"dst_port": format!("{}/0xfff0", u16::from(v % 3) * 16)}),
            3 => json!({"ip_src": format!("10.1.0.{}", v % 8), "ip_proto": "6"}),
            4 => json!({"ip_src": format!("2001:db8:1::{:x}00/{}", v % 4, 118 + (v % 3) * 4)}),
            _ => json!({"ip_src": format!("2001:db8:1::{}", v % 8), "ip_proto": "6"}),
        }
    }

    fn clean(v: serde_json::Value) -> Filter {
        // Values that do not fit their mask are widened to fit (generator).
        Filter::from_json(&v).unwrap_or_default()
    }

    proptest! {
        /// Every consumer gets exactly the frames its requests cover
        /// after re-filtering, none twice, for any capacity.
        #[test]
        fn each_consumer_gets_its_frames_once(
            reqs in proptest::collection::vec((0u8..6, 0u8..255, 0u8..3), 1..6),
            capacity in 1usize..5,
            frames in proptest::collection::vec((0u8..2, 0u8..4, 0u8..8, 0u16..48, proptest::bool::ANY), 1..40),
        ) {
            let active: Vec<Active> = reqs.iter().enumerate().map(|(i, (c, v, consumer))| Active {
                id: i as i64,
                filter: clean(field(*c, *v)),
                consumer: format!("c{consumer}"),
            }).collect();
            let plan = merge(&active, capacity);
            // One filter per family at least when both are asked.
            let families: BTreeSet<_> = active.iter().filter_map(|r| r.filter.family()).map(|f| f == qosloop_schema::dpmi::Family::V6).collect();
            prop_assert!(plan.filters.len() <= capacity.max(families.len()));
            for (p, b3, b4, port, six) in frames {
                let proto = if p == 0 { 6 } else { 17 };
                let fr = if six { frame6(proto, b3, b4, 1000, port) } else { frame(proto, [10, 1, b3, b4], 1000, port) };
                let first = plan.filters.iter().find(|m| m.filter.matches("x", &fr));
                for c in ["c0", "c1", "c2"] {
                    let wants = active.iter().any(|r| r.consumer == c && r.filter.matches("x", &fr));
                    let gets = first.is_some_and(|m| m.consumers.iter().any(|x| x == c));
                    if wants { prop_assert!(gets, "{c} misses a frame"); }
                    if gets && !wants { prop_assert!(plan.refilter.contains(c)); }
                }
            }
        }
    }
}
