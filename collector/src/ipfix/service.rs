//! Starting the IPFIX/NetFlow listeners of a collector and stopping them.

use super::settings::{IngestSettings, Transport};
use super::tcp;
use super::udp::{open_socket, SharedListenerStats, UdpWorker};
use crate::config::Config;
use crate::journal::{Journal, JournalConfig, JournalStats};
use crate::server::ServerError;
use crate::store::{Sink, WriteReq};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long a stopping collector lets the loader store what the journal
/// holds.
const JOURNAL_DRAIN: Duration = Duration::from_secs(30);

/// The running IPFIX listeners. Dropping it does not stop them; call
/// [`Ingest::stop`] to flush and end the UDP threads.
#[derive(Debug)]
pub struct Ingest {
    /// Bound addresses, in the order of `ipfix_listen` (port 0 resolved).
    pub bound: Vec<(Transport, SocketAddr)>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    udp_stats: Vec<(String, Arc<SharedListenerStats>)>,
    journal: Option<(Arc<Journal>, tokio::task::JoinHandle<()>)>,
}

impl Ingest {
    /// Binds every listener of `config.ipfix_listen` (all or none), then
    /// starts receiving into `writer`. Needs a Tokio runtime.
    pub async fn start(
        config: &Config,
        sink: Sink,
        writer: mpsc::Sender<WriteReq>,
    ) -> Result<Ingest, ServerError> {
        let settings =
            IngestSettings::from_config(config).map_err(|e| ServerError::Bind(e.to_string()))?;
        let tls = crate::server::tls_acceptor(config)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut bound = Vec::new();
        let mut sockets = Vec::new();
        let mut listeners = Vec::new();
        for spec in &settings.listeners {
            let listen_err = |source| ServerError::Listen {
                addr: spec.to_string(),
                source,
            };
            match spec.transport {
                Transport::Udp => {
                    let mut addr = spec.addr;
                    let mut socks = Vec::new();
                    for _ in 0..settings.udp_threads {
                        let (sock, granted) =
                            open_socket(addr, settings.rcvbuf).map_err(listen_err)?;
                        // Port 0: the others join the port the first got.
                        addr = sock.local_addr().map_err(listen_err)?;
                        socks.push((sock, granted));
                    }
                    bound.push((Transport::Udp, addr));
                    sockets.push((format!("udp://{addr}"), socks));
                }
                Transport::Tcp | Transport::Tls => {
                    let l = tokio::net::TcpListener::bind(spec.addr)
                        .await
                        .map_err(listen_err)?;
                    let addr = l.local_addr().map_err(listen_err)?;
                    bound.push((spec.transport, addr));
                    listeners.push((spec.transport, l));
                }
            }
        }
        // The journal, when configured, takes what the UDP threads decode;
        // its loader stores it through the writer.
        let journal = match &config.ipfix_journal_dir {
            Some(dir) if !sockets.is_empty() => {
                let j = Journal::open(JournalConfig::new(
                    dir.clone(),
                    config.ipfix_journal_max_bytes,
                    Duration::from_millis(config.ipfix_journal_fsync_ms),
                ))
                .map_err(|e| ServerError::Bind(e.to_string()))?;
                let loader = crate::journal::spawn_loader(j.clone(), sink.clone(), writer.clone());
                tracing::info!(dir = %dir.display(), max_bytes = config.ipfix_journal_max_bytes,
                    fsync_ms = config.ipfix_journal_fsync_ms, "UDP records journaled before SQL");
                Some((j, loader))
            }
            _ => None,
        };
        let runtime = tokio::runtime::Handle::current();
        let mut threads = Vec::new();
        let mut udp_stats = Vec::new();
        for (listen, socks) in sockets {
            let stats = Arc::new(SharedListenerStats::new(socks.len()));
            if let Some((_, granted)) = socks.first() {
                stats.rcvbuf.store(*granted as u64, Ordering::Relaxed);
                if *granted < settings.rcvbuf {
                    tracing::warn!(%listen, asked = settings.rcvbuf, granted,
                        "the kernel granted a smaller UDP receive buffer (raise net.core.rmem_max or run with CAP_NET_ADMIN)");
                }
            }
            tracing::info!(%listen, threads = socks.len(), rcvbuf = stats.rcvbuf.load(Ordering::Relaxed),
                "receiving IPFIX / NetFlow v9 / v5 over UDP");
            for (index, (socket, _)) in socks.into_iter().enumerate() {
                let worker = UdpWorker {
                    socket,
                    index,
                    listen: listen.clone(),
                    settings: settings.clone(),
                    sink: sink.clone(),
                    writer: writer.clone(),
                    stats: stats.clone(),
                    stop: stop.clone(),
                    runtime: runtime.clone(),
                    journal: journal.as_ref().map(|(j, _)| j.clone()),
                };
                let t = std::thread::Builder::new()
                    .name(format!("ipfix-udp-{index}"))
                    .spawn(move || worker.run())
                    .map_err(|source| ServerError::Listen {
                        addr: listen.clone(),
                        source,
                    })?;
                threads.push(t);
            }
            udp_stats.push((listen, stats));
        }
        let mut tasks = Vec::new();
        for (transport, l) in listeners {
            let acceptor = if transport == Transport::Tls {
                tls.clone()
            } else {
                None
            };
            tasks.push(tokio::spawn(tcp::serve(
                l,
                acceptor,
                settings.clone(),
                {
                    let mut l = config.conn_limits();
                    l.per_peer = l.per_peer.min(super::settings::TCP_PER_PEER);
                    l
                },
                sink.clone(),
                writer.clone(),
            )));
        }
        Ok(Ingest {
            bound,
            stop,
            threads,
            tasks,
            udp_stats,
            journal,
        })
    }

