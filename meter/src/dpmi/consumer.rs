//! The consumer's end of a point's TLS stream (`--dpmi-consumer-ca` on the
//! point): the consumer is the TLS server, shows its certificate, and —
//! with [`ConsumerTls::new`] — requires the point's certificate
//! (`--dpmi-tls-cert`) to chain to the CA it trusts for points. A point it
//! cannot verify gets nothing; [`ConsumerTls::accept`] says why.

use qosloop_runtime::tls::TlsError;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::rustls::{ServerConfig, ServerConnection, StreamOwned};

/// How long a point has to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A consumer's TLS settings.
#[derive(Clone, Debug)]
pub struct ConsumerTls {
    config: Arc<ServerConfig>,
}

/// A point the consumer did not accept.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// The handshake failed: the point's certificate did not verify
    /// against the consumer's CA, it showed none, or it does not speak TLS.
    #[error("point {peer}: TLS handshake refused: {reason}")]
    Handshake { peer: String, reason: String },
}

impl ConsumerTls {
    /// The consumer's certificate and key, and the CA every point's
    /// certificate must chain to (mutual authentication).
    pub fn new(cert: &Path, key: &Path, point_ca: &Path) -> Result<ConsumerTls, TlsError> {
        Ok(ConsumerTls {
            config: qosloop_runtime::tls::server_config(cert, key, point_ca)?,
        })
    }

    /// Completes the handshake on an accepted connection; the stream the
    /// point's pcap or flow lines are read from.
    pub fn accept(
        &self,
        mut tcp: TcpStream,
    ) -> Result<StreamOwned<ServerConnection, TcpStream>, ConsumerError> {
        let peer = tcp
            .peer_addr()
            .map_or_else(|_| "?".to_owned(), |a: SocketAddr| a.to_string());
        let refused = |reason: String| ConsumerError::Handshake {
            peer: peer.clone(),
            reason,
        };
        let _ = tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
        let _ = tcp.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
        let mut conn =
            ServerConnection::new(self.config.clone()).map_err(|e| refused(e.to_string()))?;
        while conn.is_handshaking() {
            if let Err(e) = conn.complete_io(&mut tcp) {
                // Tell the point why (the alert rustls queued), then close.
                let _ = conn.write_tls(&mut tcp);
                return Err(refused(e.to_string()));
            }
        }
        let _ = tcp.set_read_timeout(None);
        Ok(StreamOwned::new(conn, tcp))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::dpmi::cryptopan::CryptoPan;
    use crate::dpmi::deliver::Output;
    use qosloop_schema::dpmi::{ConsumerSpec, Delivery, FrameFields};
    use std::io::Read;
    use std::net::TcpListener;
    use std::time::Instant;

    fn frame(last: u8) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 8];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[23] = 17;
        f[26..30].copy_from_slice(&[10, 0, 0, last]);
        f[30..34].copy_from_slice(&[10, 0, 0, 200]);
        f
    }

    /// The point shows its certificate (`--dpmi-tls-cert`): a consumer
    /// trusting the point's CA reads the stream; a consumer trusting
    /// another CA gets nothing and says the point's certificate did not
    /// verify, while the point says `TLS:` and counts the frame it could
    /// not deliver; a point without a certificate is refused for that.
    #[test]
    fn consumers_verify_the_point_and_an_untrusting_one_gets_nothing_saying_why() {
        use qosloop_testkit::harness::{require_binary, test_pki};
        qosloop_testkit::need!(require_binary("openssl", "openssl"));
        let (pki, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        test_pki(pki.path()).unwrap();
        test_pki(other.path()).unwrap();
        let p = |d: &tempfile::TempDir, f: &str| d.path().join(f);
        let key = Arc::new(CryptoPan::new(&[7u8; 32]));
        // (CA the consumer trusts for points, the point shows a certificate)
        for (point_ca, shows_cert) in [(&pki, true), (&other, true), (&pki, false)] {
            let consumer = ConsumerTls::new(
                &p(&pki, "server.pem"),
                &p(&pki, "server.key"),
                &p(point_ca, "ca.pem"),
            )
            .unwrap();
            let identity = shows_cert.then(|| (p(&pki, "client.pem"), p(&pki, "client.key")));
            let point_tls = qosloop_runtime::tls::client_config_with(
                &p(&pki, "ca.pem"),
                identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
            )
            .unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let spec = ConsumerSpec {
                address: listener.local_addr().unwrap().to_string(),
                delivery: Delivery::Packets,
                caplen: 40,
                anonymise: false,
                refilter: false,
                exact: Vec::new(),
            };
            let out = Output::start(spec, 16, key.clone(), Some(point_tls));
            let (tcp, _) = listener.accept().unwrap();
            let accepted = consumer.accept(tcp);
            let trusted = std::ptr::eq(point_ca, &pki) && shows_cert;
            if !trusted {
                let Err(e) = accepted else {
                    panic!("an unverifiable point was accepted")
                };
                let text = e.to_string();
                eprintln!("the consumer: {text}");
                let why = if shows_cert {
                    "invalid peer certificate"
                } else {
                    "no certificate"
                };
                assert!(text.contains(why), "{text}");
                if !shows_cert {
                    // A point without a certificate cannot tell the
                    // refusal from its handshake (TLS 1.3): the consumer
                    // refused it and read nothing, which is what counts.
                    continue;
                }
                let until = Instant::now() + Duration::from_secs(10);
                while out.report().error.is_none() && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(5));
                }
                let f = frame(1);
                out.offer(0, 42, &f, "eth0", &FrameFields::parse(&f, None).unwrap());
                let r = out.report();
                let error = r.error.as_deref().unwrap_or("");
                assert!(
                    error.starts_with("TLS: the consumer refused") && !r.connected,
                    "{r:?}"
                );
                assert_eq!(r.dropped_disconnected, 1);
                continue;
            }
            let mut s = accepted.unwrap();
            let mut head = [0u8; 24];
            s.read_exact(&mut head).unwrap();
            assert_eq!(head[..4], 0xa1b2_c3d4u32.to_le_bytes());
            let until = Instant::now() + Duration::from_secs(10);
            while !out.report().connected && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            let frames = [frame(1), frame(2)];
            for f in &frames {
                out.offer(0, 42, f, "eth0", &FrameFields::parse(f, None).unwrap());
            }
            drop(out);
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            let mut at = 0;
            for f in &frames {
                let len = u32::from_le_bytes(got[at + 8..at + 12].try_into().unwrap()) as usize;
                assert_eq!(&got[at + 16..at + 16 + len], &f[..40]);
                at += 16 + len;
            }
            assert_eq!(at, got.len());
        }
    }
}
