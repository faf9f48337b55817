//! The hypervisor backend: what bhyve's `libvmmapi` is to `vmm.ko`.
//!
//! The VMM talks to the [`Vm`] and [`Vcpu`] traits only; [`kvm`] implements
//! them on Linux KVM. A FreeBSD vmm.ko backend would implement the same two
//! traits. Exits are reported in backend-neutral terms ([`VcpuExit`]).

mod assist;
pub mod cpuid;
pub mod kvm;
pub mod registry;

use std::sync::Arc;

use rhyve_platform::irq::InterruptController;
use rhyve_platform::layout::MemoryLayout;
use vm_memory::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum HvError {
    #[error("cannot open /dev/kvm: {0} (rhyve needs KVM: is the kvm module loaded and /dev/kvm accessible?)")]
    NoKvm(std::io::Error),
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T> = std::result::Result<T, HvError>;

/// What the VM is built with; everything comes from the config tree.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub cpus: u32,
    pub sockets: u32,
    pub cores: u32,
    pub threads: u32,
    pub memory: MemoryLayout,
    /// `-S`: lock guest memory in RAM.
    pub wired: bool,
    /// `-C`: leave guest memory in core dumps (excluded otherwise).
    pub guest_in_core: bool,
    /// `-x`: start the local APICs in x2APIC mode.
    pub x2apic: bool,
    /// `x86.strictmsr` (cleared by `-w`): unknown MSRs raise #GP.
    pub strict_msr: bool,
    /// `x86.emulation_assist` (rhyve): complete in user space the
    /// instructions KVM cannot emulate, instead of ending the run.
    pub emulation_assist: bool,
    /// Bytes of boot ROM (`-l bootrom`) mapped read-only so that it ends at
    /// 4 GiB; 0 for none. It is part of [`Vm::memory`] so the VMM can load
    /// it and read instructions from it, but the guest cannot write it.
    pub rom_size: u64,
    /// Restoring a snapshot: RAM comes from its memory file instead of
    /// anonymous memory.
    pub memory_image: Option<MemoryImage>,
}

/// A snapshot's memory file: the RAM regions one after the other (below
/// 3 GiB, then from 4 GiB), zero pages left as holes.
#[derive(Debug, Clone)]
pub struct MemoryImage {
    pub file: Arc<std::fs::File>,
}

/// A vCPU's complete state, as its backend keeps it (a vmm.ko backend
/// would add its own variant).
#[derive(serde::Serialize, serde::Deserialize)]
pub enum VcpuState {
    Kvm(Box<kvm::KvmVcpuState>),
}

/// The VM's in-kernel state: interrupt controllers, PIT, clock.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub enum VmState {
    Kvm(Box<kvm::KvmVmState>),
}

pub use rhyve_platform::entry::EntryRegs;

/// Why `Vcpu::run` returned, in backend-neutral terms.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    /// Port input of `data.len() / size` accesses of `size` bytes each:
    /// string I/O (`rep insb`) arrives as one exit.
    IoIn {
        port: u16,
        size: usize,
        data: &'a mut [u8],
    },
    /// Port output, with accesses laid out as for [`VcpuExit::IoIn`].
    IoOut {
        port: u16,
        size: usize,
        data: &'a [u8],
    },
    MmioRead {
        addr: u64,
        data: &'a mut [u8],
    },
    MmioWrite {
        addr: u64,
        data: &'a [u8],
    },
    /// The guest triple-faulted.
    Shutdown,
    /// The run was interrupted (a kick from another thread).
    Interrupted,
    /// The guest asked to reset or power off through a hypervisor interface.
    SystemReset,
    SystemPowerOff,
    /// The backend cannot go on with this guest instruction; details from
    /// [`Vcpu::emulation_failure`].
    EmulationFailure,
    /// Anything else the backend could not handle.
    Failed(String),
}

/// An instruction the hypervisor could not emulate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmulationFailure {
    pub rip: u64,
    pub bytes: Vec<u8>,
    pub detail: String,
}

impl std::fmt::Display for EmulationFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot emulate the instruction at RIP {:#x}", self.rip)?;
        if self.bytes.is_empty() {
            write!(f, " (instruction bytes unreadable)")?;
        } else {
            write!(f, ", bytes")?;
            for b in &self.bytes {
                write!(f, " {b:02x}")?;
            }
        }
        if !self.detail.is_empty() {
            write!(f, " ({})", self.detail)?;
        }
        Ok(())
    }
}

/// A virtual machine: memory, interrupt controller and vCPU factory.
pub trait Vm: Send + Sync {
    fn memory(&self) -> &GuestMemoryMmap;
    fn interrupts(&self) -> Arc<dyn InterruptController>;
    /// ioeventfds and MSI irqfds for device threads.
    fn notifiers(&self) -> Arc<dyn rhyve_platform::notify::GuestNotifiers>;
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>>;
    /// A window through which `pages` (a device's memory, such as a
    /// framebuffer) can be shown to the guest; unmapped until placed, and
    /// unmapped again when dropped.
    fn memory_window(
        &self,
        pages: Arc<vm_memory::MmapRegion>,
    ) -> Result<Box<dyn rhyve_platform::window::MemoryWindow>>;
    /// The in-kernel devices' state, for a snapshot (vCPUs paused).
    fn save_state(&self) -> Result<VmState>;
    fn restore_state(&self, state: &VmState) -> Result<()>;
}

/// A virtual CPU, driven by exactly one thread.
pub trait Vcpu: Send {
    fn id(&self) -> u32;
    /// Put the vCPU in the state a loader asked for.
    fn set_entry(&mut self, regs: &EntryRegs) -> Result<()>;
    /// Enter the guest until the next exit.
    fn run(&mut self) -> Result<VcpuExit<'_>>;
    /// True if the vCPU sits in HLT with interrupts disabled: halted for good.
    fn halted_for_good(&mut self) -> Result<bool>;
    /// True once the vCPU runs (the boot CPU, or an AP after INIT/SIPI).
    fn started(&mut self) -> Result<bool>;
    fn rip(&mut self) -> Result<u64>;
    /// Details of the last [`VcpuExit::EmulationFailure`].
    fn emulation_failure(&mut self) -> EmulationFailure;
    /// Named register values, for `bhyvectl --get-*`.
    fn registers(&mut self) -> Result<Vec<(&'static str, u64)>>;
    /// Queue a non-maskable interrupt (`bhyvectl --inject-nmi`).
    fn inject_nmi(&mut self) -> Result<()>;
    /// After [`VcpuExit::EmulationFailure`]: complete the instruction in
    /// user space if it is one rhyve knows; returns its kind's name, or
    /// `None` when the run cannot go on.
    fn assist_emulation(&mut self) -> Result<Option<&'static str>>;
    /// Everything the backend keeps of this vCPU, for a snapshot; called
    /// from the vCPU's own thread, outside the guest.
    fn save_state(&mut self) -> Result<VcpuState>;
    /// Put back a state from [`Vcpu::save_state`], before the vCPU first runs.
    fn restore_state(&mut self, state: &VcpuState) -> Result<()>;
}
