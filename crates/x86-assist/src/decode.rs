//! Bounded decoder for the handled instructions.
//!
//! Reads prefixes and the opcode of exactly the instructions the crate
//! executes; everything else is `Unsupported`. Every byte is read through
//! `slice::get`, so a short slice gives `Truncated` and never a read past
//! its end; a prefix run reaching 15 bytes is `Unsupported` (hardware
//! raises #GP for it, but we have not recognised any instruction then).

use crate::{CpuMode, MAX_INSTRUCTION_LEN};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DecodeError {
    /// The slice ended before the instruction did.
    Truncated,
    /// Not an instruction (or prefix combination) handled here.
    Unsupported,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OperandSize {
    Word,
    Dword,
    Qword,
}

/// Segment named by an override prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SegmentOverride {
    Es,
    Cs,
    Ss,
    Ds,
    Fs,
    Gs,
}

/// A decoded 64-bit-mode memory operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MemoryOperand {
    pub base: Option<u8>,
    pub index: Option<u8>,
    /// 1, 2, 4 or 8.
    pub scale: u8,
    pub displacement: i32,
    pub rip_relative: bool,
    /// 0x67 prefix: 32-bit effective address.
    pub address32: bool,
    pub segment: Option<SegmentOverride>,
}

impl MemoryOperand {
    /// Whether the access goes through SS (explicitly, or by default with
    /// RSP/RBP as base), which turns a non-canonical #GP into #SS.
    pub fn uses_stack_segment(&self) -> bool {
        match self.segment {
            Some(segment) => segment == SegmentOverride::Ss,
            None => matches!(self.base, Some(4 | 5)),
        }
    }
}

const REGISTER_NAMES: [&str; 16] = [
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15",
];
const REGISTER_NAMES_32: [&str; 16] = [
    "eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi", "r8d", "r9d", "r10d", "r11d", "r12d",
    "r13d", "r14d", "r15d",
];

