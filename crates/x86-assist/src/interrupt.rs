//! GDT descriptors: `lsl`'s limit lookup, and `int n` and `iret` for the
//! one case we can do correctly: CPL 0 staying
//! at CPL 0, through GDT descriptors, in 64-bit mode or 32-bit protected
//! mode with a flat-enough (expand-up, 32-bit) stack.
//!
//! Everything outside that case is `Unsupported` rather than guessed:
//! privilege changes (they need the TSS), task gates and nested-task
//! returns, virtual-8086 mode, 16-bit gates and operand sizes, LDT
//! selectors, IST stacks, compatibility mode, real mode (KVM's emulator
//! handles real-mode `int`/`iret` itself). The checks follow the SDM's
//! INT n / IRET pseudo-code in its order, so the exceptions it raises on
//! bad tables are the architectural ones.

use crate::decode::OperandSize;
use crate::execute::{is_canonical, next_rip, Fault};
use crate::{rflags, CpuMode, CpuState, GuestMemoryAccess, Segment, EFER_LMA, RSP};

/// Descriptor type bits for code/data segments.
const TYPE_ACCESSED: u8 = 1;
const TYPE_WRITABLE: u8 = 2;
const TYPE_CONFORMING_OR_EXPAND_DOWN: u8 = 4;
const TYPE_CODE: u8 = 8;

const GATE_INTERRUPT_32: u8 = 0xe;
const GATE_TRAP_32: u8 = 0xf;

/// An 8-byte code or data segment descriptor from the GDT.
#[derive(Clone, Copy)]
struct Descriptor {
    raw: u64,
    /// Where it lives, to set its accessed bit.
    linear: u64,
}

impl Descriptor {
    fn seg_type(self) -> u8 {
        ((self.raw >> 40) & 0xf) as u8
    }
    fn s(self) -> bool {
        self.raw & (1 << 44) != 0
    }
    fn dpl(self) -> u8 {
        ((self.raw >> 45) & 3) as u8
    }
    fn present(self) -> bool {
        self.raw & (1 << 47) != 0
    }
    fn l(self) -> bool {
        self.raw & (1 << 53) != 0
    }
    fn db(self) -> bool {
        self.raw & (1 << 54) != 0
    }
    fn g(self) -> bool {
        self.raw & (1 << 55) != 0
    }
    fn is_code(self) -> bool {
        self.s() && self.seg_type() & TYPE_CODE != 0
    }
    fn conforming(self) -> bool {
        self.seg_type() & TYPE_CONFORMING_OR_EXPAND_DOWN != 0
    }
    fn limit(self) -> u32 {
        let raw = ((self.raw & 0xffff) | ((self.raw >> 32) & 0xf_0000)) as u32;
        if self.g() {
            (raw << 12) | 0xfff
        } else {
            raw
        }
    }
    fn base(self) -> u64 {
        ((self.raw >> 16) & 0xff_ffff) | (((self.raw >> 56) & 0xff) << 24)
    }
    fn to_segment(self, selector: u16) -> Segment {
        Segment {
            selector,
            base: self.base(),
            limit: self.limit(),
            seg_type: self.seg_type() | TYPE_ACCESSED,
            s: self.s(),
            dpl: self.dpl(),
            present: self.present(),
            avl: self.raw & (1 << 52) != 0,
            l: self.l(),
            db: self.db(),
            g: self.g(),
            unusable: false,
        }
    }
    /// The CPU sets the accessed bit of a descriptor it loads.
    fn mark_accessed(self, mem: &mut dyn GuestMemoryAccess) -> Result<(), Fault> {
        if self.seg_type() & TYPE_ACCESSED == 0 {
            let access_byte = ((self.raw >> 40) & 0xff) as u8 | TYPE_ACCESSED;
            mem.write(self.linear.wrapping_add(5), &[access_byte])?;
        }
        Ok(())
    }
}

/// Linear addresses of system tables wrap at 4 GiB outside long mode.
fn system_linear(cpu: &CpuState, address: u64) -> u64 {
    if cpu.efer & EFER_LMA != 0 {
        address
    } else {
        address & 0xffff_ffff
    }
}

