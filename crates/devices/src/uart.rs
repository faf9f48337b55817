//! 16550A UART as bhyve's `uart_emul.c` presents it (COM1-4 on the LPC bus).
//!
//! Written here rather than taken from vm-superio's `Serial` because:
//! * bhyve drives the IRQ as a level that follows the IIR (assert while an
//!   interrupt reason is pending, deassert when none is); vm-superio only
//!   fires an edge trigger on events and never deasserts;
//! * the device state must be one serde struct ([`UartState`]), which
//!   vm-superio's `SerialState` is not;
//! * bhyve's details guests see differ: RX data is reported as "character
//!   timeout" (IIR 0x0C), the FIFO is 16 bytes (1 until FCR enables it), the
//!   divisor resets to 9600 baud, DCD and DSR always read asserted.
//!
//! Input comes from a [`SerialBackend`] whose input thread calls
//! [`Uart::pull_input`] (through the notifier set up by
//! [`Uart::attach_backend`]); the vCPU pulls again on every RBR read, so the
//! FIFO refills as the guest drains it, like bhyve re-enabling its mevent.

use rhyve_backends::serial::SerialBackend;
use rhyve_platform::bus::BusDevice;
use rhyve_platform::irq::InterruptLine;
use rhyve_platform::snapshot::Schema;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};

/// Receive FIFO depth once FCR enables FIFOs (bhyve's FIFOSZ).
pub const FIFO_SIZE: usize = 16;
const DEFAULT_RCLK: u32 = 1_843_200;
const DEFAULT_BAUD: u32 = 9600;

// Register offsets.
const REG_DATA: u64 = 0; // RBR / THR, DLL with DLAB
const REG_IER: u64 = 1; // DLH with DLAB
const REG_IIR: u64 = 2; // FCR on write
const REG_LCR: u64 = 3;
const REG_MCR: u64 = 4;
const REG_LSR: u64 = 5;
const REG_MSR: u64 = 6;
const REG_SCR: u64 = 7;

const IER_ERXRDY: u8 = 0x01;
const IER_ETXRDY: u8 = 0x02;
const IER_ERLS: u8 = 0x04;
const IER_EMSC: u8 = 0x08;

const IIR_NOPEND: u8 = 0x01;
const IIR_TXRDY: u8 = 0x02;
const IIR_RLS: u8 = 0x06;
const IIR_RXTOUT: u8 = 0x0C;
const IIR_MLSC: u8 = 0x00;
const IIR_FIFO_MASK: u8 = 0xC0;

const FCR_ENABLE: u8 = 0x01;
const FCR_RCV_RST: u8 = 0x02;
const FCR_DMA: u8 = 0x08;
const FCR_RX_MASK: u8 = 0xC0;

const LCR_DLAB: u8 = 0x80;

const MCR_DTR: u8 = 0x01;
const MCR_RTS: u8 = 0x02;
const MCR_OUT1: u8 = 0x04;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOPBACK: u8 = 0x10;

const LSR_RXRDY: u8 = 0x01;
const LSR_OE: u8 = 0x02;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;

const MSR_DCTS: u8 = 0x01;
const MSR_DDSR: u8 = 0x02;
const MSR_TERI: u8 = 0x04;
const MSR_DDCD: u8 = 0x08;
const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_RI: u8 = 0x40;
const MSR_DCD: u8 = 0x80;
const MSR_DELTA_MASK: u8 = 0x0F;

/// Everything a 16550 remembers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartState {
    pub ier: u8,
    pub lcr: u8,
    pub mcr: u8,
    pub lsr: u8,
    pub msr: u8,
    pub fcr: u8,
    pub scr: u8,
    pub dll: u8,
    pub dlh: u8,
    pub rx_fifo: VecDeque<u8>,
    /// 1 in 16450 mode, [`FIFO_SIZE`] with FIFOs enabled.
    pub rx_fifo_size: usize,
    pub thre_int_pending: bool,
    /// Whether the IRQ line is currently asserted.
    pub irq_asserted: bool,
}

impl Schema for UartState {
    const KIND: &'static str = "uart-16550";
    const VERSION: u32 = 1;
}

