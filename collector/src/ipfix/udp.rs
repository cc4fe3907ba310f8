//! The UDP receiver: one socket and one thread per `ipfix_udp_threads`,
//! bound with SO_REUSEPORT so that the kernel keeps each exporter (address
//! and port) on one socket, hence one decoder. Datagrams come in batches
//! (recvmmsg); the receive buffer is as large as configured (forced past
//! `rmem_max` when the process may); the kernel's own count of datagrams it
//! dropped on the full queue (SO_RXQ_OVFL) rides on each datagram and is
//! reported.

use super::decoder::Decoder;
use super::output::{Output, Restorable};
use super::settings::IngestSettings;
use super::sink::EncodedRecords;
use super::sql::ListenerStats;
use super::stats::DropReason;
use crate::store::{Sink, WriteReq};
use nix::sys::socket::{
    self, setsockopt, sockopt, AddressFamily, ControlMessageOwned, MsgFlags, MultiHeaders,
    SockFlag, SockType, SockaddrStorage,
};
use qosloop_store::now_ns;
use std::io::IoSliceMut;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// One datagram of a batch: source, length, the kernel's drop counter.
type Received = (Option<SocketAddr>, usize, Option<u32>);

/// Largest datagram read (IPFIX and v9 lengths are 16-bit).
const MAX_DATAGRAM: usize = 65_535;

/// Opens one UDP socket on `addr` with SO_REUSEPORT, SO_RXQ_OVFL and a
/// receive buffer of `rcvbuf` bytes; returns it and the buffer the kernel
/// granted.
pub fn open_socket(addr: SocketAddr, rcvbuf: usize) -> std::io::Result<(UdpSocket, usize)> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket::socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    setsockopt(&fd, sockopt::RxqOvfl, &1)?;
    // Past net.core.rmem_max only with CAP_NET_ADMIN; otherwise the kernel
    // caps the plain request, and the granted size is reported.
    if setsockopt(&fd, sockopt::RcvBufForce, &rcvbuf).is_err() {
        setsockopt(&fd, sockopt::RcvBuf, &rcvbuf)?;
    }
    let granted = socket::getsockopt(&fd, sockopt::RcvBuf)?;
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    let udp = UdpSocket::from(fd);
    udp.set_read_timeout(Some(Duration::from_millis(50)))?;
    Ok((udp, granted))
}

/// Counters of one listener shared by its threads.
#[derive(Debug, Default)]
pub struct SharedListenerStats {
    pub datagrams: AtomicU64,
    pub bytes: AtomicU64,
    pub kernel_drops: Vec<AtomicU64>,
    pub rcvbuf: AtomicU64,
    pub not_allowed: AtomicU64,
    pub too_many_exporters: AtomicU64,
}

impl SharedListenerStats {
    pub fn new(threads: usize) -> SharedListenerStats {
        SharedListenerStats {
            kernel_drops: (0..threads).map(|_| AtomicU64::new(0)).collect(),
            ..SharedListenerStats::default()
        }
    }

    pub fn snapshot(&self) -> ListenerStats {
        ListenerStats {
            datagrams: self.datagrams.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            kernel_drops: self
                .kernel_drops
                .iter()
                .map(|k| k.load(Ordering::Relaxed))
                .sum(),
            rcvbuf: self.rcvbuf.load(Ordering::Relaxed),
            not_allowed: self.not_allowed.load(Ordering::Relaxed),
            too_many_exporters: self.too_many_exporters.load(Ordering::Relaxed),
        }
    }
}

/// One receiving thread's job.
#[derive(Debug)]
pub struct UdpWorker {
    pub socket: UdpSocket,
    pub index: usize,
    pub listen: String,
    pub settings: IngestSettings,
    pub sink: Sink,
    pub writer: mpsc::Sender<WriteReq>,
    pub stats: Arc<SharedListenerStats>,
    pub stop: Arc<AtomicBool>,
    pub runtime: tokio::runtime::Handle,
    /// Records go here, not to the writer (`ipfix_journal_dir`).
    pub journal: Option<Arc<crate::journal::Journal>>,
}

