//! The meter's DPMI flags: `--dpmi-point NAME --dpmi-controller HOST:PORT`
//! (with `--interface`) runs a measurement point instead of a meter.

use super::cryptopan::CryptoPan;
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
    /// The controller (the policy server's web API) at HOST:PORT.
    #[arg(long, value_name = "HOST:PORT", requires = "dpmi_point")]
    pub dpmi_controller: Option<String>,
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
        let controller = ctl
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| flag_err("--dpmi-controller", format!("{ctl:?} is not HOST:PORT")))?;
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
        let consumer_tls = self
            .dpmi_consumer_ca
            .as_deref()
            .map(|ca| qosloop_runtime::tls::client_config_with(ca, None))
            .transpose()
            .map_err(|e| flag_err("--dpmi-consumer-ca", e.to_string()))?;
        Ok(Some(PointConfig {
            name: name.clone(),
            controller,
            token,
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
