//! A legacy (0.9.5) virtio-pci driver written from the spec drives our
//! transport and devices natively: reset and feature negotiation, queue
//! setup by PFN, MSI-X vectors, every virtio-blk request type, virtio-rnd,
//! interrupt suppression, and hostile chains (out-of-memory buffers, loops,
//! a corrupt avail index) that must end as error statuses or
//! DEVICE_NEEDS_RESET, never as a crash.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rhyve_config::ConfigTree;
use rhyve_pci::PciFunction;
use rhyve_platform::irq::MsiSender;
use rhyve_platform::notify::{GuestNotifiers, IoAddress, MsiRoute};
use rhyve_virtio::block::{
    F_DISCARD, F_FLUSH, F_RO, S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT,
    T_WRITE_ZEROES,
};
use rhyve_virtio::pci::{
    modern, regs, Transport, VirtioPci, NO_VECTOR, STATUS_FEATURES_OK, STATUS_NEEDS_RESET,
};
use rhyve_virtio::{device_from_config, GuestMemory, F_RING_EVENT_IDX};
use std::os::fd::{BorrowedFd, OwnedFd};
use vm_memory::{Bytes, GuestAddress};

const MEM_SIZE: usize = 16 << 20;
const RING_PAGE: u64 = 0x10_0000;
const DATA: u64 = 0x40_0000;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

#[derive(Default)]
struct Msis {
    sent: Mutex<Vec<(u64, u32)>>,
    cv: Condvar,
}

impl MsiSender for Msis {
    fn send(&self, address: u64, data: u32) {
        self.sent.lock().unwrap().push((address, data));
        self.cv.notify_all();
    }
}

struct Driver {
    f: Arc<Mutex<VirtioPci>>,
    mem: GuestMemory,
    msis: Arc<Msis>,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    event_idx: bool,
    modern: bool,
}

impl Driver {
    fn read(&self, off: u64, len: usize) -> u32 {
        let mut b = [0u8; 4];
        self.f.lock().unwrap().bar_read(0, off, &mut b[..len]);
        u32::from_le_bytes(b)
    }
    fn write(&self, off: u64, v: u32, len: usize) {
        self.f
            .lock()
            .unwrap()
            .bar_write(0, off, &v.to_le_bytes()[..len]);
    }

    /// Spec 4.1.5 (legacy): reset, ACK, DRIVER, features, queue 0, MSI-X, DRIVER_OK.
    fn start(device: Box<dyn rhyve_virtio::VirtioDevice>, want: impl Fn(u64) -> u64) -> Self {
        Self::start_with(device, true, want)
    }

    fn start_with(
        device: Box<dyn rhyve_virtio::VirtioDevice>,
        msix: bool,
        want: impl Fn(u64) -> u64,
    ) -> Self {
        Self::start_full(device, msix, None, want)
    }

    fn start_full(
        device: Box<dyn rhyve_virtio::VirtioDevice>,
        msix: bool,
        notifiers: Option<Arc<dyn GuestNotifiers>>,
        want: impl Fn(u64) -> u64,
    ) -> Self {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let f = VirtioPci::new(device, mem.clone(), msix, Transport::Legacy, notifiers).unwrap();
        let msis = Arc::new(Msis::default());
        if msix {
            let mut g = f.lock().unwrap();
            g.config_mut().connect_msi(msis.clone());
            // Enable MSI-X (capability ID 0x11, control at +2) and program
            // vector v to address 0xFEE0_0000, data 0x40 + v, unmasked.
            let cap = g.config().find_capability(0x11).expect("MSI-X capability");
            g.config_write(cap + 2, &0x8000u16.to_le_bytes());
            for v in 0..2u64 {
                let e = v * 16;
                g.bar_write(1, e, &0xFEE0_0000u32.to_le_bytes());
                g.bar_write(1, e + 4, &0u32.to_le_bytes());
                g.bar_write(1, e + 8, &(0x40 + v as u32).to_le_bytes());
                g.bar_write(1, e + 12, &0u32.to_le_bytes());
            }
        }
        let mut d = Driver {
            f,
            mem,
            msis,
            size: 0,
            desc: RING_PAGE,
            avail: 0,
            used: 0,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            event_idx: false,
            modern: false,
        };
        d.write(regs::STATUS, 0, 1);
        assert_eq!(d.read(regs::STATUS, 1), 0);
        d.write(regs::STATUS, 1, 1);
        d.write(regs::STATUS, 3, 1);
        let offered = u64::from(d.read(regs::HOST_FEATURES, 4));
        let accepted = want(offered);
        d.event_idx = accepted & F_RING_EVENT_IDX != 0;
        d.write(regs::GUEST_FEATURES, accepted as u32, 4);
        d.write(regs::QUEUE_SEL, 0, 2);
        d.size = d.read(regs::QUEUE_NUM, 2) as u16;
        assert!(d.size > 0);
        d.avail = d.desc + 16 * u64::from(d.size);
        d.used = (d.avail + 6 + 2 * u64::from(d.size)).div_ceil(4096) * 4096;
        d.write(regs::QUEUE_PFN, (RING_PAGE >> 12) as u32, 4);
        if msix {
            d.write(regs::MSI_CONFIG_VECTOR, 0, 2);
            d.write(regs::MSI_QUEUE_VECTOR, 1, 2);
            assert_eq!(d.read(regs::MSI_QUEUE_VECTOR, 2), 1);
        }
        d.write(regs::STATUS, 7, 1);
        d
    }

