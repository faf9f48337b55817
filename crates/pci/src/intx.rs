//! Legacy PCI interrupts (INTx): pin routing and the PIRQ router.
//!
//! Reproduces bhyve's `amd64/pci_irq.c` and `amd64/ioapic.c`:
//!
//! - every slot pin in use (INTA-INTD) gets an IOAPIC pin from 16 up,
//!   round-robin over the PCI pins, and one of 8 PIRQ links (LNKA-LNKH),
//!   the least used one; with a boot ROM both use bhyve's fixed mapping
//!   `(4 + slot + pin) % 8` so the firmware's tables agree;
//! - a PIRQ link first used is pointed at the least used permitted ISA IRQ
//!   (3-7, 9-12, 14, 15, minus those reserved by ISA devices) and that IRQ
//!   becomes level triggered;
//! - asserting a pin raises its IOAPIC pin, and, while the link's register
//!   holds a valid IRQ, that ISA IRQ too (for guests using the 8259s). The
//!   guest may re-point a link through the LPC bridge's PIRQ registers.
//!
//! bhyve's IOAPIC has 32 inputs, so its round robin spans pins 16-31; the
//! router takes the pin count from the machine (KVM's IOAPIC has 24, so
//! pins 16-23), which is the only difference a guest can see.
//!
//! KVM does not OR together levels driven by user space (one source ID), so
//! the router counts assertions per GSI and drives a line only on 0<->1
//! transitions; pins shared between slots then behave like wired-OR lines.
//! On KVM's default routing an ISA GSI below 16 reaches both the 8259 and
//! the IOAPIC pin of the same number; the latter stays masked in APIC mode.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use rhyve_platform::irq::{InterruptController, InterruptLine};
use rhyve_platform::layout::PCI_INTX_FIRST_PIN;
use serde::{Deserialize, Serialize};

use crate::PciError;

/// PIRQ links (LNKA-LNKH).
pub const PIRQ_COUNT: usize = 8;
const PIRQ_DISABLED: u8 = 0x80;
const PIRQ_IRQ_MASK: u8 = 0x0F;
/// ISA IRQs a PIRQ link may use: 3-7, 9-12, 14, 15.
const PERMITTED_ISA_IRQS: u16 = 0xDEF8;
const ISA_IRQS: usize = 16;

fn irq_permitted(irq: u8) -> bool {
    irq < 16 && PERMITTED_ISA_IRQS & (1 << irq) != 0
}

fn pirq_valid(reg: u8) -> bool {
    reg & PIRQ_DISABLED == 0 && irq_permitted(reg & PIRQ_IRQ_MASK)
}

/// One routed slot pin, for the ACPI `_PRT` and MP table builders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciIntxRoute {
    pub bus: u8,
    pub slot: u8,
    /// 1 = INTA ... 4 = INTD.
    pub pin: u8,
    /// IOAPIC input (global system interrupt).
    pub gsi: u32,
    /// PIRQ link, 0 = LNKA ... 7 = LNKH (bhyve's `pirq_pin` minus one).
    pub pirq: u8,
}

/// The router's state, serializable for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntxRouterState {
    /// PIRQA-H registers as the LPC bridge shows them.
    pirq_regs: [u8; PIRQ_COUNT],
    /// Slot pins routed to each link.
    pirq_users: [u32; PIRQ_COUNT],
    /// Slot pins currently asserting through each link.
    pirq_active: [u32; PIRQ_COUNT],
    /// Per ISA IRQ: users, or `None` if a PIRQ link may not take it.
    isa_irq_users: [Option<u32>; ISA_IRQS],
    /// ISA IRQs made level triggered by PIRQ routing.
    level_isa_irqs: u16,
    /// Round-robin cursor over the PCI IOAPIC pins.
    next_ioapic_pin: u32,
    /// Assertions per GSI (wired-OR of shared lines).
    gsi_levels: BTreeMap<u32, u32>,
    routing_started: bool,
}

/// bhyve's PCI interrupt router: hands out IOAPIC pins and PIRQ links and
/// drives the lines.
pub struct IntxRouter {
    controller: Arc<dyn InterruptController>,
    /// bhyve's fixed mapping for boot ROM guests.
    fixed_mapping: bool,
    /// IOAPIC pins above 15 available to PCI.
    pci_ioapic_pins: u32,
    state: Mutex<IntxRouterState>,
    lines: Mutex<HashMap<u32, Arc<dyn InterruptLine>>>,
}

