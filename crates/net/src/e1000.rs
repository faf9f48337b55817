//! bhyve's `e1000` (`pci_e82545.c`): an Intel 82545EM copper controller
//! as the Intel 8254x Family Software Developer's Manual describes it, with
//! bhyve's IDs and BAR layout (registers in a 128 KiB memory BAR 0, a
//! 64 KiB flash BAR 1, the IOADDR/IODATA window in I/O BAR 2), INTx only
//! (bhyve offers no MSI for it), one receive and one transmit ring.
//!
//! The guest's driver reads the MAC from the Microwire EEPROM (bit-banged
//! through EECD, or through EERD), finds an M88 PHY with its link up over
//! MDIC, then hands over descriptor rings. Transmit takes legacy
//! descriptors and context/data descriptors with IP/TCP/UDP checksum
//! insertion and TCP/UDP segmentation (TSO), all done here in software
//! as bhyve does; frames go to the back end whole. Receive writes each
//! frame into as many guest buffers as it needs.
//!
//! The guest is hostile: ring sizes, head and tail values are checked
//! against the ring before use (a ring whose head or tail lies outside it
//! is left alone until the driver fixes it), one pass over a ring handles
//! at most one ring's worth of descriptors, a packet is bounded by
//! [`MAX_PACKET`], a TSO segment size of 0 drops the packet, and every
//! guest address goes through `vm-memory`'s checked accesses.
//!
//! Work runs on one device thread (role `DeviceIo`): the vCPU that writes
//! TDT, RDT, RCTL or TCTL wakes it through an eventfd, and it also wakes
//! when the tap has a frame. [`E1000::service`] is that thread's whole job,
//! so tests and the fuzz target drive it directly.
//!
//! Snapshots: [`PciFunction::pause`] makes [`E1000::service`] a no-op,
//! so the thread stops processing transmit descriptors and delivering
//! frames (and so raising interrupts) until resume; a register write from
//! a vCPU still works as on hardware. Everything guest-visible is the one
//! serde struct [`E1000State`], saved whole; a transmit pass finishes
//! under the device lock and moves TDH only past whole packets, so no
//! packet is half sent at a pause. A frame read from the tap but still
//! waiting for guest buffers is not saved: it is dropped, as a full ring
//! drops frames on the wire (virtio-net does the same).
//!
//! Not modelled: interrupt throttling and delay timers (ITR, RDTR/RADV,
//! TIDV/TADV are stored, interrupts are raised at once), receive address
//! filtering (the tap carries only what the host bridges to it, as in
//! bhyve), loopback modes, flash contents (BAR 1 reads as zeros).

use std::collections::BTreeMap;
use std::io::{self, IoSlice};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, Weak};

use rhyve_backends::tap::Tap;
use rhyve_config::ConfigTree;
use rhyve_pci::{BarKind, PciConfigSpace, PciError, PciFunction};
use rhyve_platform::snapshot::{DeviceState, Schema, SnapshotError};
use rhyve_sandbox::ThreadRole;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::GuestMemory;

pub const VENDOR_ID: u16 = 0x8086;
/// 82545EM copper.
pub const DEVICE_ID: u16 = 0x100F;
pub const SUBSYSTEM_ID: u16 = 0x1008;
/// Network controller, Ethernet.
const CLASS: (u8, u8, u8) = (0x02, 0x00, 0x00);

pub const BAR_REGISTERS: usize = 0;
pub const BAR_FLASH: usize = 1;
pub const BAR_IO: usize = 2;
const REGISTERS_LEN: u64 = 128 * 1024;
const FLASH_LEN: u64 = 64 * 1024;
const IO_LEN: u64 = 8;
/// IOADDR/IODATA reach registers below this offset only.
const IO_REGISTER_LIMIT: u32 = 0x2_0000;

/// Largest packet gathered from transmit descriptors (a 64 KiB TSO
/// payload plus its headers, with room to spare): more is dropped.
pub const MAX_PACKET: usize = 256 * 1024;
/// Largest frame read from the back end.
const MAX_RX_FRAME: usize = 65536;
/// A TSO header longer than this is refused (bhyve's cap, from the
/// 82576 datasheet).
const MAX_TSO_HEADER: usize = 240;
const ETHER_MIN_LEN: usize = 60;
const ETHER_CRC_LEN: usize = 4;
const VLAN_TAG_LEN: usize = 4;

/// Register offsets (8254x manual, section 13).
pub mod reg {
    pub const CTRL: u32 = 0x0000;
    pub const CTRL_DUP: u32 = 0x0004;
    pub const STATUS: u32 = 0x0008;
    pub const EECD: u32 = 0x0010;
    pub const EERD: u32 = 0x0014;
    pub const CTRL_EXT: u32 = 0x0018;
    pub const MDIC: u32 = 0x0020;
    pub const FCAL: u32 = 0x0028;
    pub const FCAH: u32 = 0x002C;
    pub const FCT: u32 = 0x0030;
    pub const VET: u32 = 0x0038;
    pub const ICR: u32 = 0x00C0;
    pub const ITR: u32 = 0x00C4;
    pub const ICS: u32 = 0x00C8;
    pub const IMS: u32 = 0x00D0;
    pub const IMC: u32 = 0x00D8;
    pub const RCTL: u32 = 0x0100;
    pub const FCTTV: u32 = 0x0170;
    pub const TXCW: u32 = 0x0178;
    pub const TCTL: u32 = 0x0400;
    pub const TIPG: u32 = 0x0410;
    pub const AIT: u32 = 0x0458;
    pub const LEDCTL: u32 = 0x0E00;
    pub const PBA: u32 = 0x1000;
    pub const FCRTL: u32 = 0x2160;
    pub const FCRTH: u32 = 0x2168;
    pub const RDBAL: u32 = 0x2800;
    pub const RDBAH: u32 = 0x2804;
    pub const RDLEN: u32 = 0x2808;
    pub const RDH: u32 = 0x2810;
    pub const RDT: u32 = 0x2818;
    pub const RDTR: u32 = 0x2820;
    pub const RXDCTL: u32 = 0x2828;
    pub const RADV: u32 = 0x282C;
    pub const RSRPD: u32 = 0x2C00;
    pub const TDBAL: u32 = 0x3800;
    pub const TDBAH: u32 = 0x3804;
    pub const TDLEN: u32 = 0x3808;
    pub const TDH: u32 = 0x3810;
    pub const TDT: u32 = 0x3818;
    pub const TIDV: u32 = 0x3820;
    pub const TXDCTL: u32 = 0x3828;
    pub const TADV: u32 = 0x382C;
    pub const STATS: u32 = 0x4000;
    pub const STATS_END: u32 = 0x4100;
    pub const RXCSUM: u32 = 0x5000;
    pub const MTA: u32 = 0x5200;
    pub const RA: u32 = 0x5400;
    pub const VFTA: u32 = 0x5600;
    pub const WUC: u32 = 0x5800;
    pub const WUFC: u32 = 0x5808;
    pub const MANC: u32 = 0x5820;

