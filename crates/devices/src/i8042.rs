//! i8042 keyboard controller at 0x60 (data) / 0x64 (status/command), as
//! bhyve's `amd64/atkbdc.c` answers with no keyboard or mouse attached.
//!
//! The controller part is complete enough for firmware and OS probes: the
//! command byte and internal RAM (0x20-0x3F read, 0x60-0x7F write), the
//! self-test (0xAA -> 0x55), port tests (0xAB/0xA9 -> 0), port enable and
//! disable, input/output port reads, output-buffer writes (0xD2), and pulse
//! reset (0xFE) which resets the VM like bhyve. Bytes for the keyboard
//! device get the answers of bhyve's `ps2kbd.c` (ACK 0xFA; reset adds the
//! self-test pass 0xAA, identify the ID 0xAB 0x83, echo 0xEE; the data byte
//! of set-LEDs, typematic and scan-code-set is ACKed too), so keyboard
//! drivers find a keyboard instead of waiting out their timeouts. Keys
//! arrive from fbuf's VNC server through [`I8042::key_event`]; the PS/2
//! mouse on the auxiliary port (`ps2_mouse`, IRQ 12) gets its pointer
//! events through [`I8042::pointer_event`]. Controller replies and
//! keyboard bytes raise IRQ 1 when the command byte enables it.

use rhyve_platform::bus::BusDevice;
use rhyve_platform::exit::{ExitRequest, ExitRequests};
use rhyve_platform::irq::InterruptLine;
use rhyve_platform::snapshot::Schema;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Arc;

/// ISA IRQ of the keyboard port.
pub const KBD_IRQ: u32 = 1;
/// ISA IRQ of the auxiliary (mouse) port.
pub const AUX_IRQ: u32 = 12;

const CMD_GET_COMMAND_BYTE: u8 = 0x20;
const CMD_SET_COMMAND_BYTE: u8 = 0x60;
const CMD_DISABLE_AUX_PORT: u8 = 0xA7;
const CMD_ENABLE_AUX_PORT: u8 = 0xA8;
const CMD_TEST_AUX_PORT: u8 = 0xA9;
const CMD_TEST_CTRL: u8 = 0xAA;
const CMD_TEST_KBD_PORT: u8 = 0xAB;
const CMD_DISABLE_KBD_PORT: u8 = 0xAD;
const CMD_ENABLE_KBD_PORT: u8 = 0xAE;
const CMD_READ_INPORT: u8 = 0xC0;
const CMD_READ_OUTPORT: u8 = 0xD0;
const CMD_WRITE_OUTPORT: u8 = 0xD1;
const CMD_WRITE_KBD_OUTBUF: u8 = 0xD2;
const CMD_WRITE_AUX_OUTBUF: u8 = 0xD3;
const CMD_WRITE_TO_AUX: u8 = 0xD4;
const CMD_PULSE_RESET: u8 = 0xFE;

const CB_ENABLE_KBD_INT: u8 = 0x01;
const CB_ENABLE_AUX_INT: u8 = 0x02;
const CB_SYS_FLAG: u8 = 0x04;
const CB_DISABLE_KBD_PORT: u8 = 0x10;
const CB_DISABLE_AUX_PORT: u8 = 0x20;
/// Keyboard bytes reach the guest translated to scan code set 1.
const CB_TRANSLATE: u8 = 0x40;

const STS_OUTPUT_FULL: u8 = 0x01;
const STS_SYS_FLAG: u8 = 0x04;
const STS_CMD: u8 = 0x08;
const STS_AUX_FULL: u8 = 0x20;

const OUTPORT_KBD_FULL: u8 = 0x10;

// Keyboard device commands (bhyve's PS2KC_*).
const KBD_RESET: u8 = 0xFF;
const KBD_DISABLE: u8 = 0xF5;
const KBD_ENABLE: u8 = 0xF4;
const KBD_SET_TYPEMATIC: u8 = 0xF3;
const KBD_IDENTIFY: u8 = 0xF2;
const KBD_SET_SCANCODE_SET: u8 = 0xF0;
const KBD_ECHO: u8 = 0xEE;
const KBD_SET_LEDS: u8 = 0xED;
const KBD_SELF_TEST_PASSED: u8 = 0xAA;

