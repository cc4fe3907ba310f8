//! eBPF instructions (the kernel's `struct bpf_insn`, 8 bytes each) and a
//! small assembler with named jump targets, so a hand-written program reads
//! as its listing and no jump offset is counted by hand.

use std::collections::HashMap;

/// Registers: r0 return value, r1–r5 arguments, r6–r9 callee-saved,
/// r10 the read-only frame pointer.
pub mod reg {
    pub const R0: u8 = 0;
    pub const R1: u8 = 1;
    pub const R2: u8 = 2;
    pub const R3: u8 = 3;
    pub const R4: u8 = 4;
    pub const R5: u8 = 5;
    pub const R6: u8 = 6;
    pub const R7: u8 = 7;
    pub const R8: u8 = 8;
    pub const R9: u8 = 9;
    pub const FP: u8 = 10;
}

/// Helper function numbers (`enum bpf_func_id`) used in this workspace.
pub mod helper {
    pub const MAP_LOOKUP_ELEM: i32 = 1;
    pub const MAP_UPDATE_ELEM: i32 = 2;
    pub const KTIME_GET_NS: i32 = 5;
    pub const GET_CURRENT_PID_TGID: i32 = 14;
    pub const GET_CURRENT_UID_GID: i32 = 15;
    pub const GET_CURRENT_COMM: i32 = 16;
    pub const GET_SOCKET_COOKIE: i32 = 46;
    pub const GET_SOCKET_UID: i32 = 47;
}

/// One eBPF instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    pub dst: u8,
    pub src: u8,
    pub off: i16,
    pub imm: i32,
}

// Instruction classes, sizes, modes, ALU/JMP operations, sources.
const LD: u8 = 0x00;
const LDX: u8 = 0x01;
const ST: u8 = 0x02;
const STX: u8 = 0x03;
const ALU64: u8 = 0x07;
const JMP: u8 = 0x05;
const MEM: u8 = 0x60;
const ATOMIC: u8 = 0xc0;
const IMM: u8 = 0x00;
const DW: u8 = 0x18;
const K: u8 = 0x00;
const X: u8 = 0x08;
const CALL: u8 = 0x80;
const EXIT: u8 = 0x90;
const MOV: u8 = 0xb0;
const PSEUDO_MAP_FD: u8 = 1;
const PSEUDO_MAP_VALUE: u8 = 2;

/// Access widths of loads and stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    B,
    H,
    W,
    DW,
}

impl Size {
    fn bits(self) -> u8 {
        match self {
            Size::W => 0x00,
            Size::H => 0x08,
            Size::B => 0x10,
            Size::DW => 0x18,
        }
    }
}

/// ALU operations (64-bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alu {
    Add = 0x00,
    Sub = 0x10,
    Mul = 0x20,
    Or = 0x40,
    And = 0x50,
    Lsh = 0x60,
    Rsh = 0x70,
}

/// Conditional jumps (unsigned unless named S…).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cond {
    Eq = 0x10,
    Gt = 0x20,
    Ge = 0x30,
    Ne = 0x50,
    Sgt = 0x60,
    Slt = 0xc0,
}

impl Insn {
    pub const fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        Insn {
            code,
            dst,
            src,
            off,
            imm,
        }
    }

    /// The kernel's byte layout (native endian).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(self.code);
        out.push((self.src << 4) | (self.dst & 0x0f));
        out.extend_from_slice(&self.off.to_ne_bytes());
        out.extend_from_slice(&self.imm.to_ne_bytes());
    }

    pub fn encode(insns: &[Insn]) -> Vec<u8> {
        let mut out = Vec::with_capacity(insns.len() * 8);
        for i in insns {
            i.encode_into(&mut out);
        }
        out
    }
}

/// Why a program could not be assembled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AsmError {
    #[error("jump to undefined label {0:?}")]
    Undefined(String),
    #[error("label {0:?} defined twice")]
    Twice(String),
    #[error("jump to {0:?} is out of range")]
    Range(String),
}