    // Statistics (clear on read).
    pub const MPC: u32 = 0x4010;
    pub const PRC64: u32 = 0x405C;
    pub const GPRC: u32 = 0x4074;
    pub const BPRC: u32 = 0x4078;
    pub const MPRC: u32 = 0x407C;
    pub const GPTC: u32 = 0x4080;
    pub const GORCL: u32 = 0x4088;
    pub const GOTCL: u32 = 0x4090;
    pub const ROC: u32 = 0x40AC;
    pub const TORL: u32 = 0x40C0;
    pub const TOTL: u32 = 0x40C8;
    pub const TPR: u32 = 0x40D0;
    pub const TPT: u32 = 0x40D4;
    pub const PTC64: u32 = 0x40D8;
    pub const MPTC: u32 = 0x40F0;
    pub const BPTC: u32 = 0x40F4;
    pub const TSCTC: u32 = 0x40F8;
}

pub const CTRL_RST: u32 = 1 << 26;
pub const CTRL_VME: u32 = 1 << 30;
pub const STATUS_FD: u32 = 1 << 0;
pub const STATUS_LU: u32 = 1 << 1;
pub const STATUS_SPEED_1000: u32 = 1 << 7;

pub const EECD_SK: u32 = 1 << 0;
pub const EECD_CS: u32 = 1 << 1;
pub const EECD_DI: u32 = 1 << 2;
pub const EECD_DO: u32 = 1 << 3;
/// Flash write enable field: writes enabled.
const EECD_FWE_EN: u32 = 2 << 4;
pub const EECD_REQ: u32 = 1 << 6;
pub const EECD_GNT: u32 = 1 << 7;
pub const EECD_PRES: u32 = 1 << 8;
pub const EERD_START: u32 = 1 << 0;
pub const EERD_DONE: u32 = 1 << 4;

pub const MDIC_OP_WRITE: u32 = 1 << 26;
pub const MDIC_OP_READ: u32 = 2 << 26;
pub const MDIC_READY: u32 = 1 << 28;
pub const MDIC_ERROR: u32 = 1 << 30;

/// Interrupt causes (ICR/ICS/IMS/IMC bits).
pub mod icr {
    pub const TXDW: u32 = 1 << 0;
    pub const TXQE: u32 = 1 << 1;
    pub const LSC: u32 = 1 << 2;
    pub const RXDMT0: u32 = 1 << 4;
    pub const RXO: u32 = 1 << 6;
    pub const RXT0: u32 = 1 << 7;
    pub const SRPD: u32 = 1 << 16;
}

pub mod rctl {
    pub const EN: u32 = 1 << 1;
    pub const LPE: u32 = 1 << 5;
    pub const RDMTS_SHIFT: u32 = 8;
    pub const BSIZE_SHIFT: u32 = 16;
    pub const VFE: u32 = 1 << 18;
    pub const BSEX: u32 = 1 << 25;
    pub const SECRC: u32 = 1 << 26;
}

pub const TCTL_EN: u32 = 1 << 1;

/// Transmit descriptor command bits (bits 31:24 of the second dword).
pub mod txd {
    pub const EOP: u32 = 1 << 24;
    pub const IC: u32 = 1 << 26;
    /// Context descriptor: TUCMD.TCP (TCP, else UDP).
    pub const TCP: u32 = 1 << 24;
    /// Context descriptor: TUCMD.IP (IPv4, else IPv6).
    pub const IP: u32 = 1 << 25;
    pub const TSE: u32 = 1 << 26;
    pub const RS: u32 = 1 << 27;
    pub const DEXT: u32 = 1 << 29;
    pub const VLE: u32 = 1 << 30;
    pub const DTYP_MASK: u32 = 0xF << 20;
    pub const DTYP_CONTEXT: u32 = 0;
    pub const DTYP_DATA: u32 = 1 << 20;
    /// Status byte: descriptor done.
    pub const STAT_DD: u8 = 1 << 0;
    /// Data descriptor POPTS: insert the IP checksum.
    pub const POPTS_IXSM: u8 = 1 << 0;
    /// Data descriptor POPTS: insert the TCP/UDP checksum.
    pub const POPTS_TXSM: u8 = 1 << 1;
}

/// Receive descriptor status bits.
pub mod rxd {
    pub const STAT_DD: u8 = 1 << 0;
    pub const STAT_EOP: u8 = 1 << 1;
    /// Ignore checksum indication: no receive checksum offload.
    pub const STAT_IXSM: u8 = 1 << 2;
    pub const STAT_VP: u8 = 1 << 3;
}

/// EEPROM words (8254x manual, 5.6).
pub mod nvm {
    pub const SIZE: usize = 64;
    pub const MAC: usize = 0;
    pub const SUBSYSTEM_ID: usize = 0x0B;
    pub const SUBSYSTEM_VENDOR: usize = 0x0C;
    pub const DEVICE_ID: usize = 0x0D;
    pub const VENDOR_ID: usize = 0x0E;
    pub const CHECKSUM: usize = 0x3F;
    /// Words 0..=0x3F add up to this.
    pub const SUM: u16 = 0xBABA;
    /// Microwire opcodes (3 bits, then 6 address bits).
    pub const OP_READ: u16 = 0x6;
    pub const OP_WRITE: u16 = 0x5;
    pub const ADDR_BITS: u8 = 6;
    pub const OPCODE_BITS: u8 = 3;
}

/// PHY registers and the M88E1011 answers bhyve gives.
mod phy {
    pub const STATUS: u32 = 1;
    pub const ID1: u32 = 2;
    pub const ID2: u32 = 3;
    pub const AUTONEG_ADV: u32 = 4;
    pub const LP_ABILITY: u32 = 5;
    pub const GIG_STATUS: u32 = 10;
    /// Link up, autonegotiation able and complete.
    pub const STATUS_VALUE: u16 = 0x0004 | 0x0008 | 0x0020;
    /// IEEE 802.3 selector.
    pub const AUTONEG_ADV_VALUE: u16 = 0x0001;
    /// Link partner full-duplex capable, remote and local receivers OK.
    pub const GIG_STATUS_VALUE: u16 = 0x0800 | 0x1000 | 0x2000;
    pub const M88E1011_ID: u32 = 0x0141_0C20;
    pub const REVISION: u32 = 4;
}

