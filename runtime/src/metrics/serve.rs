//! `--metrics HOST:PORT`: a small HTTP/1.1 responder for `GET /metrics`,
//! on plain threads so that synchronous daemons (the meter) and async ones
//! serve it the same way. One request per connection (`Connection:
//! close`); the request head is bounded in bytes, reading and writing in
//! time, and the connections open at once in number: a client over the
//! limit is closed at once and counted.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one scraper may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServeLimits {
    /// Bytes of request line and headers.
    pub max_request: usize,
    /// Time to send the whole request head, and to take the response.
    pub timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            max_request: 8192,
            timeout: Duration::from_secs(5),
            max_connections: 16,
        }
    }
}

/// Counters of the responder.
#[derive(Debug, Default)]
pub struct ServeStats {
    /// Scrapes answered 200.
    pub scrapes: AtomicU64,
    /// Requests refused: over the connection limit, too large, timed out,
    /// malformed, not `GET /metrics`.
    pub refused: AtomicU64,
}

type Render = dyn Fn() -> String + Send + Sync;

/// A bound listener; [`MetricsServer::start`] serves it.
#[derive(Debug)]
pub struct MetricsServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    pub stats: Arc<ServeStats>,
}

impl MetricsServer {
    /// Binds `addr` (before the daemon does anything else, so a taken
    /// port is a start-up error).
    pub fn bind(addr: SocketAddr) -> std::io::Result<MetricsServer> {
        let listener = TcpListener::bind(addr)?;
        let local_addr = listener.local_addr()?;
        Ok(MetricsServer {
            listener,
            local_addr,
            stop: Arc::new(AtomicBool::new(false)),
            stats: Arc::new(ServeStats::default()),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves `render`'s text on a thread until the handle is dropped.
    pub fn start(
        self,
        limits: ServeLimits,
        render: impl Fn() -> String + Send + Sync + 'static,
    ) -> std::io::Result<MetricsHandle> {
        let render: Arc<Render> = Arc::new(render);
        let (listener, stop, stats) = (self.listener, self.stop.clone(), self.stats.clone());
        let open = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("qosloop-metrics".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(stream) = conn else { continue };
                    if open.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
                        open.fetch_sub(1, Ordering::AcqRel);
                        stats.refused.fetch_add(1, Ordering::Relaxed);
                        continue; // dropped: closed at once
                    }
                    let (slot, render, stats) = (open.clone(), render.clone(), stats.clone());
                    let spawned = std::thread::Builder::new()
                        .name("qosloop-scrape".into())
                        .spawn(move || {
                            let ok = answer(stream, limits, &*render).unwrap_or(false);
                            let counter = if ok { &stats.scrapes } else { &stats.refused };
                            counter.fetch_add(1, Ordering::Relaxed);
                            slot.fetch_sub(1, Ordering::AcqRel);
                        });
                    if spawned.is_err() {
                        open.fetch_sub(1, Ordering::AcqRel);
                    }
                }
            })?;
        Ok(MetricsHandle {
            local_addr: self.local_addr,
            stop: self.stop,
            stats: self.stats,
        })
    }
}

/// A running responder; dropping it stops accepting.
#[derive(Debug)]
pub struct MetricsHandle {
    pub local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    pub stats: Arc<ServeStats>,
}

impl Drop for MetricsHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the blocking accept so the thread sees the flag.
        let _ = TcpStream::connect_timeout(&self.local_addr, Duration::from_millis(200));
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Ask {
    Metrics { head: bool },
    NotFound,
    BadMethod,
    Bad,
}

fn classify(head: &[u8]) -> Ask {
    let Ok(text) = std::str::from_utf8(head) else {
        return Ask::Bad;
    };
    let Some(line) = text.split("\r\n").next() else {
        return Ask::Bad;
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Ask::Bad;
    };
    if !version.starts_with("HTTP/1.") {
        return Ask::Bad;
    }
    let path = target.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/metrics") => Ask::Metrics { head: false },
        ("HEAD", "/metrics") => Ask::Metrics { head: true },
        ("GET" | "HEAD", _) => Ask::NotFound,
        _ => Ask::BadMethod,
    }
}

