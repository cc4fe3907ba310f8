//! IPFIX export (RFC 7011) to any standard collector: `ipfix://HOST:PORT`
//! over UDP, `ipfix+tcp://HOST:PORT` over TCP, options as a query
//! (`?domain=7&max_message=1392&refresh_s=60&refresh_messages=1000`).
//!
//! The templates and elements are listed in `docs/protocol.md` (IPFIX
//! export). Unlike `crane://`, IPFIX has no acknowledgements: over UDP what
//! the network loses is lost; over TCP records queue in memory while no
//! connection is up and are re-sent on the next one (see [`tcp`]).

pub mod encode;
pub mod tcp;
pub mod udp;

pub use encode::{Encoder, IpfixError, Shape};

use std::time::Duration;

/// Transport of an IPFIX target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// An IPFIX export target and its options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpfixConfig {
    pub transport: Transport,
    /// `HOST:PORT` of the collector.
    pub collector: String,
    /// Observation domain id in every message header (default 0).
    pub domain: u32,
    /// Longest message in bytes. Over UDP each message is one datagram:
    /// the default 1392 makes 1400 bytes of IP payload with the UDP header
    /// (1448 on the wire over IPv6), inside any usual path MTU. Over TCP
    /// the default is 65535.
    pub max_message: usize,
    /// UDP: templates are sent again this often (default 60 s) …
    pub refresh: Duration,
    /// … and after this many messages (default 1000), whichever comes
    /// first; 0 turns either off.
    pub refresh_messages: u64,
    /// Pad every set to a multiple of 4 bytes (default off).
    pub pad: bool,
    /// TCP: records held in memory while no connection is up; beyond it
    /// the oldest are dropped and counted (default 1 000 000).
    pub queue_records: usize,
    /// TCP: how long the end of a run waits to deliver what is queued
    /// (default 5 s).
    pub linger: Duration,
    /// TCP: connect timeout (default 1 s); reconnects back off from 100 ms
    /// doubling to 5 s.
    pub connect_timeout: Duration,
}

/// Default message length over UDP: 1400 bytes of IP payload.
pub const DEFAULT_UDP_MESSAGE: usize = 1392;

impl IpfixConfig {
    /// Defaults for `collector` over `transport`.
    pub fn new(transport: Transport, collector: String) -> IpfixConfig {
        IpfixConfig {
            transport,
            collector,
            domain: 0,
            max_message: match transport {
                Transport::Udp => DEFAULT_UDP_MESSAGE,
                Transport::Tcp => encode::MAX_MESSAGE_LEN,
            },
            refresh: Duration::from_secs(60),
            refresh_messages: 1000,
            pad: false,
            queue_records: 1_000_000,
            linger: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
        }
    }

    /// Parses `ipfix://HOST:PORT[?opt=v&…]` or `ipfix+tcp://…`. Options:
    /// `domain`, `max_message`, `refresh_s`, `refresh_messages`, `pad`
    /// (0/1), `queue_records`, `linger_ms`, `connect_timeout_ms`.
    pub fn from_url(url: &str) -> Result<IpfixConfig, String> {
        let (transport, rest) = if let Some(r) = url.strip_prefix("ipfix://") {
            (Transport::Udp, r)
        } else if let Some(r) = url.strip_prefix("ipfix+tcp://") {
            (Transport::Tcp, r)
        } else {
            return Err("not an ipfix:// or ipfix+tcp:// URL".into());
        };
        let (addr, query) = rest.split_once('?').unwrap_or((rest, ""));
        let valid = addr.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !valid {
            return Err(format!("{addr:?} is not HOST:PORT"));
        }
        let mut cfg = IpfixConfig::new(transport, addr.to_owned());
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("option {pair:?} is not KEY=VALUE"))?;
            let num = |max: u64| -> Result<u64, String> {
                v.parse::<u64>()
                    .ok()
                    .filter(|n| *n <= max)
                    .ok_or_else(|| format!("option {k}: {v:?} is not a number up to {max}"))
            };
            match k {
                "domain" => cfg.domain = num(u64::from(u32::MAX))? as u32,
                "max_message" => {
                    let n = num(encode::MAX_MESSAGE_LEN as u64)? as usize;
                    if n < encode::MIN_MESSAGE_LEN {
                        return Err(format!(
                            "option max_message: at least {}",
                            encode::MIN_MESSAGE_LEN
                        ));
                    }
                    cfg.max_message = n;
                }
                "refresh_s" => cfg.refresh = Duration::from_secs(num(86_400)?),
                "refresh_messages" => cfg.refresh_messages = num(u64::from(u32::MAX))?,
                "pad" => cfg.pad = num(1)? == 1,
                "queue_records" => cfg.queue_records = num(100_000_000)?.max(1) as usize,
                "linger_ms" => cfg.linger = Duration::from_millis(num(3_600_000)?),
                "connect_timeout_ms" => {
                    cfg.connect_timeout = Duration::from_millis(num(600_000)?.max(1))
                }
                _ => return Err(format!("unknown option {k:?}")),
            }
        }
        Ok(cfg)
    }
}

/// Seconds since the epoch for a message header (0 before 1970, saturating
/// in 2106).
pub fn export_time() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs().min(u64::from(u32::MAX)) as u32)
        .unwrap_or(0)
}

/// What became of the records of an IPFIX export.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpfixReport {
    /// Records handed to the exporter.
    pub records: u64,
    /// Records in messages the kernel accepted.
    pub sent_records: u64,
    pub messages: u64,
    /// Records lost: UDP send errors, TCP queue overflow.
    pub dropped_records: u64,
    /// TCP: records still queued when the run ended (never sent).
    pub unsent_records: u64,
    /// TCP: connections made.
    pub connections: u64,
    /// Records whose strings were cut to fit a message.
    pub cut_records: u64,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn urls_and_options_parse() {
        let c = IpfixConfig::from_url("ipfix://127.0.0.1:4739").unwrap();
        assert_eq!(c.transport, Transport::Udp);
        assert_eq!(c.collector, "127.0.0.1:4739");
        assert_eq!(c.max_message, 1392);
        let c = IpfixConfig::from_url(
            "ipfix+tcp://[::1]:4739?domain=7&max_message=9000&refresh_s=5&refresh_messages=0&pad=1&linger_ms=10",
        )
        .unwrap();
        assert_eq!(c.transport, Transport::Tcp);
        assert_eq!(c.collector, "[::1]:4739");
        assert_eq!(
            (
                c.domain,
                c.max_message,
                c.refresh,
                c.refresh_messages,
                c.pad
            ),
            (7, 9000, Duration::from_secs(5), 0, true)
        );
        assert_eq!(c.linger, Duration::from_millis(10));
        for bad in [
            "ipfix://",
            "ipfix://h",
            "ipfix://h:0",
            "udp://h:1",
            "ipfix://h:1?max_message=100",
            "ipfix://h:1?domain=x",
            "ipfix://h:1?bogus=1",
            "ipfix://h:1?domain",
        ] {
            assert!(IpfixConfig::from_url(bad).is_err(), "{bad}");
        }
    }
}