#[derive(Debug, thiserror::Error)]
pub enum E1000Error {
    #[error("{0}")]
    Pci(#[from] PciError),
    #[error("{0}")]
    Backend(#[from] rhyve_virtio::ConfigureError),
    #[error("could not start the e1000 thread: {0}")]
    Thread(io::Error),
}

/// Where frames go and come from: the tap, or a test's fake.
pub trait FrameBackend: Send {
    /// Send one whole Ethernet frame.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Receive one frame into `buf`; `None` when none is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;
    /// A descriptor that polls readable when a frame waits.
    fn readable_fd(&self) -> Option<RawFd>;
}

/// Size of the virtio-net header the tap puts on every frame.
const VNET_HDR_LEN: usize = 10;

/// A tap as an e1000 back end: frames carry a zero vnet header (no
/// offloads either way: the model computes checksums and segments itself,
/// and the host delivers finished frames).
pub struct TapFrames {
    tap: Tap,
    buf: Vec<u8>,
}

impl TapFrames {
    pub fn new(tap: Tap) -> io::Result<Self> {
        tap.set_vnet_hdr_size(VNET_HDR_LEN as u32)?;
        tap.set_offload(0)?;
        Ok(Self {
            tap,
            buf: vec![0; VNET_HDR_LEN + MAX_RX_FRAME],
        })
    }
}

impl FrameBackend for TapFrames {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let hdr = [0u8; VNET_HDR_LEN];
        self.tap
            .write_frame(&[IoSlice::new(&hdr), IoSlice::new(frame)])
            .map(drop)
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.tap.read_frame(&mut self.buf) {
            Ok(n) if n >= VNET_HDR_LEN => {
                let len = (n - VNET_HDR_LEN).min(buf.len());
                buf[..len].copy_from_slice(&self.buf[VNET_HDR_LEN..VNET_HDR_LEN + len]);
                Ok(Some(len))
            }
            Ok(_) => Ok(Some(0)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn readable_fd(&self) -> Option<RawFd> {
        Some(self.tap.as_raw_fd())
    }
}

/// The transmit context a context descriptor loads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxContext {
    pub ipcss: u8,
    pub ipcso: u8,
    pub ipcse: u16,
    pub tucss: u8,
    pub tucso: u8,
    pub tucse: u16,
    pub cmd_and_length: u32,
    pub hdr_len: u8,
    pub mss: u16,
}

/// The Microwire EEPROM's serial state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NvmMode {
    /// Shifting in opcode and address.
    OpAddr,
    /// Shifting in a word to write.
    DataIn,
    /// Shifting out a word read.
    DataOut,
}

/// Everything guest-visible, in one serde struct.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct E1000State {
    pub mac: [u8; 6],
    pub ctrl: u32,
    pub icr: u32,
    pub ims: u32,
    pub irq_asserted: bool,
    pub rctl: u32,
    pub tctl: u32,
    pub rdba: u64,
    pub rdlen: u32,
    pub rdh: u32,
    pub rdt: u32,
    pub tdba: u64,
    pub tdlen: u32,
    pub tdh: u32,
    pub tdt: u32,
    pub tx_context: TxContext,
    /// RAL/RAH pairs.
    pub ra: Vec<u32>,
    pub mta: Vec<u32>,
    pub vfta: Vec<u32>,
    /// Registers that only hold what the driver wrote.
    pub plain: BTreeMap<u32, u32>,
    /// Statistics counters by register offset (64-bit ones at the low half).
    pub stats: BTreeMap<u32, u64>,
    pub eecd: u32,
    pub eerd: u32,
    pub mdic: u32,
    pub io_addr: u32,
    pub eeprom: Vec<u16>,
    pub nvm_mode: NvmMode,
    pub nvm_bits: u8,
    pub nvm_opaddr: u16,
    pub nvm_data: u16,
}

impl Schema for E1000State {
    const KIND: &'static str = "e1000";
    const VERSION: u32 = 1;
}

/// Registers kept as written, with the bits that are writable.
const PLAIN_REGISTERS: &[(u32, u32)] = &[
    (reg::CTRL_EXT, u32::MAX),
    (reg::FCAL, u32::MAX),
    (reg::FCAH, 0xFFFF),
    (reg::FCT, 0xFFFF),
    (reg::VET, 0xFFFF),
    (reg::ITR, 0xFFFF),
    (reg::FCTTV, 0xFFFF),
    (reg::TXCW, 0xC000_FFFF),
    (reg::TIPG, u32::MAX),
    (reg::AIT, 0xFFFF),
    (reg::LEDCTL, 0xCFCF_CFCF),
    (reg::PBA, 0xFF80),
    (reg::FCRTL, 0x8000_FFF8),
    (reg::FCRTH, 0xFFF8),
    (reg::RDTR, 0xFFFF),
    (reg::RXDCTL, 0x013F_3F3F),
    (reg::RADV, 0xFFFF),
    (reg::RSRPD, 0xFFF),
    (reg::TIDV, 0xFFFF),
    (reg::TXDCTL, 0x013F_3F3F),
    (reg::TADV, 0xFFFF),
    (reg::RXCSUM, 0x7FF),
    (reg::WUC, u32::MAX),
    (reg::WUFC, u32::MAX),
    (reg::MANC, u32::MAX),
];

/// The low halves of the 64-bit statistics (the high half follows).
const STATS_64: &[u32] = &[reg::GORCL, reg::GOTCL, reg::TORL, reg::TOTL];

/// The 82545EM.
pub struct E1000 {
    config: PciConfigSpace,
    state: E1000State,
    mem: GuestMemory,
    backend: Box<dyn FrameBackend>,
    /// Wakes the device thread; `None` until it runs.
    wake: Option<Arc<EventFd>>,
    /// A received frame still waiting for guest buffers.
    rx_frame: Vec<u8>,
    rx_pending: Option<usize>,
    tx_packet: Vec<u8>,
    /// Snapshot pause: the device thread leaves rings and interrupts alone.
    paused: bool,
}

impl E1000 {
    /// A controller with MAC `mac` over guest memory `mem`, its frames
    /// going to `backend`, in its power-on state. No thread runs: call
    /// [`E1000::start`] or drive [`E1000::service`].
    pub fn new(
        mac: [u8; 6],
        backend: Box<dyn FrameBackend>,
        mem: GuestMemory,
    ) -> Result<Self, E1000Error> {
        let mut config = PciConfigSpace::new(VENDOR_ID, DEVICE_ID, CLASS.0, CLASS.1, CLASS.2);
        config.set_subsystem(VENDOR_ID, SUBSYSTEM_ID);
        config.add_bar(BAR_REGISTERS, BarKind::Mem32, REGISTERS_LEN)?;
        config.add_bar(BAR_FLASH, BarKind::Mem32, FLASH_LEN)?;
        config.add_bar(BAR_IO, BarKind::Io, IO_LEN)?;
        config.request_intx();
        let mut e = Self {
            config,
            state: E1000State {
                mac,
                ctrl: 0,
                icr: 0,
                ims: 0,
                irq_asserted: false,
                rctl: 0,
                tctl: 0,
                rdba: 0,
                rdlen: 0,
                rdh: 0,
                rdt: 0,
                tdba: 0,
                tdlen: 0,
                tdh: 0,
                tdt: 0,
                tx_context: TxContext::default(),
                ra: vec![0; 32],
                mta: vec![0; 128],
                vfta: vec![0; 128],
                plain: BTreeMap::new(),
                stats: BTreeMap::new(),
                eecd: 0,
                eerd: 0,
                mdic: 0,
                io_addr: 0,
                eeprom: vec![0; nvm::SIZE],
                nvm_mode: NvmMode::OpAddr,
                nvm_bits: 0,
                nvm_opaddr: 0,
                nvm_data: 0,
            },
            mem,
            backend,
            wake: None,
            rx_frame: vec![0; MAX_RX_FRAME],
            rx_pending: None,
            tx_packet: Vec::new(),
            paused: false,
        };
        e.reset(false);
        Ok(e)
    }

    /// Build from config node `node` (`pci.B.S.F`): the tap its `backend`
    /// names, the MAC from `mac` or bhyve's default; the device thread runs.
    pub fn from_config(
        tree: &ConfigTree,
        node: &str,
        vm_name: &str,
        slot: u8,
        function: u8,
        mem: GuestMemory,
    ) -> Result<Arc<Mutex<Self>>, E1000Error> {
        let mac = rhyve_virtio::net::mac_from_config(tree, node, vm_name, slot, function)?;
        let tap = rhyve_virtio::net::tap_from_config(tree, node, "e1000")?;
        let name = tap.name().to_string();
        let frames = TapFrames::new(tap).map_err(|e| {
            E1000Error::Backend(rhyve_virtio::ConfigureError::Invalid {
                node: node.to_string(),
                why: format!("tap {name}: {e}"),
            })
        })?;
        let e1000 = Arc::new(Mutex::new(Self::new(mac, Box::new(frames), mem)?));
        Self::start(&e1000)?;
        Ok(e1000)
    }

