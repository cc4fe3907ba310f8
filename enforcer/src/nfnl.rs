//! The nf_tables netlink client: sends one [`Batch`] as one transaction
//! (encoded by [`crate::nft::encode`]) and reads the kernel's answers, each
//! receive bounded by the socket's timeout, so that a kernel that does not
//! answer ends the change with an error naming the transaction.

use crate::netlink::{attrs, decode_error, messages, KernelError, NLMSG_ERROR};
use crate::nft::encode::{self, NFTA_EXPR_NAME, NFTA_RULE_EXPRESSIONS, NFT_MSG_NEWRULE};
use crate::nft::model::Batch;
use crate::sys::NetlinkSocket;
use std::time::Duration;

const NETLINK_NETFILTER: libc::c_int = 12;
/// How long a change waits for the kernel's answer to one receive.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

// ---- the client -----------------------------------------------------------------

/// An nf_tables netlink client, in the namespace of the thread that opened it.
#[derive(Debug)]
pub struct Nftnl {
    sock: NetlinkSocket,
    seq: u32,
    sndbuf: usize,
    tx: Vec<u8>,
    rx: Vec<u8>,
    /// Unit tests leave the last message unacknowledged: a kernel that
    /// does not answer.
    #[cfg(test)]
    silent: bool,
}

impl Nftnl {
    pub fn open() -> Result<Nftnl, KernelError> {
        let sock = NetlinkSocket::open(NETLINK_NETFILTER).map_err(|e| KernelError {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            message: Some(format!("nf_tables netlink socket: {e}")),
        })?;
        sock.set_recv_timeout(REPLY_TIMEOUT)
            .map_err(KernelError::io)?;
        Ok(Nftnl {
            sock,
            seq: 0x5105_0000,
            sndbuf: 0,
            tx: Vec::with_capacity(1 << 16),
            rx: vec![0; 1 << 16],
            #[cfg(test)]
            silent: false,
        })
    }

    /// How long one receive waits for the kernel (default [`REPLY_TIMEOUT`]).
    pub fn set_reply_timeout(&mut self, timeout: Duration) -> Result<(), KernelError> {
        self.sock.set_recv_timeout(timeout).map_err(KernelError::io)
    }

    /// Applies `batch` as one transaction: all of it, or nothing and the
    /// kernel's reason naming the first refused command.
    pub fn apply(&mut self, batch: &Batch) -> Result<(), String> {
        let first = self.seq.wrapping_add(1);
        self.tx.clear();
        let owners = encode::encode(batch, first, &mut self.tx).map_err(|e| e.to_string())?;
        if owners.is_empty() {
            return Ok(());
        }
        #[cfg(test)]
        if self.silent {
            // Clear NLM_F_ACK on every message: success then gets no answer.
            let mut at = 0;
            while at + 16 <= self.tx.len() {
                let len = u32::from_ne_bytes([
                    self.tx[at],
                    self.tx[at + 1],
                    self.tx[at + 2],
                    self.tx[at + 3],
                ]) as usize;
                let flags = u16::from_ne_bytes([self.tx[at + 6], self.tx[at + 7]])
                    & !crate::netlink::NLM_F_ACK;
                self.tx[at + 6..at + 8].copy_from_slice(&flags.to_ne_bytes());
                at += crate::netlink::align4(len.max(16));
            }
        }
        self.seq = first.wrapping_add(1 + owners.len() as u32);
        let last = first.wrapping_add(owners.len() as u32);
        // The whole batch is one datagram: the socket's send buffer must hold it.
        if self.tx.len() + 4096 > self.sndbuf {
            let want = (self.tx.len() + 4096).next_power_of_two().max(1 << 20);
            let want_c = libc::c_int::try_from(want).unwrap_or(libc::c_int::MAX);
            if self
                .sock
                .set_int(libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, want_c)
                .is_err()
            {
                let _ = self.sock.set_int(libc::SOL_SOCKET, libc::SO_SNDBUF, want_c);
            }
            self.sndbuf = want;
        }
        self.sock
            .send(&self.tx)
            .map_err(|e| format!("sending the nf_tables batch ({} bytes): {e}", self.tx.len()))?;
        let mut first_error: Option<(usize, KernelError)> = None;
        let mut batch_error: Option<KernelError> = None;
        loop {
            let n = self
                .sock
                .recv(&mut self.rx)
                .map_err(|e| {
                    format!(
                        "no answer from the kernel to the nf_tables batch ({} commands, first `{}`): {e}",
                        batch.commands.len(),
                        encode::short(&batch.commands.first().map(|c| c.text(&batch.table)).unwrap_or_default())
                    )
                })?;
            let mut done = false;
            for msg in messages(&self.rx[..n]) {
                let Ok((ty, flags, seq, payload)) = msg else {
                    continue;
                };
                if ty != NLMSG_ERROR {
                    continue;
                }
                let k = seq.wrapping_sub(first).wrapping_sub(1) as usize;
                if let Err(e) = decode_error(flags, payload) {
                    if k >= owners.len() {
                        // The batch itself was refused (its BEGIN or END):
                        // no statement was processed, no ack will follow.
                        batch_error = Some(e);
                        done = true;
                    } else if first_error.as_ref().is_none_or(|(j, _)| k < *j) {
                        first_error = Some((k, e));
                    }
                }
                if seq == last {
                    done = true;
                }
            }
            if done {
                break;
            }
        }
        if let Some(e) = batch_error {
            return Err(format!("nftables refused the batch: {e}"));
        }
        match first_error {
            None => Ok(()),
            Some((k, e)) => Err(format!(
                "nftables refused the transaction: `{}`: {e}",
                encode::short(&batch.commands[owners[k]].text(&batch.table))
            )),
        }
    }
}

