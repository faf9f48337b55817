//! Fakes of the interrupt plumbing, and a pseudo-terminal, for device tests.

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

/// A fresh pseudo-terminal in raw mode: its master, and the slave's path
/// (what `lpc.comN.path` names).
pub fn open_pty() -> (std::fs::File, String) {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: pty set-up on an fd we own; ptsname_r writes at most name.len() bytes.
    unsafe {
        let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(fd >= 0, "posix_openpt");
        let master = std::fs::File::from_raw_fd(fd);
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(libc::grantpt(master.as_raw_fd()), 0);
        assert_eq!(libc::unlockpt(master.as_raw_fd()), 0);
        assert_eq!(
            libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()),
            0
        );
        let mut t: libc::termios = std::mem::zeroed();
        assert_eq!(libc::tcgetattr(master.as_raw_fd(), &mut t), 0);
        libc::cfmakeraw(&mut t);
        assert_eq!(libc::tcsetattr(master.as_raw_fd(), libc::TCSANOW, &t), 0);
        let path = std::ffi::CStr::from_ptr(name.as_ptr()).to_string_lossy();
        (master, path.into_owned())
    }
}
