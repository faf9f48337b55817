//! The trait every emulated PCI function implements.
//!
//! Kept small on purpose: a function owns a [`PciConfigSpace`] (which
//! handles everything generic: header, BARs, capabilities, MSI/MSI-X,
//! INTx) and answers accesses to its BARs. It overrides the config
//! read/write hooks only for device-specific registers (bhyve's
//! `pe_cfgread`/`pe_cfgwrite`), e.g. the LPC bridge's PIRQ registers.
//!
//! A function is shared between the config path and the adapters that map
//! its BARs on the I/O and MMIO buses, hence [`SharedFunction`]. The root
//! never holds its own locks while a function runs, and a function must not
//! call back into the root, so there is no lock-order cycle.

use std::sync::{Arc, Mutex};

use rhyve_platform::snapshot::{DeviceState, SnapshotError};

use crate::config::PciConfigSpace;

pub trait PciFunction: Send {
    /// The function's configuration space.
    fn config(&self) -> &PciConfigSpace;
    fn config_mut(&mut self) -> &mut PciConfigSpace;

    /// Guest read of the config dword at `offset` (dword aligned, below
    /// 4096). Override to compute device-specific registers.
    fn config_read(&mut self, offset: u16) -> u32 {
        self.config().read_dword(offset)
    }

    /// Guest write of `data` (1, 2 or 4 bytes, naturally aligned) at
    /// `offset`. Override for device-specific registers and forward the
    /// rest to [`PciConfigSpace::write`].
    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config_mut().write(offset, data)
    }

    /// Guest read of `data.len()` bytes at `offset` inside BAR `bar`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);

    /// Guest write of `data` at `offset` inside BAR `bar`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);

    /// BAR `bar` is now decoded at `base` (`None`: no longer decoded).
    /// For functions that attach host resources to guest addresses (KVM
    /// ioeventfds, directly mapped memory); bhyve's `pe_baraddr`.
    fn bar_moved(&mut self, bar: usize, base: Option<u64>) {
        let _ = (bar, base);
    }

    /// Snapshot: stop touching guest memory and raising interrupts on its
    /// own, with every request in flight finished (nothing lost, nothing
    /// done twice after a restore).
    fn pause(&mut self) {}
    /// After [`PciFunction::pause`]: true once nothing is in flight any
    /// more (asked again, without the function's lock held in between, so
    /// an I/O thread can complete its work).
    fn quiesced(&self) -> bool {
        true
    }
    fn resume(&mut self) {}

    /// The function's state beyond its config space; `None` when the
    /// config space is all of it. A model that does not say refuses the
    /// snapshot, naming itself, rather than lose its state.
    fn save_device(&self) -> Result<Option<DeviceState>, SnapshotError> {
        Err(SnapshotError::Unsupported {
            id: String::new(),
            kind: "PCI function".into(),
            why: "its device model does not save its state yet".into(),
        })
    }

    /// Take over what [`PciFunction::save_device`] saved from this same
    /// function (config space already restored).
    fn restore_device(&mut self, saved: Option<&DeviceState>) -> Result<(), SnapshotError> {
        match saved {
            None => Ok(()),
            Some(s) => Err(SnapshotError::Mismatch(format!(
                "device {}: the snapshot has {} state for a function that keeps none",
                s.id, s.kind
            ))),
        }
    }
}

/// A function as the root and its BAR adapters share it.
pub type SharedFunction = Arc<Mutex<dyn PciFunction>>;
