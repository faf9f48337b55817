//! Instruction assist for KVM emulation failures.
//!
//! On PVM (software virtualization) guest ring-0 code runs through KVM's
//! instruction emulator, which ends the guest with
//! `KVM_EXIT_INTERNAL_ERROR`/`KVM_INTERNAL_ERROR_EMULATION` on the first
//! instruction it lacks. This crate decodes and executes a small, explicit
//! set of those instructions against an abstract CPU state so the VMM can
//! complete them and re-enter the guest. It knows nothing of KVM: the VMM
//! fills a [`CpuState`] from its registers, implements
//! [`GuestMemoryAccess`] with a page walk, calls [`assist`] and writes the
//! state back or injects the [`Outcome::Exception`] it is told to.
//!
//! Instruction bytes and guest memory are hostile: decoding is bounded to
//! 15 bytes, never reads past the slice it is given, and nothing panics.
//! When the answer is [`Outcome::Unsupported`] or [`Outcome::Exception`]
//! the [`CpuState`] is left exactly as it was.
//!
//! No decoder crate is used: the set is tiny and every instruction needs
//! its own architectural checks (CPL, CR0, descriptor tables), which a
//! general decoder would not give us.
//!
//! What the VMM still owns:
//! - `lock cmpxchg16b` is only atomic if the VMM overrides
//!   [`GuestMemoryAccess::compare_exchange_16`]; the default is a read then
//!   a write while other vCPUs may run. The VMM must also raise #UD itself
//!   if its CPUID hides CX16 from the guest.
//! - After [`InstructionKind::Iret`] completes, NMIs are unblocked.
//! - [`CpuState::fpu`] must hold the vCPU's x87/SSE state (KVM_GET_FPU)
//!   when the instruction is `fldcw`, `ldmxcsr`, `stmxcsr`, `fxsave` or
//!   `fxrstor`, and be written back (KVM_SET_FPU) after
//!   `fldcw`/`ldmxcsr`/`fxrstor` complete.
//!   The VMM must raise #UD itself if its CPUID hides SSE or FXSR.
//! - After any [`Outcome::Completed`], an STI/MOV SS interrupt shadow is
//!   over, and if RFLAGS.TF was set before the instruction (other than
//!   `int n`, which clears it) hardware would raise a single-step #DB
//!   trap; neither is reported here.
//!
//! ```
//! use rhyve_x86_assist::{assist, CpuState, GuestMemoryAccess, Outcome, PageFault};
//!
//! struct NoMemory;
//! impl GuestMemoryAccess for NoMemory {
//!     fn read(&mut self, linear: u64, _: &mut [u8]) -> Result<(), PageFault> {
//!         Err(PageFault { address: linear, error_code: 0 })
//!     }
//!     fn write(&mut self, linear: u64, _: &[u8]) -> Result<(), PageFault> {
//!         Err(PageFault { address: linear, error_code: 2 })
//!     }
//! }
//!
//! let mut cpu = CpuState { rip: 0x1000, ..CpuState::default() };
//! match assist(&[0x0f, 0x01, 0xcb], &mut cpu, &mut NoMemory) {
//!     Outcome::Completed { kind } => assert_eq!(kind.name(), "stac"),
//!     other => panic!("{other:?}"),
//! }
//! assert_eq!(cpu.rip, 0x1003);
//! ```

mod decode;
mod execute;
mod interrupt;
#[cfg(test)]
mod tests;

use decode::{DecodeError, Op};

/// Longest legal x86 instruction, prefixes included.
pub const MAX_INSTRUCTION_LEN: usize = 15;

/// CR0.PE: protected mode.
pub const CR0_PE: u64 = 1 << 0;
/// CR0.MP: monitor coprocessor (with TS, makes `fwait` raise #NM).
pub const CR0_MP: u64 = 1 << 1;
/// CR0.TS: task switched.
pub const CR0_TS: u64 = 1 << 3;
/// CR0.EM: x87 emulation (#UD for SSE instructions, #NM for fxsave/fxrstor).
pub const CR0_EM: u64 = 1 << 2;
/// CR0.AM: alignment mask (with RFLAGS.AC at CPL 3, enables #AC).
pub const CR0_AM: u64 = 1 << 18;
/// CR4.OSFXSR: the OS supports fxsave/fxrstor and SSE.
pub const CR4_OSFXSR: u64 = 1 << 9;
/// CR4.LA57: 5-level paging, 57-bit canonical addresses.
pub const CR4_LA57: u64 = 1 << 12;
/// EFER.LMA: long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// The MXCSR bits this CPU model supports (stored by `fxsave` at offset
/// 28); setting any other bit with `ldmxcsr`/`fxrstor` is #GP(0).
pub const MXCSR_MASK: u32 = 0x0000_ffff;

