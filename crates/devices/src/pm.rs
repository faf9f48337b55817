//! ACPI fixed hardware as bhyve's `amd64/pm.c` and the kernel's `vpmtmr.c`
//! present it: PM1a event (0x400) and control (0x404) blocks, the PM timer
//! (0x408), GPE0 (0x40C), SMI_CMD (0xB2) and the FADT reset register (0xCF9).
//!
//! * PM1 status bits are write-1-to-clear; only RTC_EN, PWRBTN_EN and GBL_EN
//!   can be enabled (ACPICA insists on setting GBL_EN).
//! * PM1 control keeps SCI_EN as the firmware (SMI_CMD) set it; writing
//!   SLP_EN with SLP_TYP = 5 is S5 and powers the VM off. 5 is bhyve's
//!   `\_S5` value, which the DSDT must use too ([`S5_SLP_TYP`]).
//! * The SCI (IRQ 9) is a level: asserted while any enabled status bit or
//!   GPE is set.
//! * SIGTERM becomes the power button ([`AcpiPm::power_button`]) only after
//!   the guest enabled ACPI through SMI_CMD ([`AcpiPm::acpi_enabled`]).
//! * The PM timer is a 24/32-bit free-running counter at 3.579545 MHz from
//!   the monotonic clock; bhyve advertises TMR_VAL_EXT, so all 32 bits count.
//! * 0xCF9 resets the VM when bit 2 is written (hard and soft alike).
//!
//! Register widths follow bhyve: PM1 registers are 16-bit, GPE0 8-bit, the
//! timer 32-bit, SMI_CMD and 0xCF9 8-bit; other widths are refused and logged.

use crate::clock::{ns_to_ticks, Clock};
use rhyve_platform::bus::BusDevice;
use rhyve_platform::exit::{ExitRequest, ExitRequests};
use rhyve_platform::irq::InterruptLine;
use rhyve_platform::layout::{
    GPE0_PORT, PM1A_CNT_PORT, PM1A_EVT_PORT, PM_TIMER_HZ, PM_TIMER_PORT, SMI_ACPI_DISABLE,
    SMI_ACPI_ENABLE,
};
use rhyve_platform::snapshot::Schema;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};

/// SLP_TYP value of `\_S5` in bhyve's DSDT; SLP_EN with it powers off.
pub const S5_SLP_TYP: u16 = 5;
/// Bytes of port space from PM1a_EVT through GPE0 (0x400-0x40D).
pub const PM_BLOCK_LEN: u64 = (GPE0_PORT - PM1A_EVT_PORT) as u64 + 2;
/// GPE0 bit bhyve uses for the VM generation counter (`GPE_VMGENC`).
pub const GPE_VMGENC: u8 = 0;

const PM1_TMR_STS: u16 = 0x0001;
const PM1_BM_STS: u16 = 0x0010;
const PM1_GBL_STS: u16 = 0x0020;
const PM1_PWRBTN_STS: u16 = 0x0100;
const PM1_SLPBTN_STS: u16 = 0x0200;
const PM1_RTC_STS: u16 = 0x0400;
const PM1_WAK_STS: u16 = 0x8000;

const PM1_TMR_EN: u16 = 0x0001;
const PM1_GBL_EN: u16 = 0x0020;
const PM1_PWRBTN_EN: u16 = 0x0100;
const PM1_SLPBTN_EN: u16 = 0x0200;
const PM1_RTC_EN: u16 = 0x0400;

const PM1_SCI_EN: u16 = 0x0001;
const PM1_SLP_TYP: u16 = 0x1C00;
const PM1_SLP_EN: u16 = 0x2000;
const PM1_ALWAYS_ZERO: u16 = 0xC003;

const GPE0_VALID: u8 = 1 << GPE_VMGENC;

const OFF_PM1_STS: u64 = 0;
const OFF_PM1_EN: u64 = 2;
const OFF_PM1_CNT: u64 = (PM1A_CNT_PORT - PM1A_EVT_PORT) as u64;
const OFF_TMR: u64 = (PM_TIMER_PORT - PM1A_EVT_PORT) as u64;
const OFF_GPE0_STS: u64 = (GPE0_PORT - PM1A_EVT_PORT) as u64;
const OFF_GPE0_EN: u64 = OFF_GPE0_STS + 1;

/// ACPI PM register state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmState {
    pub pm1_status: u16,
    pub pm1_enable: u16,
    pub pm1_control: u16,
    pub gpe0_status: u8,
    pub gpe0_enable: u8,
    pub sci_asserted: bool,
    /// Clock time the PM timer counts from.
    pub timer_base_ns: u64,
}

impl Schema for PmState {
    const KIND: &'static str = "acpi-pm";
    const VERSION: u32 = 1;
}

