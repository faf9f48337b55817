//! bhyve's AHCI host bus adapter (`pci_ahci.c`) as a rhyve PCI function.
//!
//! Guest-visible identity as bhyve: Intel ICH8 AHCI (8086:2821, class
//! 01/06/01), AHCI 1.3 registers in memory BAR 5 with all 32 port register
//! sets (bhyve always reports 32 ports, CAP.NP = 31, and 32 command slots),
//! an MSI capability with 16 messages and an INTx pin. Ports listed in
//! `port.N` are SATA disks (`hd`) or ATAPI DVD drives (`cd`) over a
//! [`BlockFile`]; the others answer "no device".
//!
//! Commands are started on the vCPU thread that writes PxCI (or sets
//! PxCMD.ST with commands already issued), as in bhyve: the command header
//! and FIS are decoded there and commands without host I/O (IDENTIFY, SET
//! FEATURES, logs, most ATAPI commands) complete at once. Reads, writes,
//! flushes and TRIMs go to the controller's I/O thread (bhyve's `block_if`
//! worker), which moves data between the backing file and guest memory
//! through the block back end's [`BlockQueue`] (the one virtio-blk and
//! NVMe use; straight into the PRD buffers) without holding the controller
//! lock,
//! then completes the command (D2H FIS, or Set Device Bits for NCQ) and
//! starts the next ones. Non-queued commands keep BSY set while their I/O
//! runs, so they are serialised; NCQ commands are accepted at once and up
//! to 32 per port are in flight. Requests are bounded by the ATA command
//! set (at most 65536 sectors; ATAPI reads are capped at 65535 blocks).
//! A reset drops the completions of I/O started before it.
//!
//! Hostile guests: every guest address goes through `vm-memory`'s checked
//! accessors, the PRD table must cover the whole transfer, LBA ranges are
//! checked against the disk before any I/O, and every command ends with a
//! D2H (or Set Device Bits) FIS, an error one with ABORT when something is
//! wrong, plus a log line. Unlike bhyve, an unrecognised FIS type is failed
//! rather than left issued (bhyve would spin on it), and the error path
//! stops the command loop even when the FIS receive area is disabled.

use rhyve_platform::snapshot::{DeviceState, Schema, SnapshotError};
use rhyve_sandbox::ThreadRole;
use std::io;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, Weak};

use rhyve_backends::block::{
    BlockError, BlockFile, BlockOp, BlockOptions, BlockQueue, BlockRequest,
};
use rhyve_config::{ConfigError, ConfigTree};
use rhyve_pci::{BarKind, PciConfigSpace, PciError, PciFunction};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::atapi::{self, Reply};
use crate::identify::{self, DiskGeometry, DriveIdentity};

/// Guest memory as the VMM hands it to devices.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Intel ICH8 AHCI, the IDs bhyve uses.
pub const VENDOR_ID: u16 = 0x8086;
pub const DEVICE_ID: u16 = 0x2821;
/// Mass storage / SATA / AHCI 1.0.
pub const CLASS: (u8, u8, u8) = (0x01, 0x06, 0x01);
/// The BAR holding the HBA registers (ABAR).
pub const ABAR: usize = 5;
/// Port register sets the HBA presents (bhyve always presents all 32).
pub const MAX_PORTS: usize = 32;
/// Port register sets start here in ABAR, one every [`PORT_STEP`] bytes.
pub const PORT_BASE: u64 = 0x100;
pub const PORT_STEP: u64 = 0x80;
/// MSI messages offered: the port count rounded to a power of two, at most 16.
pub const MSI_MESSAGES: u8 = 16;
const SLOTS: u32 = 32;

/// Generic host control registers (AHCI 1.3 section 3.1).
pub mod hba {
    pub const CAP: u64 = 0x00;
    pub const GHC: u64 = 0x04;
    pub const IS: u64 = 0x08;
    pub const PI: u64 = 0x0C;
    pub const VS: u64 = 0x10;
    pub const CAP2: u64 = 0x24;

    pub const GHC_HR: u32 = 1 << 0;
    pub const GHC_IE: u32 = 1 << 1;
    pub const GHC_AE: u32 = 1 << 31;

    pub const CAP_64BIT: u32 = 1 << 31;
    pub const CAP_SNCQ: u32 = 1 << 30;
    pub const CAP_SSNTF: u32 = 1 << 29;
    pub const CAP_SMPS: u32 = 1 << 28;
    pub const CAP_SSS: u32 = 1 << 27;
    pub const CAP_SALP: u32 = 1 << 26;
    pub const CAP_SAL: u32 = 1 << 25;
    pub const CAP_SCLO: u32 = 1 << 24;
    pub const CAP_ISS_GEN3: u32 = 3 << 20;
    pub const CAP_PMD: u32 = 1 << 15;
    pub const CAP_SSC: u32 = 1 << 14;
    pub const CAP_PSC: u32 = 1 << 13;
    pub const CAP_NCS_SHIFT: u32 = 8;
    pub const CAP_SXS: u32 = 1 << 5;
    pub const CAP2_APST: u32 = 1 << 2;
    /// AHCI 1.3.
    pub const VERSION: u32 = 0x0001_0300;
}

/// Port registers (AHCI 1.3 section 3.3), offsets inside a port's set.
pub mod port {
    pub const CLB: u64 = 0x00;
    pub const CLBU: u64 = 0x04;
    pub const FB: u64 = 0x08;
    pub const FBU: u64 = 0x0C;
    pub const IS: u64 = 0x10;
    pub const IE: u64 = 0x14;
    pub const CMD: u64 = 0x18;
    pub const TFD: u64 = 0x20;
    pub const SIG: u64 = 0x24;
    pub const SSTS: u64 = 0x28;
    pub const SCTL: u64 = 0x2C;
    pub const SERR: u64 = 0x30;
    pub const SACT: u64 = 0x34;
    pub const CI: u64 = 0x38;
    pub const SNTF: u64 = 0x3C;
    pub const FBS: u64 = 0x40;

    pub const IS_DHRS: u32 = 1 << 0;
    pub const IS_PSS: u32 = 1 << 1;
    pub const IS_SDBS: u32 = 1 << 3;
    pub const IS_TFES: u32 = 1 << 30;
    /// Interrupt enable bits a guest may set.
    pub const IE_WRITABLE: u32 = 0xFDC0_00FF;

    pub const CMD_ST: u32 = 1 << 0;
    pub const CMD_SUD: u32 = 1 << 1;
    pub const CMD_POD: u32 = 1 << 2;
    pub const CMD_CLO: u32 = 1 << 3;
    pub const CMD_FRE: u32 = 1 << 4;
    pub const CMD_CCS_SHIFT: u32 = 8;
    pub const CMD_CCS_MASK: u32 = 0x1F << 8;
    pub const CMD_FR: u32 = 1 << 14;
    pub const CMD_CR: u32 = 1 << 15;
    pub const CMD_CPS: u32 = 1 << 16;
    pub const CMD_APSTE: u32 = 1 << 23;
    pub const CMD_ATAPI: u32 = 1 << 24;
    pub const CMD_DLAE: u32 = 1 << 25;
    pub const CMD_ALPE: u32 = 1 << 26;
    pub const CMD_ASP: u32 = 1 << 27;
    pub const CMD_ICC_MASK: u32 = 0xF << 28;

    pub const SSTS_DET_PHY_ONLINE: u32 = 0x3;
    pub const SSTS_IPM_ACTIVE: u32 = 0x100;
    /// bhyve's value for a generation 3 link (its ahci.h says 0x40).
    pub const SSTS_SPD_DEFAULT: u32 = 0x40;
    pub const SCTL_SPD_MASK: u32 = 0xF0;
    pub const SCTL_DET_RESET: u32 = 0x1;

    pub const SIG_ATA: u32 = 0x0000_0101;
    pub const SIG_ATAPI: u32 = 0xEB14_0101;
}

/// ATA status and error bits, command opcodes and FIS types.
pub mod ata {
    pub const S_ERR: u32 = 0x01;
    pub const S_DRQ: u32 = 0x08;
    pub const S_DSC: u32 = 0x10;
    pub const S_DMA: u32 = 0x20;
    pub const S_READY: u32 = 0x40;
    pub const S_BUSY: u32 = 0x80;
    pub const E_ABORT: u32 = 0x04;

