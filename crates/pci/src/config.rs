//! One function's configuration space, as the guest sees it.
//!
//! [`PciConfigSpace`] keeps the 256-byte standard space plus the 4 KiB
//! extended space reachable through ECAM, a per-byte writable mask, the BARs,
//! the capability list, the MSI/MSI-X state and the INTx level, all in one
//! serde struct so a snapshot is a plain serialization. Device models fill in
//! their IDs, declare BARs and capabilities, and only handle their own
//! registers; everything the PCI spec defines generically lives here.
//!
//! Guest writes follow bhyve's `pci_cfgrw`: unaligned or odd-sized accesses
//! are dropped, BAR registers take aligned dword writes only (the all-ones
//! sizing probe reads back the size mask), the status register and the
//! header's identification fields are read-only (unlike bhyve, which lets a
//! guest overwrite the vendor ID: no real device allows that), and the
//! device-specific area outside capabilities stays writable like bhyve's.
//! The extended space answers zero at 0x100 (no extended capabilities) and
//! all ones above, as bhyve does, unless a device declares extended
//! capabilities.

use std::sync::Arc;

use rhyve_platform::irq::MsiSender;
use serde::{Deserialize, Serialize};

use crate::intx::IntxPin;
use crate::msi::{MsiState, MsixState};
use crate::PciError;

/// Bytes of the conventional (mechanism #1) configuration space.
pub const PCI_STANDARD_CONFIG_SIZE: usize = 256;
/// Bytes of the PCIe configuration space reachable through ECAM.
pub const PCI_CONFIG_SPACE_SIZE: usize = 4096;
/// Type 0 headers have six BARs.
pub const MAX_BARS: usize = 6;

/// Register offsets and bits of the type 0 header and of capabilities.
pub mod regs {
    pub const VENDOR_ID: u16 = 0x00;
    pub const DEVICE_ID: u16 = 0x02;
    pub const COMMAND: u16 = 0x04;
    pub const STATUS: u16 = 0x06;
    pub const REVISION_ID: u16 = 0x08;
    pub const PROG_IF: u16 = 0x09;
    pub const SUBCLASS: u16 = 0x0A;
    pub const CLASS: u16 = 0x0B;
    pub const CACHE_LINE_SIZE: u16 = 0x0C;
    pub const LATENCY_TIMER: u16 = 0x0D;
    pub const HEADER_TYPE: u16 = 0x0E;
    pub const BAR0: u16 = 0x10;
    pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2C;
    pub const SUBSYSTEM_ID: u16 = 0x2E;
    pub const ROM_ADDRESS: u16 = 0x30;
    pub const CAPABILITIES_POINTER: u16 = 0x34;
    pub const INTERRUPT_LINE: u16 = 0x3C;
    pub const INTERRUPT_PIN: u16 = 0x3D;
    /// First byte after the type 0 header: capabilities start here.
    pub const CAPABILITIES_START: u16 = 0x40;
    /// Extended capabilities start here (ECAM only).
    pub const EXTENDED_START: u16 = 0x100;

    pub const COMMAND_IO_SPACE: u16 = 1 << 0;
    pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
    pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
    pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
    pub const STATUS_CAPABILITIES: u16 = 1 << 4;
    pub const HEADER_TYPE_MULTIFUNCTION: u8 = 0x80;

    pub const BAR_IO_SPACE: u32 = 0x1;
    pub const BAR_MEM_TYPE_64: u32 = 0x4;

    pub const CAP_ID_MSI: u8 = 0x05;
    pub const CAP_ID_VENDOR: u8 = 0x09;
    pub const CAP_ID_PCIE: u8 = 0x10;
    pub const CAP_ID_MSIX: u8 = 0x11;

