//! A test driver written from the PCI Local Bus and PCIe specs: it reaches
//! the emulated hierarchy only through the platform buses, as a vCPU does
//! (port I/O at 0xCF8/0xCFC, MMIO in the ECAM window and in BARs).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use rhyve_config::ConfigTree;
use rhyve_pci::{
    create_function, regs, BarKind, PciBdf, PciConfigSpace, PciError, PciFunction, PciIntxRoute,
    PciRoot, PciRootConfig, SharedFunction,
};
use rhyve_platform::bus::{Bus, BusDevice};
use rhyve_platform::irq::{InterruptController, InterruptLine, MsiSender};
use rhyve_platform::layout::{MemoryLayout, IOAPIC_PINS, PCI_ECAM_BASE};

// ---- a fake interrupt controller ----

#[derive(Default)]
struct Irqs {
    levels: Mutex<BTreeMap<u32, bool>>,
    msis: Mutex<Vec<(u64, u32)>>,
}

struct Line(Arc<Irqs>, u32);
impl InterruptLine for Line {
    fn set_level(&self, asserted: bool) {
        self.0.levels.lock().unwrap().insert(self.1, asserted);
    }
}

struct Msi(Arc<Irqs>);
impl MsiSender for Msi {
    fn send(&self, address: u64, data: u32) {
        self.0.msis.lock().unwrap().push((address, data));
    }
}

struct Controller(Arc<Irqs>);
impl InterruptController for Controller {
    fn line(&self, gsi: u32) -> Arc<dyn InterruptLine> {
        Arc::new(Line(self.0.clone(), gsi))
    }
    fn msi(&self) -> Arc<dyn MsiSender> {
        Arc::new(Msi(self.0.clone()))
    }
}

impl Irqs {
    fn level(&self, gsi: u32) -> bool {
        self.levels
            .lock()
            .unwrap()
            .get(&gsi)
            .copied()
            .unwrap_or(false)
    }
}

// ---- a test function: I/O scratch BAR, MSI-X BAR, big 64-bit BAR ----

struct TestDev {
    config: PciConfigSpace,
    io: [u8; 32],
    moves: Vec<(usize, Option<u64>)>,
}

impl TestDev {
    fn new(device: u16, msix: bool, big_bar: bool) -> Self {
        let mut config = PciConfigSpace::new(0x10DD, device, 0x02, 0x00, 0x00);
        config.add_bar(0, BarKind::Io, 20).unwrap();
        if msix {
            config.add_msix_capability(3, 1).unwrap();
        }
        if big_bar {
            config.add_bar(2, BarKind::Mem64, 256 << 20).unwrap();
        }
        config.add_msi_capability(4).unwrap();
        config.request_intx();
        Self {
            config,
            io: [0; 32],
            moves: Vec::new(),
        }
    }

    fn shared(self) -> (Arc<Mutex<TestDev>>, SharedFunction) {
        let dev = Arc::new(Mutex::new(self));
        let f: SharedFunction = dev.clone();
        (dev, f)
    }
}

impl PciFunction for TestDev {
    fn config(&self) -> &PciConfigSpace {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfigSpace {
        &mut self.config
    }
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if self.config.msix_read(bar, offset, data) {
            return;
        }
        data.fill(0);
        if bar == 0 {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.io[(offset as usize + i) % 32];
            }
        }
    }
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if self.config.msix_write(bar, offset, data) {
            return;
        }
        if bar == 0 {
            for (i, b) in data.iter().enumerate() {
                self.io[(offset as usize + i) % 32] = *b;
            }
        }
    }
    fn bar_moved(&mut self, bar: usize, base: Option<u64>) {
        self.moves.push((bar, base));
    }
}

// ---- the machine and the driver ----

struct Machine {
    io: Arc<Bus>,
    mmio: Arc<Bus>,
    irqs: Arc<Irqs>,
    root: Arc<PciRoot>,
    layout: MemoryLayout,
}

fn machine_with(bootrom: bool, mem: u64) -> Machine {
    let io = Arc::new(Bus::new());
    let mmio = Arc::new(Bus::new());
    let irqs = Arc::new(Irqs::default());
    let layout = MemoryLayout::new(mem);
    let root = PciRoot::new(PciRootConfig {
        io_bus: io.clone(),
        mmio_bus: mmio.clone(),
        layout,
        interrupts: Arc::new(Controller(irqs.clone())),
        ioapic_pins: IOAPIC_PINS,
        bootrom,
        enable_bars: !bootrom,
    })
    .unwrap();
    Machine {
        io,
        mmio,
        irqs,
        root,
        layout,
    }
}