impl fmt::Display for MemoryOperand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = if self.address32 {
            &REGISTER_NAMES_32
        } else {
            &REGISTER_NAMES
        };
        match self.segment {
            Some(SegmentOverride::Fs) => write!(f, "fs:")?,
            Some(SegmentOverride::Gs) => write!(f, "gs:")?,
            _ => {}
        }
        write!(f, "[")?;
        let mut first = true;
        if self.rip_relative {
            write!(f, "{}", if self.address32 { "eip" } else { "rip" })?;
            first = false;
        }
        if let Some(base) = self.base {
            write!(f, "{}", names[usize::from(base & 15)])?;
            first = false;
        }
        if let Some(index) = self.index {
            if !first {
                write!(f, "+")?;
            }
            write!(f, "{}*{}", names[usize::from(index & 15)], self.scale)?;
            first = false;
        }
        if self.displacement != 0 || first {
            let magnitude = self.displacement.unsigned_abs();
            if first {
                write!(f, "{:#x}", self.displacement as u32)?;
            } else if self.displacement < 0 {
                write!(f, "-{magnitude:#x}")?;
            } else {
                write!(f, "+{magnitude:#x}")?;
            }
        }
        write!(f, "]")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Int3,
    IntN(u8),
    Iret(OperandSize),
    Fwait,
    Ud2,
    Clac,
    Stac,
    Cmpxchg16b(MemoryOperand),
    /// `0f c7 /1` with mod = 3: always #UD.
    Cmpxchg16bRegister,
    /// `f3 0f b8 /r`: population count of a register or memory source.
    Popcnt {
        dest: u8,
        source: RegisterOrMemory,
        size: OperandSize,
    },
    /// `0f 03 /r`: load the segment limit of the selector in the low 16
    /// bits of a register or memory source.
    Lsl {
        dest: u8,
        source: RegisterOrMemory,
        size: OperandSize,
    },
    /// `d9 /5` with a memory operand: load the x87 control word.
    Fldcw(MemoryOperand),
    /// `0f ae /2` with a memory operand.
    Ldmxcsr(MemoryOperand),
    /// `0f ae /3` with a memory operand.
    Stmxcsr(MemoryOperand),
    /// `0f ae /0`; `wide` is the REX.W form (`fxsave64`, 64-bit FIP/FDP).
    Fxsave {
        operand: MemoryOperand,
        wide: bool,
    },
    /// `0f ae /1`; `wide` is the REX.W form (`fxrstor64`).
    Fxrstor {
        operand: MemoryOperand,
        wide: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// The r/m operand of an instruction that reads a register or memory.
pub(crate) enum RegisterOrMemory {
    Register(u8),
    Memory(MemoryOperand),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Instruction {
    pub op: Op,
    /// Length in bytes, prefixes included (at most 15).
    pub len: usize,
    pub lock: bool,
}

#[derive(Default)]
struct Prefixes {
    lock: bool,
    /// 0xf2 or 0xf3 seen.
    repeat: bool,
    /// The last of 0xf2/0xf3 was 0xf3 (a mandatory prefix for popcnt).
    rep_f3: bool,
    operand_size: bool,
    address_size: bool,
    segment: Option<SegmentOverride>,
    /// The REX byte immediately before the opcode (64-bit mode), or 0.
    rex: u8,
}

impl Prefixes {
    fn rex_w(&self) -> bool {
        self.rex & 0x8 != 0
    }
}

fn byte(bytes: &[u8], at: usize) -> Result<u8, DecodeError> {
    if at >= MAX_INSTRUCTION_LEN {
        return Err(DecodeError::Unsupported);
    }
    bytes.get(at).copied().ok_or(DecodeError::Truncated)
}

pub(crate) fn decode(bytes: &[u8], mode: CpuMode) -> Result<Instruction, DecodeError> {
    let long = mode == CpuMode::Long64;
    let mut prefixes = Prefixes::default();
    let mut at = 0;
    let opcode = loop {
        let b = byte(bytes, at)?;
        match b {
            0xf0 => prefixes.lock = true,
            0xf2 | 0xf3 => {
                prefixes.repeat = true;
                prefixes.rep_f3 = b == 0xf3;
            }
            0x66 => prefixes.operand_size = true,
            0x67 => prefixes.address_size = true,
            0x26 => prefixes.segment = Some(SegmentOverride::Es),
            0x2e => prefixes.segment = Some(SegmentOverride::Cs),
            0x36 => prefixes.segment = Some(SegmentOverride::Ss),
            0x3e => prefixes.segment = Some(SegmentOverride::Ds),
            0x64 => prefixes.segment = Some(SegmentOverride::Fs),
            0x65 => prefixes.segment = Some(SegmentOverride::Gs),
            0x40..=0x4f if long => {
                prefixes.rex = b;
                at += 1;
                continue;
            }
            _ => break b,
        }
        // A REX followed by a legacy prefix is ignored.
        prefixes.rex = 0;
        at += 1;
    };
    let lock = prefixes.lock;
    let done = |op: Op, len: usize| Ok(Instruction { op, len, lock });
    match opcode {
        0xcc => done(Op::Int3, at + 1),
        0xcd => {
            let vector = byte(bytes, at + 1)?;
            done(Op::IntN(vector), at + 2)
        }
        0xcf => {
            let size = if prefixes.rex_w() {
                OperandSize::Qword
            } else {
                let default16 = matches!(mode, CpuMode::Real | CpuMode::Protected16);
                if default16 != prefixes.operand_size {
                    OperandSize::Word
                } else {
                    OperandSize::Dword
                }
            };
            done(Op::Iret(size), at + 1)
        }
        0x9b => done(Op::Fwait, at + 1),
        0xd9 => {
            // Memory operands are decoded for 64-bit mode only; mod = 3
            // forms are register-stack instructions (fld st(i)...).
            let modrm = byte(bytes, at + 1)?;
            if !long || modrm >> 6 == 3 || (modrm >> 3) & 7 != 5 {
                return Err(DecodeError::Unsupported);
            }
            let (operand, end) = decode_memory(bytes, at + 1, &prefixes)?;
            done(Op::Fldcw(operand), end)
        }
        0x0f => match byte(bytes, at + 1)? {
            0x0b => done(Op::Ud2, at + 2),
            0x01 => {
                // 66/f2/f3 0f 01 ca|cb are not clac/stac.
                if prefixes.operand_size || prefixes.repeat {
                    return Err(DecodeError::Unsupported);
                }
                match byte(bytes, at + 2)? {
                    0xca => done(Op::Clac, at + 3),
                    0xcb => done(Op::Stac, at + 3),
                    _ => Err(DecodeError::Unsupported),
                }
            }
            0xc7 => {
                let modrm = byte(bytes, at + 2)?;
                // /1 only, and only the 16-byte form (REX.W); 66/f2/f3
                // select other instructions of the 0f c7 group.
                if (modrm >> 3) & 7 != 1
                    || !prefixes.rex_w()
                    || prefixes.operand_size
                    || prefixes.repeat
                {
                    return Err(DecodeError::Unsupported);
                }
                if modrm >> 6 == 3 {
                    return done(Op::Cmpxchg16bRegister, at + 3);
                }
                let (operand, end) = decode_memory(bytes, at + 2, &prefixes)?;
                done(Op::Cmpxchg16b(operand), end)
            }
            0xb8 if prefixes.rep_f3 => {
                let (dest, source, size, end) = decode_reg_rm(bytes, at + 2, &prefixes, mode)?;
                done(Op::Popcnt { dest, source, size }, end)
            }
            0x03 if !prefixes.repeat => {
                let (dest, source, size, end) = decode_reg_rm(bytes, at + 2, &prefixes, mode)?;
                done(Op::Lsl { dest, source, size }, end)
            }
            0xae => {
                // Memory operands are decoded for 64-bit mode only; 66/f2/f3
                // select other instructions of the group (clwb, ptwrite...).
                if !long || prefixes.operand_size || prefixes.repeat {
                    return Err(DecodeError::Unsupported);
                }
                let modrm = byte(bytes, at + 2)?;
                // mod = 3 are the fences; /4../7 with memory are xsave & co.
                if modrm >> 6 == 3 {
                    return Err(DecodeError::Unsupported);
                }
                let reg = (modrm >> 3) & 7;
                if reg > 3 {
                    return Err(DecodeError::Unsupported);
                }
                let (operand, end) = decode_memory(bytes, at + 2, &prefixes)?;
                let wide = prefixes.rex_w();
                let op = match reg {
                    0 => Op::Fxsave { operand, wide },
                    1 => Op::Fxrstor { operand, wide },
                    2 => Op::Ldmxcsr(operand),
                    _ => Op::Stmxcsr(operand),
                };
                done(op, end)
            }
            _ => Err(DecodeError::Unsupported),
        },
        _ => Err(DecodeError::Unsupported),
    }
}

/// Decodes a `reg, r/m` operand pair from ModRM at `at`: the destination
/// register, the source, the operand size (REX.W, 66 and the mode) and the
/// index just past the operands. Memory sources are decoded for 64-bit
/// mode only.
fn decode_reg_rm(
    bytes: &[u8],
    at: usize,
    prefixes: &Prefixes,
    mode: CpuMode,
) -> Result<(u8, RegisterOrMemory, OperandSize, usize), DecodeError> {
    let modrm = byte(bytes, at)?;
    let size = if prefixes.rex_w() {
        OperandSize::Qword
    } else if prefixes.operand_size != matches!(mode, CpuMode::Real | CpuMode::Protected16) {
        OperandSize::Word
    } else {
        OperandSize::Dword
    };
    let dest = ((modrm >> 3) & 7) | ((prefixes.rex & 4) << 1);
    if modrm >> 6 == 3 {
        let source = RegisterOrMemory::Register((modrm & 7) | ((prefixes.rex & 1) << 3));
        return Ok((dest, source, size, at + 1));
    }
    if mode != CpuMode::Long64 {
        return Err(DecodeError::Unsupported);
    }
    let (operand, end) = decode_memory(bytes, at, prefixes)?;
    Ok((dest, RegisterOrMemory::Memory(operand), size, end))
}

/// Decodes ModRM (at `at`, mod != 3), SIB and displacement in 64-bit mode;
/// returns the operand and the index just past it.
fn decode_memory(
    bytes: &[u8],
    mut at: usize,
    prefixes: &Prefixes,
) -> Result<(MemoryOperand, usize), DecodeError> {
    let rex_b = (prefixes.rex & 1) << 3;
    let rex_x = ((prefixes.rex >> 1) & 1) << 3;
    let modrm = byte(bytes, at)?;
    at += 1;
    let mode = modrm >> 6;
    let rm = modrm & 7;
    let mut operand = MemoryOperand {
        base: None,
        index: None,
        scale: 1,
        displacement: 0,
        rip_relative: false,
        address32: prefixes.address_size,
        segment: prefixes.segment,
    };
    let mut disp32 = mode == 2;
    if rm == 4 {
        let sib = byte(bytes, at)?;
        at += 1;
        operand.scale = 1 << (sib >> 6);
        let index = ((sib >> 3) & 7) | rex_x;
        if index != 4 {
            operand.index = Some(index);
        }
        if sib & 7 == 5 && mode == 0 {
            disp32 = true;
        } else {
            operand.base = Some((sib & 7) | rex_b);
        }
    } else if rm == 5 && mode == 0 {
        operand.rip_relative = true;
        disp32 = true;
    } else {
        operand.base = Some(rm | rex_b);
    }
    if mode == 1 {
        operand.displacement = i32::from(byte(bytes, at)? as i8);
        at += 1;
    } else if disp32 {
        let mut raw = [0u8; 4];
        for (i, slot) in raw.iter_mut().enumerate() {
            *slot = byte(bytes, at + i)?;
        }
        operand.displacement = i32::from_le_bytes(raw);
        at += 4;
    }
    Ok((operand, at))
}