/// Reads the GDT descriptor of a non-null `selector`.
fn read_descriptor(
    cpu: &CpuState,
    mem: &mut dyn GuestMemoryAccess,
    selector: u16,
) -> Result<Descriptor, Fault> {
    if selector & 4 != 0 {
        // LDT: would need LDTR's hidden part, which we are not given.
        return Err(Fault::Unsupported);
    }
    let offset = u64::from(selector & !7);
    if offset + 7 > u64::from(cpu.gdtr.limit) {
        return Err(Fault::gp(u32::from(selector & 0xfffc)));
    }
    let linear = system_linear(cpu, cpu.gdtr.base.wrapping_add(offset));
    let mut raw = [0u8; 8];
    mem.read(linear, &mut raw)?;
    Ok(Descriptor {
        raw: u64::from_le_bytes(raw),
        linear,
    })
}

/// System descriptor types with a limit that `lsl` reports: LDT and
/// available/busy TSS (16-bit ones only outside long mode).
const LSL_SYSTEM_TYPES_LONG: [u8; 3] = [0x2, 0x9, 0xb];
const LSL_SYSTEM_TYPES_LEGACY: [u8; 5] = [0x1, 0x2, 0x3, 0x9, 0xb];

/// The limit `lsl` loads for `selector`, or `None` where it clears ZF
/// instead: a null selector, one past the GDT limit, a system descriptor of
/// another type (in long mode the 16-byte descriptor's upper type field
/// must be 0), or a descriptor less privileged than CPL or RPL allows
/// (conforming code excepted). `lsl` does not check the present bit.
/// Reading the table may page-fault.
pub(crate) fn segment_limit(
    cpu: &CpuState,
    mem: &mut dyn GuestMemoryAccess,
    selector: u16,
) -> Result<Option<u32>, Fault> {
    if selector & 4 != 0 {
        return Err(Fault::Unsupported);
    }
    let offset = u64::from(selector & !7);
    if offset == 0 || offset + 7 > u64::from(cpu.gdtr.limit) {
        return Ok(None);
    }
    let descriptor = read_descriptor(cpu, mem, selector)?;
    let long = cpu.efer & EFER_LMA != 0;
    if !descriptor.s() {
        let types: &[u8] = if long {
            &LSL_SYSTEM_TYPES_LONG
        } else {
            &LSL_SYSTEM_TYPES_LEGACY
        };
        if !types.contains(&descriptor.seg_type()) {
            return Ok(None);
        }
        if long {
            if offset + 15 > u64::from(cpu.gdtr.limit) {
                return Ok(None);
            }
            let mut upper = [0u8; 8];
            mem.read(descriptor.linear.wrapping_add(8), &mut upper)?;
            if (u64::from_le_bytes(upper) >> 40) & 0x1f != 0 {
                return Ok(None);
            }
        }
    }
    let conforming_code = descriptor.is_code() && descriptor.conforming();
    let rpl = (selector & 3) as u8;
    if !conforming_code && (descriptor.dpl() < cpu.cpl || descriptor.dpl() < rpl) {
        return Ok(None);
    }
    Ok(Some(descriptor.limit()))
}

fn dword(bytes: &[u8], index: usize) -> u64 {
    let mut raw = [0u8; 4];
    if let Some(src) = bytes.get(index * 4..index * 4 + 4) {
        raw.copy_from_slice(src);
    }
    u64::from(u32::from_le_bytes(raw))
}

fn qword(bytes: &[u8], index: usize) -> u64 {
    let mut raw = [0u8; 8];
    if let Some(src) = bytes.get(index * 8..index * 8 + 8) {
        raw.copy_from_slice(src);
    }
    u64::from_le_bytes(raw)
}

/// The 32-bit stack (SS.B set, expand-up) of legacy protected mode: checks
/// that `size` bytes at ESP-relative `offset` are inside SS and returns
/// their linear address. Anything we cannot validate simply is refused.
fn legacy_stack_linear(cpu: &CpuState, esp: u32, size: u32) -> Result<u64, Fault> {
    let ss = &cpu.ss;
    if ss.unusable || !ss.db || ss.seg_type & TYPE_CONFORMING_OR_EXPAND_DOWN != 0 {
        return Err(Fault::Unsupported);
    }
    let last = u64::from(esp) + u64::from(size) - 1;
    if last > u64::from(ss.limit) {
        return Err(Fault::ss(0));
    }
    let linear = ss.base.wrapping_add(u64::from(esp)) & 0xffff_ffff;
    if linear + u64::from(size) - 1 > 0xffff_ffff {
        // The frame would wrap around 4 GiB: two separate accesses.
        return Err(Fault::Unsupported);
    }
    Ok(linear)
}