impl Default for UartState {
    fn default() -> Self {
        let divisor = DEFAULT_RCLK / DEFAULT_BAUD / 16;
        Self {
            ier: 0,
            lcr: 0,
            mcr: 0,
            lsr: LSR_THRE | LSR_TEMT,
            msr: modem_status(0),
            fcr: 0,
            scr: 0,
            dll: divisor as u8,
            dlh: (divisor >> 8) as u8,
            rx_fifo: VecDeque::new(),
            rx_fifo_size: 1,
            thre_int_pending: false,
            irq_asserted: false,
        }
    }
}

/// MSR as the modem lines drive it: loopback reflects MCR, otherwise the
/// carrier and data-set-ready lines read asserted so a guest's open() of the
/// tty never waits for carrier.
fn modem_status(mcr: u8) -> u8 {
    if mcr & MCR_LOOPBACK != 0 {
        let mut msr = 0;
        if mcr & MCR_RTS != 0 {
            msr |= MSR_CTS;
        }
        if mcr & MCR_DTR != 0 {
            msr |= MSR_DSR;
        }
        if mcr & MCR_OUT1 != 0 {
            msr |= MSR_RI;
        }
        if mcr & MCR_OUT2 != 0 {
            msr |= MSR_DCD;
        }
        msr
    } else {
        MSR_DCD | MSR_DSR
    }
}

/// One COM port.
pub struct Uart {
    state: UartState,
    irq: Arc<dyn InterruptLine>,
    backend: Option<Arc<SerialBackend>>,
}

impl std::fmt::Debug for Uart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uart")
            .field("state", &self.state)
            .field("backend", &self.backend)
            .finish()
    }
}

impl Uart {
    /// A UART on `irq`; without a backend its output is dropped, as bhyve
    /// does for a COM port with no `path`.
    pub fn new(irq: Arc<dyn InterruptLine>) -> Self {
        Self {
            state: UartState::default(),
            irq,
            backend: None,
        }
    }

    /// Connect `backend` to the UART shared as `uart`: its input thread will
    /// push received bytes into the FIFO and raise the interrupt.
    pub fn attach_backend(uart: &Arc<Mutex<Uart>>, backend: Arc<SerialBackend>) {
        let weak: Weak<Mutex<Uart>> = Arc::downgrade(uart);
        backend.set_input_notifier(Box::new(move || {
            if let Some(u) = weak.upgrade() {
                u.lock().unwrap_or_else(|e| e.into_inner()).pull_input();
            }
        }));
        let mut u = uart.lock().unwrap_or_else(|e| e.into_inner());
        u.backend = Some(backend);
        u.pull_input();
    }

    /// Disconnect the host backend (VM teardown); output is dropped after.
    pub fn detach_backend(&mut self) -> Option<Arc<SerialBackend>> {
        self.backend.take()
    }

    pub fn state(&self) -> &UartState {
        &self.state
    }

    /// Put back a saved state; the interrupt line is driven to match it.
    pub fn restore(&mut self, saved: UartState) -> Result<(), String> {
        if saved.rx_fifo_size == 0 || saved.rx_fifo_size > FIFO_SIZE {
            return Err(format!("bad receive FIFO size {}", saved.rx_fifo_size));
        }
        self.state = saved;
        self.irq.set_level(self.state.irq_asserted);
        Ok(())
    }

    /// Move waiting host input into the receive FIFO and update the IRQ.
    pub fn pull_input(&mut self) {
        // In loopback the line is disconnected from the host; input waits.
        if self.state.mcr & MCR_LOOPBACK == 0 {
            if let Some(b) = &self.backend {
                let room = self
                    .state
                    .rx_fifo_size
                    .saturating_sub(self.state.rx_fifo.len());
                if room > 0 {
                    let mut buf = [0u8; FIFO_SIZE];
                    let n = b.read(&mut buf[..room.min(FIFO_SIZE)]);
                    self.state.rx_fifo.extend(&buf[..n]);
                }
            }
        }
        self.toggle_intr();
    }

