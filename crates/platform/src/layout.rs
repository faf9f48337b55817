//! bhyve's amd64 guest physical memory map and fixed I/O ports.
//!
//! Reproduces `lib/libvmmapi` (lowmem limit), `usr.sbin/bhyve/pci_emul.c`
//! (PCI windows), `acpi.c`, `mptbl.c`, `smbiostbl.c` and the kernel's
//! vIOAPIC/vHPET/vLAPIC addresses, so a guest sees the same machine.

/// RAM below 4 GiB ends here at most (`VM_LOWMEM_LIMIT`); the rest is above 4 GiB.
pub const LOWMEM_LIMIT: u64 = 3 << 30;
/// Where RAM above the 32-bit hole starts.
pub const HIGHMEM_BASE: u64 = 4 << 30;

/// Legacy VGA hole, reported as reserved in the e820 map.
pub const VGA_HOLE_START: u64 = 0xA_0000;
/// End of the legacy BIOS area (VGA hole + option ROMs + BIOS).
pub const BIOS_AREA_END: u64 = 0x10_0000;

/// Floating MP pointer and MP configuration table (unless `-Y`).
pub const MPTABLE_BASE: u64 = 0xF_0000;
/// SMBIOS entry point and structure table.
pub const SMBIOS_BASE: u64 = 0xF_1000;
/// ACPI tables (`BHYVE_ACPI_BASE`); the RSDP comes first.
pub const ACPI_BASE: u64 = 0xF_2400;
/// End of the firmware table area in the BIOS segment.
pub const FW_TABLES_END: u64 = 0x10_0000;

/// 32-bit PCI MMIO window (fixed; bhyve's UEFI and OVMF expect 0xC0000000).
pub const PCI_MMIO32_BASE: u64 = 0xC000_0000;
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCIe ECAM (enhanced configuration), 1 MiB per bus, 256 buses.
pub const PCI_ECAM_BASE: u64 = 0xE000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;
/// 64-bit PCI MMIO window size (`PCI_EMUL_MEMSIZE64`), placed above RAM.
pub const PCI_MMIO64_SIZE: u64 = 32 << 30;
/// PCI I/O BARs are allocated from this port range.
pub const PCI_IO_BASE: u16 = 0x2000;
pub const PCI_IO_LIMIT: u32 = 0x1_0000;

pub const IOAPIC_BASE: u64 = 0xFEC0_0000;
pub const IOAPIC_PINS: u32 = 24;
pub const HPET_BASE: u64 = 0xFED0_0000;
pub const HPET_SIZE: u64 = 0x400;
pub const TPM_CRB_BASE: u64 = 0xFED4_0000;
pub const LAPIC_BASE: u64 = 0xFEE0_0000;

/// The boot ROM region: ROM at the top, variables just below it.
pub const BOOTROM_REGION_BASE: u64 = 0xFF00_0000;
pub const BOOTROM_REGION_SIZE: u64 = 0x100_0000;
/// pc-testdev's scratch memory.
pub const PCTESTDEV_IOMEM_BASE: u64 = 0xFF00_0000;
pub const PCTESTDEV_IOMEM_SIZE: u64 = 0x1_0000;

/// KVM needs three pages for the real-mode TSS and one for the EPT identity
/// map. They sit in a hole bhyve leaves unused, below the IOAPIC and outside
/// the 16 MiB boot ROM region.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xFEBF_C000;
pub const KVM_TSS_ADDR: u64 = 0xFEBF_D000;

/// 16550 UARTs on the LPC bus: (name, base port, ISA IRQ).
pub const COM_PORTS: [(&str, u16, u32); 4] = [
    ("com1", 0x3F8, 4),
    ("com2", 0x2F8, 3),
    ("com3", 0x3E8, 4),
    ("com4", 0x2E8, 3),
];
pub const UART_PORT_COUNT: u16 = 8;

