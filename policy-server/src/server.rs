//! The running server: the bandwidth-manager/decision loop, the PDP and
//! the writer of what the PDP hears, over one database.
//!
//! Each tick (every `interval`): read the new records → close the interval
//! (rates, EWMA) → evaluate → publish the changed decision table to the
//! PDP (which pushes DECs at once) → store decisions and rates. Storing
//! comes after publishing so that SQL writes do not delay the push. A new
//! policy from the repository is evaluated at once with the last rates.

use crate::bandwidth::{BandwidthManager, Rates};
use crate::cluster_rates::ClusterRates;
use crate::config::Config;
use crate::engine::{DecisionTable, Engine};
use crate::pdp::{Pdp, PdpCounters, PdpEvent, PdpStats};
use crate::store::{FlowCursor, Store};
use qosloop_schema::guard::ConnLimiter;
use qosloop_schema::PolicySet;
use qosloop_store::{now_ns, Db};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// What stops the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Db(#[from] qosloop_store::DbError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("cannot listen for enforcers on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The loop's tunables (a subset of [`Config`]).
#[derive(Clone, Debug)]
pub struct LoopConfig {
    pub interval: Duration,
    pub ewma_weight: f64,
    pub hysteresis: f64,
    /// Minimum hold between a decision's load-driven action change and a
    /// change back (`engine`'s module doc; zero: off).
    pub min_hold: Duration,
    /// How long the load must ask for a band change before it is taken
    /// (`engine`'s module doc; zero: at once).
    pub confirm: Duration,
    /// How long a link's windows without any record are taken as no
    /// measurement (`engine`'s module doc; zero: as a load of zero).
    pub gap_hold: Duration,
    /// See `bandwidth`'s module doc.
    pub rate_lag: Duration,
    pub gap_timeout: Duration,
    pub rates_from: RatesFrom,
}

/// Where the decision loop gets its rates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RatesFrom {
    /// The paper's way: the bandwidth manager reads every new flow record
    /// from SQL and computes the rates itself.
    #[default]
    Records,
    /// A collector cluster computes them (`docs/cluster.md`): the server
    /// publishes its policy in SQL for the owners and reads their `rates`.
    Cluster,
}

impl From<&Config> for LoopConfig {
    fn from(c: &Config) -> Self {
        LoopConfig {
            interval: c.interval,
            ewma_weight: c.ewma_weight,
            hysteresis: c.hysteresis,
            min_hold: c.min_hold,
            confirm: c.confirm,
            gap_hold: c.gap_hold,
            rate_lag: c.rate_lag,
            gap_timeout: c.gap_timeout,
            rates_from: c.rates_from,
        }
    }
}

/// A server about to start.
#[derive(Debug)]
pub struct Server;

/// A running server; dropping it does not stop it, [`ServerHandle::stop`] does.
#[derive(Debug)]
pub struct ServerHandle {
    pub pdp_addr: SocketAddr,
    pub decisions: watch::Receiver<Arc<DecisionTable>>,
    pub rates: watch::Receiver<Arc<Rates>>,
    pub pdp_stats: Arc<PdpStats>,
    pub pdp_limiter: ConnLimiter,
    pub store: Store,
    /// The decision loop's counters (for `/metrics`).
    pub loop_stats: Arc<crate::metrics::LoopStats>,
    /// The window lag the bandwidth manager runs with.
    pub rate_lag: std::time::Duration,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    task_names: Vec<(tokio::task::Id, &'static str)>,
}

impl ServerHandle {
    /// Stops every task: enforcers get CC (shutting down).
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
    }

    /// A receiver that turns true when the server stops (for the web server).
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// What `/metrics` reads, without the web server's part.
    pub fn metrics_source(&self) -> crate::metrics::MetricsSource {
        crate::metrics::MetricsSource {
            decisions: self.decisions.clone(),
            rates: self.rates.clone(),
            pdp_stats: self.pdp_stats.clone(),
            pdp_limiter: self.pdp_limiter.clone(),
            loop_stats: self.loop_stats.clone(),
            rate_lag: self.rate_lag,
            http: None,
        }
    }

    /// The PDP's counters now.
    pub fn pdp_counters(&self) -> PdpCounters {
        self.pdp_stats.snapshot(&self.pdp_limiter.stats())
    }

