//! The DSDT, encoded as AML with `acpi_tables::aml` (bhyve writes ASL and
//! runs iasl; the namespace here is the same).
//!
//! ```text
//! \_S5, \PICM, \_PIC
//! \_SB.PC00            PCI host bridge: _BBN, _CRS windows, PPRT/APRT/_PRT
//! \_SB.PC00.ISA        LPC bridge (if any): PIRA-PIRH in its config space,
//!                      PIRV, LNKA-LNKH, SIO (PNP0C02), COMn, RTC, KBD/MOU,
//!                      PIC, TIMR
//! \_SB.PC00.HPET       PNP0103
//! \_SB.FWCF            QEMU0002, with `lpc.fwcfg=qemu` (bhyve's ACPI device
//!                      for fw_cfg, which Linux's qemu_fw_cfg driver binds)
//! ```
//! Without an LPC bridge the legacy devices sit directly below PC00 and
//! the PIC-mode routing table is empty (bhyve has no links then either).

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, And, Arg, Device, EISAName, Else, Equal, Field,
    FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If, LessThan, Local,
    Memory32Fixed, Method, MethodCall, Name, OpRegion, OpRegionSpace, Package, Path,
    ResourceTemplate, Return, Scope, ShiftLeft, Store, IO, ONE, ZERO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;
use rhyve_platform::layout::{
    ELCR_PORT, FWCFG_SELECTOR_PORT, GPE0_LEN, GPE0_PORT, HPET_BASE, HPET_SIZE, I8042_COMMAND_PORT,
    I8042_DATA_PORT, NMI_STATUS_PORT, PCI_ECAM_BASE, PCI_ECAM_SIZE, PM1A_CNT_PORT, PM1A_EVT_PORT,
    PM_TIMER_PORT, RESET_PORT, RTC_IRQ, RTC_PORT, SMI_CMD_PORT,
};

use crate::acpi::{AcpiPlatform, OEM_ID};
use crate::aml::{
    raw, refs, CreateWordField, Decrement, FindSetRightBit, IrqLevelLowShared, IrqNoFlags, Raw,
};

/// ISA IRQs a PIRQ link may be steered to (bhyve's `PERMITTED_IRQS`).
const LINK_IRQS: [u8; 11] = [3, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15];
const PIRQ_DISABLED: u8 = 0x80;
const PIRQ_IRQ_MASK: u8 = 0x0F;
const LINK_NAMES: [&str; 8] = ["A", "B", "C", "D", "E", "F", "G", "H"];

fn name(n: &str, value: &dyn Aml) -> Raw {
    raw(&Name::new(n.into(), value))
}

fn hid(eisa: &str) -> Raw {
    name("_HID", &EISAName::new(eisa))
}

/// `Device (n) { _HID; _CRS }` with a fixed resource list.
fn fixed_device(n: &str, eisa: &str, resources: &[Raw]) -> Raw {
    let children = [
        hid(eisa),
        name("_CRS", &ResourceTemplate::new(refs(resources))),
    ];
    raw(&Device::new(n.into(), refs(&children)))
}

fn io(port: u16, len: u8) -> Raw {
    raw(&IO::new(port, port, 1, len))
}

fn irq(n: u8) -> Raw {
    raw(&IrqNoFlags(vec![n]))
}

/// `Method (PIRV, 1)`: is a PIRx register value a usable IRQ (mirrors
/// the PCI layer's check).
fn pirv_method() -> Raw {
    let ret0 = raw(&Return::new(&ZERO));
    let masked = raw(&And::new(&ZERO, &Arg(0), &PIRQ_DISABLED));
    let extract = raw(&And::new(&Local(0), &Arg(0), &PIRQ_IRQ_MASK));
    let below3 = raw(&LessThan::new(&Local(0), &3u8));
    let is8 = raw(&Equal::new(&Local(0), &8u8));
    let is13 = raw(&Equal::new(&Local(0), &13u8));
    let body = [
        raw(&If::new(&masked, vec![&ret0])),
        extract,
        raw(&If::new(&below3, vec![&ret0])),
        raw(&If::new(&is8, vec![&ret0])),
        raw(&If::new(&is13, vec![&ret0])),
        raw(&Return::new(&ONE)),
    ];
    raw(&Method::new("PIRV".into(), 1, false, refs(&body)))
}