    /// Start the device thread. It ends when the device is dropped.
    pub fn start(this: &Arc<Mutex<Self>>) -> Result<(), E1000Error> {
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(E1000Error::Thread)?);
        let mut dev = this.lock().unwrap_or_else(|e| e.into_inner());
        dev.wake = Some(wake.clone());
        let tap_fd = dev.backend.readable_fd();
        drop(dev);
        let weak = Arc::downgrade(this);
        rhyve_sandbox::spawn(ThreadRole::DeviceIo, "e1000", move || {
            device_thread(weak, wake, tap_fd)
        })
        .map_err(E1000Error::Thread)?;
        Ok(())
    }

    pub fn state(&self) -> &E1000State {
        &self.state
    }

    /// The device thread's work: transmit what the driver queued, then
    /// receive what the back end has, as far as guest buffers allow.
    pub fn service(&mut self) {
        if self.paused {
            return;
        }
        self.tx_run();
        self.rx_run();
    }

    /// A frame is waiting in `rx_frame` for guest buffers: the back end
    /// need not be polled until the driver gives some.
    fn rx_blocked(&self) -> bool {
        self.rx_pending.is_some()
    }

    /// Nothing for the thread to do until a kick: paused, or a frame
    /// waits for buffers. Watching the tap then would only spin.
    fn tap_ignored(&self) -> bool {
        self.paused || self.rx_blocked()
    }

    fn kick(&self) {
        if let Some(w) = &self.wake {
            let _ = w.write(1);
        }
    }

    // ---- reset and EEPROM ----

    /// Power-on (`driver` false) or software (CTRL.RST) reset.
    fn reset(&mut self, driver: bool) {
        let s = &mut self.state;
        if s.irq_asserted {
            s.irq_asserted = false;
            self.config.intx_deassert();
        }
        let keep: &[u32] = if driver {
            &[reg::FCAL, reg::FCAH, reg::FCT, reg::VET, reg::FCTTV]
        } else {
            &[]
        };
        let kept: Vec<(u32, u32)> = keep
            .iter()
            .filter_map(|r| s.plain.get(r).map(|v| (*r, *v)))
            .collect();
        s.plain.clear();
        s.plain.extend(kept);
        s.plain.insert(reg::LEDCTL, 0x0706_1302);
        s.plain.insert(reg::PBA, 0x0010_0030);
        s.plain.insert(reg::ITR, 0);
        s.plain.insert(reg::RXDCTL, 1 << 16 | 1 << 24);
        s.ctrl = 0;
        s.icr = 0;
        s.ims = 0;
        s.rctl = 0;
        s.tctl = 0;
        s.rdlen = 0;
        s.rdh = 0;
        s.rdt = 0;
        s.tdlen = 0;
        s.tdh = 0;
        s.tdt = 0;
        s.tx_context = TxContext::default();
        if driver {
            // RAH's address-valid bits go; the addresses stay.
            for (i, v) in s.ra.iter_mut().enumerate() {
                if i % 2 == 1 {
                    *v &= !(1 << 31);
                }
            }
        } else {
            s.rdba = 0;
            s.tdba = 0;
            s.mta.fill(0);
            s.vfta.fill(0);
            s.ra.fill(0);
            let m = s.mac;
            s.ra[0] = u32::from_le_bytes([m[0], m[1], m[2], m[3]]);
            s.ra[1] = u32::from(u16::from_le_bytes([m[4], m[5]])) | 1 << 31;
        }
        s.eecd = EECD_PRES | EECD_FWE_EN;
        s.eerd = 0;
        s.mdic = MDIC_READY;
        Self::nvm_idle(s);
        s.eeprom = eeprom_image(s.mac);
        self.rx_pending = None;
        self.tx_packet.clear();
    }

    fn nvm_idle(s: &mut E1000State) {
        s.nvm_mode = NvmMode::OpAddr;
        s.nvm_bits = nvm::OPCODE_BITS + nvm::ADDR_BITS;
        s.nvm_opaddr = 0;
        s.nvm_data = 0;
    }

    /// EECD write: the driver drives CS, SK and DI; each rising SK edge
    /// with CS high moves one bit of the Microwire exchange.
    fn eecd_write(&mut self, value: u32) {
        let s = &mut self.state;
        let rising = s.eecd & EECD_SK == 0 && value & EECD_SK != 0;
        let driven = EECD_SK | EECD_CS | EECD_DI | EECD_REQ;
        s.eecd = (s.eecd & !driven) | (value & driven);
        if value & EECD_REQ != 0 {
            s.eecd |= EECD_GNT;
        } else {
            s.eecd &= !EECD_GNT;
        }
        if s.eecd & EECD_CS == 0 {
            // Deselecting ends whatever exchange was under way.
            Self::nvm_idle(s);
            s.eecd &= !EECD_DO;
            return;
        }
        if !rising || s.nvm_bits == 0 {
            return;
        }
        s.nvm_bits -= 1;
        let di = u16::from(s.eecd & EECD_DI != 0);
        match s.nvm_mode {
            NvmMode::DataOut => {
                if s.nvm_data & 0x8000 != 0 {
                    s.eecd |= EECD_DO;
                } else {
                    s.eecd &= !EECD_DO;
                }
                s.nvm_data <<= 1;
                if s.nvm_bits == 0 {
                    Self::nvm_idle(s);
                }
            }
            NvmMode::DataIn => {
                s.nvm_data = s.nvm_data << 1 | di;
                if s.nvm_bits == 0 {
                    let addr = usize::from(s.nvm_opaddr & ((1 << nvm::ADDR_BITS) - 1));
                    if let Some(w) = s.eeprom.get_mut(addr) {
                        *w = s.nvm_data;
                    }
                    Self::nvm_idle(s);
                }
            }
            NvmMode::OpAddr => {
                s.nvm_opaddr = s.nvm_opaddr << 1 | di;
                if s.nvm_bits == 0 {
                    let op = s.nvm_opaddr >> nvm::ADDR_BITS & 0x7;
                    let addr = usize::from(s.nvm_opaddr & ((1 << nvm::ADDR_BITS) - 1));
                    match op {
                        nvm::OP_READ => {
                            s.nvm_mode = NvmMode::DataOut;
                            s.nvm_bits = 16;
                            s.nvm_data = s.eeprom.get(addr).copied().unwrap_or(0);
                        }
                        nvm::OP_WRITE => {
                            s.nvm_mode = NvmMode::DataIn;
                            s.nvm_bits = 16;
                            s.nvm_data = 0;
                        }
                        // Write enable/disable, erase: nothing to keep.
                        _ => Self::nvm_idle(s),
                    }
                }
            }
        }
    }

    fn eerd_write(&mut self, value: u32) {
        if value & EERD_START == 0 {
            self.state.eerd = value & !EERD_DONE;
            return;
        }
        let addr = (value >> 8 & 0xFF) as usize;
        let word = self.state.eeprom.get(addr).copied().unwrap_or(0);
        self.state.eerd = (value & 0xFF00) | EERD_DONE | u32::from(word) << 16;
    }