pub const RTC_PORT: u16 = 0x70;
pub const RTC_IRQ: u32 = 8;
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
pub const NMI_STATUS_PORT: u16 = 0x61;
pub const ELCR_PORT: u16 = 0x4D0;
pub const POST_PORT: u16 = 0x80;
pub const SMI_CMD_PORT: u16 = 0xB2;
/// Values written to SMI_CMD by the guest OS to switch ACPI mode on and off.
pub const SMI_ACPI_ENABLE: u8 = 0xA0;
pub const SMI_ACPI_DISABLE: u8 = 0xA1;
pub const PM1A_EVT_PORT: u16 = 0x400;
pub const PM1A_CNT_PORT: u16 = 0x404;
pub const PM_TIMER_PORT: u16 = 0x408;
pub const GPE0_PORT: u16 = 0x40C;
pub const GPE0_LEN: u16 = 2;
/// ACPI PM timer frequency in Hz.
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// The SCI is ISA IRQ 9, level triggered, active low.
pub const SCI_IRQ: u32 = 9;
pub const RESET_PORT: u16 = 0xCF9;
/// FADT reset value written to [`RESET_PORT`].
pub const RESET_VALUE: u8 = 6;
pub const PCI_CONFIG_ADDRESS_PORT: u16 = 0xCF8;
pub const PCI_CONFIG_DATA_PORT: u16 = 0xCFC;
/// pc-testdev's isa-debug-exit port: writing V ends bhyve with `(V << 1) | 1`.
pub const DEBUG_EXIT_PORT: u16 = 0xF4;
/// bhyve's fwctl / QEMU fw_cfg selector and data ports.
pub const FWCFG_SELECTOR_PORT: u16 = 0x510;
pub const FWCFG_DATA_PORT: u16 = 0x511;

/// First IOAPIC pin given to PCI INTx (pins 0-15 are the ISA IRQs).
pub const PCI_INTX_FIRST_PIN: u32 = 16;

/// Guest RAM split the way bhyve splits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLayout {
    /// Bytes of RAM from address 0.
    pub lowmem: u64,
    /// Bytes of RAM from [`HIGHMEM_BASE`].
    pub highmem: u64,
}

impl MemoryLayout {
    pub fn new(size: u64) -> Self {
        let lowmem = size.min(LOWMEM_LIMIT);
        Self {
            lowmem,
            highmem: size - lowmem,
        }
    }

    pub fn total(&self) -> u64 {
        self.lowmem + self.highmem
    }

    /// (guest address, size) of every RAM region.
    pub fn ram_regions(&self) -> Vec<(u64, u64)> {
        let mut regions = vec![(0, self.lowmem)];
        if self.highmem > 0 {
            regions.push((HIGHMEM_BASE, self.highmem));
        }
        regions
    }

    /// Base of the 64-bit PCI window: above RAM, aligned to its own size.
    pub fn pci_mmio64_base(&self) -> u64 {
        let top = HIGHMEM_BASE + self.highmem;
        top.div_ceil(PCI_MMIO64_SIZE) * PCI_MMIO64_SIZE
    }

    /// The e820 map a guest is given: RAM with the legacy holes carved out.
    pub fn e820(&self) -> Vec<E820Entry> {
        let mut map = vec![
            E820Entry::ram(0, VGA_HOLE_START),
            E820Entry::reserved(VGA_HOLE_START, BIOS_AREA_END - VGA_HOLE_START),
        ];
        if self.lowmem > BIOS_AREA_END {
            map.push(E820Entry::ram(BIOS_AREA_END, self.lowmem - BIOS_AREA_END));
        }
        map.push(E820Entry::reserved(PCI_ECAM_BASE, PCI_ECAM_SIZE));
        map.push(E820Entry::reserved(
            BOOTROM_REGION_BASE,
            BOOTROM_REGION_SIZE,
        ));
        if self.highmem > 0 {
            map.push(E820Entry::ram(HIGHMEM_BASE, self.highmem));
        }
        map
    }
}

/// One e820 map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl E820Entry {
    pub const RAM: u32 = 1;
    pub const RESERVED: u32 = 2;

    pub fn ram(addr: u64, size: u64) -> Self {
        Self {
            addr,
            size,
            kind: Self::RAM,
        }
    }

    pub fn reserved(addr: u64, size: u64) -> Self {
        Self {
            addr,
            size,
            kind: Self::RESERVED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_no_highmem() {
        let l = MemoryLayout::new(512 << 20);
        assert_eq!(l.ram_regions(), vec![(0, 512 << 20)]);
        assert_eq!(l.pci_mmio64_base(), PCI_MMIO64_SIZE);
    }

    #[test]
    fn large_guest_splits_at_three_gib() {
        let l = MemoryLayout::new(8 << 30);
        assert_eq!(l.ram_regions(), vec![(0, 3 << 30), (4 << 30, 5 << 30)]);
        assert_eq!(l.pci_mmio64_base(), 32 << 30);
        let ram: u64 = l
            .e820()
            .iter()
            .filter(|e| e.kind == E820Entry::RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (8 << 30) - (BIOS_AREA_END - VGA_HOLE_START));
    }
}
