//! Network controllers presented to the guest over PCI.
//!
//! Today this is bhyve's `e1000` (`pci_e82545.c`): an Intel 82545EM
//! gigabit controller on a tap interface, for guests without virtio
//! drivers (the Handbook's fallback NIC for Windows).
//!
//! Why hand-written: no rust-vmm crate emulates an Intel 8254x, and
//! bhyve's guest-visible details (IDs, BARs, EEPROM words, PHY answers)
//! must be reproduced exactly.

pub mod e1000;
pub mod fuzzing;

pub use e1000::{E1000Error, E1000State, FrameBackend, TapFrames, E1000};
pub use vm_memory::GuestMemoryMmap;

/// Guest memory as the device models see it.
pub type GuestMemory = GuestMemoryMmap<()>;