/// The `(type, flags, seq)` of each message of a batch datagram and the
/// expression names of each rule message (for tests and `--dry-run`).
pub fn describe(batch: &[u8]) -> Vec<(u16, u16, u32, Vec<String>)> {
    messages(batch)
        .filter_map(Result::ok)
        .map(|(ty, flags, seq, payload)| {
            let mut names = Vec::new();
            for (at, v) in attrs(payload.get(4..).unwrap_or(&[])) {
                if at != NFTA_RULE_EXPRESSIONS || ty & 0xff != NFT_MSG_NEWRULE {
                    continue;
                }
                for (_, elem) in attrs(v) {
                    for (et, ev) in attrs(elem) {
                        if et == NFTA_EXPR_NAME {
                            let s = ev.split(|&c| c == 0).next().unwrap_or(&[]);
                            names.push(String::from_utf8_lossy(s).into_owned());
                        }
                    }
                }
            }
            (ty, flags, seq, names)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::model::{Command, TableId};

    #[test]
    fn batch_frames_the_commands() {
        let mut b = Vec::new();
        let mut batch = Batch::new(TableId {
            netdev: false,
            name: "qosloop_qa".into(),
        });
        batch.push(Command::AddTable);
        batch.push(Command::AddChain {
            name: "d1".into(),
            hook: None,
        });
        batch.push(Command::FlushChain("d1".into()));
        let owners = encode::encode(&batch, 100, &mut b).unwrap();
        assert_eq!(owners, vec![0, 1, 2]);
        let msgs = describe(&b);
        let types: Vec<u16> = msgs.iter().map(|m| m.0).collect();
        assert_eq!(
            types,
            vec![16, 0x0a00, 0x0a03, 0x0a08, 17],
            "begin, newtable, newchain, delrule, end"
        );
        let seqs: Vec<u32> = msgs.iter().map(|m| m.2).collect();
        assert_eq!(seqs, vec![100, 101, 102, 103, 104]);
        // Only the last command asks for an ack.
        let acks: Vec<bool> = msgs
            .iter()
            .map(|m| m.1 & crate::netlink::NLM_F_ACK != 0)
            .collect();
        assert_eq!(acks, vec![false, false, false, true, false]);
    }

    /// A kernel that does not answer ends the change with an error naming
    /// the transaction, after the receive timeout — no hang. (Root: in a
    /// throwaway network namespace of a thread.)
    #[test]
    fn a_kernel_that_does_not_answer_ends_the_change_with_an_error() {
        let root = qosloop_testkit::harness::require_root("opens nf_tables netlink in a namespace");
        if qosloop_testkit::harness::prerequisite(root).is_none() {
            return;
        }
        let err = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let mut nft = Nftnl::open().unwrap();
            nft.set_reply_timeout(Duration::from_millis(200)).unwrap();
            nft.silent = true;
            let mut batch = Batch::new(TableId {
                netdev: false,
                name: "qosloop_silent".into(),
            });
            batch.push(Command::AddTable);
            nft.apply(&batch).unwrap_err()
        })
        .join()
        .unwrap();
        assert!(
            err.contains("no answer from the kernel to the nf_tables batch"),
            "{err}"
        );
        assert!(err.contains("add table inet qosloop_silent"), "{err}");
    }
}