fn machine() -> Machine {
    machine_with(false, 8 << 30)
}

fn bdf(bus: u8, slot: u8, func: u8) -> PciBdf {
    PciBdf { bus, slot, func }
}

impl Machine {
    fn add_model(&self, model: &str, tree: &ConfigTree, at: PciBdf) -> Result<(), PciError> {
        let f = create_function(model, tree, &at.node(), &self.root.context())?;
        self.root.add_function(at, f)
    }

    fn select(&self, at: PciBdf, reg: u16) {
        let addr = 0x8000_0000
            | u32::from(at.bus) << 16
            | u32::from(at.slot) << 11
            | u32::from(at.func) << 8
            | u32::from(reg & 0xFC);
        assert!(self.io.write(0xCF8, &addr.to_le_bytes()));
    }

    /// Mechanism #1 read of `size` bytes.
    fn cf8_read(&self, at: PciBdf, reg: u16, size: usize) -> u32 {
        self.select(at, reg);
        let mut b = [0u8; 4];
        self.io.read(0xCFC + u64::from(reg & 3), &mut b[..size]);
        u32::from_le_bytes(b)
    }

    fn cf8_write(&self, at: PciBdf, reg: u16, size: usize, value: u32) {
        self.select(at, reg);
        self.io
            .write(0xCFC + u64::from(reg & 3), &value.to_le_bytes()[..size]);
    }

    fn ecam_addr(at: PciBdf, reg: u16) -> u64 {
        PCI_ECAM_BASE
            + (u64::from(at.bus) << 20)
            + (u64::from(at.slot) << 15)
            + (u64::from(at.func) << 12)
            + u64::from(reg)
    }

    fn ecam_read(&self, at: PciBdf, reg: u16, size: usize) -> u32 {
        let mut b = [0u8; 4];
        self.mmio.read(Self::ecam_addr(at, reg), &mut b[..size]);
        u32::from_le_bytes(b)
    }

    fn ecam_write(&self, at: PciBdf, reg: u16, size: usize, value: u32) {
        self.mmio
            .write(Self::ecam_addr(at, reg), &value.to_le_bytes()[..size]);
    }

    /// Size BAR `i` the way the spec says: decode off, write ones, read,
    /// restore. Returns (raw probe value, size).
    fn size_bar(&self, at: PciBdf, i: u16) -> (u32, u64) {
        let reg = 0x10 + 4 * i;
        let cmd = self.cf8_read(at, 4, 2);
        self.cf8_write(at, 4, 2, cmd & !3);
        let old = self.cf8_read(at, reg, 4);
        self.cf8_write(at, reg, 4, u32::MAX);
        let probe = self.cf8_read(at, reg, 4);
        self.cf8_write(at, reg, 4, old);
        self.cf8_write(at, 4, 2, cmd);
        if probe == 0 {
            return (0, 0);
        }
        let mask = if probe & 1 != 0 {
            probe & !3 | 0xFFFF_0000
        } else {
            probe & !0xF
        };
        (probe, u64::from(!mask) + 1)
    }
}

fn standard_machine() -> (Machine, Arc<Mutex<TestDev>>, Arc<Mutex<TestDev>>) {
    let m = machine();
    let tree = ConfigTree::new();
    m.add_model("hostbridge", &tree, bdf(0, 0, 0)).unwrap();
    let (a, fa) = TestDev::new(0x0001, true, true).shared();
    m.root.add_function(bdf(0, 3, 0), fa).unwrap();
    let (b, fb) = TestDev::new(0x0002, false, false).shared();
    m.root.add_function(bdf(0, 4, 0), fb).unwrap();
    m.add_model("lpc", &tree, bdf(0, 31, 0)).unwrap();
    m.root.finalize().unwrap();
    (m, a, b)
}

