//! The export server: accepts exporters (within per-address and total
//! connection limits), runs a session per connection and one storage writer
//! for all of them.

use crate::config::Config;
use crate::session::{self, Counters, SessionCtx, SessionLimits};
use crate::store::{spawn_writer_with, Sink, TallyCell, WriterOptions};
use qosloop_runtime::tls::Io;
use qosloop_schema::guard::{self, ConnLimiter, ConnStats, LogThrottle};
use qosloop_schema::ie;
use qosloop_store::Db;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("listen: {0}")]
    Bind(String),
    #[error(transparent)]
    Db(#[from] qosloop_store::DbError),
    #[error(transparent)]
    Tls(#[from] qosloop_runtime::tls::TlsError),
}

/// The TLS acceptor the configuration asks for (all three files, or none).
pub fn tls_acceptor(config: &Config) -> Result<Option<tokio_rustls::TlsAcceptor>, ServerError> {
    match (&config.tls_cert, &config.tls_key, &config.tls_client_ca) {
        (Some(cert), Some(key), Some(ca)) => Ok(Some(tokio_rustls::TlsAcceptor::from(
            qosloop_runtime::tls::server_config(cert, key, ca)?,
        ))),
        _ => Ok(None),
    }
}

/// Opens the storage named by `config.db` (`discard:` stores nothing).
pub async fn open_sink(url: &str) -> Result<Sink, qosloop_store::DbError> {
    if url == "discard:" || url == "discard://" {
        return Ok(Sink::Discard);
    }
    let db = Db::connect(url).await?;
    db.migrate().await?;
    Ok(Sink::Db(db))
}

/// Reaches the database and migrates it, retrying with backoff (250 ms,
/// doubling to 5 s) for as long as the errors are ones a restart of the
/// server explains, and saying so at each attempt; other errors (a bad
/// password, a failed migration) end it.
pub async fn prepare_storage(db: &Db) -> Result<(), qosloop_store::DbError> {
    let mut delay = std::time::Duration::from_millis(250);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let tried = async {
            db.probe().await?;
            db.migrate().await
        }
        .await;
        match tried {
            Ok(_) => {
                if attempt > 1 {
                    tracing::info!(attempt, "database reachable; storage ready");
                }
                return Ok(());
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, attempt, retry_in_ms = delay.as_millis() as u64,
                    "database unreachable, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Binds `config.listen` — loopback, or beyond it only with mutual TLS or
/// `allow_insecure_remote` (logged at WARN).
pub async fn bind(config: &Config) -> Result<TcpListener, ServerError> {
    let addr: SocketAddr = config
        .listen
        .parse()
        .map_err(|_| ServerError::Bind(format!("{:?} is not HOST:PORT", config.listen)))?;
    guard::check_bind(
        addr,
        "export",
        config.mutual_tls(),
        config.allow_insecure_remote,
    )
    .map_err(ServerError::Bind)?;
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Listen {
            addr: config.listen.clone(),
            source,
        })
}

/// Serves exporters on `listener`, storing into `sink`; over TLS with
/// mutual authentication when the configuration names the files.
pub async fn serve(listener: TcpListener, sink: Sink, config: &Config) -> Result<(), ServerError> {
    Collector::new(sink, config)?.serve(listener).await
}

/// A running collector: the storage writer, the shared session state and
/// the counters. [`Collector::serve`] accepts on a listener;
/// [`Collector::serve_stream`] runs one session over any byte stream (tests
/// and the fuzz target use it over in-memory pipes).
#[derive(Clone)]
pub struct Collector {
    ctx: Arc<SessionCtx>,
    limiter: ConnLimiter,
    tls: Option<tokio_rustls::TlsAcceptor>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collector")
            .field("limits", &self.ctx.limits)
            .field("tls", &self.tls.is_some())
            .field("stats", &self.stats())
            .finish()
    }
}

/// What a collector refused and holds, for logs and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CollectorStats {
    /// Sessions ended or connections refused, by reason (`handshake_timeout`,
    /// `exporter_name_in_use`, `over_memory_budget`, …).
    pub refused: BTreeMap<&'static str, u64>,
    pub connections: ConnStats,
    /// Decoded bytes waiting for storage now.
    pub decoded_in_flight: u64,
    /// Bytes reserved for large messages being received now.
    pub receiving: u64,
}

impl Collector {
    /// Starts the storage writer; needs a Tokio runtime.
    pub fn new(sink: Sink, config: &Config) -> Result<Collector, ServerError> {
        Collector::with_tally(sink, config, TallyCell::default())
    }

    /// [`Collector::new`] for a node of a cluster: its writer adds what it
    /// stores to the node's partial sums of `tally`.
    pub fn with_tally(
        sink: Sink,
        config: &Config,
        tally: TallyCell,
    ) -> Result<Collector, ServerError> {
        Collector::gated(sink, config, tally, None)
    }

    /// [`Collector::with_tally`] whose writer stores nothing until `ready`
    /// turns `true` ([`prepare_storage`] done).
    pub fn gated(
        sink: Sink,
        config: &Config,
        tally: TallyCell,
        ready: Option<tokio::sync::watch::Receiver<bool>>,
    ) -> Result<Collector, ServerError> {
        let tls = tls_acceptor(config)?;
        let (writer, _writer_tasks) = spawn_writer_with(
            sink.clone(),
            config.queue_messages,
            config.group_records,
            config.writers,
            tally,
            WriterOptions {
                kb: config.kb_config(),
                ready,
                flow_buckets: (!config.cluster.is_empty()).then_some(config.cluster_buckets),
            },
        );
        let disabled_keys = config
            .disable_keys
            .iter()
            .filter_map(|n| ie::by_name(n).map(|e| e.id))
            .collect();
        let counters = Arc::new(Counters::default());
        let ctx = Arc::new(SessionCtx::new(
            sink,
            writer,
            SessionLimits::from_config(config),
            disabled_keys,
            counters.clone(),
        ));
        Ok(Collector {
            ctx,
            limiter: ConnLimiter::new("export", config.conn_limits()),
            tls,
            counters,
        })
    }

    /// The storage writer's queue: IPFIX ingest stores through it too, so
    /// one writer (SQLite has only one) serves every protocol.
    pub fn writer(&self) -> tokio::sync::mpsc::Sender<crate::store::WriteReq> {
        self.ctx.writer.clone()
    }

    /// What `/metrics` reads (add the IPFIX listeners with
    /// [`crate::metrics::CollectorMetrics::with_ingest`]).
    pub fn metrics(&self) -> crate::metrics::CollectorMetrics {
        crate::metrics::CollectorMetrics {
            counters: self.counters.clone(),
            limiter: self.limiter.clone(),
            writer: self.ctx.writer.clone(),
            udp: Default::default(),
            exporters: Arc::new(qosloop_runtime::metrics::LabelCap::new(
                crate::metrics::MAX_EXPORTER_LABELS,
            )),
            crane_exporters: Arc::new(qosloop_runtime::metrics::LabelCap::new(
                crate::metrics::MAX_EXPORTER_LABELS,
            )),
        }
    }

    pub fn stats(&self) -> CollectorStats {
        CollectorStats {
            refused: self.counters.snapshot(),
            connections: self.limiter.stats(),
            decoded_in_flight: self.counters.decoded_in_flight(),
            receiving: self.counters.receiving(),
        }
    }

    /// Runs one session over `stream` from `peer`; `identity` is the name
    /// of the peer's certificate when it showed one.
    pub async fn serve_stream(
        &self,
        stream: Box<dyn Io>,
        peer: SocketAddr,
        identity: Option<String>,
    ) {
        session::serve(stream, peer, identity, self.ctx.clone()).await
    }

    /// Accepts exporters on `listener` until the task is dropped.
    pub async fn serve(&self, listener: TcpListener) -> Result<(), ServerError> {
        let nofile = guard::raise_nofile_limit();
        tracing::info!(listen = ?listener.local_addr().ok(), tls = self.tls.is_some(), nofile,
            max_connections = self.limiter.limits().total,
            max_connections_per_peer = self.limiter.limits().per_peer, "accepting exporters");
        let mut report = tokio::time::interval(Duration::from_secs(60));
        report.tick().await;
        let mut reported = CollectorStats::default();
        let tls_log = Arc::new(LogThrottle::new(Duration::from_secs(1)));
        loop {
            let (stream, peer) = tokio::select! {
                x = guard::accept_next(&listener, "export") => x,
                _ = report.tick() => {
                    let now = self.stats();
                    if now.refused != reported.refused || now.connections != reported.connections {
                        tracing::info!(refused = ?now.refused, open = now.connections.open,
                            refused_per_peer = now.connections.refused_per_peer,
                            refused_total = now.connections.refused_total,
                            decoded_in_flight = now.decoded_in_flight, "export counters");
                        reported = now;
                    }
                    continue;
                }
            };
            // Over a limit: closed at once (the limiter counts and logs it).
            let Ok(permit) = self.limiter.try_acquire(peer.ip()) else {
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let ctx = self.ctx.clone();
            match &self.tls {
                None => {
                    tokio::spawn(async move {
                        session::serve(Box::new(stream), peer, None, ctx).await;
                        drop(permit);
                    });
                }
                Some(acceptor) => {
                    let acceptor = acceptor.clone();
                    let counters = self.counters.clone();
                    let log = tls_log.clone();
                    tokio::spawn(async move {
                        let handshake =
                            tokio::time::timeout(Duration::from_secs(5), acceptor.accept(stream));
                        let refused = match handshake.await {
                            Ok(Ok(tls)) => {
                                let name = tls
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|c| c.first())
                                    .and_then(|c| qosloop_runtime::tls::certificate_identity(c));
                                match name {
                                    Some(name) => {
                                        session::serve(Box::new(tls), peer, Some(name), ctx).await;
                                        None
                                    }
                                    None => Some(("certificate_without_name", "client certificate has neither a subject CN nor a DNS name".to_owned())),
                                }
                            }
                            Ok(Err(e)) => Some(("tls_handshake_failed", e.to_string())),
                            Err(_) => Some((
                                "tls_handshake_timeout",
                                "TLS handshake timed out".to_owned(),
                            )),
                        };
                        if let Some((reason, error)) = refused {
                            counters.count(reason);
                            if let Some(suppressed) = log.check() {
                                tracing::warn!(%peer, reason, %error, suppressed, "TLS connection refused");
                            }
                        }
                        drop(permit);
                    });
                }
            }
        }
    }
}
