//! bhyve's NVMe controller (`pci_nvme.c`) as a rhyve PCI function.
//!
//! Guest-visible identity as bhyve: vendor 0xFB5D, device 0x0A0A, class
//! 01/08/02 (NVM Express), NVMe 1.4 registers and doorbells in 64-bit
//! memory BAR 0 (16 KiB), an MSI-X table of `maxq + 1` vectors in BAR 4, a
//! PCIe root-complex-integrated-endpoint capability and an INTx pin. One
//! namespace (NSID 1) over a [`BlockFile`]; model "bhyve-NVMe", firmware
//! "1.0", serial `NVME-<slot>-<func>` unless `ser=`, the EUI-64 bhyve
//! derives from the VM name and slot unless `eui64=`, at most 2 MiB per
//! command (MDTS 9), no volatile write cache, Dataset Management as
//! `dsm=` says (`auto`: when the backing can discard).
//!
//! The vCPU thread that writes a register or doorbell only records it (and
//! checks it); the controller's I/O thread, woken through an eventfd as
//! virtio's workers are, does the rest, so vCPU threads make no I/O system
//! calls (their sandbox role allows none). It fetches commands from the
//! submission queues, completes admin commands at once, hands reads,
//! writes and flushes to the block back end's [`BlockQueue`] (io_uring
//! straight into the guest's PRP pages; at most `ioslots` in flight),
//! deallocates Dataset Management ranges with the same discard as
//! virtio-blk, posts the completions the back end reports on its eventfd,
//! and carries out controller resets and shutdowns (CSTS.RDY and SHST
//! change when they are done, as the spec allows).
//!
//! Snapshots: paused, the I/O thread fetches no submission entry (doorbells
//! are still recorded) but finishes what the back end has and posts it, so
//! the saved state ([`NvmeSnapshot`]: registers, queues with their heads,
//! tails and phases, features, Async Event Requests, completions held for
//! room) has nothing in flight; a restore refuses another namespace or
//! other queue limits. The MSI-X table and PBA are in the config space,
//! which the PCI layer saves.
//!
//! Hostile guests: every queue base and size, doorbell value, PRP entry and
//! list, LBA range and length is checked before use; guest memory is only
//! reached through `vm-memory`'s checked accessors; a bad command completes
//! with an NVMe error status (and a log line), never a panic. A completion
//! queue the guest leaves full holds its completions back (at most the
//! commands in flight) and stops fetching from its submission queues until
//! the guest frees room, so nothing grows without bound.
//!
//! Differences from bhyve: `ram=` namespaces are refused (one back end:
//! the block file), Format NVM is not offered (OACS 0), and bad option
//! values are errors where bhyve's `atoi` would read them as 0.
//!
//! Why hand-written: no rust-vmm crate emulates an NVMe controller, and
//! bhyve's identify data, defaults and EUI-64 must be reproduced exactly.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex, Weak};

use rhyve_backends::block::{
    BlockError, BlockFile, BlockOp, BlockOptions, BlockQueue, BlockRequest,
};
use rhyve_config::{ConfigError, ConfigTree};
use rhyve_pci::{BarKind, PciBdf, PciConfigSpace, PciError, PciFunction, PcieDeviceType};
use rhyve_platform::snapshot::{DeviceState, Schema, SnapshotError};
use rhyve_sandbox::ThreadRole;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::ahci::GuestMemory;

/// bhyve's IDs.
pub const VENDOR_ID: u16 = 0xFB5D;
pub const DEVICE_ID: u16 = 0x0A0A;
/// Mass storage / NVM / NVM Express.
pub const CLASS: (u8, u8, u8) = (0x01, 0x08, 0x02);
/// Controller registers and doorbells.
pub const REG_BAR: usize = 0;
/// MSI-X table and PBA.
pub const MSIX_BAR: usize = 4;
/// BAR 0's size: the spec's (and Windows') minimum, enough for every doorbell.
pub const REG_BAR_SIZE: u64 = 1 << 14;
/// Doorbells start here, 4 bytes each (CAP.DSTRD = 0): SQ y tail at
/// `DOORBELLS + 8y`, CQ y head at `DOORBELLS + 8y + 4`.
pub const DOORBELLS: u64 = 0x1000;
/// Memory page size (CAP.MPSMIN = CAP.MPSMAX = 0).
pub const PAGE: u64 = 4096;
/// Largest transfer: 2^MDTS pages.
pub const MDTS: u8 = 9;
pub const MAX_TRANSFER: u64 = PAGE << MDTS;
/// Submission and completion queue entry sizes.
pub const SQE_SIZE: u64 = 64;
pub const CQE_SIZE: u64 = 16;

/// bhyve's defaults.
pub const DEFAULT_MAX_QUEUES: u16 = 16;
pub const DEFAULT_QUEUE_ENTRIES: u32 = 2048;
pub const DEFAULT_IO_SLOTS: u32 = 8;
/// Most I/O slots accepted (bhyve has no limit; ours sizes an io_uring).
pub const MAX_IO_SLOTS: u32 = 4096;
/// Async Event Requests kept at once (AERL + 1).
const AER_LIMIT: usize = 5;

/// Controller registers (NVMe 1.4 section 3.1).
pub mod reg {
    pub const CAP: u64 = 0x00;
    pub const VS: u64 = 0x08;
    pub const INTMS: u64 = 0x0C;
    pub const INTMC: u64 = 0x10;
    pub const CC: u64 = 0x14;
    pub const CSTS: u64 = 0x1C;
    pub const NSSR: u64 = 0x20;
    pub const AQA: u64 = 0x24;
    pub const ASQ: u64 = 0x28;
    pub const ACQ: u64 = 0x30;

    pub const CC_EN: u32 = 1 << 0;
    pub const CC_CSS_SHIFT: u32 = 4;
    pub const CC_MPS_SHIFT: u32 = 7;
    pub const CC_SHN_SHIFT: u32 = 14;
    pub const CSTS_RDY: u32 = 1 << 0;
    pub const CSTS_CFS: u32 = 1 << 1;
    /// Shutdown processing complete.
    pub const CSTS_SHST_COMPLETE: u32 = 2 << 2;
    /// NVMe 1.4.
    pub const VERSION: u32 = 0x0001_0400;
}

/// Admin command opcodes.
pub mod admin {
    pub const DELETE_SQ: u8 = 0x00;
    pub const CREATE_SQ: u8 = 0x01;
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const DELETE_CQ: u8 = 0x04;
    pub const CREATE_CQ: u8 = 0x05;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0A;
    pub const ASYNC_EVENT: u8 = 0x0C;
}

/// NVM command set opcodes.
pub mod nvm {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

/// Feature identifiers.
pub mod feature {
    pub const ARBITRATION: u8 = 0x01;
    pub const POWER_MANAGEMENT: u8 = 0x02;
    pub const TEMPERATURE_THRESHOLD: u8 = 0x04;
    pub const ERROR_RECOVERY: u8 = 0x05;
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    pub const INTERRUPT_COALESCING: u8 = 0x08;
    pub const INTERRUPT_VECTOR_CONFIG: u8 = 0x09;
    pub const WRITE_ATOMICITY: u8 = 0x0A;
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0B;
}

/// A completion status: status code type and status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub sct: u8,
    pub sc: u8,
}

impl Status {
    const fn generic(sc: u8) -> Self {
        Self { sct: 0, sc }
    }
    const fn specific(sc: u8) -> Self {
        Self { sct: 1, sc }
    }
    pub const SUCCESS: Self = Self::generic(0x00);
    pub const INVALID_OPCODE: Self = Self::generic(0x01);
    pub const INVALID_FIELD: Self = Self::generic(0x02);
    pub const DATA_TRANSFER_ERROR: Self = Self::generic(0x04);
    pub const INTERNAL_ERROR: Self = Self::generic(0x06);
    pub const INVALID_NAMESPACE: Self = Self::generic(0x0B);
    pub const PRP_OFFSET_INVALID: Self = Self::generic(0x13);
    pub const NAMESPACE_WRITE_PROTECTED: Self = Self::generic(0x20);
    pub const LBA_OUT_OF_RANGE: Self = Self::generic(0x80);
    pub const COMPLETION_QUEUE_INVALID: Self = Self::specific(0x00);
    pub const INVALID_QUEUE_ID: Self = Self::specific(0x01);
    pub const INVALID_QUEUE_SIZE: Self = Self::specific(0x02);
    pub const AER_LIMIT_EXCEEDED: Self = Self::specific(0x05);
    pub const INVALID_INTERRUPT_VECTOR: Self = Self::specific(0x08);
    pub const INVALID_QUEUE_DELETION: Self = Self::specific(0x0C);
    /// Media error: write fault.
    pub const WRITE_FAULT: Self = Self { sct: 2, sc: 0x80 };
    /// Media error: unrecovered read error.
    pub const READ_ERROR: Self = Self { sct: 2, sc: 0x81 };

