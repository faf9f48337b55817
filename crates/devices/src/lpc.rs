//! Builds the LPC/ISA and chipset devices of bhyve's amd64 machine from the
//! config tree and puts them on the buses.
//!
//! What bhyve always has (`bhyverun.c` calls `rtc_init`, `sci_init`,
//! `atkbdc_init`; `pm.c`/`post.c` ports are static registrations; the
//! kernel adds vRTC, vPM timer, vHPET): RTC/CMOS, ACPI PM block, SMI_CMD,
//! reset register, i8042, port 0x61, ELCR, POST ports, HPET.
//!
//! What only exists with an LPC bridge (`pci.B.S.F.device=lpc`, bhyve's
//! `lpc_init`): the four COM ports (always all four, with a host backend
//! only where `lpc.comN.path` is set) and pc-testdev (`lpc.pc-testdev`).
//!
//! Keys owned by others are not read here: `lpc.bootrom`, `lpc.bootvars`,
//! `lpc.fwcfg`, `lpc.pcireg.*`, `tpm.*`.

use crate::clock::{Clock, ClockState, MonotonicClock};
use crate::elcr::Elcr;
use crate::hpet::{hpet_capabilities_low, Hpet};
use crate::i8042::{AUX_IRQ, COMMAND_OFFSET, I8042, KBD_IRQ};
use crate::nmi_status::NmiStatus;
use crate::pctestdev::{
    DebugExit, IoMem, IrqLines, ScratchPort, DEBUG_EXIT_LEN, IRQ_PORT_BASE, SCRATCH_LEN,
    SCRATCH_PORT,
};
use crate::pm::{AcpiPm, ResetControl, SmiCommand, PM_BLOCK_LEN};
use crate::post::{PostPort, BHYVE_POST_READ_PORT};
use crate::rtc::Rtc;
use crate::shared_irq::SharedIrq;
use crate::timer::{TimerThread, TimerWaker};
use crate::uart::Uart;
use rhyve_backends::serial::{self, SerialBackend, SerialError};
use rhyve_config::{ConfigError, ConfigTree};
use rhyve_platform::bus::{Bus, BusDevice, BusError, SharedDevice};
use rhyve_platform::exit::ExitRequests;
use rhyve_platform::irq::InterruptController;
use rhyve_platform::layout::{
    MemoryLayout, COM_PORTS, DEBUG_EXIT_PORT, ELCR_PORT, HPET_BASE, HPET_SIZE, I8042_COMMAND_PORT,
    I8042_DATA_PORT, IOAPIC_PINS, NMI_STATUS_PORT, PCTESTDEV_IOMEM_BASE, PCTESTDEV_IOMEM_SIZE,
    PM1A_EVT_PORT, POST_PORT, RESET_PORT, RTC_IRQ, RTC_PORT, SCI_IRQ, SMI_CMD_PORT,
    UART_PORT_COUNT,
};
use rhyve_platform::snapshot::{DeviceState, Lifecycle, SnapshotError, Stateful, Unsaveable};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("Unable to initialize backend '{path}' for LPC device {device}: {source}")]
    Serial {
        device: String,
        path: String,
        #[source]
        source: SerialError,
    },
    #[error("unknown LPC device \"{0}\"")]
    UnknownLpcDevice(String),
    #[error("cannot place {what}: {source}")]
    Bus {
        what: String,
        #[source]
        source: BusError,
    },
    #[error("cannot start the {what} timer thread: {source}")]
    Thread {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// One COM port the guest sees.
#[derive(Debug, Clone)]
pub struct ComPort {
    /// "com1".."com4".
    pub name: &'static str,
    pub base: u16,
    pub irq: u32,
    /// The `lpc.comN.path` value, if a host backend is attached.
    pub path: Option<String>,
    pub device: Arc<Mutex<Uart>>,
}

/// Presents a shared device at an extra base, with a fixed offset added, so
/// one model can answer two non-adjacent port ranges (i8042 0x60 and 0x64).
struct Alias<D: BusDevice> {
    device: Arc<Mutex<D>>,
    offset: u64,
}

impl<D: BusDevice> BusDevice for Alias<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut d = self.device.lock().unwrap_or_else(|e| e.into_inner());
        d.read(offset + self.offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut d = self.device.lock().unwrap_or_else(|e| e.into_inner());
        d.write(offset + self.offset, data);
    }
}