const RAM_SIZE: usize = 32;
/// bhyve's keyboard output FIFO depth.
const KBD_FIFO_SIZE: usize = 15;

/// Controller registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    pub status: u8,
    pub outport: u8,
    /// Internal RAM; byte 0 is the command byte.
    pub ram: Vec<u8>,
    /// Command waiting for its data byte on port 0x60.
    pub pending_command: Option<u8>,
    /// Controller reply waiting in the output buffer.
    pub reply: Option<u8>,
    /// Bytes queued for the keyboard port (keyboard replies, 0xD2 writes).
    pub kbd_fifo: VecDeque<u8>,
    /// Keyboard command waiting for its data byte (set LEDs, typematic,
    /// scan-code set).
    #[serde(default)]
    pub kbd_command: Option<u8>,
    /// The PS/2 mouse on the auxiliary port, with its output bytes.
    #[serde(default)]
    pub mouse: crate::ps2_mouse::Ps2MouseState,
}

impl Schema for I8042State {
    const KIND: &'static str = "i8042";
    const VERSION: u32 = 1;
}

impl Default for I8042State {
    fn default() -> Self {
        Self {
            status: 0,
            outport: 0,
            ram: vec![0; RAM_SIZE],
            pending_command: None,
            reply: None,
            kbd_fifo: VecDeque::new(),
            kbd_command: None,
            mouse: Default::default(),
        }
    }
}

pub struct I8042 {
    state: I8042State,
    kbd_irq: Arc<dyn InterruptLine>,
    aux_irq: Arc<dyn InterruptLine>,
    exits: Arc<ExitRequests>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042").field("state", &self.state).finish()
    }
}

impl I8042 {
    pub fn new(
        kbd_irq: Arc<dyn InterruptLine>,
        aux_irq: Arc<dyn InterruptLine>,
        exits: Arc<ExitRequests>,
    ) -> Self {
        Self {
            state: I8042State::default(),
            kbd_irq,
            aux_irq,
            exits,
        }
    }

    pub fn state(&self) -> &I8042State {
        &self.state
    }

    /// A key from a remote console (VNC) goes down or up: its scan codes
    /// are queued whole or, when the buffer has no room for all of them,
    /// not at all (a half sequence would leave the guest's decoder astray).
    pub fn key_event(&mut self, key: crate::ps2_keys::Key, down: bool) {
        if self.state.ram[0] & CB_DISABLE_KBD_PORT != 0 {
            return;
        }
        let translated = self.state.ram[0] & CB_TRANSLATE != 0;
        let bytes = crate::ps2_keys::sequence(key, down, translated);
        if self.state.kbd_fifo.len() + bytes.len() > KBD_FIFO_SIZE {
            tracing::debug!("i8042: keyboard buffer full, key dropped");
            return;
        }
        for b in bytes {
            self.queue_kbd(b);
        }
        self.kbd_interrupt();
    }

    /// A pointer event from a remote console (VNC): button mask and
    /// absolute position, sent on as PS/2 mouse movement.
    pub fn pointer_event(&mut self, vnc_buttons: u8, x: u16, y: u16) {
        if self.state.mouse.pointer(vnc_buttons, x, y) && self.state.status & STS_OUTPUT_FULL == 0 {
            self.refresh_output();
        }
    }

    /// Show the next queued byte's source in the status register and raise
    /// its port's interrupt: the keyboard's bytes first, then the mouse's
    /// (whose port must be enabled).
    fn refresh_output(&mut self) {
        let s = &mut self.state;
        if !s.kbd_fifo.is_empty() {
            s.status |= STS_OUTPUT_FULL;
            s.status &= !STS_AUX_FULL;
            if s.ram[0] & CB_DISABLE_KBD_PORT == 0 {
                self.kbd_interrupt();
            }
        } else if s.mouse.has_data() && s.ram[0] & CB_DISABLE_AUX_PORT == 0 {
            s.status |= STS_OUTPUT_FULL | STS_AUX_FULL;
            s.outport &= !OUTPORT_KBD_FULL;
            if s.ram[0] & CB_ENABLE_AUX_INT != 0 {
                self.aux_irq.pulse();
            }
        } else {
            s.status &= !(STS_OUTPUT_FULL | STS_AUX_FULL);
            s.outport &= !OUTPORT_KBD_FULL;
        }
    }

