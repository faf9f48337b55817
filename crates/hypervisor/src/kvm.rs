//! The KVM implementation of [`Vm`] and [`Vcpu`].
//!
//! KVM keeps the LAPIC, IOAPIC, PIC and PIT in the kernel (bhyve's vmm.ko
//! does the same); everything else exits to user space. Guest memory follows
//! bhyve's layout: RAM below 3 GiB, the rest from 4 GiB.

use std::sync::Arc;

use kvm_bindings::{
    kvm_enable_cap, kvm_msi, kvm_msr_entry, kvm_pit_config, kvm_regs, kvm_sregs,
    kvm_userspace_memory_region, CpuId, Msrs, KVM_CAP_X86_USER_SPACE_MSR, KVM_MAX_CPUID_ENTRIES,
    KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_UNINITIALIZED,
    KVM_MSR_EXIT_REASON_UNKNOWN, KVM_PIT_SPEAKER_DUMMY, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use rhyve_platform::irq::{InterruptController, InterruptLine, MsiSender};
use rhyve_platform::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR, LAPIC_BASE};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::cpuid::{guest_cpuid, Topology};
use crate::{EmulationFailure, EntryRegs, HvError, Result, VcpuExit, VcpuState, VmSpec, VmState};

mod state;
pub use state::{KvmVcpuState, KvmVmState};

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HvError {
    move |source| HvError::Kvm { what, source }
}

/// A boot ROM ends here (the reset vector is its last 16 bytes).
const ROM_END: u64 = 1 << 32;

/// A device's memory shown to the guest through a KVM memory slot of its own.
struct KvmMemoryWindow {
    vm: Arc<VmFd>,
    slot: u32,
    /// Held so the host pages outlive the slot that points at them.
    pages: Arc<vm_memory::MmapRegion>,
    base: Option<u64>,
}

impl KvmMemoryWindow {
    fn set_region(&self, base: u64, size: u64) -> std::io::Result<()> {
        let region = kvm_userspace_memory_region {
            slot: self.slot,
            guest_phys_addr: base,
            memory_size: size,
            userspace_addr: self.pages.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the pages are owned by `self.pages`, which lives as long
        // as the slot: the slot is emptied (size 0) before it is dropped.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

impl rhyve_platform::window::MemoryWindow for KvmMemoryWindow {
    fn place(&mut self, base: Option<u64>) -> std::io::Result<()> {
        if base == self.base {
            return Ok(());
        }
        // KVM moves a slot only by deleting it and creating it again.
        if let Some(old) = self.base.take() {
            self.set_region(old, 0)?;
        }
        if let Some(new) = base {
            self.set_region(new, self.pages.size() as u64)?;
            self.base = Some(new);
        }
        Ok(())
    }
}

impl Drop for KvmMemoryWindow {
    fn drop(&mut self) {
        if let Some(old) = self.base.take() {
            if let Err(e) = self.set_region(old, 0) {
                // The guest may still reach the pages: never free them.
                tracing::warn!(slot = self.slot, error = %e, "cannot unmap a device memory window");
                std::mem::forget(self.pages.clone());
            }
        }
    }
}

/// A KVM virtual machine.
pub struct KvmVm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    notifiers: Arc<KvmNotifiers>,
    memory: GuestMemoryMmap,
    spec: VmSpec,
    /// The next free KVM memory slot (those below hold guest memory).
    next_slot: std::sync::atomic::AtomicU32,
    /// The MSRs a snapshot carries for each vCPU (KVM_GET_MSR_INDEX_LIST).
    msr_indices: Arc<Vec<u32>>,
}

/// Guest RAM: anonymous memory, or a snapshot's memory file mapped
/// privately (pages are read in as the guest touches them, and its writes
/// never reach the file). The ROM is always anonymous: it is loaded again.
fn map_guest_memory(
    ranges: &[(GuestAddress, usize)],
    rom_base: Option<u64>,
    image: Option<&crate::MemoryImage>,
) -> Result<GuestMemoryMmap> {
    let Some(image) = image else {
        return GuestMemoryMmap::<()>::from_ranges(ranges)
            .map_err(|e| HvError::Memory(format!("cannot allocate guest memory: {e}")));
    };
    let mut offset = 0u64;
    let mut regions = Vec::with_capacity(ranges.len());
    for &(addr, size) in ranges {
        let mut builder = vm_memory::mmap::MmapRegionBuilder::new(size)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE);
        if Some(addr.raw_value()) != rom_base {
            builder = builder
                .with_file_offset(vm_memory::FileOffset::from_arc(image.file.clone(), offset))
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE);
            offset += size as u64;
        }
        let mapping = builder
            .build()
            .map_err(|e| HvError::Memory(format!("cannot map the snapshot's memory: {e}")))?;
        regions.push(
            vm_memory::GuestRegionMmap::new(mapping, addr)
                .ok_or_else(|| HvError::Memory("guest memory region overflows".into()))?,
        );
    }
    GuestMemoryMmap::from_regions(regions)
        .map_err(|e| HvError::Memory(format!("cannot map the snapshot's memory: {e}")))
}

