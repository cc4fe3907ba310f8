//! The collector's configuration: TOML file, then flags; validated before
//! any socket opens.

use qosloop_schema::guard::{check_bind, ConnLimits};
use qosloop_schema::ie;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Everything `qosloop-collector` can be told. Every flag has a key here.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Export listen address (`HOST:PORT`); empty: no export listener
    /// (allowed when an IPFIX listener is given).
    pub listen: String,
    /// `sqlite://FILE`, `postgres://…`, or `discard:` (acknowledge without
    /// storing; benchmarks only).
    pub db: String,
    /// `text` or `json`.
    pub log_format: String,
    /// DATA messages a session may have waiting for storage before the
    /// collector stops reading it.
    pub window: usize,
    /// DATA messages waiting for the writer, over all sessions.
    pub queue_messages: usize,
    /// Records committed in one transaction at most.
    pub group_records: usize,
    /// Transactions in flight at once (PostgreSQL; SQLite has one writer).
    pub writers: usize,
    /// Largest message accepted, bytes.
    pub max_message: usize,
    /// Keepalive interval announced to exporters, seconds.
    pub keepalive_s: u16,
    /// Information elements (IPFIX names) the collector disables in template
    /// negotiation.
    pub disable_keys: Vec<String>,
    /// TLS: the collector's certificate chain (PEM). With `tls_key` and
    /// `tls_client_ca`, exporters must connect over TLS with a certificate
    /// signed by that CA.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    /// Listen beyond loopback without mutual TLS (anyone who reaches the
    /// port can then feed records into the loop); logged at WARN.
    pub allow_insecure_remote: bool,
    /// Connections open at once from one peer address; more are closed at
    /// once and counted.
    pub max_connections_per_peer: usize,
    /// Connections open at once in total.
    pub max_connections: usize,
    /// START must arrive within this many ms of the connection (KEEPALIVE
    /// does not extend it).
    pub handshake_timeout_ms: u64,
    /// FINAL_TMPL_DATA must arrive within this many ms of START.
    pub templates_timeout_ms: u64,
    /// Templates one session may negotiate.
    pub max_templates: usize,
    /// Keys one template may have.
    pub max_template_keys: usize,
    /// TMPL_DATA messages one session may send.
    pub max_template_messages: usize,
    /// Decoded records (bytes of memory) one session may have waiting for
    /// storage; a session over it waits for its own acknowledgements, a
    /// DATA message that could never fit is refused.
    pub decoded_bytes_per_session: usize,
    /// Decoded records (bytes of memory) waiting for storage, all sessions
    /// together; sessions wait for room.
    pub decoded_bytes_total: usize,
    /// Bytes of messages larger than 64 KiB being received at once, all
    /// connections together: such a message is read only once its length
    /// is reserved here (at least `max_message`).
    pub large_message_bytes_total: usize,
    /// IPFIX / NetFlow listeners: `udp://HOST:PORT` (IPFIX, NetFlow v9 and
    /// v5, the version read per datagram), `tcp://HOST:PORT` (IPFIX) and
    /// `tls://HOST:PORT` (IPFIX over TLS with the `tls_*` files).
    pub ipfix_listen: Vec<String>,
    /// Only these exporter addresses are decoded (empty: every address).
    pub ipfix_allow: Vec<String>,
    /// Receive buffer asked of the kernel for each UDP socket, bytes.
    pub ipfix_rcvbuf: usize,
    /// Datagrams taken per recvmmsg call.
    pub ipfix_batch: usize,
    /// UDP sockets (and decoding threads) per UDP listener, bound with
    /// SO_REUSEPORT: the kernel sends each exporter (address and port) to
    /// one of them, so its templates stay in one place.
    pub ipfix_udp_threads: usize,
    /// UDP templates not refreshed for this long are forgotten, seconds.
    pub ipfix_template_expiry_s: u64,
    /// Data sets held for a template not yet seen, per exporter and
    /// domain: count, bytes and age (seconds).
    pub ipfix_pending_sets: usize,
    pub ipfix_pending_bytes: usize,
    pub ipfix_pending_age_s: u64,
    /// Exporters tracked at once per UDP socket.
    pub ipfix_max_exporters: usize,
    /// Templates per exporter and domain; fields per template.
    pub ipfix_max_templates: usize,
    pub ipfix_max_fields: usize,
    /// Records handed to the storage writer in one batch at most, and the
    /// longest a decoded record waits for its batch, ms.
    pub ipfix_flush_records: usize,
    pub ipfix_flush_ms: u64,
    /// How often exporter counters are written to SQL, seconds.
    pub ipfix_stats_interval_s: u64,
    /// A TCP/TLS IPFIX session silent this long is closed, seconds.
    pub ipfix_tcp_idle_s: u64,
    /// The collector cluster to join (`docs/cluster.md`; PostgreSQL only);
    /// empty: a standalone collector.
    pub cluster: String,
    /// This node's name in the cluster (default: the host name).
    pub node: String,
    /// The address other nodes and operators reach this node at.
    pub advertise: String,
    /// Lease on the database's clock, renewed every quarter of it, ms.
    pub cluster_lease_ms: u64,
    /// Routing configuration, equal on every node of a cluster (a node
    /// with another one is refused): buckets of the key space, rate window
    /// and lag, EWMA weight in thousandths, the analyses.
    pub cluster_buckets: u32,
    pub cluster_interval_ms: u64,
    pub cluster_lag_ms: u64,
    pub cluster_ewma_permille: u32,
    pub cluster_analyses: Vec<String>,
    /// The UDP journal: a directory where decoded IPFIX/NetFlow records
    /// are appended (checksummed frames) before a loader stores them in SQL,
    /// so a slow or unreachable database does not lose what arrived. Unset:
    /// records go straight to the storage writer.
    pub ipfix_journal_dir: Option<PathBuf>,
    /// Bytes the journal may hold on disk; past it new records are dropped
    /// (counted as `journal_full`).
    pub ipfix_journal_max_bytes: u64,
    /// fsync of the journal: at most this long after an append, ms; 0:
    /// after every append.
    pub ipfix_journal_fsync_ms: u64,
    /// Flows whose `end_ns` is older than this many days are removed
    /// (whole partitions on PostgreSQL); 0 keeps everything.
    pub retention_days: u32,
    /// PostgreSQL `flows` partitions exist from today through this many
    /// days ahead.
    pub partitions_ahead_days: u32,
    /// How often partitions ahead and retention are checked, seconds.
    pub maintenance_interval_s: u64,
    /// Prometheus `/metrics` on this `HOST:PORT`; empty: none. Beyond
    /// loopback only with `allow_insecure_remote`.
    pub metrics: String,
    /// Keep the real-time knowledge base (docs/kb.md) in every write.
    pub kb: bool,
    /// Life of a user <-> address mapping learned from an agent record
    /// after its last record, seconds.
    pub kb_mapping_ttl_s: u64,
    /// Life of a host's counters after its last record, seconds.
    pub kb_host_ttl_s: u64,
    /// A user idle this long (and without a live learned mapping) logs
    /// off, seconds.
    pub kb_idle_s: u64,
    /// How often expiry and logoffs are checked, ms.
    pub kb_sweep_ms: u64,
    /// Byte thresholds per user and session, `USER=BYTES` (`*=BYTES` for
    /// every user without one of its own); written to `kb_thresholds` at
    /// start.
    pub kb_thresholds: Vec<String>,
}

