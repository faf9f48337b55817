//! Entry point shared by the cargo-fuzz target (`fuzz/`) and the bounded
//! smoke run in the test suite: arbitrary bytes as what a guest leaves in
//! memory for the e1000 (transmit and receive rings, buffers) plus a few
//! register writes, then the rings run with frames waiting in a fake back
//! end. A panic, a pass that does not return, or an access outside guest
//! memory is a bug; dropped packets are fine.
//!
//! Input layout: bytes 0..2 TDLEN/128, 2..4 TDT, 4..6 RDLEN/128, 6..8 RDT,
//! 8..12 RCTL, 12 a count of register writes (mod 8), each 6 bytes
//! (register offset, value), that follow; the rest, repeated, fills guest
//! memory and gives the received frames. The transmit ring is at 0, the
//! receive ring at [`RX_RING`].

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::RawFd;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};

use crate::e1000::{rctl, reg, FrameBackend, E1000, TCTL_EN};
use crate::GuestMemory;

/// Guest memory size for fuzz inputs.
pub const MEM_SIZE: usize = 64 * 1024;
/// Where the receive ring starts.
pub const RX_RING: u64 = 0x4000;

/// A back end in memory: frames to receive, and what was sent.
#[derive(Default, Clone)]
pub struct FakeFrames {
    pub incoming: Arc<Mutex<VecDeque<Vec<u8>>>>,
    pub sent: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl FrameBackend for FakeFrames {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.sent.lock().unwrap().push(frame.to_vec());
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let Some(f) = self.incoming.lock().unwrap().pop_front() else {
            return Ok(None);
        };
        let n = f.len().min(buf.len());
        buf[..n].copy_from_slice(&f[..n]);
        Ok(Some(n))
    }

    fn readable_fd(&self) -> Option<RawFd> {
        None
    }
}

fn u16_at(d: &[u8], at: usize) -> u32 {
    u32::from(u16::from_le_bytes([d[at], d[at + 1]]))
}

/// Run the input's rings (see the module comment).
pub fn e1000(data: &[u8]) {
    if data.len() < 13 {
        return;
    }
    let writes = usize::from(data[12] % 8);
    let ops_end = (13 + writes * 6).min(data.len());
    let ops: Vec<(u32, u32)> = data[13..ops_end]
        .chunks_exact(6)
        .map(|c| {
            let off = u32::from(u16::from_le_bytes([c[0], c[1]])) << 2 & 0x1_FFFC;
            (off, u32::from_le_bytes([c[2], c[3], c[4], c[5]]))
        })
        .collect();
    let Ok(mem) = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let rest = &data[ops_end..];
    if !rest.is_empty() {
        let image: Vec<u8> = rest.iter().copied().cycle().take(MEM_SIZE).collect();
        if mem.write_slice(&image, GuestAddress(0)).is_err() {
            return;
        }
    }
    let backend = FakeFrames::default();
    {
        let mut incoming = backend.incoming.lock().unwrap();
        for (i, chunk) in rest.chunks(1 + rest.len() / 4).take(4).enumerate() {
            // Some frames longer than one buffer.
            let len = chunk.len() * (1 + i);
            incoming.push_back(chunk.iter().copied().cycle().take(len).collect());
        }
    }
    let Ok(mut e) = E1000::new([0x00, 0xa0, 0x98, 1, 2, 3], Box::new(backend), mem) else {
        return;
    };
    e.write_register(reg::TDBAL, 0);
    e.write_register(reg::TDLEN, u16_at(data, 0) * 128);
    e.write_register(reg::RDBAL, RX_RING as u32);
    e.write_register(reg::RDLEN, u16_at(data, 4) * 128);
    e.write_register(reg::IMS, u32::MAX);
    e.write_register(reg::TCTL, TCTL_EN);
    e.write_register(
        reg::RCTL,
        u32::from_le_bytes([data[8], data[9], data[10], data[11]]) | rctl::EN,
    );
    e.write_register(reg::TDT, u16_at(data, 2));
    e.write_register(reg::RDT, u16_at(data, 6));
    for (off, value) in ops {
        e.write_register(off, value);
        e.service();
    }
    // Twice: the second pass sees what the first left (heads, pending frame).
    e.service();
    e.service();
    for off in (0..0x6000).step_by(4) {
        e.read_register(off);
    }
}