    fn mdic_write(&mut self, value: u32) {
        let reg = value >> 16 & 0x1F;
        let op = value & (3 << 26);
        let mut out = value & !(MDIC_READY | MDIC_ERROR);
        if op == MDIC_OP_READ {
            let data = match reg {
                phy::STATUS => phy::STATUS_VALUE,
                phy::ID1 => (phy::M88E1011_ID >> 16) as u16,
                phy::ID2 => (phy::M88E1011_ID | phy::REVISION) as u16,
                phy::AUTONEG_ADV => phy::AUTONEG_ADV_VALUE,
                phy::LP_ABILITY => 0,
                phy::GIG_STATUS => phy::GIG_STATUS_VALUE,
                _ => 0,
            };
            out = (out & !0xFFFF) | u32::from(data);
        } else if op != MDIC_OP_WRITE {
            out |= MDIC_ERROR;
        }
        self.state.mdic = out | MDIC_READY;
    }

    // ---- interrupts ----

    fn update_irq(&mut self) {
        let want = self.state.icr & self.state.ims != 0;
        if want != self.state.irq_asserted {
            self.state.irq_asserted = want;
            if want {
                self.config.intx_assert();
            } else {
                self.config.intx_deassert();
            }
        }
    }

    fn raise(&mut self, causes: u32) {
        self.state.icr |= causes;
        self.update_irq();
    }

    // ---- registers ----

    fn ring_size(len: u32) -> u32 {
        len / 16
    }

    /// Register read (`offset` dword aligned).
    pub fn read_register(&mut self, offset: u32) -> u32 {
        let s = &mut self.state;
        match offset {
            reg::CTRL | reg::CTRL_DUP => s.ctrl,
            reg::STATUS => STATUS_FD | STATUS_LU | STATUS_SPEED_1000,
            reg::EECD => s.eecd,
            reg::EERD => s.eerd,
            reg::MDIC => s.mdic,
            reg::ICR => {
                let v = s.icr;
                s.icr = 0;
                self.update_irq();
                v
            }
            reg::IMS => s.ims,
            reg::ICS | reg::IMC => 0,
            reg::RCTL => s.rctl,
            reg::TCTL => s.tctl,
            reg::RDBAL => s.rdba as u32,
            reg::RDBAH => (s.rdba >> 32) as u32,
            reg::RDLEN => s.rdlen,
            reg::RDH => s.rdh,
            reg::RDT => s.rdt,
            reg::TDBAL => s.tdba as u32,
            reg::TDBAH => (s.tdba >> 32) as u32,
            reg::TDLEN => s.tdlen,
            reg::TDH => s.tdh,
            reg::TDT => s.tdt,
            reg::STATS..reg::STATS_END => self.read_stat(offset),
            reg::MTA..reg::RA => s.mta[((offset - reg::MTA) / 4) as usize],
            o if (reg::RA..reg::RA + 32 * 4).contains(&o) => s.ra[((o - reg::RA) / 4) as usize],
            reg::VFTA..reg::WUC => s.vfta[((offset - reg::VFTA) / 4) as usize],
            _ => s.plain.get(&offset).copied().unwrap_or(0),
        }
    }

    fn read_stat(&mut self, offset: u32) -> u32 {
        let stats = &mut self.state.stats;
        if STATS_64.contains(&offset) {
            return stats.get(&offset).copied().unwrap_or(0) as u32;
        }
        if STATS_64.contains(&(offset - 4)) {
            // Reading the high half clears the counter.
            return (stats.remove(&(offset - 4)).unwrap_or(0) >> 32) as u32;
        }
        stats.remove(&offset).unwrap_or(0).min(u64::from(u32::MAX)) as u32
    }

    fn count(&mut self, offset: u32, n: u64) {
        let c = self.state.stats.entry(offset).or_insert(0);
        *c = c.wrapping_add(n);
    }

    /// Register write (`offset` dword aligned).
    pub fn write_register(&mut self, offset: u32, value: u32) {
        let s = &mut self.state;
        match offset {
            reg::CTRL | reg::CTRL_DUP => {
                s.ctrl = value & !CTRL_RST;
                if value & CTRL_RST != 0 {
                    self.reset(true);
                }
            }
            reg::EECD => self.eecd_write(value),
            reg::EERD => self.eerd_write(value),
            reg::MDIC => self.mdic_write(value),
            reg::ICR => {
                s.icr &= !value;
                self.update_irq();
            }
            reg::ICS => self.raise(value),
            reg::IMS => {
                s.ims |= value;
                self.update_irq();
            }
            reg::IMC => {
                s.ims &= !value;
                self.update_irq();
            }
            reg::RCTL => {
                // Reserved bits 31:27, 24, 21, 14, 11:10 and 0 read as 0.
                s.rctl = value & !0xF920_4C01;
                self.kick();
            }
            reg::TCTL => {
                s.tctl = value & !0xFE80_0005;
                self.kick();
            }
            reg::RDBAL => s.rdba = (s.rdba & !0xFFFF_FFFF) | u64::from(value & !0xF),
            reg::RDBAH => s.rdba = (s.rdba & 0xFFFF_FFFF) | u64::from(value) << 32,
            reg::RDLEN => s.rdlen = value & 0x000F_FF80,
            reg::RDH => s.rdh = value & 0xFFFF,
            reg::RDT => {
                s.rdt = value & 0xFFFF;
                self.kick();
            }
            reg::TDBAL => s.tdba = (s.tdba & !0xFFFF_FFFF) | u64::from(value & !0xF),
            reg::TDBAH => s.tdba = (s.tdba & 0xFFFF_FFFF) | u64::from(value) << 32,
            reg::TDLEN => s.tdlen = value & 0x000F_FF80,
            reg::TDH => s.tdh = value & 0xFFFF,
            reg::TDT => {
                s.tdt = value & 0xFFFF;
                self.kick();
            }
            reg::MTA..reg::RA => s.mta[((offset - reg::MTA) / 4) as usize] = value,
            o if (reg::RA..reg::RA + 32 * 4).contains(&o) => {
                let i = ((o - reg::RA) / 4) as usize;
                // RAH: address bits 15:0, select 17:16, valid 31.
                s.ra[i] = if i % 2 == 1 {
                    value & 0x8003_FFFF
                } else {
                    value
                };
            }
            reg::VFTA..reg::WUC => s.vfta[((offset - reg::VFTA) / 4) as usize] = value,
            _ => match PLAIN_REGISTERS.iter().find(|(r, _)| *r == offset) {
                Some((r, mask)) => {
                    s.plain.insert(*r, value & mask);
                }
                None => tracing::debug!("e1000: write {value:#x} to register {offset:#x} ignored"),
            },
        }
    }

    // ---- transmit ----

    /// Read transmit descriptor `index` of the ring (16 bytes).
    fn tx_descriptor(&self, index: u32) -> Option<[u8; 16]> {
        let mut d = [0u8; 16];
        let addr = self.state.tdba.checked_add(u64::from(index) * 16)?;
        self.mem.read_slice(&mut d, GuestAddress(addr)).ok()?;
        Some(d)
    }

    fn tx_done(&self, index: u32, d: &[u8; 16]) -> bool {
        if le32(&d[8..12]) & txd::RS == 0 {
            return false;
        }
        let addr = self.state.tdba + u64::from(index) * 16 + 12;
        let status = d[12] | txd::STAT_DD;
        self.mem.write_obj(status, GuestAddress(addr)).is_ok()
    }

