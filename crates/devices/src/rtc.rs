//! MC146818 RTC and CMOS NVRAM at ports 0x70/0x71, IRQ 8.
//!
//! bhyve keeps this in the kernel (`sys/amd64/vmm/io/vrtc.c`) and fills it
//! from user space (`usr.sbin/bhyve/amd64/rtc.c`); KVM has no RTC, so rhyve
//! models both halves here, reproducing what a guest sees:
//! * time kept as "seconds at a monotonic instant", so host wall-clock jumps
//!   do not move the guest clock; local time unless `rtc.use_localtime=false`
//!   (`-u`);
//! * date/time registers in BCD or binary and 12/24-hour mode per register B,
//!   century at 0x32, register D's valid-RAM bit set;
//! * the SET bit halts updates and hands the fields to the guest; invalid
//!   fields stop the clock (bhyve would stop the VM; a guest must not be able
//!   to do that, so rhyve logs and keeps the RTC halted instead);
//! * periodic, alarm and update-ended interrupts through register C, pulsed
//!   on IRQ 8 like bhyve's vatpic/vioapic pulse;
//! * update-in-progress in register A during the last 244 µs of each second,
//!   as the MC146818 datasheet specifies (bhyve never sets it; guests that
//!   poll it work either way);
//! * bhyve's memory-size cells: 0x34/0x35 = 64 KiB chunks of RAM between
//!   16 MiB and the top of low memory, 0x5B-0x5D = 64 KiB chunks above 4 GiB,
//!   read by the bhyve UEFI firmware.

use crate::clock::{ticks_to_ns, Clock, NANOS_PER_SEC};
use crate::timer::{Timed, TimerWaker};
use rhyve_platform::bus::BusDevice;
use rhyve_platform::irq::InterruptLine;
use rhyve_platform::layout::MemoryLayout;
use rhyve_platform::snapshot::Schema;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub const RTC_NVRAM_SIZE: usize = 128;

const SEC: usize = 0;
const ALARM_SEC: usize = 1;
const MIN: usize = 2;
const ALARM_MIN: usize = 3;
const HOUR: usize = 4;
const ALARM_HOUR: usize = 5;
const DAY_OF_WEEK: usize = 6;
const DAY_OF_MONTH: usize = 7;
const MONTH: usize = 8;
const YEAR: usize = 9;
const REG_A: usize = 10;
const REG_B: usize = 11;
const REG_C: usize = 12;
const REG_D: usize = 13;
/// Century byte (the FADT's CENTURY field points here).
pub const CENTURY: usize = 0x32;
/// Memory-size cells bhyve fills for the firmware.
pub const LOWMEM_LSB: usize = 0x34;
pub const LOWMEM_MSB: usize = 0x35;
pub const HIGHMEM_LSB: usize = 0x5B;
pub const HIGHMEM_MID: usize = 0x5C;
pub const HIGHMEM_MSB: usize = 0x5D;

const RTCSA_UIP: u8 = 0x80;
const RTCSB_HALT: u8 = 0x80;
const RTCSB_PINTR: u8 = 0x40;
const RTCSB_AINTR: u8 = 0x20;
const RTCSB_UINTR: u8 = 0x10;
const RTCSB_BIN: u8 = 0x04;
const RTCSB_24HR: u8 = 0x02;
const RTCSB_ALL_INTRS: u8 = RTCSB_PINTR | RTCSB_AINTR | RTCSB_UINTR;
const RTCIR_INT: u8 = 0x80;
const RTCIR_PERIOD: u8 = 0x40;
const RTCIR_ALARM: u8 = 0x20;
const RTCIR_UPDATE: u8 = 0x10;
const RTCSD_PWR: u8 = 0x80;

/// First general-purpose NVRAM register (after the clock and status registers).
const NVRAM_START: usize = 0x0E;
/// Registers bhyve fills at start-up: century, memory below 4 GiB, memory above.
const HOST_OWNED_CELLS: [usize; 6] = [0x32, 0x34, 0x35, 0x5B, 0x5C, 0x5D];

/// Length of the update cycle flagged by UIP before each second ticks.
const UPDATE_CYCLE_NS: u64 = 244_000;
const POSIX_BASE_YEAR: i64 = 1970;
const SECS_PER_DAY: i64 = 86_400;