    /// Good completion status.
    pub const OK: u32 = S_READY | S_DSC;
    /// Command aborted.
    pub const ABORTED: u32 = (E_ABORT << 8) | S_READY | S_ERR;

    pub const FIS_REG_H2D: u8 = 0x27;
    pub const FIS_REG_D2H: u8 = 0x34;
    pub const FIS_PIO_SETUP: u8 = 0x5F;
    pub const FIS_SET_DEVICE_BITS: u8 = 0xA1;

    pub const NOP: u8 = 0x00;
    pub const DATA_SET_MANAGEMENT: u8 = 0x06;
    pub const READ: u8 = 0x20;
    pub const READ48: u8 = 0x24;
    pub const READ_DMA48: u8 = 0x25;
    pub const READ_MUL48: u8 = 0x29;
    pub const READ_LOG_EXT: u8 = 0x2F;
    pub const WRITE: u8 = 0x30;
    pub const WRITE48: u8 = 0x34;
    pub const WRITE_DMA48: u8 = 0x35;
    pub const WRITE_MUL48: u8 = 0x39;
    pub const READ_VERIFY: u8 = 0x40;
    pub const READ_VERIFY48: u8 = 0x42;
    pub const READ_LOG_DMA_EXT: u8 = 0x47;
    pub const READ_FPDMA_QUEUED: u8 = 0x60;
    pub const WRITE_FPDMA_QUEUED: u8 = 0x61;
    pub const SEND_FPDMA_QUEUED: u8 = 0x64;
    pub const PACKET: u8 = 0xA0;
    pub const ATAPI_IDENTIFY: u8 = 0xA1;
    pub const SMART: u8 = 0xB0;
    pub const READ_MUL: u8 = 0xC4;
    pub const WRITE_MUL: u8 = 0xC5;
    pub const SET_MULTI: u8 = 0xC6;
    pub const READ_DMA: u8 = 0xC8;
    pub const WRITE_DMA: u8 = 0xCA;
    pub const IDLE_IMMEDIATE: u8 = 0xE1;
    pub const STANDBY_IMMEDIATE: u8 = 0xE0;
    pub const STANDBY: u8 = 0xE2;
    pub const IDLE: u8 = 0xE3;
    pub const CHECK_POWER_MODE: u8 = 0xE5;
    pub const SLEEP: u8 = 0xE6;
    pub const FLUSH_CACHE: u8 = 0xE7;
    pub const FLUSH_CACHE48: u8 = 0xEA;
    pub const IDENTIFY: u8 = 0xEC;
    pub const SET_FEATURES: u8 = 0xEF;
    pub const SECURITY_FREEZE_LOCK: u8 = 0xF5;

    pub const DSM_TRIM: u8 = 0x01;
    /// SEND FPDMA QUEUED subcommand: DATA SET MANAGEMENT.
    pub const SFQ_DSM: u8 = 0x00;

    pub const SF_ENABLE_WCACHE: u8 = 0x02;
    pub const SF_SET_XFER: u8 = 0x03;
    pub const SF_ENABLE_SATA_FEATURE: u8 = 0x10;
    pub const SF_DISABLE_RCACHE: u8 = 0x55;
    pub const SF_DISABLE_WCACHE: u8 = 0x82;
    pub const SF_ENABLE_RCACHE: u8 = 0xAA;
    /// SATA feature: asynchronous notification.
    pub const SATA_FEATURE_AN: u8 = 0x05;
}

/// Byte offsets of FISes in the received-FIS area.
const RFIS_PIO_SETUP: u64 = 0x20;
const RFIS_D2H: u64 = 0x40;
const RFIS_SDB: u64 = 0x58;
/// Command table: ATAPI command at 0x40, PRD table at 0x80.
const CT_ACMD: u64 = 0x40;
const CT_PRDT: u64 = 0x80;
const PRD_SIZE: u64 = 16;
const PRD_DBC_MASK: u32 = 0x3F_FFFF;

#[derive(Debug, thiserror::Error)]
pub enum AhciError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(transparent)]
    Pci(#[from] PciError),
    #[error("invalid value \"{value}\" for \"{key}\"")]
    BadValue { key: String, value: String },
    #[error("ahci port {0}: there are only {MAX_PORTS} ports")]
    NoSuchPort(usize),
    #[error("ahci port {0} given twice")]
    DuplicatePort(usize),
    #[error("cannot start the AHCI I/O thread: {0}")]
    Thread(io::Error),
}

/// What a port holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DriveKind {
    /// A SATA disk (`hd`).
    Disk,
    /// An ATAPI DVD drive (`cd`).
    Cdrom,
}

/// A drive to attach to a port: its backing file and identity strings.
pub struct DriveSpec {
    pub kind: DriveKind,
    pub file: BlockFile,
    pub identity: DriveIdentity,
}

impl DriveSpec {
    /// bhyve's defaults: serial from the MD5 of `path`, revision "001",
    /// model "BHYVE SATA DISK" or "BHYVE SATA DVD ROM", no rotation rate.
    pub fn new(kind: DriveKind, file: BlockFile, path: &str) -> Self {
        let model = match kind {
            DriveKind::Disk => identify::DISK_MODEL,
            DriveKind::Cdrom => identify::CDROM_MODEL,
        };
        Self {
            kind,
            file,
            identity: DriveIdentity {
                serial: identify::serial_from_path(path).into_bytes(),
                revision: identify::DEFAULT_REVISION.as_bytes().to_vec(),
                model: model.as_bytes().to_vec(),
                rotation_rate: 0,
            },
        }
    }
}

/// One port's registers (AHCI 1.3 section 3.3).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRegs {
    pub clb: u32,
    pub clbu: u32,
    pub fb: u32,
    pub fbu: u32,
    pub is: u32,
    pub ie: u32,
    pub cmd: u32,
    pub tfd: u32,
    pub sig: u32,
    pub ssts: u32,
    pub sctl: u32,
    pub serr: u32,
    pub sact: u32,
    pub ci: u32,
    pub sntf: u32,
    pub fbs: u32,
}

/// One port: registers, the attached drive's identity and the device state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortState {
    pub regs: PortRegs,
    pub drive: Option<DriveKind>,
    pub identity: Option<DriveIdentity>,
    /// A control FIS with SRST set was seen; the next one without it resets.
    pub soft_reset: bool,
    /// A command failed: nothing more runs until the driver restarts the port.
    pub wait_for_clear: bool,
    pub mult_sectors: u8,
    /// Transfer mode from SET FEATURES (ATA encoding).
    pub xfer_mode: u8,
    /// The failed command, for the NCQ command error log (log page 10h).
    pub error_log: [u8; 20],
    /// ATAPI sense of the last failed packet command.
    pub sense_key: u8,
    pub asc: u8,
    /// Next command slot the loop looks at (PxCMD.CCS).
    pub ccs: u32,
    /// Slots whose host I/O is with the I/O thread.
    pub pending: u32,
    /// Bumped by every reset: completions of older I/O are dropped.
    pub generation: u64,
}

/// The whole HBA state, as a snapshot would store it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AhciState {
    pub cap: u32,
    pub ghc: u32,
    pub is: u32,
    pub pi: u32,
    pub vs: u32,
    pub cap2: u32,
    /// INTx asserted by the HBA (bhyve's `lintr`).
    pub intx: bool,
    pub ports: Vec<PortState>,
}

/// A command fetched from the command list.
#[derive(Clone)]
struct Command {
    slot: u32,
    /// Guest address of the command header.
    header: u64,
    prdtl: u16,
    /// Guest address of the command table.
    table: u64,
    cfis: [u8; 20],
    acmd: [u8; 16],
}

/// How a command completes.
enum Completion {
    /// A D2H register FIS with this status/error (error << 8 | status).
    D2h(u32),
    /// A Set Device Bits FIS (NCQ) with this status/error.
    Ncq(u32),
    /// Handed to the I/O thread, which completes it.
    Queued,
}