/// A program under construction: instructions, labels and the jumps that
/// name them, resolved by [`Asm::finish`].
#[derive(Debug, Default)]
pub struct Asm {
    insns: Vec<Insn>,
    labels: HashMap<String, usize>,
    fixups: Vec<(usize, String)>,
    twice: Option<String>,
}

impl Asm {
    pub fn new() -> Asm {
        Asm::default()
    }

    pub fn raw(&mut self, insn: Insn) -> &mut Self {
        self.insns.push(insn);
        self
    }

    /// Marks the next instruction as `name`.
    pub fn label(&mut self, name: &str) -> &mut Self {
        if self
            .labels
            .insert(name.to_owned(), self.insns.len())
            .is_some()
        {
            self.twice.get_or_insert_with(|| name.to_owned());
        }
        self
    }

    /// `dst = imm` (64-bit, sign-extended).
    pub fn mov_imm(&mut self, dst: u8, imm: i32) -> &mut Self {
        self.raw(Insn::new(ALU64 | MOV | K, dst, 0, 0, imm))
    }

    /// `dst = src`.
    pub fn mov(&mut self, dst: u8, src: u8) -> &mut Self {
        self.raw(Insn::new(ALU64 | MOV | X, dst, src, 0, 0))
    }

    /// `dst op= imm`.
    pub fn alu_imm(&mut self, op: Alu, dst: u8, imm: i32) -> &mut Self {
        self.raw(Insn::new(ALU64 | op as u8 | K, dst, 0, 0, imm))
    }

    /// `dst op= src`.
    pub fn alu(&mut self, op: Alu, dst: u8, src: u8) -> &mut Self {
        self.raw(Insn::new(ALU64 | op as u8 | X, dst, src, 0, 0))
    }

    /// `dst = *(size *)(src + off)`.
    pub fn load(&mut self, size: Size, dst: u8, src: u8, off: i16) -> &mut Self {
        self.raw(Insn::new(LDX | MEM | size.bits(), dst, src, off, 0))
    }

    /// `*(size *)(dst + off) = src`.
    pub fn store(&mut self, size: Size, dst: u8, off: i16, src: u8) -> &mut Self {
        self.raw(Insn::new(STX | MEM | size.bits(), dst, src, off, 0))
    }

    /// `*(size *)(dst + off) = imm`.
    pub fn store_imm(&mut self, size: Size, dst: u8, off: i16, imm: i32) -> &mut Self {
        self.raw(Insn::new(ST | MEM | size.bits(), dst, 0, off, imm))
    }

    /// `lock *(size *)(dst + off) += src` (`BPF_ATOMIC`, `BPF_ADD`; W or
    /// DW): safe against the same program interrupting itself on this CPU.
    pub fn atomic_add(&mut self, size: Size, dst: u8, off: i16, src: u8) -> &mut Self {
        self.raw(Insn::new(STX | ATOMIC | size.bits(), dst, src, off, 0))
    }

    /// `r0 = cmpxchg(*(size *)(dst + off), r0, src)` (`BPF_CMPXCHG`): the
    /// old value is left in r0, `src` stored only if it equalled r0.
    pub fn atomic_cmpxchg(&mut self, size: Size, dst: u8, off: i16, src: u8) -> &mut Self {
        self.raw(Insn::new(STX | ATOMIC | size.bits(), dst, src, off, 0xf1))
    }

    /// `dst = map` (the two-slot `ld_imm64` with a map descriptor).
    pub fn load_map_fd(&mut self, dst: u8, map_fd: i32) -> &mut Self {
        self.raw(Insn::new(LD | IMM | DW, dst, PSEUDO_MAP_FD, 0, map_fd));
        self.raw(Insn::new(0, 0, 0, 0, 0))
    }

    /// `dst = &map[0] + off` (the two-slot `ld_imm64` with
    /// `BPF_PSEUDO_MAP_VALUE`): a direct pointer into the value of a
    /// one-entry array map, no lookup and no null check (what compilers
    /// make of global variables).
    pub fn load_map_value(&mut self, dst: u8, map_fd: i32, off: i32) -> &mut Self {
        self.raw(Insn::new(LD | IMM | DW, dst, PSEUDO_MAP_VALUE, 0, map_fd));
        self.raw(Insn::new(0, 0, 0, 0, off))
    }