impl Config {
    /// The knowledge base's configuration, when it is kept.
    pub fn kb_config(&self) -> Option<qosloop_store::KbConfig> {
        let ns = |s: u64| i64::try_from(s.saturating_mul(1_000_000_000)).unwrap_or(i64::MAX);
        self.kb.then(|| qosloop_store::KbConfig {
            mapping_ttl_ns: ns(self.kb_mapping_ttl_s),
            host_ttl_ns: ns(self.kb_host_ttl_s),
            idle_ns: ns(self.kb_idle_s),
            ..qosloop_store::KbConfig::default()
        })
    }

    /// `kb_thresholds` as (user, bytes).
    pub fn kb_threshold_pairs(&self) -> Result<Vec<(String, i64)>, String> {
        self.kb_thresholds
            .iter()
            .map(|t| {
                let (user, bytes) = t
                    .split_once('=')
                    .ok_or_else(|| format!("{t:?} is not USER=BYTES"))?;
                let bytes: i64 = bytes
                    .trim()
                    .parse()
                    .ok()
                    .filter(|b| *b > 0)
                    .ok_or_else(|| format!("{t:?}: BYTES must be a positive integer"))?;
                let user = user.trim();
                if user.is_empty() || user.len() > 256 {
                    return Err(format!("{t:?}: USER must be 1..=256 bytes"));
                }
                Ok((user.to_owned(), bytes))
            })
            .collect()
    }
}

