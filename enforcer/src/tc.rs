//! HTB qdiscs and classes over rtnetlink, hand-encoded.
//!
//! The messages are `struct tcmsg` followed by attributes; HTB's options are
//! `TCA_HTB_INIT` (`struct tc_htb_glob`) for the qdisc and `TCA_HTB_PARMS`
//! (`struct tc_htb_opt`) for a class, plus `TCA_HTB_RATE64`/`CEIL64` above
//! 4 GB/s. Rates carry `linklayer = ethernet`, so the kernel needs no rate
//! tables. A class rate change is one `RTM_NEWTCLASS` with `NLM_F_REPLACE`.

use crate::sys::NetlinkSocket;
use qosloop_schema::Kbps;
use std::fmt;

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFF_UP: u32 = 1;
const RTM_NEWQDISC: u16 = 36;
const RTM_DELQDISC: u16 = 37;
const RTM_GETQDISC: u16 = 38;
const RTM_NEWTCLASS: u16 = 40;
const RTM_DELTCLASS: u16 = 41;
const RTM_GETTCLASS: u16 = 42;
const RTM_NEWTFILTER: u16 = 44;
const TCA_BPF_FD: u16 = 6;
const TCA_BPF_NAME: u16 = 7;
/// Handle of the steering filter (prio 1, protocol all).
const STEER_FILTER_HANDLE: u32 = 1;
/// `tcm_info` of the steering filter: prio 1, protocol `htons(ETH_P_ALL)`.
const STEER_FILTER_INFO: u32 = (1 << 16) | (0x0003u16.to_be() as u32);

pub(crate) const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;

const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_STATS2: u16 = 7;
const TCA_STATS_BASIC: u16 = 1;
const TCA_STATS_QUEUE: u16 = 3;
const TCA_HTB_PARMS: u16 = 1;
const TCA_HTB_INIT: u16 = 2;
const TCA_HTB_RATE64: u16 = 6;
const TCA_HTB_CEIL64: u16 = 7;
pub(crate) const NLA_F_NESTED: u16 = 0x8000;

const TC_H_ROOT: u32 = 0xFFFF_FFFF;
const TC_LINKLAYER_ETHERNET: u8 = 1;
/// `tc`'s default for the HTB `r2q` divisor.
const HTB_RATE2QUANTUM: u32 = 10;
/// Nanoseconds per psched tick (`PSCHED_SHIFT` = 6).
const NS_PER_TICK: u128 = 64;

/// A tc handle `MAJOR:MINOR` (both hex, as `tc` prints them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TcHandle(pub u32);

impl TcHandle {
    pub const fn new(major: u16, minor: u16) -> TcHandle {
        TcHandle(((major as u32) << 16) | minor as u32)
    }
    pub const fn major(self) -> u16 {
        (self.0 >> 16) as u16
    }
    pub const fn minor(self) -> u16 {
        self.0 as u16
    }
}

impl fmt::Display for TcHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}:{:x}", self.major(), self.minor())
    }
}

/// Parameters of one HTB class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HtbClass {
    pub classid: TcHandle,
    pub parent: TcHandle,
    pub rate: Kbps,
    pub ceil: Kbps,
    pub prio: u32,
}

/// One change to the kernel's traffic control state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TcOp {
    /// An HTB qdisc whose unclassified traffic goes to `default_minor`: the
    /// root qdisc when `parent` is 0, else the leaf qdisc of class `parent`.
    CreateQdisc {
        ifindex: u32,
        handle: TcHandle,
        parent: TcHandle,
        default_minor: u16,
    },
    /// The steering filter on root qdisc `qdisc` (created or replaced): an
    /// eBPF cls_bpf program that sends a packet whose priority major is
    /// `first_major + g` (`g < groups`) to class `qdisc.major:(first_minor + g)`.
    Steer {
        ifindex: u32,
        qdisc: TcHandle,
        first_major: u16,
        groups: u16,
        first_minor: u16,
    },
    DeleteQdisc {
        ifindex: u32,
        handle: TcHandle,
    },
    CreateClass {
        ifindex: u32,
        class: HtbClass,
    },
    ChangeClass {
        ifindex: u32,
        class: HtbClass,
    },
    DeleteClass {
        ifindex: u32,
        classid: TcHandle,
    },
}