    /// The status field of a completion entry (bits 31:17 of DW3), with
    /// Do Not Retry set on errors.
    fn field(self) -> u32 {
        let dnr = u32::from(self != Self::SUCCESS) << 15;
        (u32::from(self.sc) << 1 | u32::from(self.sct & 7) << 9 | dnr) << 16
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Pci(#[from] PciError),
    #[error("invalid value \"{value}\" for \"{key}\"")]
    BadValue { key: String, value: String },
    #[error("{0}: nvme RAM namespaces (ram=) are not supported yet; give a disk image")]
    RamDisk(String),
    #[error("cannot start the NVMe I/O queue: {0}")]
    Queue(io::Error),
    #[error("cannot start the NVMe I/O thread: {0}")]
    Thread(io::Error),
}

/// Dataset Management as `dsm=` asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DsmMode {
    /// Offered when the backing can discard.
    Auto,
    Enable,
    Disable,
}

/// The controller's options (`pci.B.S.F` keys other than the block ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmeOptions {
    /// I/O submission and completion queues offered (`maxq`, 1..=16).
    pub max_queues: u16,
    /// Entries per queue at most (`qsz`).
    pub queue_entries: u32,
    /// Reads, writes and flushes in flight at most (`ioslots`).
    pub io_slots: u32,
    /// Logical block size (`sectsz`: 512, 4096 or 8192; else the backing's).
    pub sector_size: Option<u32>,
    /// Serial number, at most 20 bytes (`ser`).
    pub serial: String,
    /// EUI-64 (`eui64`); None: derived as bhyve does.
    pub eui64: Option<u64>,
    pub dsm: DsmMode,
}

fn parse_number(value: &str) -> Option<u64> {
    let v = value.trim();
    if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else if v.len() > 1 && v.starts_with('0') {
        u64::from_str_radix(&v[1..], 8).ok()
    } else {
        v.parse().ok()
    }
}

impl NvmeOptions {
    /// Read the NVMe keys of config node `node`.
    pub fn from_config(tree: &ConfigTree, node: &str) -> Result<Self, NvmeError> {
        let key = |k: &str| format!("{node}.{k}");
        let bad = |k: &str, v: &str| NvmeError::BadValue {
            key: key(k),
            value: v.to_string(),
        };
        let bdf = PciBdf::from_node(node)?;
        let mut o = Self {
            max_queues: DEFAULT_MAX_QUEUES,
            queue_entries: DEFAULT_QUEUE_ENTRIES,
            io_slots: DEFAULT_IO_SLOTS,
            sector_size: None,
            serial: format!("NVME-{}-{}", bdf.slot, bdf.func),
            eui64: None,
            dsm: DsmMode::Auto,
        };
        if let Some(v) = tree.get(&key("maxq"))? {
            let n = parse_number(&v).ok_or_else(|| bad("maxq", &v))?;
            // bhyve: anything outside 1..=16 means 16.
            o.max_queues = if (1..=u64::from(DEFAULT_MAX_QUEUES)).contains(&n) {
                n as u16
            } else {
                DEFAULT_MAX_QUEUES
            };
        }
        if let Some(v) = tree.get(&key("qsz"))? {
            o.queue_entries = parse_number(&v)
                .filter(|n| (2..=65536).contains(n))
                .ok_or_else(|| bad("qsz", &v))? as u32;
        }
        if let Some(v) = tree.get(&key("ioslots"))? {
            o.io_slots = parse_number(&v)
                .filter(|n| (1..=u64::from(MAX_IO_SLOTS)).contains(n))
                .ok_or_else(|| bad("ioslots", &v))? as u32;
        }
        if let Some(v) = tree.get(&key("sectsz"))? {
            let n = parse_number(&v).ok_or_else(|| bad("sectsz", &v))?;
            // bhyve: other sizes keep the backing's.
            if matches!(n, 512 | 4096 | 8192) {
                o.sector_size = Some(n as u32);
            }
        }
        if let Some(v) = tree.get(&key("ser"))? {
            o.serial = v.chars().take(20).collect();
        }
        if let Some(v) = tree.get(&key("eui64"))? {
            o.eui64 = Some(parse_number(&v).ok_or_else(|| bad("eui64", &v))?);
        }
        if let Some(v) = tree.get(&key("dsm"))? {
            o.dsm = match v.as_str() {
                "auto" => DsmMode::Auto,
                "enable" => DsmMode::Enable,
                "disable" => DsmMode::Disable,
                _ => return Err(bad("dsm", &v)),
            };
        }
        Ok(o)
    }
}

/// CRC-16/ARC (polynomial 0x8005 reflected, initial 0), as bhyve's `crc16`.
fn crc16(data: &[u8]) -> u16 {
    let mut crc = 0u16;
    for &b in data {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// FreeBSD's OUI block for emulated NVMe devices (`OUI_FREEBSD_NVME_LOW`).
const OUI_FREEBSD_NVME_LOW: u64 = 0x589c_fc20_0000;

/// The EUI-64 bytes of namespace 1: bhyve stores a user's value with an
/// extra byte swap (so it reads back little-endian), and derives its own
/// from the VM name and the slot.
fn eui64_bytes(opts: &NvmeOptions, vm_name: &str, bdf: PciBdf) -> [u8; 8] {
    match opts.eui64 {
        Some(v) if v != 0 => v.to_le_bytes(),
        _ => {
            let id = format!("{vm_name}{}{}{}", bdf.bus, bdf.slot, bdf.func);
            let eui = (OUI_FREEBSD_NVME_LOW | u64::from(crc16(id.as_bytes()))) << 16 | 1;
            eui.to_be_bytes()
        }
    }
}

/// An I/O or admin submission queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmissionQueue {
    pub base: u64,
    pub entries: u16,
    pub head: u16,
    pub tail: u16,
    pub cqid: u16,
}

/// A completion queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletionQueue {
    pub base: u64,
    pub entries: u16,
    pub head: u16,
    pub tail: u16,
    /// Phase tag written with the next entry.
    pub phase: bool,
    pub interrupts: bool,
    pub vector: u16,
}

/// Everything the guest can observe, serializable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvmeState {
    pub cc: u32,
    pub csts: u32,
    pub aqa: u32,
    pub asq: u64,
    pub acq: u64,
    /// Indexed by queue id (0 = admin).
    pub sqs: Vec<Option<SubmissionQueue>>,
    pub cqs: Vec<Option<CompletionQueue>>,
    /// Current values of features 0..32 (Set Features' CDW11).
    pub features: Vec<u32>,
    /// Command ids of outstanding Async Event Requests.
    pub aers: Vec<u16>,
    /// CC.EN went 1 -> 0: the I/O thread resets the controller.
    pub reset_pending: bool,
    /// CC.SHN was set: the I/O thread flushes, then reports SHST complete.
    pub shutdown_pending: bool,
}

/// A completion entry waiting to be posted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cqe {
    result: u32,
    sqid: u16,
    cid: u16,
    status: Status,
}

/// A read, write or flush with the back end.
struct Pending {
    sqid: u16,
    cid: u16,
    op: BlockOp,
    /// Its submission queue was deleted (or the controller reset): drop it.
    orphan: bool,
}

/// What executing a command led to.
enum Outcome {
    Done(u32, Status),
    /// With the back end; completes later.
    Submitted,
    /// Held until the back end has a free slot (the entry stays queued).
    Busy,
    /// An Async Event Request kept for later.
    Kept,
}

/// Guest memory a transfer covers, page by page.
type Segments = Vec<(u64, usize)>;

