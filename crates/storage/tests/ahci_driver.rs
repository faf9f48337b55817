//! A test driver written from the AHCI 1.3, ATA8-ACS and MMC/SPC specs: it
//! reaches the controller only through the platform buses, as a vCPU does
//! (config mechanism #1 at 0xCF8/0xCFC, MMIO in ABAR), builds command
//! lists, command tables and PRD tables in guest memory and checks what
//! the HBA writes back (received FISes, PxCI/PxSACT/PxTFD/PxIS, data).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use md5::{Digest, Md5};
use rhyve_config::ConfigTree;
use rhyve_pci::{PciBdf, PciRoot, PciRootConfig};
use rhyve_platform::bus::Bus;
use rhyve_platform::irq::{InterruptController, InterruptLine, MsiSender};
use rhyve_platform::layout::{MemoryLayout, IOAPIC_PINS};
use rhyve_storage::ahci::{ata, hba, port};
use rhyve_storage::{Ahci, GuestMemory};
use vm_memory::{Bytes, GuestAddress};

const MEM_SIZE: u64 = 32 << 20;
const SLOT: u8 = 3;

// ---- a fake interrupt controller ----

#[derive(Default)]
struct Irqs {
    levels: Mutex<BTreeMap<u32, bool>>,
    msis: Mutex<Vec<(u64, u32)>>,
}

struct Line(Arc<Irqs>, u32);
impl InterruptLine for Line {
    fn set_level(&self, asserted: bool) {
        self.0.levels.lock().unwrap().insert(self.1, asserted);
    }
}

struct Msi(Arc<Irqs>);
impl MsiSender for Msi {
    fn send(&self, address: u64, data: u32) {
        self.0.msis.lock().unwrap().push((address, data));
    }
}

struct Controller(Arc<Irqs>);
impl InterruptController for Controller {
    fn line(&self, gsi: u32) -> Arc<dyn InterruptLine> {
        Arc::new(Line(self.0.clone(), gsi))
    }
    fn msi(&self) -> Arc<dyn MsiSender> {
        Arc::new(Msi(self.0.clone()))
    }
}

// ---- backing files ----

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rhyve-ahci-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Sector `n` of a test image: every byte is `(n * 7 + i) % 251`.
fn pattern(sector: u64, size: usize) -> Vec<u8> {
    (0..size)
        .map(|i| ((sector * 7 + i as u64) % 251) as u8)
        .collect()
}

fn image(name: &str, sectors: u64, sector_size: usize) -> PathBuf {
    let path = scratch(name);
    let mut data = Vec::with_capacity(sectors as usize * sector_size);
    for s in 0..sectors {
        data.extend(pattern(s, sector_size));
    }
    std::fs::write(&path, data).unwrap();
    path
}

// ---- the machine ----

struct Hba {
    ahci: Arc<Mutex<Ahci>>,
    io: Arc<Bus>,
    mmio: Arc<Bus>,
    irqs: Arc<Irqs>,
    root: Arc<PciRoot>,
    mem: GuestMemory,
    abar: u64,
}

const CLB: u64 = 0x10_0000;
const FB: u64 = 0x10_8000;
const TABLES: u64 = 0x11_0000;
const TABLE_SIZE: u64 = 0x1000;
const DATA: u64 = 0x40_0000;

fn bdf() -> PciBdf {
    PciBdf {
        bus: 0,
        slot: SLOT,
        func: 0,
    }
}

/// A port: type, backing file, extra keys.
type PortSpec<'a> = (&'a str, &'a PathBuf, &'a [(&'a str, &'a str)]);

fn tree_with(ports: &[PortSpec]) -> ConfigTree {
    let mut t = ConfigTree::new();
    let node = format!("pci.0.{SLOT}.0");
    t.set(&format!("{node}.device"), "ahci").unwrap();
    for (n, (kind, path, extra)) in ports.iter().enumerate() {
        let p = format!("{node}.port.{n}");
        t.set(&format!("{p}.type"), *kind).unwrap();
        t.set(&format!("{p}.path"), path.to_str().unwrap()).unwrap();
        for (k, v) in *extra {
            t.set(&format!("{p}.{k}"), *v).unwrap();
        }
    }
    t
}

impl Hba {
    fn new(tree: &ConfigTree) -> Self {
        let io = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let irqs = Arc::new(Irqs::default());
        let root = PciRoot::new(PciRootConfig {
            io_bus: io.clone(),
            mmio_bus: mmio.clone(),
            layout: MemoryLayout::new(1 << 30),
            interrupts: Arc::new(Controller(irqs.clone())),
            ioapic_pins: IOAPIC_PINS,
            bootrom: false,
            enable_bars: true,
        })
        .unwrap();
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let ahci = Ahci::from_config(tree, &bdf().node(), mem.clone()).unwrap();
        root.add_function(bdf(), ahci.clone()).unwrap();
        root.finalize().unwrap();
        let mut h = Self {
            ahci,
            io,
            mmio,
            irqs,
            root,
            mem,
            abar: 0,
        };
        h.abar = u64::from(h.cfg_read(0x24, 4) & !0xF);
        assert_ne!(h.abar, 0, "BAR 5 assigned");
        h
    }

    fn cfg_read(&self, reg: u16, size: usize) -> u32 {
        let addr = 0x8000_0000u32 | u32::from(SLOT) << 11 | u32::from(reg & 0xFC);
        assert!(self.io.write(0xCF8, &addr.to_le_bytes()));
        let mut b = [0u8; 4];
        self.io.read(0xCFC + u64::from(reg & 3), &mut b[..size]);
        u32::from_le_bytes(b)
    }

    fn cfg_write(&self, reg: u16, size: usize, value: u32) {
        let addr = 0x8000_0000u32 | u32::from(SLOT) << 11 | u32::from(reg & 0xFC);
        assert!(self.io.write(0xCF8, &addr.to_le_bytes()));
        self.io
            .write(0xCFC + u64::from(reg & 3), &value.to_le_bytes()[..size]);
    }

    fn r(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        assert!(self.mmio.read(self.abar + off, &mut b));
        u32::from_le_bytes(b)
    }

    /// Register write, then wait until the I/O thread has finished
    /// whatever the write started (tests look at completed state).
    fn w(&self, off: u64, v: u32) {
        assert!(self.mmio.write(self.abar + off, &v.to_le_bytes()));
        self.settle();
    }

    fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let busy = self
                .ahci
                .lock()
                .unwrap()
                .state()
                .ports
                .iter()
                .any(|p| p.pending != 0);
            if !busy {
                return;
            }
            assert!(Instant::now() < deadline, "I/O did not complete");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn pr(&self, p: u64, reg: u64) -> u32 {
        self.r(0x100 + p * 0x80 + reg)
    }

    fn pw(&self, p: u64, reg: u64, v: u32) {
        self.w(0x100 + p * 0x80 + reg, v)
    }

    fn intx_gsi(&self) -> u32 {
        self.root
            .intx_routes()
            .into_iter()
            .find(|r| r.slot == SLOT)
            .expect("INTx routed")
            .gsi
    }

