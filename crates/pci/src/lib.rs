//! PCI emulation: config space, BARs, INTx routing, MSI/MSI-X, host bridge and LPC bridge.
//!
//! The guest-visible behaviour follows bhyve's `pci_emul.c`, `pci_hostbridge.c`,
//! `amd64/pci_lpc.c`, `amd64/pci_irq.c` and `amd64/ioapic.c`:
//!
//! - every function keeps its registers in a [`PciConfigSpace`] (one serde
//!   struct: header, BARs, capability list, MSI/MSI-X state, INTx level) and
//!   implements the small [`PciFunction`] trait for its own registers;
//! - a [`PciRoot`] holds the functions by bus/slot/function, answers config
//!   mechanism #1 (ports 0xCF8-0xCFF) and ECAM, allocates BARs at start-up
//!   the way bhyve does and keeps each decoded BAR registered on the
//!   platform I/O or MMIO [`rhyve_platform::bus::Bus`];
//! - INTx pins are routed to IOAPIC pins and PIRQ links like bhyve
//!   ([`IntxRouter`]), and the routes are listed for the ACPI `_PRT` and the
//!   MP table ([`PciIntxRoute`]).
//!
//! How the VMM drives it:
//!
//! 1. [`PciRoot::new`] (see [`PciRootConfig::from_tree`]) registers
//!    0xCF8-0xCFF on the I/O bus and ECAM on the MMIO bus; give it the
//!    reset-control device for port 0xCF9 with
//!    [`PciRoot::set_reset_register`] (that port shares the 0xCF8 dword);
//! 2. for every `pci.B.S.F` node: [`create_function`] for the models here,
//!    the owning crate's constructor for the others, then
//!    [`PciRoot::add_function`];
//! 3. [`PciRoot::finalize`] assigns BARs, routes INTx and maps the BARs;
//! 4. [`PciRoot::intx_routes`], [`PciRoot::bus_windows`],
//!    [`PciRoot::lpc_bdf`] and [`IntxRouter::level_triggered_isa_irqs`]
//!    feed the ACPI tables, the MP table and the ELCR.
//!
//! Device models built elsewhere (virtio, storage, network) depend on this
//! crate, implement [`PciFunction`] and are handed to
//! [`PciRoot::add_function`]; this crate knows none of them.
//!
//! No rust-vmm crate covers this: `vm-device` has bus plumbing but no PCI
//! config-space, BAR-allocation or INTx-routing model matching bhyve's
//! guest-visible layout, so the model is written here.

mod config;
mod create;
mod function;
mod hostbridge;
mod intx;
mod lpc;
mod msi;
mod root;
mod snapshot;

pub use config::{
    regs, BarKind, PciBar, PciConfigSpace, PcieDeviceType, MAX_BARS, PCI_CONFIG_SPACE_SIZE,
    PCI_STANDARD_CONFIG_SIZE,
};
pub use create::{create_function, PciContext};
pub use function::{PciFunction, SharedFunction};
pub use hostbridge::{HostBridge, AMD_IDS, NETAPP_IDS};
pub use intx::{IntxRouter, IntxRouterState, PciIntxRoute, PIRQ_COUNT};
pub use lpc::{LpcBridge, LpcIds, LPC_DEVICE, LPC_VENDOR};
pub use msi::{MsiMessage, MsixState, MAX_MSIX_VECTORS};
pub use root::{PciBusWindows, PciRoot, PciRootConfig};
pub use snapshot::PciFunctionState;

use std::fmt;

/// Errors from building the PCI topology. Guest accesses never produce
/// these: bad guest input is logged and ignored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    #[error("pci slot {bdf}: device \"{model}\" is not supported yet")]
    NotSupportedYet { bdf: PciBdf, model: String },
    #[error("pci slot {bdf}: unknown device \"{model}\"")]
    UnknownModel { bdf: PciBdf, model: String },
    #[error("pci slot {0}: missing \"device\" value")]
    MissingDevice(PciBdf),
    #[error("pci slot {bdf}: legacy device \"{model}\", use \"{alias}\" instead")]
    LegacyAlias {
        bdf: PciBdf,
        model: String,
        alias: String,
    },
    #[error("pci slot {0} already occupied!")]
    Occupied(PciBdf),
    #[error("invalid PCI config node \"{0}\" (expected pci.<bus>.<slot>.<func>)")]
    BadNode(String),
    #[error("invalid PCI address {bus}:{slot}:{func}")]
    BadAddress { bus: u32, slot: u32, func: u32 },
    #[error("BAR {index}: {why}")]
    BadBar { index: usize, why: &'static str },
    #[error("no room left in config space for a {len}-byte capability")]
    NoCapabilitySpace { len: usize },
    #[error("{what} must be between {min} and {max}, not {value}")]
    OutOfRange {
        what: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
    #[error("no room left in the {window} window for a {size:#x}-byte BAR of pci slot {bdf}")]
    WindowFull {
        window: &'static str,
        size: u64,
        bdf: PciBdf,
    },
    #[error("Only one LPC bridge is allowed.")]
    SecondLpc,
    #[error("LPC bridge can be present only on bus 0.")]
    LpcNotOnBus0,
    #[error("invalid value \"{value}\" for \"{key}\"")]
    BadValue { key: String, value: String },
    #[error("saved PCI state does not match the device: {0} differ")]
    SnapshotMismatch(&'static str),
    #[error("PCI devices cannot be added after start-up routing")]
    AlreadyFinalized,
    #[error(transparent)]
    Config(#[from] rhyve_config::ConfigError),
    #[error(transparent)]
    Bus(#[from] rhyve_platform::bus::BusError),
}

/// A PCI function address: bus 0-255, slot (device) 0-31, function 0-7.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct PciBdf {
    pub bus: u8,
    pub slot: u8,
    pub func: u8,
}

impl PciBdf {
    pub const MAX_SLOT: u8 = 31;
    pub const MAX_FUNC: u8 = 7;

    pub fn new(bus: u32, slot: u32, func: u32) -> Result<Self, PciError> {
        if bus > 255 || slot > u32::from(Self::MAX_SLOT) || func > u32::from(Self::MAX_FUNC) {
            return Err(PciError::BadAddress { bus, slot, func });
        }
        Ok(Self {
            bus: bus as u8,
            slot: slot as u8,
            func: func as u8,
        })
    }

    /// Parse a config tree node name, `pci.<bus>.<slot>.<func>` in decimal.
    pub fn from_node(node: &str) -> Result<Self, PciError> {
        let bad = || PciError::BadNode(node.to_string());
        let mut parts = node.split('.');
        if parts.next() != Some("pci") {
            return Err(bad());
        }
        let mut num = || -> Result<u32, PciError> {
            let p = parts.next().ok_or_else(bad)?;
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.len() > 3 {
                return Err(bad());
            }
            p.parse().map_err(|_| bad())
        };
        let (bus, slot, func) = (num()?, num()?, num()?);
        if parts.next().is_some() {
            return Err(bad());
        }
        Self::new(bus, slot, func).map_err(|_| bad())
    }

    /// The node name of this function in the config tree.
    pub fn node(&self) -> String {
        format!("pci.{}.{}.{}", self.bus, self.slot, self.func)
    }
}

impl fmt::Display for PciBdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.bus, self.slot, self.func)
    }
}