/// Host I/O a command leaves to the I/O thread.
enum Io {
    /// `len` bytes at byte `offset` of the drive, to the guest or from it.
    Transfer {
        offset: u64,
        len: u64,
        to_guest: bool,
    },
    Flush,
    /// Byte ranges to discard (already checked against the disk).
    Discard(Vec<(u64, u64)>),
}

/// How a command reports the outcome of its I/O.
#[derive(Debug, Clone, Copy)]
enum Finish {
    D2h,
    Ncq,
    Atapi,
}

/// One command's I/O, as the I/O thread receives it.
struct Job {
    port: usize,
    generation: u64,
    cmd: Command,
    cfis: [u8; 20],
    file: Arc<BlockFile>,
    io: Io,
    finish: Finish,
}

impl Job {
    fn run(&self, mem: &GuestMemory, queue: &mut BlockQueue) -> Result<(), String> {
        match &self.io {
            Io::Transfer {
                offset,
                len,
                to_guest,
            } => dma(mem, &self.file, queue, &self.cmd, *offset, *len, *to_guest),
            Io::Flush => self.file.flush().map_err(|e| format!("flush: {e}")),
            Io::Discard(ranges) => ranges.iter().try_for_each(|&(offset, len)| {
                self.file
                    .discard(offset, len)
                    .map_err(|e| format!("discard of {len} bytes at {offset:#x}: {e}"))
            }),
        }
    }
}

/// The I/O thread: runs jobs in order, then completes each under the
/// controller lock. Ends with the controller (its job sender is dropped).
fn io_thread(jobs: Receiver<Job>, ahci: Weak<Mutex<Ahci>>, mem: GuestMemory) {
    // One block back-end queue per port, made on its first transfer.
    let mut queues: Vec<Option<BlockQueue>> = (0..MAX_PORTS).map(|_| None).collect();
    while let Ok(job) = jobs.recv() {
        let result = match queues.get_mut(job.port) {
            Some(slot @ None) => match BlockQueue::new(&job.file, 1) {
                Ok(q) => job.run(&mem, slot.insert(q)),
                Err(e) => Err(format!("block queue: {e}")),
            },
            Some(Some(q)) => job.run(&mem, q),
            None => Err(format!("no port {}", job.port)),
        };
        let Some(ahci) = ahci.upgrade() else {
            return;
        };
        let mut ahci = ahci.lock().unwrap_or_else(|e| e.into_inner());
        ahci.finish(job, result);
    }
}

/// The AHCI controller.
pub struct Ahci {
    config: PciConfigSpace,
    state: AhciState,
    files: Vec<Option<Arc<BlockFile>>>,
    mem: GuestMemory,
    jobs: Sender<Job>,
    /// Snapshot pause: no new command starts; those with the I/O thread finish.
    paused: bool,
}

impl Schema for AhciState {
    const KIND: &'static str = "ahci";
    const VERSION: u32 = 1;
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn lba48(cfis: &[u8; 20]) -> u64 {
    u64::from(cfis[4])
        | u64::from(cfis[5]) << 8
        | u64::from(cfis[6]) << 16
        | u64::from(cfis[8]) << 24
        | u64::from(cfis[9]) << 32
        | u64::from(cfis[10]) << 40
}

fn read_guest(mem: &GuestMemory, addr: u64, buf: &mut [u8]) -> Result<(), String> {
    addr.checked_add(buf.len() as u64)
        .ok_or_else(|| format!("guest address {addr:#x} wraps"))?;
    mem.read_slice(buf, GuestAddress(addr))
        .map_err(|e| format!("guest memory at {addr:#x}+{:#x}: {e}", buf.len()))
}

fn write_guest(mem: &GuestMemory, addr: u64, buf: &[u8]) -> Result<(), String> {
    addr.checked_add(buf.len() as u64)
        .ok_or_else(|| format!("guest address {addr:#x} wraps"))?;
    mem.write_slice(buf, GuestAddress(addr))
        .map_err(|e| format!("guest memory at {addr:#x}+{:#x}: {e}", buf.len()))
}

/// The PRD entry `i` of `cmd`: (data base address, byte count).
fn prd(mem: &GuestMemory, cmd: &Command, i: u64) -> Result<(u64, u64), String> {
    let mut e = [0u8; PRD_SIZE as usize];
    read_guest(mem, cmd.table + CT_PRDT + i * PRD_SIZE, &mut e)?;
    let dba = u64::from(le32(&e[0..4])) | u64::from(le32(&e[4..8])) << 32;
    let dbc = u64::from(le32(&e[12..16]) & PRD_DBC_MASK) + 1;
    Ok((dba, dbc))
}

/// The guest segments of `cmd`'s PRD table covering exactly `len` bytes;
/// a table too short for the transfer is an error.
fn scatter_list(mem: &GuestMemory, cmd: &Command, len: u64) -> Result<Vec<(u64, u64)>, String> {
    let mut left = len;
    let mut segs = Vec::new();
    for i in 0..u64::from(cmd.prdtl) {
        if left == 0 {
            break;
        }
        let (dba, dbc) = prd(mem, cmd, i)?;
        let n = dbc.min(left);
        segs.push((dba, n));
        left -= n;
    }
    if left > 0 {
        return Err(format!(
            "{} PRD entries cover {} of {len} bytes",
            cmd.prdtl,
            len - left
        ));
    }
    Ok(segs)
}

/// Copy `data` into the buffers of `cmd`'s PRD table (as far as they
/// reach) and record the byte count in the command header.
fn write_prdt(mem: &GuestMemory, cmd: &Command, data: &[u8]) -> Result<(), String> {
    let mut done = 0usize;
    for i in 0..u64::from(cmd.prdtl) {
        if done == data.len() {
            break;
        }
        let (dba, dbc) = prd(mem, cmd, i)?;
        let n = (dbc as usize).min(data.len() - done);
        write_guest(mem, dba, &data[done..done + n])?;
        done += n;
    }
    set_prdbc(mem, cmd, done as u32)
}

/// Read up to `buf.len()` bytes from the buffers of `cmd`'s PRD table;
/// returns how many there were.
fn read_prdt(mem: &GuestMemory, cmd: &Command, buf: &mut [u8]) -> Result<usize, String> {
    let mut done = 0usize;
    for i in 0..u64::from(cmd.prdtl) {
        if done == buf.len() {
            break;
        }
        let (dba, dbc) = prd(mem, cmd, i)?;
        let n = (dbc as usize).min(buf.len() - done);
        read_guest(mem, dba, &mut buf[done..done + n])?;
        done += n;
    }
    Ok(done)
}

/// PRDBC: bytes transferred, in the command header.
fn set_prdbc(mem: &GuestMemory, cmd: &Command, n: u32) -> Result<(), String> {
    write_guest(mem, cmd.header + 4, &n.to_le_bytes())
}

/// Move `len` bytes at byte `offset` of `file` to (`to_guest`) or from the
/// guest buffers of `cmd`, through the block back end's queue straight
/// into or out of guest memory.
fn dma(
    mem: &GuestMemory,
    file: &BlockFile,
    queue: &mut BlockQueue,
    cmd: &Command,
    offset: u64,
    len: u64,
    to_guest: bool,
) -> Result<(), String> {
    match offset.checked_add(len) {
        Some(end) if end <= file.size() => {}
        _ => {
            return Err(format!(
                "{len} bytes at {offset:#x} are beyond the end of the {}-byte disk",
                file.size()
            ))
        }
    }
    let mut iovecs: Vec<libc::iovec> = Vec::new();
    for (addr, seg_len) in scatter_list(mem, cmd, len)? {
        let slice = mem
            .get_slice(GuestAddress(addr), seg_len as usize)
            .map_err(|e| format!("guest memory at {addr:#x}+{seg_len:#x}: {e}"))?;
        iovecs.push(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr() as *mut libc::c_void,
            iov_len: seg_len as usize,
        });
    }
    // At most IOV_MAX buffers per request (a PRD table may hold 65535).
    let mut at = offset;
    for part in iovecs.chunks(1024) {
        let req = BlockRequest {
            op: if to_guest {
                BlockOp::Read
            } else {
                BlockOp::Write
            },
            offset: at,
            iovecs: part.to_vec(),
        };
        let start = at;
        at += part.iter().map(|v| v.iov_len as u64).sum::<u64>();
        // SAFETY: the iovecs point into `mem`, which the I/O thread holds
        // until it returns; the request is waited for right here.
        unsafe { queue.submit(file, req, 0) }.map_err(|_| "the block queue is full".to_string())?;
        queue.commit();
        let mut done = Vec::with_capacity(1);
        while done.is_empty() {
            queue.wait();
            queue.reap(&mut done);
        }
        if let Some((_, Err(e))) = done.pop() {
            return Err(format!("backing file at {start:#x}: {e}"));
        }
    }
    set_prdbc(mem, cmd, len as u32)
}

