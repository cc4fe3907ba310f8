//! The daemon's configuration: flags and TOML keys with the same names
//! (flag `--pdp-listen`, key `pdp_listen`); a flag overrides the file.
//! Everything is validated before any socket opens (`Config::validate`).

use crate::pdp::PdpConfig;
use crate::web::WebConfig;
use qosloop_runtime::telemetry::LogFormat;
use qosloop_schema::guard::{check_bind, ConnLimits};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {why}")]
    Invalid { key: &'static str, why: String },
}

/// Where the PDP listens unless told: loopback (RFC 2748's port).
pub const DEFAULT_PDP_LISTEN: &str = "127.0.0.1:3288";

fn invalid(key: &'static str, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        why: why.into(),
    }
}

/// Every setting, as flags and as TOML keys; all optional until merged.
#[derive(Clone, Debug, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Database URL: sqlite://FILE or postgres://…
    #[arg(long)]
    pub db: Option<String>,
    /// Policy repository as an LDIF file (the embedded default).
    #[arg(long, value_name = "FILE.ldif")]
    pub policies: Option<PathBuf>,
    /// Policy repository in LDAP: ldap://HOST:PORT, ldaps://…, ldapi://…
    #[arg(long, value_name = "URL")]
    pub ldap: Option<String>,
    /// Base DN of the policy entries in LDAP.
    #[arg(long, value_name = "DN")]
    pub ldap_base: Option<String>,
    /// Bind DN for LDAP simple bind (anonymous when absent).
    #[arg(long, value_name = "DN")]
    pub ldap_bind_dn: Option<String>,
    /// File holding the LDAP bind password.
    #[arg(long, value_name = "FILE")]
    pub ldap_password_file: Option<PathBuf>,
    /// CA (PEM) of the directory's certificate, for ldaps:// and StartTLS
    /// (default: the system's roots).
    #[arg(long, value_name = "FILE")]
    pub ldap_tls_ca: Option<PathBuf>,
    /// Upgrade an ldap:// connection with StartTLS before binding.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub ldap_starttls: Option<bool>,
    /// Where the PDP listens for enforcers (COPS), default 127.0.0.1:3288.
    /// An address beyond loopback needs mutual TLS (--pdp-tls-client-ca) or
    /// --allow-insecure-remote.
    #[arg(long, value_name = "HOST:PORT")]
    pub pdp_listen: Option<String>,
    /// Allow the PDP without mutual TLS, and the web API (which has no
    /// TLS), on addresses beyond loopback: anyone who reaches them can
    /// steer enforcement or read the state. Logged at WARN.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub allow_insecure_remote: Option<bool>,
    /// PDP connections open at once from one address (default 32).
    #[arg(long, value_name = "N")]
    pub pdp_max_connections_per_peer: Option<usize>,
    /// PDP connections open at once in total (default 256).
    #[arg(long, value_name = "N")]
    pub pdp_max_connections: Option<usize>,
    /// A write to an enforcer that makes no progress this long closes its
    /// session, ms (default 10000).
    #[arg(long, value_name = "MS")]
    pub pdp_write_timeout_ms: Option<u64>,
    /// COPS over TLS: the PDP's certificate (PEM), with --pdp-tls-key.
    #[arg(long, value_name = "FILE")]
    pub pdp_tls_cert: Option<PathBuf>,
    /// Key (PEM) of --pdp-tls-cert.
    #[arg(long, value_name = "FILE")]
    pub pdp_tls_key: Option<PathBuf>,
    /// CA (PEM) every enforcer's certificate must chain to (mutual TLS);
    /// without it enforcers connect with server authentication only.
    #[arg(long, value_name = "FILE")]
    pub pdp_tls_client_ca: Option<PathBuf>,
    /// Where the web API and page listen (none when absent); beyond
    /// loopback only with --allow-insecure-remote.
    #[arg(long, value_name = "HOST:PORT")]
    pub http: Option<String>,
    /// HTTP connections open at once from one address (default 32).
    #[arg(long, value_name = "N")]
    pub http_max_connections_per_peer: Option<usize>,
    /// HTTP connections open at once in total (default 256).
    #[arg(long, value_name = "N")]
    pub http_max_connections: Option<usize>,
    /// Time a client has to send a request's headers, ms (default 10000).
    #[arg(long, value_name = "MS")]
    pub http_header_timeout_ms: Option<u64>,
    /// An HTTP connection on which nothing moves this long is closed, ms
    /// (default 60000).
    #[arg(long, value_name = "MS")]
    pub http_idle_timeout_ms: Option<u64>,
    /// TOML file of API bearer tokens, stored as SHA-256 (docs/operations.md);
    /// without it the HTTP API is open.
    #[arg(long, value_name = "FILE")]
    pub api_tokens_file: Option<PathBuf>,
    /// Also accept the API tokens of the policy repository's
    /// `qosloopApiToken` entries (LDAP or LDIF), current with every change;
    /// the API then always needs a token (docs/security.md).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub api_tokens_directory: Option<bool>,
    /// Origins allowed to call the API from a browser (CORS), ORIGIN[,…];
    /// none by default.
    #[arg(long, value_delimiter = ',', value_name = "ORIGIN")]
    pub cors_allowed_origins: Option<Vec<String>>,
    /// HTTPS: the web server's certificate (PEM), with --http-tls-key.
    #[arg(long, value_name = "FILE")]
    pub http_tls_cert: Option<PathBuf>,
    /// Key (PEM) of --http-tls-cert.
    #[arg(long, value_name = "FILE")]
    pub http_tls_key: Option<PathBuf>,
    /// Prometheus /metrics on its own HOST:PORT (also on the HTTP port);
    /// beyond loopback only with --allow-insecure-remote.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<String>,
    /// A console query over more flow records than this is refused
    /// (1..=10^10, default 20000000).
    #[arg(long, value_name = "ROWS")]
    pub api_max_scan_rows: Option<u64>,
    /// The longest time range of a console query, seconds (1..=31536000,
    /// default 2678400: 31 days).
    #[arg(long, value_name = "SECONDS")]
    pub api_max_range_s: Option<u64>,
    /// Bandwidth manager poll interval in milliseconds (100..=60000, default 1000).
    #[arg(long, value_name = "MS")]
    pub interval_ms: Option<u64>,
    /// EWMA weight of the newest interval, in (0, 1] (default 0.5).
    #[arg(long, value_name = "W")]
    pub ewma_weight: Option<f64>,
    /// Hysteresis around each load threshold, as a fraction in [0, 0.5) (default 0.01).
    #[arg(long, value_name = "H")]
    pub hysteresis: Option<f64>,
    /// Minimum hold, ms, between a decision's action change caused by the
    /// load and a change back (0..=60000, default 0: off; docs/decisions.md).
    #[arg(long, value_name = "MS")]
    pub min_hold_ms: Option<u64>,
    /// How long, ms, the load must ask for another band before the change
    /// is taken (0..=60000, default 0: at once; docs/decisions.md).
    #[arg(long, value_name = "MS")]
    pub confirm_ms: Option<u64>,
    /// How long, ms, a link's windows without any record count as no
    /// measurement (0..=60000, default 0: as zero load; docs/decisions.md).
    #[arg(long, value_name = "MS")]
    pub gap_hold_ms: Option<u64>,
    /// How long after a poll the window it closes ends, ms: more than the
    /// meters' interim interval plus export delay (default 1200).
    #[arg(long, value_name = "MS")]
    pub rate_lag_ms: Option<u64>,
    /// Where rates come from: `records` (the bandwidth manager reads the
    /// flow records itself, the default) or `cluster` (the collector
    /// cluster's owners compute them into `rates`; the policy is published
    /// in SQL for them).
    #[arg(long, value_name = "SOURCE")]
    pub rates_from: Option<String>,
    /// Keepalive timer announced to enforcers, seconds (0..=65535, default 30).
    #[arg(long, value_name = "S")]
    pub ka_timer_secs: Option<u16>,
    /// How long a new connection may take to send OPN, ms (default 5000).
    #[arg(long, value_name = "MS")]
    pub open_timeout_ms: Option<u64>,
    /// How long a gap in flow ids is waited for before it is skipped, ms (default 5000).
    #[arg(long, value_name = "MS")]
    pub gap_timeout_ms: Option<u64>,
    /// Log format: text or json.
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// A knowledge-base `threshold` event when a user's average rate
    /// reaches KBPS (once per crossing; `*=KBPS` for every user without
    /// its own); repeatable. docs/kb.md.
    #[arg(long, value_name = "USER=KBPS")]
    pub kb_rate_threshold: Option<Vec<String>>,
}

