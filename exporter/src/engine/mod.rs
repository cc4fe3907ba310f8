//! The engine task: sequence numbers, the window of unacknowledged
//! messages, the choice of collector (priority order, failover, fail-back),
//! and the spool while no collector answers.
//!
//! Messages are sent in sequence order from three places, oldest first:
//! `retry` (unacknowledged when a connection ended; re-sent with D set), the
//! spool, then `queue` (new messages).

use crate::spool::Spool;
use crate::{ExporterConfig, Report, Stats};
use bytes::Bytes;
use qosloop_schema::crane::WireTemplate;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

mod connection;

use connection::{ConnectError, Ended};

/// One DATA message as the exporter keeps it: records encoded with the full
/// template in the exporter's byte order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Msg {
    pub seq: u32,
    pub template_id: u16,
    pub count: u32,
    pub records: Bytes,
    /// Sent before without an acknowledgement.
    pub duplicate: bool,
}

/// A batch from the handle, not numbered yet.
#[derive(Debug)]
pub struct Batch {
    pub template_id: u16,
    pub count: u32,
    pub records: Bytes,
}

#[derive(Debug)]
pub enum Cmd {
    Batch(Batch),
    Finish(oneshot::Sender<Report>),
}

pub const CONFIG_ID: u16 = 1;

/// Who this exporter run is: its boot time and its stream id.
#[derive(Clone, Copy, Debug)]
pub struct Identity {
    pub boot_ns: u64,
    pub stream_id: u64,
}

/// How long a collector that failed is tried last and left out of fail-back probes.
const SUSPECT_FOR: Duration = Duration::from_secs(3);

pub struct Engine {
    cfg: ExporterConfig,
    stats: Arc<Stats>,
    rx: mpsc::Receiver<Cmd>,
    templates: Vec<WireTemplate>,
    next_seq: u32,
    retry: VecDeque<Msg>,
    spool: Spool,
    queue: VecDeque<Msg>,
    finish: Option<oneshot::Sender<Report>>,
    finish_deadline: Option<Instant>,
    boot_ns: u64,
    stream_id: u64,
    current: Option<usize>,
    tls: Option<tokio_rustls::TlsConnector>,
    /// Collectors that failed lately are tried last and not probed for
    /// fail-back until then: a hung collector's kernel still accepts TCP
    /// connections, only the handshake would show it is gone.
    suspect_until: Vec<Option<Instant>>,
    /// Collectors that left DATA unacknowledged past `ack_timeout` are not
    /// tried again until then.
    unacking_until: Vec<Option<Instant>>,
    /// Collectors that refused the templates, with why: not tried again.
    refused: Vec<Option<String>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("collectors", &self.cfg.collectors)
            .field("next_seq", &self.next_seq)
            .finish()
    }
}

impl Engine {
    pub fn new(
        cfg: ExporterConfig,
        stats: Arc<Stats>,
        rx: mpsc::Receiver<Cmd>,
        templates: Vec<WireTemplate>,
        spool: Spool,
        identity: Identity,
        tls: Option<tokio_rustls::TlsConnector>,
    ) -> Engine {
        let Identity { boot_ns, stream_id } = identity;
        let cfg_len = cfg.collectors.len();
        Engine {
            cfg,
            stats,
            rx,
            templates,
            next_seq: 1,
            retry: VecDeque::new(),
            spool,
            queue: VecDeque::new(),
            finish: None,
            finish_deadline: None,
            boot_ns,
            stream_id,
            current: None,
            suspect_until: vec![None; cfg_len],
            unacking_until: vec![None; cfg_len],
            refused: vec![None; cfg_len],
            tls,
        }
    }

    fn suspect(&self, idx: usize) -> bool {
        self.suspect_until
            .get(idx)
            .copied()
            .flatten()
            .is_some_and(|t| Instant::now() < t)
    }

    /// Whether `idx` may be connected to now.
    fn usable(&self, idx: usize) -> bool {
        let unacking = self
            .unacking_until
            .get(idx)
            .copied()
            .flatten()
            .is_some_and(|t| Instant::now() < t);
        !unacking && self.refused.get(idx).is_some_and(Option::is_none)
    }