/// RFLAGS bits this crate reads or writes.
pub mod rflags {
    /// Carry flag.
    pub const CF: u64 = 1 << 0;
    /// Always-one reserved bit.
    pub const FIXED: u64 = 1 << 1;
    /// Zero flag.
    pub const ZF: u64 = 1 << 6;
    /// Trap flag (single step).
    pub const TF: u64 = 1 << 8;
    /// Interrupt enable.
    pub const IF: u64 = 1 << 9;
    /// Nested task.
    pub const NT: u64 = 1 << 14;
    /// Resume flag.
    pub const RF: u64 = 1 << 16;
    /// Virtual-8086 mode.
    pub const VM: u64 = 1 << 17;
    /// Alignment check / SMAP access control.
    pub const AC: u64 = 1 << 18;
}

/// Index of RSP in [`CpuState::gpr`].
pub const RSP: usize = 4;

/// A segment register with its hidden part, laid out like `kvm_segment`
/// so the VMM copies it field by field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    /// Byte-granular limit (already scaled by G, as KVM reports it).
    pub limit: u32,
    /// The 4-bit descriptor type.
    pub seg_type: u8,
    /// Code/data (true) or system (false) descriptor.
    pub s: bool,
    pub dpl: u8,
    pub present: bool,
    pub avl: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// Default operand size / big stack.
    pub db: bool,
    pub g: bool,
    pub unusable: bool,
}

/// GDTR or IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Execution mode, which decides operand/address sizes and REX decoding.
/// Virtual-8086 mode is `Protected16` with RFLAGS.VM set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuMode {
    #[default]
    Real,
    Protected16,
    Protected32,
    Long64,
}

impl CpuMode {
    /// The mode from CR0.PE, EFER.LMA, CS.L and CS.D. Compatibility mode
    /// (long mode with CS.L clear) is `Protected32`/`Protected16`.
    pub fn from_registers(cr0: u64, efer: u64, cs: &Segment) -> CpuMode {
        if cr0 & CR0_PE == 0 {
            CpuMode::Real
        } else if efer & EFER_LMA != 0 && cs.l {
            CpuMode::Long64
        } else if cs.db {
            CpuMode::Protected32
        } else {
            CpuMode::Protected16
        }
    }
}

/// x87/SSE state, laid out like KVM's `struct kvm_fpu` so the VMM copies
/// it field by field (KVM_GET_FPU / KVM_SET_FPU).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FpuState {
    /// ST0-7 / MM0-7: the first 10 bytes of each are significant.
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    /// Abridged tag word (one bit per register), as `fxsave` stores it.
    pub ftwx: u8,
    /// Last x87 opcode (11 bits).
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

/// The vCPU state the assist needs, filled by the VMM from
/// KVM_GET_REGS/KVM_GET_SREGS and written back after
/// [`Outcome::Completed`] (`int n` and `iret` change CS, SS and RSP).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuState {
    /// rax rcx rdx rbx rsp rbp rsi rdi r8..r15, in encoding order.
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub cpl: u8,
    /// Must agree with [`CpuMode::from_registers`]; `int n`/`iret`
    /// recompute it when they load CS.
    pub mode: CpuMode,
    pub cs: Segment,
    pub ss: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub gdtr: DescriptorTable,
    pub idtr: DescriptorTable,
    /// x87/SSE state: read by `stmxcsr`/`fxsave`, written by
    /// `fldcw`/`ldmxcsr`/`fxrstor`; the other instructions leave it alone.
    pub fpu: FpuState,
}

/// A page fault raised by the VMM's page walk; becomes #PF with CR2 =
/// `address`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageFault {
    pub address: u64,
    pub error_code: u32,
}