impl Settings {
    /// Reads a TOML file with these keys.
    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Settings::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    pub fn from_toml(text: &str) -> Result<Settings, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim().to_owned())
    }

    /// `self` where set, else `base`.
    pub fn over(self, base: Settings) -> Settings {
        Settings {
            db: self.db.or(base.db),
            policies: self.policies.or(base.policies),
            ldap: self.ldap.or(base.ldap),
            ldap_base: self.ldap_base.or(base.ldap_base),
            ldap_bind_dn: self.ldap_bind_dn.or(base.ldap_bind_dn),
            ldap_password_file: self.ldap_password_file.or(base.ldap_password_file),
            ldap_tls_ca: self.ldap_tls_ca.or(base.ldap_tls_ca),
            ldap_starttls: self.ldap_starttls.or(base.ldap_starttls),
            pdp_listen: self.pdp_listen.or(base.pdp_listen),
            allow_insecure_remote: self.allow_insecure_remote.or(base.allow_insecure_remote),
            pdp_max_connections_per_peer: self
                .pdp_max_connections_per_peer
                .or(base.pdp_max_connections_per_peer),
            pdp_max_connections: self.pdp_max_connections.or(base.pdp_max_connections),
            pdp_write_timeout_ms: self.pdp_write_timeout_ms.or(base.pdp_write_timeout_ms),
            pdp_tls_cert: self.pdp_tls_cert.or(base.pdp_tls_cert),
            pdp_tls_key: self.pdp_tls_key.or(base.pdp_tls_key),
            pdp_tls_client_ca: self.pdp_tls_client_ca.or(base.pdp_tls_client_ca),
            http: self.http.or(base.http),
            http_max_connections_per_peer: self
                .http_max_connections_per_peer
                .or(base.http_max_connections_per_peer),
            http_max_connections: self.http_max_connections.or(base.http_max_connections),
            http_header_timeout_ms: self.http_header_timeout_ms.or(base.http_header_timeout_ms),
            http_idle_timeout_ms: self.http_idle_timeout_ms.or(base.http_idle_timeout_ms),
            api_tokens_file: self.api_tokens_file.or(base.api_tokens_file),
            api_tokens_directory: self.api_tokens_directory.or(base.api_tokens_directory),
            cors_allowed_origins: self.cors_allowed_origins.or(base.cors_allowed_origins),
            http_tls_cert: self.http_tls_cert.or(base.http_tls_cert),
            http_tls_key: self.http_tls_key.or(base.http_tls_key),
            metrics: self.metrics.or(base.metrics),
            api_max_scan_rows: self.api_max_scan_rows.or(base.api_max_scan_rows),
            api_max_range_s: self.api_max_range_s.or(base.api_max_range_s),
            interval_ms: self.interval_ms.or(base.interval_ms),
            ewma_weight: self.ewma_weight.or(base.ewma_weight),
            hysteresis: self.hysteresis.or(base.hysteresis),
            min_hold_ms: self.min_hold_ms.or(base.min_hold_ms),
            confirm_ms: self.confirm_ms.or(base.confirm_ms),
            gap_hold_ms: self.gap_hold_ms.or(base.gap_hold_ms),
            rate_lag_ms: self.rate_lag_ms.or(base.rate_lag_ms),
            rates_from: self.rates_from.or(base.rates_from),
            ka_timer_secs: self.ka_timer_secs.or(base.ka_timer_secs),
            open_timeout_ms: self.open_timeout_ms.or(base.open_timeout_ms),
            gap_timeout_ms: self.gap_timeout_ms.or(base.gap_timeout_ms),
            log_format: self.log_format.or(base.log_format),
            kb_rate_threshold: self.kb_rate_threshold.or(base.kb_rate_threshold),
        }
    }
}

