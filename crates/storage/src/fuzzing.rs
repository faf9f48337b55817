//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the bounded
//! smoke runs in the test suite; [`nvme`] documents its own. [`ahci`]:
//! arbitrary bytes as what a guest leaves in memory for the AHCI HBA
//! (command lists, command tables with their FIS, ATAPI packets and PRD
//! tables) plus a few register writes, then the command slots issued on a
//! disk port and a DVD port the way a driver does. A panic, a hang (I/O still pending after [`SETTLE`]) or an access
//! outside guest memory is a bug; failed commands are fine.
//!
//! Input layout: bytes 0..4 and 4..8 are the PxCI values issued on ports
//! 0 (disk) and 1 (DVD); byte 8 is a count of register writes (mod 8),
//! each 6 bytes (ABAR offset, value), that follow; the rest, repeated,
//! fills guest memory. Port p's command list is at `p * 0x400` and its
//! FIS area at `0x800 + p * 0x100`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rhyve_backends::block::{BlockFile, BlockOptions};
use rhyve_pci::PciFunction;
use vm_memory::{Bytes, GuestAddress};

use crate::ahci::{port, Ahci, DriveKind, DriveSpec, GuestMemory, ABAR, PORT_BASE, PORT_STEP};
use crate::nvme::{self, Nvme, NvmeOptions};

/// Guest memory size for fuzz inputs.
pub const MEM_SIZE: usize = 64 * 1024;
/// Longest the I/O thread may take to finish what one input started.
pub const SETTLE: Duration = Duration::from_secs(10);

/// A small sparse backing file, unlinked once open so nothing is left
/// behind.
fn backing(kind: &str, size: u64) -> Option<BlockFile> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!(
        "rhyve-storage-fuzz-{}-{n}-{kind}.img",
        std::process::id()
    ));
    let f = std::fs::File::create(&path).ok()?;
    f.set_len(size).ok()?;
    drop(f);
    let opened = BlockFile::open(&BlockOptions {
        path: path.clone(),
        readonly: kind == "cd",
        nocache: false,
        sync: false,
        nodelete: false,
        sector_size: None,
    });
    let _ = std::fs::remove_file(&path);
    opened.ok()
}

fn write_reg(ahci: &Arc<Mutex<Ahci>>, offset: u64, value: u32) {
    ahci.lock()
        .unwrap_or_else(|e| e.into_inner())
        .bar_write(ABAR, offset, &value.to_le_bytes());
}

fn port_reg(p: u64, reg: u64) -> u64 {
    PORT_BASE + p * PORT_STEP + reg
}