impl KvmVm {
    pub fn new(spec: VmSpec) -> Result<Self> {
        let kvm =
            Kvm::new().map_err(|e| HvError::NoKvm(std::io::Error::from_raw_os_error(e.errno())))?;
        // bhyve's limit is hw.vmm.maxcpu; KVM's is KVM_CAP_MAX_VCPUS.
        let max_vcpus = kvm.get_max_vcpus();
        if spec.cpus as usize > max_vcpus {
            return Err(HvError::Unsupported(format!(
                "{} vCPUs requested but only {max_vcpus} available",
                spec.cpus
            )));
        }
        let fd = kvm.create_vm().map_err(kvm_err("creating the VM"))?;
        let rom_base = ROM_END - spec.rom_size;
        let mut regions = spec.memory.ram_regions();
        if spec.rom_size > 0 {
            if !kvm.check_extension(kvm_ioctls::Cap::ReadonlyMem) {
                return Err(HvError::Unsupported(
                    "this KVM cannot map a boot ROM read-only (no KVM_CAP_READONLY_MEM)".into(),
                ));
            }
            regions.push((rom_base, spec.rom_size));
            regions.sort_unstable();
        }
        let ranges: Vec<(GuestAddress, usize)> = regions
            .into_iter()
            .map(|(a, s)| (GuestAddress(a), s as usize))
            .collect();
        let memory = map_guest_memory(
            &ranges,
            (spec.rom_size > 0).then_some(rom_base),
            spec.memory_image.as_ref(),
        )?;
        for (slot, region) in memory.iter().enumerate() {
            let host = region.as_ptr();
            let len = region.len() as usize;
            // SAFETY: `host..host+len` is a live anonymous mapping owned by `memory`.
            unsafe {
                if spec.wired && libc::mlock(host as *const libc::c_void, len) != 0 {
                    return Err(HvError::Memory(format!(
                        "cannot wire guest memory (-S): {}",
                        std::io::Error::last_os_error()
                    )));
                }
                if !spec.guest_in_core {
                    libc::madvise(host as *mut libc::c_void, len, libc::MADV_DONTDUMP);
                }
            }
            let mr = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
                // Guest writes to the ROM exit as MMIO writes, which nothing claims.
                flags: if spec.rom_size > 0 && region.start_addr().raw_value() == rom_base {
                    kvm_bindings::KVM_MEM_READONLY
                } else {
                    0
                },
            };
            // SAFETY: the region outlives the VM (both are owned by `self`).
            unsafe { fd.set_user_memory_region(mr) }.map_err(kvm_err("mapping guest memory"))?;
        }
        // The irqchip comes after the memory slots: on some hosts a memslot
        // change with an irqchip present waits for an SRCU grace period.
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(kvm_err("placing the identity map page"))?;
        fd.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(kvm_err("placing the TSS"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("creating the in-kernel irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(kvm_err("creating the in-kernel PIT"))?;
        if !spec.strict_msr {
            // `-w`: unknown MSRs come to user space, which reads 0 and drops writes.
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_X86_USER_SPACE_MSR,
                ..Default::default()
            };
            cap.args[0] = KVM_MSR_EXIT_REASON_UNKNOWN as u64;
            fd.enable_cap(&cap)
                .map_err(kvm_err("enabling user-space MSR handling for -w"))?;
        }
        let fd = Arc::new(fd);
        let msr_indices = Arc::new(
            kvm.get_msr_index_list()
                .map_err(kvm_err("listing MSRs"))?
                .as_slice()
                .to_vec(),
        );
        Ok(Self {
            msr_indices,
            kvm,
            notifiers: Arc::new(KvmNotifiers {
                vm: fd.clone(),
                msi_routes: Default::default(),
            }),
            fd,
            next_slot: std::sync::atomic::AtomicU32::new(memory.num_regions() as u32),
            memory,
            spec,
        })
    }
}

impl crate::Vm for KvmVm {
    fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    fn memory_window(
        &self,
        pages: Arc<vm_memory::MmapRegion>,
    ) -> Result<Box<dyn rhyve_platform::window::MemoryWindow>> {
        let slot = self
            .next_slot
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Box::new(KvmMemoryWindow {
            vm: self.fd.clone(),
            slot,
            pages,
            base: None,
        }))
    }

