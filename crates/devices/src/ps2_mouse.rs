//! The PS/2 mouse behind the i8042's auxiliary port, as bhyve's
//! `ps2mouse.c` answers: reset (ACK, 0xAA, ID 0), identify, status,
//! sample rate, resolution, scaling, stream and remote mode, enable and
//! disable reporting; every command is ACKed. Pointer events from a remote
//! console (VNC's absolute positions) become standard 3-byte movement
//! packets relative to the last position, while reporting is enabled.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

const ACK: u8 = 0xFA;
const SELF_TEST_PASSED: u8 = 0xAA;
const DEVICE_ID: u8 = 0x00;
/// bhyve's `PS2MOUSE_FIFOSZ`.
const FIFO_SIZE: usize = 16;

const RESET: u8 = 0xFF;
const RESEND: u8 = 0xFE;
const SET_DEFAULTS: u8 = 0xF6;
const DISABLE: u8 = 0xF5;
const ENABLE: u8 = 0xF4;
const SET_SAMPLE_RATE: u8 = 0xF3;
const GET_ID: u8 = 0xF2;
const SET_REMOTE_MODE: u8 = 0xF0;
const SET_WRAP_MODE: u8 = 0xEE;
const RESET_WRAP_MODE: u8 = 0xEC;
const READ_DATA: u8 = 0xEB;
const SET_STREAM_MODE: u8 = 0xEA;
const STATUS_REQUEST: u8 = 0xE9;
const SET_RESOLUTION: u8 = 0xE8;
const SET_SCALING_2: u8 = 0xE7;
const SET_SCALING_1: u8 = 0xE6;

/// Packet byte 0: bit 3 always set; sign bits of the X and Y movement.
const PACKET_ALWAYS: u8 = 0x08;
const PACKET_X_NEGATIVE: u8 = 0x10;
const PACKET_Y_NEGATIVE: u8 = 0x20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ps2MouseState {
    pub fifo: VecDeque<u8>,
    /// A command waiting for its data byte (sample rate, resolution).
    pub pending_command: Option<u8>,
    pub reporting: bool,
    pub remote_mode: bool,
    pub scaling_2_to_1: bool,
    pub sample_rate: u8,
    pub resolution: u8,
    /// Buttons as PS/2 numbers them: bit 0 left, 1 right, 2 middle.
    pub buttons: u8,
    /// The last absolute position the console reported.
    pub position: Option<(u16, u16)>,
    /// Movement not yet sent (remote mode, or a full buffer).
    pub delta: (i32, i32),
}

impl Default for Ps2MouseState {
    fn default() -> Self {
        Self {
            fifo: VecDeque::new(),
            pending_command: None,
            reporting: false,
            remote_mode: false,
            scaling_2_to_1: false,
            sample_rate: 100,
            resolution: 2,
            buttons: 0,
            position: None,
            delta: (0, 0),
        }
    }
}

impl Ps2MouseState {
    fn queue(&mut self, bytes: &[u8]) -> bool {
        if self.fifo.len() + bytes.len() > FIFO_SIZE {
            tracing::debug!("ps2 mouse: buffer full, {} bytes dropped", bytes.len());
            return false;
        }
        self.fifo.extend(bytes);
        true
    }

    /// A byte the controller queued as if the mouse sent it (0xD3).
    pub fn queue_byte(&mut self, v: u8) {
        self.queue(&[v]);
    }

    pub fn pop(&mut self) -> Option<u8> {
        self.fifo.pop_front()
    }

    pub fn has_data(&self) -> bool {
        !self.fifo.is_empty()
    }

    fn reset_settings(&mut self) {
        let fifo = std::mem::take(&mut self.fifo);
        let position = self.position;
        *self = Self {
            fifo,
            position,
            ..Self::default()
        };
    }

    /// A byte the guest wrote to the mouse (controller command 0xD4).
    pub fn command(&mut self, v: u8) {
        if let Some(cmd) = self.pending_command.take() {
            match cmd {
                SET_SAMPLE_RATE => self.sample_rate = v,
                SET_RESOLUTION => self.resolution = v.min(3),
                _ => {}
            }
            self.queue(&[ACK]);
            return;
        }
        match v {
            RESET => {
                self.fifo.clear();
                self.reset_settings();
                self.queue(&[ACK, SELF_TEST_PASSED, DEVICE_ID]);
            }
            SET_DEFAULTS => {
                self.reset_settings();
                self.queue(&[ACK]);
            }
            DISABLE => {
                self.reporting = false;
                self.queue(&[ACK]);
            }
            ENABLE => {
                self.reporting = true;
                self.delta = (0, 0);
                self.queue(&[ACK]);
            }
            SET_SAMPLE_RATE | SET_RESOLUTION => {
                self.pending_command = Some(v);
                self.queue(&[ACK]);
            }
            GET_ID => {
                self.queue(&[ACK, DEVICE_ID]);
            }
            SET_REMOTE_MODE => {
                self.remote_mode = true;
                self.queue(&[ACK]);
            }
            SET_STREAM_MODE => {
                self.remote_mode = false;
                self.queue(&[ACK]);
            }
            READ_DATA => {
                if self.queue(&[ACK]) {
                    self.send_packet();
                }
            }
            STATUS_REQUEST => {
                let status = u8::from(self.remote_mode) << 6
                    | u8::from(self.reporting) << 5
                    | u8::from(self.scaling_2_to_1) << 4
                    | (self.buttons & 1) << 2
                    | (self.buttons & 4) >> 1
                    | (self.buttons & 2) >> 1;
                self.queue(&[ACK, status, self.resolution, self.sample_rate]);
            }
            SET_SCALING_1 | SET_SCALING_2 => {
                self.scaling_2_to_1 = v == SET_SCALING_2;
                self.queue(&[ACK]);
            }
            SET_WRAP_MODE | RESET_WRAP_MODE | RESEND => {
                self.queue(&[ACK]);
            }
            other => {
                tracing::debug!("ps2 mouse: unhandled command {other:#x}");
                self.queue(&[ACK]);
            }
        }
    }

