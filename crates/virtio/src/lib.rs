//! virtio devices, written once and served over two transports: virtio-pci
//! inside rhyve (bhyve's legacy 0.9.5 interface) and vhost-user for other
//! VMMs (`rhyve-vhost-user`).
//!
//! A device is a [`VirtioDevice`]: it offers features and a config space and
//! processes one queue at a time when told to. It never owns the queues or
//! the interrupt: the transport does (the PCI transport's worker thread, or
//! vhost-user-backend's vring threads), which is what lets one implementation
//! serve both. Devices that also wait on the host (tap, sockets) expose one
//! pollable fd; when it fires the transport asks which queues to process.
//! Queues are `virtio-queue`'s, walked with its bounds-checked
//! `Reader`/`Writer`, so a hostile driver's chains (loops, out-of-memory
//! addresses, overflowing lengths, oversize queues) end as errors, never as
//! accesses outside guest memory.

pub mod block;
pub mod console;
pub mod fuzzing;
pub mod net;
pub mod pci;
pub mod queue;
pub mod rng;
pub mod vhost_user;

use std::os::unix::io::RawFd;

use rhyve_config::ConfigTree;
use rhyve_platform::snapshot::{DeviceState, SnapshotError};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// Guest memory as every transport hands it to devices.
pub type GuestMemory = GuestMemoryMmap<()>;

/// PCI vendor of every virtio function.
pub const VIRTIO_VENDOR: u16 = 0x1AF4;

/// virtio device types (subsystem device IDs) and bhyve's legacy PCI IDs.
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_CONSOLE: u32 = 3;
pub const TYPE_RNG: u32 = 4;

/// bhyve's legacy PCI device ID for a virtio device type (virtio.h).
pub fn legacy_pci_device_id(device_type: u32) -> Option<u16> {
    match device_type {
        TYPE_NET => Some(0x1000),
        TYPE_BLOCK => Some(0x1001),
        TYPE_CONSOLE => Some(0x1003),
        TYPE_RNG => Some(0x1005),
        _ => None,
    }
}

/// Feature bits shared by all devices.
pub const F_NOTIFY_ON_EMPTY: u64 = 1 << 24;
pub const F_RING_INDIRECT_DESC: u64 = 1 << 28;
pub const F_RING_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;

/// Why a device stopped working: the transport sets DEVICE_NEEDS_RESET and logs it.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("virtqueue {queue}: {source}")]
    Queue {
        queue: usize,
        source: virtio_queue::Error,
    },
    #[error("no such queue {0}")]
    NoQueue(usize),
    #[error("host backend failed: {0}")]
    Backend(std::io::Error),
}

/// Building a device from its config node failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigureError {
    #[error(transparent)]
    Config(#[from] rhyve_config::ConfigError),
    #[error(transparent)]
    Block(#[from] rhyve_backends::block::BlockError),
    #[error(transparent)]
    Tap(#[from] rhyve_backends::tap::TapError),
    #[error("{node}: {why}")]
    Invalid { node: String, why: String },
    #[error("{node}: device \"{device}\" is not a virtio device rhyve supports")]
    Unsupported { node: String, device: String },
}

/// A virtio device model, independent of the transport.
pub trait VirtioDevice: Send {
    /// virtio device type ([`TYPE_BLOCK`], ...).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Features offered to the driver.
    fn features(&self) -> u64;
    /// The driver accepted `features` (already masked by [`Self::features`]).
    fn ack_features(&mut self, features: u64);
    /// Bytes of device-specific config space.
    fn config_size(&self) -> usize;
    /// Read from the device-specific config space; bytes past its end read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write to the device-specific config space; read-only fields ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// A host fd the transport polls (readable) on the device's behalf.
    fn host_fd(&self) -> Option<RawFd> {
        None
    }
    /// The host fd fired: returns the queues to process now.
    fn host_event(&mut self) -> Vec<usize> {
        Vec::new()
    }
    /// Process queue `index` (the driver notified it, or a host event asked
    /// for it). Returns true when the driver should be interrupted.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError>;
    /// Back to the state after construction (driver wrote status 0).
    fn reset(&mut self);
    /// Snapshot pause: finish every request in flight into the used ring
    /// of `queues`; returns the queues whose driver should be interrupted.
    fn drain(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemory,
    ) -> Result<Vec<usize>, DeviceError> {
        let _ = (queues, mem);
        Ok(Vec::new())
    }
    /// The device's typed state, for a snapshot.
    fn save_state(&self) -> Result<DeviceState, SnapshotError>;
    /// Take over a state saved from this same device; what this process's
    /// configuration decides (disk size, MAC, ports) must match.
    fn restore_state(&mut self, saved: &DeviceState) -> Result<(), SnapshotError>;
}

/// Refuse a saved device state whose configured part differs from ours.
pub(crate) fn same_config<T: PartialEq + std::fmt::Debug>(
    device: &str,
    what: &str,
    saved: &T,
    here: &T,
) -> Result<(), SnapshotError> {
    if saved == here {
        return Ok(());
    }
    Err(SnapshotError::Mismatch(format!(
        "{device}: the snapshot's {what} is {saved:?}, this command line gives {here:?}"
    )))
}

/// Copy `src` (a config struct's bytes) into `data` at `offset`, zero past the end.
pub(crate) fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(off) = usize::try_from(offset) else {
        return;
    };
    if off < src.len() {
        let n = data.len().min(src.len() - off);
        data[..n].copy_from_slice(&src[off..off + n]);
    }
}

/// Build the device the config node `node` describes (`device` key:
/// `virtio-blk`, `virtio-net`, `virtio-rnd`, `virtio-console`). `vm_name`,
/// `slot` and `function` feed virtio-net's derived MAC, as in bhyve.
pub fn device_from_config(
    tree: &ConfigTree,
    node: &str,
    vm_name: &str,
    slot: u8,
    function: u8,
) -> Result<Box<dyn VirtioDevice>, ConfigureError> {
    let device = tree.get(&format!("{node}.device"))?.unwrap_or_default();
    Ok(match device.as_str() {
        "virtio-blk" => Box::new(block::Block::from_config(tree, node)?),
        "virtio-net" => Box::new(net::Net::from_config(tree, node, vm_name, slot, function)?),
        "virtio-rnd" => Box::new(rng::Rng::new()),
        "virtio-console" => Box::new(console::Console::from_config(tree, node)?),
        _ => {
            return Err(ConfigureError::Unsupported {
                node: node.to_string(),
                device,
            })
        }
    })
}
