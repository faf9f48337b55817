//! bhyve's NVMe controller driven by our own host driver, written from the
//! NVMe 1.4 specification (`support/nvme_host.rs`), over real guest memory
//! and a real backing file: identity, initialization, queues, reads,
//! writes, flushes, deallocation, and every error path a hostile guest can
//! take (bad opcodes, PRPs, LBAs, queue ids and sizes, doorbells, a full
//! completion queue), each answered with an NVMe status, never a hang.

#[path = "support/nvme_host.rs"]
mod nvme_host;

use std::path::PathBuf;

use nvme_host::{Host, Sqe};
use rhyve_backends::block::{BlockFile, BlockOptions};
use rhyve_config::ConfigTree;
use rhyve_pci::{PciBdf, PciFunction};
use rhyve_storage::nvme::{self, Nvme, NvmeOptions};
use rhyve_storage::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

const MEM: usize = 16 << 20;
const DISK: u64 = 4 << 20;
/// Data buffers live here in guest memory.
const DATA: u64 = 0x40_0000;

struct Fixture {
    dir: PathBuf,
    path: PathBuf,
    host: Host,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn fixture(name: &str, readonly: bool, tweak: impl FnOnce(&mut NvmeOptions)) -> Fixture {
    let dir = std::env::temp_dir().join(format!("rhyve-nvme-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disk.img");
    std::fs::write(&path, pattern(DISK as usize, 7)).unwrap();
    let mut tree = ConfigTree::new();
    tree.set("pci.0.4.0.device", "nvme").unwrap();
    let mut opts = NvmeOptions::from_config(&tree, "pci.0.4.0").unwrap();
    tweak(&mut opts);
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let nvme = controller(&path, readonly, opts, &mem);
    Fixture {
        dir,
        path,
        host: Host::new(nvme, mem),
    }
}

/// The options of a plain `-s 4,nvme,...`.
fn opts_default() -> NvmeOptions {
    let mut tree = ConfigTree::new();
    tree.set("pci.0.4.0.device", "nvme").unwrap();
    NvmeOptions::from_config(&tree, "pci.0.4.0").unwrap()
}

/// A controller at 0:4:0 of VM "testvm" on the image at `path`.
fn controller(
    path: &std::path::Path,
    readonly: bool,
    opts: NvmeOptions,
    mem: &GuestMemory,
) -> std::sync::Arc<std::sync::Mutex<Nvme>> {
    let file = BlockFile::open(&BlockOptions {
        path: path.to_path_buf(),
        readonly,
        nocache: false,
        sync: false,
        nodelete: false,
        sector_size: None,
    })
    .unwrap();
    Nvme::new(
        file,
        opts,
        mem.clone(),
        "testvm",
        PciBdf::new(0, 4, 0).unwrap(),
    )
    .unwrap()
}

/// Enabled, 4 I/O queue pairs granted, I/O queue 1 with 16 entries.
fn ready(name: &str, readonly: bool) -> Fixture {
    let mut f = fixture(name, readonly, |_| {});
    assert!(f.host.enable(32));
    f.host.set_queue_count(4);
    let (cq, sq) = f.host.create_io_queues(1, 16);
    assert!(cq.ok() && sq.ok(), "{cq:?} {sq:?}");
    f
}

fn status(c: &nvme_host::Cqe) -> (u8, u8) {
    (c.sct, c.sc)
}

#[test]
fn pci_identity_and_registers_are_bhyves() {
    let f = fixture("identity", false, |_| {});
    let n = f.host.nvme.lock().unwrap();
    let cfg = n.config();
    assert_eq!((cfg.vendor_id(), cfg.device_id()), (0xFB5D, 0x0A0A));
    assert_eq!(cfg.read_dword(0x08) >> 8, 0x01_08_02, "class");
    let bar0 = cfg.bar(0).unwrap();
    assert_eq!(bar0.kind, rhyve_pci::BarKind::Mem64);
    assert_eq!(bar0.size, 16 << 10);
    let msix = cfg.msix().unwrap();
    assert_eq!((msix.bar(), msix.vectors()), (4, 17));
    assert!(cfg.find_capability(0x10).is_some(), "PCIe capability");
    drop(n);
    let cap = f.host.read64(0x00);
    assert_eq!(cap & 0xFFFF, 2047, "MQES");
    assert_eq!((cap >> 16) & 1, 1, "CQR");
    assert_eq!((cap >> 37) & 1, 1, "NVM command set");
    assert_eq!((cap >> 48) & 0xFF, 0, "MPSMIN/MPSMAX 4 KiB");
    assert_eq!(f.host.read32(0x08), 0x0001_0400, "NVMe 1.4");
    assert_eq!(f.host.read32(0x1C), 0, "not ready before CC.EN");
}

#[test]
fn identify_and_log_pages() {
    let mut f = ready("identify", false);
    let buf = DATA;
    let c = f.host.admin(Sqe::new(0x06).prp1(buf).cdw(10, 1));
    assert!(c.ok(), "{c:?}");
    let mut id = vec![0u8; 4096];
    f.host.mem.read_slice(&mut id, GuestAddress(buf)).unwrap();
    assert_eq!(u16::from_le_bytes([id[0], id[1]]), 0xFB5D);
    assert_eq!(&id[4..24], b"NVME-4-0            ");
    assert_eq!(&id[24..34], b"bhyve-NVMe");
    assert_eq!(&id[64..67], b"1.0");
    assert_eq!(&id[73..76], &[0x58, 0x9c, 0xfc]);
    assert_eq!(id[77], 9, "MDTS");
    assert_eq!(
        u32::from_le_bytes(id[516..520].try_into().unwrap()),
        1,
        "NN"
    );
    assert_ne!(
        id[520] & 4,
        0,
        "DSM offered (dsm=auto, the file can punch holes)"
    );
    assert_eq!((id[512], id[513]), (0x66, 0x44), "SQES/CQES");

    // Namespace 1 on a prp1 that is not page aligned (dword aligned is
    // enough), spilling into prp2.
    let c = f.host.admin(
        Sqe::new(0x06)
            .nsid(1)
            .prp1(buf + 0x800)
            .prp2(buf + 0x1000)
            .cdw(10, 0),
    );
    assert!(c.ok(), "{c:?}");
    f.host
        .mem
        .read_slice(&mut id, GuestAddress(buf + 0x800))
        .unwrap();
    let nsze = u64::from_le_bytes(id[0..8].try_into().unwrap());
    assert_eq!(nsze, DISK / 512);
    assert_eq!(
        (u32::from_le_bytes(id[128..132].try_into().unwrap()) >> 16) & 0xFF,
        9
    );
    let eui = &id[120..128];
    assert_eq!(&eui[..3], &[0x58, 0x9c, 0xfc], "FreeBSD's OUI");
    assert_eq!(eui[7], 1, "namespace id in the low bits");

    // Active namespace list: just 1; descriptor list: the same EUI-64.
    let c = f.host.admin(Sqe::new(0x06).prp1(buf).cdw(10, 2));
    assert!(c.ok());
    let list: [u8; 8] = f.host.mem.read_obj(GuestAddress(buf)).unwrap();
    assert_eq!(list, [1, 0, 0, 0, 0, 0, 0, 0]);
    let c = f.host.admin(Sqe::new(0x06).nsid(1).prp1(buf).cdw(10, 3));
    assert!(c.ok());
    let d: [u8; 12] = f.host.mem.read_obj(GuestAddress(buf)).unwrap();
    assert_eq!((d[0], d[1]), (1, 8));
    assert_eq!(&d[4..12], eui);
    // Unknown CNS, namespace 2: errors.
    let c = f.host.admin(Sqe::new(0x06).prp1(buf).cdw(10, 0x55));
    assert_eq!(status(&c), (0, 0x02));
    let c = f.host.admin(Sqe::new(0x06).nsid(2).prp1(buf).cdw(10, 0));
    assert_eq!(status(&c), (0, 0x0B));

    // SMART log: room temperature (296 K), full spare.
    let c = f
        .host
        .admin(Sqe::new(0x02).prp1(buf).cdw(10, 0x02 | (512 / 4 - 1) << 16));
    assert!(c.ok(), "{c:?}");
    let smart: [u8; 5] = f.host.mem.read_obj(GuestAddress(buf)).unwrap();
    assert_eq!(u16::from_le_bytes([smart[1], smart[2]]), 296);
    assert_eq!(smart[3], 100);
    let c = f.host.admin(Sqe::new(0x02).prp1(buf).cdw(10, 0x7F));
    assert_eq!(status(&c), (0, 0x02), "unknown log page");
}

#[test]
fn features_and_queue_management() {
    let mut f = fixture("features", false, |_| {});
    assert!(f.host.enable(8));
    // Asking for 64 queue pairs grants the 16 bhyve offers.
    assert_eq!(f.host.set_queue_count(64), (16, 16));
    let c = f.host.admin(Sqe::new(0x0A).cdw(10, 0x07));
    assert_eq!(c.result, 15 | 15 << 16);
    // A feature bhyve does not offer (volatile write cache).
    let c = f.host.admin(Sqe::new(0x09).cdw(10, 0x06).cdw(11, 1));
    assert_eq!(status(&c), (0, 0x02));
    f.host.set_queue_count(2);

    // Queue ids beyond the grant, an SQ on a missing CQ, sizes 1 and
    // beyond MQES, a non-contiguous queue, a vector beyond the table.
    let new_cq = |qid: u32, size: u32, cdw11: u32| {
        Sqe::new(0x05)
            .prp1(Host::cq_base(1))
            .cdw(10, qid | (size - 1) << 16)
            .cdw(11, cdw11)
    };
    assert_eq!(status(&f.host.admin(new_cq(3, 16, 1))), (1, 0x01));
    assert_eq!(status(&f.host.admin(new_cq(1, 1, 1))), (1, 0x02));
    assert_eq!(status(&f.host.admin(new_cq(1, 4096, 1))), (1, 0x02));
    assert_eq!(status(&f.host.admin(new_cq(1, 16, 0))), (0, 0x02));
    assert_eq!(
        status(&f.host.admin(new_cq(1, 16, 3 | 17 << 16))),
        (1, 0x08)
    );
    let beyond_memory = Sqe::new(0x05)
        .prp1(MEM as u64 - 0x1000)
        .cdw(10, 1 | 1023 << 16)
        .cdw(11, 1);
    assert_eq!(status(&f.host.admin(beyond_memory)), (0, 0x02));
    let sq_on_missing_cq = Sqe::new(0x01)
        .prp1(Host::sq_base(1))
        .cdw(10, 1 | 15 << 16)
        .cdw(11, 1 | 2 << 16);
    assert_eq!(status(&f.host.admin(sq_on_missing_cq)), (1, 0x00));

    let (cq, sq) = f.host.create_io_queues(1, 16);
    assert!(cq.ok() && sq.ok());
    // Twice: the id is taken.
    assert_eq!(status(&f.host.admin(new_cq(1, 16, 1))), (1, 0x01));
    // A CQ with an SQ on it cannot go; the SQ first, then the CQ.
    let del_cq = Sqe::new(0x04).cdw(10, 1);
    assert_eq!(status(&f.host.admin(del_cq)), (1, 0x0C));
    assert!(f.host.admin(Sqe::new(0x00).cdw(10, 1)).ok());
    assert!(f.host.admin(del_cq).ok());
    assert_eq!(status(&f.host.admin(Sqe::new(0x00).cdw(10, 1))), (1, 0x01));
    // The admin queue is not deletable.
    assert_eq!(status(&f.host.admin(Sqe::new(0x04).cdw(10, 0))), (1, 0x01));

    // Unknown admin opcode; fused / SGL flags.
    assert_eq!(status(&f.host.admin(Sqe::new(0x7E))), (0, 0x01));
    assert_eq!(status(&f.host.admin(Sqe::new(0x06).flags(0x40))), (0, 0x02));
    // Abort answers "not aborted"; AERs are kept, the sixth refused.
    let c = f.host.admin(Sqe::new(0x08));
    assert!(c.ok() && c.result & 1 == 1);
    for _ in 0..5 {
        f.host.push(0, Sqe::new(0x0C), true);
    }
    let c = f.host.admin(Sqe::new(0x0C));
    assert_eq!(status(&c), (1, 0x05));
}

#[test]
fn write_read_flush_and_deallocate() {
    let mut f = ready("rw", false);
    // 64 KiB (16 pages) through a PRP list: prp1 the first page, prp2 the
    // list of the other 15.
    let len = 64 << 10;
    let data = pattern(len, 99);
    f.host.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let list = DATA + 0x10_0000;
    f.host.prp_list(list, DATA + 0x1000, 15);
    let c = f.host.run(1, Host::rw(0x01, 256, 128, DATA, list));
    assert!(c.ok(), "{c:?}");
    assert_eq!(c.sqid, 1);
    let file = std::fs::read(&f.path).unwrap();
    assert_eq!(
        &file[256 * 512..256 * 512 + len],
        &data[..],
        "the host sees the write"
    );

    // Read it back elsewhere, through a list that ends mid-page.
    let back = DATA + 0x20_0000;
    let list2 = back + 0x10_0000 + 0xFF0;
    f.host.prp_list(list2, back + 0x1000, 15);
    let c = f.host.run(1, Host::rw(0x02, 256, 128, back, list2));
    assert!(c.ok(), "{c:?}");
    let mut got = vec![0u8; len];
    f.host.mem.read_slice(&mut got, GuestAddress(back)).unwrap();
    assert_eq!(got, data);

    // Two pages: prp2 is the second page itself.
    let c = f.host.run(1, Host::rw(0x02, 0, 16, back, back + 0x5000));
    assert!(c.ok(), "{c:?}");
    let mut two = vec![0u8; 8192];
    f.host
        .mem
        .read_slice(&mut two[..4096], GuestAddress(back))
        .unwrap();
    f.host
        .mem
        .read_slice(&mut two[4096..], GuestAddress(back + 0x5000))
        .unwrap();
    assert_eq!(two, pattern(DISK as usize, 7)[..8192]);

    // The largest transfer (MDTS: 2 MiB), list chained over pages.
    let big = 2 << 20;
    let list3 = DATA + 0x30_0000;
    f.host.prp_list(list3, DATA + 0x1000, 511);
    let c = f.host.run(1, Host::rw(0x02, 0, 4096, DATA, list3));
    assert!(c.ok(), "{c:?}");
    let mut got = vec![0u8; big];
    f.host.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got[..], std::fs::read(&f.path).unwrap()[..big]);

    // Flush, with namespace 1 and with "all namespaces".
    assert!(f.host.run(1, Sqe::new(0x00).nsid(1)).ok());
    assert!(f.host.run(1, Sqe::new(0x00).nsid(0xFFFF_FFFF)).ok());

    // Deallocate two ranges: they read back as zeroes in the file.
    let mut ranges = [0u8; 32];
    ranges[4..8].copy_from_slice(&16u32.to_le_bytes());
    ranges[8..16].copy_from_slice(&256u64.to_le_bytes());
    ranges[16 + 4..16 + 8].copy_from_slice(&8u32.to_le_bytes());
    ranges[16 + 8..16 + 16].copy_from_slice(&1024u64.to_le_bytes());
    f.host.mem.write_slice(&ranges, GuestAddress(DATA)).unwrap();
    let dsm = Sqe::new(0x09).nsid(1).prp1(DATA).cdw(10, 1).cdw(11, 4);
    let c = f.host.run(1, dsm);
    assert!(c.ok(), "{c:?}");
    let file = std::fs::read(&f.path).unwrap();
    assert!(file[256 * 512..272 * 512].iter().all(|&b| b == 0));
    assert!(file[1024 * 512..1032 * 512].iter().all(|&b| b == 0));
    assert_eq!(
        file[272 * 512],
        data[16 * 512],
        "beyond the range untouched"
    );
    // A range past the end.
    ranges[8..16].copy_from_slice(&(DISK / 512).to_le_bytes());
    f.host.mem.write_slice(&ranges, GuestAddress(DATA)).unwrap();
    assert_eq!(status(&f.host.run(1, dsm)), (0, 0x80));
}

#[test]
fn bad_io_commands_get_error_statuses() {
    let mut f = ready("badio", false);
    let lbas = DISK / 512;
    let cases: Vec<(&str, Sqe, (u8, u8))> = vec![
        ("unknown opcode", Sqe::new(0x7F).nsid(1), (0, 0x01)),
        (
            "write zeroes is not offered",
            Sqe::new(0x08).nsid(1),
            (0, 0x01),
        ),
        (
            "namespace 2",
            Host::rw(0x02, 0, 1, DATA, 0).nsid(2),
            (0, 0x0B),
        ),
        (
            "namespace 0",
            Host::rw(0x02, 0, 1, DATA, 0).nsid(0),
            (0, 0x0B),
        ),
        ("last LBA + 1", Host::rw(0x02, lbas, 1, DATA, 0), (0, 0x80)),
        (
            "crossing the end",
            Host::rw(0x01, lbas - 1, 2, DATA, 0),
            (0, 0x80),
        ),
        (
            "LBA wrapping",
            Host::rw(0x02, u64::MAX, 2, DATA, 0),
            (0, 0x80),
        ),
        (
            "beyond MDTS",
            Host::rw(0x02, 0, 4097, DATA, DATA + 0x1000),
            (0, 0x02),
        ),
        (
            "prp1 not dword aligned",
            Host::rw(0x02, 0, 1, DATA + 2, 0),
            (0, 0x13),
        ),
        (
            "prp2 page not aligned",
            Host::rw(0x02, 0, 16, DATA, DATA + 0x1010),
            (0, 0x13),
        ),
        (
            "prp1 outside memory",
            Host::rw(0x02, 0, 1, 1 << 40, 0),
            (0, 0x04),
        ),
        (
            "prp2 list outside memory",
            Host::rw(0x02, 0, 24, DATA, 1 << 40),
            (0, 0x04),
        ),
        (
            "prp list pointing outside",
            Host::rw(0x02, 0, 24, DATA, DATA + 0x8000),
            (0, 0x04),
        ),
        (
            "SGL data pointer",
            Host::rw(0x02, 0, 1, DATA, 0).flags(0x40),
            (0, 0x02),
        ),
    ];
    // The list at DATA + 0x8000 names a page far outside guest memory.
    f.host
        .mem
        .write_obj(1u64 << 40, GuestAddress(DATA + 0x8000))
        .unwrap();
    for (what, sqe, want) in cases {
        let c = f.host.run(1, sqe);
        assert_eq!(status(&c), want, "{what}: {c:?}");
        assert!(c.dnr, "{what}: do not retry");
    }
    // A list entry that is not page aligned.
    f.host
        .mem
        .write_obj(DATA + 0x10, GuestAddress(DATA + 0x8000))
        .unwrap();
    let c = f.host.run(1, Host::rw(0x02, 0, 24, DATA, DATA + 0x8000));
    assert_eq!(status(&c), (0, 0x13));
    // A list whose chain pointer is not page aligned (here: itself, which
    // would loop forever) is refused.
    let list = DATA + 0x9800;
    for i in 0..255u64 {
        f.host
            .mem
            .write_obj(DATA + 0x10_0000 + i * 0x1000, GuestAddress(list + i * 8))
            .unwrap();
    }
    f.host
        .mem
        .write_obj(list, GuestAddress(list + 255 * 8))
        .unwrap();
    let c = f.host.run(1, Host::rw(0x02, 0, 4096, DATA, list));
    assert_eq!(status(&c), (0, 0x13));
    // A one-slot list page chaining to a page whose last entry chains
    // back: the walk still ends (each further page yields 511 entries).
    f.host
        .mem
        .write_obj(DATA + 0xA000, GuestAddress(DATA + 0xAFF8))
        .unwrap();
    f.host
        .mem
        .write_obj(DATA + 0xAFF8, GuestAddress(DATA + 0xA000))
        .unwrap();
    f.host.run(1, Host::rw(0x02, 0, 4096, DATA, DATA + 0xAFF8));
    // DSM deallocate on a read-only namespace, writes too.
    let mut ro = ready("badio-ro", true);
    let c = ro.host.run(1, Host::rw(0x01, 0, 1, DATA, 0));
    assert_eq!(status(&c), (0, 0x20));
    // After all that, plain I/O still works.
    assert!(f.host.run(1, Host::rw(0x02, 0, 1, DATA, 0)).ok());
}

#[test]
fn hostile_doorbells_and_a_full_completion_queue() {
    let mut f = fixture("doorbells", false, |_| {});
    // Doorbells before the controller is ready do nothing.
    f.host.write32(nvme::DOORBELLS, 5);
    assert!(f.host.enable(4));
    f.host.set_queue_count(2);
    // An SQ tail beyond the queue, a CQ head beyond it, a doorbell of a
    // queue that does not exist, one past the doorbell area: all ignored.
    f.host.write32(nvme::DOORBELLS, 4);
    f.host.write32(nvme::DOORBELLS + 4, 9);
    f.host.write32(nvme::DOORBELLS + 8 * 2, 1);
    f.host.write32(nvme::DOORBELLS + 8 * 17, 1);
    f.host.write32(nvme::DOORBELLS + 2, 1);
    assert!(f.host.poll(0, false).is_none());
    // Still working.
    assert!(f.host.admin(Sqe::new(0x0A).cdw(10, 0x07)).ok());

    // A 4-entry CQ (3 usable) under a 16-entry SQ: 12 reads at once. The
    // controller holds what does not fit until the host frees room.
    let (cq, sq) = f.host.create_io_queues_sized(1, 4, 16);
    assert!(cq.ok() && sq.ok());
    let host = &mut f.host;
    let mut cids = Vec::new();
    for i in 0..12u64 {
        cids.push(host.push(1, Host::rw(0x02, i, 1, DATA + i * 0x1000, 0), false));
    }
    host.ring_sq(1);
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while seen.len() < 12 {
        assert!(std::time::Instant::now() < deadline, "stuck after {seen:?}");
        match host.poll(1, false) {
            Some(c) => {
                assert!(c.ok(), "{c:?}");
                seen.push(c.cid);
            }
            // Free the room only once we have drained what was posted.
            None => host.ring_cq(1),
        }
    }
    seen.sort_unstable();
    cids.sort_unstable();
    assert_eq!(seen, cids);
}

#[test]
fn reset_and_reenable() {
    let mut f = ready("reset", false);
    assert!(f.host.run(1, Host::rw(0x02, 0, 8, DATA, 0)).ok());
    f.host.disable();
    assert_eq!(f.host.read32(0x1C) & 1, 0, "RDY clears");
    assert!(f.host.enable(8));
    // The old I/O queues are gone: deleting one fails.
    assert_eq!(status(&f.host.admin(Sqe::new(0x00).cdw(10, 1))), (1, 0x01));
    f.host.set_queue_count(1);
    let (cq, sq) = f.host.create_io_queues(1, 8);
    assert!(cq.ok() && sq.ok());
    assert!(f.host.run(1, Host::rw(0x02, 0, 8, DATA, 0)).ok());
    // Bad admin queue set-up: CSTS.CFS, not ready.
    f.host.disable();
    f.host.write32(0x24, 0);
    f.host
        .write32(0x14, nvme_host::CC_ENTRY_SIZES | nvme_host::CC_EN);
    assert_eq!(f.host.read32(0x1C) & 3, 2, "fatal status, not ready");
    // Shutdown notification completes.
    f.host.write32(0x14, nvme_host::CC_ENTRY_SIZES | 1 << 14);
    f.host.wait_csts(0xC, 0x8);
}

#[test]
fn options_from_the_config_tree() {
    let mut t = ConfigTree::new();
    for (k, v) in [
        ("maxq", "4"),
        ("qsz", "256"),
        ("ioslots", "32"),
        ("sectsz", "4096"),
        ("ser", "SERIAL-THAT-IS-TOO-LONG-FOR-20"),
        ("eui64", "0x1122334455667788"),
        ("dsm", "disable"),
    ] {
        t.set(&format!("pci.0.5.0.{k}"), v).unwrap();
    }
    let o = NvmeOptions::from_config(&t, "pci.0.5.0").unwrap();
    assert_eq!((o.max_queues, o.queue_entries, o.io_slots), (4, 256, 32));
    assert_eq!(o.sector_size, Some(4096));
    assert_eq!(o.serial, "SERIAL-THAT-IS-TOO-L");
    assert_eq!(o.eui64, Some(0x1122_3344_5566_7788));
    assert_eq!(o.dsm, nvme::DsmMode::Disable);
    // bhyve: maxq out of range means 16; an odd sectsz keeps the backing's.
    t.set("pci.0.5.0.maxq", "99").unwrap();
    t.set("pci.0.5.0.sectsz", "1024").unwrap();
    let o = NvmeOptions::from_config(&t, "pci.0.5.0").unwrap();
    assert_eq!((o.max_queues, o.sector_size), (16, None));
    for (k, bad) in [
        ("qsz", "0"),
        ("ioslots", "x"),
        ("dsm", "maybe"),
        ("eui64", "zz"),
    ] {
        let mut t2 = t.clone();
        t2.set(&format!("pci.0.5.0.{k}"), bad).unwrap();
        let e = NvmeOptions::from_config(&t2, "pci.0.5.0").unwrap_err();
        assert!(e.to_string().contains(k), "{k}={bad}: {e}");
    }
    // A 4 KiB namespace with the user's EUI-64 (stored byte-swapped, as
    // bhyve does).
    let mut f = fixture("sectsz", false, |o| {
        o.sector_size = Some(4096);
        o.eui64 = Some(0x1122_3344_5566_7788);
        o.dsm = nvme::DsmMode::Disable;
    });
    assert!(f.host.enable(4));
    let c = f.host.admin(Sqe::new(0x06).nsid(1).prp1(DATA).cdw(10, 0));
    assert!(c.ok());
    let mut id = vec![0u8; 4096];
    f.host.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(
        u64::from_le_bytes(id[0..8].try_into().unwrap()),
        DISK / 4096
    );
    assert_eq!(id[130], 12, "LBADS");
    assert_eq!(&id[120..128], &0x1122_3344_5566_7788u64.to_le_bytes());
    let c = f.host.admin(Sqe::new(0x06).prp1(DATA).cdw(10, 1));
    assert!(c.ok());
    f.host.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(id[520] & 4, 0, "dsm=disable: no DSM");
    f.host.set_queue_count(1);
    f.host.create_io_queues(1, 4);
    let dsm = Sqe::new(0x09).nsid(1).prp1(DATA).cdw(11, 4);
    assert_eq!(status(&f.host.run(1, dsm)), (0, 0x01));
}

#[test]
fn paused_with_io_in_flight_saves_and_restores() {
    let mut f = fixture("snapshot", false, |_| {});
    let opts = opts_default();
    assert!(f.host.enable(32));
    f.host.set_queue_count(4);
    // A 4-entry CQ (3 usable) under 16 SQ entries: most completions are
    // held by the controller, so the snapshot must carry them.
    let (cq, sq) = f.host.create_io_queues_sized(1, 4, 16);
    assert!(cq.ok() && sq.ok());

    // Four 4 KiB writes, a flush (the back end's slow one: it goes to the
    // disk) and three 4 KiB reads: ioslots (8) commands.
    let written: Vec<Vec<u8>> = (0..4).map(|i| pattern(4096, 40 + i as u8)).collect();
    let host = &mut f.host;
    let mut cids = Vec::new();
    for (i, data) in written.iter().enumerate() {
        let at = DATA + i as u64 * 0x1000;
        host.mem.write_slice(data, GuestAddress(at)).unwrap();
        cids.push(host.push(1, Host::rw(0x01, 100 + 8 * i as u64, 8, at, 0), false));
    }
    cids.push(host.push(1, Sqe::new(0x00).nsid(1), false));
    for i in 0..3u64 {
        let at = DATA + 0x8000 + i * 0x1000;
        cids.push(host.push(1, Host::rw(0x02, 8 * i, 8, at, 0), false));
    }
    host.ring_sq(1);
    // Paused as soon as the I/O thread has fetched all eight, mostly
    // while the back end still has some of them.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let in_flight = loop {
        let mut n = host.nvme.lock().unwrap();
        if n.state().sqs[1].as_ref().unwrap().head == 8 {
            n.pause();
            break !n.quiesced();
        }
        drop(n);
        assert!(std::time::Instant::now() < deadline, "never fetched");
        std::thread::yield_now();
    };
    eprintln!("paused with I/O in flight: {in_flight}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !host.nvme.lock().unwrap().quiesced() {
        assert!(std::time::Instant::now() < deadline, "never quiesced");
        std::thread::yield_now();
    }