    pub fn restore(&mut self, saved: I8042State) -> Result<(), String> {
        if saved.ram.len() != self.state.ram.len() {
            return Err(format!(
                "{} bytes of controller RAM saved, it has {}",
                saved.ram.len(),
                self.state.ram.len()
            ));
        }
        self.state = saved;
        Ok(())
    }

    fn kbd_interrupt(&self) {
        if self.state.ram[0] & CB_ENABLE_KBD_INT != 0 {
            self.kbd_irq.pulse();
        }
    }

    fn queue_kbd(&mut self, v: u8) {
        if self.state.kbd_fifo.len() < KBD_FIFO_SIZE {
            self.state.kbd_fifo.push_back(v);
            self.state.status |= STS_OUTPUT_FULL;
            self.state.outport |= OUTPORT_KBD_FULL;
        } else {
            tracing::debug!("i8042: keyboard buffer full, byte dropped");
        }
    }

    fn read_data(&mut self) -> u8 {
        let s = &mut self.state;
        s.pending_command = None;
        let aux_ready = s.ram[0] & CB_DISABLE_AUX_PORT == 0;
        // A mouse byte already latched (AUX_FULL) goes before keys queued
        // after it.
        let aux_latched = s.status & STS_AUX_FULL != 0;
        let v = match s.reply.take() {
            Some(r) => r,
            None if aux_latched && s.mouse.has_data() => s.mouse.pop().unwrap_or_default(),
            None => match s.kbd_fifo.pop_front() {
                Some(b) => b,
                None if aux_ready => s.mouse.pop().unwrap_or_default(),
                None => 0,
            },
        };
        self.refresh_output();
        self.state.status &= !STS_CMD;
        v
    }

    fn write_data(&mut self, v: u8) {
        let Some(cmd) = self.state.pending_command.take() else {
            self.write_keyboard(v);
            return;
        };
        let s = &mut self.state;
        match cmd {
            CMD_SET_COMMAND_BYTE => {
                s.ram[0] = v;
                if v & CB_SYS_FLAG != 0 {
                    s.status |= STS_SYS_FLAG;
                } else {
                    s.status &= !STS_SYS_FLAG;
                }
            }
            CMD_WRITE_OUTPORT => s.outport = v,
            CMD_WRITE_KBD_OUTBUF => {
                self.queue_kbd(v);
                self.kbd_interrupt();
            }
            CMD_WRITE_TO_AUX => {
                s.mouse.command(v);
                self.refresh_output();
            }
            CMD_WRITE_AUX_OUTBUF => {
                s.mouse.queue_byte(v);
                self.refresh_output();
            }
            0x61..=0x7F => s.ram[usize::from(cmd - 0x60)] = v,
            _ => {}
        }
        self.state.status &= !STS_CMD;
    }

    /// A byte for the keyboard device, answered as bhyve's ps2kbd does.
    fn write_keyboard(&mut self, v: u8) {
        const ACK: u8 = 0xFA;
        let replies: &[u8] = if let Some(cmd) = self.state.kbd_command.take() {
            tracing::trace!("i8042: keyboard command {cmd:#x} data {v:#x}");
            &[ACK]
        } else {
            match v {
                KBD_RESET => {
                    self.state.kbd_fifo.clear();
                    &[ACK, KBD_SELF_TEST_PASSED]
                }
                KBD_ENABLE => {
                    self.state.kbd_fifo.clear();
                    &[ACK]
                }
                KBD_SET_LEDS | KBD_SET_TYPEMATIC | KBD_SET_SCANCODE_SET => {
                    self.state.kbd_command = Some(v);
                    &[ACK]
                }
                KBD_IDENTIFY => &[ACK, 0xAB, 0x83],
                KBD_ECHO => &[KBD_ECHO],
                0x00 | KBD_DISABLE => &[ACK],
                other => {
                    tracing::debug!("i8042: unhandled keyboard command {other:#x}");
                    &[]
                }
            }
        };
        for &b in replies {
            self.queue_kbd(b);
        }
        if !replies.is_empty() && self.state.ram[0] & CB_DISABLE_KBD_PORT == 0 {
            self.kbd_interrupt();
        }
    }

