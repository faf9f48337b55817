//! virtio over PCI as bhyve presents it (`virtio.c`): the legacy 0.9.5
//! interface in I/O BAR 0, the MSI-X table in memory BAR 1 (or one plain
//! MSI message with `-W`, `virtio_msix=false`), and INTx through the LPC's
//! PIRQ links for drivers that use neither. A device node with
//! `transport=modern` presents the virtio 1.x interface instead (device ID
//! 0x1040 + type, revision 1, vendor capabilities into memory BAR 2): never
//! both at once, since firmware mishandles transitional devices.
//!
//! The data path never runs on a vCPU thread: each queue's notify register
//! is an eventfd (a KVM ioeventfd once the VMM's [`GuestNotifiers`] has
//! bound it to BAR 0 + 0x10 with the queue number as datamatch; until then
//! a notify write through the bus signals the same eventfd), and a worker
//! thread per device waits on those eventfds and the device's host fd,
//! processes the queue and raises the interrupt itself (MSI-X/MSI through
//! the config space's [`rhyve_platform::irq::MsiSender`], or, for an
//! enabled and unmasked MSI-X vector, by signalling that vector's irqfd,
//! bound to its MSI route through [`GuestNotifiers::add_msi`], without
//! taking any lock). Masking a vector unbinds its irqfd, so the config
//! space's pending-bit logic sees every interrupt raised while masked.
//!
//! Locking: the function lock (held by the bus around every register
//! access) is always taken before the queue lock, and the worker never
//! holds the queue lock while it takes the function lock to interrupt. A
//! reset bumps a generation number instead of joining the worker, so a
//! vCPU never waits for I/O.

use rhyve_sandbox::ThreadRole;
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};

use rhyve_config::ConfigTree;
use rhyve_pci::{BarKind, PciConfigSpace, PciError, PciFunction};
use rhyve_platform::notify::{GuestNotifiers, IoAddress, MsiRoute};
use rhyve_platform::snapshot::{DeviceState, Schema, SnapshotError};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{
    device_from_config, legacy_pci_device_id, ConfigureError, GuestMemory, VirtioDevice,
    F_RING_EVENT_IDX, TYPE_BLOCK, TYPE_CONSOLE, TYPE_NET, TYPE_RNG, VIRTIO_VENDOR,
};

/// Legacy register offsets in BAR 0.
pub mod regs {
    pub const HOST_FEATURES: u64 = 0x00;
    pub const GUEST_FEATURES: u64 = 0x04;
    pub const QUEUE_PFN: u64 = 0x08;
    pub const QUEUE_NUM: u64 = 0x0C;
    pub const QUEUE_SEL: u64 = 0x0E;
    pub const QUEUE_NOTIFY: u64 = 0x10;
    pub const STATUS: u64 = 0x12;
    pub const ISR: u64 = 0x13;
    /// Present only while MSI-X is enabled.
    pub const MSI_CONFIG_VECTOR: u64 = 0x14;
    pub const MSI_QUEUE_VECTOR: u64 = 0x16;
    /// Device config starts here without / with MSI-X enabled.
    pub const CONFIG: u64 = 0x14;
    pub const CONFIG_MSIX: u64 = 0x18;
}

pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;
pub const ISR_QUEUE: u8 = 1;
pub const ISR_CONFIG: u8 = 2;
pub const NO_VECTOR: u16 = 0xFFFF;
/// Legacy rings: the used ring starts on the next 4 KiB boundary.
pub const VRING_ALIGN: u64 = 4096;
/// QUEUE_PFN is in 4 KiB units.
pub const PFN_SHIFT: u32 = 12;

/// Which virtio-pci interface a function presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Transport {
    /// bhyve's: virtio 0.9.5 registers in I/O BAR 0, device IDs 0x1000+.
    Legacy,
    /// virtio 1.x: capabilities pointing into memory BAR 2, device IDs
    /// 0x1040 + type, revision 1 (`transport=modern` on the device).
    Modern,
}

/// Modern layout inside BAR 2.
pub mod modern {
    pub const BAR: usize = 2;
    pub const BAR_SIZE: u64 = 0x4000;
    pub const COMMON: u64 = 0x0000;
    pub const COMMON_LEN: u32 = 0x38;
    pub const ISR: u64 = 0x1000;
    pub const DEVICE: u64 = 0x2000;
    pub const DEVICE_LEN: u32 = 0x1000;
    pub const NOTIFY: u64 = 0x3000;
    /// Queue q is notified at NOTIFY + q * NOTIFY_MULTIPLIER.
    pub const NOTIFY_MULTIPLIER: u32 = 4;
    /// Capability cfg_type values.
    pub const CAP_COMMON: u8 = 1;
    pub const CAP_NOTIFY: u8 = 2;
    pub const CAP_ISR: u8 = 3;
    pub const CAP_DEVICE: u8 = 4;
    /// Common configuration register offsets.
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0C;
    pub const MSIX_CONFIG: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1A;
    pub const QUEUE_ENABLE: u64 = 0x1C;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1E;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

/// One queue's registers (legacy uses `pfn`, modern the rest).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegs {
    pub pfn: u32,
    pub vector: u16,
    pub size: u16,
    pub enabled: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

/// The transport's guest-visible state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    pub transport: Transport,
    /// Legacy: the low 32 bits; modern: all 64.
    pub guest_features: u64,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub queue_select: u16,
    pub status: u8,
    pub isr: u8,
    pub config_vector: u16,
    pub queues: Vec<QueueRegs>,
}

