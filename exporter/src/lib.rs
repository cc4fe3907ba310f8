//! # qosloop-exporter
//!
//! The export client of qosloop's CRANE-style protocol (DESIGN.md §4,
//! `docs/protocol.md`): it negotiates a session and templates with a
//! collector, sends records in sequenced DATA messages, keeps the
//! unacknowledged ones until the collector has committed them, fails over
//! between collectors by priority (and back), and spools to disk while none
//! answers. The meter feeds it in-process through [`Exporter`].
//!
//! Records are encoded by the caller's task into batches (one template per
//! batch, the machine's byte order); one engine task numbers, sends, spools
//! and re-sends them. TLS with mutual authentication is optional
//! ([`ExporterConfig::tls`]); plain TCP is the default.
//!
//! [`ipfix`] exports the same records as IPFIX (RFC 7011) over UDP or TCP
//! to any standard collector; [`Target::parse`] tells the URL forms apart.

mod engine;
pub mod ipfix;
mod spool;
pub use qosloop_runtime::tls;
pub use spool::leftovers as spool_leftovers;

pub use spool::SpoolError;
pub use tls::{TlsError, TlsFiles};

/// A byte stream the protocol runs over: TCP, or TLS over TCP.
pub use qosloop_runtime::tls::Io;

use bytes::BytesMut;
use qosloop_schema::crane::records::RecordLayout;
use qosloop_schema::crane::{ByteOrder, CraneError, WireTemplate};
use qosloop_schema::{FlowRecord, Template};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// Default of [`ExporterConfig::ack_timeout`].
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// What the exporter can fail at.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("bad export target {0:?}: use crane://HOST:PORT[,HOST:PORT…], ipfix://HOST:PORT or ipfix+tcp://HOST:PORT")]
    Target(String),
    #[error("collector {addr}: {detail}")]
    Collector { addr: String, detail: String },
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("encoding a record: {0}")]
    Encode(#[from] CraneError),
    #[error("the exporter has stopped")]
    Stopped,
}

/// How the exporter behaves. `collectors` is in priority order, best first.
#[derive(Clone, Debug)]
pub struct ExporterConfig {
    /// `HOST:PORT` of each collector, best first.
    pub collectors: Vec<String>,
    /// This exporter's stable name (its identity at the collectors).
    pub name: String,
    /// Records per DATA message.
    pub batch_records: usize,
    /// DATA messages sent and not yet acknowledged, at most.
    pub window: usize,
    /// Directory of the disk spool; `None` keeps the spool in memory.
    pub spool_dir: Option<PathBuf>,
    /// Bound of the spool in bytes; what does not fit is dropped and counted.
    pub spool_max_bytes: u64,
    pub connect_timeout: Duration,
    /// A collector that has not answered for this long while messages wait
    /// for acknowledgement is given up.
    pub dead_after: Duration,
    /// A collector that leaves a DATA message unacknowledged this long is
    /// failed over, even if it answers keepalives, and is not tried again
    /// for as long (with no other collector, records spool).
    pub ack_timeout: Duration,
    /// How often better collectors are probed while on a worse one.
    pub probe_interval: Duration,
    /// How often collectors are tried while none answers.
    pub retry_interval: Duration,
    /// How long [`Exporter::finish`] waits for acknowledgements.
    pub finish_timeout: Duration,
    /// TLS with mutual authentication; `None`: plain TCP.
    pub tls: Option<TlsFiles>,
}

impl ExporterConfig {
    /// Defaults for `collectors`.
    pub fn new(collectors: Vec<String>) -> ExporterConfig {
        ExporterConfig {
            collectors,
            name: default_name(),
            batch_records: 1000,
            window: 32,
            spool_dir: None,
            spool_max_bytes: 1 << 30,
            connect_timeout: Duration::from_millis(300),
            dead_after: Duration::from_millis(700),
            ack_timeout: DEFAULT_ACK_TIMEOUT,
            probe_interval: Duration::from_millis(500),
            retry_interval: Duration::from_millis(200),
            finish_timeout: Duration::from_secs(10),
            tls: None,
        }
    }