impl Schema for ResetControlState {
    const KIND: &'static str = "reset-control";
    const VERSION: u32 = 1;
}

/// The PM1a/PM-timer/GPE0 block at 0x400, plus SMI_CMD through [`SmiCommand`].
pub struct AcpiPm {
    state: PmState,
    sci: Arc<dyn InterruptLine>,
    exits: Arc<ExitRequests>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for AcpiPm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcpiPm")
            .field("state", &self.state)
            .finish()
    }
}

impl AcpiPm {
    pub fn new(
        sci: Arc<dyn InterruptLine>,
        exits: Arc<ExitRequests>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let timer_base_ns = clock.now_ns();
        Self {
            state: PmState {
                timer_base_ns,
                ..PmState::default()
            },
            sci,
            exits,
            clock,
        }
    }

    pub fn state(&self) -> &PmState {
        &self.state
    }

    /// Put back a saved state; the SCI line is driven to match it.
    pub fn restore(&mut self, saved: PmState) -> Result<(), String> {
        self.state = saved;
        self.sci.set_level(self.state.sci_asserted);
        Ok(())
    }

    /// True once the guest switched to ACPI mode (SCI_EN set via SMI_CMD).
    pub fn acpi_enabled(&self) -> bool {
        self.state.pm1_control & PM1_SCI_EN != 0
    }

    /// Press the power button: set PWRBTN_STS and raise the SCI if enabled.
    pub fn power_button(&mut self) {
        if self.state.pm1_status & PM1_PWRBTN_STS == 0 {
            self.state.pm1_status |= PM1_PWRBTN_STS;
            self.sci_update();
        }
    }

    /// Signal general-purpose event `bit` (only the VM generation counter's
    /// bit exists, as in bhyve); false for any other bit.
    pub fn raise_gpe(&mut self, bit: u8) -> bool {
        let Some(mask) = 1u8
            .checked_shl(u32::from(bit))
            .filter(|m| m & GPE0_VALID != 0)
        else {
            tracing::warn!("pm: GPE {bit} does not exist");
            return false;
        };
        self.state.gpe0_status |= mask;
        self.sci_update();
        true
    }

    /// The 32-bit PM timer value now.
    pub fn timer_value(&self) -> u32 {
        let elapsed = self.clock.now_ns().saturating_sub(self.state.timer_base_ns);
        ns_to_ticks(elapsed, PM_TIMER_HZ) as u32
    }

    fn sci_update(&mut self) {
        let s = &self.state;
        let pending = [
            (PM1_TMR_EN, PM1_TMR_STS),
            (PM1_GBL_EN, PM1_GBL_STS),
            (PM1_PWRBTN_EN, PM1_PWRBTN_STS),
            (PM1_SLPBTN_EN, PM1_SLPBTN_STS),
            (PM1_RTC_EN, PM1_RTC_STS),
        ]
        .iter()
        .any(|&(en, sts)| s.pm1_enable & en != 0 && s.pm1_status & sts != 0)
            || s.gpe0_enable & s.gpe0_status != 0;
        if pending != s.sci_asserted {
            self.state.sci_asserted = pending;
            self.sci.set_level(pending);
        }
    }

    fn smi_command(&mut self, value: u8) {
        match value {
            SMI_ACPI_ENABLE => self.state.pm1_control |= PM1_SCI_EN,
            SMI_ACPI_DISABLE => self.state.pm1_control &= !PM1_SCI_EN,
            other => tracing::debug!("pm: unknown SMI command {other:#x}"),
        }
    }

    fn write_control(&mut self, value: u16) {
        // SCI_EN belongs to the firmware; write-only and reserved bits read 0.
        self.state.pm1_control =
            (self.state.pm1_control & PM1_SCI_EN) | (value & !(PM1_SLP_EN | PM1_ALWAYS_ZERO));
        if value & PM1_SLP_EN != 0 {
            let slp_typ = (self.state.pm1_control & PM1_SLP_TYP) >> 10;
            if slp_typ == S5_SLP_TYP {
                self.exits.request(ExitRequest::PowerOff);
            } else {
                tracing::info!("pm: guest asked for unsupported sleep type {slp_typ}");
            }
        }
    }
}