#[test]
fn enumeration_through_both_mechanisms() {
    let (m, _, _) = standard_machine();
    let mut found = Vec::new();
    for slot in 0..32 {
        let id = m.cf8_read(bdf(0, slot, 0), 0, 4);
        assert_eq!(id, m.ecam_read(bdf(0, slot, 0), 0, 4));
        if id != 0xFFFF_FFFF {
            found.push((slot, id));
        }
    }
    assert_eq!(
        found,
        vec![
            (0, 0x1275_1275),
            (3, 0x0001_10DD),
            (4, 0x0002_10DD),
            (31, 0x7000_8086)
        ]
    );
    // Class codes and header types.
    assert_eq!(m.cf8_read(bdf(0, 0, 0), 8, 4) >> 8, 0x06_00_00);
    assert_eq!(m.cf8_read(bdf(0, 31, 0), 8, 4) >> 8, 0x06_01_00);
    assert_eq!(m.cf8_read(bdf(0, 0, 0), 0x0E, 1), 0);
    // Host bridge: PCIe root port capability at 0x40, version 2.
    assert_eq!(m.cf8_read(bdf(0, 0, 0), 6, 2) & 0x10, 0x10);
    assert_eq!(m.cf8_read(bdf(0, 0, 0), 0x34, 1), 0x40);
    assert_eq!(m.cf8_read(bdf(0, 0, 0), 0x40, 4), 0x0042_0010);
    // Absent functions, buses and other functions of a present slot.
    assert_eq!(m.cf8_read(bdf(0, 3, 1), 0, 4), 0xFFFF_FFFF);
    assert_eq!(m.cf8_read(bdf(7, 0, 0), 0, 2), 0xFFFF);
    assert_eq!(m.ecam_read(bdf(255, 31, 7), 0xFFC, 4), 0xFFFF_FFFF);
    // Extended space: empty capability header, then all ones.
    assert_eq!(m.ecam_read(bdf(0, 3, 0), 0x100, 4), 0);
    assert_eq!(m.ecam_read(bdf(0, 3, 0), 0x104, 4), 0xFFFF_FFFF);
    // Interrupt pin/line registers: INTA, line from the PIRQ router.
    assert_eq!(m.cf8_read(bdf(0, 3, 0), 0x3D, 1), 1);
    assert_eq!(
        m.cf8_read(bdf(0, 0, 0), 0x3C, 2),
        0x00FF,
        "no INTx: line 255, pin 0"
    );
}

#[test]
fn multifunction_bit_reflects_the_slot() {
    let m = machine();
    for func in [0, 5] {
        let (_, f) = TestDev::new(func.into(), false, false).shared();
        m.root.add_function(bdf(0, 6, func), f).unwrap();
    }
    let (_, f) = TestDev::new(9, false, false).shared();
    m.root.add_function(bdf(0, 7, 0), f).unwrap();
    m.root.finalize().unwrap();
    assert_eq!(m.cf8_read(bdf(0, 6, 0), 0x0E, 1), 0x80);
    assert_eq!(m.ecam_read(bdf(0, 6, 5), 0x0C, 4) >> 16 & 0xFF, 0x80);
    assert_eq!(m.cf8_read(bdf(0, 7, 0), 0x0E, 1), 0);
    assert_eq!(m.cf8_read(bdf(0, 6, 1), 0, 4), 0xFFFF_FFFF);
}

#[test]
fn byte_word_and_malformed_accesses() {
    let (m, _, _) = standard_machine();
    let lpc = bdf(0, 31, 0);
    assert_eq!(m.cf8_read(lpc, 0, 1), 0x86);
    assert_eq!(m.cf8_read(lpc, 1, 1), 0x80);
    assert_eq!(m.cf8_read(lpc, 2, 2), 0x7000);
    assert_eq!(m.cf8_read(lpc, 0x0B, 1), 0x06);
    assert_eq!(m.ecam_read(lpc, 0x0A, 2), 0x0601);
    // A word at 0xCFD is misaligned: all ones.
    m.select(lpc, 0);
    let mut w = [0u8; 2];
    m.io.read(0xCFD, &mut w);
    assert_eq!(w, [0xFF, 0xFF]);
    // CONFIG_ADDRESS: dword only, reads back what was selected.
    m.select(lpc, 0x3C);
    let mut d = [0u8; 4];
    m.io.read(0xCF8, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x8000_F83C);
    let mut b = [0u8; 1];
    m.io.read(0xCF8, &mut b);
    assert_eq!(b, [0xFF]);
    m.io.write(0xCF8, &[0]);
    m.io.read(0xCF8, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x8000_F83C, "byte writes ignored");
    // Enable bit clear: data port reads all ones.
    m.io.write(0xCF8, &0x0000_F800u32.to_le_bytes());
    m.io.read(0xCFC, &mut d);
    assert_eq!(d, [0xFF; 4]);
    // Writable byte: interrupt line; read-only: IDs.
    m.cf8_write(lpc, 0x3C, 1, 0x0B);
    assert_eq!(m.cf8_read(lpc, 0x3C, 1), 0x0B);
    m.ecam_write(lpc, 0, 4, 0);
    assert_eq!(m.cf8_read(lpc, 0, 4), 0x7000_8086);
    // An 8-byte ECAM access is not a config access.
    let mut q = [0u8; 8];
    m.mmio.read(Machine::ecam_addr(lpc, 0), &mut q);
    assert_eq!(q, [0xFF; 8]);
}