    /// Parses `crane://HOST:PORT[,HOST:PORT…]` (priority in list order).
    pub fn from_url(url: &str) -> Result<ExporterConfig, ExportError> {
        let rest = url
            .strip_prefix("crane://")
            .ok_or_else(|| ExportError::Target(url.to_owned()))?;
        let collectors: Vec<String> = rest.split(',').map(|s| s.trim().to_owned()).collect();
        let valid = |c: &String| {
            c.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            })
        };
        if collectors.is_empty() || !collectors.iter().all(valid) {
            return Err(ExportError::Target(url.to_owned()));
        }
        Ok(ExporterConfig::new(collectors))
    }
}

/// An export target: `crane://…` (this crate's acknowledged protocol) or
/// `ipfix://…` / `ipfix+tcp://…` (see [`ipfix::IpfixConfig::from_url`]).
#[derive(Clone, Debug)]
pub enum Target {
    Crane(ExporterConfig),
    Ipfix(ipfix::IpfixConfig),
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, ExportError> {
        if url.starts_with("ipfix://") || url.starts_with("ipfix+tcp://") {
            ipfix::IpfixConfig::from_url(url)
                .map(Target::Ipfix)
                .map_err(|why| ExportError::Target(format!("{url}: {why}")))
        } else {
            ExporterConfig::from_url(url).map(Target::Crane)
        }
    }
}

fn default_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "qosloop-meter".to_owned())
}

/// Live counters.
#[derive(Debug, Default)]
pub struct Stats {
    pub records: AtomicU64,
    pub acked_records: AtomicU64,
    pub spooled_records: AtomicU64,
    pub dropped_records: AtomicU64,
    pub dropped_messages: AtomicU64,
    pub failovers: AtomicU64,
    /// Index of the collector in use; `usize::MAX` when none.
    pub collector: AtomicUsize,
    /// Failovers because DATA stayed unacknowledged past `ack_timeout`.
    pub ack_timeouts: AtomicU64,
    /// Set when every collector refused this exporter's templates (an
    /// ERROR answer to TMPL_DATA, or a negotiation that keeps no flow key
    /// or no counter): nothing sent could be stored, so the meter stops
    /// with a configuration error instead of exporting all-zero rows.
    pub refused: std::sync::Mutex<Option<String>>,
}

impl Stats {
    /// Why every collector refused this exporter, when they all did.
    pub fn refused(&self) -> Option<String> {
        self.refused.lock().ok().and_then(|r| r.clone())
    }
}

/// What became of the records at [`Exporter::finish`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// Records handed to the exporter.
    pub records: u64,
    /// Records a collector acknowledged (committed).
    pub acked_records: u64,
    /// Records dropped because the spool was full (or failed).
    pub dropped_records: u64,
    /// Records neither acknowledged nor dropped: in the spool or in memory.
    pub unacked_records: u64,
    /// Messages left in the spool.
    pub spool_messages: u64,
    /// Records left in memory, unsent or unacknowledged.
    pub unsent_in_memory_records: u64,
    /// Changes of collector.
    pub failovers: u64,
    /// Records of spools earlier runs left, acknowledged in this run.
    pub earlier_runs_acked_records: u64,
    /// Messages of those spools still on disk.
    pub earlier_runs_spool_messages: u64,
    /// Failovers because DATA stayed unacknowledged past `ack_timeout`.
    pub ack_timeouts: u64,
    /// Set when every collector refused the templates (see [`Stats::refused`]).
    pub refused: Option<String>,
}

impl Report {
    /// Every record acknowledged.
    pub fn complete(&self) -> bool {
        self.acked_records == self.records
    }
}

struct Pending {
    layout: RecordLayout,
    template_id: u16,
    buf: BytesMut,
    count: u32,
}

/// The handle the meter feeds. Dropping it without [`Exporter::finish`]
/// lets the engine run on until `finish_timeout` and loses the report.
pub struct Exporter {
    spool_dir: Option<PathBuf>,
    /// Engines draining spools of earlier runs.
    replays: Vec<tokio::task::JoinHandle<Report>>,
    tx: mpsc::Sender<engine::Cmd>,
    v4: Pending,
    v6: Pending,
    batch_records: u32,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("stats", &self.stats)
            .finish()
    }
}