/// `int n` and `iret` recompute the mode from the CS they load, so they
/// refuse a state whose mode does not follow from its registers.
fn mode_is_consistent(cpu: &CpuState) -> bool {
    cpu.mode == CpuMode::from_registers(cpu.cr0, cpu.efer, &cpu.cs)
}

/// `int n` at CPL 0 through an interrupt or trap gate to a CPL-0 handler.
pub(crate) fn software_interrupt(
    cpu: &mut CpuState,
    mem: &mut dyn GuestMemoryAccess,
    n: u8,
    len: usize,
) -> Result<(), Fault> {
    let ia32e = cpu.efer & EFER_LMA != 0;
    if cpu.cpl != 0
        || cpu.rflags & rflags::VM != 0
        || !mode_is_consistent(cpu)
        || match cpu.mode {
            CpuMode::Real => true,
            CpuMode::Long64 => false,
            // Compatibility mode.
            CpuMode::Protected16 | CpuMode::Protected32 => ia32e,
        }
    {
        return Err(Fault::Unsupported);
    }
    // IDT error codes: index << 3, IDT bit; EXT clear for software ints.
    let idt_error = (u32::from(n) << 3) | 2;
    let entry_size: u64 = if ia32e { 16 } else { 8 };
    let offset = u64::from(n) * entry_size;
    if offset + entry_size - 1 > u64::from(cpu.idtr.limit) {
        return Err(Fault::gp(idt_error));
    }
    let mut entry = [0u8; 16];
    let entry = &mut entry[..entry_size as usize];
    mem.read(
        system_linear(cpu, cpu.idtr.base.wrapping_add(offset)),
        entry,
    )?;
    let low = qword(entry, 0);
    let high = if ia32e { qword(entry, 1) } else { 0 };
    let gate_type = ((low >> 40) & 0xf) as u8;
    let gate_is_system = low & (1 << 44) == 0;
    let gate_dpl = ((low >> 45) & 3) as u8;
    let gate_present = low & (1 << 47) != 0;
    let selector = ((low >> 16) & 0xffff) as u16;
    let ist = (low >> 32) & 7;
    let target = (low & 0xffff) | ((low >> 32) & 0xffff_0000) | ((high & 0xffff_ffff) << 32);
    match gate_type {
        GATE_INTERRUPT_32 | GATE_TRAP_32 if gate_is_system => {}
        // Task gates and 16-bit gates exist in legacy mode only.
        0x5..=0x7 if gate_is_system && !ia32e => return Err(Fault::Unsupported),
        _ => return Err(Fault::gp(idt_error)),
    }
    if gate_dpl < cpu.cpl {
        return Err(Fault::gp(idt_error));
    }
    if !gate_present {
        return Err(Fault::np(idt_error));
    }
    if selector & 0xfffc == 0 {
        return Err(Fault::gp(0));
    }
    let code = read_descriptor(cpu, mem, selector)?;
    let code_error = u32::from(selector & 0xfffc);
    // An IA-32e gate must lead to 64-bit code (L set, D clear).
    let wrong_code_size = ia32e && (!code.l() || code.db());
    if !code.is_code() || code.dpl() > cpu.cpl || wrong_code_size {
        return Err(Fault::gp(code_error));
    }
    if !code.present() {
        return Err(Fault::np(code_error));
    }
    if !code.conforming() && code.dpl() < cpu.cpl {
        // Inner privilege level: needs the TSS stack.
        return Err(Fault::Unsupported);
    }
    let new_cs = code.to_segment((selector & !3) | u16::from(cpu.cpl));
    let return_rip = next_rip(cpu, len);
    let mut new_flags = cpu.rflags & !(rflags::TF | rflags::NT | rflags::RF | rflags::VM);
    if gate_type == GATE_INTERRUPT_32 {
        new_flags &= !rflags::IF;
    }

    if ia32e {
        if ist != 0 {
            // A stack switch even at the same privilege level: needs the TSS.
            return Err(Fault::Unsupported);
        }
        if !is_canonical(cpu, target) {
            return Err(Fault::gp(0));
        }
        let rsp = cpu.gpr[RSP];
        let new_rsp = (rsp & !0xf).wrapping_sub(40);
        if !is_canonical(cpu, new_rsp) || !is_canonical(cpu, new_rsp.wrapping_add(39)) {
            return Err(Fault::ss(0));
        }
        let mut frame = [0u8; 40];
        let values = [
            return_rip,
            u64::from(cpu.cs.selector),
            cpu.rflags & !rflags::RF,
            rsp,
            u64::from(cpu.ss.selector),
        ];
        for (slot, value) in frame.chunks_exact_mut(8).zip(values) {
            slot.copy_from_slice(&value.to_le_bytes());
        }
        code.mark_accessed(mem)?;
        mem.write(new_rsp, &frame)?;
        cpu.gpr[RSP] = new_rsp;
        cpu.rip = target;
    } else {
        let target = target & 0xffff_ffff;
        if target > u64::from(new_cs.limit) {
            return Err(Fault::gp(0));
        }
        let esp = cpu.gpr[RSP] as u32;
        let new_esp = esp.wrapping_sub(12);
        let linear = legacy_stack_linear(cpu, new_esp, 12)?;
        let mut frame = [0u8; 12];
        let values = [
            return_rip as u32,
            u32::from(cpu.cs.selector),
            (cpu.rflags & !rflags::RF) as u32,
        ];
        for (slot, value) in frame.chunks_exact_mut(4).zip(values) {
            slot.copy_from_slice(&value.to_le_bytes());
        }
        code.mark_accessed(mem)?;
        mem.write(linear, &frame)?;
        cpu.gpr[RSP] = (cpu.gpr[RSP] & !0xffff_ffff) | u64::from(new_esp);
        cpu.rip = target;
        new_flags &= 0xffff_ffff;
    }
    cpu.rflags = new_flags;
    cpu.cs = new_cs;
    cpu.mode = CpuMode::from_registers(cpu.cr0, cpu.efer, &cpu.cs);
    Ok(())
}