    /// One movement packet with what is left of `delta` (at most 255 each
    /// way per packet; the rest waits for the next).
    fn send_packet(&mut self) -> bool {
        let dx = self.delta.0.clamp(-256, 255);
        let dy = self.delta.1.clamp(-256, 255);
        let mut b0 = PACKET_ALWAYS | (self.buttons & 7);
        if dx < 0 {
            b0 |= PACKET_X_NEGATIVE;
        }
        if dy < 0 {
            b0 |= PACKET_Y_NEGATIVE;
        }
        if !self.queue(&[b0, dx as u8, dy as u8]) {
            return false;
        }
        self.delta.0 -= dx;
        self.delta.1 -= dy;
        true
    }

    /// A pointer event from the console: VNC's button mask (bit 0 left,
    /// 1 middle, 2 right) at an absolute position. True if a packet was
    /// queued.
    pub fn pointer(&mut self, vnc_buttons: u8, x: u16, y: u16) -> bool {
        let buttons = (vnc_buttons & 1) | (vnc_buttons & 2) << 1 | (vnc_buttons & 4) >> 1;
        if let Some((ox, oy)) = self.position {
            // PS/2's Y grows upwards, the screen's downwards.
            self.delta.0 += i32::from(x) - i32::from(ox);
            self.delta.1 -= i32::from(y) - i32::from(oy);
        }
        self.position = Some((x, y));
        let changed = buttons != self.buttons || self.delta != (0, 0);
        self.buttons = buttons;
        if !self.reporting || self.remote_mode || !changed {
            return false;
        }
        let mut sent = false;
        loop {
            if !self.send_packet() {
                return sent;
            }
            sent = true;
            if self.delta == (0, 0) {
                return true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(m: &mut Ps2MouseState) -> Vec<u8> {
        std::iter::from_fn(|| m.pop()).collect()
    }

    #[test]
    fn commands_get_bhyves_answers() {
        let mut m = Ps2MouseState::default();
        m.command(RESET);
        assert_eq!(drain(&mut m), [ACK, 0xAA, 0x00]);
        m.command(GET_ID);
        assert_eq!(drain(&mut m), [ACK, 0x00]);
        m.command(SET_SAMPLE_RATE);
        m.command(40);
        m.command(SET_RESOLUTION);
        m.command(3);
        m.command(STATUS_REQUEST);
        assert_eq!(drain(&mut m), [ACK, ACK, ACK, ACK, ACK, 0, 3, 40]);
        m.command(ENABLE);
        m.command(STATUS_REQUEST);
        assert_eq!(drain(&mut m), [ACK, ACK, 0x20, 3, 40]);
    }

    #[test]
    fn pointer_events_become_relative_packets_while_reporting() {
        let mut m = Ps2MouseState::default();
        assert!(
            !m.pointer(0, 100, 100),
            "no packet before reporting is enabled"
        );
        m.command(ENABLE);
        drain(&mut m);
        assert!(m.pointer(0, 110, 90));
        assert_eq!(drain(&mut m), [0x08, 10, 10], "right and up");
        assert!(m.pointer(1, 105, 95), "left button down, left and down");
        assert_eq!(
            drain(&mut m),
            [0x08 | 0x10 | 0x20 | 1, (-5i8) as u8, (-5i8) as u8]
        );
        assert!(!m.pointer(1, 105, 95), "nothing changed");
        assert!(m.pointer(4, 105, 95), "VNC's right button is PS/2's bit 1");
        assert_eq!(drain(&mut m), [0x08 | 2, 0, 0]);
        // A long move goes out as several packets, as many as fit.
        assert!(m.pointer(0, 105 + 600, 95));
        assert_eq!(drain(&mut m), [0x08, 255, 0, 0x08, 255, 0, 0x08, 90, 0]);
        assert!(m.pointer(0, 0, 95));
        assert_eq!(
            drain(&mut m),
            [0x18, 0, 0, 0x18, 0, 0, 0x18, (-193i16) as u8, 0]
        );
        assert!(m.pointer(0, 2000, 95));
        assert_eq!(drain(&mut m).len(), 15, "five packets fit in the buffer");
        assert_eq!(m.delta, (2000 - 5 * 255, 0), "the rest waits");
    }
}