impl Ahci {
    /// An HBA with `drives` attached (port number, drive) over guest
    /// memory `mem`, with its I/O thread running.
    pub fn new(
        drives: Vec<(usize, DriveSpec)>,
        mem: GuestMemory,
    ) -> Result<Arc<Mutex<Self>>, AhciError> {
        let mut ports: Vec<PortState> = (0..MAX_PORTS)
            .map(|_| PortState {
                regs: PortRegs::default(),
                drive: None,
                identity: None,
                soft_reset: false,
                wait_for_clear: false,
                mult_sectors: 128,
                xfer_mode: identify::XFER_UDMA6,
                error_log: [0; 20],
                sense_key: 0,
                asc: 0,
                ccs: 0,
                pending: 0,
                generation: 0,
            })
            .collect();
        let mut files: Vec<Option<Arc<BlockFile>>> = (0..MAX_PORTS).map(|_| None).collect();
        let mut pi = 0u32;
        for (n, spec) in drives {
            if n >= MAX_PORTS {
                return Err(AhciError::NoSuchPort(n));
            }
            if files[n].is_some() {
                return Err(AhciError::DuplicatePort(n));
            }
            ports[n].drive = Some(spec.kind);
            ports[n].identity = Some(spec.identity);
            files[n] = Some(Arc::new(spec.file));
            pi |= 1 << n;
        }
        let cap = hba::CAP_64BIT
            | hba::CAP_SNCQ
            | hba::CAP_SSNTF
            | hba::CAP_SMPS
            | hba::CAP_SSS
            | hba::CAP_SALP
            | hba::CAP_SAL
            | hba::CAP_SCLO
            | hba::CAP_ISS_GEN3
            | hba::CAP_PMD
            | hba::CAP_SSC
            | hba::CAP_PSC
            | (SLOTS - 1) << hba::CAP_NCS_SHIFT
            | hba::CAP_SXS
            | (MAX_PORTS as u32 - 1);
        let mut config = PciConfigSpace::new(VENDOR_ID, DEVICE_ID, CLASS.0, CLASS.1, CLASS.2);
        config.add_msi_capability(MSI_MESSAGES)?;
        config.add_bar(
            ABAR,
            BarKind::Mem32,
            PORT_BASE + MAX_PORTS as u64 * PORT_STEP,
        )?;
        config.request_intx();
        let (jobs, queue) = mpsc::channel();
        let mut ahci = Self {
            config,
            state: AhciState {
                cap,
                ghc: 0,
                is: 0,
                pi,
                vs: hba::VERSION,
                cap2: hba::CAP2_APST,
                intx: false,
                ports,
            },
            files,
            mem: mem.clone(),
            jobs,
            paused: false,
        };
        ahci.reset();
        let ahci = Arc::new(Mutex::new(ahci));
        let weak = Arc::downgrade(&ahci);
        rhyve_sandbox::spawn(ThreadRole::DeviceIo, "ahci-io", move || {
            io_thread(queue, weak, mem)
        })
        .map_err(AhciError::Thread)?;
        Ok(ahci)
    }

    /// Build from config node `node` (`pci.B.S.F`): ports from
    /// `port.N.type` (`hd` or `cd`), `port.N.path` and the block options,
    /// identity overrides from `ser`, `rev`, `model` and `nmrr`.
    pub fn from_config(
        tree: &ConfigTree,
        node: &str,
        mem: GuestMemory,
    ) -> Result<Arc<Mutex<Self>>, AhciError> {
        let mut drives = Vec::new();
        for n in 0..MAX_PORTS {
            let pnode = format!("{node}.port.{n}");
            let key = |k: &str| format!("{pnode}.{k}");
            let Some(kind) = tree.get(&key("type"))? else {
                continue;
            };
            let kind = match kind.as_str() {
                "hd" => DriveKind::Disk,
                "cd" => DriveKind::Cdrom,
                _ => {
                    return Err(AhciError::BadValue {
                        key: key("type"),
                        value: kind,
                    })
                }
            };
            let mut opts = BlockOptions::from_config(tree, &pnode)?;
            // Nothing a guest does through ATAPI writes to the medium.
            opts.readonly |= kind == DriveKind::Cdrom;
            let file = BlockFile::open(&opts)?;
            let path = tree.get(&key("path"))?.unwrap_or_default();
            let mut spec = DriveSpec::new(kind, file, &path);
            if let Some(v) = tree.get(&key("ser"))? {
                spec.identity.serial = v.into_bytes();
            }
            if let Some(v) = tree.get(&key("rev"))? {
                spec.identity.revision = v.into_bytes();
            }
            if let Some(v) = tree.get(&key("model"))? {
                spec.identity.model = v.into_bytes();
            }
            if let Some(v) = tree.get(&key("nmrr"))? {
                spec.identity.rotation_rate =
                    v.trim().parse().map_err(|_| AhciError::BadValue {
                        key: key("nmrr"),
                        value: v.clone(),
                    })?;
            }
            drives.push((n, spec));
        }
        Self::new(drives, mem)
    }

    pub fn state(&self) -> &AhciState {
        &self.state
    }

    // ---- interrupts ----

    /// bhyve's `ahci_port_intr`: a port event.
    fn port_interrupt(&mut self, p: usize) {
        let r = &self.state.ports[p].regs;
        if r.is & r.ie == 0 {
            return;
        }
        let bit = 1u32 << p;
        let nmsg = usize::from(self.config.msi_vectors_enabled());
        // A port with its own MSI message always interrupts.
        if nmsg > 0 && (MAX_PORTS <= nmsg || p + 1 < nmsg) {
            self.state.is |= bit;
            if self.state.ghc & hba::GHC_IE != 0 {
                self.config.msi_notify(p as u8);
            }
            return;
        }
        if self.state.is & bit != 0 {
            return;
        }
        self.state.is |= bit;
        if self.state.ghc & hba::GHC_IE == 0 {
            return;
        }
        if nmsg > 0 {
            self.config.msi_notify((nmsg - 1) as u8);
        } else if !self.state.intx {
            self.state.intx = true;
            self.config.intx_assert();
        }
    }

    /// bhyve's `ahci_generate_intr`: after a write to GHC or IS.
    fn generate_interrupt(&mut self, mask: u32) {
        for (p, port) in self.state.ports.iter().enumerate() {
            if port.regs.is & port.regs.ie != 0 {
                self.state.is |= 1 << p;
            }
        }
        if self.state.is == 0 || self.state.ghc & hba::GHC_IE == 0 {
            if self.state.intx {
                self.state.intx = false;
                self.config.intx_deassert();
            }
            return;
        }
        let nmsg = usize::from(self.config.msi_vectors_enabled());
        if nmsg == 0 {
            if !self.state.intx {
                self.state.intx = true;
                self.config.intx_assert();
            }
            return;
        }
        for i in 0..nmsg {
            let mmask = if MAX_PORTS <= nmsg || i + 1 < nmsg {
                1u32 << i
            } else {
                u32::MAX << i
            };
            if self.state.is & mask != 0 && mmask & mask != 0 {
                self.config.msi_notify(i as u8);
            }
        }
    }

    // ---- FISes to the guest ----

