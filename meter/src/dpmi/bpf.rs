//! A point's filter list as one classic BPF socket filter: the kernel
//! copies to user space only frames some filter may match, cut to the
//! largest caplen a consumer gets. User space matches exactly again (the
//! list is ordered, the kernel's answer is only "someone may want it").
//!
//! The program reads an untagged Ethernet frame (AF_PACKET hands the
//! VLAN tag apart, read here through the ancillary `vlan_tci` load).
//!
//! IPv6 (ethertype 0x86DD): the addresses at offsets 22 and 38, 32 bits
//! at a time under their masks; protocol and ports only when the fixed
//! header's next header is the upper layer itself. When it is an extension
//! header ([`IPV6_EXT_HEADERS`]) the block passes the frame once the
//! addresses match — wider in the kernel, exact in user space, which walks
//! the chain. A filter naming only protocol or ports and no family is
//! compiled twice, once per family.

use crate::afpacket::op::{
    AND_K, JEQ_K, JSET_K, LDX_MSH, LD_B_ABS, LD_H_ABS, LD_H_IND, LD_W_ABS, RET_K,
};
use crate::afpacket::BpfInsn;
use qosloop_schema::dpmi::{Family, Filter, Masked, IPV6_EXT_HEADERS};

/// `SKF_AD_OFF + SKF_AD_VLAN_TAG` and `… + SKF_AD_VLAN_TAG_PRESENT`.
const AD_VLAN_TAG: u32 = 0xffff_f000 + 44;
const AD_VLAN_PRESENT: u32 = 0xffff_f000 + 48;

