//! HTB qdiscs and classes over rtnetlink, hand-encoded.
//!
//! The messages are `struct tcmsg` followed by attributes; HTB's options are
//! `TCA_HTB_INIT` (`struct tc_htb_glob`) for the qdisc and `TCA_HTB_PARMS`
//! (`struct tc_htb_opt`) for a class, plus `TCA_HTB_RATE64`/`CEIL64` above
//! 4 GB/s. Rates carry `linklayer = ethernet`, so the kernel needs no rate
//! tables. A class rate change is one `RTM_NEWTCLASS` with `NLM_F_REPLACE`.
//!
//! This module owns the message encoding only; the client that sends them
//! is `rtnl`, the framing `netlink`, the steering program
//! `bpf`.

pub use crate::netlink::KernelError;
use crate::netlink::{
    begin_nest, end_nest, push_nlmsg, put_attr, put_u16, put_u32, NLM_F_ACK, NLM_F_CREATE,
    NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
};
pub use crate::rtnl::Rtnl;
pub use crate::sys::if_index;
use qosloop_schema::Kbps;
use std::fmt;

pub(crate) const RTM_NEWLINK: u16 = 16;
pub(crate) const RTM_DELLINK: u16 = 17;
pub(crate) const IFLA_IFNAME: u16 = 3;
pub(crate) const IFLA_LINKINFO: u16 = 18;
pub(crate) const IFLA_INFO_KIND: u16 = 1;
const IFF_UP: u32 = 1;
const RTM_NEWQDISC: u16 = 36;
const RTM_DELQDISC: u16 = 37;
pub(crate) const RTM_GETQDISC: u16 = 38;
const RTM_NEWTCLASS: u16 = 40;
const RTM_DELTCLASS: u16 = 41;
pub(crate) const RTM_GETTCLASS: u16 = 42;
const RTM_NEWTFILTER: u16 = 44;
const TCA_BPF_FD: u16 = 6;
const TCA_BPF_NAME: u16 = 7;
/// Handle of the steering filter (prio 1, protocol all).
const STEER_FILTER_HANDLE: u32 = 1;
/// `tcm_info` of the steering filter: prio 1, protocol `htons(ETH_P_ALL)`.
const STEER_FILTER_INFO: u32 = (1 << 16) | (0x0003u16.to_be() as u32);

pub(crate) const TCA_KIND: u16 = 1;
pub(crate) const TCA_OPTIONS: u16 = 2;
pub(crate) const TCA_STATS2: u16 = 7;
pub(crate) const TCA_STATS_BASIC: u16 = 1;
pub(crate) const TCA_STATS_QUEUE: u16 = 3;
pub(crate) const TCA_HTB_PARMS: u16 = 1;
const TCA_HTB_INIT: u16 = 2;
pub(crate) const TCA_HTB_RATE64: u16 = 6;
pub(crate) const TCA_HTB_CEIL64: u16 = 7;

pub(crate) const TC_H_ROOT: u32 = 0xFFFF_FFFF;
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

/// Appends one link message: header, `struct ifinfomsg` (set up when
/// creating), then `attrs`.
pub(crate) fn push_link_msg(
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
pub(crate) fn push_tc_msg(
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

pub use crate::bpf::steering_program;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::*;

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
