//! A node's share of the traffic as a classic BPF socket filter.
//!
//! Every frame falls into one of [`BUCKETS`] hash buckets; a share is the
//! set of buckets a node owns (a 64-bit mask). The filter computes the
//! bucket in the kernel and accepts the frame only when its bit is set, so
//! the kernel copies nothing else to user space. [`bucket_of`] is the same
//! function in Rust: the tests run the generated program in an interpreter
//! against it, and nodes use it to count packets outside their share.
//!
//! The hash (all arithmetic wrapping on 32 bits, big-endian loads):
//! - per flow, IPv4: `src + dst`, plus `sport + dport` for TCP, UDP and
//!   SCTP when the frame is not a fragment and holds the ports. Sums are
//!   symmetric, so both directions of a flow share a bucket. Fragments
//!   (MF set or offset > 0) hash by addresses only, so every fragment of a
//!   datagram lands with its flow's ports-less key on one defined node.
//! - per flow, IPv6: the sum of the eight address words, plus the ports
//!   when the next header is TCP, UDP or SCTP directly (any extension
//!   header, fragments included: addresses only).
//! - per packet (DiCAP's IP-id mode), IPv4: `src + dst + id`; IPv6 has no
//!   id and uses the per-flow hash.
//! - anything else (non-IP, frames too short for the fields read): bucket
//!   0, so it is never lost: whoever owns bucket 0 gets it.
//!
//! The bucket is the top six bits of `hash * 0x9E3779B1` (Fibonacci
//! hashing), which spreads consecutive ports and ids evenly.

use crate::afpacket::BpfInsn;
use serde::{Deserialize, Serialize};

/// Hash buckets spread over the nodes.
pub const BUCKETS: u32 = 64;
const MULTIPLIER: u32 = 0x9E37_79B1;
const SHIFT: u32 = 26; // 32 - log2(BUCKETS)

/// How packets are split among nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShareMode {
    /// Whole flows, both directions, to one node.
    Flow,
    /// Packets by IPv4 id: a flow's records come from several nodes and
    /// are merged ([`super::merge`]).
    Packet,
}

impl std::str::FromStr for ShareMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "flow" => Ok(ShareMode::Flow),
            "packet" => Ok(ShareMode::Packet),
            other => Err(format!("share mode {other:?}: expected flow or packet")),
        }
    }
}

impl std::fmt::Display for ShareMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ShareMode::Flow => "flow",
            ShareMode::Packet => "packet",
        })
    }
}

fn mix(hash: u32) -> u8 {
    (hash.wrapping_mul(MULTIPLIER) >> SHIFT) as u8
}

fn be16(f: &[u8], at: usize) -> Option<u32> {
    Some(u32::from(u16::from_be_bytes(
        f.get(at..at + 2)?.try_into().ok()?,
    )))
}

fn be32(f: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(f.get(at..at + 4)?.try_into().ok()?))
}

fn has_ports(proto: u8) -> bool {
    matches!(proto, 6 | 17 | 132)
}

/// The bucket of an Ethernet frame (as the socket filter computes it).
pub fn bucket_of(frame: &[u8], mode: ShareMode) -> u8 {
    hash_of(frame, mode).map_or(0, mix)
}

fn hash_of(f: &[u8], mode: ShareMode) -> Option<u32> {
    match be16(f, 12)? {
        0x0800 => {
            let addrs = be32(f, 26)?.wrapping_add(be32(f, 30)?);
            if mode == ShareMode::Packet {
                return Some(addrs.wrapping_add(be16(f, 18)?));
            }
            let frag = be16(f, 20)? & 0x3fff != 0;
            let ihl = usize::from(f[14] & 0x0f) * 4;
            if frag || !has_ports(f[23]) || f.len() < ihl + 18 {
                return Some(addrs);
            }
            let ports = be16(f, ihl + 14)?.wrapping_add(be16(f, ihl + 16)?);
            Some(addrs.wrapping_add(ports))
        }
        0x86dd => {
            let mut sum = 0u32;
            for at in (22..54).step_by(4) {
                sum = sum.wrapping_add(be32(f, at)?);
            }
            if !has_ports(f[20]) || f.len() < 58 {
                return Some(sum);
            }
            Some(sum.wrapping_add(be16(f, 54)?).wrapping_add(be16(f, 56)?))
        }
        _ => None,
    }
}

use crate::afpacket::op::*;

