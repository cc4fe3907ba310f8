//! IPFIX over TCP (and TLS): one task and one decoder per connection, so a
//! session's templates live and die with it (RFC 7011 §8). Messages are
//! framed by their 16-bit length: the read buffer never exceeds 64 KiB.

use super::decoder::{ipfix_message_len, Decoder, Limits};
use super::output::Output;
use super::settings::IngestSettings;
use super::tcp_stats::TcpStats;
use crate::store::{Sink, WriteReq};
use qosloop_schema::guard::{self, ConnLimiter, ConnLimits};
use qosloop_store::now_ns;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// Accepts IPFIX exporters on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    settings: IngestSettings,
    conn_limits: ConnLimits,
    sink: Sink,
    writer: mpsc::Sender<WriteReq>,
) {
    let max_sessions = conn_limits.total;
    let addr_stats = TcpStats::default();
    let limiter = ConnLimiter::new("ipfix", conn_limits);
    tracing::info!(listen = ?listener.local_addr().ok(), tls = tls.is_some(), "accepting IPFIX exporters over TCP");
    loop {
        let (stream, peer) = guard::accept_next(&listener, "ipfix").await;
        // A dual-stack socket sees IPv4 exporters as ::ffff:a.b.c.d.
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        if let Some(allow) = &settings.limits.allow {
            if !allow.contains(&peer.ip()) {
                tracing::debug!(%peer, "IPFIX connection from an address not on the allow-list closed");
                continue;
            }
        }
        let Ok(permit) = limiter.try_acquire(peer.ip()) else {
            continue;
        };
        let settings = settings.clone();
        let sink = sink.clone();
        let writer = writer.clone();
        let tls = tls.clone();
        let addr_stats = addr_stats.clone();
        tokio::spawn(async move {
            match tls {
                None => {
                    session(
                        stream,
                        peer,
                        settings,
                        max_sessions,
                        addr_stats,
                        sink,
                        writer,
                    )
                    .await
                }
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(
                        settings.tcp_idle.min(std::time::Duration::from_secs(10)),
                        acceptor.accept(stream),
                    )
                    .await;
                    match handshake {
                        Ok(Ok(s)) => {
                            session(s, peer, settings, max_sessions, addr_stats, sink, writer).await
                        }
                        Ok(Err(e)) => {
                            tracing::info!(%peer, error = %e, "IPFIX TLS handshake failed")
                        }
                        Err(_) => tracing::info!(%peer, "IPFIX TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
}

/// One IPFIX session: messages until EOF, an error, or `tcp_idle` of
/// silence.
pub async fn session<S: AsyncRead + Unpin>(
    mut stream: S,
    peer: SocketAddr,
    settings: IngestSettings,
    max_sessions: usize,
    addr_stats: TcpStats,
    sink: Sink,
    writer: mpsc::Sender<WriteReq>,
) {
    let session = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
    // Over TCP a connection is one exporter: its decoder tracks only it.
    // The listener's budgets are shared by every session it may hold.
    let limits = Limits {
        max_exporters: 1,
        ..settings.limits.share(max_sessions)
    };
    let mut decoder = Decoder::new(limits);
    let mut output = Output::new(sink, writer, true, settings.flush_records, 4);
    let mut buf = vec![0u8; 65_535];
    let mut records = Vec::new();
    let mut last_flush = Instant::now();
    let mut last_stats = Instant::now();
    let mut first = true;
    let why = loop {
        let wait = if first {
            settings.tcp_message_timeout
        } else {
            settings.tcp_idle
        };
        first = false;
        let len = match read_message(&mut stream, &mut buf, wait, settings.tcp_message_timeout)
            .await
        {
            Read::Message(len) => len,
            Read::Idle => break "idle".to_string(),
            Read::Stalled => {
                break format!(
                    "a message was not complete within {:?} of its first byte",
                    settings.tcp_message_timeout
                )
            }
            Read::Closed => break "closed".to_string(),
            Read::Failed(e) => break format!("read error: {e}"),
            Read::NotIpfix(reason) => {
                break format!("not an IPFIX stream ({reason}): the version and length of each message must be 10 and at least 16");
            }
        };
        let now = u64::try_from(now_ns()).unwrap_or(0);
        match decoder.decode_tcp(peer, session, &buf[..len], now, &mut records) {
            Ok(msg) => {
                let due = output.add(peer, msg.domain, msg.sequence, &mut records);
                if due || last_flush.elapsed() >= settings.flush {
                    last_flush = Instant::now();
                    if let Err(e) = output.flush().await {
                        break format!("storing failed: {e}");
                    }
                }
            }
            Err(reason) => {
                records.clear();
                break format!("message refused: {reason}");
            }
        }
        if last_stats.elapsed() >= settings.stats_interval {
            last_stats = Instant::now();
            let rows = addr_stats.summed(peer.ip(), session, decoder.stats(), false);
            let _ = output.store_stats(&rows).await;
        }
    };
    let _ = output.flush().await;
    output.drain().await;
    let stats = decoder.close_session(peer, session);
    let rows = addr_stats.summed(peer.ip(), session, stats.clone(), true);
    if let Err(e) = output.store_stats(&rows).await {
        tracing::warn!(%peer, error = %e, "IPFIX counters not stored");
    }
    let records: u64 = stats.iter().map(|s| s.counters.records).sum();
    tracing::info!(%peer, session, records, reason = %why, "IPFIX session ended");
}

/// What reading one message gave.
#[derive(Debug)]
pub(crate) enum Read {
    Message(usize),
    /// Nothing within the wait.
    Idle,
    /// A message begun and not finished within its deadline.
    Stalled,
    Closed,
    Failed(std::io::Error),
    NotIpfix(super::stats::DropReason),
}

/// Reads one IPFIX message into `buf`: its first byte may take `wait`; the
/// rest of it must come within `complete` of that byte.
pub(crate) async fn read_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut [u8],
    wait: std::time::Duration,
    complete: std::time::Duration,
) -> Read {
    let io = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Read::Closed
        } else {
            Read::Failed(e)
        }
    };
    match tokio::time::timeout(wait, stream.read_exact(&mut buf[..1])).await {
        Err(_) => return Read::Idle,
        Ok(Err(e)) => return io(e),
        Ok(Ok(_)) => {}
    }
    let rest = tokio::time::timeout(complete, async {
        stream.read_exact(&mut buf[1..4]).await?;
        let len = match ipfix_message_len(&buf[..4]) {
            Ok(Some(len)) => len,
            Ok(None) => unreachable_len(),
            Err(reason) => return Ok(Read::NotIpfix(reason)),
        };
        stream.read_exact(&mut buf[4..len]).await?;
        Ok::<_, std::io::Error>(Read::Message(len))
    })
    .await;
    match rest {
        Err(_) => Read::Stalled,
        Ok(Err(e)) => io(e),
        Ok(Ok(r)) => r,
    }
}

/// `ipfix_message_len` needs 4 bytes, which were read.
fn unreachable_len() -> usize {
    super::wire::IPFIX_HEADER
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    /// Review finding 7: a header announcing 64 KiB and then nothing held
    /// the connection for the whole idle time; it is cut at the message
    /// deadline, told apart from an idle session.
    #[tokio::test]
    async fn a_stalled_message_is_cut_at_its_deadline_not_the_idle_time() {
        let (mut peer, mut ours) = tokio::io::duplex(1024);
        peer.write_all(&[0, 10, 0xff, 0xff]).await.unwrap();
        let mut buf = vec![0u8; 65_535];
        let r = read_message(
            &mut ours,
            &mut buf,
            Duration::from_secs(3600),
            Duration::from_millis(100),
        )
        .await;
        assert!(matches!(r, Read::Stalled), "{r:?}");
        // A whole message is read; then silence is idleness.
        let mut m = vec![0, 10, 0, 16];
        m.extend_from_slice(&[0; 12]);
        let (mut peer, mut ours) = tokio::io::duplex(1024);
        peer.write_all(&m).await.unwrap();
        let r = read_message(
            &mut ours,
            &mut buf,
            Duration::from_millis(100),
            Duration::from_secs(1),
        )
        .await;
        assert!(matches!(r, Read::Message(16)), "{r:?}");
        let r = read_message(
            &mut ours,
            &mut buf,
            Duration::from_millis(100),
            Duration::from_secs(1),
        )
        .await;
        assert!(matches!(r, Read::Idle), "{r:?}");
    }
}
