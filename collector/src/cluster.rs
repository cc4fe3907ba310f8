//! A collector node of a cluster (`docs/cluster.md`): it keeps its lease
//! (on the database's clock), keeps the epoch in step with the live
//! members, follows the policy the policy server publishes (the subjects
//! of the bandwidth manager, and the classifier the storage writer uses to
//! add each stored record to this node's partial sums), and — for the
//! buckets it owns in the current epoch — combines every node's partial
//! sums of each closed window into the subject's rate and EWMA, written
//! under fencing. With the `stitch` analysis declared it also stitches
//! the flows of its flow-hash buckets (`cluster_stitch.rs`).

use crate::store::TallyCell;
use qosloop_schema::bandwidth::{user_subject, Classifier, SubjectKind};
use qosloop_schema::PolicySet;
use qosloop_store::{
    bucket_of, AnalysisKey, ClusterError, Db, Epoch, OwnerRate, RoutingConfig, Tally,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Windows one owner computes per subject in one step at most (a node
/// catching up after a pause continues at the next step).
const MAX_CATCH_UP: i64 = 600;

/// Partial sums of subjects no owner measures are kept this long.
const PRUNE_HORIZON: Duration = Duration::from_secs(3600);
/// Rows one prune transaction deletes at most, and transactions per run.
const PRUNE_BATCH: i64 = 5000;
const PRUNE_MAX_BATCHES: u32 = 20;

/// What a node is told about its cluster.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    pub cluster: String,
    pub node: String,
    pub advertise: String,
    pub routing: RoutingConfig,
    pub lease: Duration,
}

/// The analyses a node runs and the routing key each declares: the
/// bandwidth manager (here) by rate subject; `stitch` (DiCAP's merge of a
/// flow's records from several capture nodes, and both directions of a
/// flow; `cluster_stitch.rs`) by the direction-free flow hash, its owner
/// being the owner of the flow hash's bucket.
pub fn analyses(names: &[String]) -> Result<Vec<(String, AnalysisKey)>, String> {
    names
        .iter()
        .map(|n| match n.as_str() {
            "bandwidth" => Ok((n.clone(), AnalysisKey::Subject)),
            "stitch" => Ok((n.clone(), AnalysisKey::FlowHash)),
            other => Err(format!(
                "unknown analysis {other:?} (known: bandwidth, stitch)"
            )),
        })
        .collect()
}

/// A running node; [`ClusterNode::leave`] gives its lease up.
#[derive(Debug)]
pub struct ClusterNode {
    db: Db,
    spec: ClusterSpec,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

#[derive(Default)]
struct Shared {
    policy: Option<(i64, Arc<PolicySet>)>,
}

impl ClusterNode {
    /// Joins (refused when the routing configuration differs) and starts
    /// the node's loops; `tally` is the storage writer's cell.
    pub async fn start(
        db: Db,
        spec: ClusterSpec,
        tally: TallyCell,
    ) -> Result<ClusterNode, ClusterError> {
        db.cluster_join(
            &spec.cluster,
            &spec.node,
            &spec.advertise,
            &spec.routing,
            spec.lease,
        )
        .await?;
        let epoch = db
            .cluster_rebalance(&spec.cluster, spec.routing.buckets)
            .await?;
        tracing::info!(cluster = %spec.cluster, node = %spec.node, epoch = epoch.epoch,
            members = ?epoch.members, buckets = epoch.buckets_of(&spec.node).len(), "joined the cluster");
        let (epoch_tx, epoch_rx) = watch::channel(Some(epoch));
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stitch = spec
            .routing
            .analyses
            .iter()
            .any(|(name, _)| name == "stitch");
        let stitch_rx = epoch_rx.clone();
        let mut tasks = vec![
            tokio::spawn(membership(db.clone(), spec.clone(), epoch_tx)),
            tokio::spawn(follow_policy(
                db.clone(),
                spec.clone(),
                tally,
                shared.clone(),
            )),
            tokio::spawn(analyse(db.clone(), spec.clone(), epoch_rx, shared)),
            tokio::spawn(prune(db.clone(), spec.clone())),
        ];
        if stitch {
            tasks.push(tokio::spawn(crate::cluster_stitch::run(
                db.clone(),
                spec.clone(),
                stitch_rx,
            )));
        }
        Ok(ClusterNode { db, spec, tasks })
    }

    /// Stops the loops and gives the lease up, so that the others take the
    /// node's buckets at once.
    pub async fn leave(self) {
        for t in &self.tasks {
            t.abort();
        }
        match self
            .db
            .cluster_leave(&self.spec.cluster, &self.spec.node)
            .await
        {
            Ok(()) => tracing::info!(node = %self.spec.node, "left the cluster"),
            Err(e) => {
                tracing::warn!(error = %e, "leaving the cluster failed; the lease will lapse")
            }
        }
    }
}

/// Renews the lease every quarter lease and brings the epoch in step with
/// the live members (any node may write the next epoch).
async fn membership(db: Db, spec: ClusterSpec, epoch_tx: watch::Sender<Option<Epoch>>) {
    let mut tick = tokio::time::interval(spec.lease / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match db
            .cluster_renew(&spec.cluster, &spec.node, &spec.advertise, spec.lease)
            .await
        {
            Ok(true) => {}
            Ok(false) => tracing::warn!(node = %spec.node, "the lease had lapsed; joined again"),
            Err(e) => {
                tracing::warn!(error = %e, "renewing the lease failed");
                continue;
            }
        }
        match db
            .cluster_rebalance(&spec.cluster, spec.routing.buckets)
            .await
        {
            Ok(e) => {
                let changed = epoch_tx
                    .borrow()
                    .as_ref()
                    .is_none_or(|old| old.epoch != e.epoch);
                if changed {
                    tracing::info!(epoch = e.epoch, members = ?e.members,
                        buckets = e.buckets_of(&spec.node).len(), "new epoch");
                    epoch_tx.send_replace(Some(e));
                }
            }
            Err(e) => tracing::warn!(error = %e, "rebalancing failed"),
        }
    }
}

/// Follows the published policy (checked every 200 ms): the subjects to
/// measure and the writer's classifier.
async fn follow_policy(db: Db, spec: ClusterSpec, tally: TallyCell, shared: Arc<Mutex<Shared>>) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let width_ns = i64::try_from(spec.routing.interval_ms)
        .unwrap_or(1000)
        .saturating_mul(1_000_000);
    loop {
        tick.tick().await;
        let known = lock(&shared).policy.as_ref().map(|(v, _)| *v);
        let version = match db.published_policy_version().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "reading the published policy failed");
                continue;
            }
        };
        if version.is_none() || version == known {
            continue;
        }
        let (version, body) = match db.published_policy().await {
            Ok(Some(p)) => p,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "reading the published policy failed");
                continue;
            }
        };
        let policy: PolicySet = match serde_json::from_str(&body) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(version, error = %e, "the published policy does not parse; keeping the last one");
                lock(&shared).policy = Some((
                    version,
                    lock(&shared)
                        .policy
                        .take()
                        .map_or_else(Default::default, |p| p.1),
                ));
                continue;
            }
        };
        let classifier = Arc::new(Classifier::new(&policy));
        *tally.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(Tally {
            cluster: spec.cluster.clone(),
            node: spec.node.clone(),
            width_ns,
            classifier,
        }));
        tracing::info!(
            version,
            rules = policy.rules.len(),
            links = policy.links.len(),
            "following the published policy"
        );
        lock(&shared).policy = Some((version, Arc::new(policy)));
    }
}

