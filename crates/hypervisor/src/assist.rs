//! Emulation assist on hosts whose KVM cannot emulate every ring-0
//! instruction (PVM): when KVM gives up on an instruction, rhyve completes
//! it with `rhyve-x86-assist` and re-enters the guest, instead of ending
//! the run. This file is only the KVM side: the vCPU state in and out,
//! guest memory through the guest's page tables (KVM_TRANSLATE), and
//! exceptions injected with KVM_SET_VCPU_EVENTS.

use kvm_bindings::{kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use rhyve_x86_assist::{
    assist, CpuMode, CpuState, DescriptorTable, FpuState, GuestMemoryAccess, InstructionKind,
    Outcome, PageFault, Segment,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::{HvError, Result};

const PAGE: u64 = 4096;
const PF_PRESENT: u32 = 1;
const PF_WRITE: u32 = 2;
const PF_USER: u32 = 4;

fn segment_in(s: &kvm_segment) -> Segment {
    Segment {
        selector: s.selector,
        base: s.base,
        limit: s.limit,
        seg_type: s.type_,
        s: s.s != 0,
        dpl: s.dpl,
        present: s.present != 0,
        avl: s.avl != 0,
        l: s.l != 0,
        db: s.db != 0,
        g: s.g != 0,
        unusable: s.unusable != 0,
    }
}

fn segment_out(s: &Segment, k: &mut kvm_segment) {
    k.selector = s.selector;
    k.base = s.base;
    k.limit = s.limit;
    k.type_ = s.seg_type;
    k.s = u8::from(s.s);
    k.dpl = s.dpl;
    k.present = u8::from(s.present);
    k.avl = u8::from(s.avl);
    k.l = u8::from(s.l);
    k.db = u8::from(s.db);
    k.g = u8::from(s.g);
    k.unusable = u8::from(s.unusable);
}

fn fpu_in(f: &kvm_bindings::kvm_fpu) -> FpuState {
    FpuState {
        fpr: f.fpr,
        fcw: f.fcw,
        fsw: f.fsw,
        ftwx: f.ftwx,
        last_opcode: f.last_opcode,
        last_ip: f.last_ip,
        last_dp: f.last_dp,
        xmm: f.xmm,
        mxcsr: f.mxcsr,
    }
}

fn fpu_out(s: &FpuState) -> kvm_bindings::kvm_fpu {
    kvm_bindings::kvm_fpu {
        fpr: s.fpr,
        fcw: s.fcw,
        fsw: s.fsw,
        ftwx: s.ftwx,
        last_opcode: s.last_opcode,
        last_ip: s.last_ip,
        last_dp: s.last_dp,
        xmm: s.xmm,
        mxcsr: s.mxcsr,
        ..Default::default()
    }
}

fn cpu_state(regs: &kvm_bindings::kvm_regs, sregs: &kvm_sregs, fpu: FpuState) -> CpuState {
    let cs = segment_in(&sregs.cs);
    CpuState {
        fpu,
        gpr: [
            regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi,
            regs.r8, regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
        ],
        rip: regs.rip,
        rflags: regs.rflags,
        cr0: sregs.cr0,
        cr3: sregs.cr3,
        cr4: sregs.cr4,
        efer: sregs.efer,
        cpl: sregs.ss.dpl & 3,
        mode: CpuMode::from_registers(sregs.cr0, sregs.efer, &cs),
        cs,
        ss: segment_in(&sregs.ss),
        ds: segment_in(&sregs.ds),
        es: segment_in(&sregs.es),
        fs: segment_in(&sregs.fs),
        gs: segment_in(&sregs.gs),
        gdtr: DescriptorTable {
            base: sregs.gdt.base,
            limit: sregs.gdt.limit,
        },
        idtr: DescriptorTable {
            base: sregs.idt.base,
            limit: sregs.idt.limit,
        },
    }
}

/// Guest linear memory: KVM walks the guest's page tables for us.
struct LinearMemory<'a> {
    vcpu: &'a VcpuFd,
    memory: &'a GuestMemoryMmap,
    paging: bool,
    user: bool,
}

impl LinearMemory<'_> {
    /// The guest physical address of each page `[linear, linear+len)`
    /// touches, checked for `write`, before any byte moves.
    fn translate(
        &self,
        linear: u64,
        len: usize,
        write: bool,
    ) -> std::result::Result<Vec<(u64, usize)>, PageFault> {
        let mut pieces = Vec::new();
        let mut addr = linear;
        let mut left = len;
        while left > 0 {
            let in_page = ((PAGE - (addr % PAGE)) as usize).min(left);
            let user = if self.user { PF_USER } else { 0 };
            let fault = |present: u32| PageFault {
                address: addr,
                error_code: present | user | if write { PF_WRITE } else { 0 },
            };
            let phys = if self.paging {
                let t = self.vcpu.translate_gva(addr).map_err(|_| fault(0))?;
                if t.valid == 0 {
                    return Err(fault(0));
                }
                if (write && t.writeable == 0) || (self.user && t.usermode == 0) {
                    return Err(fault(PF_PRESENT));
                }
                t.physical_address
            } else {
                addr & 0xFFFF_FFFF
            };
            if self.memory.find_region(GuestAddress(phys)).is_none() {
                return Err(fault(0));
            }
            pieces.push((phys, in_page));
            addr = addr.wrapping_add(in_page as u64);
            left -= in_page;
        }
        Ok(pieces)
    }

    fn host_pointer(&self, phys: u64) -> Option<*mut u8> {
        let region = self.memory.find_region(GuestAddress(phys))?;
        let offset = phys - region.start_addr().0;
        (offset + 16 <= region.len()).then(|| {
            // SAFETY: offset + 16 lies inside the region's live mapping.
            unsafe { region.as_ptr().add(offset as usize) }
        })
    }
}

