//! The PCI root complex: functions by bus/slot/function, configuration
//! mechanism #1 and ECAM, start-up BAR allocation and BAR mapping.
//!
//! Start-up follows bhyve's `init_pci`: functions are added (each may ask
//! for an INTx pin, which takes the least used pin of its slot), then
//! [`PciRoot::finalize`] assigns BAR addresses bus by bus, largest BAR
//! first, naturally aligned (I/O from 0x2000, 32-bit memory from
//! 0xC0000000, 64-bit BARs above 128 MiB in the 64-bit window above RAM,
//! smaller ones below 4 GiB), leaves bhyve's slop between buses, routes
//! INTx and maps every decoded BAR on the platform buses. Without a boot
//! ROM (or with `pci.enable_bars`) decoding and bus mastering start enabled,
//! as bhyve does for guests that have no firmware to do it.
//!
//! After that the guest owns the BARs: every config write that touches the
//! command register or a BAR register re-syncs that function's mappings.
//! A mapping the bus refuses (overlap, bad range) is logged and left
//! unmapped; nothing the guest programs can fail the VMM.
//!
//! Port 0xCF9 (reset control) shares the dword at 0xCF8 on real chipsets;
//! the mechanism #1 device answers 0xCF8-0xCFF and forwards byte accesses
//! at 0xCF9 to the device given to [`PciRoot::set_reset_register`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use rhyve_platform::bus::{Bus, BusDevice, SharedDevice};
use rhyve_platform::irq::{InterruptController, MsiSender};
use rhyve_platform::layout::{
    MemoryLayout, PCI_CONFIG_ADDRESS_PORT, PCI_ECAM_BASE, PCI_ECAM_SIZE, PCI_IO_BASE, PCI_IO_LIMIT,
    PCI_MMIO32_BASE, PCI_MMIO32_SIZE, PCI_MMIO64_SIZE,
};
use serde::{Deserialize, Serialize};

use crate::config::{regs, BarKind, MAX_BARS};
use crate::intx::{IntxPin, IntxRouter, PciIntxRoute};
use crate::{PciBdf, PciContext, PciError, SharedFunction};

/// 64-bit BARs up to this size still go below 4 GiB (bhyve: some drivers
/// cannot cope with BARs above 4 GiB).
const MEM64_LOW_LIMIT: u64 = 128 << 20;
/// Slop left after each bus's resources so a guest can move BARs.
const BUS_IO_ROUNDUP: u64 = 32;
const BUS_MEM32_ROUNDUP: u64 = 1 << 20;
const BUS_MEM64_ROUNDUP: u64 = 512 << 20;
/// Bytes of the mechanism #1 port block 0xCF8-0xCFF.
const MECH1_PORTS: u64 = 8;
const CONF1_ENABLE: u32 = 0x8000_0000;
/// ISA IRQs of the always-present i8042 (keyboard 1, mouse 12): bhyve's
/// `atkbdc_init` keeps PIRQ links off them.
const ATKBDC_IRQS: [u8; 2] = [1, 12];

/// What [`PciRoot::new`] needs from the machine.
pub struct PciRootConfig {
    /// Port I/O space: 0xCF8-0xCFF and I/O BARs are registered here.
    pub io_bus: Arc<Bus>,
    /// Guest physical MMIO space: ECAM and memory BARs.
    pub mmio_bus: Arc<Bus>,
    /// RAM layout; the 64-bit window sits above it.
    pub layout: MemoryLayout,
    pub interrupts: Arc<dyn InterruptController>,
    /// Inputs of the IOAPIC (pins from 16 up go to PCI INTx).
    pub ioapic_pins: u32,
    /// A boot ROM is used (`lpc.bootrom`): fixed INTx mapping.
    pub bootrom: bool,
    /// Enable decoding and bus mastering at start-up (`pci.enable_bars`,
    /// default: no boot ROM).
    pub enable_bars: bool,
}