    /// Resolves when any task ends, which they do only on shutdown: before
    /// that it is a failure (a task panicked or its input is gone), and
    /// the daemon must exit non-zero. Returns which task ended.
    pub async fn wait(&mut self) -> String {
        match self.tasks.join_next_with_id().await {
            None => "no task was running".into(),
            Some(Ok((id, ()))) => format!("{} ended", self.task_name(id)),
            Some(Err(e)) => format!("{} failed: {e}", self.task_name(e.id())),
        }
    }

    /// Runs until `shutdown` resolves, then stops every task. A task that
    /// ends before — the server's, `web`'s, or `also` (which resolves to
    /// the reason it ended) — is a failure: everything is stopped and the
    /// reason returned, for the daemon to exit non-zero.
    pub async fn run_until(
        mut self,
        web: Option<crate::web::WebHandle>,
        also: impl std::future::Future<Output = String>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), String> {
        let web_task = async {
            match web {
                Some(w) => match w.task.await {
                    Ok(()) => "the web server ended".to_owned(),
                    Err(e) => format!("the web server failed: {e}"),
                },
                None => std::future::pending().await,
            }
        };
        let failure = tokio::select! {
            _ = shutdown => None,
            ended = self.wait() => Some(ended),
            ended = web_task => Some(ended),
            ended = also => Some(ended),
        };
        match &failure {
            None => tracing::info!("shutting down"),
            Some(why) => {
                tracing::error!(reason = %why, "a server task ended before shutdown; stopping")
            }
        }
        self.stop().await;
        match failure {
            None => Ok(()),
            Some(why) => Err(format!("{why} before shutdown")),
        }
    }

    fn task_name(&self, id: tokio::task::Id) -> &'static str {
        self.task_names
            .iter()
            .find(|(i, _)| *i == id)
            .map_or("a server task", |(_, n)| n)
    }
}

impl Server {
    /// Connects to the database (migrating it), binds the PDP and starts
    /// the loop.
    pub async fn start(
        db_url: &str,
        pdp_listen: SocketAddr,
        pdp_config: crate::pdp::PdpConfig,
        loop_config: LoopConfig,
        policies: watch::Receiver<Arc<PolicySet>>,
    ) -> Result<ServerHandle, ServerError> {
        let db = Db::connect(db_url).await?;
        db.migrate().await?;
        let store = Store::new(db);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let policy = policies.borrow().clone();

        let mut engine = Engine::new(loop_config.hysteresis)
            .with_min_hold(loop_config.min_hold)
            .with_confirm(loop_config.confirm)
            .with_gap_hold(loop_config.gap_hold);
        engine.restore(&policy, store.latest_decisions().await?);
        let mut bm = BandwidthManager::new(&policy, loop_config.ewma_weight);
        bm.set_lag(loop_config.rate_lag);
        let recent = now_ns() - 10 * loop_config.interval.as_nanos() as i64;
        for (subject, name, avg) in store.latest_averages(recent).await? {
            if subject == "user" {
                bm.seed_user_average(&name, avg);
                continue;
            }
            let key = if subject == "flow" {
                policy
                    .rules
                    .iter()
                    .find(|r| r.name == name)
                    .map(|r| r.dn.clone())
            } else {
                Some(name)
            };
            if let Some(key) = key {
                bm.seed_average(subject == "flow", &key, avg);
            }
        }
        let mut table = engine.table();
        table.devices = crate::engine::device_directions(&policy);
        let (decisions_tx, decisions_rx) = watch::channel(Arc::new(table));
        let (rates_tx, rates_rx) = watch::channel(Arc::new(Rates::default()));
        let (events_tx, events_rx) = mpsc::channel(crate::pdp::EVENT_QUEUE);

        let pdp = Pdp::bind(
            pdp_listen,
            pdp_config,
            decisions_rx.clone(),
            events_tx,
            shutdown_rx.clone(),
        )
        .await
        .map_err(|source| ServerError::Listen {
            addr: pdp_listen,
            source,
        })?;
        let pdp_addr = pdp.local_addr().map_err(|source| ServerError::Listen {
            addr: pdp_listen,
            source,
        })?;
        let pdp_stats = pdp.stats();
        let pdp_limiter = pdp.limiter();
        let cursor = FlowCursor::at_end(&store, loop_config.gap_timeout).await?;
        let cluster_rates = match loop_config.rates_from {
            RatesFrom::Records => None,
            RatesFrom::Cluster => Some(ClusterRates::start(&store).await?),
        };

        let mut tasks = JoinSet::new();
        let mut task_names = Vec::new();
        task_names.push((tasks.spawn(pdp.run()).id(), "the PDP"));
        task_names.push((
            tasks
                .spawn(record_events(store.clone(), events_rx, pdp_stats.clone()))
                .id(),
            "the enforcer event writer",
        ));
        let loop_stats = Arc::new(crate::metrics::LoopStats::default());
        let rate_lag = loop_config.rate_lag;
        let ctx = LoopState {
            stats: loop_stats.clone(),
            store: store.clone(),
            config: loop_config,
            cursor,
            cluster_rates,
            bm,
            engine,
            policies,
            decisions: decisions_tx,
            rates: rates_tx,
        };
        task_names.push((tasks.spawn(ctx.run(shutdown_rx)).id(), "the decision loop"));
        tracing::info!(pdp = %pdp_addr, "policy server running");
        Ok(ServerHandle {
            pdp_addr,
            decisions: decisions_rx,
            rates: rates_rx,
            pdp_stats,
            pdp_limiter,
            store,
            loop_stats,
            rate_lag,
            shutdown,
            tasks,
            task_names,
        })
    }
}

