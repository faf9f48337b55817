//! Several devices on one ISA IRQ (COM1/COM3 on IRQ 4, COM2/COM4 on IRQ 3).
//!
//! bhyve's vatpic and vioapic count assertions per pin, so two UARTs sharing
//! a line behave as a wired-OR: the line stays up while either wants it.
//! An [`InterruptLine`] from the hypervisor is a single level (KVM_IRQ_LINE
//! from user space has one source), so one device's deassert would drop the
//! other's request. [`SharedIrq`] restores the wired-OR in front of it.

use rhyve_platform::irq::InterruptLine;
use std::sync::{Arc, Mutex};

/// The OR of the inputs handed out by [`SharedIrq::input`].
pub struct SharedIrq {
    line: Arc<dyn InterruptLine>,
    /// One bit per input currently asserting.
    asserted: Mutex<u64>,
}

impl SharedIrq {
    pub fn new(line: Arc<dyn InterruptLine>) -> Arc<Self> {
        Arc::new(Self {
            line,
            asserted: Mutex::new(0),
        })
    }

    /// Input `index` (0..64) of the OR gate.
    pub fn input(self: &Arc<Self>, index: u32) -> Arc<dyn InterruptLine> {
        Arc::new(SharedIrqInput {
            shared: self.clone(),
            bit: 1u64 << (index % 64),
        })
    }
}

struct SharedIrqInput {
    shared: Arc<SharedIrq>,
    bit: u64,
}

impl InterruptLine for SharedIrqInput {
    fn set_level(&self, asserted: bool) {
        let mut mask = self
            .shared
            .asserted
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let before = *mask != 0;
        if asserted {
            *mask |= self.bit;
        } else {
            *mask &= !self.bit;
        }
        let after = *mask != 0;
        if before != after {
            self.shared.line.set_level(after);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::RecordingLine;

    #[test]
    fn line_stays_up_while_any_input_asserts() {
        let line = Arc::new(RecordingLine::default());
        let or = SharedIrq::new(line.clone());
        let (a, b) = (or.input(0), or.input(1));
        a.set_level(true);
        b.set_level(true);
        a.set_level(false);
        assert!(line.level());
        b.set_level(false);
        assert!(!line.level());
        assert_eq!(line.rises(), 1);
        a.pulse();
        assert_eq!(line.rises(), 2);
        assert!(!line.level());
    }
}