    fn interrupts(&self) -> Arc<dyn InterruptController> {
        Arc::new(KvmInterrupts {
            vm: self.fd.clone(),
        })
    }

    fn notifiers(&self) -> Arc<dyn rhyve_platform::notify::GuestNotifiers> {
        self.notifiers.clone()
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn crate::Vcpu>> {
        let fd = self
            .fd
            .create_vcpu(id as u64)
            .map_err(kvm_err("creating a vCPU"))?;
        let supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("reading supported CPUID"))?;
        let topo = Topology {
            sockets: self.spec.sockets,
            cores: self.spec.cores,
            threads: self.spec.threads,
        };
        let entries = guest_cpuid(supported.as_slice(), id, topo, self.spec.x2apic);
        let cpuid = CpuId::from_entries(&entries)
            .map_err(|e| HvError::Unsupported(format!("CPUID table: {e:?}")))?;
        fd.set_cpuid2(&cpuid).map_err(kvm_err("setting CPUID"))?;
        if self.spec.x2apic {
            const IA32_APIC_BASE: u32 = 0x1B;
            let base = LAPIC_BASE | (1 << 11) | (1 << 10) | if id == 0 { 1 << 8 } else { 0 };
            let msrs = Msrs::from_entries(&[kvm_msr_entry {
                index: IA32_APIC_BASE,
                data: base,
                ..Default::default()
            }])
            .map_err(|e| HvError::Unsupported(format!("MSR list: {e:?}")))?;
            fd.set_msrs(&msrs)
                .map_err(kvm_err("switching the LAPIC to x2APIC mode"))?;
        }
        Ok(Box::new(KvmVcpu {
            fd,
            id,
            memory: self.memory.clone(),
            assist: self.spec.emulation_assist,
            msr_indices: self.msr_indices.clone(),
        }))
    }

    fn save_state(&self) -> Result<VmState> {
        Ok(VmState::Kvm(Box::new(self.save()?)))
    }

    fn restore_state(&self, state: &VmState) -> Result<()> {
        match state {
            VmState::Kvm(s) => self.restore(s),
        }
    }
}

/// ISA IRQs and IOAPIC pins through `KVM_IRQ_LINE`.
struct KvmInterrupts {
    vm: Arc<VmFd>,
}

struct KvmLine {
    vm: Arc<VmFd>,
    gsi: u32,
}

impl InterruptLine for KvmLine {
    fn set_level(&self, asserted: bool) {
        if let Err(e) = self.vm.set_irq_line(self.gsi, asserted) {
            tracing::warn!("KVM_IRQ_LINE gsi {} failed: {e}", self.gsi);
        }
    }
}

struct KvmMsi {
    vm: Arc<VmFd>,
}

impl MsiSender for KvmMsi {
    fn send(&self, address: u64, data: u32) {
        let msi = kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        if let Err(e) = self.vm.signal_msi(msi) {
            tracing::warn!("KVM_SIGNAL_MSI {address:#x}/{data:#x} failed: {e}");
        }
    }
}

impl InterruptController for KvmInterrupts {
    fn line(&self, gsi: u32) -> Arc<dyn InterruptLine> {
        Arc::new(KvmLine {
            vm: self.vm.clone(),
            gsi,
        })
    }

