//! The coordinator protocol: over one TCP connection per node, frames of a
//! 4-byte big-endian length and a JSON message, at most [`MAX_FRAME`]
//! bytes. A node says hello, then sends a heartbeat every
//! [`HEARTBEAT`]; the coordinator answers with assignments, which the node
//! confirms once its filter is installed (or reports the install failed,
//! with the kernel's reason). With a shared secret the coordinator answers
//! the hello with a challenge the node must answer with an HMAC of it
//! ([`Secret`]) before it is a member.
//!
//! Times are nanoseconds since the Unix epoch on the sender's clock: the
//! uncovered window compares clocks of different machines, so they must be
//! synchronised (here: one machine).

use super::share::ShareMode;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::time::Duration;

/// Largest frame either side accepts.
pub const MAX_FRAME: u32 = 64 * 1024;
/// Largest frame the coordinator accepts from a node: its messages are a
/// name, counters and at most a kernel error string.
pub const MAX_NODE_FRAME: u32 = 4096;
/// How often a node reports it is alive.
pub const HEARTBEAT: Duration = Duration::from_millis(100);
/// Silence after which the coordinator declares a node lost.
pub const LOST_AFTER: Duration = Duration::from_millis(600);

/// Node to coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToCoordinator {
    Hello {
        node: String,
        /// The share the node holds now (a node reconnecting to a
        /// restarted coordinator); the coordinator adopts its unowned
        /// buckets instead of moving them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mask: Option<u64>,
    },
    Heartbeat {
        sent_ns: u64,
        analysed: u64,
    },
    Installed {
        epoch: u64,
        mask: u64,
        installed_ns: u64,
    },
    InstallFailed {
        epoch: u64,
        error: String,
    },
    /// The answer to a [`ToNode::Challenge`]: HMAC-SHA256 under the shared
    /// secret of the nonce and the node's name, in hex.
    Auth {
        mac: String,
    },
}

/// Coordinator to node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToNode {
    Assign {
        epoch: u64,
        mode: ShareMode,
        mask: u64,
    },
    Refused {
        reason: String,
    },
    /// A coordinator with a shared secret (`--dicap-secret`) answers a
    /// hello with a fresh nonce (hex, 32 bytes); the node must answer
    /// [`ToCoordinator::Auth`] before anything else.
    Challenge {
        nonce: String,
    },
}

/// The shared secret of a coordinator and its nodes (`--dicap-secret
/// FILE`): never printed, never sent (only MACs of fresh nonces are).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Shortest secret accepted, in bytes.
    pub const MIN: usize = 16;

    /// The file's content, white space around it ignored; 16-4096 bytes.
    pub fn from_file(path: &std::path::Path) -> Result<Secret, String> {
        let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let text = raw.trim_ascii();
        if !(Self::MIN..=4096).contains(&text.len()) {
            return Err(format!(
                "{}: a secret of {}-4096 bytes is needed, the file holds {}",
                path.display(),
                Self::MIN,
                text.len()
            ));
        }
        Ok(Secret(text.to_vec()))
    }

    pub fn new(bytes: &[u8]) -> Secret {
        Secret(bytes.to_vec())
    }

    /// HMAC-SHA256 under the secret of a label, `nonce` and `node`.
    pub fn mac(&self, nonce: &[u8], node: &str) -> [u8; 32] {
        let mut msg = b"qosloop-dicap-auth-v1\0".to_vec();
        msg.extend_from_slice(nonce);
        msg.extend_from_slice(node.as_bytes());
        hmac_sha256(&self.0, &msg)
    }

    /// Whether `mac_hex` is this secret's MAC of `nonce` and `node`
    /// (compared in constant time).
    pub fn verify(&self, nonce: &[u8], node: &str, mac_hex: &str) -> bool {
        let want = qosloop_runtime::digest::hex(&self.mac(nonce, node));
        qosloop_runtime::digest::constant_time_eq(want.as_bytes(), mac_hex.as_bytes())
    }
}

/// HMAC-SHA256 (RFC 2104).
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    use qosloop_runtime::digest::sha256;
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&sha256(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut inner: Vec<u8> = block.iter().map(|k| k ^ 0x36).collect();
    inner.extend_from_slice(msg);
    let mut outer: Vec<u8> = block.iter().map(|k| k ^ 0x5c).collect();
    outer.extend_from_slice(&sha256(&inner));
    sha256(&outer)
}

/// 32 fresh random bytes from the kernel.
pub fn nonce() -> std::io::Result<[u8; 32]> {
    let mut n = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut n)?;
    Ok(n)
}

