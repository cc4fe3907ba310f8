//! The coordinator protocol: over one TCP connection per node, frames of a
//! 4-byte big-endian length and a JSON message, at most [`MAX_FRAME`]
//! bytes. A node says hello, then sends a heartbeat every
//! [`HEARTBEAT`]; the coordinator answers with assignments, which the node
//! confirms once its filter is installed (or reports the install failed,
//! with the kernel's reason).
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
