//! fbuf's `vga=io` (the default): the legacy VGA I/O ports 0x3C0-0x3DF as
//! bhyve's `vga.c` answers them without VGA memory, for guests that probe
//! VGA through BIOS-style register accesses. The registers hold what the
//! guest writes and read it back: sequencer, CRT controller, graphics
//! controller, attribute controller (index and data share 0x3C0 through
//! a flip-flop that reading input status 1 resets), the DAC palette with
//! its read and write cursors, and the miscellaneous output register.
//! Nothing is rendered (bhyve renders only with `vga=on`). Indices past a
//! group's registers read 0 and drop writes, where bhyve would assert.

use rhyve_platform::bus::BusDevice;
use rhyve_platform::snapshot::Schema;
use serde::{Deserialize, Serialize};

/// First port: the attribute controller's index/data.
pub const VGA_PORT_BASE: u16 = 0x3C0;
pub const VGA_PORT_COUNT: u16 = 0x20;

const ATC_INDEX: u16 = 0x3C0;
const ATC_DATA_READ: u16 = 0x3C1;
const MISC_OUTPUT_WRITE: u16 = 0x3C2;
const INPUT_STATUS_0: u16 = 0x3C2;
const VIDEO_ENABLE: u16 = 0x3C3;
const SEQ_INDEX: u16 = 0x3C4;
const SEQ_DATA: u16 = 0x3C5;
const DAC_MASK: u16 = 0x3C6;
const DAC_READ_INDEX: u16 = 0x3C7;
const DAC_WRITE_INDEX: u16 = 0x3C8;
const DAC_DATA: u16 = 0x3C9;
const FEATURE_CONTROL_READ: u16 = 0x3CA;
const MISC_OUTPUT_READ: u16 = 0x3CC;
const GC_INDEX: u16 = 0x3CE;
const GC_DATA: u16 = 0x3CF;
const CRTC_INDEX: u16 = 0x3D4;
const CRTC_DATA: u16 = 0x3D5;
const INPUT_STATUS_1: u16 = 0x3DA;

/// Input status 1 as bhyve reports it: vertical retrace and display
/// disabled, always (so polling loops end at once).
const STATUS_1_RETRACE: u8 = 0x09;
const ATC_INDEX_MASK: u8 = 0x1F;

/// Its own saved state, as a snapshot carries it.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct VgaPorts {
    seq_index: u8,
    seq: [u8; 5],
    crtc_index: u8,
    crtc: [u8; 0x19],
    gc_index: u8,
    gc: [u8; 9],
    atc_index: u8,
    /// The next write to 0x3C0 is data (else an index).
    atc_data_next: bool,
    atc: [u8; 0x15],
    misc_output: u8,
    dac_read: (u8, u8),
    dac_write: (u8, u8),
    dac: Vec<u8>,
}

impl VgaPorts {
    pub fn new() -> Self {
        Self {
            dac: vec![0; 256 * 3],
            ..Self::default()
        }
    }

    /// Take over a saved state, checked: the DAC holds 256 colours and
    /// its cursors point inside a colour.
    pub fn restore(&mut self, saved: VgaPorts) -> Result<(), String> {
        if saved.dac.len() != 256 * 3 || saved.dac_read.1 > 2 || saved.dac_write.1 > 2 {
            return Err("VGA DAC: bad saved palette or cursor".into());
        }
        *self = saved;
        Ok(())
    }

    fn indexed(regs: &[u8], index: u8) -> u8 {
        regs.get(usize::from(index)).copied().unwrap_or(0)
    }

    fn set_indexed(regs: &mut [u8], index: u8, v: u8) {
        if let Some(r) = regs.get_mut(usize::from(index)) {
            *r = v;
        }
    }

    /// The DAC cursor's byte, then the cursor moves on (three bytes per
    /// colour, wrapping after colour 255).
    fn dac_step(cursor: &mut (u8, u8)) -> usize {
        let at = 3 * usize::from(cursor.0) + usize::from(cursor.1);
        cursor.1 += 1;
        if cursor.1 == 3 {
            cursor.0 = cursor.0.wrapping_add(1);
            cursor.1 = 0;
        }
        at
    }

    fn read_port(&mut self, port: u16) -> u8 {
        match port {
            ATC_INDEX => self.atc_index,
            ATC_DATA_READ => Self::indexed(&self.atc, self.atc_index),
            INPUT_STATUS_0 | VIDEO_ENABLE | FEATURE_CONTROL_READ | DAC_MASK => 0,
            SEQ_INDEX => self.seq_index,
            SEQ_DATA => Self::indexed(&self.seq, self.seq_index),
            DAC_DATA => {
                let at = Self::dac_step(&mut self.dac_read);
                self.dac[at]
            }
            MISC_OUTPUT_READ => self.misc_output,
            GC_INDEX => self.gc_index,
            GC_DATA => Self::indexed(&self.gc, self.gc_index),
            CRTC_INDEX => self.crtc_index,
            CRTC_DATA => Self::indexed(&self.crtc, self.crtc_index),
            INPUT_STATUS_1 => {
                self.atc_data_next = false;
                STATUS_1_RETRACE
            }
            _ => 0xFF,
        }
    }

