//! The collector's configuration: TOML file, then flags; validated before
//! any socket opens.

use qosloop_schema::ie;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Everything `qosloop-collector` can be told. Every flag has a key here.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Export listen address (`HOST:PORT`).
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
}

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

    /// Checks what can be checked without opening anything.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, problem: String| Err(ConfigError::Invalid { field, problem });
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad(
                "listen",
                format!(
                    "{:?} is not HOST:PORT (an IP address and a port)",
                    self.listen
                ),
            );
        }
        let db_ok = self.db.starts_with("sqlite:")
            || self.db.starts_with("postgres://")
            || self.db.starts_with("postgresql://")
            || self.db == "discard:";
        if !db_ok {
            return bad(
                "db",
                format!(
                    "{:?}: use sqlite://FILE, postgres://… or discard:",
                    crate::redact(&self.db)
                ),
            );
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
        ] {
            if v == 0 {
                return bad(field, "must be at least 1".into());
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
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_parses_and_validates() {
        let c = Config::from_toml(include_str!("../example.toml")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.listen, "127.0.0.1:4740");
        assert!(c.db.starts_with("sqlite://"));
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
    }
}
