//! Execution of the decoded instructions other than `int n`/`iret`.
//!
//! Each instruction computes its result first and writes the state only
//! once nothing can fail any more, so exceptions leave `CpuState` intact.

use crate::decode::{Instruction, MemoryOperand, Op, OperandSize, PopcntSource, SegmentOverride};
use crate::interrupt;
use crate::{
    rflags, vector, CpuMode, CpuState, GuestMemoryAccess, InstructionKind, Outcome, PageFault,
    CR0_MP, CR0_TS, CR4_LA57,
};

/// Why an instruction did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    Exception {
        vector: u8,
        error_code: Option<u32>,
        cr2: Option<u64>,
    },
    Unsupported,
}

impl Fault {
    pub fn ud() -> Fault {
        Fault::Exception {
            vector: vector::UD,
            error_code: None,
            cr2: None,
        }
    }

    pub fn with_code(vector: u8, error_code: u32) -> Fault {
        Fault::Exception {
            vector,
            error_code: Some(error_code),
            cr2: None,
        }
    }

    pub fn gp(error_code: u32) -> Fault {
        Fault::with_code(vector::GP, error_code)
    }

    pub fn np(error_code: u32) -> Fault {
        Fault::with_code(vector::NP, error_code)
    }

    pub fn ss(error_code: u32) -> Fault {
        Fault::with_code(vector::SS, error_code)
    }
}

impl From<PageFault> for Fault {
    fn from(fault: PageFault) -> Fault {
        Fault::Exception {
            vector: vector::PF,
            error_code: Some(fault.error_code),
            cr2: Some(fault.address),
        }
    }
}

/// RIP after an instruction of `len` bytes, wrapped to the mode's
/// instruction-pointer width.
pub(crate) fn next_rip(cpu: &CpuState, len: usize) -> u64 {
    let next = cpu.rip.wrapping_add(len as u64);
    match cpu.mode {
        CpuMode::Long64 => next,
        CpuMode::Protected32 => next & 0xffff_ffff,
        CpuMode::Protected16 | CpuMode::Real => next & 0xffff,
    }
}

/// Retires a completed instruction: RIP to the next one and RF cleared,
/// as after every successfully executed instruction.
fn retire(cpu: &mut CpuState, len: usize) {
    cpu.rip = next_rip(cpu, len);
    cpu.rflags &= !rflags::RF;
}

pub(crate) fn is_canonical(cpu: &CpuState, address: u64) -> bool {
    let unused_bits = if cpu.cr4 & CR4_LA57 != 0 { 7 } else { 16 };
    (((address << unused_bits) as i64) >> unused_bits) as u64 == address
}

fn to_outcome(kind: InstructionKind, cpu: &CpuState, result: Result<(), Fault>) -> Outcome {
    match result {
        Ok(()) => Outcome::Completed { kind },
        Err(Fault::Unsupported) => Outcome::Unsupported,
        Err(Fault::Exception {
            vector,
            error_code,
            cr2,
        }) => Outcome::Exception {
            kind,
            vector,
            error_code,
            cr2,
            rip: cpu.rip,
        },
    }
}

/// `clac`/`stac`, also reached from the fast path in `assist` (no
/// prefixes) with `lock` false.
pub(crate) fn clac_stac(cpu: &mut CpuState, set: bool, len: usize, lock: bool) -> Outcome {
    let kind = if set {
        InstructionKind::Stac
    } else {
        InstructionKind::Clac
    };
    // Virtual-8086 code runs at CPL 3.
    if lock || cpu.cpl != 0 || cpu.rflags & rflags::VM != 0 {
        return to_outcome(kind, cpu, Err(Fault::ud()));
    }
    if set {
        cpu.rflags |= rflags::AC;
    } else {
        cpu.rflags &= !rflags::AC;
    }
    retire(cpu, len);
    Outcome::Completed { kind }
}

pub(crate) fn execute(
    insn: &Instruction,
    cpu: &mut CpuState,
    mem: &mut dyn GuestMemoryAccess,
) -> Outcome {
    let kind = match insn.op {
        Op::Int3 => InstructionKind::Int3,
        Op::IntN(_) => InstructionKind::IntN,
        Op::Iret(_) => InstructionKind::Iret,
        Op::Fwait => InstructionKind::Fwait,
        Op::Ud2 => InstructionKind::Ud2,
        Op::Clac => InstructionKind::Clac,
        Op::Stac => InstructionKind::Stac,
        Op::Cmpxchg16b(_) | Op::Cmpxchg16bRegister => InstructionKind::Cmpxchg16b,
        Op::Popcnt { .. } => InstructionKind::Popcnt,
    };
    // LOCK is only legal on a read-modify-write memory instruction.
    if insn.lock && !matches!(insn.op, Op::Cmpxchg16b(_)) {
        return to_outcome(kind, cpu, Err(Fault::ud()));
    }
    let result = match insn.op {
        Op::Int3 => {
            // #BP is a trap: delivered with RIP after the int3.
            return Outcome::Exception {
                kind,
                vector: vector::BP,
                error_code: None,
                cr2: None,
                rip: next_rip(cpu, insn.len),
            };
        }
        Op::Ud2 | Op::Cmpxchg16bRegister => Err(Fault::ud()),
        Op::Clac => return clac_stac(cpu, false, insn.len, false),
        Op::Stac => return clac_stac(cpu, true, insn.len, false),
        Op::Fwait => {
            // No x87 exception is ever pending in our guests' FPU state as
            // far as we can see, so only the #NM check remains.
            if cpu.cr0 & (CR0_MP | CR0_TS) == CR0_MP | CR0_TS {
                Err(Fault::Exception {
                    vector: vector::NM,
                    error_code: None,
                    cr2: None,
                })
            } else {
                retire(cpu, insn.len);
                Ok(())
            }
        }
        Op::IntN(n) => interrupt::software_interrupt(cpu, mem, n, insn.len),
        Op::Iret(size) => interrupt::iret(cpu, mem, size),
        Op::Cmpxchg16b(operand) => cmpxchg16b(cpu, mem, &operand, insn.len),
        Op::Popcnt { dest, source, size } => popcnt(cpu, mem, dest, source, size, insn.len),
    };
    to_outcome(kind, cpu, result)
}

