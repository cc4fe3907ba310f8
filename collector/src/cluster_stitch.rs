//! A cluster node's `stitch` analysis (`docs/cluster.md`): for every
//! flow-hash bucket it owns in the current epoch, it reads the bucket's
//! new records from SQL by `(bucket, id)` after the bucket's persisted
//! cursor (up to the id horizon below which every record is final), merges
//! DiCAP's per-packet parts and stitches both directions of each flow
//! (`qosloop_store::stitch`), and writes the rows with the cursor in one
//! transaction fenced by the epoch. A bucket that moves is resumed by its
//! new owner from the persisted cursor.

use crate::cluster::ClusterSpec;
use qosloop_store::{ClusterError, Db, Epoch, Fence, Horizon};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::watch;

/// Records one step of one bucket reads at most (the rest at the next).
const STEP_LIMIT: i64 = 20_000;

/// How often the owner steps.
const TICK: Duration = Duration::from_millis(100);

/// Runs the owner's stitching until aborted.
pub(crate) async fn run(db: Db, spec: ClusterSpec, epoch_rx: watch::Receiver<Option<Epoch>>) {
    let width = i64::try_from(spec.routing.interval_ms)
        .unwrap_or(1000)
        .max(1)
        .saturating_mul(1_000_000);
    // Backends this role cannot see: the horizon falls back to the lag.
    let fallback = Duration::from_millis(spec.routing.lag_ms);
    let mut horizon = Horizon::default();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Per bucket, the horizon its last step reached in this epoch: a bucket
    // is read again only when the horizon moved or a step was cut short.
    let mut done: HashMap<u32, i64> = HashMap::new();
    let mut done_epoch = 0;
    loop {
        tick.tick().await;
        let Some(epoch) = epoch_rx.borrow().clone() else {
            continue;
        };
        if epoch.epoch != done_epoch {
            done.clear();
            done_epoch = epoch.epoch;
        }
        let mine = epoch.buckets_of(&spec.node);
        if mine.is_empty() {
            continue;
        }
        let h = match horizon.advance(&db, fallback).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "reading the flow id horizon failed");
                continue;
            }
        };
        let fence = Fence {
            cluster: spec.cluster.clone(),
            node: spec.node.clone(),
            epoch: epoch.epoch,
        };
        for b in mine {
            if done.get(&b) == Some(&h) {
                continue;
            }
            if epoch_rx
                .borrow()
                .as_ref()
                .is_some_and(|e| e.epoch != epoch.epoch)
            {
                break;
            }
            match db
                .stitch_step(Some(&fence), b, h, width, spec.routing.buckets, STEP_LIMIT)
                .await
            {
                Ok(s) => {
                    if s.bad > 0 {
                        tracing::warn!(
                            bucket = b,
                            rows = s.bad,
                            "flow rows that are not records skipped by stitch"
                        );
                    }
                    if s.after_id >= h {
                        done.insert(b, h);
                    }
                    if s.records > 0 {
                        tracing::debug!(
                            bucket = b,
                            records = s.records,
                            rows = s.rows,
                            after_id = s.after_id,
                            "stitched"
                        );
                    }
                }
                Err(ClusterError::Fenced(why)) => {
                    tracing::info!(%why, epoch = epoch.epoch, "stitch fenced; waiting for the next epoch");
                    break;
                }
                Err(e) => tracing::warn!(error = %e, bucket = b, "stitching failed"),
            }
        }
    }
}
