//! Intel MultiProcessor Specification 1.4 table at 0xF0000, as bhyve's
//! `mptbl.c` builds it (skipped when `x86.mptable` is false; the caller
//! decides).
//!
//! Floating pointer, then the configuration table: one processor entry per
//! vCPU (APIC ID = index, LAPIC version 16, vCPU 0 the BSP), buses PCI 0 and
//! ISA 1, one I/O APIC (ID 0, version 0x11), I/O interrupt entries for the
//! 16 ISA pins (pin 0 ExtINT, IRQ 0 on pin 2, SCI level/low) and every PCI
//! INTx pin, and LINT0 = ExtINT, LINT1 = NMI on all CPUs. No rust-vmm crate
//! builds MP tables with bhyve's contents, so they are encoded here.

use rhyve_platform::layout::{IOAPIC_BASE, LAPIC_BASE, MPTABLE_BASE, SCI_IRQ, SMBIOS_BASE};
use vm_memory::GuestMemoryMmap;

use crate::acpi::PciIntxRoute;
use crate::{checksum, write_guest, BootError};

const SPEC_REV: u8 = 4;
const OEM_ID: &[u8; 8] = b"BHyVe   ";
const PRODUCT_ID: &[u8; 12] = b"Hypervisor  ";
const LAPIC_VERSION: u8 = 16;
const IOAPIC_VERSION: u8 = 0x11;
const IOAPIC_ID: u8 = 0;
/// Family 6, model 26, stepping 5, as bhyve advertises.
const CPU_SIGNATURE: u32 = (6 << 8) | (26 << 4) | 5;
const CPU_FEATURES: u32 = 0xBFEB_FBFF;
const PCI_BUS_ID: u8 = 0;
const ISA_BUS_ID: u8 = 1;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INT: u8 = 3;
const ENTRY_LOCAL_INT: u8 = 4;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const INT_FLAGS_ACTIVE_LOW_LEVEL: u16 = 0x3 | (0x3 << 2);

fn io_int(int_type: u8, flags: u16, bus: u8, bus_irq: u8, pin: u8) -> [u8; 8] {
    let f = flags.to_le_bytes();
    [
        ENTRY_IO_INT,
        int_type,
        f[0],
        f[1],
        bus,
        bus_irq,
        IOAPIC_ID,
        pin,
    ]
}

/// The floating pointer and configuration table as they sit at
/// [`MPTABLE_BASE`].
pub fn build_mptable(cpus: u32, pci_intx: &[PciIntxRoute]) -> Result<Vec<u8>, BootError> {
    if cpus == 0 || cpus > 255 {
        return Err(BootError::InvalidPlatform(format!(
            "{cpus} vCPUs: the MP table describes 1 to 255 APIC IDs"
        )));
    }
    if let Some(r) = pci_intx.iter().find(|r| r.bus != 0) {
        return Err(BootError::InvalidPlatform(format!(
            "PCI bus {} is configured: the MP table cannot describe more than one PCI hierarchy (set x86.mptable=false)",
            r.bus
        )));
    }
    if let Some(r) = pci_intx
        .iter()
        .find(|r| r.slot > 31 || !(1..=4).contains(&r.pin) || r.gsi > 0xFF)
    {
        return Err(BootError::InvalidPlatform(format!(
            "INTx route {r:?}: slot 0-31, pin 1-4, IOAPIC pin below 256"
        )));
    }

    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..cpus {
        let mut e = [0u8; 20];
        e[0] = ENTRY_PROCESSOR;
        e[1] = cpu as u8;
        e[2] = LAPIC_VERSION;
        e[3] = if cpu == 0 { 0x3 } else { 0x1 }; // enabled, BSP
        e[4..8].copy_from_slice(&CPU_SIGNATURE.to_le_bytes());
        e[8..12].copy_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&e);
        count += 1;
    }
    for (id, name) in [(PCI_BUS_ID, b"PCI   "), (ISA_BUS_ID, b"ISA   ")] {
        entries.extend_from_slice(&[ENTRY_BUS, id]);
        entries.extend_from_slice(name);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_IOAPIC, IOAPIC_ID, IOAPIC_VERSION, 0x1]);
    entries.extend_from_slice(&(IOAPIC_BASE as u32).to_le_bytes());
    count += 1;
    for pin in 0u8..16 {
        let e = match u32::from(pin) {
            0 => io_int(INT_TYPE_EXTINT, 0, ISA_BUS_ID, 0, pin),
            2 => io_int(INT_TYPE_INT, 0, ISA_BUS_ID, 0, pin),
            p if p == SCI_IRQ => io_int(
                INT_TYPE_INT,
                INT_FLAGS_ACTIVE_LOW_LEVEL,
                ISA_BUS_ID,
                pin,
                pin,
            ),
            _ => io_int(INT_TYPE_INT, 0, ISA_BUS_ID, pin, pin),
        };
        entries.extend_from_slice(&e);
        count += 1;
    }
    let mut routes = pci_intx.to_vec();
    routes.sort_by_key(|r| (r.slot, r.pin));
    for r in &routes {
        let bus_irq = (r.slot << 2) | (r.pin - 1);
        entries.extend_from_slice(&io_int(INT_TYPE_INT, 0, r.bus, bus_irq, r.gsi as u8));
        count += 1;
    }
    for (int_type, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INT, int_type, 0, 0, 0, 0, 0xFF, lint]);
        count += 1;
    }

    let table_len = 44 + entries.len();
    let total = 16 + table_len as u64;
    let limit = SMBIOS_BASE - MPTABLE_BASE;
    if total > limit {
        return Err(BootError::TableTooLarge {
            what: "the MP table",
            size: total,
            base: MPTABLE_BASE,
            limit: SMBIOS_BASE,
        });
    }

    let mut header = vec![0u8; 44];
    header[0..4].copy_from_slice(b"PCMP");
    header[4..6].copy_from_slice(&(table_len as u16).to_le_bytes());
    header[6] = SPEC_REV;
    header[8..16].copy_from_slice(OEM_ID);
    header[16..28].copy_from_slice(PRODUCT_ID);
    header[34..36].copy_from_slice(&count.to_le_bytes());
    header[36..40].copy_from_slice(&(LAPIC_BASE as u32).to_le_bytes());
    header.extend_from_slice(&entries);
    header[7] = checksum(&header);

    let mut floating = vec![0u8; 16];
    floating[0..4].copy_from_slice(b"_MP_");
    floating[4..8].copy_from_slice(&((MPTABLE_BASE + 16) as u32).to_le_bytes());
    floating[8] = 1; // length in 16-byte units
    floating[9] = SPEC_REV;
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&header);
    Ok(floating)
}

