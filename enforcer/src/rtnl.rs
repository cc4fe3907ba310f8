//! The rtnetlink client: HTB qdiscs, classes and the steering filter sent
//! pipelined with their acks read per chunk, dumps of qdiscs and classes,
//! IFB links. Every receive is bounded by the socket's receive timeout.

use crate::bpf::steering_program;
use crate::netlink::*;
use crate::sys::NetlinkSocket;
use crate::tc::{
    encode_with, push_link_msg, push_tc_msg, ClassInfo, QdiscInfo, TcHandle, TcOp, IFLA_IFNAME,
    IFLA_INFO_KIND, IFLA_LINKINFO, RTM_DELLINK, RTM_GETQDISC, RTM_GETTCLASS, RTM_NEWLINK,
    TCA_HTB_CEIL64, TCA_HTB_PARMS, TCA_HTB_RATE64, TCA_KIND, TCA_OPTIONS, TCA_STATS2,
    TCA_STATS_BASIC, TCA_STATS_QUEUE,
};

/// Messages sent before reading their acks (their acks fit the buffer).
const PIPELINE: usize = 256;

/// An rtnetlink client for HTB, in the namespace of the thread that opened it.
#[derive(Debug)]
pub struct Rtnl {
    sock: NetlinkSocket,
    seq: u32,
    tx: Vec<u8>,
    rx: Vec<u8>,
}