/// Handles to the platform devices the VMM needs while the VM runs.
pub struct PlatformDevices {
    /// COM ports that exist (all four with an LPC bridge, none without).
    pub com_ports: Vec<ComPort>,
    pub pm: Arc<Mutex<AcpiPm>>,
    /// 0xCF9. Not on the bus if something already answered there (see
    /// [`PlatformDevices::reset_on_bus`]); a PCI config-address device that
    /// owns 0xCF8-0xCFB then forwards byte accesses at 0xCF9 here.
    pub reset: Arc<Mutex<ResetControl>>,
    pub reset_on_bus: bool,
    pub rtc: Arc<Mutex<Rtc>>,
    pub hpet: Arc<Mutex<Hpet>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub elcr: Arc<Mutex<Elcr>>,
    /// Whether pc-testdev was created.
    pub pc_testdev: bool,
    /// The VM clock every timer device counts on.
    clock: Arc<MonotonicClock>,
    nmi_status: Arc<Mutex<NmiStatus>>,
    post: Arc<Mutex<PostPort>>,
    backends: Vec<Arc<SerialBackend>>,
    timers: Vec<TimerThread>,
}

impl std::fmt::Debug for PlatformDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlatformDevices")
            .field("com_ports", &self.com_ports)
            .field("pc_testdev", &self.pc_testdev)
            .finish_non_exhaustive()
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PlatformDevices {
    /// Press the ACPI power button (SIGTERM once [`Self::acpi_enabled`]).
    pub fn power_button(&self) {
        lock(&self.pm).power_button();
    }

    /// True once the guest enabled ACPI; before that bhyve lets SIGTERM
    /// kill the process.
    pub fn acpi_enabled(&self) -> bool {
        lock(&self.pm).acpi_enabled()
    }

    /// GCAP_ID low dword for the ACPI HPET table.
    pub fn hpet_capabilities(&self) -> u32 {
        hpet_capabilities_low()
    }

    /// Names of the COM ports the guest has (for the DSDT and SPCR).
    pub fn com_port_names(&self) -> Vec<&'static str> {
        self.com_ports.iter().map(|c| c.name).collect()
    }

    /// Flush guest console output and put the terminal back (raw mode off,
    /// null-modem symlinks removed). Call on every exit path; safe to repeat.
    pub fn restore_terminal(&self) {
        for b in &self.backends {
            b.drain_output(Duration::from_millis(500));
        }
        serial::restore_terminal();
    }

    /// Every platform device for the machine's inventory, the VM clock
    /// first: the others' saved times count on it.
    pub fn lifecycle(&self) -> Vec<Arc<dyn Lifecycle>> {
        let clock = self.clock.clone();
        let mut all: Vec<Arc<dyn Lifecycle>> = vec![Arc::new(VmClockLifecycle(clock))];
        for c in &self.com_ports {
            all.push(Stateful::new(
                format!("lpc.{}", c.name),
                c.device.clone(),
                |u: &Uart| u.state().clone(),
                Uart::restore,
            ));
        }
        all.push(Stateful::new(
            "rtc",
            self.rtc.clone(),
            |r: &Rtc| r.state().clone(),
            Rtc::restore,
        ));
        all.push(Stateful::new(
            "pm",
            self.pm.clone(),
            |p: &AcpiPm| p.state().clone(),
            AcpiPm::restore,
        ));
        all.push(Stateful::new(
            "reset",
            self.reset.clone(),
            ResetControl::state,
            ResetControl::restore,
        ));
        all.push(Stateful::new(
            "hpet",
            self.hpet.clone(),
            |h: &Hpet| h.state().clone(),
            Hpet::restore,
        ));
        all.push(Stateful::new(
            "i8042",
            self.i8042.clone(),
            |k: &I8042| k.state().clone(),
            I8042::restore,
        ));
        all.push(Stateful::new(
            "elcr",
            self.elcr.clone(),
            Elcr::state,
            Elcr::restore,
        ));
        all.push(Stateful::new(
            "nmi-status",
            self.nmi_status.clone(),
            NmiStatus::state,
            NmiStatus::restore,
        ));
        all.push(Stateful::new(
            "post",
            self.post.clone(),
            PostPort::state,
            PostPort::restore,
        ));
        if self.pc_testdev {
            all.push(Arc::new(Unsaveable {
                id: "lpc.pc-testdev".into(),
                kind: "pc-testdev",
                why: "its test ports keep no saved state",
            }));
        }
        all
    }

    /// Stop the timer threads and close the serial backends.
    pub fn shutdown(&mut self) {
        self.timers.clear();
        for b in &self.backends {
            b.drain_output(Duration::from_millis(500));
        }
        // Detach so the last references go away here: the backends' threads
        // stop and their symlinks and terminal modes are undone now.
        for c in &self.com_ports {
            lock(&c.device).detach_backend();
        }
        self.backends.clear();
        serial::restore_terminal();
    }
}