    /// Post `fis` at `offset` of the port's received-FIS area; `irq` is the
    /// PxIS bit it raises when its I bit is set. An error status makes the
    /// port wait for the driver and raises TFES.
    fn post_fis(&mut self, p: usize, offset: u64, fis: &[u8], irq: u32) {
        let port = &mut self.state.ports[p];
        let mut bits = if fis[1] & 0x40 != 0 { irq } else { 0 };
        if u32::from(fis[2]) & ata::S_ERR != 0 {
            port.wait_for_clear = true;
            bits |= port::IS_TFES;
        }
        if port.regs.cmd & port::CMD_FRE != 0 {
            let base = u64::from(port.regs.fbu) << 32 | u64::from(port.regs.fb);
            if let Err(e) = write_guest(&self.mem, base.wrapping_add(offset), fis) {
                tracing::warn!("ahci port {p}: cannot post a FIS: {e}");
            }
        }
        if bits & !port.regs.is != 0 {
            port.regs.is |= bits;
            self.port_interrupt(p);
        }
    }

    fn d2h(&mut self, p: usize, slot: u32, cfis: &[u8; 20], tfd: u32) {
        let mut fis = [0u8; 20];
        fis[0] = ata::FIS_REG_D2H;
        fis[1] = 0x40;
        fis[2] = tfd as u8;
        fis[3] = (tfd >> 8) as u8;
        fis[4..14].copy_from_slice(&cfis[4..14]);
        let port = &mut self.state.ports[p];
        if tfd & ata::S_ERR != 0 {
            port.error_log[0] = 0x80;
            port.error_log[2] = tfd as u8;
            port.error_log[3] = (tfd >> 8) as u8;
            port.error_log[4..20].copy_from_slice(&cfis[4..20]);
        } else {
            port.regs.ci &= !(1 << slot);
        }
        port.regs.tfd = tfd;
        self.post_fis(p, RFIS_D2H, &fis, port::IS_DHRS);
    }

    /// The D2H FIS that accepts a queued command (no interrupt).
    fn d2h_ncq_accept(&mut self, p: usize, slot: u32) {
        let port = &mut self.state.ports[p];
        port.regs.tfd = ata::OK;
        port.regs.ci &= !(1 << slot);
        let mut fis = [0u8; 20];
        fis[0] = ata::FIS_REG_D2H;
        fis[2] = ata::OK as u8;
        self.post_fis(p, RFIS_D2H, &fis, port::IS_DHRS);
    }

    /// Set Device Bits: a queued command finished.
    fn sdb(&mut self, p: usize, slot: u32, cfis: &[u8; 20], tfd: u32) {
        let status = tfd & 0x77;
        let error = (tfd >> 8) as u8;
        let mut fis = [0u8; 8];
        fis[0] = ata::FIS_SET_DEVICE_BITS;
        fis[1] = 0x40;
        fis[2] = status as u8;
        fis[3] = error;
        let port = &mut self.state.ports[p];
        if status & ata::S_ERR != 0 {
            port.error_log[0] = slot as u8;
            port.error_log[2] = status as u8;
            port.error_log[3] = error;
            port.error_log[4..20].copy_from_slice(&cfis[4..20]);
        } else {
            fis[4..8].copy_from_slice(&(1u32 << slot).to_le_bytes());
            port.regs.sact &= !(1 << slot);
        }
        port.regs.tfd = (port.regs.tfd & !0x77) | status;
        self.post_fis(p, RFIS_SDB, &fis, port::IS_SDBS);
    }

    fn pio_setup(&mut self, p: usize) {
        let mut fis = [0u8; 20];
        fis[0] = ata::FIS_PIO_SETUP;
        self.post_fis(p, RFIS_PIO_SETUP, &fis, port::IS_PSS);
    }

    // ---- resets ----

    /// COMRESET / software reset of port `p`: link up, signature, the
    /// initial D2H FIS.
    fn port_reset(&mut self, p: usize) {
        let port = &mut self.state.ports[p];
        port.generation += 1;
        port.pending = 0;
        port.regs.serr = 0;
        port.regs.sact = 0;
        port.xfer_mode = identify::XFER_UDMA6;
        port.mult_sectors = 128;
        let Some(kind) = port.drive else {
            port.regs.ssts = 0;
            port.regs.sig = 0xFFFF_FFFF;
            port.regs.tfd = 0x7F;
            return;
        };
        let spd = match port.regs.sctl & port::SCTL_SPD_MASK {
            0 => port::SSTS_SPD_DEFAULT,
            s => s,
        };
        port.regs.ssts = port::SSTS_DET_PHY_ONLINE | port::SSTS_IPM_ACTIVE | spd;
        port.regs.tfd = (1 << 8) | ata::S_DSC | ata::S_DMA;
        let mut fis = [0u8; 20];
        fis[0] = ata::FIS_REG_D2H;
        fis[3] = 1;
        fis[4] = 1;
        fis[12] = 1;
        match kind {
            DriveKind::Disk => {
                port.regs.sig = port::SIG_ATA;
                port.regs.tfd |= ata::S_READY;
            }
            DriveKind::Cdrom => {
                port.regs.sig = port::SIG_ATAPI;
                fis[5] = 0x14;
                fis[6] = 0xEB;
            }
        }
        self.post_fis(p, RFIS_D2H, &fis, port::IS_DHRS);
    }

    /// HBA reset (GHC.HR, and at power-on).
    fn reset(&mut self) {
        self.state.ghc = hba::GHC_AE;
        self.state.is = 0;
        if self.state.intx {
            self.state.intx = false;
            self.config.intx_deassert();
        }
        for p in 0..MAX_PORTS {
            let port = &mut self.state.ports[p];
            port.regs.ie = 0;
            port.regs.is = 0;
            port.regs.cmd = port::CMD_SUD | port::CMD_POD;
            if port.drive.is_some() {
                port.regs.cmd |= port::CMD_CPS;
            }
            port.regs.sctl = 0;
            self.port_reset(p);
            // Unlike bhyve, issued commands do not survive the reset (the
            // spec resets PxCI and PxSACT; bhyve would run them again).
            self.check_stopped(p);
        }
    }

    /// PxCMD.ST is clear: once nothing is in flight, the port is idle.
    fn check_stopped(&mut self, p: usize) {
        let port = &mut self.state.ports[p];
        if port.regs.cmd & port::CMD_ST == 0 && port.pending == 0 {
            port.ccs = 0;
            port.regs.cmd &= !(port::CMD_CR | port::CMD_CCS_MASK);
            port.regs.ci = 0;
            port.regs.sact = 0;
            port.wait_for_clear = false;
        }
    }

    // ---- the command loop ----

    /// Start the issued commands of port `p`, from PxCMD.CCS on, until
    /// none is left, the device is busy or one failed. Each visited slot
    /// is started or already in flight, so one sweep is enough.
    fn handle_port(&mut self, p: usize) {
        // Paused: commands the driver issues wait in PxCI until resumed.
        if self.files[p].is_none() || self.paused {
            return;
        }
        for _ in 0..SLOTS {
            let port = &self.state.ports[p];
            if port.regs.cmd & port::CMD_ST == 0
                || port.regs.ci & !port.pending == 0
                || port.regs.tfd & (ata::S_BUSY | ata::S_DRQ) != 0
                || port.wait_for_clear
            {
                break;
            }
            let slot = port.ccs;
            if port.regs.ci & !port.pending & (1 << slot) != 0 {
                let port = &mut self.state.ports[p];
                port.regs.cmd = (port.regs.cmd & !port::CMD_CCS_MASK) | slot << port::CMD_CCS_SHIFT;
                self.handle_slot(p, slot);
            }
            let port = &mut self.state.ports[p];
            port.ccs = (port.ccs + 1) % SLOTS;
        }
    }

    fn fetch(&self, p: usize, slot: u32) -> Result<Command, String> {
        let r = &self.state.ports[p].regs;
        let list = u64::from(r.clbu) << 32 | u64::from(r.clb);
        let header = list
            .checked_add(u64::from(slot) * 32)
            .ok_or("command list address wraps")?;
        let mut h = [0u8; 16];
        read_guest(&self.mem, header, &mut h)?;
        let table = u64::from(le32(&h[8..12])) | u64::from(le32(&h[12..16])) << 32;
        let mut cfis = [0u8; 20];
        read_guest(&self.mem, table, &mut cfis)?;
        let mut acmd = [0u8; 16];
        read_guest(&self.mem, table.wrapping_add(CT_ACMD), &mut acmd)?;
        Ok(Command {
            slot,
            header,
            prdtl: u16::from_le_bytes([h[2], h[3]]),
            table,
            cfis,
            acmd,
        })
    }

