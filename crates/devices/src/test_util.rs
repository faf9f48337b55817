//! Fakes of the interrupt plumbing for device tests.

use rhyve_platform::irq::{InterruptController, InterruptLine, MsiSender};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// Records the level and counts rising edges.
#[derive(Debug, Default)]
pub struct RecordingLine {
    level: AtomicBool,
    rises: AtomicU32,
}

impl RecordingLine {
    pub fn level(&self) -> bool {
        self.level.load(Ordering::SeqCst)
    }
    pub fn rises(&self) -> u32 {
        self.rises.load(Ordering::SeqCst)
    }
}

impl InterruptLine for RecordingLine {
    fn set_level(&self, asserted: bool) {
        let was = self.level.swap(asserted, Ordering::SeqCst);
        if asserted && !was {
            self.rises.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[derive(Debug, Default)]
pub struct RecordingMsi {
    pub sent: Mutex<Vec<(u64, u32)>>,
}

impl MsiSender for RecordingMsi {
    fn send(&self, address: u64, data: u32) {
        self.sent.lock().unwrap().push((address, data));
    }
}

/// Hands out one [`RecordingLine`] per GSI.
#[derive(Debug, Default)]
pub struct FakeController {
    lines: Mutex<HashMap<u32, Arc<RecordingLine>>>,
    pub msi: Arc<RecordingMsi>,
}

impl FakeController {
    pub fn get(&self, gsi: u32) -> Arc<RecordingLine> {
        self.lines.lock().unwrap().entry(gsi).or_default().clone()
    }
}

impl InterruptController for FakeController {
    fn line(&self, gsi: u32) -> Arc<dyn InterruptLine> {
        self.get(gsi)
    }
    fn msi(&self) -> Arc<dyn MsiSender> {
        self.msi.clone()
    }
}