struct Core {
    device: Box<dyn VirtioDevice>,
    queues: Vec<Queue>,
    mem: GuestMemory,
    /// Bumped by every reset; a worker from an older generation stops.
    generation: u64,
    active: bool,
}

/// What a worker found after processing.
enum Outcome {
    Interrupt(usize),
    NeedsReset,
    Nothing,
}

pub struct VirtioPci {
    config: PciConfigSpace,
    state: VirtioPciState,
    core: Arc<Mutex<Core>>,
    queue_sizes: Vec<u16>,
    kicks: Vec<Arc<EventFd>>,
    notifiers: Option<Arc<dyn GuestNotifiers>>,
    io_base: Option<u64>,
    stop: Option<Arc<EventFd>>,
    me: Weak<Mutex<VirtioPci>>,
    /// One irqfd per MSI-X vector, bound to its MSI route while the vector
    /// can fire (enabled, unmasked) and the VMM gave us notifiers.
    irqfds: Vec<Irqfd>,
    /// Per queue: the vector whose irqfd the worker may signal directly,
    /// or NO_FAST_PATH.
    fast: Arc<Vec<AtomicU32>>,
    /// Paused for a snapshot (or restored from one) while active: resuming
    /// starts a worker again.
    paused_active: bool,
}

/// A queue's position and layout (`virtio_queue::QueueState`, which has no
/// serde support).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQueue {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<virtio_queue::QueueState> for SavedQueue {
    fn from(q: virtio_queue::QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<SavedQueue> for virtio_queue::QueueState {
    fn from(q: SavedQueue) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A paused virtio function beyond its config space: the transport
/// registers, every queue's ring positions, and the device model's state.
#[derive(Serialize, Deserialize)]
pub struct VirtioPciSnapshot {
    pub transport: VirtioPciState,
    pub queues: Vec<SavedQueue>,
    /// Running (DRIVER_OK, no error) when paused.
    pub active: bool,
    pub device: DeviceState,
}

impl Schema for VirtioPciSnapshot {
    const KIND: &'static str = "virtio-pci";
    const VERSION: u32 = 1;
}

/// `fast` entry for "take the function lock and let the config space send it".
const NO_FAST_PATH: u32 = u32::MAX;

struct Irqfd {
    fd: Arc<EventFd>,
    /// Handle from `GuestNotifiers::add_msi` and the route it carries.
    bound: Option<(u32, MsiRoute)>,
}

/// bhyve's PCI class for each device type.
fn class_of(device_type: u32) -> (u8, u8) {
    match device_type {
        TYPE_NET => (0x02, 0x00),
        TYPE_BLOCK => (0x01, 0x00),
        TYPE_CONSOLE => (0x07, 0x80),
        TYPE_RNG => (0x10, 0x80),
        _ => (0xFF, 0x00),
    }
}

impl VirtioPci {
    /// Wrap `device` as a legacy virtio PCI function over guest memory
    /// `mem`. `msix` is bhyve's `virtio_msix` (false with `-W`).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        msix: bool,
        transport: Transport,
        notifiers: Option<Arc<dyn GuestNotifiers>>,
    ) -> Result<Arc<Mutex<Self>>, PciError> {
        let device_type = device.device_type();
        let pci_id = match transport {
            Transport::Legacy => legacy_pci_device_id(device_type).unwrap_or(0x1000),
            Transport::Modern => 0x1040 + device_type as u16,
        };
        let (class, subclass) = class_of(device_type);
        let mut config = PciConfigSpace::new(VIRTIO_VENDOR, pci_id, class, subclass, 0);
        config.set_subsystem(VIRTIO_VENDOR, device_type as u16);
        let queue_sizes = device.queue_max_sizes();
        let config_size = device.config_size();
        match transport {
            Transport::Legacy => {
                let bar0 = (regs::CONFIG_MSIX + config_size as u64)
                    .next_power_of_two()
                    .max(32);
                config.add_bar(0, BarKind::Io, bar0)?;
            }
            Transport::Modern => {
                config.set_revision(1);
                config.add_bar(modern::BAR, BarKind::Mem32, modern::BAR_SIZE)?;
                let cap = |cfg_type: u8, offset: u64, len: u32, extra: &[u8]| {
                    let mut body = vec![
                        (16 + extra.len()) as u8,
                        cfg_type,
                        modern::BAR as u8,
                        0,
                        0,
                        0,
                    ];
                    body.extend_from_slice(&(offset as u32).to_le_bytes());
                    body.extend_from_slice(&len.to_le_bytes());
                    body.extend_from_slice(extra);
                    body
                };
                let n = queue_sizes.len() as u32;
                let caps = [
                    cap(modern::CAP_COMMON, modern::COMMON, modern::COMMON_LEN, &[]),
                    cap(
                        modern::CAP_NOTIFY,
                        modern::NOTIFY,
                        n.max(1) * modern::NOTIFY_MULTIPLIER,
                        &modern::NOTIFY_MULTIPLIER.to_le_bytes(),
                    ),
                    cap(modern::CAP_ISR, modern::ISR, 1, &[]),
                    cap(modern::CAP_DEVICE, modern::DEVICE, modern::DEVICE_LEN, &[]),
                ];
                for body in caps {
                    config.add_capability(0x09, &body, &[])?;
                }
            }
        }
        if msix {
            config.add_msix_capability(queue_sizes.len() as u16 + 1, 1)?;
        } else {
            config.add_msi_capability(1)?;
        }
        config.request_intx();
        let kicks = queue_sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).map(Arc::new))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|_| PciError::BadBar {
                index: 0,
                why: "cannot create queue notification eventfds",
            })?;
        let queues = queue_sizes
            .iter()
            .map(|&s| Queue::new(s).unwrap_or_else(|_| Queue::new(256).expect("valid size")))
            .collect();
        let state = VirtioPciState {
            transport,
            guest_features: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            queue_select: 0,
            status: 0,
            isr: 0,
            config_vector: NO_VECTOR,
            queues: queue_sizes
                .iter()
                .map(|&size| QueueRegs {
                    vector: NO_VECTOR,
                    size,
                    ..QueueRegs::default()
                })
                .collect(),
        };
        let core = Arc::new(Mutex::new(Core {
            device,
            queues,
            mem,
            generation: 0,
            active: false,
        }));
        let vectors = if msix { queue_sizes.len() + 1 } else { 0 };
        let irqfds = (0..vectors)
            .map(|_| {
                EventFd::new(EFD_NONBLOCK).map(|fd| Irqfd {
                    fd: Arc::new(fd),
                    bound: None,
                })
            })
            .collect::<io::Result<Vec<_>>>()
            .map_err(|_| PciError::BadBar {
                index: 1,
                why: "cannot create interrupt eventfds",
            })?;
        let fast = Arc::new(
            queue_sizes
                .iter()
                .map(|_| AtomicU32::new(NO_FAST_PATH))
                .collect::<Vec<_>>(),
        );
        Ok(Arc::new_cyclic(|me| {
            Mutex::new(Self {
                config,
                state,
                core,
                queue_sizes,
                kicks,
                notifiers,
                io_base: None,
                stop: None,
                me: me.clone(),
                irqfds,
                fast,
                paused_active: false,
            })
        }))
    }

    /// The device config node `node` wrapped for PCI (`virtio_msix` from the tree root).
    pub fn from_config(
        tree: &ConfigTree,
        node: &str,
        mem: GuestMemory,
        vm_name: &str,
        slot: u8,
        function: u8,
        notifiers: Option<Arc<dyn GuestNotifiers>>,
    ) -> Result<Arc<Mutex<Self>>, ConfigureError> {
        let device = device_from_config(tree, node, vm_name, slot, function)?;
        let msix = tree.bool_or("virtio_msix", true)?;
        let transport = match tree.get(&format!("{node}.transport"))?.as_deref() {
            None | Some("legacy") => Transport::Legacy,
            Some("modern") => Transport::Modern,
            Some(other) => {
                return Err(ConfigureError::Invalid {
                    node: node.to_string(),
                    why: format!("unknown virtio transport \"{other}\" (legacy or modern)"),
                })
            }
        };
        Self::new(device, mem, msix, transport, notifiers).map_err(|e| ConfigureError::Invalid {
            node: node.to_string(),
            why: e.to_string(),
        })
    }

    pub fn state(&self) -> &VirtioPciState {
        &self.state
    }

    fn config_offset(&self) -> u64 {
        if self.config.msix_enabled() {
            regs::CONFIG_MSIX
        } else {
            regs::CONFIG
        }
    }

    fn selected(&self) -> Option<usize> {
        let q = usize::from(self.state.queue_select);
        (q < self.queue_sizes.len()).then_some(q)
    }

    fn header_bytes(&self) -> [u8; 24] {
        let mut h = [0u8; 24];
        let features = self.core.lock().unwrap().device.features();
        h[0..4].copy_from_slice(&(features as u32).to_le_bytes());
        h[4..8].copy_from_slice(&(self.state.guest_features as u32).to_le_bytes());
        if let Some(q) = self.selected() {
            h[8..12].copy_from_slice(&self.state.queues[q].pfn.to_le_bytes());
            h[12..14].copy_from_slice(&self.queue_sizes[q].to_le_bytes());
            h[22..24].copy_from_slice(&self.state.queues[q].vector.to_le_bytes());
        } else {
            h[22..24].copy_from_slice(&NO_VECTOR.to_le_bytes());
        }
        h[14..16].copy_from_slice(&self.state.queue_select.to_le_bytes());
        h[18] = self.state.status;
        h[19] = self.state.isr;
        h[20..22].copy_from_slice(&self.state.config_vector.to_le_bytes());
        h
    }

    fn read_registers(&mut self, offset: u64, data: &mut [u8]) {
        let cfg = self.config_offset();
        if offset >= cfg {
            self.core
                .lock()
                .unwrap()
                .device
                .read_config(offset - cfg, data);
            return;
        }
        let h = self.header_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset as usize + i;
            *b = if (at as u64) < cfg { h[at] } else { 0 };
        }
        // Reading the ISR acknowledges it and lowers INTx.
        if offset <= regs::ISR && regs::ISR < offset + data.len() as u64 {
            self.state.isr = 0;
            self.config.intx_deassert();
        }
    }

    fn write_registers(&mut self, offset: u64, data: &[u8]) {
        let cfg = self.config_offset();
        if offset >= cfg {
            self.core
                .lock()
                .unwrap()
                .device
                .write_config(offset - cfg, data);
            return;
        }
        let value = match *data {
            [a] => u32::from(a),
            [a, b] => u32::from(u16::from_le_bytes([a, b])),
            [a, b, c, d] => u32::from_le_bytes([a, b, c, d]),
            _ => {
                tracing::debug!(
                    offset,
                    len = data.len(),
                    "virtio-pci: odd-sized register write ignored"
                );
                return;
            }
        };
        match (offset, data.len()) {
            (regs::GUEST_FEATURES, 4) => {
                let mut core = self.core.lock().unwrap();
                let offered = core.device.features() as u32;
                self.state.guest_features = u64::from(value & offered);
                core.device.ack_features(self.state.guest_features);
            }
            (regs::QUEUE_PFN, 4) => {
                if let Some(q) = self.selected() {
                    self.state.queues[q].pfn = value;
                }
            }
            (regs::QUEUE_SEL, 2) => self.state.queue_select = value as u16,
            (regs::QUEUE_NOTIFY, 2) => {
                if let Some(kick) = self.kicks.get(value as usize) {
                    let _ = kick.write(1);
                }
            }
            (regs::STATUS, 1) => self.set_status(value as u8),
            (regs::MSI_CONFIG_VECTOR, 2) if self.config.msix_enabled() => {
                self.state.config_vector = self.valid_vector(value as u16);
            }
            (regs::MSI_QUEUE_VECTOR, 2) if self.config.msix_enabled() => {
                let v = self.valid_vector(value as u16);
                if let Some(q) = self.selected() {
                    self.state.queues[q].vector = v;
                }
                self.sync_irqfds();
            }
            _ => tracing::debug!(
                offset,
                len = data.len(),
                "virtio-pci: write to read-only or unknown register"
            ),
        }
    }

    fn common_bytes(&self) -> [u8; modern::COMMON_LEN as usize] {
        let mut c = [0u8; modern::COMMON_LEN as usize];
        let features = self.core.lock().unwrap().device.features();
        let st = &self.state;
        let put = |c: &mut [u8], at: u64, bytes: &[u8]| {
            c[at as usize..at as usize + bytes.len()].copy_from_slice(bytes)
        };
        put(
            &mut c,
            modern::DEVICE_FEATURE_SELECT,
            &st.device_feature_select.to_le_bytes(),
        );
        let word = match st.device_feature_select {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        };
        put(&mut c, modern::DEVICE_FEATURE, &word.to_le_bytes());
        put(
            &mut c,
            modern::DRIVER_FEATURE_SELECT,
            &st.driver_feature_select.to_le_bytes(),
        );
        let word = match st.driver_feature_select {
            0 => st.guest_features as u32,
            1 => (st.guest_features >> 32) as u32,
            _ => 0,
        };
        put(&mut c, modern::DRIVER_FEATURE, &word.to_le_bytes());
        put(&mut c, modern::MSIX_CONFIG, &st.config_vector.to_le_bytes());
        put(
            &mut c,
            modern::NUM_QUEUES,
            &(self.queue_sizes.len() as u16).to_le_bytes(),
        );
        c[modern::DEVICE_STATUS as usize] = st.status;
        put(&mut c, modern::QUEUE_SELECT, &st.queue_select.to_le_bytes());
        if let Some(q) = self.selected() {
            let r = &st.queues[q];
            put(&mut c, modern::QUEUE_SIZE, &r.size.to_le_bytes());
            put(&mut c, modern::QUEUE_MSIX_VECTOR, &r.vector.to_le_bytes());
            put(
                &mut c,
                modern::QUEUE_ENABLE,
                &u16::from(r.enabled).to_le_bytes(),
            );
            put(&mut c, modern::QUEUE_NOTIFY_OFF, &(q as u16).to_le_bytes());
            put(&mut c, modern::QUEUE_DESC, &r.desc.to_le_bytes());
            put(&mut c, modern::QUEUE_DRIVER, &r.driver.to_le_bytes());
            put(&mut c, modern::QUEUE_DEVICE, &r.device.to_le_bytes());
        }
        c
    }

    fn read_modern(&mut self, offset: u64, data: &mut [u8]) {
        if offset < modern::COMMON + u64::from(modern::COMMON_LEN) {
            let c = self.common_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                *b = c.get(offset as usize + i).copied().unwrap_or(0);
            }
        } else if offset == modern::ISR {
            data.fill(0);
            if let Some(b) = data.first_mut() {
                *b = self.state.isr;
            }
            self.state.isr = 0;
            self.config.intx_deassert();
        } else if (modern::DEVICE..modern::DEVICE + u64::from(modern::DEVICE_LEN)).contains(&offset)
        {
            self.core
                .lock()
                .unwrap()
                .device
                .read_config(offset - modern::DEVICE, data);
        } else {
            data.fill(0);
        }
    }

    fn write_modern(&mut self, offset: u64, data: &[u8]) {
        if (modern::DEVICE..modern::DEVICE + u64::from(modern::DEVICE_LEN)).contains(&offset) {
            self.core
                .lock()
                .unwrap()
                .device
                .write_config(offset - modern::DEVICE, data);
            return;
        }
        if offset >= modern::NOTIFY {
            let q = (offset - modern::NOTIFY) / u64::from(modern::NOTIFY_MULTIPLIER);
            if let Some(kick) = self.kicks.get(q as usize) {
                let _ = kick.write(1);
            }
            return;
        }
        let mut word = [0u8; 8];
        let n = data.len().min(8);
        word[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(word);
        let q = self.selected();
        // Queue registers may not change once the queue is enabled.
        let live = q.is_some_and(|q| self.state.queues[q].enabled);
        match (offset, data.len()) {
            (modern::DEVICE_FEATURE_SELECT, 4) => self.state.device_feature_select = v as u32,
            (modern::DRIVER_FEATURE_SELECT, 4) => self.state.driver_feature_select = v as u32,
            (modern::DRIVER_FEATURE, 4) if self.state.status & STATUS_FEATURES_OK == 0 => {
                let shift = match self.state.driver_feature_select {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let f = &mut self.state.guest_features;
                *f = (*f & !(0xFFFF_FFFFu64 << shift)) | ((v & 0xFFFF_FFFF) << shift);
            }
            (modern::MSIX_CONFIG, 2) => self.state.config_vector = self.valid_vector(v as u16),
            (modern::DEVICE_STATUS, 1) => self.set_status(v as u8),
            (modern::QUEUE_SELECT, 2) => self.state.queue_select = v as u16,
            (modern::QUEUE_SIZE, 2) if !live => {
                if let Some(q) = q {
                    // A power of two no larger than the maximum, else ignored.
                    let max = self.queue_sizes[q];
                    if (v as u16).is_power_of_two() && v as u16 <= max {
                        self.state.queues[q].size = v as u16;
                    }
                }
            }
            (modern::QUEUE_MSIX_VECTOR, 2) => {
                let vector = self.valid_vector(v as u16);
                if let Some(q) = q {
                    self.state.queues[q].vector = vector;
                }
                self.sync_irqfds();
            }
            (modern::QUEUE_ENABLE, 2) if v == 1 => {
                if let Some(q) = q {
                    self.state.queues[q].enabled = true;
                }
            }
            (modern::QUEUE_DESC..=0x37, 4 | 8) if !live => {
                let Some(q) = q else { return };
                let base = offset & !7;
                let high = offset & 4 != 0;
                let r = &mut self.state.queues[q];
                let field = match base {
                    modern::QUEUE_DESC => &mut r.desc,
                    modern::QUEUE_DRIVER => &mut r.driver,
                    _ => &mut r.device,
                };
                *field = match (data.len(), high) {
                    (8, _) => v,
                    (_, false) => (*field & !0xFFFF_FFFF) | (v & 0xFFFF_FFFF),
                    (_, true) => (*field & 0xFFFF_FFFF) | ((v & 0xFFFF_FFFF) << 32),
                };
            }
            _ => tracing::debug!(
                offset,
                len = data.len(),
                "virtio-pci: ignored write to the modern common configuration"
            ),
        }
    }

    /// A vector the table has, else NO_VECTOR (which the driver reads back
    /// and so learns the assignment failed).
    fn valid_vector(&self, v: u16) -> u16 {
        match self.config.msix() {
            Some(m) if v < m.vectors() => v,
            _ => NO_VECTOR,
        }
    }

    fn set_status(&mut self, status: u8) {
        if status == 0 {
            self.reset();
            return;
        }
        let was_ok = self.state.status & STATUS_DRIVER_OK != 0;
        let mut status = status;
        if self.state.transport == Transport::Modern
            && status & STATUS_FEATURES_OK != 0
            && self.state.status & STATUS_FEATURES_OK == 0
        {
            // Accept only offered features, VERSION_1 included; otherwise
            // FEATURES_OK does not stick and the driver gives up.
            let mut core = self.core.lock().unwrap();
            let offered = core.device.features();
            let f = self.state.guest_features;
            if f & !offered != 0 || f & crate::F_VERSION_1 == 0 {
                tracing::warn!("virtio-pci: driver features {f:#x} refused");
                status &= !STATUS_FEATURES_OK;
            } else {
                core.device.ack_features(f);
            }
        }
        self.state.status = status;
        if !was_ok && status & STATUS_DRIVER_OK != 0 && status & STATUS_FAILED == 0 {
            if let Err(e) = self.activate() {
                tracing::warn!("virtio-pci: cannot start the device: {e}");
                self.state.status |= STATUS_NEEDS_RESET;
            }
        }
    }

    fn reset(&mut self) {
        {
            let mut core = self.core.lock().unwrap();
            core.generation += 1;
            core.active = false;
            core.device.reset();
            for (q, &size) in core.queues.iter_mut().zip(&self.queue_sizes) {
                *q = Queue::new(size).unwrap_or_else(|_| Queue::new(256).expect("valid size"));
            }
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.write(1);
        }
        self.state.guest_features = 0;
        self.state.queue_select = 0;
        self.state.status = 0;
        self.state.isr = 0;
        self.state.config_vector = NO_VECTOR;
        self.state.device_feature_select = 0;
        self.state.driver_feature_select = 0;
        for (q, &size) in self.state.queues.iter_mut().zip(&self.queue_sizes) {
            *q = QueueRegs {
                vector: NO_VECTOR,
                size,
                ..QueueRegs::default()
            };
        }
        self.config.intx_deassert();
        self.sync_irqfds();
    }

    /// DRIVER_OK: lay the queues out where the driver put them and start the worker.
    fn activate(&mut self) -> io::Result<()> {
        let generation = {
            let mut guard = self.core.lock().unwrap();
            let core = &mut *guard;
            let event_idx = self.state.guest_features & F_RING_EVENT_IDX != 0;
            for (i, queue) in core.queues.iter_mut().enumerate() {
                let regs = &self.state.queues[i];
                let (size, desc, avail, used) = match self.state.transport {
                    Transport::Legacy => {
                        if regs.pfn == 0 {
                            continue;
                        }
                        let size = self.queue_sizes[i];
                        let desc = u64::from(regs.pfn) << PFN_SHIFT;
                        let avail = desc + 16 * u64::from(size);
                        let used =
                            (avail + 6 + 2 * u64::from(size)).div_ceil(VRING_ALIGN) * VRING_ALIGN;
                        (size, desc, avail, used)
                    }
                    Transport::Modern => {
                        if !regs.enabled {
                            continue;
                        }
                        (regs.size, regs.desc, regs.driver, regs.device)
                    }
                };
                let bad = |e: virtio_queue::Error| io::Error::other(format!("queue {i}: {e}"));
                queue.try_set_size(size).map_err(bad)?;
                queue
                    .try_set_desc_table_address(GuestAddress(desc))
                    .map_err(bad)?;
                queue
                    .try_set_avail_ring_address(GuestAddress(avail))
                    .map_err(bad)?;
                queue
                    .try_set_used_ring_address(GuestAddress(used))
                    .map_err(bad)?;
                queue.set_event_idx(event_idx);
                queue.set_ready(true);
                if !queue.is_valid(&core.mem) {
                    return Err(io::Error::other(format!(
                        "queue {i} at {desc:#x} is outside guest memory"
                    )));
                }
            }
            core.active = true;
            core.generation
        };
        self.start_worker(generation)
    }

    /// Start the thread that serves the queues of activation `generation`;
    /// it first looks at every queue, so nothing the driver made available
    /// before (or while paused) waits for a notification.
    fn start_worker(&mut self, generation: u64) -> io::Result<()> {
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        self.stop = Some(stop.clone());
        let worker = Worker {
            core: self.core.clone(),
            function: self.me.clone(),
            fast: self.fast.clone(),
            irqfds: self.irqfds.iter().map(|i| i.fd.clone()).collect(),
            kicks: self.kicks.clone(),
            stop,
            generation,
        };
        rhyve_sandbox::spawn(ThreadRole::DeviceIo, "virtio-worker", move || worker.run())?;
        Ok(())
    }

    /// Tell the driver about used buffers on `queue` (bhyve's `vq_interrupt`).
    fn interrupt_queue(&mut self, queue: usize) {
        if self.config.msix_enabled() {
            let vector = self.state.queues.get(queue).map_or(NO_VECTOR, |q| q.vector);
            if vector != NO_VECTOR {
                self.config.msix_notify(vector);
            }
            return;
        }
        self.state.isr |= ISR_QUEUE;
        if !self.config.msi_notify(0) {
            self.config.intx_assert();
        }
    }

    /// The device failed: DEVICE_NEEDS_RESET and a config interrupt.
    fn needs_reset(&mut self) {
        self.state.status |= STATUS_NEEDS_RESET;
        if self.config.msix_enabled() {
            if self.state.config_vector != NO_VECTOR {
                self.config.msix_notify(self.state.config_vector);
            }
            return;
        }
        self.state.isr |= ISR_CONFIG;
        if !self.config.msi_notify(0) {
            self.config.intx_assert();
        }
    }

    /// Bind, rebind or unbind each vector's irqfd after anything that can
    /// change MSI-X routing (enable/mask bits, table entries, queue vectors,
    /// reset), and tell the worker which queues may use them.
    fn sync_irqfds(&mut self) {
        if let Some(notifiers) = self.notifiers.clone() {
            for v in 0..self.irqfds.len() {
                let vector = v as u16;
                let want = (!self.config.msix_vector_masked(vector))
                    .then(|| self.config.msix_message(vector))
                    .flatten()
                    .map(|m| MsiRoute {
                        address: m.address,
                        data: m.data,
                    });
                let irqfd = &mut self.irqfds[v];
                // SAFETY: the eventfd outlives these calls.
                let fd = unsafe { BorrowedFd::borrow_raw(irqfd.fd.as_raw_fd()) };
                let result = match (irqfd.bound, want) {
                    (Some((_, old)), Some(new)) if old == new => Ok(()),
                    (Some((handle, _)), Some(new)) => notifiers
                        .update_msi(handle, new)
                        .map(|()| irqfd.bound = Some((handle, new))),
                    (None, Some(new)) => notifiers
                        .add_msi(fd, new)
                        .map(|handle| irqfd.bound = Some((handle, new))),
                    (Some((handle, _)), None) => {
                        irqfd.bound = None;
                        notifiers.remove_msi(fd, handle)
                    }
                    (None, None) => Ok(()),
                };
                if let Err(e) = result {
                    tracing::warn!("virtio-pci: MSI-X vector {v} irqfd: {e}");
                    irqfd.bound = None;
                }
                // A signal that raced with unbinding becomes a pending bit.
                if self.irqfds[v].bound.is_none() && self.irqfds[v].fd.read().is_ok() {
                    self.config.msix_notify(vector);
                }
            }
        }
        let msix = self.config.msix_enabled();
        for (q, slot) in self.fast.iter().enumerate() {
            let v = self.state.queues.get(q).map_or(NO_VECTOR, |r| r.vector);
            let usable = msix
                && self
                    .irqfds
                    .get(usize::from(v))
                    .is_some_and(|i| i.bound.is_some());
            slot.store(
                if usable { u32::from(v) } else { NO_FAST_PATH },
                Ordering::Release,
            );
        }
    }

    fn update_ioevents(&mut self, base: Option<u64>) {
        let Some(notifiers) = self.notifiers.clone() else {
            self.io_base = base;
            return;
        };
        let transport = self.state.transport;
        let addr = move |b: u64, q: usize| match transport {
            Transport::Legacy => u16::try_from(b + regs::QUEUE_NOTIFY)
                .ok()
                .map(IoAddress::Port),
            Transport::Modern => Some(IoAddress::Mmio(
                b + modern::NOTIFY + q as u64 * u64::from(modern::NOTIFY_MULTIPLIER),
            )),
        };
        if let Some(old) = self.io_base.take() {
            for (q, kick) in self.kicks.iter().enumerate() {
                let Some(a) = addr(old, q) else { continue };
                // SAFETY: the eventfd outlives this call.
                let fd = unsafe { BorrowedFd::borrow_raw(kick.as_raw_fd()) };
                if let Err(e) = notifiers.remove_ioevent(fd, a, 2, q as u64) {
                    tracing::warn!("virtio-pci: cannot unbind queue {q} notifications: {e}");
                }
            }
        }
        if let Some(new) = base {
            for (q, kick) in self.kicks.iter().enumerate() {
                let Some(a) = addr(new, q) else { continue };
                // SAFETY: the eventfd outlives this call.
                let fd = unsafe { BorrowedFd::borrow_raw(kick.as_raw_fd()) };
                if let Err(e) = notifiers.add_ioevent(fd, a, 2, q as u64) {
                    tracing::warn!("virtio-pci: cannot bind queue {q} notifications: {e}");
                }
            }
        }
        self.io_base = base;
    }
}

impl PciFunction for VirtioPci {
    fn config(&self) -> &PciConfigSpace {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfigSpace {
        &mut self.config
    }
    fn config_write(&mut self, offset: u16, data: &[u8]) {
        let generation = self.config.interrupt_generation();
        self.config.write(offset, data);
        if self.config.interrupt_generation() != generation {
            self.sync_irqfds();
        }
    }
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match bar {
            0 if self.state.transport == Transport::Legacy => self.read_registers(offset, data),
            modern::BAR if self.state.transport == Transport::Modern => {
                self.read_modern(offset, data)
            }
            _ => {
                if !self.config.msix_read(bar, offset, data) {
                    data.fill(0xFF);
                }
            }
        }
    }
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match bar {
            0 if self.state.transport == Transport::Legacy => self.write_registers(offset, data),
            modern::BAR if self.state.transport == Transport::Modern => {
                self.write_modern(offset, data)
            }
            _ => {
                let generation = self.config.interrupt_generation();
                self.config.msix_write(bar, offset, data);
                if self.config.interrupt_generation() != generation {
                    self.sync_irqfds();
                }
            }
        }
    }
    fn bar_moved(&mut self, bar: usize, base: Option<u64>) {
        let notify_bar = match self.state.transport {
            Transport::Legacy => 0,
            Transport::Modern => modern::BAR,
        };
        if bar == notify_bar {
            self.update_ioevents(base);
        }
    }

    /// Stop the worker with every request in flight completed into the
    /// used rings (and the driver interrupted for them): after this the
    /// rings in guest memory and the queue positions agree.
    fn pause(&mut self) {
        let drained = {
            let mut guard = self.core.lock().unwrap();
            let core = &mut *guard;
            if !core.active {
                return;
            }
            core.active = false;
            // The worker of this activation stops at its next event.
            core.generation += 1;
            self.paused_active = true;
            core.device.drain(&mut core.queues, &core.mem)
        };
        if let Some(stop) = self.stop.take() {
            let _ = stop.write(1);
        }
        match drained {
            Ok(queues) => {
                for q in queues {
                    self.interrupt_queue(q);
                }
            }
            Err(e) => {
                tracing::error!("virtio device needs reset: {e}");
                self.paused_active = false;
                self.needs_reset();
            }
        }
    }

    fn resume(&mut self) {
        if !std::mem::take(&mut self.paused_active) {
            return;
        }
        let generation = {
            let mut core = self.core.lock().unwrap();
            core.active = true;
            core.generation
        };
        if let Err(e) = self.start_worker(generation) {
            tracing::error!("virtio device needs reset: cannot restart its worker: {e}");
            self.core.lock().unwrap().active = false;
            self.needs_reset();
        }
    }

    fn save_device(&self) -> Result<Option<DeviceState>, SnapshotError> {
        let core = self.core.lock().unwrap();
        let snapshot = VirtioPciSnapshot {
            transport: self.state.clone(),
            queues: core.queues.iter().map(|q| q.state().into()).collect(),
            active: self.paused_active,
            device: core.device.save_state()?,
        };
        DeviceState::encode("virtio-pci", &snapshot).map(Some)
    }

    fn restore_device(&mut self, saved: Option<&DeviceState>) -> Result<(), SnapshotError> {
        let saved = saved.ok_or_else(|| {
            SnapshotError::Mismatch("a virtio function without its virtio state".into())
        })?;
        let s: VirtioPciSnapshot = saved.decode()?;
        crate::same_config(
            "virtio-pci",
            "transport",
            &s.transport.transport,
            &self.state.transport,
        )?;
        let sizes: Vec<u16> = s.queues.iter().map(|q| q.max_size).collect();
        crate::same_config("virtio-pci", "queues", &sizes, &self.queue_sizes)?;
        {
            let mut guard = self.core.lock().unwrap();
            let core = &mut *guard;
            core.device.restore_state(&s.device)?;
            for (i, (queue, saved)) in core.queues.iter_mut().zip(&s.queues).enumerate() {
                let restored = Queue::try_from(virtio_queue::QueueState::from(*saved))
                    .map_err(|e| SnapshotError::Mismatch(format!("virtio queue {i}: {e}")))?;
                if s.active && restored.ready() && !restored.is_valid(&core.mem) {
                    return Err(SnapshotError::Mismatch(format!(
                        "virtio queue {i} lies outside guest memory"
                    )));
                }
                *queue = restored;
            }
        }
        self.state = s.transport;
        // Inventory::resume starts the worker.
        self.paused_active = s.active;
        self.sync_irqfds();
        Ok(())
    }
}