    /// One pass over the transmit ring, at most one ring's worth of
    /// descriptors: whole packets between TDH and TDT go out; a packet
    /// whose EOP descriptor the driver has not queued yet waits.
    fn tx_run(&mut self) {
        let s = &self.state;
        let size = Self::ring_size(s.tdlen);
        if s.tctl & TCTL_EN == 0 || size == 0 || s.tdh >= size || s.tdt >= size {
            return;
        }
        let (mut head, tail) = (s.tdh, s.tdt);
        let mut causes = 0;
        let mut packet_start = head;
        let mut data_len = 0usize;
        let mut oversize = false;
        let mut processed = 0;
        self.tx_packet.clear();
        // The packet's options, from its first and last descriptors.
        let mut legacy_css = 0u8;
        while head != tail && processed < size {
            let Some(d) = self.tx_descriptor(head) else {
                tracing::debug!("e1000: transmit descriptor {head} outside guest memory");
                break;
            };
            processed += 1;
            let cmd = le32(&d[8..12]);
            let next = (head + 1) % size;
            let extended = cmd & txd::DEXT != 0;
            if extended && cmd & txd::DTYP_MASK == txd::DTYP_CONTEXT {
                self.state.tx_context = TxContext {
                    ipcss: d[0],
                    ipcso: d[1],
                    ipcse: u16::from_le_bytes([d[2], d[3]]),
                    tucss: d[4],
                    tucso: d[5],
                    tucse: u16::from_le_bytes([d[6], d[7]]),
                    cmd_and_length: cmd,
                    hdr_len: d[13],
                    mss: u16::from_le_bytes([d[14], d[15]]),
                };
                if self.tx_done(head, &d) {
                    causes |= icr::TXDW;
                }
                head = next;
                if self.tx_packet.is_empty() && data_len == 0 {
                    packet_start = head;
                    self.state.tdh = head;
                }
                continue;
            }
            let len = if extended {
                (cmd & 0xF_FFFF) as usize
            } else {
                (cmd & 0xFFFF) as usize
            };
            if data_len == 0 && self.tx_packet.is_empty() && !extended {
                legacy_css = d[13];
            }
            data_len += len;
            if data_len > MAX_PACKET {
                oversize = true;
            } else if len > 0 {
                let addr = u64::from_le_bytes(d[0..8].try_into().unwrap_or([0; 8]));
                let at = self.tx_packet.len();
                self.tx_packet.resize(at + len, 0);
                if self
                    .mem
                    .read_slice(&mut self.tx_packet[at..], GuestAddress(addr))
                    .is_err()
                {
                    tracing::debug!(
                        "e1000: transmit buffer {addr:#x}+{len:#x} outside guest memory"
                    );
                    oversize = true;
                    self.tx_packet.truncate(at);
                }
            }
            head = next;
            if cmd & txd::EOP == 0 {
                continue;
            }
            // The whole packet is here: send it, then mark its descriptors.
            if oversize {
                tracing::debug!("e1000: transmit packet of {data_len} bytes dropped");
            } else {
                let popts = d[13];
                self.transmit(extended, cmd, popts, legacy_css, &d);
            }
            let mut i = packet_start;
            while i != head {
                if let Some(pd) = self.tx_descriptor(i) {
                    if self.tx_done(i, &pd) {
                        causes |= icr::TXDW;
                    }
                }
                i = (i + 1) % size;
            }
            self.tx_packet.clear();
            data_len = 0;
            oversize = false;
            packet_start = head;
            self.state.tdh = head;
        }
        if self.state.tdh == tail && processed > 0 {
            causes |= icr::TXQE;
        }
        if causes != 0 {
            self.raise(causes);
        }
    }

    /// Send the gathered packet with the offloads its last descriptor asks.
    fn transmit(&mut self, extended: bool, cmd: u32, popts: u8, legacy_css: u8, last: &[u8; 16]) {
        let vlan = (self.state.ctrl & CTRL_VME != 0 && cmd & txd::VLE != 0)
            .then(|| u16::from_le_bytes([last[14], last[15]]));
        let mut packet = std::mem::take(&mut self.tx_packet);
        if !extended {
            if cmd & txd::IC != 0 {
                let cso = usize::from(last[10]);
                insert_checksum(&mut packet, usize::from(legacy_css), 0, cso);
            }
            self.send(&packet, vlan);
        } else if cmd & txd::TSE != 0 {
            self.segment(&packet, vlan);
        } else {
            let c = self.state.tx_context;
            if popts & txd::POPTS_IXSM != 0 {
                insert_checksum(&mut packet, c.ipcss.into(), c.ipcse.into(), c.ipcso.into());
            }
            if popts & txd::POPTS_TXSM != 0 {
                insert_checksum(&mut packet, c.tucss.into(), c.tucse.into(), c.tucso.into());
            }
            self.send(&packet, vlan);
        }
        self.tx_packet = packet;
    }

    /// TCP/UDP segmentation: the context's header, then `mss` bytes of
    /// payload per frame, lengths, IDs, sequence numbers and checksums
    /// fixed up per frame (8254x manual, 8.6.5 / 8.10.5).
    fn segment(&mut self, packet: &[u8], vlan: Option<u16>) {
        let c = self.state.tx_context;
        let hdr_len = usize::from(c.hdr_len);
        let mss = usize::from(c.mss);
        let ipcss = usize::from(c.ipcss);
        let tucss = usize::from(c.tucss);
        let tcp = c.cmd_and_length & txd::TCP != 0;
        let ipv4 = c.cmd_and_length & txd::IP != 0;
        let l4_fields = if tcp { 14 } else { 8 };
        if hdr_len > MAX_TSO_HEADER
            || hdr_len > packet.len()
            || mss == 0
            || hdr_len < ipcss + 6
            || hdr_len < usize::from(c.ipcso) + 2
            || hdr_len < tucss + l4_fields
            || hdr_len < usize::from(c.tucso) + 2
            || (!ipv4 && hdr_len < ipcss + 40)
        {
            tracing::debug!("e1000: TSO context {c:?} does not fit its packet; dropped");
            return;
        }
        let payload = &packet[hdr_len..];
        let mut header = packet[..hdr_len].to_vec();
        let ip_id = be16(&header[ipcss + 4..]);
        let seq = if tcp { be32(&header[tucss + 4..]) } else { 0 };
        let tcp_flags = header.get(tucss + 13).copied().unwrap_or(0);
        // The driver leaves the pseudo-header sum without the length.
        let pseudo = be16(&header[usize::from(c.tucso)..]);
        let chunks = payload.len().div_ceil(mss).max(1);
        let mut frame = Vec::with_capacity(hdr_len + mss);
        for (n, chunk) in payload.chunks(mss).enumerate() {
            let last = n + 1 == chunks;
            if ipv4 {
                put16(
                    &mut header[ipcss + 2..],
                    (hdr_len - ipcss + chunk.len()) as u16,
                );
                put16(&mut header[ipcss + 4..], ip_id.wrapping_add(n as u16));
            } else {
                put16(
                    &mut header[ipcss + 4..],
                    (hdr_len - ipcss - 40 + chunk.len()) as u16,
                );
            }
            let l4_len = hdr_len - tucss + chunk.len();
            if tcp {
                let offset = (n * mss) as u32;
                put32(&mut header[tucss + 4..], seq.wrapping_add(offset));
                // FIN and PSH only on the last segment.
                header[tucss + 13] = if last { tcp_flags } else { tcp_flags & !0x09 };
            } else {
                put16(&mut header[tucss + 4..], l4_len as u16);
            }
            frame.clear();
            frame.extend_from_slice(&header);
            frame.extend_from_slice(chunk);
            if ipv4 {
                put16(&mut frame[usize::from(c.ipcso)..], 0);
                insert_checksum(&mut frame, ipcss, c.ipcse.into(), c.ipcso.into());
            }
            let with_len = fold(u32::from(pseudo) + l4_len as u32);
            put16(&mut frame[usize::from(c.tucso)..], with_len);
            insert_checksum(&mut frame, tucss, c.tucse.into(), c.tucso.into());
            self.send(&frame, vlan);
        }
        self.count(reg::TSCTC, 1);
    }