    fn msi(&self) -> Arc<dyn MsiSender> {
        Arc::new(KvmMsi {
            vm: self.vm.clone(),
        })
    }
}

/// A KVM vCPU.
pub struct KvmVcpu {
    fd: VcpuFd,
    id: u32,
    memory: GuestMemoryMmap,
    assist: bool,
    msr_indices: Arc<Vec<u32>>,
}

fn flat_segment(selector: u16, code: bool, long_mode: bool) -> kvm_bindings::kvm_segment {
    kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector,
        type_: if code { 0xB } else { 0x3 },
        present: 1,
        dpl: 0,
        db: u8::from(!(code && long_mode)),
        s: 1,
        l: u8::from(code && long_mode),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

impl KvmVcpu {
    /// KVM_EXIT_INTERNAL_ERROR's suberror.
    fn internal_suberror(&mut self) -> u32 {
        // SAFETY: only called after KVM_EXIT_INTERNAL_ERROR, when the
        // union holds `internal`.
        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror }
    }

    /// The instruction bytes KVM reported with an emulation failure, if any.
    fn kernel_instruction_bytes(&mut self) -> Vec<u8> {
        let run = self.fd.get_kvm_run();
        // SAFETY: only called after KVM_EXIT_INTERNAL_ERROR, when the union
        // holds `emulation_failure` (its flags say whether bytes follow).
        unsafe {
            let ef = run.__bindgen_anon_1.emulation_failure;
            const FLAG_INSTRUCTION_BYTES: u64 = 1;
            if ef.suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION
                && ef.ndata >= 3
                && ef.flags & FLAG_INSTRUCTION_BYTES != 0
            {
                let b = ef.__bindgen_anon_1.__bindgen_anon_1;
                b.insn_bytes[..(b.insn_size as usize).min(15)].to_vec()
            } else {
                Vec::new()
            }
        }
    }

    /// Linear address of CS:RIP, for reading the bytes of a failed instruction.
    fn code_address(&self) -> Option<(u64, u64)> {
        let regs: kvm_regs = self.fd.get_regs().ok()?;
        let sregs: kvm_sregs = self.fd.get_sregs().ok()?;
        let linear = if sregs.cs.l == 1 {
            regs.rip
        } else {
            sregs.cs.base.wrapping_add(regs.rip)
        };
        let physical = if sregs.cr0 & (1 << 31) != 0 {
            let t = self.fd.translate_gva(linear).ok()?;
            if t.valid == 0 {
                return Some((regs.rip, u64::MAX));
            }
            t.physical_address
        } else {
            linear
        };
        Some((regs.rip, physical))
    }
}