impl Rtnl {
    pub fn open() -> Result<Rtnl, KernelError> {
        Ok(Rtnl {
            sock: {
                let sock = NetlinkSocket::open(libc::NETLINK_ROUTE).map_err(KernelError::io)?;
                sock.set_recv_timeout(crate::nfnl::REPLY_TIMEOUT)
                    .map_err(KernelError::io)?;
                sock
            },
            seq: 1,
            tx: Vec::with_capacity(1 << 16),
            rx: vec![0; 1 << 16],
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    /// Sends one message and waits for its ack.
    pub fn execute_one(&mut self, op: &TcOp) -> Result<(), KernelError> {
        self.execute(std::slice::from_ref(op))
            .pop()
            .unwrap_or_else(|| Err(KernelError::malformed("no ack")))
    }

    /// Sends `ops` pipelined (several messages per datagram, acks read per
    /// chunk) and returns one result per op, in order. Each op takes effect
    /// or not on its own: undoing the ones that did is the caller's job.
    pub fn execute(&mut self, ops: &[TcOp]) -> Vec<Result<(), KernelError>> {
        let mut results = Vec::with_capacity(ops.len());
        let mut silent: Option<KernelError> = None;
        for chunk in ops.chunks(PIPELINE) {
            if let Some(e) = &silent {
                // The kernel stopped answering: the rest is not sent.
                results.extend(chunk.iter().map(|_| Err(e.clone())));
                continue;
            }
            let first_seq = self.seq.wrapping_add(1);
            let mut chunk_results: Vec<Option<Result<(), KernelError>>> = vec![None; chunk.len()];
            self.tx.clear();
            let mut sent = Ok(());
            // Steering programs stay loaded until their filter holds them.
            let mut progs = Vec::new();
            for op in chunk {
                let seq = self.next_seq();
                let mut fd = None;
                if let TcOp::Steer {
                    qdisc,
                    first_major,
                    groups,
                    first_minor,
                    ..
                } = op
                {
                    let insns =
                        steering_program(qdisc.major(), *first_major, *groups, *first_minor);
                    match crate::sys::bpf_load_sched_cls(&insns) {
                        Ok(p) => {
                            fd = Some(std::os::fd::AsRawFd::as_raw_fd(&p));
                            progs.push(p);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "steering program refused; the filter message will fail")
                        }
                    }
                }
                encode_with(&mut self.tx, op, seq, fd);
                // One datagram of at most ~32 KiB; the kernel handles each message in turn.
                if self.tx.len() > 32 << 10 {
                    sent = self.sock.send(&self.tx);
                    self.tx.clear();
                    if sent.is_err() {
                        break;
                    }
                }
            }
            if sent.is_ok() && !self.tx.is_empty() {
                sent = self.sock.send(&self.tx);
            }
            if let Err(e) = sent {
                let e = KernelError::io(e);
                results.extend(
                    chunk_results
                        .into_iter()
                        .map(|r| r.unwrap_or(Err(e.clone()))),
                );
                continue;
            }
            let mut pending = chunk.len();
            while pending > 0 {
                let n = match self.sock.recv(&mut self.rx) {
                    Ok(n) => n,
                    Err(e) => {
                        let e = KernelError::io(e);
                        for r in chunk_results.iter_mut().filter(|r| r.is_none()) {
                            *r = Some(Err(e.clone()));
                        }
                        silent = Some(e);
                        break;
                    }
                };
                for msg in messages(&self.rx[..n]) {
                    let Ok((ty, flags, seq, payload)) = msg else {
                        continue;
                    };
                    if ty != NLMSG_ERROR {
                        continue;
                    }
                    let idx = seq.wrapping_sub(first_seq) as usize;
                    if let Some(slot) = chunk_results.get_mut(idx) {
                        if slot.is_none() {
                            *slot = Some(decode_error(flags, payload));
                            pending -= 1;
                        }
                    }
                }
            }
            results.extend(
                chunk_results
                    .into_iter()
                    .map(|r| r.unwrap_or_else(|| Err(KernelError::malformed("missing ack")))),
            );
        }
        results
    }

    /// Sends a dump request and hands each reply message's payload to `each`.
    fn dump(
        &mut self,
        ty: u16,
        ifindex: u32,
        parent: u32,
        mut each: impl FnMut(&[u8]),
    ) -> Result<(), KernelError> {
        let seq = self.next_seq();
        self.tx.clear();
        push_tc_msg(
            &mut self.tx,
            ty,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            ifindex,
            0,
            parent,
            |_| {},
        );
        self.sock.send(&self.tx).map_err(KernelError::io)?;
        loop {
            let n = self.sock.recv(&mut self.rx).map_err(KernelError::io)?;
            for msg in messages(&self.rx[..n]) {
                let (mty, flags, mseq, payload) = msg?;
                if mseq != seq {
                    continue;
                }
                match mty {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => return decode_error(flags, payload),
                    _ => each(payload),
                }
            }
        }
    }

    /// Creates an IFB device `name`, up (`RTM_NEWLINK`, kind `ifb`).
    pub fn create_ifb(&mut self, name: &str) -> Result<(), KernelError> {
        let seq = self.next_seq();
        self.tx.clear();
        push_link_msg(
            &mut self.tx,
            RTM_NEWLINK,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            seq,
            0,
            |b| {
                let mut n = Vec::with_capacity(name.len() + 1);
                n.extend_from_slice(name.as_bytes());
                n.push(0);
                put_attr(b, IFLA_IFNAME, &n);
                let info = begin_nest(b, IFLA_LINKINFO);
                put_attr(b, IFLA_INFO_KIND, b"ifb\0");
                end_nest(b, info);
            },
        );
        self.ack(seq)
    }

    /// Deletes interface `ifindex` (`RTM_DELLINK`): its qdiscs go with it.
    pub fn delete_link(&mut self, ifindex: u32) -> Result<(), KernelError> {
        let seq = self.next_seq();
        self.tx.clear();
        push_link_msg(
            &mut self.tx,
            RTM_DELLINK,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            ifindex,
            |_| {},
        );
        self.ack(seq)
    }

    fn ack(&mut self, seq: u32) -> Result<(), KernelError> {
        self.sock.send(&self.tx).map_err(KernelError::io)?;
        loop {
            let n = self.sock.recv(&mut self.rx).map_err(KernelError::io)?;
            for msg in messages(&self.rx[..n]) {
                let (ty, flags, mseq, payload) = msg?;
                if ty == NLMSG_ERROR && mseq == seq {
                    return decode_error(flags, payload);
                }
            }
        }
    }

    /// The qdiscs on interface `ifindex`.
    pub fn qdiscs(&mut self, ifindex: u32) -> Result<Vec<QdiscInfo>, KernelError> {
        let mut out = Vec::new();
        self.dump(RTM_GETQDISC, ifindex, 0, |p| {
            let (Some(idx), Some(handle), Some(parent)) =
                (u32_at(p, 4), u32_at(p, 8), u32_at(p, 12))
            else {
                return;
            };
            if idx != ifindex {
                return;
            }
            let kind = attrs(p.get(20..).unwrap_or(&[]))
                .find(|(t, _)| *t == TCA_KIND)
                .map(|(_, d)| {
                    String::from_utf8_lossy(d.split(|&c| c == 0).next().unwrap_or(&[])).into_owned()
                })
                .unwrap_or_default();
            out.push(QdiscInfo {
                ifindex: idx,
                handle: TcHandle(handle),
                parent,
                kind,
            });
        })?;
        Ok(out)
    }

    /// The classes of qdisc `major` (0: of every qdisc) on interface
    /// `ifindex`, with counters.
    pub fn classes(&mut self, ifindex: u32, major: u16) -> Result<Vec<ClassInfo>, KernelError> {
        let mut out = Vec::new();
        let qdisc = u32::from(major) << 16;
        self.dump(RTM_GETTCLASS, ifindex, qdisc, |p| {
            let (Some(idx), Some(handle), Some(parent)) =
                (u32_at(p, 4), u32_at(p, 8), u32_at(p, 12))
            else {
                return;
            };
            if idx != ifindex || (qdisc != 0 && handle & 0xFFFF_0000 != qdisc) {
                return;
            }
            let mut c = ClassInfo {
                classid: TcHandle(handle).to_string(),
                handle,
                parent,
                ..ClassInfo::default()
            };
            let (mut rate64, mut ceil64) = (None, None);
            for (ty, data) in attrs(p.get(20..).unwrap_or(&[])) {
                match ty {
                    TCA_OPTIONS => {
                        for (oty, od) in attrs(data) {
                            match oty {
                                TCA_HTB_PARMS => {
                                    c.rate_kbps = u64::from(u32_at(od, 8).unwrap_or(0)) / 125;
                                    c.ceil_kbps = u64::from(u32_at(od, 20).unwrap_or(0)) / 125;
                                    c.prio = u32_at(od, 40).unwrap_or(0);
                                }
                                TCA_HTB_RATE64 => rate64 = u64_at(od, 0),
                                TCA_HTB_CEIL64 => ceil64 = u64_at(od, 0),
                                _ => {}
                            }
                        }
                    }
                    TCA_STATS2 => {
                        for (sty, sd) in attrs(data) {
                            match sty {
                                TCA_STATS_BASIC => {
                                    c.bytes = u64_at(sd, 0).unwrap_or(0);
                                    c.packets = u32_at(sd, 8).unwrap_or(0);
                                }
                                TCA_STATS_QUEUE => {
                                    c.backlog_bytes = u32_at(sd, 4).unwrap_or(0);
                                    c.drops = u32_at(sd, 8).unwrap_or(0);
                                    c.overlimits = u32_at(sd, 16).unwrap_or(0);
                                }
                                _ => {}
                            }
                        }
                    }
                    _ => {}
                }
            }
            if let Some(r) = rate64 {
                c.rate_kbps = r / 125;
            }
            if let Some(r) = ceil64 {
                c.ceil_kbps = r / 125;
            }
            out.push(c);
        })?;
        Ok(out)
    }
}
