//! The boot ROM's variable store (`-l bootrom,ROM,VARS`): bhyve's
//! `bootrom_var_mem_handler`, a file-backed flash that speaks just enough
//! CFI for EDK II's `QemuFlashFvbServicesRuntimeDxe` to find it writable and
//! keep UEFI variables in it.
//!
//! The flash answers four rules, as bhyve's does:
//! - a write while the last command was WRITE_BYTE (0x10) stores the data
//!   and returns to READ_ARRAY;
//! - any other write is a command (its low byte);
//! - a read after CLEAR_STATUS (0x50) or READ_STATUS (0x70) returns zeros
//!   (status "ready, no error") and returns to READ_ARRAY;
//! - any other read returns the store's bytes.
//!
//! Block erase (0x20, 0xD0) changes nothing, as in bhyve: EDK II rewrites
//! whole blocks after erasing them.
//!
//! The file is the VM's own store: it is never truncated or extended, and
//! each stored write goes to the file at once as a `pwrite` of exactly the
//! bytes written, so a VMM killed at any point leaves every other byte of
//! the store as it was.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rhyve_platform::bus::BusDevice;
use rhyve_platform::snapshot::Schema;
use serde::{Deserialize, Serialize};

const CMD_WRITE_BYTE: u8 = 0x10;
const CMD_CLEAR_STATUS: u8 = 0x50;
const CMD_READ_STATUS: u8 = 0x70;
const CMD_READ_ARRAY: u8 = 0xFF;

/// The variable store: the file, an in-memory copy reads are served from,
/// and the pending CFI command.
pub struct BootVars {
    file: File,
    contents: Vec<u8>,
    command: u8,
    path: String,
}

/// What a snapshot saves of the store: the pending CFI command. The bytes
/// are the VM's own file, written through at once; like a disk image, it
/// is not copied into the snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootVarsState {
    pub command: u8,
}

impl Schema for BootVarsState {
    const KIND: &'static str = "bootvars";
    const VERSION: u32 = 1;
}

impl BootVars {
    pub fn state(&self) -> BootVarsState {
        BootVarsState {
            command: self.command,
        }
    }

    pub fn restore(&mut self, saved: BootVarsState) -> Result<(), String> {
        self.command = saved.command;
        Ok(())
    }

    /// Open `path` for reading and writing and load its contents. The file
    /// must exist: bhyve never creates a variable store.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        let len = file.metadata()?.len();
        let mut contents = vec![0u8; len as usize];
        file.read_exact_at(&mut contents, 0)?;
        Ok(Self::from_parts(file, contents, path.display().to_string()))
    }

    fn from_parts(file: File, contents: Vec<u8>, path: String) -> Self {
        Self {
            file,
            contents,
            command: CMD_READ_ARRAY,
            path,
        }
    }

    /// Bytes of the store (the file's size).
    pub fn len(&self) -> u64 {
        self.contents.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.contents.is_empty()
    }

    fn range(&self, offset: u64, len: usize) -> Option<std::ops::Range<usize>> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len)?;
        (end <= self.contents.len()).then_some(start..end)
    }
}

impl BusDevice for BootVars {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.command {
            CMD_CLEAR_STATUS | CMD_READ_STATUS => {
                data.fill(0);
                self.command = CMD_READ_ARRAY;
            }
            _ => match self.range(offset, data.len()) {
                Some(r) => data.copy_from_slice(&self.contents[r]),
                None => data.fill(0xFF),
            },
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if self.command != CMD_WRITE_BYTE {
            self.command = data.first().copied().unwrap_or(CMD_READ_ARRAY);
            return;
        }
        self.command = CMD_READ_ARRAY;
        let Some(r) = self.range(offset, data.len()) else {
            return;
        };
        self.contents[r].copy_from_slice(data);
        if let Err(e) = self.file.write_all_at(data, offset) {
            tracing::warn!(
                "bootrom variable file {}: write of {} byte(s) at {offset:#x} failed: {e}",
                self.path,
                data.len()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(bytes: &[u8]) -> (BootVars, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "rhyve-bootvars-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, bytes).unwrap();
        (BootVars::open(&path).unwrap(), path)
    }

    fn read(v: &mut BootVars, offset: u64) -> u8 {
        let mut b = [0u8; 1];
        v.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn answers_edk2_flash_probe_as_flash() {
        // QemuFlashDetected: write 0x50 and read back 0, then 0x70 and 0.
        let (mut v, path) = store(&[0xAA; 4096]);
        v.write(0, &[CMD_CLEAR_STATUS]);
        assert_eq!(read(&mut v, 0), 0);
        assert_eq!(read(&mut v, 0), 0xAA, "back to read-array mode");
        v.write(0, &[CMD_READ_STATUS]);
        assert_eq!(read(&mut v, 0), 0);
        assert_eq!(read(&mut v, 0), 0xAA);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn byte_program_reaches_the_file_and_nothing_else_changes() {
        let (mut v, path) = store(&[0xFF; 8192]);
        v.write(0x1234, &[CMD_WRITE_BYTE]);
        v.write(0x1234, &[0x42]);
        v.write(0x1234, &[CMD_READ_ARRAY]);
        assert_eq!(read(&mut v, 0x1234), 0x42);
        // A data write without WRITE_BYTE is only a command.
        v.write(0x10, &[0x99]);
        assert_eq!(read(&mut v, 0x10), 0xFF);
        // Erase is a no-op, as bhyve's.
        v.write(0x1000, &[0x20]);
        v.write(0x1000, &[0xD0]);
        assert_eq!(read(&mut v, 0x1234), 0x42);
        let file = std::fs::read(&path).unwrap();
        assert_eq!(file.len(), 8192, "the file's size never changes");
        assert_eq!(file[0x1234], 0x42);
        assert!(file
            .iter()
            .enumerate()
            .all(|(i, &b)| i == 0x1234 || b == 0xFF));
        drop(v);
        let mut reopened = BootVars::open(&path).unwrap();
        assert_eq!(read(&mut reopened, 0x1234), 0x42, "persists");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn hostile_offsets_touch_nothing() {
        let (mut v, path) = store(&[0x11; 4096]);
        v.write(4095, &[CMD_WRITE_BYTE]);
        v.write(4095, &[1, 2, 3, 4]);
        let mut w = [0u8; 4];
        v.read(4094, &mut w);
        assert_eq!(w, [0xFF; 4]);
        v.read(u64::MAX, &mut w);
        assert_eq!(std::fs::read(&path).unwrap(), vec![0x11; 4096]);
        std::fs::remove_file(path).unwrap();
    }
}
