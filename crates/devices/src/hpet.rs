//! HPET at 0xFED00000, reproducing bhyve's in-kernel `vhpet.c` (KVM has no
//! HPET, so it lives here):
//! * 8 timers, a 32-bit main counter at 2^24 Hz (period 59604644 fs),
//!   vendor 0x8086, revision 1; no 64-bit counter, no LegacyReplacement
//!   route: bhyve advertises neither, and a write of LEG_RT is dropped, so
//!   the guest keeps the 8254/RTC for legacy IRQ 0/8 exactly as on bhyve;
//! * each timer can route to the 4 highest IOAPIC pins (20-23 with KVM's
//!   24-pin IOAPIC; bhyve computes the same rule from its pin count), edge or
//!   level, or deliver through FSB (MSI);
//! * one-shot and periodic modes with bhyve's VAL_SET and rate semantics.
//!
//! The main counter derives from the monotonic clock; comparator deadlines
//! are served by a [`crate::timer::TimerThread`]. Accesses must be 4 or 8
//! bytes and naturally aligned; others are ignored (reads return 0), as in
//! bhyve.

use crate::clock::{ns_to_ticks, ticks_to_ns, Clock};
use crate::timer::{Timed, TimerWaker};
use rhyve_platform::bus::BusDevice;
use rhyve_platform::irq::{InterruptController, MsiSender};
use rhyve_platform::layout::IOAPIC_PINS;
use rhyve_platform::snapshot::Schema;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Main counter frequency (2^24 Hz).
pub const HPET_FREQ: u64 = 1 << 24;
pub const HPET_NUM_TIMERS: usize = 8;
const FS_PER_S: u64 = 1_000_000_000_000_000;

const REG_CAPABILITIES: u64 = 0x000;
const REG_CONFIG: u64 = 0x010;
const REG_ISR: u64 = 0x020;
const REG_MAIN_COUNTER: u64 = 0x0F0;
const TIMER_BASE: u64 = 0x100;
const TIMER_STRIDE: u64 = 0x20;
const TIMER_CAP_CNF: u64 = 0x00;
const TIMER_COMPARATOR: u64 = 0x08;
const TIMER_FSB_VAL: u64 = 0x10;
const TIMER_FSB_ADDR: u64 = 0x14;

const CNF_ENABLE: u64 = 1 << 0;
const CNF_LEG_RT: u64 = 1 << 1;

const TCNF_INT_TYPE: u64 = 1 << 1;
const TCNF_INT_ENB: u64 = 1 << 2;
const TCNF_TYPE: u64 = 1 << 3;
const TCAP_PER_INT: u64 = 1 << 4;
const TCAP_SIZE: u64 = 1 << 5;
const TCNF_VAL_SET: u64 = 1 << 6;
const TCNF_32MODE: u64 = 1 << 8;
const TCNF_INT_ROUTE: u64 = 0x1F << 9;
const TCNF_FSB_EN: u64 = 1 << 14;
const TCAP_FSB_INT_DEL: u64 = 1 << 15;
const TCAP_INT_ROUTE: u64 = 0xFFFF_FFFF << 32;
const TCAP_RO_MASK: u64 = TCAP_INT_ROUTE | TCAP_FSB_INT_DEL | TCAP_SIZE | TCAP_PER_INT;

/// The General Capabilities and ID register, as bhyve's vhpet reports it.
pub fn hpet_capabilities() -> u64 {
    let mut cap: u64 = 0x8086 << 16; // vendor
    cap |= ((HPET_NUM_TIMERS as u64) - 1) << 8;
    cap |= 1; // revision; COUNT_SIZE_CAP and LEG_RT_CAP clear
    cap | ((FS_PER_S / HPET_FREQ) << 32)
}

/// The low dword of GCAP_ID, which the ACPI HPET table carries.
pub fn hpet_capabilities_low() -> u32 {
    hpet_capabilities() as u32
}