/// The RTC's registers and time base.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcState {
    /// Register selected through port 0x70.
    pub index: u8,
    /// The 128 bytes of registers and NVRAM.
    pub regs: Vec<u8>,
    /// RTC time (seconds since 1970 in the guest's time zone) at
    /// `base_uptime_ns`; `None` while halted by the guest or invalid.
    pub base_rtctime: Option<i64>,
    pub base_uptime_ns: u64,
    /// Next periodic interrupt (clock ns) when periodic interrupts are on.
    pub next_periodic_ns: Option<u64>,
}

impl Schema for RtcState {
    const KIND: &'static str = "rtc-mc146818";
    const VERSION: u32 = 1;
}

/// The RTC device.
pub struct Rtc {
    state: RtcState,
    irq: Arc<dyn InterruptLine>,
    clock: Arc<dyn Clock>,
    waker: TimerWaker,
}

impl std::fmt::Debug for Rtc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rtc").field("state", &self.state).finish()
    }
}

/// Seconds since 1970 of the host's current time, local or UTC.
pub fn host_time(use_localtime: bool) -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    if !use_localtime {
        return now;
    }
    let t = now as libc::time_t;
    // SAFETY: tm is plain data; localtime_r fills it from a valid time_t.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return now;
    }
    now + tm.tm_gmtoff
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

impl Rtc {
    /// An RTC set to the host's time, with bhyve's memory-size cells filled.
    pub fn new(
        irq: Arc<dyn InterruptLine>,
        clock: Arc<dyn Clock>,
        waker: TimerWaker,
        memory: &MemoryLayout,
        use_localtime: bool,
    ) -> Self {
        let mut regs = vec![0u8; RTC_NVRAM_SIZE];
        // Dividers running, everything else off (vrtc_init).
        regs[REG_A] = 0x20;
        regs[REG_B] = RTCSB_24HR;
        regs[REG_D] = RTCSD_PWR;
        let lomem = memory.lowmem.saturating_sub(16 << 20) / (64 << 10);
        regs[LOWMEM_LSB] = lomem as u8;
        regs[LOWMEM_MSB] = (lomem >> 8) as u8;
        let himem = memory.highmem / (64 << 10);
        regs[HIGHMEM_LSB] = himem as u8;
        regs[HIGHMEM_MID] = (himem >> 8) as u8;
        regs[HIGHMEM_MSB] = (himem >> 16) as u8;
        let now = clock.now_ns();
        let mut rtc = Self {
            state: RtcState {
                index: REG_D as u8,
                regs,
                base_rtctime: Some(host_time(use_localtime)),
                base_uptime_ns: now,
                next_periodic_ns: None,
            },
            irq,
            clock,
            waker,
        };
        if let Some(t) = rtc.state.base_rtctime {
            rtc.secs_to_rtc(t, true);
        }
        rtc
    }

    /// The NVRAM bytes (registers 0x0E-0x7F) a guest may keep across
    /// reboots: bhyve's RTC lives in the kernel VM, which outlives bhyve.
    pub fn nvram(&self) -> Vec<u8> {
        self.state.regs[NVRAM_START..].to_vec()
    }

    /// Put back NVRAM saved by [`Self::nvram`], except the cells bhyve
    /// itself fills (memory size, century): those describe this run.
    pub fn restore_nvram(&mut self, saved: &[u8]) {
        for (i, &byte) in saved.iter().enumerate() {
            let reg = NVRAM_START + i;
            if reg < self.state.regs.len() && !HOST_OWNED_CELLS.contains(&reg) {
                self.state.regs[reg] = byte;
            }
        }
    }

    pub fn state(&self) -> &RtcState {
        &self.state
    }

    /// Put back a saved state (its times count on the VM clock, restored
    /// first); the timer thread re-reads its next deadline.
    pub fn restore(&mut self, saved: RtcState) -> Result<(), String> {
        if saved.regs.len() != self.state.regs.len() {
            return Err(format!(
                "{} registers saved, the RTC has {}",
                saved.regs.len(),
                self.state.regs.len()
            ));
        }
        self.state = saved;
        self.waker.wake();
        Ok(())
    }

