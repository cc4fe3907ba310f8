//! The few HTTP/1.1 calls a point makes to its controller (register, get
//! the filter list, report), over a TCP connection closed after each
//! answer: plain, or TLS with the controller's certificate checked against
//! the point's CA (`https://` and `--dpmi-controller-ca`). Answers are
//! bounded in size and time. With a token every call carries
//! `Authorization: Bearer TOKEN` (the controller's `api_tokens_file`;
//! register, poll and report are POSTs: an admin token).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, ClientConnection, StreamOwned};

/// The largest answer read (a filter list of 1,024 filters fits).
const MAX_ANSWER: u64 = 4 << 20;
const TIMEOUT: Duration = Duration::from_secs(3);

/// A call that failed, naming the controller and the path.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("controller {addr} {path}: {source}")]
    Io {
        addr: SocketAddr,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed: the controller's certificate did not
    /// verify against the point's CA, or the peer does not speak TLS.
    #[error("controller {addr} {path}: TLS: {reason}")]
    Tls {
        addr: SocketAddr,
        path: String,
        reason: String,
    },
    #[error("controller {addr} {path}: {reason}")]
    Answer {
        addr: SocketAddr,
        path: String,
        reason: String,
    },
}

/// TLS to the controller: the client configuration (its CA) and the name
/// its certificate must carry (the host of the `https://` URL).
#[derive(Clone, Debug)]
pub struct ControllerTls {
    pub config: Arc<ClientConfig>,
    pub name: ServerName<'static>,
}

/// Where a point's calls go and what they present.
#[derive(Clone, Copy, Debug)]
pub struct Controller<'a> {
    pub addr: SocketAddr,
    /// The bearer token, if the controller wants one.
    pub token: Option<&'a str>,
    /// TLS, or plain HTTP when `None`.
    pub tls: Option<&'a ControllerTls>,
}

/// Whether `token` can be sent in a header: 1-4096 visible ASCII
/// characters, no space.
pub fn valid_token(token: &str) -> bool {
    !token.is_empty() && token.len() <= 4096 && token.bytes().all(|b| b.is_ascii_graphic())
}

/// `method path` with an optional JSON `body`; the status and the body.
pub fn call(
    ctl: Controller<'_>,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<(u16, Vec<u8>), HttpError> {
    let addr = ctl.addr;
    let io = |source| HttpError::Io {
        addr,
        path: path.to_owned(),
        source,
    };
    let answer = |reason: String| HttpError::Answer {
        addr,
        path: path.to_owned(),
        reason,
    };
    let mut tcp = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(io)?;
    tcp.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    tcp.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    let mut s: Box<dyn ReadWrite> = match ctl.tls {
        None => Box::new(tcp),
        Some(tls) => {
            let mut conn = ClientConnection::new(tls.config.clone(), tls.name.clone())
                .map_err(|e| tls_err(addr, path, e.to_string()))?;
            while conn.is_handshaking() {
                if let Err(e) = conn.complete_io(&mut tcp) {
                    // rustls reports a certificate it refused as InvalidData
                    // wrapping its own error; say that, not "I/O".
                    return Err(tls_err(addr, path, e.to_string()));
                }
            }
            Box::new(StreamOwned::new(conn, tcp))
        }
    };
    let body = body.unwrap_or_default();
    let auth = match ctl.token {
        Some(t) if valid_token(t) => format!("Authorization: Bearer {t}\r\n"),
        Some(_) => return Err(answer("the token is not 1-4096 visible characters".into())),
        None => String::new(),
    };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).map_err(io)?;
    s.write_all(body).map_err(io)?;
    s.flush().map_err(io)?;
    let mut raw = Vec::new();
    match s.take(MAX_ANSWER + 1).read_to_end(&mut raw) {
        Ok(_) => {}
        // A TLS peer that closes without close_notify: the answer read so
        // far stands (a cut one fails to parse below).
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(io(e)),
    }
    if raw.len() as u64 > MAX_ANSWER {
        return Err(answer(format!("answer longer than {MAX_ANSWER} bytes")));
    }
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| answer("no end of headers".into()))?;
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| answer(format!("bad status line {:?}", head.lines().next())))?;
    let mut rest = raw[end + 4..].to_vec();
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    if chunked {
        rest = dechunk(&rest).ok_or_else(|| answer("bad chunked body".into()))?;
    }
    Ok((status, rest))
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn tls_err(addr: SocketAddr, path: &str, reason: String) -> HttpError {
    HttpError::Tls {
        addr,
        path: path.to_owned(),
        reason,
    }
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&b[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn dechunks() {
        assert_eq!(
            super::dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(),
            b"abcde"
        );
        assert!(super::dechunk(b"9\r\nab").is_none());
    }
}