impl Exporter {
    /// Starts the engine on the current tokio runtime.
    pub fn start(cfg: ExporterConfig) -> Result<Exporter, ExportError> {
        if cfg.collectors.is_empty() {
            return Err(ExportError::Target(String::new()));
        }
        let tls = match &cfg.tls {
            Some(files) => Some(tokio_rustls::TlsConnector::from(tls::client_config(files)?)),
            None => None,
        };
        let order = ByteOrder::native();
        let t4 = WireTemplate::from_template(&Template::flow_v4(256))?;
        let t6 = WireTemplate::from_template(&Template::flow_v6(257))?;
        let boot_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        // Unique per run: boot time mixed with the process id. Kept positive
        // so it reads the same as a signed SQL BIGINT.
        let stream_id = (boot_ns ^ (u64::from(std::process::id()) << 48)) & (i64::MAX as u64);
        // Spools earlier runs left behind are drained first, each in its own
        // session under its own stream id (so the collector's de-duplication
        // by (exporter, session, seq) holds across the restart).
        let mut replays = Vec::new();
        if let Some(parent) = &cfg.spool_dir {
            for (dir, segments) in spool::leftovers(parent) {
                match replay(&cfg, &dir, &tls, boot_ns, order) {
                    Ok(handle) => {
                        tracing::info!(dir = %dir.display(), segments, "re-sending the spool of an earlier run");
                        replays.push(handle);
                    }
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), segments, error = %e, "spool of an earlier run left on disk; not re-sent")
                    }
                }
            }
        }
        let spool_dir = cfg
            .spool_dir
            .as_ref()
            .map(|parent| parent.join(format!("stream-{stream_id}")));
        let spool = spool::Spool::new(
            spool_dir.clone(),
            cfg.spool_max_bytes,
            order == ByteOrder::Big,
        )?;
        let stats = Arc::new(Stats {
            collector: AtomicUsize::new(usize::MAX),
            ..Stats::default()
        });
        let (tx, rx) = mpsc::channel(cfg.window.max(1) * 2);
        let batch_records = cfg.batch_records.clamp(1, 60_000) as u32;
        let pending = |t: &WireTemplate| Pending {
            layout: RecordLayout::new(t, order),
            template_id: t.id,
            buf: BytesMut::new(),
            count: 0,
        };
        let (v4, v6) = (pending(&t4), pending(&t6));
        let engine = engine::Engine::new(
            cfg,
            stats.clone(),
            rx,
            vec![t4, t6],
            spool,
            engine::Identity { boot_ns, stream_id },
            tls,
        );
        tokio::spawn(engine.run());
        Ok(Exporter {
            spool_dir,
            replays,
            tx,
            v4,
            v6,
            batch_records,
            stats,
        })
    }

    /// Where this run spools (`None`: in memory).
    pub fn spool_dir(&self) -> Option<&std::path::Path> {
        self.spool_dir.as_deref()
    }

    /// Live counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Queues one record; waits when the engine is behind (backpressure).
    pub async fn send(&mut self, rec: &FlowRecord) -> Result<(), ExportError> {
        let v6 = matches!(
            (rec.src_addr, rec.dst_addr),
            (IpAddr::V6(_), _) | (_, IpAddr::V6(_))
        );
        let p = if v6 { &mut self.v6 } else { &mut self.v4 };
        p.layout.encode(rec, &mut p.buf)?;
        p.count += 1;
        self.stats.records.fetch_add(1, Ordering::Relaxed);
        if p.count >= self.batch_records {
            let batch = take(p);
            self.tx
                .send(engine::Cmd::Batch(batch))
                .await
                .map_err(|_| ExportError::Stopped)?;
        }
        Ok(())
    }

    /// Sends the partly filled batches now.
    pub async fn flush(&mut self) -> Result<(), ExportError> {
        for v6 in [false, true] {
            let p = if v6 { &mut self.v6 } else { &mut self.v4 };
            if p.count > 0 {
                let batch = take(p);
                self.tx
                    .send(engine::Cmd::Batch(batch))
                    .await
                    .map_err(|_| ExportError::Stopped)?;
            }
        }
        Ok(())
    }

    /// Flushes, waits until every record is acknowledged (or, when no
    /// collector answers within `finish_timeout`, left in the spool), closes
    /// the session and reports.
    pub async fn finish(mut self) -> Result<Report, ExportError> {
        self.flush().await?;
        let (reply, wait) = oneshot::channel();
        self.tx
            .send(engine::Cmd::Finish(reply))
            .await
            .map_err(|_| ExportError::Stopped)?;
        let mut report = wait.await.map_err(|_| ExportError::Stopped)?;
        for r in std::mem::take(&mut self.replays) {
            if let Ok(earlier) = r.await {
                report.earlier_runs_acked_records += earlier.acked_records;
                report.earlier_runs_spool_messages += earlier.spool_messages;
            }
        }
        Ok(report)
    }
}