/// Reads one request head and answers it; `Ok(true)` for a scrape served.
fn answer(mut stream: TcpStream, limits: ServeLimits, render: &Render) -> std::io::Result<bool> {
    stream.set_write_timeout(Some(limits.timeout))?;
    let deadline = Instant::now() + limits.timeout;
    let mut buf = vec![0u8; limits.max_request];
    let mut len = 0;
    let end = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            respond(
                &mut stream,
                "408 Request Timeout",
                "text/plain",
                b"timeout\n",
                false,
            )?;
            return Ok(false);
        }
        stream.set_read_timeout(Some(left))?;
        if len == buf.len() {
            respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                b"request too large\n",
                false,
            )?;
            return Ok(false);
        }
        let n = match stream.read(&mut buf[len..]) {
            Ok(0) => return Ok(false),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        len += n;
        if let Some(p) = buf[..len].windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
    };
    match classify(&buf[..end]) {
        Ask::Metrics { head } => {
            let body = render();
            respond(
                &mut stream,
                "200 OK",
                super::CONTENT_TYPE,
                body.as_bytes(),
                head,
            )?;
            Ok(true)
        }
        Ask::NotFound => {
            respond(
                &mut stream,
                "404 Not Found",
                "text/plain",
                b"only /metrics here\n",
                false,
            )?;
            Ok(false)
        }
        Ask::BadMethod => {
            respond(
                &mut stream,
                "405 Method Not Allowed",
                "text/plain",
                b"GET only\n",
                false,
            )?;
            Ok(false)
        }
        Ask::Bad => {
            respond(
                &mut stream,
                "400 Bad Request",
                "text/plain",
                b"bad request\n",
                false,
            )?;
            Ok(false)
        }
    }
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
    head_only: bool,
) -> std::io::Result<()> {
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(header.as_bytes())?;
    if !head_only {
        stream.write_all(body)?;
    }
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(limits: ServeLimits) -> MetricsHandle {
        let s = MetricsServer::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        s.start(limits, || {
            "# HELP a_total A.\n# TYPE a_total counter\na_total 1\n".into()
        })
        .unwrap()
    }

    fn raw(addr: SocketAddr, req: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(req);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    #[test]
    fn serves_metrics_and_refuses_the_rest() {
        let h = start(ServeLimits::default());
        let answer = raw(h.local_addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.ends_with("\r\n\r\n# HELP a_total A.\n# TYPE a_total counter\na_total 1\n"),
            "{answer}"
        );
        assert!(raw(h.local_addr, b"GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(raw(h.local_addr, b"POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        assert!(raw(h.local_addr, b"hello\r\n\r\n").starts_with("HTTP/1.1 400"));
        let big = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000));
        assert!(raw(h.local_addr, big.as_bytes()).starts_with("HTTP/1.1 431"));
        // A connection is counted after its answer is written: wait for the
        // last one's thread (bounded).
        for _ in 0..100 {
            if h.stats.refused.load(Ordering::Relaxed) == 4 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(h.stats.scrapes.load(Ordering::Relaxed), 1);
        assert_eq!(h.stats.refused.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn a_silent_client_times_out_and_the_limit_refuses_extra_connections() {
        let h = start(ServeLimits {
            timeout: Duration::from_millis(300),
            max_connections: 1,
            ..ServeLimits::default()
        });
        // Holds the only slot without sending anything.
        let silent = TcpStream::connect(h.local_addr).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let refused = raw(h.local_addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(refused, "", "over the limit: closed without an answer");
        // The silent one is answered 408 and its slot freed.
        let mut silent = silent;
        silent
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut out = String::new();
        let _ = silent.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 408"), "{out}");
        // Its slot is freed once its thread ends: a scrape is served again
        // (bounded wait, however busy the host).
        let served = (0..600).any(|_| {
            let ok =
                raw(h.local_addr, b"GET /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200");
            if !ok {
                std::thread::sleep(Duration::from_millis(50));
            }
            ok
        });
        assert!(served, "the freed slot serves a scrape");
    }
}