impl UdpWorker {
    /// Receives and decodes until `stop` is set; then flushes what it holds.
    pub fn run(self) {
        let s = &self.settings;
        // The listener's budgets are shared by its threads.
        let mut decoder = Decoder::new(s.limits.share(s.udp_threads));
        let mut output = Output::new(
            self.sink.clone(),
            self.writer.clone(),
            false,
            s.flush_records,
            s.limits.max_exporters.saturating_mul(2),
        );
        if let Some(j) = &self.journal {
            output.set_journal(j.clone());
        }
        // Not `ipfix/udp/…`: no template is ever loaded for it.
        output.set_unattributed_name(format!(
            "ipfix/unattributed/udp/{}/{}",
            self.listen, self.index
        ));
        let mut restorable = Restorable::default();
        if let Some(db) = output.db().cloned() {
            // Best effort: a node started while the database is
            // unreachable receives (into the journal) at once rather than
            // waiting for the pool's timeout.
            let loaded = self.runtime.block_on(async {
                if let Err(e) = db.probe().await {
                    return Err(sqlx::Error::Protocol(format!("database unreachable: {e}")));
                }
                Restorable::load(&db, &decoder).await
            });
            match loaded {
                Ok(r) => {
                    tracing::info!(listen = %self.listen, thread = self.index, templates = r.len(),
                        "persisted templates loaded (installed when their exporter is heard from)");
                    restorable = r;
                }
                Err(e) => {
                    tracing::warn!(listen = %self.listen, error = %e, "persisted templates not loaded")
                }
            }
        }
        let batch = s.batch;
        let mut buffers = vec![vec![0u8; MAX_DATAGRAM]; batch];
        let mut records = Vec::new();
        // With a journal, records go from the datagram straight into the
        // frame encoding: no vector of `FlowRecord`s on this path.
        let mut encoded = EncodedRecords::default();
        let direct = self.journal.is_some();
        let mut last_flush = Instant::now();
        let mut last_stats = Instant::now();
        let mut last_sweep = Instant::now();
        let started = Instant::now();
        let fd = self.socket.as_raw_fd();
        let mut reported_drops = 0u64;
        let mut writing = None;
        while !self.stop.load(Ordering::Relaxed) {
            let received: Result<Vec<Received>, _> = {
                // Fresh headers for every call: the kernel shrinks each
                // header's control length to what it used, and nix 0.29
                // does not restore it, so reused headers would truncate the
                // drop counter of every later datagram (MSG_CTRUNC).
                let mut headers: MultiHeaders<SockaddrStorage> =
                    MultiHeaders::preallocate(batch, Some(nix::cmsg_space!(u32)));
                let mut slices: Vec<[IoSliceMut<'_>; 1]> = buffers
                    .iter_mut()
                    .map(|b| [IoSliceMut::new(&mut b[..])])
                    .collect();
                socket::recvmmsg(
                    fd,
                    &mut headers,
                    slices.iter_mut(),
                    MsgFlags::MSG_WAITFORONE,
                    None,
                )
                .map(|msgs| {
                    msgs.map(|m| {
                        let overflow = m.cmsgs().ok().and_then(|mut c| {
                            c.find_map(|c| match c {
                                ControlMessageOwned::RxqOvfl(n) => Some(n),
                                _ => None,
                            })
                        });
                        (m.address.as_ref().and_then(sockaddr_of), m.bytes, overflow)
                    })
                    .collect()
                })
            };
            let now = u64::try_from(now_ns()).unwrap_or(0);
            match received {
                Ok(got) => {
                    if got.len() == batch {
                        // More was waiting than one call takes: the
                        // journal's loader stands aside for a while.
                        if let Some(j) = &self.journal {
                            j.note_busy();
                        }
                    }
                    if let Some(n) = got.iter().rev().find_map(|g| g.2) {
                        self.stats.kernel_drops[self.index].store(u64::from(n), Ordering::Relaxed);
                    }
                    for (i, (from, len, _)) in got.into_iter().enumerate() {
                        self.stats.datagrams.fetch_add(1, Ordering::Relaxed);
                        self.stats.bytes.fetch_add(len as u64, Ordering::Relaxed);
                        let Some(from) = from else { continue };
                        restorable.install(from, &mut decoder);
                        let datagram = &buffers[i][..len];
                        let decoded = if direct {
                            decoder
                                .decode_udp(from, datagram, now, &mut encoded)
                                .map(|msg| {
                                    output.add_encoded(from, msg.domain, msg.sequence, &mut encoded)
                                })
                        } else {
                            decoder
                                .decode_udp(from, datagram, now, &mut records)
                                .map(|msg| output.add(from, msg.domain, msg.sequence, &mut records))
                        };
                        match decoded {
                            Ok(due) => {
                                // Checked after every datagram, not every
                                // batch: one datagram can carry thousands
                                // of records.
                                if due {
                                    last_flush = Instant::now();
                                    self.flush(&mut output, &mut decoder);
                                }
                            }
                            Err(DropReason::NotAllowed) => {
                                self.stats.not_allowed.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(DropReason::TooManyExporters) => {
                                self.stats
                                    .too_many_exporters
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                            Err(reason) => {
                                tracing::debug!(exporter = %from, %reason, "datagram dropped");
                            }
                        }
                        records.clear();
                        encoded.clear();
                    }
                }
                Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    tracing::error!(listen = %self.listen, error = %e, "receiving failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            if last_flush.elapsed() >= s.flush {
                last_flush = Instant::now();
                self.flush(&mut output, &mut decoder);
            }
            if last_sweep.elapsed() >= Duration::from_secs(1) {
                last_sweep = Instant::now();
                if started.elapsed().as_nanos() > u128::from(s.limits.template_expiry_ns) {
                    // Every stored template has expired by now.
                    restorable.clear();
                }
                decoder.sweep(now);
            }
            if last_stats.elapsed() >= s.stats_interval {
                last_stats = Instant::now();
                self.report(
                    &mut output,
                    &decoder,
                    &mut reported_drops,
                    &mut writing,
                    false,
                );
            }
        }
        let r = self.runtime.block_on(async {
            output.persist_templates(&mut decoder).await?;
            output.flush().await?;
            output.drain().await;
            Ok::<_, sqlx::Error>(())
        });
        if let Err(e) = r {
            tracing::error!(listen = %self.listen, error = %e, "storing IPFIX state failed");
        }
        self.report(
            &mut output,
            &decoder,
            &mut reported_drops,
            &mut writing,
            true,
        );
    }

    fn flush(&self, output: &mut Output, decoder: &mut Decoder) {
        let journal = self.journal.is_some();
        let r = self.runtime.block_on(async {
            if journal {
                // Records first, to the journal: never behind SQL. Template
                // changes are written if the database answers at once;
                // while it is away they are not persisted (exporters over
                // UDP send them again).
                output.flush().await?;
                let persist = output.persist_templates(decoder);
                return match tokio::time::timeout(Duration::from_millis(250), persist).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!(listen = %self.listen, "storage slow: template changes not persisted this time");
                        Ok(())
                    }
                };
            }
            output.persist_templates(decoder).await?;
            output.flush().await
        });
        if let Err(e) = r {
            tracing::error!(listen = %self.listen, error = %e, "storing IPFIX state failed");
        }
    }

    /// Writes the counters that changed. The writing runs as a task of the
    /// runtime, not on this thread (which must keep reading the socket);
    /// while the previous write is still running, this round is skipped
    /// (the next writes absolute values). At shutdown (`last`) it waits.
    fn report(
        &self,
        output: &mut Output,
        decoder: &Decoder,
        reported_drops: &mut u64,
        writing: &mut Option<tokio::task::JoinHandle<()>>,
        last: bool,
    ) {
        let listener = self.stats.snapshot();
        if listener.kernel_drops != *reported_drops {
            tracing::warn!(listen = %self.listen, kernel_drops = listener.kernel_drops,
                rcvbuf = listener.rcvbuf, "the kernel dropped datagrams on a full receive queue");
            *reported_drops = listener.kernel_drops;
        }
        if last {
            if let Some(t) = writing.take() {
                let _ = self.runtime.block_on(t);
            }
        } else if writing.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let Some(db) = output.db().cloned() else {
            return;
        };
        // Exporter rows of new exporters are registered here (once each).
        let rows = match self
            .runtime
            .block_on(output.changed_stats(&decoder.stats()))
        {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(listen = %self.listen, error = %e, "IPFIX counters not stored");
                return;
            }
        };
        let listen = self.listen.clone();
        let task = self.runtime.spawn(async move {
            let r = async {
                super::sql::store_stats(&db, &rows).await?;
                super::sql::store_listener(&db, &listen, &listener).await
            }
            .await;
            if let Err(e) = r {
                tracing::warn!(%listen, error = %e, "IPFIX counters not stored");
            }
        });
        if last {
            let _ = self.runtime.block_on(task);
        } else {
            *writing = Some(task);
        }
    }
}

fn sockaddr_of(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    // A dual-stack socket sees IPv4 exporters as ::ffff:a.b.c.d: they are
    // stored and checked against the allow-list as IPv4.
    a.as_sockaddr_in6().map(|v6| {
        let v6 = std::net::SocketAddrV6::from(*v6);
        SocketAddr::new(std::net::IpAddr::V6(*v6.ip()).to_canonical(), v6.port())
    })
}