fn bad_width(what: &str, offset: u64, len: usize) {
    tracing::debug!("pm: {len}-byte access to {what} (offset {offset:#x}) refused");
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value: u32 = match (offset, data.len()) {
            (OFF_PM1_STS, 2) => u32::from(self.state.pm1_status),
            (OFF_PM1_EN, 2) => u32::from(self.state.pm1_enable),
            (OFF_PM1_CNT, 2) => u32::from(self.state.pm1_control),
            (OFF_TMR, 4) => self.timer_value(),
            (OFF_GPE0_STS, 1) => u32::from(self.state.gpe0_status),
            (OFF_GPE0_EN, 1) => u32::from(self.state.gpe0_enable),
            (o, n) => {
                bad_width("PM block", o, n);
                data.fill(0xFF);
                return;
            }
        };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut raw = [0u8; 4];
        let n = data.len().min(4);
        raw[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(raw);
        match (offset, data.len()) {
            (OFF_PM1_STS, 2) => {
                let clear = value as u16
                    & (PM1_WAK_STS | PM1_RTC_STS | PM1_SLPBTN_STS | PM1_PWRBTN_STS | PM1_BM_STS);
                self.state.pm1_status &= !clear;
                self.sci_update();
            }
            (OFF_PM1_EN, 2) => {
                self.state.pm1_enable = value as u16 & (PM1_RTC_EN | PM1_PWRBTN_EN | PM1_GBL_EN);
                self.sci_update();
            }
            (OFF_PM1_CNT, 2) => self.write_control(value as u16),
            (OFF_GPE0_STS, 1) => {
                self.state.gpe0_status &= !(value as u8 & GPE0_VALID);
                self.sci_update();
            }
            (OFF_GPE0_EN, 1) => {
                self.state.gpe0_enable = value as u8 & GPE0_VALID;
                self.sci_update();
            }
            // The timer is read-only.
            (o, n) => bad_width("PM block", o, n),
        }
    }
}

/// SMI_CMD (0xB2): the guest OS asks the "firmware" to enter or leave ACPI mode.
pub struct SmiCommand {
    pm: Arc<Mutex<AcpiPm>>,
}

impl SmiCommand {
    pub fn new(pm: Arc<Mutex<AcpiPm>>) -> Self {
        Self { pm }
    }
}

impl BusDevice for SmiCommand {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Write-only in bhyve; reads float.
        data.fill(0xFF);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.len() != 1 {
            bad_width("SMI_CMD", 0, data.len());
            return;
        }
        self.pm
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .smi_command(data[0]);
    }
}

/// State of the reset control register.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetControlState {
    pub value: u8,
}

/// Reset control register at 0xCF9 (the FADT's RESET_REG).
pub struct ResetControl {
    state: ResetControlState,
    exits: Arc<ExitRequests>,
}

impl ResetControl {
    pub fn new(exits: Arc<ExitRequests>) -> Self {
        Self {
            state: ResetControlState::default(),
            exits,
        }
    }

    pub fn state(&self) -> ResetControlState {
        self.state
    }

    pub fn restore(&mut self, saved: ResetControlState) -> Result<(), String> {
        self.state = saved;
        Ok(())
    }

    /// A byte write to 0xCF9 (also for a PCI config-address device that owns
    /// 0xCF8-0xCFB and forwards byte writes at 0xCF9).
    pub fn write_byte(&mut self, value: u8) {
        self.state.value = value;
        // Bit 2 resets; hard (bit 1) and soft resets are the same here.
        if value & 0x4 != 0 {
            self.exits.request(ExitRequest::Reset);
        }
    }