impl GuestMemoryAccess for LinearMemory<'_> {
    fn read(&mut self, linear: u64, buf: &mut [u8]) -> std::result::Result<(), PageFault> {
        let pieces = self.translate(linear, buf.len(), false)?;
        let mut done = 0;
        for (phys, len) in pieces {
            if self
                .memory
                .read_slice(&mut buf[done..done + len], GuestAddress(phys))
                .is_err()
            {
                return Err(PageFault {
                    address: linear + done as u64,
                    error_code: 0,
                });
            }
            done += len;
        }
        Ok(())
    }

    fn write(&mut self, linear: u64, buf: &[u8]) -> std::result::Result<(), PageFault> {
        let pieces = self.translate(linear, buf.len(), true)?;
        let mut done = 0;
        for (phys, len) in pieces {
            if self
                .memory
                .write_slice(&buf[done..done + len], GuestAddress(phys))
                .is_err()
            {
                return Err(PageFault {
                    address: linear + done as u64,
                    error_code: PF_WRITE,
                });
            }
            done += len;
        }
        Ok(())
    }

    /// A real `lock cmpxchg16b` on the guest page, so other vCPUs running
    /// meanwhile see it happen atomically.
    fn compare_exchange_16(
        &mut self,
        linear: u64,
        expected: u128,
        new: u128,
    ) -> std::result::Result<u128, PageFault> {
        let pieces = self.translate(linear, 16, true)?;
        let Some(ptr) = pieces
            .first()
            .and_then(|(phys, _)| self.host_pointer(*phys))
            .filter(|_| pieces.len() == 1)
        else {
            return Err(PageFault {
                address: linear,
                error_code: PF_WRITE,
            });
        };
        let (mut lo, mut hi) = (expected as u64, (expected >> 64) as u64);
        // SAFETY: `ptr` points at 16 bytes of mapped guest memory, 16-byte
        // aligned because `linear` is (the decoder checked) and pages are.
        unsafe {
            std::arch::asm!(
                "xchg rbx, {new_lo}",
                "lock cmpxchg16b [{ptr}]",
                "xchg rbx, {new_lo}",
                ptr = in(reg) ptr,
                new_lo = inout(reg) new as u64 => _,
                in("rcx") (new >> 64) as u64,
                inout("rax") lo,
                inout("rdx") hi,
            );
        }
        Ok(u128::from(lo) | (u128::from(hi) << 64))
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HvError {
    move |source| HvError::Kvm { what, source }
}

/// Complete the instruction KVM gave up on. `Ok(Some(kind))` when the
/// guest can go on, `Ok(None)` when the instruction is not one we handle.
pub fn complete(
    vcpu: &VcpuFd,
    memory: &GuestMemoryMmap,
    bytes: &[u8],
) -> Result<Option<InstructionKind>> {
    let mut regs = vcpu.get_regs().map_err(kvm_err("reading regs"))?;
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("reading sregs"))?;
    // clac/stac (tens of thousands per boot) never touch the FPU: skip
    // the FPU round trip for them.
    let needs_fpu = !matches!(bytes, [0x0f, 0x01, 0xca | 0xcb, ..]);
    let fpu = if needs_fpu {
        fpu_in(&vcpu.get_fpu().map_err(kvm_err("reading the FPU"))?)
    } else {
        FpuState::default()
    };
    let mut cpu = cpu_state(&regs, &sregs, fpu);
    let before = cpu.clone();
    let mut mem = LinearMemory {
        vcpu,
        memory,
        paging: sregs.cr0 & (1 << 31) != 0,
        user: cpu.cpl == 3,
    };
    match assist(bytes, &mut cpu, &mut mem) {
        Outcome::Unsupported => Ok(None),
        Outcome::Completed { kind } => {
            let g = &cpu.gpr;
            (
                regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi,
            ) = (g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]);
            (
                regs.r8, regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
            ) = (g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]);
            regs.rip = cpu.rip;
            regs.rflags = cpu.rflags;
            vcpu.set_regs(&regs).map_err(kvm_err("writing regs"))?;
            let segments_changed = (cpu.cs, cpu.ss, cpu.ds, cpu.es, cpu.fs, cpu.gs)
                != (
                    before.cs, before.ss, before.ds, before.es, before.fs, before.gs,
                );
            if segments_changed {
                for (s, k) in [
                    (&cpu.cs, &mut sregs.cs),
                    (&cpu.ss, &mut sregs.ss),
                    (&cpu.ds, &mut sregs.ds),
                    (&cpu.es, &mut sregs.es),
                    (&cpu.fs, &mut sregs.fs),
                    (&cpu.gs, &mut sregs.gs),
                ] {
                    segment_out(s, k);
                }
                vcpu.set_sregs(&sregs).map_err(kvm_err("writing sregs"))?;
            }
            if needs_fpu && cpu.fpu != before.fpu {
                vcpu.set_fpu(&fpu_out(&cpu.fpu))
                    .map_err(kvm_err("writing the FPU"))?;
            }
            if kind == InstructionKind::Iret {
                // IRET ends NMI blocking, as on hardware.
                let mut events = vcpu.get_vcpu_events().map_err(kvm_err("reading events"))?;
                if events.nmi.masked != 0 {
                    events.nmi.masked = 0;
                    events.flags = 0;
                    vcpu.set_vcpu_events(&events)
                        .map_err(kvm_err("writing events"))?;
                }
            }
            Ok(Some(kind))
        }
        Outcome::Exception {
            kind,
            vector,
            error_code,
            cr2,
            rip,
        } => {
            regs.rip = rip;
            vcpu.set_regs(&regs).map_err(kvm_err("writing regs"))?;
            if let Some(cr2) = cr2 {
                sregs.cr2 = cr2;
                vcpu.set_sregs(&sregs).map_err(kvm_err("writing sregs"))?;
            }
            let mut events = vcpu.get_vcpu_events().map_err(kvm_err("reading events"))?;
            events.exception.injected = 1;
            events.exception.pending = 0;
            events.exception.nr = vector;
            events.exception.has_error_code = u8::from(error_code.is_some());
            events.exception.error_code = error_code.unwrap_or(0);
            events.flags = 0;
            vcpu.set_vcpu_events(&events)
                .map_err(kvm_err("injecting an exception"))?;
            Ok(Some(kind))
        }
    }
}
