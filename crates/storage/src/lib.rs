//! Storage controllers presented to the guest over PCI.
//!
//! bhyve's AHCI host bus adapter (`pci_ahci.c`): the `ahci` model with up
//! to 32 SATA ports, each a disk (`hd`) or an ATAPI DVD drive (`cd`) over a
//! [`rhyve_backends::block::BlockFile`]. The legacy `ahci-hd` and `ahci-cd`
//! forms are turned into the same `port.N` keys by rhyve-config, so one
//! constructor serves all three names. And bhyve's NVMe controller
//! (`pci_nvme.c`, [`nvme`]) over the same block back end.
//!
//! Why hand-written: no rust-vmm crate emulates an AHCI HBA, the ATA /
//! ATAPI command sets or an NVMe controller, and bhyve's guest-visible details (IDs, capability
//! bits, IDENTIFY words, serial from the path's MD5) must be reproduced
//! exactly.

pub mod ahci;
mod atapi;
pub mod fuzzing;
mod identify;
pub mod nvme;

pub use ahci::{
    Ahci, AhciError, AhciState, DriveKind, DriveSpec, GuestMemory, PortRegs, PortState,
};
pub use identify::DriveIdentity;
pub use nvme::{Nvme, NvmeError, NvmeOptions};