#[test]
fn bar_allocation_sizing_and_moving() {
    let (m, a, b) = standard_machine();
    let (dev_a, dev_b) = (bdf(0, 3, 0), bdf(0, 4, 0));
    // Sizes: I/O 20 -> 32 ports, MSI-X table+PBA 4096+8 -> 8 KiB, 256 MiB 64-bit.
    // I/O BARs decode 16 bits, so the probe reads back 0xFFE1 (as bhyve).
    assert_eq!(m.size_bar(dev_a, 0), (0xFFE1, 32));
    assert_eq!(m.size_bar(dev_a, 1), (0xFFFF_E000, 8192));
    assert_eq!(m.size_bar(dev_a, 2).0, 0xF000_0004);
    assert_eq!(m.size_bar(dev_a, 4), (0, 0), "unimplemented BAR reads 0");
    // Allocation as bhyve: I/O from 0x2000 in slot order for equal sizes,
    // 32-bit memory from 0xC0000000, big 64-bit BARs above RAM.
    assert_eq!(m.cf8_read(dev_a, 0x10, 4), 0x2001);
    assert_eq!(m.cf8_read(dev_b, 0x10, 4), 0x2021);
    assert_eq!(m.cf8_read(dev_a, 0x14, 4), 0xC000_0000);
    let base64 = m.layout.pci_mmio64_base();
    assert_eq!(
        u64::from(m.cf8_read(dev_a, 0x18, 4) & !0xF) | u64::from(m.cf8_read(dev_a, 0x1C, 4)) << 32,
        base64
    );
    // Decoding and bus mastering on, as bhyve without a boot ROM.
    assert_eq!(m.cf8_read(dev_a, 4, 2), 0x7);
    // The I/O BAR answers on the port bus.
    assert!(m.io.write(0x2004, &[0xAB, 0xCD]));
    let mut w = [0u8; 2];
    assert!(m.io.read(0x2004, &mut w));
    assert_eq!(w, [0xAB, 0xCD]);
    assert!(m.mmio.contains(base64));
    // Move the I/O BAR: old ports go dead, new ones answer.
    m.cf8_write(dev_a, 0x10, 4, 0x3000);
    assert_eq!(m.cf8_read(dev_a, 0x10, 4), 0x3001);
    assert!(!m.io.contains(0x2004));
    assert!(m.io.read(0x3004, &mut w));
    assert_eq!(w, [0xAB, 0xCD]);
    // Decode off: nothing mapped; on again: back.
    m.cf8_write(dev_a, 4, 2, 0x4);
    assert!(!m.io.contains(0x3000));
    assert!(!m.mmio.contains(0xC000_0000));
    m.cf8_write(dev_a, 4, 2, 0x7);
    assert!(m.io.contains(0x3000) && m.mmio.contains(0xC000_0000));
    // Moving the 64-bit BAR takes both halves.
    m.cf8_write(dev_a, 0x1C, 4, 0x10);
    m.cf8_write(dev_a, 0x18, 4, 0x2000_0000);
    assert!(m.mmio.contains(0x10_2000_0000));
    assert!(!m.mmio.contains(base64));
    let moves = a.lock().unwrap().moves.clone();
    assert_eq!(moves.last(), Some(&(2, Some(0x10_2000_0000))));
    // Hostile programming never fails the VMM and maps nothing bad:
    // addresses beyond 64 KiB of ports, a BAR on top of another device's,
    // a memory BAR on top of ECAM.
    m.cf8_write(dev_a, 0x10, 4, 0x1_FFF0);
    assert_eq!(m.cf8_read(dev_a, 0x10, 4), 0xFFE1, "ports wrap at 64 KiB");
    assert!(m.io.contains(0xFFFF));
    m.cf8_write(dev_a, 0x10, 4, 0x2020);
    assert!(m.io.read(0x2020, &mut w));
    m.io.write(0x2020, &[1, 2]);
    assert_eq!(b.lock().unwrap().io[0..2], [1, 2], "still device B's ports");
    m.cf8_write(dev_a, 0x14, 4, PCI_ECAM_BASE as u32);
    assert_eq!(m.ecam_read(dev_a, 0, 4), 0x0001_10DD, "ECAM still answers");
    m.cf8_write(dev_a, 0x10, 4, 0x4000);
    assert!(m.io.contains(0x4000), "a later good address maps again");
}