/// `Device (LNKx)`: PCI interrupt link `index` steered by register PIRx.
fn link_device(index: usize) -> Raw {
    let letter = LINK_NAMES[index];
    let reg = Path::new(&format!("PIR{letter}"));
    let current = Path::new(&format!("CIR{letter}"));
    let buffer = Path::new(&format!("CB0{}", index + 1));
    let set_word = Path::new(&format!("SIR{letter}"));
    let uid = (index + 1) as u8;

    let valid = raw(&MethodCall::new("PIRV".into(), vec![&reg]));
    let sta = raw(&Method::new(
        "_STA".into(),
        0,
        false,
        vec![
            &raw(&If::new(&valid, vec![&raw(&Return::new(&0x0Bu8))])),
            &raw(&Else::new(vec![&raw(&Return::new(&0x09u8))])),
        ],
    ));
    let prs = name(
        "_PRS",
        &ResourceTemplate::new(vec![&IrqLevelLowShared(LINK_IRQS.to_vec())]),
    );
    let cb = raw(&Name::new(
        Path::new(&format!("CB0{}", index + 1)),
        &ResourceTemplate::new(vec![&IrqLevelLowShared(Vec::new())]),
    ));
    let cir = raw(&CreateWordField {
        source: &buffer,
        byte_index: &ONE,
        name: &current,
    });
    let local_valid = raw(&MethodCall::new("PIRV".into(), vec![&Local(0)]));
    let crs = raw(&Method::new(
        "_CRS".into(),
        0,
        false,
        vec![
            &raw(&And::new(&Local(0), &reg, &(PIRQ_DISABLED | PIRQ_IRQ_MASK))),
            &raw(&If::new(
                &local_valid,
                vec![&raw(&ShiftLeft::new(&current, &ONE, &Local(0)))],
            )),
            &raw(&Else::new(vec![&raw(&Store::new(&current, &ZERO))])),
            &raw(&Return::new(&buffer)),
        ],
    ));
    let dis = raw(&Method::new(
        "_DIS".into(),
        0,
        false,
        vec![&raw(&Store::new(&reg, &PIRQ_DISABLED))],
    ));
    let srs = raw(&Method::new(
        "_SRS".into(),
        1,
        false,
        vec![
            &raw(&CreateWordField {
                source: &Arg(0),
                byte_index: &ONE,
                name: &set_word,
            }),
            &raw(&FindSetRightBit {
                operand: &set_word,
                target: &Local(0),
            }),
            &raw(&Store::new(&reg, &Decrement(&Local(0)))),
        ],
    ));
    let children = [
        hid("PNP0C0F"),
        name("_UID", &uid),
        sta,
        prs,
        cb,
        cir,
        crs,
        dis,
        srs,
    ];
    raw(&Device::new(
        Path::new(&format!("LNK{letter}")),
        refs(&children),
    ))
}

/// The motherboard resources: PM block, SMI command, reset, ELCR, NMI
/// status and the ECAM window, so the OS keeps them out of its allocator.
fn system_resources() -> Raw {
    let resources = [
        io(ELCR_PORT, 2),
        io(NMI_STATUS_PORT, 1),
        io(SMI_CMD_PORT, 1),
        io(PM1A_EVT_PORT, 4),
        io(PM1A_CNT_PORT, 2),
        io(PM_TIMER_PORT, 4),
        io(GPE0_PORT, GPE0_LEN as u8),
        io(RESET_PORT, 1),
        raw(&Memory32Fixed::new(
            true,
            PCI_ECAM_BASE as u32,
            PCI_ECAM_SIZE as u32,
        )),
    ];
    fixed_device("SIO_", "PNP0C02", &resources)
}