/// Instructions with "fail" jumps still symbolic: `jf == FAIL` jumps to
/// the end of the filter's block; `jt == PASS` to its accepting return.
const FAIL: u8 = 0xff;
const PASS: u8 = 0xfe;

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
    if m.mask != u128::from(u32::MAX) {
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

fn jeq(k: u32, jt: u8, jf: u8) -> BpfInsn {
    BpfInsn {
        code: JEQ_K,
        jt,
        jf,
        k,
    }
}

/// The IPv6 part of a block (after the link-layer checks).
fn ipv6(out: &mut Vec<BpfInsn>, f: &Filter) {
    let field = |n: &str| f.fields.get(n).copied();
    check(
        out,
        insn(LD_H_ABS, 12),
        Masked {
            value: 0x86dd,
            mask: 0xffff,
        },
    );
    for (name, at) in [("ip6_src", 22), ("ip6_dst", 38)] {
        if let Some(m) = field(name) {
            for w in 0..4u32 {
                let shift = 96 - 32 * w;
                let part = Masked {
                    value: (m.value >> shift) & 0xffff_ffff,
                    mask: (m.mask >> shift) & 0xffff_ffff,
                };
                if part.mask != 0 {
                    check(out, insn(LD_W_ABS, at + 4 * w), part);
                }
            }
        }
    }
    let ports = field("src_port").is_some() || field("dst_port").is_some();
    if !ports && field("ip_proto").is_none() {
        return;
    }
    // An extension header first: pass (user space walks the chain).
    out.push(insn(LD_B_ABS, 20));
    for ext in IPV6_EXT_HEADERS {
        out.push(jeq(u32::from(ext), PASS, 0));
    }
    if let Some(m) = field("ip_proto") {
        check(out, insn(LD_B_ABS, 20), m);
    }
    if ports {
        out.push(insn(LD_B_ABS, 20));
        out.push(jeq(6, 2, 0));
        out.push(jeq(17, 1, 0));
        out.push(jeq(132, 0, FAIL));
        for (name, at) in [("src_port", 54), ("dst_port", 56)] {
            if let Some(m) = field(name) {
                check(out, insn(LD_H_ABS, at), m);
            }
        }
    }
}

/// The blocks of one filter: one, or one per family when it names
/// protocol or ports but no family.
fn blocks(f: &Filter, snap: u32) -> Vec<BpfInsn> {
    let ip = ["ip_proto", "src_port", "dst_port"]
        .iter()
        .any(|n| f.fields.contains_key(n));
    match f.family() {
        Some(fam) => block(f, snap, Some(fam)),
        None if ip => {
            let mut out = block(f, snap, Some(Family::V4));
            out.extend(block(f, snap, Some(Family::V6)));
            out
        }
        None => block(f, snap, None),
    }
}

fn block(f: &Filter, snap: u32, family: Option<Family>) -> Vec<BpfInsn> {
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
    if family == Some(Family::V6) {
        ipv6(&mut out, f);
    }
    let ports = field("src_port").is_some() || field("dst_port").is_some();
    if family == Some(Family::V4) {
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
        if let Some(m) = field(name).filter(|_| family == Some(Family::V4)) {
            check(&mut out, load, m);
        }
    }
    if ports && family == Some(Family::V4) {
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
        if ins.code == JEQ_K && ins.jt == PASS {
            // The accepting return is the block's last instruction.
            ins.jt = u8::try_from(n - i - 2).unwrap_or(u8::MAX);
        }
    }
    out
}

/// The program accepting (cut to `snap` bytes) every frame some filter of
/// `filters` may match, and dropping the rest. The interface field is not
/// compiled: a point captures on one interface, checked by the controller.
pub fn compile(filters: &[&Filter], snap: u32) -> Vec<BpfInsn> {
    let mut out: Vec<BpfInsn> = filters.iter().flat_map(|f| blocks(f, snap)).collect();
    out.push(insn(RET_K, 0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use qosloop_schema::dpmi::FrameFields;
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

    /// A classic BPF interpreter for the instructions `compile` emits (an
    /// untagged frame: the ancillary VLAN loads read "no tag"); a load
    /// past the frame drops it, as the kernel does.
    fn run(prog: &[BpfInsn], p: &[u8]) -> u32 {
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        let at = |k: usize, n: usize| {
            p.get(k..k + n)
                .map(|b| b.iter().fold(0u32, |v, &y| v << 8 | u32::from(y)))
        };
        loop {
            let i = prog[pc];
            pc += 1;
            let load = |k: u32, n| {
                if k >= 0xffff_f000 {
                    Some(0)
                } else {
                    at(k as usize, n)
                }
            };
            match i.code {
                LD_W_ABS | LD_H_ABS | LD_B_ABS => {
                    let n = match i.code {
                        LD_W_ABS => 4,
                        LD_H_ABS => 2,
                        _ => 1,
                    };
                    match load(i.k, n) {
                        Some(v) => a = v,
                        None => return 0,
                    }
                }
                LD_H_IND => match at((x + i.k) as usize, 2) {
                    Some(v) => a = v,
                    None => return 0,
                },
                LDX_MSH => match at(i.k as usize, 1) {
                    Some(v) => x = 4 * (v & 0xf),
                    None => return 0,
                },
                AND_K => a &= i.k,
                JEQ_K | JSET_K => {
                    let t = if i.code == JEQ_K {
                        a == i.k
                    } else {
                        a & i.k != 0
                    };
                    pc += usize::from(if t { i.jt } else { i.jf });
                }
                RET_K => return i.k,
                c => panic!("unexpected instruction {c:#x}"),
            }
        }
    }

    fn v4(src: [u8; 4], proto: u8, dport: u16) -> Vec<u8> {
        let mut fr = vec![0u8; 14 + 20 + 8];
        fr[12..14].copy_from_slice(&[0x08, 0x00]);
        fr[14] = 0x45;
        fr[23] = proto;
        fr[26..30].copy_from_slice(&src);
        fr[30..34].copy_from_slice(&[10, 9, 0, 1]);
        fr[34..36].copy_from_slice(&4000u16.to_be_bytes());
        fr[36..38].copy_from_slice(&dport.to_be_bytes());
        fr
    }

    fn v6(src: &str, nh: u8, ext: &[u8], proto_ports: Option<u16>) -> Vec<u8> {
        let mut fr = vec![0u8; 14 + 40];
        fr[12..14].copy_from_slice(&[0x86, 0xdd]);
        fr[14] = 0x60;
        fr[20] = nh;
        let a: std::net::Ipv6Addr = src.parse().unwrap();
        fr[22..38].copy_from_slice(&a.octets());
        fr[38..54].copy_from_slice(
            &"2001:db8:ffff::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        fr.extend(ext);
        if let Some(dport) = proto_ports {
            fr.extend(4000u16.to_be_bytes());
            fr.extend(dport.to_be_bytes());
            fr.extend([0, 8, 0, 0]);
        }
        fr
    }

    /// Over crafted IPv4 and IPv6 frames: the kernel program passes every
    /// frame a filter matches exactly; without extension headers it passes
    /// exactly those; with them it passes frames whose addresses match.
    #[test]
    fn ipv6_program_agrees_with_the_exact_match() {
        let filters: Vec<Filter> = [
            json!({"ip_src": "2001:db8:1::/48"}),
            json!({"ip_src": "2001:db8:1:2::/ffff:ffff:ffff:fffe::", "ip_proto": "17", "dst_port": "53"}),
            json!({"ip_dst": "2001:db8:ffff::1", "ip_proto": "6"}),
            json!({"ip_src": "2001:db8:1::5", "ip_dst": "2001:db8:ffff::/64"}),
            json!({"ip_proto": "17", "dst_port": "0x0030/0xfff0"}),
            json!({"ip_src": "10.1.0.0/16", "dst_port": "53"}),
            json!({"ether_type": "0x86dd"}),
            json!({}),
        ]
        .iter()
        .map(|v| Filter::from_json(v).unwrap())
        .collect();
        let hbh = [17, 0, 0, 0, 0, 0, 0, 0];
        let frag_later = [17, 0, 0x05, 0x00, 0, 0, 0, 1];
        let frames: Vec<(Vec<u8>, bool)> = vec![
            (v6("2001:db8:1::5", 17, &[], Some(53)), false),
            (v6("2001:db8:1:3::9", 17, &[], Some(53)), false),
            (v6("2001:db8:1:4::9", 17, &[], Some(53)), false),
            (v6("2001:db8:2::5", 17, &[], Some(53)), false),
            (v6("2001:db8:1::5", 6, &[], Some(80)), false),
            (v6("2001:db8:1::5", 17, &[], Some(0x35)), false),
            (v6("2001:db8:1::5", 58, &[], None), false),
            (v6("2001:db8:1::5", 0, &hbh, Some(53)), true),
            (v6("2001:db8:1:3::9", 0, &hbh, Some(53)), true),
            (v6("2001:db8:2::5", 0, &hbh, Some(53)), true),
            (v6("2001:db8:1::5", 44, &frag_later, Some(53)), true),
            (v6("2001:db8:1::5", 17, &[], None), false),
            (v4([10, 1, 0, 5], 17, 53), false),
            (v4([10, 2, 0, 5], 17, 0x3f), false),
        ];
        let mut passed_wider = 0;
        for f in &filters {
            let prog = compile(&[f], 96);
            for (frame, ext) in &frames {
                let exact = FrameFields::parse(frame, None).is_some_and(|ff| f.matches("x", &ff));
                let kernel = run(&prog, frame) == 96;
                assert!(
                    !exact || kernel,
                    "{f} drops a frame it matches: {frame:02x?}"
                );
                if !ext {
                    assert_eq!(kernel, exact, "{f} on {frame:02x?}");
                } else if kernel && !exact {
                    passed_wider += 1;
                }
                // Addresses are checked in the kernel even behind extensions.
                if f.fields.contains_key("ip6_src") && kernel {
                    let ff = FrameFields::parse(frame, None).unwrap();
                    let m = f.fields["ip6_src"];
                    assert_eq!(ff.ip6.unwrap().0 & m.mask, m.value);
                }
            }
        }
        // The widening is real: some frame behind an extension header
        // passes the kernel and only user space refuses it.
        assert!(passed_wider > 0);
        // A list: the union of its filters.
        let all: Vec<&Filter> = filters.iter().collect();
        let prog = compile(&all, 96);
        for (frame, _) in &frames {
            let any = filters.iter().any(|f| run(&compile(&[f], 96), frame) == 96);
            assert_eq!(run(&prog, frame) == 96, any);
        }
    }
}
