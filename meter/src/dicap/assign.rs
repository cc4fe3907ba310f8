//! Which node owns which bucket: a pure function from the current owners
//! and the nodes able to capture to the new owners, moving as few buckets
//! as it can (a surviving node keeps its buckets when another leaves; a
//! joining node takes buckets from the most loaded).

use super::share::BUCKETS;
use std::collections::BTreeMap;

/// Owner of each bucket (`None`: nobody captures it).
pub type Owners = Vec<Option<String>>;

/// No owners yet.
pub fn unowned() -> Owners {
    vec![None; BUCKETS as usize]
}

/// The owners after rebalancing over `nodes` (names; order irrelevant).
/// Every bucket gets exactly one owner when `nodes` is not empty, and the
/// shares differ by at most one bucket.
pub fn rebalance(current: &Owners, nodes: &[String]) -> Owners {
    if nodes.is_empty() {
        return unowned();
    }
    let mut names: Vec<&String> = nodes.iter().collect();
    names.sort();
    names.dedup();
    let n = names.len();
    let base = BUCKETS as usize / n;
    let extra = BUCKETS as usize % n;
    // Nodes holding more buckets now get the extra ones, so fewer move.
    let held = |name: &String| current.iter().filter(|o| o.as_ref() == Some(name)).count();
    let mut by_load = names.clone();
    by_load.sort_by_key(|name| std::cmp::Reverse(held(name)));
    let target: BTreeMap<&String, usize> = by_load
        .iter()
        .enumerate()
        .map(|(i, name)| (*name, base + usize::from(i < extra)))
        .collect();
    let mut count: BTreeMap<&String, usize> = BTreeMap::new();
    let mut next: Owners = unowned();
    let mut free = Vec::new();
    for (b, owner) in current.iter().enumerate() {
        match owner.as_ref().and_then(|o| target.get_key_value(o)) {
            Some((name, &t)) if count.get(name).copied().unwrap_or(0) < t => {
                *count.entry(name).or_default() += 1;
                next[b] = Some((*name).clone());
            }
            _ => free.push(b),
        }
    }
    let mut free = free.into_iter();
    for name in &names {
        let have = count.get(name).copied().unwrap_or(0);
        for _ in have..target[name] {
            if let Some(b) = free.next() {
                next[b] = Some((*name).clone());
            }
        }
    }
    next
}

/// The 64-bit bucket mask of `node`.
pub fn mask_of(owners: &Owners, node: &str) -> u64 {
    owners
        .iter()
        .enumerate()
        .filter(|(_, o)| o.as_deref() == Some(node))
        .fold(0, |m, (b, _)| m | 1 << b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    fn check_partition(o: &Owners, nodes: &[String]) {
        let masks: Vec<u64> = nodes.iter().map(|n| mask_of(o, n)).collect();
        assert_eq!(masks.iter().fold(0, |a, m| a | m), u64::MAX);
        assert_eq!(masks.iter().map(|m| m.count_ones()).sum::<u32>(), BUCKETS);
        let (lo, hi) = (
            masks.iter().map(|m| m.count_ones()).min().unwrap(),
            masks.iter().map(|m| m.count_ones()).max().unwrap(),
        );
        assert!(hi - lo <= 1, "{masks:x?}");
    }

    #[test]
    fn loss_moves_only_the_lost_nodes_buckets() {
        let four = names(&["a", "b", "c", "d"]);
        let o4 = rebalance(&unowned(), &four);
        check_partition(&o4, &four);
        let three = names(&["a", "b", "d"]);
        let o3 = rebalance(&o4, &three);
        check_partition(&o3, &three);
        for n in &three {
            // Survivors keep every bucket they had.
            assert_eq!(mask_of(&o4, n) & !mask_of(&o3, n), 0, "{n}");
        }
        assert_eq!(mask_of(&o3, "c"), 0);
    }

    #[test]
    fn join_takes_from_others_and_nobody_loses_all() {
        let two = names(&["a", "b"]);
        let o2 = rebalance(&unowned(), &two);
        let three = names(&["a", "b", "c"]);
        let o3 = rebalance(&o2, &three);
        check_partition(&o3, &three);
        let moved = (0..64).filter(|&b| o2[b] != o3[b]).count();
        assert_eq!(moved, mask_of(&o3, "c").count_ones() as usize);
        assert_eq!(rebalance(&o3, &[]), unowned());
        // Five nodes: 64 = 13+13+13+13+12.
        let five = names(&["a", "b", "c", "d", "e"]);
        check_partition(&rebalance(&o3, &five), &five);
    }
}
