//! Netlink framing shared by the rtnetlink (HTB) and nf_tables clients:
//! message headers, attributes and nests, the kernel's error/ack decoding,
//! and [`KernelError`]. No socket here (that is `sys`), no protocol.

pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_REPLACE: u16 = 0x100;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_ACK_TLVS: u16 = 0x200;
pub const NLMSGERR_ATTR_MSG: u16 = 1;
pub const NLA_F_NESTED: u16 = 0x8000;

/// The kernel refused a message, or the socket failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}", std::io::Error::from_raw_os_error(*.errno), .message.as_ref().map(|m| format!(": {m}")).unwrap_or_default())]
pub struct KernelError {
    /// Positive errno.
    pub errno: i32,
    /// The kernel's extended-ack text, when it gave one.
    pub message: Option<String>,
}

impl KernelError {
    pub fn io(e: std::io::Error) -> KernelError {
        KernelError {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            message: Some(e.to_string()),
        }
    }
    pub fn malformed(what: &str) -> KernelError {
        KernelError {
            errno: libc::EPROTO,
            message: Some(format!("malformed netlink reply: {what}")),
        }
    }
}

// ---- encoding -------------------------------------------------------------

pub fn align4(n: usize) -> usize {
    (n + 3) & !3
}

pub fn put_u16(b: &mut Vec<u8>, v: u16) {
    b.extend_from_slice(&v.to_ne_bytes());
}
pub fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_ne_bytes());
}

pub fn put_attr(b: &mut Vec<u8>, ty: u16, data: &[u8]) {
    put_u16(b, (4 + data.len()) as u16);
    put_u16(b, ty);
    b.extend_from_slice(data);
    b.resize(align4(b.len()), 0);
}

pub fn begin_nest(b: &mut Vec<u8>, ty: u16) -> usize {
    let at = b.len();
    put_u16(b, 0);
    put_u16(b, ty | NLA_F_NESTED);
    at
}

pub fn end_nest(b: &mut [u8], at: usize) {
    let len = (b.len() - at) as u16;
    b[at..at + 2].copy_from_slice(&len.to_ne_bytes());
}

/// Appends one netlink message: the 16-byte header, then whatever `body`
/// writes (family header and attributes); the length is patched in after.
pub fn push_nlmsg(b: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, body: impl FnOnce(&mut Vec<u8>)) {
    let start = b.len();
    put_u32(b, 0); // length, patched below
    put_u16(b, ty);
    put_u16(b, flags);
    put_u32(b, seq);
    put_u32(b, 0); // port id: the kernel
    body(b);
    let len = (b.len() - start) as u32;
    b[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

// ---- decoding -------------------------------------------------------------

pub fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
pub fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
pub fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Iterates `(type, payload)` over netlink attributes; stops at a bad length.
pub fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16_at(b, 0)?);
        let ty = u16_at(b, 2)? & 0x3FFF;
        if len < 4 || len > b.len() {
            return None;
        }
        let payload = &b[4..len];
        b = b.get(align4(len)..).unwrap_or(&[]);
        Some((ty, payload))
    })
}

/// One message of a datagram: (type, flags, seq, payload after the header).
pub fn messages(mut b: &[u8]) -> impl Iterator<Item = Result<(u16, u16, u32, &[u8]), KernelError>> {
    std::iter::from_fn(move || {
        if b.is_empty() {
            return None;
        }
        let parsed = (|| {
            let len = u32_at(b, 0)? as usize;
            if len < 16 || len > b.len() {
                return None;
            }
            Some((len, u16_at(b, 4)?, u16_at(b, 6)?, u32_at(b, 8)?))
        })();
        match parsed {
            None => {
                b = &[];
                Some(Err(KernelError::malformed("message header")))
            }
            Some((len, ty, flags, seq)) => {
                let payload = &b[16..len];
                b = b.get(align4(len)..).unwrap_or(&[]);
                Some(Ok((ty, flags, seq, payload)))
            }
        }
    })
}

/// The result carried by an `NLMSG_ERROR` payload (errno 0 is an ack).
pub fn decode_error(flags: u16, payload: &[u8]) -> Result<(), KernelError> {
    let code = u32_at(payload, 0).ok_or_else(|| KernelError::malformed("error code"))? as i32;
    if code == 0 {
        return Ok(());
    }
    let mut message = None;
    if flags & NLM_F_ACK_TLVS != 0 {
        // After the code comes the request's header (capped: no payload).
        let orig_len = u32_at(payload, 4).unwrap_or(16) as usize;
        let skip = 4 + if flags & 0x100 != 0 {
            16
        } else {
            align4(orig_len)
        };
        for (ty, data) in attrs(payload.get(skip..).unwrap_or(&[])) {
            if ty == NLMSGERR_ATTR_MSG {
                let text = data.split(|&c| c == 0).next().unwrap_or(&[]);
                message = Some(String::from_utf8_lossy(text).into_owned());
            }
        }
    }
    Err(KernelError {
        errno: -code,
        message,
    })
}