/// Where policies come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicySource {
    File(PathBuf),
    Ldap {
        url: String,
        base: String,
        bind_dn: Option<String>,
        password_file: Option<PathBuf>,
        /// CA (PEM) the directory's certificate chains to (ldaps://, StartTLS);
        /// without it, the system's roots.
        tls_ca: Option<PathBuf>,
        /// StartTLS on an `ldap://` URL.
        starttls: bool,
    },
}

/// The validated configuration of the daemon.
#[derive(Clone, Debug)]
pub struct Config {
    pub db: String,
    pub policies: PolicySource,
    pub pdp_listen: SocketAddr,
    pub http: Option<SocketAddr>,
    /// `/metrics` on its own listener.
    pub metrics: Option<SocketAddr>,
    /// Listeners beyond loopback without mutual TLS were allowed.
    pub allow_insecure_remote: bool,
    /// Every enforcer must show a certificate (pdp_tls_client_ca).
    pub pdp_mutual_tls: bool,
    pub web: WebConfig,
    pub interval: Duration,
    pub ewma_weight: f64,
    pub hysteresis: f64,
    pub min_hold: Duration,
    pub confirm: Duration,
    pub gap_hold: Duration,
    pub rate_lag: Duration,
    pub rates_from: crate::server::RatesFrom,
    pub gap_timeout: Duration,
    pub pdp: PdpConfig,
    pub log_format: LogFormat,
    /// Rate thresholds of the knowledge base's `threshold` events.
    pub kb_rate_thresholds: crate::rate_thresholds::RateThresholds,
}