impl PciRootConfig {
    /// The configuration bhyve derives from the tree: a boot ROM when
    /// `bootrom` (bhyve's `bootrom_boot()`) or its older spelling
    /// `lpc.bootrom` is set, `pci.enable_bars` defaulting to "no boot ROM",
    /// and the IOAPIC of [`rhyve_platform::layout::IOAPIC_PINS`] inputs.
    pub fn from_tree(
        tree: &rhyve_config::ConfigTree,
        io_bus: Arc<Bus>,
        mmio_bus: Arc<Bus>,
        layout: MemoryLayout,
        interrupts: Arc<dyn InterruptController>,
    ) -> Result<Self, PciError> {
        let bootrom = tree.get("bootrom")?.is_some() || tree.get("lpc.bootrom")?.is_some();
        let enable_bars = tree.bool_or("pci.enable_bars", !bootrom)?;
        Ok(Self {
            io_bus,
            mmio_bus,
            layout,
            interrupts,
            ioapic_pins: rhyve_platform::layout::IOAPIC_PINS,
            bootrom,
            enable_bars,
        })
    }
}

/// Address windows a bus decodes, for the host bridge `_CRS`
/// (limits exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciBusWindows {
    pub bus: u8,
    pub io_base: u64,
    pub io_limit: u64,
    pub mem32_base: u64,
    pub mem32_limit: u64,
    pub mem64_base: u64,
    pub mem64_limit: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Space {
    Io,
    Mmio,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mapping {
    space: Space,
    base: u64,
    size: u64,
}

struct FunctionEntry {
    function: SharedFunction,
    mapped: [Option<Mapping>; MAX_BARS],
}

#[derive(Default, Clone, Copy)]
struct SlotPin {
    users: u32,
    route: Option<(u32, u8)>,
}

#[derive(Default)]
struct RootState {
    functions: BTreeMap<PciBdf, FunctionEntry>,
    /// INTA-D of each (bus, slot).
    slot_pins: BTreeMap<(u8, u8), [SlotPin; 4]>,
    windows: Vec<PciBusWindows>,
    lpc: Option<PciBdf>,
    finalized: bool,
}

/// The PCI hierarchy of one VM.
pub struct PciRoot {
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    layout: MemoryLayout,
    enable_bars: bool,
    msi: Arc<dyn MsiSender>,
    intx: Arc<IntxRouter>,
    state: Mutex<RootState>,
    reset_register: Mutex<Option<SharedDevice>>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A device that panicked must not take the whole PCI tree down.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PciRoot {
    /// Build an empty root and register configuration mechanism #1
    /// (ports 0xCF8-0xCFF) and ECAM on the buses.
    pub fn new(config: PciRootConfig) -> Result<Arc<Self>, PciError> {
        let intx = Arc::new(IntxRouter::new(
            config.interrupts.clone(),
            config.ioapic_pins,
            config.bootrom,
        ));
        for irq in ATKBDC_IRQS {
            intx.reserve_isa_irq(irq)?;
        }
        // bhyve's sci_init: the SCI is shared, so links avoid it if they can.
        intx.use_isa_irq(rhyve_platform::layout::SCI_IRQ as u8)?;
        let root = Arc::new(Self {
            io_bus: config.io_bus.clone(),
            mmio_bus: config.mmio_bus.clone(),
            layout: config.layout,
            enable_bars: config.enable_bars,
            msi: config.interrupts.msi(),
            intx,
            state: Mutex::new(RootState::default()),
            reset_register: Mutex::new(None),
        });
        let weak = Arc::downgrade(&root);
        root.io_bus.insert(
            Arc::new(Mutex::new(ConfigMechanism1 {
                root: weak.clone(),
                address: 0,
            })),
            u64::from(PCI_CONFIG_ADDRESS_PORT),
            MECH1_PORTS,
        )?;
        root.mmio_bus.insert(
            Arc::new(Mutex::new(Ecam { root: weak })),
            PCI_ECAM_BASE,
            PCI_ECAM_SIZE,
        )?;
        Ok(root)
    }

    /// The INTx router (PIRQ registers, ISA IRQ reservations, ELCR input).
    pub fn intx_router(&self) -> Arc<IntxRouter> {
        self.intx.clone()
    }

    /// What [`crate::create_function`] needs to build functions for this root.
    pub fn context(&self) -> PciContext {
        PciContext {
            intx: self.intx.clone(),
        }
    }

    /// Forward byte accesses at port 0xCF9 (reset control) to `device`,
    /// which sees them at offset 0.
    pub fn set_reset_register(&self, device: SharedDevice) {
        *lock(&self.reset_register) = Some(device);
    }

    /// Add a function at `bdf`. Before [`Self::finalize`] only.
    pub fn add_function(&self, bdf: PciBdf, function: SharedFunction) -> Result<(), PciError> {
        let mut st = lock(&self.state);
        if st.finalized {
            return Err(PciError::AlreadyFinalized);
        }
        if st.functions.contains_key(&bdf) {
            return Err(PciError::Occupied(bdf));
        }
        {
            let mut f = lock(&function);
            let cfg = f.config_mut();
            let is_lpc = cfg.u8(regs::CLASS) == regs::CLASS_BRIDGE
                && cfg.u8(regs::SUBCLASS) == regs::SUBCLASS_BRIDGE_ISA;
            if is_lpc {
                if bdf.bus != 0 {
                    return Err(PciError::LpcNotOnBus0);
                }
                if st.lpc.is_some() {
                    return Err(PciError::SecondLpc);
                }
                st.lpc = Some(bdf);
            }
            cfg.connect_msi(self.msi.clone());
            if self.enable_bars {
                let mut command = cfg.command() | regs::COMMAND_BUS_MASTER;
                for (_, bar) in cfg.bars_in_declaration_order() {
                    command |= match bar.kind {
                        BarKind::Io => regs::COMMAND_IO_SPACE,
                        BarKind::Mem32 | BarKind::Mem64 => regs::COMMAND_MEMORY_SPACE,
                    };
                }
                cfg.set_u16(regs::COMMAND, command);
            }
            if cfg.intx_requested() {
                // bhyve's pci_lintr_request: the least used pin of the slot.
                let pins = st.slot_pins.entry((bdf.bus, bdf.slot)).or_default();
                let best = (0..4).min_by_key(|&p| pins[p].users).unwrap_or(0);
                pins[best].users += 1;
                cfg.set_u8(regs::INTERRUPT_PIN, best as u8 + 1);
            }
        }
        st.functions.insert(
            bdf,
            FunctionEntry {
                function,
                mapped: [None; MAX_BARS],
            },
        );
        Ok(())
    }

    /// Assign BARs, route INTx and map the decoded BARs; the machine is
    /// complete afterwards.
    pub fn finalize(&self) -> Result<(), PciError> {
        let mut st = lock(&self.state);
        if st.finalized {
            return Err(PciError::AlreadyFinalized);
        }
        self.assign_bars(&mut st)?;
        self.route_intx(&mut st)?;
        st.finalized = true;
        let bdfs: Vec<PciBdf> = st.functions.keys().copied().collect();
        for bdf in bdfs {
            self.sync_bars(&mut st, bdf);
        }
        Ok(())
    }

    fn assign_bars(&self, st: &mut RootState) -> Result<(), PciError> {
        let mut io_next = u64::from(PCI_IO_BASE);
        let mut mem32_next = PCI_MMIO32_BASE;
        let mem32_limit = PCI_MMIO32_BASE + PCI_MMIO32_SIZE;
        let mem64_base = self.layout.pci_mmio64_base();
        let mut mem64_next = mem64_base;
        let mem64_limit = mem64_base + PCI_MMIO64_SIZE;
        let buses: Vec<u8> = {
            let mut b: Vec<u8> = st.functions.keys().map(|k| k.bus).collect();
            b.dedup();
            b
        };
        st.windows.clear();
        for bus in buses {
            let mut windows = PciBusWindows {
                bus,
                io_base: io_next,
                io_limit: 0,
                mem32_base: mem32_next,
                mem32_limit: 0,
                mem64_base: mem64_next,
                mem64_limit: 0,
            };
            // (size, bdf, index, kind) in declaration order, then a stable
            // sort puts the largest first as bhyve's sorted insertion does.
            let mut bars = Vec::new();
            for (bdf, entry) in st.functions.range(
                PciBdf {
                    bus,
                    slot: 0,
                    func: 0,
                }..=PciBdf {
                    bus,
                    slot: PciBdf::MAX_SLOT,
                    func: PciBdf::MAX_FUNC,
                },
            ) {
                let f = lock(&entry.function);
                for (index, bar) in f.config().bars_in_declaration_order() {
                    bars.push((bar.size, *bdf, index, bar.kind));
                }
            }
            bars.sort_by_key(|b| std::cmp::Reverse(b.0));
            for (size, bdf, index, kind) in bars {
                let (next, limit, window) = match kind {
                    BarKind::Io => (&mut io_next, PCI_IO_LIMIT as u64, "I/O"),
                    BarKind::Mem64 if size > MEM64_LOW_LIMIT => {
                        (&mut mem64_next, mem64_limit, "64-bit memory")
                    }
                    BarKind::Mem32 | BarKind::Mem64 => {
                        (&mut mem32_next, mem32_limit, "32-bit memory")
                    }
                };
                let base = next
                    .checked_next_multiple_of(size)
                    .filter(|b| b.checked_add(size).is_some_and(|end| end <= limit))
                    .ok_or(PciError::WindowFull { window, size, bdf })?;
                *next = base + size;
                if let Some(entry) = st.functions.get(&bdf) {
                    lock(&entry.function)
                        .config_mut()
                        .set_bar_address(index, base);
                }
            }
            io_next = (io_next + BUS_IO_ROUNDUP).next_multiple_of(BUS_IO_ROUNDUP);
            mem32_next = (mem32_next + BUS_MEM32_ROUNDUP).next_multiple_of(BUS_MEM32_ROUNDUP);
            mem64_next = (mem64_next + BUS_MEM64_ROUNDUP).next_multiple_of(BUS_MEM64_ROUNDUP);
            windows.io_limit = io_next.min(PCI_IO_LIMIT as u64);
            windows.mem32_limit = mem32_next.min(mem32_limit);
            windows.mem64_limit = mem64_next.min(mem64_limit);
            st.windows.push(windows);
        }
        Ok(())
    }

    fn route_intx(&self, st: &mut RootState) -> Result<(), PciError> {
        let RootState {
            functions,
            slot_pins,
            ..
        } = st;
        for (bdf, entry) in functions.iter() {
            let mut f = lock(&entry.function);
            let cfg = f.config_mut();
            let pin = cfg.u8(regs::INTERRUPT_PIN);
            if !cfg.intx_requested() || !(1..=4).contains(&pin) {
                continue;
            }
            let Some(slot_pin) = slot_pins
                .get_mut(&(bdf.bus, bdf.slot))
                .and_then(|p| p.get_mut(usize::from(pin - 1)))
            else {
                continue;
            };
            let (gsi, pirq) = match slot_pin.route {
                Some(r) => r,
                None => {
                    let r = self.intx.route(bdf.slot, pin).ok_or(PciError::OutOfRange {
                        what: "IOAPIC pins for PCI INTx",
                        value: 0,
                        min: 1,
                        max: 16,
                    })?;
                    slot_pin.route = Some(r);
                    r
                }
            };
            let line = self.intx.pirq_register(usize::from(pirq)) & 0x0F;
            cfg.set_u8(regs::INTERRUPT_LINE, line);
            cfg.connect_intx(IntxPin::new(self.intx.clone(), gsi, pirq));
        }
        Ok(())
    }

    /// Every routed slot pin, by bus, slot and pin (bhyve's
    /// `pci_walk_lintr`), for the ACPI `_PRT` and the MP table.
    pub fn intx_routes(&self) -> Vec<PciIntxRoute> {
        let st = lock(&self.state);
        let mut routes = Vec::new();
        for (&(bus, slot), pins) in &st.slot_pins {
            for (i, p) in pins.iter().enumerate() {
                if let (true, Some((gsi, pirq))) = (p.users > 0, p.route) {
                    routes.push(PciIntxRoute {
                        bus,
                        slot,
                        pin: i as u8 + 1,
                        gsi,
                        pirq,
                    });
                }
            }
        }
        routes
    }

    /// Decoded windows of every bus that has functions (after finalize).
    pub fn bus_windows(&self) -> Vec<PciBusWindows> {
        lock(&self.state).windows.clone()
    }

    /// Where the LPC bridge is, if there is one.
    pub fn lpc_bdf(&self) -> Option<PciBdf> {
        lock(&self.state).lpc
    }

    /// Addresses of all functions, in bus/slot/function order.
    pub fn functions(&self) -> Vec<PciBdf> {
        lock(&self.state).functions.keys().copied().collect()
    }

    /// Make every BAR mapping match its function's config space again,
    /// after functions' state was restored from a snapshot.
    pub fn resync_bars(&self) {
        let mut st = lock(&self.state);
        if !st.finalized {
            return;
        }
        let bdfs: Vec<PciBdf> = st.functions.keys().copied().collect();
        for bdf in bdfs {
            self.sync_bars(&mut st, bdf);
        }
    }

    pub fn function(&self, bdf: PciBdf) -> Option<SharedFunction> {
        lock(&self.state)
            .functions
            .get(&bdf)
            .map(|e| e.function.clone())
    }

    fn is_multifunction(st: &RootState, bdf: PciBdf) -> bool {
        let first = PciBdf { func: 0, ..bdf };
        let last = PciBdf {
            func: PciBdf::MAX_FUNC,
            ..bdf
        };
        st.functions.range(first..=last).count() > 1
    }

    /// A configuration read of `data.len()` bytes at `offset` of `bdf`, as
    /// the guest sees it: all ones for absent functions and for odd sizes
    /// or misaligned accesses.
    pub fn config_read(&self, bdf: PciBdf, offset: u16, data: &mut [u8]) {
        data.fill(0xFF);
        let len = data.len();
        if !matches!(len, 1 | 2 | 4) || !(offset as usize).is_multiple_of(len) || offset >= 4096 {
            return;
        }
        let (function, multifunction) = {
            let st = lock(&self.state);
            let Some(entry) = st.functions.get(&bdf) else {
                return;
            };
            (entry.function.clone(), Self::is_multifunction(&st, bdf))
        };
        let aligned = offset & !3;
        let mut dword = lock(&function).config_read(aligned);
        if aligned == regs::CACHE_LINE_SIZE {
            // The header type's multi-function bit reflects the slot.
            let bit = u32::from(regs::HEADER_TYPE_MULTIFUNCTION) << 16;
            dword = (dword & !bit) | if multifunction { bit } else { 0 };
        }
        let bytes = dword.to_le_bytes();
        let at = usize::from(offset & 3);
        data.copy_from_slice(&bytes[at..at + len]);
    }

    /// A configuration write of `data` at `offset` of `bdf`. Writes to
    /// absent functions, odd sizes and misaligned writes are dropped.
    pub fn config_write(&self, bdf: PciBdf, offset: u16, data: &[u8]) {
        let len = data.len();
        if !matches!(len, 1 | 2 | 4) || !(offset as usize).is_multiple_of(len) || offset >= 4096 {
            tracing::debug!(%bdf, offset, len, "dropping malformed PCI config write");
            return;
        }
        let Some(function) = self.function(bdf) else {
            return;
        };
        lock(&function).config_write(offset, data);
        let end = offset + len as u16;
        let touches = |start: u16, stop: u16| offset < stop && start < end;
        if touches(regs::COMMAND, regs::COMMAND + 2)
            || touches(regs::BAR0, regs::BAR0 + 4 * MAX_BARS as u16)
        {
            let mut st = lock(&self.state);
            if st.finalized {
                self.sync_bars(&mut st, bdf);
            }
        }
    }

    fn bus_for(&self, space: Space) -> &Bus {
        match space {
            Space::Io => &self.io_bus,
            Space::Mmio => &self.mmio_bus,
        }
    }

    /// Make the bus registrations of `bdf`'s BARs match its config space.
    fn sync_bars(&self, st: &mut RootState, bdf: PciBdf) {
        let Some(entry) = st.functions.get_mut(&bdf) else {
            return;
        };
        let mut f = lock(&entry.function);
        for index in 0..MAX_BARS {
            let cfg = f.config();
            let want = cfg
                .bar(index)
                .filter(|_| cfg.bar_decoded(index))
                .map(|bar| Mapping {
                    space: if bar.kind == BarKind::Io {
                        Space::Io
                    } else {
                        Space::Mmio
                    },
                    base: bar.address,
                    size: bar.size,
                });
            if want == entry.mapped[index] {
                continue;
            }
            let was_mapped = entry.mapped[index].is_some();
            if let Some(old) = entry.mapped[index].take() {
                self.bus_for(old.space).remove(old.base);
            }
            if let Some(m) = want {
                if let Some(why) = Self::refuse(m) {
                    tracing::warn!(%bdf, bar = index, base = m.base, size = m.size, why,
                        "guest programmed an unusable BAR address; leaving it unmapped");
                } else {
                    let adapter = Arc::new(Mutex::new(BarAdapter {
                        function: entry.function.clone(),
                        bar: index,
                    }));
                    match self.bus_for(m.space).insert(adapter, m.base, m.size) {
                        Ok(()) => entry.mapped[index] = Some(m),
                        Err(e) => tracing::warn!(%bdf, bar = index, error = %e,
                            "guest programmed a conflicting BAR address; leaving it unmapped"),
                    }
                }
            }
            if was_mapped || entry.mapped[index].is_some() {
                f.bar_moved(index, entry.mapped[index].map(|m| m.base));
            }
        }
    }

    fn refuse(m: Mapping) -> Option<&'static str> {
        let Some(end) = m.base.checked_add(m.size) else {
            return Some("wraps around the address space");
        };
        if m.base == 0 {
            return Some("address 0 means unassigned");
        }
        if m.space == Space::Io && end > PCI_IO_LIMIT as u64 {
            return Some("beyond the 64 KiB I/O space");
        }
        None
    }
}

/// Maps one BAR on a platform bus and forwards accesses to its function.
struct BarAdapter {
    function: SharedFunction,
    bar: usize,
}

impl BusDevice for BarAdapter {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.function).bar_read(self.bar, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.function).bar_write(self.bar, offset, data);
    }
}