/// The ISA devices bhyve lists under its LPC bridge.
fn legacy_devices(p: &AcpiPlatform) -> Vec<Raw> {
    let mut devices = vec![system_resources()];
    for &(port, irq_num, uid) in &p.com_ports {
        let children = [
            hid("PNP0501"),
            name("_UID", &uid),
            name(
                "_CRS",
                &ResourceTemplate::new(refs(&[io(port, 8), irq(irq_num as u8)])),
            ),
        ];
        devices.push(raw(&Device::new(
            Path::new(&format!("COM{uid}")),
            refs(&children),
        )));
    }
    devices.push(fixed_device(
        "RTC_",
        "PNP0B00",
        &[io(RTC_PORT, 2), irq(RTC_IRQ as u8)],
    ));
    if p.i8042 {
        let ports = || [io(I8042_DATA_PORT, 1), io(I8042_COMMAND_PORT, 1)];
        let [d, c] = ports();
        devices.push(fixed_device("KBD_", "PNP0303", &[d, c, irq(1)]));
        let [d, c] = ports();
        devices.push(fixed_device("MOU_", "PNP0F13", &[d, c, irq(12)]));
    }
    devices.push(fixed_device(
        "PIC_",
        "PNP0000",
        &[io(0x20, 2), io(0xA0, 2), irq(2)],
    ));
    devices.push(fixed_device("TIMR", "PNP0100", &[io(0x40, 4), irq(0)]));
    devices
}

/// `Device (ISA)`: the LPC bridge with its PIRQ registers and links.
fn lpc_device(p: &AcpiPlatform, slot: u8, func: u8) -> Raw {
    let adr = (u32::from(slot) << 16) | u32::from(func);
    let offset = raw(&ZERO);
    let length = raw(&0x100u16);
    let mut fields = vec![FieldEntry::Reserved(0x60 * 8)];
    for letter in &LINK_NAMES[..4] {
        fields.push(FieldEntry::Named(pir_name(letter), 8));
    }
    fields.push(FieldEntry::Reserved(4 * 8));
    for letter in &LINK_NAMES[4..] {
        fields.push(FieldEntry::Named(pir_name(letter), 8));
    }
    let mut children = vec![
        name("_ADR", &adr),
        raw(&OpRegion::new(
            "LPCR".into(),
            OpRegionSpace::PCIConfig,
            &offset,
            &length,
        )),
        raw(&Field::new(
            "LPCR".into(),
            FieldAccessType::Any,
            FieldLockRule::NoLock,
            FieldUpdateRule::Preserve,
            fields,
        )),
        pirv_method(),
    ];
    children.extend((0..LINK_NAMES.len()).map(link_device));
    children.extend(legacy_devices(p));
    raw(&Device::new("ISA_".into(), refs(&children)))
}

fn pir_name(letter: &str) -> [u8; 4] {
    let mut n = *b"PIR_";
    n[3] = letter.as_bytes()[0];
    n
}

/// Host bridge `_CRS`: bus 0, the config ports, legacy I/O and the windows.
fn host_bridge_crs(p: &AcpiPlatform) -> Raw {
    let w = p.windows();
    let mut resources = vec![
        raw(&AddressSpace::<u16>::new_bus_number(0, 0)),
        io(0xCF8, 8),
        raw(&AddressSpace::<u16>::new_io(0, 0xCF7, None)),
    ];
    if w.io_base > 0xD00 {
        resources.push(raw(&AddressSpace::<u16>::new_io(
            0xD00,
            w.io_base - 1,
            None,
        )));
    }
    // validate() keeps io_limit within 16 bits and above io_base.
    let io_max = (w.io_limit - 1) as u16;
    resources.push(raw(&AddressSpace::<u16>::new_io(w.io_base, io_max, None)));
    resources.push(raw(&AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        w.mmio32_base as u32,
        (w.mmio32_limit - 1) as u32,
        None,
    )));
    resources.push(raw(&AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        w.mmio64_base,
        w.mmio64_limit - 1,
        None,
    )));
    name("_CRS", &ResourceTemplate::new(refs(&resources)))
}

