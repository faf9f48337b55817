//! The register state a loader asks the boot vCPU to start in: written by
//! the boot layer (Linux boot protocol, PVH), stored with a named VM by
//! grub-bhyve, applied as it is by the hypervisor layer.

/// Registers a vCPU starts with. Segments are flat (base 0, 4 GiB limit)
/// from the boot GDT at `gdt_base`; RFLAGS = 0x2 (interrupts off) and every
/// register not listed here is zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EntryRegs {
    pub rip: u64,
    pub rsi: u64,
    pub rbx: u64,
    pub rsp: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub gdt_base: u64,
    pub gdt_limit: u16,
    pub code_selector: u16,
    pub data_selector: u16,
    /// CS is a 64-bit segment (L=1) rather than a 32-bit one.
    pub long_mode: bool,
}