impl Drop for VirtioPci {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.write(1);
        }
    }
}

/// The thread that runs a device's queues.
struct Worker {
    core: Arc<Mutex<Core>>,
    function: Weak<Mutex<VirtioPci>>,
    fast: Arc<Vec<AtomicU32>>,
    irqfds: Vec<Arc<EventFd>>,
    kicks: Vec<Arc<EventFd>>,
    stop: Arc<EventFd>,
    generation: u64,
}

impl Worker {
    fn run(self) {
        if let Err(e) = self.serve() {
            tracing::error!("virtio worker stopped: {e}");
        }
    }

    fn serve(&self) -> io::Result<()> {
        let n = self.kicks.len() as u64;
        let host_token = n;
        let stop_token = n + 1;
        let epoll = Epoll::new()?;
        for (q, k) in self.kicks.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                k.as_raw_fd(),
                EpollEvent::new(EventSet::IN, q as u64),
            )?;
        }
        epoll.ctl(
            ControlOperation::Add,
            self.stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, stop_token),
        )?;
        let host_fd: Option<RawFd> = self.core.lock().unwrap().device.host_fd();
        if let Some(fd) = host_fd {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, host_token),
            )?;
        }
        // Buffers made available before the worker started.
        for q in 0..self.kicks.len() {
            if !self.process(q) {
                return Ok(());
            }
        }
        let mut events = vec![EpollEvent::default(); self.kicks.len() + 2];
        loop {
            let count = match epoll.wait(-1, &mut events) {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for ev in &events[..count] {
                let token = ev.data();
                if token == stop_token {
                    return Ok(());
                }
                let queues = if token == host_token {
                    let mut core = self.core.lock().unwrap();
                    if core.generation != self.generation {
                        return Ok(());
                    }
                    core.device.host_event()
                } else {
                    let _ = self.kicks[token as usize].read();
                    vec![token as usize]
                };
                for q in queues {
                    if !self.process(q) {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Interrupt through queue `q`'s irqfd without the function lock. False
    /// when there is none, or it was unbound meanwhile (then the slow path
    /// sends it, possibly twice, which drivers tolerate).
    fn signal_irqfd(&self, q: usize) -> bool {
        let Some(slot) = self.fast.get(q) else {
            return false;
        };
        let v = slot.load(Ordering::Acquire);
        if v == NO_FAST_PATH {
            return false;
        }
        let Some(fd) = self.irqfds.get(v as usize) else {
            return false;
        };
        fd.write(1).is_ok() && slot.load(Ordering::Acquire) == v
    }

    /// Process queue `q`; false when this worker is obsolete.
    fn process(&self, q: usize) -> bool {
        let outcome = {
            let mut guard = self.core.lock().unwrap();
            let core = &mut *guard;
            if core.generation != self.generation {
                return false;
            }
            if !core.active {
                return true;
            }
            let Some(queue) = core.queues.get_mut(q) else {
                return true;
            };
            if !queue.ready() {
                return true;
            }
            match core.device.process_queue(q, queue, &core.mem) {
                Ok(true) => Outcome::Interrupt(q),
                Ok(false) => Outcome::Nothing,
                Err(e) => {
                    tracing::error!("virtio device needs reset: {e}");
                    core.active = false;
                    Outcome::NeedsReset
                }
            }
        };
        if let Outcome::Interrupt(q) = outcome {
            if self.signal_irqfd(q) {
                return true;
            }
        }
        let Some(function) = self.function.upgrade() else {
            return false;
        };
        let mut f = function.lock().unwrap();
        match outcome {
            Outcome::Interrupt(q) => f.interrupt_queue(q),
            Outcome::NeedsReset => f.needs_reset(),
            Outcome::Nothing => {}
        }
        true
    }
}
