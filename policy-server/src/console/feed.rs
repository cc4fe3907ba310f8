//! What the server itself publishes on the event bus: a `rates` event per
//! closed interval (every policed subject's and link's rate and avgRate)
//! and a `decisions` event per published change of the decision table (the
//! decisions installed, updated and removed, each whole).

use super::events::EventBus;
use crate::bandwidth::Rates;
use crate::engine::DecisionTable;
use qosloop_schema::Decision;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;

/// The changes from `old` to `new`, keyed by (role, id).
pub fn decision_changes(
    old: &BTreeMap<(String, u64), Arc<Decision>>,
    new: &BTreeMap<(String, u64), Arc<Decision>>,
) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for (k, d) in new {
        match old.get(k) {
            None => out.push(json!({ "change": "install", "decision": &**d })),
            Some(o) if o.version != d.version || **o != **d => {
                out.push(json!({ "change": "update", "decision": &**d }))
            }
            Some(_) => {}
        }
    }
    for (k, d) in old {
        if !new.contains_key(k) {
            out.push(json!({ "change": "remove", "decision": &**d }));
        }
    }
    out
}

fn by_key(t: &DecisionTable) -> BTreeMap<(String, u64), Arc<Decision>> {
    t.all()
        .map(|d| ((d.role.clone(), d.id), d.clone()))
        .collect()
}

/// Publishes rates and decision changes until `stop` turns true or the
/// server's channels close; then closes the bus, which ends every client's
/// stream.
pub async fn feed(
    bus: EventBus,
    mut rates: watch::Receiver<Arc<Rates>>,
    mut decisions: watch::Receiver<Arc<DecisionTable>>,
    mut stop: watch::Receiver<bool>,
) {
    publish_until_stopped(&bus, &mut rates, &mut decisions, &mut stop).await;
    bus.close();
}

async fn publish_until_stopped(
    bus: &EventBus,
    rates: &mut watch::Receiver<Arc<Rates>>,
    decisions: &mut watch::Receiver<Arc<DecisionTable>>,
    stop: &mut watch::Receiver<bool>,
) {
    let mut last = by_key(&decisions.borrow_and_update());
    rates.borrow_and_update();
    loop {
        tokio::select! {
            r = rates.changed() => {
                if r.is_err() { return }
                let r = rates.borrow_and_update().clone();
                bus.publish("rates", &json!(&*r));
            }
            r = decisions.changed() => {
                if r.is_err() { return }
                let t = decisions.borrow_and_update().clone();
                let now = by_key(&t);
                let changes = decision_changes(&last, &now);
                if !changes.is_empty() {
                    bus.publish("decisions", &json!({ "epoch": t.epoch, "changes": changes }));
                }
                last = now;
            }
            r = stop.changed() => {
                if r.is_err() || *stop.borrow() { return }
            }
        }
    }
}