impl crate::Vcpu for KvmVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn set_entry(&mut self, e: &EntryRegs) -> Result<()> {
        let mut sregs = self.fd.get_sregs().map_err(kvm_err("reading sregs"))?;
        let code = flat_segment(e.code_selector, true, e.long_mode);
        let data = flat_segment(e.data_selector, false, e.long_mode);
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.gdt.base = e.gdt_base;
        sregs.gdt.limit = e.gdt_limit;
        sregs.cr0 = e.cr0;
        sregs.cr3 = e.cr3;
        sregs.cr4 = e.cr4;
        sregs.efer = e.efer;
        self.fd
            .set_sregs(&sregs)
            .map_err(kvm_err("writing sregs"))?;
        let regs = kvm_regs {
            rip: e.rip,
            rsi: e.rsi,
            rbx: e.rbx,
            rsp: e.rsp,
            rflags: 2,
            ..Default::default()
        };
        self.fd.set_regs(&regs).map_err(kvm_err("writing regs"))
    }

    fn run(&mut self) -> Result<VcpuExit<'_>> {
        use kvm_ioctls::VcpuExit as K;
        let run: *const kvm_bindings::kvm_run = self.fd.get_kvm_run();
        // SAFETY: read only after a KVM_EXIT_IO, when the union holds `io`;
        // `run` points into the vCPU's kvm_run mapping, alive as long as `fd`.
        let io_size = || unsafe { usize::from((*run).__bindgen_anon_1.io.size) };
        match self.fd.run() {
            Ok(K::IoIn(port, data)) => Ok(VcpuExit::IoIn {
                port,
                size: io_size(),
                data,
            }),
            Ok(K::IoOut(port, data)) => Ok(VcpuExit::IoOut {
                port,
                size: io_size(),
                data,
            }),
            Ok(K::MmioRead(addr, data)) => Ok(VcpuExit::MmioRead { addr, data }),
            Ok(K::MmioWrite(addr, data)) => Ok(VcpuExit::MmioWrite { addr, data }),
            Ok(K::Shutdown) => Ok(VcpuExit::Shutdown),
            Ok(K::Intr) | Ok(K::IrqWindowOpen) => Ok(VcpuExit::Interrupted),
            Ok(K::X86Rdmsr(msr)) => {
                // Only reached with `-w`: unknown MSRs read as zero.
                tracing::debug!(
                    "vcpu {}: rdmsr {:#x} of an unknown MSR reads 0",
                    self.id,
                    msr.index
                );
                *msr.data = 0;
                *msr.error = 0;
                Ok(VcpuExit::Interrupted)
            }
            Ok(K::X86Wrmsr(msr)) => {
                tracing::debug!(
                    "vcpu {}: wrmsr {:#x} of an unknown MSR ignored",
                    self.id,
                    msr.index
                );
                *msr.error = 0;
                Ok(VcpuExit::Interrupted)
            }
            Ok(K::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_RESET => Ok(VcpuExit::SystemReset),
                KVM_SYSTEM_EVENT_SHUTDOWN => Ok(VcpuExit::SystemPowerOff),
                other => Ok(VcpuExit::Failed(format!("unexpected system event {other}"))),
            },
            Ok(K::InternalError) => Ok(VcpuExit::EmulationFailure),
            Ok(K::FailEntry(reason, cpu)) => Ok(VcpuExit::Failed(format!(
                "VM entry failed on host CPU {cpu}: hardware reason {reason:#x}"
            ))),
            Ok(other) => Ok(VcpuExit::Failed(format!("unexpected exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Ok(VcpuExit::Interrupted)
            }
            Err(e) => Err(HvError::Kvm {
                what: "running the vCPU",
                source: e,
            }),
        }
    }

    fn halted_for_good(&mut self) -> Result<bool> {
        let mp = self
            .fd
            .get_mp_state()
            .map_err(kvm_err("reading mp state"))?;
        if mp.mp_state != KVM_MP_STATE_HALTED {
            return Ok(false);
        }
        let regs = self.fd.get_regs().map_err(kvm_err("reading regs"))?;
        const RFLAGS_IF: u64 = 1 << 9;
        Ok(regs.rflags & RFLAGS_IF == 0)
    }

    fn started(&mut self) -> Result<bool> {
        let mp = self
            .fd
            .get_mp_state()
            .map_err(kvm_err("reading mp state"))?;
        Ok(mp.mp_state != KVM_MP_STATE_UNINITIALIZED && mp.mp_state != KVM_MP_STATE_INIT_RECEIVED)
    }

    fn rip(&mut self) -> Result<u64> {
        Ok(self.fd.get_regs().map_err(kvm_err("reading regs"))?.rip)
    }

    fn registers(&mut self) -> Result<Vec<(&'static str, u64)>> {
        let r = self.fd.get_regs().map_err(kvm_err("reading regs"))?;
        let s = self.fd.get_sregs().map_err(kvm_err("reading sregs"))?;
        Ok(vec![
            ("rax", r.rax),
            ("rbx", r.rbx),
            ("rcx", r.rcx),
            ("rdx", r.rdx),
            ("rsi", r.rsi),
            ("rdi", r.rdi),
            ("rbp", r.rbp),
            ("rsp", r.rsp),
            ("r8", r.r8),
            ("r9", r.r9),
            ("r10", r.r10),
            ("r11", r.r11),
            ("r12", r.r12),
            ("r13", r.r13),
            ("r14", r.r14),
            ("r15", r.r15),
            ("rip", r.rip),
            ("rflags", r.rflags),
            ("cr0", s.cr0),
            ("cr2", s.cr2),
            ("cr3", s.cr3),
            ("cr4", s.cr4),
            ("efer", s.efer),
            ("cs", u64::from(s.cs.selector)),
            ("ds", u64::from(s.ds.selector)),
            ("es", u64::from(s.es.selector)),
            ("fs", u64::from(s.fs.selector)),
            ("gs", u64::from(s.gs.selector)),
            ("ss", u64::from(s.ss.selector)),
            ("tr", u64::from(s.tr.selector)),
            ("ldtr", u64::from(s.ldt.selector)),
        ])
    }

    fn inject_nmi(&mut self) -> Result<()> {
        self.fd.nmi().map_err(kvm_err("injecting an NMI"))
    }

    fn save_state(&mut self) -> Result<VcpuState> {
        let indices = self.msr_indices.clone();
        Ok(VcpuState::Kvm(Box::new(self.save(&indices)?)))
    }

    fn restore_state(&mut self, state: &VcpuState) -> Result<()> {
        match state {
            VcpuState::Kvm(s) => self.restore(s),
        }
    }

    fn assist_emulation(&mut self) -> Result<Option<&'static str>> {
        if !self.assist {
            return Ok(None);
        }
        let bytes = self.kernel_instruction_bytes();
        Ok(crate::assist::complete(&self.fd, &self.memory, &bytes)?.map(|k| k.name()))
    }

    fn emulation_failure(&mut self) -> EmulationFailure {
        let kernel_bytes = self.kernel_instruction_bytes();
        let suberror = self.internal_suberror();
        let detail = match suberror {
            kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => {
                "KVM's instruction emulator gave up".to_string()
            }
            n => format!("KVM internal error, suberror {n}"),
        };
        let (rip, phys) = self.code_address().unwrap_or((0, u64::MAX));
        let bytes = if !kernel_bytes.is_empty() {
            kernel_bytes
        } else {
            let mut buf = [0u8; 15];
            match self.memory.read(&mut buf, GuestAddress(phys)) {
                Ok(n) => buf[..n].to_vec(),
                Err(_) => Vec::new(),
            }
        };
        EmulationFailure { rip, bytes, detail }
    }
}

