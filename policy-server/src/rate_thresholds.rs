//! Rate thresholds of the knowledge base: a `threshold` event (docs/kb.md)
//! when a user's average rate crosses a configured threshold, once per
//! crossing.
//!
//! The rates are the per-user subjects' (`Rates::users`: the users of
//! per-user rules, from records or from the cluster's owners), taken as the
//! highest average among the rules naming the user. A user whose average
//! reaches its threshold (`USER=KBPS`, `*=KBPS` for every user without one
//! of its own) gets one event; it is armed again only once its average has
//! fallen below the threshold less the hysteresis ([`HYSTERESIS`], 10 %),
//! so a rate hovering at the threshold gives one event, not one per
//! interval. A user that leaves the rates (no rule names it, or its
//! average decayed away) counts as 0.

use crate::bandwidth::Rates;
use qosloop_store::Db;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tokio::sync::watch;

/// Fraction below the threshold the average must fall to re-arm.
pub const HYSTERESIS: f64 = 0.10;

/// One crossing: `user`'s average reached `threshold_kbps`.
#[derive(Clone, Debug, PartialEq)]
pub struct Crossing {
    pub user: String,
    pub threshold_kbps: f64,
    pub avg_kbps: f64,
}

/// The configured thresholds and which users are above theirs.
#[derive(Clone, Debug, Default)]
pub struct RateThresholds {
    by_user: BTreeMap<String, f64>,
    default: Option<f64>,
    above: BTreeSet<String>,
}

impl RateThresholds {
    /// From `USER=KBPS` items (`*` for every user); a threshold is a
    /// positive number of kbit/s. The error names the item.
    pub fn parse(items: &[String]) -> Result<RateThresholds, String> {
        let mut t = RateThresholds::default();
        for item in items {
            let (user, kbps) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?} is not USER=KBPS"))?;
            let user = user.trim();
            let kbps: f64 = kbps
                .trim()
                .parse()
                .ok()
                .filter(|k: &f64| k.is_finite() && *k > 0.0)
                .ok_or_else(|| {
                    format!("{item:?}: the threshold must be a positive number of kbit/s")
                })?;
            if user.is_empty() {
                return Err(format!("{item:?}: no user (use * for every user)"));
            }
            if user == "*" {
                t.default = Some(kbps);
            } else {
                t.by_user.insert(user.to_owned(), kbps);
            }
        }
        Ok(t)
    }

    pub fn is_empty(&self) -> bool {
        self.by_user.is_empty() && self.default.is_none()
    }

    fn threshold(&self, user: &str) -> Option<f64> {
        self.by_user.get(user).copied().or(self.default)
    }

    /// The crossings of one round of rates (users in name order).
    pub fn check(&mut self, rates: &Rates) -> Vec<Crossing> {
        let mut avg: BTreeMap<&str, f64> = BTreeMap::new();
        for u in &rates.users {
            let a = avg.entry(u.name.as_str()).or_insert(0.0);
            *a = a.max(u.avg_rate_kbps);
        }
        // Re-arm users who fell below (or left the rates).
        self.above.retain(|user| {
            let now = avg.get(user.as_str()).copied().unwrap_or(0.0);
            match self.by_user.get(user).copied().or(self.default) {
                Some(t) => now >= t * (1.0 - HYSTERESIS),
                None => false,
            }
        });
        let mut out = Vec::new();
        for (user, a) in avg {
            let Some(t) = self.threshold(user) else {
                continue;
            };
            if a >= t && !self.above.contains(user) {
                self.above.insert(user.to_owned());
                out.push(Crossing {
                    user: user.to_owned(),
                    threshold_kbps: t,
                    avg_kbps: a,
                });
            }
        }
        out
    }
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Follows the server's rates (`ServerHandle::rates`) until the server
/// stops, publishing a `threshold` event per crossing: user, value = the
/// threshold in kbit/s, detail `rate A kbit/s >= T kbit/s`. A failed write
/// is logged and the crossing not retried (the next crossing is).
pub async fn follow(
    db: Db,
    mut rates: watch::Receiver<Arc<Rates>>,
    mut thresholds: RateThresholds,
) {
    if thresholds.is_empty() {
        return;
    }
    while rates.changed().await.is_ok() {
        let r = rates.borrow_and_update().clone();
        for c in thresholds.check(&r) {
            let detail = format!(
                "rate {:.0} kbit/s >= {:.0} kbit/s",
                c.avg_kbps, c.threshold_kbps
            );
            tracing::info!(user = %c.user, %detail, "rate threshold crossed");
            let value = c.threshold_kbps.round() as i64;
            if let Err(e) = db
                .kb_publish_value(
                    "threshold",
                    Some(&c.user),
                    Some(value),
                    Some(&detail),
                    now_ns(),
                )
                .await
            {
                tracing::warn!(error = %e, user = %c.user, "publishing a rate threshold event failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bandwidth::SubjectRate;

    fn at(users: &[(&str, &str, f64)]) -> Rates {
        Rates {
            users: users
                .iter()
                .map(|(rule, name, avg)| SubjectRate {
                    key: rule.to_string(),
                    name: name.to_string(),
                    rate_kbps: *avg,
                    avg_rate_kbps: *avg,
                    records: 1,
                })
                .collect(),
            ..Rates::default()
        }
    }

    fn users(c: &[Crossing]) -> Vec<&str> {
        c.iter().map(|c| c.user.as_str()).collect()
    }

    #[test]
    fn one_event_per_crossing_with_hysteresis() {
        let mut t = RateThresholds::parse(&["alice=1000".into(), "*=5000".into()]).unwrap();
        assert!(t.check(&at(&[("r", "alice", 900.0)])).is_empty());
        let c = t.check(&at(&[("r", "alice", 1200.0), ("r", "bob", 4000.0)]));
        assert_eq!(users(&c), ["alice"]);
        assert_eq!(c[0].threshold_kbps, 1000.0);
        // Still above, then hovering inside the hysteresis: nothing.
        assert!(t.check(&at(&[("r", "alice", 1500.0)])).is_empty());
        assert!(t.check(&at(&[("r", "alice", 950.0)])).is_empty());
        assert!(t.check(&at(&[("r", "alice", 1010.0)])).is_empty());
        // Below 900: armed again; the next crossing is an event.
        assert!(t.check(&at(&[("r", "alice", 899.0)])).is_empty());
        assert_eq!(users(&t.check(&at(&[("r", "alice", 1000.0)]))), ["alice"]);
        // Leaving the rates re-arms too; bob's default threshold; the
        // highest of a user's rules counts.
        assert!(t.check(&at(&[])).is_empty());
        let c = t.check(&at(&[
            ("r1", "alice", 100.0),
            ("r2", "alice", 2000.0),
            ("r1", "bob", 6000.0),
        ]));
        assert_eq!(users(&c), ["alice", "bob"]);
        assert_eq!(c[1].threshold_kbps, 5000.0);
    }

    #[test]
    fn bad_items_are_named() {
        for bad in [
            "alice",
            "alice=0",
            "alice=-3",
            "=5",
            "alice=fast",
            "alice=inf",
        ] {
            let e = RateThresholds::parse(&[bad.to_string()]).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        assert!(RateThresholds::parse(&[]).unwrap().is_empty());
    }
}