/// Write the MP table at [`MPTABLE_BASE`].
pub fn write_mptable(
    mem: &GuestMemoryMmap,
    cpus: u32,
    pci_intx: &[PciIntxRoute],
) -> Result<(), BootError> {
    let table = build_mptable(cpus, pci_intx)?;
    write_guest(mem, MPTABLE_BASE, &table, "MP table")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes() -> Vec<PciIntxRoute> {
        vec![
            PciIntxRoute {
                bus: 0,
                slot: 4,
                pin: 2,
                gsi: 18,
                pirq: 2,
            },
            PciIntxRoute {
                bus: 0,
                slot: 3,
                pin: 1,
                gsi: 17,
                pirq: 1,
            },
        ]
    }

    #[test]
    fn checksums_lengths_and_counts() {
        let t = build_mptable(2, &routes()).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(checksum(&t[..16]), 0);
        assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()), 0xF0010);
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(checksum(table), 0);
        assert_eq!(&table[8..16], b"BHyVe   ");
        // 2 CPUs + 2 buses + IOAPIC + 16 ISA + 2 PCI + 2 local.
        assert_eq!(u16::from_le_bytes([table[34], table[35]]), 25);
        assert_eq!(len, 44 + 2 * 20 + 25 * 8 - 2 * 8);
    }

    #[test]
    fn entries_match_bhyve() {
        let t = build_mptable(2, &routes()).unwrap();
        let e = &t[16 + 44..];
        assert_eq!(&e[0..4], &[0, 0, 16, 3]);
        assert_eq!(&e[20..24], &[0, 1, 16, 1]);
        assert_eq!(&e[40..48], b"\x01\x00PCI   ");
        assert_eq!(&e[48..56], b"\x01\x01ISA   ");
        assert_eq!(&e[56..64], &[2, 0, 0x11, 1, 0, 0, 0xC0, 0xFE]);
        let ints = &e[64..];
        assert_eq!(&ints[0..8], &[3, 3, 0, 0, 1, 0, 0, 0], "pin 0 ExtINT");
        assert_eq!(&ints[16..24], &[3, 0, 0, 0, 1, 0, 0, 2], "IRQ0 on pin 2");
        assert_eq!(&ints[72..80], &[3, 0, 0xF, 0, 1, 9, 0, 9], "SCI");
        assert_eq!(&ints[128..136], &[3, 0, 0, 0, 0, 3 << 2, 0, 17]);
        assert_eq!(&ints[136..144], &[3, 0, 0, 0, 0, (4 << 2) | 1, 0, 18]);
        assert_eq!(&ints[144..152], &[4, 3, 0, 0, 0, 0, 0xFF, 0]);
        assert_eq!(&ints[152..160], &[4, 1, 0, 0, 0, 0, 0xFF, 1]);
    }

    #[test]
    fn other_buses_and_bad_counts_are_refused() {
        let mut r = routes();
        r[0].bus = 1;
        assert!(build_mptable(1, &r).is_err());
        assert!(build_mptable(0, &[]).is_err());
        assert!(build_mptable(256, &[]).is_err());
        assert!(build_mptable(64, &routes()).is_ok());
    }
}