    fn rx_fifo_reset(&mut self, size: usize) {
        self.state.rx_fifo.clear();
        self.state.rx_fifo_size = size;
        // Like bhyve, unread host input is flushed with the FIFO.
        if let Some(b) = &self.backend {
            b.flush_input();
        }
    }

    fn intr_reason(&self) -> u8 {
        let s = &self.state;
        if s.lsr & LSR_OE != 0 && s.ier & IER_ERLS != 0 {
            IIR_RLS
        } else if !s.rx_fifo.is_empty() && s.ier & IER_ERXRDY != 0 {
            IIR_RXTOUT
        } else if s.thre_int_pending && s.ier & IER_ETXRDY != 0 {
            IIR_TXRDY
        } else if s.msr & MSR_DELTA_MASK != 0 && s.ier & IER_EMSC != 0 {
            IIR_MLSC
        } else {
            IIR_NOPEND
        }
    }

    fn toggle_intr(&mut self) {
        let want = self.intr_reason() != IIR_NOPEND;
        if want != self.state.irq_asserted {
            self.state.irq_asserted = want;
            self.irq.set_level(want);
        }
    }

    /// Guest write of one register.
    pub fn write_reg(&mut self, offset: u64, value: u8) {
        let s = &mut self.state;
        if s.lcr & LCR_DLAB != 0 && (offset == REG_DATA || offset == REG_IER) {
            if offset == REG_DATA {
                s.dll = value;
            } else {
                s.dlh = value;
            }
            self.toggle_intr();
            return;
        }
        match offset {
            REG_DATA => {
                if s.mcr & MCR_LOOPBACK != 0 {
                    if s.rx_fifo.len() < s.rx_fifo_size {
                        s.rx_fifo.push_back(value);
                    } else {
                        s.lsr |= LSR_OE;
                    }
                } else if let Some(b) = &self.backend {
                    b.write(&[value]);
                }
                self.state.thre_int_pending = true;
            }
            REG_IER => {
                // THRE always reads empty, so enabling its interrupt raises it.
                if s.ier & IER_ETXRDY == 0 && value & IER_ETXRDY != 0 {
                    s.thre_int_pending = true;
                }
                s.ier = value & 0x0F;
            }
            REG_IIR => {
                let fcr = value;
                if (s.fcr ^ fcr) & FCR_ENABLE != 0 {
                    let size = if fcr & FCR_ENABLE != 0 { FIFO_SIZE } else { 1 };
                    self.rx_fifo_reset(size);
                }
                let s = &mut self.state;
                if fcr & FCR_ENABLE == 0 {
                    s.fcr = 0;
                } else {
                    if fcr & FCR_RCV_RST != 0 {
                        self.rx_fifo_reset(FIFO_SIZE);
                    }
                    self.state.fcr = fcr & (FCR_ENABLE | FCR_DMA | FCR_RX_MASK);
                }
            }
            REG_LCR => s.lcr = value,
            REG_MCR => {
                let was_loopback = s.mcr & MCR_LOOPBACK != 0;
                s.mcr = value & 0x1F;
                let msr = modem_status(s.mcr);
                if (msr ^ s.msr) & MSR_CTS != 0 {
                    s.msr |= MSR_DCTS;
                }
                if (msr ^ s.msr) & MSR_DSR != 0 {
                    s.msr |= MSR_DDSR;
                }
                if (msr ^ s.msr) & MSR_DCD != 0 {
                    s.msr |= MSR_DDCD;
                }
                if s.msr & MSR_RI != 0 && msr & MSR_RI == 0 {
                    s.msr |= MSR_TERI;
                }
                s.msr = (s.msr & MSR_DELTA_MASK) | msr;
                if was_loopback && s.mcr & MCR_LOOPBACK == 0 {
                    // Back on the line: collect input that waited.
                    self.pull_input();
                    return;
                }
            }
            // LSR and MSR are read-only.
            REG_LSR | REG_MSR => {}
            REG_SCR => s.scr = value,
            _ => {}
        }
        self.toggle_intr();
    }