/// Longest exporter name accepted, bytes.
pub const MAX_EXPORTER_NAME: usize = 255;

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:4740".into(),
            db: String::new(),
            log_format: "text".into(),
            window: 64,
            queue_messages: 256,
            group_records: 50_000,
            writers: 2,
            max_message: qosloop_schema::crane::DEFAULT_MAX_MESSAGE,
            keepalive_s: 5,
            disable_keys: Vec::new(),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            allow_insecure_remote: false,
            max_connections_per_peer: ConnLimits::default().per_peer,
            max_connections: ConnLimits::default().total,
            handshake_timeout_ms: 5_000,
            templates_timeout_ms: 10_000,
            max_templates: 64,
            max_template_keys: 64,
            max_template_messages: 16,
            decoded_bytes_per_session: 64 << 20,
            decoded_bytes_total: 512 << 20,
            large_message_bytes_total: 256 << 20,
            ipfix_listen: Vec::new(),
            ipfix_allow: Vec::new(),
            ipfix_rcvbuf: 32 << 20,
            ipfix_batch: 64,
            ipfix_udp_threads: 1,
            ipfix_template_expiry_s: 1_800,
            ipfix_pending_sets: 1_024,
            ipfix_pending_bytes: 4 << 20,
            ipfix_pending_age_s: 120,
            ipfix_max_exporters: 4_096,
            ipfix_max_templates: 1_024,
            ipfix_max_fields: 512,
            ipfix_flush_records: 8_192,
            ipfix_flush_ms: 100,
            ipfix_stats_interval_s: 5,
            ipfix_tcp_idle_s: 900,
            cluster: String::new(),
            node: String::new(),
            advertise: String::new(),
            cluster_lease_ms: 1000,
            cluster_buckets: 64,
            cluster_interval_ms: 1000,
            cluster_lag_ms: 1200,
            cluster_ewma_permille: 500,
            cluster_analyses: vec!["bandwidth".into()],
            ipfix_journal_dir: None,
            ipfix_journal_max_bytes: 1 << 30,
            ipfix_journal_fsync_ms: 100,
            retention_days: 0,
            partitions_ahead_days: 2,
            maintenance_interval_s: 3_600,
            metrics: String::new(),
            kb: false,
            kb_mapping_ttl_s: 300,
            kb_host_ttl_s: 3_600,
            kb_idle_s: 60,
            kb_sweep_ms: 1_000,
            kb_thresholds: Vec::new(),
        }
    }
}

/// A configuration that cannot be used; exit code 64.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("{field}: {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
}

impl Config {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    /// Whether exporters must show a certificate (all three TLS files).
    pub fn mutual_tls(&self) -> bool {
        self.tls_cert.is_some() && self.tls_key.is_some() && self.tls_client_ca.is_some()
    }

    /// The connection limits of the export port.
    pub fn conn_limits(&self) -> ConnLimits {
        ConnLimits {
            per_peer: self.max_connections_per_peer,
            total: self.max_connections,
        }
    }

