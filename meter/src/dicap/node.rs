//! A capture node: connects to the coordinator, installs each share it is
//! given as the socket filter of every ring (swapped atomically on the
//! live sockets), confirms it with the time of install, and sends a
//! heartbeat every [`HEARTBEAT`]. [`NodeCounters`] counts what the node
//! captured — and what it captured outside every share it ever held, which
//! would be counted twice.
//!
//! A node that loses its coordinator keeps its last share installed and
//! reconnects with backoff ([`BACKOFF_MIN`] doubling to [`BACKOFF_MAX`]),
//! saying in its hello which share it holds, until `stop`. Meanwhile the
//! shares of the nodes do not change: when only the coordinator went away,
//! every bucket stays covered exactly once; a node lost in that time is
//! not replaced until a coordinator is back (its buckets are uncovered).

use super::proto::{read_frame, write_frame, FrameError, ToCoordinator, ToNode, HEARTBEAT};
use super::share::{bucket_of, share_program, ShareMode};
use crate::afpacket::FilterHandle;
use crate::live::{effective_filter, CaptureHook};
use serde::Serialize;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a node keeps trying to reach its coordinator at start.
const CONNECT_FOR: Duration = Duration::from_secs(10);
/// First wait before reconnecting to a lost coordinator.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between reconnection attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// What stops a node's control loop.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("coordinator {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("coordinator {addr} refused node {node:?}: {reason}")]
    Refused {
        addr: SocketAddr,
        node: String,
        reason: String,
    },
    #[error("coordinator {addr}: {source}")]
    Protocol {
        addr: SocketAddr,
        #[source]
        source: FrameError,
    },
}

/// A node's counters, also the [`CaptureHook`] of its capture threads;
/// `analysis_cost` busy-waits per packet to emulate a heavier analysis.
#[derive(Debug)]
pub struct NodeCounters {
    analysis_cost: Duration,
    mode: AtomicU8,
    mask: AtomicU64,
    held: AtomicU64,
    analysed: AtomicU64,
    outside_share: AtomicU64,
    kernel_packets: AtomicU64,
    kernel_drops: AtomicU64,
    consumer_drops: AtomicU64,
    reconnects: AtomicU64,
}

/// [`NodeCounters`] as numbers (the node's stats file).
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct NodeStats {
    /// Frames handed to user space and analysed.
    pub analysed: u64,
    /// Of those, frames outside every share this node held.
    pub outside_share: u64,
    /// Frames the filter accepted (PACKET_STATISTICS tp_packets).
    pub kernel_packets: u64,
    /// Frames dropped because the ring was full (tp_drops).
    pub kernel_drops: u64,
    /// Frames in user space's ring left unanalysed when capture stopped.
    pub consumer_drops: u64,
    /// The current share and every bucket ever held.
    pub mask: u64,
    pub held: u64,
    /// Times the node connected to a coordinator again after losing it.
    #[serde(default)]
    pub reconnects: u64,
}

impl NodeCounters {
    /// Counters with a share of every bucket (a node outside DiCAP).
    pub fn new(analysis_cost: Duration) -> NodeCounters {
        NodeCounters {
            analysis_cost,
            mode: AtomicU8::new(0),
            mask: AtomicU64::new(0),
            held: AtomicU64::new(0),
            analysed: AtomicU64::new(0),
            outside_share: AtomicU64::new(0),
            kernel_packets: AtomicU64::new(0),
            kernel_drops: AtomicU64::new(0),
            consumer_drops: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
        }
    }

    /// A share is installed (or, outside DiCAP, everything).
    pub fn set_share(&self, mode: ShareMode, mask: u64) {
        self.mode
            .store(u8::from(mode == ShareMode::Packet), Ordering::Relaxed);
        self.held.fetch_or(mask, Ordering::Relaxed);
        self.mask.store(mask, Ordering::Relaxed);
    }

    pub fn stats(&self) -> NodeStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NodeStats {
            analysed: get(&self.analysed),
            outside_share: get(&self.outside_share),
            kernel_packets: get(&self.kernel_packets),
            kernel_drops: get(&self.kernel_drops),
            consumer_drops: get(&self.consumer_drops),
            mask: get(&self.mask),
            held: get(&self.held),
            reconnects: get(&self.reconnects),
        }
    }
}

impl CaptureHook for NodeCounters {
    fn packet(&self, frame: &[u8]) {
        self.analysed.fetch_add(1, Ordering::Relaxed);
        let mode = if self.mode.load(Ordering::Relaxed) == 1 {
            ShareMode::Packet
        } else {
            ShareMode::Flow
        };
        if self.held.load(Ordering::Relaxed) >> bucket_of(frame, mode) & 1 == 0 {
            self.outside_share.fetch_add(1, Ordering::Relaxed);
        }
        if !self.analysis_cost.is_zero() {
            let start = Instant::now();
            while start.elapsed() < self.analysis_cost {
                std::hint::spin_loop();
            }
        }
    }
    fn kernel_stats(&self, packets: u64, drops: u64) {
        self.kernel_packets.fetch_add(packets, Ordering::Relaxed);
        self.kernel_drops.fetch_add(drops, Ordering::Relaxed);
    }
    fn discarded(&self, packets: u64) {
        self.consumer_drops.fetch_add(packets, Ordering::Relaxed);
    }
}

/// Where and who a node is.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub coordinator: SocketAddr,
    pub name: String,
    /// Bytes kept per frame (0: the whole frame).
    pub caplen: usize,
    /// The shared secret proving this node to a coordinator that wants one.
    pub secret: Option<super::proto::Secret>,
}

