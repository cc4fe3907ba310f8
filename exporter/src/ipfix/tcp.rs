//! IPFIX over TCP (RFC 7011 §10.4): a sender thread keeps one connection
//! to the collector; each connection is a new transport session, so its
//! encoder starts afresh (templates sent before their first record on that
//! connection, sequence numbers from 0).
//!
//! Records wait in a bounded in-memory queue while no connection is up;
//! reconnects back off from 100 ms doubling to 5 s. When a write fails,
//! the records of the messages not completely written are sent again on
//! the next connection; records of messages the kernel had accepted before
//! the connection broke may be lost (IPFIX over TCP has no acknowledgement)
//! — at most a socket send buffer's worth. When the queue is full the
//! oldest records are dropped and counted. At the end of a run the thread
//! has `linger` to deliver what is queued; what is left is reported as
//! unsent, and the connection is closed with a FIN.

use super::{export_time, Encoder, IpfixConfig, IpfixReport};
use qosloop_schema::FlowRecord;
use std::collections::VecDeque;
use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Records handed to the sender thread at a time.
const BATCH: usize = 512;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A write that makes no progress this long breaks the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

enum Cmd {
    Records(Vec<FlowRecord>),
    Finish,
}

/// An IPFIX exporter over TCP.
#[derive(Debug)]
pub struct TcpExporter {
    tx: Option<SyncSender<Cmd>>,
    batch: Vec<FlowRecord>,
    thread: Option<JoinHandle<IpfixReport>>,
    records: u64,
}

impl TcpExporter {
    /// Starts the sender thread; it connects in the background.
    pub fn start(cfg: &IpfixConfig) -> Result<TcpExporter, String> {
        // Checked here so a bad length is a configuration error.
        Encoder::new(cfg.domain, cfg.max_message, cfg.pad).map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::sync_channel(64);
        let cfg = cfg.clone();
        let thread = std::thread::Builder::new()
            .name("qosloop-ipfix-tcp".into())
            .spawn(move || Sender::new(cfg).run(rx))
            .map_err(|e| format!("starting the IPFIX/TCP sender: {e}"))?;
        Ok(TcpExporter {
            tx: Some(tx),
            batch: Vec::with_capacity(BATCH),
            thread: Some(thread),
            records: 0,
        })
    }

    /// Queues `rec`; blocks while the sender thread is behind by more than
    /// 64 batches (it never blocks on the network for longer than a write
    /// timeout, so a dead collector makes records queue, then drop).
    pub fn push(&mut self, rec: &FlowRecord) -> Result<(), String> {
        self.records += 1;
        self.batch.push(rec.clone());
        if self.batch.len() >= BATCH {
            self.hand_off()?;
        }
        Ok(())
    }

    /// Hands the partial batch to the sender thread.
    pub fn flush(&mut self) -> Result<(), String> {
        if !self.batch.is_empty() {
            self.hand_off()?;
        }
        Ok(())
    }

    fn hand_off(&mut self) -> Result<(), String> {
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH));
        self.tx
            .as_ref()
            .ok_or("IPFIX/TCP exporter finished")?
            .send(Cmd::Records(batch))
            .map_err(|_| "IPFIX/TCP sender thread has stopped".to_owned())
    }

    /// Delivers what is queued (within `linger`), closes and reports.
    pub fn finish(mut self) -> Result<IpfixReport, String> {
        self.flush()?;
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Cmd::Finish);
        }
        let thread = self.thread.take().ok_or("IPFIX/TCP exporter finished")?;
        let mut report = thread
            .join()
            .map_err(|_| "IPFIX/TCP sender thread panicked".to_owned())?;
        report.records = self.records;
        Ok(report)
    }
}

struct Sender {
    cfg: IpfixConfig,
    queue: VecDeque<Vec<FlowRecord>>,
    queued: usize,
    conn: Option<(TcpStream, Encoder)>,
    next_try: Instant,
    backoff: Duration,
    report: IpfixReport,
}

impl Sender {
    fn new(cfg: IpfixConfig) -> Sender {
        Sender {
            cfg,
            queue: VecDeque::new(),
            queued: 0,
            conn: None,
            next_try: Instant::now(),
            backoff: BACKOFF_MIN,
            report: IpfixReport::default(),
        }
    }