/// KVM ioeventfds and irqfds with MSI routes (`KVM_SET_GSI_ROUTING`).
///
/// Setting the routing table replaces KVM's default, so the table always
/// carries the default PIC/IOAPIC routes for GSIs 0-23 plus one MSI route
/// per registered irqfd from GSI 24 up.
pub struct KvmNotifiers {
    vm: Arc<VmFd>,
    msi_routes: std::sync::Mutex<std::collections::BTreeMap<u32, rhyve_platform::notify::MsiRoute>>,
}

/// First GSI given to MSI routes, after the IOAPIC's pins.
const FIRST_MSI_GSI: u32 = rhyve_platform::layout::IOAPIC_PINS;
/// KVM_MAX_IRQ_ROUTES on x86 is 4096.
const LAST_MSI_GSI: u32 = 4095;

fn io_err(e: kvm_ioctls::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

/// An EventFd view of a borrowed descriptor, never closed by us.
fn borrowed_eventfd(
    fd: std::os::fd::BorrowedFd<'_>,
) -> std::mem::ManuallyDrop<vmm_sys_util::eventfd::EventFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: the descriptor outlives this call; ManuallyDrop keeps it open.
    std::mem::ManuallyDrop::new(unsafe {
        vmm_sys_util::eventfd::EventFd::from_raw_fd(fd.as_raw_fd())
    })
}

impl KvmNotifiers {
    /// KVM_IOEVENTFD with a datamatch of the access width, (un)registered.
    fn ioevent(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        addr: rhyve_platform::notify::IoAddress,
        len: u32,
        value: u64,
        add: bool,
    ) -> std::io::Result<()> {
        let efd = borrowed_eventfd(fd);
        let a = kvm_io_address(addr);
        let vm = &self.vm;
        let result = match (len, add) {
            (1, true) => vm.register_ioevent(&efd, &a, value as u8),
            (2, true) => vm.register_ioevent(&efd, &a, value as u16),
            (4, true) => vm.register_ioevent(&efd, &a, value as u32),
            (_, true) => vm.register_ioevent(&efd, &a, value),
            (1, false) => vm.unregister_ioevent(&efd, &a, value as u8),
            (2, false) => vm.unregister_ioevent(&efd, &a, value as u16),
            (4, false) => vm.unregister_ioevent(&efd, &a, value as u32),
            (_, false) => vm.unregister_ioevent(&efd, &a, value),
        };
        result.map_err(io_err)
    }