/// RFLAGS bits IRET loads at CPL 0: CF PF AF ZF SF TF IF DF OF IOPL NT RF
/// AC VIF VIP ID. VM is left out: a return to virtual-8086 mode is refused
/// and in IA-32e mode VM stays clear.
const IRET_FLAGS: u64 = 0x003d_7fd5;

/// `iret` at CPL 0 returning to CPL 0.
pub(crate) fn iret(
    cpu: &mut CpuState,
    mem: &mut dyn GuestMemoryAccess,
    size: OperandSize,
) -> Result<(), Fault> {
    let ia32e = cpu.efer & EFER_LMA != 0;
    let long64 = cpu.mode == CpuMode::Long64;
    if cpu.cpl != 0
        || cpu.rflags & rflags::VM != 0
        || !mode_is_consistent(cpu)
        || cpu.mode == CpuMode::Real
        || (ia32e && !long64)
        || size == OperandSize::Word
    {
        return Err(Fault::Unsupported);
    }
    if cpu.rflags & rflags::NT != 0 {
        // A task return in legacy mode; #GP(0) in IA-32e mode.
        return Err(if ia32e {
            Fault::gp(0)
        } else {
            Fault::Unsupported
        });
    }

    // Pop the frame: RIP, CS, RFLAGS (and RSP, SS in 64-bit mode).
    let mut frame = [0u8; 40];
    let (new_rip, cs_selector, popped_flags, stack_after) = if long64 {
        let width: u64 = if size == OperandSize::Qword { 8 } else { 4 };
        let rsp = cpu.gpr[RSP];
        let frame = &mut frame[..(5 * width) as usize];
        if !is_canonical(cpu, rsp) || !is_canonical(cpu, rsp.wrapping_add(5 * width - 1)) {
            return Err(Fault::ss(0));
        }
        mem.read(rsp, frame)?;
        let pop = |index| {
            if width == 8 {
                qword(frame, index)
            } else {
                dword(frame, index)
            }
        };
        (pop(0), pop(1) as u16, pop(2), Some((pop(3), pop(4) as u16)))
    } else {
        let esp = cpu.gpr[RSP] as u32;
        let linear = legacy_stack_linear(cpu, esp, 12)?;
        let frame = &mut frame[..12];
        mem.read(linear, frame)?;
        (
            dword(frame, 0),
            dword(frame, 1) as u16,
            dword(frame, 2),
            None,
        )
    };
    if !ia32e && popped_flags & rflags::VM != 0 {
        return Err(Fault::Unsupported);
    }

    // The code segment to return to.
    if cs_selector & 0xfffc == 0 {
        return Err(Fault::gp(0));
    }
    let rpl = (cs_selector & 3) as u8;
    let code = read_descriptor(cpu, mem, cs_selector)?;
    let code_error = u32::from(cs_selector & 0xfffc);
    if !code.is_code()
        || rpl < cpu.cpl
        || (code.conforming() && code.dpl() > rpl)
        || (!code.conforming() && code.dpl() != rpl)
    {
        return Err(Fault::gp(code_error));
    }
    if !code.present() {
        return Err(Fault::np(code_error));
    }
    if rpl > cpu.cpl {
        // Return to an outer level: data segments and SS checks we leave
        // to a real CPU.
        return Err(Fault::Unsupported);
    }
    if ia32e && code.l() && code.db() {
        return Err(Fault::gp(code_error));
    }
    let target_64 = ia32e && code.l();
    let new_rip = if target_64 {
        if !is_canonical(cpu, new_rip) {
            return Err(Fault::gp(0));
        }
        new_rip
    } else {
        if new_rip > u64::from(code.limit()) {
            return Err(Fault::gp(0));
        }
        new_rip & 0xffff_ffff
    };
    let new_cs = code.to_segment(cs_selector);

    // The stack to return to.
    let (new_rsp, new_ss, ss_descriptor) = match stack_after {
        Some((popped_rsp, ss_selector)) => {
            if ss_selector & 0xfffc == 0 {
                if !target_64 || rpl == 3 {
                    return Err(Fault::gp(0));
                }
                // A null SS in 64-bit mode: written back as a usable flat
                // data segment whose DPL carries the CPL, which is what
                // KVM_SET_SREGS and the CPL derivation expect.
                let flat = Segment {
                    selector: ss_selector,
                    base: 0,
                    limit: 0xffff_ffff,
                    seg_type: TYPE_WRITABLE | TYPE_ACCESSED,
                    s: true,
                    dpl: rpl,
                    present: true,
                    avl: false,
                    l: false,
                    db: true,
                    g: true,
                    unusable: false,
                };
                (popped_rsp, flat, None)
            } else {
                let ss_error = u32::from(ss_selector & 0xfffc);
                if (ss_selector & 3) as u8 != rpl {
                    return Err(Fault::gp(ss_error));
                }
                let data = read_descriptor(cpu, mem, ss_selector)?;
                if !data.s()
                    || data.seg_type() & TYPE_CODE != 0
                    || data.seg_type() & TYPE_WRITABLE == 0
                    || data.dpl() != rpl
                {
                    return Err(Fault::gp(ss_error));
                }
                if !data.present() {
                    return Err(Fault::ss(ss_error));
                }
                (popped_rsp, data.to_segment(ss_selector), Some(data))
            }
        }
        None => {
            let esp = (cpu.gpr[RSP] as u32).wrapping_add(12);
            ((cpu.gpr[RSP] & !0xffff_ffff) | u64::from(esp), cpu.ss, None)
        }
    };

    code.mark_accessed(mem)?;
    if let Some(data) = ss_descriptor {
        data.mark_accessed(mem)?;
    }
    let mut flags = (popped_flags & IRET_FLAGS) | rflags::FIXED;
    if !ia32e {
        flags &= 0xffff_ffff;
    }
    cpu.rip = new_rip;
    cpu.cs = new_cs;
    cpu.ss = new_ss;
    cpu.gpr[RSP] = new_rsp;
    cpu.rflags = flags;
    cpu.mode = CpuMode::from_registers(cpu.cr0, cpu.efer, &cpu.cs);
    Ok(())
}