    fn handle_slot(&mut self, p: usize, slot: u32) {
        let cmd = match self.fetch(p, slot) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("ahci port {p} slot {slot}: cannot fetch the command: {e}");
                self.d2h(p, slot, &[0; 20], ata::ABORTED);
                return;
            }
        };
        if cmd.cfis[0] != ata::FIS_REG_H2D {
            tracing::warn!(
                "ahci port {p} slot {slot}: FIS type {:#04x} is not a host-to-device register FIS",
                cmd.cfis[0]
            );
            self.d2h(p, slot, &cmd.cfis, ata::ABORTED);
            return;
        }
        if cmd.cfis[1] & 0x80 == 0 {
            // Device control: SRST set, then cleared, resets the device.
            let port = &mut self.state.ports[p];
            if cmd.cfis[15] & 0x04 != 0 {
                port.soft_reset = true;
            } else if port.soft_reset {
                port.soft_reset = false;
                self.port_reset(p);
            }
            self.state.ports[p].regs.ci &= !(1 << slot);
            return;
        }
        self.state.ports[p].regs.tfd |= ata::S_BUSY;
        let mut cfis = cmd.cfis;
        match self.execute(p, &cmd, &mut cfis) {
            Completion::D2h(tfd) => self.d2h(p, slot, &cfis, tfd),
            Completion::Ncq(tfd) => self.sdb(p, slot, &cfis, tfd),
            Completion::Queued => {}
        }
    }

    /// Hand `cmd`'s host I/O to the I/O thread.
    fn queue(
        &mut self,
        p: usize,
        cmd: &Command,
        cfis: &[u8; 20],
        io: Io,
        finish: Finish,
    ) -> Completion {
        let Some(file) = self.files[p].clone() else {
            return Completion::D2h(ata::ABORTED);
        };
        let port = &mut self.state.ports[p];
        let bit = 1u32 << cmd.slot;
        port.pending |= bit;
        let job = Job {
            port: p,
            generation: port.generation,
            cmd: cmd.clone(),
            cfis: *cfis,
            file,
            io,
            finish,
        };
        if self.jobs.send(job).is_err() {
            // Only if the I/O thread died (a panic): fail, never hang.
            tracing::error!("ahci port {p}: the I/O thread is gone");
            self.state.ports[p].pending &= !bit;
            return match finish {
                Finish::Ncq => Completion::Ncq(ata::ABORTED),
                Finish::D2h | Finish::Atapi => Completion::D2h(ata::ABORTED),
            };
        }
        Completion::Queued
    }

    /// The I/O thread finished `job`: complete the command and start the
    /// next ones.
    fn finish(&mut self, job: Job, result: Result<(), String>) {
        let p = job.port;
        let slot = job.cmd.slot;
        let port = &mut self.state.ports[p];
        if port.generation != job.generation {
            tracing::debug!("ahci port {p} slot {slot}: I/O finished after a reset, dropped");
            return;
        }
        port.pending &= !(1 << slot);
        match job.finish {
            Finish::D2h => {
                let tfd = Self::status(p, &job.cmd, result);
                self.d2h(p, slot, &job.cfis, tfd);
            }
            Finish::Ncq => {
                let tfd = Self::status(p, &job.cmd, result);
                self.sdb(p, slot, &job.cfis, tfd);
            }
            Finish::Atapi => {
                let tfd = match result {
                    Ok(()) => ata::OK,
                    Err(e) => {
                        tracing::warn!(
                            "ahci port {p} slot {slot}: ATAPI command {:#04x} failed: {e}",
                            job.cmd.acmd[0]
                        );
                        self.check_condition(
                            p,
                            atapi::SENSE_ILLEGAL_REQUEST,
                            atapi::ASC_LBA_OUT_OF_RANGE,
                        )
                    }
                };
                self.d2h(p, slot, &job.cfis, tfd);
            }
        }
        self.check_stopped(p);
        self.handle_port(p);
    }

    /// Status for `result`, logging failures.
    fn status(p: usize, cmd: &Command, result: Result<(), String>) -> u32 {
        match result {
            Ok(()) => ata::OK,
            Err(e) => {
                tracing::warn!(
                    "ahci port {p} slot {}: command {:#04x} failed: {e}",
                    cmd.slot,
                    cmd.cfis[2]
                );
                ata::ABORTED
            }
        }
    }

    fn is_atapi(&self, p: usize) -> bool {
        self.state.ports[p].drive == Some(DriveKind::Cdrom)
    }

    fn execute(&mut self, p: usize, cmd: &Command, cfis: &mut [u8; 20]) -> Completion {
        use ata::*;
        let atapi = self.is_atapi(p);
        match cfis[2] {
            IDENTIFY if !atapi && cmd.prdtl > 0 => {
                self.pio_setup(p);
                let data = self.identify_data(p);
                Completion::D2h(Self::status(p, cmd, write_prdt(&self.mem, cmd, &data)))
            }
            ATAPI_IDENTIFY if atapi => {
                self.pio_setup(p);
                let data = self.identify_data(p);
                Completion::D2h(Self::status(p, cmd, write_prdt(&self.mem, cmd, &data)))
            }
            SET_FEATURES => Completion::D2h(self.set_features(p, cfis)),
            SET_MULTI => {
                let n = cfis[12];
                if n != 0 && (n > 128 || !n.is_power_of_two()) {
                    Completion::D2h(ABORTED)
                } else {
                    self.state.ports[p].mult_sectors = n;
                    Completion::D2h(OK)
                }
            }
            READ | WRITE | READ48 | WRITE48 | READ_MUL | WRITE_MUL | READ_MUL48 | WRITE_MUL48
            | READ_DMA | WRITE_DMA | READ_DMA48 | WRITE_DMA48 | READ_FPDMA_QUEUED
            | WRITE_FPDMA_QUEUED
                if !atapi =>
            {
                self.read_write(p, cmd, cfis)
            }
            FLUSH_CACHE | FLUSH_CACHE48 if !atapi => {
                self.queue(p, cmd, cfis, Io::Flush, Finish::D2h)
            }
            DATA_SET_MANAGEMENT
                if !atapi
                    && cfis[3] == DSM_TRIM
                    && cfis[11] == 0
                    && cfis[12] == 1
                    && cfis[13] == 0 =>
            {
                match self.trim_ranges(p, cmd) {
                    Ok(r) => self.queue(p, cmd, cfis, Io::Discard(r), Finish::D2h),
                    Err(e) => Completion::D2h(Self::status(p, cmd, Err(e))),
                }
            }
            SEND_FPDMA_QUEUED
                if !atapi
                    && cfis[13] & 0x1F == SFQ_DSM
                    && cfis[16] == DSM_TRIM
                    && cfis[17] == 0
                    && cfis[3] == 1
                    && cfis[11] == 0 =>
            {
                self.d2h_ncq_accept(p, cmd.slot);
                match self.trim_ranges(p, cmd) {
                    Ok(r) => self.queue(p, cmd, cfis, Io::Discard(r), Finish::Ncq),
                    Err(e) => Completion::Ncq(Self::status(p, cmd, Err(e))),
                }
            }
            READ_LOG_EXT | READ_LOG_DMA_EXT => Completion::D2h(self.read_log(p, cmd, cfis)),
            CHECK_POWER_MODE => {
                // Always active.
                cfis[12] = 0xFF;
                Completion::D2h(OK)
            }
            STANDBY | STANDBY_IMMEDIATE | IDLE | IDLE_IMMEDIATE | SLEEP | READ_VERIFY
            | READ_VERIFY48 => Completion::D2h(OK),
            PACKET if atapi => self.packet(p, cmd, cfis),
            SECURITY_FREEZE_LOCK | SMART | NOP => Completion::D2h(ABORTED),
            IDENTIFY | ATAPI_IDENTIFY | PACKET => {
                tracing::debug!(
                    "ahci port {p} slot {}: command {:#04x} is not for this kind of device (or has no buffer)",
                    cmd.slot,
                    cfis[2]
                );
                Completion::D2h(ABORTED)
            }
            other => {
                tracing::warn!(
                    "ahci port {p} slot {}: unsupported command {other:#04x} (features {:#04x}, count {:#04x})",
                    cmd.slot,
                    cfis[3],
                    cfis[12]
                );
                Completion::D2h(ABORTED)
            }
        }
    }

    fn identify_data(&self, p: usize) -> [u8; 512] {
        let port = &self.state.ports[p];
        let empty = DriveIdentity {
            serial: Vec::new(),
            revision: Vec::new(),
            model: Vec::new(),
            rotation_rate: 0,
        };
        let id = port.identity.as_ref().unwrap_or(&empty);
        match (&self.files[p], port.drive) {
            (Some(f), Some(DriveKind::Disk)) => identify::disk(
                id,
                &DiskGeometry {
                    sector_size: f.sector_size(),
                    physical_sector_size: f.physical_sector_size(),
                    size: f.size(),
                    trim: f.can_delete() && !f.readonly(),
                },
                port.xfer_mode,
                port.mult_sectors,
                port.regs.ssts,
            ),
            _ => identify::cdrom(id, port.xfer_mode, port.regs.ssts),
        }
    }

    fn set_features(&mut self, p: usize, cfis: &[u8; 20]) -> u32 {
        use ata::*;
        match cfis[3] {
            SF_ENABLE_SATA_FEATURE if cfis[12] == SATA_FEATURE_AN => OK,
            SF_ENABLE_WCACHE | SF_DISABLE_WCACHE | SF_ENABLE_RCACHE | SF_DISABLE_RCACHE => OK,
            SF_SET_XFER => {
                let mode = cfis[12];
                // Multiword DMA and UltraDMA modes are remembered; PIO
                // modes change nothing for a DMA-only HBA.
                if matches!(mode & 0xF8, 0x20 | 0x40) {
                    self.state.ports[p].xfer_mode = mode;
                }
                OK
            }
            other => {
                tracing::debug!("ahci port {p}: SET FEATURES {other:#04x} refused");
                ABORTED
            }
        }
    }

    fn read_write(&mut self, p: usize, cmd: &Command, cfis: &[u8; 20]) -> Completion {
        use ata::*;
        let op = cfis[2];
        let write = matches!(
            op,
            WRITE
                | WRITE48
                | WRITE_MUL
                | WRITE_MUL48
                | WRITE_DMA
                | WRITE_DMA48
                | WRITE_FPDMA_QUEUED
        );
        let ncq = matches!(op, READ_FPDMA_QUEUED | WRITE_FPDMA_QUEUED);
        let ext = matches!(
            op,
            READ48 | WRITE48 | READ_MUL48 | WRITE_MUL48 | READ_DMA48 | WRITE_DMA48
        );
        // A zero count means 65536 sectors (256 for 28-bit commands).
        let count = |n: u64, max: u64| if n == 0 { max } else { n };
        let (lba, count) = if ncq {
            let n = u16::from_le_bytes([cfis[3], cfis[11]]);
            (lba48(cfis), count(u64::from(n), 65536))
        } else if ext {
            let n = u16::from_le_bytes([cfis[12], cfis[13]]);
            (lba48(cfis), count(u64::from(n), 65536))
        } else {
            let lba = u64::from(cfis[7] & 0xF) << 24
                | u64::from(cfis[6]) << 16
                | u64::from(cfis[5]) << 8
                | u64::from(cfis[4]);
            (lba, count(u64::from(cfis[12]), 256))
        };
        if ncq {
            self.d2h_ncq_accept(p, cmd.slot);
        }
        let (finish, fail): (Finish, fn(u32) -> Completion) = if ncq {
            (Finish::Ncq, Completion::Ncq)
        } else {
            (Finish::D2h, Completion::D2h)
        };
        let io = match &self.files[p] {
            Some(f) => {
                let ss = u64::from(f.sector_size());
                let len = count * ss;
                match lba.checked_mul(ss) {
                    Some(offset) if offset.checked_add(len).is_some_and(|e| e <= f.size()) => {
                        if write && f.readonly() {
                            Err("write to a read-only disk".to_string())
                        } else {
                            Ok(Io::Transfer {
                                offset,
                                len,
                                to_guest: !write,
                            })
                        }
                    }
                    _ => Err(format!(
                        "{count} sectors at LBA {lba:#x} are beyond the end of the disk"
                    )),
                }
            }
            None => Err("no drive".into()),
        };
        match io {
            Ok(io) => self.queue(p, cmd, cfis, io, finish),
            Err(e) => fail(Self::status(p, cmd, Err(e))),
        }
    }

    /// DATA SET MANAGEMENT TRIM: one 512-byte block of 64 range entries
    /// (48-bit LBA, 16-bit sector count; empty entries are skipped), as
    /// byte ranges checked against the disk.
    fn trim_ranges(&self, p: usize, cmd: &Command) -> Result<Vec<(u64, u64)>, String> {
        let f = self.files[p].as_ref().ok_or("no drive")?;
        if !f.can_delete() || f.readonly() {
            return Err("TRIM on a disk without discard (nodelete or read-only)".into());
        }
        let mut block = [0u8; 512];
        let got = read_prdt(&self.mem, cmd, &mut block)?;
        if got < block.len() {
            return Err(format!("TRIM range block has only {got} bytes"));
        }
        let ss = u64::from(f.sector_size());
        let sectors = f.size() / ss;
        let mut ranges = Vec::new();
        for e in block.chunks_exact(8) {
            let lba = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], 0, 0]);
            let count = u64::from(u16::from_le_bytes([e[6], e[7]]));
            if count == 0 {
                continue;
            }
            if lba + count > sectors {
                return Err(format!(
                    "TRIM of {count} sectors at {lba:#x} beyond the disk"
                ));
            }
            ranges.push((lba * ss, count * ss));
        }
        Ok(ranges)
    }

    /// READ LOG (DMA) EXT of the log directory, the NCQ command error log
    /// and the NCQ send/receive log, one page each.
    fn read_log(&mut self, p: usize, cmd: &Command, cfis: &[u8; 20]) -> u32 {
        if self.is_atapi(p)
            || cmd.prdtl == 0
            || cfis[5] != 0
            || cfis[9] != 0
            || cfis[12] != 1
            || cfis[13] != 0
        {
            return ata::ABORTED;
        }
        let mut page = [0u8; 512];
        match cfis[4] {
            0x00 => {
                // Directory: version 1, one page of logs 10h and 13h.
                page[0] = 1;
                page[0x10 * 2] = 1;
                page[0x13 * 2] = 1;
            }
            0x10 => {
                page[..20].copy_from_slice(&self.state.ports[p].error_log);
                let sum = page[..511].iter().fold(0u8, |a, &x| a.wrapping_add(x));
                page[511] = 0u8.wrapping_sub(sum);
            }
            0x13 => {
                if self.files[p]
                    .as_ref()
                    .is_some_and(|f| f.can_delete() && !f.readonly())
                {
                    // SEND FPDMA QUEUED DSM, with TRIM.
                    page[0] = 1;
                    page[4] = 1;
                }
            }
            log => {
                tracing::debug!("ahci port {p}: no log page {log:#04x}");
                return ata::ABORTED;
            }
        }
        if cfis[2] == ata::READ_LOG_EXT {
            self.pio_setup(p);
        }
        Self::status(p, cmd, write_prdt(&self.mem, cmd, &page))
    }

    /// An ATAPI PACKET command; errors carry the sense key in the error
    /// register and are remembered for REQUEST SENSE.
    fn packet(&mut self, p: usize, cmd: &Command, cfis: &mut [u8; 20]) -> Completion {
        // Interrupt reason: command completion, data to the host.
        cfis[4] = (cfis[4] & !7) | 0x3;
        let Some(f) = self.files[p].as_ref() else {
            return Completion::D2h(ata::ABORTED);
        };
        let port = &self.state.ports[p];
        let reply = atapi::execute(&cmd.acmd, f.size(), (port.sense_key, port.asc));
        match reply {
            Reply::Data(data) => match write_prdt(&self.mem, cmd, &data) {
                Ok(()) => Completion::D2h(ata::OK),
                Err(e) => {
                    tracing::warn!(
                        "ahci port {p} slot {}: ATAPI command {:#04x} failed: {e}",
                        cmd.slot,
                        cmd.acmd[0]
                    );
                    Completion::D2h(self.check_condition(
                        p,
                        atapi::SENSE_ILLEGAL_REQUEST,
                        atapi::ASC_INVALID_FIELD,
                    ))
                }
            },
            Reply::Read { lba, blocks } => {
                let io = Io::Transfer {
                    offset: lba * atapi::BLOCK,
                    len: blocks * atapi::BLOCK,
                    to_guest: true,
                };
                self.queue(p, cmd, cfis, io, Finish::Atapi)
            }
            Reply::Check(key, asc) => {
                tracing::debug!(
                    "ahci port {p}: ATAPI command {:#04x}: sense {key:#x}/{asc:#04x}",
                    cmd.acmd[0]
                );
                Completion::D2h(self.check_condition(p, key, asc))
            }
        }
    }

    fn check_condition(&mut self, p: usize, key: u8, asc: u8) -> u32 {
        let port = &mut self.state.ports[p];
        port.sense_key = key;
        port.asc = asc;
        (u32::from(key) << 12) | ata::S_READY | ata::S_ERR
    }

    // ---- registers ----

    fn read_register(&self, offset: u64) -> u32 {
        let s = &self.state;
        if offset < PORT_BASE {
            return match offset {
                hba::CAP => s.cap,
                hba::GHC => s.ghc,
                hba::IS => s.is,
                hba::PI => s.pi,
                hba::VS => s.vs,
                hba::CAP2 => s.cap2,
                _ => 0,
            };
        }
        let p = ((offset - PORT_BASE) / PORT_STEP) as usize;
        let Some(port) = s.ports.get(p) else {
            return 0;
        };
        let r = &port.regs;
        match (offset - PORT_BASE) % PORT_STEP {
            port::CLB => r.clb,
            port::CLBU => r.clbu,
            port::FB => r.fb,
            port::FBU => r.fbu,
            port::IS => r.is,
            port::IE => r.ie,
            port::CMD => r.cmd,
            port::TFD => r.tfd,
            port::SIG => r.sig,
            port::SSTS => r.ssts,
            port::SCTL => r.sctl,
            port::SERR => r.serr,
            port::SACT => r.sact,
            port::CI => r.ci,
            port::SNTF => r.sntf,
            port::FBS => r.fbs,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        if offset < PORT_BASE {
            match offset {
                hba::GHC => {
                    if value & hba::GHC_HR != 0 {
                        self.reset();
                        return;
                    }
                    if value & hba::GHC_IE != 0 {
                        self.state.ghc |= hba::GHC_IE;
                    } else {
                        self.state.ghc &= !hba::GHC_IE;
                    }
                    self.generate_interrupt(u32::MAX);
                }
                hba::IS => {
                    self.state.is &= !value;
                    self.generate_interrupt(value);
                }
                _ => tracing::debug!("ahci: write {value:#x} to read-only register {offset:#x}"),
            }
            return;
        }
        let p = ((offset - PORT_BASE) / PORT_STEP) as usize;
        if p >= MAX_PORTS {
            tracing::debug!("ahci: write {value:#x} beyond the ports at {offset:#x}");
            return;
        }
        let r = &mut self.state.ports[p].regs;
        match (offset - PORT_BASE) % PORT_STEP {
            port::CLB => r.clb = value,
            port::CLBU => r.clbu = value,
            port::FB => r.fb = value,
            port::FBU => r.fbu = value,
            port::IS => {
                r.is &= !value;
                self.port_interrupt(p);
            }
            port::IE => {
                r.ie = value & port::IE_WRITABLE;
                self.port_interrupt(p);
            }
            port::CMD => self.write_cmd(p, value),
            port::SCTL => {
                r.sctl = value;
                if r.cmd & port::CMD_ST == 0 && value & port::SCTL_DET_RESET != 0 {
                    self.port_reset(p);
                }
            }
            port::SERR => r.serr &= !value,
            port::SACT => r.sact |= value,
            port::CI => {
                r.ci |= value;
                self.handle_port(p);
            }
            reg => tracing::debug!("ahci port {p}: write {value:#x} to register {reg:#x} ignored"),
        }
    }

    fn write_cmd(&mut self, p: usize, value: u32) {
        use port::*;
        let writable = CMD_ST
            | CMD_SUD
            | CMD_POD
            | CMD_CLO
            | CMD_FRE
            | CMD_APSTE
            | CMD_ATAPI
            | CMD_DLAE
            | CMD_ALPE
            | CMD_ASP
            | CMD_ICC_MASK;
        let r = &mut self.state.ports[p].regs;
        r.cmd = (r.cmd & !writable) | (value & writable);
        if value & CMD_ST == 0 {
            self.check_stopped(p);
        } else {
            self.state.ports[p].regs.cmd |= CMD_CR;
        }
        let r = &mut self.state.ports[p].regs;
        if value & CMD_FRE != 0 {
            r.cmd |= CMD_FR;
        } else {
            r.cmd &= !CMD_FR;
        }
        if value & CMD_CLO != 0 {
            r.tfd &= !(ata::S_BUSY | ata::S_DRQ);
            r.cmd &= !CMD_CLO;
        }
        r.cmd &= !CMD_ICC_MASK;
        self.handle_port(p);
    }
}

