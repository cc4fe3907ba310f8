//! The meter's configuration: one TOML file (`--config`) whose every key is
//! also a command-line flag (flags win), validated — rule files compiled,
//! outputs opened — before any packet is read.

use crate::cache::CacheConfig;
use crate::classify::{Classifier, FieldRules, FlowKeyDefs, PatternRules, RuleError};
use crate::pipeline::PipelineConfig;
use crate::sampling::Sampling;
use crate::sink::{JsonlSink, MultiSink, RecordSink, SinkError};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration that cannot be used (exit code 64).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Rules(#[from] RuleError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Output(#[from] SinkError),
}

/// Everything a run needs. Field names are the TOML keys; each has a
/// `--flag` of the same name with `-` for `_`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Read packets from this pcap or pcapng file.
    pub pcap: Option<PathBuf>,
    /// Capture live on this interface (AF_PACKET).
    pub interface: Option<String>,
    /// Write records as JSON Lines here.
    pub records_out: Option<PathBuf>,
    /// Export targets: `crane://HOST:PORT[,HOST:PORT…]` (collectors best
    /// first; at most one such target), `ipfix://HOST:PORT` (UDP) and
    /// `ipfix+tcp://HOST:PORT`, each with optional `?key=value&…`. A string
    /// or a list in TOML; the flag may repeat.
    #[serde(deserialize_with = "one_or_many")]
    pub export: Vec<String>,
    /// Spool directory of the export while no collector answers (default:
    /// `qosloop-meter-spool` in the system's temporary directory).
    pub export_spool: Option<PathBuf>,
    /// Export over TLS with mutual authentication: the CA the collectors'
    /// certificates chain to, and this meter's certificate and key (PEM).
    pub export_tls_ca: Option<PathBuf>,
    pub export_tls_cert: Option<PathBuf>,
    pub export_tls_key: Option<PathBuf>,
    /// A collector that leaves DATA unacknowledged this long (keepalives
    /// or not) is failed over (default 10000).
    pub export_ack_timeout_ms: Option<u64>,
    /// Flow-key XML files (`seeds/004` Fig. 4).
    pub flow_keys: Vec<PathBuf>,
    /// Field/mask rule files (TOML).
    pub field_rules: Vec<PathBuf>,
    /// Byte-pattern rule file (TOML).
    pub patterns: Option<PathBuf>,
    /// Bytes of each frame kept for classification; 0 = whole frame.
    pub caplen: Option<usize>,
    pub idle_timeout_ms: Option<u64>,
    pub active_timeout_ms: Option<u64>,
    /// Interim (delta) records of long flows every N ms; 0 = off.
    pub interim_ms: Option<u64>,
    /// Flow cache bound; beyond it the quietest flows are exported early.
    pub max_flows: Option<usize>,
    /// `off`, `count:N`, `time:SPACING_MS/INTERVAL_MS`, `hash:N`.
    pub sampling: Option<String>,
    /// Live capture threads sharing the interface (PACKET_FANOUT).
    pub threads: Option<usize>,
    /// Classic BPF program in `tcpdump -ddd` form (inline, or a file path).
    pub bpf: Option<String>,
    /// Live capture: stop after this many seconds (0 = until interrupted).
    pub duration_s: Option<u64>,
    /// `text` or `json`.
    pub log_format: Option<String>,
    /// Progress bar: `auto` (only on a terminal), `always`, `never`.
    pub progress: Option<String>,
    /// Run as the host agent: account local traffic to users and processes
    /// (eBPF at the cgroup v2 root) instead of reading packets.
    pub agent: Option<bool>,
    /// Agent: the cgroup v2 directory to attach to (default: the root,
    /// `/sys/fs/cgroup/unified` or `/sys/fs/cgroup`).
    pub agent_cgroup: Option<PathBuf>,
    /// Agent: a bpffs directory to pin the maps in (restart without loss).
    pub agent_pin_dir: Option<PathBuf>,
    /// Agent: entries of each counter map (default 65536).
    pub agent_map_entries: Option<u32>,
    /// Agent: `bpf`, `nft` (the nftables + conntrack fallback) or `auto`
    /// (eBPF when it loads, else the fallback; the default).
    pub agent_mode: Option<String>,
    /// Prometheus `/metrics` on this `HOST:PORT` (live capture only: a pcap
    /// run, the agent and a DPMI point or DiCAP coordinator serve none).
    pub metrics: Option<String>,
}