/// `popcnt r, r/m`: ZF set for a zero source; CF, OF, SF, AF and PF cleared.
fn popcnt(
    cpu: &mut CpuState,
    mem: &mut dyn GuestMemoryAccess,
    dest: u8,
    source: PopcntSource,
    size: OperandSize,
    len: usize,
) -> Result<(), Fault> {
    let bytes = match size {
        OperandSize::Word => 2,
        OperandSize::Dword => 4,
        OperandSize::Qword => 8,
    };
    let value = match source {
        PopcntSource::Register(r) => cpu.gpr[usize::from(r & 15)],
        PopcntSource::Memory(operand) => {
            let segment_base = match operand.segment {
                Some(SegmentOverride::Fs) => cpu.fs.base,
                Some(SegmentOverride::Gs) => cpu.gs.base,
                _ => 0,
            };
            let linear = segment_base.wrapping_add(effective_address(cpu, &operand, len));
            if !is_canonical(cpu, linear) {
                return Err(if operand.uses_stack_segment() {
                    Fault::ss(0)
                } else {
                    Fault::gp(0)
                });
            }
            let mut buf = [0u8; 8];
            mem.read(linear, &mut buf[..bytes])?;
            u64::from_le_bytes(buf)
        }
    };
    let mask = if bytes == 8 {
        u64::MAX
    } else {
        (1u64 << (bytes * 8)) - 1
    };
    let count = u64::from((value & mask).count_ones());
    let slot = &mut cpu.gpr[usize::from(dest & 15)];
    *slot = match size {
        // A 16-bit destination keeps its upper bits; a 32-bit one is zero-extended.
        OperandSize::Word => (*slot & !0xffff) | count,
        OperandSize::Dword | OperandSize::Qword => count,
    };
    const ARITHMETIC: u64 = 0x8d5; // CF PF AF ZF SF OF
    cpu.rflags &= !ARITHMETIC;
    if value & mask == 0 {
        cpu.rflags |= rflags::ZF;
    }
    retire(cpu, len);
    Ok(())
}

fn effective_address(cpu: &CpuState, operand: &MemoryOperand, len: usize) -> u64 {
    let mut address = operand.displacement as i64 as u64;
    if operand.rip_relative {
        address = address.wrapping_add(next_rip(cpu, len));
    }
    if let Some(base) = operand.base {
        address = address.wrapping_add(cpu.gpr[usize::from(base & 15)]);
    }
    if let Some(index) = operand.index {
        let scaled = cpu.gpr[usize::from(index & 15)].wrapping_mul(u64::from(operand.scale));
        address = address.wrapping_add(scaled);
    }
    if operand.address32 {
        address &= 0xffff_ffff;
    }
    address
}

/// `cmpxchg16b m128` (64-bit mode only: the decoder needs REX.W).
fn cmpxchg16b(
    cpu: &mut CpuState,
    mem: &mut dyn GuestMemoryAccess,
    operand: &MemoryOperand,
    len: usize,
) -> Result<(), Fault> {
    if cpu.mode != CpuMode::Long64 {
        return Err(Fault::Unsupported);
    }
    // In 64-bit mode only FS and GS contribute a base.
    let segment_base = match operand.segment {
        Some(SegmentOverride::Fs) => cpu.fs.base,
        Some(SegmentOverride::Gs) => cpu.gs.base,
        _ => 0,
    };
    let linear = segment_base.wrapping_add(effective_address(cpu, operand, len));
    if !is_canonical(cpu, linear) {
        return Err(if operand.uses_stack_segment() {
            Fault::ss(0)
        } else {
            Fault::gp(0)
        });
    }
    if linear % 16 != 0 {
        return Err(Fault::gp(0));
    }
    let [rax, _, rdx, ..] = cpu.gpr;
    let expected = (u128::from(rdx) << 64) | u128::from(rax);
    let new = (u128::from(cpu.gpr[1]) << 64) | u128::from(cpu.gpr[3]);
    let found = mem.compare_exchange_16(linear, expected, new)?;
    if found == expected {
        cpu.rflags |= rflags::ZF;
    } else {
        cpu.gpr[0] = found as u64;
        cpu.gpr[2] = (found >> 64) as u64;
        cpu.rflags &= !rflags::ZF;
    }
    retire(cpu, len);
    Ok(())
}