    /// Post one chain of (address, length, device-writable) buffers.
    fn post(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % self.size;
            let next = (idx + 1) % self.size;
            let mut flags = if w { DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            let d = self.desc + 16 * u64::from(idx);
            self.mem.write_obj(addr, GuestAddress(d)).unwrap();
            self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(d + 14)).unwrap();
        }
        self.next_desc = (self.next_desc + bufs.len() as u16) % self.size;
        self.publish(head);
        head
    }

    fn publish(&mut self, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        if self.modern {
            self.f
                .lock()
                .unwrap()
                .bar_write(modern::BAR, modern::NOTIFY, &0u16.to_le_bytes());
        } else {
            self.write(regs::QUEUE_NOTIFY, 0, 2);
        }
    }

    /// Wait for the next used entry: (head, len).
    fn complete(&mut self) -> (u16, u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let idx: u16 = self.mem.read_obj(GuestAddress(self.used + 2)).unwrap();
            if idx != self.used_seen {
                let e = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
                let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
                self.used_seen = self.used_seen.wrapping_add(1);
                // As Linux does with callbacks on: interrupt me for the next one.
                if self.event_idx {
                    let used_event = self.avail + 4 + 2 * u64::from(self.size);
                    self.mem
                        .write_obj(self.used_seen, GuestAddress(used_event))
                        .unwrap();
                }
                return (id as u16, len);
            }
            assert!(Instant::now() < deadline, "no completion");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn msi_count(&self) -> usize {
        self.msis.sent.lock().unwrap().len()
    }

    fn wait_msis(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut g = self.msis.sent.lock().unwrap();
        while g.len() < n {
            assert!(
                Instant::now() < deadline,
                "expected {n} MSIs, got {}",
                g.len()
            );
            g = self
                .msis
                .cv
                .wait_timeout(g, Duration::from_millis(50))
                .unwrap()
                .0;
        }
    }

    /// A virtio-blk request: header, optional data, status. Returns (status, used len).
    fn blk(&mut self, kind: u32, sector: u64, data: Option<(u64, u32, bool)>) -> (u8, u32) {
        let hdr = DATA - 0x1000;
        let status = DATA - 0x100;
        self.mem.write_obj(kind, GuestAddress(hdr)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
        self.mem.write_obj(0xEEu8, GuestAddress(status)).unwrap();
        let mut bufs = vec![(hdr, 16, false)];
        bufs.extend(data);
        bufs.push((status, 1, true));
        let head = self.post(&bufs);
        let (id, len) = self.complete();
        assert_eq!(id, head);
        (self.mem.read_obj(GuestAddress(status)).unwrap(), len)
    }
}

fn blk_device(
    path: &std::path::Path,
    extra: &[(&str, &str)],
) -> Box<dyn rhyve_virtio::VirtioDevice> {
    let mut t = ConfigTree::new();
    t.set("pci.0.4.0.device", "virtio-blk").unwrap();
    t.set("pci.0.4.0.path", path.to_str().unwrap()).unwrap();
    for (k, v) in extra {
        t.set(&format!("pci.0.4.0.{k}"), *v).unwrap();
    }
    device_from_config(&t, "pci.0.4.0", "vm", 4, 0).unwrap()
}

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("rhyve-pci-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn pci_identity_and_bars() {
    let dir = scratch("ids");
    let img = dir.join("d.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let f = VirtioPci::new(
        blk_device(&img, &[]),
        mem.clone(),
        true,
        Transport::Legacy,
        None,
    )
    .unwrap();
    let mut g = f.lock().unwrap();
    assert_eq!(g.config_read(0), 0x1001_1AF4, "vendor 1AF4, device 1001");
    assert_eq!(g.config_read(0x2C), 0x0002_1AF4, "subsystem: virtio type 2");
    assert_eq!(g.config().bar(0).unwrap().kind, rhyve_pci::BarKind::Io);
    assert!(g.config().find_capability(0x11).is_some(), "MSI-X");
    drop(g);
    // -W: plain MSI instead of MSI-X.
    let f = VirtioPci::new(blk_device(&img, &[]), mem, false, Transport::Legacy, None).unwrap();
    let g = f.lock().unwrap();
    assert!(g.config().find_capability(0x11).is_none());
    assert!(g.config().find_capability(0x05).is_some(), "MSI");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn blk_every_request_type() {
    let dir = scratch("blk");
    let img = dir.join("d.img");
    std::fs::write(&img, vec![0x11u8; 4 << 20]).unwrap();
    let mut d = Driver::start(blk_device(&img, &[("ser", "RHYVE-SERIAL")]), |f| {
        assert!(f & F_FLUSH != 0 && f & F_DISCARD != 0 && f & F_RO == 0);
        assert_eq!(f >> 32, 0, "legacy features are 32 bits");
        f
    });
    // Config space follows the 24-byte header with MSI-X on: capacity.
    let cap = u64::from(d.read(regs::CONFIG_MSIX, 4))
        | (u64::from(d.read(regs::CONFIG_MSIX + 4, 4)) << 32);
    assert_eq!(cap, (4 << 20) / 512);

    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    d.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    assert_eq!(d.blk(T_OUT, 8, Some((DATA, 8192, false))), (S_OK, 1));
    let disk = std::fs::read(&img).unwrap();
    assert_eq!(&disk[4096..4096 + 8192], &pattern[..]);

    d.mem.write_slice(&[0u8; 8192], GuestAddress(DATA)).unwrap();
    assert_eq!(d.blk(T_IN, 8, Some((DATA, 8192, true))), (S_OK, 8193));
    let mut back = vec![0u8; 8192];
    d.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, pattern);

    assert_eq!(d.blk(T_FLUSH, 0, None).0, S_OK);

    let (st, len) = d.blk(T_GET_ID, 0, Some((DATA, 20, true)));
    assert_eq!((st, len), (S_OK, 21));
    let mut id = [0u8; 20];
    d.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..12], b"RHYVE-SERIAL");

    // Discard sectors 8..24 and write-zeroes 0..8: one segment each.
    let seg = DATA + 0x10000;
    d.mem.write_obj(8u64, GuestAddress(seg)).unwrap();
    d.mem.write_obj(16u32, GuestAddress(seg + 8)).unwrap();
    d.mem.write_obj(0u32, GuestAddress(seg + 12)).unwrap();
    assert_eq!(d.blk(T_DISCARD, 0, Some((seg, 16, false))).0, S_OK);
    d.mem.write_obj(0u64, GuestAddress(seg)).unwrap();
    d.mem.write_obj(8u32, GuestAddress(seg + 8)).unwrap();
    assert_eq!(d.blk(T_WRITE_ZEROES, 0, Some((seg, 16, false))).0, S_OK);
    let disk = std::fs::read(&img).unwrap();
    assert!(disk[..12288].iter().all(|&b| b == 0));
    assert!(disk[12288..16384].iter().all(|&b| b == 0x11));

    // Errors: unknown type, beyond the end, discard with flags.
    assert_eq!(d.blk(99, 0, None).0, S_UNSUPP);
    assert_eq!(
        d.blk(T_IN, (4 << 20) / 512, Some((DATA, 512, true))).0,
        S_IOERR
    );
    d.mem.write_obj(1u32, GuestAddress(seg + 12)).unwrap();
    assert_eq!(d.blk(T_DISCARD, 0, Some((seg, 16, false))).0, S_UNSUPP);

    // Every completion raised MSI-X vector 1 (data 0x41).
    let n = d.msi_count();
    assert!(n >= 9, "{n} interrupts");
    assert!(d
        .msis
        .sent
        .lock()
        .unwrap()
        .iter()
        .all(|&(a, v)| a == 0xFEE0_0000 && v == 0x41));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn blk_read_only_refuses_writes() {
    let dir = scratch("ro");
    let img = dir.join("d.img");
    std::fs::write(&img, vec![0x22u8; 1 << 20]).unwrap();
    let mut d = Driver::start(blk_device(&img, &[("ro", "true")]), |f| {
        assert!(f & F_RO != 0 && f & F_DISCARD == 0);
        f
    });
    assert_eq!(d.blk(T_OUT, 0, Some((DATA, 512, false))).0, S_IOERR);
    assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 0x22));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hostile_chains_get_errors_and_the_device_keeps_working() {
    let dir = scratch("hostile");
    let img = dir.join("d.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let mut d = Driver::start(blk_device(&img, &[]), |f| f);
    // Data buffer outside guest memory: no status can be written safely.
    let (_, len) = d.blk(T_IN, 0, Some((MEM_SIZE as u64 + 0x1000, 512, true)));
    assert_eq!(len, 0);
    // Length overflowing the address space.
    let (_, len) = d.blk(T_IN, 0, Some((DATA, u32::MAX, true)));
    assert_eq!(len, 0);
    // A descriptor that chains to itself.
    let hdr = DATA - 0x1000;
    let idx = d.next_desc;
    let desc = d.desc + 16 * u64::from(idx);
    d.mem.write_obj(hdr, GuestAddress(desc)).unwrap();
    d.mem.write_obj(16u32, GuestAddress(desc + 8)).unwrap();
    d.mem
        .write_obj(DESC_F_NEXT, GuestAddress(desc + 12))
        .unwrap();
    d.mem.write_obj(idx, GuestAddress(desc + 14)).unwrap();
    d.next_desc = (d.next_desc + 1) % d.size;
    d.publish(idx);
    let (id, len) = d.complete();
    assert_eq!((id, len), (idx, 0));
    // Still serving proper requests.
    assert_eq!(d.blk(T_IN, 0, Some((DATA, 512, true))).0, S_OK);

    // An avail index far ahead of the ring: DEVICE_NEEDS_RESET + config MSI (vector 0).
    let before = d.msi_count();
    d.mem
        .write_obj(d.avail_idx.wrapping_add(1000), GuestAddress(d.avail + 2))
        .unwrap();
    d.write(regs::QUEUE_NOTIFY, 0, 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.read(regs::STATUS, 1) as u8 & STATUS_NEEDS_RESET == 0 {
        assert!(Instant::now() < deadline, "no DEVICE_NEEDS_RESET");
        std::thread::sleep(Duration::from_millis(2));
    }
    d.wait_msis(before + 1);
    assert_eq!(d.msis.sent.lock().unwrap().last().unwrap().1, 0x40);
    // Reset recovers the device.
    d.write(regs::STATUS, 0, 1);
    assert_eq!(d.read(regs::STATUS, 1), 0);
    assert_eq!(d.read(regs::MSI_QUEUE_VECTOR, 2) as u16, NO_VECTOR);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn interrupt_suppression() {
    let dir = scratch("suppress");
    let img = dir.join("d.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    // Without EVENT_IDX: VRING_AVAIL_F_NO_INTERRUPT silences completions.
    let mut d = Driver::start(blk_device(&img, &[]), |f| f & !F_RING_EVENT_IDX);
    d.mem.write_obj(1u16, GuestAddress(d.avail)).unwrap();
    assert_eq!(d.blk(T_FLUSH, 0, None).0, S_OK);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(d.msi_count(), 0);
    d.mem.write_obj(0u16, GuestAddress(d.avail)).unwrap();
    assert_eq!(d.blk(T_FLUSH, 0, None).0, S_OK);
    d.wait_msis(1);

    // With EVENT_IDX: only when used_event is crossed.
    let mut d = Driver::start(blk_device(&img, &[]), |f| f);
    d.event_idx = false; // this test steers used_event itself
    let used_event = d.avail + 4 + 2 * u64::from(d.size);
    d.mem.write_obj(5u16, GuestAddress(used_event)).unwrap();
    for _ in 0..5 {
        assert_eq!(d.blk(T_FLUSH, 0, None).0, S_OK);
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(d.msi_count(), 0, "no interrupt before used_event");
    assert_eq!(d.blk(T_FLUSH, 0, None).0, S_OK);
    d.wait_msis(1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn rnd_fills_buffers() {
    let mut t = ConfigTree::new();
    t.set("pci.0.5.0.device", "virtio-rnd").unwrap();
    let dev = device_from_config(&t, "pci.0.5.0", "vm", 5, 0).unwrap();
    let mut d = Driver::start(dev, |f| f);
    d.mem.write_slice(&[0u8; 256], GuestAddress(DATA)).unwrap();
    let head = d.post(&[(DATA, 256, true)]);
    let (id, len) = d.complete();
    assert_eq!((id, len), (head, 256));
    let mut b = [0u8; 256];
    d.mem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
    assert!(b.iter().filter(|&&x| x != 0).count() > 200);
    // A read-only buffer gets nothing written.
    let head = d.post(&[(DATA, 64, false)]);
    assert_eq!(d.complete(), (head, 0));
}

/// Queue `n` reads of 4 KiB (read i at sector 24 i) before one
/// notification; returns each one's head, header and buffer addresses.
fn queue_reads(d: &mut Driver, n: u64) -> Vec<(u16, u64, u64)> {
    let mut heads = Vec::new();
    for i in 0..n {
        let hdr = DATA + 0x10_0000 + i * 0x100;
        let buf = DATA + 0x20_0000 + i * 0x1000;
        let st = hdr + 0x40;
        d.mem.write_obj(T_IN, GuestAddress(hdr)).unwrap();
        d.mem.write_obj(i * 8 * 3, GuestAddress(hdr + 8)).unwrap();
        d.mem.write_obj(0xEEu8, GuestAddress(st)).unwrap();
        let head = d.next_desc;
        for (j, (addr, len, flags)) in [
            (hdr, 16u32, DESC_F_NEXT),
            (buf, 4096, DESC_F_NEXT | DESC_F_WRITE),
            (st, 1, DESC_F_WRITE),
        ]
        .into_iter()
        .enumerate()
        {
            let idx = (head + j as u16) % d.size;
            let a = d.desc + 16 * u64::from(idx);
            d.mem.write_obj(addr, GuestAddress(a)).unwrap();
            d.mem.write_obj(len, GuestAddress(a + 8)).unwrap();
            d.mem.write_obj(flags, GuestAddress(a + 12)).unwrap();
            d.mem
                .write_obj((idx + 1) % d.size, GuestAddress(a + 14))
                .unwrap();
        }
        d.next_desc = (head + 3) % d.size;
        let slot = d.avail + 4 + 2 * u64::from(d.avail_idx % d.size);
        d.mem.write_obj(head, GuestAddress(slot)).unwrap();
        d.avail_idx = d.avail_idx.wrapping_add(1);
        heads.push((head, hdr, buf));
    }
    d.mem
        .write_obj(d.avail_idx, GuestAddress(d.avail + 2))
        .unwrap();
    heads
}

#[test]
fn many_requests_in_flight_complete() {
    let dir = scratch("inflight");
    let img = dir.join("d.img");
    let disk: Vec<u8> = (0..(4u32 << 20)).map(|i| (i / 512) as u8).collect();
    std::fs::write(&img, &disk).unwrap();
    let mut d = Driver::start(blk_device(&img, &[]), |f| f);
    let heads = queue_reads(&mut d, 32);
    d.write(regs::QUEUE_NOTIFY, 0, 2);
    let mut done = Vec::new();
    for _ in 0..32 {
        done.push(d.complete());
    }
    for (i, (head, hdr, buf)) in heads.into_iter().enumerate() {
        let (_, len) = *done.iter().find(|(h, _)| *h == head).expect("completed");
        assert_eq!(len, 4097);
        assert_eq!(
            d.mem.read_obj::<u8>(GuestAddress(hdr + 0x40)).unwrap(),
            S_OK
        );
        let mut b = vec![0u8; 4096];
        d.mem.read_slice(&mut b, GuestAddress(buf)).unwrap();
        let off = i * 8 * 3 * 512;
        assert_eq!(b, disk[off..off + 4096]);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn without_msix_the_isr_reports_and_clears() {
    let dir = scratch("isr");
    let img = dir.join("d.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let mut d = Driver::start_with(blk_device(&img, &[]), false, |f| f);
    // Without MSI-X the config space follows the 20-byte header.
    let cap = d.read(regs::CONFIG, 4);
    assert_eq!(cap, (1 << 20) / 512);
    assert_eq!(d.blk(T_FLUSH, 0, None).0, S_OK);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut isr = 0;
    while isr == 0 && Instant::now() < deadline {
        isr = d.read(regs::ISR, 1);
    }
    assert_eq!(isr, 1, "queue interrupt in the ISR");
    assert_eq!(d.read(regs::ISR, 1), 0, "reading the ISR clears it");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn mread(f: &Arc<Mutex<VirtioPci>>, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    f.lock().unwrap().bar_read(modern::BAR, off, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn mwrite(f: &Arc<Mutex<VirtioPci>>, off: u64, v: u64, len: usize) {
    f.lock()
        .unwrap()
        .bar_write(modern::BAR, off, &v.to_le_bytes()[..len]);
}

#[test]
fn modern_transport_negotiates_and_serves() {
    let dir = scratch("modern");
    let img = dir.join("d.img");
    std::fs::write(&img, vec![0x33u8; 1 << 20]).unwrap();
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let f = VirtioPci::new(
        blk_device(&img, &[]),
        mem.clone(),
        true,
        Transport::Modern,
        None,
    )
    .unwrap();
    let msis = Arc::new(Msis::default());
    {
        let mut g = f.lock().unwrap();
        assert_eq!(g.config_read(0), 0x1042_1AF4, "modern ID 0x1040 + 2");
        assert_eq!(g.config_read(8) & 0xFF, 1, "revision 1");
        // Four vendor capabilities: common, notify, ISR, device config.
        let mut types = Vec::new();
        let mut at = g.config_read(0x34) as u16 & 0xFF;
        while at != 0 {
            let head = g.config_read(at & !3) >> ((at & 3) * 8);
            if head & 0xFF == 0x09 {
                let t = g.config_read((at + 3) & !3) >> (((at + 3) & 3) * 8);
                types.push(t as u8);
            }
            at = ((head >> 8) & 0xFF) as u16;
        }
        types.sort();
        assert_eq!(types, vec![1, 2, 3, 4]);
        g.config_mut().connect_msi(msis.clone());
        let cap = g.config().find_capability(0x11).unwrap();
        g.config_write(cap + 2, &0x8000u16.to_le_bytes());
        for v in 0..2u64 {
            g.bar_write(1, v * 16, &0xFEE0_0000u32.to_le_bytes());
            g.bar_write(1, v * 16 + 8, &(0x40 + v as u32).to_le_bytes());
            g.bar_write(1, v * 16 + 12, &0u32.to_le_bytes());
        }
    }
    mwrite(&f, modern::DEVICE_STATUS, 0, 1);
    mwrite(&f, modern::DEVICE_STATUS, 3, 1);
    mwrite(&f, modern::DEVICE_FEATURE_SELECT, 1, 4);
    let high = mread(&f, modern::DEVICE_FEATURE, 4);
    assert!(high & 1 != 0, "VERSION_1 offered");
    mwrite(&f, modern::DEVICE_FEATURE_SELECT, 0, 4);
    let low = mread(&f, modern::DEVICE_FEATURE, 4);
    // Without VERSION_1, FEATURES_OK does not stick.
    mwrite(&f, modern::DRIVER_FEATURE_SELECT, 0, 4);
    mwrite(&f, modern::DRIVER_FEATURE, low, 4);
    mwrite(
        &f,
        modern::DEVICE_STATUS,
        3 | u64::from(STATUS_FEATURES_OK),
        1,
    );
    assert_eq!(
        mread(&f, modern::DEVICE_STATUS, 1) as u8 & STATUS_FEATURES_OK,
        0
    );
    mwrite(&f, modern::DRIVER_FEATURE_SELECT, 1, 4);
    mwrite(&f, modern::DRIVER_FEATURE, 1, 4);
    mwrite(
        &f,
        modern::DEVICE_STATUS,
        3 | u64::from(STATUS_FEATURES_OK),
        1,
    );
    assert_ne!(
        mread(&f, modern::DEVICE_STATUS, 1) as u8 & STATUS_FEATURES_OK,
        0
    );
    // Queue 0: shrink to 64, split rings where we like them.
    mwrite(&f, modern::QUEUE_SELECT, 0, 2);
    assert_eq!(mread(&f, modern::QUEUE_SIZE, 2), 128);
    mwrite(&f, modern::QUEUE_SIZE, 64, 2);
    mwrite(&f, modern::QUEUE_DESC, RING_PAGE, 8);
    mwrite(&f, modern::QUEUE_DRIVER, RING_PAGE + 0x1000, 4);
    mwrite(&f, modern::QUEUE_DRIVER + 4, 0, 4);
    mwrite(&f, modern::QUEUE_DEVICE, RING_PAGE + 0x2000, 8);
    mwrite(&f, modern::MSIX_CONFIG, 0, 2);
    mwrite(&f, modern::QUEUE_MSIX_VECTOR, 1, 2);
    mwrite(&f, modern::QUEUE_ENABLE, 1, 2);
    mwrite(
        &f,
        modern::DEVICE_STATUS,
        7 | u64::from(STATUS_FEATURES_OK),
        1,
    );
    let mut d = Driver {
        f: f.clone(),
        mem,
        msis,
        size: 64,
        desc: RING_PAGE,
        avail: RING_PAGE + 0x1000,
        used: RING_PAGE + 0x2000,
        next_desc: 0,
        avail_idx: 0,
        used_seen: 0,
        event_idx: low & F_RING_EVENT_IDX != 0,
        modern: true,
    };
    // Device config (capacity) in BAR 2 at DEVICE.
    assert_eq!(mread(&f, modern::DEVICE, 8), (1 << 20) / 512);
    d.mem
        .write_slice(&[0x77u8; 1024], GuestAddress(DATA))
        .unwrap();
    assert_eq!(d.blk(T_OUT, 2, Some((DATA, 1024, false))), (S_OK, 1));
    assert_eq!(d.blk(T_IN, 0, Some((DATA, 2048, true))), (S_OK, 2049));
    let mut back = vec![0u8; 2048];
    d.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back[..1024].iter().all(|&b| b == 0x33));
    assert!(back[1024..].iter().all(|&b| b == 0x77));
    d.wait_msis(1);
    assert_eq!(d.msis.sent.lock().unwrap()[0].1, 0x41);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn random_register_accesses_never_panic() {
    let dir = scratch("regs");
    let img = dir.join("d.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    for transport in [Transport::Legacy, Transport::Modern] {
        for msix in [true, false] {
            let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
            let f = VirtioPci::new(blk_device(&img, &[]), mem, msix, transport, None).unwrap();
            f.lock()
                .unwrap()
                .config_mut()
                .connect_msi(Arc::new(Msis::default()));
            let mut x = 0x1234_5678_9abc_def1u64;
            for _ in 0..20_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let bar = (x % 4) as usize;
                let off = (x >> 8) % 0x4100;
                let len = [1usize, 2, 4, 8, 3, 0][((x >> 24) % 6) as usize];
                let val = (x >> 32).to_le_bytes();
                let mut g = f.lock().unwrap();
                if x & (1 << 40) != 0 {
                    g.bar_write(bar, off, &val[..len]);
                } else {
                    let mut b = [0u8; 8];
                    g.bar_read(bar, off, &mut b[..len]);
                }
                if x & (1 << 41) != 0 {
                    let cfg_off = ((x >> 44) % 256) as u16 & !3;
                    g.config_write(cfg_off, &val[..4]);
                }
            }
            // Reset stops whatever the noise started.
            let mut g = f.lock().unwrap();
            match transport {
                Transport::Legacy => g.bar_write(0, regs::STATUS, &[0]),
                Transport::Modern => g.bar_write(modern::BAR, modern::DEVICE_STATUS, &[0]),
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Records what the transport binds; irqfds are kept (dup'd) for reading.
#[derive(Default)]
struct FakeNotifiers {
    ioevents: Mutex<Vec<(IoAddress, u64)>>,
    msis: Mutex<Vec<Option<(OwnedFd, MsiRoute)>>>,
}

impl GuestNotifiers for FakeNotifiers {
    fn add_ioevent(
        &self,
        _fd: BorrowedFd<'_>,
        addr: IoAddress,
        _len: u32,
        value: u64,
    ) -> std::io::Result<()> {
        self.ioevents.lock().unwrap().push((addr, value));
        Ok(())
    }
    fn remove_ioevent(
        &self,
        _fd: BorrowedFd<'_>,
        addr: IoAddress,
        _len: u32,
        value: u64,
    ) -> std::io::Result<()> {
        self.ioevents
            .lock()
            .unwrap()
            .retain(|e| *e != (addr, value));
        Ok(())
    }
    fn add_msi(&self, fd: BorrowedFd<'_>, route: MsiRoute) -> std::io::Result<u32> {
        let mut m = self.msis.lock().unwrap();
        m.push(Some((fd.try_clone_to_owned()?, route)));
        Ok(m.len() as u32 - 1)
    }
    fn update_msi(&self, handle: u32, route: MsiRoute) -> std::io::Result<()> {
        if let Some(Some(e)) = self.msis.lock().unwrap().get_mut(handle as usize) {
            e.1 = route;
        }
        Ok(())
    }
    fn remove_msi(&self, _fd: BorrowedFd<'_>, handle: u32) -> std::io::Result<()> {
        if let Some(e) = self.msis.lock().unwrap().get_mut(handle as usize) {
            *e = None;
        }
        Ok(())
    }
}

impl FakeNotifiers {
    /// Times the irqfd bound to data `data` fired (reads and resets it).
    fn fired(&self, data: u32) -> u64 {
        use std::os::fd::AsRawFd;
        let m = self.msis.lock().unwrap();
        let Some((fd, _)) = m.iter().flatten().find(|(_, r)| r.data == data) else {
            return 0;
        };
        let mut v = 0u64;
        // SAFETY: an 8-byte read from an eventfd into a u64 we own.
        let n = unsafe { libc::read(fd.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
        if n == 8 {
            v
        } else {
            0
        }
    }

    fn bound(&self) -> usize {
        self.msis.lock().unwrap().iter().flatten().count()
    }
}

#[test]
fn msix_through_irqfds_and_masking() {
    let dir = scratch("irqfd");
    let img = dir.join("d.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let fake = Arc::new(FakeNotifiers::default());
    let mut d = Driver::start_full(blk_device(&img, &[]), true, Some(fake.clone()), |f| f);
    // Both vectors are enabled and unmasked: both irqfds bound.
    assert_eq!(fake.bound(), 2);
    // BAR moves bind the queue's ioeventfd at BAR0 + 0x10, datamatch 0.
    d.f.lock().unwrap().bar_moved(0, Some(0x2000));
    assert_eq!(
        *fake.ioevents.lock().unwrap(),
        vec![(IoAddress::Port(0x2010), 0)]
    );
    assert_eq!(d.blk(T_FLUSH, 0, None).0, S_OK);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut fired = 0;
    while fired == 0 && Instant::now() < deadline {
        fired = fake.fired(0x41);
    }
    assert!(fired >= 1, "queue vector's irqfd fired");
    assert_eq!(d.msi_count(), 0, "nothing went the slow way");

    // Mask vector 1: its irqfd is unbound, the interrupt becomes pending
    // and is sent (by the config space) when the vector is unmasked.
    d.f.lock()
        .unwrap()
        .bar_write(1, 16 + 12, &1u32.to_le_bytes());
    assert_eq!(fake.bound(), 1);
    assert_eq!(d.blk(T_FLUSH, 0, None).0, S_OK);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(d.msi_count(), 0, "masked");
    d.f.lock()
        .unwrap()
        .bar_write(1, 16 + 12, &0u32.to_le_bytes());
    d.wait_msis(1);
    assert_eq!(d.msis.sent.lock().unwrap()[0].1, 0x41);
    assert_eq!(fake.bound(), 2, "rebound after unmasking");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A snapshot's pause with reads in flight: every request the device took
/// is completed into the used ring before it stops, and a device restored
/// from its state (another process's, with the same disk and memory) does
/// the rest: each of the 32 completes exactly once.
#[test]
fn paused_with_requests_in_flight_and_restored_each_completes_once() {
    let dir = scratch("snapshot");
    let img = dir.join("d.img");
    let disk: Vec<u8> = (0..(4u32 << 20)).map(|i| (i / 512) as u8).collect();
    std::fs::write(&img, &disk).unwrap();
    let mut d = Driver::start(blk_device(&img, &[]), |f| f);
    let heads = queue_reads(&mut d, 32);
    d.write(regs::QUEUE_NOTIFY, 0, 2);
    std::thread::sleep(Duration::from_millis(1));
    d.f.lock().unwrap().pause();
    let used_idx = |d: &Driver| d.mem.read_obj::<u16>(GuestAddress(d.used + 2)).unwrap();
    let at_pause = used_idx(&d);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(used_idx(&d), at_pause, "a paused device completed more");
    let (config, state) = {
        let f = d.f.lock().unwrap();
        (f.config().clone(), f.save_device().unwrap())
    };
    let state: Option<rhyve_platform::snapshot::DeviceState> =
        serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();

    let g = VirtioPci::new(
        blk_device(&img, &[]),
        d.mem.clone(),
        true,
        Transport::Legacy,
        None,
    )
    .unwrap();
    {
        let mut g = g.lock().unwrap();
        g.config_mut().connect_msi(d.msis.clone());
        g.config_mut().restore(config).unwrap();
        g.restore_device(state.as_ref()).unwrap();
        g.resume();
    }
    d.f = g;
    let mut done: Vec<(u16, u32)> = Vec::new();
    for _ in 0..32 {
        done.push(d.complete());
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(used_idx(&d), 32, "a request completed twice");
    for (i, (head, hdr, buf)) in heads.into_iter().enumerate() {
        assert_eq!(
            done.iter().filter(|(h, _)| *h == head).count(),
            1,
            "request {i}"
        );
        assert_eq!(
            d.mem.read_obj::<u8>(GuestAddress(hdr + 0x40)).unwrap(),
            S_OK
        );
        let mut b = vec![0u8; 4096];
        d.mem.read_slice(&mut b, GuestAddress(buf)).unwrap();
        let off = i * 8 * 3 * 512;
        assert_eq!(b, disk[off..off + 4096]);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