    pub fn read_byte(&self) -> u8 {
        self.state.value
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            bad_width("reset register", 0, data.len());
            data.fill(0xFF);
            return;
        }
        data[0] = self.read_byte();
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.len() != 1 {
            bad_width("reset register", 0, data.len());
            return;
        }
        self.write_byte(data[0]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::test_clock::ManualClock;
    use crate::test_util::RecordingLine;
    use rhyve_platform::layout::RESET_VALUE;

    struct Fixture {
        pm: Arc<Mutex<AcpiPm>>,
        sci: Arc<RecordingLine>,
        exits: Arc<ExitRequests>,
        clock: Arc<ManualClock>,
    }

    fn fixture() -> Fixture {
        let sci = Arc::new(RecordingLine::default());
        let exits = Arc::new(ExitRequests::new());
        let clock = Arc::new(ManualClock::default());
        let pm = Arc::new(Mutex::new(AcpiPm::new(
            sci.clone(),
            exits.clone(),
            clock.clone(),
        )));
        Fixture {
            pm,
            sci,
            exits,
            clock,
        }
    }

    fn w16(pm: &Arc<Mutex<AcpiPm>>, off: u64, v: u16) {
        pm.lock().unwrap().write(off, &v.to_le_bytes());
    }
    fn r16(pm: &Arc<Mutex<AcpiPm>>, off: u64) -> u16 {
        let mut b = [0u8; 2];
        pm.lock().unwrap().read(off, &mut b);
        u16::from_le_bytes(b)
    }

    #[test]
    fn smi_cmd_switches_acpi_mode() {
        let f = fixture();
        let mut smi = SmiCommand::new(f.pm.clone());
        assert!(!f.pm.lock().unwrap().acpi_enabled());
        smi.write(0, &[SMI_ACPI_ENABLE]);
        assert!(f.pm.lock().unwrap().acpi_enabled());
        assert_eq!(r16(&f.pm, OFF_PM1_CNT) & PM1_SCI_EN, PM1_SCI_EN);
        // OSPM cannot clear SCI_EN through PM1_CNT.
        w16(&f.pm, OFF_PM1_CNT, 0);
        assert!(f.pm.lock().unwrap().acpi_enabled());
        smi.write(0, &[SMI_ACPI_DISABLE]);
        assert!(!f.pm.lock().unwrap().acpi_enabled());
        smi.write(0, &[0x12, 0x34]);
        assert!(!f.pm.lock().unwrap().acpi_enabled());
    }

    #[test]
    fn power_button_raises_sci_when_enabled_and_clears_w1c() {
        let f = fixture();
        f.pm.lock().unwrap().power_button();
        assert_eq!(r16(&f.pm, OFF_PM1_STS), PM1_PWRBTN_STS);
        assert!(!f.sci.level(), "not enabled yet");
        // Only RTC/PWRBTN/GBL enables stick.
        w16(&f.pm, OFF_PM1_EN, 0xFFFF);
        assert_eq!(
            r16(&f.pm, OFF_PM1_EN),
            PM1_RTC_EN | PM1_PWRBTN_EN | PM1_GBL_EN
        );
        assert!(f.sci.level());
        // Writing 0 clears nothing; writing the bit clears it.
        w16(&f.pm, OFF_PM1_STS, 0);
        assert!(f.sci.level());
        w16(&f.pm, OFF_PM1_STS, PM1_PWRBTN_STS);
        assert_eq!(r16(&f.pm, OFF_PM1_STS), 0);
        assert!(!f.sci.level());
    }

    #[test]
    fn s5_powers_off_other_sleep_types_do_not() {
        let f = fixture();
        w16(&f.pm, OFF_PM1_CNT, (1 << 10) | PM1_SLP_EN);
        assert_eq!(f.exits.pending(), None);
        assert_eq!(r16(&f.pm, OFF_PM1_CNT), 1 << 10, "SLP_EN reads 0");
        w16(&f.pm, OFF_PM1_CNT, (S5_SLP_TYP << 10) | PM1_SLP_EN);
        assert_eq!(f.exits.pending(), Some(ExitRequest::PowerOff));
    }

    #[test]
    fn gpe0_vmgenc() {
        let f = fixture();
        let mut pm = f.pm.lock().unwrap();
        assert!(!pm.raise_gpe(3));
        assert!(pm.raise_gpe(GPE_VMGENC));
        let mut b = [0u8];
        pm.read(OFF_GPE0_STS, &mut b);
        assert_eq!(b[0], 1);
        assert!(!f.sci.level());
        pm.write(OFF_GPE0_EN, &[0xFF]);
        pm.read(OFF_GPE0_EN, &mut b);
        assert_eq!(b[0], 1);
        assert!(f.sci.level());
        pm.write(OFF_GPE0_STS, &[1]);
        assert!(!f.sci.level());
    }

    #[test]
    fn pm_timer_counts_at_3_579545_mhz_and_wraps() {
        let f = fixture();
        let read = || {
            let mut b = [0u8; 4];
            f.pm.lock().unwrap().read(OFF_TMR, &mut b);
            u32::from_le_bytes(b)
        };
        assert_eq!(read(), 0);
        f.clock.advance_ns(1_000_000_000);
        assert_eq!(read(), 3_579_545);
        // 2^32 ticks is about 1199.8 s: the counter wraps.
        f.clock.advance_ns(1_200_000_000_000);
        let expect = (ns_to_ticks(1_201_000_000_000, PM_TIMER_HZ) & 0xFFFF_FFFF) as u32;
        assert_eq!(read(), expect);
        // Narrow reads are refused.
        let mut b = [0u8; 2];
        f.pm.lock().unwrap().read(OFF_TMR, &mut b);
        assert_eq!(b, [0xFF, 0xFF]);
    }

    #[test]
    fn reset_register() {
        let exits = Arc::new(ExitRequests::new());
        let mut r = ResetControl::new(exits.clone());
        r.write(0, &[0x02]);
        assert_eq!(exits.pending(), None);
        let mut b = [0u8];
        r.read(0, &mut b);
        assert_eq!(b[0], 2);
        r.write(0, &[RESET_VALUE]);
        assert_eq!(exits.pending(), Some(ExitRequest::Reset));
    }

    #[test]
    fn state_serializes() {
        let f = fixture();
        f.pm.lock().unwrap().power_button();
        let s = f.pm.lock().unwrap().state().clone();
        let back: PmState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
