//! ACPI tables at bhyve's `BHYVE_ACPI_BASE` (0xF2400), built in Rust.
//!
//! Contents follow bhyve's `acpi.c` (RSDP rev 2, RSDT, XSDT, FADT rev 5,
//! MADT, HPET, MCFG, FACS, DSDT, OEM ID "BHYVE ") plus an SPCR for COM1.
//! bhyve compiles ASL with iasl at run time; here every table is encoded
//! directly. The generic SDT header and checksum come from
//! `acpi_tables::sdt::Sdt`; the typed tables of that crate do not fit
//! (its FADT is revision 6, its MADT lacks overrides/NMI entries, its SPCR
//! is RISC-V only), so the bodies are laid out here field by field from the
//! ACPI specification.
//!
//! Layout (addresses relative to the base, each table 64-byte aligned):
//! RSDP +0x000, RSDT +0x040, XSDT +0x080, MADT +0x100, then FADT, HPET,
//! MCFG, SPCR, FACS and the DSDT last, all below 1 MiB.

use acpi_tables::sdt::Sdt;
use rhyve_platform::layout::{
    MemoryLayout, ACPI_BASE, FW_TABLES_END, GPE0_LEN, GPE0_PORT, HPET_BASE, IOAPIC_BASE,
    LAPIC_BASE, PCI_ECAM_BASE, PCI_IO_BASE, PCI_IO_LIMIT, PCI_MMIO32_BASE, PCI_MMIO32_SIZE,
    PCI_MMIO64_SIZE, PM1A_CNT_PORT, PM1A_EVT_PORT, PM_TIMER_PORT, RESET_PORT, RESET_VALUE, SCI_IRQ,
    SMI_ACPI_DISABLE, SMI_ACPI_ENABLE, SMI_CMD_PORT,
};
use vm_memory::GuestMemoryMmap;

use crate::{checksum, dsdt, write_guest, BootError};

pub(crate) const OEM_ID: [u8; 6] = *b"BHYVE ";
const OEM_REVISION: u32 = 1;
/// bhyve's table builder (`basl.c`) signs its tables as compiler "BASL".
const CREATOR_ID: [u8; 4] = *b"BASL";
const CREATOR_REVISION: u32 = 0x2022_0504;

/// One PCI INTx pin as routed by the PCI layer (same fields as
/// `rhyve_pci::PciIntxRoute`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIntxRoute {
    pub bus: u8,
    pub slot: u8,
    /// 1 = INTA .. 4 = INTD.
    pub pin: u8,
    /// IOAPIC input (global system interrupt) in APIC mode.
    pub gsi: u32,
    /// PIRQ link 0..7 = LNKA..LNKH in PIC mode.
    pub pirq: u8,
}

/// Address windows PCI bus 0 decodes, as listed in the host bridge `_CRS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciWindows {
    /// I/O BAR window, `io_base..io_limit` (exclusive limit).
    pub io_base: u16,
    pub io_limit: u32,
    /// 32-bit MMIO window, exclusive limit.
    pub mmio32_base: u64,
    pub mmio32_limit: u64,
    /// 64-bit MMIO window, exclusive limit.
    pub mmio64_base: u64,
    pub mmio64_limit: u64,
}

impl PciWindows {
    /// The whole windows bhyve reserves for PCI in this memory layout.
    pub fn for_layout(memory: &MemoryLayout) -> Self {
        let mmio64_base = memory.pci_mmio64_base();
        Self {
            io_base: PCI_IO_BASE,
            io_limit: PCI_IO_LIMIT,
            mmio32_base: PCI_MMIO32_BASE,
            mmio32_limit: PCI_MMIO32_BASE + PCI_MMIO32_SIZE,
            mmio64_base,
            mmio64_limit: mmio64_base + PCI_MMIO64_SIZE,
        }
    }
}