/// Guest memory through the guest's page tables; the VMM implements it
/// (page walk with CR3 over guest physical memory, permissions from
/// [`CpuState::cpl`]). Every call must be all-or-nothing: check every page
/// a buffer touches before copying any byte.
pub trait GuestMemoryAccess {
    fn read(&mut self, linear: u64, buf: &mut [u8]) -> Result<(), PageFault>;
    fn write(&mut self, linear: u64, buf: &[u8]) -> Result<(), PageFault>;

    /// An instruction fetch. Override to set the I/D bit of the error code
    /// and honour NX; the default is a data read.
    fn read_code(&mut self, linear: u64, buf: &mut [u8]) -> Result<(), PageFault> {
        self.read(linear, buf)
    }

    /// Compares the 16 bytes at `linear` (16-byte aligned) with `expected`
    /// and stores `new` if equal; returns the value found (little-endian).
    ///
    /// The default is a read followed by a write and is NOT atomic: another
    /// vCPU running meanwhile can update the location between the two, and
    /// its update is lost. A VMM with other vCPUs running should override
    /// it with a host `lock cmpxchg16b` on the mapped guest page. The
    /// default also skips the hardware's write-back of the old value when
    /// the comparison fails, so a failed compare on a read-only page does
    /// not fault as it would on hardware.
    fn compare_exchange_16(
        &mut self,
        linear: u64,
        expected: u128,
        new: u128,
    ) -> Result<u128, PageFault> {
        let mut old = [0u8; 16];
        self.read(linear, &mut old)?;
        let old = u128::from_le_bytes(old);
        if old == expected {
            self.write(linear, &new.to_le_bytes())?;
        }
        Ok(old)
    }
}

/// Which instruction was handled, for per-kind counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InstructionKind {
    Int3,
    Ud2,
    Fwait,
    Clac,
    Stac,
    /// `int imm8`.
    IntN,
    /// `iret`/`iretd`/`iretq`. After it completes the VMM must also clear
    /// NMI blocking (KVM_SET_VCPU_EVENTS `nmi.masked = 0`), as the
    /// hardware does on every IRET.
    Iret,
    Cmpxchg16b,
    /// `popcnt`: hosts may advertise POPCNT that their KVM cannot emulate.
    Popcnt,
    /// `lsl`: Linux reads its CPU number from a GDT segment limit with it
    /// (paranoid entry with FSGSBASE, the vDSO's getcpu).
    Lsl,
    /// `fldcw m16`: loads [`FpuState::fcw`]; the UEFI firmware's SEC runs
    /// it right after `finit` (KVM emulates `fninit` itself).
    Fldcw,
    /// `ldmxcsr m32`: loads [`FpuState::mxcsr`].
    Ldmxcsr,
    /// `stmxcsr m32`: stores [`FpuState::mxcsr`].
    Stmxcsr,
    /// `fxsave`/`fxsave64 m512`: stores [`CpuState::fpu`].
    Fxsave,
    /// `fxrstor`/`fxrstor64 m512`: loads [`CpuState::fpu`].
    Fxrstor,
    /// The instruction ran past the bytes the VMM gave and fetching the
    /// rest faulted: the #PF is the guest's.
    FetchFault,
}

impl InstructionKind {
    /// Every kind, for registering counters.
    pub const ALL: [InstructionKind; 16] = [
        InstructionKind::Int3,
        InstructionKind::Ud2,
        InstructionKind::Fwait,
        InstructionKind::Clac,
        InstructionKind::Stac,
        InstructionKind::IntN,
        InstructionKind::Iret,
        InstructionKind::Cmpxchg16b,
        InstructionKind::Popcnt,
        InstructionKind::Lsl,
        InstructionKind::Fldcw,
        InstructionKind::Ldmxcsr,
        InstructionKind::Stmxcsr,
        InstructionKind::Fxsave,
        InstructionKind::Fxrstor,
        InstructionKind::FetchFault,
    ];