/// Wait until no port has I/O with the I/O thread; a hang is a bug.
fn settle(ahci: &Arc<Mutex<Ahci>>) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let busy = ahci
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state()
            .ports
            .iter()
            .any(|p| p.pending != 0);
        if !busy {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "AHCI I/O still pending after {SETTLE:?}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Issue the input's commands (see the module comment).
pub fn ahci(data: &[u8]) {
    if data.len() < 9 {
        return;
    }
    let ci = [
        u32::from_le_bytes([data[0], data[1], data[2], data[3]]),
        u32::from_le_bytes([data[4], data[5], data[6], data[7]]),
    ];
    let writes = usize::from(data[8] % 8);
    let ops_end = (9 + writes * 6).min(data.len());
    let ops: Vec<(u64, u32)> = data[9..ops_end]
        .chunks_exact(6)
        .map(|c| {
            let off = u64::from(u16::from_le_bytes([c[0], c[1]])) & 0x10FC;
            (off, u32::from_le_bytes([c[2], c[3], c[4], c[5]]))
        })
        .collect();
    let Ok(mem) = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let rest = &data[ops_end..];
    if !rest.is_empty() {
        let image: Vec<u8> = rest.iter().copied().cycle().take(MEM_SIZE).collect();
        if mem.write_slice(&image, GuestAddress(0)).is_err() {
            return;
        }
    }
    let (Some(hd), Some(cd)) = (backing("hd", 256 << 10), backing("cd", 1 << 20)) else {
        return;
    };
    let drives = vec![
        (0, DriveSpec::new(DriveKind::Disk, hd, "/fuzz/hd.img")),
        (1, DriveSpec::new(DriveKind::Cdrom, cd, "/fuzz/cd.iso")),
    ];
    let Ok(ahci) = Ahci::new(drives, mem) else {
        return;
    };
    for p in 0..2u64 {
        write_reg(&ahci, port_reg(p, port::CLB), (p * 0x400) as u32);
        write_reg(&ahci, port_reg(p, port::FB), (0x800 + p * 0x100) as u32);
        write_reg(&ahci, port_reg(p, port::CMD), port::CMD_FRE);
        write_reg(&ahci, port_reg(p, port::SERR), u32::MAX);
        write_reg(&ahci, port_reg(p, port::IS), u32::MAX);
        write_reg(&ahci, port_reg(p, port::IE), u32::MAX);
        write_reg(&ahci, port_reg(p, port::CMD), port::CMD_FRE | port::CMD_ST);
    }
    for (off, value) in ops {
        write_reg(&ahci, off, value);
        settle(&ahci);
    }
    // Twice: the second round sees the state (errors, CCS) the first left.
    for _ in 0..2 {
        for (p, bits) in ci.iter().enumerate() {
            write_reg(&ahci, port_reg(p as u64, port::CI), *bits);
        }
        settle(&ahci);
    }
    let mut regs = [0u8; 4];
    let mut hba = ahci.lock().unwrap_or_else(|e| e.into_inner());
    for off in (0..PORT_BASE + 2 * PORT_STEP).step_by(4) {
        hba.bar_read(ABAR, off, &mut regs);
    }
}

/// Guest memory for NVMe inputs.
pub const NVME_MEM_SIZE: usize = 128 * 1024;
/// Where [`nvme`] puts the admin queues (16 entries each).
pub const NVME_ADMIN_SQ: u64 = 0x0;
pub const NVME_ADMIN_CQ: u64 = 0x1000;

fn nvme_write(ctrl: &Arc<Mutex<Nvme>>, offset: u64, value: u32) {
    ctrl.lock().unwrap_or_else(|e| e.into_inner()).bar_write(
        nvme::REG_BAR,
        offset,
        &value.to_le_bytes(),
    );
}

/// Wait until the controller is idle; a hang is a bug.
fn nvme_settle(ctrl: &Arc<Mutex<Nvme>>) {
    let deadline = Instant::now() + SETTLE;
    while !ctrl.lock().unwrap_or_else(|e| e.into_inner()).is_idle() {
        assert!(
            Instant::now() < deadline,
            "NVMe work still pending after {SETTLE:?}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// bhyve's NVMe controller (2 I/O queue pairs of at most 64 entries, 4
/// I/O slots, a 256 KiB disk) fed an input: byte 0 counts register and
/// doorbell writes (mod 32), each 6 bytes (BAR 0 offset, value), that
/// follow; the rest, repeated, fills guest memory. The controller is
/// enabled with 16-entry admin queues at [`NVME_ADMIN_SQ`] and
/// [`NVME_ADMIN_CQ`] before the writes. A panic, a hang or an access
/// outside guest memory is a bug; failed commands are fine.
pub fn nvme(data: &[u8]) {
    let Some(&count) = data.first() else {
        return;
    };
    let writes = usize::from(count % 32);
    let ops_end = (1 + writes * 6).min(data.len());
    let ops: Vec<(u64, u32)> = data[1..ops_end]
        .chunks_exact(6)
        .map(|c| {
            let off = u64::from(u16::from_le_bytes([c[0], c[1]])) & 0x103C;
            (off, u32::from_le_bytes([c[2], c[3], c[4], c[5]]))
        })
        .collect();
    let Ok(mem) = GuestMemory::from_ranges(&[(GuestAddress(0), NVME_MEM_SIZE)]) else {
        return;
    };
    let rest = &data[ops_end..];
    if !rest.is_empty() {
        let image: Vec<u8> = rest.iter().copied().cycle().take(NVME_MEM_SIZE).collect();
        if mem.write_slice(&image, GuestAddress(0)).is_err() {
            return;
        }
    }
    let Some(disk) = backing("nvme", 256 << 10) else {
        return;
    };
    let opts = NvmeOptions {
        max_queues: 2,
        queue_entries: 64,
        io_slots: 4,
        sector_size: None,
        serial: "FUZZ".into(),
        eui64: None,
        dsm: nvme::DsmMode::Auto,
    };
    let Ok(bdf) = rhyve_pci::PciBdf::new(0, 4, 0) else {
        return;
    };
    let Ok(ctrl) = Nvme::new(disk, opts, mem, "fuzz", bdf) else {
        return;
    };
    nvme_write(&ctrl, nvme::reg::AQA, 15 | 15 << 16);
    nvme_write(&ctrl, nvme::reg::ASQ, NVME_ADMIN_SQ as u32);
    nvme_write(&ctrl, nvme::reg::ACQ, NVME_ADMIN_CQ as u32);
    nvme_write(&ctrl, nvme::reg::CC, 6 << 16 | 4 << 20 | nvme::reg::CC_EN);
    for (off, value) in ops {
        nvme_write(&ctrl, off, value);
        nvme_settle(&ctrl);
    }
    let mut regs = [0u8; 8];
    let mut c = ctrl.lock().unwrap_or_else(|e| e.into_inner());
    for off in (0..0x40).step_by(4) {
        c.bar_read(nvme::REG_BAR, off, &mut regs[..4]);
    }
}