/// What the guest machine looks like, as far as the ACPI tables tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiPlatform {
    /// vCPUs; APIC ID = vCPU index.
    pub cpus: u32,
    pub memory: MemoryLayout,
    /// 16550 UARTs present: (base port, ISA IRQ, `_UID` 1..=9, named COMn).
    pub com_ports: Vec<(u16, u32, u8)>,
    /// Every populated INTx pin (bus 0 only, as bhyve's single hierarchy).
    pub pci_intx: Vec<PciIntxRoute>,
    /// First dword of the HPET's GCAP_ID register.
    pub hpet_capabilities: u32,
    /// The LPC bridge (slot, function) on bus 0 if configured: the ISA
    /// devices and the PIRQ link devices hang below it, as in bhyve.
    pub lpc: Option<(u8, u8)>,
    /// Whether the i8042 keyboard controller (ports 0x60/0x64) is present.
    pub i8042: bool,
    /// Bus 0 windows; `None` uses [`PciWindows::for_layout`].
    pub pci_windows: Option<PciWindows>,
    /// QEMU's fw_cfg ports are there (`lpc.fwcfg=qemu`): `\_SB.FWCF`.
    pub qemu_fwcfg: bool,
}

impl AcpiPlatform {
    /// A machine with no COM ports, no PCI INTx and no LPC bridge.
    pub fn new(cpus: u32, memory: MemoryLayout, hpet_capabilities: u32) -> Self {
        Self {
            cpus,
            memory,
            com_ports: Vec::new(),
            pci_intx: Vec::new(),
            hpet_capabilities,
            lpc: None,
            i8042: false,
            pci_windows: None,
            qemu_fwcfg: false,
        }
    }

    pub(crate) fn windows(&self) -> PciWindows {
        self.pci_windows
            .unwrap_or_else(|| PciWindows::for_layout(&self.memory))
    }

    fn validate(&self) -> Result<(), BootError> {
        let bad = |why: String| Err(BootError::InvalidPlatform(why));
        if self.cpus == 0 || self.cpus > 255 {
            return bad(format!(
                "{} vCPUs: the MADT describes 1 to 255 xAPIC IDs",
                self.cpus
            ));
        }
        for &(port, irq, uid) in &self.com_ports {
            if !(1..=9).contains(&uid) || irq > 15 || port > 0xFFF8 {
                return bad(format!(
                    "COM port {port:#x} IRQ {irq} _UID {uid}: need _UID 1-9, an ISA IRQ and a 16-bit port"
                ));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for r in &self.pci_intx {
            if r.bus != 0 {
                return bad(format!(
                    "INTx route on PCI bus {}: only bus 0 is supported yet",
                    r.bus
                ));
            }
            if r.slot > 31 || !(1..=4).contains(&r.pin) || r.pirq > 7 {
                return bad(format!("INTx route {r:?}: slot 0-31, pin 1-4, PIRQ 0-7"));
            }
            if !seen.insert((r.slot, r.pin)) {
                return bad(format!("INTx route {r:?} listed twice"));
            }
        }
        if let Some((slot, func)) = self.lpc {
            if slot > 31 || func > 7 {
                return bad(format!("LPC bridge at {slot}.{func}"));
            }
        }
        let w = self.windows();
        if w.io_base < 0xD00 || u32::from(w.io_base) >= w.io_limit || w.io_limit > 0x1_0000 {
            return bad(format!("PCI I/O window {:#x}-{:#x}", w.io_base, w.io_limit));
        }
        if w.mmio32_base >= w.mmio32_limit || w.mmio32_limit > 1 << 32 {
            return bad(format!(
                "PCI 32-bit window {:#x}-{:#x}",
                w.mmio32_base, w.mmio32_limit
            ));
        }
        if w.mmio64_base >= w.mmio64_limit {
            return bad(format!(
                "PCI 64-bit window {:#x}-{:#x}",
                w.mmio64_base, w.mmio64_limit
            ));
        }
        Ok(())
    }
}

/// One table as placed in guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTable {
    /// "RSD PTR " for the RSDP, else the 4-byte table signature.
    pub signature: String,
    pub addr: u64,
    pub bytes: Vec<u8>,
}

const RSDT_OFFSET: u64 = 0x40;
const XSDT_OFFSET: u64 = 0x80;
const MADT_OFFSET: u64 = 0x100;
const TABLE_ALIGN: u64 = 0x40;
const FADT_LEN: u32 = 268;

/// An SDT with bhyve's OEM fields and `BV<signature>` table ID.
fn sdt(signature: &[u8; 4], revision: u8) -> Sdt {
    let mut table_id = *b"BV      ";
    table_id[2..6].copy_from_slice(signature);
    let mut t = Sdt::new(*signature, 36, revision, OEM_ID, table_id, OEM_REVISION);
    t.write_bytes(28, &CREATOR_ID);
    t.write_u32(32, CREATOR_REVISION);
    t
}

/// A Generic Address Structure.
fn gas(space: u8, bit_width: u8, access: u8, address: u64) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = space;
    g[1] = bit_width;
    g[3] = access;
    g[4..].copy_from_slice(&address.to_le_bytes());
    g
}