    pub const CLASS_STORAGE: u8 = 0x01;
    pub const CLASS_NETWORK: u8 = 0x02;
    pub const CLASS_DISPLAY: u8 = 0x03;
    pub const CLASS_BRIDGE: u8 = 0x06;
    pub const SUBCLASS_BRIDGE_HOST: u8 = 0x00;
    pub const SUBCLASS_BRIDGE_ISA: u8 = 0x01;
}

/// Writable command bits: bhyve treats everything else in the command and
/// status dword as read-only (`0xFFFFF880`).
const COMMAND_WRITABLE: u16 = 0x077F;
/// Size of the PCIe capability structure (capability version 2).
const PCIE_CAP_LEN: usize = 0x3C;

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BarKind {
    /// I/O ports.
    Io,
    /// Memory below 4 GiB.
    Mem32,
    /// Memory anywhere; takes this BAR register and the next one.
    Mem64,
}

/// A BAR as declared by its device and programmed by the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciBar {
    pub kind: BarKind,
    /// Power of two, at least 4 (I/O) or 16 (memory) bytes.
    pub size: u64,
    /// Base address currently programmed (0 until allocated).
    pub address: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
enum BarSlot {
    #[default]
    Unused,
    Bar {
        bar: PciBar,
        /// Declaration order, so start-up allocation can follow bhyve's.
        order: u8,
    },
    /// The upper half of the 64-bit BAR in the previous slot.
    Mem64Upper,
}

/// Device/port type in the PCIe capability (PCIe base spec, 7.5.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PcieDeviceType {
    Endpoint,
    LegacyEndpoint,
    RootPort,
    /// What bhyve uses for endpoints on bus 0 (its only root complex bus).
    RootComplexIntegratedEndpoint,
}

impl PcieDeviceType {
    fn encoding(self) -> u16 {
        match self {
            Self::Endpoint => 0x0,
            Self::LegacyEndpoint => 0x1,
            Self::RootPort => 0x4,
            Self::RootComplexIntegratedEndpoint => 0x9,
        }
    }
}

/// INTx level state, as bhyve's `pci_lintr`: an assertion while INTx is
/// not permitted (MSI on or INTx disabled) stays pending until it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub(crate) enum IntxLevel {
    #[default]
    Idle,
    Asserted,
    Pending,
}

/// Connections to the interrupt controller, made by the root; not state.
#[derive(Clone, Default)]
pub(crate) struct Wires {
    pub(crate) msi: Option<Arc<dyn MsiSender>>,
    pub(crate) intx: Option<IntxPin>,
}

impl std::fmt::Debug for Wires {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wires")
            .field("msi", &self.msi.is_some())
            .field("intx", &self.intx)
            .finish()
    }
}

/// A function's configuration space and the generic PCI state behind it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PciConfigSpace {
    /// Register contents, [`PCI_CONFIG_SPACE_SIZE`] bytes.
    pub(crate) data: Vec<u8>,
    /// Per byte: bits the guest may change with a plain write.
    pub(crate) wmask: Vec<u8>,
    bars: [BarSlot; MAX_BARS],
    bars_declared: u8,
    /// Offset of the last capability in the list (0: none yet).
    last_cap: u16,
    /// First byte after the last capability.
    cap_end: u16,
    /// Reads at or above this offset in the extended space return all ones.
    ext_end: u16,
    pub(crate) msi: Option<MsiState>,
    pub(crate) msix: Option<MsixState>,
    /// Bumped whenever anything that decides where an MSI/MSI-X message
    /// goes changes (enable bits, masks, addresses, data).
    pub(crate) msi_generation: u64,
    intx_requested: bool,
    pub(crate) intx_level: IntxLevel,
    #[serde(skip)]
    pub(crate) wires: Wires,
}