/// The filter a node starts with: nothing until it is given a share.
pub fn reject_all(caplen: usize) -> Vec<crate::BpfInsn> {
    let prog = share_program(ShareMode::Flow, 0, u32::MAX);
    effective_filter(Some(&prog), caplen).unwrap_or(prog)
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Whether a failed session is worth another connection: a lost or
/// unreachable coordinator, or one that still holds this node's old
/// connection or has no room now.
fn retryable(e: &NodeError) -> bool {
    match e {
        NodeError::Connect { .. } | NodeError::Protocol { .. } => true,
        NodeError::Refused { reason, .. } => {
            reason.contains("already connected") || reason.contains("too many connections")
        }
    }
}

fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
    }
}

/// Runs the node's side of the protocol until `stop` is set. At start it
/// tries for [`CONNECT_FOR`]; once it has been connected, a lost
/// coordinator is tried again with backoff for as long as the node runs,
/// its last share staying installed. A refusal that will not change (bad
/// name, not allowed, too many nodes) ends it.
pub fn run_node(
    config: &NodeConfig,
    filters: &[FilterHandle],
    counters: &NodeCounters,
    stop: &AtomicBool,
) -> Result<(), NodeError> {
    let start = Instant::now();
    let mut connected_once = false;
    let mut backoff = BACKOFF_MIN;
    loop {
        let began = Instant::now();
        let result = session(config, filters, counters, stop, &mut connected_once);
        let e = match result {
            Ok(()) => return Ok(()),
            Err(e) if !retryable(&e) => return Err(e),
            Err(e) if !connected_once && start.elapsed() > CONNECT_FOR => return Err(e),
            Err(e) => e,
        };
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        if began.elapsed() > BACKOFF_MAX {
            backoff = BACKOFF_MIN;
        }
        if connected_once {
            tracing::warn!(node = %config.name, error = %e, retry_ms = backoff.as_millis() as u64,
                buckets = counters.stats().mask.count_ones(),
                "dicap coordinator lost: keeping the last share, reconnecting");
        }
        sleep_unless(stop, backoff);
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One connection to the coordinator, until it fails or `stop`.
fn session(
    config: &NodeConfig,
    filters: &[FilterHandle],
    counters: &NodeCounters,
    stop: &AtomicBool,
    connected_once: &mut bool,
) -> Result<(), NodeError> {
    let addr = config.coordinator;
    let proto = |source| NodeError::Protocol { addr, source };
    let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        .map_err(|source| NodeError::Connect { addr, source })?;
    if *connected_once {
        counters.reconnects.fetch_add(1, Ordering::Relaxed);
    }
    *connected_once = true;
    let _ = stream.set_nodelay(true);
    let mut writer = stream
        .try_clone()
        .map_err(|source| NodeError::Connect { addr, source })?;
    write_frame(
        &mut writer,
        &ToCoordinator::Hello {
            node: config.name.clone(),
            mask: Some(counters.stats().mask),
        },
    )
    .map_err(proto)?;
    let (tx, rx) = mpsc::channel();
    let mut reader = stream;
    std::thread::spawn(move || loop {
        let msg = read_frame::<ToNode>(&mut reader);
        let end = msg.is_err();
        if tx.send(msg).is_err() || end {
            return;
        }
    });
    let mut next_beat = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() >= next_beat {
            let beat = ToCoordinator::Heartbeat {
                sent_ns: now_ns(),
                analysed: counters.stats().analysed,
            };
            write_frame(&mut writer, &beat).map_err(proto)?;
            next_beat += HEARTBEAT;
        }
        let wait = next_beat.saturating_duration_since(Instant::now());
        let msg = match rx.recv_timeout(wait.min(Duration::from_millis(50))) {
            Ok(m) => m.map_err(proto)?,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(proto(FrameError::Io(
                    std::io::ErrorKind::UnexpectedEof.into(),
                )))
            }
        };
        match msg {
            ToNode::Refused { reason } => {
                return Err(NodeError::Refused {
                    addr,
                    node: config.name.clone(),
                    reason,
                })
            }
            ToNode::Challenge { nonce } => {
                let (Some(secret), Some(nonce)) = (&config.secret, super::proto::unhex(&nonce))
                else {
                    return Err(NodeError::Refused {
                        addr,
                        node: config.name.clone(),
                        reason: "the coordinator wants a shared secret (--dicap-secret)".into(),
                    });
                };
                let mac = qosloop_runtime::digest::hex(&secret.mac(&nonce, &config.name));
                write_frame(&mut writer, &ToCoordinator::Auth { mac }).map_err(proto)?;
            }
            ToNode::Assign { epoch, mode, mask } => {
                let prog = share_program(mode, mask, u32::MAX);
                let prog = effective_filter(Some(&prog), config.caplen).unwrap_or(prog);
                let installed = filters.iter().try_for_each(|f| f.attach(&prog));
                let reply = match installed {
                    Ok(()) => {
                        counters.set_share(mode, mask);
                        tracing::info!(node = %config.name, epoch, buckets = mask.count_ones(), "dicap share installed");
                        ToCoordinator::Installed {
                            epoch,
                            mask,
                            installed_ns: now_ns(),
                        }
                    }
                    Err(e) => {
                        // Capture nothing rather than an old share that is
                        // now someone else's.
                        let fallback = reject_all(config.caplen);
                        let dropped = filters.iter().try_for_each(|f| f.attach(&fallback));
                        if dropped.is_ok() {
                            counters.set_share(mode, 0);
                        }
                        tracing::error!(node = %config.name, epoch, error = %e, "dicap share not installed");
                        ToCoordinator::InstallFailed {
                            epoch,
                            error: format!("{} buckets: {e}", mask.count_ones()),
                        }
                    }
                };
                write_frame(&mut writer, &reply).map_err(proto)?;
            }
        }
    }
    Ok(())
}
