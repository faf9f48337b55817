//! The host bridge (bhyve's `pci_hostbridge.c`): IDs and a PCIe root-port
//! capability, nothing else.
//!
//! IDs default to NetApp's 1275:1275 (`hostbridge`) or AMD's made-up
//! 1022:7432 (`amd_hostbridge`), overridden by the node's `vendor`/`devid`
//! (strtol base 0, the older keys) or else `pcireg.vendor`/`pcireg.device`
//! (hexadecimal, what `-s 0,amd_hostbridge` stores today).

use rhyve_config::ConfigTree;

use crate::config::{regs, PciConfigSpace, PcieDeviceType};
use crate::create::{pcireg_override, plain_integer};
use crate::function::PciFunction;
use crate::PciError;
use rhyve_platform::snapshot::{DeviceState, SnapshotError};

/// NetApp, bhyve's default host bridge IDs.
pub const NETAPP_IDS: (u16, u16) = (0x1275, 0x1275);
/// AMD vendor with a made-up device ID (`amd_hostbridge`).
pub const AMD_IDS: (u16, u16) = (0x1022, 0x7432);

/// A PCI host bridge function.
pub struct HostBridge {
    config: PciConfigSpace,
}

impl HostBridge {
    pub fn new(vendor: u16, device: u16) -> Result<Self, PciError> {
        let mut config = PciConfigSpace::new(
            vendor,
            device,
            regs::CLASS_BRIDGE,
            regs::SUBCLASS_BRIDGE_HOST,
            0,
        );
        config.add_pcie_capability(PcieDeviceType::RootPort)?;
        Ok(Self { config })
    }

    /// Build from config node `node` with `defaults` as (vendor, device).
    pub fn from_tree(
        tree: &ConfigTree,
        node: &str,
        defaults: (u16, u16),
    ) -> Result<Self, PciError> {
        let id = |old_key: &str, reg: &str, default: u16| -> Result<u16, PciError> {
            match plain_integer(tree, &format!("{node}.{old_key}"))? {
                Some(v) => Ok(v as u16),
                None => {
                    Ok(pcireg_override(tree, node, None, reg, u32::from(default), None)? as u16)
                }
            }
        };
        let vendor = id("vendor", "vendor", defaults.0)?;
        let device = id("devid", "device", defaults.1)?;
        Self::new(vendor, device)
    }
}

impl PciFunction for HostBridge {
    fn config(&self) -> &PciConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfigSpace {
        &mut self.config
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        tracing::debug!(bar, offset, "host bridge has no BARs");
        data.fill(0xFF);
    }

    fn bar_write(&mut self, bar: usize, offset: u64, _data: &[u8]) {
        tracing::debug!(bar, offset, "host bridge has no BARs");
    }

    /// Nothing beyond the config space: its config space is all its state.
    fn save_device(&self) -> Result<Option<DeviceState>, SnapshotError> {
        Ok(None)
    }
}
