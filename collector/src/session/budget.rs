//! What a session may make the collector hold in memory, reserved before
//! it is held: a DATA message's decoded size (from the session's budget,
//! then the collector's, in KiB permits) and a large message's bytes on the
//! wire (the receiving budget), with the frame reader that asks for the
//! latter before it reads a large message further.

use super::Counters;
use bytes::{BufMut, BytesMut};
use qosloop_runtime::tls::Io;
use qosloop_schema::crane::{CraneCodec, CraneError, Data, Frame, HEADER_LEN, READ_CHUNK};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, ReadHalf};
use tokio::sync::{AcquireError, OwnedSemaphorePermit};
use tokio_util::codec::Decoder;

/// `bytes` in KiB permits, rounded up.
pub(super) fn kib(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
}

pub(super) type Acquire =
    Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// A DATA message read and checked, waiting for its memory.
pub(super) struct Held {
    pub(super) data: Data,
    pub(super) decoded_bytes: usize,
    pub(super) acquire: Option<Acquire>,
    /// The reservation of its bytes on the wire (a large message), given
    /// back once it is decoded.
    pub(super) _received: Option<Received>,
}

/// A large message's bytes reserved from the receiving budget.
pub(super) struct Received {
    pub(super) bytes: usize,
    pub(super) _permit: OwnedSemaphorePermit,
    pub(super) counters: Arc<Counters>,
}

impl Drop for Received {
    fn drop(&mut self) {
        self.counters
            .receiving
            .fetch_sub(self.bytes as u64, Ordering::Relaxed);
    }
}

/// What the frame reader needs next.
pub(super) enum Read {
    Frame(Frame),
    /// A message of this many bytes (header included) is arriving: reserve
    /// them before it is read further.
    NeedBudget(usize),
}

/// Reads frames from the connection. A message up to [`READ_CHUNK`] bytes
/// is read as it comes; a larger one only once its announced length is
/// reserved from the collector's receiving budget (`covered`), so that
/// connections sending large messages slowly cannot together hold more than
/// that budget. Cancel-safe: bytes read stay in the buffer.
pub(super) struct FrameReader {
    pub(super) rd: ReadHalf<Box<dyn Io>>,
    pub(super) buf: BytesMut,
    pub(super) codec: CraneCodec,
}

impl FrameReader {
    pub(super) async fn next(&mut self, covered: usize) -> Option<Result<Read, CraneError>> {
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(f)) => {
                    // An idle session must not keep a large message's buffer.
                    qosloop_schema::guard::shrink_read_buffer(&mut self.buf);
                    return Some(Ok(Read::Frame(f)));
                }
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
            let announced = match self.buf.get(4..HEADER_LEN) {
                Some(&[a, b, c, d]) => u32::from_be_bytes([a, b, c, d]) as usize,
                _ => 0,
            };
            if announced > READ_CHUNK && covered < announced {
                return Some(Ok(Read::NeedBudget(announced)));
            }
            // The message, and a little of the next one.
            let allowed = (announced.max(HEADER_LEN) + READ_CHUNK)
                .saturating_sub(self.buf.len())
                .max(1);
            self.buf.reserve(allowed.min(READ_CHUNK));
            let mut room = (&mut self.buf).limit(allowed);
            match self.rd.read_buf(&mut room).await {
                Ok(0) if self.buf.is_empty() => return None,
                Ok(0) => {
                    return Some(Err(CraneError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "connection ended inside a message",
                    ))))
                }
                Ok(_) => {}
                Err(e) => return Some(Err(CraneError::Io(e))),
            }
        }
    }
}

/// Waits for the held message's memory (never resolves without one).
pub(super) async fn acquire_held(
    held: &mut Option<Held>,
) -> Result<OwnedSemaphorePermit, AcquireError> {
    match held.as_mut().and_then(|h| h.acquire.as_mut()) {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Waits for the receiving budget of a large message.
pub(super) async fn acquire_receiving(
    wait: &mut Option<(usize, Acquire)>,
) -> Result<OwnedSemaphorePermit, AcquireError> {
    match wait.as_mut() {
        Some((_, f)) => f.await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::SinkExt;
    use qosloop_schema::crane::Message;
    use tokio_util::codec::FramedWrite;

    /// A session that received one large message kept its buffer (16–32
    /// MiB for a 16 MiB DATA) for as long as it idled, outside every
    /// budget: a hundred idle sessions aborted the collector under a 2 GiB
    /// cap. The buffer goes back to a small size once the frame is out.
    #[tokio::test]
    async fn a_large_message_leaves_no_large_buffer_behind() {
        let (client, server) = tokio::io::duplex(1 << 20);
        let stream: Box<dyn Io> = Box::new(server);
        let (rd, _wr) = tokio::io::split(stream);
        let codec = CraneCodec::with_max_message(8 << 20);
        let mut reader = FrameReader {
            rd,
            buf: BytesMut::new(),
            codec,
        };
        let sender = tokio::spawn(async move {
            let mut w = FramedWrite::new(client, codec);
            let data = Data {
                template_id: 256,
                config_id: 1,
                flags: 0,
                seq: 1,
                count: 1,
                records: vec![0u8; 4 << 20].into(),
            };
            w.send(Frame {
                session: 1,
                message: Message::Data(data),
            })
            .await
            .unwrap();
            w
        });
        match reader.next(usize::MAX).await {
            Some(Ok(Read::Frame(f))) => assert!(matches!(f.message, Message::Data(_))),
            _ => panic!("expected the DATA frame"),
        }
        assert!(
            reader.buf.capacity() <= qosloop_schema::guard::READ_BUFFER_KEEP,
            "read buffer kept {} bytes after the message",
            reader.buf.capacity()
        );
        drop(sender.await.unwrap());
    }
}