    fn write_command(&mut self, cmd: u8) {
        let s = &mut self.state;
        s.pending_command = None;
        s.status |= STS_CMD;
        s.reply = None;
        match cmd {
            CMD_GET_COMMAND_BYTE => s.reply = Some(s.ram[0]),
            CMD_TEST_CTRL => s.reply = Some(0x55),
            CMD_TEST_AUX_PORT | CMD_TEST_KBD_PORT | CMD_READ_INPORT => s.reply = Some(0),
            CMD_READ_OUTPORT => s.reply = Some(s.outport),
            CMD_SET_COMMAND_BYTE
            | CMD_WRITE_OUTPORT
            | CMD_WRITE_KBD_OUTBUF
            | CMD_WRITE_AUX_OUTBUF
            | CMD_WRITE_TO_AUX
            | 0x61..=0x7F => s.pending_command = Some(cmd),
            CMD_DISABLE_KBD_PORT => s.ram[0] |= CB_DISABLE_KBD_PORT,
            CMD_ENABLE_KBD_PORT => {
                s.ram[0] &= !CB_DISABLE_KBD_PORT;
                if !s.kbd_fifo.is_empty() {
                    s.status |= STS_OUTPUT_FULL;
                }
            }
            CMD_DISABLE_AUX_PORT => {
                s.ram[0] |= CB_DISABLE_AUX_PORT;
                s.status &= !STS_AUX_FULL;
            }
            CMD_ENABLE_AUX_PORT => {
                s.ram[0] &= !CB_DISABLE_AUX_PORT;
                if s.reply.is_none() {
                    self.refresh_output();
                }
            }
            CMD_PULSE_RESET => self.exits.request(ExitRequest::Reset),
            0x21..=0x3F => s.reply = Some(s.ram[usize::from(cmd - 0x20)]),
            other => tracing::debug!("i8042: unknown controller command {other:#x}"),
        }
        if self.state.reply.is_some() {
            self.state.status |= STS_OUTPUT_FULL;
            self.state.status &= !STS_AUX_FULL;
            self.kbd_interrupt();
        } else if !self.state.kbd_fifo.is_empty() && self.state.ram[0] & CB_DISABLE_KBD_PORT == 0 {
            self.state.status |= STS_OUTPUT_FULL;
            self.kbd_interrupt();
        }
    }
}

