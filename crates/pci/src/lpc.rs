//! The LPC (PCI-to-ISA) bridge function (bhyve's `amd64/pci_lpc.c`).
//!
//! Its PCI side is small: PIIX3 IDs 8086:7000, class 06/01, and the PIRQ
//! route control registers at 0x60-0x63 (PIRQA-D) and 0x68-0x6B (PIRQE-H),
//! which read and write the [`IntxRouter`]'s links so a guest (or the DSDT's
//! `_SRS` methods) can steer PCI interrupts to ISA IRQs as on a PIIX/ICH.
//! The ISA devices behind it (COM ports, boot ROM, fw_cfg, ...) are separate
//! platform devices; creating the bridge reserves the COM ports' IRQs so no
//! PIRQ link lands on them, as bhyve's `lpc_init` does.
//!
//! IDs can be overridden with `pcireg.{vendor,device,revid,subvendor,
//! subdevice}` under the function's node (bhyve's `pci_config_read_reg`),
//! or under `lpc.pcireg`; the value `host` copies the host's ISA bridge.

use std::sync::Arc;

use rhyve_config::ConfigTree;
use rhyve_platform::layout::COM_PORTS;

use crate::config::{regs, PciConfigSpace};
use crate::create::{host_isa_bridge, pcireg_override};
use crate::function::PciFunction;
use crate::intx::IntxRouter;
use crate::PciError;
use rhyve_platform::snapshot::{DeviceState, SnapshotError};

pub const LPC_VENDOR: u16 = 0x8086;
pub const LPC_DEVICE: u16 = 0x7000;
const PIRQ_A_D: u16 = 0x60;
const PIRQ_E_H: u16 = 0x68;

/// Which PIRQ link, if any, a config byte offset controls.
fn pirq_link(offset: u16) -> Option<usize> {
    match offset {
        0x60..=0x63 => Some(usize::from(offset - PIRQ_A_D)),
        0x68..=0x6B => Some(usize::from(offset - PIRQ_E_H) + 4),
        _ => None,
    }
}

/// The PCI-ISA bridge.
pub struct LpcBridge {
    config: PciConfigSpace,
    router: Arc<IntxRouter>,
}

/// IDs the LPC bridge shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LpcIds {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    pub subvendor: u16,
    pub subdevice: u16,
}

impl Default for LpcIds {
    fn default() -> Self {
        Self {
            vendor: LPC_VENDOR,
            device: LPC_DEVICE,
            revision: 0,
            subvendor: 0,
            subdevice: 0,
        }
    }
}

impl LpcBridge {
    /// An LPC bridge whose PIRQ registers are `router`'s links. Reserves
    /// the COM ports' ISA IRQs in the router.
    pub fn new(ids: LpcIds, router: Arc<IntxRouter>) -> Result<Self, PciError> {
        for (_, _, irq) in COM_PORTS {
            router.reserve_isa_irq(irq as u8)?;
        }
        let mut config = PciConfigSpace::new(
            ids.vendor,
            ids.device,
            regs::CLASS_BRIDGE,
            regs::SUBCLASS_BRIDGE_ISA,
            0,
        );
        config.set_revision(ids.revision);
        config.set_subsystem(ids.subvendor, ids.subdevice);
        Ok(Self { config, router })
    }

    /// Build from the function's config node (`pci.0.S.F`), which must be
    /// on bus 0.
    pub fn from_tree(
        tree: &ConfigTree,
        node: &str,
        router: Arc<IntxRouter>,
    ) -> Result<Self, PciError> {
        let bdf = crate::PciBdf::from_node(node)?;
        if bdf.bus != 0 {
            return Err(PciError::LpcNotOnBus0);
        }
        let defaults = LpcIds::default();
        let get = |reg: &str, default: u32, host: fn(&LpcIds) -> u32| {
            pcireg_override(
                tree,
                node,
                Some("lpc"),
                reg,
                default,
                Some(&|| host_isa_bridge().map(|ids| host(&ids))),
            )
        };
        let ids = LpcIds {
            vendor: get("vendor", defaults.vendor.into(), |i| i.vendor.into())? as u16,
            device: get("device", defaults.device.into(), |i| i.device.into())? as u16,
            revision: get("revid", defaults.revision.into(), |i| i.revision.into())? as u8,
            subvendor: get("subvendor", defaults.subvendor.into(), |i| {
                i.subvendor.into()
            })? as u16,
            subdevice: get("subdevice", defaults.subdevice.into(), |i| {
                i.subdevice.into()
            })? as u16,
        };
        Self::new(ids, router)
    }
}

impl PciFunction for LpcBridge {
    fn config(&self) -> &PciConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfigSpace {
        &mut self.config
    }

    fn config_read(&mut self, offset: u16) -> u32 {
        match offset {
            PIRQ_A_D | PIRQ_E_H => {
                let first = pirq_link(offset).unwrap_or(0);
                u32::from_le_bytes(std::array::from_fn(|i| {
                    self.router.pirq_register(first + i)
                }))
            }
            _ => self.config.read_dword(offset),
        }
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        let end = offset + data.len() as u16;
        if end <= PIRQ_A_D || offset >= PIRQ_E_H + 4 {
            return self.config.write(offset, data);
        }
        // The PIRQ registers are bytes: split the access.
        for (i, &b) in data.iter().enumerate() {
            let at = offset + i as u16;
            match pirq_link(at) {
                Some(link) => self.router.set_pirq_register(link, b),
                None => self.config.write(at, &[b]),
            }
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        tracing::debug!(bar, offset, "LPC bridge has no BARs");
        data.fill(0xFF);
    }

    fn bar_write(&mut self, bar: usize, offset: u64, _data: &[u8]) {
        tracing::debug!(bar, offset, "LPC bridge has no BARs");
    }

    /// Nothing beyond the config space: its config space is all its own state (the PIRQ routing is saved with the PCI root).
    fn save_device(&self) -> Result<Option<DeviceState>, SnapshotError> {
        Ok(None)
    }
}