struct LoopState {
    stats: Arc<crate::metrics::LoopStats>,
    store: Store,
    config: LoopConfig,
    cursor: FlowCursor,
    /// With [`RatesFrom::Cluster`]: the owners' rates instead of `bm`.
    cluster_rates: Option<ClusterRates>,
    bm: BandwidthManager,
    engine: Engine,
    policies: watch::Receiver<Arc<PolicySet>>,
    decisions: watch::Sender<Arc<DecisionTable>>,
    rates: watch::Sender<Arc<Rates>>,
}

impl LoopState {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        // From a cluster, rates arrive when the owners close a window:
        // they are looked for every 50 ms and decided on as they come
        // (one decision per window and subject), not up to an interval
        // later.
        let every = match self.cluster_rates {
            Some(_) => self.config.interval.min(Duration::from_millis(50)),
            None => self.config.interval,
        };
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = Instant::now();
        let mut policy = self.policies.borrow_and_update().clone();
        let mut last_rates = Arc::new(Rates::default());
        // Decide once at start: enforcers get the policy before any traffic.
        self.decide(&policy, &last_rates).await;
        self.publish(&policy).await;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                changed = self.policies.changed() => {
                    if changed.is_err() {
                        tracing::warn!("policy repository stopped; keeping the last policy");
                        self.policies = watch::channel(policy.clone()).1;
                        continue;
                    }
                    policy = self.policies.borrow_and_update().clone();
                    self.bm.set_policy(&policy);
                    tracing::info!(rules = policy.rules.len(), "new policy");
                    self.publish(&policy).await;
                    self.decide(&policy, &last_rates).await;
                    continue;
                }
                _ = crate::pdp::stopped(&mut shutdown) => return,
            }
            if let Some(cluster) = &mut self.cluster_rates {
                match cluster.read(&self.store, &policy).await {
                    Ok(Some(rates)) => {
                        let rates = Arc::new(rates);
                        self.decide(&policy, &rates).await;
                        self.rates.send_replace(rates.clone());
                        last_rates = rates;
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "reading the cluster's rates failed"),
                }
                continue;
            }
            let read = self.cursor.read_new(&self.store, |r| self.bm.add(r)).await;
            let count = |c: &std::sync::atomic::AtomicU64, n: u64| {
                c.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            };
            match &read {
                Ok(r) => {
                    count(&self.stats.records_read, r.records);
                    count(&self.stats.records_malformed, r.malformed);
                    count(&self.stats.gaps_skipped, r.gaps_skipped);
                }
                Err(_) => count(&self.stats.read_failures, 1),
            }
            match read {
                Ok(stats) if stats.malformed > 0 || stats.gaps_skipped > 0 => tracing::warn!(
                    malformed = stats.malformed,
                    gaps_skipped = stats.gaps_skipped,
                    "flow records skipped"
                ),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "reading flow records failed; retrying next interval");
                    continue;
                }
            }
            let now = Instant::now();
            let elapsed = now.duration_since(last);
            last = now;
            let rates = Arc::new(self.bm.close_interval(now_ns(), elapsed.as_nanos() as i64));
            self.decide(&policy, &rates).await;
            self.rates.send_replace(rates.clone());
            if let Err(e) = self.store.insert_rates(&rates).await {
                tracing::warn!(error = %e, "storing rates failed");
            }
            last_rates = rates;
        }
    }

    /// With [`RatesFrom::Cluster`], publishes the policy for the owners.
    async fn publish(&self, policy: &PolicySet) {
        if self.cluster_rates.is_none() {
            return;
        }
        let body = match serde_json::to_string(policy) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "the policy does not serialise; not published");
                return;
            }
        };
        match self.store.db().publish_policy(&body).await {
            Ok(version) => tracing::info!(version, "policy published for the cluster"),
            Err(e) => tracing::warn!(error = %e, "publishing the policy failed"),
        }
    }

    async fn decide(&mut self, policy: &PolicySet, rates: &Rates) {
        if crate::subjects::needs_user_addresses(policy) {
            // Per-user decisions on roles matched by address follow the
            // knowledge base's live mappings, read every round. A failed
            // read keeps the last addresses.
            let now = now_ns();
            match self
                .store
                .db()
                .kb_mappings(now, crate::subjects::MAX_MAPPINGS_READ)
                .await
            {
                Ok(rows) => {
                    let (addresses, bad) = crate::subjects::user_addresses(&rows);
                    if bad > 0 {
                        tracing::warn!(
                            bad,
                            "knowledge-base mappings whose address does not parse: skipped"
                        );
                    }
                    self.engine.set_user_addresses(addresses);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the users' addresses failed; keeping the last ones")
                }
            }
        }
        let changes = self.engine.evaluate(policy, rates, now_ns() as u64);
        if changes.held > 0 {
            tracing::debug!(
                held = changes.held,
                "band changes held (confirmation, minimum hold)"
            );
        }
        for (dn, why) in &changes.skipped {
            tracing::warn!(rule = %dn, reason = why, "rule not enforced");
        }
        let devices = crate::engine::device_directions(policy);
        if changes.is_empty() && self.decisions.borrow().devices == devices {
            return;
        }
        self.stats.count_decisions(
            changes.installed.iter().map(|d| &**d),
            changes.removed.len(),
        );
        let mut table = self.engine.table();
        table.devices = devices;
        self.decisions.send_replace(Arc::new(table));
        for d in &changes.installed {
            tracing::info!(
                decision = d.id,
                version = d.version,
                role = %d.role,
                kind = %d.kind(),
                band = %d.reason.band,
                link_load_kbps = d.reason.link_load_kbps,
                avg_rate_kbps = d.reason.avg_rate_kbps,
                "decision"
            );
        }
        if let Err(e) = self.store.insert_decisions(&changes).await {
            tracing::warn!(error = %e, "storing decisions failed");
        }
    }
}