    /// Why every collector refused the templates, when all did.
    fn all_refused(&self) -> Option<String> {
        if self.refused.iter().all(Option::is_some) {
            let why: Vec<String> = self
                .cfg
                .collectors
                .iter()
                .zip(&self.refused)
                .map(|(c, r)| format!("{c}: {}", r.as_deref().unwrap_or("")))
                .collect();
            Some(why.join("; "))
        } else {
            None
        }
    }

    fn mark_suspect(&mut self, idx: usize) {
        if let Some(s) = self.suspect_until.get_mut(idx) {
            *s = Some(Instant::now() + SUSPECT_FOR);
        }
    }

    fn all_sent(&self) -> bool {
        self.retry.is_empty() && self.spool.is_empty() && self.queue.is_empty()
    }

    fn number(&mut self, b: Batch) -> Msg {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1).max(1);
        Msg {
            seq,
            template_id: b.template_id,
            count: b.count,
            records: b.records,
            duplicate: false,
        }
    }

    /// Spools `msg`, counting it as dropped when the bound is reached or
    /// the disk fails.
    fn spool_or_drop(&mut self, msg: Msg) {
        let count = u64::from(msg.count);
        match self.spool.push(msg) {
            Ok(true) => {
                self.stats
                    .spooled_records
                    .fetch_add(count, Ordering::Relaxed);
            }
            Ok(false) => {
                self.stats
                    .dropped_records
                    .fetch_add(count, Ordering::Relaxed);
                self.stats.dropped_messages.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    records = count,
                    spool_bytes = self.spool.bytes(),
                    bound = self.cfg.spool_max_bytes,
                    "spool full; records dropped"
                );
            }
            Err(e) => {
                self.stats
                    .dropped_records
                    .fetch_add(count, Ordering::Relaxed);
                self.stats.dropped_messages.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, records = count, "cannot spool; records dropped");
            }
        }
    }

    fn handle_cmd(&mut self, cmd: Cmd, connected: bool) {
        match cmd {
            Cmd::Batch(b) => {
                let msg = self.number(b);
                if connected {
                    self.queue.push_back(msg);
                } else {
                    self.spool_or_drop(msg);
                }
            }
            Cmd::Finish(reply) => {
                self.finish = Some(reply);
                self.finish_deadline = Some(Instant::now() + self.cfg.finish_timeout);
            }
        }
    }

    fn report(&self) -> Report {
        let unsent: u64 = self
            .retry
            .iter()
            .chain(self.queue.iter())
            .map(|m| u64::from(m.count))
            .sum();
        Report {
            records: self.stats.records.load(Ordering::Relaxed),
            acked_records: self.stats.acked_records.load(Ordering::Relaxed),
            dropped_records: self.stats.dropped_records.load(Ordering::Relaxed),
            unacked_records: self
                .stats
                .records
                .load(Ordering::Relaxed)
                .saturating_sub(self.stats.acked_records.load(Ordering::Relaxed))
                .saturating_sub(self.stats.dropped_records.load(Ordering::Relaxed)),
            spool_messages: self.spool.len() as u64,
            unsent_in_memory_records: unsent,
            failovers: self.stats.failovers.load(Ordering::Relaxed),
            earlier_runs_acked_records: 0,
            earlier_runs_spool_messages: 0,
            ack_timeouts: self.stats.ack_timeouts.load(Ordering::Relaxed),
            refused: self.stats.refused(),
        }
    }

    pub async fn run(mut self) {
        let mut channel_open = true;
        loop {
            if !channel_open && self.finish.is_none() {
                // The handle was dropped without finish(): nothing to report to.
                self.finish_deadline
                    .get_or_insert(Instant::now() + self.cfg.finish_timeout);
            }
            // Best first; when connected to a lower one, only better ones
            // are tried by the probe inside `serve`.
            let mut connected = None;
            let n = self.cfg.collectors.len();
            let order: Vec<usize> = (0..n)
                .filter(|i| !self.suspect(*i))
                .chain((0..n).filter(|i| self.suspect(*i)))
                .filter(|i| self.usable(*i))
                .collect();
            for idx in order {
                match self.connect(idx).await {
                    Ok(conn) => {
                        connected = Some((idx, conn));
                        break;
                    }
                    Err(ConnectError::Failed(e)) => {
                        self.mark_suspect(idx);
                        tracing::debug!(collector = %self.cfg.collectors[idx], error = %e, "collector not answering")
                    }
                    Err(ConnectError::Refused(why)) => {
                        tracing::error!(collector = %self.cfg.collectors[idx], error = %why, "collector refused the templates; not tried again");
                        self.refused[idx] = Some(why);
                        if let Some(all) = self.all_refused() {
                            if let Ok(mut r) = self.stats.refused.lock() {
                                *r = Some(all);
                            }
                        }
                    }
                }
            }
            match connected {
                Some((idx, conn)) => {
                    if self.current.is_some_and(|c| c != idx) {
                        self.stats.failovers.fetch_add(1, Ordering::Relaxed);
                    }
                    self.current = Some(idx);
                    self.stats.collector.store(idx, Ordering::Relaxed);
                    tracing::info!(collector = %self.cfg.collectors[idx], priority = idx, "exporting");
                    let ended = self.serve(idx, conn, &mut channel_open).await;
                    match ended {
                        Ended::Finished => break,
                        Ended::GaveUp => {
                            tracing::warn!(collector = %self.cfg.collectors[idx], "finish timeout: unacknowledged messages left in the spool");
                            break;
                        }
                        Ended::AckTimeout(why) => {
                            self.stats.ack_timeouts.fetch_add(1, Ordering::Relaxed);
                            self.mark_suspect(idx);
                            if let Some(u) = self.unacking_until.get_mut(idx) {
                                *u = Some(Instant::now() + self.cfg.ack_timeout);
                            }
                            tracing::warn!(collector = %self.cfg.collectors[idx], error = %why, "collector does not acknowledge; failing over");
                        }
                        Ended::FailBack(better) => {
                            tracing::info!(from = %self.cfg.collectors[idx], to = %self.cfg.collectors[better], "failing back to a better collector");
                        }
                        Ended::Failed(why) => {
                            self.mark_suspect(idx);
                            tracing::warn!(collector = %self.cfg.collectors[idx], error = %why, "collector lost; failing over");
                        }
                    }
                }
                None => {
                    if self.current.take().is_some() {
                        tracing::warn!("no collector answers; spooling");
                    }
                    self.stats.collector.store(usize::MAX, Ordering::Relaxed);
                    // Everything not in `retry` goes to the spool, in order.
                    while let Some(m) = self.queue.pop_front() {
                        self.spool_or_drop(m);
                    }
                    // Finishing with every collector refusing: waiting cannot help.
                    if self.finish_deadline.is_some_and(|d| Instant::now() >= d)
                        || (self.finish.is_some() && self.all_refused().is_some())
                    {
                        break;
                    }
                    let wait = tokio::time::sleep(self.cfg.retry_interval);
                    tokio::pin!(wait);
                    loop {
                        tokio::select! {
                            _ = &mut wait => break,
                            cmd = self.rx.recv(), if channel_open => match cmd {
                                Some(c) => self.handle_cmd(c, false),
                                None => channel_open = false,
                            },
                        }
                    }
                }
            }
        }
        // Whatever no collector took stays on disk (or in the memory spool),
        // counted as spooled or dropped.
        while let Some(m) = self.retry.pop_front() {
            self.spool_or_drop(m);
        }
        while let Some(m) = self.queue.pop_front() {
            self.spool_or_drop(m);
        }
        let report = self.report();
        if let Some(reply) = self.finish.take() {
            let _ = reply.send(report);
        }
    }

    fn next_to_send(&mut self) -> Option<Msg> {
        if let Some(m) = self.retry.pop_front() {
            return Some(m);
        }
        if !self.spool.is_empty() {
            match self.spool.pop() {
                Ok(Some(m)) => return Some(m),
                Ok(None) => {}
                Err(e) => {
                    // The spool's remaining count is lost with the file.
                    tracing::error!(error = %e, "spool unreadable; its messages are lost");
                    let lost = self.spool.len() as u64;
                    self.stats
                        .dropped_messages
                        .fetch_add(lost, Ordering::Relaxed);
                }
            }
        }
        self.queue.pop_front()
    }
}