    fn apply(
        &self,
        routes: &std::collections::BTreeMap<u32, rhyve_platform::notify::MsiRoute>,
    ) -> std::io::Result<()> {
        use kvm_bindings::{
            kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
        };
        let mut entries = Vec::new();
        let chip = |gsi: u32, irqchip: u32, pin: u32| {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip.irqchip = irqchip;
            e.u.irqchip.pin = pin;
            e
        };
        for gsi in 0..rhyve_platform::layout::IOAPIC_PINS {
            if gsi < 8 {
                entries.push(chip(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
            } else if gsi < 16 {
                entries.push(chip(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
            }
            entries.push(chip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        for (&gsi, r) in routes {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = r.address as u32;
            e.u.msi.address_hi = (r.address >> 32) as u32;
            e.u.msi.data = r.data;
            entries.push(e);
        }
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| std::io::Error::other(format!("routing table: {e:?}")))?;
        self.vm.set_gsi_routing(&table).map_err(io_err)
    }
}

impl rhyve_platform::notify::GuestNotifiers for KvmNotifiers {
    fn add_ioevent(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        addr: rhyve_platform::notify::IoAddress,
        len: u32,
        value: u64,
    ) -> std::io::Result<()> {
        self.ioevent(fd, addr, len, value, true)
    }

    fn remove_ioevent(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        addr: rhyve_platform::notify::IoAddress,
        len: u32,
        value: u64,
    ) -> std::io::Result<()> {
        self.ioevent(fd, addr, len, value, false)
    }

    fn add_msi(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        route: rhyve_platform::notify::MsiRoute,
    ) -> std::io::Result<u32> {
        let mut routes = self.msi_routes.lock().unwrap_or_else(|e| e.into_inner());
        let gsi = (FIRST_MSI_GSI..=LAST_MSI_GSI)
            .find(|g| !routes.contains_key(g))
            .ok_or_else(|| std::io::Error::other("no free interrupt routes left"))?;
        routes.insert(gsi, route);
        if let Err(e) = self.apply(&routes) {
            routes.remove(&gsi);
            return Err(e);
        }
        let efd = borrowed_eventfd(fd);
        if let Err(e) = self.vm.register_irqfd(&efd, gsi) {
            routes.remove(&gsi);
            let _ = self.apply(&routes);
            return Err(io_err(e));
        }
        Ok(gsi)
    }

    fn update_msi(
        &self,
        handle: u32,
        route: rhyve_platform::notify::MsiRoute,
    ) -> std::io::Result<()> {
        let mut routes = self.msi_routes.lock().unwrap_or_else(|e| e.into_inner());
        match routes.get_mut(&handle) {
            Some(r) if *r == route => Ok(()),
            Some(r) => {
                *r = route;
                self.apply(&routes)
            }
            None => Err(std::io::Error::other(format!("no MSI route {handle}"))),
        }
    }

    fn remove_msi(&self, fd: std::os::fd::BorrowedFd<'_>, handle: u32) -> std::io::Result<()> {
        let efd = borrowed_eventfd(fd);
        let result = self.vm.unregister_irqfd(&efd, handle).map_err(io_err);
        let mut routes = self.msi_routes.lock().unwrap_or_else(|e| e.into_inner());
        if routes.remove(&handle).is_some() {
            self.apply(&routes)?;
        }
        result
    }
}

fn kvm_io_address(addr: rhyve_platform::notify::IoAddress) -> kvm_ioctls::IoEventAddress {
    match addr {
        rhyve_platform::notify::IoAddress::Port(p) => kvm_ioctls::IoEventAddress::Pio(u64::from(p)),
        rhyve_platform::notify::IoAddress::Mmio(a) => kvm_ioctls::IoEventAddress::Mmio(a),
    }
}
