//! IPFIX over TCP (and TLS): one task and one decoder per connection, so a
//! session's templates live and die with it (RFC 7011 §8). Messages are
//! framed by their 16-bit length: the read buffer never exceeds 64 KiB.

use super::decoder::{ipfix_message_len, Decoder, Limits};
use super::output::Output;
use super::settings::IngestSettings;
use crate::db::now_ns;
use crate::store::{Sink, WriteReq};
use qosloop_schema::guard::{self, ConnLimiter, ConnLimits};
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
    let limiter = ConnLimiter::new("ipfix", conn_limits);
    tracing::info!(listen = ?listener.local_addr().ok(), tls = tls.is_some(), "accepting IPFIX exporters over TCP");
    loop {
        let (stream, peer) = guard::accept_next(&listener, "ipfix").await;
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
        tokio::spawn(async move {
            match tls {
                None => session(stream, peer, settings, max_sessions, sink, writer).await,
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(
                        settings.tcp_idle.min(std::time::Duration::from_secs(10)),
                        acceptor.accept(stream),
                    )
                    .await;
                    match handshake {
                        Ok(Ok(s)) => session(s, peer, settings, max_sessions, sink, writer).await,
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
    let why = loop {
        let read = tokio::time::timeout(settings.tcp_idle, async {
            stream.read_exact(&mut buf[..4]).await?;
            let len = match ipfix_message_len(&buf[..4]) {
                Ok(Some(len)) => len,
                Ok(None) => unreachable_len(),
                Err(reason) => return Ok(Err(reason)),
            };
            stream.read_exact(&mut buf[4..len]).await?;
            Ok::<_, std::io::Error>(Ok(len))
        })
        .await;
        let len = match read {
            Err(_) => break "idle".to_string(),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break "closed".to_string()
            }
            Ok(Err(e)) => break format!("read error: {e}"),
            Ok(Ok(Err(reason))) => {
                break format!("not an IPFIX stream ({reason}): the version and length of each message must be 10 and at least 16");
            }
            Ok(Ok(Ok(len))) => len,
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
            let _ = output.store_stats(&decoder.stats()).await;
        }
    };
    let _ = output.flush().await;
    output.drain().await;
    let stats = decoder.close_session(peer, session);
    if let Err(e) = output.store_stats(&stats).await {
        tracing::warn!(%peer, error = %e, "IPFIX counters not stored");
    }
    let records: u64 = stats.iter().map(|s| s.counters.records).sum();
    tracing::info!(%peer, session, records, reason = %why, "IPFIX session ended");
}

/// `ipfix_message_len` needs 4 bytes, which were read.
fn unreachable_len() -> usize {
    super::wire::IPFIX_HEADER
}
