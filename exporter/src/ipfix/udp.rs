//! IPFIX over UDP (RFC 7011 §10.3): one message per datagram, templates
//! sent before their first record and again on every refresh (by time and
//! by message count), sequence numbers counting data records.
//!
//! Blocking and synchronous: the caller's thread encodes and sends. A
//! datagram the kernel refuses is counted with its records as dropped;
//! nothing is retried (UDP export has no acknowledgement).

use super::{export_time, Encoder, IpfixConfig, IpfixReport};
use qosloop_schema::FlowRecord;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::Instant;

/// An IPFIX exporter over UDP.
#[derive(Debug)]
pub struct UdpExporter {
    socket: UdpSocket,
    peer: SocketAddr,
    enc: Encoder,
    cfg: IpfixConfig,
    last_refresh: Instant,
    messages_since_refresh: u64,
    report: IpfixReport,
    /// Records in the message being built.
    pending: u64,
}

impl UdpExporter {
    /// Resolves the collector and binds a socket of its family.
    pub fn connect(cfg: &IpfixConfig) -> Result<UdpExporter, String> {
        let peer = cfg
            .collector
            .to_socket_addrs()
            .map_err(|e| format!("resolving {}: {e}", cfg.collector))?
            .next()
            .ok_or_else(|| format!("{} resolves to no address", cfg.collector))?;
        let bind: SocketAddr = if peer.is_ipv6() {
            "[::]:0".parse().map_err(|e| format!("{e}"))?
        } else {
            "0.0.0.0:0".parse().map_err(|e| format!("{e}"))?
        };
        let socket = UdpSocket::bind(bind).map_err(|e| format!("binding a UDP socket: {e}"))?;
        let enc = Encoder::new(cfg.domain, cfg.max_message, cfg.pad).map_err(|e| e.to_string())?;
        Ok(UdpExporter {
            socket,
            peer,
            enc,
            cfg: cfg.clone(),
            last_refresh: Instant::now(),
            messages_since_refresh: 0,
            report: IpfixReport::default(),
            pending: 0,
        })
    }

    /// The local address datagrams leave from.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.socket.local_addr().ok()
    }

    /// Encodes `rec`; sends the message it completes, if any.
    pub fn push(&mut self, rec: &FlowRecord) {
        self.report.records += 1;
        let now = export_time();
        if self.refresh_due() {
            self.refresh(now);
        }
        if let Some(msg) = self.enc.push(rec, now) {
            // The record that did not fit opened the next message.
            let records = std::mem::replace(&mut self.pending, 1);
            self.send(&msg, records);
        } else {
            self.pending += 1;
        }
    }

    /// Sends the message being built (at quiet moments and at the end).
    pub fn flush(&mut self) {
        let now = export_time();
        if self.refresh_due() {
            self.refresh(now);
        }
        if let Some(msg) = self.enc.finish(now) {
            let records = std::mem::take(&mut self.pending);
            self.send(&msg, records);
        }
    }

    /// Flushes and reports.
    pub fn finish(mut self) -> IpfixReport {
        self.flush();
        self.report.cut_records = self.enc.cut_records;
        self.report
    }

    /// Counters so far.
    pub fn report(&self) -> &IpfixReport {
        &self.report
    }

    fn refresh_due(&self) -> bool {
        (!self.cfg.refresh.is_zero() && self.last_refresh.elapsed() >= self.cfg.refresh)
            || (self.cfg.refresh_messages > 0
                && self.messages_since_refresh >= self.cfg.refresh_messages)
    }

    /// Template refresh: the message being built goes out, then the
    /// templates of every shape used so far start the next one.
    fn refresh(&mut self, now: u32) {
        if let Some(msg) = self.enc.finish(now) {
            let records = std::mem::take(&mut self.pending);
            self.send(&msg, records);
        }
        self.enc.forget_templates();
        for msg in self.enc.announce_used(now) {
            self.send(&msg, 0);
        }
        self.last_refresh = Instant::now();
        self.messages_since_refresh = 0;
    }

    fn send(&mut self, msg: &[u8], records: u64) {
        self.messages_since_refresh += 1;
        match self.socket.send_to(msg, self.peer) {
            Ok(_) => {
                self.report.messages += 1;
                self.report.sent_records += records;
            }
            Err(e) => {
                self.report.dropped_records += records;
                tracing::debug!(peer = %self.peer, error = %e, "IPFIX datagram not sent");
            }
        }
    }
}