impl PciConfigSpace {
    /// A type 0 header with the given IDs and class code
    /// (`class`, `subclass`, `prog_if`). Legacy interrupts start disabled
    /// (interrupt line 255, pin 0) as in bhyve's `pci_emul_init`.
    pub fn new(vendor: u16, device: u16, class: u8, subclass: u8, prog_if: u8) -> Self {
        let mut cfg = Self {
            data: vec![0; PCI_CONFIG_SPACE_SIZE],
            wmask: vec![0; PCI_CONFIG_SPACE_SIZE],
            bars: [BarSlot::Unused; MAX_BARS],
            bars_declared: 0,
            last_cap: 0,
            cap_end: regs::CAPABILITIES_START,
            ext_end: regs::EXTENDED_START + 4,
            msi: None,
            msix: None,
            msi_generation: 0,
            intx_requested: false,
            intx_level: IntxLevel::Idle,
            wires: Wires::default(),
        };
        cfg.set_u16(regs::VENDOR_ID, vendor);
        cfg.set_u16(regs::DEVICE_ID, device);
        cfg.set_u8(regs::CLASS, class);
        cfg.set_u8(regs::SUBCLASS, subclass);
        cfg.set_u8(regs::PROG_IF, prog_if);
        cfg.set_u8(regs::INTERRUPT_LINE, 0xFF);
        let command = COMMAND_WRITABLE.to_le_bytes();
        cfg.wmask[regs::COMMAND as usize] = command[0];
        cfg.wmask[regs::COMMAND as usize + 1] = command[1];
        cfg.wmask[regs::CACHE_LINE_SIZE as usize] = 0xFF;
        cfg.wmask[regs::LATENCY_TIMER as usize] = 0xFF;
        cfg.wmask[regs::INTERRUPT_LINE as usize] = 0xFF;
        // The device-specific area is plain read/write storage until a
        // capability claims part of it.
        for m in &mut cfg.wmask[regs::CAPABILITIES_START as usize..PCI_STANDARD_CONFIG_SIZE] {
            *m = 0xFF;
        }
        cfg
    }

    pub fn vendor_id(&self) -> u16 {
        self.u16(regs::VENDOR_ID)
    }

    pub fn device_id(&self) -> u16 {
        self.u16(regs::DEVICE_ID)
    }

    pub fn set_revision(&mut self, revision: u8) {
        self.set_u8(regs::REVISION_ID, revision);
    }

    pub fn set_subsystem(&mut self, vendor: u16, device: u16) {
        self.set_u16(regs::SUBSYSTEM_VENDOR_ID, vendor);
        self.set_u16(regs::SUBSYSTEM_ID, device);
    }

    // Device-side accessors: bypass the guest write mask (bhyve's
    // pci_set_cfgdata*). Out-of-range offsets read as ones / are ignored,
    // so a bad offset can never panic.

    pub fn u8(&self, offset: u16) -> u8 {
        self.data.get(offset as usize).copied().unwrap_or(0xFF)
    }

    pub fn u16(&self, offset: u16) -> u16 {
        u16::from_le_bytes([self.u8(offset), self.u8(offset.wrapping_add(1))])
    }

    pub fn u32(&self, offset: u16) -> u32 {
        u32::from_le_bytes([
            self.u8(offset),
            self.u8(offset.wrapping_add(1)),
            self.u8(offset.wrapping_add(2)),
            self.u8(offset.wrapping_add(3)),
        ])
    }

    pub fn set_u8(&mut self, offset: u16, value: u8) {
        if let Some(b) = self.data.get_mut(offset as usize) {
            *b = value;
        }
    }

    pub fn set_u16(&mut self, offset: u16, value: u16) {
        for (i, b) in value.to_le_bytes().into_iter().enumerate() {
            self.set_u8(offset.wrapping_add(i as u16), b);
        }
    }

    pub fn set_u32(&mut self, offset: u16, value: u32) {
        for (i, b) in value.to_le_bytes().into_iter().enumerate() {
            self.set_u8(offset.wrapping_add(i as u16), b);
        }
    }

