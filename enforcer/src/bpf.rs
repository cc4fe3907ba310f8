//! The steering program of the root qdisc's cls_bpf filter, assembled by
//! hand (eight eBPF instructions; loaded by `sys::bpf_load_sched_cls`).

use qosloop_bpf::{reg, Alu, Asm, Cond, Size};

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
    let mut a = Asm::new();
    a.load(Size::W, reg::R0, reg::R1, SKB_PRIORITY)
        .alu_imm(Alu::Rsh, reg::R0, 16)
        .alu_imm(Alu::Sub, reg::R0, i32::from(first_major))
        .jump_imm(Cond::Ge, reg::R0, i32::from(groups), "none")
        .alu_imm(
            Alu::Add,
            reg::R0,
            ((u32::from(root_major) << 16) | u32::from(first_minor)) as i32,
        )
        .exit()
        .label("none")
        .mov_imm(reg::R0, 0)
        .exit();
    // Labels are all defined above: assembly cannot fail.
    a.finish().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The bytes of the program as it was hand-encoded before the move to
    /// `qosloop-bpf`: the assembler must give the same eight instructions.
    #[test]
    fn steering_program_is_unchanged_by_the_assembler() {
        let b = steering_program(1, 10, 4, 0x20);
        let expect: [[u8; 8]; 8] = [
            [0x61, 0x10, 32, 0, 0, 0, 0, 0],
            [0x77, 0x00, 0, 0, 16, 0, 0, 0],
            [0x17, 0x00, 0, 0, 10, 0, 0, 0],
            [0x35, 0x00, 2, 0, 4, 0, 0, 0],
            [0x07, 0x00, 0, 0, 0x20, 0, 1, 0],
            [0x95, 0, 0, 0, 0, 0, 0, 0],
            [0xb7, 0, 0, 0, 0, 0, 0, 0],
            [0x95, 0, 0, 0, 0, 0, 0, 0],
        ];
        assert_eq!(b, expect.concat());
    }
}