/// The NVMe controller.
pub struct Nvme {
    config: PciConfigSpace,
    state: NvmeState,
    opts: NvmeOptions,
    // The queue goes before `mem` so its drop (which waits for I/O in
    // flight) runs while the guest pages are still mapped.
    queue: BlockQueue,
    disk: Arc<BlockFile>,
    mem: GuestMemory,
    /// Wakes the I/O thread: a register or doorbell write needs work.
    kick: EventFd,
    identify_controller: Vec<u8>,
    identify_namespace: Vec<u8>,
    eui64: [u8; 8],
    lba_shift: u32,
    lbas: u64,
    dsm: bool,
    /// Indexed by back-end token.
    pending: Vec<Option<Pending>>,
    free_tokens: Vec<usize>,
    /// Completions waiting for room, per completion queue.
    held: Vec<VecDeque<Cqe>>,
    reaped: Vec<(u64, io::Result<()>)>,
    /// Snapshot pause: no submission entry is fetched; what is with the
    /// back end completes and is posted.
    paused: bool,
}

/// What a snapshot keeps of a controller: the guest-visible state, the
/// completions waiting for room in their queue, and the namespace and
/// limits it may only be restored onto unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvmeSnapshot {
    pub state: NvmeState,
    /// Per completion queue.
    pub held: Vec<Vec<Cqe>>,
    pub namespace: NvmeShape,
}

/// What the guest learned at identify time and must find again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvmeShape {
    pub blocks: u64,
    pub sector_size: u32,
    pub max_queues: u16,
    pub queue_entries: u32,
    pub dsm: bool,
}

impl NvmeShape {
    /// What differs from `here`, each as "what: saved, here".
    fn differences(&self, here: &Self) -> Vec<String> {
        let mut d = Vec::new();
        let mut check = |what: &str, saved: String, now: String| {
            if saved != now {
                d.push(format!("{what} {saved} in the snapshot, {now} here"));
            }
        };
        check(
            "namespace blocks",
            self.blocks.to_string(),
            here.blocks.to_string(),
        );
        check(
            "sector size",
            self.sector_size.to_string(),
            here.sector_size.to_string(),
        );
        check(
            "maxq",
            self.max_queues.to_string(),
            here.max_queues.to_string(),
        );
        check(
            "qsz",
            self.queue_entries.to_string(),
            here.queue_entries.to_string(),
        );
        check(
            "dataset management",
            self.dsm.to_string(),
            here.dsm.to_string(),
        );
        d
    }
}

impl Schema for NvmeSnapshot {
    const KIND: &'static str = "nvme";
    const VERSION: u32 = 1;
}

fn pad(dst: &mut [u8], src: &str) {
    dst.fill(b' ');
    let n = src.len().min(dst.len());
    dst[..n].copy_from_slice(&src.as_bytes()[..n]);
}

impl Nvme {
    /// A controller with namespace 1 on `disk`, over guest memory `mem`,
    /// its I/O thread running. `vm_name` and `bdf` seed bhyve's EUI-64.
    pub fn new(
        disk: BlockFile,
        opts: NvmeOptions,
        mem: GuestMemory,
        vm_name: &str,
        bdf: PciBdf,
    ) -> Result<Arc<Mutex<Self>>, NvmeError> {
        let mut config = PciConfigSpace::new(VENDOR_ID, DEVICE_ID, CLASS.0, CLASS.1, CLASS.2);
        config.add_bar(REG_BAR, BarKind::Mem64, REG_BAR_SIZE)?;
        config.add_msix_capability(opts.max_queues + 1, MSIX_BAR)?;
        config.add_pcie_capability(PcieDeviceType::RootComplexIntegratedEndpoint)?;
        config.request_intx();

        let sector = opts.sector_size.unwrap_or(disk.sector_size()).max(512);
        let lba_shift = sector.next_power_of_two().trailing_zeros();
        let lbas = disk.size() >> lba_shift;
        let dsm = match opts.dsm {
            DsmMode::Auto => disk.can_delete(),
            DsmMode::Enable => true,
            DsmMode::Disable => false,
        };
        let eui64 = eui64_bytes(&opts, vm_name, bdf);
        let queue = BlockQueue::new(&disk, opts.io_slots).map_err(NvmeError::Queue)?;
        let done = queue
            .completion_fd()
            .try_clone()
            .map_err(NvmeError::Queue)?;
        let kick = EventFd::new(EFD_NONBLOCK).map_err(NvmeError::Queue)?;
        let kicked = kick.try_clone().map_err(NvmeError::Queue)?;
        let queues = usize::from(opts.max_queues) + 1;
        let mut nvme = Self {
            config,
            state: NvmeState {
                cc: 0,
                csts: 0,
                aqa: 0,
                asq: 0,
                acq: 0,
                sqs: vec![None; queues],
                cqs: vec![None; queues],
                features: vec![0; 32],
                aers: Vec::new(),
                reset_pending: false,
                shutdown_pending: false,
            },
            identify_controller: Vec::new(),
            identify_namespace: Vec::new(),
            eui64,
            lba_shift,
            lbas,
            dsm,
            pending: (0..opts.io_slots).map(|_| None).collect(),
            free_tokens: (0..opts.io_slots as usize).rev().collect(),
            held: vec![VecDeque::new(); queues],
            reaped: Vec::new(),
            paused: false,
            opts,
            queue,
            disk: Arc::new(disk),
            mem,
            kick,
        };
        nvme.identify_controller = nvme.build_identify_controller();
        nvme.identify_namespace = nvme.build_identify_namespace();
        nvme.reset();
        let nvme = Arc::new(Mutex::new(nvme));
        let weak = Arc::downgrade(&nvme);
        rhyve_sandbox::spawn(ThreadRole::DeviceIo, "nvme-io", move || {
            io_thread(kicked, done, weak)
        })
        .map_err(NvmeError::Thread)?;
        Ok(nvme)
    }

    /// Build from config node `node` (`pci.B.S.F`): the block keys, the
    /// NVMe options, `name` for the EUI-64.
    pub fn from_config(
        tree: &ConfigTree,
        node: &str,
        mem: GuestMemory,
    ) -> Result<Arc<Mutex<Self>>, NvmeError> {
        if tree.get(&format!("{node}.ram"))?.is_some() {
            return Err(NvmeError::RamDisk(node.to_string()));
        }
        let opts = NvmeOptions::from_config(tree, node)?;
        let disk = BlockFile::open(&BlockOptions::from_config(tree, node)?)?;
        let name = tree.get("name")?.unwrap_or_default();
        Self::new(disk, opts, mem, &name, PciBdf::from_node(node)?)
    }

    pub fn state(&self) -> &NvmeState {
        &self.state
    }

    fn shape(&self) -> NvmeShape {
        NvmeShape {
            blocks: self.lbas,
            sector_size: 1 << self.lba_shift,
            max_queues: self.opts.max_queues,
            queue_entries: self.opts.queue_entries,
            dsm: self.dsm,
        }
    }

    /// A saved state this controller can run without an index out of
    /// range or a division by zero: the snapshot file is input too.
    fn check_saved(&self, saved: &NvmeSnapshot) -> Result<(), String> {
        let s = &saved.state;
        let queues = usize::from(self.opts.max_queues) + 1;
        if s.sqs.len() != queues || s.cqs.len() != queues || saved.held.len() != queues {
            return Err(format!("{} queues saved, {queues} here", s.sqs.len()));
        }
        if s.features.len() != 32 || s.aers.len() > AER_LIMIT {
            return Err("bad features or async event requests".into());
        }
        let ring_ok =
            |entries: u16, head: u16, tail: u16| entries >= 2 && head < entries && tail < entries;
        for (qid, sq) in s.sqs.iter().enumerate() {
            let Some(sq) = sq else { continue };
            let cq_exists = s.cqs.get(usize::from(sq.cqid)).is_some_and(Option::is_some);
            if !ring_ok(sq.entries, sq.head, sq.tail) || !cq_exists {
                return Err(format!("bad submission queue {qid}"));
            }
        }
        for (qid, cq) in s.cqs.iter().enumerate() {
            let Some(cq) = cq else { continue };
            if !ring_ok(cq.entries, cq.head, cq.tail) || cq.vector > self.opts.max_queues {
                return Err(format!("bad completion queue {qid}"));
            }
        }
        if saved
            .held
            .iter()
            .flatten()
            .any(|c| usize::from(c.sqid) >= queues)
        {
            return Err("a held completion of a submission queue beyond maxq".into());
        }
        Ok(())
    }

