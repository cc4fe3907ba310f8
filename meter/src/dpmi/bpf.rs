//! A point's filter list as one classic BPF socket filter: the kernel
//! copies to user space only frames some filter may match, cut to the
//! largest caplen a consumer gets. User space matches exactly again (the
//! list is ordered, the kernel's answer is only "someone may want it").
//!
//! The program reads an untagged Ethernet frame (AF_PACKET hands the
//! VLAN tag apart, read here through the ancillary `vlan_tci` load).

use crate::afpacket::op::{
    AND_K, JEQ_K, JSET_K, LDX_MSH, LD_B_ABS, LD_H_ABS, LD_H_IND, LD_W_ABS, RET_K,
};
use crate::afpacket::BpfInsn;
use qosloop_schema::dpmi::{Filter, Masked};

/// `SKF_AD_OFF + SKF_AD_VLAN_TAG` and `… + SKF_AD_VLAN_TAG_PRESENT`.
const AD_VLAN_TAG: u32 = 0xffff_f000 + 44;
const AD_VLAN_PRESENT: u32 = 0xffff_f000 + 48;

/// Instructions with "fail" jumps still symbolic: `jf == FAIL` jumps to
/// the end of the filter's block.
const FAIL: u8 = 0xff;

fn insn(code: u16, k: u32) -> BpfInsn {
    BpfInsn {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn check(out: &mut Vec<BpfInsn>, load: BpfInsn, m: Masked) {
    out.push(load);
    if m.mask != u64::from(u32::MAX) {
        out.push(insn(AND_K, m.mask as u32));
    }
    out.push(BpfInsn {
        code: JEQ_K,
        jt: 0,
        jf: FAIL,
        k: m.value as u32,
    });
}

fn split(m: Masked) -> (Masked, Masked) {
    (
        Masked {
            value: m.value >> 32,
            mask: m.mask >> 32,
        },
        Masked {
            value: m.value & 0xffff_ffff,
            mask: m.mask & 0xffff_ffff,
        },
    )
}

fn block(f: &Filter, snap: u32) -> Vec<BpfInsn> {
    let mut out = Vec::new();
    let field = |n: &str| f.fields.get(n).copied();
    if let Some(m) = field("vlan_tci") {
        check(
            &mut out,
            insn(LD_W_ABS, AD_VLAN_PRESENT),
            Masked { value: 1, mask: 1 },
        );
        check(&mut out, insn(LD_W_ABS, AD_VLAN_TAG), m);
    }
    if let Some(m) = field("ether_type") {
        check(&mut out, insn(LD_H_ABS, 12), m);
    }
    for (name, at) in [("eth_dst", 0), ("eth_src", 6)] {
        if let Some(m) = field(name) {
            let (hi, lo) = split(m);
            if hi.mask != 0 {
                check(&mut out, insn(LD_H_ABS, at), hi);
            }
            if lo.mask != 0 {
                check(&mut out, insn(LD_W_ABS, at + 2), lo);
            }
        }
    }
    let ports = field("src_port").is_some() || field("dst_port").is_some();
    if ports
        || ["ip_proto", "ip_src", "ip_dst"]
            .iter()
            .any(|n| field(n).is_some())
    {
        check(
            &mut out,
            insn(LD_H_ABS, 12),
            Masked {
                value: 0x0800,
                mask: 0xffff,
            },
        );
    }
    for (name, load) in [
        ("ip_proto", insn(LD_B_ABS, 23)),
        ("ip_src", insn(LD_W_ABS, 26)),
        ("ip_dst", insn(LD_W_ABS, 30)),
    ] {
        if let Some(m) = field(name) {
            check(&mut out, load, m);
        }
    }
    if ports {
        // TCP, UDP or SCTP, first fragment (or none): then ports at IHL.
        out.push(insn(LD_B_ABS, 23));
        out.push(BpfInsn {
            code: JEQ_K,
            jt: 2,
            jf: 0,
            k: 6,
        });
        out.push(BpfInsn {
            code: JEQ_K,
            jt: 1,
            jf: 0,
            k: 17,
        });
        out.push(BpfInsn {
            code: JEQ_K,
            jt: 0,
            jf: FAIL,
            k: 132,
        });
        out.push(insn(LD_H_ABS, 20));
        out.push(BpfInsn {
            code: JSET_K,
            jt: FAIL,
            jf: 0,
            k: 0x1fff,
        });
        out.push(insn(LDX_MSH, 14));
        for (name, at) in [("src_port", 14), ("dst_port", 16)] {
            if let Some(m) = field(name) {
                check(&mut out, insn(LD_H_IND, at), m);
            }
        }
    }
    out.push(insn(RET_K, snap));
    // Resolve FAIL to "the instruction after this block".
    let n = out.len();
    for (i, ins) in out.iter_mut().enumerate() {
        let to_end = u8::try_from(n - i - 1).unwrap_or(u8::MAX);
        if ins.jf == FAIL && ins.code != JSET_K {
            ins.jf = to_end;
        }
        if ins.code == JSET_K && ins.jt == FAIL {
            ins.jt = to_end;
        }
    }
    out
}

/// The program accepting (cut to `snap` bytes) every frame some filter of
/// `filters` may match, and dropping the rest. The interface field is not
/// compiled: a point captures on one interface, checked by the controller.
pub fn compile(filters: &[&Filter], snap: u32) -> Vec<BpfInsn> {
    let mut out: Vec<BpfInsn> = filters.iter().flat_map(|f| block(f, snap)).collect();
    out.push(insn(RET_K, 0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn no_filter_drops_everything_and_jumps_stay_inside() {
        assert_eq!(compile(&[], 96), vec![insn(RET_K, 0)]);
        let f = Filter::from_json(
            &json!({"ip_src": "10.0.0.0/8", "dst_port": "53", "eth_src": "02:00:00:00:00:01"}),
        )
        .unwrap();
        let p = compile(&[&f, &f], 96);
        for (i, ins) in p.iter().enumerate().filter(|(_, i)| i.code != RET_K) {
            assert!(i + 1 + usize::from(ins.jt) < p.len() && i + 1 + usize::from(ins.jf) < p.len());
        }
        assert_eq!(p.iter().filter(|i| i.code == RET_K && i.k == 96).count(), 2);
    }
}
