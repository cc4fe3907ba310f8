//! The meter's DPMI flags: `--dpmi-point NAME --dpmi-controller HOST:PORT`
//! (with `--interface`) runs a measurement point instead of a meter.

use super::cryptopan::CryptoPan;
use super::http::ControllerTls;
use super::point::PointConfig;
use qosloop_schema::dpmi::DEFAULT_CAPLEN;
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// DPMI flags of `qosloop-meter`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DpmiFlags {
    /// Run as the DPMI measurement point NAME on --interface.
    #[arg(long, value_name = "NAME", requires = "dpmi_controller")]
    pub dpmi_point: Option<String>,
    /// The controller (the policy server's web API): `HOST:PORT` or
    /// `http://HOST:PORT` (plain), `https://HOST:PORT` (TLS, with
    /// --dpmi-controller-ca).
    #[arg(long, value_name = "URL", requires = "dpmi_point")]
    pub dpmi_controller: Option<String>,
    /// The CA (PEM) the controller's certificate must chain to, for the
    /// host of an `https://` --dpmi-controller.
    #[arg(long, value_name = "FILE", requires = "dpmi_point")]
    pub dpmi_controller_ca: Option<PathBuf>,
    /// Allow a token to travel over plain HTTP to a controller that is not
    /// on loopback (refused at start without this flag).
    #[arg(long, requires = "dpmi_point")]
    pub dpmi_insecure: bool,
    /// A file holding the bearer token the point presents to the
    /// controller (an admin token of its `api_tokens_file`).
    #[arg(long, value_name = "FILE", requires = "dpmi_point")]
    pub dpmi_token_file: Option<PathBuf>,
    /// Filters this point runs at most (default 8).
    #[arg(long, value_name = "N")]
    pub dpmi_max_filters: Option<u32>,
    /// The largest caplen a consumer may have (default 128: headers only).
    #[arg(long, value_name = "BYTES")]
    pub dpmi_max_caplen: Option<u32>,
    /// Frames queued per consumer before its frames are dropped (default 4096).
    #[arg(long, value_name = "FRAMES")]
    pub dpmi_consumer_buffer: Option<usize>,
    /// Filter list poll and report interval in ms (default 500).
    #[arg(long, value_name = "MS")]
    pub dpmi_poll_ms: Option<u64>,
    /// The anonymisation key: a file of 64 hex digits (32 bytes); without
    /// it a key is made up at start and lives only in this process.
    #[arg(long, value_name = "FILE")]
    pub dpmi_key: Option<PathBuf>,
    /// Speak TLS to every consumer, checking its certificate (for the IP
    /// address of its request's `consumer`) against the CA in FILE (PEM).
    #[arg(long, value_name = "FILE")]
    pub dpmi_consumer_ca: Option<PathBuf>,
    /// The point's own certificate (PEM), presented to every consumer
    /// (with --dpmi-consumer-ca and --dpmi-tls-key).
    #[arg(long, value_name = "FILE", requires = "dpmi_tls_key")]
    pub dpmi_tls_cert: Option<PathBuf>,
    /// Key (PEM) of --dpmi-tls-cert.
    #[arg(long, value_name = "FILE", requires = "dpmi_tls_cert")]
    pub dpmi_tls_key: Option<PathBuf>,
    /// Anonymise the addresses of every flow record this meter exports or
    /// writes (Crypto-PAn) with the key in FILE (64 hex digits).
    #[arg(long, value_name = "FILE")]
    pub flows_anonymise_key: Option<PathBuf>,
}

/// A DPMI flag that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{flag}: {reason}")]
pub struct DpmiFlagError {
    pub flag: &'static str,
    pub reason: String,
}

fn flag_err(flag: &'static str, reason: impl Into<String>) -> DpmiFlagError {
    DpmiFlagError {
        flag,
        reason: reason.into(),
    }
}

/// Reads a token file: one token, surrounding white space ignored.
pub fn read_token(path: &std::path::Path) -> Result<String, DpmiFlagError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| flag_err("--dpmi-token-file", format!("{}: {e}", path.display())))?;
    let token = text.trim();
    if !super::http::valid_token(token) {
        return Err(flag_err(
            "--dpmi-token-file",
            format!(
                "{}: not one token of 1-4096 visible characters",
                path.display()
            ),
        ));
    }
    Ok(token.to_owned())
}

/// Reads a key file of 64 hex digits.
pub fn read_key(path: &std::path::Path) -> Result<CryptoPan, DpmiFlagError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| flag_err("--dpmi-key", format!("{}: {e}", path.display())))?;
    let hex = text.trim();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(flag_err(
            "--dpmi-key",
            format!("{}: not 64 hex digits", path.display()),
        ));
    }
    let mut key = [0u8; 32];
    for (i, k) in key.iter_mut().enumerate() {
        *k = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| flag_err("--dpmi-key", "not hex"))?;
    }
    Ok(CryptoPan::new(&key))
}