impl PciFunction for Ahci {
    fn config(&self) -> &PciConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfigSpace {
        &mut self.config
    }

    /// Any size; registers have no read side effects.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar != ABAR {
            data.fill(0xFF);
            return;
        }
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            *b = self.read_register(at & !3).to_le_bytes()[(at & 3) as usize];
        }
    }

    /// Dword writes (a qword is two); anything else is dropped, as the
    /// AHCI spec only defines dword register access.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != ABAR {
            return;
        }
        match data.len() {
            4 if offset.is_multiple_of(4) => self.write_register(offset, le32(data)),
            8 if offset.is_multiple_of(8) => {
                self.write_register(offset, le32(&data[0..4]));
                self.write_register(offset + 4, le32(&data[4..8]));
            }
            len => tracing::debug!("ahci: dropping a {len}-byte register write at {offset:#x}"),
        }
    }

    fn pause(&mut self) {
        self.paused = true;
    }

    fn quiesced(&self) -> bool {
        self.state.ports.iter().all(|p| p.pending == 0)
    }

    fn resume(&mut self) {
        self.paused = false;
        for p in 0..self.state.ports.len() {
            self.handle_port(p);
        }
    }

    fn save_device(&self) -> Result<Option<DeviceState>, SnapshotError> {
        if !self.quiesced() {
            return Err(SnapshotError::Device {
                id: "ahci".into(),
                why: "saved with commands in flight".into(),
            });
        }
        DeviceState::encode("ahci", &self.state).map(Some)
    }

    fn restore_device(&mut self, saved: Option<&DeviceState>) -> Result<(), SnapshotError> {
        let saved: AhciState = saved
            .ok_or_else(|| SnapshotError::Mismatch("an AHCI controller without its state".into()))?
            .decode()?;
        let shape = |s: &AhciState| -> Vec<(Option<DriveKind>, Option<DriveIdentity>)> {
            s.ports
                .iter()
                .map(|p| (p.drive, p.identity.clone()))
                .collect()
        };
        if shape(&saved) != shape(&self.state) || saved.cap != self.state.cap {
            return Err(SnapshotError::Mismatch(
                "ahci: the snapshot's drives differ from this command line's".into(),
            ));
        }
        if saved.ports.iter().any(|p| p.pending != 0) {
            return Err(SnapshotError::Mismatch(
                "ahci: the snapshot has commands in flight".into(),
            ));
        }
        self.state = saved;
        // Resumed (commands waiting in PxCI started) by the inventory.
        self.paused = true;
        Ok(())
    }
}