    fn intx(&self) -> bool {
        let gsi = self.intx_gsi();
        self.irqs
            .levels
            .lock()
            .unwrap()
            .get(&gsi)
            .copied()
            .unwrap_or(false)
    }

    fn clb(p: u64) -> u64 {
        CLB + p * 0x400
    }

    fn fb(p: u64) -> u64 {
        FB + p * 0x100
    }

    fn table(p: u64, slot: u32) -> u64 {
        TABLES + (p * 32 + u64::from(slot)) * TABLE_SIZE
    }

    /// What a driver does to bring a port up: command list, FIS area,
    /// FRE, clear errors and interrupts, ST.
    fn start_port(&self, p: u64) {
        self.pw(
            p,
            port::CMD,
            self.pr(p, port::CMD) & !(port::CMD_ST | port::CMD_FRE),
        );
        self.pw(p, port::CLB, Self::clb(p) as u32);
        self.pw(p, port::CLBU, 0);
        self.pw(p, port::FB, Self::fb(p) as u32);
        self.pw(p, port::FBU, 0);
        self.pw(p, port::CMD, port::CMD_FRE);
        self.pw(p, port::SERR, u32::MAX);
        self.pw(p, port::IS, u32::MAX);
        self.pw(p, port::IE, u32::MAX);
        self.pw(p, port::CMD, port::CMD_FRE | port::CMD_ST);
        assert_ne!(self.pr(p, port::CMD) & port::CMD_CR, 0, "list running");
    }

    /// Driver-side recovery after an error: stop, clear, start.
    fn restart_port(&self, p: u64) {
        self.pw(p, port::CMD, port::CMD_FRE);
        assert_eq!(self.pr(p, port::CI), 0, "stopping clears PxCI");
        self.pw(p, port::IS, u32::MAX);
        self.pw(p, port::CMD, port::CMD_FRE | port::CMD_ST);
    }

    /// Write command header `slot` and its table: `cfis`, `acmd`, and PRDs
    /// (address, byte count).
    fn prepare(&self, p: u64, slot: u32, cfis: &[u8; 20], acmd: &[u8], prds: &[(u64, u32)]) {
        let table = Self::table(p, slot);
        let mut hdr = [0u8; 32];
        let flags: u32 = 5 | if acmd.is_empty() { 0 } else { 1 << 5 };
        hdr[0..4].copy_from_slice(&(flags | (prds.len() as u32) << 16).to_le_bytes());
        hdr[4..8].copy_from_slice(&0xDEAD_BEEFu32.to_le_bytes());
        hdr[8..16].copy_from_slice(&table.to_le_bytes());
        self.mem
            .write_slice(&hdr, GuestAddress(Self::clb(p) + u64::from(slot) * 32))
            .unwrap();
        let mut t = vec![0u8; 0x80 + 16 * prds.len()];
        t[..20].copy_from_slice(cfis);
        t[0x40..0x40 + acmd.len()].copy_from_slice(acmd);
        for (i, (addr, len)) in prds.iter().enumerate() {
            let e = &mut t[0x80 + 16 * i..0x90 + 16 * i];
            e[0..8].copy_from_slice(&addr.to_le_bytes());
            e[12..16].copy_from_slice(&(len - 1).to_le_bytes());
        }
        self.mem.write_slice(&t, GuestAddress(table)).unwrap();
    }

    fn issue(&self, p: u64, slot: u32, cfis: &[u8; 20], acmd: &[u8], prds: &[(u64, u32)]) {
        self.prepare(p, slot, cfis, acmd, prds);
        self.pw(p, port::CI, 1 << slot);
    }

    fn prdbc(&self, p: u64, slot: u32) -> u32 {
        self.mem
            .read_obj(GuestAddress(Self::clb(p) + u64::from(slot) * 32 + 4))
            .unwrap()
    }

    fn d2h_fis(&self, p: u64) -> [u8; 20] {
        let mut f = [0u8; 20];
        self.mem
            .read_slice(&mut f, GuestAddress(Self::fb(p) + 0x40))
            .unwrap();
        f
    }

    fn sdb_fis(&self, p: u64) -> [u8; 8] {
        let mut f = [0u8; 8];
        self.mem
            .read_slice(&mut f, GuestAddress(Self::fb(p) + 0x58))
            .unwrap();
        f
    }

