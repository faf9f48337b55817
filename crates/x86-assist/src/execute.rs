//! Execution of the decoded instructions other than `int n`/`iret`.
//!
//! Each instruction computes its result first and writes the state only
//! once nothing can fail any more, so exceptions leave `CpuState` intact.

use crate::decode::{
    Instruction, MemoryOperand, Op, OperandSize, RegisterOrMemory, SegmentOverride,
};
use crate::interrupt;
use crate::{
    rflags, vector, CpuMode, CpuState, FpuState, GuestMemoryAccess, InstructionKind, Outcome,
    PageFault, CR0_AM, CR0_EM, CR0_MP, CR0_TS, CR4_LA57, CR4_OSFXSR, MXCSR_MASK,
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

    pub fn nm() -> Fault {
        Fault::Exception {
            vector: vector::NM,
            error_code: None,
            cr2: None,
        }
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
        Op::Lsl { .. } => InstructionKind::Lsl,
        Op::Fldcw(_) => InstructionKind::Fldcw,
        Op::Ldmxcsr(_) => InstructionKind::Ldmxcsr,
        Op::Stmxcsr(_) => InstructionKind::Stmxcsr,
        Op::Fxsave { .. } => InstructionKind::Fxsave,
        Op::Fxrstor { .. } => InstructionKind::Fxrstor,
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
                Err(Fault::nm())
            } else {
                retire(cpu, insn.len);
                Ok(())
            }
        }
        Op::IntN(n) => interrupt::software_interrupt(cpu, mem, n, insn.len),
        Op::Iret(size) => interrupt::iret(cpu, mem, size),
        Op::Cmpxchg16b(operand) => cmpxchg16b(cpu, mem, &operand, insn.len),
        Op::Popcnt { dest, source, size } => popcnt(cpu, mem, dest, source, size, insn.len),
        Op::Lsl { dest, source, size } => lsl(cpu, mem, dest, source, size, insn.len),
        Op::Fldcw(operand) => fldcw(cpu, mem, &operand, insn.len),
        Op::Ldmxcsr(operand) => ldmxcsr(cpu, mem, &operand, insn.len),
        Op::Stmxcsr(operand) => stmxcsr(cpu, mem, &operand, insn.len),
        Op::Fxsave { operand, wide } => fxsave(cpu, mem, &operand, wide, insn.len),
        Op::Fxrstor { operand, wide } => fxrstor(cpu, mem, &operand, wide, insn.len),
    };
    to_outcome(kind, cpu, result)
}

fn operand_bytes(size: OperandSize) -> usize {
    match size {
        OperandSize::Word => 2,
        OperandSize::Dword => 4,
        OperandSize::Qword => 8,
    }
}

/// The r/m source of a `reg, r/m` instruction: the whole register, or
/// `bytes` bytes of memory (zero-extended).
fn read_source(
    cpu: &CpuState,
    mem: &mut dyn GuestMemoryAccess,
    source: RegisterOrMemory,
    bytes: usize,
    len: usize,
) -> Result<u64, Fault> {
    match source {
        RegisterOrMemory::Register(r) => Ok(cpu.gpr[usize::from(r & 15)]),
        RegisterOrMemory::Memory(operand) => {
            let linear = linear_address(cpu, &operand, len)?;
            let mut buf = [0u8; 8];
            mem.read(linear, &mut buf[..bytes])?;
            Ok(u64::from_le_bytes(buf))
        }
    }
}

/// Writes a result to a general register: a 16-bit destination keeps its
/// upper bits; 32- and 64-bit ones take the value (32-bit results are
/// zero-extended already).
fn write_destination(cpu: &mut CpuState, dest: u8, size: OperandSize, value: u64) {
    let slot = &mut cpu.gpr[usize::from(dest & 15)];
    *slot = match size {
        OperandSize::Word => (*slot & !0xffff) | (value & 0xffff),
        OperandSize::Dword | OperandSize::Qword => value,
    };
}

