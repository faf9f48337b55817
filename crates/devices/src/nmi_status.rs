//! NMI status and control port 0x61 (the "system control port B").
//!
//! Bits 0-3 (timer 2 gate, speaker data, parity/IOCHK disable) read back as
//! written. Bit 4 is the DRAM refresh toggle, which firmware and old Linux
//! delay loops poll for a change: it flips on every read. Bit 5 is PIT
//! channel 2's output, which Linux's PIT calibration polls. bhyve reads it
//! from its in-kernel 8254; rhyve's 8254 is KVM's, whose state user space
//! cannot see on each access, so the output is modelled as the square wave
//! channel 2 produces in its power-on setup (mode 3, count 65536, 18.2 Hz)
//! while the gate is set, and high while it is clear. (With KVM's in-kernel
//! PIT speaker port in use, KVM answers port 0x61 itself and this device is
//! never reached.) NMI sources (bits 6-7) never fire.

use crate::clock::{ticks_to_ns, Clock};
use rhyve_platform::bus::BusDevice;
use rhyve_platform::snapshot::Schema;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

const GATE2: u8 = 0x01;
const WRITABLE: u8 = 0x0F;
const REFRESH: u8 = 0x10;
const OUT2: u8 = 0x20;
/// The 8254's input clock.
const PIT_HZ: u64 = 1_193_182;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NmiStatusState {
    pub control: u8,
    pub refresh: bool,
    /// Clock time the timer-2 gate was last raised.
    pub gate_since_ns: u64,
}

impl Schema for NmiStatusState {
    const KIND: &'static str = "nmi-status-port";
    const VERSION: u32 = 1;
}

pub struct NmiStatus {
    state: NmiStatusState,
    clock: Arc<dyn Clock>,
}

impl NmiStatus {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            state: NmiStatusState::default(),
            clock,
        }
    }

    pub fn state(&self) -> NmiStatusState {
        self.state
    }

    pub fn restore(&mut self, saved: NmiStatusState) -> Result<(), String> {
        self.state = saved;
        Ok(())
    }

    fn out2(&self) -> bool {
        if self.state.control & GATE2 == 0 {
            return true;
        }
        let period = ticks_to_ns(65_536, PIT_HZ);
        let phase = self.clock.now_ns().saturating_sub(self.state.gate_since_ns) % period;
        phase < period / 2
    }
}

impl BusDevice for NmiStatus {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            tracing::debug!("port 0x61: {}-byte read refused", data.len());
            data.fill(0xFF);
            return;
        }
        self.state.refresh = !self.state.refresh;
        let mut v = self.state.control & WRITABLE;
        if self.state.refresh {
            v |= REFRESH;
        }
        if self.out2() {
            v |= OUT2;
        }
        data[0] = v;
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.len() != 1 {
            tracing::debug!("port 0x61: {}-byte write refused", data.len());
            return;
        }
        let v = data[0] & WRITABLE;
        if self.state.control & GATE2 == 0 && v & GATE2 != 0 {
            self.state.gate_since_ns = self.clock.now_ns();
        }
        self.state.control = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::test_clock::ManualClock;

    #[test]
    fn refresh_toggles_and_out2_follows_gate() {
        let clock = Arc::new(ManualClock::default());
        let mut p = NmiStatus::new(clock.clone());
        let mut a = [0u8];
        let mut b = [0u8];
        p.read(0, &mut a);
        p.read(0, &mut b);
        assert_ne!(a[0] & REFRESH, b[0] & REFRESH);
        assert_eq!(a[0] & OUT2, OUT2, "gate low: output high");
        p.write(0, &[0xFF]);
        p.read(0, &mut a);
        assert_eq!(a[0] & WRITABLE, WRITABLE);
        assert_eq!(a[0] & OUT2, OUT2, "first half period high");
        clock.advance_ns(ticks_to_ns(65_536, PIT_HZ) / 2 + 1000);
        p.read(0, &mut a);
        assert_eq!(a[0] & OUT2, 0, "second half low");
        assert_eq!(p.state().control, WRITABLE);
    }
}