/// `export = "…"` or `export = ["…", "…"]`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// The configuration after validation.
#[derive(Debug)]
pub struct Validated {
    pub pipeline: PipelineConfig,
    pub classifier: Classifier,
    pub threads: usize,
    pub bpf: Option<Vec<crate::live::BpfInsn>>,
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })
}

impl Config {
    /// Reads a TOML configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let src = read(path)?;
        Self::parse(&path.display().to_string(), &src)
    }

    pub fn parse(file: &str, src: &str) -> Result<Config, ConfigError> {
        toml::from_str(src).map_err(|e| ConfigError::Rules(RuleError::from_toml(file, src, &e)))
    }

    /// Overlays `flags` on `self`: every key set in `flags` wins.
    pub fn merge(mut self, flags: Config) -> Config {
        macro_rules! take {
            ($($f:ident),*) => { $( if flags.$f.is_some() { self.$f = flags.$f; } )* };
        }
        take!(
            pcap,
            interface,
            records_out,
            export_spool,
            export_tls_ca,
            export_tls_cert,
            export_tls_key,
            export_ack_timeout_ms,
            patterns,
            caplen,
            idle_timeout_ms,
            active_timeout_ms,
            interim_ms,
            max_flows,
            sampling,
            threads,
            bpf,
            duration_s,
            log_format,
            progress,
            agent,
            agent_cgroup,
            agent_pin_dir,
            agent_map_entries,
            agent_mode,
            metrics
        );
        if !flags.flow_keys.is_empty() {
            self.flow_keys = flags.flow_keys;
        }
        if !flags.field_rules.is_empty() {
            self.field_rules = flags.field_rules;
        }
        if !flags.export.is_empty() {
            self.export = flags.export;
        }
        self
    }

    /// Checks values and compiles the rule files.
    pub fn validate(&self) -> Result<Validated, ConfigError> {
        self.metrics_addr()?;
        let mut crane = 0;
        for target in &self.export {
            match qosloop_exporter::Target::parse(target)
                .map_err(|e| ConfigError::Invalid(format!("export: {e}")))?
            {
                qosloop_exporter::Target::Crane(_) => crane += 1,
                qosloop_exporter::Target::Ipfix(_) => {}
            }
        }
        if crane > 1 {
            return Err(ConfigError::Invalid(
                "export: at most one crane:// target (list its collectors in it: crane://A:P,B:P)"
                    .into(),
            ));
        }
        if let Some(m) = &self.agent_mode {
            m.parse::<crate::agent::AgentMode>()
                .map_err(ConfigError::Invalid)?;
        }
        if self.agent_map_entries.is_some_and(|n| n < 16) {
            return Err(ConfigError::Invalid(
                "agent_map_entries must be at least 16".into(),
            ));
        }
        if self.export_ack_timeout_ms == Some(0) {
            return Err(ConfigError::Invalid(
                "export_ack_timeout_ms must be above 0".into(),
            ));
        }
        match (&self.pcap, &self.interface) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid(
                    "give either pcap or interface, not both".into(),
                ))
            }
            (Some(_), _) | (_, Some(_)) if self.agent == Some(true) => {
                return Err(ConfigError::Invalid(
                    "agent: the host agent reads no packets; drop pcap and interface".into(),
                ))
            }
            (None, None) if self.agent != Some(true) => {
                return Err(ConfigError::Invalid(
                    "nothing to read: give --pcap FILE or --interface IF (or --agent)".into(),
                ))
            }
            _ => {}
        }
        let defaults = CacheConfig::default();
        let ms = |v: Option<u64>, d: u64| v.map_or(d, |m| m.saturating_mul(1_000_000));
        let cache = CacheConfig {
            idle_timeout_ns: ms(self.idle_timeout_ms, defaults.idle_timeout_ns),
            active_timeout_ns: ms(self.active_timeout_ms, defaults.active_timeout_ns),
            interim_ns: ms(self.interim_ms, defaults.interim_ns),
            max_flows: self.max_flows.unwrap_or(defaults.max_flows),
        };
        if cache.idle_timeout_ns == 0 || cache.active_timeout_ns == 0 {
            return Err(ConfigError::Invalid(
                "idle_timeout_ms and active_timeout_ms must be above 0".into(),
            ));
        }
        if cache.max_flows == 0 {
            return Err(ConfigError::Invalid("max_flows must be above 0".into()));
        }
        let sampling: Sampling = match &self.sampling {
            Some(s) => s.parse().map_err(ConfigError::Invalid)?,
            None => Sampling::Off,
        };
        let caplen = self.caplen.unwrap_or(0);
        if caplen != 0 && caplen < 14 {
            return Err(ConfigError::Invalid(format!(
                "caplen {caplen} is below an Ethernet header (use 0 for whole frames)"
            )));
        }
        if let Some(p) = &self.progress {
            if !matches!(p.as_str(), "auto" | "always" | "never") {
                return Err(ConfigError::Invalid(format!(
                    "progress {p:?}: use auto, always or never"
                )));
            }
        }
        let threads = self.threads.unwrap_or(1);
        if !(1..=64).contains(&threads) {
            return Err(ConfigError::Invalid(format!(
                "threads {threads} is not within 1-64"
            )));
        }
        let mut fields: Option<FieldRules> = None;
        for path in &self.field_rules {
            let rules = FieldRules::parse(&path.display().to_string(), &read(path)?)?;
            match fields.as_mut() {
                Some(f) => f.extend(rules),
                None => fields = Some(rules),
            }
        }
        let mut flow_keys: Option<FlowKeyDefs> = None;
        for path in &self.flow_keys {
            let defs = FlowKeyDefs::parse(&path.display().to_string(), &read(path)?)?;
            for w in defs.warnings() {
                tracing::warn!(file = %path.display(), line = w.line, column = w.column, "{}", w.message);
            }
            if flow_keys.is_some() {
                return Err(ConfigError::Invalid(
                    "only one flow-key XML file is supported".into(),
                ));
            }
            flow_keys = Some(defs);
        }
        let patterns = match &self.patterns {
            Some(path) => Some(PatternRules::parse(
                &path.display().to_string(),
                &read(path)?,
            )?),
            None => None,
        };
        let bpf = match &self.bpf {
            Some(b) => {
                let text = if Path::new(b).is_file() {
                    read(Path::new(b))?
                } else {
                    b.clone()
                };
                Some(crate::live::parse_bpf(&text).map_err(ConfigError::Invalid)?)
            }
            None => None,
        };
        Ok(Validated {
            pipeline: PipelineConfig {
                cache,
                caplen,
                sampling,
            },
            classifier: Classifier::new(fields, flow_keys, patterns),
            threads,
            bpf,
        })
    }

    /// The `metrics` address, if any: loopback only (the meter has no
    /// flag to open it wider; scrape through a local agent or proxy).
    pub fn metrics_addr(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        let Some(m) = &self.metrics else {
            return Ok(None);
        };
        use std::net::ToSocketAddrs;
        let addr = m
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| ConfigError::Invalid(format!("metrics: {m:?} is not HOST:PORT")))?;
        qosloop_schema::guard::check_bind(addr, "metrics", false, false)
            .map_err(|e| ConfigError::Invalid(format!("metrics: {e}")))?;
        Ok(Some(addr))
    }

    /// Opens the outputs this configuration names.
    ///
    /// To add an output, push another boxed [`RecordSink`] here.
    pub fn open_sinks(&self) -> Result<Box<dyn RecordSink>, ConfigError> {
        let mut sinks: Vec<Box<dyn RecordSink>> = Vec::new();
        if let Some(path) = &self.records_out {
            sinks.push(Box::new(JsonlSink::create(path)?));
        }
        for target in &self.export {
            if let Ok(qosloop_exporter::Target::Ipfix(cfg)) =
                qosloop_exporter::Target::parse(target)
            {
                sinks.push(Box::new(crate::ipfix_sink::IpfixSink::start(target, &cfg)?));
                continue;
            }
            let spool = self
                .export_spool
                .clone()
                .unwrap_or_else(|| std::env::temp_dir().join("qosloop-meter-spool"));
            let tls = match (
                &self.export_tls_ca,
                &self.export_tls_cert,
                &self.export_tls_key,
            ) {
                (Some(ca), Some(cert), Some(key)) => Some(qosloop_exporter::TlsFiles {
                    ca: ca.clone(),
                    cert: cert.clone(),
                    key: key.clone(),
                }),
                (None, None, None) => None,
                _ => {
                    return Err(ConfigError::Invalid(
                        "export TLS needs all three of --export-tls-ca, --export-tls-cert and --export-tls-key".into(),
                    ))
                }
            };
            let ack_timeout = self
                .export_ack_timeout_ms
                .map_or(qosloop_exporter::DEFAULT_ACK_TIMEOUT, Duration::from_millis);
            sinks.push(Box::new(crate::export_sink::ExportSink::start(
                target,
                spool,
                tls,
                ack_timeout,
            )?));
        }
        if sinks.is_empty() {
            return Err(ConfigError::Invalid(
                "no output: give --records-out FILE.jsonl or --export crane://HOST:PORT (or ipfix://HOST:PORT)".into(),
            ));
        }
        if sinks.len() == 1 {
            if let Some(only) = sinks.pop() {
                return Ok(only);
            }
        }
        Ok(Box::new(MultiSink(sinks)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_validates() {
        let src = include_str!("../example.toml");
        let c = Config::parse("example.toml", src).unwrap();
        assert!(c.pcap.is_some());
        assert_eq!(c.sampling.as_deref(), Some("off"));
        // Rule paths in the example are relative to the crate directory.
        let base = Path::new(env!("CARGO_MANIFEST_DIR"));
        let c = Config {
            flow_keys: c.flow_keys.iter().map(|p| base.join(p)).collect(),
            field_rules: c.field_rules.iter().map(|p| base.join(p)).collect(),
            patterns: c.patterns.as_ref().map(|p| base.join(p)),
            ..c
        };
        let v = c.validate().unwrap();
        assert!(!v.classifier.is_empty());
        assert_eq!(v.pipeline.cache.interim_ns, 1_000_000_000);
    }

    #[test]
    fn flags_win_and_bad_values_are_named() {
        let file = Config::parse("c.toml", "pcap = \"a.pcap\"\ninterim_ms = 500\n").unwrap();
        let flags = Config {
            interim_ms: Some(0),
            ..Config::default()
        };
        let c = file.merge(flags);
        assert_eq!(c.interim_ms, Some(0));
        assert_eq!(c.pcap.as_deref(), Some(Path::new("a.pcap")));
        let e = Config::parse("c.toml", "pcpa = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("c.toml:1:1"), "{e}");
        let bad = Config {
            sampling: Some("sometimes".into()),
            ..c.clone()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("sampling"));
        let both = Config {
            interface: Some("lo".into()),
            ..c
        };
        assert!(both.validate().is_err());
    }

    #[test]
    fn export_tls_needs_all_three_files() {
        let half = Config::parse(
            "c.toml",
            "export = \"crane://127.0.0.1:9\"\nexport_tls_ca = \"ca.pem\"\n",
        )
        .unwrap();
        let e = half
            .open_sinks()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("--export-tls-cert"), "{e}");
    }

    #[test]
    fn export_takes_one_target_or_a_list_and_one_crane_at_most() {
        let one = Config::parse("c.toml", "export = \"ipfix://127.0.0.1:4739\"\n").unwrap();
        assert_eq!(one.export, ["ipfix://127.0.0.1:4739"]);
        let many = Config::parse(
            "c.toml",
            "pcap = \"x.pcap\"\nexport = [\"crane://127.0.0.1:9\", \"ipfix://127.0.0.1:4739?domain=3\", \"ipfix+tcp://127.0.0.1:4739\"]\n",
        )
        .unwrap();
        assert_eq!(many.export.len(), 3);
        assert!(many.validate().is_ok());
        let flags = Config {
            export: vec!["ipfix://127.0.0.1:1".into()],
            ..Config::default()
        };
        assert_eq!(many.clone().merge(flags).export, ["ipfix://127.0.0.1:1"]);
        assert_eq!(many.clone().merge(Config::default()).export.len(), 3);
        let two_crane = Config {
            pcap: Some("x.pcap".into()),
            export: vec!["crane://127.0.0.1:9".into(), "crane://127.0.0.1:10".into()],
            ..Config::default()
        };
        let e = two_crane
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("at most one crane://"), "{e}");
        let bad = Config {
            pcap: Some("x.pcap".into()),
            export: vec!["ipfix://127.0.0.1:1?max_message=10".into()],
            ..Config::default()
        };
        let e = bad
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("max_message"), "{e}");
    }
}