    /// Make `len` bytes from `offset` guest-writable (`true`) or read-only.
    pub fn set_writable(&mut self, offset: u16, len: usize, writable: bool) {
        let start = offset as usize;
        let end = start.saturating_add(len).min(self.wmask.len());
        for m in self.wmask.get_mut(start..end).into_iter().flatten() {
            *m = if writable { 0xFF } else { 0 };
        }
    }

    pub fn command(&self) -> u16 {
        self.u16(regs::COMMAND)
    }

    /// The dword at `offset` (rounded down to a dword) as the guest reads it.
    pub fn read_dword(&self, offset: u16) -> u32 {
        let offset = offset & !3;
        if offset as usize >= PCI_CONFIG_SPACE_SIZE
            || (offset >= regs::EXTENDED_START && offset >= self.ext_end)
        {
            return 0xFFFF_FFFF;
        }
        self.u32(offset)
    }

    /// A guest write of `data` (1, 2 or 4 bytes, naturally aligned) at
    /// `offset`. Anything else is logged and dropped.
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        let len = data.len();
        if !matches!(len, 1 | 2 | 4)
            || !(offset as usize).is_multiple_of(len)
            || offset as usize + len > PCI_CONFIG_SPACE_SIZE
        {
            tracing::debug!(offset, len, "dropping malformed PCI config write");
            return;
        }
        let bar_regs = regs::BAR0..regs::BAR0 + 4 * MAX_BARS as u16;
        if bar_regs.contains(&offset) {
            if len == 4 {
                let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                self.write_bar_register(usize::from((offset - regs::BAR0) / 4), value);
            } else {
                tracing::debug!(offset, len, "dropping sub-dword BAR write");
            }
            return;
        }
        for (i, &byte) in data.iter().enumerate() {
            let at = offset as usize + i;
            // Both vectors are PCI_CONFIG_SPACE_SIZE long unless a snapshot
            // was tampered with; never index past them.
            let mask = self.wmask.get(at).copied().unwrap_or(0);
            if let Some(d) = self.data.get_mut(at) {
                *d = (*d & !mask) | (byte & mask);
            }
        }
        let end = offset + len as u16;
        let touches = |start: u16, size: u16| offset < start + size && start < end;
        if touches(regs::COMMAND, 2) {
            self.intx_update();
        }
        self.msi_config_written(offset, end);
    }

    // ---- BARs ----

    /// Declare BAR `index` (0-5). The size is rounded up to a power of two
    /// and to the spec minimum (4 bytes for I/O, 16 for memory); a 64-bit
    /// BAR also takes register `index + 1`. The root assigns the address at
    /// start-up.
    pub fn add_bar(&mut self, index: usize, kind: BarKind, size: u64) -> Result<(), PciError> {
        let bad = |why| PciError::BadBar { index, why };
        if index >= MAX_BARS {
            return Err(bad("there are only six BARs"));
        }
        if kind == BarKind::Mem64 && index + 1 >= MAX_BARS {
            return Err(bad("a 64-bit BAR needs the next BAR register too"));
        }
        let slots = if kind == BarKind::Mem64 { 2 } else { 1 };
        if self.bars[index..index + slots]
            .iter()
            .any(|s| *s != BarSlot::Unused)
        {
            return Err(bad("already declared"));
        }
        let min = if kind == BarKind::Io { 4 } else { 16 };
        let max: u64 = match kind {
            BarKind::Io => 1 << 16,
            BarKind::Mem32 => 1 << 31,
            BarKind::Mem64 => 1 << 62,
        };
        let size = size
            .max(min)
            .checked_next_power_of_two()
            .filter(|s| *s <= max)
            .ok_or(bad("too large"))?;
        let bar = PciBar {
            kind,
            size,
            address: 0,
        };
        self.bars[index] = BarSlot::Bar {
            bar,
            order: self.bars_declared,
        };
        self.bars_declared = self.bars_declared.saturating_add(1);
        if kind == BarKind::Mem64 {
            self.bars[index + 1] = BarSlot::Mem64Upper;
        }
        self.store_bar_register(index);
        Ok(())
    }

    /// BAR `index` if one is declared there (not for the upper half of a
    /// 64-bit BAR).
    pub fn bar(&self, index: usize) -> Option<PciBar> {
        match self.bars.get(index)? {
            BarSlot::Bar { bar, .. } => Some(*bar),
            _ => None,
        }
    }

    /// Declared BARs in declaration order: `(index, bar)`.
    pub(crate) fn bars_in_declaration_order(&self) -> Vec<(usize, PciBar)> {
        let mut v: Vec<(u8, usize, PciBar)> = self
            .bars
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                BarSlot::Bar { bar, order } => Some((*order, i, *bar)),
                _ => None,
            })
            .collect();
        v.sort_by_key(|(order, _, _)| *order);
        v.into_iter().map(|(_, i, b)| (i, b)).collect()
    }

    /// True if the command register decodes the space BAR `index` is in.
    pub fn bar_decoded(&self, index: usize) -> bool {
        match self.bar(index) {
            Some(bar) => {
                let bit = match bar.kind {
                    BarKind::Io => regs::COMMAND_IO_SPACE,
                    BarKind::Mem32 | BarKind::Mem64 => regs::COMMAND_MEMORY_SPACE,
                };
                self.command() & bit != 0
            }
            None => false,
        }
    }

    /// Set the address of BAR `index` (start-up allocation, restore).
    pub(crate) fn set_bar_address(&mut self, index: usize, address: u64) {
        if let Some(BarSlot::Bar { bar, .. }) = self.bars.get_mut(index) {
            bar.address = address & !bar.size.wrapping_sub(1);
            self.store_bar_register(index);
        }
    }

    fn store_bar_register(&mut self, index: usize) {
        let Some(BarSlot::Bar { bar, .. }) = self.bars.get(index).copied() else {
            return;
        };
        let reg = regs::BAR0 + 4 * index as u16;
        match bar.kind {
            BarKind::Io => self.set_u32(reg, (bar.address as u32) | regs::BAR_IO_SPACE),
            BarKind::Mem32 => self.set_u32(reg, bar.address as u32),
            BarKind::Mem64 => {
                self.set_u32(reg, (bar.address as u32) | regs::BAR_MEM_TYPE_64);
                self.set_u32(reg + 4, (bar.address >> 32) as u32);
            }
        }
    }

    fn write_bar_register(&mut self, index: usize, value: u32) {
        match self.bars[index] {
            BarSlot::Unused => {}
            BarSlot::Bar { mut bar, order } => {
                let mask = !bar.size.wrapping_sub(1);
                bar.address = match bar.kind {
                    // Ports above 64 KiB do not exist (bhyve's PCI_EMUL_IOMASK).
                    BarKind::Io => u64::from(value) & mask & 0xFFFF,
                    BarKind::Mem32 => u64::from(value) & mask,
                    BarKind::Mem64 => {
                        (bar.address & 0xFFFF_FFFF_0000_0000)
                            | (u64::from(value) & mask & 0xFFFF_FFFF)
                    }
                };
                self.bars[index] = BarSlot::Bar { bar, order };
                self.store_bar_register(index);
            }
            BarSlot::Mem64Upper => {
                let Some(lower) = index.checked_sub(1) else {
                    return;
                };
                if let BarSlot::Bar { mut bar, order } = self.bars[lower] {
                    let mask = !bar.size.wrapping_sub(1);
                    bar.address = (bar.address & 0xFFFF_FFFF) | ((u64::from(value) << 32) & mask);
                    self.bars[lower] = BarSlot::Bar { bar, order };
                    self.store_bar_register(lower);
                }
            }
        }
    }

    // ---- capabilities ----

    /// Append a capability with ID `id`; `body` is everything after the ID
    /// and next-pointer bytes, `writable` (same length as `body`, or empty
    /// for read-only) the guest write mask of those bytes. Returns the
    /// capability's offset. Like bhyve, capabilities are dword aligned and
    /// packed from 0x40.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<u16, PciError> {
        let len = body.len() + 2;
        let padded = len.div_ceil(4) * 4;
        let offset = self.cap_end;
        if offset as usize + padded > PCI_STANDARD_CONFIG_SIZE
            || (!writable.is_empty() && writable.len() != body.len())
        {
            return Err(PciError::NoCapabilitySpace { len });
        }
        if self.last_cap == 0 {
            self.set_u8(regs::CAPABILITIES_POINTER, offset as u8);
            let status = self.u16(regs::STATUS) | regs::STATUS_CAPABILITIES;
            self.set_u16(regs::STATUS, status);
        } else {
            self.set_u8(self.last_cap + 1, offset as u8);
        }
        self.set_writable(offset, padded, false);
        self.set_u8(offset, id);
        self.set_u8(offset + 1, 0);
        for (i, &b) in body.iter().enumerate() {
            let at = offset as usize + 2 + i;
            self.set_u8(at as u16, b);
            if let Some(m) = self.wmask.get_mut(at) {
                *m = writable.get(i).copied().unwrap_or(0);
            }
        }
        self.last_cap = offset;
        self.cap_end = offset + padded as u16;
        Ok(offset)
    }

    /// Offset of the first capability with ID `id`.
    pub fn find_capability(&self, id: u8) -> Option<u16> {
        if self.u16(regs::STATUS) & regs::STATUS_CAPABILITIES == 0 {
            return None;
        }
        let mut at = u16::from(self.u8(regs::CAPABILITIES_POINTER));
        // A list can hold at most 48 dword-aligned entries; bound the walk.
        for _ in 0..48 {
            if at < regs::CAPABILITIES_START {
                return None;
            }
            if self.u8(at) == id {
                return Some(at);
            }
            at = u16::from(self.u8(at + 1));
        }
        None
    }

    /// Add the PCI Express capability the way bhyve's
    /// `pci_emul_add_pciecap` does: version 2, and for anything but an
    /// integrated endpoint a gen1 x1 link. Control registers are writable.
    pub fn add_pcie_capability(&mut self, kind: PcieDeviceType) -> Result<u16, PciError> {
        let mut body = [0u8; PCIE_CAP_LEN - 2];
        let mut writable = [0u8; PCIE_CAP_LEN - 2];
        // Offsets below are relative to the capability start, minus 2.
        let caps: u16 = 0x2 | (kind.encoding() << 4);
        body[0..2].copy_from_slice(&caps.to_le_bytes());
        if kind != PcieDeviceType::RootComplexIntegratedEndpoint {
            body[0x0C - 2..0x10 - 2].copy_from_slice(&0x411u32.to_le_bytes());
            body[0x12 - 2..0x14 - 2].copy_from_slice(&0x11u16.to_le_bytes());
        }
        // Device, link, slot, root and device/link 2 control registers.
        for ctl in [0x08usize, 0x10, 0x18, 0x1C, 0x28, 0x30, 0x38] {
            writable[ctl - 2] = 0xFF;
            writable[ctl - 1] = 0xFF;
        }
        self.add_capability(regs::CAP_ID_PCIE, &body, &writable)
    }

    /// Declare extended configuration space up to `end` (exclusive) as
    /// implemented, for devices that build extended capabilities with
    /// [`Self::set_u32`] and [`Self::set_writable`].
    pub fn set_extended_end(&mut self, end: u16) {
        self.ext_end = end.clamp(regs::EXTENDED_START + 4, PCI_CONFIG_SPACE_SIZE as u16);
    }

    // ---- INTx ----

    /// Ask for a legacy interrupt pin (bhyve's `pci_lintr_request`). The
    /// root picks the pin when the function is added and routes it at
    /// start-up; until then assertions are only recorded.
    pub fn request_intx(&mut self) {
        self.intx_requested = true;
    }

    pub fn intx_requested(&self) -> bool {
        self.intx_requested
    }

    /// INTx may reach the interrupt controller: no MSI/MSI-X, not disabled
    /// in the command register.
    fn intx_permitted(&self) -> bool {
        !(self.msi_enabled()
            || self.msix_enabled_bit()
            || self.command() & regs::COMMAND_INTX_DISABLE != 0)
    }

    /// Raise the function's INTx line (level triggered).
    pub fn intx_assert(&mut self) {
        if !self.intx_requested {
            tracing::debug!("INTx asserted by a function without an interrupt pin");
            return;
        }
        if self.intx_level == IntxLevel::Idle {
            if self.intx_permitted() {
                self.intx_level = IntxLevel::Asserted;
                if let Some(pin) = &self.wires.intx {
                    pin.assert();
                }
            } else {
                self.intx_level = IntxLevel::Pending;
            }
        }
    }

    /// Lower the function's INTx line.
    pub fn intx_deassert(&mut self) {
        match self.intx_level {
            IntxLevel::Asserted => {
                self.intx_level = IntxLevel::Idle;
                if let Some(pin) = &self.wires.intx {
                    pin.deassert();
                }
            }
            IntxLevel::Pending => self.intx_level = IntxLevel::Idle,
            IntxLevel::Idle => {}
        }
    }

    /// Re-evaluate a raised line after the command register or an MSI
    /// enable bit changed (bhyve's `pci_lintr_update`).
    pub(crate) fn intx_update(&mut self) {
        let permitted = self.intx_permitted();
        match self.intx_level {
            IntxLevel::Asserted if !permitted => {
                self.intx_level = IntxLevel::Pending;
                if let Some(pin) = &self.wires.intx {
                    pin.deassert();
                }
            }
            IntxLevel::Pending if permitted => {
                self.intx_level = IntxLevel::Asserted;
                if let Some(pin) = &self.wires.intx {
                    pin.assert();
                }
            }
            _ => {}
        }
    }

    /// Wire the routed INTx pin (done by the root at start-up).
    pub(crate) fn connect_intx(&mut self, pin: IntxPin) {
        if self.intx_level == IntxLevel::Asserted {
            pin.assert();
        }
        self.wires.intx = Some(pin);
    }

    /// Take over the state of `saved` (a snapshot of this same function),
    /// keeping this instance's connections to the interrupt controller.
    /// Refused if the saved layout (BARs, MSI/MSI-X capabilities, sizes)
    /// differs, so a snapshot cannot smuggle in a different device shape.
    /// Afterwards call [`crate::PciRoot::resync_bars`] so the mappings
    /// follow the restored BARs.
    pub fn restore(&mut self, saved: PciConfigSpace) -> Result<(), PciError> {
        let mismatch = |what| Err(PciError::SnapshotMismatch(what));
        if saved.data.len() != PCI_CONFIG_SPACE_SIZE || saved.wmask.len() != PCI_CONFIG_SPACE_SIZE {
            return mismatch("config space size");
        }
        let same_bars = self
            .bars
            .iter()
            .zip(&saved.bars)
            .all(|(a, b)| match (a, b) {
                (BarSlot::Bar { bar: a, .. }, BarSlot::Bar { bar: b, .. }) => {
                    a.kind == b.kind && a.size == b.size
                }
                _ => a == b,
            });
        if !same_bars {
            return mismatch("BARs");
        }
        if !crate::msi::same_shape(self, &saved) {
            return mismatch("MSI/MSI-X capabilities");
        }
        let wires = std::mem::take(&mut self.wires);
        *self = saved;
        self.wires = wires;
        Ok(())
    }

    /// Where MSI and MSI-X messages are sent; the root connects this when
    /// the function is added. Device tests without a root can call it.
    pub fn connect_msi(&mut self, sender: Arc<dyn MsiSender>) {
        self.wires.msi = Some(sender);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> PciConfigSpace {
        PciConfigSpace::new(0x1AF4, 0x1000, 0x02, 0x00, 0x00)
    }

    #[test]
    fn ids_are_read_only() {
        let mut c = dev();
        c.write(0, &0xFFFF_FFFFu32.to_le_bytes());
        assert_eq!(c.read_dword(0), 0x1000_1AF4);
        c.write(8, &[0xAA]);
        assert_eq!(c.read_dword(8), 0x0200_0000);
    }

    #[test]
    fn bar_sizing_and_programming() {
        let mut c = dev();
        c.add_bar(0, BarKind::Io, 20).unwrap();
        c.add_bar(1, BarKind::Mem32, 0x1000).unwrap();
        c.add_bar(2, BarKind::Mem64, 0x1_0000_0000).unwrap();
        assert!(c.add_bar(3, BarKind::Io, 4).is_err(), "upper half taken");
        assert!(c.add_bar(5, BarKind::Mem64, 16).is_err());
        for i in 0..6u16 {
            c.write(0x10 + 4 * i, &u32::MAX.to_le_bytes());
        }
        assert_eq!(
            c.read_dword(0x10),
            0xFFE1,
            "32 ports, io bit, 16-bit decode"
        );
        assert_eq!(c.read_dword(0x14), 0xFFFF_F000);
        assert_eq!(
            c.read_dword(0x18),
            0x0000_0004,
            "4 GiB: low dword only type bits"
        );
        assert_eq!(c.read_dword(0x1C), 0xFFFF_FFFF);
        assert_eq!(c.read_dword(0x20), 0);
        c.write(0x18, &0u32.to_le_bytes());
        c.write(0x1C, &0x8u32.to_le_bytes());
        assert_eq!(c.bar(2).unwrap().address, 0x8_0000_0000);
        c.write(0x14, &[0x12, 0x34]);
        assert_eq!(
            c.read_dword(0x14),
            0xFFFF_F000,
            "sub-dword BAR writes dropped"
        );
    }

    #[test]
    fn capability_list_and_command_mask() {
        let mut c = dev();
        let pcie = c.add_pcie_capability(PcieDeviceType::RootPort).unwrap();
        assert_eq!(pcie, 0x40);
        let v = c
            .add_capability(regs::CAP_ID_VENDOR, &[3, 0xAA], &[])
            .unwrap();
        assert_eq!(v, 0x7C);
        assert_eq!(c.u8(regs::CAPABILITIES_POINTER), 0x40);
        assert_eq!(c.u8(0x41), 0x7C);
        assert_eq!(c.u8(0x7D), 0);
        assert_eq!(c.find_capability(regs::CAP_ID_VENDOR), Some(0x7C));
        assert_eq!(c.read_dword(0x40) & 0xFFFF_00FF, 0x0042_0010);
        c.write(0x7C, &u32::MAX.to_le_bytes());
        assert_eq!(c.read_dword(0x7C), 0xAA03_0009, "read-only capability");
        c.write(4, &u32::MAX.to_le_bytes());
        assert_eq!(c.read_dword(4), 0x0010_077F);
        assert!(c.add_capability(1, &[0; 200], &[]).is_err());
    }

    #[test]
    fn extended_space_reads() {
        let c = dev();
        assert_eq!(c.read_dword(0x100), 0);
        assert_eq!(c.read_dword(0x104), 0xFFFF_FFFF);
        assert_eq!(c.read_dword(0x1000), 0xFFFF_FFFF);
    }

    #[test]
    fn snapshot_round_trip() {
        let mut c = dev();
        c.add_bar(0, BarKind::Io, 32).unwrap();
        c.write(0x3C, &[11]);
        let json = serde_json::to_string(&c).unwrap();
        let back: PciConfigSpace = serde_json::from_str(&json).unwrap();
        assert_eq!(back.read_dword(0x3C), c.read_dword(0x3C));
        assert_eq!(back.bar(0), c.bar(0));
    }
}