    fn send(&mut self, frame: &[u8], vlan: Option<u16>) {
        let result = match vlan {
            Some(tag) if frame.len() >= 12 => {
                let vet = self.state.plain.get(&reg::VET).copied().unwrap_or(0) as u16;
                let mut tagged = Vec::with_capacity(frame.len() + VLAN_TAG_LEN);
                tagged.extend_from_slice(&frame[..12]);
                tagged.extend_from_slice(&vet.to_be_bytes());
                tagged.extend_from_slice(&tag.to_be_bytes());
                tagged.extend_from_slice(&frame[12..]);
                self.backend.send(&tagged)
            }
            _ => self.backend.send(frame),
        };
        if let Err(e) = result {
            tracing::debug!("e1000: frame of {} bytes not sent: {e}", frame.len());
            return;
        }
        let len = frame.len() as u64 + ETHER_CRC_LEN as u64;
        self.count(reg::GPTC, 1);
        self.count(reg::TPT, 1);
        self.count(reg::GOTCL, len);
        self.count(reg::TOTL, len);
        self.count(reg::PTC64 + size_bin(len) * 4, 1);
        if frame.first().is_some_and(|b| b & 1 != 0) {
            let bcast = frame.len() >= 6 && frame[..6] == [0xFF; 6];
            self.count(if bcast { reg::BPTC } else { reg::MPTC }, 1);
        }
    }

    // ---- receive ----

    fn rx_buffer_size(&self) -> usize {
        let r = self.state.rctl;
        let code = r >> rctl::BSIZE_SHIFT & 3;
        match (r & rctl::BSEX != 0, code) {
            (false, 0) => 2048,
            (false, 1) => 1024,
            (false, 2) => 512,
            (false, _) => 256,
            (true, 1) => 16384,
            (true, 2) => 8192,
            (true, 3) => 4096,
            // BSEX with size code 0 is reserved.
            (true, _) => 2048,
        }
    }

    /// Free receive descriptors between RDH and RDT, or `None` when the
    /// ring is off or inconsistent.
    fn rx_free(&self) -> Option<(u32, u32)> {
        let s = &self.state;
        let size = Self::ring_size(s.rdlen);
        if s.rctl & rctl::EN == 0 || size == 0 || s.rdh >= size || s.rdt >= size {
            return None;
        }
        Some(((size + s.rdt - s.rdh) % size, size))
    }

    /// Move frames from the back end into guest buffers while there are
    /// buffers (at most one ring's worth per call).
    fn rx_run(&mut self) {
        let mut causes = 0;
        let mut delivered = 0u32;
        loop {
            let len = match self.rx_pending.take() {
                Some(len) => len,
                None => match self.backend.recv(&mut self.rx_frame) {
                    Ok(Some(len)) => len,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!("e1000: receive from the back end failed: {e}");
                        break;
                    }
                },
            };
            let Some((free, size)) = self.rx_free() else {
                if self.state.rctl & rctl::EN == 0 {
                    // Receiver off: the frame is lost, as on the wire.
                    continue;
                }
                self.rx_pending = Some(len);
                break;
            };
            let max = if self.state.rctl & rctl::LPE != 0 {
                16384
            } else {
                1522
            };
            if len > max {
                self.count(reg::ROC, 1);
                continue;
            }
            let bufsz = self.rx_buffer_size();
            let mut wire_len = len.max(ETHER_MIN_LEN);
            if len < ETHER_MIN_LEN {
                self.rx_frame[len..ETHER_MIN_LEN].fill(0);
            }
            if self.state.rctl & rctl::SECRC == 0 {
                // The CRC stays on the frame; the tap has none, write zeros.
                self.rx_frame[wire_len..wire_len + ETHER_CRC_LEN].fill(0);
                wire_len += ETHER_CRC_LEN;
            }
            let needed = wire_len.div_ceil(bufsz) as u32;
            // One descriptor stays unused: RDH == RDT means an empty ring.
            if needed > free || delivered + needed > size {
                if delivered == 0 && needed >= size {
                    // It can never fit this ring.
                    self.count(reg::MPC, 1);
                    continue;
                }
                self.rx_pending = Some(len);
                if delivered == 0 {
                    causes |= icr::RXO;
                }
                break;
            }
            if !self.vlan_accepts(len) {
                continue;
            }
            if !self.write_rx(wire_len, bufsz, size) {
                break;
            }
            delivered += needed;
            causes |= icr::RXT0;
            let rsrpd = self.state.plain.get(&reg::RSRPD).copied().unwrap_or(0);
            if (wire_len as u32) <= rsrpd {
                causes |= icr::SRPD;
            }
            self.count_rx(len, wire_len);
        }
        if delivered > 0 {
            if let Some((free, size)) = self.rx_free() {
                let rdmts = self.state.rctl >> rctl::RDMTS_SHIFT & 3;
                if free < size >> (rdmts + 1) {
                    causes |= icr::RXDMT0;
                }
            }
        }
        if causes != 0 {
            self.raise(causes);
        }
    }

    /// With the VLAN filter on, a tagged frame passes only if its VLAN's
    /// bit is set in VFTA.
    fn vlan_accepts(&self, len: usize) -> bool {
        let s = &self.state;
        let vet = s.plain.get(&reg::VET).copied().unwrap_or(0) as u16;
        if s.rctl & rctl::VFE == 0 || len < 16 || be16(&self.rx_frame[12..]) != vet {
            return true;
        }
        let tag = be16(&self.rx_frame[14..]) & 0xFFF;
        s.vfta[usize::from(tag >> 5)] & 1 << (tag & 31) != 0
    }

    /// Write the frame in `rx_frame[..len]` into the buffers from RDH on.
    fn write_rx(&mut self, len: usize, bufsz: usize, size: u32) -> bool {
        let mut done = 0;
        let mut head = self.state.rdh;
        while done < len {
            let desc = self.state.rdba + u64::from(head) * 16;
            let Ok(addr) = self.mem.read_obj::<u64>(GuestAddress(desc)) else {
                tracing::debug!("e1000: receive descriptor {head} outside guest memory");
                return false;
            };
            let n = (len - done).min(bufsz);
            let last = done + n == len;
            if self
                .mem
                .write_slice(&self.rx_frame[done..done + n], GuestAddress(addr))
                .is_err()
            {
                tracing::debug!("e1000: receive buffer {addr:#x} outside guest memory");
            }
            let mut wb = [0u8; 8];
            wb[0..2].copy_from_slice(&(n as u16).to_le_bytes());
            wb[4] = rxd::STAT_DD | rxd::STAT_IXSM | if last { rxd::STAT_EOP } else { 0 };
            if self.mem.write_slice(&wb, GuestAddress(desc + 8)).is_err() {
                return false;
            }
            done += n;
            head = (head + 1) % size;
            self.state.rdh = head;
        }
        true
    }

    fn count_rx(&mut self, len: usize, wire_len: usize) {
        let octets = wire_len as u64
            + if self.state.rctl & rctl::SECRC != 0 {
                4
            } else {
                0
            };
        self.count(reg::GPRC, 1);
        self.count(reg::TPR, 1);
        self.count(reg::GORCL, octets);
        self.count(reg::TORL, octets);
        self.count(reg::PRC64 + size_bin(octets) * 4, 1);
        if self.rx_frame[0] & 1 != 0 && len >= 6 {
            let bcast = self.rx_frame[..6] == [0xFF; 6];
            self.count(if bcast { reg::BPRC } else { reg::MPRC }, 1);
        }
    }
}