    /// Nothing left to do until the guest acts: no I/O with the back end,
    /// no reset or shutdown pending, and every submission queue drained or
    /// waiting for room in its completion queue.
    pub fn is_idle(&self) -> bool {
        let s = &self.state;
        let ready = s.csts & reg::CSTS_RDY != 0;
        self.queue.in_flight() == 0
            && !s.reset_pending
            && !s.shutdown_pending
            && (!ready
                || s.sqs
                    .iter()
                    .flatten()
                    .all(|sq| sq.head == sq.tail || !self.held[usize::from(sq.cqid)].is_empty()))
    }

    fn build_identify_controller(&self) -> Vec<u8> {
        let mut d = vec![0u8; 4096];
        d[0..2].copy_from_slice(&VENDOR_ID.to_le_bytes());
        pad(&mut d[4..24], &self.opts.serial);
        pad(&mut d[24..64], "bhyve-NVMe");
        pad(&mut d[64..72], "1.0");
        d[72] = 4; // RAB
        d[73..76].copy_from_slice(&[0x58, 0x9c, 0xfc]); // FreeBSD's OUI
        d[77] = MDTS;
        d[80..84].copy_from_slice(&reg::VERSION.to_le_bytes());
        d[92..96].copy_from_slice(&(1u32 << 8).to_le_bytes()); // OAES: NS attribute notices
        d[111] = 1; // CNTRLTYPE: I/O controller
        d[258] = 2; // ACL
        d[259] = (AER_LIMIT - 1) as u8; // AERL
        d[260] = 1 | 1 << 1; // FRMW: slot 1 read-only, one slot
        d[266..268].copy_from_slice(&0x0157u16.to_le_bytes()); // WCTEMP
        d[268..270].copy_from_slice(&0x0157u16.to_le_bytes()); // CCTEMP
        d[328..332].copy_from_slice(&(2u32 << 30).to_le_bytes()); // SANICAP: NODMMAS
        d[512] = 6 << 4 | 6; // SQES
        d[513] = 4 << 4 | 4; // CQES
        d[516..520].copy_from_slice(&1u32.to_le_bytes()); // NN
        let oncs: u16 = if self.dsm { 1 << 2 } else { 0 };
        d[520..522].copy_from_slice(&oncs.to_le_bytes());
        d[524] = 1; // FNA: format applies to all namespaces
        d
    }

    fn build_identify_namespace(&self) -> Vec<u8> {
        let mut d = vec![0u8; 4096];
        for at in [0, 8, 16] {
            d[at..at + 8].copy_from_slice(&self.lbas.to_le_bytes()); // NSZE, NCAP, NUSE
        }
        d[120..128].copy_from_slice(&self.eui64);
        d[128..132].copy_from_slice(&(self.lba_shift << 16).to_le_bytes()); // LBAF0.LBADS
        d
    }

    fn cap(&self) -> u64 {
        let mqes = u64::from(self.opts.queue_entries - 1) & 0xFFFF;
        mqes | 1 << 16 // CQR: queues are physically contiguous
            | 60 << 24 // TO: 30 s
            | 1 << 37 // CSS: NVM command set
    }

    /// Controller reset (CC.EN 1 -> 0): nothing in flight lands afterwards.
    fn reset(&mut self) {
        self.queue.quiesce();
        for (i, p) in self.pending.iter_mut().enumerate() {
            if p.take().is_some() {
                self.free_tokens.push(i);
            }
        }
        let s = &mut self.state;
        s.sqs.iter_mut().for_each(|q| *q = None);
        s.cqs.iter_mut().for_each(|q| *q = None);
        self.held.iter_mut().for_each(VecDeque::clear);
        s.aers.clear();
        s.reset_pending = false;
        s.features.fill(0);
        s.features[usize::from(feature::NUMBER_OF_QUEUES)] =
            u32::from(self.opts.max_queues - 1) * 0x1_0001;
        s.features[usize::from(feature::ASYNC_EVENT_CONFIG)] = 0x11F;
        s.features[usize::from(feature::TEMPERATURE_THRESHOLD)] = 0x157;
        s.csts = 0;
        self.config.intx_deassert();
    }

    /// CC.EN 0 -> 1: set up the admin queues, or report a fatal status.
    fn enable(&mut self, cc: u32) {
        let sq_entries = (self.state.aqa & 0xFFF) + 1;
        let cq_entries = ((self.state.aqa >> 16) & 0xFFF) + 1;
        let css = (cc >> reg::CC_CSS_SHIFT) & 7;
        let mps = (cc >> reg::CC_MPS_SHIFT) & 0xF;
        let (asq, acq) = (self.state.asq, self.state.acq);
        let ok = sq_entries >= 2
            && cq_entries >= 2
            && css == 0
            && mps == 0
            && self.ring_fits(asq, sq_entries, SQE_SIZE)
            && self.ring_fits(acq, cq_entries, CQE_SIZE);
        if !ok {
            tracing::warn!(
                "nvme: cannot enable: AQA {:#x}, ASQ {asq:#x}, ACQ {acq:#x}, CC {cc:#x}",
                self.state.aqa
            );
            self.state.csts |= reg::CSTS_CFS;
            return;
        }
        self.state.sqs[0] = Some(SubmissionQueue {
            base: asq,
            entries: sq_entries as u16,
            head: 0,
            tail: 0,
            cqid: 0,
        });
        self.state.cqs[0] = Some(CompletionQueue {
            base: acq,
            entries: cq_entries as u16,
            head: 0,
            tail: 0,
            phase: true,
            interrupts: true,
            vector: 0,
        });
        self.state.csts = reg::CSTS_RDY;
    }

    /// A queue of `entries` entries of `size` bytes at `base` is page
    /// aligned and wholly in guest memory.
    fn ring_fits(&self, base: u64, entries: u32, size: u64) -> bool {
        base.is_multiple_of(PAGE)
            && self
                .mem
                .check_range(GuestAddress(base), (u64::from(entries) * size) as usize)
    }

    fn write_cc(&mut self, value: u32) {
        let was = self.state.cc;
        self.state.cc = value;
        match (was & reg::CC_EN != 0, value & reg::CC_EN != 0) {
            (true, false) => {
                // Queues stop now; the I/O thread waits for the back end,
                // then clears CSTS.
                self.state.reset_pending = true;
                self.wake();
            }
            (false, true) if self.state.reset_pending => {
                tracing::warn!("nvme: CC.EN set before the reset completed (CSTS.RDY still 1)");
                self.state.cc &= !reg::CC_EN;
            }
            (false, true) => self.enable(value),
            _ => {}
        }
        if (value >> reg::CC_SHN_SHIFT) & 3 != 0 && (was >> reg::CC_SHN_SHIFT) & 3 == 0 {
            self.state.shutdown_pending = true;
            self.wake();
        }
    }

    fn wake(&self) {
        // A full counter only means a wake-up is already pending.
        let _ = self.kick.write(1);
    }

    /// What register writes left to the I/O thread, then the queues.
    fn run(&mut self) {
        if self.state.reset_pending {
            self.reset();
        }
        if self.state.shutdown_pending {
            self.state.shutdown_pending = false;
            if let Err(e) = self.disk.flush() {
                tracing::warn!("nvme: flush at shutdown failed: {e}");
            }
            self.state.csts |= reg::CSTS_SHST_COMPLETE;
        }
        for cqid in 0..self.held.len() {
            self.flush_held(cqid);
        }
        self.process_all();
        self.queue.commit();
        self.complete_io();
    }

