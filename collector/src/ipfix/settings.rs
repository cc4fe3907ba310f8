//! The IPFIX/NetFlow part of the collector's configuration, checked and
//! turned into listener specs and decoder limits.

use super::decoder::Limits;
use crate::config::{Config, ConfigError};
use qosloop_schema::guard::check_bind;
use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// The transport of one IPFIX listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// IPFIX, NetFlow v9 and v5 datagrams.
    Udp,
    /// IPFIX over TCP.
    Tcp,
    /// IPFIX over TCP with mutual TLS (the collector's `tls_*` files).
    Tls,
}

/// `udp://HOST:PORT`, `tcp://HOST:PORT` or `tls://HOST:PORT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenSpec {
    pub transport: Transport,
    pub addr: SocketAddr,
}

impl ListenSpec {
    pub fn parse(s: &str) -> Result<ListenSpec, String> {
        let (transport, rest) = if let Some(r) = s.strip_prefix("udp://") {
            (Transport::Udp, r)
        } else if let Some(r) = s.strip_prefix("tcp://") {
            (Transport::Tcp, r)
        } else if let Some(r) = s.strip_prefix("tls://") {
            (Transport::Tls, r)
        } else {
            return Err(format!(
                "{s:?}: use udp://HOST:PORT, tcp://HOST:PORT or tls://HOST:PORT"
            ));
        };
        let addr = rest
            .parse()
            .map_err(|_| format!("{s:?}: {rest:?} is not HOST:PORT (an IP address and a port)"))?;
        Ok(ListenSpec { transport, addr })
    }
}

impl fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.transport {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        };
        write!(f, "{scheme}://{}", self.addr)
    }
}

/// Everything the IPFIX listeners need, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngestSettings {
    pub listeners: Vec<ListenSpec>,
    pub limits: Limits,
    pub rcvbuf: usize,
    pub batch: usize,
    pub udp_threads: usize,
    pub flush_records: usize,
    pub flush: Duration,
    pub stats_interval: Duration,
    pub tcp_idle: Duration,
    /// How long a TCP exporter has for its first message after connecting,
    /// and for the rest of any message once its first byte came (a peer
    /// that starts a message and stalls holds a connection slot only this
    /// long, not `tcp_idle`).
    pub tcp_message_timeout: Duration,
}

/// [`IngestSettings::tcp_message_timeout`].
pub const TCP_MESSAGE_TIMEOUT: Duration = Duration::from_secs(15);

/// IPFIX over TCP: connections at once from one address (at most; a lower
/// `max_connections_per_peer` wins). An exporter needs one.
pub const TCP_PER_PEER: usize = 4;

const NS: u64 = 1_000_000_000;

