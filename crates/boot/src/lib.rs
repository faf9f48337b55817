//! Guest boot: Linux boot protocol and PVH, ACPI, MPTable and SMBIOS tables.
//!
//! Everything here writes into guest memory before the first vCPU runs and
//! hands back plain data (table bytes, the vCPU entry state) that the
//! hypervisor layer only applies. The firmware tables reproduce what bhyve
//! puts in the BIOS segment (`acpi.c`, `mptbl.c`, `smbiostbl.c`) at the same
//! addresses ([`rhyve_platform::layout`]); the Linux loader goes beyond bhyve
//! (which needs a boot ROM or bhyveload) and boots a bzImage or a PVH ELF
//! directly.

pub mod acpi;
mod aml;
mod dsdt;
pub mod linux;
pub mod mptable;
pub mod smbios;

use std::path::PathBuf;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub use acpi::{
    build_acpi_tables, write_acpi_tables, AcpiPlatform, AcpiTable, PciIntxRoute, PciWindows,
};
pub use linux::{
    load_linux, BootEntry, X86BootRegs, BOOT_CODE_SELECTOR, BOOT_DATA_SELECTOR, BOOT_TSS_SELECTOR,
};
pub use mptable::{build_mptable, write_mptable};
pub use smbios::{build_smbios, write_smbios, CpuTopology};

/// Why guest firmware tables or a kernel could not be put in place.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot write {what} to guest memory at {addr:#x} ({len} bytes)")]
    GuestMemory {
        what: &'static str,
        addr: u64,
        len: usize,
    },
    #[error("{what} is {size} bytes and does not fit between {base:#x} and {limit:#x}")]
    TableTooLarge {
        what: &'static str,
        size: u64,
        base: u64,
        limit: u64,
    },
    #[error("invalid platform description: {0}")]
    InvalidPlatform(String),
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {0}")]
    KernelFile(rhyve_config::file::FileError),
    #[error("initrd {0}")]
    InitrdFile(rhyve_config::file::FileError),
    #[error("kernel {}: {source}", path.display())]
    KernelLoad {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("kernel {}: {why}", path.display())]
    UnsupportedKernel { path: PathBuf, why: String },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error(
        "initrd {} ({size} bytes) does not fit in guest RAM between {low:#x} and {high:#x}",
        path.display()
    )]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        low: u64,
        high: u64,
    },
    #[error(
        "guest memory is too small for kernel {}: it needs {} MiB of RAM below 4 GiB (up to {need:#x}), the VM has {} MiB there (-m)",
        path.display(), need.div_ceil(1 << 20), have >> 20
    )]
    MemoryTooSmall { path: PathBuf, have: u64, need: u64 },
    #[error(transparent)]
    Config(#[from] rhyve_config::ConfigError),
    #[error("invalid uuid \"{0}\"")]
    BadUuid(String),
    #[error("cannot read the host name: {0}")]
    Hostname(std::io::Error),
}

/// Copy `bytes` to guest physical `addr`, naming `what` in the error.
pub(crate) fn write_guest(
    mem: &GuestMemoryMmap,
    addr: u64,
    bytes: &[u8],
    what: &'static str,
) -> Result<(), BootError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|_| BootError::GuestMemory {
            what,
            addr,
            len: bytes.len(),
        })
}

/// The 8-bit checksum byte that makes `bytes` (with the checksum byte
/// counted as 0) sum to zero: the rule shared by ACPI, MP and SMBIOS.
pub(crate) fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}
