//! qosloop's CRANE-style export protocol (RFC 3423 shape; `docs/protocol.md`
//! is the specification, with golden byte vectors that the tests here check).
//!
//! [`CraneCodec`] frames [`Frame`]s on a byte stream as a
//! `tokio_util::codec` Encoder/Decoder pair; [`records`] turns flow records
//! into the descriptor-free record bytes of a DATA message and back, in the
//! byte order the exporter announced. Every decoder here takes untrusted
//! input: it returns [`CraneError`] and never panics.

mod codec;
mod message;
pub mod records;

pub use codec::{CraneCodec, DEFAULT_MAX_MESSAGE, HEADER_LEN, READ_CHUNK, VERSION};
pub use message::{
    ByteOrder, Data, DataAck, ErrorCode, ErrorMsg, Frame, Message, MessageType, Start, StartAck,
    Status, TemplateSet, WireKey, WireTemplate, CAP_KEEPALIVE, CAP_LITTLE_ENDIAN, CAP_TLS,
    DATA_FLAG_DUPLICATE, DATA_FLAG_START,
};

/// What is wrong with bytes that claim to be CRANE messages.
#[derive(Debug, thiserror::Error)]
pub enum CraneError {
    #[error("unsupported protocol version {0} (this end speaks 1)")]
    Version(u8),
    #[error("unknown message type 0x{0:02x}")]
    UnknownType(u8),
    #[error("message length {len} below the 8-byte header")]
    Undersized { len: u32 },
    #[error("message length {len} above the limit of {max} bytes")]
    Oversized { len: u64, max: usize },
    #[error("{what} truncated: needs {need} more byte(s)")]
    Truncated { what: &'static str, need: usize },
    #[error("{what}: {extra} byte(s) left over")]
    Trailing { what: &'static str, extra: usize },
    #[error("{field} is not UTF-8")]
    Utf8 { field: &'static str },
    #[error("{field} of {len} bytes exceeds the 16-bit length field")]
    TooLong { field: &'static str, len: usize },
    #[error("unknown key type {0}")]
    KeyType(u16),
    #[error("key {0} has no known data type")]
    UnknownElement(crate::IeId),
    #[error("record field {field} cannot hold this value")]
    Value { field: &'static str },
    #[error("template {template} has no enabled fixed-size key: its records could be empty")]
    NoFixedKey { template: u16 },
    #[error("record count {count} does not fit in {bytes} byte(s) of records of at least {min_len} byte(s)")]
    Count {
        count: u32,
        bytes: usize,
        min_len: usize,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A bounds-checked reader over a message body.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], CraneError> {
        if self.buf.len() < n {
            return Err(CraneError::Truncated {
                what: self.what,
                need: n - self.buf.len(),
            });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], CraneError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, CraneError> {
        Ok(self.array::<1>()?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, CraneError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, CraneError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, CraneError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }
    pub(crate) fn finish(&self) -> Result<(), CraneError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(CraneError::Trailing {
                what: self.what,
                extra: self.buf.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests;
