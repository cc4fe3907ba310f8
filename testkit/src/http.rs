//! The tests' HTTP client: one well-formed request on a fresh connection
//! (`Connection: close`) and its whole answer — status, headers and body,
//! the body framed by `Content-Length`, chunked, or the close — bounded in
//! bytes ([`BODY_LIMIT`]) and in time (one deadline for connecting,
//! sending and reading). Whatever the server sends, the caller gets a
//! [`Response`] or an [`Error`], never a panic.
//!
//! Blocking, over `std::net::TcpStream`: tests on a plain thread (inside a
//! network namespace, see `Netns::run_in`) call [`Request::send`]; tests in
//! an async context call [`Request::send_async`], which runs the exchange
//! on tokio's blocking pool so that a server in the same runtime keeps
//! answering. [`Request::send_on`] speaks over a stream the caller opened
//! (a TLS session).
//!
//! Not for what must stay raw: requests that are malformed on purpose,
//! half-sent or idle connections, refusals read off the wire, and event
//! streams read as they arrive.
//!
//! Why no crate: hyper's client (feature `client`) needs crates the locked
//! build does not have (`want`, `try-lock`) and a runtime even for callers
//! on a plain thread; reqwest and ureq bring connection pools, proxies and
//! a TLS stack a one-shot loopback request does not need. The answer's head
//! and chunk sizes are parsed by `httparse` (hyper's own parser); what is
//! written here is the framing of one answer.

use std::borrow::Cow;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The most body an answer may carry (after chunked decoding).
pub const BODY_LIMIT: usize = 64 << 20;
/// The most an answer's head (status line and headers) may take.
const HEAD_LIMIT: usize = 64 << 10;
/// The most headers an answer may carry.
const MAX_HEADERS: usize = 100;
/// How long a request may take unless [`Request::timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("no complete answer within {0:?}")]
    TimedOut(Duration),
    #[error("malformed answer: {0}")]
    Malformed(String),
    #[error("the connection closed {0}")]
    Truncated(&'static str),
    #[error("the answer's {0} is over its limit")]
    TooLarge(&'static str),
    #[error("the blocking task: {0}")]
    Task(String),
}

/// One request: method, path, headers, body and how long it may take.
/// `Host` (unless set), `Connection: close` and `Content-Length` (for a
/// body, or a method other than GET and HEAD) are added when sent.
#[derive(Clone, Debug)]
pub struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    timeout: Duration,
}