/// `popcnt r, r/m`: ZF set for a zero source; CF, OF, SF, AF and PF cleared.
fn popcnt(
    cpu: &mut CpuState,
    mem: &mut dyn GuestMemoryAccess,
    dest: u8,
    source: RegisterOrMemory,
    size: OperandSize,
    len: usize,
) -> Result<(), Fault> {
    let bytes = operand_bytes(size);
    let value = read_source(cpu, mem, source, bytes, len)?;
    let mask = if bytes == 8 {
        u64::MAX
    } else {
        (1u64 << (bytes * 8)) - 1
    };
    let count = u64::from((value & mask).count_ones());
    write_destination(cpu, dest, size, count);
    const ARITHMETIC: u64 = 0x8d5; // CF PF AF ZF SF OF
    cpu.rflags &= !ARITHMETIC;
    if value & mask == 0 {
        cpu.rflags |= rflags::ZF;
    }
    retire(cpu, len);
    Ok(())
}

/// `lsl r, r/m16`: the limit of the descriptor the selector names, with
/// ZF set, or ZF cleared and the destination kept when the selector is
/// null, out of the table, of a type without a limit, or too privileged
/// (see [`interrupt::segment_limit`]). Other flags are unchanged.
fn lsl(
    cpu: &mut CpuState,
    mem: &mut dyn GuestMemoryAccess,
    dest: u8,
    source: RegisterOrMemory,
    size: OperandSize,
    len: usize,
) -> Result<(), Fault> {
    if cpu.mode == CpuMode::Real || cpu.rflags & rflags::VM != 0 {
        return Err(Fault::ud());
    }
    let selector = read_source(cpu, mem, source, 2, len)? as u16;
    match interrupt::segment_limit(cpu, mem, selector)? {
        Some(limit) => {
            write_destination(cpu, dest, size, u64::from(limit));
            cpu.rflags |= rflags::ZF;
        }
        None => cpu.rflags &= !rflags::ZF,
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

/// The linear address of a 64-bit-mode memory operand: only FS and GS
/// contribute a base; a non-canonical address is #SS(0) through SS and
/// #GP(0) otherwise.
fn linear_address(cpu: &CpuState, operand: &MemoryOperand, len: usize) -> Result<u64, Fault> {
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
    Ok(linear)
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
    let linear = linear_address(cpu, operand, len)?;
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

/// The #UD and #NM checks of `ldmxcsr`/`stmxcsr` (SSE instructions): #UD
/// when the OS has not enabled SSE (CR4.OSFXSR) or asks for x87 emulation
/// (CR0.EM), then #NM when CR0.TS defers the state switch.
fn check_sse_enabled(cpu: &CpuState) -> Result<(), Fault> {
    if cpu.cr4 & CR4_OSFXSR == 0 || cpu.cr0 & CR0_EM != 0 {
        return Err(Fault::ud());
    }
    if cpu.cr0 & CR0_TS != 0 {
        return Err(Fault::nm());
    }
    Ok(())
}

/// #AC(0) for a misaligned 4-byte access with alignment checking enabled
/// (CPL 3, CR0.AM and RFLAGS.AC).
fn check_alignment(cpu: &CpuState, linear: u64, size: u64) -> Result<(), Fault> {
    if cpu.cpl == 3
        && cpu.cr0 & CR0_AM != 0
        && cpu.rflags & rflags::AC != 0
        && !linear.is_multiple_of(size)
    {
        return Err(Fault::with_code(vector::AC, 0));
    }
    Ok(())
}

/// #NM for an x87 instruction when CR0.EM or CR0.TS is set.
fn check_x87_enabled(cpu: &CpuState) -> Result<(), Fault> {
    if cpu.cr0 & (CR0_EM | CR0_TS) != 0 {
        return Err(Fault::nm());
    }
    Ok(())
}

/// The linear address of the `size`-byte memory operand of an x87 or SSE
/// control-register load or store, in 64-bit mode only, after `enabled`'s
/// #NM/#UD check, the address checks and the alignment check.
fn control_operand(
    cpu: &CpuState,
    operand: &MemoryOperand,
    len: usize,
    size: u64,
    enabled: fn(&CpuState) -> Result<(), Fault>,
) -> Result<u64, Fault> {
    if cpu.mode != CpuMode::Long64 {
        return Err(Fault::Unsupported);
    }
    enabled(cpu)?;
    let linear = linear_address(cpu, operand, len)?;
    check_alignment(cpu, linear, size)?;
    Ok(linear)
}

/// `fldcw m16` (64-bit mode); the reserved bits are kept as written.
fn fldcw(
    cpu: &mut CpuState,
    mem: &mut dyn GuestMemoryAccess,
    operand: &MemoryOperand,
    len: usize,
) -> Result<(), Fault> {
    let linear = control_operand(cpu, operand, len, 2, check_x87_enabled)?;
    let mut buf = [0u8; 2];
    mem.read(linear, &mut buf)?;
    cpu.fpu.fcw = u16::from_le_bytes(buf);
    retire(cpu, len);
    Ok(())
}

/// `ldmxcsr m32`; reserved bits (outside MXCSR_MASK) are #GP(0).
fn ldmxcsr(
    cpu: &mut CpuState,
    mem: &mut dyn GuestMemoryAccess,
    operand: &MemoryOperand,
    len: usize,
) -> Result<(), Fault> {
    let linear = control_operand(cpu, operand, len, 4, check_sse_enabled)?;
    let mut buf = [0u8; 4];
    mem.read(linear, &mut buf)?;
    let mxcsr = u32::from_le_bytes(buf);
    if mxcsr & !MXCSR_MASK != 0 {
        return Err(Fault::gp(0));
    }
    cpu.fpu.mxcsr = mxcsr;
    retire(cpu, len);
    Ok(())
}

/// `stmxcsr m32`.
fn stmxcsr(
    cpu: &mut CpuState,
    mem: &mut dyn GuestMemoryAccess,
    operand: &MemoryOperand,
    len: usize,
) -> Result<(), Fault> {
    let linear = control_operand(cpu, operand, len, 4, check_sse_enabled)?;
    mem.write(linear, &cpu.fpu.mxcsr.to_le_bytes())?;
    retire(cpu, len);
    Ok(())
}

/// Bytes of the 512-byte FXSAVE area that `fxsave` writes: the rest
/// (416..464 reserved, 464..512 available to software) is left untouched.
/// Unlike hardware, a non-writable page holding only those bytes (an area
/// starting 416 bytes or less before a page end) does not fault.
const FXSAVE_WRITTEN: usize = 416;
/// Size of the area `fxrstor` reads.
const FXSAVE_AREA: usize = 512;
const FXSAVE_ST0: usize = 32;
const FXSAVE_XMM0: usize = 160;
/// FOP is an 11-bit register.
const FOP_MASK: u16 = 0x7ff;

/// The #NM check of `fxsave`/`fxrstor` (CR0.TS or CR0.EM) and the
/// 16-byte alignment of their area (#GP(0)), after the address checks.
fn fx_area(cpu: &CpuState, operand: &MemoryOperand, len: usize) -> Result<u64, Fault> {
    if cpu.mode != CpuMode::Long64 {
        return Err(Fault::Unsupported);
    }
    if cpu.cr0 & (CR0_TS | CR0_EM) != 0 {
        return Err(Fault::nm());
    }
    let linear = linear_address(cpu, operand, len)?;
    if linear % 16 != 0 {
        return Err(Fault::gp(0));
    }
    Ok(linear)
}

/// The stored part of an FXSAVE image. The 32-bit form (`wide` false)
/// stores FIP and FDP as 32-bit offsets followed by FCS and FDS, which are
/// zero in 64-bit mode. In 64-bit mode XMM0-15 are all stored. CR4.OSFXSR
/// clear leaves it to the implementation whether MXCSR and XMM are saved;
/// this one always saves them.
fn fxsave_image(fpu: &FpuState, wide: bool) -> [u8; FXSAVE_WRITTEN] {
    let mut image = [0u8; FXSAVE_WRITTEN];
    image[0..2].copy_from_slice(&fpu.fcw.to_le_bytes());
    image[2..4].copy_from_slice(&fpu.fsw.to_le_bytes());
    image[4] = fpu.ftwx;
    image[6..8].copy_from_slice(&(fpu.last_opcode & FOP_MASK).to_le_bytes());
    if wide {
        image[8..16].copy_from_slice(&fpu.last_ip.to_le_bytes());
        image[16..24].copy_from_slice(&fpu.last_dp.to_le_bytes());
    } else {
        image[8..12].copy_from_slice(&(fpu.last_ip as u32).to_le_bytes());
        image[16..20].copy_from_slice(&(fpu.last_dp as u32).to_le_bytes());
    }
    image[24..28].copy_from_slice(&fpu.mxcsr.to_le_bytes());
    image[28..32].copy_from_slice(&MXCSR_MASK.to_le_bytes());
    for (slot, st) in image[FXSAVE_ST0..FXSAVE_XMM0]
        .chunks_exact_mut(16)
        .zip(fpu.fpr.iter())
    {
        slot[..10].copy_from_slice(&st[..10]);
    }
    for (slot, xmm) in image[FXSAVE_XMM0..]
        .chunks_exact_mut(16)
        .zip(fpu.xmm.iter())
    {
        slot.copy_from_slice(xmm);
    }
    image
}

/// `fxsave`/`fxsave64 m512`: one write of the stored part of the image.
fn fxsave(
    cpu: &mut CpuState,
    mem: &mut dyn GuestMemoryAccess,
    operand: &MemoryOperand,
    wide: bool,
    len: usize,
) -> Result<(), Fault> {
    let linear = fx_area(cpu, operand, len)?;
    mem.write(linear, &fxsave_image(&cpu.fpu, wide))?;
    retire(cpu, len);
    Ok(())
}

fn le16(bytes: &[u8], at: usize) -> u16 {
    let mut raw = [0u8; 2];
    raw.copy_from_slice(&bytes[at..at + 2]);
    u16::from_le_bytes(raw)
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(raw)
}

fn le64(bytes: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(raw)
}

/// `fxrstor`/`fxrstor64 m512`: reads the whole area, refuses reserved
/// MXCSR bits with #GP(0) before changing anything. The 32-bit form loads
/// FIP and FDP as 32-bit offsets (FCS and FDS are not kept).
fn fxrstor(
    cpu: &mut CpuState,
    mem: &mut dyn GuestMemoryAccess,
    operand: &MemoryOperand,
    wide: bool,
    len: usize,
) -> Result<(), Fault> {
    let linear = fx_area(cpu, operand, len)?;
    let mut image = [0u8; FXSAVE_AREA];
    mem.read(linear, &mut image)?;
    let mxcsr = le32(&image, 24);
    if mxcsr & !MXCSR_MASK != 0 {
        return Err(Fault::gp(0));
    }
    let mut fpu = FpuState {
        fcw: le16(&image, 0),
        fsw: le16(&image, 2),
        ftwx: image[4],
        last_opcode: le16(&image, 6) & FOP_MASK,
        mxcsr,
        ..FpuState::default()
    };
    if wide {
        fpu.last_ip = le64(&image, 8);
        fpu.last_dp = le64(&image, 16);
    } else {
        fpu.last_ip = u64::from(le32(&image, 8));
        fpu.last_dp = u64::from(le32(&image, 16));
    }
    for (st, slot) in fpu
        .fpr
        .iter_mut()
        .zip(image[FXSAVE_ST0..FXSAVE_XMM0].chunks_exact(16))
    {
        st[..10].copy_from_slice(&slot[..10]);
    }
    for (xmm, slot) in fpu
        .xmm
        .iter_mut()
        .zip(image[FXSAVE_XMM0..FXSAVE_WRITTEN].chunks_exact(16))
    {
        xmm.copy_from_slice(slot);
    }
    cpu.fpu = fpu;
    retire(cpu, len);
    Ok(())
}