    fn write_port(&mut self, port: u16, v: u8) {
        match port {
            ATC_INDEX => {
                if self.atc_data_next {
                    // Palette entries keep six bits.
                    let v = if self.atc_index < 16 { v & 0x3F } else { v };
                    Self::set_indexed(&mut self.atc, self.atc_index, v);
                } else {
                    self.atc_index = v & ATC_INDEX_MASK;
                }
                self.atc_data_next = !self.atc_data_next;
            }
            MISC_OUTPUT_WRITE => self.misc_output = v,
            SEQ_INDEX => self.seq_index = v & 0x1F,
            SEQ_DATA => Self::set_indexed(&mut self.seq, self.seq_index, v),
            DAC_READ_INDEX => self.dac_read = (v, 0),
            DAC_WRITE_INDEX => self.dac_write = (v, 0),
            DAC_DATA => {
                let at = Self::dac_step(&mut self.dac_write);
                self.dac[at] = v;
            }
            GC_INDEX => self.gc_index = v,
            GC_DATA => Self::set_indexed(&mut self.gc, self.gc_index, v),
            CRTC_INDEX => self.crtc_index = v,
            CRTC_DATA => Self::set_indexed(&mut self.crtc, self.crtc_index, v),
            // Feature control, the DAC mask, 0x3C1: nothing to keep.
            _ => {}
        }
    }
}

impl BusDevice for VgaPorts {
    /// Byte and word accesses; a word is two byte accesses at consecutive
    /// ports, as bhyve splits them.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let len = data.len();
        for (i, b) in data.iter_mut().enumerate() {
            let port = offset + i as u64;
            *b = if port < u64::from(VGA_PORT_COUNT) && len <= 2 {
                self.read_port(VGA_PORT_BASE + port as u16)
            } else {
                0xFF
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() > 2 {
            return;
        }
        for (i, &b) in data.iter().enumerate() {
            let port = offset + i as u64;
            if port < u64::from(VGA_PORT_COUNT) {
                self.write_port(VGA_PORT_BASE + port as u16, b);
            }
        }
    }
}

impl Schema for VgaPorts {
    const KIND: &'static str = "vga-ports";
    const VERSION: u32 = 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outb(v: &mut VgaPorts, port: u16, b: u8) {
        v.write(u64::from(port - VGA_PORT_BASE), &[b]);
    }
    fn inb(v: &mut VgaPorts, port: u16) -> u8 {
        let mut b = [0];
        v.read(u64::from(port - VGA_PORT_BASE), &mut b);
        b[0]
    }

    #[test]
    fn registers_read_back_what_the_guest_wrote() {
        let mut v = VgaPorts::new();
        // CRTC cursor location, as a BIOS sets it, with a word write.
        v.write(u64::from(CRTC_INDEX - VGA_PORT_BASE), &[0x0E, 0x12]);
        assert_eq!(inb(&mut v, CRTC_INDEX), 0x0E);
        assert_eq!(inb(&mut v, CRTC_DATA), 0x12);
        outb(&mut v, SEQ_INDEX, 4);
        outb(&mut v, SEQ_DATA, 0x06);
        assert_eq!(inb(&mut v, SEQ_DATA), 0x06);
        outb(&mut v, GC_INDEX, 6);
        outb(&mut v, GC_DATA, 0x0E);
        assert_eq!(inb(&mut v, GC_DATA), 0x0E);
        outb(&mut v, MISC_OUTPUT_WRITE, 0x67);
        assert_eq!(inb(&mut v, MISC_OUTPUT_READ), 0x67);
        // The attribute controller's flip-flop: index, data, index ...
        assert_eq!(inb(&mut v, INPUT_STATUS_1), STATUS_1_RETRACE);
        outb(&mut v, ATC_INDEX, 0x10);
        outb(&mut v, ATC_INDEX, 0x0C);
        outb(&mut v, ATC_INDEX, 0x01);
        outb(&mut v, ATC_INDEX, 0xFF);
        outb(&mut v, ATC_INDEX, 0x10);
        assert_eq!(inb(&mut v, ATC_DATA_READ), 0x0C);
        outb(&mut v, ATC_INDEX, 0x01);
        inb(&mut v, INPUT_STATUS_1);
        outb(&mut v, ATC_INDEX, 0x01);
        assert_eq!(
            inb(&mut v, ATC_DATA_READ),
            0x3F,
            "palette entries keep 6 bits"
        );
        // The DAC: three bytes per colour through moving cursors.
        outb(&mut v, DAC_WRITE_INDEX, 255);
        for b in [1, 2, 3, 4] {
            outb(&mut v, DAC_DATA, b);
        }
        outb(&mut v, DAC_READ_INDEX, 255);
        assert_eq!([0, 1, 2, 3].map(|_| inb(&mut v, DAC_DATA)), [1, 2, 3, 4]);
        // Indices past the registers: read 0, writes dropped.
        outb(&mut v, CRTC_INDEX, 0xFF);
        outb(&mut v, CRTC_DATA, 0x55);
        assert_eq!(inb(&mut v, CRTC_DATA), 0);
        let mut dword = [0u8; 4];
        v.read(0, &mut dword);
        assert_eq!(dword, [0xFF; 4]);
    }

    #[test]
    fn state_round_trips_and_bad_cursors_are_refused() {
        let mut v = VgaPorts::new();
        outb(&mut v, SEQ_INDEX, 2);
        outb(&mut v, SEQ_DATA, 0x0F);
        outb(&mut v, DAC_WRITE_INDEX, 7);
        outb(&mut v, DAC_DATA, 0x21);
        let saved: VgaPorts = serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
        let mut w = VgaPorts::new();
        w.restore(saved.clone()).unwrap();
        assert_eq!(w, v);
        outb(&mut w, DAC_READ_INDEX, 7);
        assert_eq!(inb(&mut w, DAC_DATA), 0x21);
        let mut bad = saved.clone();
        bad.dac_write = (255, 5);
        assert!(w.restore(bad).is_err(), "a cursor past the palette");
        let mut bad = saved;
        bad.dac.pop();
        assert!(w.restore(bad).is_err(), "a short palette");
    }
}
