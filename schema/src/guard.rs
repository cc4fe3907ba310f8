//! What a peer may hold of a daemon, enforced the same way on every port.
//!
//! Every listener of qosloop (export, COPS decisions, HTTP) faces peers it
//! did not choose. The pieces here bound what one of them can take:
//!
//! - [`ConnLimiter`]: connections per peer address and in total. A connection
//!   over a limit is closed at once and counted, so descriptors stay free for
//!   the peers that are allowed in.
//! - [`accept_next`]: an accept loop step that survives descriptor exhaustion
//!   (EMFILE, ENFILE, ENOBUFS) by backing off instead of spinning.
//! - [`LogThrottle`]: a log line a peer can repeat is written at most once a
//!   period; what was held back is counted and said with the next line.
//! - [`check_bind`]: loopback by default; any other address needs mutual TLS
//!   or the operator's explicit `--allow-insecure-remote`.
//! - [`IdleStream`]: a stream whose reads and writes fail once they make no
//!   progress for a while (a peer that stops reading or writing is let go).
//! - [`shrink_read_buffer`]: a connection's read buffer goes back to a small
//!   size after a large message, so an idle peer does not keep the memory of
//!   the largest message it ever sent.
//!
//! The counters live in the values themselves; daemons show them in their
//! status APIs and logs.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// The flag (and, without dashes, the config key) that allows a listener on a
/// non-loopback address without mutual TLS.
pub const ALLOW_INSECURE_REMOTE_FLAG: &str = "--allow-insecure-remote";

/// Connection limits of one listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnLimits {
    /// Connections open at once from one peer address.
    pub per_peer: usize,
    /// Connections open at once in total.
    pub total: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            per_peer: 32,
            total: 256,
        }
    }
}

/// Which limit refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitHit {
    PerPeer { limit: usize },
    Total { limit: usize },
}

impl fmt::Display for LimitHit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitHit::PerPeer { limit } => {
                write!(f, "{limit} connections from this address already open")
            }
            LimitHit::Total { limit } => write!(f, "{limit} connections already open in total"),
        }
    }
}

/// Counters of one limiter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConnStats {
    /// Connections holding a permit now.
    pub open: usize,
    /// Connections refused because their address had too many open.
    pub refused_per_peer: u64,
    /// Connections refused because the listener had too many open.
    pub refused_total: u64,
}

#[derive(Debug, Default)]
struct LimiterState {
    per_peer: HashMap<IpAddr, usize>,
    open: usize,
    refused_per_peer: u64,
    refused_total: u64,
}

/// Counts open connections per peer address and in total; cheap to clone
/// (clones share the counts).
#[derive(Clone, Debug)]
pub struct ConnLimiter {
    name: &'static str,
    limits: ConnLimits,
    state: Arc<Mutex<LimiterState>>,
    log: Arc<LogThrottle>,
}

impl ConnLimiter {
    /// A limiter for the listener called `name` (used in log lines).
    pub fn new(name: &'static str, limits: ConnLimits) -> ConnLimiter {
        ConnLimiter {
            name,
            limits: ConnLimits {
                per_peer: limits.per_peer.max(1),
                total: limits.total.max(1),
            },
            state: Arc::default(),
            log: Arc::new(LogThrottle::new(Duration::from_secs(5))),
        }
    }

    pub fn limits(&self) -> ConnLimits {
        self.limits
    }

    /// A permit for one connection from `peer`, or which limit refused it
    /// (counted, and logged at most every 5 s).
    pub fn try_acquire(&self, peer: IpAddr) -> Result<ConnPermit, LimitHit> {
        let mut st = lock(&self.state);
        let from_peer = st.per_peer.get(&peer).copied().unwrap_or(0);
        let hit = if st.open >= self.limits.total {
            st.refused_total += 1;
            Some(LimitHit::Total {
                limit: self.limits.total,
            })
        } else if from_peer >= self.limits.per_peer {
            st.refused_per_peer += 1;
            Some(LimitHit::PerPeer {
                limit: self.limits.per_peer,
            })
        } else {
            None
        };
        if let Some(hit) = hit {
            let (per_peer, total) = (st.refused_per_peer, st.refused_total);
            drop(st);
            if let Some(suppressed) = self.log.check() {
                tracing::warn!(listener = self.name, %peer, reason = %hit, refused_per_peer = per_peer,
                    refused_total = total, suppressed, "connection refused");
            }
            return Err(hit);
        }
        st.open += 1;
        *st.per_peer.entry(peer).or_insert(0) += 1;
        Ok(ConnPermit {
            peer,
            state: self.state.clone(),
        })
    }