/// Offsets from the data port (0x60): 0 = data, 4 = status/command.
pub const DATA_OFFSET: u64 = 0;
pub const COMMAND_OFFSET: u64 = 4;

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            tracing::debug!("i8042: {}-byte read refused", data.len());
            data.fill(0xFF);
            return;
        }
        data[0] = match offset {
            DATA_OFFSET => self.read_data(),
            COMMAND_OFFSET => self.state.status,
            _ => 0xFF,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            tracing::debug!("i8042: {}-byte write refused", data.len());
            return;
        }
        match offset {
            DATA_OFFSET => self.write_data(data[0]),
            COMMAND_OFFSET => self.write_command(data[0]),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::RecordingLine;

    fn kbc() -> (I8042, Arc<RecordingLine>, Arc<ExitRequests>) {
        let irq = Arc::new(RecordingLine::default());
        let exits = Arc::new(ExitRequests::new());
        let aux = Arc::new(RecordingLine::default());
        (I8042::new(irq.clone(), aux, exits.clone()), irq, exits)
    }

    fn cmd(k: &mut I8042, c: u8) {
        k.write(COMMAND_OFFSET, &[c]);
    }
    fn data(k: &mut I8042) -> u8 {
        let mut b = [0u8];
        k.read(DATA_OFFSET, &mut b);
        b[0]
    }
    fn status(k: &mut I8042) -> u8 {
        let mut b = [0u8];
        k.read(COMMAND_OFFSET, &mut b);
        b[0]
    }

    #[test]
    fn self_test_and_command_byte() {
        let (mut k, irq, _) = kbc();
        assert_eq!(status(&mut k), 0);
        cmd(&mut k, CMD_TEST_CTRL);
        assert_eq!(
            status(&mut k) & (STS_OUTPUT_FULL | STS_CMD),
            STS_OUTPUT_FULL | STS_CMD
        );
        assert_eq!(data(&mut k), 0x55);
        assert_eq!(status(&mut k) & STS_OUTPUT_FULL, 0);
        cmd(&mut k, CMD_SET_COMMAND_BYTE);
        k.write(DATA_OFFSET, &[0x45]);
        assert_eq!(status(&mut k) & STS_SYS_FLAG, STS_SYS_FLAG);
        cmd(&mut k, CMD_GET_COMMAND_BYTE);
        assert_eq!(irq.rises(), 1, "reply raises IRQ 1 when enabled");
        assert_eq!(data(&mut k), 0x45);
        cmd(&mut k, CMD_TEST_KBD_PORT);
        assert_eq!(data(&mut k), 0);
        // RAM bytes.
        cmd(&mut k, 0x65);
        k.write(DATA_OFFSET, &[0x99]);
        cmd(&mut k, 0x25);
        assert_eq!(data(&mut k), 0x99);
    }

    #[test]
    fn keyboard_answers_as_bhyves_ps2kbd_and_outbuf_write_echoes() {
        let (mut k, irq, _) = kbc();
        let replies = |k: &mut I8042, bytes: &[u8]| -> Vec<u8> {
            for &b in bytes {
                k.write(DATA_OFFSET, &[b]);
            }
            let mut out = Vec::new();
            while status(k) & STS_OUTPUT_FULL != 0 {
                out.push(data(k));
            }
            out
        };
        // What EDK II's Ps2KeyboardDxe sends: enable, LEDs and their byte.
        assert_eq!(replies(&mut k, &[0xF4]), [0xFA]);
        assert_eq!(replies(&mut k, &[0xED]), [0xFA]);
        assert_eq!(replies(&mut k, &[0x00]), [0xFA], "the LED byte is ACKed");
        assert_eq!(replies(&mut k, &[0xFF]), [0xFA, 0xAA]);
        assert_eq!(replies(&mut k, &[0xF2]), [0xFA, 0xAB, 0x83]);
        assert_eq!(replies(&mut k, &[0xF0, 0x02]), [0xFA, 0xFA]);
        assert_eq!(replies(&mut k, &[0xEE]), [0xEE]);
        assert!(
            replies(&mut k, &[0x42]).is_empty(),
            "unknown commands get nothing"
        );
        assert_eq!(
            irq.rises(),
            0,
            "IRQ 1 only when the command byte enables it"
        );
        cmd(&mut k, CMD_SET_COMMAND_BYTE);
        k.write(DATA_OFFSET, &[CB_ENABLE_KBD_INT]);
        assert_eq!(replies(&mut k, &[0xF5]), [0xFA]);
        assert_eq!(irq.rises(), 1);
        cmd(&mut k, CMD_WRITE_KBD_OUTBUF);
        k.write(DATA_OFFSET, &[0xAB]);
        assert_eq!(status(&mut k) & STS_OUTPUT_FULL, STS_OUTPUT_FULL);
        assert_eq!(data(&mut k), 0xAB);
        assert_eq!(status(&mut k) & STS_OUTPUT_FULL, 0);
    }

    #[test]
    fn remote_keys_arrive_in_the_scan_code_set_the_command_byte_asks_for() {
        use crate::ps2_keys::key_for_keysym;
        let (mut k, irq, _) = kbc();
        let enter = key_for_keysym(0xFF0D).unwrap();
        cmd(&mut k, CMD_SET_COMMAND_BYTE);
        k.write(DATA_OFFSET, &[CB_ENABLE_KBD_INT | CB_TRANSLATE]);
        k.key_event(enter, true);
        k.key_event(enter, false);
        assert_eq!(irq.rises(), 2);
        assert_eq!((data(&mut k), data(&mut k)), (0x1C, 0x9C));
        assert_eq!(status(&mut k) & STS_OUTPUT_FULL, 0);
        cmd(&mut k, CMD_SET_COMMAND_BYTE);
        k.write(DATA_OFFSET, &[CB_ENABLE_KBD_INT]);
        k.key_event(enter, false);
        assert_eq!((data(&mut k), data(&mut k)), (0xF0, 0x5A));
        // A full buffer takes no half sequence.
        for _ in 0..20 {
            k.key_event(enter, false);
        }
        assert_eq!(k.state().kbd_fifo.len(), 14);
        cmd(&mut k, CMD_DISABLE_KBD_PORT);
        k.state.kbd_fifo.clear();
        k.key_event(enter, true);
        assert!(
            k.state().kbd_fifo.is_empty(),
            "a disabled port takes no keys"
        );
    }

    #[test]
    fn the_mouse_answers_through_the_aux_port_and_reports_pointer_moves() {
        let kbd_irq = Arc::new(RecordingLine::default());
        let aux_irq = Arc::new(RecordingLine::default());
        let mut k = I8042::new(
            kbd_irq.clone(),
            aux_irq.clone(),
            Arc::new(ExitRequests::new()),
        );
        cmd(&mut k, CMD_SET_COMMAND_BYTE);
        k.write(
            DATA_OFFSET,
            &[CB_ENABLE_KBD_INT | CB_ENABLE_AUX_INT | CB_TRANSLATE],
        );
        let to_mouse = |k: &mut I8042, v: u8| {
            cmd(k, CMD_WRITE_TO_AUX);
            k.write(DATA_OFFSET, &[v]);
        };
        let read_aux = |k: &mut I8042| -> Vec<u8> {
            let mut out = Vec::new();
            while status(k) & STS_OUTPUT_FULL != 0 {
                assert_eq!(status(k) & STS_AUX_FULL, STS_AUX_FULL);
                out.push(data(k));
            }
            out
        };
        to_mouse(&mut k, 0xFF);
        assert_eq!(read_aux(&mut k), [0xFA, 0xAA, 0x00]);
        assert!(aux_irq.rises() >= 1, "IRQ 12 for the mouse's bytes");
        to_mouse(&mut k, 0xF4);
        assert_eq!(read_aux(&mut k), [0xFA]);
        k.pointer_event(0, 10, 10);
        k.pointer_event(1, 13, 8);
        assert_eq!(read_aux(&mut k), [0x09, 3, 2]);
        // A key pressed while a packet is latched waits for it.
        k.pointer_event(0, 14, 8);
        k.key_event(crate::ps2_keys::key_for_keysym(0xFF0D).unwrap(), true);
        assert_eq!(data(&mut k), 0x08);
        assert_eq!(status(&mut k) & STS_AUX_FULL, 0, "then the key");
        assert_eq!(data(&mut k), 0x1C);
        assert_eq!(read_aux(&mut k), [1, 0]);
        // A disabled aux port holds the mouse's bytes back.
        cmd(&mut k, CMD_DISABLE_AUX_PORT);
        k.pointer_event(0, 20, 8);
        assert_eq!(status(&mut k) & STS_OUTPUT_FULL, 0);
        cmd(&mut k, CMD_ENABLE_AUX_PORT);
        assert_eq!(read_aux(&mut k), [0x08, 6, 0]);
    }

    #[test]
    fn pulse_reset_resets_the_vm() {
        let (mut k, _, exits) = kbc();
        cmd(&mut k, CMD_PULSE_RESET);
        assert_eq!(exits.pending(), Some(ExitRequest::Reset));
    }

    #[test]
    fn state_serializes() {
        let (mut k, _, _) = kbc();
        cmd(&mut k, CMD_DISABLE_KBD_PORT);
        let s = k.state().clone();
        let back: I8042State = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