    fn read_mem(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Succeeded: slot retired, status ready without error.
    fn assert_ok(&self, p: u64, slot: u32) {
        let tfd = self.pr(p, port::TFD);
        assert_eq!(tfd & 0x89, 0, "TFD {tfd:#x}: no BSY/DRQ/ERR");
        assert_eq!(self.pr(p, port::CI) & (1 << slot), 0, "CI bit retired");
        assert_eq!(
            self.pr(p, port::IS) & port::IS_TFES,
            0,
            "no task file error"
        );
    }

    /// Failed: error status, TFES, the slot left issued.
    fn assert_failed(&self, p: u64, slot: u32) {
        let tfd = self.pr(p, port::TFD);
        assert_eq!(tfd & 1, 1, "TFD {tfd:#x}: ERR");
        assert_ne!(self.pr(p, port::IS) & port::IS_TFES, 0, "TFES raised");
        assert_ne!(
            self.pr(p, port::CI) & (1 << slot),
            0,
            "failed slot stays in CI"
        );
    }
}

/// A host-to-device register FIS.
fn h2d(command: u8, features: u16, lba: u64, count: u16) -> [u8; 20] {
    let mut f = [0u8; 20];
    f[0] = 0x27;
    f[1] = 0x80;
    f[2] = command;
    f[3] = features as u8;
    f[4] = lba as u8;
    f[5] = (lba >> 8) as u8;
    f[6] = (lba >> 16) as u8;
    f[7] = 0x40;
    f[8] = (lba >> 24) as u8;
    f[9] = (lba >> 32) as u8;
    f[10] = (lba >> 40) as u8;
    f[11] = (features >> 8) as u8;
    f[12] = count as u8;
    f[13] = (count >> 8) as u8;
    f
}

/// An NCQ command: count in the features field, tag in count bits 7:3.
fn fpdma(command: u8, tag: u32, lba: u64, count: u16) -> [u8; 20] {
    let mut f = h2d(command, count, lba, (tag as u16) << 3);
    f[7] = 0x40;
    f
}

/// A disk of 2048 sectors on port 0 and a 64-block DVD on port 1; `name`
/// keeps each test's images apart (tests run in parallel).
fn disk_and_cd(name: &str) -> (Hba, PathBuf, PathBuf) {
    let disk = image(&format!("{name}.img"), 2048, 512);
    let iso = image(&format!("{name}.iso"), 64, 2048);
    let tree = tree_with(&[("hd", &disk, &[]), ("cd", &iso, &[])]);
    (Hba::new(&tree), disk, iso)
}

fn identify_words(h: &Hba, buf: u64) -> Vec<u16> {
    h.read_mem(buf, 512)
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}

fn ata_string(words: &[u16]) -> String {
    words
        .iter()
        .flat_map(|w| [(w >> 8) as u8, *w as u8])
        .map(char::from)
        .collect::<String>()
        .trim_end()
        .to_string()
}

#[test]
fn pci_identity_bar5_msi_and_intx() {
    let (h, _, _) = disk_and_cd("pci");
    assert_eq!(h.cfg_read(0, 4), 0x2821_8086);
    assert_eq!(h.cfg_read(8, 4) >> 8, 0x01_06_01, "SATA AHCI 1.0");
    for bar in 0..5u16 {
        assert_eq!(h.cfg_read(0x10 + 4 * bar, 4), 0, "only BAR 5");
    }
    let bar5 = h.cfg_read(0x24, 4);
    assert_eq!(bar5 & 0xF, 0, "32-bit memory BAR");
    // Size it: decode off, all ones, read back.
    let cmd = h.cfg_read(4, 2);
    h.cfg_write(4, 2, cmd & !3);
    h.cfg_write(0x24, 4, u32::MAX);
    let size = !(h.cfg_read(0x24, 4) & !0xF) + 1;
    h.cfg_write(0x24, 4, bar5);
    h.cfg_write(4, 2, cmd);
    assert_eq!(size, 0x2000, "0x100 + 32 ports * 0x80, rounded up");
    // The capability list holds MSI with 16 messages (MMC = 4), 64-bit.
    assert_ne!(h.cfg_read(4, 4) & (1 << 20), 0);
    let cap = h.cfg_read(0x34, 1) as u16;
    assert_eq!(h.cfg_read(cap, 1), 0x05);
    assert_eq!((h.cfg_read(cap + 2, 2) >> 1) & 7, 4);
    assert_eq!(h.cfg_read(cap + 2, 2) & 0x80, 0x80);
    assert_ne!(h.cfg_read(0x3D, 1), 0, "an INTx pin");
}

#[test]
fn hba_registers_reset_and_port_signatures() {
    let (h, _, _) = disk_and_cd("regs");
    let cap = h.r(hba::CAP);
    assert_eq!(cap & 0x1F, 31, "NP: bhyve presents 32 ports");
    assert_eq!((cap >> 8) & 0x1F, 31, "32 command slots");
    assert_ne!(cap & hba::CAP_SNCQ, 0);
    assert_ne!(cap & hba::CAP_64BIT, 0);
    assert_ne!(cap & hba::CAP_SCLO, 0);
    assert_eq!((cap >> 20) & 0xF, 3, "gen 3 interface speed");
    assert_eq!(h.r(hba::PI), 0b11);
    assert_eq!(h.r(hba::VS), 0x0001_0300);
    assert_eq!(h.r(hba::CAP2), hba::CAP2_APST);
    assert_eq!(h.r(hba::GHC), hba::GHC_AE);
    assert_eq!(h.pr(0, port::SIG), port::SIG_ATA);
    assert_eq!(h.pr(1, port::SIG), port::SIG_ATAPI);
    assert_eq!(h.pr(2, port::SIG), u32::MAX);
    assert_eq!(h.pr(0, port::SSTS) & 0xF, 3, "device present, phy up");
    assert_eq!(h.pr(2, port::SSTS) & 0xF, 0, "no device");
    assert_eq!(h.pr(0, port::TFD) & 0xFF, 0x70, "disk ready");
    assert_eq!(h.pr(31, port::SIG), u32::MAX, "last port set exists");

    // GHC.IE sticks; HBA reset clears it and the port state.
    h.w(hba::GHC, hba::GHC_IE | hba::GHC_AE);
    assert_eq!(h.r(hba::GHC), hba::GHC_IE | hba::GHC_AE);
    h.start_port(0);
    h.w(hba::GHC, hba::GHC_HR);
    assert_eq!(h.r(hba::GHC), hba::GHC_AE, "reset done, HR reads 0");
    assert_eq!(h.pr(0, port::CMD) & port::CMD_ST, 0);
    assert_eq!(h.pr(0, port::IE), 0);
    // Read-only registers ignore writes; sub-dword writes are dropped.
    h.w(hba::CAP, 0);
    assert_eq!(h.r(hba::CAP), cap);
    h.mmio.write(h.abar + 0x104, &[0xAB]);
    assert_eq!(h.pr(0, port::CLBU), 0);
    // Byte reads see parts of a register.
    let mut b = [0u8; 1];
    h.mmio.read(h.abar + hba::VS + 2, &mut b);
    assert_eq!(b[0], 1);

    // COMRESET through PxSCTL while stopped brings the initial D2H FIS.
    h.pw(0, port::CLB, Hba::clb(0) as u32);
    h.pw(0, port::FB, Hba::fb(0) as u32);
    h.pw(0, port::CMD, port::CMD_FRE);
    h.pw(0, port::SCTL, 1);
    h.pw(0, port::SCTL, 0);
    let f = h.d2h_fis(0);
    assert_eq!((f[0], f[4], f[12]), (0x34, 1, 1), "signature FIS");
}

#[test]
fn identify_device_reports_bhyves_identity() {
    let (h, disk, iso) = disk_and_cd("ident");
    h.start_port(0);
    h.issue(0, 0, &h2d(ata::IDENTIFY, 0, 0, 0), &[], &[(DATA, 512)]);
    h.assert_ok(0, 0);
    assert_eq!(h.prdbc(0, 0), 512);
    // PIO setup FIS and D2H with the interrupt bit.
    assert_ne!(h.pr(0, port::IS) & port::IS_DHRS, 0);
    let w = identify_words(&h, DATA);
    assert_eq!(ata_string(&w[27..47]), "BHYVE SATA DISK");
    assert_eq!(ata_string(&w[23..27]), "001");
    let d = Md5::digest(disk.to_str().unwrap().as_bytes());
    let serial = format!(
        "BHYVE-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}",
        d[0], d[1], d[2], d[3], d[4], d[5]
    );
    assert_eq!(ata_string(&w[10..20]), serial);
    assert_eq!(u32::from(w[60]) | u32::from(w[61]) << 16, 2048);
    assert_eq!(w[100], 2048);
    assert_eq!(w[101..104], [0, 0, 0]);
    assert_ne!(w[76] & 0x100, 0, "NCQ");
    assert_eq!(w[75], 31, "queue depth 32");
    assert_ne!(w[83] & 0x400, 0, "48-bit");
    assert_eq!(w[169] & 1, 1, "TRIM");
    let sum = h
        .read_mem(DATA, 512)
        .iter()
        .fold(0u8, |a, &b| a.wrapping_add(b));
    assert_eq!(sum, 0, "checksum");
    assert_eq!(w[255] & 0xFF, 0xA5);

    // The DVD drive aborts IDENTIFY DEVICE and answers IDENTIFY PACKET DEVICE.
    h.start_port(1);
    h.issue(1, 0, &h2d(ata::IDENTIFY, 0, 0, 0), &[], &[(DATA, 512)]);
    h.assert_failed(1, 0);
    assert_eq!(h.pr(1, port::TFD) >> 8 & 0xFF, 0x04, "ABRT");
    h.restart_port(1);
    h.issue(
        1,
        1,
        &h2d(ata::ATAPI_IDENTIFY, 0, 0, 0),
        &[],
        &[(DATA, 512)],
    );
    h.assert_ok(1, 1);
    let w = identify_words(&h, DATA);
    assert_eq!(w[0] & 0xDF80, 0x8580, "ATAPI CD-ROM, removable");
    assert_eq!(ata_string(&w[27..47]), "BHYVE SATA DVD ROM");
    let d = Md5::digest(iso.to_str().unwrap().as_bytes());
    assert!(ata_string(&w[10..20]).starts_with(&format!("BHYVE-{:02X}{:02X}", d[0], d[1])));
}

#[test]
fn identity_overrides_from_the_tree() {
    let disk = image("ids.img", 64, 512);
    let tree = tree_with(&[(
        "hd",
        &disk,
        &[
            ("ser", "MYSERIAL"),
            ("rev", "2.5"),
            ("model", "Some Model"),
            ("nmrr", "1"),
        ],
    )]);
    let h = Hba::new(&tree);
    h.start_port(0);
    h.issue(0, 3, &h2d(ata::IDENTIFY, 0, 0, 0), &[], &[(DATA, 512)]);
    h.assert_ok(0, 3);
    let w = identify_words(&h, DATA);
    assert_eq!(ata_string(&w[10..20]), "MYSERIAL");
    assert_eq!(ata_string(&w[23..27]), "2.5");
    assert_eq!(ata_string(&w[27..47]), "Some Model");
    assert_eq!(w[217], 1, "non-rotating");

    let mut bad = tree.clone();
    bad.set(&format!("pci.0.{SLOT}.0.port.0.nmrr"), "fast")
        .unwrap();
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let e = Ahci::from_config(&bad, &bdf().node(), mem.clone())
        .err()
        .unwrap();
    assert!(e.to_string().contains("nmrr"), "{e}");
    let mut bad = tree.clone();
    bad.set(&format!("pci.0.{SLOT}.0.port.0.type"), "tape")
        .unwrap();
    assert!(Ahci::from_config(&bad, &bdf().node(), mem.clone()).is_err());
    let missing = tree_with(&[("hd", &scratch("missing.img"), &[])]);
    let e = Ahci::from_config(&missing, &bdf().node(), mem)
        .err()
        .unwrap();
    assert!(e.to_string().contains("missing.img"), "{e}");
}

#[test]
fn dma_reads_and_writes_known_sectors() {
    let (h, disk, _) = disk_and_cd("dma");
    h.start_port(0);
    // READ DMA EXT of sectors 10..14 split over two PRDs.
    h.issue(
        0,
        0,
        &h2d(ata::READ_DMA48, 0, 10, 4),
        &[],
        &[(DATA, 1024), (DATA + 0x10000, 1024)],
    );
    h.assert_ok(0, 0);
    assert_eq!(h.prdbc(0, 0), 2048);
    let mut want = Vec::new();
    for s in 10..14 {
        want.extend(pattern(s, 512));
    }
    let mut got = h.read_mem(DATA, 1024);
    got.extend(h.read_mem(DATA + 0x10000, 1024));
    assert_eq!(got, want);
    let f = h.d2h_fis(0);
    assert_eq!(
        (f[0], f[1] & 0x40, f[2]),
        (0x34, 0x40, 0x50),
        "D2H, I bit, ready"
    );

    // WRITE DMA EXT at sector 100 from guest memory, then the file has it.
    let data: Vec<u8> = (0..1536).map(|i| (i * 13 % 256) as u8).collect();
    h.mem
        .write_slice(&data, GuestAddress(DATA + 0x20000))
        .unwrap();
    h.issue(
        0,
        1,
        &h2d(ata::WRITE_DMA48, 0, 100, 3),
        &[],
        &[(DATA + 0x20000, 1536)],
    );
    h.assert_ok(0, 1);
    let file = std::fs::read(&disk).unwrap();
    assert_eq!(&file[100 * 512..103 * 512], &data[..]);
    assert_eq!(&file[103 * 512..104 * 512], &pattern(103, 512)[..]);

    // 28-bit READ DMA reads the written sectors back.
    h.issue(
        0,
        2,
        &h2d(ata::READ_DMA, 0, 100, 3),
        &[],
        &[(DATA + 0x30000, 4096)],
    );
    h.assert_ok(0, 2);
    assert_eq!(h.read_mem(DATA + 0x30000, 1536), data);
    // PIO-class READ SECTORS moves data through the PRDs too.
    h.issue(0, 3, &h2d(ata::READ, 0, 2047, 1), &[], &[(DATA, 512)]);
    h.assert_ok(0, 3);
    assert_eq!(h.read_mem(DATA, 512), pattern(2047, 512));

    // FLUSH CACHE EXT.
    h.issue(0, 4, &h2d(ata::FLUSH_CACHE48, 0, 0, 0), &[], &[]);
    h.assert_ok(0, 4);
    // Accepted no-ops and SET FEATURES.
    for (c, feat, count) in [
        (ata::SET_FEATURES, 0x03u16, 0x45u16),
        (ata::SET_FEATURES, 0x02, 0),
        (ata::SET_FEATURES, 0x10, 0x05),
        (ata::IDLE_IMMEDIATE, 0, 0),
        (ata::SET_MULTI, 0, 16),
    ] {
        h.issue(0, 5, &h2d(c, feat, 0, count), &[], &[]);
        h.assert_ok(0, 5);
    }
    h.issue(0, 6, &h2d(ata::CHECK_POWER_MODE, 0, 0, 0), &[], &[]);
    h.assert_ok(0, 6);
    assert_eq!(h.d2h_fis(0)[12], 0xFF, "active");
    // The selected UDMA mode shows in the next IDENTIFY.
    h.issue(0, 7, &h2d(ata::IDENTIFY, 0, 0, 0), &[], &[(DATA, 512)]);
    h.assert_ok(0, 7);
    assert_eq!(identify_words(&h, DATA)[88], 0x207F, "UDMA5 selected");
}

#[test]
fn interrupts_intx_then_msi() {
    let (h, _, _) = disk_and_cd("irq");
    h.start_port(0);
    h.w(hba::GHC, hba::GHC_AE | hba::GHC_IE);
    assert!(!h.intx());
    h.issue(0, 0, &h2d(ata::FLUSH_CACHE, 0, 0, 0), &[], &[]);
    h.assert_ok(0, 0);
    assert_eq!(h.r(hba::IS), 1, "port 0 pending");
    assert!(h.intx(), "INTx asserted without MSI");
    // The driver acknowledges the port, then the HBA.
    h.pw(0, port::IS, h.pr(0, port::IS));
    h.w(hba::IS, 1);
    assert!(!h.intx(), "INTx deasserted");
    assert_eq!(h.r(hba::IS), 0);

    // Enable one MSI message.
    let cap = h.cfg_read(0x34, 1) as u16;
    h.cfg_write(cap + 4, 4, 0xFEE0_1000);
    h.cfg_write(cap + 8, 4, 0);
    h.cfg_write(cap + 12, 2, 0x41);
    h.cfg_write(cap + 2, 2, 1);
    h.issue(0, 1, &h2d(ata::FLUSH_CACHE, 0, 0, 0), &[], &[]);
    h.assert_ok(0, 1);
    assert_eq!(
        h.irqs.msis.lock().unwrap().as_slice(),
        &[(0xFEE0_1000, 0x41)]
    );
    assert!(!h.intx());
    // Interrupts disabled: status recorded, no message.
    h.pw(0, port::IS, u32::MAX);
    h.w(hba::IS, u32::MAX);
    h.w(hba::GHC, hba::GHC_AE);
    h.issue(0, 2, &h2d(ata::FLUSH_CACHE, 0, 0, 0), &[], &[]);
    assert_eq!(h.irqs.msis.lock().unwrap().len(), 1);
    assert_eq!(h.r(hba::IS), 1);
}

#[test]
fn ncq_reads_and_writes_complete_through_set_device_bits() {
    let (h, disk, _) = disk_and_cd("ncq");
    h.start_port(0);
    let data: Vec<u8> = (0..4096).map(|i| (i % 253) as u8).collect();
    h.mem
        .write_slice(&data, GuestAddress(DATA + 0x80000))
        .unwrap();
    // Four queued commands issued with one PxSACT and one PxCI write.
    h.prepare(
        0,
        0,
        &fpdma(ata::READ_FPDMA_QUEUED, 0, 0, 8),
        &[],
        &[(DATA, 4096)],
    );
    h.prepare(
        0,
        1,
        &fpdma(ata::READ_FPDMA_QUEUED, 1, 8, 8),
        &[],
        &[(DATA + 0x1000, 4096)],
    );
    h.prepare(
        0,
        2,
        &fpdma(ata::WRITE_FPDMA_QUEUED, 2, 500, 8),
        &[],
        &[(DATA + 0x80000, 4096)],
    );
    h.prepare(
        0,
        5,
        &fpdma(ata::READ_FPDMA_QUEUED, 5, 2040, 8),
        &[],
        &[(DATA + 0x3000, 4096)],
    );
    h.pw(0, port::SACT, 0b100111);
    h.pw(0, port::CI, 0b100111);
    assert_eq!(h.pr(0, port::CI), 0);
    assert_eq!(h.pr(0, port::SACT), 0, "all queued commands completed");
    assert_ne!(h.pr(0, port::IS) & port::IS_SDBS, 0);
    let sdb = h.sdb_fis(0);
    assert_eq!(sdb[0], 0xA1);
    assert_eq!(sdb[2] & 1, 0);
    assert_eq!(
        u32::from_le_bytes([sdb[4], sdb[5], sdb[6], sdb[7]]),
        1 << 5,
        "last tag"
    );
    let mut want = Vec::new();
    for s in 0..16 {
        want.extend(pattern(s, 512));
    }
    assert_eq!(h.read_mem(DATA, 8192), want);
    let mut want = Vec::new();
    for s in 2040..2048 {
        want.extend(pattern(s, 512));
    }
    assert_eq!(h.read_mem(DATA + 0x3000, 4096), want);
    assert_eq!(
        &std::fs::read(&disk).unwrap()[500 * 512..508 * 512],
        &data[..]
    );

    // A queued read past the end fails through an error SDB; the NCQ
    // command error log names the tag.
    h.pw(0, port::SACT, 1 << 7);
    h.issue(
        0,
        7,
        &fpdma(ata::READ_FPDMA_QUEUED, 7, 2047, 2),
        &[],
        &[(DATA, 1024)],
    );
    assert_eq!(h.sdb_fis(0)[2] & 1, 1, "error in SDB");
    assert_ne!(h.pr(0, port::IS) & port::IS_TFES, 0);
    assert_eq!(h.pr(0, port::SACT), 1 << 7, "failed tag still active");
    h.restart_port(0);
    assert_eq!(h.pr(0, port::SACT), 0);
    h.issue(
        0,
        0,
        &h2d(ata::READ_LOG_DMA_EXT, 0, 0x10, 1),
        &[],
        &[(DATA + 0x4000, 512)],
    );
    h.assert_ok(0, 0);
    let log = h.read_mem(DATA + 0x4000, 512);
    assert_eq!(log[0], 7, "tag of the failed command");
    assert_eq!(log[2] & 1, 1);
    assert_eq!(log.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
    // The log directory lists pages 10h and 13h.
    h.issue(
        0,
        1,
        &h2d(ata::READ_LOG_EXT, 0, 0, 1),
        &[],
        &[(DATA + 0x4000, 512)],
    );
    h.assert_ok(0, 1);
    let dir = h.read_mem(DATA + 0x4000, 512);
    assert_eq!((dir[0], dir[0x20], dir[0x26]), (1, 1, 1));
}

fn dsm_block(ranges: &[(u64, u16)]) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    for (i, (lba, n)) in ranges.iter().enumerate() {
        b[8 * i..8 * i + 6].copy_from_slice(&lba.to_le_bytes()[..6]);
        b[8 * i + 6..8 * i + 8].copy_from_slice(&n.to_le_bytes());
    }
    b
}

#[test]
fn trim_punches_holes_and_nodelete_refuses() {
    let disk = image("trim.img", 4096, 512);
    let tree = tree_with(&[("hd", &disk, &[])]);
    let h = Hba::new(&tree);
    h.start_port(0);
    let blocks_before = std::fs::metadata(&disk).unwrap().blocks();
    // DATA SET MANAGEMENT TRIM of 1 MiB at 1 MiB and 8 sectors at 16.
    h.mem
        .write_slice(
            &dsm_block(&[(2048, 2048), (0, 0), (16, 8)]),
            GuestAddress(DATA),
        )
        .unwrap();
    h.issue(
        0,
        0,
        &h2d(ata::DATA_SET_MANAGEMENT, 1, 0, 1),
        &[],
        &[(DATA, 512)],
    );
    h.assert_ok(0, 0);
    let file = std::fs::read(&disk).unwrap();
    assert!(file[2048 * 512..].iter().all(|&b| b == 0));
    assert!(file[16 * 512..24 * 512].iter().all(|&b| b == 0));
    assert_eq!(&file[24 * 512..25 * 512], &pattern(24, 512)[..]);
    let blocks_after = std::fs::metadata(&disk).unwrap().blocks();
    assert!(
        blocks_after < blocks_before,
        "hole punched: {blocks_before} -> {blocks_after} blocks"
    );
    // Queued TRIM (SEND FPDMA QUEUED, DSM subcommand, TRIM bit).
    h.mem
        .write_slice(&dsm_block(&[(100, 4)]), GuestAddress(DATA))
        .unwrap();
    let mut f = fpdma(ata::SEND_FPDMA_QUEUED, 3, 0, 1);
    f[13] = 0;
    f[16] = 1;
    h.pw(0, port::SACT, 1 << 3);
    h.issue(0, 3, &f, &[], &[(DATA, 512)]);
    assert_eq!(h.pr(0, port::SACT), 0);
    assert_eq!(h.pr(0, port::CI), 0);
    let file = std::fs::read(&disk).unwrap();
    assert!(file[100 * 512..104 * 512].iter().all(|&b| b == 0));
    // A range beyond the disk is refused.
    h.mem
        .write_slice(&dsm_block(&[(4095, 2)]), GuestAddress(DATA))
        .unwrap();
    h.issue(
        0,
        4,
        &h2d(ata::DATA_SET_MANAGEMENT, 1, 0, 1),
        &[],
        &[(DATA, 512)],
    );
    h.assert_failed(0, 4);

    // With nodelete there is no TRIM in IDENTIFY and DSM is aborted.
    let disk2 = image("nodelete.img", 64, 512);
    let h = Hba::new(&tree_with(&[("hd", &disk2, &[("nodelete", "true")])]));
    h.start_port(0);
    h.issue(0, 0, &h2d(ata::IDENTIFY, 0, 0, 0), &[], &[(DATA, 512)]);
    assert_eq!(identify_words(&h, DATA)[169], 0);
    h.mem
        .write_slice(&dsm_block(&[(0, 8)]), GuestAddress(DATA))
        .unwrap();
    h.issue(
        0,
        1,
        &h2d(ata::DATA_SET_MANAGEMENT, 1, 0, 1),
        &[],
        &[(DATA, 512)],
    );
    h.assert_failed(0, 1);
    assert_eq!(std::fs::read(&disk2).unwrap()[..512], pattern(0, 512)[..]);
}

fn packet(h: &Hba, slot: u32, cdb: &[u8], buf: Option<(u64, u32)>) {
    let mut acmd = [0u8; 16];
    acmd[..cdb.len()].copy_from_slice(cdb);
    let mut f = h2d(ata::PACKET, 1, 0, 0);
    f[5] = 0;
    f[6] = 0x80;
    let prds: Vec<(u64, u32)> = buf.into_iter().collect();
    h.issue(1, slot, &f, &acmd, &prds);
}

#[test]
fn atapi_inquiry_capacity_and_reads() {
    let (h, _, iso) = disk_and_cd("atapi");
    h.start_port(1);
    packet(&h, 0, &[0x00], None);
    h.assert_ok(1, 0);
    packet(&h, 1, &[0x12, 0, 0, 0, 36], Some((DATA, 36)));
    h.assert_ok(1, 1);
    let inq = h.read_mem(DATA, 36);
    assert_eq!(inq[0], 0x05, "CD/DVD device");
    assert_eq!(inq[1], 0x80, "removable");
    assert_eq!(&inq[8..16], b"BHYVE   ");
    assert_eq!(&inq[16..32], b"BHYVE DVD-ROM   ");
    assert_eq!(h.prdbc(1, 1), 36);

    packet(&h, 2, &[0x25], Some((DATA, 8)));
    h.assert_ok(1, 2);
    assert_eq!(h.read_mem(DATA, 8), [0, 0, 0, 63, 0, 0, 8, 0]);

    // READ(10) of blocks 5..8 into two buffers.
    packet(
        &h,
        3,
        &[0x28, 0, 0, 0, 0, 5, 0, 0, 3],
        Some((DATA + 0x10000, 6144)),
    );
    h.assert_ok(1, 3);
    assert_eq!(h.prdbc(1, 3), 6144);
    let iso_data = std::fs::read(&iso).unwrap();
    assert_eq!(
        h.read_mem(DATA + 0x10000, 6144),
        &iso_data[5 * 2048..8 * 2048]
    );
    // READ(12) of the last block.
    packet(
        &h,
        4,
        &[0xA8, 0, 0, 0, 0, 63, 0, 0, 0, 1],
        Some((DATA, 2048)),
    );
    h.assert_ok(1, 4);
    assert_eq!(h.read_mem(DATA, 2048), &iso_data[63 * 2048..]);

    // TOC, mode page 2Ah, event status, medium lock.
    packet(
        &h,
        5,
        &[0x43, 0, 0, 0, 0, 0, 0, 0, 0x20, 0],
        Some((DATA, 32)),
    );
    h.assert_ok(1, 5);
    let toc = h.read_mem(DATA, 20);
    assert_eq!(&toc[..4], &[0, 18, 1, 1]);
    assert_eq!(&toc[16..20], &64u32.to_be_bytes(), "lead-out");
    packet(&h, 6, &[0x5A, 0, 0x2A, 0, 0, 0, 0, 0, 30], Some((DATA, 30)));
    h.assert_ok(1, 6);
    assert_eq!(h.read_mem(DATA + 8, 1), [0x2A]);
    packet(&h, 7, &[0x4A, 1, 0, 0, 0x10, 0, 0, 0, 8], Some((DATA, 8)));
    h.assert_ok(1, 7);
    assert_eq!(h.read_mem(DATA, 8)[5], 2, "medium present");
    packet(&h, 8, &[0x1E, 0, 0, 0, 1], None);
    h.assert_ok(1, 8);

    // Reading past the medium: CHECK CONDITION, then REQUEST SENSE says why.
    packet(&h, 9, &[0x28, 0, 0, 0, 0, 63, 0, 0, 2], Some((DATA, 4096)));
    h.assert_failed(1, 9);
    assert_eq!(
        h.pr(1, port::TFD) >> 12 & 0xF,
        5,
        "ILLEGAL REQUEST in the error register"
    );
    h.restart_port(1);
    packet(&h, 10, &[0x03, 0, 0, 0, 18], Some((DATA, 18)));
    h.assert_ok(1, 10);
    let sense = h.read_mem(DATA, 18);
    assert_eq!((sense[0] & 0x7F, sense[2], sense[12]), (0x70, 5, 0x21));
    // Unknown opcode and eject.
    packet(&h, 11, &[0xEE], None);
    h.assert_failed(1, 11);
    h.restart_port(1);
    packet(&h, 12, &[0x1B, 0, 0, 0, 2], None);
    h.assert_failed(1, 12);
    h.restart_port(1);
    // An ATA read on the DVD drive and PACKET on the disk are aborted.
    h.issue(1, 13, &h2d(ata::READ_DMA48, 0, 0, 1), &[], &[(DATA, 512)]);
    h.assert_failed(1, 13);
    h.start_port(0);
    h.issue(0, 0, &h2d(ata::PACKET, 0, 0, 0), &[0; 16], &[]);
    h.assert_failed(0, 0);
}

#[test]
fn hostile_commands_get_errors_and_the_port_recovers() {
    // Each case logs why it failed (visible with --nocapture).
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let (h, disk, _) = disk_and_cd("hostile");
    let original = std::fs::read(&disk).unwrap();
    h.start_port(0);
    let mut slot = 0;
    let mut expect_failure = |h: &Hba, what: &str, run: &dyn Fn(&Hba, u32)| {
        run(h, slot);
        let tfd = h.pr(0, port::TFD);
        assert_eq!(tfd & 1, 1, "{what}: error status, TFD {tfd:#x}");
        assert_ne!(h.pr(0, port::IS) & port::IS_TFES, 0, "{what}: TFES");
        // Nothing more runs until the driver restarts the port.
        h.issue(
            0,
            (slot + 1) % 32,
            &h2d(ata::FLUSH_CACHE, 0, 0, 0),
            &[],
            &[],
        );
        assert_ne!(
            h.pr(0, port::CI) & (1 << ((slot + 1) % 32)),
            0,
            "{what}: held"
        );
        h.restart_port(0);
        h.issue(
            0,
            (slot + 2) % 32,
            &h2d(ata::FLUSH_CACHE, 0, 0, 0),
            &[],
            &[],
        );
        h.assert_ok(0, (slot + 2) % 32);
        slot = (slot + 3) % 32;
    };
    expect_failure(&h, "PRD outside memory", &|h, s| {
        h.issue(
            0,
            s,
            &h2d(ata::READ_DMA48, 0, 0, 8),
            &[],
            &[(MEM_SIZE - 512, 4096)],
        );
    });
    expect_failure(&h, "PRD at the top of the address space", &|h, s| {
        h.issue(
            0,
            s,
            &h2d(ata::WRITE_DMA48, 0, 0, 1),
            &[],
            &[(u64::MAX - 100, 512)],
        );
    });
    expect_failure(&h, "no PRDs", &|h, s| {
        h.issue(0, s, &h2d(ata::READ_DMA48, 0, 0, 8), &[], &[]);
    });
    expect_failure(&h, "PRDs shorter than the transfer", &|h, s| {
        h.issue(0, s, &h2d(ata::WRITE_DMA48, 0, 0, 8), &[], &[(DATA, 512)]);
    });
    expect_failure(&h, "65535 tiny PRDs running off memory", &|h, s| {
        // The table sits at the end of RAM: 8 one-byte PRDs fit, the
        // ninth is outside guest memory, and 4 KiB need many more.
        let hdr = Hba::clb(0) + u64::from(s) * 32;
        let table = MEM_SIZE - 0x100;
        let mut t = [0u8; 0x100];
        t[..20].copy_from_slice(&h2d(ata::READ_DMA48, 0, 0, 8));
        t[0x80..0x88].copy_from_slice(&DATA.to_le_bytes());
        h.mem.write_slice(&t, GuestAddress(table)).unwrap();
        h.mem
            .write_slice(&(5u32 | 0xFFFF << 16).to_le_bytes(), GuestAddress(hdr))
            .unwrap();
        h.mem
            .write_slice(&table.to_le_bytes(), GuestAddress(hdr + 8))
            .unwrap();
        h.pw(0, port::CI, 1 << s);
    });
    expect_failure(&h, "LBA past the end", &|h, s| {
        h.issue(
            0,
            s,
            &h2d(ata::READ_DMA48, 0, 2047, 2),
            &[],
            &[(DATA, 1024)],
        );
    });
    expect_failure(&h, "48-bit LBA overflow", &|h, s| {
        h.issue(
            0,
            s,
            &h2d(ata::READ_DMA48, 0, (1 << 48) - 1, 0),
            &[],
            &[(DATA, 4096)],
        );
    });
    expect_failure(&h, "unknown command", &|h, s| {
        h.issue(0, s, &h2d(0xFF, 0, 0, 0), &[], &[]);
    });
    expect_failure(&h, "unknown SET FEATURES", &|h, s| {
        h.issue(0, s, &h2d(ata::SET_FEATURES, 0x66, 0, 0), &[], &[]);
    });
    expect_failure(&h, "not a register FIS", &|h, s| {
        let mut f = h2d(ata::IDENTIFY, 0, 0, 0);
        f[0] = 0x46;
        h.issue(0, s, &f, &[], &[(DATA, 512)]);
    });
    expect_failure(&h, "command table outside memory", &|h, s| {
        h.prepare(0, s, &h2d(ata::IDENTIFY, 0, 0, 0), &[], &[(DATA, 512)]);
        let hdr = Hba::clb(0) + u64::from(s) * 32;
        h.mem
            .write_slice(&(1u64 << 40).to_le_bytes(), GuestAddress(hdr + 8))
            .unwrap();
        h.pw(0, port::CI, 1 << s);
    });
    expect_failure(&h, "DSM that is not TRIM", &|h, s| {
        h.issue(
            0,
            s,
            &h2d(ata::DATA_SET_MANAGEMENT, 2, 0, 1),
            &[],
            &[(DATA, 512)],
        );
    });
    expect_failure(&h, "READ LOG of an unknown page", &|h, s| {
        h.issue(
            0,
            s,
            &h2d(ata::READ_LOG_EXT, 0, 0x30, 1),
            &[],
            &[(DATA, 512)],
        );
    });
    assert_eq!(std::fs::read(&disk).unwrap(), original, "disk untouched");

    // A command list outside guest memory fails the command too.
    h.pw(0, port::CMD, port::CMD_FRE);
    h.pw(0, port::CLBU, 0xFFFF_FFFF);
    h.pw(0, port::CMD, port::CMD_FRE | port::CMD_ST);
    h.pw(0, port::CI, 1);
    assert_eq!(h.pr(0, port::TFD) & 1, 1);
    h.pw(0, port::CMD, port::CMD_FRE);
    h.pw(0, port::CLBU, 0);

    // A FIS area outside memory: commands still complete, nothing is written.
    h.pw(0, port::FBU, 0x10);
    h.pw(0, port::IS, u32::MAX);
    h.pw(0, port::CMD, port::CMD_FRE | port::CMD_ST);
    h.issue(0, 0, &h2d(ata::FLUSH_CACHE, 0, 0, 0), &[], &[]);
    h.assert_ok(0, 0);

    // Commands on an empty port never run, even with CLO forcing BSY off.
    h.start_port(2);
    h.pw(2, port::CMD, port::CMD_FRE | port::CMD_ST | port::CMD_CLO);
    h.issue(2, 0, &h2d(ata::IDENTIFY, 0, 0, 0), &[], &[(DATA, 512)]);
    assert_eq!(h.pr(2, port::CI), 1, "nothing executes without a drive");
    // Registers beyond the ports and odd-sized writes are ignored.
    h.w(0x1100, 0x1234);
    assert_eq!(h.r(0x1100), 0);
    h.mmio.write(h.abar + 0x100 + port::CI, &[1, 0]);
}

#[test]
fn read_only_disk_refuses_writes() {
    let disk = image("ro.img", 64, 512);
    let h = Hba::new(&tree_with(&[("hd", &disk, &[("ro", "true")])]));
    h.start_port(0);
    h.issue(0, 0, &h2d(ata::WRITE_DMA, 0, 0, 1), &[], &[(DATA, 512)]);
    h.assert_failed(0, 0);
    assert_eq!(std::fs::read(&disk).unwrap()[..512], pattern(0, 512)[..]);
    h.restart_port(0);
    h.issue(0, 1, &h2d(ata::READ_DMA, 0, 0, 1), &[], &[(DATA, 512)]);
    h.assert_ok(0, 1);
}

#[test]
fn four_kib_sectors() {
    let disk = image("4k.img", 64, 4096);
    let h = Hba::new(&tree_with(&[("hd", &disk, &[("sectorsize", "4096")])]));
    h.start_port(0);
    h.issue(0, 0, &h2d(ata::IDENTIFY, 0, 0, 0), &[], &[(DATA, 512)]);
    h.assert_ok(0, 0);
    let w = identify_words(&h, DATA);
    assert_eq!(w[100], 64);
    assert_ne!(w[106] & 0x1000, 0, "logical sector above 512 bytes");
    assert_eq!(
        u32::from(w[117]) | u32::from(w[118]) << 16,
        2048,
        "in words"
    );
    h.issue(0, 1, &h2d(ata::READ_DMA48, 0, 3, 1), &[], &[(DATA, 4096)]);
    h.assert_ok(0, 1);
    assert_eq!(h.read_mem(DATA, 4096), pattern(3, 4096));
}

#[test]
fn state_serializes() {
    let (h, _, _) = disk_and_cd("state");
    h.start_port(0);
    h.issue(0, 0, &h2d(ata::FLUSH_CACHE, 0, 0, 0), &[], &[]);
    let disk = image("state2.img", 8, 512);
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let a = Ahci::from_config(&tree_with(&[("hd", &disk, &[])]), &bdf().node(), mem).unwrap();
    let state = a.lock().unwrap().state().clone();
    let json = serde_json::to_string(&state).unwrap();
    let back: rhyve_storage::AhciState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);
    assert_eq!(back.ports.len(), 32);
    assert_eq!(back.ports[0].regs.sig, port::SIG_ATA);
    assert_eq!(back.ports[0].drive, Some(rhyve_storage::DriveKind::Disk));
}