    /// A stable short name (counter names in `bhyvectl --get-stats`).
    pub fn name(self) -> &'static str {
        match self {
            InstructionKind::Int3 => "int3",
            InstructionKind::Ud2 => "ud2",
            InstructionKind::Fwait => "fwait",
            InstructionKind::Clac => "clac",
            InstructionKind::Stac => "stac",
            InstructionKind::IntN => "int-n",
            InstructionKind::Iret => "iret",
            InstructionKind::Cmpxchg16b => "cmpxchg16b",
            InstructionKind::Popcnt => "popcnt",
            InstructionKind::Lsl => "lsl",
            InstructionKind::Fldcw => "fldcw",
            InstructionKind::Ldmxcsr => "ldmxcsr",
            InstructionKind::Stmxcsr => "stmxcsr",
            InstructionKind::Fxsave => "fxsave",
            InstructionKind::Fxrstor => "fxrstor",
            InstructionKind::FetchFault => "fetch-fault",
        }
    }
}

/// What the VMM must do after [`assist`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// State updated (RIP advanced etc.); write it back and re-enter.
    Completed { kind: InstructionKind },
    /// Inject this exception, then re-enter. The [`CpuState`] is
    /// unchanged; `rip` is the RIP the exception is delivered with (the
    /// return address the guest handler sees): the instruction's own for
    /// faults, the next instruction's for the #BP trap of `int3`. The VMM
    /// sets RIP to it before injecting.
    Exception {
        kind: InstructionKind,
        vector: u8,
        error_code: Option<u32>,
        /// Set for #PF: the faulting linear address for CR2.
        cr2: Option<u64>,
        rip: u64,
    },
    /// Not an instruction this crate handles (or a case of one it cannot
    /// do correctly); the state is unchanged.
    Unsupported,
}

/// Exception vectors raised here.
pub mod vector {
    pub const BP: u8 = 3;
    pub const UD: u8 = 6;
    pub const NM: u8 = 7;
    pub const NP: u8 = 11;
    pub const SS: u8 = 12;
    pub const GP: u8 = 13;
    pub const PF: u8 = 14;
    pub const AC: u8 = 17;
}

/// Decodes and executes the instruction in `bytes` (KVM's instruction
/// bytes; may be empty or short, then the rest is fetched at CS:RIP
/// through `mem`).
pub fn assist(bytes: &[u8], cpu: &mut CpuState, mem: &mut dyn GuestMemoryAccess) -> Outcome {
    // clac/stac run tens of thousands of times per boot: no prefixes, no
    // decoder, no allocation.
    if let [0x0f, 0x01, modrm @ (0xca | 0xcb), ..] = bytes {
        let set = *modrm == 0xcb;
        return execute::clac_stac(cpu, set, 3, false);
    }
    match decode::decode(bytes, cpu.mode) {
        Ok(insn) => execute::execute(&insn, cpu, mem),
        Err(DecodeError::Unsupported) => Outcome::Unsupported,
        Err(DecodeError::Truncated) => {
            let fetched = match fetch_into(cpu, mem) {
                Ok(fetched) => fetched,
                Err(fault) => return fetch_fault(cpu, fault),
            };
            match decode::decode(fetched.bytes(), cpu.mode) {
                Ok(insn) => execute::execute(&insn, cpu, mem),
                Err(DecodeError::Unsupported) => Outcome::Unsupported,
                Err(DecodeError::Truncated) => match fetched.stopped_by {
                    Some(fault) => fetch_fault(cpu, fault),
                    None => Outcome::Unsupported,
                },
            }
        }
    }
}

fn fetch_fault(cpu: &CpuState, fault: PageFault) -> Outcome {
    Outcome::Exception {
        kind: InstructionKind::FetchFault,
        vector: vector::PF,
        error_code: Some(fault.error_code),
        cr2: Some(fault.address),
        rip: cpu.rip,
    }
}

/// Reads up to 15 instruction bytes at CS:RIP. A fault on the first byte's
/// page is returned; a fault on the following page only shortens the
/// result (the instruction may end before it).
pub fn fetch(cpu: &CpuState, mem: &mut dyn GuestMemoryAccess) -> Result<Vec<u8>, PageFault> {
    fetch_into(cpu, mem).map(|fetched| fetched.bytes().to_vec())
}

struct Fetched {
    buf: [u8; MAX_INSTRUCTION_LEN],
    len: usize,
    /// The fault that ended the fetch early, if any.
    stopped_by: Option<PageFault>,
}

impl Fetched {
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len.min(MAX_INSTRUCTION_LEN)]
    }
}