    pub fn stats(&self) -> ConnStats {
        let st = lock(&self.state);
        ConnStats {
            open: st.open,
            refused_per_peer: st.refused_per_peer,
            refused_total: st.refused_total,
        }
    }
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnPermit {
    peer: IpAddr,
    state: Arc<Mutex<LimiterState>>,
}

impl ConnPermit {
    pub fn peer(&self) -> IpAddr {
        self.peer
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut st = lock(&self.state);
        st.open = st.open.saturating_sub(1);
        if let Some(n) = st.per_peer.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.per_peer.remove(&self.peer);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves plain counters behind:
    // they are still meaningful.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Accept failures seen by [`accept_next`], over all listeners of the process.
static ACCEPT_FAILURES: AtomicU64 = AtomicU64::new(0);

/// How many accepts failed (descriptor exhaustion and the like) in this process.
pub fn accept_failures() -> u64 {
    ACCEPT_FAILURES.load(Ordering::Relaxed)
}

/// The next connection on `listener`. Never fails: an error (out of
/// descriptors, out of buffers, a connection reset before accept) is counted,
/// logged at most every 5 s, and followed by a pause that doubles from 10 ms
/// to 1 s while errors repeat, so an exhausted process waits for descriptors
/// instead of spinning on a listener that stays readable.
pub async fn accept_next(listener: &TcpListener, what: &'static str) -> (TcpStream, SocketAddr) {
    {
        static LOG: std::sync::OnceLock<LogThrottle> = std::sync::OnceLock::new();
        let log = LOG.get_or_init(|| LogThrottle::new(Duration::from_secs(5)));
        let mut pause = Duration::from_millis(10);
        loop {
            match listener.accept().await {
                Ok(x) => return x,
                Err(e) => {
                    let n = ACCEPT_FAILURES.fetch_add(1, Ordering::Relaxed) + 1;
                    if let Some(suppressed) = log.check() {
                        tracing::warn!(listener = what, error = %e, failures = n, suppressed,
                            pause_ms = pause.as_millis() as u64, "accept failed; pausing");
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

/// Lets a repeated log line through at most once per period.
#[derive(Debug)]
pub struct LogThrottle {
    period: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
    suppressed_total: AtomicU64,
}

impl LogThrottle {
    pub fn new(period: Duration) -> LogThrottle {
        LogThrottle {
            period,
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
            suppressed_total: AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last one written)` when a line may be
    /// written now; `None` (counted) when it must be held back.
    pub fn check(&self) -> Option<u64> {
        let now = Instant::now();
        let mut last = lock(&self.last);
        match *last {
            Some(t) if now.duration_since(t) < self.period => {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                self.suppressed_total.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *last = Some(now);
                Some(self.suppressed.swap(0, Ordering::Relaxed))
            }
        }
    }

    /// Lines held back since this throttle was made.
    pub fn suppressed_total(&self) -> u64 {
        self.suppressed_total.load(Ordering::Relaxed)
    }
}

/// Whether a listener may bind `addr`: loopback always; another address
/// only with mutual TLS (peers are then known by their certificates) or when
/// the operator said `--allow-insecure-remote` (logged at WARN). The error
/// names the listener, the address and the flag.
pub fn check_bind(
    addr: SocketAddr,
    what: &str,
    mutual_tls: bool,
    allow_insecure_remote: bool,
) -> Result<(), String> {
    if addr.ip().is_loopback() || mutual_tls {
        return Ok(());
    }
    if allow_insecure_remote {
        tracing::warn!(listener = what, %addr,
            "listening beyond loopback without mutual TLS ({ALLOW_INSECURE_REMOTE_FLAG}): \
             anyone who reaches this address can speak to it");
        return Ok(());
    }
    Err(format!(
        "{what} address {addr} is not loopback and has no mutual TLS: anyone who reaches it \
         could steer the loop; configure mutual TLS, or say {ALLOW_INSECURE_REMOTE_FLAG} \
         (config key allow_insecure_remote) to accept that"
    ))
}

/// Raises the soft limit on open descriptors to the hard limit (best
/// effort) and returns the soft limit in force afterwards.
pub fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// Read buffers are kept at most this large between messages.
pub const READ_BUFFER_KEEP: usize = 128 * 1024;

/// After a message is taken out of `buf`: when the buffer's allocation grew
/// beyond [`READ_BUFFER_KEEP`] (a large message passed through it), moves
/// what is left (part of the next message, usually nothing) into a new small
/// buffer, so the large allocation is freed once the message itself is.
/// Without this, every connection idles with the capacity of the largest
/// message it ever received, outside any budget.
pub fn shrink_read_buffer(buf: &mut bytes::BytesMut) {
    if buf.capacity() > READ_BUFFER_KEEP {
        *buf = bytes::BytesMut::from(&buf[..]);
    }
}

/// A stream whose reads and writes fail with `TimedOut` once one of them has
/// waited `idle` without progress.
#[derive(Debug)]
pub struct IdleStream<S> {
    inner: S,
    idle: Duration,
    read_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    write_timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> IdleStream<S> {
    pub fn new(inner: S, idle: Duration) -> IdleStream<S> {
        IdleStream {
            inner,
            idle,
            read_timer: None,
            write_timer: None,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// The outcome of one read or write poll under the idle timer: progress
/// (ready) stops the timer; pending arms it, and once it fires the
/// operation fails with `TimedOut`.
fn under_idle_timer<T>(
    polled: Poll<io::Result<T>>,
    timer: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    idle: Duration,
    cx: &mut Context<'_>,
    what: &str,
) -> Poll<io::Result<T>> {
    if polled.is_ready() {
        *timer = None;
        return polled;
    }
    let t = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
    match t.as_mut().poll(cx) {
        Poll::Ready(()) => {
            *timer = None;
            Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("peer made no {what} progress for {} s", idle.as_secs_f64()),
            )))
        }
        Poll::Pending => Poll::Pending,
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        under_idle_timer(polled, &mut this.read_timer, this.idle, cx, "read")
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        under_idle_timer(polled, &mut this.write_timer, this.idle, cx, "write")
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        under_idle_timer(polled, &mut this.write_timer, this.idle, cx, "write")
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    }

    #[test]
    fn per_peer_limit_refuses_that_peer_only_and_frees_on_drop() {
        let l = ConnLimiter::new(
            "test",
            ConnLimits {
                per_peer: 2,
                total: 10,
            },
        );
        let a1 = l.try_acquire(ip(2)).unwrap();
        let _a2 = l.try_acquire(ip(2)).unwrap();
        assert_eq!(
            l.try_acquire(ip(2)).unwrap_err(),
            LimitHit::PerPeer { limit: 2 }
        );
        let _b = l.try_acquire(ip(1)).unwrap();
        drop(a1);
        let _a3 = l.try_acquire(ip(2)).unwrap();
        let s = l.stats();
        assert_eq!((s.open, s.refused_per_peer, s.refused_total), (3, 1, 0));
    }

    #[test]
    fn total_limit_refuses_everyone() {
        let l = ConnLimiter::new(
            "test",
            ConnLimits {
                per_peer: 5,
                total: 2,
            },
        );
        let _a = l.try_acquire(ip(2)).unwrap();
        let _b = l.try_acquire(ip(3)).unwrap();
        assert_eq!(
            l.try_acquire(ip(4)).unwrap_err(),
            LimitHit::Total { limit: 2 }
        );
        assert_eq!(l.stats().refused_total, 1);
    }

    #[test]
    fn throttle_lets_one_line_through_per_period_and_counts_the_rest() {
        let t = LogThrottle::new(Duration::from_secs(3600));
        assert_eq!(t.check(), Some(0));
        assert_eq!(t.check(), None);
        assert_eq!(t.check(), None);
        assert_eq!(t.suppressed_total(), 2);
        let t = LogThrottle::new(Duration::ZERO);
        assert_eq!(t.check(), Some(0));
        assert_eq!(t.check(), Some(0));
    }

    #[test]
    fn bind_beyond_loopback_needs_mutual_tls_or_the_opt_in() {
        let lo: SocketAddr = "127.0.0.1:4740".parse().unwrap();
        let lo6: SocketAddr = "[::1]:4740".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:4740".parse().unwrap();
        assert!(check_bind(lo, "export", false, false).is_ok());
        assert!(check_bind(lo6, "export", false, false).is_ok());
        let err = check_bind(any, "export", false, false).unwrap_err();
        assert!(err.contains("0.0.0.0:4740") && err.contains(ALLOW_INSECURE_REMOTE_FLAG));
        assert!(check_bind(any, "export", true, false).is_ok());
        assert!(check_bind(any, "export", false, true).is_ok());
    }

    #[tokio::test]
    async fn idle_stream_read_times_out_without_progress() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut s = IdleStream::new(a, Duration::from_millis(50));
        b.write_all(b"x").await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(s.read(&mut buf).await.unwrap(), 1);
        let err = s.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn idle_stream_write_times_out_when_the_peer_stops_reading() {
        let (a, _b) = tokio::io::duplex(16);
        let mut s = IdleStream::new(a, Duration::from_millis(50));
        let err = s.write_all(&[0u8; 64]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn a_large_read_buffer_is_given_back_keeping_its_bytes() {
        let mut buf = bytes::BytesMut::with_capacity(4 << 20);
        buf.extend_from_slice(b"next");
        shrink_read_buffer(&mut buf);
        assert_eq!(&buf[..], b"next");
        assert!(buf.capacity() <= READ_BUFFER_KEEP, "{}", buf.capacity());
        let mut small = bytes::BytesMut::with_capacity(1024);
        small.extend_from_slice(b"x");
        shrink_read_buffer(&mut small);
        assert_eq!(small.capacity(), 1024, "a small buffer is left alone");
    }

    #[tokio::test]
    async fn accept_next_returns_connections() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let c = tokio::spawn(async move { TcpStream::connect(addr).await.unwrap() });
        let (_s, peer) = accept_next(&l, "test").await;
        assert!(peer.ip().is_loopback());
        c.await.unwrap();
    }
}