/// The test holds the controller lock, so I/O handed to the I/O thread
/// cannot complete until it lets go: the in-flight states are observable.
#[test]
fn io_in_flight_survives_stop_and_is_dropped_by_reset() {
    use rhyve_pci::PciFunction;
    let (h, _, _) = disk_and_cd("inflight");
    h.start_port(0);
    let reg = |a: &mut Ahci, off: u64| {
        let mut b = [0u8; 4];
        a.bar_read(5, off, &mut b);
        u32::from_le_bytes(b)
    };
    let p0 = |r: u64| 0x100 + r;
    h.prepare(0, 0, &h2d(ata::READ_DMA48, 0, 8, 8), &[], &[(DATA, 4096)]);
    {
        let mut a = h.ahci.lock().unwrap();
        a.bar_write(5, p0(port::CI), &1u32.to_le_bytes());
        assert_eq!(a.state().ports[0].pending, 1, "handed to the I/O thread");
        assert_ne!(reg(&mut a, p0(port::TFD)) & 0x80, 0, "BSY while it runs");
        // The driver stops the port: the command in flight is kept.
        a.bar_write(5, p0(port::CMD), &port::CMD_FRE.to_le_bytes());
        assert_eq!(reg(&mut a, p0(port::CI)), 1);
        assert_ne!(
            reg(&mut a, p0(port::CMD)) & port::CMD_CR,
            0,
            "still running"
        );
    }
    h.settle();
    assert_eq!(h.pr(0, port::CI), 0);
    assert_eq!(h.pr(0, port::CMD) & port::CMD_CR, 0, "stopped once idle");
    let mut want = Vec::new();
    for s in 8..16 {
        want.extend(pattern(s, 512));
    }
    assert_eq!(h.read_mem(DATA, 4096), want);

    // An HBA reset while I/O is in flight: its completion is dropped.
    h.start_port(0);
    h.pw(0, port::IE, 0);
    h.prepare(0, 1, &h2d(ata::READ_DMA48, 0, 0, 8), &[], &[(DATA, 4096)]);
    {
        let mut a = h.ahci.lock().unwrap();
        a.bar_write(5, p0(port::CI), &2u32.to_le_bytes());
        a.bar_write(5, hba::GHC, &hba::GHC_HR.to_le_bytes());
        assert_eq!(a.state().ports[0].pending, 0);
        assert_eq!(reg(&mut a, p0(port::CI)), 0);
    }
    // The I/O thread runs jobs in order: once this flush is done, the
    // stale read has finished too, without touching the port.
    h.start_port(0);
    h.issue(0, 2, &h2d(ata::FLUSH_CACHE, 0, 0, 0), &[], &[]);
    h.assert_ok(0, 2);
    assert_eq!(h.pr(0, port::CI), 0);
    assert_eq!(h.pr(0, port::IS) & !port::IS_DHRS, 0);
}

