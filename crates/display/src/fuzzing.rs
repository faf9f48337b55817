//! Entry point shared by the cargo-fuzz target (`fuzz/`) and the bounded
//! smoke run in the test suite: arbitrary bytes as what a VNC client
//! sends, from its version string through security to any number of
//! messages, served against a small frame buffer that changes as the
//! session goes on. A panic, a hang or a runaway allocation is a bug; the
//! server dropping the client is fine.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use rhyve_devices::i8042::I8042;
use rhyve_platform::exit::ExitRequests;
use rhyve_platform::irq::InterruptLine;
use rhyve_platform::window::MemoryWindow;
use vm_memory::MmapRegion;

use crate::fbuf::{Fbuf, FbufOptions, FRAMEBUFFER_SIZE};
use crate::rfb::{serve, Connection};

/// The guest's mode during the session: small, so a run is quick.
const SMALL: (usize, usize) = (64, 48);

struct NoLine;
impl InterruptLine for NoLine {
    fn set_level(&self, _: bool) {}
}

struct NoWindow;
impl MemoryWindow for NoWindow {
    fn place(&mut self, _: Option<u64>) -> std::io::Result<()> {
        Ok(())
    }
}

/// The client's bytes, handed out in pieces of varying size; what the
/// server writes is dropped. Every read also changes a few pixels, so
/// updates have tiles to find.
struct FuzzClient<'a> {
    input: &'a [u8],
    fbuf: &'a mut Fbuf,
    reads: usize,
}

impl Read for FuzzClient<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.reads += 1;
        let piece = 1 + (self.reads * 7) % 61;
        let n = piece.min(buf.len()).min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        let at = (self.reads * 37 * 4) % (SMALL.0 * SMALL.1 * 4);
        rhyve_pci::PciFunction::bar_write(self.fbuf, 1, at as u64, &[self.reads as u8; 4]);
        if self.reads.is_multiple_of(5) {
            // The guest switches between two modes now and then.
            let w = if self.reads.is_multiple_of(10) {
                SMALL.0
            } else {
                SMALL.0 + 32
            } as u16;
            rhyve_pci::PciFunction::bar_write(self.fbuf, 0, 4, &w.to_le_bytes());
        }
        Ok(n)
    }
}

impl Write for FuzzClient<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Connection for FuzzClient<'_> {
    fn poll_reads(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    fn update_due(&self, _: std::time::Duration) -> bool {
        true
    }
}

/// Serve `data` as one client's bytes. The first byte picks whether the
/// server asks for a password.
pub fn client_session(data: &[u8]) {
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    let mut tree = rhyve_config::ConfigTree::new();
    let node = "pci.0.29.0";
    let _ = tree.set(&format!("{node}.w"), "640");
    let _ = tree.set(&format!("{node}.h"), "480");
    if mode & 1 != 0 {
        let _ = tree.set(&format!("{node}.password"), "secret");
    }
    let Ok(options) = FbufOptions::from_tree(&tree, node) else {
        return;
    };
    let Ok(pages) = MmapRegion::new(FRAMEBUFFER_SIZE) else {
        return;
    };
    let Ok((mut fbuf, screen)) = Fbuf::new(&options, Arc::new(pages), Box::new(NoWindow)) else {
        return;
    };
    // The guest sets a small mode, as BhyveRfbDxe's SetMode writes it.
    rhyve_pci::PciFunction::bar_write(&mut fbuf, 0, 4, &(SMALL.0 as u16).to_le_bytes());
    rhyve_pci::PciFunction::bar_write(&mut fbuf, 0, 6, &(SMALL.1 as u16).to_le_bytes());
    let keyboard = Arc::new(Mutex::new(I8042::new(
        Arc::new(NoLine),
        Arc::new(NoLine),
        Arc::new(ExitRequests::new()),
    )));
    let client = FuzzClient {
        input,
        fbuf: &mut fbuf,
        reads: 0,
    };
    let _ = serve(client, &screen, &keyboard, options.password.as_deref());
}