/// IOAPIC pins a timer may route to: the 4 highest pins (bhyve's rule).
fn allowed_irqs(pincount: u32) -> u64 {
    if pincount >= 32 {
        0xFF00_0000
    } else if pincount >= 20 {
        0xF << (pincount - 4)
    } else {
        0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HpetTimerState {
    pub cap_config: u64,
    /// FSB route: address in the high dword, data in the low dword.
    pub msireg: u64,
    pub compval: u32,
    /// Period in periodic mode (0 in one-shot mode).
    pub comprate: u32,
    /// Clock time the comparator next matches, while counting.
    pub deadline_ns: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HpetState {
    pub config: u64,
    pub isr: u64,
    /// Counter value at `countbase_ns` (or the frozen value while disabled).
    pub countbase: u32,
    pub countbase_ns: u64,
    pub timers: Vec<HpetTimerState>,
}

impl Schema for HpetState {
    const KIND: &'static str = "hpet";
    const VERSION: u32 = 1;
}

pub struct Hpet {
    state: HpetState,
    irqs: Arc<dyn InterruptController>,
    msi: Arc<dyn MsiSender>,
    clock: Arc<dyn Clock>,
    waker: TimerWaker,
}

impl std::fmt::Debug for Hpet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hpet").field("state", &self.state).finish()
    }
}

fn update_register(reg: &mut u64, data: u64, mask: u64) {
    *reg = (*reg & !mask) | (data & mask);
}

impl Hpet {
    pub fn new(
        irqs: Arc<dyn InterruptController>,
        clock: Arc<dyn Clock>,
        waker: TimerWaker,
    ) -> Self {
        let allowed = allowed_irqs(IOAPIC_PINS);
        let timers = (0..HPET_NUM_TIMERS)
            .map(|_| HpetTimerState {
                cap_config: (allowed << 32) | TCAP_PER_INT | TCAP_FSB_INT_DEL,
                msireg: 0,
                compval: 0xFFFF_FFFF,
                comprate: 0,
                deadline_ns: None,
            })
            .collect();
        let msi = irqs.msi();
        Self {
            state: HpetState {
                config: 0,
                isr: 0,
                countbase: 0,
                countbase_ns: 0,
                timers,
            },
            irqs,
            msi,
            clock,
            waker,
        }
    }

    pub fn state(&self) -> &HpetState {
        &self.state
    }

    /// Put back a saved state: level interrupts still pending are asserted
    /// again and the timer thread re-reads its deadlines.
    pub fn restore(&mut self, saved: HpetState) -> Result<(), String> {
        if saved.timers.len() != HPET_NUM_TIMERS {
            return Err(format!(
                "{} timers saved, the HPET has {HPET_NUM_TIMERS}",
                saved.timers.len()
            ));
        }
        self.state = saved;
        for n in 0..HPET_NUM_TIMERS {
            if self.state.isr & (1 << n) != 0 {
                let pin = self.ioapic_pin(n);
                if pin != 0 {
                    self.irqs.line(pin).set_level(true);
                }
            }
        }
        self.waker.wake();
        Ok(())
    }

    fn enabled(&self) -> bool {
        self.state.config & CNF_ENABLE != 0
    }

    fn counter(&self, now: u64) -> u32 {
        if self.enabled() {
            let elapsed = now.saturating_sub(self.state.countbase_ns);
            self.state
                .countbase
                .wrapping_add(ns_to_ticks(elapsed, HPET_FREQ) as u32)
        } else {
            self.state.countbase
        }
    }

    fn msi_enabled(&self, n: usize) -> bool {
        let both = TCAP_FSB_INT_DEL | TCNF_FSB_EN;
        self.state.timers[n].cap_config & both == both
    }

    fn ioapic_pin(&self, n: usize) -> u32 {
        if self.msi_enabled(n) {
            return 0;
        }
        ((self.state.timers[n].cap_config & TCNF_INT_ROUTE) >> 9) as u32
    }

    fn periodic(&self, n: usize) -> bool {
        self.state.timers[n].cap_config & TCNF_TYPE != 0
    }

    fn edge(&self, n: usize) -> bool {
        self.state.timers[n].cap_config & TCNF_INT_TYPE == 0
    }

    fn timer_interrupt(&mut self, n: usize) {
        let t = &self.state.timers[n];
        if t.cap_config & TCNF_INT_ENB == 0 {
            return;
        }
        // A level interrupt already asserted stays asserted.
        if self.state.isr & (1 << n) != 0 {
            return;
        }
        if self.msi_enabled(n) {
            self.msi.send(t.msireg >> 32, t.msireg as u32);
            return;
        }
        let pin = self.ioapic_pin(n);
        if pin == 0 {
            tracing::debug!("hpet: timer {n} fired but is not routed");
            return;
        }
        let line = self.irqs.line(pin);
        if self.edge(n) {
            line.pulse();
        } else {
            self.state.isr |= 1 << n;
            line.set_level(true);
        }
    }

    fn clear_isr(&mut self, n: usize, pin: u32) {
        if self.state.isr & (1 << n) != 0 {
            if pin != 0 {
                self.irqs.line(pin).set_level(false);
            }
            self.state.isr &= !(1 << n);
        }
    }

    /// Schedule timer `n`'s next match. `refire` is set when called from the
    /// match itself, so a comparator equal to the counter means a full wrap
    /// rather than matching again at once.
    fn start_timer(&mut self, n: usize, counter: u32, now: u64, refire: bool) {
        let t = &mut self.state.timers[n];
        // Periodic: the first comparator value in compval + k * rate past
        // the counter (vhpet_adjust_compval).
        if let Some(q) = counter.wrapping_sub(t.compval).checked_div(t.comprate) {
            let steps = q.wrapping_add(1);
            t.compval = t.compval.wrapping_add(steps.wrapping_mul(t.comprate));
        }
        let mut delta = u64::from(t.compval.wrapping_sub(counter));
        if delta == 0 && refire {
            delta = 1 << 32;
        }
        t.deadline_ns = Some(now.saturating_add(ticks_to_ns(delta, HPET_FREQ)));
        self.waker.wake();
    }

    fn stop_timer(&mut self, n: usize, now: u64) {
        // A match that was due but not yet served still interrupts, or a
        // one-shot guest would wait a whole counter wrap.
        if let Some(d) = self.state.timers[n].deadline_ns.take() {
            if d < now {
                self.timer_interrupt(n);
            }
        }
    }

    fn start_counting(&mut self, now: u64) {
        self.state.countbase_ns = now;
        let base = self.state.countbase;
        for n in 0..HPET_NUM_TIMERS {
            self.start_timer(n, base, now, false);
        }
    }

    fn stop_counting(&mut self, counter: u32, now: u64) {
        self.state.countbase = counter;
        for n in 0..HPET_NUM_TIMERS {
            self.stop_timer(n, now);
        }
    }

    fn update_timer_config(&mut self, n: usize, data: u64, mask: u64) {
        let old_pin = self.ioapic_pin(n);
        let oldval = self.state.timers[n].cap_config;
        let mut newval = oldval;
        update_register(&mut newval, data, mask);
        newval &= !(TCAP_RO_MASK | TCNF_32MODE);
        newval |= oldval & TCAP_RO_MASK;
        if newval == oldval {
            return;
        }
        self.state.timers[n].cap_config = newval;
        let allowed = (newval >> 32) as u32;
        let pin = self.ioapic_pin(n);
        if pin != 0 && allowed & (1 << pin) == 0 {
            tracing::debug!("hpet: timer {n} routed to disallowed pin {pin}; route cleared");
            self.state.timers[n].cap_config &= !TCNF_INT_ROUTE;
        }
        if !self.periodic(n) {
            self.state.timers[n].comprate = 0;
        }
        // Never leave a level interrupt asserted that nothing can clear.
        if self.state.isr & (1 << n) != 0 {
            let cfg = self.state.timers[n].cap_config;
            let clear = cfg & TCNF_INT_ENB == 0
                || self.msi_enabled(n)
                || self.edge(n)
                || self.ioapic_pin(n) != old_pin;
            if clear {
                self.clear_isr(n, old_pin);
            }
        }
    }

    fn write_comparator(&mut self, n: usize, data: u64, mask: u64, now: u64) {
        let (old_val, old_rate) = (self.state.timers[n].compval, self.state.timers[n].comprate);
        let periodic = self.periodic(n);
        let t = &mut self.state.timers[n];
        if periodic {
            // The period is written; the comparator too only with VAL_SET.
            let mut v = u64::from(t.comprate);
            update_register(&mut v, data, mask);
            t.comprate = v as u32;
            if t.cap_config & TCNF_VAL_SET != 0 {
                t.compval = v as u32;
            }
        } else {
            let mut v = u64::from(t.compval);
            update_register(&mut v, data, mask);
            t.compval = v as u32;
        }
        t.cap_config &= !TCNF_VAL_SET;
        if (t.compval != old_val || t.comprate != old_rate) && self.enabled() {
            let counter = self.counter(now);
            self.start_timer(n, counter, now, false);
        }
    }

    fn mmio_write(&mut self, offset: u64, size: usize, val: u64) {
        let (mut data, mut mask) = match size {
            8 => (val, u64::MAX),
            4 => (val & 0xFFFF_FFFF, 0xFFFF_FFFF),
            _ => {
                tracing::debug!("hpet: {size}-byte write at {offset:#x} ignored");
                return;
            }
        };
        if offset & (size as u64 - 1) != 0 {
            tracing::debug!("hpet: misaligned write at {offset:#x} ignored");
            return;
        }
        if size == 4 && offset & 4 != 0 {
            data <<= 32;
            mask <<= 32;
        }
        let reg = offset & !7;
        let now = self.clock.now_ns();
        match reg {
            REG_CONFIG => {
                let counter = self.counter(now);
                let old = self.state.config;
                update_register(&mut self.state.config, data, mask);
                self.state.config &= !CNF_LEG_RT;
                if (old ^ self.state.config) & CNF_ENABLE != 0 {
                    if self.enabled() {
                        self.start_counting(now);
                    } else {
                        self.stop_counting(counter, now);
                    }
                }
            }
            REG_ISR => {
                let clear = self.state.isr & data;
                for n in 0..HPET_NUM_TIMERS {
                    if clear & (1 << n) != 0 {
                        let pin = self.ioapic_pin(n);
                        self.clear_isr(n, pin);
                    }
                }
            }
            REG_MAIN_COUNTER => {
                let mut v = u64::from(self.counter(now));
                update_register(&mut v, data, mask);
                self.state.countbase = v as u32;
                if self.enabled() {
                    self.start_counting(now);
                }
            }
            r if (TIMER_BASE..TIMER_BASE + TIMER_STRIDE * HPET_NUM_TIMERS as u64).contains(&r) => {
                let n = ((r - TIMER_BASE) / TIMER_STRIDE) as usize;
                match (r - TIMER_BASE) % TIMER_STRIDE {
                    TIMER_CAP_CNF => self.update_timer_config(n, data, mask),
                    TIMER_COMPARATOR => self.write_comparator(n, data, mask, now),
                    TIMER_FSB_VAL => update_register(&mut self.state.timers[n].msireg, data, mask),
                    _ => {}
                }
            }
            _ => {}
        }
    }

    fn mmio_read(&mut self, offset: u64, size: usize) -> u64 {
        if (size != 4 && size != 8) || offset & (size as u64 - 1) != 0 {
            tracing::debug!("hpet: bad {size}-byte read at {offset:#x}");
            return 0;
        }
        let reg = offset & !7;
        let now = self.clock.now_ns();
        let data = match reg {
            REG_CAPABILITIES => hpet_capabilities(),
            REG_CONFIG => self.state.config,
            REG_ISR => self.state.isr,
            REG_MAIN_COUNTER => u64::from(self.counter(now)),
            r if (TIMER_BASE..TIMER_BASE + TIMER_STRIDE * HPET_NUM_TIMERS as u64).contains(&r) => {
                let t = &self.state.timers[((r - TIMER_BASE) / TIMER_STRIDE) as usize];
                match (r - TIMER_BASE) % TIMER_STRIDE {
                    TIMER_CAP_CNF => t.cap_config,
                    TIMER_COMPARATOR => u64::from(t.compval),
                    TIMER_FSB_VAL => t.msireg,
                    _ => 0,
                }
            }
            _ => 0,
        };
        if size == 4 && offset & 4 != 0 {
            data >> 32
        } else {
            data
        }
    }
}

// Keep the FSB address offset documented next to its twin.
const _: () = assert!(TIMER_FSB_ADDR == TIMER_FSB_VAL + 4);

impl BusDevice for Hpet {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = self.mmio_read(offset, data.len());
        let bytes = v.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut raw = [0u8; 8];
        let n = data.len().min(8);
        raw[..n].copy_from_slice(&data[..n]);
        self.mmio_write(offset, data.len(), u64::from_le_bytes(raw));
    }
}