    /// Guest read of one register.
    pub fn read_reg(&mut self, offset: u64) -> u8 {
        let s = &mut self.state;
        if s.lcr & LCR_DLAB != 0 && (offset == REG_DATA || offset == REG_IER) {
            return if offset == REG_DATA { s.dll } else { s.dlh };
        }
        let value = match offset {
            REG_DATA => {
                // An empty FIFO reads as bhyve's -1 truncated to a byte.
                let v = s.rx_fifo.pop_front().unwrap_or(0xFF);
                // Refill from the host as the guest drains.
                self.pull_input();
                return v;
            }
            REG_IER => s.ier,
            REG_IIR => {
                let fifo = if s.fcr & FCR_ENABLE != 0 {
                    IIR_FIFO_MASK
                } else {
                    0
                };
                let reason = self.intr_reason();
                if reason == IIR_TXRDY {
                    self.state.thre_int_pending = false;
                }
                fifo | reason
            }
            REG_LCR => s.lcr,
            REG_MCR => s.mcr,
            REG_LSR => {
                s.lsr |= LSR_TEMT | LSR_THRE;
                if s.rx_fifo.is_empty() {
                    s.lsr &= !LSR_RXRDY;
                } else {
                    s.lsr |= LSR_RXRDY;
                }
                let v = s.lsr;
                s.lsr &= !LSR_OE;
                v
            }
            REG_MSR => {
                let v = s.msr;
                s.msr &= !MSR_DELTA_MASK;
                v
            }
            REG_SCR => s.scr,
            _ => 0xFF,
        };
        self.toggle_intr();
        value
    }
}