    fn run(mut self, rx: Receiver<Cmd>) -> IpfixReport {
        let mut finishing: Option<Instant> = None;
        loop {
            // Take what the meter sent without waiting while there is work.
            let wait = if self.queue.is_empty() {
                Duration::from_millis(200)
            } else if self.conn.is_some() {
                Duration::ZERO
            } else {
                self.next_try.saturating_duration_since(Instant::now())
            };
            if finishing.is_none() {
                match rx.recv_timeout(wait) {
                    Ok(Cmd::Records(b)) => self.enqueue(b),
                    Ok(Cmd::Finish) | Err(RecvTimeoutError::Disconnected) => {
                        finishing = Some(Instant::now() + self.cfg.linger);
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                }
            } else if self.conn.is_none() && !self.queue.is_empty() {
                std::thread::sleep(wait.min(Duration::from_millis(50)));
            }
            if let Some(deadline) = finishing {
                if self.queue.is_empty() || Instant::now() >= deadline {
                    break;
                }
            }
            if self.queue.is_empty() {
                continue;
            }
            if self.conn.is_none() && Instant::now() >= self.next_try {
                self.connect();
            }
            if self.conn.is_some() {
                self.send_front();
            }
        }
        self.report.unsent_records = self.queued as u64;
        if let Some((mut stream, _)) = self.conn.take() {
            let _ = stream.flush();
            let _ = stream.shutdown(Shutdown::Write);
            // Give the collector a moment to read to the FIN before the
            // socket closes (a close with unread data would reset).
            let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
            let mut sink = [0u8; 256];
            while let Ok(n) = std::io::Read::read(&mut stream, &mut sink) {
                if n == 0 {
                    break;
                }
            }
        }
        self.report
    }

    fn enqueue(&mut self, batch: Vec<FlowRecord>) {
        self.queued += batch.len();
        self.queue.push_back(batch);
        while self.queued > self.cfg.queue_records {
            let Some(old) = self.queue.pop_front() else {
                break;
            };
            self.queued -= old.len();
            self.report.dropped_records += old.len() as u64;
        }
    }

    fn connect(&mut self) {
        let addr: Option<SocketAddr> = self
            .cfg
            .collector
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next());
        let result = match addr {
            Some(a) => {
                TcpStream::connect_timeout(&a, self.cfg.connect_timeout).map_err(|e| e.to_string())
            }
            None => Err("does not resolve".into()),
        };
        match result.and_then(|s| {
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            s.set_write_timeout(Some(WRITE_TIMEOUT))
                .map_err(|e| e.to_string())?;
            let enc = Encoder::new(self.cfg.domain, self.cfg.max_message, self.cfg.pad)
                .map_err(|e| e.to_string())?;
            Ok((s, enc))
        }) {
            Ok(conn) => {
                tracing::info!(collector = %self.cfg.collector, "IPFIX/TCP connected");
                self.report.connections += 1;
                self.conn = Some(conn);
                self.backoff = BACKOFF_MIN;
            }
            Err(e) => {
                tracing::warn!(collector = %self.cfg.collector, error = %e, retry_ms = self.backoff.as_millis() as u64, "IPFIX/TCP connect failed");
                self.next_try = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
            }
        }
    }

    /// Encodes and writes the oldest batch; on a write error drops the
    /// connection and keeps the records not completely written.
    fn send_front(&mut self) {
        let (Some(batch), Some((stream, enc))) = (self.queue.front_mut(), self.conn.as_mut())
        else {
            return;
        };
        let now = export_time();
        // Messages with how many of the batch's records each completes.
        let mut msgs: Vec<(Vec<u8>, usize)> = Vec::new();
        let mut in_msg = 0usize;
        for r in batch.iter() {
            if let Some(m) = enc.push(r, now) {
                msgs.push((m, in_msg));
                in_msg = 0;
            }
            in_msg += 1;
        }
        if let Some(m) = enc.finish(now) {
            msgs.push((m, in_msg));
        }
        self.report.cut_records += std::mem::take(&mut enc.cut_records);
        let mut done = 0usize;
        for (m, n) in &msgs {
            if let Err(e) = stream.write_all(m) {
                tracing::warn!(collector = %self.cfg.collector, error = %e, "IPFIX/TCP write failed; reconnecting");
                batch.drain(..done);
                self.queued -= done;
                self.report.sent_records += done as u64;
                self.conn = None;
                self.next_try = Instant::now() + self.backoff;
                return;
            }
            self.report.messages += 1;
            done += n;
        }
        self.queued -= batch.len();
        self.report.sent_records += batch.len() as u64;
        self.queue.pop_front();
    }
}