/// Disconnected enforcers kept in `enforcers` (the newest); older ones
/// are forgotten, as are those not seen for [`ENFORCER_EXPIRY`].
pub const MAX_DISCONNECTED_ENFORCERS: i64 = 128;
/// How long a disconnected enforcer stays in `enforcers`.
pub const ENFORCER_EXPIRY: Duration = Duration::from_secs(24 * 3600);

/// Writes what the PDP hears, in order. A failed write is counted and
/// logged (rate-limited); the next event is written regardless.
async fn record_events(store: Store, mut events: mpsc::Receiver<PdpEvent>, stats: Arc<PdpStats>) {
    use std::sync::atomic::Ordering;
    let failed_log = qosloop_schema::guard::LogThrottle::new(Duration::from_secs(1));
    while let Some(e) = events.recv().await {
        let r = match &e {
            PdpEvent::Connected {
                name,
                roles,
                address,
            } => {
                store
                    .upsert_enforcer(name, roles, &address.to_string(), "connected")
                    .await
            }
            PdpEvent::Disconnected {
                name,
                roles,
                address,
                ..
            } => {
                let r = store
                    .upsert_enforcer(name, roles, &address.to_string(), "disconnected")
                    .await;
                let oldest = now_ns() - ENFORCER_EXPIRY.as_nanos() as i64;
                match store
                    .prune_enforcers(MAX_DISCONNECTED_ENFORCERS, oldest)
                    .await
                {
                    Ok(n) => {
                        stats.enforcers_pruned.fetch_add(n, Ordering::Relaxed);
                        r
                    }
                    Err(e) => r.and(Err(e)),
                }
            }
            PdpEvent::Report { name, report } => store.insert_report(name, report).await,
            PdpEvent::Counters { name, report } => store.replace_counters(name, report).await,
        };
        if let Err(err) = r {
            let n = stats.events_store_failed.fetch_add(1, Ordering::Relaxed) + 1;
            if let Some(suppressed) = failed_log.check() {
                tracing::warn!(error = %err, failed_total = n, suppressed, "storing an enforcer event failed");
            }
        }
    }
}