    /// The RTC's current time in seconds since 1970, if it is running.
    pub fn time(&self) -> Option<i64> {
        self.curtime(self.clock.now_ns())
    }

    fn reg_b(&self) -> u8 {
        self.state.regs[REG_B]
    }
    fn halted(&self) -> bool {
        self.reg_b() & RTCSB_HALT != 0
    }
    fn aintr(&self) -> bool {
        self.reg_b() & RTCSB_AINTR != 0
    }
    fn pintr(&self) -> bool {
        self.reg_b() & RTCSB_PINTR != 0
    }
    fn uintr(&self) -> bool {
        self.reg_b() & RTCSB_UINTR != 0
    }
    fn divider_enabled(&self) -> bool {
        self.state.regs[REG_A] & 0x70 == 0x20
    }
    fn update_enabled(&self) -> bool {
        self.divider_enabled() && !self.halted() && self.state.base_rtctime.is_some()
    }

    fn curtime(&self, now: u64) -> Option<i64> {
        let base = self.state.base_rtctime?;
        if self.update_enabled() {
            let delta = now.saturating_sub(self.state.base_uptime_ns) / NANOS_PER_SEC;
            Some(base + delta as i64)
        } else {
            Some(base)
        }
    }

    fn encode(&self, val: i64) -> u8 {
        let v = val.clamp(0, 99) as u8;
        if self.reg_b() & RTCSB_BIN != 0 {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    fn decode(&self, raw: u8) -> Option<i64> {
        if self.reg_b() & RTCSB_BIN != 0 {
            return Some(i64::from(raw));
        }
        let (hi, lo) = (raw >> 4, raw & 0xF);
        (hi <= 9 && lo <= 9).then(|| i64::from(hi * 10 + lo))
    }

    /// Write `t` into the date/time registers (unless the guest owns them).
    fn secs_to_rtc(&mut self, t: i64, force: bool) {
        if self.halted() && !force {
            return;
        }
        let days = t.div_euclid(SECS_PER_DAY);
        let secs = t.rem_euclid(SECS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        let hour = secs / 3600;
        let dow = (days + 4).rem_euclid(7); // 1970-01-01 was a Thursday
        let twenty_four = self.reg_b() & RTCSB_24HR != 0;
        let shown_hour = if twenty_four {
            hour
        } else if hour % 12 == 0 {
            12
        } else {
            hour % 12
        };
        let mut hour_reg = self.encode(shown_hour);
        if !twenty_four && hour >= 12 {
            hour_reg |= 0x80;
        }
        let values = [
            (SEC, self.encode(secs % 60)),
            (MIN, self.encode(secs / 60 % 60)),
            (HOUR, hour_reg),
            (DAY_OF_WEEK, self.encode(dow + 1)),
            (DAY_OF_MONTH, self.encode(day)),
            (MONTH, self.encode(month)),
            (YEAR, self.encode(year % 100)),
            (CENTURY, self.encode(year / 100)),
        ];
        for (reg, v) in values {
            self.state.regs[reg] = v;
        }
    }

    /// The time the guest programmed, or None if the fields are invalid.
    fn rtc_to_secs(&self) -> Option<i64> {
        let r = &self.state.regs;
        let sec = self.decode(r[SEC]).filter(|v| *v <= 59)?;
        let min = self.decode(r[MIN]).filter(|v| *v <= 59)?;
        let mut hour_raw = r[HOUR];
        let twenty_four = self.reg_b() & RTCSB_24HR != 0;
        let pm = !twenty_four && hour_raw & 0x80 != 0;
        if !twenty_four {
            hour_raw &= 0x7F;
        }
        let mut hour = self.decode(hour_raw)?;
        if !twenty_four {
            if !(1..=12).contains(&hour) {
                return None;
            }
            if hour == 12 {
                hour = 0;
            }
            if pm {
                hour += 12;
            }
        }
        if hour > 23 {
            return None;
        }
        let month = self.decode(r[MONTH]).filter(|v| (1..=12).contains(v))?;
        let year = self.decode(r[YEAR]).filter(|v| *v <= 99)?;
        let century = self.decode(r[CENTURY])?;
        let year = century * 100 + year;
        if year < POSIX_BASE_YEAR {
            return None;
        }
        let day = self
            .decode(r[DAY_OF_MONTH])
            .filter(|d| *d >= 1 && *d <= days_in_month(year, month))?;
        Some(days_from_civil(year, month, day) * SECS_PER_DAY + hour * 3600 + min * 60 + sec)
    }

    fn set_reg_c(&mut self, newval: u8) {
        let newval = newval & (RTCIR_ALARM | RTCIR_PERIOD | RTCIR_UPDATE);
        let old_irqf = self.state.regs[REG_C] & RTCIR_INT != 0;
        let new_irqf = (self.aintr() && newval & RTCIR_ALARM != 0)
            || (self.pintr() && newval & RTCIR_PERIOD != 0)
            || (self.uintr() && newval & RTCIR_UPDATE != 0);
        self.state.regs[REG_C] = newval | if new_irqf { RTCIR_INT } else { 0 };
        if !old_irqf && new_irqf {
            self.irq.pulse();
        }
    }

    /// Move the RTC to `newtime`. `by_clock` means time simply passed (keep
    /// the sub-second phase); otherwise the time was set and a new second
    /// starts now.
    fn time_update(&mut self, newtime: Option<i64>, now: u64, by_clock: bool) {
        let old = self.state.base_rtctime;
        if newtime == old {
            return;
        }
        let Some(new) = newtime else {
            self.state.base_rtctime = None;
            return;
        };
        if self.halted() {
            tracing::debug!("rtc: update while halted by the guest ignored");
            return;
        }
        let (alarm_sec, alarm_min, alarm_hour) = (
            self.state.regs[ALARM_SEC],
            self.state.regs[ALARM_MIN],
            self.state.regs[ALARM_HOUR],
        );
        match old {
            // Visit every second passed so an alarm in between is not
            // missed; a match recurs at most daily, so one day is enough.
            Some(old) if self.aintr() && new > old => {
                let mut t = old.max(new - SECS_PER_DAY);
                while t != new {
                    t += 1;
                    self.secs_to_rtc(t, false);
                    let r = &self.state.regs;
                    if (alarm_sec >= 0xC0 || alarm_sec == r[SEC])
                        && (alarm_min >= 0xC0 || alarm_min == r[MIN])
                        && (alarm_hour >= 0xC0 || alarm_hour == r[HOUR])
                    {
                        let c = self.state.regs[REG_C] | RTCIR_ALARM;
                        self.set_reg_c(c);
                    }
                }
            }
            _ => {}
        }
        self.state.base_rtctime = Some(new);
        if self.uintr() {
            let c = self.state.regs[REG_C] | RTCIR_UPDATE;
            self.set_reg_c(c);
        }
        match old {
            Some(old) if by_clock && new > old => {
                let advanced = (new - old) as u64 * NANOS_PER_SEC;
                self.state.base_uptime_ns = self.state.base_uptime_ns.saturating_add(advanced);
            }
            _ => self.state.base_uptime_ns = now,
        }
    }

    /// Bring the time base up to `now`.
    fn sync(&mut self, now: u64) {
        let t = self.curtime(now);
        self.time_update(t, now, true);
    }

    fn periodic_period_ns(&self) -> Option<u64> {
        let rate = self.state.regs[REG_A] & 0x0F;
        if !self.pintr() || !self.divider_enabled() || rate == 0 {
            return None;
        }
        // Rates 1 and 2 alias 256 and 128 Hz; 3..15 are 32768 >> (rate - 1).
        let hz = match rate {
            1 => 256,
            2 => 128,
            r => 32_768u64 >> (r - 1),
        };
        Some(ticks_to_ns(1, hz))
    }

    fn reschedule(&mut self, now: u64) {
        let period = self.periodic_period_ns();
        self.state.next_periodic_ns = period.map(|p| now + p);
        self.waker.wake();
    }

    fn set_reg_a(&mut self, value: u8, now: u64) {
        let value = value & !RTCSA_UIP;
        let was = self.divider_enabled();
        let old = self.state.regs[REG_A];
        self.state.regs[REG_A] = value;
        if !was && self.divider_enabled() {
            // Time was frozen while the dividers were in reset.
            self.state.base_uptime_ns = now;
        }
        if old != value {
            self.reschedule(now);
        }
    }

    fn set_reg_b(&mut self, value: u8, now: u64) {
        let old = self.reg_b();
        self.state.regs[REG_B] = value;
        let changed = old ^ value;
        if changed & RTCSB_HALT != 0 {
            let t = if value & RTCSB_HALT == 0 {
                let t = self.rtc_to_secs();
                if t.is_none() {
                    tracing::warn!("rtc: guest programmed an invalid date/time; the RTC stops");
                }
                t
            } else {
                // Freeze the fields at the time the guest set SET.
                if let Some(cur) = self.state.base_rtctime {
                    self.secs_to_rtc(cur, true);
                }
                self.state.regs[REG_B] &= !RTCSB_UINTR;
                None
            };
            self.time_update(t, now, false);
        }
        if changed & RTCSB_ALL_INTRS != 0 {
            let c = self.state.regs[REG_C];
            self.set_reg_c(c);
        }
        self.reschedule(now);
    }

    fn read_data(&mut self) -> u8 {
        let now = self.clock.now_ns();
        let offset = usize::from(self.state.index);
        self.sync(now);
        if offset < 10 || offset == CENTURY {
            if let Some(t) = self.curtime(now) {
                self.secs_to_rtc(t, false);
            }
        }
        match offset {
            REG_A => {
                let mut v = self.state.regs[REG_A];
                if self.update_enabled() {
                    let phase = now.saturating_sub(self.state.base_uptime_ns) % NANOS_PER_SEC;
                    if phase >= NANOS_PER_SEC - UPDATE_CYCLE_NS {
                        v |= RTCSA_UIP;
                    }
                }
                v
            }
            REG_C => {
                let v = self.state.regs[REG_C];
                self.set_reg_c(0);
                v
            }
            _ => self.state.regs[offset],
        }
    }

    fn write_data(&mut self, value: u8) {
        let now = self.clock.now_ns();
        let offset = usize::from(self.state.index);
        self.sync(now);
        if offset < 10 || offset == CENTURY {
            if let Some(t) = self.curtime(now) {
                self.secs_to_rtc(t, false);
            }
        }
        match offset {
            REG_A => self.set_reg_a(value, now),
            REG_B => self.set_reg_b(value, now),
            REG_C | REG_D => {
                tracing::debug!("rtc: write {value:#x} to read-only register {offset}")
            }
            SEC => self.state.regs[SEC] = value & 0x7F,
            _ => self.state.regs[offset] = value,
        }
        // Some guests (OpenBSD) set the century outside SET: recompute.
        if offset == CENTURY && !self.halted() {
            let t = self.rtc_to_secs();
            if t.is_none() {
                tracing::warn!("rtc: guest wrote an invalid century; the RTC stops");
            }
            self.time_update(t, now, false);
        }
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            tracing::debug!("rtc: {}-byte read ignored", data.len());
            data.fill(0xFF);
            return;
        }
        data[0] = match offset {
            // The index register reads back as all ones, as in bhyve.
            0 => 0xFF,
            _ => self.read_data(),
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            tracing::debug!("rtc: {}-byte write ignored", data.len());
            return;
        }
        match offset {
            // Bit 7 is the NMI mask on real chipsets; it selects nothing here.
            0 => self.state.index = data[0] & 0x7F,
            _ => self.write_data(data[0]),
        }
    }
}

impl Timed for Rtc {
    fn next_deadline(&self) -> Option<u64> {
        let second = if (self.aintr() || self.uintr()) && self.update_enabled() {
            let now = self.clock.now_ns();
            let base = self.state.base_uptime_ns;
            let elapsed = now.saturating_sub(base) / NANOS_PER_SEC;
            Some(base + (elapsed + 1) * NANOS_PER_SEC)
        } else {
            None
        };
        match (self.state.next_periodic_ns, second) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn fire(&mut self, now: u64) {
        if let Some(due) = self.state.next_periodic_ns.filter(|d| *d <= now) {
            match self.periodic_period_ns() {
                Some(period) => {
                    let c = self.state.regs[REG_C] | RTCIR_PERIOD;
                    self.set_reg_c(c);
                    // Catch up without a burst if the thread fell far behind.
                    let next = due + period;
                    self.state.next_periodic_ns =
                        Some(if next <= now { now + period } else { next });
                }
                None => self.state.next_periodic_ns = None,
            }
        }
        if self.aintr() || self.uintr() {
            self.sync(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::test_clock::ManualClock;
    use crate::test_util::RecordingLine;

    struct Fixture {
        rtc: Rtc,
        clock: Arc<ManualClock>,
        irq: Arc<RecordingLine>,
    }

    fn fixture(mem: u64) -> Fixture {
        let clock = Arc::new(ManualClock::default());
        let irq = Arc::new(RecordingLine::default());
        let rtc = Rtc::new(
            irq.clone(),
            clock.clone(),
            TimerWaker::new(),
            &MemoryLayout::new(mem),
            false,
        );
        Fixture { rtc, clock, irq }
    }

    fn rd(r: &mut Rtc, reg: u8) -> u8 {
        BusDevice::write(r, 0, &[reg]);
        let mut b = [0u8];
        BusDevice::read(r, 1, &mut b);
        b[0]
    }

    fn wr(r: &mut Rtc, reg: u8, v: u8) {
        BusDevice::write(r, 0, &[reg]);
        BusDevice::write(r, 1, &[v]);
    }

    /// Program 2024-02-29 23:59:58 (a Thursday) through SET.
    fn set_time(r: &mut Rtc, bcd: bool) {
        let b = if bcd {
            RTCSB_24HR
        } else {
            RTCSB_24HR | RTCSB_BIN
        };
        wr(r, REG_B as u8, b | RTCSB_HALT);
        let enc = |v: u8| if bcd { ((v / 10) << 4) | (v % 10) } else { v };
        wr(r, SEC as u8, enc(58));
        wr(r, MIN as u8, enc(59));
        wr(r, HOUR as u8, enc(23));
        wr(r, DAY_OF_MONTH as u8, enc(29));
        wr(r, MONTH as u8, enc(2));
        wr(r, YEAR as u8, enc(24));
        wr(r, CENTURY as u8, enc(20));
        wr(r, REG_B as u8, b);
    }

    #[test]
    fn memory_cells_follow_bhyve() {
        let mut f = fixture(6 << 30);
        let lo = (3u64 << 30) - (16 << 20);
        let lo = lo / (64 << 10);
        assert_eq!(rd(&mut f.rtc, 0x34), lo as u8);
        assert_eq!(rd(&mut f.rtc, 0x35), (lo >> 8) as u8);
        let hi = (3u64 << 30) / (64 << 10);
        assert_eq!(rd(&mut f.rtc, 0x5B), hi as u8);
        assert_eq!(rd(&mut f.rtc, 0x5C), (hi >> 8) as u8);
        assert_eq!(rd(&mut f.rtc, 0x5D), (hi >> 16) as u8);
        // Tiny guests do not underflow.
        let mut small = fixture(8 << 20);
        assert_eq!(rd(&mut small.rtc, 0x34), 0);
        assert_eq!(rd(&mut small.rtc, REG_D as u8), RTCSD_PWR);
        assert_eq!(rd(&mut small.rtc, REG_A as u8) & 0x7F, 0x20);
    }

    #[test]
    fn starts_at_host_time_in_bcd() {
        let mut f = fixture(256 << 20);
        let now = host_time(false);
        let (y, m, d) = civil_from_days(now.div_euclid(SECS_PER_DAY));
        let bcd = |v: i64| (((v / 10) << 4) | (v % 10)) as u8;
        assert_eq!(rd(&mut f.rtc, CENTURY as u8), bcd(y / 100));
        assert_eq!(rd(&mut f.rtc, YEAR as u8), bcd(y % 100));
        assert_eq!(rd(&mut f.rtc, MONTH as u8), bcd(m));
        assert_eq!(rd(&mut f.rtc, DAY_OF_MONTH as u8), bcd(d));
    }

    #[test]
    fn set_then_tick_over_leap_day_bcd_and_binary() {
        for bcd in [true, false] {
            let mut f = fixture(256 << 20);
            set_time(&mut f.rtc, bcd);
            let dec = |v: u8| if bcd { (v >> 4) * 10 + (v & 0xF) } else { v };
            assert_eq!(dec(rd(&mut f.rtc, SEC as u8)), 58);
            assert_eq!(
                dec(rd(&mut f.rtc, DAY_OF_WEEK as u8)),
                5,
                "Thursday is day 5"
            );
            f.clock.advance_ns(2 * NANOS_PER_SEC);
            assert_eq!(dec(rd(&mut f.rtc, SEC as u8)), 0);
            assert_eq!(dec(rd(&mut f.rtc, MIN as u8)), 0);
            assert_eq!(dec(rd(&mut f.rtc, HOUR as u8)), 0);
            assert_eq!(dec(rd(&mut f.rtc, DAY_OF_MONTH as u8)), 1);
            assert_eq!(dec(rd(&mut f.rtc, MONTH as u8)), 3);
            assert_eq!(dec(rd(&mut f.rtc, YEAR as u8)), 24);
        }
    }

    #[test]
    fn twelve_hour_mode() {
        let mut f = fixture(256 << 20);
        set_time(&mut f.rtc, true);
        wr(&mut f.rtc, REG_B as u8, 0); // 12h, BCD
        assert_eq!(rd(&mut f.rtc, HOUR as u8), 0x80 | 0x11, "11 PM");
        f.clock.advance_ns(2 * NANOS_PER_SEC);
        assert_eq!(rd(&mut f.rtc, HOUR as u8), 0x12, "12 AM");
        // Program 12 PM in 12-hour mode and read it back in 24-hour mode.
        wr(&mut f.rtc, REG_B as u8, RTCSB_HALT);
        wr(&mut f.rtc, HOUR as u8, 0x80 | 0x12);
        wr(&mut f.rtc, REG_B as u8, 0);
        wr(&mut f.rtc, REG_B as u8, RTCSB_24HR);
        assert_eq!(rd(&mut f.rtc, HOUR as u8), 0x12);
    }

    #[test]
    fn halt_freezes_and_invalid_time_stops_the_clock() {
        let mut f = fixture(256 << 20);
        set_time(&mut f.rtc, true);
        wr(&mut f.rtc, REG_B as u8, RTCSB_24HR | RTCSB_HALT);
        f.clock.advance_ns(5 * NANOS_PER_SEC);
        assert_eq!(rd(&mut f.rtc, SEC as u8), 0x58, "halted");
        wr(&mut f.rtc, MONTH as u8, 0x13);
        wr(&mut f.rtc, REG_B as u8, RTCSB_24HR);
        assert_eq!(f.rtc.time(), None);
        f.clock.advance_ns(5 * NANOS_PER_SEC);
        assert_eq!(rd(&mut f.rtc, SEC as u8), 0x58, "stopped, not crashed");
        // Day 30 of February is invalid too.
        wr(&mut f.rtc, REG_B as u8, RTCSB_24HR | RTCSB_HALT);
        wr(&mut f.rtc, MONTH as u8, 0x02);
        wr(&mut f.rtc, DAY_OF_MONTH as u8, 0x30);
        wr(&mut f.rtc, REG_B as u8, RTCSB_24HR);
        assert_eq!(f.rtc.time(), None);
        set_time(&mut f.rtc, true);
        assert!(f.rtc.time().is_some(), "valid programming restarts it");
    }

    #[test]
    fn update_in_progress_before_each_second() {
        let mut f = fixture(256 << 20);
        set_time(&mut f.rtc, true);
        assert_eq!(rd(&mut f.rtc, REG_A as u8) & RTCSA_UIP, 0);
        f.clock.advance_ns(NANOS_PER_SEC - 100_000);
        assert_eq!(rd(&mut f.rtc, REG_A as u8) & RTCSA_UIP, RTCSA_UIP);
        f.clock.advance_ns(200_000);
        assert_eq!(rd(&mut f.rtc, REG_A as u8) & RTCSA_UIP, 0);
        // Writes cannot set UIP.
        wr(&mut f.rtc, REG_A as u8, 0xA6);
        assert_eq!(f.rtc.state().regs[REG_A], 0x26);
    }

    #[test]
    fn periodic_alarm_and_update_interrupts() {
        let mut f = fixture(256 << 20);
        set_time(&mut f.rtc, true);
        // Periodic at 1024 Hz (rate 6).
        wr(&mut f.rtc, REG_A as u8, 0x26);
        wr(&mut f.rtc, REG_B as u8, RTCSB_24HR | RTCSB_PINTR);
        let d = f.rtc.next_deadline().unwrap();
        f.clock.advance_ns(d - f.clock.now_ns());
        f.rtc.fire(f.clock.now_ns());
        assert_eq!(f.irq.rises(), 1);
        assert_eq!(rd(&mut f.rtc, REG_C as u8), RTCIR_INT | RTCIR_PERIOD);
        assert_eq!(rd(&mut f.rtc, REG_C as u8), 0, "read clears");
        let d2 = f.rtc.next_deadline().unwrap();
        assert_eq!(d2 - d, ticks_to_ns(1, 1024));

        // Alarm at xx:00:00 (hours don't care), update-ended on.
        wr(&mut f.rtc, REG_B as u8, RTCSB_24HR);
        wr(&mut f.rtc, ALARM_SEC as u8, 0x00);
        wr(&mut f.rtc, ALARM_MIN as u8, 0x00);
        wr(&mut f.rtc, ALARM_HOUR as u8, 0xC0);
        wr(
            &mut f.rtc,
            REG_B as u8,
            RTCSB_24HR | RTCSB_AINTR | RTCSB_UINTR,
        );
        let rises = f.irq.rises();
        // 23:59:58 -> 23:59:59: update only.
        let d = f.rtc.next_deadline().unwrap();
        f.clock.advance_ns(d - f.clock.now_ns());
        f.rtc.fire(f.clock.now_ns());
        assert_eq!(f.irq.rises(), rises + 1);
        assert_eq!(rd(&mut f.rtc, REG_C as u8), RTCIR_INT | RTCIR_UPDATE);
        // -> 00:00:00: alarm and update.
        let d = f.rtc.next_deadline().unwrap();
        f.clock.advance_ns(d - f.clock.now_ns());
        f.rtc.fire(f.clock.now_ns());
        assert_eq!(
            rd(&mut f.rtc, REG_C as u8),
            RTCIR_INT | RTCIR_ALARM | RTCIR_UPDATE
        );
        assert_eq!(f.irq.rises(), rises + 2);
        // Interrupts off: nothing scheduled.
        wr(&mut f.rtc, REG_B as u8, RTCSB_24HR);
        assert_eq!(f.rtc.next_deadline(), None);
    }

    #[test]
    fn index_reads_ones_and_nvram_is_kept() {
        let mut f = fixture(256 << 20);
        let mut b = [0u8];
        BusDevice::read(&mut f.rtc, 0, &mut b);
        assert_eq!(b[0], 0xFF);
        wr(&mut f.rtc, 0x80 | 0x40, 0x5A); // NMI bit ignored
        assert_eq!(rd(&mut f.rtc, 0x40), 0x5A);
        wr(&mut f.rtc, REG_C as u8, 0xFF);
        assert_eq!(rd(&mut f.rtc, REG_C as u8), 0);
        let json = serde_json::to_string(f.rtc.state()).unwrap();
        let back: RtcState = serde_json::from_str(&json).unwrap();
        assert_eq!(&back, f.rtc.state());
    }

    #[test]
    fn nvram_survives_a_restart_but_memory_cells_describe_the_new_run() {
        let mut old = fixture(256 << 20);
        wr(&mut old.rtc, 0x50, 0xA5);
        let saved = old.rtc.nvram();
        let mut new = fixture(512 << 20);
        let cells = (rd(&mut new.rtc, 0x34), rd(&mut new.rtc, 0x35));
        new.rtc.restore_nvram(&saved);
        assert_eq!(rd(&mut new.rtc, 0x50), 0xA5);
        assert_eq!((rd(&mut new.rtc, 0x34), rd(&mut new.rtc, 0x35)), cells);
        new.rtc.restore_nvram(&[0xFF; 500]);
        assert_eq!(rd(&mut new.rtc, 0x7F), 0xFF);
    }

    #[test]
    fn calendar_conversion_round_trips() {
        for days in [-1, 0, 59, 365, 11_016, 19_782, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }
}