impl IntxRouter {
    /// A router over `controller`, whose IOAPIC has `ioapic_pins` inputs.
    /// `bootrom` selects bhyve's fixed mapping for firmware boots.
    pub fn new(controller: Arc<dyn InterruptController>, ioapic_pins: u32, bootrom: bool) -> Self {
        let mut isa_irq_users = [None; ISA_IRQS];
        for (irq, users) in isa_irq_users.iter_mut().enumerate() {
            if irq_permitted(irq as u8) {
                *users = Some(0);
            }
        }
        Self {
            controller,
            fixed_mapping: bootrom,
            pci_ioapic_pins: ioapic_pins.saturating_sub(PCI_INTX_FIRST_PIN),
            state: Mutex::new(IntxRouterState {
                pirq_regs: [PIRQ_DISABLED; PIRQ_COUNT],
                pirq_users: [0; PIRQ_COUNT],
                pirq_active: [0; PIRQ_COUNT],
                isa_irq_users,
                level_isa_irqs: 0,
                next_ioapic_pin: 0,
                gsi_levels: BTreeMap::new(),
                routing_started: false,
            }),
            lines: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IntxRouterState> {
        // A panic elsewhere must not take interrupts down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_isa_irq(irq: u8) -> Result<(), PciError> {
        if usize::from(irq) >= ISA_IRQS {
            return Err(PciError::OutOfRange {
                what: "ISA IRQ",
                value: u64::from(irq),
                min: 0,
                max: 15,
            });
        }
        Ok(())
    }

    /// Keep PIRQ links off ISA IRQ `irq` (an ISA device owns it; bhyve's
    /// `pci_irq_reserve`). Only before routing.
    pub fn reserve_isa_irq(&self, irq: u8) -> Result<(), PciError> {
        Self::check_isa_irq(irq)?;
        let mut s = self.lock();
        if s.routing_started {
            return Err(PciError::AlreadyFinalized);
        }
        s.isa_irq_users[usize::from(irq)] = None;
        Ok(())
    }

    /// Count a user of ISA IRQ `irq` so PIRQ links prefer others (bhyve's
    /// `pci_irq_use`, e.g. for the SCI). Only before routing.
    pub fn use_isa_irq(&self, irq: u8) -> Result<(), PciError> {
        Self::check_isa_irq(irq)?;
        let mut s = self.lock();
        if s.routing_started {
            return Err(PciError::AlreadyFinalized);
        }
        if let Some(n) = &mut s.isa_irq_users[usize::from(irq)] {
            *n += 1;
        }
        Ok(())
    }

    /// PIRQ register of link `link` (0 = PIRQA). Unknown links read 0x80.
    pub fn pirq_register(&self, link: usize) -> u8 {
        self.lock()
            .pirq_regs
            .get(link)
            .copied()
            .unwrap_or(PIRQ_DISABLED)
    }

    /// Guest write of PIRQ register `link` (PIIX semantics: bit 7 disables
    /// the link, bits 0-3 select the IRQ). A raised link moves with it.
    pub fn set_pirq_register(&self, link: usize, value: u8) {
        let mut s = self.lock();
        let value = value & (PIRQ_DISABLED | PIRQ_IRQ_MASK);
        let Some(&old) = s.pirq_regs.get(link) else {
            return;
        };
        if old == value {
            return;
        }
        let active = s.pirq_active[link] != 0;
        if active && pirq_valid(old) {
            self.lower(&mut s, u32::from(old & PIRQ_IRQ_MASK));
        }
        s.pirq_regs[link] = value;
        if active && pirq_valid(value) {
            self.raise(&mut s, u32::from(value & PIRQ_IRQ_MASK));
        }
    }

    /// ISA IRQs that PIRQ routing made level triggered (for the ELCR).
    pub fn level_triggered_isa_irqs(&self) -> Vec<u8> {
        let mask = self.lock().level_isa_irqs;
        (0..16u8).filter(|i| mask & (1 << i) != 0).collect()
    }

    /// A copy of the router state.
    pub fn state(&self) -> IntxRouterState {
        self.lock().clone()
    }

    /// Replace the state with a saved one (a snapshot) and drive every
    /// line to its saved level.
    pub fn restore(&self, saved: IntxRouterState) {
        let mut s = self.lock();
        let old = std::mem::replace(&mut *s, saved);
        for gsi in old.gsi_levels.keys() {
            if !s.gsi_levels.contains_key(gsi) {
                self.line(*gsi).set_level(false);
            }
        }
        for (gsi, n) in &s.gsi_levels {
            self.line(*gsi).set_level(*n > 0);
        }
    }

    /// Route slot pin `pin` (1-4) of `slot`: an IOAPIC pin and a PIRQ link
    /// (0 = LNKA).
    pub(crate) fn route(&self, slot: u8, pin: u8) -> Option<(u32, u8)> {
        let mut s = self.lock();
        s.routing_started = true;
        if self.pci_ioapic_pins == 0 {
            return None;
        }
        let fixed = (4 + u32::from(slot) + u32::from(pin)) % 8;
        let gsi = if self.fixed_mapping {
            PCI_INTX_FIRST_PIN + fixed % self.pci_ioapic_pins.min(8)
        } else {
            let n = s.next_ioapic_pin;
            s.next_ioapic_pin = n.wrapping_add(1);
            PCI_INTX_FIRST_PIN + n % self.pci_ioapic_pins
        };
        let link = if self.fixed_mapping {
            fixed as usize
        } else {
            // First least-used link.
            (0..PIRQ_COUNT)
                .min_by_key(|&l| s.pirq_users[l])
                .unwrap_or(0)
        };
        s.pirq_users[link] += 1;
        if s.pirq_regs[link] == PIRQ_DISABLED {
            let irq = (0..ISA_IRQS)
                .filter_map(|i| s.isa_irq_users[i].map(|n| (i, n)))
                .min_by_key(|&(_, n)| n)
                .map(|(i, _)| i)?;
            if let Some(n) = &mut s.isa_irq_users[irq] {
                *n += 1;
            }
            s.pirq_regs[link] = irq as u8;
            s.level_isa_irqs |= 1 << irq;
        }
        Some((gsi, link as u8))
    }

    fn line(&self, gsi: u32) -> Arc<dyn InterruptLine> {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines
            .entry(gsi)
            .or_insert_with(|| self.controller.line(gsi))
            .clone()
    }

    fn raise(&self, s: &mut IntxRouterState, gsi: u32) {
        let n = s.gsi_levels.entry(gsi).or_insert(0);
        *n += 1;
        if *n == 1 {
            self.line(gsi).set_level(true);
        }
    }

    fn lower(&self, s: &mut IntxRouterState, gsi: u32) {
        if let Some(n) = s.gsi_levels.get_mut(&gsi) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.gsi_levels.remove(&gsi);
                self.line(gsi).set_level(false);
            }
        }
    }