    /// Checks what can be checked without opening anything.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, problem: String| Err(ConfigError::Invalid { field, problem });
        if self.listen.is_empty() && self.ipfix_listen.is_empty() {
            return bad(
                "listen",
                "nothing to listen on: give listen and/or ipfix_listen".into(),
            );
        }
        self.validate_ipfix()?;
        if self.listen.is_empty() {
            return self.validate_rest();
        }
        let Ok(listen) = self.listen.parse::<SocketAddr>() else {
            return bad(
                "listen",
                format!(
                    "{:?} is not HOST:PORT (an IP address and a port)",
                    self.listen
                ),
            );
        };
        if let Err(problem) = check_bind(
            listen,
            "export",
            self.mutual_tls(),
            self.allow_insecure_remote,
        ) {
            return bad("listen", problem);
        }
        self.validate_rest()
    }

    /// The cluster's keys, when a cluster is named.
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let bad = |field, problem: String| Err(ConfigError::Invalid { field, problem });
        if self.cluster.is_empty() {
            return Ok(());
        }
        if !(self.db.starts_with("postgres://") || self.db.starts_with("postgresql://")) {
            return bad(
                "cluster",
                "a collector cluster is kept in PostgreSQL: db must be postgres://…".into(),
            );
        }
        if self.node.is_empty() || self.node.len() > 255 || self.node.contains(',') {
            return bad("node", format!("{:?}: 1 to 255 bytes, no comma", self.node));
        }
        if !(250..=60_000).contains(&self.cluster_lease_ms) {
            return bad(
                "cluster_lease_ms",
                format!("{}: must be 250..=60000", self.cluster_lease_ms),
            );
        }
        if !(1..=65_536).contains(&self.cluster_buckets) {
            return bad(
                "cluster_buckets",
                format!("{}: must be 1..=65536", self.cluster_buckets),
            );
        }
        if !(10..=60_000).contains(&self.cluster_interval_ms) {
            return bad(
                "cluster_interval_ms",
                format!("{}: must be 10..=60000", self.cluster_interval_ms),
            );
        }
        if self.cluster_lag_ms > 600_000 {
            return bad(
                "cluster_lag_ms",
                format!("{}: at most 600000", self.cluster_lag_ms),
            );
        }
        if !(1..=1000).contains(&self.cluster_ewma_permille) {
            return bad(
                "cluster_ewma_permille",
                format!("{}: must be 1..=1000", self.cluster_ewma_permille),
            );
        }
        if let Err(problem) = crate::cluster::analyses(&self.cluster_analyses) {
            return bad("cluster_analyses", problem);
        }
        Ok(())
    }

    /// The routing configuration of the cluster this node joins.
    pub fn routing(&self) -> qosloop_store::RoutingConfig {
        qosloop_store::RoutingConfig {
            buckets: self.cluster_buckets,
            interval_ms: self.cluster_interval_ms,
            lag_ms: self.cluster_lag_ms,
            ewma_weight_permille: self.cluster_ewma_permille,
            analyses: crate::cluster::analyses(&self.cluster_analyses).unwrap_or_default(),
        }
    }

    /// The `metrics` address, if any.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.metrics.is_empty() {
            return Ok(None);
        }
        use std::net::ToSocketAddrs;
        let invalid = |problem: String| ConfigError::Invalid {
            field: "metrics",
            problem,
        };
        self.metrics
            .to_socket_addrs()
            .map_err(|e| invalid(format!("{:?} is not HOST:PORT ({e})", self.metrics)))?
            .next()
            .map(Some)
            .ok_or_else(|| invalid(format!("{:?} resolves to no address", self.metrics)))
    }

    /// What does not depend on the export listener.
    fn validate_rest(&self) -> Result<(), ConfigError> {
        let bad = |field, problem: String| Err(ConfigError::Invalid { field, problem });
        let db_ok = self.db.starts_with("sqlite:")
            || self.db.starts_with("postgres://")
            || self.db.starts_with("postgresql://")
            || self.db == "discard:";
        if !db_ok {
            return bad(
                "db",
                format!(
                    "{:?}: use sqlite://FILE, postgres://… or discard:",
                    qosloop_store::redact(&self.db)
                ),
            );
        }
        self.validate_cluster()?;
        if self.ipfix_journal_max_bytes < 1 << 20 {
            return bad(
                "ipfix_journal_max_bytes",
                format!("{} is below 1 MiB", self.ipfix_journal_max_bytes),
            );
        }
        if self.ipfix_journal_fsync_ms > 10_000 {
            return bad(
                "ipfix_journal_fsync_ms",
                format!("{} ms is over 10000", self.ipfix_journal_fsync_ms),
            );
        }
        if !(1..=86_400).contains(&self.maintenance_interval_s) {
            return bad(
                "maintenance_interval_s",
                format!("{} s is outside 1..=86400", self.maintenance_interval_s),
            );
        }
        for (key, v) in [
            ("kb_mapping_ttl_s", self.kb_mapping_ttl_s),
            ("kb_host_ttl_s", self.kb_host_ttl_s),
            ("kb_idle_s", self.kb_idle_s),
        ] {
            if !(1..=10 * 365 * 86_400).contains(&v) {
                return bad(key, format!("{v} s is outside 1..=315360000"));
            }
        }
        if !(10..=3_600_000).contains(&self.kb_sweep_ms) {
            return bad(
                "kb_sweep_ms",
                format!("{} ms is outside 10..=3600000", self.kb_sweep_ms),
            );
        }
        if let Err(e) = self.kb_threshold_pairs() {
            return bad("kb_thresholds", e);
        }
        if self.partitions_ahead_days > 366 {
            return bad(
                "partitions_ahead_days",
                format!("{} is over 366", self.partitions_ahead_days),
            );
        }
        if let Some(addr) = self.metrics_addr()? {
            check_bind(addr, "metrics", false, self.allow_insecure_remote).map_err(|problem| {
                ConfigError::Invalid {
                    field: "metrics",
                    problem,
                }
            })?;
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return bad(
                "log_format",
                format!("{:?}: use text or json", self.log_format),
            );
        }
        for (field, v) in [
            ("window", self.window),
            ("queue_messages", self.queue_messages),
            ("group_records", self.group_records),
            ("writers", self.writers),
            ("max_connections_per_peer", self.max_connections_per_peer),
            ("max_connections", self.max_connections),
            ("max_templates", self.max_templates),
            ("max_template_keys", self.max_template_keys),
            ("max_template_messages", self.max_template_messages),
        ] {
            if v == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        for (field, v) in [
            ("handshake_timeout_ms", self.handshake_timeout_ms),
            ("templates_timeout_ms", self.templates_timeout_ms),
        ] {
            if !(100..=600_000).contains(&v) {
                return bad(field, format!("{v} ms is outside 100..=600000"));
            }
        }
        if self.decoded_bytes_per_session < 1 << 20 {
            return bad(
                "decoded_bytes_per_session",
                format!("{} is below 1 MiB", self.decoded_bytes_per_session),
            );
        }
        if self.decoded_bytes_total < self.decoded_bytes_per_session {
            return bad(
                "decoded_bytes_total",
                format!(
                    "{} is below decoded_bytes_per_session ({})",
                    self.decoded_bytes_total, self.decoded_bytes_per_session
                ),
            );
        }
        if self.large_message_bytes_total < self.max_message {
            return bad(
                "large_message_bytes_total",
                format!(
                    "{} is below max_message ({})",
                    self.large_message_bytes_total, self.max_message
                ),
            );
        }
        // Counted in KiB by semaphores of u32 permits.
        for (field, v) in [
            ("decoded_bytes_total", self.decoded_bytes_total),
            ("large_message_bytes_total", self.large_message_bytes_total),
        ] {
            if v > (u32::MAX as usize) << 10 {
                return bad(field, format!("{v} is above 4 TiB"));
            }
        }
        if self.max_message < 1024 {
            return bad(
                "max_message",
                format!("{} is below 1024 bytes", self.max_message),
            );
        }
        let tls = [&self.tls_cert, &self.tls_key, &self.tls_client_ca];
        let given = tls.iter().filter(|f| f.is_some()).count();
        if given != 0 && given != 3 {
            return bad(
                "tls_cert",
                "TLS needs all of tls_cert, tls_key and tls_client_ca".into(),
            );
        }
        for f in tls.into_iter().flatten() {
            if !f.is_file() {
                return bad("tls_cert", format!("{}: no such file", f.display()));
            }
        }
        for k in &self.disable_keys {
            if ie::by_name(k).is_none() {
                return bad(
                    "disable_keys",
                    format!("{k:?} is not a known information element"),
                );
            }
        }
        // Records without any flow key or without any counter are stored
        // as empty rows, acknowledged: silent loss (issue 11 item 8).
        let disabled = |e: &ie::InformationElement| self.disable_keys.iter().any(|k| k == e.name);
        let keys = [
            ie::SOURCE_IPV4_ADDRESS,
            ie::DESTINATION_IPV4_ADDRESS,
            ie::SOURCE_IPV6_ADDRESS,
            ie::DESTINATION_IPV6_ADDRESS,
            ie::SOURCE_TRANSPORT_PORT,
            ie::DESTINATION_TRANSPORT_PORT,
            ie::PROTOCOL_IDENTIFIER,
        ];
        if keys.iter().all(disabled) {
            return bad(
                "disable_keys",
                "disables every flow key (addresses, ports, protocol): records would be stored without them".into(),
            );
        }
        if [ie::PACKET_DELTA_COUNT, ie::OCTET_DELTA_COUNT]
            .iter()
            .all(disabled)
        {
            return bad(
                "disable_keys",
                "disables both counters (packetDeltaCount, octetDeltaCount): records would be stored as zeros".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 11 item 8: disabling every key was accepted; the meter then
    /// reported "all acknowledged" while the database held all-zero rows.
    #[test]
    fn disabling_every_flow_key_or_both_counters_is_refused() {
        let with = |keys: &[&str]| Config {
            db: "sqlite://x.db".into(),
            disable_keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            ..Config::default()
        };
        let every_key = [
            "sourceIPv4Address",
            "destinationIPv4Address",
            "sourceIPv6Address",
            "destinationIPv6Address",
            "sourceTransportPort",
            "destinationTransportPort",
            "protocolIdentifier",
        ];
        let e = with(&every_key).validate().unwrap_err().to_string();
        assert!(
            e.starts_with("disable_keys:") && e.contains("every flow key"),
            "{e}"
        );
        let e = with(&["packetDeltaCount", "octetDeltaCount"])
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("disable_keys:") && e.contains("both counters"),
            "{e}"
        );
        // Some keys, one counter: fine.
        with(&every_key[..6]).validate().unwrap();
        with(&["octetDeltaCount", "userName"]).validate().unwrap();
    }

    #[test]
    fn example_parses_and_validates() {
        let c = Config::from_toml(include_str!("../example.toml")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.listen, "127.0.0.1:4740");
        assert!(c.db.starts_with("sqlite://"));
    }

    #[test]
    fn journal_and_retention_keys_are_checked() {
        let ok = Config {
            db: "sqlite://x.db".into(),
            ..Config::default()
        };
        ok.validate().unwrap();
        for (c, field) in [
            (
                Config {
                    ipfix_journal_max_bytes: 1000,
                    ..ok.clone()
                },
                "ipfix_journal_max_bytes:",
            ),
            (
                Config {
                    ipfix_journal_fsync_ms: 60_000,
                    ..ok.clone()
                },
                "ipfix_journal_fsync_ms:",
            ),
            (
                Config {
                    maintenance_interval_s: 0,
                    ..ok.clone()
                },
                "maintenance_interval_s:",
            ),
            (
                Config {
                    partitions_ahead_days: 1000,
                    ..ok.clone()
                },
                "partitions_ahead_days:",
            ),
        ] {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.starts_with(field), "{e}");
        }
        let c = Config::from_toml(
            "db = \"sqlite://x.db\"\nipfix_journal_dir = \"j\"\nretention_days = 30\n",
        )
        .unwrap();
        assert_eq!(c.ipfix_journal_dir, Some(PathBuf::from("j")));
        assert_eq!(crate::maintenance::retention(&c).days, 30);
    }

    #[test]
    fn knowledge_base_keys_parse_and_bad_ones_are_named() {
        let c = Config::from_toml(
            "db = \"sqlite://x.db\"\nkb = true\nkb_idle_s = 5\nkb_thresholds = [\"*=1000\", \"alice=5000\"]\n",
        )
        .unwrap();
        c.validate().unwrap();
        let kb = c.kb_config().unwrap();
        assert_eq!(kb.idle_ns, 5_000_000_000);
        assert_eq!(kb.mapping_ttl_ns, 300_000_000_000);
        assert_eq!(
            c.kb_threshold_pairs().unwrap(),
            [("*".to_owned(), 1000), ("alice".to_owned(), 5000)]
        );
        assert!(Config::default().kb_config().is_none(), "off by default");
        for (bad, field) in [
            (vec!["alice"], "kb_thresholds"),
            (vec!["alice=-3"], "kb_thresholds"),
            (vec!["=5"], "kb_thresholds"),
        ] {
            let c = Config {
                kb_thresholds: bad.into_iter().map(String::from).collect(),
                ..c.clone()
            };
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
        let c = Config {
            kb_sweep_ms: 0,
            ..c.clone()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("kb_sweep_ms"));
    }

    #[test]
    fn bad_values_name_the_field() {
        let mut c = Config {
            db: "sqlite://x.db".into(),
            ..Config::default()
        };
        c.listen = "nowhere".into();
        assert!(c.validate().unwrap_err().to_string().starts_with("listen:"));
        c.listen = "127.0.0.1:1".into();
        c.disable_keys = vec!["noSuchKey".into()];
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("disable_keys:"));
        assert!(
            Config::from_toml("lisen = \"x\"").is_err(),
            "unknown keys are refused"
        );
        c.disable_keys.clear();
        c.decoded_bytes_total = c.decoded_bytes_per_session - 1;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("decoded_bytes_total:"));
    }

    /// Issue 11, item 5: anyone who could reach the port fed records into
    /// the loop. Beyond loopback the collector needs mutual TLS or the
    /// explicit opt-in, decided before any socket opens.
    #[test]
    fn remote_listen_without_mutual_tls_needs_the_opt_in() {
        let mut c = Config {
            db: "sqlite://x.db".into(),
            listen: "0.0.0.0:4740".into(),
            ..Config::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.starts_with("listen:") && e.contains("--allow-insecure-remote"),
            "{e}"
        );
        c.allow_insecure_remote = true;
        c.validate().unwrap();
        c.allow_insecure_remote = false;
        c.listen = "127.0.0.1:4740".into();
        c.validate().unwrap();
    }
}