#[test]
fn bus_windows_and_64_bit_window_placement() {
    let m = machine_with(false, 512 << 20);
    let (_, f) = TestDev::new(1, true, true).shared();
    m.root.add_function(bdf(0, 3, 0), f).unwrap();
    let (_, f) = TestDev::new(2, false, false).shared();
    m.root.add_function(bdf(1, 0, 0), f).unwrap();
    m.root.finalize().unwrap();
    let w = m.root.bus_windows();
    assert_eq!(w.len(), 2);
    assert_eq!((w[0].bus, w[0].io_base, w[0].io_limit), (0, 0x2000, 0x2040));
    // Used space plus bhyve's slop, rounded: 8 KiB + 1 MiB -> 2 MiB,
    // 256 MiB + 512 MiB -> 1 GiB.
    assert_eq!(
        (w[0].mem32_base, w[0].mem32_limit),
        (0xC000_0000, 0xC020_0000)
    );
    assert_eq!(w[0].mem64_base, 32 << 30);
    assert_eq!(w[0].mem64_limit, 33 << 30);
    assert_eq!(w[1].mem32_base, 0xC020_0000);
    assert_eq!((w[1].bus, w[1].io_base, w[1].io_limit), (1, 0x2040, 0x2080));
    assert_eq!(m.cf8_read(bdf(1, 0, 0), 0x10, 4), 0x2041);
}

#[test]
fn intx_routing_table_and_levels() {
    let m = machine();
    let tree = ConfigTree::new();
    m.add_model("hostbridge", &tree, bdf(0, 0, 0)).unwrap();
    let mut devs = BTreeMap::new();
    for (slot, func) in [(3, 0), (4, 0), (5, 0), (5, 1), (5, 2), (6, 0)] {
        let (d, f) = TestDev::new(u16::from(slot), false, false).shared();
        m.root.add_function(bdf(0, slot, func), f).unwrap();
        devs.insert((slot, func), d);
    }
    m.add_model("lpc", &tree, bdf(0, 31, 0)).unwrap();
    m.root.finalize().unwrap();
    let route = |slot, pin, gsi, pirq| PciIntxRoute {
        bus: 0,
        slot,
        pin,
        gsi,
        pirq,
    };
    // Pins round-robin over IOAPIC 16-23 and the 8 links, in bus/slot/func
    // order; slot 5's three functions take INTA, INTB, INTC.
    assert_eq!(
        m.root.intx_routes(),
        vec![
            route(3, 1, 16, 0),
            route(4, 1, 17, 1),
            route(5, 1, 18, 2),
            route(5, 2, 19, 3),
            route(5, 3, 20, 4),
            route(6, 1, 21, 5),
        ]
    );
    // Links took the free ISA IRQs, avoiding COM (3, 4), i8042 (12) and
    // the SCI (9); LPC shows them at 0x60-0x63/0x68-0x6B.
    assert_eq!(m.cf8_read(bdf(0, 31, 0), 0x60, 4), 0x0A07_0605);
    assert_eq!(m.cf8_read(bdf(0, 31, 0), 0x68, 4), 0x8080_0E0B);
    assert_eq!(
        m.root.intx_router().level_triggered_isa_irqs(),
        vec![5, 6, 7, 10, 11, 14]
    );
    assert_eq!(m.cf8_read(bdf(0, 5, 2), 0x3C, 2), 0x030B, "INTC, IRQ 11");
    // Assert: IOAPIC pin and the link's ISA IRQ go high.
    let d = devs[&(5, 1)].clone();
    d.lock().unwrap().config.intx_assert();
    assert!(m.irqs.level(19) && m.irqs.level(10));
    // INTx disable in the command register holds it back, re-enable resends.
    m.cf8_write(bdf(0, 5, 1), 4, 2, 0x407);
    assert!(!m.irqs.level(19) && !m.irqs.level(10));
    m.cf8_write(bdf(0, 5, 1), 4, 2, 0x007);
    assert!(m.irqs.level(19));
    // The guest re-points link D to IRQ 15 while it is raised.
    m.cf8_write(bdf(0, 31, 0), 0x63, 1, 0x0F);
    assert!(!m.irqs.level(10) && m.irqs.level(15));
    assert_eq!(m.cf8_read(bdf(0, 31, 0), 0x63, 1), 0x0F);
    // Disable the link: the ISA IRQ drops, the IOAPIC pin stays.
    m.cf8_write(bdf(0, 31, 0), 0x60, 4, 0x800A_0605);
    assert!(!m.irqs.level(15) && m.irqs.level(19));
    d.lock().unwrap().config.intx_deassert();
    assert!(!m.irqs.level(19));
    // Enabling MSI also masks INTx.
    let d3 = devs[&(3, 0)].clone();
    let msi = d3
        .lock()
        .unwrap()
        .config
        .find_capability(regs::CAP_ID_MSI)
        .unwrap();
    d3.lock().unwrap().config.intx_assert();
    assert!(m.irqs.level(16));
    m.cf8_write(bdf(0, 3, 0), msi + 2, 2, 1);
    assert!(!m.irqs.level(16));
}

