//! Framing: the 8-byte header and the length limit.

use super::message::{Frame, Message, MessageType};
use super::CraneError;
use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// The protocol version this code speaks.
pub const VERSION: u8 = 1;
/// Header: Version(1) MessageID(1) SessionID(1) Flags(1) Length(4).
pub const HEADER_LEN: usize = 8;
/// Default limit on one message, header included.
pub const DEFAULT_MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// How far beyond the bytes present the read buffer is grown for a message
/// still arriving: a header alone must not make the reader reserve the
/// length it announces.
pub const READ_CHUNK: usize = 64 * 1024;

/// Encoder/decoder of [`Frame`]s with a limit on message size.
#[derive(Clone, Copy, Debug)]
pub struct CraneCodec {
    max_message: usize,
}

impl Default for CraneCodec {
    fn default() -> Self {
        CraneCodec {
            max_message: DEFAULT_MAX_MESSAGE,
        }
    }
}

impl CraneCodec {
    /// A codec refusing messages longer than `max_message` bytes.
    pub fn with_max_message(max_message: usize) -> Self {
        CraneCodec {
            max_message: max_message.max(HEADER_LEN),
        }
    }

    pub fn max_message(&self) -> usize {
        self.max_message
    }
}

impl Decoder for CraneCodec {
    type Item = Frame;
    type Error = CraneError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CraneError> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let version = src[0];
        if version != VERSION {
            return Err(CraneError::Version(version));
        }
        let kind = MessageType::from_u8(src[1])?;
        let session = src[2];
        let len = u32::from_be_bytes([src[4], src[5], src[6], src[7]]);
        if (len as usize) < HEADER_LEN {
            return Err(CraneError::Undersized { len });
        }
        if len as usize > self.max_message {
            return Err(CraneError::Oversized {
                len: u64::from(len),
                max: self.max_message,
            });
        }
        let len = len as usize;
        if src.len() < len {
            // Grow as bytes arrive: a peer announcing 16 MiB and sending
            // nothing more costs this connection at most READ_CHUNK.
            src.reserve((len - src.len()).min(READ_CHUNK));
            return Ok(None);
        }
        let mut msg = src.split_to(len);
        msg.advance(HEADER_LEN);
        let message = Message::decode_body(kind, msg.freeze())?;
        Ok(Some(Frame { session, message }))
    }
}

impl Encoder<Frame> for CraneCodec {
    type Error = CraneError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CraneError> {
        encode_frame(&frame, dst, self.max_message)
    }
}

impl Encoder<&Frame> for CraneCodec {
    type Error = CraneError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), CraneError> {
        encode_frame(frame, dst, self.max_message)
    }
}

fn encode_frame(frame: &Frame, dst: &mut BytesMut, max: usize) -> Result<(), CraneError> {
    let start = dst.len();
    dst.put_u8(VERSION);
    dst.put_u8(frame.message.kind() as u8);
    dst.put_u8(frame.session);
    dst.put_u8(0);
    dst.put_u32(0);
    if let Err(e) = frame.message.encode_body(dst) {
        dst.truncate(start);
        return Err(e);
    }
    let len = dst.len() - start;
    if len > max {
        dst.truncate(start);
        return Err(CraneError::Oversized {
            len: len as u64,
            max,
        });
    }
    dst[start + 4..start + 8].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}
