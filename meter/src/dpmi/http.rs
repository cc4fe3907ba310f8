//! The few HTTP/1.1 calls a point makes to its controller (register, get
//! the filter list, report), over a plain TCP connection closed after each
//! answer. Answers are bounded in size and time. With a token every call
//! carries `Authorization: Bearer TOKEN` (the controller's
//! `api_tokens_file`; register, poll and report are POSTs: an admin token).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

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
    #[error("controller {addr} {path}: {reason}")]
    Answer {
        addr: SocketAddr,
        path: String,
        reason: String,
    },
}

/// Where a point's calls go and what they present.
#[derive(Clone, Copy, Debug)]
pub struct Controller<'a> {
    pub addr: SocketAddr,
    /// The bearer token, if the controller wants one.
    pub token: Option<&'a str>,
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
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(io)?;
    s.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    s.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
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
    let mut raw = Vec::new();
    s.take(MAX_ANSWER + 1).read_to_end(&mut raw).map_err(io)?;
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