const GAS_SYSTEM_MEMORY: u8 = 0;
const GAS_SYSTEM_IO: u8 = 1;
const ACCESS_UNDEFINED: u8 = 0;
const ACCESS_BYTE: u8 = 1;
const ACCESS_WORD: u8 = 2;
const ACCESS_DWORD: u8 = 3;

fn build_madt(cpus: u32) -> Vec<u8> {
    const PCAT_COMPAT: u32 = 1;
    const ENABLED: u32 = 1;
    const ACTIVE_HIGH_EDGE: u16 = 0x1 | (0x1 << 2);
    const ACTIVE_LOW_LEVEL: u16 = 0x3 | (0x3 << 2);
    let mut t = sdt(b"APIC", 1);
    let mut body = Vec::new();
    body.extend_from_slice(&(LAPIC_BASE as u32).to_le_bytes());
    body.extend_from_slice(&PCAT_COMPAT.to_le_bytes());
    for cpu in 0..cpus {
        // validate() bounds cpus to 255.
        let id = cpu as u8;
        body.extend_from_slice(&[0, 8, id, id]);
        body.extend_from_slice(&ENABLED.to_le_bytes());
    }
    // I/O APIC: ID 0, GSI base 0.
    body.extend_from_slice(&[1, 12, 0, 0]);
    body.extend_from_slice(&(IOAPIC_BASE as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    // ISA IRQ 0 is IOAPIC pin 2.
    body.extend_from_slice(&[2, 10, 0, 0]);
    body.extend_from_slice(&2u32.to_le_bytes());
    body.extend_from_slice(&ACTIVE_HIGH_EDGE.to_le_bytes());
    // The SCI is level triggered, active low.
    body.extend_from_slice(&[2, 10, 0, SCI_IRQ as u8]);
    body.extend_from_slice(&SCI_IRQ.to_le_bytes());
    body.extend_from_slice(&ACTIVE_LOW_LEVEL.to_le_bytes());
    // NMI on LINT1 of every processor.
    body.extend_from_slice(&[4, 6, 0xFF]);
    body.extend_from_slice(&ACTIVE_HIGH_EDGE.to_le_bytes());
    body.push(1);
    t.append_slice(&body);
    t.as_slice().to_vec()
}

fn build_fadt(facs: u64, dsdt: u64) -> Vec<u8> {
    const WBINVD: u32 = 1 << 0;
    const PROC_C1: u32 = 1 << 2;
    const SLP_BUTTON: u32 = 1 << 5;
    const TMR_VAL_EXT: u32 = 1 << 8;
    const RESET_REG_SUP: u32 = 1 << 10;
    const HEADLESS: u32 = 1 << 12;
    const FORCE_APIC_PHYSICAL: u32 = 1 << 19;
    const BOOT_NO_VGA: u16 = 1 << 2;
    const BOOT_NO_ASPM: u16 = 1 << 4;
    const RTC_CENTURY: u8 = 0x32;

    let mut f = vec![0u8; FADT_LEN as usize - 36];
    let mut put = |offset: usize, bytes: &[u8]| {
        f[offset - 36..offset - 36 + bytes.len()].copy_from_slice(bytes);
    };
    // The tables live below 1 MiB, so the 32-bit pointers hold them.
    put(36, &(facs as u32).to_le_bytes());
    put(40, &(dsdt as u32).to_le_bytes());
    put(46, &(SCI_IRQ as u16).to_le_bytes());
    put(48, &u32::from(SMI_CMD_PORT).to_le_bytes());
    put(52, &[SMI_ACPI_ENABLE, SMI_ACPI_DISABLE]);
    put(56, &u32::from(PM1A_EVT_PORT).to_le_bytes());
    put(64, &u32::from(PM1A_CNT_PORT).to_le_bytes());
    put(76, &u32::from(PM_TIMER_PORT).to_le_bytes());
    put(80, &u32::from(GPE0_PORT).to_le_bytes());
    // PM1_EVT_LEN, PM1_CNT_LEN, PM2_CNT_LEN, PM_TMR_LEN, GPE0_BLK_LEN.
    put(88, &[4, 2, 0, 4, GPE0_LEN as u8]);
    put(108, &[RTC_CENTURY]);
    put(109, &(BOOT_NO_VGA | BOOT_NO_ASPM).to_le_bytes());
    // PWR_BUTTON stays clear: the power button is the fixed-feature one.
    let flags = WBINVD
        | PROC_C1
        | SLP_BUTTON
        | TMR_VAL_EXT
        | RESET_REG_SUP
        | HEADLESS
        | FORCE_APIC_PHYSICAL;
    put(112, &flags.to_le_bytes());
    put(
        116,
        &gas(GAS_SYSTEM_IO, 8, ACCESS_BYTE, u64::from(RESET_PORT)),
    );
    put(128, &[RESET_VALUE]);
    put(131, &[1]); // FADT minor version: ACPI 5.1
    put(132, &facs.to_le_bytes());
    put(140, &dsdt.to_le_bytes());
    put(
        148,
        &gas(GAS_SYSTEM_IO, 32, ACCESS_WORD, u64::from(PM1A_EVT_PORT)),
    );
    put(160, &gas(GAS_SYSTEM_IO, 0, ACCESS_UNDEFINED, 0));
    put(
        172,
        &gas(GAS_SYSTEM_IO, 16, ACCESS_WORD, u64::from(PM1A_CNT_PORT)),
    );
    put(184, &gas(GAS_SYSTEM_IO, 0, ACCESS_UNDEFINED, 0));
    put(196, &gas(GAS_SYSTEM_IO, 0, ACCESS_UNDEFINED, 0));
    put(
        208,
        &gas(GAS_SYSTEM_IO, 32, ACCESS_DWORD, u64::from(PM_TIMER_PORT)),
    );
    put(
        220,
        &gas(
            GAS_SYSTEM_IO,
            (GPE0_LEN * 8) as u8,
            ACCESS_BYTE,
            u64::from(GPE0_PORT),
        ),
    );
    put(232, &gas(GAS_SYSTEM_IO, 0, ACCESS_UNDEFINED, 0));
    // No sleep control/status registers (not hardware-reduced).
    put(244, &gas(GAS_SYSTEM_IO, 0, ACCESS_UNDEFINED, 0));
    put(256, &gas(GAS_SYSTEM_IO, 0, ACCESS_UNDEFINED, 0));

    let mut t = sdt(b"FACP", 5);
    t.append_slice(&f);
    t.as_slice().to_vec()
}

fn build_hpet(capabilities: u32) -> Vec<u8> {
    const PAGE_PROTECT4: u8 = 1;
    let mut t = sdt(b"HPET", 1);
    let mut body = Vec::new();
    body.extend_from_slice(&capabilities.to_le_bytes());
    body.extend_from_slice(&gas(GAS_SYSTEM_MEMORY, 0, ACCESS_UNDEFINED, HPET_BASE));
    body.push(0); // HPET number
    body.extend_from_slice(&0u16.to_le_bytes()); // minimum clock tick
    body.push(PAGE_PROTECT4);
    t.append_slice(&body);
    t.as_slice().to_vec()
}

fn build_mcfg() -> Vec<u8> {
    let mut t = sdt(b"MCFG", 1);
    let mut body = vec![0u8; 8]; // reserved
    body.extend_from_slice(&PCI_ECAM_BASE.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes()); // segment
    body.extend_from_slice(&[0, 0xFF]); // buses 0-255
    body.extend_from_slice(&0u32.to_le_bytes());
    t.append_slice(&body);
    t.as_slice().to_vec()
}

/// SPCR revision 2 for a 16550 at `port`/`irq`, 115200 8N1.
fn build_spcr(port: u16, irq: u32) -> Vec<u8> {
    const INTERFACE_16550: u8 = 0;
    const INTERRUPT_8259_AND_APIC: u8 = 0x3;
    const BAUD_115200: u8 = 7;
    const TERMINAL_VT_UTF8: u8 = 2;
    let mut t = sdt(b"SPCR", 2);
    let mut body = vec![INTERFACE_16550, 0, 0, 0];
    body.extend_from_slice(&gas(GAS_SYSTEM_IO, 8, ACCESS_BYTE, u64::from(port)));
    body.push(INTERRUPT_8259_AND_APIC);
    body.push(irq as u8);
    body.extend_from_slice(&irq.to_le_bytes());
    body.extend_from_slice(&[BAUD_115200, 0 /* no parity */, 1 /* 1 stop bit */]);
    body.push(0); // no flow control
    body.push(TERMINAL_VT_UTF8);
    body.push(0); // language
    body.extend_from_slice(&0xFFFFu16.to_le_bytes()); // not a PCI device
    body.extend_from_slice(&0xFFFFu16.to_le_bytes());
    body.extend_from_slice(&[0, 0, 0]); // bus, device, function
    body.extend_from_slice(&0u32.to_le_bytes()); // PCI flags
    body.push(0); // PCI segment
    body.extend_from_slice(&0u32.to_le_bytes()); // reserved
    t.append_slice(&body);
    t.as_slice().to_vec()
}

fn build_facs() -> Vec<u8> {
    let mut f = vec![0u8; 64];
    f[0..4].copy_from_slice(b"FACS");
    f[4..8].copy_from_slice(&64u32.to_le_bytes());
    f[32] = 2; // version
    f
}

fn build_pointer_table(signature: &[u8; 4], entries: &[u64], wide: bool) -> Vec<u8> {
    let mut t = sdt(signature, 1);
    let mut body = Vec::new();
    for &e in entries {
        if wide {
            body.extend_from_slice(&e.to_le_bytes());
        } else {
            // Every table is below 1 MiB.
            body.extend_from_slice(&(e as u32).to_le_bytes());
        }
    }
    t.append_slice(&body);
    t.as_slice().to_vec()
}

fn build_rsdp(rsdt: u64, xsdt: u64) -> Vec<u8> {
    let mut r = vec![0u8; 36];
    r[0..8].copy_from_slice(b"RSD PTR ");
    r[9..15].copy_from_slice(&OEM_ID);
    r[15] = 2; // revision: ACPI 2.0+
    r[16..20].copy_from_slice(&(rsdt as u32).to_le_bytes());
    r[20..24].copy_from_slice(&36u32.to_le_bytes());
    r[24..32].copy_from_slice(&xsdt.to_le_bytes());
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

fn align_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align) * align
}

/// Build every table and place it at its address (RSDP first, at
/// [`ACPI_BASE`]), without touching guest memory.
pub fn build_acpi_tables(p: &AcpiPlatform) -> Result<Vec<AcpiTable>, BootError> {
    p.validate()?;
    let base = ACPI_BASE;
    let madt = build_madt(p.cpus);
    let hpet = build_hpet(p.hpet_capabilities);
    let mcfg = build_mcfg();
    let spcr = p
        .com_ports
        .iter()
        .find(|(port, _, _)| *port == 0x3F8)
        .map(|&(port, irq, _)| build_spcr(port, irq));
    let facs = build_facs();
    let dsdt = dsdt::build_dsdt(p);

    // Place everything after the RSDP, RSDT and XSDT slots.
    let mut cursor = base + MADT_OFFSET;
    let mut place = |len: usize| {
        let at = cursor;
        cursor = align_up(at + len as u64, TABLE_ALIGN);
        at
    };
    let madt_at = place(madt.len());
    let fadt_at = place(FADT_LEN as usize);
    let hpet_at = place(hpet.len());
    let mcfg_at = place(mcfg.len());
    let spcr_at = spcr.as_ref().map(|s| place(s.len()));
    let facs_at = place(facs.len());
    let dsdt_at = place(dsdt.len());
    let end = dsdt_at + dsdt.len() as u64;
    if end > FW_TABLES_END {
        return Err(BootError::TableTooLarge {
            what: "the ACPI tables",
            size: end - base,
            base,
            limit: FW_TABLES_END,
        });
    }

    let fadt = build_fadt(facs_at, dsdt_at);
    // The FADT comes first in the XSDT (UEFI spec 5.1), as in bhyve.
    let mut pointed = vec![fadt_at, madt_at, hpet_at, mcfg_at];
    pointed.extend(spcr_at);
    let rsdt = build_pointer_table(b"RSDT", &pointed, false);
    let xsdt = build_pointer_table(b"XSDT", &pointed, true);
    let rsdp = build_rsdp(base + RSDT_OFFSET, base + XSDT_OFFSET);

    let table = |signature: &str, addr: u64, bytes: Vec<u8>| AcpiTable {
        signature: signature.to_string(),
        addr,
        bytes,
    };
    let mut tables = vec![
        table("RSD PTR ", base, rsdp),
        table("RSDT", base + RSDT_OFFSET, rsdt),
        table("XSDT", base + XSDT_OFFSET, xsdt),
        table("APIC", madt_at, madt),
        table("FACP", fadt_at, fadt),
        table("HPET", hpet_at, hpet),
        table("MCFG", mcfg_at, mcfg),
    ];
    if let (Some(at), Some(bytes)) = (spcr_at, spcr) {
        tables.push(table("SPCR", at, bytes));
    }
    tables.push(table("FACS", facs_at, facs));
    tables.push(table("DSDT", dsdt_at, dsdt));
    Ok(tables)
}

/// Write the ACPI tables into guest memory; returns the RSDP address.
pub fn write_acpi_tables(mem: &GuestMemoryMmap, p: &AcpiPlatform) -> Result<u64, BootError> {
    let tables = build_acpi_tables(p)?;
    for t in &tables {
        write_guest(mem, t.addr, &t.bytes, "ACPI table")?;
    }
    Ok(ACPI_BASE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn platform() -> AcpiPlatform {
        let mut p = AcpiPlatform::new(2, MemoryLayout::new(512 << 20), 0x8086_A201);
        p.com_ports = vec![(0x3F8, 4, 1), (0x2F8, 3, 2)];
        p.lpc = Some((31, 0));
        p.pci_intx = vec![
            PciIntxRoute {
                bus: 0,
                slot: 2,
                pin: 1,
                gsi: 16,
                pirq: 0,
            },
            PciIntxRoute {
                bus: 0,
                slot: 3,
                pin: 1,
                gsi: 17,
                pirq: 1,
            },
        ];
        p
    }

    fn find<'a>(tables: &'a [AcpiTable], sig: &str) -> &'a AcpiTable {
        tables.iter().find(|t| t.signature == sig).unwrap()
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn every_table_sums_to_zero_and_has_its_length() {
        let tables = build_acpi_tables(&platform()).unwrap();
        for t in &tables {
            match t.signature.as_str() {
                "RSD PTR " => {
                    assert_eq!(checksum(&t.bytes[..20]), 0);
                    assert_eq!(checksum(&t.bytes), 0);
                }
                "FACS" => assert_eq!(u32_at(&t.bytes, 4), 64),
                sig => {
                    assert_eq!(&t.bytes[..4], sig.as_bytes());
                    assert_eq!(u32_at(&t.bytes, 4) as usize, t.bytes.len(), "{sig}");
                    assert_eq!(checksum(&t.bytes), 0, "{sig} checksum");
                    assert_eq!(&t.bytes[10..16], b"BHYVE ");
                }
            }
            assert_eq!(t.addr % 16, 0);
        }
        let facs = find(&tables, "FACS");
        assert_eq!(facs.addr % 64, 0);
        let last = tables.last().unwrap();
        assert!(last.addr + last.bytes.len() as u64 <= FW_TABLES_END);
    }

    #[test]
    fn rsdp_and_pointer_tables_link_everything() {
        let tables = build_acpi_tables(&platform()).unwrap();
        let rsdp = find(&tables, "RSD PTR ");
        assert_eq!(rsdp.addr, 0xF2400);
        assert_eq!(rsdp.bytes[15], 2);
        assert_eq!(u32_at(&rsdp.bytes, 16) as u64, find(&tables, "RSDT").addr);
        assert_eq!(u64_at(&rsdp.bytes, 24), find(&tables, "XSDT").addr);
        let xsdt = find(&tables, "XSDT");
        let entries: Vec<u64> = xsdt.bytes[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let expect: Vec<u64> = ["FACP", "APIC", "HPET", "MCFG", "SPCR"]
            .iter()
            .map(|s| find(&tables, s).addr)
            .collect();
        assert_eq!(entries, expect);
        let rsdt = find(&tables, "RSDT");
        assert_eq!(rsdt.bytes.len(), 36 + 4 * 5);
    }

    #[test]
    fn fadt_matches_bhyve() {
        let tables = build_acpi_tables(&platform()).unwrap();
        let f = &find(&tables, "FACP").bytes;
        assert_eq!(f.len(), 268);
        assert_eq!(f[8], 5);
        assert_eq!(u32_at(f, 36) as u64, find(&tables, "FACS").addr);
        assert_eq!(u32_at(f, 40) as u64, find(&tables, "DSDT").addr);
        assert_eq!(u64_at(f, 140), find(&tables, "DSDT").addr);
        assert_eq!(u16::from_le_bytes([f[46], f[47]]), 9);
        assert_eq!(u32_at(f, 48), 0xB2);
        assert_eq!((f[52], f[53]), (0xA0, 0xA1));
        assert_eq!(u32_at(f, 56), 0x400);
        assert_eq!(u32_at(f, 64), 0x404);
        assert_eq!(u32_at(f, 76), 0x408);
        assert_eq!(u32_at(f, 80), 0x40C);
        assert_eq!(&f[88..93], &[4, 2, 0, 4, 2]);
        assert_eq!(f[108], 0x32);
        let flags = u32_at(f, 112);
        assert_eq!(flags, 0x0008_1525);
        assert_eq!(flags & (1 << 4), 0, "fixed power button");
        assert_eq!(&f[116..120], &[1, 8, 0, 1]);
        assert_eq!(u64_at(f, 120), 0xCF9);
        assert_eq!(f[128], 6);
        assert_eq!(u64_at(f, 212), 0x408);
    }

    #[test]
    fn madt_lists_cpus_ioapic_overrides_and_nmi() {
        let tables = build_acpi_tables(&platform()).unwrap();
        let m = &find(&tables, "APIC").bytes;
        assert_eq!(u32_at(m, 36), 0xFEE0_0000);
        let mut entries = Vec::new();
        let mut o = 44;
        while o < m.len() {
            entries.push(m[o..o + m[o + 1] as usize].to_vec());
            o += m[o + 1] as usize;
        }
        assert_eq!(o, m.len());
        assert_eq!(entries[0], [0, 8, 0, 0, 1, 0, 0, 0]);
        assert_eq!(entries[1], [0, 8, 1, 1, 1, 0, 0, 0]);
        assert_eq!(entries[2], [1, 12, 0, 0, 0, 0, 0xC0, 0xFE, 0, 0, 0, 0]);
        assert_eq!(entries[3], [2, 10, 0, 0, 2, 0, 0, 0, 5, 0]);
        assert_eq!(entries[4], [2, 10, 0, 9, 9, 0, 0, 0, 0xF, 0]);
        assert_eq!(entries[5], [4, 6, 0xFF, 5, 0, 1]);
    }

    #[test]
    fn hpet_mcfg_spcr_fields() {
        let tables = build_acpi_tables(&platform()).unwrap();
        let h = &find(&tables, "HPET").bytes;
        assert_eq!(h.len(), 56);
        assert_eq!(u32_at(h, 36), 0x8086_A201);
        assert_eq!(u64_at(h, 44), 0xFED0_0000);
        let m = &find(&tables, "MCFG").bytes;
        assert_eq!(m.len(), 60);
        assert_eq!(u64_at(m, 44), 0xE000_0000);
        assert_eq!(&m[54..56], &[0, 0xFF]);
        let s = &find(&tables, "SPCR").bytes;
        assert_eq!(s.len(), 80);
        assert_eq!(u64_at(s, 44), 0x3F8);
        assert_eq!(s[53], 4);
        assert_eq!(s[58], 7);
    }

    #[test]
    fn no_spcr_without_com1() {
        let mut p = platform();
        p.com_ports.retain(|c| c.0 != 0x3F8);
        let tables = build_acpi_tables(&p).unwrap();
        assert!(tables.iter().all(|t| t.signature != "SPCR"));
    }

    #[test]
    fn bad_platforms_are_refused() {
        let mut p = platform();
        p.cpus = 0;
        assert!(build_acpi_tables(&p).is_err());
        let mut p = platform();
        p.pci_intx[0].pin = 5;
        assert!(build_acpi_tables(&p).is_err());
        let mut p = platform();
        p.pci_intx[0].bus = 1;
        assert!(build_acpi_tables(&p).is_err());
        let mut p = platform();
        p.com_ports[0].2 = 0;
        assert!(build_acpi_tables(&p).is_err());
    }

    #[test]
    fn many_cpus_still_fit() {
        let mut p = platform();
        p.cpus = 255;
        build_acpi_tables(&p).unwrap();
    }

    #[test]
    fn tables_land_in_guest_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let rsdp = write_acpi_tables(&mem, &platform()).unwrap();
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(rsdp)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
    }
}
