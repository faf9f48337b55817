//! POST diagnostic ports: 0x80, where firmware and kernels write progress
//! codes (and Linux's `io_delay` writes to slow down I/O), and 0x84, which
//! bhyve's `amd64/post.c` answers with 0xFF. Writes are discarded; reads
//! return 0xFF. The last code written is kept, which helps debugging.

use rhyve_platform::bus::BusDevice;
use rhyve_platform::snapshot::Schema;
use serde::{Deserialize, Serialize};

/// The port bhyve's post.c claims for reads.
pub const BHYVE_POST_READ_PORT: u16 = 0x84;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostState {
    pub last_code: u8,
}

impl Schema for PostState {
    const KIND: &'static str = "post-port";
    const VERSION: u32 = 1;
}

#[derive(Debug, Default)]
pub struct PostPort {
    state: PostState,
}

impl PostPort {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn state(&self) -> PostState {
        self.state
    }

    pub fn restore(&mut self, saved: PostState) -> Result<(), String> {
        self.state = saved;
        Ok(())
    }
}

impl BusDevice for PostPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xFF);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&code) = data.first() {
            self.state.last_code = code;
            tracing::trace!("POST code {code:#04x}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_reads_ones() {
        let mut p = PostPort::new();
        p.write(0, &[0x42]);
        let mut b = [0u8; 1];
        p.read(0, &mut b);
        assert_eq!(b, [0xFF]);
        assert_eq!(p.state().last_code, 0x42);
    }
}