impl fmt::Display for TcOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let class = |f: &mut fmt::Formatter<'_>, verb: &str, ifindex: u32, c: &HtbClass| {
            write!(
                f,
                "RTM_NEWTCLASS {verb} ifindex {ifindex} parent {} classid {} htb rate {} ceil {} prio {}",
                c.parent, c.classid, c.rate, c.ceil, c.prio
            )
        };
        match self {
            TcOp::CreateQdisc {
                ifindex,
                handle,
                parent,
                default_minor,
            } => {
                let at = if parent.0 == 0 {
                    "root".to_owned()
                } else {
                    format!("parent {parent}")
                };
                write!(
                    f,
                    "RTM_NEWQDISC create ifindex {ifindex} {at} handle {handle} htb default {default_minor:x}"
                )
            }
            TcOp::Steer {
                ifindex,
                qdisc,
                first_major,
                groups,
                first_minor,
            } => write!(
                f,
                "RTM_NEWTFILTER create/replace ifindex {ifindex} parent {qdisc} prio 1 protocol all bpf (eBPF: priority major {first_major:x}+g, g < {groups} -> classid {:x}:{:x}+g)",
                qdisc.major(),
                first_minor
            ),
            TcOp::DeleteQdisc { ifindex, handle } => {
                write!(f, "RTM_DELQDISC ifindex {ifindex} root handle {handle}")
            }
            TcOp::CreateClass { ifindex, class: c } => class(f, "create", *ifindex, c),
            TcOp::ChangeClass { ifindex, class: c } => class(f, "replace", *ifindex, c),
            TcOp::DeleteClass { ifindex, classid } => {
                write!(f, "RTM_DELTCLASS ifindex {ifindex} classid {classid}")
            }
        }
    }
}

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
    fn io(e: std::io::Error) -> KernelError {
        KernelError {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            message: Some(e.to_string()),
        }
    }
    fn malformed(what: &str) -> KernelError {
        KernelError {
            errno: libc::EPROTO,
            message: Some(format!("malformed netlink reply: {what}")),
        }
    }
}

/// A qdisc as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QdiscInfo {
    pub ifindex: u32,
    pub handle: TcHandle,
    pub parent: u32,
    pub kind: String,
}

impl QdiscInfo {
    pub fn is_root(&self) -> bool {
        self.parent == TC_H_ROOT
    }
}

/// An HTB class as the kernel reports it, with its counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClassInfo {
    pub classid: String,
    #[serde(skip)]
    pub handle: u32,
    #[serde(skip)]
    pub parent: u32,
    pub rate_kbps: u64,
    pub ceil_kbps: u64,
    pub prio: u32,
    pub bytes: u64,
    pub packets: u32,
    pub drops: u32,
    pub overlimits: u32,
    pub backlog_bytes: u32,
}

// ---- encoding -------------------------------------------------------------

pub(crate) fn align4(n: usize) -> usize {
    (n + 3) & !3
}

pub(crate) fn put_u16(b: &mut Vec<u8>, v: u16) {
    b.extend_from_slice(&v.to_ne_bytes());
}
pub(crate) fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_ne_bytes());
}

pub(crate) fn put_attr(b: &mut Vec<u8>, ty: u16, data: &[u8]) {
    put_u16(b, (4 + data.len()) as u16);
    put_u16(b, ty);
    b.extend_from_slice(data);
    b.resize(align4(b.len()), 0);
}

pub(crate) fn begin_nest(b: &mut Vec<u8>, ty: u16) -> usize {
    let at = b.len();
    put_u16(b, 0);
    put_u16(b, ty | NLA_F_NESTED);
    at
}