impl DpmiFlags {
    /// `sink`, anonymising when --flows-anonymise-key is given.
    pub fn wrap_sink(
        &self,
        sink: Box<dyn crate::RecordSink>,
    ) -> Result<Box<dyn crate::RecordSink>, DpmiFlagError> {
        match &self.flows_anonymise_key {
            None => Ok(sink),
            Some(path) => {
                let key =
                    read_key(path).map_err(|e| flag_err("--flows-anonymise-key", e.reason))?;
                Ok(Box::new(super::AnonymisingSink::new(sink, key)))
            }
        }
    }

    /// The point's settings, when --dpmi-point is given.
    pub fn point(&self, interface: Option<&str>) -> Result<Option<PointConfig>, DpmiFlagError> {
        let (Some(name), Some(ctl)) = (&self.dpmi_point, &self.dpmi_controller) else {
            return Ok(None);
        };
        let interface = interface.ok_or_else(|| flag_err("--dpmi-point", "needs --interface"))?;
        let (https, hostport) = if let Some(rest) = ctl.strip_prefix("https://") {
            (true, rest)
        } else {
            (false, ctl.strip_prefix("http://").unwrap_or(ctl))
        };
        let hostport = hostport.strip_suffix('/').unwrap_or(hostport);
        let controller = hostport
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| {
                flag_err(
                    "--dpmi-controller",
                    format!("{ctl:?} is not HOST:PORT, http://HOST:PORT or https://HOST:PORT"),
                )
            })?;
        let max_filters = self.dpmi_max_filters.unwrap_or(8);
        if !(1..=1024).contains(&max_filters) {
            return Err(flag_err("--dpmi-max-filters", "must be 1..=1024"));
        }
        let max_caplen = self.dpmi_max_caplen.unwrap_or(DEFAULT_CAPLEN);
        if !(34..=65_535).contains(&max_caplen) {
            return Err(flag_err("--dpmi-max-caplen", "must be 34..=65535"));
        }
        let consumer_buffer = self.dpmi_consumer_buffer.unwrap_or(4096);
        if !(1..=1 << 20).contains(&consumer_buffer) {
            return Err(flag_err("--dpmi-consumer-buffer", "must be 1..=1048576"));
        }
        let poll = Duration::from_millis(self.dpmi_poll_ms.unwrap_or(500).clamp(50, 60_000));
        let key = self
            .dpmi_key
            .as_deref()
            .map(read_key)
            .transpose()?
            .map(Arc::new);
        let token = self
            .dpmi_token_file
            .as_deref()
            .map(read_token)
            .transpose()?;
        let controller_tls = match (https, &self.dpmi_controller_ca) {
            (true, Some(ca)) => Some(ControllerTls {
                config: qosloop_runtime::tls::client_config_with(ca, None)
                    .map_err(|e| flag_err("--dpmi-controller-ca", e.to_string()))?,
                name: qosloop_runtime::tls::server_name(hostport)
                    .map_err(|e| flag_err("--dpmi-controller", e))?,
            }),
            (true, None) => {
                return Err(flag_err(
                    "--dpmi-controller-ca",
                    "an https:// controller needs the CA its certificate chains to",
                ))
            }
            (false, Some(_)) => {
                return Err(flag_err(
                    "--dpmi-controller-ca",
                    "given for a plain http controller (write https://HOST:PORT)",
                ))
            }
            (false, None) => None,
        };
        if controller_tls.is_none()
            && token.is_some()
            && !controller.ip().is_loopback()
            && !self.dpmi_insecure
        {
            return Err(flag_err(
                "--dpmi-controller",
                format!(
                    "the token would cross the network in the clear to {controller}: \
                     use https:// with --dpmi-controller-ca, or --dpmi-insecure on a trusted path"
                ),
            ));
        }
        let identity = match (&self.dpmi_tls_cert, &self.dpmi_tls_key) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            (None, None) => None,
            _ => {
                return Err(flag_err(
                    "--dpmi-tls-cert",
                    "--dpmi-tls-cert and --dpmi-tls-key go together",
                ))
            }
        };
        if identity.is_some() && self.dpmi_consumer_ca.is_none() {
            return Err(flag_err(
                "--dpmi-tls-cert",
                "the point's certificate is for TLS consumer streams: needs --dpmi-consumer-ca",
            ));
        }
        let consumer_tls = self
            .dpmi_consumer_ca
            .as_deref()
            .map(|ca| qosloop_runtime::tls::client_config_with(ca, identity))
            .transpose()
            .map_err(|e| flag_err("--dpmi-consumer-ca", e.to_string()))?;
        Ok(Some(PointConfig {
            name: name.clone(),
            controller,
            token,
            controller_tls,
            interface: interface.to_owned(),
            max_filters,
            max_caplen,
            consumer_buffer,
            poll,
            key,
            consumer_tls,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> DpmiFlags {
        DpmiFlags {
            dpmi_point: Some("mp1".into()),
            dpmi_controller: Some("127.0.0.1:8080".into()),
            ..DpmiFlags::default()
        }
    }

    #[test]
    fn a_point_needs_an_interface_and_sane_numbers() {
        assert!(DpmiFlags::default().point(Some("eth0")).unwrap().is_none());
        let p = flags().point(Some("eth0")).unwrap().unwrap();
        assert_eq!(
            (p.max_filters, p.max_caplen, p.consumer_buffer),
            (8, DEFAULT_CAPLEN, 4096)
        );
        assert_eq!(flags().point(None).unwrap_err().flag, "--dpmi-point");
        assert!(p.consumer_tls.is_none());
        let mut f = flags();
        f.dpmi_consumer_ca = Some("/nonexistent/ca.pem".into());
        assert_eq!(
            f.point(Some("eth0")).unwrap_err().flag,
            "--dpmi-consumer-ca"
        );
        let mut f = flags();
        f.dpmi_controller = Some("nowhere".into());
        assert_eq!(f.point(Some("eth0")).unwrap_err().flag, "--dpmi-controller");
        let mut f = flags();
        f.dpmi_max_filters = Some(0);
        assert_eq!(
            f.point(Some("eth0")).unwrap_err().flag,
            "--dpmi-max-filters"
        );
        let mut f = flags();
        f.dpmi_max_caplen = Some(10);
        assert_eq!(f.point(Some("eth0")).unwrap_err().flag, "--dpmi-max-caplen");
    }

    /// A token over plain HTTP beyond loopback is refused unless the
    /// operator says the path is trusted; https needs its CA.
    #[test]
    fn a_token_does_not_cross_the_network_in_the_clear() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret").unwrap();
        let remote = |ctl: &str| DpmiFlags {
            dpmi_controller: Some(ctl.into()),
            dpmi_token_file: Some(token.clone()),
            ..flags()
        };
        let e = remote("192.0.2.1:8080").point(Some("eth0")).unwrap_err();
        assert_eq!(e.flag, "--dpmi-controller");
        assert!(e.reason.contains("in the clear"), "{e}");
        let e = remote("http://192.0.2.1:8080")
            .point(Some("eth0"))
            .unwrap_err();
        assert!(e.reason.contains("--dpmi-insecure"), "{e}");
        let mut f = remote("http://192.0.2.1:8080/");
        f.dpmi_insecure = true;
        let p = f.point(Some("eth0")).unwrap().unwrap();
        assert!(p.controller_tls.is_none());
        assert_eq!(p.controller.to_string(), "192.0.2.1:8080");
        // Loopback, or no token: nothing to leak.
        assert!(remote("127.0.0.1:8080").point(Some("eth0")).is_ok());
        let mut f = remote("192.0.2.1:8080");
        f.dpmi_token_file = None;
        assert!(f.point(Some("eth0")).is_ok());
        // https without a CA, a CA for http, a CA file that is not there.
        let e = remote("https://192.0.2.1:8443")
            .point(Some("eth0"))
            .unwrap_err();
        assert_eq!(e.flag, "--dpmi-controller-ca");
        let mut f = remote("http://127.0.0.1:8080");
        f.dpmi_controller_ca = Some(dir.path().join("ca.pem"));
        assert!(f
            .point(Some("eth0"))
            .unwrap_err()
            .reason
            .contains("https://"));
        let mut f = remote("https://192.0.2.1:8443");
        f.dpmi_controller_ca = Some(dir.path().join("none.pem"));
        assert_eq!(
            f.point(Some("eth0")).unwrap_err().flag,
            "--dpmi-controller-ca"
        );
        // The point's certificate goes with its key and a consumer CA.
        let mut f = flags();
        f.dpmi_tls_cert = Some(dir.path().join("c.pem"));
        assert_eq!(f.point(Some("eth0")).unwrap_err().flag, "--dpmi-tls-cert");
        f.dpmi_tls_key = Some(dir.path().join("c.key"));
        assert!(f
            .point(Some("eth0"))
            .unwrap_err()
            .reason
            .contains("--dpmi-consumer-ca"));
    }

    #[test]
    fn key_files_are_64_hex_digits() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good");
        std::fs::write(&good, format!("{}\n", "ab".repeat(32))).unwrap();
        let k = read_key(&good).unwrap();
        assert_eq!(
            k.anonymise_u32(1),
            CryptoPan::new(&[0xab; 32]).anonymise_u32(1)
        );
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "abcd").unwrap();
        assert!(read_key(&bad).unwrap_err().reason.contains("64 hex digits"));
        assert!(read_key(&dir.path().join("none")).is_err());
    }

    #[test]
    fn token_files_hold_one_token() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good");
        std::fs::write(&good, "  s3cret-token\n").unwrap();
        assert_eq!(read_token(&good).unwrap(), "s3cret-token");
        let mut f = flags();
        f.dpmi_token_file = Some(good);
        assert_eq!(
            f.point(Some("eth0")).unwrap().unwrap().token.as_deref(),
            Some("s3cret-token")
        );
        for bad in ["", "two words", "line\nbreak"] {
            let p = dir.path().join("bad");
            std::fs::write(&p, bad).unwrap();
            assert_eq!(read_token(&p).unwrap_err().flag, "--dpmi-token-file");
        }
    }
}