impl BusDevice for Uart {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            tracing::debug!("uart: {}-byte read at offset {offset} ignored", data.len());
            data.fill(0xFF);
            return;
        }
        data[0] = self.read_reg(offset);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            tracing::debug!("uart: {}-byte write at offset {offset} ignored", data.len());
            return;
        }
        self.write_reg(offset, data[0]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::RecordingLine;
    use std::time::Duration;

    fn uart() -> (Uart, Arc<RecordingLine>) {
        let line = Arc::new(RecordingLine::default());
        (Uart::new(line.clone()), line)
    }

    #[test]
    fn reset_values_match_bhyve() {
        let (mut u, _) = uart();
        assert_eq!(u.read_reg(REG_IIR), IIR_NOPEND);
        assert_eq!(u.read_reg(REG_LSR), LSR_THRE | LSR_TEMT);
        assert_eq!(u.read_reg(REG_MSR), MSR_DCD | MSR_DSR);
        u.write_reg(REG_LCR, LCR_DLAB);
        assert_eq!(u.read_reg(REG_DATA), 12, "9600 baud from 1.8432 MHz");
        assert_eq!(u.read_reg(REG_IER), 0);
        u.write_reg(REG_DATA, 1);
        u.write_reg(REG_IER, 0);
        assert_eq!(u.read_reg(REG_DATA), 1);
        u.write_reg(REG_LCR, 0x03);
        assert_eq!(u.read_reg(REG_LCR), 0x03);
        assert_eq!(u.read_reg(REG_DATA), 0xFF, "empty receive buffer");
        u.write_reg(REG_SCR, 0xA5);
        assert_eq!(u.read_reg(REG_SCR), 0xA5);
    }

    #[test]
    fn thre_interrupt_follows_ier_and_iir_read() {
        let (mut u, line) = uart();
        u.write_reg(REG_IER, IER_ETXRDY);
        assert!(line.level(), "enabling THRE interrupt raises it");
        assert_eq!(u.read_reg(REG_IIR), IIR_TXRDY);
        assert!(!line.level(), "reading IIR clears THRE");
        assert_eq!(u.read_reg(REG_IIR), IIR_NOPEND);
        u.write_reg(REG_DATA, b'x');
        assert!(line.level(), "transmit raises THRE again");
        u.write_reg(REG_IER, 0);
        assert!(!line.level());
    }

    #[test]
    fn loopback_fifo_and_overrun() {
        let (mut u, line) = uart();
        u.write_reg(REG_MCR, MCR_LOOPBACK | MCR_RTS | MCR_OUT2);
        assert_eq!(u.read_reg(REG_MSR) & 0xF0, MSR_CTS | MSR_DCD);
        // 16450 mode: one byte holds, the second overruns.
        u.write_reg(REG_IER, IER_ERXRDY | IER_ERLS);
        u.write_reg(REG_DATA, 0x41);
        assert!(line.level());
        assert_eq!(u.read_reg(REG_IIR), IIR_RXTOUT);
        u.write_reg(REG_DATA, 0x42);
        assert_eq!(u.read_reg(REG_IIR), IIR_RLS, "overrun outranks data");
        assert_eq!(
            u.read_reg(REG_LSR),
            LSR_RXRDY | LSR_OE | LSR_THRE | LSR_TEMT
        );
        assert_eq!(u.read_reg(REG_LSR) & LSR_OE, 0, "OE clears on read");
        assert_eq!(u.read_reg(REG_DATA), 0x41);
        assert!(!line.level());
        // FIFO mode holds 16.
        u.write_reg(REG_IIR, FCR_ENABLE);
        assert_eq!(u.read_reg(REG_IIR) & IIR_FIFO_MASK, IIR_FIFO_MASK);
        for i in 0..20u8 {
            u.write_reg(REG_DATA, i);
        }
        let got: Vec<u8> = (0..16).map(|_| u.read_reg(REG_DATA)).collect();
        assert_eq!(got, (0..16).collect::<Vec<u8>>());
        assert_eq!(u.read_reg(REG_LSR) & LSR_RXRDY, 0);
    }

    #[test]
    fn modem_status_deltas() {
        let (mut u, line) = uart();
        u.write_reg(REG_IER, IER_EMSC);
        u.write_reg(REG_MCR, MCR_LOOPBACK);
        // DSR and DCD dropped when entering loopback with DTR/OUT2 clear.
        let msr = u.read_reg(REG_MSR);
        assert_eq!(msr & MSR_DELTA_MASK, MSR_DDSR | MSR_DDCD);
        assert!(!line.level(), "deltas clear on read");
        u.write_reg(REG_MCR, MCR_LOOPBACK | MCR_OUT1);
        u.write_reg(REG_MCR, MCR_LOOPBACK);
        assert!(line.level());
        assert_eq!(u.read_reg(REG_IIR), IIR_MLSC);
        assert_eq!(u.read_reg(REG_MSR) & MSR_TERI, MSR_TERI);
    }

    #[test]
    fn wide_accesses_are_refused() {
        let (mut u, _) = uart();
        let mut w = [0u8; 2];
        BusDevice::read(&mut u, 0, &mut w);
        assert_eq!(w, [0xFF, 0xFF]);
        BusDevice::write(&mut u, 7, &[1, 2]);
        assert_eq!(u.read_reg(REG_SCR), 0);
    }

    #[test]
    fn backend_input_raises_interrupt_and_output_reaches_host() {
        let (mut terminal, path) = crate::test_util::open_pty();
        let backend = Arc::new(SerialBackend::open(&path).unwrap());
        let line = Arc::new(RecordingLine::default());
        let u = Arc::new(Mutex::new(Uart::new(line.clone())));
        Uart::attach_backend(&u, backend.clone());
        {
            let mut g = u.lock().unwrap();
            g.write_reg(REG_IIR, FCR_ENABLE);
            g.write_reg(REG_IER, IER_ERXRDY);
        }
        std::io::Write::write_all(&mut terminal, b"hello, guest").unwrap();
        let start = std::time::Instant::now();
        while !line.level() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(line.level(), "input raised the IRQ");
        let mut got = Vec::new();
        while start.elapsed() < Duration::from_secs(5) && got.len() < 12 {
            let mut g = u.lock().unwrap();
            if g.read_reg(REG_LSR) & LSR_RXRDY != 0 {
                got.push(g.read_reg(REG_DATA));
            } else {
                drop(g);
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        assert_eq!(got, b"hello, guest");
        assert!(!line.level());
        drop(u);
        drop(backend);
    }

    #[test]
    fn state_round_trips_through_serde() {
        let (mut u, _) = uart();
        u.write_reg(REG_SCR, 7);
        let json = serde_json::to_string(u.state()).unwrap();
        let back: UartState = serde_json::from_str(&json).unwrap();
        assert_eq!(&back, u.state());
    }
}