/// A bind DN needs a non-empty password (an empty one is an
/// unauthenticated bind, RFC 4513 §5.1.2, not the operator's intent); a
/// password needs a bind DN.
fn check_ldap_bind(bind_dn: Option<&str>, password_file: Option<&Path>) -> Result<(), ConfigError> {
    match (bind_dn, password_file) {
        (Some(dn), None) => Err(invalid(
            "ldap_password_file",
            format!("missing: ldap_bind_dn {dn:?} needs a password (an empty password would be an unauthenticated bind)"),
        )),
        (None, Some(_)) => Err(invalid(
            "ldap_bind_dn",
            "missing: ldap_password_file is given without the DN to bind as",
        )),
        (Some(dn), Some(file)) => {
            let password = std::fs::read_to_string(file).map_err(|e| {
                invalid("ldap_password_file", format!("{}: {e}", file.display()))
            })?;
            if password.trim_end_matches(['\n', '\r']).is_empty() {
                return Err(invalid(
                    "ldap_password_file",
                    format!("{} is empty: ldap_bind_dn {dn:?} would bind unauthenticated", file.display()),
                ));
            }
            Ok(())
        }
        (None, None) => Ok(()),
    }
}

fn addr(key: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .map_err(|e| invalid(key, format!("{s:?} is not HOST:PORT ({e})")))?
        .next()
        .ok_or_else(|| invalid(key, format!("{s:?} resolves to no address")))
}

impl Config {
    /// Logs a WARN line for each listener open beyond loopback without
    /// mutual TLS (allowed by `allow_insecure_remote`); called once logging
    /// is set up, since [`Config::validate`] runs before.
    pub fn warn_insecure_listeners(&self) {
        let _ = check_bind(
            self.pdp_listen,
            "PDP",
            self.pdp_mutual_tls,
            self.allow_insecure_remote,
        );
        if let Some(h) = self.http {
            let _ = check_bind(
                h,
                "HTTP",
                self.http_authenticated(),
                self.allow_insecure_remote,
            );
        }
        if let Some(m) = self.metrics {
            let _ = check_bind(m, "metrics", false, self.allow_insecure_remote);
        }
    }