#[test]
fn shared_lines_are_wired_or() {
    let m = machine();
    let mut devs = Vec::new();
    // Nine single-pin slots: the ninth shares IOAPIC pin 16 and link A.
    for slot in 1..=9 {
        let (d, f) = TestDev::new(slot.into(), false, false).shared();
        m.root.add_function(bdf(0, slot, 0), f).unwrap();
        devs.push(d);
    }
    m.root.finalize().unwrap();
    let routes = m.root.intx_routes();
    assert_eq!((routes[8].gsi, routes[8].pirq), (16, 0));
    devs[0].lock().unwrap().config.intx_assert();
    devs[8].lock().unwrap().config.intx_assert();
    devs[0].lock().unwrap().config.intx_deassert();
    assert!(m.irqs.level(16), "still held by the other function");
    devs[8].lock().unwrap().config.intx_deassert();
    assert!(!m.irqs.level(16));
}

#[test]
fn bootrom_uses_the_fixed_mapping_and_leaves_decoding_to_firmware() {
    let m = machine_with(true, 1 << 30);
    for slot in [2, 3, 7] {
        let (_, f) = TestDev::new(slot.into(), false, false).shared();
        m.root.add_function(bdf(0, slot, 0), f).unwrap();
    }
    m.root.finalize().unwrap();
    let got: Vec<(u8, u32, u8)> = m
        .root
        .intx_routes()
        .iter()
        .map(|r| (r.slot, r.gsi, r.pirq))
        .collect();
    // 16 + (4 + slot + pin) % 8 and link (4 + slot + pin) % 8.
    assert_eq!(got, vec![(2, 23, 7), (3, 16, 0), (7, 20, 4)]);
    assert_eq!(
        m.cf8_read(bdf(0, 2, 0), 4, 2),
        0,
        "no decode before firmware"
    );
    assert!(!m.io.contains(0x2000));
    assert_eq!(
        m.cf8_read(bdf(0, 2, 0), 0x10, 4),
        0x2001,
        "but addresses are assigned"
    );
}

#[test]
fn msix_through_the_bar() {
    let (m, a, _) = standard_machine();
    let dev = bdf(0, 3, 0);
    let cap = a
        .lock()
        .unwrap()
        .config
        .find_capability(regs::CAP_ID_MSIX)
        .unwrap();
    // Walk the capability list from the header as a driver does.
    let mut at = m.cf8_read(dev, 0x34, 1) as u16;
    let mut ids = Vec::new();
    while at != 0 {
        ids.push(m.cf8_read(dev, at, 1) as u8);
        at = m.cf8_read(dev, at + 1, 1) as u16;
    }
    assert_eq!(ids, vec![regs::CAP_ID_MSIX, regs::CAP_ID_MSI]);
    assert_eq!(m.cf8_read(dev, cap + 2, 2), 2, "table size 3");
    assert_eq!(m.cf8_read(dev, cap + 4, 4), 1, "table in BAR 1 at 0");
    assert_eq!(m.cf8_read(dev, cap + 8, 4), 0x1001, "PBA in BAR 1 at 4 KiB");
    let table = 0xC000_0000u64;
    // Program vector 2 with a qword and a dword write, unmasked.
    m.mmio
        .write(table + 32, &0x0000_0000_FEE0_F00Cu64.to_le_bytes());
    m.mmio.write(table + 40, &0x4045u32.to_le_bytes());
    let mut d = [0u8; 4];
    m.mmio.read(table + 44, &mut d);
    assert_eq!(u32::from_le_bytes(d), 1, "vectors start masked");
    // Enable MSI-X with the function mask set; INTx is now off.
    m.cf8_write(dev, cap + 2, 2, 0xC000);
    assert!(a.lock().unwrap().config.msix_enabled());
    let g = a.lock().unwrap().config.interrupt_generation();
    m.mmio.write(table + 44, &0u32.to_le_bytes());
    assert_ne!(a.lock().unwrap().config.interrupt_generation(), g);
    assert!(a.lock().unwrap().config.msix_notify(2));
    assert!(m.irqs.msis.lock().unwrap().is_empty(), "function masked");
    let mut pba = [0u8; 8];
    m.mmio.read(table + 4096, &mut pba);
    assert_eq!(u64::from_le_bytes(pba), 0b100);
    m.cf8_write(dev, cap + 3, 1, 0x80);
    assert_eq!(*m.irqs.msis.lock().unwrap(), vec![(0xFEE0_F00C, 0x4045)]);
    m.mmio.read(table + 4096, &mut pba);
    assert_eq!(u64::from_le_bytes(pba), 0);
    assert_eq!(
        a.lock()
            .unwrap()
            .config
            .msix_message(2)
            .map(|m| (m.address, m.data)),
        Some((0xFEE0_F00C, 0x4045))
    );
    // Bad table accesses: misaligned, wrong size, past the table.
    m.mmio.write(table + 33, &[1, 2, 3, 4]);
    m.mmio.write(table + 32, &[9, 9]);
    m.mmio.write(table + 48, &[7; 4]);
    m.mmio.read(table + 34, &mut d);
    assert_eq!(d, [0xFF; 4]);
    assert_eq!(
        a.lock().unwrap().config.msix_message(2).map(|m| m.address),
        Some(0xFEE0_F00C)
    );
}