    fn read_register(&self, offset: u64) -> u32 {
        let cap = self.cap();
        match offset {
            reg::CAP => cap as u32,
            o if o == reg::CAP + 4 => (cap >> 32) as u32,
            reg::VS => reg::VERSION,
            reg::CC => self.state.cc,
            reg::CSTS => self.state.csts,
            reg::AQA => self.state.aqa,
            reg::ASQ => self.state.asq as u32,
            o if o == reg::ASQ + 4 => (self.state.asq >> 32) as u32,
            reg::ACQ => self.state.acq as u32,
            o if o == reg::ACQ + 4 => (self.state.acq >> 32) as u32,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let s = &mut self.state;
        match offset {
            reg::CC => self.write_cc(value),
            reg::AQA => s.aqa = value & 0x0FFF_0FFF,
            reg::ASQ => s.asq = (s.asq & !0xFFFF_FFFF) | u64::from(value & !0xFFF),
            o if o == reg::ASQ + 4 => s.asq = (s.asq & 0xFFFF_FFFF) | u64::from(value) << 32,
            reg::ACQ => s.acq = (s.acq & !0xFFFF_FFFF) | u64::from(value & !0xFFF),
            o if o == reg::ACQ + 4 => s.acq = (s.acq & 0xFFFF_FFFF) | u64::from(value) << 32,
            // Interrupt masks apply to INTx/MSI only; NSSR is not offered.
            reg::INTMS | reg::INTMC | reg::NSSR => {}
            _ => tracing::debug!("nvme: write of {value:#x} to read-only {offset:#x}"),
        }
    }

    fn doorbell(&mut self, offset: u64, value: u32) {
        let index = (offset - DOORBELLS) / 4;
        let qid = (index / 2) as usize;
        if self.state.csts & reg::CSTS_RDY == 0 || self.state.reset_pending {
            tracing::debug!("nvme: doorbell {index} rung while the controller is not ready");
            return;
        }
        if index.is_multiple_of(2) {
            let Some(sq) = self.state.sqs.get_mut(qid).and_then(Option::as_mut) else {
                tracing::warn!("nvme: doorbell of missing submission queue {qid}");
                return;
            };
            if value >= u32::from(sq.entries) {
                tracing::warn!(
                    "nvme: SQ {qid} tail {value} beyond its {} entries",
                    sq.entries
                );
                return;
            }
            sq.tail = value as u16;
        } else {
            let Some(cq) = self.state.cqs.get_mut(qid).and_then(Option::as_mut) else {
                tracing::warn!("nvme: doorbell of missing completion queue {qid}");
                return;
            };
            if value >= u32::from(cq.entries) {
                tracing::warn!(
                    "nvme: CQ {qid} head {value} beyond its {} entries",
                    cq.entries
                );
                return;
            }
            cq.head = value as u16;
            // Lowered here, before the guest can take the line as raised
            // again; held completions are posted by the I/O thread.
            self.update_intx();
            if self.held[qid].is_empty() {
                return;
            }
        }
        self.wake();
    }

    /// Fetch and run commands from submission queue `qid` until it is
    /// empty, its completion queue holds completions back, or the back
    /// end is busy.
    fn process_sq(&mut self, qid: usize) {
        loop {
            if self.paused || self.state.csts & reg::CSTS_RDY == 0 || self.state.reset_pending {
                return;
            }
            let Some(sq) = self.state.sqs.get(qid).and_then(Option::as_ref) else {
                return;
            };
            let cqid = usize::from(sq.cqid);
            if sq.head == sq.tail || !self.held[cqid].is_empty() {
                return;
            }
            let at = sq.base + u64::from(sq.head) * SQE_SIZE;
            let entries = sq.entries;
            let mut sqe = [0u8; SQE_SIZE as usize];
            if let Err(e) = self.mem.read_slice(&mut sqe, GuestAddress(at)) {
                tracing::warn!("nvme: SQ {qid} entry at {at:#x}: {e}");
                self.state.csts |= reg::CSTS_CFS;
                return;
            }
            let cmd = Command(sqe);
            let outcome = if qid == 0 {
                self.admin(&cmd)
            } else {
                self.io(qid as u16, &cmd)
            };
            if matches!(outcome, Outcome::Busy) {
                return;
            }
            if let Some(sq) = self.state.sqs[qid].as_mut() {
                sq.head = (sq.head + 1) % entries;
            }
            if let Outcome::Done(result, status) = outcome {
                self.post(Cqe {
                    result,
                    sqid: qid as u16,
                    cid: cmd.cid(),
                    status,
                });
            }
        }
    }

    fn process_all(&mut self) {
        for qid in 0..self.state.sqs.len() {
            self.process_sq(qid);
        }
    }

    /// Queue `cqe` on its submission queue's completion queue: written now
    /// if there is room, else held.
    fn post(&mut self, cqe: Cqe) {
        let Some(cqid) = self.state.sqs[usize::from(cqe.sqid)]
            .as_ref()
            .map(|sq| usize::from(sq.cqid))
        else {
            return;
        };
        self.held[cqid].push_back(cqe);
        self.flush_held(cqid);
    }

    /// Write held completions of queue `cqid` while it has room; interrupt.
    fn flush_held(&mut self, cqid: usize) {
        let mut wrote = false;
        while let Some(&cqe) = self.held[cqid].front() {
            let Some(cq) = self.state.cqs[cqid].as_mut() else {
                self.held[cqid].clear();
                return;
            };
            if (cq.tail + 1) % cq.entries == cq.head {
                break;
            }
            let sq_head = self.state.sqs[usize::from(cqe.sqid)]
                .as_ref()
                .map_or(0, |sq| sq.head);
            let mut e = [0u8; CQE_SIZE as usize];
            e[0..4].copy_from_slice(&cqe.result.to_le_bytes());
            e[8..12]
                .copy_from_slice(&(u32::from(sq_head) | u32::from(cqe.sqid) << 16).to_le_bytes());
            let dw3 = u32::from(cqe.cid) | u32::from(cq.phase) << 16 | cqe.status.field();
            e[12..16].copy_from_slice(&dw3.to_le_bytes());
            let at = cq.base + u64::from(cq.tail) * CQE_SIZE;
            if let Err(err) = self.mem.write_slice(&e, GuestAddress(at)) {
                tracing::warn!("nvme: CQ {cqid} entry at {at:#x}: {err}");
            }
            cq.tail = (cq.tail + 1) % cq.entries;
            if cq.tail == 0 {
                cq.phase = !cq.phase;
            }
            self.held[cqid].pop_front();
            wrote = true;
        }
        if wrote {
            self.interrupt(cqid);
        }
    }

    fn interrupt(&mut self, cqid: usize) {
        let Some(cq) = self.state.cqs[cqid].as_ref() else {
            return;
        };
        if !cq.interrupts {
            return;
        }
        let vector = cq.vector;
        if !self.config.msix_notify(vector) {
            self.config.intx_assert();
        }
    }

    /// INTx follows "some interrupt-enabled completion queue has entries".
    fn update_intx(&mut self) {
        let busy = self
            .state
            .cqs
            .iter()
            .flatten()
            .any(|cq| cq.interrupts && cq.head != cq.tail);
        if !busy {
            self.config.intx_deassert();
        }
    }

    /// Post the completions the back end has finished; restart the queues
    /// that waited for a slot, and post what finished within that
    /// submission too, until nothing more is done.
    fn complete_io(&mut self) {
        loop {
            let mut done = std::mem::take(&mut self.reaped);
            self.queue.reap(&mut done);
            if done.is_empty() {
                self.reaped = done;
                return;
            }
            for (token, result) in done.drain(..) {
                let Some(p) = self.pending.get_mut(token as usize).and_then(Option::take) else {
                    continue;
                };
                self.free_tokens.push(token as usize);
                if p.orphan {
                    continue;
                }
                let status = match result {
                    Ok(()) => Status::SUCCESS,
                    Err(e) => {
                        tracing::warn!(
                            "nvme: {:?} for SQ {} command {} failed: {e}",
                            p.op,
                            p.sqid,
                            p.cid
                        );
                        if p.op == BlockOp::Read {
                            Status::READ_ERROR
                        } else {
                            Status::WRITE_FAULT
                        }
                    }
                };
                self.post(Cqe {
                    result: 0,
                    sqid: p.sqid,
                    cid: p.cid,
                    status,
                });
            }
            self.reaped = done;
            self.process_all();
            self.queue.commit();
        }
    }

    /// The guest pages of a `len`-byte transfer described by PRP1/PRP2.
    fn prp_segments(&self, prp1: u64, prp2: u64, len: u64) -> Result<Segments, Status> {
        if len == 0 || len > MAX_TRANSFER {
            return Err(Status::INVALID_FIELD);
        }
        if prp1 & 3 != 0 {
            return Err(Status::PRP_OFFSET_INVALID);
        }
        let first = (PAGE - prp1 % PAGE).min(len);
        let mut segs = vec![(prp1, first as usize)];
        let mut left = len - first;
        if left == 0 {
            return Ok(segs);
        }
        if left <= PAGE {
            if !prp2.is_multiple_of(PAGE) {
                return Err(Status::PRP_OFFSET_INVALID);
            }
            segs.push((prp2, left as usize));
            return Ok(segs);
        }
        // PRP2 points to a list; the last entry of a full list page chains
        // to the next page. At most MAX_TRANSFER / PAGE entries in all.
        if prp2 & 7 != 0 {
            return Err(Status::PRP_OFFSET_INVALID);
        }
        let mut list = prp2;
        while left > 0 {
            let in_page = ((PAGE - list % PAGE) / 8) as usize;
            let needed = left.div_ceil(PAGE) as usize;
            let (take, chain) = if needed > in_page {
                (in_page - 1, true)
            } else {
                (needed, false)
            };
            let mut raw = vec![0u8; (take + usize::from(chain)) * 8];
            self.mem
                .read_slice(&mut raw, GuestAddress(list))
                .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
            for entry in raw.chunks_exact(8).take(take) {
                let page = u64::from_le_bytes(entry.try_into().unwrap_or_default());
                if page % PAGE != 0 {
                    return Err(Status::PRP_OFFSET_INVALID);
                }
                let n = left.min(PAGE);
                segs.push((page, n as usize));
                left -= n;
            }
            if chain {
                // Further list pages start on a page boundary, so each
                // holds 511 entries and the walk always progresses.
                let next = u64::from_le_bytes(raw[take * 8..].try_into().unwrap_or_default());
                if next % PAGE != 0 {
                    return Err(Status::PRP_OFFSET_INVALID);
                }
                list = next;
            }
        }
        Ok(segs)
    }

    /// Host iovecs for guest segments, merged where contiguous.
    fn iovecs(&self, segs: &Segments) -> Result<Vec<libc::iovec>, Status> {
        let mut out: Vec<libc::iovec> = Vec::with_capacity(segs.len());
        for &(addr, len) in segs {
            let slice = self
                .mem
                .get_slice(GuestAddress(addr), len)
                .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
            let ptr = slice.ptr_guard_mut().as_ptr();
            if let Some(last) = out.last_mut() {
                if (last.iov_base as usize).wrapping_add(last.iov_len) == ptr as usize {
                    last.iov_len += len;
                    continue;
                }
            }
            out.push(libc::iovec {
                iov_base: ptr as *mut libc::c_void,
                iov_len: len,
            });
        }
        Ok(out)
    }

    /// Copy `data` to the guest pages of the command's PRPs.
    fn write_prps(&self, cmd: &Command, data: &[u8]) -> Status {
        let segs = match self.prp_segments(cmd.prp1(), cmd.prp2(), data.len() as u64) {
            Ok(s) => s,
            Err(s) => return s,
        };
        let mut pos = 0;
        for (addr, len) in segs {
            if self
                .mem
                .write_slice(&data[pos..pos + len], GuestAddress(addr))
                .is_err()
            {
                return Status::DATA_TRANSFER_ERROR;
            }
            pos += len;
        }
        Status::SUCCESS
    }

    /// Read `len` bytes from the guest pages of the command's PRPs.
    fn read_prps(&self, cmd: &Command, len: usize) -> Result<Vec<u8>, Status> {
        let segs = self.prp_segments(cmd.prp1(), cmd.prp2(), len as u64)?;
        let mut data = vec![0u8; len];
        let mut pos = 0;
        for (addr, n) in segs {
            self.mem
                .read_slice(&mut data[pos..pos + n], GuestAddress(addr))
                .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
            pos += n;
        }
        Ok(data)
    }

    fn admin(&mut self, cmd: &Command) -> Outcome {
        if cmd.fused_or_sgl() {
            return Outcome::Done(0, Status::INVALID_FIELD);
        }
        let done = |s| Outcome::Done(0, s);
        match cmd.opcode() {
            admin::CREATE_CQ => done(self.create_cq(cmd)),
            admin::CREATE_SQ => done(self.create_sq(cmd)),
            admin::DELETE_SQ => done(self.delete_sq(cmd)),
            admin::DELETE_CQ => done(self.delete_cq(cmd)),
            admin::IDENTIFY => done(self.identify(cmd)),
            admin::GET_LOG_PAGE => done(self.get_log_page(cmd)),
            admin::SET_FEATURES => self.set_features(cmd),
            admin::GET_FEATURES => self.get_features(cmd),
            // Bit 0 of the result: the command was not aborted.
            admin::ABORT => Outcome::Done(1, Status::SUCCESS),
            admin::ASYNC_EVENT => {
                if self.state.aers.len() >= AER_LIMIT {
                    done(Status::AER_LIMIT_EXCEEDED)
                } else {
                    self.state.aers.push(cmd.cid());
                    Outcome::Kept
                }
            }
            op => {
                tracing::debug!("nvme: unsupported admin opcode {op:#x}");
                done(Status::INVALID_OPCODE)
            }
        }
    }

    /// I/O queues the guest may use: what Set Features granted.
    fn io_queues_granted(&self) -> (u16, u16) {
        let f = self.state.features[usize::from(feature::NUMBER_OF_QUEUES)];
        ((f & 0xFFFF) as u16 + 1, (f >> 16) as u16 + 1)
    }

    fn new_queue_id(&self, cmd: &Command, granted: u16, exists: bool) -> Result<usize, Status> {
        let qid = cmd.cdw10() & 0xFFFF;
        if qid == 0 || qid > u32::from(granted) || exists {
            return Err(Status::INVALID_QUEUE_ID);
        }
        Ok(qid as usize)
    }

    fn queue_size(&self, cmd: &Command, entry: u64) -> Result<u16, Status> {
        let entries = (cmd.cdw10() >> 16) + 1;
        if entries < 2 || entries > self.opts.queue_entries.min(65535) {
            return Err(Status::INVALID_QUEUE_SIZE);
        }
        if cmd.cdw11() & 1 == 0 || !self.ring_fits(cmd.prp1(), entries, entry) {
            return Err(Status::INVALID_FIELD);
        }
        Ok(entries as u16)
    }

    fn create_cq(&mut self, cmd: &Command) -> Status {
        let qid = cmd.cdw10() as usize & 0xFFFF;
        let exists = self.state.cqs.get(qid).is_some_and(Option::is_some);
        let qid = match self.new_queue_id(cmd, self.io_queues_granted().1, exists) {
            Ok(q) => q,
            Err(s) => return s,
        };
        let entries = match self.queue_size(cmd, CQE_SIZE) {
            Ok(e) => e,
            Err(s) => return s,
        };
        let vector = (cmd.cdw11() >> 16) as u16;
        if vector > self.opts.max_queues {
            return Status::INVALID_INTERRUPT_VECTOR;
        }
        self.state.cqs[qid] = Some(CompletionQueue {
            base: cmd.prp1(),
            entries,
            head: 0,
            tail: 0,
            phase: true,
            interrupts: cmd.cdw11() & 2 != 0,
            vector,
        });
        Status::SUCCESS
    }

    fn create_sq(&mut self, cmd: &Command) -> Status {
        let qid = cmd.cdw10() as usize & 0xFFFF;
        let exists = self.state.sqs.get(qid).is_some_and(Option::is_some);
        let qid = match self.new_queue_id(cmd, self.io_queues_granted().0, exists) {
            Ok(q) => q,
            Err(s) => return s,
        };
        let cqid = (cmd.cdw11() >> 16) as u16;
        if cqid == 0
            || self
                .state
                .cqs
                .get(usize::from(cqid))
                .is_none_or(Option::is_none)
        {
            return Status::COMPLETION_QUEUE_INVALID;
        }
        let entries = match self.queue_size(cmd, SQE_SIZE) {
            Ok(e) => e,
            Err(s) => return s,
        };
        self.state.sqs[qid] = Some(SubmissionQueue {
            base: cmd.prp1(),
            entries,
            head: 0,
            tail: 0,
            cqid,
        });
        Status::SUCCESS
    }

    fn delete_sq(&mut self, cmd: &Command) -> Status {
        let qid = (cmd.cdw10() & 0xFFFF) as usize;
        if qid == 0 || self.state.sqs.get(qid).is_none_or(Option::is_none) {
            return Status::INVALID_QUEUE_ID;
        }
        self.state.sqs[qid] = None;
        for p in self.pending.iter_mut().flatten() {
            if usize::from(p.sqid) == qid {
                p.orphan = true;
            }
        }
        for held in &mut self.held {
            held.retain(|c| usize::from(c.sqid) != qid);
        }
        Status::SUCCESS
    }

    fn delete_cq(&mut self, cmd: &Command) -> Status {
        let qid = (cmd.cdw10() & 0xFFFF) as usize;
        if qid == 0 || self.state.cqs.get(qid).is_none_or(Option::is_none) {
            return Status::INVALID_QUEUE_ID;
        }
        if self
            .state
            .sqs
            .iter()
            .flatten()
            .any(|sq| usize::from(sq.cqid) == qid)
        {
            return Status::INVALID_QUEUE_DELETION;
        }
        self.state.cqs[qid] = None;
        self.held[qid].clear();
        self.update_intx();
        Status::SUCCESS
    }

    fn identify(&mut self, cmd: &Command) -> Status {
        let nsid = cmd.nsid();
        let data = match cmd.cdw10() & 0xFF {
            0 if nsid == 1 => self.identify_namespace.clone(),
            0 => return Status::INVALID_NAMESPACE,
            1 => self.identify_controller.clone(),
            // Active namespaces above `nsid`.
            2 if nsid >= 0xFFFF_FFFE => return Status::INVALID_NAMESPACE,
            2 => {
                let mut d = vec![0u8; 4096];
                if nsid == 0 {
                    d[0..4].copy_from_slice(&1u32.to_le_bytes());
                }
                d
            }
            // Namespace identification descriptors: the EUI-64.
            3 if nsid == 1 => {
                let mut d = vec![0u8; 4096];
                d[0] = 1;
                d[1] = 8;
                d[4..12].copy_from_slice(&self.eui64);
                d
            }
            3 => return Status::INVALID_NAMESPACE,
            cns => {
                tracing::debug!("nvme: unsupported identify CNS {cns:#x}");
                return Status::INVALID_FIELD;
            }
        };
        self.write_prps(cmd, &data)
    }

    fn get_log_page(&mut self, cmd: &Command) -> Status {
        let lid = cmd.cdw10() & 0xFF;
        let dwords = (u64::from(cmd.cdw10() >> 16) | u64::from(cmd.cdw11() & 0xFFFF) << 16) + 1;
        let offset = u64::from(cmd.cdw12()) | u64::from(cmd.cdw13()) << 32;
        let page = match lid {
            // Error information: one entry, empty.
            0x01 => vec![0u8; 64],
            // SMART / health: room temperature, full spare, one power cycle.
            0x02 => {
                let mut d = vec![0u8; 512];
                d[1..3].copy_from_slice(&296u16.to_le_bytes());
                d[3] = 100;
                d[4] = 10;
                d[112] = 1;
                d
            }
            // Firmware slots: slot 1 active, revision "1.0".
            0x03 => {
                let mut d = vec![0u8; 512];
                d[0] = 1;
                pad(&mut d[8..16], "1.0");
                d
            }
            // Changed namespaces: none.
            0x04 => vec![0u8; 4096],
            _ => return Status::INVALID_FIELD,
        };
        if offset % 4 != 0 || offset >= page.len() as u64 {
            return Status::INVALID_FIELD;
        }
        let len = (dwords * 4).min(page.len() as u64 - offset) as usize;
        self.write_prps(cmd, &page[offset as usize..offset as usize + len])
    }

    fn feature_supported(fid: u8) -> bool {
        use feature::*;
        matches!(
            fid,
            ARBITRATION
                | POWER_MANAGEMENT
                | TEMPERATURE_THRESHOLD
                | ERROR_RECOVERY
                | NUMBER_OF_QUEUES
                | INTERRUPT_COALESCING
                | INTERRUPT_VECTOR_CONFIG
                | WRITE_ATOMICITY
                | ASYNC_EVENT_CONFIG
        )
    }

    fn set_features(&mut self, cmd: &Command) -> Outcome {
        let fid = (cmd.cdw10() & 0xFF) as u8;
        let value = cmd.cdw11();
        if !Self::feature_supported(fid) {
            return Outcome::Done(0, Status::INVALID_FIELD);
        }
        match fid {
            feature::NUMBER_OF_QUEUES => {
                let (sqs, cqs) = (value & 0xFFFF, value >> 16);
                if sqs == 0xFFFF || cqs == 0xFFFF {
                    return Outcome::Done(0, Status::INVALID_FIELD);
                }
                let max = u32::from(self.opts.max_queues);
                let granted = ((sqs + 1).min(max) - 1) | (((cqs + 1).min(max) - 1) << 16);
                self.state.features[usize::from(fid)] = granted;
                Outcome::Done(granted, Status::SUCCESS)
            }
            feature::INTERRUPT_VECTOR_CONFIG
                if value & 0xFFFF > u32::from(self.opts.max_queues) =>
            {
                Outcome::Done(0, Status::INVALID_FIELD)
            }
            _ => {
                self.state.features[usize::from(fid)] = value;
                Outcome::Done(0, Status::SUCCESS)
            }
        }
    }

    fn get_features(&mut self, cmd: &Command) -> Outcome {
        let fid = (cmd.cdw10() & 0xFF) as u8;
        if !Self::feature_supported(fid) {
            return Outcome::Done(0, Status::INVALID_FIELD);
        }
        // SEL 3 asks for capabilities: nothing is saveable or changeable
        // per namespace.
        if (cmd.cdw10() >> 8) & 7 == 3 {
            return Outcome::Done(0, Status::SUCCESS);
        }
        Outcome::Done(self.state.features[usize::from(fid)], Status::SUCCESS)
    }

    fn io(&mut self, sqid: u16, cmd: &Command) -> Outcome {
        if cmd.fused_or_sgl() {
            return Outcome::Done(0, Status::INVALID_FIELD);
        }
        let op = cmd.opcode();
        let nsid = cmd.nsid();
        if nsid != 1 && !(op == nvm::FLUSH && nsid == 0xFFFF_FFFF) {
            return Outcome::Done(0, Status::INVALID_NAMESPACE);
        }
        let request = match op {
            nvm::FLUSH => Ok(BlockRequest {
                op: BlockOp::Flush,
                offset: 0,
                iovecs: Vec::new(),
            }),
            nvm::READ | nvm::WRITE => self.read_write(cmd, op == nvm::READ),
            nvm::DATASET_MANAGEMENT if self.dsm => {
                return Outcome::Done(0, self.dataset_management(cmd));
            }
            _ => Err(Status::INVALID_OPCODE),
        };
        let request = match request {
            Ok(r) => r,
            Err(s) => {
                tracing::debug!("nvme: SQ {sqid} command {:#x} refused: {s:?}", op);
                return Outcome::Done(0, s);
            }
        };
        let Some(token) = self.free_tokens.pop() else {
            return Outcome::Busy;
        };
        let block_op = request.op;
        // SAFETY: the iovecs address guest memory mapped by `self.mem`,
        // which outlives the queue (field order) and every request in it
        // (reset and drop quiesce the queue first).
        if unsafe { self.queue.submit(&self.disk, request, token as u64) }.is_err() {
            self.free_tokens.push(token);
            return Outcome::Busy;
        }
        self.pending[token] = Some(Pending {
            sqid,
            cid: cmd.cid(),
            op: block_op,
            orphan: false,
        });
        Outcome::Submitted
    }

    fn read_write(&self, cmd: &Command, read: bool) -> Result<BlockRequest, Status> {
        let slba = u64::from(cmd.cdw10()) | u64::from(cmd.cdw11()) << 32;
        let blocks = u64::from(cmd.cdw12() & 0xFFFF) + 1;
        if slba.checked_add(blocks).is_none_or(|end| end > self.lbas) {
            return Err(Status::LBA_OUT_OF_RANGE);
        }
        if !read && self.disk.readonly() {
            return Err(Status::NAMESPACE_WRITE_PROTECTED);
        }
        let len = blocks << self.lba_shift;
        let segs = self.prp_segments(cmd.prp1(), cmd.prp2(), len)?;
        Ok(BlockRequest {
            op: if read { BlockOp::Read } else { BlockOp::Write },
            offset: slba << self.lba_shift,
            iovecs: self.iovecs(&segs)?,
        })
    }

    /// Dataset Management: deallocate (discard) the listed ranges.
    fn dataset_management(&self, cmd: &Command) -> Status {
        let ranges = (cmd.cdw10() & 0xFF) as usize + 1;
        let deallocate = cmd.cdw11() & 4 != 0;
        let list = match self.read_prps(cmd, ranges * 16) {
            Ok(l) => l,
            Err(s) => return s,
        };
        if !deallocate {
            return Status::SUCCESS;
        }
        if self.disk.readonly() {
            return Status::NAMESPACE_WRITE_PROTECTED;
        }
        let mut work = Vec::with_capacity(ranges);
        for r in list.chunks_exact(16) {
            let blocks = u64::from(u32::from_le_bytes(r[4..8].try_into().unwrap_or_default()));
            let slba = u64::from_le_bytes(r[8..16].try_into().unwrap_or_default());
            if blocks == 0 {
                continue;
            }
            if slba.checked_add(blocks).is_none_or(|end| end > self.lbas) {
                return Status::LBA_OUT_OF_RANGE;
            }
            work.push((slba << self.lba_shift, blocks << self.lba_shift));
        }
        // Deallocation is advisory: a backing that cannot discard (dsm=enable)
        // keeps its data, which the spec allows.
        if !self.disk.can_delete() {
            return Status::SUCCESS;
        }
        for (offset, len) in work {
            if let Err(e) = self.disk.discard(offset, len) {
                tracing::warn!("nvme: discard of {len} bytes at {offset:#x} failed: {e}");
                return Status::INTERNAL_ERROR;
            }
        }
        Status::SUCCESS
    }
}

impl Drop for Nvme {
    fn drop(&mut self) {
        // Wake the I/O thread so it sees the controller is gone.
        self.wake();
    }
}

/// The I/O thread: runs what register writes and doorbells asked for and
/// posts what the back end finished. Ends with the controller.
fn io_thread(kick: EventFd, done: EventFd, nvme: Weak<Mutex<Nvme>>) {
    loop {
        let mut fds = [kick.as_raw_fd(), done.as_raw_fd()].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        // ppoll, not poll: io_uring's task work interrupts the wait, and an
        // interrupted poll comes back through restart_syscall, which the
        // sandbox does not allow; ppoll is simply re-run.
        // SAFETY: two pollfds we own, for the duration of the call; no
        // timeout, no signal mask.
        let r = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, std::ptr::null(), std::ptr::null()) };
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            tracing::error!(
                "nvme: I/O thread poll failed: {}",
                io::Error::last_os_error()
            );
            return;
        }
        let _ = kick.read();
        let Some(nvme) = nvme.upgrade() else {
            return;
        };
        let mut nvme = nvme.lock().unwrap_or_else(|e| e.into_inner());
        nvme.run();
    }
}

