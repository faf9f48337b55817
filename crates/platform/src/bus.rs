//! Port-I/O and MMIO buses that devices register on, and the vCPU loop reads
//! and writes through.
//!
//! A device sees offsets from the base it was registered at, so the same
//! model works wherever a PCI BAR moves it. Lookups take a read lock only;
//! registration (BAR programming) is rare.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device reachable through port I/O or MMIO.
pub trait BusDevice: Send {
    /// Read `data.len()` bytes at `offset` from the device's base.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Write `data` at `offset` from the device's base.
    fn write(&mut self, offset: u64, data: &[u8]);
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("range {base:#x}+{len:#x} overlaps a device already at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
    #[error("empty or wrapping range {base:#x}+{len:#x}")]
    BadRange { base: u64, len: u64 },
}

struct Entry {
    len: u64,
    device: SharedDevice,
}

/// An address space (I/O ports or guest physical MMIO) mapping ranges to devices.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Map `device` at `[base, base + len)`.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        let mut ranges = self.ranges.write().unwrap();
        if let Some((&other, e)) = ranges.range(..end).next_back() {
            if other + e.len > base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// Unmap whatever starts at `base`; true if something was there.
    pub fn remove(&self, base: u64) -> bool {
        self.ranges.write().unwrap().remove(&base).is_some()
    }

    fn resolve(&self, addr: u64, size: usize) -> Option<(SharedDevice, u64)> {
        let ranges = self.ranges.read().unwrap();
        let (&base, e) = ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        // An access that runs past the end of the device is not the device's.
        if offset.checked_add(size as u64)? > e.len {
            return None;
        }
        Some((e.device.clone(), offset))
    }

    /// True if some device answers at `addr`.
    pub fn contains(&self, addr: u64) -> bool {
        self.resolve(addr, 1).is_some()
    }

    /// Read from the device at `addr`. Returns false (and fills `data` with
    /// all ones, as unassigned bus cycles do) when nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((dev, offset)) => {
                dev.lock().unwrap().read(offset, data);
                true
            }
            None => {
                data.fill(0xFF);
                false
            }
        }
    }

    /// Write to the device at `addr`. Returns false when nothing is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((dev, offset)) => {
                dev.lock().unwrap().write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scratch(Vec<u8>);
    impl BusDevice for Scratch {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.0[o..o + data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.0[o..o + data.len()].copy_from_slice(data);
        }
    }

    #[test]
    fn routes_by_offset_and_reads_ones_when_unassigned() {
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Scratch(vec![0; 8]))), 0x3F8, 8)
            .unwrap();
        assert!(bus.write(0x3FA, &[0x5A]));
        let mut b = [0u8; 1];
        assert!(bus.read(0x3FA, &mut b));
        assert_eq!(b, [0x5A]);
        let mut w = [0u8; 2];
        assert!(!bus.read(0x3FF, &mut w), "straddles the end");
        assert_eq!(w, [0xFF, 0xFF]);
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b, [0xFF]);
    }

    #[test]
    fn refuses_overlaps() {
        let bus = Bus::new();
        let d = || -> SharedDevice { Arc::new(Mutex::new(Scratch(vec![0; 16]))) };
        bus.insert(d(), 0x100, 0x10).unwrap();
        assert!(bus.insert(d(), 0x108, 0x10).is_err());
        assert!(bus.insert(d(), 0xF8, 0x10).is_err());
        assert!(bus.insert(d(), 0x110, 0x10).is_ok());
        assert!(bus.insert(d(), 0x0, 0).is_err());
        assert!(bus.remove(0x100));
        assert!(bus.insert(d(), 0x108, 0x8).is_ok());
    }
}