/// Deletes the partial sums the owners consumed, every four windows (at
/// least every second, at most every minute); any node may, one at a time.
async fn prune(db: Db, spec: ClusterSpec) {
    let every = Duration::from_millis(
        spec.routing
            .interval_ms
            .saturating_mul(4)
            .clamp(1000, 60_000),
    );
    let width_ns = i64::try_from(spec.routing.interval_ms)
        .unwrap_or(1000)
        .saturating_mul(1_000_000);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match db
            .prune_rate_partials(
                &spec.cluster,
                width_ns,
                PRUNE_HORIZON,
                PRUNE_BATCH,
                PRUNE_MAX_BATCHES,
            )
            .await
        {
            Ok(p) if p.rows > 0 => tracing::debug!(rows = p.rows, "consumed partial sums pruned"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning the partial sums failed"),
        }
    }
}

fn lock(m: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The owner's loop: every tenth of an interval, the windows closed since
/// the last step of every subject whose bucket the node owns.
async fn analyse(
    db: Db,
    spec: ClusterSpec,
    epoch_rx: watch::Receiver<Option<Epoch>>,
    shared: Arc<Mutex<Shared>>,
) {
    let width = i64::try_from(spec.routing.interval_ms)
        .unwrap_or(1000)
        .max(1)
        .saturating_mul(1_000_000);
    let lag = i64::try_from(spec.routing.lag_ms)
        .unwrap_or(0)
        .saturating_mul(1_000_000);
    let mut tick = tokio::time::interval(Duration::from_nanos((width / 10).max(1_000_000) as u64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(epoch) = epoch_rx.borrow().clone() else {
            continue;
        };
        let Some((_, policy)) = lock(&shared).policy.clone() else {
            continue;
        };
        match step(&db, &spec, &epoch, &policy, width, lag).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(windows = n, epoch = epoch.epoch, "rates written"),
            Err(ClusterError::Fenced(why)) => {
                tracing::info!(%why, epoch = epoch.epoch, "fenced; waiting for the next epoch")
            }
            Err(e) => tracing::warn!(error = %e, "computing rates failed"),
        }
    }
}

/// One step of the owner; returns the windows written.
async fn step(
    db: &Db,
    spec: &ClusterSpec,
    epoch: &Epoch,
    policy: &PolicySet,
    width: i64,
    lag: i64,
) -> Result<usize, ClusterError> {
    let mine = epoch.buckets_of(&spec.node);
    if mine.is_empty() {
        return Ok(0);
    }
    let buckets = spec.routing.buckets;
    // A per-user rule's subjects are its users (key and `rates` name:
    // `user_subject`), the others' the rule itself.
    let user_keys: Vec<String> = policy
        .rules
        .iter()
        .filter(|r| r.per_user)
        .flat_map(|r| r.users.iter().map(|u| user_subject(&r.dn, u)))
        .collect();
    let subjects: Vec<(SubjectKind, &str, &str, u32)> = policy
        .rules
        .iter()
        .filter(|r| !r.per_user)
        .map(|r| (SubjectKind::Flow, r.dn.as_str(), r.name.as_str()))
        .chain(
            user_keys
                .iter()
                .map(|k| (SubjectKind::User, k.as_str(), k.as_str())),
        )
        .chain(
            policy
                .links
                .iter()
                .map(|l| (SubjectKind::Link, l.name.as_str(), l.name.as_str())),
        )
        .map(|(k, key, name)| (k, key, name, bucket_of(k.as_str(), key, buckets)))
        .filter(|s| mine.contains(&s.3))
        .collect();
    if subjects.is_empty() {
        return Ok(0);
    }
    let now = db.server_now_ns().await?;
    // Window s = [s·w, (s+1)·w) is closed once (s+1)·w + lag ≤ now.
    let last_closed = now.saturating_sub(lag).div_euclid(width) - 1;
    let states = db.rate_states(&spec.cluster).await?;
    let weight =
        (f64::from(spec.routing.ewma_weight_permille) / 1000.0).clamp(f64::MIN_POSITIVE, 1.0);
    let mut plan = Vec::new();
    let mut first = i64::MAX;
    for &(kind, key, name, bucket) in &subjects {
        let state = states.get(&(kind, key.to_owned()));
        let from = state.map_or(last_closed, |s| s.window_end_ns.div_euclid(width));
        if from > last_closed {
            continue;
        }
        let to = last_closed.min(from + MAX_CATCH_UP - 1);
        first = first.min(from);
        plan.push((kind, key, name, bucket, state.cloned(), from, to));
    }
    if plan.is_empty() {
        return Ok(0);
    }
    let sums: HashMap<(SubjectKind, String, i64), (f64, i64)> = db
        .combined_partials(&spec.cluster, first, last_closed)
        .await?
        .into_iter()
        .map(|(k, s, slot, b, n)| ((k, s, slot), (b, n)))
        .collect();
    let secs = width as f64 / 1e9;
    let mut rows = Vec::new();
    for (kind, key, name, bucket, state, from, to) in plan {
        let mut prev_end = state.as_ref().map(|s| s.window_end_ns);
        let mut avg = state.as_ref().map(|s| s.avg_rate_kbps);
        for slot in from..=to {
            let (bytes, records) = sums
                .get(&(kind, key.to_owned(), slot))
                .copied()
                .unwrap_or_default();
            let rate = bytes * 8.0 / 1000.0 / secs;
            let a = match avg {
                Some(p) => weight * rate + (1.0 - weight) * p,
                None => rate,
            };
            let end = (slot + 1) * width;
            rows.push(OwnerRate {
                kind,
                subject: key.to_owned(),
                name: name.to_owned(),
                bucket,
                previous_end_ns: prev_end,
                window_end_ns: end,
                interval_ns: width,
                rate_kbps: rate,
                avg_rate_kbps: a,
                records,
            });
            prev_end = Some(end);
            avg = Some(a);
        }
    }
    db.write_owner_rates(&spec.cluster, &spec.node, epoch.epoch, &rows)
        .await
}