/// A program under construction with symbolic jump targets.
struct Asm {
    insns: Vec<(BpfInsn, Option<&'static str>, Option<&'static str>)>,
    labels: Vec<(&'static str, usize)>,
}

impl Asm {
    fn new() -> Self {
        Asm {
            insns: Vec::new(),
            labels: Vec::new(),
        }
    }
    fn op(&mut self, code: u16, k: u32) -> &mut Self {
        self.insns.push((
            BpfInsn {
                code,
                jt: 0,
                jf: 0,
                k,
            },
            None,
            None,
        ));
        self
    }
    /// A conditional jump: to `t` when true, `f` when false (`None`: next).
    fn jmp(
        &mut self,
        code: u16,
        k: u32,
        t: Option<&'static str>,
        f: Option<&'static str>,
    ) -> &mut Self {
        self.insns.push((
            BpfInsn {
                code,
                jt: 0,
                jf: 0,
                k,
            },
            t,
            f,
        ));
        self
    }
    fn label(&mut self, name: &'static str) -> &mut Self {
        self.labels.push((name, self.insns.len()));
        self
    }
    /// A + M[slot] -> A (through X).
    fn add_mem(&mut self, slot: u32) -> &mut Self {
        self.op(TAX, 0).op(LD_MEM, slot).op(ADD_X, 0)
    }
    fn finish(self) -> Vec<BpfInsn> {
        let at = |name: &str| {
            self.labels
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, i)| *i)
                .unwrap_or_else(|| unreachable!("label {name} is defined below"))
        };
        self.insns
            .iter()
            .enumerate()
            .map(|(i, (insn, t, f))| {
                let mut insn = *insn;
                let rel = |target: usize| {
                    u8::try_from(target - i - 1).unwrap_or_else(|_| unreachable!("short program"))
                };
                if insn.code == JA {
                    insn.k = t.map_or(0, |t| (at(t) - i - 1) as u32);
                } else {
                    insn.jt = t.map_or(0, |t| rel(at(t)));
                    insn.jf = f.map_or(0, |f| rel(at(f)));
                }
                insn
            })
            .collect()
    }
}

/// The socket filter accepting (up to `snap` bytes of) exactly the frames
/// whose bucket is set in `mask`. Scratch: M[0] the hash so far.
pub fn share_program(mode: ShareMode, mask: u64, snap: u32) -> Vec<BpfInsn> {
    let mut a = Asm::new();
    // A load past the end would reject the frame: runts go to bucket 0.
    a.op(LD_W_LEN, 0)
        .jmp(JGE_K, 14, None, Some("other"))
        .op(LD_H_ABS, 12)
        .jmp(JEQ_K, 0x0800, Some("v4"), None)
        .jmp(JEQ_K, 0x86dd, Some("v6"), Some("other"));
    // IPv4: make sure the addresses are there, else bucket 0.
    a.label("v4")
        .op(LD_W_LEN, 0)
        .jmp(JGE_K, 34, None, Some("other"))
        .op(LD_W_ABS, 26)
        .op(ST, 0)
        .op(LD_W_ABS, 30)
        .add_mem(0)
        .op(ST, 0);
    match mode {
        ShareMode::Packet => {
            a.op(LD_H_ABS, 18)
                .add_mem(0)
                .op(ST, 0)
                .jmp(JA, 0, Some("hash"), None);
        }
        ShareMode::Flow => {
            a.op(LD_H_ABS, 20)
                .jmp(JSET_K, 0x3fff, Some("hash"), None)
                .op(LD_B_ABS, 23)
                .jmp(JEQ_K, 6, Some("v4ports"), None)
                .jmp(JEQ_K, 17, Some("v4ports"), None)
                .jmp(JEQ_K, 132, Some("v4ports"), Some("hash"));
            // X = IHL*4; the ports need IHL*4 + 18 bytes.
            a.label("v4ports")
                .op(LDX_MSH, 14)
                .op(0x87, 0) // TXA
                .op(ADD_K, 18)
                .op(ST, 1)
                .op(LDX_MEM, 1)
                .op(LD_W_LEN, 0)
                .jmp(JGE_X, 0, None, Some("hash"))
                .op(LDX_MSH, 14)
                .op(LD_H_IND, 14)
                .op(ST, 1)
                .op(LD_H_IND, 16)
                .add_mem(1)
                .add_mem(0)
                .op(ST, 0)
                .jmp(JA, 0, Some("hash"), None);
        }
    }
    a.label("v6")
        .op(LD_W_LEN, 0)
        .jmp(JGE_K, 54, None, Some("other"))
        .op(LD_W_ABS, 22)
        .op(ST, 0);
    for at in (26..54).step_by(4) {
        a.op(LD_W_ABS, at).add_mem(0).op(ST, 0);
    }
    a.op(LD_B_ABS, 20)
        .jmp(JEQ_K, 6, Some("v6ports"), None)
        .jmp(JEQ_K, 17, Some("v6ports"), None)
        .jmp(JEQ_K, 132, Some("v6ports"), Some("hash"));
    a.label("v6ports")
        .op(LD_W_LEN, 0)
        .jmp(JGE_K, 58, None, Some("hash"))
        .op(LD_H_ABS, 54)
        .add_mem(0)
        .op(ST, 0)
        .op(LD_H_ABS, 56)
        .add_mem(0)
        .op(ST, 0);
    a.label("hash")
        .op(LD_MEM, 0)
        .op(MUL_K, MULTIPLIER)
        .op(RSH_K, SHIFT)
        .jmp(JA, 0, Some("test"), None);
    a.label("other").op(LD_IMM, 0);
    // A = bucket (0..63): test its bit in the 64-bit mask.
    a.label("test")
        .jmp(JGE_K, 32, None, Some("low"))
        .op(SUB_K, 32)
        .op(TAX, 0)
        .op(LD_IMM, (mask >> 32) as u32)
        .jmp(JA, 0, Some("bit"), None);
    a.label("low").op(TAX, 0).op(LD_IMM, mask as u32);
    a.label("bit")
        .op(RSH_X, 0)
        .jmp(JSET_K, 1, None, Some("reject"))
        .op(RET_K, snap);
    a.label("reject").op(RET_K, 0);
    a.finish()
}

