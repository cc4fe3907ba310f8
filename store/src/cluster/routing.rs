//! The cluster's routing configuration and its hashing: which bucket a key
//! falls in, which live node owns a bucket (rendezvous hashing).

use std::collections::BTreeMap;

/// The routing key an analysis declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnalysisKey {
    /// The bandwidth manager's rate subject: the policed flow (business
    /// rule) and the links a record counts for.
    Subject,
    /// The direction-free flow hash (`qosloop_schema::flow_hash`): flow
    /// stitching, DiCAP's merge of one flow's records from several nodes.
    FlowHash,
}

impl AnalysisKey {
    fn as_str(self) -> &'static str {
        match self {
            AnalysisKey::Subject => "subject",
            AnalysisKey::FlowHash => "flow_hash",
        }
    }
}

/// Everything the nodes of one cluster must agree on: a node started with
/// another configuration is refused, naming the difference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingConfig {
    /// Buckets of the key space (fixed for the cluster's life).
    pub buckets: u32,
    /// Width of the rate windows (and of the partial sums' slots).
    pub interval_ms: u64,
    /// A window is closed `lag_ms` after its end.
    pub lag_ms: u64,
    /// EWMA weight of the newest window, in thousandths (500: 0.5).
    pub ewma_weight_permille: u32,
    /// The analyses and the routing key each declares, by name.
    pub analyses: Vec<(String, AnalysisKey)>,
}

impl Default for RoutingConfig {
    fn default() -> RoutingConfig {
        RoutingConfig {
            buckets: 64,
            interval_ms: 1000,
            lag_ms: 1200,
            ewma_weight_permille: 500,
            analyses: vec![("bandwidth".into(), AnalysisKey::Subject)],
        }
    }
}

impl RoutingConfig {
    /// The canonical text stored in `cluster_config.routing`.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "buckets={};interval_ms={};lag_ms={};ewma_weight_permille={}",
            self.buckets, self.interval_ms, self.lag_ms, self.ewma_weight_permille
        );
        let mut analyses = self.analyses.clone();
        analyses.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, key) in analyses {
            s.push_str(&format!(";analysis.{name}={}", key.as_str()));
        }
        s
    }

    /// Each setting where `stored` (the cluster's text) differs from this
    /// configuration, as `name: cluster X, this node Y`.
    pub fn differences(&self, stored: &str) -> Vec<String> {
        let parse = |t: &str| -> BTreeMap<String, String> {
            t.split(';')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        };
        let (theirs, mine) = (parse(stored), parse(&self.to_text()));
        let mut keys: Vec<&String> = theirs.keys().chain(mine.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter(|k| theirs.get(*k) != mine.get(*k))
            .map(|k| {
                let show = |v: Option<&String>| v.map_or("(none)".to_owned(), |v| v.clone());
                format!(
                    "{k}: cluster {}, this node {}",
                    show(theirs.get(k)),
                    show(mine.get(k))
                )
            })
            .collect()
    }
}

/// 64-bit FNV-1a, then a finaliser (splitmix64) so that nearby inputs
/// spread over every bit.
fn hash64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The bucket of an analysis key (a subject's `kind` and key, or a flow
/// hash's bytes) among `buckets`.
pub fn bucket_of(kind: &str, key: &str, buckets: u32) -> u32 {
    (hash64(&[kind.as_bytes(), key.as_bytes()]) % u64::from(buckets.max(1))) as u32
}

/// The bucket of a record's direction-free flow hash (the `flow_hash`
/// column, `qosloop_schema::flow_hash`) among `buckets`: the routing key of
/// the `stitch` analysis, written by the receiving node as `flows.bucket`.
/// Both directions of a flow fall in the same bucket.
pub fn flow_bucket(flow_hash: i64, buckets: u32) -> u32 {
    (hash64(&[b"flow_hash", &flow_hash.to_le_bytes()]) % u64::from(buckets.max(1))) as u32
}

/// The owner of `bucket` among `nodes` by rendezvous (highest random
/// weight) hashing: when a node joins or leaves, only the buckets it gains
/// or had move.
pub fn rendezvous_owner(nodes: &[String], bucket: u32) -> Option<&str> {
    nodes
        .iter()
        .max_by_key(|n| (hash64(&[n.as_bytes(), &bucket.to_le_bytes()]), n.as_str()))
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_different_configuration_names_each_difference() {
        let a = RoutingConfig::default();
        assert!(a.differences(&a.to_text()).is_empty());
        let mut b = a.clone();
        b.buckets = 32;
        b.analyses.push(("stitch".into(), AnalysisKey::FlowHash));
        let d = b.differences(&a.to_text());
        assert_eq!(
            d,
            [
                "analysis.stitch: cluster (none), this node flow_hash",
                "buckets: cluster 64, this node 32"
            ]
        );
    }

    #[test]
    fn rendezvous_moves_only_the_buckets_of_the_node_that_changed() {
        let three: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let four: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let mut moved = 0;
        let mut per_node = std::collections::HashMap::new();
        for b in 0..1024 {
            let before = rendezvous_owner(&three, b).unwrap();
            let after = rendezvous_owner(&four, b).unwrap();
            if before != after {
                assert_eq!(after, "d", "bucket {b} moved between old nodes");
                moved += 1;
            }
            *per_node.entry(before).or_insert(0) += 1;
        }
        // About a quarter moves to the new node; each old node had about a third.
        assert!((180..340).contains(&moved), "{moved}");
        for (n, c) in per_node {
            assert!((250..440).contains(&c), "{n}: {c}");
        }
        assert_eq!(rendezvous_owner(&[], 1), None);
        assert!(bucket_of("flow", "cn=x", 64) < 64);
    }
}