/// `PPRT`, `APRT` and `_PRT` choosing between them on `PICM`.
fn routing_tables(p: &AcpiPlatform) -> Vec<Raw> {
    let mut routes = p.pci_intx.clone();
    routes.sort_by_key(|r| (r.slot, r.pin));
    let entry = |r: &crate::acpi::PciIntxRoute, source: &dyn Aml, index: u32| {
        let address = (u32::from(r.slot) << 16) | 0xFFFF;
        let pin = r.pin - 1;
        raw(&Package::new(vec![&address, &pin, source, &index]))
    };
    let pic: Vec<Raw> = if p.lpc.is_some() {
        routes
            .iter()
            .map(|r| {
                let link = Path::new(&format!(
                    "\\_SB_.PC00.ISA_.LNK{}",
                    LINK_NAMES[usize::from(r.pirq)]
                ));
                entry(r, &link, 0)
            })
            .collect()
    } else {
        Vec::new()
    };
    let apic: Vec<Raw> = routes.iter().map(|r| entry(r, &ZERO, r.gsi)).collect();
    let prt = raw(&Method::new(
        "_PRT".into(),
        0,
        false,
        vec![
            &raw(&If::new(
                &Path::new("PICM"),
                vec![&raw(&Return::new(&Path::new("APRT")))],
            )),
            &raw(&Else::new(vec![&raw(&Return::new(&Path::new("PPRT")))])),
        ],
    ));
    vec![
        name("PPRT", &Package::new(refs(&pic))),
        name("APRT", &Package::new(refs(&apic))),
        prt,
    ]
}

fn host_bridge(p: &AcpiPlatform) -> Raw {
    let mut children = vec![
        hid("PNP0A03"),
        name("_UID", &ZERO),
        name("_BBN", &ZERO),
        host_bridge_crs(p),
    ];
    children.extend(routing_tables(p));
    match p.lpc {
        Some((slot, func)) => children.push(lpc_device(p, slot, func)),
        None => children.extend(legacy_devices(p)),
    }
    let hpet = [
        hid("PNP0103"),
        name("_UID", &ZERO),
        name(
            "_CRS",
            &ResourceTemplate::new(vec![&Memory32Fixed::new(
                true,
                HPET_BASE as u32,
                HPET_SIZE as u32,
            )]),
        ),
    ];
    children.push(raw(&Device::new("HPET".into(), refs(&hpet))));
    raw(&Device::new("PC00".into(), refs(&children)))
}

/// What `\_SB` holds: the host bridge, and fw_cfg's device when present.
fn system_bus(p: &AcpiPlatform) -> Vec<Raw> {
    let mut devices = vec![host_bridge(p)];
    if p.qemu_fwcfg {
        let children = [
            name("_HID", &"QEMU0002"),
            name("_STA", &0x0Fu8),
            name(
                "_CRS",
                &ResourceTemplate::new(refs(&[io(FWCFG_SELECTOR_PORT, 2)])),
            ),
        ];
        devices.push(raw(&Device::new("FWCF".into(), refs(&children))));
    }
    devices
}

/// The whole DSDT table (header included).
pub fn build_dsdt(p: &AcpiPlatform) -> Vec<u8> {
    let s5 = raw(&Package::new(vec![&5u8, &ZERO]));
    let body = [
        name("_S5_", &s5),
        name("PICM", &ZERO),
        raw(&Method::new(
            "_PIC".into(),
            1,
            false,
            vec![&raw(&Store::new(&Path::new("PICM"), &Arg(0)))],
        )),
        raw(&Scope::new("\\_SB_".into(), refs(&system_bus(p)))),
    ];
    let mut t = Sdt::new(*b"DSDT", 36, 2, OEM_ID, *b"BVDSDT  ", 1);
    t.write_bytes(28, b"BASL");
    t.write_u32(32, 0x2022_0504);
    for term in &body {
        t.append_slice(&term.0);
    }
    t.as_slice().to_vec()
}