    /// The counters of each UDP listener (`udp://ADDR`).
    pub fn udp_stats(&self) -> Vec<(String, super::sql::ListenerStats)> {
        self.udp_stats
            .iter()
            .map(|(l, s)| (l.clone(), s.snapshot()))
            .collect()
    }

    /// The journal's counters, when there is one.
    pub fn journal_stats(&self) -> Option<JournalStats> {
        self.journal.as_ref().map(|(j, _)| j.stats())
    }

    /// A handle that reads the UDP listeners' counters from anywhere
    /// (`/metrics`).
    pub fn udp_stats_handle(&self) -> UdpStatsHandle {
        UdpStatsHandle(self.udp_stats.clone())
    }

    /// Stops accepting, flushes what the UDP threads hold to the writer (or
    /// the journal, then gives its loader up to `JOURNAL_DRAIN` to store
    /// what is left; the rest waits in the journal for the next start) and
    /// writes their counters; returns when they are done.
    pub async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        self.stop.store(true, Ordering::Relaxed);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        if let Some((journal, mut loader)) = self.journal {
            let j = journal.clone();
            let _ = tokio::task::spawn_blocking(move || j.close()).await;
            if tokio::time::timeout(JOURNAL_DRAIN, &mut loader)
                .await
                .is_err()
            {
                loader.abort();
                let s = journal.stats();
                tracing::warn!(
                    left = s.synced_records.saturating_sub(s.loaded_records),
                    "stopping with records in the journal; they are loaded at the next start"
                );
            }
        }
    }
}

/// [`Ingest::udp_stats_handle`].
#[derive(Clone, Debug, Default)]
pub struct UdpStatsHandle(Vec<(String, Arc<SharedListenerStats>)>);

impl UdpStatsHandle {
    /// The counters of each UDP listener (`udp://ADDR`) now.
    pub fn snapshot(&self) -> Vec<(String, super::sql::ListenerStats)> {
        self.0
            .iter()
            .map(|(l, s)| (l.clone(), s.snapshot()))
            .collect()
    }
}