    fn assert_pin(&self, gsi: u32, pirq: u8) {
        let mut s = self.lock();
        let link = usize::from(pirq);
        if link < PIRQ_COUNT {
            s.pirq_active[link] += 1;
            let reg = s.pirq_regs[link];
            if s.pirq_active[link] == 1 && pirq_valid(reg) {
                self.raise(&mut s, u32::from(reg & PIRQ_IRQ_MASK));
            }
        }
        self.raise(&mut s, gsi);
    }

    fn deassert_pin(&self, gsi: u32, pirq: u8) {
        let mut s = self.lock();
        let link = usize::from(pirq);
        if link < PIRQ_COUNT && s.pirq_active[link] > 0 {
            s.pirq_active[link] -= 1;
            let reg = s.pirq_regs[link];
            if s.pirq_active[link] == 0 && pirq_valid(reg) {
                self.lower(&mut s, u32::from(reg & PIRQ_IRQ_MASK));
            }
        }
        self.lower(&mut s, gsi);
    }
}

/// A function's routed INTx pin: what [`crate::PciConfigSpace::intx_assert`]
/// drives.
#[derive(Clone)]
pub(crate) struct IntxPin {
    router: Arc<IntxRouter>,
    gsi: u32,
    pirq: u8,
}

impl IntxPin {
    pub(crate) fn new(router: Arc<IntxRouter>, gsi: u32, pirq: u8) -> Self {
        Self { router, gsi, pirq }
    }

    pub(crate) fn assert(&self) {
        self.router.assert_pin(self.gsi, self.pirq);
    }

    pub(crate) fn deassert(&self) {
        self.router.deassert_pin(self.gsi, self.pirq);
    }
}

impl std::fmt::Debug for IntxPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntxPin")
            .field("gsi", &self.gsi)
            .field("pirq", &self.pirq)
            .finish()
    }
}