impl Drop for PlatformDevices {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The VM clock in the inventory: saved as its reading, restored by
/// setting the new process's clock to it.
struct VmClockLifecycle(Arc<MonotonicClock>);

impl Lifecycle for VmClockLifecycle {
    fn id(&self) -> String {
        "clock".into()
    }

    fn save(&self) -> Result<DeviceState, SnapshotError> {
        DeviceState::encode(
            "clock",
            &ClockState {
                now_ns: self.0.now_ns(),
            },
        )
    }

    fn restore(&self, state: &DeviceState) -> Result<(), SnapshotError> {
        let saved: ClockState = state.decode()?;
        self.0.set_now(saved.now_ns);
        Ok(())
    }
}

/// True if the config has an LPC bridge (`pci.B.S.F.device=lpc`).
pub fn lpc_configured(config: &ConfigTree) -> Result<bool, ConfigError> {
    for bus in config.children("pci") {
        for slot in config.children(&format!("pci.{bus}")) {
            for func in config.children(&format!("pci.{bus}.{slot}")) {
                let key = format!("pci.{bus}.{slot}.{func}.device");
                if config.get(&key)?.as_deref() == Some("lpc") {
                    return Ok(true);
                }
            }
        }
    }
    Ok(false)
}

fn place(
    bus: &Bus,
    what: &str,
    dev: SharedDevice,
    base: u64,
    len: u64,
) -> Result<(), PlatformError> {
    bus.insert(dev, base, len)
        .map_err(|source| PlatformError::Bus {
            what: what.to_string(),
            source,
        })
}

/// Create every LPC/platform device the config asks for and register it on
/// `io` (ports) and `mmio`.
pub fn create_platform_devices(
    config: &ConfigTree,
    io: &Bus,
    mmio: &Bus,
    irqs: Arc<dyn InterruptController>,
    exits: Arc<ExitRequests>,
    memory: &MemoryLayout,
) -> Result<PlatformDevices, PlatformError> {
    let vm_clock = Arc::new(MonotonicClock::new());
    let clock: Arc<dyn Clock> = vm_clock.clone();
    let has_lpc = lpc_configured(config)?;

    // Refuse COM unit names bhyve does not have before opening anything.
    for child in config.children("lpc") {
        if let Some(unit) = child.strip_prefix("com") {
            if !COM_PORTS.iter().any(|(name, _, _)| *name == child) {
                return Err(PlatformError::UnknownLpcDevice(format!("com{unit}")));
            }
        }
    }

    let mut backends = Vec::new();
    let mut com_ports = Vec::new();
    if has_lpc {
        // COM1/COM3 and COM2/COM4 share IRQs: wire each pair as an OR.
        let mut shared: Vec<(u32, Arc<SharedIrq>)> = Vec::new();
        for (unit, (name, base, irq)) in (0u32..).zip(COM_PORTS) {
            let gate = match shared.iter().find(|(i, _)| *i == irq) {
                Some((_, g)) => g.clone(),
                None => {
                    let g = SharedIrq::new(irqs.line(irq));
                    shared.push((irq, g.clone()));
                    g
                }
            };
            let uart = Arc::new(Mutex::new(Uart::new(gate.input(unit))));
            let path = config.get(&format!("lpc.{name}.path"))?;
            if let Some(p) = &path {
                let backend = SerialBackend::open(p).map_err(|source| PlatformError::Serial {
                    device: name.to_string(),
                    path: p.clone(),
                    source,
                })?;
                let backend = Arc::new(backend);
                Uart::attach_backend(&uart, backend.clone());
                backends.push(backend);
            }
            place(io, name, uart.clone(), base.into(), UART_PORT_COUNT.into())?;
            com_ports.push(ComPort {
                name,
                base,
                irq,
                path,
                device: uart,
            });
        }
    } else if COM_PORTS
        .iter()
        .any(|(name, _, _)| config.get_raw(&format!("lpc.{name}.path")).is_some())
    {
        tracing::warn!("COM ports are configured but there is no LPC bridge (-s N,lpc): ignored");
    }

    let use_localtime = config.bool_or("rtc.use_localtime", true)?;
    let rtc_waker = TimerWaker::new();
    let rtc = Arc::new(Mutex::new(Rtc::new(
        irqs.line(RTC_IRQ),
        clock.clone(),
        rtc_waker.clone(),
        memory,
        use_localtime,
    )));
    place(io, "rtc", rtc.clone(), RTC_PORT.into(), 2)?;

    let pm = Arc::new(Mutex::new(AcpiPm::new(
        irqs.line(SCI_IRQ),
        exits.clone(),
        clock.clone(),
    )));
    place(
        io,
        "ACPI PM block",
        pm.clone(),
        PM1A_EVT_PORT.into(),
        PM_BLOCK_LEN,
    )?;
    place(
        io,
        "SMI_CMD",
        Arc::new(Mutex::new(SmiCommand::new(pm.clone()))),
        SMI_CMD_PORT.into(),
        1,
    )?;

    let reset = Arc::new(Mutex::new(ResetControl::new(exits.clone())));
    let reset_on_bus = !io.contains(RESET_PORT.into());
    if reset_on_bus {
        place(io, "reset register", reset.clone(), RESET_PORT.into(), 1)?;
    } else {
        tracing::debug!(
            "0xCF9 is taken (PCI config address?); it must forward to the reset register"
        );
    }

    let i8042 = Arc::new(Mutex::new(I8042::new(
        irqs.line(KBD_IRQ),
        irqs.line(AUX_IRQ),
        exits.clone(),
    )));
    place(io, "i8042 data", i8042.clone(), I8042_DATA_PORT.into(), 1)?;
    place(
        io,
        "i8042 command",
        Arc::new(Mutex::new(Alias {
            device: i8042.clone(),
            offset: COMMAND_OFFSET,
        })),
        I8042_COMMAND_PORT.into(),
        1,
    )?;
    let nmi_status = Arc::new(Mutex::new(NmiStatus::new(clock.clone())));
    place(
        io,
        "NMI status port",
        nmi_status.clone(),
        NMI_STATUS_PORT.into(),
        1,
    )?;
    let mut elcr = Elcr::new();
    elcr.set_level_triggered(SCI_IRQ as u8);
    let elcr = Arc::new(Mutex::new(elcr));
    place(io, "ELCR", elcr.clone(), ELCR_PORT.into(), 2)?;
    let post = Arc::new(Mutex::new(PostPort::new()));
    place(io, "POST port", post.clone(), POST_PORT.into(), 1)?;
    place(
        io,
        "POST read port",
        post.clone(),
        BHYVE_POST_READ_PORT.into(),
        1,
    )?;

    let hpet_waker = TimerWaker::new();
    let hpet = Arc::new(Mutex::new(Hpet::new(
        irqs.clone(),
        clock.clone(),
        hpet_waker.clone(),
    )));
    place(mmio, "HPET", hpet.clone(), HPET_BASE, HPET_SIZE)?;

    let pc_testdev = has_lpc && config.bool_or("lpc.pc-testdev", false)?;
    if pc_testdev {
        place(
            io,
            "pc-testdev isa-debug-exit",
            Arc::new(Mutex::new(DebugExit::new(exits.clone()))),
            DEBUG_EXIT_PORT.into(),
            DEBUG_EXIT_LEN,
        )?;
        place(
            io,
            "pc-testdev scratch port",
            Arc::new(Mutex::new(ScratchPort::new())),
            SCRATCH_PORT.into(),
            SCRATCH_LEN,
        )?;
        place(
            io,
            "pc-testdev IRQ ports",
            Arc::new(Mutex::new(IrqLines::new(irqs.clone(), IOAPIC_PINS))),
            IRQ_PORT_BASE.into(),
            IOAPIC_PINS.into(),
        )?;
        place(
            mmio,
            "pc-testdev iomem",
            Arc::new(Mutex::new(IoMem::new(PCTESTDEV_IOMEM_SIZE))),
            PCTESTDEV_IOMEM_BASE,
            PCTESTDEV_IOMEM_SIZE,
        )?;
    }

    let thread_err = |what: &str| {
        let what = what.to_string();
        move |source| PlatformError::Thread { what, source }
    };
    let timers = vec![
        TimerThread::spawn("rtc-timer", rtc.clone(), rtc_waker, clock.clone())
            .map_err(thread_err("RTC"))?,
        TimerThread::spawn("hpet-timer", hpet.clone(), hpet_waker, clock)
            .map_err(thread_err("HPET"))?,
    ];

    Ok(PlatformDevices {
        com_ports,
        pm,
        reset,
        reset_on_bus,
        rtc,
        hpet,
        i8042,
        elcr,
        pc_testdev,
        clock: vm_clock,
        nmi_status,
        post,
        backends,
        timers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::FakeController;
    use rhyve_platform::exit::ExitRequest;

    struct Machine {
        io: Bus,
        mmio: Bus,
        ctl: Arc<FakeController>,
        exits: Arc<ExitRequests>,
    }

    fn machine() -> Machine {
        Machine {
            io: Bus::new(),
            mmio: Bus::new(),
            ctl: Arc::new(FakeController::default()),
            exits: Arc::new(ExitRequests::new()),
        }
    }

    fn build(m: &Machine, config: &ConfigTree) -> Result<PlatformDevices, PlatformError> {
        create_platform_devices(
            config,
            &m.io,
            &m.mmio,
            m.ctl.clone(),
            m.exits.clone(),
            &MemoryLayout::new(512 << 20),
        )
    }

    fn inb(bus: &Bus, port: u64) -> u8 {
        let mut b = [0u8];
        assert!(bus.read(port, &mut b), "nothing at {port:#x}");
        b[0]
    }

    #[test]
    fn bare_machine_has_chipset_but_no_com_ports() {
        let m = machine();
        let p = build(&m, &ConfigTree::new()).unwrap();
        assert!(p.com_ports.is_empty());
        assert!(!m.io.contains(0x3F8));
        assert!(m.io.contains(0x70) && m.io.contains(0x71));
        assert!(m.io.contains(0x400) && m.io.contains(0x40D) && !m.io.contains(0x40E));
        for port in [0x60, 0x64, 0x61, 0x4D0, 0x4D1, 0x80, 0x84, 0xB2, 0xCF9] {
            assert!(m.io.contains(port), "{port:#x}");
        }
        assert_eq!(inb(&m.io, 0x4D1), 0x02, "SCI (IRQ 9) is level");
        assert!(!m.io.contains(0xF4), "pc-testdev needs lpc");
        assert!(m.mmio.contains(HPET_BASE));
        assert_eq!(p.hpet_capabilities(), 0x8086_0701);
        // i8042 self-test through the bus.
        assert!(m.io.write(0x64, &[0xAA]));
        assert_eq!(inb(&m.io, 0x60), 0x55);
        // ACPI enable, then the power button raises the SCI.
        assert!(!p.acpi_enabled());
        m.io.write(0xB2, &[0xA0]);
        assert!(p.acpi_enabled());
        m.io.write(0x402, &0x0100u16.to_le_bytes());
        p.power_button();
        assert!(m.ctl.get(SCI_IRQ).level());
        // Reset through 0xCF9.
        m.io.write(0xCF9, &[6]);
        assert_eq!(m.exits.pending(), Some(ExitRequest::Reset));
    }

    fn inventory(p: &PlatformDevices) -> rhyve_platform::snapshot::Inventory {
        let mut inv = rhyve_platform::snapshot::Inventory::new();
        for d in p.lifecycle() {
            inv.register(d).unwrap();
        }
        inv
    }

    #[test]
    fn every_platform_device_round_trips_through_a_snapshot() {
        let mut c = ConfigTree::new();
        c.set("pci.0.31.0.device", "lpc").unwrap();
        let (a, b) = (machine(), machine());
        let pa = build(&a, &c).unwrap();
        // Guest-visible changes in each device.
        a.io.write(0x3F8 + 7, &[0x5A]); // COM1 scratch
        a.io.write(0x2F8 + 1, &[0x02]); // COM2 IER: THRE interrupt
        a.io.write(0x70, &[0x0A]); // RTC index
        a.io.write(0x402, &[0x01]); // PM1 enable: timer
        a.io.write(0x64, &[0x60]); // i8042: write command byte...
        a.io.write(0x60, &[0x47]);
        a.io.write(0x80, &[0x42]); // POST code
        a.mmio.write(HPET_BASE + 0x10, &1u64.to_le_bytes()); // HPET enabled
        std::thread::sleep(Duration::from_millis(5));
        let saved = inventory(&pa).save().unwrap();
        let text = serde_json::to_string(&saved).unwrap();
        let saved: Vec<DeviceState> = serde_json::from_str(&text).unwrap();

        let pb = build(&b, &c).unwrap();
        inventory(&pb).restore(&saved).unwrap();
        assert_eq!(inventory(&pb).save().unwrap().len(), saved.len());
        for (x, y) in pa.com_ports.iter().zip(&pb.com_ports) {
            assert_eq!(lock(&x.device).state(), lock(&y.device).state());
        }
        assert!(b.ctl.get(3).level(), "COM2's interrupt is asserted again");
        assert_eq!(lock(&pa.rtc).state(), lock(&pb.rtc).state());
        assert_eq!(lock(&pa.pm).state(), lock(&pb.pm).state());
        assert_eq!(lock(&pa.i8042).state(), lock(&pb.i8042).state());
        assert_eq!(lock(&pa.hpet).state(), lock(&pb.hpet).state());
        assert_eq!(lock(&pb.post).state().last_code, 0x42);
        // The restored VM clock goes on from the saved reading.
        let clock: ClockState = saved
            .iter()
            .find(|s| s.id == "clock")
            .unwrap()
            .decode()
            .unwrap();
        let now = pb.clock.now_ns();
        assert!((clock.now_ns..clock.now_ns + 60_000_000_000).contains(&now));
    }

    #[test]
    fn pc_testdev_makes_a_snapshot_refuse() {
        let mut c = ConfigTree::new();
        c.set("pci.0.31.0.device", "lpc").unwrap();
        c.set("lpc.pc-testdev", "true").unwrap();
        let m = machine();
        let p = build(&m, &c).unwrap();
        let e = inventory(&p).save().unwrap_err().to_string();
        assert!(e.contains("lpc.pc-testdev"), "{e}");
    }

    #[test]
    fn lpc_machine_has_four_com_ports_and_pc_testdev() {
        let (mut terminal, com2) = crate::test_util::open_pty();
        let mut c = ConfigTree::new();
        c.set("pci.0.31.0.device", "lpc").unwrap();
        c.set("lpc.com2.path", &com2).unwrap();
        c.set("lpc.pc-testdev", "true").unwrap();
        c.set("rtc.use_localtime", "false").unwrap();
        let m = machine();
        let mut p = build(&m, &c).unwrap();
        assert_eq!(p.com_port_names(), vec!["com1", "com2", "com3", "com4"]);
        assert_eq!(p.com_ports[1].path.as_deref(), Some(com2.as_str()));
        assert!(p.com_ports[0].path.is_none());
        for (_, base, _) in COM_PORTS {
            assert_eq!(inb(&m.io, u64::from(base) + 5), 0x60, "LSR: THRE|TEMT");
        }
        for b in b"hi com2" {
            m.io.write(0x2F8, &[*b]);
        }
        m.io.write(0x3F8, b"x"); // com1 has no backend: dropped
        p.shutdown();
        let mut got = [0u8; 7];
        std::io::Read::read_exact(&mut terminal, &mut got).unwrap();
        assert_eq!(&got, b"hi com2");
        assert!(p.pc_testdev);
        m.io.write(0xE0, &0xDEAD_BEEFu32.to_le_bytes());
        assert_eq!(inb(&m.io, 0xE3), 0xDE);
        m.io.write(0x2000 + 5, &[1]);
        assert!(m.ctl.get(5).level());
        assert!(m.mmio.write(PCTESTDEV_IOMEM_BASE + 8, &[7]));
        m.io.write(0xF4, &[3]);
        assert_eq!(m.exits.pending().map(|e| e.status()), Some(7));
    }

    #[test]
    fn com_ports_sharing_an_irq_are_wired_or() {
        let mut c = ConfigTree::new();
        c.set("pci.0.1.0.device", "lpc").unwrap();
        let m = machine();
        let _p = build(&m, &c).unwrap();
        let irq4 = m.ctl.get(4);
        // COM1 and COM3 both enable the THRE interrupt.
        m.io.write(0x3F9, &[0x02]);
        m.io.write(0x3E9, &[0x02]);
        assert!(irq4.level());
        // COM1's interrupt is acknowledged; COM3's still holds the line.
        assert_eq!(inb(&m.io, 0x3FA), 0x02);
        assert!(irq4.level());
        assert_eq!(inb(&m.io, 0x3EA), 0x02);
        assert!(!irq4.level());
    }

    #[test]
    fn refuses_backends_it_cannot_honour() {
        let mut c = ConfigTree::new();
        c.set("pci.0.1.0.device", "lpc").unwrap();
        c.set("lpc.com1.path", "tcp=not-an-ip:1").unwrap();
        let err = build(&machine(), &c).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("Unable to initialize backend 'tcp=not-an-ip:1' for LPC device com1"),
            "{err}"
        );
        let mut c = ConfigTree::new();
        c.set("pci.0.1.0.device", "lpc").unwrap();
        c.set("lpc.com5.path", "stdio").unwrap();
        assert!(matches!(
            build(&machine(), &c),
            Err(PlatformError::UnknownLpcDevice(_))
        ));
        let mut c = ConfigTree::new();
        c.set("rtc.use_localtime", "maybe").unwrap();
        assert!(matches!(
            build(&machine(), &c),
            Err(PlatformError::Config(_))
        ));
    }

    #[test]
    fn reset_register_defers_to_an_existing_owner_of_0xcf9() {
        struct ConfigAddress;
        impl BusDevice for ConfigAddress {
            fn read(&mut self, _o: u64, d: &mut [u8]) {
                d.fill(0);
            }
            fn write(&mut self, _o: u64, _d: &[u8]) {}
        }
        let m = machine();
        m.io.insert(Arc::new(Mutex::new(ConfigAddress)), 0xCF8, 4)
            .unwrap();
        let p = build(&m, &ConfigTree::new()).unwrap();
        assert!(!p.reset_on_bus);
        p.reset.lock().unwrap().write_byte(6);
        assert_eq!(m.exits.pending(), Some(ExitRequest::Reset));
    }

    #[test]
    fn hpet_comparators_fire_on_the_timer_thread() {
        let m = machine();
        let p = build(&m, &ConfigTree::new()).unwrap();
        // Timer 0: periodic, edge, IOAPIC pin 23, 1 ms period.
        let cnf: u64 = (1 << 2) | (1 << 3) | (1 << 6) | (23 << 9);
        m.mmio.write(HPET_BASE + 0x100, &cnf.to_le_bytes());
        m.mmio.write(HPET_BASE + 0x108, &16_777u32.to_le_bytes());
        m.mmio.write(HPET_BASE + 0x10, &1u32.to_le_bytes());
        let line = m.ctl.get(23);
        let start = std::time::Instant::now();
        while line.rises() < 3 && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(line.rises() >= 3, "periodic interrupts arrive");
        drop(p);
        let after = line.rises();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(line.rises(), after, "stopped with the platform");
    }

    #[test]
    fn rtc_interrupts_run_on_the_timer_thread() {
        let m = machine();
        let p = build(&m, &ConfigTree::new()).unwrap();
        // Periodic interrupts at 1024 Hz.
        m.io.write(0x70, &[0x0A]);
        m.io.write(0x71, &[0x26]);
        m.io.write(0x70, &[0x0B]);
        m.io.write(0x71, &[0x42]);
        let line = m.ctl.get(RTC_IRQ);
        let start = std::time::Instant::now();
        while line.rises() == 0 && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(line.rises() >= 1);
        // The flag stays set (and the line quiet) until register C is read.
        m.io.write(0x70, &[0x0C]);
        assert_eq!(inb(&m.io, 0x71) & 0xC0, 0xC0);
        drop(p);
    }
}
