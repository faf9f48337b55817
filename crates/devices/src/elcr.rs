//! Edge/level control registers of the two 8259s (ports 0x4D0/0x4D1).
//!
//! A bit set makes that ISA IRQ level-triggered. The platform starts with
//! IRQ 9 (the SCI) level, as bhyve's `sci_init` leaves it. As in bhyve's vatpic, IRQs
//! 0, 1, 2, 8 and 13 are always edge (their bits read 0). KVM's in-kernel
//! PIC answers these ports itself when it is in use; this model serves
//! otherwise and keeps the same masks.

use rhyve_platform::bus::BusDevice;
use rhyve_platform::snapshot::Schema;
use serde::{Deserialize, Serialize};

/// Writable bits of the master (IRQ 0-7) and slave (IRQ 8-15) registers.
const MASKS: [u8; 2] = [0xF8, 0xDE];

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ElcrState {
    pub regs: [u8; 2],
}

impl Schema for ElcrState {
    const KIND: &'static str = "elcr";
    const VERSION: u32 = 1;
}

#[derive(Debug, Default)]
pub struct Elcr {
    state: ElcrState,
}

impl Elcr {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn state(&self) -> ElcrState {
        self.state
    }

    pub fn restore(&mut self, saved: ElcrState) -> Result<(), String> {
        self.state = saved;
        Ok(())
    }

    /// Make ISA `irq` level-triggered, as bhyve's `vm_isa_set_irq_trigger`
    /// does for the SCI and for IRQs given to PCI interrupt links. IRQs that
    /// can only be edge-triggered are left alone.
    pub fn set_level_triggered(&mut self, irq: u8) {
        if irq < 16 {
            let idx = usize::from(irq / 8);
            self.state.regs[idx] |= (1 << (irq % 8)) & MASKS[idx];
        }
    }

    /// True if ISA `irq` is level-triggered.
    pub fn is_level(&self, irq: u8) -> bool {
        irq < 16 && self.state.regs[usize::from(irq / 8)] & (1 << (irq % 8)) != 0
    }
}

impl BusDevice for Elcr {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| self.state.regs.get(o + i).copied())
                .unwrap_or(0xFF);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(idx) = usize::try_from(offset)
                .ok()
                .map(|o| o + i)
                .filter(|&o| o < 2)
            {
                self.state.regs[idx] = b & MASKS[idx];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_edge_only_irqs() {
        let mut e = Elcr::new();
        e.write(0, &[0xFF, 0xFF]);
        let mut b = [0u8; 2];
        e.read(0, &mut b);
        assert_eq!(b, [0xF8, 0xDE]);
        assert!(e.is_level(9));
        assert!(!e.is_level(8));
        assert!(!e.is_level(0));
        e.write(1, &[0x02]);
        e.read(1, &mut b[..1]);
        assert_eq!(b[0], 0x02);
        assert_eq!(e.state().regs, [0xF8, 0x02]);
        let mut e = Elcr::new();
        e.set_level_triggered(9);
        e.set_level_triggered(2);
        e.set_level_triggered(200);
        assert_eq!(e.state().regs, [0, 0x02]);
    }
}
