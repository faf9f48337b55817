//! Building PCI functions from config tree nodes.
//!
//! The VMM walks `pci.B.S.F` nodes (rhyve-config's `pci_functions`, which
//! already applies bhyve's tree checks) and calls [`create_function`] for
//! each; models implemented elsewhere (virtio in rhyve-virtio, storage and
//! network in rhyve-devices) are built there and handed to
//! [`crate::PciRoot::add_function`] directly. Every other bhyve model is
//! refused by name so an unsupported machine never starts half-built.

use std::sync::{Arc, Mutex};

use rhyve_config::ConfigTree;

use crate::hostbridge::{HostBridge, AMD_IDS, NETAPP_IDS};
use crate::intx::IntxRouter;
use crate::lpc::{LpcBridge, LpcIds};
use crate::{PciBdf, PciError, SharedFunction};

/// What building a function needs from its root ([`crate::PciRoot::context`]).
#[derive(Clone)]
pub struct PciContext {
    pub intx: Arc<IntxRouter>,
}

/// Build the function `model` described by config node `node`
/// (`pci.<bus>.<slot>.<func>`). Handles `hostbridge`, `amd_hostbridge`
/// and `lpc`; other bhyve models get a "not supported yet" error naming
/// the slot, unknown names an "unknown device" error.
pub fn create_function(
    model: &str,
    tree: &ConfigTree,
    node: &str,
    ctx: &PciContext,
) -> Result<SharedFunction, PciError> {
    let bdf = PciBdf::from_node(node)?;
    let function: SharedFunction = match model {
        "hostbridge" => Arc::new(Mutex::new(HostBridge::from_tree(tree, node, NETAPP_IDS)?)),
        "amd_hostbridge" => Arc::new(Mutex::new(HostBridge::from_tree(tree, node, AMD_IDS)?)),
        "lpc" => Arc::new(Mutex::new(LpcBridge::from_tree(
            tree,
            node,
            ctx.intx.clone(),
        )?)),
        _ if rhyve_config::PCI_MODELS.contains(&model) => {
            return Err(PciError::NotSupportedYet {
                bdf,
                model: model.to_string(),
            })
        }
        _ => {
            return Err(PciError::UnknownModel {
                bdf,
                model: model.to_string(),
            })
        }
    };
    Ok(function)
}

/// An integer key in strtol base-0 syntax (the old `vendor`/`devid` keys).
pub(crate) fn plain_integer(tree: &ConfigTree, path: &str) -> Result<Option<u64>, PciError> {
    Ok(tree.get_u64(path)?)
}

/// A register value the way bhyve's `strtol(value, NULL, 16)` reads it:
/// hexadecimal with an optional `0x`. Unlike strtol, junk is an error.
fn parse_hex(value: &str) -> Option<u32> {
    let v = value.trim();
    let digits = v
        .strip_prefix("0x")
        .or_else(|| v.strip_prefix("0X"))
        .unwrap_or(v);
    if digits.is_empty() {
        return None;
    }
    u32::from_str_radix(digits, 16).ok()
}

/// bhyve's `pci_config_read_reg`: `<node>.pcireg.<reg>` (then
/// `<fallback>.pcireg.<reg>`), hexadecimal, or `host` to copy the host's
/// register when `host` can provide it; `default` when unset.
pub(crate) fn pcireg_override(
    tree: &ConfigTree,
    node: &str,
    fallback: Option<&str>,
    reg: &str,
    default: u32,
    host: Option<&dyn Fn() -> Option<u32>>,
) -> Result<u32, PciError> {
    let mut keys = vec![format!("{node}.pcireg.{reg}")];
    if let Some(f) = fallback {
        keys.push(format!("{f}.pcireg.{reg}"));
    }
    for key in keys {
        let Some(value) = tree.get(&key)? else {
            continue;
        };
        let bad = || PciError::BadValue {
            key: key.clone(),
            value: value.clone(),
        };
        if value == "host" {
            return host.and_then(|h| h()).ok_or_else(bad);
        }
        return parse_hex(&value).ok_or_else(bad);
    }
    Ok(default)
}

/// IDs of the host's PCI-ISA bridge (class 06/01), from sysfs.
pub(crate) fn host_isa_bridge() -> Option<LpcIds> {
    let devices = std::fs::read_dir("/sys/bus/pci/devices").ok()?;
    let read = |dir: &std::path::Path, name: &str| -> Option<u32> {
        let s = std::fs::read_to_string(dir.join(name)).ok()?;
        parse_hex(&s)
    };
    for dev in devices.flatten() {
        let dir = dev.path();
        if read(&dir, "class").map(|c| c >> 8) != Some(0x0601) {
            continue;
        }
        return Some(LpcIds {
            vendor: read(&dir, "vendor")? as u16,
            device: read(&dir, "device")? as u16,
            revision: read(&dir, "revision")? as u8,
            subvendor: read(&dir, "subsystem_vendor")? as u16,
            subdevice: read(&dir, "subsystem_device")? as u16,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_registers() {
        assert_eq!(parse_hex("8086"), Some(0x8086));
        assert_eq!(parse_hex("0x1022"), Some(0x1022));
        assert_eq!(parse_hex(" 0X7432\n"), Some(0x7432));
        assert_eq!(parse_hex("0x"), None);
        assert_eq!(parse_hex("zz"), None);
    }
}