impl Timed for Hpet {
    fn next_deadline(&self) -> Option<u64> {
        self.state.timers.iter().filter_map(|t| t.deadline_ns).min()
    }

    fn fire(&mut self, now: u64) {
        if !self.enabled() {
            return;
        }
        let counter = self.counter(now);
        for n in 0..HPET_NUM_TIMERS {
            if self.state.timers[n].deadline_ns.is_some_and(|d| d <= now) {
                self.start_timer(n, counter, now, true);
                self.timer_interrupt(n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::test_clock::ManualClock;
    use crate::test_util::FakeController;

    struct Fixture {
        hpet: Hpet,
        clock: Arc<ManualClock>,
        ctl: Arc<FakeController>,
    }

    fn fixture() -> Fixture {
        let clock = Arc::new(ManualClock::default());
        let ctl = Arc::new(FakeController::default());
        let hpet = Hpet::new(ctl.clone(), clock.clone(), TimerWaker::new());
        Fixture { hpet, clock, ctl }
    }

    fn r32(h: &mut Hpet, off: u64) -> u32 {
        let mut b = [0u8; 4];
        h.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn w32(h: &mut Hpet, off: u64, v: u32) {
        h.write(off, &v.to_le_bytes());
    }
    fn w64(h: &mut Hpet, off: u64, v: u64) {
        h.write(off, &v.to_le_bytes());
    }
    fn cnf(n: u64) -> u64 {
        TIMER_BASE + TIMER_STRIDE * n
    }
    fn cmp(n: u64) -> u64 {
        cnf(n) + TIMER_COMPARATOR
    }
    /// Advance to the earliest deadline and fire it.
    fn run_to_next(f: &mut Fixture) {
        let d = f.hpet.next_deadline().expect("a timer is armed");
        let now = f.clock.now_ns();
        f.clock.advance_ns(d.saturating_sub(now));
        f.hpet.fire(f.clock.now_ns());
    }

    #[test]
    fn capabilities_match_bhyve() {
        let mut f = fixture();
        assert_eq!(hpet_capabilities_low(), 0x8086_0701);
        assert_eq!(r32(&mut f.hpet, 0), 0x8086_0701);
        assert_eq!(r32(&mut f.hpet, 4), 59_604_644, "period in fs");
        let t0 = {
            let mut b = [0u8; 8];
            f.hpet.read(cnf(0), &mut b);
            u64::from_le_bytes(b)
        };
        assert_eq!(t0 >> 32, 0x00F0_0000, "pins 20-23");
        assert_eq!(
            t0 & (TCAP_PER_INT | TCAP_FSB_INT_DEL | TCAP_SIZE),
            TCAP_PER_INT | TCAP_FSB_INT_DEL
        );
        // Narrow and misaligned accesses are ignored.
        let mut b = [0u8; 2];
        f.hpet.read(0, &mut b);
        assert_eq!(b, [0, 0]);
        assert_eq!(r32(&mut f.hpet, 2), 0);
    }

    #[test]
    fn counter_runs_only_when_enabled_and_is_writable() {
        let mut f = fixture();
        f.clock.advance_ns(1_000_000);
        assert_eq!(r32(&mut f.hpet, REG_MAIN_COUNTER), 0);
        w32(&mut f.hpet, REG_CONFIG, (CNF_ENABLE | CNF_LEG_RT) as u32);
        assert_eq!(
            r32(&mut f.hpet, REG_CONFIG),
            CNF_ENABLE as u32,
            "no legacy route"
        );
        f.clock.advance_ns(1_000_000_000);
        assert_eq!(r32(&mut f.hpet, REG_MAIN_COUNTER), 1 << 24);
        assert_eq!(r32(&mut f.hpet, REG_MAIN_COUNTER + 4), 0, "32-bit counter");
        w32(&mut f.hpet, REG_CONFIG, 0);
        f.clock.advance_ns(1_000_000_000);
        assert_eq!(r32(&mut f.hpet, REG_MAIN_COUNTER), 1 << 24, "frozen");
        w32(&mut f.hpet, REG_MAIN_COUNTER, 0xFFFF_FFF0);
        w32(&mut f.hpet, REG_CONFIG, CNF_ENABLE as u32);
        f.clock.advance_ns(ticks_to_ns(0x20, HPET_FREQ));
        assert_eq!(r32(&mut f.hpet, REG_MAIN_COUNTER), 0x10, "wraps");
    }

    #[test]
    fn one_shot_edge_interrupt_on_routed_pin() {
        let mut f = fixture();
        w64(&mut f.hpet, cnf(2), TCNF_INT_ENB | (21 << 9));
        w32(&mut f.hpet, cmp(2), 1000);
        w32(&mut f.hpet, REG_CONFIG, CNF_ENABLE as u32);
        let line = f.ctl.get(21);
        // Timers 0,1,3.. are armed too (comparator 0xFFFFFFFF), but later.
        run_to_next(&mut f);
        assert_eq!(line.rises(), 1);
        assert!(!line.level(), "edge");
        assert!(r32(&mut f.hpet, REG_MAIN_COUNTER) >= 1000);
        // Next match only after a full wrap.
        let d = f.hpet.state().timers[2].deadline_ns.unwrap();
        assert!(d - f.clock.now_ns() > 250_000_000_000);
    }

    #[test]
    fn periodic_level_interrupt_and_isr_clear() {
        let mut f = fixture();
        w64(
            &mut f.hpet,
            cnf(0),
            TCNF_INT_ENB | TCNF_TYPE | TCNF_VAL_SET | TCNF_INT_TYPE | (20 << 9),
        );
        w32(&mut f.hpet, cmp(0), 0x1000);
        let s = &f.hpet.state().timers[0];
        assert_eq!((s.compval, s.comprate), (0x1000, 0x1000));
        assert_eq!(s.cap_config & TCNF_VAL_SET, 0, "VAL_SET self-clears");
        w32(&mut f.hpet, REG_CONFIG, CNF_ENABLE as u32);
        let line = f.ctl.get(20);
        run_to_next(&mut f);
        assert!(line.level());
        assert_eq!(r32(&mut f.hpet, REG_ISR), 1);
        // Still asserted: the next period does not re-raise.
        run_to_next(&mut f);
        assert_eq!(line.rises(), 1);
        assert_eq!(f.hpet.state().timers[0].compval, 0x3000);
        w32(&mut f.hpet, REG_ISR, 1);
        assert!(!line.level());
        run_to_next(&mut f);
        assert_eq!(line.rises(), 2);
        // Disabling the interrupt drops an asserted level.
        w64(&mut f.hpet, cnf(0), TCNF_TYPE | TCNF_INT_TYPE | (20 << 9));
        assert!(!line.level());
        assert_eq!(r32(&mut f.hpet, REG_ISR), 0);
    }

    #[test]
    fn disallowed_route_is_cleared_and_fsb_delivers_msi() {
        let mut f = fixture();
        w64(&mut f.hpet, cnf(1), TCNF_INT_ENB | (5 << 9));
        assert_eq!(f.hpet.state().timers[1].cap_config & TCNF_INT_ROUTE, 0);
        w32(&mut f.hpet, cnf(1) + TIMER_FSB_VAL, 0x4041);
        w32(&mut f.hpet, cnf(1) + TIMER_FSB_ADDR, 0xFEE0_0000);
        w64(&mut f.hpet, cnf(1), TCNF_INT_ENB | TCNF_FSB_EN);
        w32(&mut f.hpet, cmp(1), 10);
        w32(&mut f.hpet, REG_CONFIG, CNF_ENABLE as u32);
        run_to_next(&mut f);
        assert_eq!(*f.ctl.msi.sent.lock().unwrap(), vec![(0xFEE0_0000, 0x4041)]);
    }

    #[test]
    fn stopping_with_a_due_match_still_interrupts() {
        let mut f = fixture();
        w64(&mut f.hpet, cnf(3), TCNF_INT_ENB | (22 << 9));
        w32(&mut f.hpet, cmp(3), 100);
        w32(&mut f.hpet, REG_CONFIG, CNF_ENABLE as u32);
        f.clock.advance_ns(1_000_000);
        w32(&mut f.hpet, REG_CONFIG, 0);
        assert_eq!(f.ctl.get(22).rises(), 1);
        assert_eq!(f.hpet.next_deadline(), None);
    }

    #[test]
    fn hostile_offsets_do_not_panic() {
        let mut f = fixture();
        for off in (0..0x400u64).step_by(4) {
            w32(&mut f.hpet, off, 0xFFFF_FFFF);
            r32(&mut f.hpet, off);
        }
        w64(&mut f.hpet, 0x3F8, u64::MAX);
        let mut odd = [0u8; 3];
        f.hpet.read(0x10, &mut odd);
        f.hpet.write(0x10, &odd);
        let json = serde_json::to_string(f.hpet.state()).unwrap();
        let back: HpetState = serde_json::from_str(&json).unwrap();
        assert_eq!(&back, f.hpet.state());
    }
}
