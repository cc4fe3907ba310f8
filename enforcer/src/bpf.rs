//! The steering program of the root qdisc's cls_bpf filter, assembled by
//! hand (eight eBPF instructions; loaded by `sys::bpf_load_sched_cls`).

/// One eBPF instruction: opcode, dst/src registers, offset, immediate.
fn insn(b: &mut Vec<u8>, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
    b.push(code);
    b.push((src << 4) | (dst & 0x0f));
    b.extend_from_slice(&off.to_ne_bytes());
    b.extend_from_slice(&imm.to_ne_bytes());
}

/// The steering program of a [`crate::tc::TcOp::Steer`], for cls_bpf in classid mode
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