    // Doorbells rung while paused are taken but nothing is fetched.
    let late_write = pattern(4096, 77);
    host.mem
        .write_slice(&late_write, GuestAddress(DATA + 0x4000))
        .unwrap();
    cids.push(host.push(1, Host::rw(0x01, 200, 8, DATA + 0x4000, 0), true));
    cids.push(host.push(1, Host::rw(0x02, 1000, 8, DATA + 0xC000, 0), true));
    std::thread::sleep(std::time::Duration::from_millis(50));
    {
        let n = host.nvme.lock().unwrap();
        let sq = n.state().sqs[1].as_ref().unwrap();
        assert_eq!((sq.head, sq.tail), (8, 10), "a paused controller fetched");
    }
    let file = std::fs::read(&f.path).unwrap();
    assert_eq!(
        file[200 * 512..208 * 512],
        pattern(DISK as usize, 7)[200 * 512..208 * 512]
    );

    let (config, saved) = {
        let n = host.nvme.lock().unwrap();
        (n.config().clone(), n.save_device().unwrap())
    };
    let saved: Option<rhyve_platform::snapshot::DeviceState> =
        serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();

    // A new controller on a copy of guest memory and the same disk.
    let mem2 = GuestMemory::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let mut copy = vec![0u8; MEM];
    host.mem.read_slice(&mut copy, GuestAddress(0)).unwrap();
    mem2.write_slice(&copy, GuestAddress(0)).unwrap();
    let nvme2 = controller(&f.path, false, opts.clone(), &mem2);
    {
        let mut n = nvme2.lock().unwrap();
        n.config_mut().restore(config).unwrap();
        n.restore_device(saved.as_ref()).unwrap();
        assert_eq!(n.state(), host.nvme.lock().unwrap().state());
    }
    let mut host2 = host.moved_to(nvme2.clone(), mem2);
    nvme2.lock().unwrap().resume();