#[test]
fn pirq_registers_behave_like_piix() {
    let (m, _, _) = standard_machine();
    let lpc = bdf(0, 31, 0);
    // Only bit 7 and bits 0-3 are kept.
    m.cf8_write(lpc, 0x61, 1, 0x7B);
    assert_eq!(m.cf8_read(lpc, 0x61, 1), 0x0B);
    m.cf8_write(lpc, 0x6A, 2, 0x8E85);
    assert_eq!(m.cf8_read(lpc, 0x68, 4) >> 16, 0x8E85 & 0x8F8F);
    // Bytes around the PIRQ registers are ordinary storage.
    m.cf8_write(lpc, 0x64, 4, 0x1234_5678);
    assert_eq!(m.cf8_read(lpc, 0x64, 4), 0x1234_5678);
    let router = m.root.intx_router();
    assert_eq!(router.pirq_register(1), 0x0B);
    assert_eq!(router.pirq_register(6), 0x85);
}

#[test]
fn create_function_errors_and_overrides() {
    let m = machine();
    let mut tree = ConfigTree::new();
    let err = m.add_model("virtio-net", &tree, bdf(0, 2, 0)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "pci slot 0:2:0: device \"virtio-net\" is not supported yet"
    );
    assert!(matches!(
        m.add_model("frobnicator", &tree, bdf(0, 2, 0)),
        Err(PciError::UnknownModel { .. })
    ));
    assert_eq!(
        m.add_model("lpc", &tree, bdf(1, 31, 0)),
        Err(PciError::LpcNotOnBus0)
    );
    tree.set("pci.0.0.0.pcireg.vendor", "abcd").unwrap();
    tree.set("pci.0.0.0.pcireg.device", "0x1234").unwrap();
    m.add_model("hostbridge", &tree, bdf(0, 0, 0)).unwrap();
    tree.set("pci.0.1.0.vendor", "4098").unwrap();
    m.add_model("amd_hostbridge", &tree, bdf(0, 1, 0)).unwrap();
    tree.set("pci.0.30.0.pcireg.revid", "0x5").unwrap();
    tree.set("lpc.pcireg.subvendor", "1af4").unwrap();
    m.add_model("lpc", &tree, bdf(0, 30, 0)).unwrap();
    assert_eq!(
        m.add_model("lpc", &tree, bdf(0, 31, 0)),
        Err(PciError::SecondLpc)
    );
    assert_eq!(
        m.add_model("hostbridge", &tree, bdf(0, 0, 0)),
        Err(PciError::Occupied(bdf(0, 0, 0)))
    );
    tree.set("pci.0.2.0.pcireg.vendor", "nonsense").unwrap();
    assert!(matches!(
        m.add_model("hostbridge", &tree, bdf(0, 2, 0)),
        Err(PciError::BadValue { .. })
    ));
    m.root.finalize().unwrap();
    assert_eq!(m.cf8_read(bdf(0, 0, 0), 0, 4), 0x1234_ABCD);
    assert_eq!(m.cf8_read(bdf(0, 1, 0), 0, 4), 0x7432_1002);
    assert_eq!(m.cf8_read(bdf(0, 30, 0), 8, 1), 5);
    assert_eq!(m.cf8_read(bdf(0, 30, 0), 0x2C, 4), 0x0000_1AF4);
    assert_eq!(m.root.lpc_bdf(), Some(bdf(0, 30, 0)));
    assert_eq!(
        m.root
            .add_function(bdf(0, 9, 0), TestDev::new(1, false, false).shared().1),
        Err(PciError::AlreadyFinalized)
    );
}