    /// The HTTP API authenticates its clients over TLS (tokens and
    /// `http_tls_cert`): then it may listen beyond loopback.
    pub fn http_authenticated(&self) -> bool {
        self.web.tls.is_some() && self.web.auth.is_enforced()
    }

    /// Checks every setting; `need_db` is false for `--check`.
    pub fn validate(s: Settings, need_db: bool) -> Result<Config, ConfigError> {
        let db = match s.db {
            Some(db)
                if db.starts_with("sqlite:")
                    || db.starts_with("postgres://")
                    || db.starts_with("postgresql://") =>
            {
                db
            }
            Some(db) => {
                return Err(invalid(
                    "db",
                    format!("{db:?}: use sqlite://FILE or postgres://…"),
                ))
            }
            None if need_db => {
                return Err(invalid("db", "missing (sqlite://FILE or postgres://…)"))
            }
            None => String::new(),
        };
        let policies = match (s.policies, s.ldap) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "policies",
                    "give either policies (LDIF) or ldap, not both",
                ))
            }
            (Some(p), None) => PolicySource::File(p),
            (None, Some(url)) => {
                if !["ldap://", "ldaps://", "ldapi://"]
                    .iter()
                    .any(|p| url.starts_with(p))
                {
                    return Err(invalid(
                        "ldap",
                        format!("{url:?}: expected ldap://, ldaps:// or ldapi://"),
                    ));
                }
                let base = s.ldap_base.ok_or_else(|| {
                    invalid("ldap_base", "missing: the base DN of the policy entries")
                })?;
                let starttls = s.ldap_starttls.unwrap_or(false);
                if starttls && !url.starts_with("ldap://") {
                    return Err(invalid("ldap_starttls", "only for an ldap:// URL"));
                }
                check_ldap_bind(s.ldap_bind_dn.as_deref(), s.ldap_password_file.as_deref())?;
                // The CA is read now, so a missing or unreadable file is a
                // configuration error before anything starts, not a failed
                // connection later.
                if let Some(ca) = &s.ldap_tls_ca {
                    qosloop_runtime::tls::client_config_with(ca, None)
                        .map_err(|e| invalid("ldap_tls_ca", e.to_string()))?;
                }
                PolicySource::Ldap {
                    url,
                    base,
                    bind_dn: s.ldap_bind_dn,
                    password_file: s.ldap_password_file,
                    tls_ca: s.ldap_tls_ca,
                    starttls,
                }
            }
            (None, None) => {
                return Err(invalid(
                    "policies",
                    "missing: give policies (LDIF file) or ldap",
                ))
            }
        };
        let pdp_listen = addr(
            "pdp_listen",
            s.pdp_listen.as_deref().unwrap_or(DEFAULT_PDP_LISTEN),
        )?;
        let tls = match (&s.pdp_tls_cert, &s.pdp_tls_key) {
            (Some(cert), Some(key)) => Some(
                qosloop_runtime::tls::server_config_with(cert, key, s.pdp_tls_client_ca.as_deref())
                    .map_err(|e| invalid("pdp_tls_cert", e.to_string()))?,
            ),
            (None, None) if s.pdp_tls_client_ca.is_some() => {
                return Err(invalid(
                    "pdp_tls_client_ca",
                    "needs pdp_tls_cert and pdp_tls_key",
                ))
            }
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "pdp_tls_cert",
                    "pdp_tls_cert and pdp_tls_key go together",
                ))
            }
        };
        let http = s.http.as_deref().map(|h| addr("http", h)).transpose()?;
        let metrics = s
            .metrics
            .as_deref()
            .map(|m| addr("metrics", m))
            .transpose()?;
        let allow_insecure_remote = s.allow_insecure_remote.unwrap_or(false);
        let (mut auth, http_tls) = crate::auth::web_security(
            s.api_tokens_file.as_deref(),
            s.cors_allowed_origins.clone().unwrap_or_default(),
            s.http_tls_cert.as_deref(),
            s.http_tls_key.as_deref(),
        )
        .map_err(|e| invalid(e.key, e.why))?;
        if s.api_tokens_directory.unwrap_or(false) {
            // The tokens themselves arrive with the policy (main.rs).
            auth = auth.require_directory_tokens();
        }
        // Who can reach a port can steer the loop: decided before any
        // socket opens.
        let mutual_tls = tls.is_some() && s.pdp_tls_client_ca.is_some();
        check_bind(pdp_listen, "PDP", mutual_tls, allow_insecure_remote)
            .map_err(|e| invalid("pdp_listen", e))?;
        if let Some(h) = http {
            let authenticated = http_tls.is_some() && auth.is_enforced();
            check_bind(h, "HTTP", authenticated, allow_insecure_remote)
                .map_err(|e| invalid("http", e))?;
        }
        if let Some(m) = metrics {
            check_bind(m, "metrics", false, allow_insecure_remote)
                .map_err(|e| invalid("metrics", e))?;
        }
        let limits = |key_peer: &'static str,
                      peer: Option<usize>,
                      key_total: &'static str,
                      total: Option<usize>| {
            let d = ConnLimits::default();
            let l = ConnLimits {
                per_peer: peer.unwrap_or(d.per_peer),
                total: total.unwrap_or(d.total),
            };
            if l.per_peer == 0 {
                return Err(invalid(key_peer, "must be above 0"));
            }
            if l.total == 0 {
                return Err(invalid(key_total, "must be above 0"));
            }
            Ok(l)
        };
        let pdp_limits = limits(
            "pdp_max_connections_per_peer",
            s.pdp_max_connections_per_peer,
            "pdp_max_connections",
            s.pdp_max_connections,
        )?;
        let http_limits = limits(
            "http_max_connections_per_peer",
            s.http_max_connections_per_peer,
            "http_max_connections",
            s.http_max_connections,
        )?;
        let millis = |key: &'static str, v: Option<u64>, default: u64| {
            let ms = v.unwrap_or(default);
            if !(1..=3_600_000).contains(&ms) {
                return Err(invalid(key, format!("{ms}: must be 1..=3600000")));
            }
            Ok(Duration::from_millis(ms))
        };
        let write_timeout = millis("pdp_write_timeout_ms", s.pdp_write_timeout_ms, 10_000)?;
        let web = WebConfig {
            limits: http_limits,
            header_timeout: millis("http_header_timeout_ms", s.http_header_timeout_ms, 10_000)?,
            idle_timeout: millis("http_idle_timeout_ms", s.http_idle_timeout_ms, 60_000)?,
            auth,
            tls: http_tls,
            console: {
                let defaults = crate::console::ConsoleLimits::default();
                let rows = s.api_max_scan_rows.unwrap_or(defaults.max_scan_rows as u64);
                if !(1..=10_000_000_000).contains(&rows) {
                    return Err(invalid(
                        "api_max_scan_rows",
                        format!("{rows}: must be 1..=10000000000"),
                    ));
                }
                let range = s.api_max_range_s.unwrap_or(defaults.max_range.as_secs());
                if !(1..=31_536_000).contains(&range) {
                    return Err(invalid(
                        "api_max_range_s",
                        format!("{range}: must be 1..=31536000"),
                    ));
                }
                crate::console::ConsoleLimits {
                    max_scan_rows: rows as i64,
                    max_range: Duration::from_secs(range),
                    ..defaults
                }
            },
        };
        let interval_ms = s.interval_ms.unwrap_or(1000);
        if !(100..=60_000).contains(&interval_ms) {
            return Err(invalid(
                "interval_ms",
                format!("{interval_ms}: must be 100..=60000"),
            ));
        }
        let ewma_weight = s.ewma_weight.unwrap_or(0.5);
        if !(ewma_weight > 0.0 && ewma_weight <= 1.0) {
            return Err(invalid(
                "ewma_weight",
                format!("{ewma_weight}: must be in (0, 1]"),
            ));
        }
        let hysteresis = s.hysteresis.unwrap_or(0.01);
        if !(0.0..0.5).contains(&hysteresis) {
            return Err(invalid(
                "hysteresis",
                format!("{hysteresis}: must be in [0, 0.5)"),
            ));
        }
        let min_hold_ms = s.min_hold_ms.unwrap_or(0);
        if min_hold_ms > 60_000 {
            return Err(invalid(
                "min_hold_ms",
                format!("{min_hold_ms}: must be at most 60000"),
            ));
        }
        let confirm_ms = s.confirm_ms.unwrap_or(0);
        let gap_hold_ms = s.gap_hold_ms.unwrap_or(0);
        for (field, v) in [("confirm_ms", confirm_ms), ("gap_hold_ms", gap_hold_ms)] {
            if v > 60_000 {
                return Err(invalid(field, format!("{v}: must be at most 60000")));
            }
        }
        let rate_lag_ms = s.rate_lag_ms.unwrap_or(1200);
        if rate_lag_ms > 60_000 {
            return Err(invalid(
                "rate_lag_ms",
                format!("{rate_lag_ms}: must be at most 60000"),
            ));
        }
        let rates_from = match s.rates_from.as_deref() {
            None | Some("records") => crate::server::RatesFrom::Records,
            Some("cluster") => crate::server::RatesFrom::Cluster,
            Some(other) => {
                return Err(invalid(
                    "rates_from",
                    format!("{other:?}: use records or cluster"),
                ))
            }
        };
        let open_timeout_ms = s.open_timeout_ms.unwrap_or(5000);
        if open_timeout_ms == 0 {
            return Err(invalid("open_timeout_ms", "must be above 0"));
        }
        let log_format = match s.log_format.as_deref() {
            None => LogFormat::Text,
            Some(f) => f.parse().map_err(|e: String| invalid("log_format", e))?,
        };
        let kb_rate_thresholds = crate::rate_thresholds::RateThresholds::parse(
            s.kb_rate_threshold.as_deref().unwrap_or_default(),
        )
        .map_err(|why| invalid("kb_rate_threshold", why))?;
        Ok(Config {
            db,
            policies,
            pdp_listen,
            http,
            metrics,
            allow_insecure_remote,
            pdp_mutual_tls: mutual_tls,
            web,
            interval: Duration::from_millis(interval_ms),
            ewma_weight,
            hysteresis,
            min_hold: Duration::from_millis(min_hold_ms),
            confirm: Duration::from_millis(confirm_ms),
            gap_hold: Duration::from_millis(gap_hold_ms),
            rate_lag: Duration::from_millis(rate_lag_ms),
            rates_from,
            gap_timeout: Duration::from_millis(s.gap_timeout_ms.unwrap_or(5000)),
            pdp: PdpConfig {
                ka_timer_secs: s.ka_timer_secs.unwrap_or(30),
                open_timeout: Duration::from_millis(open_timeout_ms),
                write_timeout,
                limits: pdp_limits,
                tls,
                ..PdpConfig::default()
            },
            log_format,
            kb_rate_thresholds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_file_parses_and_validates() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("example.toml");
        let s = Settings::from_file(&path).unwrap();
        let c = Config::validate(s, true).unwrap();
        assert_eq!(c.interval, Duration::from_secs(1));
        assert_eq!(c.pdp_listen.port(), 3288);
        assert!(matches!(c.policies, PolicySource::File(_)));
    }

    #[test]
    fn listeners_are_loopback_unless_allowed_or_mutually_authenticated() {
        // Issue 11 item 5: the PDP bound 0.0.0.0:3288 by default.
        let base = || Settings::from_toml("db = \"sqlite://a.db\"\npolicies = \"p.ldif\"").unwrap();
        let c = Config::validate(base(), true).unwrap();
        assert_eq!(c.pdp_listen, "127.0.0.1:3288".parse().unwrap());
        assert!(!c.allow_insecure_remote);
        for (s, key) in [
            (
                Settings {
                    pdp_listen: Some("0.0.0.0:3288".into()),
                    ..base()
                },
                "pdp_listen",
            ),
            (
                Settings {
                    http: Some("0.0.0.0:8080".into()),
                    ..base()
                },
                "http",
            ),
        ] {
            let e = Config::validate(s.clone(), true).unwrap_err().to_string();
            assert!(
                e.starts_with(key) && e.contains("--allow-insecure-remote"),
                "{e}"
            );
            let allowed = Settings {
                allow_insecure_remote: Some(true),
                ..s
            };
            assert!(
                Config::validate(allowed, true)
                    .unwrap()
                    .allow_insecure_remote
            );
        }
    }

    #[test]
    fn flags_override_the_file() {
        let file =
            Settings::from_toml("db = \"sqlite://a.db\"\ninterval_ms = 500\npolicies = \"p.ldif\"")
                .unwrap();
        let flags = Settings {
            interval_ms: Some(100),
            ..Settings::default()
        };
        let c = Config::validate(flags.over(file), true).unwrap();
        assert_eq!(c.interval, Duration::from_millis(100));
        assert_eq!(c.db, "sqlite://a.db");
    }

    #[test]
    fn bad_settings_name_their_key() {
        let base = || Settings::from_toml("db = \"sqlite://a.db\"\npolicies = \"p.ldif\"").unwrap();
        let cases: Vec<(Settings, &str)> = vec![
            (
                Settings {
                    interval_ms: Some(50),
                    ..base()
                },
                "interval_ms",
            ),
            (
                Settings {
                    ewma_weight: Some(0.0),
                    ..base()
                },
                "ewma_weight",
            ),
            (
                Settings {
                    hysteresis: Some(0.7),
                    ..base()
                },
                "hysteresis",
            ),
            (
                Settings {
                    min_hold_ms: Some(60_001),
                    ..base()
                },
                "min_hold_ms",
            ),
            (
                Settings {
                    confirm_ms: Some(70_000),
                    ..base()
                },
                "confirm_ms",
            ),
            (
                Settings {
                    gap_hold_ms: Some(60_001),
                    ..base()
                },
                "gap_hold_ms",
            ),
            (
                Settings {
                    pdp_listen: Some("nowhere".into()),
                    ..base()
                },
                "pdp_listen",
            ),
            (
                Settings {
                    db: Some("mysql://x".into()),
                    ..base()
                },
                "db",
            ),
            (
                Settings {
                    ldap: Some("ldap://x".into()),
                    ..base()
                },
                "policies",
            ),
            (
                Settings {
                    log_format: Some("xml".into()),
                    ..base()
                },
                "log_format",
            ),
        ];
        for (s, key) in cases {
            let e = Config::validate(s, true).unwrap_err().to_string();
            assert!(e.starts_with(key), "{key}: {e}");
        }
        for (toml, key) in [
            ("pdp_max_connections = 0", "pdp_max_connections"),
            (
                "pdp_max_connections_per_peer = 0",
                "pdp_max_connections_per_peer",
            ),
            ("http_max_connections = 0", "http_max_connections"),
            ("pdp_write_timeout_ms = 0", "pdp_write_timeout_ms"),
            ("http_header_timeout_ms = 0", "http_header_timeout_ms"),
            ("http_idle_timeout_ms = 0", "http_idle_timeout_ms"),
            ("api_max_scan_rows = 0", "api_max_scan_rows"),
            ("api_max_range_s = 0", "api_max_range_s"),
        ] {
            let s = Settings::from_toml(&format!(
                "{toml}\ndb = \"sqlite://a.db\"\npolicies = \"p.ldif\""
            ))
            .unwrap();
            let e = Config::validate(s, true).unwrap_err().to_string();
            assert!(e.starts_with(key), "{key}: {e}");
        }
        let e = Settings::from_toml("intervall_ms = 5").unwrap_err();
        assert!(e.contains("intervall_ms"), "{e}");
    }
}