/// Bytes of a hex string (`None` if it is not one).
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 || text.len() > 128 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A frame that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes exceeds the limit of {1}")]
    TooLarge(u32, u32),
    #[error("bad message: {0}")]
    Json(#[from] serde_json::Error),
}

/// Writes one frame.
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), FrameError> {
    let body = serde_json::to_vec(msg)?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|&l| l <= MAX_FRAME)
        .ok_or(FrameError::TooLarge(u32::MAX, MAX_FRAME))?;
    let mut buf = Vec::with_capacity(body.len() + 4);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf)?;
    Ok(())
}

/// Reads one frame; the length is checked before anything is allocated.
pub fn read_frame<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> Result<T, FrameError> {
    read_frame_max(r, MAX_FRAME)
}

/// Reads one frame of at most `max` bytes.
pub fn read_frame_max<T: for<'de> Deserialize<'de>>(
    r: &mut impl Read,
    max: u32,
) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len);
    if len > max {
        return Err(FrameError::TooLarge(len, max));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    Ok(serde_json::from_slice(&body)?)
}

/// Sends a fresh nonce and checks the node's MAC of it: the refusal's
/// counter and reason when the node does not prove the shared secret.
pub(super) fn challenge(
    stream: &mut std::net::TcpStream,
    secret: &Secret,
    name: &str,
) -> Result<(), (&'static str, String)> {
    let nonce = nonce().map_err(|e| ("no_secret", format!("no nonce for node {name:?}: {e}")))?;
    let sent = ToNode::Challenge {
        nonce: qosloop_runtime::digest::hex(&nonce),
    };
    write_frame(stream, &sent).map_err(|e| {
        (
            "no_secret",
            format!("node {name:?}: sending the challenge: {e}"),
        )
    })?;
    // Heartbeats the node sent before it read the challenge are skipped
    // (a few; the 2 s read timeout bounds the wait).
    let mut answer = read_frame_max::<ToCoordinator>(stream, MAX_NODE_FRAME);
    for _ in 0..32 {
        if !matches!(answer, Ok(ToCoordinator::Heartbeat { .. })) {
            break;
        }
        answer = read_frame_max::<ToCoordinator>(stream, MAX_NODE_FRAME);
    }
    match answer {
        Ok(ToCoordinator::Auth { mac }) if secret.verify(&nonce, name, &mac) => Ok(()),
        Ok(ToCoordinator::Auth { .. }) => Err((
            "bad_secret",
            format!("node {name:?}: wrong shared secret (--dicap-secret)"),
        )),
        Ok(other) => Err((
            "no_secret",
            format!(
                "node {name:?} did not answer the challenge (no --dicap-secret?), sent {other:?}"
            ),
        )),
        Err(e) => Err((
            "no_secret",
            format!("node {name:?} did not answer the challenge (no --dicap-secret?): {e}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_with_golden_bytes_and_refuse_oversize() {
        let mut buf = Vec::new();
        write_frame(
            &mut buf,
            &ToCoordinator::Hello {
                node: "n1".into(),
                mask: None,
            },
        )
        .unwrap();
        assert_eq!(&buf[..4], &[0, 0, 0, 28]);
        assert_eq!(&buf[4..], br#"{"type":"hello","node":"n1"}"#.as_slice());
        let back: ToCoordinator = read_frame(&mut buf.as_slice()).unwrap();
        assert_eq!(
            back,
            ToCoordinator::Hello {
                node: "n1".into(),
                mask: None
            }
        );
        let assign = ToNode::Assign {
            epoch: 3,
            mode: ShareMode::Packet,
            mask: u64::MAX,
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &assign).unwrap();
        assert_eq!(read_frame::<ToNode>(&mut buf.as_slice()).unwrap(), assign);
        let huge = [0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame::<ToNode>(&mut huge.as_slice()),
            Err(FrameError::TooLarge(u32::MAX, MAX_FRAME))
        ));
        let mut long = Vec::new();
        write_frame(
            &mut long,
            &ToCoordinator::Hello {
                node: "n".repeat(5000),
                mask: None,
            },
        )
        .unwrap();
        assert!(matches!(
            read_frame_max::<ToCoordinator>(&mut long.as_slice(), MAX_NODE_FRAME),
            Err(FrameError::TooLarge(_, MAX_NODE_FRAME))
        ));
        let junk = [0, 0, 0, 2, b'{', b'}'];
        assert!(matches!(
            read_frame::<ToNode>(&mut junk.as_slice()),
            Err(FrameError::Json(_))
        ));
    }
}