#[test]
fn reset_register_shares_the_cf8_dword() {
    struct Reset(Arc<Mutex<Vec<u8>>>);
    impl BusDevice for Reset {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0.lock().unwrap().extend_from_slice(data);
        }
    }
    let (m, _, _) = standard_machine();
    let seen = Arc::new(Mutex::new(Vec::new()));
    m.root
        .set_reset_register(Arc::new(Mutex::new(Reset(seen.clone()))));
    m.io.write(0xCF9, &[6]);
    assert_eq!(*seen.lock().unwrap(), vec![6]);
    let mut b = [0xAAu8];
    m.io.read(0xCF9, &mut b);
    assert_eq!(b, [0]);
}

#[test]
fn random_guest_accesses_never_panic() {
    let (m, _, _) = standard_machine();
    let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let sizes = [1usize, 2, 3, 4, 8];
    for _ in 0..50_000 {
        let r = next();
        let slot = [0u8, 3, 4, 31][(r % 4) as usize];
        let at = bdf(0, slot, 0);
        let reg = ((r >> 8) % 0x1000) as u16;
        let size = sizes[((r >> 24) % 5) as usize];
        let value = (r >> 32) as u32;
        let mut buf = [0u8; 8];
        match (r >> 30) % 6 {
            0 => {
                m.mmio.write(
                    Machine::ecam_addr(at, reg),
                    &value.to_le_bytes().repeat(2)[..size],
                );
            }
            1 => {
                m.mmio.read(Machine::ecam_addr(at, reg), &mut buf[..size]);
            }
            2 => {
                m.io.write(
                    0xCF8 + (r >> 40) % 8,
                    &value.to_le_bytes().repeat(2)[..size],
                );
            }
            3 => {
                m.io.read(0xCF8 + (r >> 40) % 8, &mut buf[..size]);
            }
            4 => {
                let addr = 0xC000_0000 + (r >> 36) % 0x4000;
                m.mmio.write(addr, &value.to_le_bytes().repeat(2)[..size]);
            }
            _ => {
                let port = 0x2000 + (r >> 36) % 0x100;
                m.io.read(port, &mut buf[..size]);
            }
        }
    }
    // The hierarchy still answers.
    assert_eq!(m.cf8_read(bdf(0, 31, 0), 0, 4), 0x7000_8086);
}

#[test]
fn root_config_from_tree_follows_bhyve_defaults() {
    let build = |tree: &ConfigTree| {
        PciRootConfig::from_tree(
            tree,
            Arc::new(Bus::new()),
            Arc::new(Bus::new()),
            MemoryLayout::new(1 << 30),
            Arc::new(Controller(Arc::new(Irqs::default()))),
        )
        .unwrap()
    };
    let mut tree = ConfigTree::new();
    let c = build(&tree);
    assert!(!c.bootrom && c.enable_bars);
    tree.set("lpc.bootrom", "/usr/share/BHYVE_UEFI.fd").unwrap();
    let c = build(&tree);
    assert!(c.bootrom && !c.enable_bars);
    tree.set("pci.enable_bars", "true").unwrap();
    assert!(build(&tree).enable_bars);
    // bhyve's own spelling since 15 (`-o bootrom=`, bootrom_boot()).
    let mut tree = ConfigTree::new();
    tree.set("bootrom", "/usr/share/BHYVE_UEFI.fd").unwrap();
    let c = build(&tree);
    assert!(c.bootrom && !c.enable_bars);
}

#[test]
fn snapshot_and_restore() {
    let (m, a, _) = standard_machine();
    let dev = bdf(0, 3, 0);
    let router = m.root.intx_router();
    a.lock().unwrap().config.intx_assert();
    let saved_cfg = serde_json::to_string(&a.lock().unwrap().config).unwrap();
    let saved_router = serde_json::to_string(&router.state()).unwrap();
    // The guest moves on: BAR moved, line lowered.
    m.cf8_write(dev, 0x10, 4, 0x5000);
    a.lock().unwrap().config.intx_deassert();
    assert!(!m.irqs.level(16) && m.io.contains(0x5000));
    // Restore both and remap.
    let cfg: PciConfigSpace = serde_json::from_str(&saved_cfg).unwrap();
    a.lock().unwrap().config.restore(cfg).unwrap();
    router.restore(serde_json::from_str(&saved_router).unwrap());
    m.root.resync_bars();
    assert!(m.io.contains(0x2000) && !m.io.contains(0x5000));
    assert!(m.irqs.level(16) && m.irqs.level(5));
    a.lock().unwrap().config.intx_deassert();
    assert!(!m.irqs.level(16) && !m.irqs.level(5));
    // A snapshot of a differently shaped function is refused.
    let other = TestDev::new(1, false, false).config;
    assert_eq!(
        a.lock().unwrap().config.restore(other),
        Err(PciError::SnapshotMismatch("BARs"))
    );
}