/// The buckets in a mask, ascending.
pub fn buckets_in(mask: u64) -> impl Iterator<Item = u8> {
    (0..BUCKETS as u8).filter(move |b| mask >> b & 1 == 1)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A classic BPF interpreter for the opcodes above, with the kernel's
    /// rule that a load past the end rejects the frame.
    pub(crate) fn run(prog: &[BpfInsn], f: &[u8]) -> u32 {
        let (mut a, mut x, mut mem, mut pc) = (0u32, 0u32, [0u32; 16], 0usize);
        loop {
            let i = prog[pc];
            pc += 1;
            let k = i.k;
            macro_rules! load {
                ($at:expr, $n:expr) => {{
                    let at = $at as usize;
                    match f.get(at..at + $n) {
                        Some(b) => b.iter().fold(0u32, |v, &b| v << 8 | u32::from(b)),
                        None => return 0,
                    }
                }};
            }
            let cond = |c: bool| if c { i.jt } else { i.jf } as usize;
            match i.code {
                LD_W_ABS => a = load!(k, 4),
                LD_H_ABS => a = load!(k, 2),
                LD_B_ABS => a = load!(k, 1),
                LD_H_IND => a = load!(x.wrapping_add(k), 2),
                LD_W_LEN => a = f.len() as u32,
                LD_IMM => a = k,
                LD_MEM => a = mem[k as usize],
                LDX_MEM => x = mem[k as usize],
                LDX_MSH => x = (load!(k, 1) & 0xf) * 4,
                ST => mem[k as usize] = a,
                ADD_K => a = a.wrapping_add(k),
                ADD_X => a = a.wrapping_add(x),
                SUB_K => a = a.wrapping_sub(k),
                MUL_K => a = a.wrapping_mul(k),
                RSH_K => a >>= k,
                RSH_X => a = a.checked_shr(x).unwrap_or(0),
                TAX => x = a,
                0x87 => a = x,
                JA => pc += k as usize,
                JEQ_K => pc += cond(a == k),
                JGE_K => pc += cond(a >= k),
                JGE_X => pc += cond(a >= x),
                JSET_K => pc += cond(a & k != 0),
                RET_K => return k,
                other => panic!("opcode {other:#x} not interpreted"),
            }
        }
    }

    pub(crate) fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, id: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 8 + 10];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[18..20].copy_from_slice(&id.to_be_bytes());
        f[20] = 0x40; // DF
        f[23] = 17;
        f[26..30].copy_from_slice(&src);
        f[30..34].copy_from_slice(&dst);
        f[34..36].copy_from_slice(&sport.to_be_bytes());
        f[36..38].copy_from_slice(&dport.to_be_bytes());
        f
    }

    fn frame() -> impl Strategy<Value = Vec<u8>> {
        let v4 = (
            any::<[u8; 4]>(),
            any::<[u8; 4]>(),
            any::<u16>(),
            any::<u16>(),
            any::<u16>(),
            prop::sample::select(vec![6u8, 17, 132, 1, 47]),
            prop::sample::select(vec![0x4000u16, 0x2000, 0x0010, 0]),
            5u8..8,
            0usize..70,
        )
            .prop_map(|(s, d, sp, dp, id, proto, frag, ihl, cut)| {
                let mut f = udp4(s, d, sp, dp, id);
                f[14] = 0x40 | ihl;
                f[20..22].copy_from_slice(&frag.to_be_bytes());
                f[23] = proto;
                f.resize(70, 0xaa);
                f.truncate(cut.max(1));
                f
            });
        let v6 = (
            any::<[u8; 32]>(),
            any::<[u8; 4]>(),
            prop::sample::select(vec![6u8, 17, 44, 0, 58]),
            0usize..80,
        )
            .prop_map(|(addrs, ports, nh, cut)| {
                let mut f = vec![0u8; 80];
                f[12..14].copy_from_slice(&[0x86, 0xdd]);
                f[14] = 0x60;
                f[20] = nh;
                f[22..54].copy_from_slice(&addrs);
                f[54..58].copy_from_slice(&ports);
                f.truncate(cut.max(1));
                f
            });
        let other = prop::collection::vec(any::<u8>(), 0..64);
        prop_oneof![v4, v6, other]
    }

    proptest! {
        /// The kernel program and the Rust function agree on every frame,
        /// truncated ones included, for any mask.
        #[test]
        fn program_matches_bucket_of(f in frame(), mask in any::<u64>(), packet in any::<bool>()) {
            let mode = if packet { ShareMode::Packet } else { ShareMode::Flow };
            let prog = share_program(mode, mask, 0xffff);
            let accepted = run(&prog, &f) == 0xffff;
            prop_assert_eq!(accepted, mask >> bucket_of(&f, mode) & 1 == 1);
        }

        /// Exactly one of any partition's filters accepts each frame.
        #[test]
        fn a_partition_accepts_each_frame_once(f in frame(), split in any::<u64>()) {
            for mode in [ShareMode::Flow, ShareMode::Packet] {
                let n = [split, !split]
                    .iter()
                    .filter(|m| run(&share_program(mode, **m, 96), &f) == 96)
                    .count();
                prop_assert_eq!(n, 1);
            }
        }

        /// Both directions of a flow share a bucket in flow mode.
        #[test]
        fn flows_are_symmetric(s in any::<[u8; 4]>(), d in any::<[u8; 4]>(), sp in any::<u16>(), dp in any::<u16>(), id in any::<u16>()) {
            prop_assert_eq!(
                bucket_of(&udp4(s, d, sp, dp, id), ShareMode::Flow),
                bucket_of(&udp4(d, s, dp, sp, id.wrapping_add(1)), ShareMode::Flow)
            );
        }
    }

    #[test]
    fn program_fits_the_kernel_limits_and_buckets_spread() {
        for mode in [ShareMode::Flow, ShareMode::Packet] {
            assert!(share_program(mode, u64::MAX, 96).len() < 128);
        }
        // 256 consecutive source ports over 64 buckets: every bucket used,
        // none with more than three times its fair share.
        let mut count = [0u32; BUCKETS as usize];
        for p in 0..256u16 {
            let f = udp4([10, 0, 0, 1], [10, 0, 0, 2], 20_000 + p, 9, 0);
            count[usize::from(bucket_of(&f, ShareMode::Flow))] += 1;
        }
        assert!(count.iter().all(|&c| (1..=12).contains(&c)), "{count:?}");
        // Non-IP and runts go to bucket 0.
        assert_eq!(bucket_of(&[0u8; 10], ShareMode::Flow), 0);
        assert_eq!(bucket_of(&[0x08, 0x06].repeat(20), ShareMode::Packet), 0);
        assert_eq!(buckets_in(0b1010).collect::<Vec<_>>(), vec![1, 3]);
    }
}