/// A PRD table longer than the host's IOV_MAX (1024 buffers per vectored
/// read) still moves every byte: the back end takes it in parts.
#[test]
fn a_prd_table_longer_than_iov_max() {
    let (h, _disk, _) = disk_and_cd("manyprds");
    h.start_port(0);
    let prds: Vec<(u64, u32)> = (0..1200u64).map(|i| (DATA + i * 1024, 512)).collect();
    h.issue(0, 31, &h2d(ata::READ_DMA48, 0, 0, 1200), &[], &prds);
    h.assert_ok(0, 31);
    assert_eq!(h.prdbc(0, 31), 1200 * 512);
    for s in [0u64, 1023, 1024, 1199] {
        assert_eq!(
            h.read_mem(DATA + s * 1024, 512),
            pattern(s, 512),
            "sector {s}"
        );
    }
}

/// A snapshot's pause with a command in flight: it completes before the
/// HBA is still, a command issued while paused waits in PxCI, and an HBA
/// restored from the saved state (and memory) runs that command on resume.
#[test]
fn paused_with_a_command_in_flight_saves_and_restores() {
    use rhyve_pci::PciFunction;
    let (h, disk, iso) = disk_and_cd("snapshot");
    h.start_port(0);
    h.issue(0, 0, &h2d(ata::READ_DMA48, 0, 10, 8), &[], &[(DATA, 4096)]);
    h.ahci.lock().unwrap().pause();
    h.settle();
    h.assert_ok(0, 0);
    h.issue(
        0,
        1,
        &h2d(ata::READ_DMA48, 0, 20, 1),
        &[],
        &[(DATA + 0x10000, 512)],
    );
    std::thread::sleep(Duration::from_millis(50));
    assert_ne!(h.pr(0, port::CI) & 2, 0, "a paused HBA started a command");
    let (config, state) = {
        let a = h.ahci.lock().unwrap();
        (a.config().clone(), a.save_device().unwrap())
    };
    let state: Option<rhyve_platform::snapshot::DeviceState> =
        serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();

    let tree = tree_with(&[("hd", &disk, &[]), ("cd", &iso, &[])]);
    let h2 = Hba::new(&tree);
    h2.mem
        .write_slice(&h.read_mem(0, MEM_SIZE as usize), GuestAddress(0))
        .unwrap();
    {
        let mut a = h2.ahci.lock().unwrap();
        a.config_mut().restore(config).unwrap();
        a.restore_device(state.as_ref()).unwrap();
    }
    h2.root.resync_bars();
    assert_eq!(
        h2.ahci.lock().unwrap().state(),
        h.ahci.lock().unwrap().state()
    );
    h2.ahci.lock().unwrap().resume();
    h2.settle();
    h2.assert_ok(0, 1);
    assert_eq!(h2.read_mem(DATA + 0x10000, 512), pattern(20, 512));

    // A different drive set is refused.
    let other = tree_with(&[("hd", &disk, &[])]);
    let h3 = Hba::new(&other);
    let e = h3
        .ahci
        .lock()
        .unwrap()
        .restore_device(state.as_ref())
        .unwrap_err();
    assert!(e.to_string().contains("drives differ"), "{e}");
}
