//! The enforcer's configuration: a TOML file whose keys match the flags,
//! flags overriding the file, validated before any socket opens.

use crate::enforcer::{EnforcerConfig, DEFAULT_QDISC_MAJOR};
use qosloop_schema::Kbps;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Configuration that cannot be used; the binary exits 64 on it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

/// The TOML file; every key is also a flag of the same name (`-` for `_`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// PDPs in order of preference, `HOST:PORT`.
    #[serde(default)]
    pub pdp: Vec<String>,
    pub interface: Option<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    /// Capacity of the interface (`10mbit`, `1gbit`, or kbit/s as a number).
    pub capacity: Option<String>,
    /// Major of the enforcer's qdisc handle, hex (`e5`).
    pub qdisc_handle: Option<String>,
    /// `egress` (default) or `ingress` (shaped on an IFB device).
    pub direction: Option<String>,
    /// A JSON list of decisions applied at start (no PDP needed).
    pub decisions: Option<PathBuf>,
    /// Print the operations instead of making them.
    #[serde(default)]
    pub dry_run: bool,
    /// `text` or `json`.
    pub log_format: Option<String>,
    /// Seconds between COPS keepalives.
    pub keepalive_s: Option<u64>,
    /// COPS over TLS: the CA the PDPs' certificates chain to (PEM).
    pub pdp_tls_ca: Option<PathBuf>,
    /// This enforcer's certificate and key (PEM), for PDPs that ask for one.
    pub pdp_tls_cert: Option<PathBuf>,
    pub pdp_tls_key: Option<PathBuf>,
    /// Prometheus `/metrics` on this `HOST:PORT` (loopback only).
    pub metrics: Option<String>,
    /// Leave the HTB class statistics out of the accounting RPT: for a
    /// policy server older than them, which refuses a report carrying them.
    #[serde(default)]
    pub no_class_accounting: bool,
}

impl Config {
    /// Reads and parses a TOML file; errors name the file and the line.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| {
                text.as_bytes()[..s.start.min(text.len())]
                    .iter()
                    .filter(|&&c| c == b'\n')
                    .count()
                    + 1
            });
            ConfigError::Parse {
                path: path.to_owned(),
                message: match line {
                    Some(l) => format!("line {l}: {}", e.message()),
                    None => e.message().to_owned(),
                },
            }
        })
    }

    /// The validated settings of the kernel side.
    pub fn enforcer(&self) -> Result<EnforcerConfig, ConfigError> {
        let interface =
            self.interface
                .clone()
                .filter(|s| !s.is_empty())
                .ok_or(ConfigError::Invalid {
                    field: "interface",
                    message: "required (the interface to enforce on)".into(),
                })?;
        let capacity = match &self.capacity {
            None => Kbps(1_000_000),
            Some(s) => s.parse::<Kbps>().map_err(|e| ConfigError::Invalid {
                field: "capacity",
                message: e.to_string(),
            })?,
        };
        if capacity.0 == 0 {
            return Err(ConfigError::Invalid {
                field: "capacity",
                message: "must be above 0".into(),
            });
        }
        let qdisc_major = match &self.qdisc_handle {
            None => DEFAULT_QDISC_MAJOR,
            Some(s) => u16::from_str_radix(s.trim_end_matches(':'), 16)
                .ok()
                .filter(|m| (1..=0xfe).contains(m))
                .ok_or_else(|| ConfigError::Invalid {
                    field: "qdisc_handle",
                    message: format!(
                        "{s:?} is not a hex qdisc major in 1..fe (group qdiscs take MAJ00..MAJfe)"
                    ),
                })?,
        };
        for r in &self.roles {
            if r.is_empty() || r.contains(',') {
                return Err(ConfigError::Invalid {
                    field: "roles",
                    message: format!("{r:?} is not a role name"),
                });
            }
        }
        let direction = match self.direction.as_deref() {
            None | Some("egress") => qosloop_schema::Direction::Egress,
            Some("ingress") => qosloop_schema::Direction::Ingress,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    field: "direction",
                    message: format!("{other:?}: egress or ingress"),
                })
            }
        };
        Ok(EnforcerConfig {
            direction,
            interface,
            roles: self.roles.clone(),
            capacity,
            qdisc_major,
        })
    }

    /// The TLS client configuration for COPS, when `pdp_tls_ca` is set.
    pub fn pdp_tls(
        &self,
    ) -> Result<Option<std::sync::Arc<tokio_rustls::rustls::ClientConfig>>, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            field: "pdp_tls_ca",
            message,
        };
        let identity = match (&self.pdp_tls_cert, &self.pdp_tls_key) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            (None, None) => None,
            _ => return Err(invalid("pdp_tls_cert and pdp_tls_key go together".into())),
        };
        match &self.pdp_tls_ca {
            None if identity.is_some() => {
                Err(invalid("a client certificate needs pdp_tls_ca too".into()))
            }
            None => Ok(None),
            Some(ca) => qosloop_runtime::tls::client_config_with(ca, identity)
                .map(Some)
                .map_err(|e| invalid(e.to_string())),
        }
    }

    /// The `metrics` address, if any (loopback only: the enforcer has no
    /// flag to open a port wider).
    pub fn metrics_addr(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        let Some(m) = &self.metrics else {
            return Ok(None);
        };
        use std::net::ToSocketAddrs;
        let invalid = |message: String| ConfigError::Invalid {
            field: "metrics",
            message,
        };
        let addr = m
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| invalid(format!("{m:?} is not HOST:PORT")))?;
        qosloop_schema::guard::check_bind(addr, "metrics", false, false).map_err(invalid)?;
        Ok(Some(addr))
    }

    /// Checks the PDP TLS files the daemon will use (readable, parseable,
    /// a key that matches), so that a mistake there exits 64 before any
    /// kernel object is touched rather than when the first PDP is dialled.
    pub fn check_pdp_tls(&self) -> Result<(), ConfigError> {
        self.pdp_tls().map(|_| ())
    }

    /// PDP addresses, checked to be `HOST:PORT`.
    pub fn pdps(&self) -> Result<Vec<String>, ConfigError> {
        for p in &self.pdp {
            let ok = p
                .rsplit_once(':')
                .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                return Err(ConfigError::Invalid {
                    field: "pdp",
                    message: format!("{p:?} is not HOST:PORT"),
                });
            }
        }
        Ok(self.pdp.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_toml_parses_and_validates() {
        let text = include_str!("../example.toml");
        let c = Config::parse(text, Path::new("example.toml")).unwrap();
        let e = c.enforcer().unwrap();
        assert_eq!(e.interface, "eth1");
        assert_eq!(e.capacity, Kbps(10_000));
        assert_eq!(e.qdisc_major, 0xe5);
        assert_eq!(c.pdps().unwrap().len(), 2);
    }

    #[test]
    fn bad_config_names_field_and_line() {
        let err = Config::parse("interface = \"x\"\nbogus = 1\n", Path::new("f.toml")).unwrap_err();
        assert!(err.to_string().contains("f.toml: line 2"), "{err}");
        let c = Config {
            interface: Some("eth0".into()),
            capacity: Some("fast".into()),
            ..Config::default()
        };
        assert!(c
            .enforcer()
            .unwrap_err()
            .to_string()
            .starts_with("capacity:"));
        let c = Config {
            pdp: vec!["nohost".into()],
            ..Config::default()
        };
        assert!(c.pdps().unwrap_err().to_string().starts_with("pdp:"));
        assert!(Config::default()
            .enforcer()
            .unwrap_err()
            .to_string()
            .starts_with("interface:"));
    }
}