impl Drop for E1000 {
    fn drop(&mut self) {
        // The thread holds a weak reference: wake it to find it gone.
        self.kick();
    }
}

impl PciFunction for E1000 {
    fn config(&self) -> &PciConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfigSpace {
        &mut self.config
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let value = match (bar, offset, data.len()) {
            (BAR_REGISTERS, o, 4) if o % 4 == 0 => self.read_register(o as u32),
            (BAR_IO, 0, 4) => self.state.io_addr,
            (BAR_IO, 4, 4) if self.state.io_addr < IO_REGISTER_LIMIT => {
                self.read_register(self.state.io_addr & !3)
            }
            _ => return,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match (bar, offset) {
            (BAR_REGISTERS, o) if o % 4 == 0 => self.write_register(o as u32, value),
            (BAR_IO, 0) => self.state.io_addr = value,
            (BAR_IO, 4) if self.state.io_addr < IO_REGISTER_LIMIT => {
                self.write_register(self.state.io_addr & !3, value)
            }
            _ => {}
        }
    }

    /// Takes effect at once: the thread services under the device lock,
    /// so none of its work is in flight once this holds the lock.
    fn pause(&mut self) {
        self.paused = true;
    }

    fn resume(&mut self) {
        self.paused = false;
        // A restored line already stands as saved; causes that came from
        // register writes while paused take effect now.
        self.update_irq();
        // Descriptors queued before the pause (or restored) go now.
        self.kick();
    }

    fn save_device(&self) -> Result<Option<DeviceState>, SnapshotError> {
        DeviceState::encode(E1000State::KIND, &self.state).map(Some)
    }

    /// Into a freshly built controller: the MAC comes from the command
    /// line and must be the snapshot's; the rest is the guest's doing.
    fn restore_device(&mut self, saved: Option<&DeviceState>) -> Result<(), SnapshotError> {
        let saved: E1000State = saved
            .ok_or_else(|| SnapshotError::Mismatch("an e1000 without its state".into()))?
            .decode()?;
        if saved.mac != self.state.mac {
            return Err(SnapshotError::Mismatch(format!(
                "e1000: the snapshot's MAC is {}, this command line gives {}",
                mac_string(saved.mac),
                mac_string(self.state.mac)
            )));
        }
        // Tables are indexed by register offset: a snapshot file with
        // other sizes is not one this rhyve wrote.
        let here = &self.state;
        let sizes = |s: &E1000State| (s.ra.len(), s.mta.len(), s.vfta.len(), s.eeprom.len());
        if sizes(&saved) != sizes(here) {
            return Err(SnapshotError::Mismatch(format!(
                "e1000: the snapshot's RA/MTA/VFTA/EEPROM sizes are {:?}, this rhyve's {:?}",
                sizes(&saved),
                sizes(here)
            )));
        }
        self.state = saved;
        self.rx_pending = None;
        self.tx_packet.clear();
        // The inventory resumes it once every device is back.
        self.paused = true;
        Ok(())
    }
}

fn mac_string(m: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// The device thread: sleeps until the vCPU kicks it or the back end has
/// a frame (unless a frame already waits for buffers), then services the
/// device. Ends when the device is gone.
fn device_thread(device: Weak<Mutex<E1000>>, wake: Arc<EventFd>, tap_fd: Option<RawFd>) {
    let mut watch_tap = true;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: tap_fd.filter(|_| watch_tap).unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: polls two pollfd structs we own; a negative fd is skipped.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            tracing::error!("e1000: poll failed: {}", io::Error::last_os_error());
            return;
        }
        let _ = wake.read();
        let Some(device) = device.upgrade() else {
            return;
        };
        let mut dev = device.lock().unwrap_or_else(|e| e.into_inner());
        dev.service();
        watch_tap = !dev.tap_ignored();
    }
}

/// The EEPROM bhyve presents: MAC, IDs, and the checksum word that makes
/// words 0..=0x3F add up to 0xBABA.
pub fn eeprom_image(mac: [u8; 6]) -> Vec<u16> {
    let mut w = vec![0u16; nvm::SIZE];
    for i in 0..3 {
        w[nvm::MAC + i] = u16::from_le_bytes([mac[2 * i], mac[2 * i + 1]]);
    }
    w[nvm::SUBSYSTEM_ID] = SUBSYSTEM_ID;
    w[nvm::SUBSYSTEM_VENDOR] = VENDOR_ID;
    w[nvm::DEVICE_ID] = DEVICE_ID;
    w[nvm::VENDOR_ID] = VENDOR_ID;
    let sum = w[..nvm::CHECKSUM]
        .iter()
        .fold(0u16, |a, b| a.wrapping_add(*b));
    w[nvm::CHECKSUM] = nvm::SUM.wrapping_sub(sum);
    w
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn put16(b: &mut [u8], v: u16) {
    b[..2].copy_from_slice(&v.to_be_bytes());
}

fn put32(b: &mut [u8], v: u32) {
    b[..4].copy_from_slice(&v.to_be_bytes());
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    sum as u16
}

/// The Internet checksum's ones' complement sum of `data`.
pub fn ones_sum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    let mut pairs = data.chunks_exact(2);
    for p in &mut pairs {
        sum += u32::from(u16::from_be_bytes([p[0], p[1]]));
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    if let [b] = pairs.remainder() {
        sum += u32::from(*b) << 8;
    }
    fold(sum)
}

/// Checksum `packet[start..=end]` (`end` 0: to the packet's end) and store
/// its complement at `offset`, the descriptor's CSS/CSE/CSO. Out-of-range
/// fields leave the packet as it is.
fn insert_checksum(packet: &mut [u8], start: usize, end: usize, offset: usize) {
    let stop = if end == 0 {
        packet.len()
    } else {
        (end + 1).min(packet.len())
    };
    if start >= stop || offset + 2 > packet.len() {
        return;
    }
    let sum = !ones_sum(&packet[start..stop]);
    put16(&mut packet[offset..], sum);
}

/// Which of the 64/127/255/511/1023/1522-byte statistics bins a frame
/// of `len` bytes (with CRC) counts in.
fn size_bin(len: u64) -> u32 {
    match len {
        0..=64 => 0,
        65..=127 => 1,
        128..=255 => 2,
        256..=511 => 3,
        512..=1023 => 4,
        _ => 5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eeprom_words_add_up_to_0xbaba() {
        let w = eeprom_image([0x00, 0xa0, 0x98, 0x12, 0x34, 0x56]);
        let sum = w.iter().fold(0u16, |a, b| a.wrapping_add(*b));
        assert_eq!(sum, nvm::SUM);
        assert_eq!(&w[0..3], &[0xa000, 0x1298, 0x5634]);
    }

    #[test]
    fn ones_sum_matches_rfc1071_example() {
        // RFC 1071's example: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        assert_eq!(
            ones_sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0xddf2
        );
    }
}