pub(crate) fn end_nest(b: &mut [u8], at: usize) {
    let len = (b.len() - at) as u16;
    b[at..at + 2].copy_from_slice(&len.to_ne_bytes());
}

/// Appends one netlink message: the 16-byte header, then whatever `body`
/// writes (family header and attributes); the length is patched in after.
pub(crate) fn push_nlmsg(
    b: &mut Vec<u8>,
    ty: u16,
    flags: u16,
    seq: u32,
    body: impl FnOnce(&mut Vec<u8>),
) {
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

/// Appends one link message: header, `struct ifinfomsg` (set up when
/// creating), then `attrs`.
fn push_link_msg(
    b: &mut Vec<u8>,
    ty: u16,
    flags: u16,
    seq: u32,
    ifindex: u32,
    attrs: impl FnOnce(&mut Vec<u8>),
) {
    push_nlmsg(b, ty, flags, seq, |b| {
        b.extend_from_slice(&[0u8, 0]); // family, pad
        put_u16(b, 0); // type
        b.extend_from_slice(&(ifindex as i32).to_ne_bytes());
        let up = if ty == RTM_NEWLINK { IFF_UP } else { 0 };
        put_u32(b, up); // flags
        put_u32(b, up); // change
        attrs(b);
    });
}

/// Appends one netlink message: header, `struct tcmsg`, then `attrs`.
/// (The arguments are the fields of the two headers, in wire order.)
#[allow(clippy::too_many_arguments)]
fn push_tc_msg(
    b: &mut Vec<u8>,
    ty: u16,
    flags: u16,
    seq: u32,
    ifindex: u32,
    handle: u32,
    parent: u32,
    attrs: impl FnOnce(&mut Vec<u8>),
) {
    push_nlmsg(b, ty, flags, seq, |b| {
        b.extend_from_slice(&[0u8, 0, 0, 0]); // family, pad1, pad2
        b.extend_from_slice(&(ifindex as i32).to_ne_bytes());
        put_u32(b, handle);
        put_u32(b, parent);
        put_u32(b, 0); // info
        attrs(b);
    });
}

fn bytes_per_sec(rate: Kbps) -> u64 {
    rate.0.saturating_mul(125)
}

/// `struct tc_ratespec` for a byte rate (saturated at u32; RATE64 carries more).
fn ratespec(b: &mut Vec<u8>, bps: u64) {
    b.push(0); // cell_log
    b.push(TC_LINKLAYER_ETHERNET);
    put_u16(b, 0); // overhead
    b.extend_from_slice(&0i16.to_ne_bytes()); // cell_align
    put_u16(b, 0); // mpu
    put_u32(b, bps.min(u64::from(u32::MAX)) as u32);
}

/// The burst `tc` picks by default (rate / HZ + MTU), as psched ticks of
/// transmission time at `bps`.
fn buffer_ticks(bps: u64) -> u32 {
    let burst = u128::from(bps / 1000 + 1600);
    let ns = burst * 1_000_000_000 / u128::from(bps.max(1));
    (ns / NS_PER_TICK).min(u128::from(u32::MAX)) as u32
}

fn quantum(bps: u64) -> u32 {
    (bps / u64::from(HTB_RATE2QUANTUM)).clamp(1600, 200_000) as u32
}

fn htb_class_options(b: &mut Vec<u8>, c: &HtbClass) {
    let rate = bytes_per_sec(c.rate);
    let ceil = bytes_per_sec(c.ceil.max(c.rate));
    put_attr(b, TCA_KIND, b"htb\0");
    let nest = begin_nest(b, TCA_OPTIONS);
    let mut opt = Vec::with_capacity(44);
    ratespec(&mut opt, rate);
    ratespec(&mut opt, ceil);
    put_u32(&mut opt, buffer_ticks(rate));
    put_u32(&mut opt, buffer_ticks(ceil));
    put_u32(&mut opt, quantum(rate));
    put_u32(&mut opt, 0); // level: the kernel computes it
    put_u32(&mut opt, c.prio.min(7));
    put_attr(b, TCA_HTB_PARMS, &opt);
    if rate > u64::from(u32::MAX) {
        put_attr(b, TCA_HTB_RATE64, &rate.to_ne_bytes());
    }
    if ceil > u64::from(u32::MAX) {
        put_attr(b, TCA_HTB_CEIL64, &ceil.to_ne_bytes());
    }
    end_nest(b, nest);
}

/// Appends the message for `op` with sequence number `seq`.
pub fn encode(b: &mut Vec<u8>, op: &TcOp, seq: u32) {
    encode_with(b, op, seq, None);
}

/// Like [`encode`]; `prog_fd` is the loaded steering program of a `Steer` op.
pub fn encode_with(b: &mut Vec<u8>, op: &TcOp, seq: u32, prog_fd: Option<i32>) {
    let req = NLM_F_REQUEST | NLM_F_ACK;
    match op {
        TcOp::Steer { ifindex, qdisc, .. } => {
            let at = b.len();
            push_tc_msg(
                b,
                RTM_NEWTFILTER,
                req | NLM_F_CREATE | NLM_F_REPLACE,
                seq,
                *ifindex,
                STEER_FILTER_HANDLE,
                qdisc.0 & 0xFFFF_0000,
                |b| {
                    put_attr(b, TCA_KIND, b"bpf\0");
                    let nest = begin_nest(b, TCA_OPTIONS);
                    if let Some(fd) = prog_fd {
                        put_attr(b, TCA_BPF_FD, &(fd as u32).to_ne_bytes());
                    }
                    put_attr(b, TCA_BPF_NAME, b"qosloop_steer\0");
                    end_nest(b, nest);
                },
            );
            // tcm_info (after the 16-byte header and four tcmsg words).
            b[at + 32..at + 36].copy_from_slice(&STEER_FILTER_INFO.to_ne_bytes());
        }
        TcOp::CreateQdisc {
            ifindex,
            handle,
            parent,
            default_minor,
        } => push_tc_msg(
            b,
            RTM_NEWQDISC,
            req | NLM_F_CREATE | NLM_F_EXCL,
            seq,
            *ifindex,
            handle.0 & 0xFFFF_0000,
            if parent.0 == 0 { TC_H_ROOT } else { parent.0 },
            |b| {
                put_attr(b, TCA_KIND, b"htb\0");
                let nest = begin_nest(b, TCA_OPTIONS);
                let mut glob = Vec::with_capacity(20);
                put_u32(&mut glob, 3); // HTB_VER >> 16
                put_u32(&mut glob, HTB_RATE2QUANTUM);
                put_u32(&mut glob, u32::from(*default_minor));
                put_u32(&mut glob, 0); // debug
                put_u32(&mut glob, 0); // direct_pkts
                put_attr(b, TCA_HTB_INIT, &glob);
                end_nest(b, nest);
            },
        ),
        TcOp::DeleteQdisc { ifindex, handle } => push_tc_msg(
            b,
            RTM_DELQDISC,
            req,
            seq,
            *ifindex,
            handle.0 & 0xFFFF_0000,
            TC_H_ROOT,
            |_| {},
        ),
        TcOp::CreateClass { ifindex, class } | TcOp::ChangeClass { ifindex, class } => {
            let flags = if matches!(op, TcOp::CreateClass { .. }) {
                req | NLM_F_CREATE | NLM_F_EXCL
            } else {
                req | NLM_F_REPLACE
            };
            let parent = if class.parent.0 == 0 {
                TC_H_ROOT
            } else {
                class.parent.0
            };
            push_tc_msg(
                b,
                RTM_NEWTCLASS,
                flags,
                seq,
                *ifindex,
                class.classid.0,
                parent,
                |b| htb_class_options(b, class),
            )
        }
        TcOp::DeleteClass { ifindex, classid } => {
            push_tc_msg(b, RTM_DELTCLASS, req, seq, *ifindex, classid.0, 0, |_| {})
        }
    }
}

/// One eBPF instruction: opcode, dst/src registers, offset, immediate.
fn insn(b: &mut Vec<u8>, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
    b.push(code);
    b.push((src << 4) | (dst & 0x0f));
    b.extend_from_slice(&off.to_ne_bytes());
    b.extend_from_slice(&imm.to_ne_bytes());
}

/// The steering program of a [`TcOp::Steer`], for cls_bpf in classid mode
/// (the return value is the class; 0 means no match):
///
/// ```text
/// r0 = skb->priority >> 16          ; the priority's major
/// r0 -= first_major
/// if r0 >= groups goto none         ; unsigned: below first_major too
/// r0 += root_major << 16 | first_minor
/// exit
/// none: r0 = 0; exit
/// ```
pub fn steering_program(
    root_major: u16,
    first_major: u16,
    groups: u16,
    first_minor: u16,
) -> Vec<u8> {
    const SKB_PRIORITY: i16 = 32; // offsetof(struct __sk_buff, priority)
    let mut b = Vec::with_capacity(64);
    insn(&mut b, 0x61, 0, 1, SKB_PRIORITY, 0); // ldxw r0, [r1+32]
    insn(&mut b, 0x77, 0, 0, 0, 16); // rsh64 r0, 16
    insn(&mut b, 0x17, 0, 0, 0, i32::from(first_major)); // sub64 r0, k
    insn(&mut b, 0x35, 0, 0, 2, i32::from(groups)); // jge r0, k, +2
    insn(
        &mut b,
        0x07,
        0,
        0,
        0,
        ((u32::from(root_major) << 16) | u32::from(first_minor)) as i32,
    ); // add64 r0, k
    insn(&mut b, 0x95, 0, 0, 0, 0); // exit
    insn(&mut b, 0xb7, 0, 0, 0, 0); // mov64 r0, 0
    insn(&mut b, 0x95, 0, 0, 0, 0); // exit
    b
}

// ---- decoding -------------------------------------------------------------

pub(crate) fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
pub(crate) fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
pub(crate) fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Iterates `(type, payload)` over netlink attributes; stops at a bad length.
pub(crate) fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
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
pub(crate) fn messages(
    mut b: &[u8],
) -> impl Iterator<Item = Result<(u16, u16, u32, &[u8]), KernelError>> {
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
pub(crate) fn decode_error(flags: u16, payload: &[u8]) -> Result<(), KernelError> {
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

// ---- the client -------------------------------------------------------------

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
            sock: NetlinkSocket::open(libc::NETLINK_ROUTE).map_err(KernelError::io)?,
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
        for chunk in ops.chunks(PIPELINE) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_print_like_tc() {
        assert_eq!(TcHandle::new(0xe5, 0x107).to_string(), "e5:107");
        assert_eq!(TcHandle::new(0xe5, 0x107).minor(), 0x107);
    }

    #[test]
    fn class_change_is_one_message_with_parms() {
        let op = TcOp::ChangeClass {
            ifindex: 7,
            class: HtbClass {
                classid: TcHandle::new(0xe5, 0x101),
                parent: TcHandle::new(0xe5, 1),
                rate: Kbps(875),
                ceil: Kbps(875),
                prio: 1,
            },
        };
        let mut b = Vec::new();
        encode(&mut b, &op, 9);
        let (ty, flags, seq, payload) = messages(&b).next().unwrap().unwrap();
        assert_eq!((ty, seq), (RTM_NEWTCLASS, 9));
        assert_eq!(flags, NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE);
        assert_eq!(messages(&b).count(), 1);
        assert_eq!(u32_at(payload, 4), Some(7));
        assert_eq!(u32_at(payload, 8), Some(0x00e5_0101));
        let opts = attrs(&payload[20..])
            .find(|(t, _)| *t == TCA_OPTIONS)
            .unwrap()
            .1;
        let parms = attrs(opts).find(|(t, _)| *t == TCA_HTB_PARMS).unwrap().1;
        assert_eq!(parms.len(), 44);
        assert_eq!(parms[1], TC_LINKLAYER_ETHERNET);
        assert_eq!(u32_at(parms, 8), Some(875 * 125));
        assert_eq!(u32_at(parms, 40), Some(1));
        assert!(attrs(opts).all(|(t, _)| t != TCA_HTB_RATE64));
    }

    #[test]
    fn rates_above_u32_use_rate64() {
        let op = TcOp::CreateClass {
            ifindex: 1,
            class: HtbClass {
                classid: TcHandle::new(1, 1),
                parent: TcHandle(0),
                rate: Kbps(100_000_000),
                ceil: Kbps(100_000_000),
                prio: 0,
            },
        };
        let mut b = Vec::new();
        encode(&mut b, &op, 1);
        let (_, _, _, payload) = messages(&b).next().unwrap().unwrap();
        assert_eq!(u32_at(payload, 12), Some(TC_H_ROOT));
        let opts = attrs(&payload[20..])
            .find(|(t, _)| *t == TCA_OPTIONS)
            .unwrap()
            .1;
        let r64 = attrs(opts).find(|(t, _)| *t == TCA_HTB_RATE64).unwrap().1;
        assert_eq!(u64_at(r64, 0), Some(12_500_000_000));
    }

    #[test]
    fn buffer_matches_tc_default() {
        // 1 Mbit/s: 125000 B/s, burst 1725 B, 13.8 ms = 215625 ticks.
        assert_eq!(buffer_ticks(125_000), 215_625);
        assert_eq!(quantum(125_000), 12_500);
        assert_eq!(quantum(1_000), 1600);
    }

    #[test]
    fn error_with_extack_text_decodes() {
        let mut p = Vec::new();
        p.extend_from_slice(&(-22i32).to_ne_bytes());
        p.extend_from_slice(&[0u8; 16]); // capped original header
        put_attr(&mut p, NLMSGERR_ATTR_MSG, b"Specified class not found\0");
        let e = decode_error(NLM_F_ACK_TLVS | 0x100, &p).unwrap_err();
        assert_eq!(e.errno, 22);
        assert_eq!(e.message.as_deref(), Some("Specified class not found"));
        assert!(e.to_string().contains("Specified class not found"));
        assert!(decode_error(0, &0i32.to_ne_bytes()).is_ok());
        assert!(decode_error(0, &[1]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_replies_decode_without_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            for m in messages(&bytes).flatten() {
                let _ = decode_error(m.1, m.3);
                let _ = attrs(m.3).count();
            }
        }

        #[test]
        fn encoded_ops_parse_back(rate in 1u64..100_000_000, minor in 1u16..0xFFFF, seq in proptest::num::u32::ANY) {
            let class = HtbClass {
                classid: TcHandle::new(0xe5, minor),
                parent: TcHandle::new(0xe5, 1),
                rate: Kbps(rate),
                ceil: Kbps(rate),
                prio: 3,
            };
            let mut b = Vec::new();
            encode(&mut b, &TcOp::ChangeClass { ifindex: 9, class }, seq);
            let (ty, _, s, payload) = messages(&b).next().unwrap().unwrap();
            proptest::prop_assert_eq!((ty, s), (RTM_NEWTCLASS, seq));
            let opts = attrs(&payload[20..]).find(|(t, _)| *t == TCA_OPTIONS).unwrap().1;
            let parms = attrs(opts).find(|(t, _)| *t == TCA_HTB_PARMS).unwrap().1;
            let r64 = attrs(opts).find(|(t, _)| *t == TCA_HTB_RATE64).map(|(_, d)| u64_at(d, 0).unwrap());
            let rate_bytes = r64.unwrap_or(u64::from(u32_at(parms, 8).unwrap()));
            proptest::prop_assert_eq!(rate_bytes, rate * 125);
        }
    }

    #[test]
    fn garbage_replies_do_not_panic() {
        for n in 0..64u8 {
            let junk: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37)).collect();
            let _ = messages(&junk).count();
            let _ = attrs(&junk).count();
        }
    }
}