    // Every command completes exactly once, successfully.
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while seen.len() < cids.len() {
        assert!(std::time::Instant::now() < deadline, "stuck after {seen:?}");
        match host2.poll(1, false) {
            Some(c) => {
                assert!(c.ok(), "{c:?}");
                seen.push(c.cid);
            }
            None => host2.ring_cq(1),
        }
    }
    host2.ring_cq(1);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(host2.poll(1, false).is_none(), "a completion posted twice");
    seen.sort_unstable();
    cids.sort_unstable();
    assert_eq!(seen, cids);

    // The data is right: writes in the file, reads in the new memory.
    let file = std::fs::read(&f.path).unwrap();
    for (i, data) in written.iter().enumerate() {
        let lba = 100 + 8 * i;
        assert_eq!(&file[lba * 512..lba * 512 + 4096], &data[..]);
    }
    assert_eq!(&file[200 * 512..208 * 512], &late_write[..]);
    let original = pattern(DISK as usize, 7);
    for i in 0..3usize {
        let mut got = vec![0u8; 4096];
        host2
            .mem
            .read_slice(&mut got, GuestAddress(DATA + 0x8000 + i as u64 * 0x1000))
            .unwrap();
        assert_eq!(got, original[i * 4096..(i + 1) * 4096]);
    }
    let mut got = vec![0u8; 4096];
    host2
        .mem
        .read_slice(&mut got, GuestAddress(DATA + 0xC000))
        .unwrap();
    assert_eq!(got, original[1000 * 512..1008 * 512]);

    // A namespace of another size, or other queue limits, is refused by name.
    let small = f.dir.join("small.img");
    std::fs::write(&small, vec![0u8; DISK as usize / 2]).unwrap();
    let mem3 = GuestMemory::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let other = controller(&small, false, opts.clone(), &mem3);
    let e = other
        .lock()
        .unwrap()
        .restore_device(saved.as_ref())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("namespace blocks 8192 in the snapshot, 4096 here"),
        "{e}"
    );
    let mut fewer = opts;
    fewer.max_queues = 2;
    let other = controller(&f.path, false, fewer, &mem3);
    let e = other
        .lock()
        .unwrap()
        .restore_device(saved.as_ref())
        .unwrap_err()
        .to_string();
    assert!(e.contains("maxq 16 in the snapshot, 2 here"), "{e}");

    // A snapshot file is input too: a queue it cannot run is refused.
    let mut bad = saved.clone().unwrap();
    bad.data["state"]["sqs"][1]["entries"] = 0.into();
    let other = controller(&f.path, false, opts_default(), &mem3);
    let e = other
        .lock()
        .unwrap()
        .restore_device(Some(&bad))
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad submission queue 1"), "{e}");
}