impl IngestSettings {
    /// Reads and checks the `ipfix_*` keys of `c`.
    pub fn from_config(c: &Config) -> Result<IngestSettings, ConfigError> {
        let bad = |field, problem: String| Err(ConfigError::Invalid { field, problem });
        let mut allow = HashSet::new();
        for a in &c.ipfix_allow {
            match a.parse::<IpAddr>() {
                Ok(ip) => {
                    allow.insert(ip);
                }
                Err(_) => return bad("ipfix_allow", format!("{a:?} is not an IP address")),
            }
        }
        let mut listeners = Vec::new();
        for l in &c.ipfix_listen {
            let spec = match ListenSpec::parse(l) {
                Ok(s) => s,
                Err(problem) => return bad("ipfix_listen", problem),
            };
            // Over UDP there is no TLS: beyond loopback, an allow-list or
            // the explicit insecure flag is required.
            let guarded = match spec.transport {
                Transport::Udp => !allow.is_empty(),
                Transport::Tcp => false,
                Transport::Tls => c.mutual_tls(),
            };
            if spec.transport == Transport::Tls && !c.mutual_tls() {
                return bad(
                    "ipfix_listen",
                    format!("{l}: tls:// needs tls_cert, tls_key and tls_client_ca"),
                );
            }
            if let Err(problem) = check_bind(spec.addr, "ipfix", guarded, c.allow_insecure_remote) {
                return bad("ipfix_listen", problem);
            }
            if listeners.contains(&spec) {
                return bad("ipfix_listen", format!("{l} is given twice"));
            }
            listeners.push(spec);
        }
        for (field, v) in [
            ("ipfix_rcvbuf", c.ipfix_rcvbuf),
            ("ipfix_batch", c.ipfix_batch),
            ("ipfix_udp_threads", c.ipfix_udp_threads),
            ("ipfix_pending_sets", c.ipfix_pending_sets),
            ("ipfix_pending_bytes", c.ipfix_pending_bytes),
            ("ipfix_max_exporters", c.ipfix_max_exporters),
            ("ipfix_max_templates", c.ipfix_max_templates),
            ("ipfix_max_fields", c.ipfix_max_fields),
            ("ipfix_flush_records", c.ipfix_flush_records),
        ] {
            if v == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        if c.ipfix_batch > 1024 {
            return bad("ipfix_batch", format!("{} is above 1024", c.ipfix_batch));
        }
        if c.ipfix_udp_threads > 64 {
            return bad(
                "ipfix_udp_threads",
                format!("{} is above 64", c.ipfix_udp_threads),
            );
        }
        if c.ipfix_template_expiry_s < 60 {
            return bad(
                "ipfix_template_expiry_s",
                format!(
                    "{} s is below 60 s (exporters refresh every 60–600 s)",
                    c.ipfix_template_expiry_s
                ),
            );
        }
        for (field, v) in [
            ("ipfix_pending_age_s", c.ipfix_pending_age_s),
            ("ipfix_stats_interval_s", c.ipfix_stats_interval_s),
            ("ipfix_tcp_idle_s", c.ipfix_tcp_idle_s),
            ("ipfix_flush_ms", c.ipfix_flush_ms),
        ] {
            if v == 0 || v > 86_400_000 {
                return bad(field, format!("{v} is outside 1..=86400000"));
            }
        }
        let limits = Limits {
            template_expiry_ns: c.ipfix_template_expiry_s.saturating_mul(NS),
            max_templates: c.ipfix_max_templates,
            max_fields: c.ipfix_max_fields,
            pending_sets: c.ipfix_pending_sets,
            pending_bytes: c.ipfix_pending_bytes,
            pending_total_bytes: c.ipfix_pending_bytes.saturating_mul(16).max(64 << 20),
            pending_age_ns: c.ipfix_pending_age_s.saturating_mul(NS),
            max_exporters: c.ipfix_max_exporters,
            allow: (!allow.is_empty()).then_some(allow),
            ..Limits::default()
        };
        Ok(IngestSettings {
            listeners,
            limits,
            rcvbuf: c.ipfix_rcvbuf,
            batch: c.ipfix_batch,
            udp_threads: c.ipfix_udp_threads,
            flush_records: c.ipfix_flush_records,
            flush: Duration::from_millis(c.ipfix_flush_ms),
            stats_interval: Duration::from_secs(c.ipfix_stats_interval_s),
            tcp_idle: Duration::from_secs(c.ipfix_tcp_idle_s),
            tcp_message_timeout: TCP_MESSAGE_TIMEOUT.min(Duration::from_secs(c.ipfix_tcp_idle_s)),
        })
    }
}

impl Config {
    /// Checks the `ipfix_*` keys.
    pub(crate) fn validate_ipfix(&self) -> Result<(), ConfigError> {
        IngestSettings::from_config(self).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(listen: &[&str]) -> Config {
        Config {
            listen: String::new(),
            db: "sqlite://x.db".into(),
            ipfix_listen: listen.iter().map(|s| s.to_string()).collect(),
            ..Config::default()
        }
    }

    #[test]
    fn listeners_parse_and_are_checked() {
        let s = IngestSettings::from_config(&with(&["udp://127.0.0.1:4739", "tcp://[::1]:4739"]))
            .unwrap();
        assert_eq!(s.listeners.len(), 2);
        assert_eq!(s.listeners[0].to_string(), "udp://127.0.0.1:4739");
        with(&["udp://127.0.0.1:4739"]).validate().unwrap();
        for (l, part) in [
            ("127.0.0.1:4739", "use udp://"),
            ("udp://localhost:1", "not HOST:PORT"),
            ("udp://0.0.0.0:4739", "not loopback"),
            ("tls://127.0.0.1:4739", "needs tls_cert"),
        ] {
            let e = with(&[l]).validate().unwrap_err().to_string();
            assert!(
                e.starts_with("ipfix_listen:") && e.contains(part),
                "{l}: {e}"
            );
        }
        // Beyond loopback over UDP with an allow-list: accepted.
        let mut c = with(&["udp://0.0.0.0:4739"]);
        c.ipfix_allow = vec!["192.0.2.1".into()];
        c.validate().unwrap();
        c.ipfix_allow = vec!["host".into()];
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("ipfix_allow:"));
        // Neither listener: refused.
        let e = with(&[]).validate().unwrap_err().to_string();
        assert!(e.starts_with("listen:"), "{e}");
    }

    #[test]
    fn expiry_below_refresh_intervals_is_refused() {
        let mut c = with(&["udp://127.0.0.1:4739"]);
        c.ipfix_template_expiry_s = 30;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("ipfix_template_expiry_s:"), "{e}");
    }
}