/// Starts an engine that drains the spool an earlier run left in `dir`
/// (named `stream-ID`) under that run's stream id, then stops.
fn replay(
    cfg: &ExporterConfig,
    dir: &std::path::Path,
    tls: &Option<tokio_rustls::TlsConnector>,
    boot_ns: u64,
    order: ByteOrder,
) -> Result<tokio::task::JoinHandle<Report>, String> {
    let stream_id: u64 = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("stream-"))
        .and_then(|n| n.parse().ok())
        .ok_or("not a stream-ID directory")?;
    let (spool, big, records) =
        spool::Spool::reopen(dir, cfg.spool_max_bytes).map_err(|e| e.to_string())?;
    if big != (order == ByteOrder::Big) {
        return Err("records of the other byte order".into());
    }
    // Its records count as handed over, so the report says what became of them.
    let stats = Arc::new(Stats {
        collector: AtomicUsize::new(usize::MAX),
        records: AtomicU64::new(records),
        ..Stats::default()
    });
    let (tx, rx) = mpsc::channel(1);
    let (reply, wait) = oneshot::channel();
    tx.try_send(engine::Cmd::Finish(reply))
        .map_err(|e| e.to_string())?;
    drop(tx);
    let templates = vec![
        WireTemplate::from_template(&Template::flow_v4(256)).map_err(|e| e.to_string())?,
        WireTemplate::from_template(&Template::flow_v6(257)).map_err(|e| e.to_string())?,
    ];
    let engine = engine::Engine::new(
        cfg.clone(),
        stats,
        rx,
        templates,
        spool,
        engine::Identity { boot_ns, stream_id },
        tls.clone(),
    );
    tokio::spawn(engine.run());
    Ok(tokio::spawn(async move {
        let lost = Report {
            records,
            acked_records: 0,
            dropped_records: 0,
            unacked_records: records,
            spool_messages: 0,
            unsent_in_memory_records: 0,
            failovers: 0,
            earlier_runs_acked_records: 0,
            earlier_runs_spool_messages: 0,
            ack_timeouts: 0,
            refused: None,
        };
        let r = wait.await.unwrap_or(lost);
        tracing::info!(
            stream_id,
            acked_records = r.acked_records,
            left_messages = r.spool_messages,
            "spool of an earlier run drained"
        );
        r
    }))
}

fn take(p: &mut Pending) -> engine::Batch {
    let records = p.buf.split().freeze();
    let count = std::mem::take(&mut p.count);
    engine::Batch {
        template_id: p.template_id,
        count,
        records,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_in_priority_order() {
        let c = ExporterConfig::from_url("crane://127.0.0.1:4740,collector-b:4741").unwrap();
        assert_eq!(c.collectors, ["127.0.0.1:4740", "collector-b:4741"]);
        for bad in [
            "tcp://x:1",
            "crane://",
            "crane://host",
            "crane://h:0",
            "crane://h:1,",
        ] {
            assert!(ExporterConfig::from_url(bad).is_err(), "{bad}");
        }
        assert!(matches!(Target::parse("crane://h:1"), Ok(Target::Crane(_))));
        assert!(matches!(Target::parse("ipfix://h:1"), Ok(Target::Ipfix(_))));
        assert!(matches!(
            Target::parse("ipfix+tcp://h:1"),
            Ok(Target::Ipfix(c)) if c.transport == ipfix::Transport::Tcp
        ));
        assert!(Target::parse("ipfix://h").is_err());
    }
}