const PAGE_SIZE: u64 = 4096;

fn fetch_into(cpu: &CpuState, mem: &mut dyn GuestMemoryAccess) -> Result<Fetched, PageFault> {
    let mut fetched = Fetched {
        buf: [0; MAX_INSTRUCTION_LEN],
        len: 0,
        stopped_by: None,
    };
    let (wanted, long) = if cpu.mode == CpuMode::Long64 {
        (MAX_INSTRUCTION_LEN, true)
    } else {
        // Outside 64-bit mode the CS limit bounds the fetch; the offset
        // wraps at 32 bits (16 for real mode offsets past 0xffff fault on
        // hardware, and KVM would not have handed us such an instruction).
        let offset = cpu.rip & 0xffff_ffff;
        let room = u64::from(cpu.cs.limit)
            .saturating_sub(offset)
            .saturating_add(1);
        let wanted = if offset > u64::from(cpu.cs.limit) {
            0
        } else {
            room.min(MAX_INSTRUCTION_LEN as u64) as usize
        };
        (wanted, false)
    };
    while fetched.len < wanted {
        let offset = cpu.rip.wrapping_add(fetched.len as u64);
        // 64-bit mode ignores the CS base.
        let linear = if long {
            offset
        } else {
            cpu.cs.base.wrapping_add(offset) & 0xffff_ffff
        };
        let to_page_end = (PAGE_SIZE - (linear % PAGE_SIZE)) as usize;
        let chunk = to_page_end.min(wanted - fetched.len);
        let dest = &mut fetched.buf[fetched.len..fetched.len + chunk];
        match mem.read_code(linear, dest) {
            Ok(()) => fetched.len += chunk,
            Err(fault) if fetched.len == 0 => return Err(fault),
            Err(fault) => {
                fetched.stopped_by = Some(fault);
                break;
            }
        }
    }
    Ok(fetched)
}

/// A short mnemonic for log lines, e.g. `lock cmpxchg16b [rsi+0x10]`,
/// `int 0x80`, `iretq`; `unknown` for anything this crate does not handle.
/// Decodes as 64-bit code (REX prefixes recognised).
pub fn describe(bytes: &[u8]) -> String {
    match decode::decode(bytes, CpuMode::Long64) {
        Ok(insn) => {
            let lock = if insn.lock { "lock " } else { "" };
            let body = match &insn.op {
                Op::Int3 => "int3".to_string(),
                Op::IntN(n) => format!("int {n:#x}"),
                Op::Iret(size) => match size {
                    decode::OperandSize::Word => "iretw".to_string(),
                    decode::OperandSize::Dword => "iretd".to_string(),
                    decode::OperandSize::Qword => "iretq".to_string(),
                },
                Op::Fwait => "fwait".to_string(),
                Op::Ud2 => "ud2".to_string(),
                Op::Clac => "clac".to_string(),
                Op::Stac => "stac".to_string(),
                Op::Cmpxchg16b(operand) => format!("cmpxchg16b {operand}"),
                Op::Cmpxchg16bRegister => "cmpxchg16b (register operand)".to_string(),
                Op::Popcnt {
                    source: decode::RegisterOrMemory::Memory(operand),
                    ..
                } => format!("popcnt {operand}"),
                Op::Popcnt { .. } => "popcnt (register source)".to_string(),
                Op::Lsl {
                    source: decode::RegisterOrMemory::Memory(operand),
                    ..
                } => format!("lsl {operand}"),
                Op::Lsl { .. } => "lsl (register source)".to_string(),
                Op::Fldcw(operand) => format!("fldcw {operand}"),
                Op::Ldmxcsr(operand) => format!("ldmxcsr {operand}"),
                Op::Stmxcsr(operand) => format!("stmxcsr {operand}"),
                Op::Fxsave { operand, wide } => {
                    format!("fxsave{} {operand}", if *wide { "64" } else { "" })
                }
                Op::Fxrstor { operand, wide } => {
                    format!("fxrstor{} {operand}", if *wide { "64" } else { "" })
                }
            };
            format!("{lock}{body}")
        }
        Err(DecodeError::Truncated) => "truncated".to_string(),
        Err(DecodeError::Unsupported) => "unknown".to_string(),
    }
}