    /// `if dst cond imm goto label`.
    pub fn jump_imm(&mut self, cond: Cond, dst: u8, imm: i32, label: &str) -> &mut Self {
        self.fixups.push((self.insns.len(), label.to_owned()));
        self.raw(Insn::new(JMP | cond as u8 | K, dst, 0, 0, imm))
    }

    /// `if dst cond src goto label`.
    pub fn jump(&mut self, cond: Cond, dst: u8, src: u8, label: &str) -> &mut Self {
        self.fixups.push((self.insns.len(), label.to_owned()));
        self.raw(Insn::new(JMP | cond as u8 | X, dst, src, 0, 0))
    }

    /// `goto label`.
    pub fn goto(&mut self, label: &str) -> &mut Self {
        self.fixups.push((self.insns.len(), label.to_owned()));
        self.raw(Insn::new(JMP, 0, 0, 0, 0))
    }

    /// `call helper` (arguments in r1–r5, result in r0; r1–r5 clobbered).
    pub fn call(&mut self, helper: i32) -> &mut Self {
        self.raw(Insn::new(JMP | CALL, 0, 0, 0, helper))
    }

    pub fn exit(&mut self) -> &mut Self {
        self.raw(Insn::new(JMP | EXIT, 0, 0, 0, 0))
    }

    /// Resolves the jumps and encodes the program.
    pub fn finish(&self) -> Result<Vec<u8>, AsmError> {
        if let Some(name) = &self.twice {
            return Err(AsmError::Twice(name.clone()));
        }
        let mut insns = self.insns.clone();
        for (at, name) in &self.fixups {
            let target = *self
                .labels
                .get(name)
                .ok_or_else(|| AsmError::Undefined(name.clone()))?;
            let off = target as i64 - *at as i64 - 1;
            insns[*at].off = i16::try_from(off).map_err(|_| AsmError::Range(name.clone()))?;
        }
        Ok(Insn::encode(&insns))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn encodings_match_the_kernel_opcodes() {
        let mut a = Asm::new();
        a.load(Size::W, reg::R0, reg::R1, 32) // ldxw r0, [r1+32]
            .alu_imm(Alu::Rsh, reg::R0, 16)
            .mov_imm(reg::R0, 0)
            .call(helper::GET_SOCKET_COOKIE)
            .exit();
        let b = a.finish().unwrap();
        assert_eq!(&b[0..8], &[0x61, 0x10, 32, 0, 0, 0, 0, 0]);
        assert_eq!(&b[8..16], &[0x77, 0x00, 0, 0, 16, 0, 0, 0]);
        assert_eq!(&b[16..24], &[0xb7, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[24..32], &[0x85, 0, 0, 0, 46, 0, 0, 0]);
        assert_eq!(&b[32..40], &[0x95, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn jumps_resolve_forward_and_backward_and_count_the_map_slot() {
        let mut a = Asm::new();
        a.label("top")
            .jump_imm(Cond::Eq, reg::R1, 0, "end") // 0 → 4: off 3
            .load_map_fd(reg::R1, 7) // 1, 2
            .goto("top") // 3 → 0: off -4
            .label("end")
            .exit(); // 4
        let b = a.finish().unwrap();
        assert_eq!(i16::from_ne_bytes([b[2], b[3]]), 3);
        assert_eq!(b[8], 0x18);
        assert_eq!(b[9], 0x11); // src = PSEUDO_MAP_FD, dst = r1
        assert_eq!(i16::from_ne_bytes([b[26], b[27]]), -4);
    }

    #[test]
    fn an_undefined_or_doubled_label_is_an_error() {
        let mut a = Asm::new();
        a.goto("nowhere").exit();
        assert_eq!(a.finish(), Err(AsmError::Undefined("nowhere".into())));
        let mut a = Asm::new();
        a.label("x").label("x").exit();
        assert_eq!(a.finish(), Err(AsmError::Twice("x".into())));
    }
}