impl Request {
    pub fn new(method: &str, path: &str) -> Request {
        Request {
            method: method.to_owned(),
            path: path.to_owned(),
            headers: Vec::new(),
            body: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn get(path: &str) -> Request {
        Request::new("GET", path)
    }

    pub fn header(mut self, name: &str, value: &str) -> Request {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Request {
        self.body = body.into();
        self
    }

    /// The whole exchange's bound: connecting, sending and reading.
    pub fn timeout(mut self, timeout: Duration) -> Request {
        self.timeout = timeout;
        self
    }

    /// Connects to `addr`, sends, and reads the answer.
    pub fn send(&self, addr: SocketAddr) -> Result<Response, Error> {
        let deadline = Instant::now() + self.timeout;
        let stream = TcpStream::connect_timeout(&addr, self.timeout).map_err(|e| {
            if is_timeout(&e) {
                Error::TimedOut(self.timeout)
            } else {
                Error::Io {
                    what: "connecting",
                    source: e,
                }
            }
        })?;
        let arm: Arm<TcpStream> = |s, left| {
            s.set_read_timeout(Some(left))?;
            s.set_write_timeout(Some(left))
        };
        self.exchange(Wire::new(stream, arm, deadline, self.timeout))
    }

    /// Sends over `stream` and reads the answer. The deadline is checked
    /// between reads only: a read that blocks is bounded by the timeouts
    /// the caller set on the socket under `stream`.
    pub fn send_on<S: Read + Write>(&self, stream: S) -> Result<Response, Error> {
        let deadline = Instant::now() + self.timeout;
        self.exchange(Wire::new(stream, |_, _| Ok(()), deadline, self.timeout))
    }

    /// [`Request::send`] on tokio's blocking pool.
    pub async fn send_async(self, addr: SocketAddr) -> Result<Response, Error> {
        tokio::task::spawn_blocking(move || self.send(addr))
            .await
            .map_err(|e| Error::Task(e.to_string()))?
    }

    /// The request's bytes.
    fn encode(&self) -> Result<Vec<u8>, Error> {
        let token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
        if !token(&self.method) || !token(&self.path) {
            return Err(Error::BadRequest("a method or path empty or with a space"));
        }
        let mut head = format!("{} {} HTTP/1.1\r\n", self.method, self.path);
        for (name, value) in &self.headers {
            if !token(name) || name.contains(':') || value.contains(['\r', '\n']) {
                return Err(Error::BadRequest(
                    "a header name or value that splits the head",
                ));
            }
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        let has = |name: &str| {
            self.headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case(name))
        };
        if !has("host") {
            head.push_str("Host: qosloop\r\n");
        }
        if !has("connection") {
            head.push_str("Connection: close\r\n");
        }
        if !(self.body.is_empty() && matches!(self.method.as_str(), "GET" | "HEAD")) {
            head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&self.body);
        Ok(bytes)
    }

    fn exchange<S: Read + Write>(&self, mut wire: Wire<S>) -> Result<Response, Error> {
        wire.write_all(&self.encode()?)?;
        loop {
            let (status, headers) = wire.read_head()?;
            // An interim answer (100 Continue, 103 Early Hints) precedes
            // the real one.
            if (100..200).contains(&status) && status != 101 {
                continue;
            }
            let no_body = self.method == "HEAD" || matches!(status, 101..=199 | 204 | 304);
            let body = if no_body {
                Vec::new()
            } else {
                wire.read_body(&headers)?
            };
            return Ok(Response {
                status,
                headers,
                body,
            });
        }
    }
}

/// An answer: status, headers in the order sent, and the (decoded) body.
#[derive(Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header called `name`, in any case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text, invalid UTF-8 replaced by U+FFFD.
    pub fn text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }
}

impl std::fmt::Debug for Response {
    /// Headers and the body as text: what an assertion's message needs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &self.text())
            .finish()
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Sets a stream's read and write timeouts to what is left of the deadline.
type Arm<S> = fn(&S, Duration) -> io::Result<()>;

/// The connection's read side: what was read and not yet consumed.
struct Wire<S> {
    stream: S,
    arm: Arm<S>,
    deadline: Instant,
    timeout: Duration,
    buf: Vec<u8>,
    start: usize,
}

impl<S: Read + Write> Wire<S> {
    fn new(stream: S, arm: Arm<S>, deadline: Instant, timeout: Duration) -> Wire<S> {
        Wire {
            stream,
            arm,
            deadline,
            timeout,
            buf: Vec::new(),
            start: 0,
        }
    }