/// A submission queue entry.
struct Command([u8; SQE_SIZE as usize]);

impl Command {
    fn dword(&self, n: usize) -> u32 {
        u32::from_le_bytes(self.0[n * 4..n * 4 + 4].try_into().unwrap_or_default())
    }
    fn opcode(&self) -> u8 {
        self.0[0]
    }
    /// Fused operations and SGL data pointers are not offered.
    fn fused_or_sgl(&self) -> bool {
        self.0[1] & 0xC3 != 0
    }
    fn cid(&self) -> u16 {
        (self.dword(0) >> 16) as u16
    }
    fn nsid(&self) -> u32 {
        self.dword(1)
    }
    fn prp1(&self) -> u64 {
        u64::from(self.dword(6)) | u64::from(self.dword(7)) << 32
    }
    fn prp2(&self) -> u64 {
        u64::from(self.dword(8)) | u64::from(self.dword(9)) << 32
    }
    fn cdw10(&self) -> u32 {
        self.dword(10)
    }
    fn cdw11(&self) -> u32 {
        self.dword(11)
    }
    fn cdw12(&self) -> u32 {
        self.dword(12)
    }
    fn cdw13(&self) -> u32 {
        self.dword(13)
    }
}

impl PciFunction for Nvme {
    fn config(&self) -> &PciConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfigSpace {
        &mut self.config
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if self.config.msix_read(bar, offset, data) {
            return;
        }
        if bar != REG_BAR || offset >= DOORBELLS {
            data.fill(0);
            return;
        }
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            *b = self.read_register(at & !3).to_le_bytes()[(at & 3) as usize];
        }
    }

    /// Dword writes (a qword is two); anything else is dropped.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if self.config.msix_write(bar, offset, data) || bar != REG_BAR {
            return;
        }
        let dword = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let doorbells_end = DOORBELLS + 8 * (u64::from(self.opts.max_queues) + 1);
        match (data.len(), offset) {
            (4, o) if o % 4 == 0 && (DOORBELLS..doorbells_end).contains(&o) => {
                self.doorbell(o, dword(data))
            }
            (4, o) if o % 4 == 0 && o < DOORBELLS => self.write_register(o, dword(data)),
            (8, o) if o % 8 == 0 && o < DOORBELLS => {
                self.write_register(o, dword(&data[0..4]));
                self.write_register(o + 4, dword(&data[4..8]));
            }
            (len, o) => tracing::debug!("nvme: dropping a {len}-byte write at {o:#x}"),
        }
    }

    fn pause(&mut self) {
        self.paused = true;
    }

    /// Every command handed to the back end has completed and been posted
    /// (or held for room), and no reset or shutdown is half done.
    fn quiesced(&self) -> bool {
        self.pending.iter().all(Option::is_none)
            && !self.state.reset_pending
            && !self.state.shutdown_pending
    }

    fn resume(&mut self) {
        self.paused = false;
        // Doorbells rung while paused are fetched now.
        self.wake();
    }

    fn save_device(&self) -> Result<Option<DeviceState>, SnapshotError> {
        if !self.quiesced() {
            return Err(SnapshotError::Device {
                id: "nvme".into(),
                why: "saved with commands in flight".into(),
            });
        }
        let saved = NvmeSnapshot {
            state: self.state.clone(),
            held: self
                .held
                .iter()
                .map(|q| q.iter().copied().collect())
                .collect(),
            namespace: self.shape(),
        };
        DeviceState::encode("nvme", &saved).map(Some)
    }

    fn restore_device(&mut self, saved: Option<&DeviceState>) -> Result<(), SnapshotError> {
        let saved: NvmeSnapshot = saved
            .ok_or_else(|| SnapshotError::Mismatch("an NVMe controller without its state".into()))?
            .decode()?;
        let differences = saved.namespace.differences(&self.shape());
        if !differences.is_empty() {
            return Err(SnapshotError::Mismatch(format!(
                "nvme: the snapshot's controller differs from this command line's: {}",
                differences.join(", ")
            )));
        }
        if saved.state.reset_pending || saved.state.shutdown_pending {
            return Err(SnapshotError::Mismatch(
                "nvme: the snapshot has a reset or shutdown in progress".into(),
            ));
        }
        self.check_saved(&saved)
            .map_err(|why| SnapshotError::Mismatch(format!("nvme: bad saved state: {why}")))?;
        self.state = saved.state;
        self.held = saved.held.into_iter().map(VecDeque::from).collect();
        // Resumed (doorbells rung before the snapshot fetched) by the inventory.
        self.paused = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_is_arc() {
        // CRC-16/ARC check value.
        assert_eq!(crc16(b"123456789"), 0xBB3D);
    }

    #[test]
    fn status_field_layout() {
        assert_eq!(Status::SUCCESS.field(), 0);
        // SC in bits 24:17, SCT in 27:25, DNR in 31.
        assert_eq!(
            Status::INVALID_QUEUE_ID.field(),
            1 << 17 | 1 << 25 | 1 << 31
        );
    }
}