/// Ports 0xCF8-0xCFF: CONFIG_ADDRESS (dword accesses only) and
/// CONFIG_DATA, plus the forwarded reset register at 0xCF9.
struct ConfigMechanism1 {
    root: Weak<PciRoot>,
    /// Enable, bus, slot, function and dword register of the next access.
    address: u32,
}

impl ConfigMechanism1 {
    fn target(&self) -> Option<(PciBdf, u16)> {
        if self.address & CONF1_ENABLE == 0 {
            return None;
        }
        let bdf = PciBdf {
            bus: (self.address >> 16) as u8,
            slot: ((self.address >> 11) & 0x1F) as u8,
            func: ((self.address >> 8) & 0x7) as u8,
        };
        Some((bdf, (self.address & 0xFC) as u16))
    }
}

impl BusDevice for ConfigMechanism1 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xFF);
        let Some(root) = self.root.upgrade() else {
            return;
        };
        match (offset, data.len()) {
            (0, 4) => data.copy_from_slice(&self.address.to_le_bytes()),
            (1, 1) => {
                if let Some(dev) = lock(&root.reset_register).clone() {
                    lock(&dev).read(0, data);
                }
            }
            (4..=7, _) => {
                if let Some((bdf, reg)) = self.target() {
                    root.config_read(bdf, reg + (offset - 4) as u16, data);
                }
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(root) = self.root.upgrade() else {
            return;
        };
        match (offset, data.len()) {
            (0, 4) => {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                // Keep only the fields bhyve decodes; reserved bits read 0.
                self.address = v & (CONF1_ENABLE | 0x00FF_FFFC);
            }
            (1, 1) => {
                if let Some(dev) = lock(&root.reset_register).clone() {
                    lock(&dev).write(0, data);
                }
            }
            (4..=7, _) => {
                if let Some((bdf, reg)) = self.target() {
                    root.config_write(bdf, reg + (offset - 4) as u16, data);
                }
            }
            _ => tracing::debug!(
                offset,
                len = data.len(),
                "ignoring odd CONFIG_ADDRESS write"
            ),
        }
    }
}

/// PCIe enhanced configuration access: 1 MiB per bus, 4 KiB per function.
struct Ecam {
    root: Weak<PciRoot>,
}

fn ecam_target(offset: u64) -> (PciBdf, u16) {
    let bdf = PciBdf {
        bus: ((offset >> 20) & 0xFF) as u8,
        slot: ((offset >> 15) & 0x1F) as u8,
        func: ((offset >> 12) & 0x7) as u8,
    };
    (bdf, (offset & 0xFFF) as u16)
}

impl BusDevice for Ecam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xFF);
        if let Some(root) = self.root.upgrade() {
            let (bdf, reg) = ecam_target(offset);
            root.config_read(bdf, reg, data);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(root) = self.root.upgrade() {
            let (bdf, reg) = ecam_target(offset);
            root.config_write(bdf, reg, data);
        }
    }
}