    /// Arms the socket with what is left of the deadline.
    fn arm(&mut self) -> Result<(), Error> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::TimedOut(self.timeout));
        }
        (self.arm)(&self.stream, left).map_err(|source| Error::Io {
            what: "setting the socket's timeouts",
            source,
        })
    }

    fn io_error(&self, what: &'static str, source: io::Error) -> Error {
        if is_timeout(&source) {
            Error::TimedOut(self.timeout)
        } else {
            Error::Io { what, source }
        }
    }

    fn write_all(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.arm()?;
        self.stream
            .write_all(bytes)
            .and_then(|()| self.stream.flush())
            .map_err(|e| self.io_error("sending the request", e))
    }

    fn available(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
    }

    /// Reads more; `false` at the end of the stream.
    fn fill(&mut self) -> Result<bool, Error> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.arm()?;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_error("reading the answer", e)),
            }
        }
    }

    /// Reads until at least `n` bytes are available.
    fn need(&mut self, n: usize, truncated: &'static str) -> Result<(), Error> {
        while self.available().len() < n {
            if !self.fill()? {
                return Err(Error::Truncated(truncated));
            }
        }
        Ok(())
    }

    /// The status and headers of the next answer.
    fn read_head(&mut self) -> Result<(u16, Vec<(String, String)>), Error> {
        loop {
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut head = httparse::Response::new(&mut slots);
            match head.parse(self.available()) {
                Ok(httparse::Status::Complete(len)) => {
                    let status = head.code.unwrap_or_default();
                    let headers = head
                        .headers
                        .iter()
                        .map(|h| {
                            let value = String::from_utf8_lossy(h.value);
                            (h.name.to_owned(), value.into_owned())
                        })
                        .collect();
                    self.consume(len);
                    return Ok((status, headers));
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => return Err(Error::Malformed(format!("head: {e}"))),
            }
            if self.available().len() > HEAD_LIMIT {
                return Err(Error::TooLarge("head"));
            }
            if !self.fill()? {
                return Err(Error::Truncated("in the head"));
            }
        }
    }

    /// The body as the headers frame it.
    fn read_body(&mut self, headers: &[(String, String)]) -> Result<Vec<u8>, Error> {
        let values = |name: &'static str| {
            headers
                .iter()
                .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
                .flat_map(|(_, v)| v.split(','))
                .map(str::trim)
        };
        if let Some(last) = values("transfer-encoding").next_back() {
            return if last.eq_ignore_ascii_case("chunked") {
                self.read_chunked()
            } else {
                self.read_to_close()
            };
        }
        let mut lengths = values("content-length").peekable();
        let Some(first) = lengths.next() else {
            return self.read_to_close();
        };
        if lengths.any(|l| l != first) {
            return Err(Error::Malformed("differing Content-Length".into()));
        }
        let len: usize = first
            .parse()
            .ok()
            .filter(|_| first.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| Error::Malformed(format!("Content-Length {first:?}")))?;
        if len > BODY_LIMIT {
            return Err(Error::TooLarge("body"));
        }
        self.need(len, "in the body")?;
        let body = self.available()[..len].to_vec();
        self.consume(len);
        Ok(body)
    }

    fn read_to_close(&mut self) -> Result<Vec<u8>, Error> {
        while self.fill()? {
            if self.available().len() > BODY_LIMIT {
                return Err(Error::TooLarge("body"));
            }
        }
        let body = self.available().to_vec();
        self.consume(body.len());
        Ok(body)
    }

    fn read_chunked(&mut self) -> Result<Vec<u8>, Error> {
        let mut body = Vec::new();
        loop {
            let (used, size) = loop {
                match httparse::parse_chunk_size(self.available()) {
                    Ok(httparse::Status::Complete(sized)) => break sized,
                    Ok(httparse::Status::Partial) => {}
                    Err(_) => return Err(Error::Malformed("a chunk size".into())),
                }
                if self.available().len() > HEAD_LIMIT {
                    return Err(Error::TooLarge("chunk size line"));
                }
                if !self.fill()? {
                    return Err(Error::Truncated("before a chunk size"));
                }
            };
            self.consume(used);
            if size == 0 {
                self.skip_trailers()?;
                return Ok(body);
            }
            let size = usize::try_from(size)
                .ok()
                .filter(|s| body.len().saturating_add(*s) <= BODY_LIMIT)
                .ok_or(Error::TooLarge("body"))?;
            self.need(size + 2, "in a chunk")?;
            let (data, end) = self.available()[..size + 2].split_at(size);
            if end != b"\r\n" {
                return Err(Error::Malformed("a chunk longer than its size".into()));
            }
            body.extend_from_slice(data);
            self.consume(size + 2);
        }
    }

    /// Reads the trailer lines after the last chunk, through the empty one.
    fn skip_trailers(&mut self) -> Result<(), Error> {
        let mut read = 0;
        loop {
            if let Some(at) = self.available().windows(2).position(|w| w == b"\r\n") {
                self.consume(at + 2);
                read += at + 2;
                if at == 0 {
                    return Ok(());
                }
                continue;
            }
            if read + self.available().len() > HEAD_LIMIT {
                return Err(Error::TooLarge("trailers"));
            }
            if !self.fill()? {
                return Err(Error::Truncated("in the trailers"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::net::TcpListener;

    /// A listener that reads one request head, writes `answer` and closes;
    /// the request it read comes back through the join handle.
    fn serve_once(answer: &'static [u8]) -> (SocketAddr, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            let mut byte = [0u8; 1];
            while !got.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap() == 1 {
                got.push(byte[0]);
            }
            if let Some(len) = String::from_utf8_lossy(&got)
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .map(|l| l.parse::<usize>().unwrap())
            {
                let mut body = vec![0u8; len];
                s.read_exact(&mut body).unwrap();
                got.extend_from_slice(&body);
            }
            s.write_all(answer).unwrap();
            String::from_utf8(got).unwrap()
        });
        (addr, server)
    }

    #[test]
    fn a_plain_answer_and_the_request_that_asked_for_it() {
        let (addr, server) =
            serve_once(b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nhello and more");
        let r = Request::new("POST", "/api/v1/points")
            .header("Authorization", "Bearer t")
            .body("{}")
            .send(addr)
            .unwrap();
        assert_eq!((r.status, &*r.text()), (201, "hello"));
        assert_eq!(
            server.join().unwrap(),
            "POST /api/v1/points HTTP/1.1\r\nAuthorization: Bearer t\r\nHost: qosloop\r\n\
             Connection: close\r\nContent-Length: 2\r\n\r\n{}"
        );
    }

    #[test]
    fn a_chunked_answer_is_decoded() {
        let (addr, _server) = serve_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              4\r\nRust\r\n6;ext=1\r\n chunk\r\n0\r\nX-Trailer: 1\r\n\r\n",
        );
        let r = Request::get("/").send(addr).unwrap();
        assert_eq!(r.text(), "Rust chunk");
    }

    #[test]
    fn headers_are_found_in_any_case() {
        let (addr, server) = serve_once(
            b"HTTP/1.1 404 Not Found\r\ncontent-type: text/plain; version=0.0.4\r\n\
              WWW-Authenticate: Bearer\r\nContent-Length: 0\r\n\r\n",
        );
        let r = Request::get("/metrics").send(addr).unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(r.header("Content-Type"), Some("text/plain; version=0.0.4"));
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        assert_eq!(r.header("x-missing"), None);
        assert!(r.body.is_empty());
        // A GET without a body announces none.
        assert!(!server.join().unwrap().contains("Content-Length"));
    }

    #[test]
    fn an_answer_read_to_the_close() {
        let (addr, _server) = serve_once(b"HTTP/1.0 200 OK\r\n\r\nall of it");
        assert_eq!(Request::get("/").send(addr).unwrap().text(), "all of it");
    }

    #[test]
    fn a_truncated_answer_is_an_error() {
        for (answer, why) in [
            (
                &b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"[..],
                "in the body",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nhalf",
                "in a chunk",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nRust\r\n",
                "before a chunk size",
            ),
            (b"HTTP/1.1 200 OK\r\nContent-Le", "in the head"),
            (b"", "in the head"),
        ] {
            let (addr, _server) = serve_once(answer);
            match Request::get("/").send(addr) {
                Err(Error::Truncated(at)) => assert_eq!(at, why),
                other => panic!("{why}: {other:?}"),
            }
        }
    }

    #[test]
    fn what_breaks_the_framing_or_the_limits_is_an_error() {
        for answer in [
            &b"SMTP 220 hello\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffff\r\n",
        ] {
            let (addr, _server) = serve_once(answer);
            match Request::get("/").send(addr) {
                Err(Error::Malformed(_) | Error::TooLarge(_)) => {}
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(answer)),
            }
        }
    }

    #[test]
    fn a_silent_server_is_a_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let started = Instant::now();
        let r = Request::get("/")
            .timeout(Duration::from_millis(200))
            .send(addr);
        assert!(matches!(r, Err(Error::TimedOut(_))), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(listener);
    }

    #[test]
    fn a_request_that_would_split_its_head_is_not_sent() {
        let bad = [
            Request::get("/a b"),
            Request::get("/").header("X", "a\r\nInjected: 1"),
            Request::get("/").header("Bad Name", "x"),
        ];
        for r in bad {
            let got = r.send_on(std::io::Cursor::new(Vec::new()));
            assert!(matches!(got, Err(Error::BadRequest(_))), "{got:?}");
        }
    }

    #[tokio::test]
    async fn from_an_async_test_the_server_in_the_same_runtime_answers() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = [0u8; 1024];
            let _ = s.read(&mut head).await.unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .unwrap();
        });
        let r = Request::get("/").send_async(addr).await.unwrap();
        assert_eq!(r.text(), "ok");
        server.await.unwrap();
    }
}
