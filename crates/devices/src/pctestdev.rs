//! QEMU-compatible pc-testdev, as bhyve's `pctestdev.c` provides it for
//! kvm-unit-tests (`lpc.pc-testdev=true`):
//! * isa-debug-exit, ports 0xF4-0xF7: writing V ends the VM with status
//!   `(V << 1) | 1`; reads return 0;
//! * a 32-bit scratch register at ports 0xE0-0xE3, byte/word/dword access;
//! * IRQ line ports at 0x2000 + n (one per IOAPIC pin): writing non-zero
//!   asserts line n, zero deasserts it; reads return 0;
//! * 64 KiB of scratch memory at 0xFF000000.

use rhyve_platform::bus::BusDevice;
use rhyve_platform::exit::{ExitRequest, ExitRequests};
use rhyve_platform::irq::InterruptController;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub const DEBUG_EXIT_LEN: u64 = 4;
pub const SCRATCH_PORT: u16 = 0xE0;
pub const SCRATCH_LEN: u64 = 4;
pub const IRQ_PORT_BASE: u16 = 0x2000;

/// isa-debug-exit.
pub struct DebugExit {
    exits: Arc<ExitRequests>,
}

impl DebugExit {
    pub fn new(exits: Arc<ExitRequests>) -> Self {
        Self { exits }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // bhyve takes the value in EAX as the port handler sees it.
        let mut raw = [0u8; 4];
        let n = data.len().min(4);
        raw[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(raw);
        tracing::info!("pc-testdev: isa-debug-exit({v:#x}) at offset {offset}");
        self.exits.request(ExitRequest::DebugExit(v));
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScratchState {
    pub data: u32,
}

/// The 4-byte I/O scratch register.
#[derive(Debug, Default)]
pub struct ScratchPort {
    state: ScratchState,
}

impl ScratchPort {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn state(&self) -> ScratchState {
        self.state
    }
}

impl BusDevice for ScratchPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let bytes = self.state.data.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| bytes.get(o + i).copied())
                .unwrap_or(0xFF);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = self.state.data.to_le_bytes();
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = usize::try_from(offset)
                .ok()
                .and_then(|o| bytes.get_mut(o + i))
            {
                *slot = *b;
            }
        }
        self.state.data = u32::from_le_bytes(bytes);
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IrqLinesState {
    /// Which lines the guest holds asserted.
    pub asserted: Vec<bool>,
}

/// One port per interrupt line: 0x2000 + n drives line n.
pub struct IrqLines {
    state: IrqLinesState,
    irqs: Arc<dyn InterruptController>,
}

impl IrqLines {
    pub fn new(irqs: Arc<dyn InterruptController>, pins: u32) -> Self {
        Self {
            state: IrqLinesState {
                asserted: vec![false; pins as usize],
            },
            irqs,
        }
    }

    pub fn state(&self) -> &IrqLinesState {
        &self.state
    }
}

impl BusDevice for IrqLines {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            tracing::debug!("pc-testdev: {}-byte IRQ port write refused", data.len());
            return;
        }
        let Some(slot) = usize::try_from(offset)
            .ok()
            .and_then(|o| self.state.asserted.get_mut(o))
        else {
            return;
        };
        let level = data[0] != 0;
        *slot = level;
        self.irqs.line(offset as u32).set_level(level);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoMemState {
    pub bytes: Vec<u8>,
}

/// The MMIO scratch area.
pub struct IoMem {
    state: IoMemState,
}

impl IoMem {
    pub fn new(size: u64) -> Self {
        Self {
            state: IoMemState {
                bytes: vec![0; size as usize],
            },
        }
    }

    pub fn state(&self) -> &IoMemState {
        &self.state
    }

    fn range(&self, offset: u64, len: usize) -> Option<std::ops::Range<usize>> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len)?;
        (end <= self.state.bytes.len()).then_some(start..end)
    }
}

impl BusDevice for IoMem {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.range(offset, data.len()) {
            Some(r) => data.copy_from_slice(&self.state.bytes[r]),
            None => data.fill(0xFF),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(r) = self.range(offset, data.len()) {
            self.state.bytes[r].copy_from_slice(data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::FakeController;

    #[test]
    fn debug_exit_status() {
        let exits = Arc::new(ExitRequests::new());
        let mut d = DebugExit::new(exits.clone());
        let mut b = [0xAAu8; 4];
        d.read(0, &mut b);
        assert_eq!(b, [0; 4]);
        d.write(0, &[0x10]);
        assert_eq!(exits.pending(), Some(ExitRequest::DebugExit(0x10)));
        assert_eq!(exits.pending().unwrap().status(), 0x21);
    }

    #[test]
    fn scratch_byte_lanes() {
        let mut s = ScratchPort::new();
        s.write(0, &0x1122_3344u32.to_le_bytes());
        s.write(2, &[0xAB]);
        let mut w = [0u8; 2];
        s.read(2, &mut w);
        assert_eq!(w, [0xAB, 0x11]);
        assert_eq!(s.state().data, 0x11AB_3344);
        let mut over = [0u8; 4];
        s.read(2, &mut over);
        assert_eq!(over, [0xAB, 0x11, 0xFF, 0xFF]);
    }

    #[test]
    fn irq_ports_drive_lines() {
        let ctl = Arc::new(FakeController::default());
        let mut l = IrqLines::new(ctl.clone(), 24);
        l.write(10, &[1]);
        assert!(ctl.get(10).level());
        l.write(10, &[0]);
        assert!(!ctl.get(10).level());
        l.write(23, &[5]);
        assert!(ctl.get(23).level());
        l.write(24, &[1]);
        l.write(3, &[1, 1]);
        assert!(!ctl.get(3).level());
        assert_eq!(l.state().asserted.iter().filter(|a| **a).count(), 1);
    }

    #[test]
    fn iomem_is_bounded() {
        let mut m = IoMem::new(0x10000);
        m.write(0xFFFC, &[1, 2, 3, 4]);
        let mut b = [0u8; 4];
        m.read(0xFFFC, &mut b);
        assert_eq!(b, [1, 2, 3, 4]);
        m.write(0xFFFE, &[9, 9, 9, 9]);
        let mut past = [0u8; 4];
        m.read(0xFFFE, &mut past);
        assert_eq!(past, [0xFF; 4]);
        assert_eq!(m.state().bytes.len(), 0x10000);
    }
}
